//! The update guardian: a small process (this binary, `molt __cpr-guardian`) that the old
//! image starts before it pauses the guest. Just before `execve` the old image hands it
//! copies of every preserved fd (guest RAM, the handoff record, sockets, disks) over a unix
//! socket. The new image dismisses it once the guest runs again. If instead the process dies
//! (or has not dismissed it within [`GUARDIAN_TIMEOUT`]), the guardian becomes the VMM: it
//! puts the fds back at the numbers the record names and executes the previous molt binary,
//! which restores the guest from the same record and reports the rollback.
//!
//! The guardian starts and ends at `SCHED_IDLE`: its start (an exec of this binary, a
//! millisecond or two of CPU right before the pause) and its exit (beside the resumed guest)
//! would otherwise hold a CPU the guest's vCPU or a device backend such as a vhost-user disk
//! needs: a freshly started process keeps its CPU for its first time slice while a woken
//! backend waits. It runs at molt's own policy if it is not ready within [`IDLE_START`] (the
//! CPUs are busy) and before it takes over; a molt that could not take its policy back
//! from `SCHED_IDLE` (no `CAP_SYS_NICE`, `RLIMIT_NICE` below 20) starts it at its own.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::Duration;

use cpr::{fdpass, ExecEnv, GuardianEnv};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use super::sys;
use super::GUARDIAN_ARG;
use crate::persist::FdRole;
use crate::sched::Policy;

/// The old image's handle on its guardian.
pub struct Guardian {
    child: Child,
    pidfd: OwnedFd,
    sock: OwnedFd,
}

impl Guardian {
    /// Starts the guardian; it holds nothing until [`Guardian::hand_over`].
    pub fn spawn() -> io::Result<Self> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        // The guardian's end is inherited (only by the guardian: we close it right after).
        sys::set_cloexec(&theirs, false)?;
        let env = GuardianEnv {
            parent: std::process::id() as i32,
            sock: theirs.as_raw_fd(),
        };
        // Its own process group: a Ctrl-C in molt's terminal must not kill the guardian
        // in the middle of an update.
        let command = || {
            let mut c = Command::new("/proc/self/exe");
            c.arg(GUARDIAN_ARG).envs(env.vars()).process_group(0);
            c
        };
        let vmm_policy = Policy::of(std::process::id() as i32);
        let mut child = spawn_idle(&command)?;
        drop(theirs);
        let pid = child.id() as i32;
        let pidfd = sys::pidfd_open(pid).and_then(|fd| {
            wait_ready(&ours, || match vmm_policy.and_then(|p| p.apply(pid)) {
                Ok(()) => log::debug!("the update guardian starts at molt's priority"),
                Err(e) => log::debug!("the update guardian stays at SCHED_IDLE: {e}"),
            })?;
            Ok(fd)
        });
        let pidfd = match pidfd {
            Ok(fd) => fd,
            Err(e) => {
                let _ = child.kill();
                return Err(e);
            }
        };
        Ok(Self {
            child,
            pidfd,
            sock: ours,
        })
    }

    /// A pidfd of the guardian (the next image dismisses it through it).
    pub fn pidfd(&self) -> &OwnedFd {
        &self.pidfd
    }

    /// Gives the guardian copies of `fds` with their names and numbers in this process.
    pub fn hand_over(&self, fds: &[(String, RawFd)]) -> io::Result<()> {
        let text: String = fds.iter().map(|(n, fd)| format!("{n}={fd}\n")).collect();
        let raw: Vec<RawFd> = fds.iter().map(|(_, fd)| *fd).collect();
        fdpass::send(&self.sock, text.as_bytes(), &raw)
    }

    /// The update did not happen: the guardian goes (the kernel reaps it).
    pub fn dismiss(mut self) {
        let _ = self.child.kill();
    }
}

/// Starts `command()` at `SCHED_IDLE` from a thread of its own (the child inherits the
/// thread's policy from its first instruction; the caller's policy stays as it is), when
/// molt may raise it again (the guardian takes molt's policy back before it takes over);
/// otherwise at molt's policy.
fn spawn_idle(command: &(dyn Fn() -> Command + Sync)) -> io::Result<Child> {
    if !Policy::idle_is_undoable() {
        return command().spawn();
    }
    std::thread::scope(|s| {
        let starter = std::thread::Builder::new().spawn_scoped(s, || {
            if let Err(e) = Policy::IDLE.apply(0) {
                log::debug!("the update guardian starts at molt's priority: {e}");
            }
            command().spawn()
        });
        match starter {
            Ok(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the thread starting it panicked"))),
            // No thread to spare: at molt's policy, from this one.
            Err(_) => command().spawn(),
        }
    })
}

/// How long the guardian may take to start.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long it starts on idle CPU time only; then `busy` raises it.
const IDLE_START: Duration = Duration::from_millis(20);

/// Waits for the guardian's "ready" byte, calling `busy` once if it is not there within
/// [`IDLE_START`]. Starting it (an exec of this binary) costs milliseconds of CPU; the
/// pause waits for them, so they are not taken from the guest's devices (a vhost-user
/// backend, the event loop) right before or inside the pause.
fn wait_ready(sock: &OwnedFd, busy: impl FnOnce()) -> io::Result<()> {
    let ready = sys::wait_readable(sock, IDLE_START)? || {
        busy();
        sys::wait_readable(sock, READY_TIMEOUT)?
    };
    if !ready {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("not started after {} s", READY_TIMEOUT.as_secs()),
        ));
    }
    let mut byte = [0u8; 1];
    match nix::unistd::read(sock, &mut byte)? {
        1 => Ok(()),
        _ => Err(io::Error::other("it ended as it started")),
    }
}

