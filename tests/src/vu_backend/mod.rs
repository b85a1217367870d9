//! A vhost-user-blk backend for tests, serving a disk image file from a thread of the test
//! process. Unlike qemu-storage-daemon it tracks inflight requests
//! (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, split rings, see [`inflight`]), and it can die on
//! demand holding a request of the guest's ([`VuBlkBackend::crash_holding_next_request`]),
//! so tests can check that the next backend on the socket finishes it.
//!
//! It offers `VIRTIO_F_VERSION_1`, `VIRTIO_BLK_F_FLUSH` and `VHOST_USER_F_PROTOCOL_FEATURES`,
//! protocol features `CONFIG`, `MQ` and `INFLIGHT_SHMFD`; no indirect descriptors, no event
//! index. The `vhost` crate parses the messages; [`handler`] holds the device they set up.
//! It serves one connection at a time, and each connection starts a fresh device.

mod blk;
mod handler;
pub mod inflight;
mod ring;

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::{BackendReqHandler, Error as VhostError};

use handler::Device;

pub use blk::{T_FLUSH, T_IN, T_OUT};

/// How long the backend's thread waits for something to happen before it looks at its
/// stop and hold requests again.
const TICK: Duration = Duration::from_millis(20);

/// Errors of the test backend.
#[derive(Debug, thiserror::Error)]
pub enum VuBackendError {
    /// The image cannot be opened.
    #[error("cannot open the image {0}")]
    Image(PathBuf, #[source] std::io::Error),
    /// The socket cannot be bound.
    #[error("cannot listen on {0}")]
    Listen(PathBuf, #[source] std::io::Error),
    /// The backend's thread cannot start.
    #[error("cannot start the backend thread")]
    Thread(#[source] std::io::Error),
    /// The inflight area cannot be created or mapped.
    #[error("inflight area")]
    Inflight(#[source] std::io::Error),
    /// The inflight area's geometry does not fit its size.
    #[error("inflight area of {size} bytes cannot hold {queues} queues of {queue_size}")]
    BadInflight {
        /// Bytes of the area.
        size: u64,
        /// Queues.
        queues: u16,
        /// Entries per queue.
        queue_size: u16,
    },
    /// A queue the device does not have.
    #[error("no queue {0}")]
    NoQueue(u16),
    /// Guest memory cannot be mapped.
    #[error("cannot map guest memory: {0}")]
    Map(String),
    /// Guest memory access out of the mapped regions.
    #[error("guest memory access")]
    Guest(#[source] vm_memory::GuestMemoryError),
    /// A frontend address no memory region covers.
    #[error("frontend address {0:#x} is in no memory region")]
    Unmapped(u64),
    /// A descriptor chain that loops, leaves the table or uses indirect descriptors.
    #[error("malformed descriptor chain at head {0}")]
    BadChain(u16),
    /// A request that is not virtio-blk.
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    /// Signalling the call eventfd failed.
    #[error("call eventfd")]
    Eventfd(#[source] std::io::Error),
    /// Something the test waited for did not happen.
    #[error("the backend did not {0} within {1:?}")]
    Timeout(&'static str, Duration),
}

/// A request as the backend saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Queue.
    pub queue: u16,
    /// Head of its descriptor chain.
    pub head: u16,
    /// virtio-blk type ([`T_IN`], [`T_OUT`], [`T_FLUSH`], ...).
    pub kind: u32,
    /// First sector.
    pub sector: u64,
}

/// What a backend did so far.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Connections accepted.
    pub connections: u64,
    /// Requests completed.
    pub completed: u64,
    /// Inflight areas the frontend handed over (SET_INFLIGHT_FD).
    pub areas_adopted: u64,
    /// Requests taken again from an inflight area, in the order they were processed.
    pub resubmitted: Vec<Request>,
    /// The request it died holding.
    pub held: Option<Request>,
    /// Why connections ended, other than a hang-up.
    pub errors: Vec<String>,
}

impl Stats {
    /// Records why a connection ended (the first few reasons: a frontend that keeps
    /// reconnecting to a backend that keeps failing must not fill the memory).
    fn error(&mut self, why: String) {
        if self.errors.len() < 8 {
            self.errors.push(why);
        }
    }
}

/// State shared by the backend's thread and the test.
struct Shared {
    stop: AtomicBool,
    /// Take the next request, keep it, and die.
    hold: AtomicBool,
    stats: Mutex<Stats>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }
}

/// A running backend; stopped (listener and connection closed) when dropped.
pub struct VuBlkBackend {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl VuBlkBackend {
    /// Serves `image` (its size a multiple of 512 bytes) on a new listener at `socket`,
    /// replacing whatever file is there.
    pub fn serve(image: &Path, socket: &Path) -> Result<Self, VuBackendError> {
        let file = File::options()
            .read(true)
            .write(true)
            .open(image)
            .map_err(|e| VuBackendError::Image(image.to_path_buf(), e))?;
        let len = file
            .metadata()
            .map_err(|e| VuBackendError::Image(image.to_path_buf(), e))?
            .len();
        let _ = std::fs::remove_file(socket);
        let listen = |e| VuBackendError::Listen(socket.to_path_buf(), e);
        let listener = UnixListener::bind(socket).map_err(listen)?;
        listener.set_nonblocking(true).map_err(listen)?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            hold: AtomicBool::new(false),
            stats: Mutex::new(Stats::default()),
            changed: Condvar::new(),
        });
        let s = shared.clone();
        let image = Arc::new(file);
        let thread = std::thread::Builder::new()
            .name("vu-blk-backend".into())
            .spawn(move || run(&listener, &image, len / 512, &s))
            .map_err(VuBackendError::Thread)?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// What the backend did so far.
    pub fn stats(&self) -> Stats {
        self.shared.lock().clone()
    }

    /// Dies as a backend process would in the middle of a request: takes the next request
    /// the guest makes available (marking it inflight first, as it always does), then closes
    /// its connection and listener without completing it. Returns that request.
    pub fn crash_holding_next_request(
        &mut self,
        timeout: Duration,
    ) -> Result<Request, VuBackendError> {
        self.arm_crash();
        self.wait_crash(timeout)
    }

    /// Makes the backend die holding the next request it takes (see
    /// [`Self::crash_holding_next_request`]) and returns at once.
    pub fn arm_crash(&self) {
        self.shared.hold.store(true, Ordering::SeqCst);
    }

    /// Waits until the backend armed with [`Self::arm_crash`] died; returns the request it
    /// held.
    pub fn wait_crash(&mut self, timeout: Duration) -> Result<Request, VuBackendError> {
        let deadline = Instant::now() + timeout;
        let mut stats = self.shared.lock();
        while stats.held.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.shared.hold.store(false, Ordering::SeqCst);
                return Err(VuBackendError::Timeout("take a request", timeout));
            }
            stats = self
                .shared
                .changed
                .wait_timeout(stats, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let held = stats.held;
        drop(stats);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        held.ok_or(VuBackendError::Timeout("take a request", timeout))
    }

    /// Stops the backend (closing its listener and connection) and returns what it did.
    pub fn stop(mut self) -> Stats {
        self.halt();
        self.stats()
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VuBlkBackend {
    fn drop(&mut self) {
        self.halt();
    }
}

/// One frontend connection.
struct Connection {
    socket: UnixStream,
    handler: BackendReqHandler<Mutex<Device>>,
    device: Arc<Mutex<Device>>,
}

/// What the thread does next.
enum Step {
    Continue,
    /// The connection ended.
    Closed,
    /// A request was taken and kept: die.
    Held(Request),
}

fn lock_device(d: &Mutex<Device>) -> MutexGuard<'_, Device> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

impl Connection {
    fn new(
        socket: UnixStream,
        image: &Arc<File>,
        capacity: u64,
        shared: &Arc<Shared>,
    ) -> std::io::Result<Self> {
        let device = Device::new(image.clone(), capacity, 1, shared.clone());
        let device = Arc::new(Mutex::new(device));
        let watched = socket.try_clone()?;
        Ok(Self {
            socket: watched,
            handler: BackendReqHandler::from_stream(socket, device.clone()),
            device,
        })
    }

    /// Waits for a message or a kick, handles it, and serves the rings.
    fn step(&mut self, shared: &Shared) -> Step {
        let mut fds = vec![self.socket.as_raw_fd()];
        fds.extend(lock_device(&self.device).kicks());
        let ready = poll(&fds, TICK);
        if ready.first() == Some(&true) {
            match self.handler.handle_request() {
                Ok(()) => {}
                Err(VhostError::Disconnected | VhostError::PartialMessage) => {
                    log::info!("test vhost-user backend: the frontend hung up");
                    return Step::Closed;
                }
                Err(e) => {
                    shared.note(|s| s.error(format!("request: {e}")));
                    return Step::Closed;
                }
            }
        }
        let mut device = lock_device(&self.device);
        for (fd, _) in fds.iter().zip(&ready).skip(1).filter(|(_, r)| **r) {
            device.drain_kick(*fd);
        }
        match device.serve() {
            Ok(None) => Step::Continue,
            Ok(Some(held)) => Step::Held(held),
            Err(e) => {
                shared.note(|s| s.error(format!("serving: {e}")));
                Step::Closed
            }
        }
    }
}

/// The backend's thread: one connection at a time until stopped or told to die.
fn run(listener: &UnixListener, image: &Arc<File>, capacity: u64, shared: &Arc<Shared>) {
    let mut conn: Option<Connection> = None;
    while !shared.stop.load(Ordering::SeqCst) {
        let Some(c) = conn.as_mut() else {
            if poll(&[listener.as_raw_fd()], TICK).first() == Some(&true) {
                let accepted = listener
                    .accept()
                    .and_then(|(socket, _)| Connection::new(socket, image, capacity, shared));
                match accepted {
                    Ok(c) => {
                        shared.note(|s| s.connections += 1);
                        conn = Some(c);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => shared.note(|s| s.error(format!("accept: {e}"))),
                }
            }
            continue;
        };
        match c.step(shared) {
            Step::Continue => {}
            Step::Closed => conn = None,
            Step::Held(req) => {
                // Dies: the connection, its device (eventfds, guest memory, inflight area)
                // and the listener close as the thread returns.
                log::info!("test vhost-user backend: dies holding {req:?}");
                shared.note(|s| s.held = Some(req));
                return;
            }
        }
    }
}

/// Which of `fds` are readable (or hung up) within `timeout`.
fn poll(fds: &[RawFd], timeout: Duration) -> Vec<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structures that lives across the
    // call; the fds are open (their owners outlive the call on this thread).
    let n = unsafe {
        libc::poll(
            pfds.as_mut_ptr(),
            pfds.len() as libc::nfds_t,
            timeout.as_millis() as i32,
        )
    };
    pfds.iter().map(|p| n > 0 && p.revents != 0).collect()
}
