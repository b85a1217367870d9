//! Unix socket plumbing: addresses, listening with mode 0600 and stale-file replacement,
//! connecting with a timeout, and checks on inherited fds.

use std::fs::{self, Permissions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::ApiError;

/// Listen backlog: clients queue here while molt is busy (or mid live-update).
const BACKLOG: libc::c_int = 128;

/// `path` as a `sockaddr_un`, or `None` when it is too long or contains a NUL byte.
pub(super) fn unix_sockaddr(path: &Path) -> Option<(libc::sockaddr_un, libc::socklen_t)> {
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
pub(super) fn stream_socket(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked before it is wrapped.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | flags,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Connects to the unix socket at `path`, waiting up to `timeout` while the listener's backlog
/// is full (as it can be while molt is mid live-update and not accepting). The stream is
/// blocking.
pub(super) fn connect(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let Some((addr, len)) = unix_sockaddr(path) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
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
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
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

/// Device and inode of the file at `path` (not following symlinks).
pub(super) fn file_id(path: &Path) -> Option<(u64, u64)> {
    fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Sets close-on-exec on `fd`.
pub(super) fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD on an fd the caller owns; no memory is involved.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes a stale socket at `path`; refuses to remove anything else, or a live socket.
fn clear_stale(path: &Path) -> Result<(), ApiError> {
    let stale = |source| ApiError::Stale {
        path: path.to_path_buf(),
        source,
    };
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(stale(e)),
        Ok(m) if !m.file_type().is_socket() => Err(ApiError::NotASocket(path.to_path_buf())),
        Ok(_) => match connect(path, Duration::from_millis(500)) {
            Ok(_) => Err(ApiError::InUse(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                Err(ApiError::InUse(path.to_path_buf()))
            }
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                log::info!("replacing stale API socket {path:?}");
                fs::remove_file(path).map_err(stale)
            }
            Err(e) => Err(stale(e)),
        },
    }
}

/// Checks that `fd` is a unix stream socket (listening or not, as `listening` says).
pub(super) fn check_socket(fd: RawFd, listening: bool) -> Result<(), ApiError> {
    let get = |opt| {
        let mut val: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `val` and `len` are valid for writes of the sizes given.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut val as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(val)
    };
    let ok = get(libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && get(libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && get(libc::SO_ACCEPTCONN) == Some(listening as libc::c_int);
    if ok {
        Ok(())
    } else {
        Err(ApiError::Inherited(fd))
    }
}

/// Creates a non-blocking listening socket at `path`, mode 0600, replacing a stale socket
/// file. Returns the socket and the file's identity.
pub(super) fn listen(path: &Path) -> Result<(OwnedFd, Option<(u64, u64)>), ApiError> {
    let (addr, len) = unix_sockaddr(path).ok_or_else(|| ApiError::BadPath(path.to_path_buf()))?;
    clear_stale(path)?;
    let failed = |source| ApiError::Listen {
        path: path.to_path_buf(),
        source,
    };
    let fd = stream_socket(libc::SOCK_NONBLOCK).map_err(failed)?;
    // SAFETY: `addr` is an initialised sockaddr_un and `len` its used length.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if rc < 0 {
        return Err(failed(io::Error::last_os_error()));
    }
    // Nobody can connect before listen(), so the mode is in place before anyone can.
    let listening = fs::set_permissions(path, Permissions::from_mode(0o600)).and_then(|()| {
        // SAFETY: plain syscall on a socket we own.
        match unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    });
    if let Err(e) = listening {
        let _ = fs::remove_file(path);
        return Err(failed(e));
    }
    Ok((fd, file_id(path)))
}
