//! The receiving side of a handoff: the fds a new keeper of the VM inherited, by name.
//!
//! Every fd is handed out as a close-on-exec *duplicate*; the originals stay exactly as they
//! arrived until [`Inherited::release_originals`], so a new image that fails half-way through
//! its restore can still roll back to the previous binary with every fd at the number the
//! record names.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg};

use crate::fds::{FdError, PreservedFd};

/// Lowest number a duplicate gets (0–2 are stdio).
const FIRST_DUP: RawFd = 3;

#[derive(Debug)]
enum Original {
    /// Inherited across `execve` at this number; closed only by `release_originals`.
    Number(RawFd),
    /// Received over a socket (SCM_RIGHTS); owned here.
    Owned(OwnedFd),
}

impl Original {
    fn borrow(&self) -> BorrowedFd<'_> {
        match self {
            // SAFETY: the number was checked open when the set was built, and nothing closes
            // it before `release_originals` consumes the set.
            Original::Number(fd) => unsafe { BorrowedFd::borrow_raw(*fd) },
            Original::Owned(fd) => fd.as_fd(),
        }
    }
}

#[derive(Debug)]
struct Entry {
    original: Original,
    taken: bool,
}

/// The fds a new keeper of the VM inherited, by the names the record gives them.
#[derive(Debug, Default)]
pub struct Inherited {
    fds: BTreeMap<String, Entry>,
}

impl Inherited {
    /// The fds `list` names at their numbers, as inherited across `execve`. Each must be open;
    /// names and numbers must be unique.
    ///
    /// # Safety
    ///
    /// Every listed fd must have been inherited for this process to own, and nothing else in
    /// this process may close it: the set closes the originals in
    /// [`release_originals`](Self::release_originals).
    pub unsafe fn from_numbers(list: &[PreservedFd]) -> Result<Self, FdError> {
        let mut set = Self::default();
        for p in list {
            if p.fd < 0 {
                return Err(FdError::InvalidNumber {
                    name: p.name.clone(),
                    fd: p.fd,
                });
            }
            if let Some((existing, _)) = set
                .fds
                .iter()
                .find(|(_, e)| matches!(e.original, Original::Number(n) if n == p.fd))
            {
                return Err(FdError::DuplicateFd {
                    fd: p.fd,
                    existing: existing.clone(),
                    name: p.name.clone(),
                });
            }
            crate::fds::fd_flags(p.fd).map_err(|source| FdError::NotOpen {
                name: p.name.clone(),
                fd: p.fd,
                source,
            })?;
            set.insert(&p.name, Original::Number(p.fd))?;
        }
        Ok(set)
    }

    /// Fds received with their names (a transfer over a unix socket).
    pub fn from_owned(fds: Vec<(String, OwnedFd)>) -> Result<Self, FdError> {
        let mut set = Self::default();
        for (name, fd) in fds {
            set.insert(&name, Original::Owned(fd))?;
        }
        Ok(set)
    }

    fn insert(&mut self, name: &str, original: Original) -> Result<(), FdError> {
        if self.fds.contains_key(name) {
            return Err(FdError::DuplicateName { name: name.into() });
        }
        self.fds.insert(
            name.to_owned(),
            Entry {
                original,
                taken: false,
            },
        );
        Ok(())
    }

    /// A close-on-exec duplicate of the fd named `name`; each name can be taken once.
    pub fn take(&mut self, name: &str) -> Result<OwnedFd, FdError> {
        self.take_optional(name)?
            .ok_or_else(|| FdError::UnknownName { name: name.into() })
    }

    /// Like [`take`](Self::take), for an fd the record may legitimately lack.
    pub fn take_optional(&mut self, name: &str) -> Result<Option<OwnedFd>, FdError> {
        let Some(entry) = self.fds.get_mut(name) else {
            return Ok(None);
        };
        if entry.taken {
            return Err(FdError::TakenTwice { name: name.into() });
        }
        let original = entry.original.borrow();
        let raw = original.as_raw_fd();
        let dup = fcntl(original, FcntlArg::F_DUPFD_CLOEXEC(FIRST_DUP)).map_err(|e| {
            FdError::Duplicate {
                name: name.into(),
                fd: raw,
                source: e.into(),
            }
        })?;
        entry.taken = true;
        // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
        Ok(Some(unsafe { std::os::fd::FromRawFd::from_raw_fd(dup) }))
    }

    /// Names nobody took: fds the record lists that no component claimed.
    pub fn unclaimed(&self) -> Vec<&str> {
        self.fds
            .iter()
            .filter(|(_, e)| !e.taken)
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Whether the set holds an fd named `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.fds.contains_key(name)
    }

    /// Closes every original: call once the VM runs on the duplicates, when no rollback can
    /// need them any more.
    pub fn release_originals(self) {
        for (_, e) in self.fds {
            if let Original::Number(fd) = e.original {
                // SAFETY: `from_numbers`' caller gave this set the original to own; the
                // duplicates handed out are separate fds.
                drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            }
        }
    }
}
