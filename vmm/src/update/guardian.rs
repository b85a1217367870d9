//! The update guardian: a small process (this binary, `molt __cpr-guardian`) that the old
//! image starts before it pauses the guest. Just before `execve` the old image hands it
//! copies of every preserved fd (guest RAM, the handoff record, sockets, disks) over a unix
//! socket. The new image dismisses it once the guest runs again. If instead the process dies
//! (or has not dismissed it within [`GUARDIAN_TIMEOUT`]), the guardian becomes the VMM: it
//! puts the fds back at the numbers the record names and executes the previous molt binary,
//! which restores the guest from the same record and reports the rollback.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Child, Command};
use std::time::Duration;

use super::fdpass;
use super::{
    ENV_GUARDIAN_PARENT, ENV_GUARDIAN_SOCK, ENV_PREVIOUS_EXE_FD, ENV_RECORD_FD,
    ENV_ROLLBACK_REASON, ENV_TAKEOVER, GUARDIAN_ARG,
};

/// The old image's handle on its guardian.
pub struct Guardian {
    child: Child,
    sock: OwnedFd,
}

impl Guardian {
    /// Starts the guardian; it holds nothing until [`Guardian::hand_over`].
    pub fn spawn() -> io::Result<Self> {
        let mut pair = [0; 2];
        // SAFETY: socketpair writes two new fds into the array.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                pair.as_mut_ptr(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created and are owned by nobody else.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
        // The guardian's end is inherited (only by the guardian: we close it right after).
        // SAFETY: clearing FD_CLOEXEC on an fd we own.
        if unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_SETFD, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let child = Command::new("/proc/self/exe")
            .arg(GUARDIAN_ARG)
            .env(ENV_GUARDIAN_PARENT, std::process::id().to_string())
            .env(ENV_GUARDIAN_SOCK, theirs.as_raw_fd().to_string())
            .spawn()?;
        drop(theirs);
        Ok(Self { child, sock: ours })
    }

    /// The guardian's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Gives the guardian copies of `fds` with their names and numbers in this process.
    pub fn hand_over(&self, fds: &[(String, RawFd)]) -> io::Result<()> {
        let text: String = fds.iter().map(|(n, fd)| format!("{n}={fd}\n")).collect();
        let raw: Vec<RawFd> = fds.iter().map(|(_, fd)| *fd).collect();
        fdpass::send(self.sock.as_raw_fd(), text.as_bytes(), &raw)
    }

    /// The update did not happen: the guardian goes (the kernel reaps it).
    pub fn dismiss(mut self) {
        let _ = self.child.kill();
    }
}

/// How long the new image has to resume the guest before the guardian takes over.
pub const GUARDIAN_TIMEOUT: Duration = Duration::from_secs(30);

fn pidfd_open(pid: i32) -> std::io::Result<RawFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(fd as RawFd)
    }
}

