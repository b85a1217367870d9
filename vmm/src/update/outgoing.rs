//! The old image's side of a live update: prepare (the guest runs on), then pause, save, hand
//! over. Returns only when the update did not happen, after undoing everything: the guest runs
//! on here.

use std::path::PathBuf;
use std::time::Instant;

use cpr::{CommitPage, Transport};

use super::awake::CpusAwake;
use super::exec::ExecTransport;
use super::guardian::Guardian;
use super::handoff::{BookkeepingState, Handoff, InFlight};
use super::holder::Holder;
use super::{validate_target, UpdateError, HANDOFF_KIND};
use crate::api::{ApiServer, ConnId, CprExecRequest};
use crate::components::{self, Running};
use crate::machine::VcpuCaptures;
use crate::persist::SaveFds;
use crate::runtime::{RunState, Vmm};
use crate::state::now_ns;

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What an update executes, decided before anything is paused.
pub(super) struct Plan {
    pub target: PathBuf,
    pub argv: Vec<String>,
}

/// Fds the new image opens besides the inherited ones and their duplicates (KVM, vCPUs,
/// eventfds, epoll, timers): a generous bound.
const NEW_IMAGE_FDS: usize = 64;

/// Refuses an update the fd limit would make fail half-way: the new image holds every
/// inherited fd twice (the originals stay for a rollback until the guest runs).
fn check_fd_budget() -> Result<(), UpdateError> {
    use nix::sys::resource::{getrlimit, Resource};
    let open = cpr::open_fds().map(|f| f.len()).unwrap_or(0);
    let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return Ok(());
    };
    let needed = 2 * open + NEW_IMAGE_FDS;
    if needed as u64 > soft {
        return Err(UpdateError::FdLimit {
            open,
            needed,
            limit: soft,
        });
    }
    Ok(())
}

/// Checks what the update `req` executes, and waits until the memfds hold all of RAM (once a
/// lazy restore has loaded it): the start of every cpr-exec, before anything is paused.
pub(super) fn plan(vmm: &Vmm, req: &CprExecRequest) -> Result<Plan, UpdateError> {
    let allowed = vmm.config().update_binaries.as_deref();
    let target = validate_target(req.binary.as_ref().unwrap_or(&vmm.identity.exe), allowed)?;
    check_fd_budget()?;
    let argv = match &req.args {
        Some(args) => std::iter::once(target.display().to_string())
            .chain(args.iter().cloned())
            .collect(),
        None => vmm.identity.argv.clone(),
    };
    crate::snapshot::lazy::wait_until_filled();
    Ok(Plan { target, argv })
}

/// A cpr-exec prepared while the guest runs: what it executes and its safety nets, waiting
/// for its pause ([`perform_prepared`], [`super::SETTLE`] later).
pub struct Prepared {
    plan: Plan,
    nets: SafetyNets,
    /// Made before the holder starts, whose copy of the fd table keeps it across `execve`.
    awake: Option<CpusAwake>,
}

impl Prepared {
    /// The update will not happen: the guardian and the holder go.
    pub fn dismiss(self) {
        self.nets.dismiss();
    }
}

/// Checks the update `req` and starts its safety nets (commit page, guardian, holder); the
/// guest runs on.
pub fn prepare(vmm: &Vmm, req: &CprExecRequest) -> Result<Prepared, UpdateError> {
    let plan = plan(vmm, req)?;
    let awake = CpusAwake::hold();
    // The guardian gets the fds just before execve.
    let commit = CommitPage::create().map_err(UpdateError::CommitPage)?;
    // Started by the unfiltered launcher: a child of a filtered thread could not exec.
    let guardian = crate::seccomp::launcher::run(Guardian::spawn)
        .unwrap_or_else(|| Err(std::io::Error::other("the launcher thread is gone")))
        .map_err(|e| log::warn!("live update without a guardian: {e}"))
        .ok();
    // The holder keeps the address space and the KVM VM (whose fds exist already) across
    // execve, so their teardown happens outside the pause; starting it costs ~60 µs, here
    // rather than inside the pause.
    let holder = Holder::start(&commit)
        .map_err(|e| log::warn!("live update without an address-space holder: {e}"))
        .ok();
    Ok(Prepared {
        plan,
        nets: SafetyNets {
            guardian,
            holder,
            commit,
        },
        awake,
    })
}

/// Performs the update `prepared` for the request on connection `conn`: pause, save, exec.
/// On success this never returns (the process is the new image); the error says why the
/// guest still runs here.
pub fn perform_prepared(
    vmm: &mut Vmm,
    api: &mut ApiServer,
    conn: ConnId,
    prepared: Prepared,
) -> UpdateError {
    let Prepared {
        plan,
        nets: safety_nets,
        awake: _awake,
    } = prepared;
    // One update at a time: clients that ask for another meanwhile get 409 now; everything
    // else they sent is carried over and answered by the new image.
    let paused = match pause_for_handoff(vmm, api, conn, plan.target.clone(), "exec") {
        Ok(p) => p,
        Err(e) => {
            safety_nets.dismiss();
            return e;
        }
    };
    let was_paused = paused.flight.was_paused;
    let err = match save(vmm, api, paused) {
        Ok((handoff, fds)) => hand_over(vmm, plan, &handoff, fds, safety_nets),
        Err(e) => {
            safety_nets.dismiss();
            e
        }
    };
    api.end_handoff();
    if !was_paused {
        if let Err(e) = vmm.resume() {
            log::error!("cannot resume the guest after a failed update: {e}");
        }
    }
    err
}

