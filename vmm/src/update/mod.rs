//! Live update by `execve` (cpr-exec): the running molt replaces its own binary under a
//! running guest, keeping its PID.
//!
//! 1. [`outgoing`] (old image): validate the target, pause, capture [`VmState`], write a
//!    [`handoff::Handoff`] record into a sealed memfd, clear CLOEXEC on exactly the fds to
//!    keep, start a [`guardian`], `execve`. If `execve` fails, everything is undone and the
//!    guest resumes here.
//! 2. [`incoming`] (new image, first thing in `main`): read the record named by
//!    `MOLT_CPR_RECORD_FD`, rebuild the VM over inherited fds, resume, dismiss the guardian,
//!    answer the waiting API request. If it cannot, it execs the previous binary (kept open as
//!    an fd) which restores the same record and reports a rollback.
//! 3. [`guardian`]: a small process holding copies of the preserved fds; if the new image
//!    dies (or hangs) before it resumes the guest, the guardian restores the guest on the
//!    previous binary.
//!
//! [`VmState`]: crate::state::VmState

mod adopt;
mod fdpass;
pub mod guardian;
pub mod handoff;
pub mod holder;
pub mod incoming;
pub mod outgoing;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Names the fd of the handoff record (set by the old image for the new one).
pub const ENV_RECORD_FD: &str = "MOLT_CPR_RECORD_FD";
/// Names an fd of the previous molt binary, for rollback.
pub const ENV_PREVIOUS_EXE_FD: &str = "MOLT_CPR_PREVIOUS_EXE_FD";
/// Wall-clock ns when the old image called execve.
pub const ENV_EXEC_NS: &str = "MOLT_CPR_EXEC_NS";
/// Set when the image is started to roll an update back; the value is the reason.
pub const ENV_ROLLBACK_REASON: &str = "MOLT_CPR_ROLLBACK_REASON";
/// Set when the guardian, not the original process, performs the rollback.
pub const ENV_TAKEOVER: &str = "MOLT_CPR_TAKEOVER";
/// PID of the process the guardian watches.
pub const ENV_GUARDIAN_PARENT: &str = "MOLT_CPR_GUARDIAN_PARENT";
/// The guardian's end of its socket to the old image.
pub const ENV_GUARDIAN_SOCK: &str = "MOLT_CPR_GUARDIAN_SOCK";
/// PID of the guardian (for the new image to dismiss it).
pub const ENV_GUARDIAN_PID: &str = "MOLT_CPR_GUARDIAN_PID";
/// First argument that makes molt run as a guardian.
pub const GUARDIAN_ARG: &str = "__cpr-guardian";
/// Record kind of a handoff.
pub const HANDOFF_KIND: &str = "molt-cpr-exec";

/// Every environment variable of the update protocol (removed from the environment the
/// guest's next binary or a child would otherwise inherit).
pub const PROTOCOL_ENV: &[&str] = &[
    ENV_RECORD_FD,
    ENV_PREVIOUS_EXE_FD,
    ENV_EXEC_NS,
    ENV_ROLLBACK_REASON,
    ENV_TAKEOVER,
    ENV_GUARDIAN_PARENT,
    ENV_GUARDIAN_PID,
    ENV_GUARDIAN_SOCK,
];

/// Errors refusing or failing an update in the old image (the guest keeps running there).
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The target binary is not usable.
    #[error("binary {0}: {1}")]
    BadTarget(PathBuf, &'static str),
    /// Another update is running.
    #[error("an update is already in progress")]
    Busy,
    /// Capturing the VM failed.
    #[error("capture failed: {0}")]
    Capture(String),
    /// Writing the record failed.
    #[error("cannot write the handoff record")]
    Record(#[source] cpr::RecordError),
    /// Creating the record memfd failed.
    #[error("cannot create the handoff memfd")]
    Memfd(#[source] cpr::MemfdError),
    /// Preserving fds failed.
    #[error("cannot preserve fds")]
    Fds(#[source] cpr::FdError),
    /// The guardian could not be started.
    #[error("cannot start the update guardian")]
    Guardian(#[source] std::io::Error),
    /// execve returned.
    #[error("execve {0} failed")]
    Exec(PathBuf, #[source] std::io::Error),
    /// Building the argument or environment vectors failed.
    #[error("invalid argument or environment string")]
    Nul,
}

/// Checks that `path` is an absolute path to an executable regular file, before anything is
/// paused.
pub fn validate_target(path: &Path) -> Result<PathBuf, UpdateError> {
    let bad = |why| Err(UpdateError::BadTarget(path.to_path_buf(), why));
    if !path.is_absolute() {
        return bad("not an absolute path");
    }
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(_) => return bad("does not exist"),
    };
    if meta.is_dir() {
        return bad("is a directory");
    }
    if !meta.is_file() {
        return bad("is not a regular file");
    }
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return bad("contains a NUL byte");
    };
    // SAFETY: `c` is a valid NUL-terminated path; access() only reads it.
    if unsafe { libc::access(c.as_ptr(), libc::X_OK) } != 0 {
        return bad("is not executable");
    }
    Ok(path.to_path_buf())
}

/// Phase timings of an update, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Phases {
    /// Stopping the vCPUs.
    pub pause: f64,
    /// Capturing state and writing the record.
    pub save: f64,
    /// From execve in the old image to `main` of the new one (guardian start included).
    pub exec: f64,
    /// Rebuilding the VM in the new image.
    pub restore: f64,
    /// Letting the vCPUs run again.
    pub resume: f64,
}

/// The report of one update, as the API returns it and `vm.info` keeps it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpdateReport {
    /// How long the guest was paused.
    pub pause_ms: f64,
    /// Where the time went.
    pub phases_ms: Phases,
    /// Version of the image that started the update.
    pub from_version: String,
    /// Version of the image now running the guest.
    pub to_version: String,
    /// Process id (unchanged by a successful update).
    pub pid: u32,
    /// Binary now running the guest.
    pub binary: PathBuf,
    /// Set when the update failed and the guest was resumed on the previous binary.
    pub rolled_back: Option<String>,
    /// Descriptor chains the guest had made available that the devices had not taken at the
    /// pause (posted receive buffers included): carried over in the queue state and used by
    /// the new image.
    pub carried_requests: u64,
}

/// Update bookkeeping kept across updates.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpdateHistory {
    /// Updates that completed on the new binary.
    pub updates: u64,
    /// Updates rolled back to the previous binary.
    pub rollbacks: u64,
    /// The last update's report.
    pub last: Option<UpdateReport>,
}
