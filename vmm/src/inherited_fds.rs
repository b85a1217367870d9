//! Fds named on the command line (`--net fd=N`) must be fds the parent passed to molt: this
//! is checked first thing in `main`, before molt opens anything of its own, so a wrong number
//! can never adopt one of molt's own fds.

use std::collections::BTreeSet;
use std::os::fd::{BorrowedFd, RawFd};

use crate::config::{NetBackend, VmConfig};

/// Why an fd named on the command line is refused.
#[derive(Debug, thiserror::Error)]
pub enum InheritedFdError {
    /// The number is not open.
    #[error("--net fd={0}: no such open file descriptor (the parent must pass it)")]
    NotOpen(RawFd),
    /// Close-on-exec is set: molt opened it itself, it was not inherited.
    #[error("--net fd={0}: not inherited from the parent (it is close-on-exec)")]
    NotInherited(RawFd),
    /// The same number twice.
    #[error("--net fd={0} is named more than once")]
    Twice(RawFd),
    /// Not a tap.
    #[error("--net fd={0}: not a tap interface")]
    NotATap(RawFd, #[source] std::io::Error),
    /// A tap opened with `IFF_VNET_HDR`.
    #[error("--net fd={0}: the tap was opened with IFF_VNET_HDR, which molt does not use")]
    VnetHeader(RawFd),
    /// A tun (layer 3) interface rather than a tap.
    #[error("--net fd={0}: a tun interface, not a tap")]
    NotTapMode(RawFd),
}

/// Checks every fd `config` names: open, inherited (not close-on-exec), named once, a tap
/// opened as molt needs it.
pub fn check(config: &VmConfig) -> Result<(), InheritedFdError> {
    let named: Vec<RawFd> = config
        .nets
        .iter()
        .filter_map(|n| match n.backend {
            NetBackend::Fd(fd) => Some(fd),
            NetBackend::Tap(_) => None,
        })
        .collect();
    let mut seen = BTreeSet::new();
    if let Some(&twice) = named.iter().find(|&&fd| !seen.insert(fd)) {
        return Err(InheritedFdError::Twice(twice));
    }
    for fd in named {
        // SAFETY: F_GETFD only queries a descriptor number; one that is not open yields EBADF.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(InheritedFdError::NotOpen(fd));
        }
        if flags & libc::FD_CLOEXEC != 0 {
            return Err(InheritedFdError::NotInherited(fd));
        }
        // SAFETY: `fd` is open (checked above) and only borrowed for the ioctl.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let tap =
            devices::virtio::tap_flags(borrowed).map_err(|e| InheritedFdError::NotATap(fd, e))?;
        if tap & libc::IFF_TAP == 0 {
            return Err(InheritedFdError::NotTapMode(fd));
        }
        if tap & libc::IFF_VNET_HDR != 0 {
            return Err(InheritedFdError::VnetHeader(fd));
        }
    }
    Ok(())
}
