//! The main thread: runs the event loop and answers API requests with the VMM.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiRequest, ApiResponse, ApiServer, ConnId, PingReply};
use crate::assembly::Runtime;
use crate::event_loop::Subscriber;
use crate::exit::VmExit;
use crate::runtime::Vmm;
use crate::snapshot::write::Pending;
use crate::snapshot::{SnapshotError, SnapshotMode};
use crate::update::{self, UpdateError};
use crate::Error;

/// How long molt keeps flushing API responses after the VM ended.
const FINAL_FLUSH: Duration = Duration::from_millis(500);

/// The event loop, the VMM and the API server.
pub struct Control {
    /// The VMM.
    pub vmm: Vmm,
    em: EventManager<Subscriber>,
    api: Option<Arc<Mutex<ApiServer>>>,
    /// The snapshot being written and the connection waiting for it.
    snapshot: Option<(ConnId, Pending)>,
    /// Signalled by the snapshot writer when it is done.
    snapshot_done: Option<EventFd>,
    /// An update prepared and the guest not paused for it yet ([`update::SETTLE`]).
    update: Option<PendingUpdate>,
    /// The CPUs kept awake after an update resumed the guest, until then.
    awake: Option<update::awake::CpusAwake>,
}

/// A prepared update, paused for at `due`.
struct PendingUpdate {
    conn: ConnId,
    prepared: update::Prepared,
    due: Instant,
}

/// Wakes the event loop when an eventfd is signalled (and resets it).
struct Wakeup(EventFd);

impl MutEventSubscriber for Wakeup {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("event loop: cannot watch the snapshot writer: {e:?}");
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a request failed: decides its HTTP status, here and nowhere else.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// A live update was refused or failed (the guest runs on).
    #[error(transparent)]
    Update(#[from] UpdateError),
    /// A snapshot was refused or failed (the guest runs on, or stays paused).
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// The VMM could not carry the request out.
    #[error(transparent)]
    Vmm(#[from] Error),
}

impl RequestError {
    /// The HTTP status answering this error.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::Update(e) => e.status(),
            RequestError::Snapshot(e) => e.status(),
            RequestError::Vmm(_) => 500,
        }
    }

    /// The answer: the status and `{"error": …}` with every cause.
    pub fn response(&self) -> ApiResponse {
        ApiResponse::error(self.status(), crate::error_chain(self))
    }
}

impl Control {
    /// Wires the runtime's VMM, event loop and API server together.
    pub fn new(runtime: Runtime) -> Self {
        let Runtime {
            vmm,
            mut em,
            api,
            awake,
        } = runtime;
        let api = api.map(|a| {
            let a = Arc::new(Mutex::new(a));
            em.add_subscriber(a.clone());
            a
        });
        let snapshot_done = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .and_then(|fd| {
                let watched = fd.try_clone()?;
                em.add_subscriber(Arc::new(Mutex::new(Wakeup(watched))));
                Ok(fd)
            })
            .map_err(|e| log::error!("snapshots will be refused: {e}"))
            .ok();
        Self {
            vmm,
            em,
            api,
            snapshot: None,
            snapshot_done,
            update: None,
            awake,
        }
    }

    fn respond(&self, conn: ConnId, resp: ApiResponse) {
        if let Some(api) = &self.api {
            lock(api).respond(conn, resp);
        }
    }

