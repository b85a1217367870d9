//! The exec transport's contract: what an image that hands a VM over by `execve` tells the
//! image it starts (through the environment), and the exec calls themselves.
//!
//! Every variable of the protocol is named here and nowhere else. The old image, a rollback
//! and the update guardian all build their environment with [`ExecEnv::apply`]; the image that
//! starts reads it once with [`ExecEnv::take`], which also removes the variables so no child
//! inherits them.

use std::convert::Infallible;
use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use nix::fcntl::AtFlags;

const RECORD_FD: &str = "MOLT_CPR_RECORD_FD";
const PREVIOUS_EXE_FD: &str = "MOLT_CPR_PREVIOUS_EXE_FD";
const EXEC_NS: &str = "MOLT_CPR_EXEC_NS";
const ROLLBACK_REASON: &str = "MOLT_CPR_ROLLBACK_REASON";
const TAKEOVER: &str = "MOLT_CPR_TAKEOVER";
const GUARDIAN_PIDFD: &str = "MOLT_CPR_GUARDIAN_PIDFD";
const COMMIT_FD: &str = "MOLT_CPR_COMMIT_FD";
const GUARDIAN_PARENT: &str = "MOLT_CPR_GUARDIAN_PARENT";
const GUARDIAN_SOCK: &str = "MOLT_CPR_GUARDIAN_SOCK";
const STAND_IN_ROLLBACK: &str = "MOLT_CPR_STAND_IN_ROLLBACK";
const STAND_IN_AGAIN: &str = "MOLT_CPR_STAND_IN_AGAIN";
const STAND_IN_PREVIOUS_FD: &str = "MOLT_CPR_STAND_IN_PREVIOUS_FD";

/// Every variable of the protocol.
const ALL: &[&str] = &[
    RECORD_FD,
    PREVIOUS_EXE_FD,
    EXEC_NS,
    ROLLBACK_REASON,
    TAKEOVER,
    GUARDIAN_PIDFD,
    COMMIT_FD,
    GUARDIAN_PARENT,
    GUARDIAN_SOCK,
    STAND_IN_ROLLBACK,
    STAND_IN_AGAIN,
    STAND_IN_PREVIOUS_FD,
];

/// What the image that executes the next one passes along with the preserved fds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecEnv {
    /// The sealed memfd holding the record.
    pub record_fd: RawFd,
    /// The previous binary, open, for a rollback.
    pub previous_exe_fd: Option<RawFd>,
    /// Wall-clock ns when `execve` was called.
    pub exec_ns: Option<u64>,
    /// Set when this start rolls an update back: why.
    pub rollback: Option<String>,
    /// Set when the guardian, not the original process, performs the rollback.
    pub takeover: bool,
    /// A pidfd of the update guardian, to dismiss it once the guest runs.
    pub guardian_pidfd: Option<RawFd>,
    /// The handoff's commit page ([`crate::CommitPage`]).
    pub commit_fd: Option<RawFd>,
}

fn parse<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The process environment without the protocol's variables.
pub fn clean_env() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(k, _)| !ALL.iter().any(|p| k == p))
        .collect()
}

impl ExecEnv {
    /// Reads the contract from this process's environment, if it was started by a handoff,
    /// and removes every protocol variable from it.
    pub fn take() -> Option<Self> {
        let found = parse(RECORD_FD).map(|record_fd| Self {
            record_fd,
            previous_exe_fd: parse(PREVIOUS_EXE_FD),
            exec_ns: parse(EXEC_NS),
            rollback: std::env::var(ROLLBACK_REASON).ok(),
            takeover: std::env::var_os(TAKEOVER).is_some(),
            guardian_pidfd: parse(GUARDIAN_PIDFD),
            commit_fd: parse(COMMIT_FD),
        });
        for v in ALL {
            std::env::remove_var(v);
        }
        found
    }

    /// `base` (see [`clean_env`]) plus this contract.
    pub fn apply(&self, mut base: Vec<(OsString, OsString)>) -> Vec<(OsString, OsString)> {
        let mut set = |k: &str, v: String| base.push((k.into(), v.into()));
        set(RECORD_FD, self.record_fd.to_string());
        if let Some(fd) = self.previous_exe_fd {
            set(PREVIOUS_EXE_FD, fd.to_string());
        }
        if let Some(ns) = self.exec_ns {
            set(EXEC_NS, ns.to_string());
        }
        if let Some(r) = &self.rollback {
            set(ROLLBACK_REASON, r.clone());
        }
        if self.takeover {
            set(TAKEOVER, "1".into());
        }
        if let Some(fd) = self.guardian_pidfd {
            set(GUARDIAN_PIDFD, fd.to_string());
        }
        if let Some(fd) = self.commit_fd {
            set(COMMIT_FD, fd.to_string());
        }
        base
    }
}

/// What an image that takes a VM back from a cpr-exec's stand-in is told besides its channel
/// (which its command line names).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StandInEnv {
    /// Why this binary takes the VM rather than the one the update asked for.
    pub rollback: Option<String>,
    /// It replaces a receiver that refused, on the same channel (it says so first).
    pub again: bool,
    /// The binary that started the update, to execute if this image cannot take over.
    pub previous_exe_fd: Option<RawFd>,
}

