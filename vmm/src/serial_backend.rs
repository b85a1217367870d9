//! Where the serial console's bytes go and come from: stdio, a file, a unix socket, or
//! nowhere.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::config::SerialConfig;
use crate::persist::{FdRole, Persist, PersistError, RestoreFds, SaveFds};

/// Errors opening a serial backend.
#[derive(Debug, thiserror::Error)]
pub enum SerialBackendError {
    /// The output file cannot be opened.
    #[error("cannot open serial output file {0}")]
    File(PathBuf, #[source] io::Error),
    /// The socket cannot be created.
    #[error("cannot listen on serial socket {0}")]
    Socket(PathBuf, #[source] io::Error),
}

/// A `--serial socket=` backend: the listener, the client attached at the moment (one at a
/// time) and the socket path, shared by output and input. The path is removed when the last
/// handle goes (a live update never drops it: the process is replaced).
#[derive(Debug)]
pub struct SocketBackend {
    /// The listening socket.
    pub listener: UnixListener,
    /// The attached client, if any.
    pub client: Mutex<Option<UnixStream>>,
    path: PathBuf,
    /// Whether the last handle removes the socket file (not while a restore may still roll
    /// back to the previous keeper, which serves the same path).
    remove_on_drop: AtomicBool,
}

impl SocketBackend {
    /// The attached client (poison is ignored: the stream stays usable).
    pub fn client(&self) -> std::sync::MutexGuard<'_, Option<UnixStream>> {
        self.client.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for SocketBackend {
    fn drop(&mut self) {
        if self.remove_on_drop.load(Ordering::SeqCst) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Guest output sink.
pub enum SerialOut {
    /// The VMM's stdout.
    Stdout,
    /// A file.
    File(File),
    /// The attached socket client, if any (output is dropped while none is attached).
    Socket(Arc<SocketBackend>),
    /// Discarded.
    Null,
}

impl SerialOut {
    /// A second handle on the same sink (for rebuilding the serial device).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            SerialOut::Stdout => SerialOut::Stdout,
            SerialOut::File(f) => SerialOut::File(f.try_clone()?),
            SerialOut::Socket(s) => SerialOut::Socket(s.clone()),
            SerialOut::Null => SerialOut::Null,
        })
    }

    /// Whether the socket file is removed when the backend goes (a taken-over backend keeps
    /// it until its keeper commits).
    pub fn set_remove_on_drop(&self, remove: bool) {
        if let SerialOut::Socket(s) = self {
            s.remove_on_drop.store(remove, Ordering::SeqCst);
        }
    }

    /// Where guest input comes from for this backend.
    pub fn input(&self) -> SerialIn {
        match self {
            SerialOut::Stdout => SerialIn::Stdin,
            SerialOut::Socket(s) => SerialIn::Socket(s.clone()),
            SerialOut::File(_) | SerialOut::Null => SerialIn::None,
        }
    }
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOut::Stdout => io::stdout().lock().write(buf),
            SerialOut::File(f) => f.write(buf),
            SerialOut::Socket(backend) => {
                let mut guard = backend.client();
                if let Some(stream) = guard.as_mut() {
                    match stream.write(buf) {
                        Ok(n) => return Ok(n),
                        // A client that does not read loses output rather than stalling
                        // the vCPU.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            log::info!("serial socket client gone: {e}");
                            *guard = None;
                        }
                    }
                }
                Ok(buf.len())
            }
            SerialOut::Null => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialOut::Stdout => io::stdout().lock().flush(),
            SerialOut::File(f) => f.flush(),
            SerialOut::Socket(_) | SerialOut::Null => Ok(()),
        }
    }
}

/// Where guest input comes from.
pub enum SerialIn {
    /// The VMM's stdin.
    Stdin,
    /// Clients of a listening socket.
    Socket(Arc<SocketBackend>),
    /// No input.
    None,
}

