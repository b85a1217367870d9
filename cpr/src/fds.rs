//! The registry of fds that survive `execve` into the new molt binary.
//!
//! On the sending side, [`FdRegistry::register`] names the fds to keep (guest
//! RAM memfds, the serial backend, the API listener, the record memfd),
//! [`FdRegistry::describe`] lists them for the state record, and
//! [`FdRegistry::preserve_all`] clears `FD_CLOEXEC` on exactly those fds
//! just before `execve` ([`FdRegistry::restore_cloexec`] sets it again if
//! the exec fails). The receiving side is [`crate::Inherited`].

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use serde::{Deserialize, Serialize};

/// One preserved fd as described in the state record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreservedFd {
    /// Role of the fd, e.g. `"ram0"`, `"serial"`, `"api-listener"`.
    pub name: String,
    /// Fd number, the same in the old and the new process.
    pub fd: RawFd,
}

/// Why an fd could not be registered, preserved, restored or adopted.
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    /// Two fds were registered under one name.
    #[error("fd name {name:?} is already registered")]
    DuplicateName {
        /// The name.
        name: String,
    },
    /// One fd was registered under two names.
    #[error("fd {fd} is already registered as {existing:?}, cannot add it as {name:?}")]
    DuplicateFd {
        /// The fd number.
        fd: RawFd,
        /// Name it already has.
        existing: String,
        /// Name it was offered under.
        name: String,
    },
    /// A described fd number is negative.
    #[error("preserved fd {name:?} has invalid number {fd}")]
    InvalidNumber {
        /// The name.
        name: String,
        /// The number.
        fd: RawFd,
    },
    /// Clearing `FD_CLOEXEC` failed.
    #[error("cannot clear FD_CLOEXEC on fd {fd} ({name})")]
    Preserve {
        /// The name.
        name: String,
        /// The fd number.
        fd: RawFd,
        /// What `fcntl` reported.
        #[source]
        source: io::Error,
    },
    /// Setting `FD_CLOEXEC` failed.
    #[error("cannot set FD_CLOEXEC on fd {fd} ({name})")]
    Restore {
        /// The name.
        name: String,
        /// The fd number.
        fd: RawFd,
        /// What `fcntl` reported.
        #[source]
        source: io::Error,
    },
    /// An inherited fd was taken twice.
    #[error("preserved fd {name:?} was already taken")]
    TakenTwice {
        /// The name.
        name: String,
    },
    /// Duplicating an inherited fd failed.
    #[error("cannot duplicate preserved fd {fd} ({name})")]
    Duplicate {
        /// The name.
        name: String,
        /// The fd number.
        fd: RawFd,
        /// What `fcntl` reported.
        #[source]
        source: io::Error,
    },
    /// No fd of that name is (still) in the registry.
    #[error("no preserved fd named {name:?}")]
    UnknownName {
        /// The name asked for.
        name: String,
    },
    /// The fd named in the record is not open in this process.
    #[error("preserved fd {fd} ({name}) is not open")]
    NotOpen {
        /// The name.
        name: String,
        /// The fd number.
        fd: RawFd,
        /// What `fcntl(F_GETFD)` reported.
        #[source]
        source: io::Error,
    },
    /// `/proc/self/fd` could not be read.
    #[error("cannot list open fds in /proc/self/fd")]
    List(#[source] io::Error),
}

/// Named fds to carry across `execve`. The registry borrows: it never
/// closes what it holds, and the caller keeps registered fds open until the
/// exec (or until [`restore_cloexec`](Self::restore_cloexec)).
#[derive(Debug, Default)]
pub struct FdRegistry {
    fds: BTreeMap<String, RawFd>,
}

impl FdRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `fd` under `name`. Names and fds must both be unique.
    pub fn register(&mut self, name: &str, fd: impl AsFd) -> Result<(), FdError> {
        let fd = fd.as_fd().as_raw_fd();
        if self.fds.contains_key(name) {
            return Err(FdError::DuplicateName { name: name.into() });
        }
        if let Some((existing, _)) = self.fds.iter().find(|(_, e)| **e == fd) {
            return Err(FdError::DuplicateFd {
                fd,
                existing: existing.clone(),
                name: name.into(),
            });
        }
        self.fds.insert(name.to_owned(), fd);
        Ok(())
    }

    /// Number of registered fds.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// Whether nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// The registered fds, sorted by name, for the state record.
    pub fn describe(&self) -> Vec<PreservedFd> {
        self.fds
            .iter()
            .map(|(name, &fd)| PreservedFd {
                name: name.clone(),
                fd,
            })
            .collect()
    }

    /// Clears `FD_CLOEXEC` on every registered fd and on nothing else. If
    /// one fails, the fds already changed get their previous flags back
    /// before the error is returned.
    pub fn preserve_all(&self) -> Result<(), FdError> {
        let mut changed: Vec<(RawFd, libc::c_int)> = Vec::with_capacity(self.fds.len());
        for (name, &fd) in &self.fds {
            let result = fd_flags(fd).and_then(|flags| {
                set_fd_flags(fd, flags & !libc::FD_CLOEXEC)?;
                Ok(flags)
            });
            match result {
                Ok(flags) => changed.push((fd, flags)),
                Err(source) => {
                    for &(done, flags) in changed.iter().rev() {
                        if let Err(e) = set_fd_flags(done, flags) {
                            log::error!("cannot undo FD_CLOEXEC change on fd {done}: {e}");
                        }
                    }
                    return Err(FdError::Preserve {
                        name: name.clone(),
                        fd,
                        source,
                    });
                }
            }
        }
        log::debug!("cleared FD_CLOEXEC on {} preserved fds", changed.len());
        Ok(())
    }

    /// Sets `FD_CLOEXEC` on every registered fd again, e.g. after a failed
    /// `execve`. Goes through all fds and returns the first failure.
    pub fn restore_cloexec(&self) -> Result<(), FdError> {
        let mut first = None;
        for (name, &fd) in &self.fds {
            if let Err(source) = set_cloexec(fd) {
                log::error!("cannot set FD_CLOEXEC on fd {fd} ({name}): {source}");
                first.get_or_insert(FdError::Restore {
                    name: name.clone(),
                    fd,
                    source,
                });
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Whether `fd` is open and has `FD_CLOEXEC` set; `Err` if it is not open.
pub fn is_cloexec(fd: RawFd) -> io::Result<bool> {
    Ok(fd_flags(fd)? & libc::FD_CLOEXEC != 0)
}

/// The fds open in this process, sorted, from `/proc/self/fd` (the
/// directory fd used for the listing itself is left out).
pub fn open_fds() -> Result<Vec<RawFd>, FdError> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").map_err(FdError::List)? {
        let entry = entry.map_err(FdError::List)?;
        if let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            fds.push(fd);
        }
    }
    // The listing's own directory fd is closed by now; drop it.
    fds.retain(|&fd| fd_flags(fd).is_ok());
    fds.sort_unstable();
    Ok(fds)
}

pub(crate) fn fd_flags(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFD takes no argument and touches no memory; an fd number
    // that is not open just yields EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags)
}

fn set_fd_flags(fd: RawFd, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: F_SETFD takes an integer and touches no memory; it changes only
    // the close-on-exec flag of an fd the caller has registered.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_cloexec(fd: RawFd) -> io::Result<()> {
    set_fd_flags(fd, fd_flags(fd)? | libc::FD_CLOEXEC)
}