/// Waits until `fd` is readable (the process exited) or `timeout` passes; true if it exited.
fn wait_exit(fd: RawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc > 0 {
            return true;
        }
        if rc == 0 {
            return false;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// Entry point of `molt __cpr-guardian`; returns the exit code when it does not take over.
pub fn main() -> i32 {
    let parse = |name| std::env::var(name).ok().and_then(|v| v.parse::<i32>().ok());
    let (Some(parent), Some(sock)) = (parse(ENV_GUARDIAN_PARENT), parse(ENV_GUARDIAN_SOCK)) else {
        eprintln!("molt: error: the update guardian is started by molt itself");
        return 2;
    };
    // SAFETY: the socket fd was inherited from the parent for this process alone.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // Nothing to guard until the parent hands the fds over; end of stream means the update
    // was abandoned.
    let (text, fds) = match fdpass::recv(sock.as_raw_fd()) {
        Ok(Some(m)) => m,
        _ => return 0,
    };
    drop(sock);
    let names: Vec<(String, RawFd)> = String::from_utf8_lossy(&text)
        .lines()
        .filter_map(|l| {
            let (n, fd) = l.split_once('=')?;
            Some((n.to_string(), fd.parse().ok()?))
        })
        .collect();
    if names.len() != fds.len() {
        eprintln!("molt: guardian: malformed handover");
        return 1;
    }
    let reason = match pidfd_open(parent) {
        Err(_) => "the new binary exited before it resumed the guest".to_string(),
        Ok(pidfd) => {
            let exited = wait_exit(pidfd, GUARDIAN_TIMEOUT);
            if !exited {
                // SAFETY: plain kill(2) of the process we watch.
                unsafe { libc::kill(parent, libc::SIGKILL) };
                if !wait_exit(pidfd, Duration::from_secs(5)) {
                    eprintln!("molt: guardian: process {parent} does not die; giving up");
                    return 1;
                }
            }
            // SAFETY: closing our pidfd.
            unsafe { libc::close(pidfd) };
            if exited {
                "the new binary exited before it resumed the guest".to_string()
            } else {
                format!(
                    "the new binary did not resume the guest within {} s and was killed",
                    GUARDIAN_TIMEOUT.as_secs()
                )
            }
        }
    };
    eprintln!("molt: update guardian: {reason}; restoring the guest on the previous binary");
    take_over(
        &reason,
        names
            .into_iter()
            .zip(fds)
            .map(|((n, at), fd)| (n, at, fd))
            .collect(),
    )
}

/// Puts each fd at the number it had in the old image, then executes the previous binary.
fn take_over(reason: &str, fds: Vec<(String, RawFd, OwnedFd)>) -> i32 {
    // First move every fd out of the way (high numbers), then onto its old number.
    let mut staged = Vec::with_capacity(fds.len());
    for (name, at, fd) in fds {
        // SAFETY: duplicating an fd we own to a number >= 1000.
        let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 1000) };
        if high < 0 {
            eprintln!(
                "molt: guardian: cannot keep fd {name}: {}",
                io::Error::last_os_error()
            );
            return 1;
        }
        drop(fd);
        staged.push((name, at, high));
    }
    let (mut record, mut exe) = (None, None);
    for (name, at, high) in staged {
        // SAFETY: dup2 onto the number the record names (whatever was there is not ours any
        // more: our own fds were closed above); the result is inheritable.
        if unsafe { libc::dup2(high, at) } < 0 {
            eprintln!(
                "molt: guardian: cannot restore fd {name}: {}",
                io::Error::last_os_error()
            );
            return 1;
        }
        // SAFETY: closing the staging copy.
        unsafe { libc::close(high) };
        match name.as_str() {
            "record" => record = Some(at),
            super::handoff::fd_names::PREVIOUS_EXE => exe = Some(at),
            _ => {}
        }
    }
    let (Some(record), Some(exe)) = (record, exe) else {
        eprintln!("molt: guardian: the handover lacks the record or the previous binary");
        return 1;
    };
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            ![ENV_GUARDIAN_PARENT, ENV_GUARDIAN_SOCK, ENV_ROLLBACK_REASON].contains(&k.as_str())
        })
        .collect();
    env.push((ENV_RECORD_FD.into(), record.to_string()));
    env.push((ENV_PREVIOUS_EXE_FD.into(), exe.to_string()));
    env.push((ENV_ROLLBACK_REASON.into(), reason.into()));
    env.push((ENV_TAKEOVER.into(), "1".into()));
    let argv = super::incoming::record_argv(record).unwrap_or_else(|| vec!["molt".to_string()]);
    let err = exec_fd(exe, &argv, &env);
    eprintln!("molt: guardian: cannot execute the previous binary: {err}");
    1
}

/// `execveat(fd, "", argv, envp, AT_EMPTY_PATH)`; returns only on failure.
pub fn exec_fd(fd: RawFd, argv: &[String], env: &[(String, String)]) -> std::io::Error {
    let to_c = |s: String| CString::new(s).ok();
    let Some(args) = argv.iter().cloned().map(to_c).collect::<Option<Vec<_>>>() else {
        return std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in argument");
    };
    let Some(envs) = env
        .iter()
        .map(|(k, v)| to_c(format!("{k}={v}")))
        .collect::<Option<Vec<_>>>()
    else {
        return std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in environment");
    };
    let mut argv_p: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut env_p: Vec<*const libc::c_char> = envs.iter().map(|e| e.as_ptr()).collect();
    env_p.push(std::ptr::null());
    // SAFETY: argv/envp are NUL-terminated arrays of valid C strings that outlive the call;
    // execveat only returns on failure.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            fd,
            c"".as_ptr(),
            argv_p.as_ptr(),
            env_p.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    std::io::Error::last_os_error()
}
