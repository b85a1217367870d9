//! Live update (cpr-exec): the running molt replaces its own binary under a running guest,
//! keeping its PID. This module only sequences; the parts save and restore themselves
//! ([`crate::components`]), the machine is assembled on the same path as a boot
//! ([`crate::assembly`]), and the handoff's protocol is the `cpr` crate's.
//!
//! pause → save → hand over → restore → resume:
//!
//! 1. [`outgoing`] (old image): validate the target and start the safety nets; the event
//!    loop lets the guest run on for [`SETTLE`], then pause, capture the machine and
//!    save every part into a [`handoff::Handoff`] record, and hand it over with the [`exec`]
//!    transport. If that fails, everything is undone and the guest resumes here.
//! 2. [`incoming`] (new image, first thing in `main`): take the record and the inherited fds,
//!    restore, resume, dismiss the guardian, answer the waiting API request. If it cannot, it
//!    executes the previous binary (kept open as an fd), which restores the same record and
//!    reports a rollback.
//! 3. [`guardian`]: a small process holding copies of the preserved fds; if the new image
//!    dies (or hangs) before it resumes the guest, the guardian restores the guest on the
//!    previous binary.

pub mod awake;
pub mod early_vm;
pub mod exec;
pub mod guardian;
pub mod handoff;
pub mod holder;
pub mod incoming;
pub mod outgoing;
pub mod stand_in;
mod sys;
pub mod target;
pub mod transfer_in;
pub mod transfer_out;

use std::path::{Path, PathBuf};

use crate::api::{ApiResponse, ErrorReply};
use serde::{Deserialize, Serialize};

/// First argument that makes molt run as a guardian.
pub const GUARDIAN_ARG: &str = "__cpr-guardian";
/// Record kind of a handoff.
pub const HANDOFF_KIND: &str = "molt-cpr-exec";

