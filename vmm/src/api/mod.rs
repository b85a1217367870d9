//! The API server: HTTP/1.1 with JSON bodies on a unix socket (`--api-socket PATH`), and the
//! `molt ctl` client.
//!
//! Reading order: [`http`] (message framing) → `routes` (path and method → [`ApiRequest`])
//! → `conn` (one connection's state machine) → `socket` (unix socket plumbing) →
//! [`ApiServer`] (listener, connections, event-manager subscriber) → [`ctl`] (the client).
//!
//! The server never blocks: every socket is non-blocking, requests and bodies are size-capped,
//! slow clients time out, and the number of connections is capped. Requests are parsed inside
//! the event loop and queued; the VMM collects them with [`ApiServer::take_requests`] and
//! answers each with [`ApiServer::respond`]. Errors the server can decide alone (unknown route,
//! wrong method, malformed request or body, oversize, timeout) never reach the VMM.
//!
//! The routes and their status codes are documented in `docs/openapi.json`; a unit test checks
//! that the document and the routing table agree.

mod conn;
pub mod ctl;
pub mod http;
#[cfg(test)]
mod http_props;
mod progress;
mod routes;
mod server;
mod socket;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use routes::{route, Route, RouteError, API_PREFIX, ROUTES};
pub use server::{ApiServer, ApiState, ApiTakeover, ConnState};

/// Identifies one client connection of an [`ApiServer`]. Ids are never reused within a
/// server (nor across a live update: the restored server continues the sequence).
pub type ConnId = u64;

/// A parsed and routed request waiting for the VMM.
///
/// The response each one expects is listed with its variant; errors are
/// [`ApiResponse::error`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /api/v1/vmm.ping` → 200 with a JSON object (e.g. version and pid).
    Ping,
    /// `GET /api/v1/vm.info` → 200 with the VM's description.
    Info,
    /// `PUT /api/v1/vm.pause` → 204.
    Pause,
    /// `PUT /api/v1/vm.resume` → 204.
    Resume,
    /// `PUT /api/v1/vm.shutdown` → 204.
    Shutdown,
    /// `PUT /api/v1/vm.cpr-exec` → 200 with the update report, sent by the new process once it
    /// runs the VM.
    CprExec(CprExecRequest),
    /// `PUT /api/v1/vm.snapshot` → 200 with the snapshot report.
    Snapshot(crate::snapshot::SnapshotRequest),
    /// `PUT /api/v1/vm.cpr-transfer` → 200 with the update report, sent by the receiving
    /// process once it runs the VM.
    CprTransfer(CprTransferRequest),
}

/// Body of `PUT /api/v1/vm.cpr-transfer`: the socket a `molt --incoming` listens on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CprTransferRequest {
    /// Absolute path of the receiver's unix socket.
    pub socket: PathBuf,
}

/// Body of `PUT /api/v1/vm.cpr-exec`: `{}` (or empty) re-executes the running binary with its
/// arguments; `binary` (an absolute path) and `args` override them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CprExecRequest {
    /// Binary to execute instead of the running one.
    #[serde(default)]
    pub binary: Option<PathBuf>,
    /// Arguments (without argv\[0\]) instead of the running ones.
    #[serde(default)]
    pub args: Option<Vec<String>>,
    /// Keep the guest running while the binary is executed: hand it to a stand-in process
    /// first and take it back in the new image ([`crate::update::stand_in`]).
    #[serde(default)]
    pub stand_in: bool,
}

/// A response to one request: an HTTP status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    /// HTTP status code.
    pub status: u16,
    /// JSON body; `Value::Null` sends no body (and 204 never has one).
    pub body: serde_json::Value,
}

impl ApiResponse {
    /// `status` with `body` serialized as JSON.
    pub fn json(status: u16, body: &impl Serialize) -> Self {
        match serde_json::to_value(body) {
            Ok(body) => Self { status, body },
            Err(e) => Self::error(500, format!("cannot encode the answer: {e}")),
        }
    }

    /// 204, no body.
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: serde_json::Value::Null,
        }
    }

    /// `status` with the body `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self::json(
            status,
            &ErrorReply::<()> {
                error: message.into(),
                report: None,
            },
        )
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorReply<R: Serialize = ()> {
    /// What went wrong, with its causes.
    pub error: String,
    /// Details, when the failed request still did something (a rolled-back update's report).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<R>,
}

/// `GET /api/v1/vmm.ping`.
#[derive(Debug, Clone, Serialize)]
pub struct PingReply {
    /// molt's version.
    pub version: &'static str,
    /// Process id.
    pub pid: u32,
}

/// Resource limits and timeouts of an [`ApiServer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; further clients get 503 and are closed.
    pub max_connections: usize,
    /// Largest request line plus headers, in bytes (431 beyond).
    pub max_header_bytes: usize,
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// How long a request may take to arrive once its first byte has (408 and close beyond),
    /// and how long a response may stall unread by the client (close beyond).
    pub request_timeout: Duration,
    /// How long a keep-alive connection may sit without a request before it is closed.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            max_header_bytes: 16 << 10,
            max_body_bytes: 1 << 20,
            request_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Errors setting up the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket path does not fit in `sockaddr_un` or contains a NUL byte.
    #[error("API socket path {0:?} is too long or contains a NUL byte")]
    BadPath(PathBuf),
    /// Something that is not a socket occupies the path.
    #[error("{0:?} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A live server answers on the path.
    #[error("another process is serving on {0:?}")]
    InUse(PathBuf),
    /// Inspecting or removing what occupies the path failed.
    #[error("cannot replace stale socket {path:?}")]
    Stale {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// socket(), bind(), chmod() or listen() failed.
    #[error("cannot listen on {path:?}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An inherited fd is not a listening (or connected) unix stream socket.
    #[error("inherited fd {0} is not a usable unix stream socket")]
    Inherited(i32),
    /// Creating the server's eventfd or timerfd, or setting fd flags, failed.
    #[error("API server setup")]
    Setup(#[source] io::Error),
    /// The server cannot be taken over from a handoff.
    #[error("cannot take over the API server")]
    Persist(#[from] crate::persist::PersistError),
}
