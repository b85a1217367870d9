//! The new image's side of cpr-exec: rebuild the VM from the handoff record and the inherited
//! fds, resume it, dismiss the guardian and answer the waiting request. If that fails, exec
//! the previous binary (inherited as an fd), which restores the same record.

use std::fs::File;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::adopt::{self, Inherited};
use super::guardian::exec_fd;
use super::handoff::{fd_names, Handoff};
use super::{
    Phases, UpdateReport, ENV_EXEC_NS, ENV_GUARDIAN_PID, ENV_PREVIOUS_EXE_FD, ENV_RECORD_FD,
    ENV_ROLLBACK_REASON, ENV_TAKEOVER, HANDOFF_KIND, PROTOCOL_ENV,
};
use crate::api::ApiResponse;
use crate::control::{self, Control};
use crate::exit::{ExitNotifier, VmExit};
use crate::machine::{Machine, Shared};
use crate::memory::RamRegion;
use crate::runtime::{Identity, Restored, Vmm};
use crate::state::now_ns;
use crate::virtio::Virtio;

/// What the previous image passed in the environment.
#[derive(Debug, Clone)]
pub struct Incoming {
    record_fd: RawFd,
    previous_exe_fd: Option<RawFd>,
    exec_ns: Option<u64>,
    rollback: Option<String>,
    takeover: bool,
    guardian_pid: Option<i32>,
}

