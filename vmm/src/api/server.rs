//! The listening socket and its connections, as an event-manager subscriber.
//!
//! Requests are read and parsed in [`MutEventSubscriber::process`] and queued for
//! [`ApiServer::take_requests`]. [`ApiServer::respond`] runs outside the event loop: it writes
//! what the socket takes at once and signals the server's eventfd, so the next
//! `EventManager::run()` dispatches to `process()`, which updates the epoll registration of
//! that connection (EPOLLOUT for the rest of the response, EPOLLIN for the next request, or
//! removal when it closes). A timerfd is armed at the earliest connection deadline.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::conn::Conn;
use super::socket::{self, check_socket, file_id, set_cloexec};
use super::{http, ApiError, ApiRequest, ApiResponse, ConnId, Limits};

#[path = "handover.rs"]
mod handover;

pub use handover::{ApiState, ApiTakeover, ConnState};

/// Connections accepted per listener event.
const ACCEPT_BATCH: usize = 16;
/// How long accepting pauses after an accept error such as EMFILE.
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// The API server. Add it to the VMM's `EventManager`; after each `run()`, collect requests
/// with [`take_requests`](Self::take_requests) and answer each with
/// [`respond`](Self::respond).
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file, to remove only our own file on drop.
    socket_file: Option<(u64, u64)>,
    remove_on_drop: bool,
    limits: Limits,
    waker: EventFd,
    timer: TimerFd,
    timer_set: Option<Instant>,
    accept_paused_until: Option<Instant>,
    conns: BTreeMap<ConnId, Conn>,
    by_fd: HashMap<RawFd, ConnId>,
    next_id: ConnId,
    ready: Vec<(ConnId, ApiRequest)>,
    dirty: BTreeSet<ConnId>,
    /// The connection whose request started a handoff in progress.
    handoff: Option<ConnId>,
}

