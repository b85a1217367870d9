//! Where the serial console's bytes go and come from: stdio, a file, a unix socket, or
//! nowhere.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::config::SerialConfig;

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

/// The client currently attached to a serial socket, shared by output and input.
pub type SocketClient = Arc<Mutex<Option<UnixStream>>>;

/// Guest output sink.
pub enum SerialOut {
    /// The VMM's stdout.
    Stdout,
    /// A file.
    File(File),
    /// The attached socket client, if any (output is dropped while none is attached).
    Socket(SocketClient),
    /// Discarded.
    Null,
}

impl SerialOut {
    /// A second handle on the same sink (for rebuilding the serial device).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            SerialOut::Stdout => SerialOut::Stdout,
            SerialOut::File(f) => SerialOut::File(f.try_clone()?),
            SerialOut::Socket(c) => SerialOut::Socket(c.clone()),
            SerialOut::Null => SerialOut::Null,
        })
    }
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOut::Stdout => io::stdout().lock().write(buf),
            SerialOut::File(f) => f.write(buf),
            SerialOut::Socket(client) => {
                let mut guard = client.lock().unwrap_or_else(|p| p.into_inner());
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
    Socket {
        /// The listener.
        listener: UnixListener,
        /// The attached client.
        client: SocketClient,
        /// Path, removed when the VMM exits.
        path: PathBuf,
    },
    /// No input.
    None,
}

impl SerialIn {
    /// The listening socket's fd (`socket=` backend).
    pub fn listener_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        match self {
            SerialIn::Socket { listener, .. } => Some(listener.as_raw_fd()),
            _ => None,
        }
    }
}

impl Drop for SerialIn {
    fn drop(&mut self) {
        if let SerialIn::Socket { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
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
pub fn open(config: &SerialConfig) -> Result<(SerialOut, SerialIn), SerialBackendError> {
    Ok(match config {
        SerialConfig::Stdio => (SerialOut::Stdout, SerialIn::Stdin),
        SerialConfig::Null => (SerialOut::Null, SerialIn::None),
        SerialConfig::File(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| SerialBackendError::File(path.clone(), e))?;
            (SerialOut::File(file), SerialIn::None)
        }
        SerialConfig::Socket(path) => {
            let listener = bind(path)?;
            let client = SocketClient::default();
            (
                SerialOut::Socket(client.clone()),
                SerialIn::Socket {
                    listener,
                    client,
                    path: path.clone(),
                },
            )
        }
    })
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
        let (mut out, _) = open(&SerialConfig::File(path.clone())).unwrap();
        out.write_all(b"new\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"old\nnew\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn socket_backend_sends_to_the_client_and_drops_without_one() {
        let path = std::env::temp_dir().join(format!("molt-serial-{}.sock", std::process::id()));
        let (mut out, input) = open(&SerialConfig::Socket(path.clone())).unwrap();
        out.write_all(b"nobody listens").unwrap();
        let mut peer = UnixStream::connect(&path).unwrap();
        let SerialIn::Socket {
            listener, client, ..
        } = &input
        else {
            panic!("socket backend expected");
        };
        let (stream, _) = listener.accept().unwrap();
        *client.lock().unwrap() = Some(stream);
        out.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        peer.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        drop(input);
        assert!(!path.exists(), "socket file removed on drop");
    }
}
