//! The main thread: runs the event loop and answers API requests with the VMM.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use crate::api::{ApiRequest, ApiResponse, ApiServer, ConnId, CprExecRequest};
use crate::event_loop;
use crate::exit::VmExit;
use crate::runtime::Vmm;
use crate::serial_backend::SerialIn;
use crate::update::{self, UpdateError};
use crate::Error;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// How long molt keeps flushing API responses after the VM ended.
const FINAL_FLUSH: Duration = Duration::from_millis(500);

/// The event loop, the VMM and the API server.
pub struct Control {
    /// The VMM.
    pub vmm: Vmm,
    em: EventManager<Subscriber>,
    api: Option<Arc<Mutex<ApiServer>>>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Creates the event loop with the control subscriber (VM end, SIGINT/SIGTERM) and serial
/// input. Call before starting vCPU threads: it blocks SIGINT/SIGTERM for the threads to come.
pub fn event_loop(
    shared: &crate::machine::Shared,
    serial_in: SerialIn,
) -> Result<EventManager<Subscriber>, Error> {
    let signals = event_loop::termination_signalfd()
        .map_err(|e| Error::EventLoop(format!("signalfd: {e}")))?;
    let drained = shared
        .serial_drained
        .try_clone()
        .map_err(|e| Error::EventLoop(e.to_string()))?;
    let mut em =
        EventManager::<Subscriber>::new().map_err(|e| Error::EventLoop(format!("{e:?}")))?;
    em.add_subscriber(Arc::new(Mutex::new(event_loop::Control::new(
        shared.exits.clone(),
        signals,
    ))));
    em.add_subscriber(Arc::new(Mutex::new(event_loop::SerialInput::new(
        serial_in,
        shared.bus.clone(),
        drained,
    ))));
    em.add_subscriber(Arc::new(Mutex::new(event_loop::VirtioEvents::new(
        shared.virtio.clone(),
    ))));
    Ok(em)
}

impl Control {
    /// Wires `vmm` to the event loop `em` and, optionally, an API server.
    pub fn new(vmm: Vmm, mut em: EventManager<Subscriber>, api: Option<ApiServer>) -> Self {
        let api = api.map(|a| {
            let a = Arc::new(Mutex::new(a));
            em.add_subscriber(a.clone());
            a
        });
        Self { vmm, em, api }
    }

    /// Answers `conn` (used by a new image to answer the request that started the update).
    pub fn respond(&self, conn: ConnId, resp: ApiResponse) {
        if let Some(api) = &self.api {
            lock(api).respond(conn, resp);
        }
    }

    /// Queues requests carried over from the previous image.
    pub fn handle_carried(&mut self, requests: Vec<(ConnId, ApiRequest)>) {
        self.handle_batch(requests);
    }

    /// Runs until the VM ends; then flushes API responses and tears the VM down.
    pub fn run(mut self) -> VmExit {
        let end = loop {
            if let Some(end) = self.vmm.ended() {
                break end;
            }
            if let Err(e) = self.em.run() {
                break VmExit::Error(format!("event loop: {e:?}"));
            }
            let requests = match &self.api {
                Some(api) => lock(api).take_requests(),
                None => Vec::new(),
            };
            self.handle_batch(requests);
        };
        // Let responses already queued (e.g. to vm.shutdown) reach their clients.
        let deadline = Instant::now() + FINAL_FLUSH;
        while self.api.is_some() && Instant::now() < deadline {
            if self.em.run_with_timeout(20).unwrap_or(0) == 0 {
                break;
            }
        }
        self.vmm.shutdown();
        end
    }

    fn handle_batch(&mut self, requests: Vec<(ConnId, ApiRequest)>) {
        let mut update: Option<(ConnId, CprExecRequest)> = None;
        for (conn, req) in requests {
            match req {
                ApiRequest::CprExec(r) if update.is_none() => update = Some((conn, r)),
                ApiRequest::CprExec(_) => {
                    self.respond(conn, ApiResponse::error(409, UpdateError::Busy.to_string()))
                }
                other => {
                    let resp = self.handle(other);
                    self.respond(conn, resp);
                }
            }
        }
        if let Some((conn, req)) = update {
            let resp = self.cpr_exec(conn, req);
            self.respond(conn, resp);
        }
    }

    fn handle(&mut self, req: ApiRequest) -> ApiResponse {
        let result = match req {
            ApiRequest::Ping => {
                return ApiResponse::ok(serde_json::json!({
                    "version": crate::VERSION,
                    "pid": std::process::id(),
                }))
            }
            ApiRequest::Info => return ApiResponse::ok(self.vmm.info()),
            ApiRequest::Pause => self.vmm.pause(),
            ApiRequest::Resume => self.vmm.resume(),
            ApiRequest::Shutdown => {
                self.vmm
                    .shared
                    .exits
                    .end(VmExit::Stopped("vm.shutdown request".into()));
                Ok(())
            }
            ApiRequest::CprExec(_) => {
                return ApiResponse::error(409, UpdateError::Busy.to_string())
            }
        };
        match result {
            Ok(()) => ApiResponse::no_content(),
            Err(e) => ApiResponse::error(500, e.to_string()),
        }
    }

    /// Runs a live update; returns only if it failed (the guest runs on here).
    fn cpr_exec(&mut self, conn: ConnId, req: CprExecRequest) -> ApiResponse {
        let Some(api) = self.api.clone() else {
            return ApiResponse::error(500, "no API server");
        };
        let mut api = lock(&api);
        let err = update::outgoing::perform(&mut self.vmm, &mut api, conn, &req);
        log::warn!("live update refused or failed: {err}");
        let status = match err {
            UpdateError::BadTarget(..) | UpdateError::Nul => 400,
            UpdateError::Busy => 409,
            _ => 500,
        };
        ApiResponse::error(status, crate::error_chain(&err))
    }
}
