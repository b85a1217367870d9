//! The new image's side of a live update: take the record and the inherited fds, restore
//! every part and the machine on the same assembly path as a boot, resume, dismiss the
//! guardian and answer the waiting request. If that fails, execute the previous binary
//! (inherited as an fd), which restores the same record.

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use cpr::{CommitPage, ExecEnv, Received, ReceivedFds};

use super::early_vm::{EarlyVm, Job};
use super::handoff::{record_argv, Handoff};
use super::{Phases, UpdateError, UpdateReport, HANDOFF_KIND};
use crate::api::{ApiResponse, ErrorReply};
use crate::assembly::{assemble, MachineSource, Runtime};
use crate::components;
use crate::fault::{self, Step};
use crate::persist::RestoreFds;
use crate::state::now_ns;

/// Errors restoring in the new image (they lead to a rollback).
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    /// The record cannot be read.
    #[error("cannot read the handoff record")]
    Read(#[source] cpr::MemfdError),
    /// The record cannot be decoded.
    #[error("cannot decode the handoff record")]
    Decode(#[source] cpr::RecordError),
    /// The inherited fds do not match the record.
    #[error("the inherited fds do not match the record")]
    Fds(#[source] cpr::FdError),
    /// The handoff was taken back (aborted) before this image could commit it.
    #[error("the handoff was taken back before this image could commit it")]
    TakenBack,
    /// Fds the record lists that no part took.
    #[error("the record hands over fds no part claims: {0:?}")]
    Unclaimed(Vec<String>),
    /// Rebuilding the VMM failed.
    #[error("cannot rebuild the VMM")]
    Vmm(#[from] crate::Error),
    /// A fault injected by the tests' "next version" build.
    #[cfg(feature = "test-next")]
    #[error("injected fault: {0}")]
    Injected(String),
}

/// Fault injection of the tests' "next version" build: `MOLT_TEST_FAULT` = `panic` (panic
/// while restoring), `error` (a startup error), `major` (the record's major version is one
/// this image does not read), `exit` (die before restoring).
#[cfg(feature = "test-next")]
fn inject_fault(bytes: &mut [u8]) -> Result<(), IncomingError> {
    // `<step>:<kind>` faults are injected by `crate::fault` at their step.
    match std::env::var("MOLT_TEST_FAULT").as_deref() {
        Ok("panic") => panic!("injected panic while restoring"),
        Ok("error") => Err(IncomingError::Injected("startup error".into())),
        Ok("exit") => std::process::exit(3),
        Ok("major") => {
            // What an image that reads only another major version sees.
            if let Some(b) = bytes.get_mut(8) {
                *b = 99;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Whether this process was started by a live update (the protocol's variables are removed
/// from the environment: children must not inherit them).
pub fn detect() -> Option<ExecEnv> {
    ExecEnv::take()
}

fn record_bytes(record_fd: RawFd) -> Result<Vec<u8>, cpr::MemfdError> {
    // SAFETY: the record fd number comes from the previous image, which kept it open across
    // exec; it is only borrowed for reading here and stays open for a rollback.
    cpr::read_record(unsafe { BorrowedFd::borrow_raw(record_fd) })
}

/// The handoff's commit page, from the number the environment names (a duplicate: the
/// original stays for a rollback).
fn commit_page(env: &ExecEnv) -> Option<CommitPage> {
    let fd = env.commit_fd?;
    // SAFETY: the number was inherited for this process and stays open (it is only borrowed
    // to duplicate it).
    let original = unsafe { BorrowedFd::borrow_raw(fd) };
    match original.try_clone_to_owned().and_then(CommitPage::from_fd) {
        Ok(page) => Some(page),
        Err(e) => {
            log::error!("the handoff's commit page is unusable: {e}");
            None
        }
    }
}

/// Restores the VM handed over by exec, building the KVM VM on `early` if it was started. On
/// failure, the reason (a rollback follows, unless the handoff was committed).
pub fn restore(env: &ExecEnv, started: Instant, early: Option<EarlyVm>) -> Result<Runtime, String> {
    let main_ns = now_ns();
    let Some(commit) = commit_page(env) else {
        return Err("the handoff has no usable commit page".into());
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        take_over(env, &commit, (main_ns, started), early)
    }));
    match result {
        Ok(Ok(runtime)) => Ok(runtime),
        Ok(Err(e)) => Err(crate::error_chain(&e)),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(format!("panic while restoring: {msg}"))
        }
    }
}

fn take_over(
    env: &ExecEnv,
    commit: &CommitPage,
    (main_ns, started): (u64, Instant),
    early: Option<EarlyVm>,
) -> Result<Runtime, IncomingError> {
    #[allow(unused_mut)]
    let mut bytes = record_bytes(env.record_fd).map_err(IncomingError::Read)?;
    #[cfg(feature = "test-next")]
    inject_fault(&mut bytes)?;
    fault::inject(Step::Record)?;
    #[cfg(feature = "test-next")]
    if std::env::var("MOLT_TEST_FAULT").as_deref() == Ok("kill-guardian") {
        if let Some(fd) = env.guardian_pidfd {
            // SAFETY: the inherited pidfd is only borrowed for the signal.
            let _ = super::sys::kill_pidfd(unsafe { BorrowedFd::borrow_raw(fd) });
        }
    }
    let h = cpr::decode_kind::<Handoff>(&bytes, HANDOFF_KIND)
        .map_err(IncomingError::Decode)?
        .state;
    if let Some(exec_ns) = env.exec_ns {
        log::debug!(
            "old image (µs): save to execve {}; new image: record decoded {} after main",
            exec_ns.saturating_sub(h.update.saved_at_ns) / 1000,
            now_ns().saturating_sub(main_ns) / 1000
        );
    }
    #[cfg(feature = "test-next")]
    log::info!("record extra field from the next build: {:?}", h.next_only);
    let received = Received {
        record: bytes,
        fds: ReceivedFds::AtNumbers,
    };
    // SAFETY: the fds the record lists were preserved across exec by the previous image for
    // this one, and nothing in this process has taken them.
    let inherited = unsafe { received.inherited(&h.fds) }.map_err(IncomingError::Fds)?;
    let mut fds = RestoreFds::new(inherited);
    let ram = components::restore_ram(&h.parts, &mut fds)?;
    // The builder registers RAM and creates the vCPUs while this thread restores the rest.
    let builder = match early {
        Some(e) => {
            e.build(Job {
                ram,
                vcpus: h.vm.vcpus.len(),
                identities: h.vm.vcpus.iter().map(|v| v.identity()).collect(),
                seccomp: h.config.seccomp,
            });
            Ok(e)
        }
        None => Err(ram),
    };
    let (parts, api) = components::restore_parts(&h.parts, &h.config, &mut fds)?;
    let unclaimed = fds.unclaimed();
    if !unclaimed.is_empty() {
        return Err(IncomingError::Unclaimed(unclaimed));
    }
    let book = h.book.taken_over();
    // Each vCPU thread on a CPU of its own for the rest of the pause, as a transfer's
    // receiver does ([`crate::affinity`]).
    let mut spread = crate::affinity::Spread::default();
    let source = match builder {
        Ok(e) => {
            let (kvm, prebuilt) = e.finish()?;
            spread = prebuilt.wake();
            MachineSource::RestoreInto {
                state: &h.vm,
                prebuilt,
                kvm,
            }
        }
        Err(ram) => MachineSource::Restore { state: &h.vm, ram },
    };
    let mut runtime = assemble(h.config.clone(), parts, source, book, started)?;
    // Restore runs from this image's main() to the rebuilt, still paused machine.
    let restore_ms = now_ns().saturating_sub(main_ns) as f64 / 1e6;
    fault::inject(Step::BeforeResume)?;
    let resume_from_ns = now_ns();
    take_ownership(commit, &mut runtime)?;
    // The pause ends when the last vCPU is back in the guest.
    let resumed_ns = if h.update.was_paused {
        now_ns()
    } else {
        runtime.vmm.resume_confirmed()?
    };
    // The old image's request ends with the holder, once it sees the commit.
    runtime.awake = super::awake::CpusAwake::after_resume();
    let resume_ms = resumed_ns.saturating_sub(resume_from_ns) as f64 / 1e6;
    spread.undo();
    fault::inject(Step::AfterResume)?;
    rebuild_api(&mut runtime, api);
    let phases = h.update.phases(main_ns, restore_ms, resume_ms);
    dismiss_guardian(env);
    finish(&h, &mut runtime, phases, resumed_ns, env.rollback.clone());
    // Off the pause: only a warning.
    warn_about_ignored_options(&h.config);
    // The guest runs here now: let go of the inherited originals.
    fds.release_originals();
    close_original(env.record_fd);
    for fd in [env.previous_exe_fd, env.commit_fd].into_iter().flatten() {
        close_original(fd);
    }
    Ok(runtime)
}

/// The commit point: from here on this image owns the guest, nothing may restore the record
/// any more, and the socket paths are this image's to remove when it ends.
pub(super) fn take_ownership(
    commit: &CommitPage,
    runtime: &mut Runtime,
) -> Result<(), IncomingError> {
    if !commit.try_commit(std::process::id()) {
        return Err(IncomingError::TakenBack);
    }
    if let Some(api) = runtime.api.as_mut() {
        api.set_remove_on_drop(true);
    }
    runtime.vmm.serial_out().set_remove_on_drop(true);
    Ok(())
}

/// Rebuilds the API server taken over, once the guest runs again: it serves the socket path
/// from here on. If that fails, the guest runs on without an API socket.
pub(super) fn rebuild_api(runtime: &mut Runtime, api: Option<crate::api::ApiTakeover>) {
    let Some(api) = api else {
        return;
    };
    match api.into_server() {
        Ok(mut server) => {
            server.set_remove_on_drop(true);
            runtime.api = Some(server);
        }
        Err(e) => log::error!(
            "the API server cannot be rebuilt after the update; the guest runs on without \
             an API socket: {}",
            crate::error_chain(&e)
        ),
    }
}

/// Closes an fd the previous image passed by number, once no rollback can need it.
fn close_original(fd: RawFd) {
    // SAFETY: `fd` was inherited for this process, which never wrapped it elsewhere (it only
    // borrowed it or worked on duplicates).
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
}

/// Ends the guardian of an exec handoff (not when the guardian itself took over).
fn dismiss_guardian(env: &ExecEnv) {
    if let Some(fd) = env.guardian_pidfd.filter(|_| !env.takeover) {
        // SAFETY: the guardian's pidfd was inherited for this process, which owns it from
        // here on. The kernel reaps the guardian: molt ignores SIGCHLD.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
        if let Err(e) = super::sys::kill_pidfd(&pidfd) {
            log::warn!("cannot dismiss the update guardian: {e}");
        }
    }
}

/// The report of the handoff `h` whose guest runs again here since `resumed_ns`.
pub(super) fn leg_report(
    h: &Handoff,
    vmm: &crate::runtime::Vmm,
    phases_ms: Phases,
    resumed_ns: u64,
    rollback: Option<String>,
) -> UpdateReport {
    let pause_ms = resumed_ns.saturating_sub(h.update.paused_at_ns) as f64 / 1e6;
    UpdateReport {
        pause_ms,
        stopped_ms: pause_ms - phases_ms.pause,
        paused_at_ns: h.update.paused_at_ns,
        resumed_at_ns: resumed_ns,
        mode: h.update.mode.clone(),
        from_pid: h.update.from_pid,
        phases_ms,
        from_version: h.update.from_version.clone(),
        to_version: crate::VERSION.to_string(),
        pid: std::process::id(),
        binary: vmm.identity.exe.clone(),
        rolled_back: rollback,
        carried_requests: h.update.carried_requests,
        legs: Vec::new(),
    }
}

/// The guest runs: writes the report into the history and answers the request that started
/// the handoff (`rollback` says why the guest runs on the previous binary, if it does).
pub(super) fn finish(
    h: &Handoff,
    runtime: &mut Runtime,
    phases_ms: Phases,
    resumed_ns: u64,
    rollback: Option<String>,
) {
    let vmm = &mut runtime.vmm;
    if vmm.config().memory.prefault {
        vmm.populate_in_background();
    }
    let last = leg_report(h, vmm, phases_ms, resumed_ns, rollback.clone());
    let report = UpdateReport::of_legs(h.update.earlier.clone(), last);
    match rollback {
        None => vmm.history.updates += 1,
        Some(_) => vmm.history.rollbacks += 1,
    }
    vmm.history.last = Some(report.clone());
    log::info!(
        "live update done: guest paused {:.3} ms ({:?})",
        report.pause_ms,
        report.phases_ms
    );
    let response = match &rollback {
        None => ApiResponse::json(200, &report),
        Some(reason) => {
            let err = UpdateError::RolledBack {
                target: h.update.target.clone(),
                reason: reason.clone(),
                previous: vmm.identity.exe.clone(),
                version: crate::VERSION,
            };
            let reply = ErrorReply {
                error: err.to_string(),
                report: Some(report),
            };
            ApiResponse::json(err.status(), &reply)
        }
    };
    if let Some(api) = runtime.api.as_mut() {
        if let Some(waiting) = h.parts.api.as_ref().and_then(|a| a.waiting) {
            api.respond(waiting, response);
        }
        api.end_handoff();
    }
}

/// Executes the previous binary with the same record; returns the exit code only if that is
/// impossible.
pub fn roll_back(env: &ExecEnv, reason: &str) -> i32 {
    if let Some(owner) = commit_page(env).and_then(|c| c.owner()) {
        eprintln!(
            "molt: error: the VM was lost: {reason} after process {owner} had taken the guest \
             over; nothing is restored from the record taken before the update"
        );
        return 1;
    }
    if let Some(first) = &env.rollback {
        eprintln!(
            "molt: error: cannot restore the guest after a failed update ({first}): {reason}"
        );
        return 1;
    }
    let Some(exe) = env.previous_exe_fd else {
        eprintln!("molt: error: update failed ({reason}) and no previous binary is known");
        return 1;
    };
    log::error!("update failed: {reason}; rolling back to the previous binary");
    let next = ExecEnv {
        rollback: Some(reason.to_string()),
        ..env.clone()
    };
    exec_previous(&next, exe)
}

/// Executes the previous binary (open at `exe`) with `env`; returns only on failure, with the
/// exit code. Its argv is the one the VM was started with; if the record cannot be read here,
/// the previous binary still reads it and needs no argv.
pub fn exec_previous(env: &ExecEnv, exe: RawFd) -> i32 {
    let argv = record_bytes(env.record_fd)
        .ok()
        .and_then(|b| record_argv(&b))
        .unwrap_or_else(|| vec!["molt".to_string()]);
    // SAFETY: `exe` is the previous binary's fd, inherited for this purpose and still open.
    let exe_fd = unsafe { BorrowedFd::borrow_raw(exe) };
    let vars = env.apply(cpr::exec::clean_env());
    let Err(e) = cpr::exec::exec_fd(exe_fd, &argv, vars);
    // (No launcher is needed here: a rollback happens before this image filters any thread
    // that executes.)
    eprintln!(
        "molt: error: the rollback to the previous binary failed: {}",
        crate::error_chain(&e)
    );
    1
}

/// The record describes the VM; options on this image's command line that describe another
/// VM are ignored, with a warning naming them.
fn warn_about_ignored_options(running: &crate::config::VmConfig) {
    use clap::Parser;
    let Ok(cli) = crate::cli::Cli::try_parse_from(std::env::args()) else {
        return;
    };
    let asked = cli.vm.vm_config();
    let differs = [
        (asked.memory != running.memory, "--memory"),
        (asked.cpus != running.cpus, "--cpus"),
        (
            asked.kernel != running.kernel || asked.cmdline != running.cmdline,
            "--kernel/--cmdline",
        ),
        (
            asked.disks != running.disks || asked.nets != running.nets || asked.rng != running.rng,
            "--disk/--net/--rng",
        ),
        (
            asked.serial != running.serial || asked.api_socket != running.api_socket,
            "--serial/--api-socket",
        ),
        (
            asked.seccomp != running.seccomp
                || asked
                    .update_binaries
                    .as_deref()
                    .map(super::target::canonical_or_same)
                    != running.update_binaries,
            "--seccomp/--update-binaries",
        ),
    ];
    let ignored: Vec<&str> = differs
        .iter()
        .filter(|(d, _)| *d)
        .map(|(_, n)| *n)
        .collect();
    if !ignored.is_empty() {
        log::warn!(
            "live update: ignoring {} on the new command line: the running VM keeps its own",
            ignored.join(", ")
        );
    }
}