/// How long the new image has to resume the guest before the guardian takes over.
pub const GUARDIAN_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits for the process behind `parent` to exit, killing it if it has not resumed the guest
/// in time; returns why the guardian should take over, or why it must not.
fn watch(parent: &OwnedFd, pid: i32) -> Result<String, String> {
    let cannot = |e: io::Error| format!("cannot watch process {pid}: {e}");
    if sys::wait_readable(parent, GUARDIAN_TIMEOUT).map_err(cannot)? {
        return Ok("the new binary exited before it resumed the guest".into());
    }
    sys::kill_pidfd(parent).map_err(cannot)?;
    if !sys::wait_readable(parent, Duration::from_secs(5)).map_err(cannot)? {
        return Err(format!("process {pid} does not die"));
    }
    Ok(format!(
        "the new binary did not resume the guest within {} s and was killed",
        GUARDIAN_TIMEOUT.as_secs()
    ))
}

/// Entry point of `molt __cpr-guardian`; returns the exit code when it does not take over.
pub fn main() -> i32 {
    let Some(env) = GuardianEnv::take() else {
        eprintln!("molt: error: the update guardian is started by molt itself");
        return 2;
    };
    // SAFETY: the socket fd was inherited from the parent for this process alone.
    let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(env.sock) };
    // The VMM's policy, which the guardian takes back before it becomes the VMM (it starts
    // at SCHED_IDLE).
    let vmm_policy = Policy::of(env.parent);
    // Watch the parent through a pidfd taken while it is still our parent: never a pid that
    // may have been recycled.
    let parent = match sys::pidfd_open(env.parent) {
        Ok(fd) if nix::unistd::getppid().as_raw() == env.parent => fd,
        _ => {
            eprintln!("molt: guardian: process {} is gone already", env.parent);
            return 1;
        }
    };
    if nix::unistd::write(&sock, &[1]).is_err() {
        return 0;
    }
    // Nothing to guard until the parent hands the fds over; end of stream means the update
    // was abandoned.
    let (text, fds) = match fdpass::recv(&sock) {
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
    let fds: Vec<(String, RawFd, OwnedFd)> = names
        .into_iter()
        .zip(fds)
        .map(|((n, at), fd)| (n, at, fd))
        .collect();
    let reason = match watch(&parent, env.parent) {
        Ok(r) => r,
        Err(why) => {
            eprintln!("molt: guardian: {why}; not taking over");
            return 1;
        }
    };
    if let Err(why) = still_open(&fds) {
        eprintln!("molt: update guardian: {reason}, but {why}");
        return 1;
    }
    eprintln!("molt: update guardian: {reason}; restoring the guest on the previous binary");
    if let Err(e) = vmm_policy.and_then(|p| p.apply(0)) {
        eprintln!("molt: guardian: cannot take molt's scheduling policy back: {e}");
    }
    take_over(&reason, fds)
}

/// Whether the handoff is still open: a new image that committed owned the guest when it
/// died, and the record predates what the guest did since.
fn still_open(fds: &[(String, RawFd, OwnedFd)]) -> Result<(), String> {
    let role = FdRole::Commit.to_string();
    let Some((_, _, fd)) = fds.iter().find(|(n, _, _)| *n == role) else {
        return Err("the handover has no commit page; nothing is restored".into());
    };
    let page = fd
        .try_clone()
        .and_then(cpr::CommitPage::from_fd)
        .map_err(|e| format!("its commit page is unusable ({e}); nothing is restored"))?;
    // The process that could have committed is dead (the guardian waited for its exit):
    // an open page stays open, and the previous binary commits it when it resumes the guest.
    match page.owner() {
        None => Ok(()),
        Some(owner) => Err(format!(
            "process {owner} had taken the guest over: the VM is lost with it (nothing is \
             restored from the record taken before the update)"
        )),
    }
}

/// Puts each fd at the number it had in the old image, then executes the previous binary.
fn take_over(reason: &str, fds: Vec<(String, RawFd, OwnedFd)>) -> i32 {
    let placed = match sys::place_at_numbers(fds) {
        Ok(p) => p,
        Err((name, e)) => {
            eprintln!("molt: guardian: cannot restore fd {name}: {e}");
            return 1;
        }
    };
    let find = |role: FdRole| {
        let name = role.to_string();
        placed.iter().find(|(n, _)| *n == name).map(|(_, at)| *at)
    };
    let (Some(record), Some(exe)) = (find(FdRole::Record), find(FdRole::PreviousExe)) else {
        eprintln!("molt: guardian: the handover lacks the record or the previous binary");
        return 1;
    };
    let env = ExecEnv {
        record_fd: record,
        previous_exe_fd: Some(exe),
        exec_ns: None,
        rollback: Some(reason.into()),
        takeover: true,
        guardian_pidfd: None,
        commit_fd: find(FdRole::Commit),
    };
    super::incoming::exec_previous(&env, exe)
}
