//! The new image's view of the inherited fds: duplicates to work on (the originals stay
//! untouched until the restore has succeeded, so a rollback still has them), and the serial
//! backend and API server rebuilt from them.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};

use cpr::PreservedFd;

use super::handoff::{fd_names, ApiHandoff};
use super::incoming::IncomingError;
use crate::api::{ApiServer, CarriedConn};
use crate::config::SerialConfig;
use crate::serial_backend::{SerialIn, SerialOut, SocketClient};

/// CLOEXEC duplicates of the preserved fds, by name.
pub struct Inherited(HashMap<String, OwnedFd>);

fn dup(fd: RawFd, name: &str) -> Result<OwnedFd, IncomingError> {
    // SAFETY: F_DUPFD_CLOEXEC on a number; fails cleanly if it is not open.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(IncomingError::Fd(
            fd,
            name.to_string(),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `new` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

impl Inherited {
    /// Duplicates every preserved fd the record names.
    pub fn dup_all(fds: &[PreservedFd]) -> Result<Self, IncomingError> {
        fds.iter()
            .map(|p| Ok((p.name.clone(), dup(p.fd, &p.name)?)))
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// The fd named `name`.
    pub fn take(&mut self, name: &str) -> Result<OwnedFd, IncomingError> {
        self.0
            .remove(name)
            .ok_or_else(|| IncomingError::MissingFd(name.to_string()))
    }

    /// The fd named `name`, if the record has one.
    pub fn take_optional(&mut self, name: &str) -> Option<OwnedFd> {
        self.0.remove(name)
    }
}

/// The serial backend, over the inherited file or sockets (stdio needs nothing).
pub fn serial_backend(
    config: &SerialConfig,
    fds: &mut Inherited,
) -> Result<(SerialOut, SerialIn), IncomingError> {
    Ok(match config {
        SerialConfig::Stdio => (SerialOut::Stdout, SerialIn::Stdin),
        SerialConfig::Null => (SerialOut::Null, SerialIn::None),
        SerialConfig::File(_) => (
            SerialOut::File(File::from(fds.take(fd_names::SERIAL_FILE)?)),
            SerialIn::None,
        ),
        SerialConfig::Socket(path) => {
            let listener = UnixListener::from(fds.take(fd_names::SERIAL_LISTENER)?);
            let _ = listener.set_nonblocking(true);
            let client = SocketClient::default();
            if let Some(fd) = fds.take_optional(fd_names::SERIAL_CLIENT) {
                let stream = UnixStream::from(fd);
                let _ = stream.set_nonblocking(true);
                *client.lock().unwrap_or_else(|p| p.into_inner()) = Some(stream);
            }
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

/// The API server over the inherited listener and connections. Until the update's own
/// response is sent, a client asking for another update gets 409.
pub fn api_server(a: &ApiHandoff, fds: &mut Inherited) -> Result<ApiServer, IncomingError> {
    let listener = fds.take(fd_names::API_LISTENER)?;
    let waiting = match &a.waiting {
        Some(w) => Some((fds.take(&w.fd)?, w.id)),
        None => None,
    };
    let mut server =
        ApiServer::from_inherited(listener, a.path.clone(), waiting).map_err(crate::Error::from)?;
    let carried = a
        .others
        .iter()
        .map(|c| {
            Ok(CarriedConn {
                id: c.id,
                fd: fds.take(&c.fd)?,
                unread: c.unread.clone(),
            })
        })
        .collect::<Result<Vec<_>, IncomingError>>()?;
    server.adopt(carried).map_err(crate::Error::from)?;
    server.refuse_updates();
    Ok(server)
}