impl ApiServer {
    /// Listens on `path` with the default [`Limits`]. The socket file is created mode 0600
    /// (before the socket accepts connections), replaces a stale socket file (one nobody
    /// listens on; anything else at `path` is an error) and is removed on drop.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let (fd, socket_file) = socket::listen(path)?;
        Self::new(UnixListener::from(fd), path.to_path_buf(), socket_file)
    }

    /// Rebuilds the server in a new process from an inherited listening socket (bound at
    /// `path`) and, optionally, one connection whose request awaits its response as
    /// connection `conn`; answer it with [`respond`](Self::respond). Connection ids continue
    /// after `conn`. The fds are made non-blocking and close-on-exec again.
    fn from_inherited(
        listener: OwnedFd,
        path: PathBuf,
        waiting: Option<(OwnedFd, ConnId)>,
    ) -> Result<Self, ApiError> {
        check_socket(listener.as_raw_fd(), true)?;
        set_cloexec(listener.as_raw_fd()).map_err(ApiError::Setup)?;
        let listener = UnixListener::from(listener);
        listener.set_nonblocking(true).map_err(ApiError::Setup)?;
        let socket_file = file_id(&path);
        let mut server = Self::new(listener, path, socket_file)?;
        if let Some((fd, id)) = waiting {
            check_socket(fd.as_raw_fd(), false)?;
            set_cloexec(fd.as_raw_fd()).map_err(ApiError::Setup)?;
            let stream = UnixStream::from(fd);
            stream.set_nonblocking(true).map_err(ApiError::Setup)?;
            let conn = Conn::awaiting(stream, Instant::now());
            server.by_fd.insert(conn.fd(), id);
            server.conns.insert(id, conn);
            server.next_id = id + 1;
        }
        Ok(server)
    }

    fn new(
        listener: UnixListener,
        path: PathBuf,
        socket_file: Option<(u64, u64)>,
    ) -> Result<Self, ApiError> {
        let waker =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(ApiError::Setup)?;
        let timer = TimerFd::new().map_err(|e| ApiError::Setup(e.into()))?;
        // SAFETY: F_SETFL on the timerfd we own. Non-blocking, so that reading a timer that
        // was re-armed after epoll reported it cannot block the event loop.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(ApiError::Setup(io::Error::last_os_error()));
        }
        Ok(Self {
            listener,
            path,
            socket_file,
            remove_on_drop: true,
            limits: Limits::default(),
            waker,
            timer,
            timer_set: None,
            accept_paused_until: None,
            conns: BTreeMap::new(),
            by_fd: HashMap::new(),
            next_id: 1,
            ready: Vec::new(),
            dirty: BTreeSet::new(),
            handoff: None,
        })
    }

    /// Replaces the limits and timeouts (call before adding the server to an event loop).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Whether dropping the server removes the socket file (default true; only if the file
    /// at the path is still the one this server bound or adopted). Turn it off when another
    /// process takes the listener over.
    pub fn set_remove_on_drop(&mut self, remove: bool) {
        self.remove_on_drop = remove;
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Requests parsed and routed since the last call, in arrival order. Each connection has
    /// at most one request outstanding; its next one is parsed after the response.
    pub fn take_requests(&mut self) -> Vec<(ConnId, ApiRequest)> {
        std::mem::take(&mut self.ready)
    }

    /// Answers `conn`'s request: writes what the socket takes now, and the rest from the
    /// event loop. Afterwards the connection is kept open or closed per HTTP/1.1. A response
    /// to a connection that has gone away is dropped.
    pub fn respond(&mut self, conn: ConnId, resp: ApiResponse) {
        let Some(c) = self.conns.get_mut(&conn) else {
            log::debug!("API: connection {conn} closed before its response");
            return;
        };
        if !c.respond(&resp, Instant::now()) {
            log::warn!("API: connection {conn} was not waiting for a response");
            return;
        }
        self.dirty.insert(conn);
        if let Err(e) = self.waker.write(1) {
            log::error!("API: cannot wake the event loop: {e}");
        }
    }

    fn accept(&mut self, now: Instant, ops: &mut EventOps) {
        for _ in 0..ACCEPT_BATCH {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream, now, ops),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    // E.g. EMFILE: the listener stays readable; stop watching it for a while
                    // rather than spin.
                    log::warn!("API: accept failed, pausing for {ACCEPT_BACKOFF:?}: {e}");
                    let _ = ops.remove(Events::new(&self.listener, EventSet::IN));
                    self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    fn admit(&mut self, stream: UnixStream, now: Instant, ops: &mut EventOps) {
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("API: dropping a client: {e}");
            return;
        }
        if self.conns.len() >= self.limits.max_connections {
            log::warn!(
                "API: refusing a client: {} connections open",
                self.conns.len()
            );
            let refusal = ApiResponse::error(503, "too many connections");
            let _ = (&stream).write(&http::format_response(503, &refusal.body, false, None));
            let _ = stream.shutdown(std::net::Shutdown::Write);
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let conn = Conn::new(stream, now);
        self.by_fd.insert(conn.fd(), id);
        self.conns.insert(id, conn);
        self.sync(id, ops);
    }

    /// Moves connection `id` along and updates its registration.
    fn drive(&mut self, id: ConnId, now: Instant, ops: &mut EventOps) {
        if let Some(c) = self.conns.get_mut(&id) {
            if let Some(request) = c.pump(&self.limits, now) {
                self.ready.push((id, request));
            }
        }
        self.sync(id, ops);
    }

    /// Makes epoll watch what connection `id` needs, or closes it when it is done.
    fn sync(&mut self, id: ConnId, ops: &mut EventOps) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let fd = c.fd();
        if !c.is_done() {
            let want = c.interest(&self.limits);
            let result = match c.registered {
                None => ops.add(Events::new_raw(fd, want)),
                Some(cur) if cur != want => ops.modify(Events::new_raw(fd, want)),
                Some(_) => Ok(()),
            };
            match result {
                Ok(()) => {
                    c.registered = Some(want);
                    return;
                }
                Err(e) => log::warn!("API: cannot watch connection {id}: {e:?}"),
            }
        }
        if c.registered.is_some() {
            let _ = ops.remove(Events::new_raw(fd, EventSet::empty()));
        }
        self.by_fd.remove(&fd);
        self.conns.remove(&id);
    }

    fn on_timer(&mut self, now: Instant, ops: &mut EventOps) {
        let _ = self.timer.wait();
        self.timer_set = None;
        let due: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline(&self.limits).is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            if let Some(c) = self.conns.get_mut(&id) {
                c.expire(now);
            }
            self.drive(id, now, ops);
        }
        if self.accept_paused_until.is_some_and(|t| t <= now) {
            self.accept_paused_until = None;
            if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
                log::error!("API: cannot watch the listener again: {e:?}");
            }
        }
    }

    /// Arms the timer for the earliest deadline.
    fn update_timer(&mut self) {
        let next = self
            .conns
            .values()
            .filter_map(|c| c.deadline(&self.limits))
            .chain(self.accept_paused_until)
            .min();
        if next == self.timer_set {
            return;
        }
        let result = match next {
            Some(t) => {
                let wait = t.saturating_duration_since(Instant::now());
                // A zero duration would disarm the timer.
                self.timer.reset(wait.max(Duration::from_millis(1)), None)
            }
            None => self.timer.clear(),
        };
        match result {
            Ok(()) => self.timer_set = next,
            Err(e) => log::error!("API: cannot arm the timeout timer: {e}"),
        }
    }
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let now = Instant::now();
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(now, ops);
        } else if fd == self.waker.as_raw_fd() {
            let _ = self.waker.read();
            for id in std::mem::take(&mut self.dirty) {
                self.drive(id, now, ops);
            }
        } else if fd == self.timer.as_raw_fd() {
            self.on_timer(now, ops);
        } else if let Some(&id) = self.by_fd.get(&fd) {
            let set = events.event_set();
            if let Some(c) = self.conns.get_mut(&id) {
                if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                    if let Some(request) = c.hang_up(&self.limits, now) {
                        self.ready.push((id, request));
                    }
                } else if set.contains(EventSet::IN) {
                    c.read_input(&self.limits, now);
                }
            }
            self.drive(id, now, ops);
        } else {
            log::warn!("API: event on unknown fd {fd}");
            let _ = ops.remove(Events::new_raw(fd, EventSet::empty()));
        }
        self.update_timer();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            self.listener.as_raw_fd(),
            self.waker.as_raw_fd(),
            self.timer.as_raw_fd(),
        ];
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("API: cannot watch fd {fd}: {e:?}");
            }
        }
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            self.sync(id, ops);
        }
        self.update_timer();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if self.remove_on_drop
            && self.socket_file.is_some()
            && file_id(&self.path) == self.socket_file
        {
            if let Err(e) = fs::remove_file(&self.path) {
                log::warn!("cannot remove API socket {:?}: {e}", self.path);
            }
        }
    }
}