    /// Runs until the VM ends; then flushes API responses and tears the VM down.
    pub fn run(mut self) -> VmExit {
        if let Err(e) = self.confine() {
            self.vmm.shutdown();
            return VmExit::Error(crate::error_chain(&e));
        }
        crate::sd_notify::ready();
        let end = loop {
            if let Some(end) = self.vmm.ended() {
                break end;
            }
            let turn = match self.next_deadline() {
                // epoll counts whole milliseconds.
                Some(at) => {
                    let left = at.saturating_duration_since(Instant::now());
                    let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
                    self.em.run_with_timeout(ms)
                }
                None => self.em.run(),
            };
            if let Err(e) = turn {
                break VmExit::Error(format!("event loop: {e}"));
            }
            self.snapshot_written(false);
            let requests = match &self.api {
                Some(api) => lock(api).take_requests(),
                None => Vec::new(),
            };
            self.handle_batch(requests);
            self.update_when_due();
            self.awake
                .take_if(|a| a.until().is_some_and(|t| Instant::now() >= t));
        };
        // The VM ended while an update was prepared: it does not happen.
        if let Some(p) = self.update.take() {
            let end = self.vmm.ended().map(|e| e.to_string()).unwrap_or_default();
            let err = UpdateError::Ending(end);
            p.prepared.dismiss(&err.to_string());
            let err = RequestError::from(err);
            self.respond(p.conn, err.response());
        }
        crate::sd_notify::stopping();
        // A snapshot still being written is abandoned (nothing is left at its path).
        self.snapshot_written(true);
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

    /// When the event loop must wake up whatever happens: a prepared update is due, or the
    /// CPUs may idle again.
    fn next_deadline(&self) -> Option<Instant> {
        let update = self.update.as_ref().map(|p| p.due);
        let awake = self.awake.as_ref().and_then(|a| a.until());
        update.into_iter().chain(awake).min()
    }

    /// Starts the unfiltered launcher (it executes live updates), then filters this thread:
    /// every thread it starts from now on inherits the filter (see [`crate::seccomp`]).
    fn confine(&self) -> Result<(), Error> {
        if crate::seccomp::mode() == crate::seccomp::SeccompMode::Off {
            return Ok(());
        }
        crate::seccomp::launcher::start().map_err(crate::seccomp::SeccompError::Launcher)?;
        crate::seccomp::apply(crate::seccomp::ThreadKind::Control)?;
        Ok(())
    }

    /// Answers the snapshot request once its writer is done (or, `cancel`, stops it first).
    fn snapshot_written(&mut self, cancel: bool) {
        let done = match &self.snapshot {
            Some((_, p)) if cancel => {
                p.cancel();
                true
            }
            Some((_, p)) => p.is_finished(),
            None => false,
        };
        if !done {
            return;
        }
        let Some((conn, pending)) = self.snapshot.take() else {
            return;
        };
        let resp = match pending.finish(&mut self.vmm) {
            Ok(report) => ApiResponse::json(200, &report),
            Err(e) => {
                log::warn!("snapshot failed: {}", crate::error_chain(&e));
                RequestError::from(e).response()
            }
        };
        self.respond(conn, resp);
    }

    /// Starts a snapshot; it is answered when it is durable.
    fn begin_snapshot(&mut self, conn: ConnId, req: &crate::snapshot::SnapshotRequest) {
        if self.update.is_some() {
            self.respond(conn, RequestError::from(UpdateError::Busy).response());
            return;
        }
        let done = match &self.snapshot_done {
            _ if self.snapshot.is_some() => Err(SnapshotError::Busy),
            Some(fd) => fd.try_clone().map_err(|source| SnapshotError::Write {
                what: "waking the event loop for",
                path: req.path.clone(),
                source,
            }),
            None => Err(SnapshotError::Busy),
        };
        match done.and_then(|fd| crate::snapshot::write::begin(&mut self.vmm, req, fd)) {
            Ok(pending) => self.snapshot = Some((conn, pending)),
            Err(e) => self.respond(conn, RequestError::from(e).response()),
        }
    }

    fn handle_batch(&mut self, requests: Vec<(ConnId, ApiRequest)>) {
        let mut update: Option<(ConnId, ApiRequest)> = None;
        for (conn, req) in requests {
            let resp = match req {
                ApiRequest::Snapshot(r) => {
                    self.begin_snapshot(conn, &r);
                    continue;
                }
                ApiRequest::CprExec(_) | ApiRequest::CprTransfer(_) if self.snapshot.is_some() => {
                    RequestError::from(UpdateError::Busy).response()
                }
                // The RAM of a paused snapshot is read while it is written.
                ApiRequest::Resume
                    if self
                        .snapshot
                        .as_ref()
                        .is_some_and(|(_, p)| p.mode() != SnapshotMode::Live) =>
                {
                    RequestError::from(SnapshotError::Busy).response()
                }
                ApiRequest::CprExec(_) | ApiRequest::CprTransfer(_)
                    if update.is_none() && self.update.is_none() =>
                {
                    update = Some((conn, req));
                    continue;
                }
                ApiRequest::CprExec(_) | ApiRequest::CprTransfer(_) => {
                    RequestError::from(UpdateError::Busy).response()
                }
                other => self.handle(other),
            };
            self.respond(conn, resp);
        }
        if let Some((conn, req)) = update {
            if self.snapshot.is_some() {
                self.respond(conn, RequestError::from(UpdateError::Busy).response());
                return;
            }
            // A SIGTERM or vm.shutdown handled in this same turn has ended the VM: an update
            // now would carry the guest on in a new image that never learns it should stop.
            if let Some(end) = self.vmm.ended() {
                let err = RequestError::from(UpdateError::Ending(end.to_string()));
                self.respond(conn, err.response());
                return;
            }
            let prepared = match req {
                ApiRequest::CprExec(r) if !r.stand_in => {
                    update::outgoing::prepare(&self.vmm, &r).map(update::Prepared::Exec)
                }
                ApiRequest::CprTransfer(r) => update::transfer_out::prepare(&self.vmm, &r.socket)
                    .map(update::Prepared::Transfer),
                ApiRequest::CprExec(r) => {
                    let failed = self.stand_in_update(conn, &r);
                    return self.update_failed(conn, failed);
                }
                _ => Err(UpdateError::Busy),
            };
            match prepared {
                Ok(prepared) => {
                    // A paused guest has no devices to let settle.
                    let settle = match self.vmm.run_state() {
                        crate::runtime::RunState::Paused => Duration::ZERO,
                        _ => update::settle(),
                    };
                    self.update = Some(PendingUpdate {
                        conn,
                        prepared,
                        due: Instant::now() + settle,
                    })
                }
                Err(e) => self.update_failed(conn, e.into()),
            }
        }
    }

    /// Pauses the guest for the prepared update once it is due. An update that happens never
    /// returns (the process is the new image, or exits); one that did not is answered here.
    fn update_when_due(&mut self) {
        // A VM that ended meanwhile is not updated: the loop ends and answers the request.
        if self.vmm.ended().is_some() {
            return;
        }
        let Some(PendingUpdate { conn, prepared, .. }) =
            self.update.take_if(|p| Instant::now() >= p.due)
        else {
            return;
        };
        let Some(api) = self.api.clone() else {
            prepared.dismiss("no API server");
            return self.update_failed(conn, UpdateError::NoApi.into());
        };
        let failed = prepared.perform(&mut self.vmm, &mut lock(&api), conn);
        self.update_failed(conn, failed);
    }

    fn update_failed(&mut self, conn: ConnId, failed: update::Failed) {
        log::warn!(
            "live update refused or failed: {}",
            crate::error_chain(&failed.error)
        );
        let response = failed.response(&mut self.vmm.history);
        self.respond(conn, response);
    }

    fn handle(&mut self, req: ApiRequest) -> ApiResponse {
        let result = match req {
            ApiRequest::Ping => {
                return ApiResponse::json(
                    200,
                    &PingReply {
                        version: crate::VERSION,
                        pid: std::process::id(),
                    },
                )
            }
            ApiRequest::Info => return ApiResponse::json(200, &self.vmm.info()),
            ApiRequest::Pause => self.vmm.pause().map_err(RequestError::from),
            ApiRequest::Resume => self.vmm.resume().map_err(RequestError::from),
            ApiRequest::Shutdown => {
                self.vmm
                    .shared
                    .exits
                    .end(VmExit::Stopped("vm.shutdown request".into()));
                Ok(())
            }
            ApiRequest::CprExec(_) | ApiRequest::CprTransfer(_) => Err(UpdateError::Busy.into()),
            ApiRequest::Snapshot(_) => Err(SnapshotError::Busy.into()),
        };
        match result {
            Ok(()) => ApiResponse::no_content(),
            Err(e) => e.response(),
        }
    }

    /// Runs a cpr-exec through a stand-in; returns only if it failed (the guest runs on here).
    fn stand_in_update(
        &mut self,
        conn: ConnId,
        req: &crate::api::CprExecRequest,
    ) -> update::Failed {
        let Some(api) = self.api.clone() else {
            return UpdateError::NoApi.into();
        };
        let mut api = lock(&api);
        update::stand_in::perform(&mut self.vmm, &mut api, conn, req)
    }
}
