//! The API server: HTTP/1.1 with JSON bodies on a unix socket (`--api-socket PATH`), and the
//! `molt ctl` client.
//!
//! Reading order: [`http`] (message framing) → `routes` (path and method → [`ApiRequest`])
//! → `conn` (one connection's state machine) → [`ApiServer`] (listener, connections,
//! event-manager subscriber) → [`ctl`] (the client).
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
mod routes;
mod server;

use std::io;
use std::os::unix::net::UnixStream;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use routes::{Route, API_PREFIX, ROUTES};
pub use server::ApiServer;

/// Identifies one client connection of an [`ApiServer`]. Ids are never reused within a
/// server (nor across a live update: [`ApiServer::from_inherited`] continues the sequence).
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
    /// `PUT /api/v1/vm.cpr-exec` → 204, sent by the new process once it runs the VM.
    CprExec(CprExecRequest),
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
    /// 200 with `body`.
    pub fn ok(body: serde_json::Value) -> Self {
        Self { status: 200, body }
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
        Self {
            status,
            body: serde_json::json!({ "error": message.into() }),
        }
    }
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
}

/// `path` as a `sockaddr_un`, or `None` when it is too long or contains a NUL byte.
pub(crate) fn unix_sockaddr(path: &Path) -> Option<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return None;
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Some((addr, len as libc::socklen_t))
}

/// A new unix stream socket (close-on-exec, blocking).
pub(crate) fn stream_socket(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked before it is wrapped.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | flags, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Connects to the unix socket at `path`, waiting up to `timeout` while the listener's backlog
/// is full (as it can be while molt is mid live-update and not accepting). The stream is
/// blocking.
pub(crate) fn connect(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    use std::os::fd::AsRawFd;
    let Some((addr, len)) = unix_sockaddr(path) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path too long"));
    };
    let fd = stream_socket(0)?;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` is a valid timeval of the size passed; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    loop {
        // SAFETY: `addr` is an initialised sockaddr_un and `len` its used length.
        let rc = unsafe {
            libc::connect(fd.as_raw_fd(), (&addr as *const libc::sockaddr_un).cast(), len)
        };
        if rc == 0 {
            break;
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            // A blocking connect that timed out on a full backlog reports EAGAIN.
            io::ErrorKind::WouldBlock => return Err(io::ErrorKind::TimedOut.into()),
            _ => return Err(err),
        }
    }
    Ok(UnixStream::from(fd))
}