fn bind(path: &Path) -> Result<UnixListener, SerialBackendError> {
    // Replace a stale socket file left by a previous run; refuse to remove anything else.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    let listener =
        UnixListener::bind(path).map_err(|e| SerialBackendError::Socket(path.into(), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| SerialBackendError::Socket(path.into(), e))?;
    Ok(listener)
}

/// Opens the backend `config` names.
pub fn open(config: &SerialConfig) -> Result<SerialOut, SerialBackendError> {
    Ok(match config {
        SerialConfig::Stdio => SerialOut::Stdout,
        SerialConfig::Null => SerialOut::Null,
        SerialConfig::File(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| SerialBackendError::File(path.clone(), e))?;
            SerialOut::File(file)
        }
        SerialConfig::Socket(path) => SerialOut::Socket(Arc::new(SocketBackend {
            listener: bind(path)?,
            client: Mutex::default(),
            path: path.clone(),
            remove_on_drop: AtomicBool::new(true),
        })),
    })
}

/// Which backend a saved serial console had (what it needs besides its fds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SerialBackendState {
    /// stdio (nothing to keep: stdio is inherited anyway).
    Stdio,
    /// Output discarded.
    Null,
    /// An output file, kept open.
    File,
    /// A socket at this path, its listener and client kept open.
    Socket(PathBuf),
}

/// The backend saves which backend it is and keeps the output file, or the socket listener
/// and the attached client; stdio and null keep nothing.
impl Persist for SerialOut {
    type State = SerialBackendState;
    type Args = ();
    type Error = PersistError;

    fn save(&self, fds: &mut SaveFds) -> Result<SerialBackendState, PersistError> {
        Ok(match self {
            SerialOut::Stdout => SerialBackendState::Stdio,
            SerialOut::Null => SerialBackendState::Null,
            SerialOut::File(f) => {
                fds.keep(FdRole::SerialFile, f)?;
                SerialBackendState::File
            }
            SerialOut::Socket(s) => {
                fds.keep(FdRole::SerialListener, &s.listener)?;
                if let Some(client) = s.client().as_ref() {
                    fds.keep(FdRole::SerialClient, client)?;
                }
                SerialBackendState::Socket(s.path.clone())
            }
        })
    }

    fn restore(
        state: &SerialBackendState,
        _: (),
        fds: &mut RestoreFds,
    ) -> Result<Self, PersistError> {
        let nonblocking = |role, r: io::Result<()>| r.map_err(|e| PersistError::Unusable(role, e));
        Ok(match state {
            SerialBackendState::Stdio => SerialOut::Stdout,
            SerialBackendState::Null => SerialOut::Null,
            SerialBackendState::File => SerialOut::File(File::from(fds.take(FdRole::SerialFile)?)),
            SerialBackendState::Socket(path) => {
                let listener = UnixListener::from(fds.take(FdRole::SerialListener)?);
                nonblocking(FdRole::SerialListener, listener.set_nonblocking(true))?;
                let client = match fds.take_optional(FdRole::SerialClient)? {
                    Some(fd) => {
                        let stream = UnixStream::from(fd);
                        nonblocking(FdRole::SerialClient, stream.set_nonblocking(true))?;
                        Some(stream)
                    }
                    None => None,
                };
                SerialOut::Socket(Arc::new(SocketBackend {
                    listener,
                    client: Mutex::new(client),
                    path: path.clone(),
                    remove_on_drop: AtomicBool::new(false),
                }))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn file_backend_appends() {
        let dir = std::env::temp_dir().join(format!("molt-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.txt");
        std::fs::write(&path, b"old\n").unwrap();
        let mut out = open(&SerialConfig::File(path.clone())).unwrap();
        out.write_all(b"new\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"old\nnew\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn socket_backend_sends_to_the_client_and_drops_without_one() {
        let path = std::env::temp_dir().join(format!("molt-serial-{}.sock", std::process::id()));
        let mut out = open(&SerialConfig::Socket(path.clone())).unwrap();
        out.write_all(b"nobody listens").unwrap();
        let mut peer = UnixStream::connect(&path).unwrap();
        let SerialIn::Socket(backend) = out.input() else {
            panic!("socket backend expected");
        };
        let (stream, _) = backend.listener.accept().unwrap();
        *backend.client() = Some(stream);
        drop(backend);
        out.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        peer.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        drop(out);
        assert!(!path.exists(), "socket file removed on drop");
    }
}
