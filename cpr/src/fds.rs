//! The registry of fds that survive `execve` into the new molt binary.
//!
//! On the sending side, [`FdRegistry::register`] names the fds to keep (guest
//! RAM memfds, the serial backend, the API listener, the record memfd),
//! [`FdRegistry::describe`] lists them for the state record, and
//! [`FdRegistry::preserve_all`] clears `FD_CLOEXEC` on exactly those fds
//! just before `execve` ([`FdRegistry::restore_cloexec`] sets it again if
//! the exec fails). On the receiving side, [`FdRegistry::inherited`] rebuilds
//! the registry from the record's list and [`FdRegistry::adopt`] takes
//! ownership of each fd by name.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

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
    /// The fd was registered by the caller, who keeps owning it.
    #[error("fd {fd} ({name}) is borrowed, not inherited, and cannot be adopted")]
    Borrowed {
        /// The name.
        name: String,
        /// The fd number.
        fd: RawFd,
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
    fds: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    fd: RawFd,
    /// Came from [`FdRegistry::inherited`], so it may be adopted; fds given
    /// to [`FdRegistry::register`] are only borrowed.
    inherited: bool,
}

impl FdRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the registry in the new process from the list in the state
    /// record, so that its fds can be [`adopt`](Self::adopt)ed.
    ///
    /// # Safety
    ///
    /// Every listed fd that is open must have been inherited across `execve`
    /// for this process to own, and nothing in this process may own it
    /// already: [`adopt`](Self::adopt) wraps it in an [`OwnedFd`] that
    /// closes it on drop.
    pub unsafe fn inherited(list: &[PreservedFd]) -> Result<Self, FdError> {
        let mut registry = Self::new();
        for entry in list {
            if entry.fd < 0 {
                return Err(FdError::InvalidNumber {
                    name: entry.name.clone(),
                    fd: entry.fd,
                });
            }
            registry.insert(&entry.name, entry.fd, true)?;
        }
        Ok(registry)
    }

    /// Registers `fd` under `name`. Names and fds must both be unique.
    pub fn register(&mut self, name: &str, fd: impl AsFd) -> Result<(), FdError> {
        self.insert(name, fd.as_fd().as_raw_fd(), false)
    }

    fn insert(&mut self, name: &str, fd: RawFd, inherited: bool) -> Result<(), FdError> {
        if self.fds.contains_key(name) {
            return Err(FdError::DuplicateName { name: name.into() });
        }
        if let Some((existing, _)) = self.fds.iter().find(|(_, e)| e.fd == fd) {
            return Err(FdError::DuplicateFd {
                fd,
                existing: existing.clone(),
                name: name.into(),
            });
        }
        self.fds.insert(name.to_owned(), Entry { fd, inherited });
        Ok(())
    }

    /// The fd number registered under `name`.
    pub fn get(&self, name: &str) -> Option<RawFd> {
        self.fds.get(name).map(|e| e.fd)
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
            .map(|(name, e)| PreservedFd {
                name: name.clone(),
                fd: e.fd,
            })
            .collect()
    }

    /// Clears `FD_CLOEXEC` on every registered fd and on nothing else. If
    /// one fails, the fds already changed get their previous flags back
    /// before the error is returned.
    pub fn preserve_all(&self) -> Result<(), FdError> {
        let mut changed: Vec<(RawFd, libc::c_int)> = Vec::with_capacity(self.fds.len());
        for (name, &Entry { fd, .. }) in &self.fds {
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
        for (name, &Entry { fd, .. }) in &self.fds {
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

    /// Takes ownership of the inherited fd under `name`, after checking
    /// that it is open, and sets `FD_CLOEXEC` on it again. The entry leaves
    /// the registry, so an fd can only be adopted once. Fds added with
    /// [`register`](Self::register) are borrowed and cannot be adopted.
    pub fn adopt(&mut self, name: &str) -> Result<OwnedFd, FdError> {
        let Some(&Entry { fd, inherited }) = self.fds.get(name) else {
            return Err(FdError::UnknownName { name: name.into() });
        };
        if !inherited {
            return Err(FdError::Borrowed {
                name: name.into(),
                fd,
            });
        }
        self.fds.remove(name);
        fd_flags(fd).map_err(|source| FdError::NotOpen {
            name: name.into(),
            fd,
            source,
        })?;
        // SAFETY: `fd` is open (F_GETFD succeeded) and its entry came from
        // `inherited`, whose caller promised that this process owns the fd
        // and nothing else in it does; the entry was removed above, so no
        // second OwnedFd can be made from it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        set_cloexec(fd).map_err(|source| FdError::Restore {
            name: name.into(),
            fd,
            source,
        })?;
        log::debug!("adopted preserved fd {fd} ({name})");
        Ok(owned)
    }

    /// Names still in the registry, e.g. fds the new process did not adopt.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.fds.keys().map(String::as_str)
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

fn fd_flags(fd: RawFd) -> io::Result<libc::c_int> {
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