impl StandInEnv {
    /// Reads the contract from this process's environment and removes it.
    pub fn take() -> Self {
        let found = Self {
            rollback: std::env::var(STAND_IN_ROLLBACK).ok(),
            again: std::env::var_os(STAND_IN_AGAIN).is_some(),
            previous_exe_fd: parse(STAND_IN_PREVIOUS_FD),
        };
        for v in [STAND_IN_ROLLBACK, STAND_IN_AGAIN, STAND_IN_PREVIOUS_FD] {
            std::env::remove_var(v);
        }
        found
    }

    /// `base` (see [`clean_env`]) plus this contract.
    pub fn apply(&self, mut base: Vec<(OsString, OsString)>) -> Vec<(OsString, OsString)> {
        let mut set = |k: &str, v: String| base.push((k.into(), v.into()));
        if let Some(r) = &self.rollback {
            set(STAND_IN_ROLLBACK, r.clone());
        }
        if self.again {
            set(STAND_IN_AGAIN, "1".into());
        }
        if let Some(fd) = self.previous_exe_fd {
            set(STAND_IN_PREVIOUS_FD, fd.to_string());
        }
        base
    }
}

/// What the update guardian is started with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuardianEnv {
    /// The process it watches.
    pub parent: i32,
    /// Its end of the socket the fds arrive on.
    pub sock: RawFd,
}

impl GuardianEnv {
    /// Reads (and removes) the guardian's variables.
    pub fn take() -> Option<Self> {
        let found = parse(GUARDIAN_PARENT)
            .zip(parse(GUARDIAN_SOCK))
            .map(|(parent, sock)| Self { parent, sock });
        std::env::remove_var(GUARDIAN_PARENT);
        std::env::remove_var(GUARDIAN_SOCK);
        found
    }

    /// The variables to start the guardian with.
    pub fn vars(&self) -> [(&'static str, String); 2] {
        [
            (GUARDIAN_PARENT, self.parent.to_string()),
            (GUARDIAN_SOCK, self.sock.to_string()),
        ]
    }
}

/// Errors of the exec calls.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// An argument or environment string holds a NUL byte.
    #[error("argument or environment string contains a NUL byte")]
    Nul,
    /// The kernel refused the exec.
    #[error("execve failed")]
    Exec(#[source] io::Error),
}

fn c_strings(argv: &[String]) -> Result<Vec<CString>, ExecError> {
    argv.iter()
        .map(|a| CString::new(a.as_bytes()).map_err(|_| ExecError::Nul))
        .collect()
}

fn c_env(env: Vec<(OsString, OsString)>) -> Result<Vec<CString>, ExecError> {
    env.into_iter()
        .map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).map_err(|_| ExecError::Nul)
        })
        .collect()
}

/// `execve(path, argv, env)`; returns only on failure.
pub fn exec_path(
    path: &Path,
    argv: &[String],
    env: Vec<(OsString, OsString)>,
) -> Result<Infallible, ExecError> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(|_| ExecError::Nul)?;
    let (args, env) = (c_strings(argv)?, c_env(env)?);
    nix::unistd::execve(&path, &args, &env).map_err(|e| ExecError::Exec(e.into()))
}

/// `execveat(fd, "", argv, env, AT_EMPTY_PATH)`: executes an open binary; returns only on
/// failure.
pub fn exec_fd(
    fd: impl AsFd,
    argv: &[String],
    env: Vec<(OsString, OsString)>,
) -> Result<Infallible, ExecError> {
    let (args, env) = (c_strings(argv)?, c_env(env)?);
    nix::unistd::execveat(fd, c"", &args, &env, AtFlags::AT_EMPTY_PATH)
        .map_err(|e| ExecError::Exec(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// The process environment is one for all tests: those that set and take the
    /// protocol's variables (each `take` removes all of them) run one at a time.
    static ENVIRONMENT: Mutex<()> = Mutex::new(());

    #[test]
    fn the_contract_round_trips_and_leaves_nothing_behind() {
        let _env = ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner());
        let sent = ExecEnv {
            record_fd: 7,
            previous_exe_fd: Some(9),
            exec_ns: Some(123),
            rollback: Some("new image failed".into()),
            takeover: true,
            guardian_pidfd: Some(11),
            commit_fd: Some(12),
        };
        for (k, v) in sent.apply(Vec::new()) {
            std::env::set_var(k, v);
        }
        assert_eq!(ExecEnv::take(), Some(sent));
        assert_eq!(ExecEnv::take(), None, "variables removed");
        assert!(clean_env()
            .iter()
            .all(|(k, _)| !k.to_string_lossy().starts_with("MOLT_CPR_")));
    }

    #[test]
    fn the_stand_in_contract_round_trips_and_leaves_nothing_behind() {
        let _env = ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner());
        let sent = StandInEnv {
            rollback: Some("cannot execute".into()),
            again: true,
            previous_exe_fd: Some(5),
        };
        for (k, v) in sent.apply(Vec::new()) {
            std::env::set_var(k, v);
        }
        assert!(clean_env()
            .iter()
            .all(|(k, _)| !k.to_string_lossy().starts_with("MOLT_CPR_")));
        assert_eq!(StandInEnv::take(), sent);
        assert_eq!(
            StandInEnv::take(),
            StandInEnv::default(),
            "variables removed"
        );
    }

    #[test]
    fn nul_bytes_are_refused_before_exec() {
        let err = exec_path(Path::new("/bin/true"), &["a\0b".into()], Vec::new());
        assert!(matches!(err, Err(ExecError::Nul)));
    }
}
