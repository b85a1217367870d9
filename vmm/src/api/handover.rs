//! Handing the API server over: refuse concurrent updates, and carry the listener and every
//! client connection (with the input not processed yet) to the next keeper of the VM.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::super::conn::Conn;
use super::super::socket::{check_socket, set_cloexec};
use super::super::{ApiError, ConnId};
use super::ApiServer;
use crate::persist::{FdRole, Persist, PersistError, RestoreFds, SaveFds};

/// A client connection carried over a live update.
#[derive(Debug)]
struct CarriedConn<F> {
    /// Its id (kept by the next image).
    id: ConnId,
    /// Its socket.
    fd: F,
    /// Input received but not processed yet (e.g. a request that arrived during the update).
    unread: Vec<u8>,
}

impl ApiServer {
    /// Starts handing the server over: `waiting` is the connection whose request started it
    /// (the next keeper answers it). Until [`end_handoff`](Self::end_handoff), every other
    /// update request is refused with 409.
    pub fn begin_handoff(&mut self, waiting: ConnId) {
        self.handoff = Some(waiting);
        self.refuse_updates();
    }

    /// The handoff did not happen: the server stays here.
    pub fn end_handoff(&mut self) {
        self.handoff = None;
    }

    /// While a live update runs: accepts the clients waiting in the backlog, reads what every
    /// client sent, and answers each complete `vm.cpr-exec` request with 409 (one update at
    /// a time). Other requests stay buffered and are answered after the update.
    fn refuse_updates(&mut self) {
        let now = Instant::now();
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err()
                        || self.conns.len() >= self.limits.max_connections
                    {
                        continue;
                    }
                    let id = self.next_id;
                    self.next_id += 1;
                    let conn = Conn::new(stream, now);
                    self.by_fd.insert(conn.fd(), id);
                    self.conns.insert(id, conn);
                    self.dirty.insert(id);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        for (id, c) in self.conns.iter_mut() {
            if c.refuse_update(&self.limits, now) {
                log::info!("API: refused a second update on connection {id}");
                self.dirty.insert(*id);
            }
        }
        let _ = self.waker.write(1);
    }

    /// Adopts connections carried over a live update; their buffered input is processed on
    /// the next event-loop turn. Ids continue after the largest one.
    fn adopt(&mut self, conns: Vec<CarriedConn<OwnedFd>>) -> Result<(), ApiError> {
        let now = Instant::now();
        for c in conns {
            check_socket(c.fd.as_raw_fd(), false)?;
            set_cloexec(c.fd.as_raw_fd()).map_err(ApiError::Setup)?;
            let stream = UnixStream::from(c.fd);
            stream.set_nonblocking(true).map_err(ApiError::Setup)?;
            let conn = Conn::preloaded(stream, c.unread, now);
            self.by_fd.insert(conn.fd(), c.id);
            self.conns.insert(c.id, conn);
            self.dirty.insert(c.id);
            self.next_id = self.next_id.max(c.id + 1);
        }
        self.waker.write(1).map_err(ApiError::Setup)?;
        Ok(())
    }
}

/// A connection as saved: its id and the input it had not processed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnState {
    /// Its id (kept by the next keeper).
    pub id: ConnId,
    /// Bytes received but not processed yet.
    #[serde(default)]
    pub unread: Vec<u8>,
}

/// The API server as saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiState {
    /// Socket path (kept in place throughout).
    pub path: PathBuf,
    /// The connection whose request started the handoff; the next keeper answers it.
    pub waiting: Option<ConnId>,
    /// Other open connections between requests.
    #[serde(default)]
    pub conns: Vec<ConnState>,
    /// Next connection id.
    #[serde(default)]
    pub next_id: ConnId,
}

/// The server keeps its listener, the waiting connection and every connection between
/// requests (with what it had read of the next one).
impl Persist for ApiServer {
    type State = ApiState;
    type Args = ();
    type Error = ApiError;

    fn save(&self, fds: &mut SaveFds) -> Result<ApiState, PersistError> {
        fds.keep(FdRole::ApiListener, &self.listener)?;
        let waiting = self.handoff.filter(|id| self.conns.contains_key(id));
        if let Some(id) = waiting {
            fds.keep(FdRole::ApiConn(id), self.conns[&id].stream())?;
        }
        let mut conns = Vec::new();
        for (&id, c) in self.conns.iter().filter(|(id, _)| Some(**id) != waiting) {
            if let Some(unread) = c.carry() {
                fds.keep(FdRole::ApiConn(id), c.stream())?;
                conns.push(ConnState { id, unread });
            }
        }
        Ok(ApiState {
            path: self.path.clone(),
            waiting,
            conns,
            next_id: self.next_id,
        })
    }

    fn restore(state: &ApiState, _: (), fds: &mut RestoreFds) -> Result<Self, ApiError> {
        ApiTakeover::take(state, fds)?.into_server()
    }
}

/// The API server's fds taken over and checked, the server not rebuilt yet: a live update
/// rebuilds it once the guest runs again (clients wait in the socket's backlog meanwhile),
/// which keeps its set-up out of the guest's pause.
#[derive(Debug)]
pub struct ApiTakeover {
    listener: OwnedFd,
    path: PathBuf,
    waiting: Option<(OwnedFd, ConnId)>,
    conns: Vec<CarriedConn<OwnedFd>>,
    next_id: ConnId,
}

impl ApiTakeover {
    /// Takes the server's fds from `fds` and checks the listener and the waiting connection.
    pub fn take(state: &ApiState, fds: &mut RestoreFds) -> Result<Self, ApiError> {
        let listener = fds.take(FdRole::ApiListener)?;
        check_socket(listener.as_raw_fd(), true)?;
        let waiting = match state.waiting {
            Some(id) => {
                let fd = fds.take(FdRole::ApiConn(id))?;
                check_socket(fd.as_raw_fd(), false)?;
                Some((fd, id))
            }
            None => None,
        };
        let conns = state
            .conns
            .iter()
            .map(|c| {
                Ok(CarriedConn {
                    id: c.id,
                    fd: fds.take(FdRole::ApiConn(c.id))?,
                    unread: c.unread.clone(),
                })
            })
            .collect::<Result<Vec<_>, PersistError>>()?;
        Ok(Self {
            listener,
            path: state.path.clone(),
            waiting,
            conns,
            next_id: state.next_id,
        })
    }

    /// Rebuilds the server: it answers the waiting request once told the outcome, refuses
    /// other updates until then, and serves the carried connections.
    pub fn into_server(self) -> Result<ApiServer, ApiError> {
        let handoff = self.waiting.as_ref().map(|(_, id)| *id);
        let mut server = ApiServer::from_inherited(self.listener, self.path, self.waiting)?;
        server.adopt(self.conns)?;
        server.next_id = server.next_id.max(self.next_id);
        server.handoff = handoff;
        // The path stays until the new keeper commits: a rollback serves it again.
        server.remove_on_drop = false;
        server.refuse_updates();
        Ok(server)
    }
}
