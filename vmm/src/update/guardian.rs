//! The update guardian: a small process started just before `execve` that holds copies of
//! every preserved fd (guest RAM, the handoff record, sockets). The new image dismisses it
//! once the guest runs again. If instead the process it watches dies, or has not dismissed it
//! within [`GUARDIAN_TIMEOUT`], the guardian becomes the VMM: it executes the previous molt
//! binary, which restores the guest from the same record and reports the rollback.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::time::Duration;

use super::{
    ENV_GUARDIAN_PARENT, ENV_PREVIOUS_EXE_FD, ENV_RECORD_FD, ENV_ROLLBACK_REASON, ENV_TAKEOVER,
};

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
    let Some(parent) = std::env::var(ENV_GUARDIAN_PARENT)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        eprintln!("molt: error: the update guardian is started by molt itself");
        return 2;
    };
    let reason = match pidfd_open(parent) {
        // Gone already.
        Err(_) => "the new binary exited before it resumed the guest".to_string(),
        Ok(pidfd) => {
            if wait_exit(pidfd, GUARDIAN_TIMEOUT) {
                "the new binary exited before it resumed the guest".to_string()
            } else {
                // SAFETY: plain kill(2) of the process we watch.
                unsafe { libc::kill(parent, libc::SIGKILL) };
                if !wait_exit(pidfd, Duration::from_secs(5)) {
                    eprintln!("molt: guardian: process {parent} does not die; giving up");
                    return 1;
                }
                format!(
                    "the new binary did not resume the guest within {} s and was killed",
                    GUARDIAN_TIMEOUT.as_secs()
                )
            }
        }
    };
    eprintln!("molt: update guardian: {reason}; restoring the guest on the previous binary");
    take_over(&reason)
}

/// Executes the previous binary (from its inherited fd) to restore the guest.
fn take_over(reason: &str) -> i32 {
    let Some(exe_fd) = std::env::var(ENV_PREVIOUS_EXE_FD)
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok())
    else {
        eprintln!("molt: guardian: no previous binary to restore the guest with");
        return 1;
    };
    if std::env::var(ENV_RECORD_FD).is_err() {
        eprintln!("molt: guardian: no handoff record");
        return 1;
    }
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k != ENV_GUARDIAN_PARENT && k != ENV_ROLLBACK_REASON)
        .collect();
    env.push((ENV_ROLLBACK_REASON.into(), reason.into()));
    env.push((ENV_TAKEOVER.into(), "1".into()));
    let argv = std::env::var(ENV_RECORD_FD)
        .ok()
        .and_then(|v| v.parse().ok())
        .and_then(super::incoming::record_argv)
        .unwrap_or_else(|| vec!["molt".to_string()]);
    let err = exec_fd(exe_fd, &argv, &env);
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