/// Errors restoring in the new image (they lead to a rollback).
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    /// The record cannot be read.
    #[error("cannot read the handoff record")]
    Read(#[source] cpr::MemfdError),
    /// The record cannot be decoded.
    #[error("cannot decode the handoff record")]
    Decode(#[source] cpr::RecordError),
    /// A preserved fd is missing or unusable.
    #[error("preserved fd {0} ({1}) is not usable")]
    Fd(RawFd, String, #[source] std::io::Error),
    /// An fd named in the record is absent.
    #[error("the record names no fd '{0}'")]
    MissingFd(String),
    /// Rebuilding the VM failed.
    #[error(transparent)]
    Vmm(#[from] crate::Error),
    /// Rebuilding the virtio devices failed.
    #[error(transparent)]
    Virtio(#[from] crate::virtio::VirtioSetupError),
    /// A fault injected by the tests' "next version" build.
    #[cfg(feature = "test-next")]
    #[error("injected fault: {0}")]
    Injected(String),
}

/// Fault injection of the tests' "next version" build: `MOLT_TEST_FAULT` = `panic` (panic
/// while restoring), `error` (a startup error), `major` (the record's major version is one
/// this image does not read), `exit` (die before restoring).
#[cfg(feature = "test-next")]
mod test_fault {
    use super::IncomingError;

    pub fn inject(bytes: &mut [u8]) -> Result<(), IncomingError> {
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
}

fn env_parse<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Whether this process was started by a live update; removes the protocol's variables from
/// the environment (children must not inherit them).
pub fn detect() -> Option<Incoming> {
    let record_fd = env_parse(ENV_RECORD_FD)?;
    let inc = Incoming {
        record_fd,
        previous_exe_fd: env_parse(ENV_PREVIOUS_EXE_FD),
        exec_ns: env_parse(ENV_EXEC_NS),
        rollback: std::env::var(ENV_ROLLBACK_REASON).ok(),
        takeover: std::env::var(ENV_TAKEOVER).is_ok(),
        guardian_pid: env_parse(ENV_GUARDIAN_PID),
    };
    for v in PROTOCOL_ENV {
        std::env::remove_var(v);
    }
    Some(inc)
}

/// Restores the VM and runs it; returns the process exit code.
pub fn run(inc: Incoming, started: Instant) -> i32 {
    let main_ns = now_ns();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        restore(&inc, main_ns, started)
    }));
    let reason = match result {
        Ok(Ok(control)) => {
            let end = control.run();
            return match end {
                VmExit::Error(e) => {
                    eprintln!("molt: error: {e}");
                    1
                }
                end => {
                    log::info!("{end}");
                    end.exit_code()
                }
            };
        }
        Ok(Err(e)) => crate::error_chain(&e),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            format!("panic while restoring: {msg}")
        }
    };
    roll_back(&inc, &reason)
}

/// The argv the VM was started with, from the record in `fd` (to start the previous binary
/// with the same command line on a rollback).
pub fn record_argv(fd: RawFd) -> Option<Vec<String>> {
    // SAFETY: `fd` is the inherited record memfd, only borrowed for reading.
    let bytes = cpr::read_record(unsafe { BorrowedFd::borrow_raw(fd) }).ok()?;
    let argv = cpr::decode_kind::<Handoff>(&bytes, HANDOFF_KIND)
        .ok()?
        .state
        .argv;
    (!argv.is_empty()).then_some(argv)
}

/// Executes the previous binary with the same record; returns only if that is impossible.
fn roll_back(inc: &Incoming, reason: &str) -> i32 {
    if let Some(first) = &inc.rollback {
        eprintln!(
            "molt: error: cannot restore the guest after a failed update ({first}): {reason}"
        );
        return 1;
    }
    let Some(exe) = inc.previous_exe_fd else {
        eprintln!("molt: error: update failed ({reason}) and no previous binary is known");
        return 1;
    };
    log::error!("update failed: {reason}; rolling back to the previous binary");
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    env.push((ENV_RECORD_FD.into(), inc.record_fd.to_string()));
    env.push((ENV_PREVIOUS_EXE_FD.into(), exe.to_string()));
    env.push((ENV_ROLLBACK_REASON.into(), reason.to_string()));
    if let Some(pid) = inc.guardian_pid {
        env.push((ENV_GUARDIAN_PID.into(), pid.to_string()));
    }
    if inc.takeover {
        env.push((ENV_TAKEOVER.into(), "1".into()));
    }
    if let Some(ns) = inc.exec_ns {
        env.push((ENV_EXEC_NS.into(), ns.to_string()));
    }
    // The previous binary's argv is the one the VM was started with; if this image cannot
    // read the record, the previous binary still reads it and does not need argv.
    let argv = record_argv(inc.record_fd).unwrap_or_else(|| vec!["molt".to_string()]);
    let err = exec_fd(exe, &argv, &env);
    eprintln!("molt: error: update failed ({reason}) and the rollback failed: {err}");
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
    let mut ignored = Vec::new();
    if asked.memory != running.memory {
        ignored.push("--memory");
    }
    if asked.cpus != running.cpus {
        ignored.push("--cpus");
    }
    if asked.kernel != running.kernel || asked.cmdline != running.cmdline {
        ignored.push("--kernel/--cmdline");
    }
    if asked.disks != running.disks || asked.nets != running.nets || asked.rng != running.rng {
        ignored.push("--disk/--net/--rng");
    }
    if asked.serial != running.serial || asked.api_socket != running.api_socket {
        ignored.push("--serial/--api-socket");
    }
    if !ignored.is_empty() {
        log::warn!(
            "live update: ignoring {} on the new command line: the running VM keeps its own",
            ignored.join(", ")
        );
    }
}

fn restore(inc: &Incoming, main_ns: u64, started: Instant) -> Result<Control, IncomingError> {
    // SAFETY: the record fd number comes from the previous image, which kept it open across
    // exec; it is only borrowed for reading here.
    let record_fd = unsafe { BorrowedFd::borrow_raw(inc.record_fd) };
    #[allow(unused_mut)]
    let mut bytes = cpr::read_record(record_fd).map_err(IncomingError::Read)?;
    #[cfg(feature = "test-next")]
    test_fault::inject(&mut bytes)?;
    let record =
        cpr::decode_kind::<Handoff>(&bytes, HANDOFF_KIND).map_err(IncomingError::Decode)?;
    let h = record.state;
    warn_about_ignored_options(&h.config);
    #[cfg(feature = "test-next")]
    log::info!("record extra field from the next build: {:?}", h.next_only);
    let mut fds = Inherited::dup_all(&h.fds)?;
    let regions =
        h.vm.memory
            .iter()
            .map(|m| {
                Ok(RamRegion {
                    guest_addr: m.guest_addr,
                    size: m.size,
                    memfd: File::from(fds.take(&m.memfd)?),
                    hugepages: m.hugepages,
                })
            })
            .collect::<Result<Vec<_>, IncomingError>>()?;
    // Disk images and taps come from the preserved fds, never reopened.
    let virtio_backing: Vec<Option<File>> = (0..h.vm.virtio.len())
        .map(|i| fds.take_optional(&fd_names::virtio(i)).map(File::from))
        .collect();
    let (serial_out, serial_in) = adopt::serial_backend(&h.config.serial, &mut fds)?;
    let event_err = |e: std::io::Error| crate::Error::EventLoop(e.to_string());
    let shared = Shared {
        exits: Arc::new(ExitNotifier::new().map_err(event_err)?),
        serial_drained: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(event_err)?,
        bus: Arc::default(),
        serial_counters: Arc::default(),
        started,
        virtio: Arc::new(Virtio::open(&h.config, Some(virtio_backing))?),
    };
    let serial_listener = serial_in.listener_fd();
    let em = control::event_loop(&shared, serial_in)?;
    let kvm = crate::vm::open_kvm().map_err(crate::Error::from)?;
    let out = serial_out.try_clone().map_err(crate::Error::SerialClone)?;
    let machine = Machine::restore(&kvm, &h.vm, regions, out, &shared)?;
    // Restore runs from this image's main() to the rebuilt, still paused machine.
    let restore_ms = now_ns().saturating_sub(main_ns) as f64 / 1e6;
    if let Some(ns) = inc.exec_ns {
        log::debug!(
            "execve to main: {:.3} ms",
            main_ns.saturating_sub(ns) as f64 / 1e6
        );
    }
    let mut identity = Identity::current();
    identity.argv = h.argv.clone();
    identity.booted_at_ns = h.booted_at_ns;
    let api = h
        .api
        .as_ref()
        .map(|a| adopt::api_server(a, &mut fds))
        .transpose()?;
    let mut vmm = Vmm::from_restored(
        kvm,
        Restored {
            machine,
            config: h.config.clone(),
            serial_out,
            serial_listener,
            shared,
            counters: h.counters.clone(),
            identity,
            history: h.history.clone(),
        },
    );
    let t_resume = Instant::now();
    if !h.update.was_paused {
        vmm.resume()?;
    }
    let resume_ms = t_resume.elapsed().as_secs_f64() * 1e3;
    if h.config.memory.prefault {
        vmm.populate_in_background();
    }
    let done_ns = now_ns();

    // The guest runs here now: dismiss the guardian and let go of the inherited originals.
    if !inc.takeover {
        if let Some(pid) = inc.guardian_pid {
            dismiss_guardian(pid);
        }
    }
    for p in &h.fds {
        // SAFETY: closing the inherited originals, which nothing in this process uses (it
        // works on the duplicates made above).
        unsafe { libc::close(p.fd) };
    }
    // SAFETY: as above, for the record memfd.
    unsafe { libc::close(inc.record_fd) };

    let report = UpdateReport {
        pause_ms: done_ns.saturating_sub(h.update.paused_at_ns) as f64 / 1e6,
        phases_ms: Phases {
            pause: h.update.pause_ms,
            save: h.update.save_ms,
            exec: main_ns.saturating_sub(h.update.saved_at_ns) as f64 / 1e6,
            restore: restore_ms,
            resume: resume_ms,
        },
        from_version: h.update.from_version.clone(),
        to_version: crate::VERSION.to_string(),
        pid: std::process::id(),
        binary: vmm.identity.exe.clone(),
        rolled_back: inc.rollback.clone(),
        carried_requests: h.update.carried_requests,
    };
    if inc.rollback.is_some() {
        vmm.history.rollbacks += 1;
    } else {
        vmm.history.updates += 1;
    }
    vmm.history.last = Some(report.clone());
    log::info!(
        "live update done: guest paused {:.3} ms ({:?})",
        report.pause_ms,
        report.phases_ms
    );
    let response = match &inc.rollback {
        None => ApiResponse::ok(serde_json::to_value(&report).unwrap_or_default()),
        Some(reason) => ApiResponse {
            status: 500,
            body: serde_json::json!({
                "error": format!(
                    "update to {} failed: {reason}; the guest was resumed on the previous binary ({} {})",
                    h.update.target.display(), vmm.identity.exe.display(), crate::VERSION
                ),
                "report": report,
            }),
        },
    };
    let control = Control::new(vmm, em, api);
    if let Some(w) = h.api.as_ref().and_then(|a| a.waiting.as_ref()) {
        control.respond(w.id, response);
    }
    Ok(control)
}

/// Ends the guardian (the kernel reaps it: molt ignores SIGCHLD).
fn dismiss_guardian(pid: i32) {
    // SAFETY: kill(2) of our own child, whose pid the previous image passed.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}