/// Errors refusing or failing an update (the guest keeps running on the previous binary).
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The target binary is not usable.
    #[error("binary {0}: {1}")]
    BadTarget(PathBuf, &'static str),
    /// The target binary is not trusted (see [`target`]).
    #[error("binary {0} refused")]
    Untrusted(PathBuf, #[source] target::TargetError),
    /// The fd limit is too small for the new image to take the fds over.
    #[error(
        "RLIMIT_NOFILE {limit} is too small for a live update: {open} fds are open and the new \
         image needs about {needed} (raise the limit, e.g. with prlimit or LimitNOFILE=)"
    )]
    FdLimit {
        /// Fds open now.
        open: usize,
        /// What the update needs.
        needed: usize,
        /// The soft limit.
        limit: u64,
    },
    /// The VM is ending (a signal or `vm.shutdown` came first).
    #[error("the VM is ending ({0}); no update")]
    Ending(String),
    /// Another update is running.
    #[error("an update is already in progress")]
    Busy,
    /// Updates are requested through the API server; there is none.
    #[error("no API server")]
    NoApi,
    /// Pausing or capturing the VM failed.
    #[error("cannot capture the VM")]
    Capture(#[source] crate::Error),
    /// A part cannot be saved.
    #[error("cannot save the VMM's parts")]
    Save(#[source] crate::persist::PersistError),
    /// Encoding the record failed.
    #[error("cannot write the handoff record")]
    Record(#[source] cpr::RecordError),
    /// Creating the record memfd failed.
    #[error("cannot create the handoff memfd")]
    Memfd(#[source] cpr::MemfdError),
    /// Preserving fds failed.
    #[error("cannot preserve fds")]
    Fds(#[source] cpr::FdError),
    /// The commit page cannot be created.
    #[error("cannot create the handoff's commit page")]
    CommitPage(#[source] std::io::Error),
    /// The transfer to another process failed before it committed (the guest runs here).
    #[error("transfer to {0} failed")]
    Transfer(PathBuf, #[source] cpr::transfer::TransferError),
    /// The stand-in of a cpr-exec could not be started (the guest runs here).
    #[error("cannot start the stand-in")]
    StandInStart(#[source] std::io::Error),
    /// Handing the VM to the stand-in failed before it committed (the guest runs here).
    #[error("handing the VM to the stand-in (pid {0}) failed")]
    StandIn(u32, #[source] cpr::transfer::TransferError),
    /// The new image did not take the VM over from the stand-in, which runs the guest on.
    #[error("the new image {0} did not take the VM over; the guest runs on in the stand-in (pid {1}) on the previous binary")]
    NewImage(PathBuf, u32, #[source] cpr::transfer::TransferError),
    /// execve returned.
    #[error("cannot execute {0}")]
    Exec(PathBuf, #[source] cpr::ExecError),
    /// The new binary could not take over; the previous one resumed the guest.
    #[error("update to {target} failed: {reason}; the guest was resumed on the previous binary ({previous} {version})")]
    RolledBack {
        /// The binary that failed.
        target: PathBuf,
        /// Why it failed.
        reason: String,
        /// The binary running the guest now.
        previous: PathBuf,
        /// Its version.
        version: &'static str,
    },
}

impl UpdateError {
    /// The HTTP status answering this error.
    pub fn status(&self) -> u16 {
        match self {
            UpdateError::BadTarget(..) | UpdateError::Untrusted(..) => 400,
            UpdateError::Exec(_, cpr::ExecError::Nul) => 400,
            UpdateError::Busy | UpdateError::FdLimit { .. } | UpdateError::Ending(_) => 409,
            UpdateError::Transfer(..) | UpdateError::StandIn(..) | UpdateError::NewImage(..) => 502,
            _ => 500,
        }
    }
}

/// Checks that `path` is an absolute path to an executable regular file that molt may
/// execute ([`target::check`], under `allowed` if set), before anything is paused.
pub fn validate_target(path: &Path, allowed: Option<&Path>) -> Result<PathBuf, UpdateError> {
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
    if nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_err() {
        return bad("is not executable");
    }
    target::check(path, allowed).map_err(|e| UpdateError::Untrusted(path.to_path_buf(), e))?;
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
    /// How long the guest was paused, from the request to stop the vCPUs to the guest
    /// running again.
    pub pause_ms: f64,
    /// The stopped span: from all vCPUs stopped to the guest running again (`pause_ms` less
    /// the kick, the `pause` phase).
    pub stopped_ms: f64,
    /// When the pause began (the request to stop the vCPUs), in ns since the Unix epoch
    /// (`CLOCK_REALTIME`): lines the pause up with what a client or the guest saw.
    pub paused_at_ns: u64,
    /// When the guest ran again, in ns since the Unix epoch; in an update of several legs
    /// the first leg's pause began at `paused_at_ns` and the last one's ended here.
    pub resumed_at_ns: u64,
    /// `exec` (same process) or `transfer` (to a separately started process).
    pub mode: String,
    /// The process that ran the guest before.
    pub from_pid: u32,
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
    /// An update in more than one handover (a cpr-exec through a stand-in: to the stand-in,
    /// then from it to the new image, the guest running in between): each one's report. The
    /// figures above are their sums.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub legs: Vec<UpdateReport>,
}

impl UpdateReport {
    /// The report of an update whose last handover is `last`, after `earlier` ones: the
    /// pauses, their phases and the requests carried add up; who started it is the first
    /// leg's, the rest the last one's.
    pub fn of_legs(earlier: Vec<UpdateReport>, last: UpdateReport) -> UpdateReport {
        let Some(first) = earlier.first().cloned() else {
            return last;
        };
        let mut legs = earlier;
        legs.push(last.clone());
        let sum = |f: fn(&UpdateReport) -> f64| legs.iter().map(f).sum::<f64>();
        let phases_ms = Phases {
            pause: sum(|l| l.phases_ms.pause),
            save: sum(|l| l.phases_ms.save),
            exec: sum(|l| l.phases_ms.exec),
            restore: sum(|l| l.phases_ms.restore),
            resume: sum(|l| l.phases_ms.resume),
        };
        UpdateReport {
            pause_ms: sum(|l| l.pause_ms),
            stopped_ms: sum(|l| l.stopped_ms),
            paused_at_ns: first.paused_at_ns,
            mode: first.mode,
            from_pid: first.from_pid,
            phases_ms,
            from_version: first.from_version,
            carried_requests: legs.iter().map(|l| l.carried_requests).sum(),
            legs,
            ..last
        }
    }
}

/// How long the guest runs on between the update's preparation and its pause. Starting the
/// guardian (a clone and an exec of this binary) for a cpr-exec, or a transfer's receiver
/// building the machine, slows the guest's device backends while it runs: a vhost-user disk's
/// daemon woken on that CPU waits behind it. Paused at once, the guest would see that slowdown
/// and the pause as one stall; a few milliseconds apart, the requests it slowed complete before
/// the pause. The event loop serves the guest's devices and the API meanwhile.
pub const SETTLE: std::time::Duration = std::time::Duration::from_millis(4);

/// [`SETTLE`], or in the tests' build what `MOLT_TEST_SETTLE_MS` says (so that a test can
/// send requests while an update is prepared).
pub fn settle() -> std::time::Duration {
    #[cfg(feature = "test-next")]
    if let Some(ms) = std::env::var("MOLT_TEST_SETTLE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return std::time::Duration::from_millis(ms);
    }
    SETTLE
}

/// An update prepared while the guest runs, waiting for its pause ([`SETTLE`]).
pub enum Prepared {
    /// A cpr-exec: its safety nets run.
    Exec(outgoing::Prepared),
    /// A cpr-transfer: its receiver has built the machine.
    Transfer(transfer_out::Prepared),
}

impl Prepared {
    /// The update will not happen, because of `why`.
    pub fn dismiss(self, why: &str) {
        match self {
            Prepared::Exec(p) => p.dismiss(),
            Prepared::Transfer(p) => p.dismiss(why),
        }
    }

    /// Pauses the guest and hands it over for the request on `conn`. Returns only if the
    /// update failed (the guest runs on here); a transfer that committed exits the process.
    pub fn perform(
        self,
        vmm: &mut crate::runtime::Vmm,
        api: &mut crate::api::ApiServer,
        conn: crate::api::ConnId,
    ) -> Failed {
        match self {
            Prepared::Exec(p) => outgoing::perform_prepared(vmm, api, conn, p).into(),
            Prepared::Transfer(p) => transfer_out::perform_prepared(vmm, api, conn, p),
        }
    }
}

/// A live update that failed, the guest running on here.
#[derive(Debug)]
pub struct Failed {
    pub error: UpdateError,
    /// The report of the attempts that paused the guest before the failure (each a leg,
    /// `rolled_back` saying why), or `None` when none did.
    pub report: Option<UpdateReport>,
}

impl From<UpdateError> for Failed {
    fn from(error: UpdateError) -> Self {
        Self {
            error,
            report: None,
        }
    }
}

impl Failed {
    /// `error`, after the failed `attempts` (see [`Failed::report`]).
    pub fn after(error: UpdateError, mut attempts: Vec<UpdateReport>) -> Self {
        let report = attempts
            .pop()
            .map(|last| UpdateReport::of_legs(attempts, last));
        Self { error, report }
    }

    /// The answer to the request. When the guest was paused for it, a rollback: counted in
    /// `history` and reported as an update's.
    pub fn response(self, history: &mut UpdateHistory) -> ApiResponse {
        let error = crate::error_chain(&self.error);
        let status = self.error.status();
        match self.report {
            None => ApiResponse::error(status, error),
            Some(report) => {
                history.rollbacks += 1;
                history.last = Some(report.clone());
                let reply = ErrorReply {
                    error,
                    report: Some(report),
                };
                ApiResponse::json(status, &reply)
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn leg(from_pid: u32, pid: u32, kick: f64, stopped: f64) -> UpdateReport {
        UpdateReport {
            pause_ms: kick + stopped,
            stopped_ms: stopped,
            mode: "exec".into(),
            from_pid,
            phases_ms: Phases {
                pause: kick,
                save: stopped / 2.0,
                restore: stopped / 2.0,
                ..Phases::default()
            },
            from_version: format!("v{from_pid}"),
            to_version: format!("v{pid}"),
            pid,
            carried_requests: 1,
            paused_at_ns: u64::from(from_pid) * 1_000,
            resumed_at_ns: u64::from(from_pid) * 1_000 + 500,
            ..UpdateReport::default()
        }
    }

    #[test]
    fn an_update_in_two_legs_reports_their_sums_from_the_first_to_the_last() {
        let (first, last) = (leg(10, 20, 0.25, 0.5), leg(20, 10, 0.125, 0.25));
        let r = UpdateReport::of_legs(vec![first.clone()], last.clone());
        assert_eq!((r.pause_ms, r.stopped_ms), (1.125, 0.75));
        // From the first leg's pause to the last leg's resume.
        assert_eq!(
            (r.paused_at_ns, r.resumed_at_ns),
            (first.paused_at_ns, last.resumed_at_ns)
        );
        assert_eq!(r.phases_ms.pause, 0.375);
        assert_eq!(r.phases_ms.save + r.phases_ms.restore, 0.75);
        assert_eq!((r.from_pid, r.pid), (10, 10));
        assert_eq!(
            (r.from_version.as_str(), r.to_version.as_str()),
            ("v10", "v10")
        );
        assert_eq!(r.carried_requests, 2);
        assert_eq!(r.legs, vec![first, last.clone()]);
        // One leg is just that leg, with no list of legs in the JSON.
        let one = UpdateReport::of_legs(Vec::new(), last.clone());
        assert_eq!(one, last);
        assert!(serde_json::to_value(&one).unwrap().get("legs").is_none());
    }

    #[test]
    fn a_failure_reports_a_rollback_only_if_the_guest_was_paused_for_it() {
        let mut history = UpdateHistory::default();
        let refused = Failed::after(UpdateError::Busy, Vec::new());
        assert!(refused.report.is_none());
        let answer = refused.response(&mut history);
        assert!(answer.body.get("report").is_none(), "{:?}", answer.body);
        assert_eq!(history, UpdateHistory::default());

        let mut failed = leg(20, 20, 0.125, 0.25);
        failed.rolled_back = Some("the receiver refused".into());
        let attempts = vec![leg(10, 20, 0.25, 0.5), failed];
        let answer = Failed::after(UpdateError::Busy, attempts).response(&mut history);
        assert_eq!(answer.status, UpdateError::Busy.status());
        let report = &answer.body["report"];
        assert_eq!(report["pause_ms"], 1.125);
        assert_eq!(report["rolled_back"], "the receiver refused");
        assert_eq!(report["legs"].as_array().map(Vec::len), Some(2));
        assert_eq!((history.updates, history.rollbacks), (0, 1));
        assert_eq!(serde_json::to_value(&history.last).unwrap(), *report);
    }
}
