//! The seam between *what* is handed over (one capture: the encoded record and the fds it
//! names) and *how*: by `execve` into a new image of the same process, to a separately
//! started process over a unix socket, or to files on disk. Every transport carries the same
//! capture, and the receiving side ends with the same [`Received`] value.

use std::os::fd::OwnedFd;

use crate::fds::{FdError, FdRegistry, PreservedFd};
use crate::inherit::Inherited;

/// A way to hand a captured VM to its next keeper.
pub trait Transport {
    /// Why the handover did not happen (the VM stays with the sender).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Delivers `record` and the fds `fds` names (a transport may add fds of its own, such
    /// as the memfd it carries the record in). An exec transport returns only on failure;
    /// others return once the receiver holds everything (or the files are durable).
    fn deliver(&mut self, record: &[u8], fds: &mut FdRegistry) -> Result<(), Self::Error>;
}

/// How the receiver got the fds the record names.
#[derive(Debug)]
pub enum ReceivedFds {
    /// Inherited across `execve` at the numbers the record lists.
    AtNumbers,
    /// Received with their names over a socket.
    Named(Vec<(String, OwnedFd)>),
}

/// What a receiver got: the record's bytes and its fds.
#[derive(Debug)]
pub struct Received {
    /// The encoded record.
    pub record: Vec<u8>,
    /// The fds.
    pub fds: ReceivedFds,
}

impl Received {
    /// The fds by name, given the list the decoded record holds.
    ///
    /// # Safety
    ///
    /// For [`ReceivedFds::AtNumbers`], as [`Inherited::from_numbers`]: every fd in `list`
    /// was inherited for this process to own.
    pub unsafe fn inherited(self, list: &[PreservedFd]) -> Result<Inherited, FdError> {
        match self.fds {
            // SAFETY: forwarded to the caller.
            ReceivedFds::AtNumbers => unsafe { Inherited::from_numbers(list) },
            ReceivedFds::Named(fds) => Inherited::from_owned(fds),
        }
    }
}