/// A paused guest, its handoff begun: the update in flight and the vCPU states its
/// threads are capturing.
pub(super) struct Paused {
    /// The update in flight.
    pub flight: InFlight,
    captures: VcpuCaptures,
}

/// Refuses other updates, then pauses the guest: the start of every handoff.
pub(super) fn pause_for_handoff(
    vmm: &mut Vmm,
    api: &mut ApiServer,
    conn: ConnId,
    target: PathBuf,
    mode: &str,
) -> Result<Paused, UpdateError> {
    // One update at a time: clients that ask for another meanwhile get 409 now; everything
    // else they sent is carried over and answered by the new keeper.
    api.begin_handoff(conn);
    let was_paused = vmm.run_state() == RunState::Paused;
    let t0 = Instant::now();
    let mut flight = InFlight {
        from_version: crate::VERSION.to_string(),
        target,
        previous: vmm.identity.exe.clone(),
        paused_at_ns: now_ns(),
        was_paused,
        from_pid: std::process::id(),
        mode: mode.into(),
        ..InFlight::default()
    };
    let captures = match vmm.pause_capturing() {
        Ok(c) => c,
        Err(e) => {
            api.end_handoff();
            return Err(UpdateError::Capture(e));
        }
    };
    flight.pause_ms = ms(t0.elapsed());
    Ok(Paused { flight, captures })
}

/// Captures the machine and saves every part; the fds the parts declared come back with the
/// record.
pub(super) fn save(
    vmm: &Vmm,
    api: &ApiServer,
    paused: Paused,
) -> Result<(Handoff, SaveFds), UpdateError> {
    let Paused {
        mut flight,
        captures,
    } = paused;
    let t1 = Instant::now();
    let machine = vmm
        .machine_ref()
        .ok_or(UpdateError::Capture(crate::Error::NoMachine))?;
    let mut laps = crate::laps::Laps::start("save");
    let vm = machine
        .capture_with(captures)
        .map_err(UpdateError::Capture)?;
    laps.mark("capture");
    let mut fds = SaveFds::new();
    let running = Running {
        ram: machine.ram(),
        serial: vmm.serial_out(),
        virtio: &vmm.shared.virtio,
        api: Some(api),
    };
    let parts = components::save(&running, &mut fds).map_err(UpdateError::Save)?;
    flight.carried_requests = crate::virtio::pending_requests(&vm.virtio, &machine.ram().mem);
    laps.mark("parts");
    laps.log();
    flight.save_ms = ms(t1.elapsed());
    flight.saved_at_ns = now_ns();
    let handoff = Handoff {
        vm,
        config: vmm.config().clone(),
        parts,
        fds: fds.describe(),
        book: BookkeepingState {
            argv: vmm.identity.argv.clone(),
            booted_at_ns: vmm.identity.booted_at_ns,
            counters: vmm.counters.clone(),
            history: vmm.history.clone(),
        },
        update: flight,
        #[cfg(feature = "test-next")]
        next_only: super::handoff::NextOnly {
            writer: crate::VERSION.to_string(),
        },
    };
    Ok((handoff, fds))
}

/// What an exec handoff sets up before the pause: the commit page, the guardian and the
/// address-space holder (both optional: the update goes on without them).
struct SafetyNets {
    guardian: Option<Guardian>,
    holder: Option<Holder>,
    commit: CommitPage,
}

impl SafetyNets {
    /// The update did not get to the handover: the guardian and the holder go.
    fn dismiss(self) {
        if let Some(g) = self.guardian {
            g.dismiss();
        }
        if let Some(h) = self.holder {
            h.release();
        }
    }
}

/// Encodes the record and hands it over by exec; returns why that did not happen.
fn hand_over(
    vmm: &Vmm,
    plan: Plan,
    handoff: &Handoff,
    fds: SaveFds,
    nets: SafetyNets,
) -> UpdateError {
    let writer = format!("molt {}", crate::VERSION);
    let record = match cpr::encode(&writer, HANDOFF_KIND, handoff) {
        Ok(r) => r,
        Err(e) => {
            nets.dismiss();
            return UpdateError::Record(e);
        }
    };
    let mut transport = ExecTransport {
        target: plan.target,
        argv: plan.argv,
        previous_exe: vmm.identity.exe_file.as_ref(),
        guardian: nets.guardian,
        holder: nets.holder,
        commit: nets.commit,
    };
    let mut registry = fds.into_registry();
    match transport.deliver(&record, &mut registry) {
        Err(e) => e,
        Ok(()) => unreachable!("an exec transport returns only on failure"),
    }
}
