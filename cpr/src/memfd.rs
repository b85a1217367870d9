//! Carrying an encoded record across `execve` in a sealed memfd.
//!
//! The old process writes the record into a fresh memfd, seals it against
//! any change and hands the fd over (see [`crate::fds`]); the new process
//! reads it back with [`read_record`].

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use crate::record::MAX_RECORD_LEN;

/// Name given to record memfds (visible in `/proc/<pid>/fd` as
/// `/memfd:molt-cpr-record`).
pub const RECORD_MEMFD_NAME: &CStr = c"molt-cpr-record";

/// Seals applied to a record memfd: no writes, no resizing, no further
/// seal changes.
pub const RECORD_SEALS: libc::c_int =
    libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;

/// Why a record could not be put into or taken out of a memfd.
#[derive(Debug, thiserror::Error)]
pub enum MemfdError {
    /// `memfd_create` failed.
    #[error("cannot create record memfd")]
    Create(#[source] io::Error),
    /// Writing the record into the memfd failed.
    #[error("cannot write record into memfd")]
    Write(#[source] io::Error),
    /// Adding the seals failed.
    #[error("cannot seal record memfd")]
    Seal(#[source] io::Error),
    /// Reading the seals failed (the fd is probably not a memfd).
    #[error("cannot read seals of fd {fd}")]
    GetSeals {
        /// The fd queried.
        fd: i32,
        /// What `fcntl` reported.
        #[source]
        source: io::Error,
    },
    /// `fstat` on the record fd failed.
    #[error("cannot stat record fd {fd}")]
    Stat {
        /// The fd queried.
        fd: i32,
        /// What `fstat` reported.
        #[source]
        source: io::Error,
    },
    /// The record fd is a pipe, socket, directory or the like.
    #[error("record fd {fd} is not a regular file or memfd")]
    NotRegular {
        /// The fd queried.
        fd: i32,
    },
    /// The record is larger than [`MAX_RECORD_LEN`].
    #[error("record of {size} bytes exceeds the {MAX_RECORD_LEN}-byte limit")]
    TooLarge {
        /// Size of the record or file.
        size: u64,
    },
    /// Reading the record fd failed or came up short.
    #[error("cannot read {size} bytes from record fd {fd}")]
    Read {
        /// The fd read.
        fd: i32,
        /// Bytes expected.
        size: u64,
        /// What `pread` reported.
        #[source]
        source: io::Error,
    },
}

/// Writes `bytes` into a new memfd (`MFD_CLOEXEC | MFD_ALLOW_SEALING`),
/// seals it with [`RECORD_SEALS`] and returns it.
///
/// The fd is close-on-exec; register it with an
/// [`FdRegistry`](crate::FdRegistry) to carry it across `execve`.
pub fn write_sealed(bytes: &[u8]) -> Result<OwnedFd, MemfdError> {
    if bytes.len() > MAX_RECORD_LEN {
        return Err(MemfdError::TooLarge {
            size: bytes.len() as u64,
        });
    }
    let mut file = File::from(create()?);
    file.write_all(bytes).map_err(MemfdError::Write)?;
    // SAFETY: F_ADD_SEALS takes an integer argument and touches no memory of
    // ours; `file` is an open fd for the duration of the call.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, RECORD_SEALS) };
    if ret < 0 {
        return Err(MemfdError::Seal(io::Error::last_os_error()));
    }
    log::debug!(
        "record of {} bytes sealed in memfd {}",
        bytes.len(),
        file.as_raw_fd()
    );
    Ok(OwnedFd::from(file))
}

fn create() -> Result<OwnedFd, MemfdError> {
    // SAFETY: the name is a NUL-terminated static string that memfd_create
    // only reads; the flags are valid memfd_create flags.
    let raw = unsafe {
        libc::memfd_create(
            RECORD_MEMFD_NAME.as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if raw < 0 {
        return Err(MemfdError::Create(io::Error::last_os_error()));
    }
    // SAFETY: `raw` was just returned by memfd_create, so it is open and
    // nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The seals on `fd` (`F_GET_SEALS`), a mask of `libc::F_SEAL_*` bits.
pub fn seals(fd: impl AsFd) -> Result<libc::c_int, MemfdError> {
    let raw = fd.as_fd().as_raw_fd();
    // SAFETY: F_GET_SEALS takes no argument and touches no memory of ours;
    // `fd` is borrowed, so it stays open during the call.
    let ret = unsafe { libc::fcntl(raw, libc::F_GET_SEALS) };
    if ret < 0 {
        return Err(MemfdError::GetSeals {
            fd: raw,
            source: io::Error::last_os_error(),
        });
    }
    Ok(ret)
}

/// Whether `fd` carries all of [`RECORD_SEALS`].
pub fn is_sealed(fd: impl AsFd) -> Result<bool, MemfdError> {
    Ok(seals(fd)? & RECORD_SEALS == RECORD_SEALS)
}

/// Reads the whole content of a record fd: `fstat` for the size, then
/// `pread` from offset 0 (the file offset is left alone). Files larger than
/// [`MAX_RECORD_LEN`] are refused before anything is allocated.
///
/// An fd without the record seals is read anyway, with a warning.
pub fn read_record(fd: impl AsFd) -> Result<Vec<u8>, MemfdError> {
    let fd = fd.as_fd();
    let raw = fd.as_raw_fd();
    // SAFETY: `raw` is open for as long as the borrow `fd` lives, which
    // outlasts `file`; ManuallyDrop keeps `file` from closing it.
    let file = ManuallyDrop::new(unsafe { File::from_raw_fd(raw) });
    let meta = file
        .metadata()
        .map_err(|source| MemfdError::Stat { fd: raw, source })?;
    if !meta.is_file() {
        return Err(MemfdError::NotRegular { fd: raw });
    }
    let size = meta.len();
    let len = match usize::try_from(size) {
        Ok(len) if len <= MAX_RECORD_LEN => len,
        _ => return Err(MemfdError::TooLarge { size }),
    };
    match is_sealed(fd) {
        Ok(true) => {}
        Ok(false) => log::warn!("record fd {raw} is not fully sealed; reading it anyway"),
        Err(e) => log::warn!("record fd {raw}: {e}; reading it anyway"),
    }
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, 0)
        .map_err(|source| MemfdError::Read {
            fd: raw,
            size,
            source,
        })?;
    log::debug!("read {len}-byte record from fd {raw}");
    Ok(buf)
}

#[cfg(test)]
#[path = "memfd_tests.rs"]
mod tests;
