//! The sender's side of cpr-transfer: hand the running VM to a separately started molt
//! (`molt --incoming PATH`). Before the pause the receiver gets the RAM memfds and builds the
//! machine while the guest runs ([`prepare`]); the event loop pauses the guest a few ms later
//! ([`perform_prepared`]), and the pause covers only capture, the record and the restore.
//! Until the receiver commits, the sender can take the VM back and resume it; once it has,
//! the sender exits 0 and never resumes the guest from its own, stale, state.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cpr::transfer::{expect, Channel, Message, TransferError};
use cpr::CommitPage;
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};

use super::awake::CpusAwake;
use super::outgoing::Paused;
use super::{Failed, UpdateError, UpdateReport, HANDOFF_KIND};
use crate::api::{ApiServer, ConnId};
use crate::persist::FdRole;
use crate::runtime::Vmm;

/// How long the receiver may take to answer a hello.
const HELLO: Duration = Duration::from_secs(5);
/// How long it may take to build the machine (the guest still runs meanwhile).
const PREPARE: Duration = Duration::from_secs(60);
/// How long it may take from the record to running the guest (the guest is paused).
const COMMIT: Duration = Duration::from_secs(10);

fn connect_to(path: &Path) -> Result<Channel, TransferError> {
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(std::io::Error::from)?;
    let addr = UnixAddr::new(path).map_err(std::io::Error::from)?;
    connect(sock.as_raw_fd(), &addr).map_err(std::io::Error::from)?;
    Ok(Channel::new(sock))
}

/// Hello both ways, then the machine the receiver builds before the pause; returns once it
/// is built. The guest runs throughout.
fn prepare_receiver(chan: &Channel, vmm: &Vmm, commit: &CommitPage) -> Result<(), TransferError> {
    let writer = format!("molt {}", crate::VERSION);
    chan.send(&Message::Hello { writer }, &[], &[])?;
    expect(chan.recv(HELLO)?, "hello", |m| {
        matches!(m, Message::Hello { .. })
    })?;
    let machine = vmm
        .machine_ref()
        .ok_or_else(|| TransferError::Refused("no machine".into()))?;
    let layout = machine.ram().layout();
    let mut fds: Vec<(String, RawFd)> = machine
        .ram()
        .regions
        .iter()
        .enumerate()
        .map(|(i, r)| (FdRole::Ram(i).to_string(), r.memfd.as_raw_fd()))
        .collect();
    fds.push((FdRole::Commit.to_string(), commit.fd().as_raw_fd()));
    let spec = serde_json::json!({
        "ram": layout,
        "vcpus": machine.vcpu_count(),
        "identities": machine.identities(),
        "seccomp": vmm.config().seccomp,
    });
    chan.send(&Message::Prepare { machine: spec }, &[], &fds)?;
    // While the receiver builds the machine.
    super::sys::populate_own_code();
    crate::vcpu::warm_this_thread();
    expect(chan.recv(PREPARE)?, "ready", |m| *m == Message::Ready)?;
    Ok(())
}

/// A transfer whose receiver has built the machine; the guest still runs here, until the
/// event loop pauses it ([`perform_prepared`]).
pub struct Prepared {
    socket: PathBuf,
    chan: Channel,
    ready: Ready,
}

impl Prepared {
    /// The transfer will not happen: the receiver is told why and goes.
    pub fn dismiss(self, why: &str) {
        let reason = why.to_string();
        let _ = self.chan.send(&Message::Refused { reason }, &[], &[]);
    }
}

/// What a receiver's readiness leaves for the pause.
pub(super) struct Ready {
    commit: CommitPage,
    /// Until this process exits, or the guest runs on here.
    _awake: Option<CpusAwake>,
}

/// Connects to the molt listening at `socket` and has it build the machine; the guest runs
/// on.
pub fn prepare(vmm: &Vmm, socket: &Path) -> Result<Prepared, UpdateError> {
    let failed = |e| UpdateError::Transfer(socket.to_path_buf(), e);
    let chan = connect_to(socket).map_err(failed)?;
    let ready = ready(&chan, vmm, &failed)?;
    Ok(Prepared {
        socket: socket.to_path_buf(),
        chan,
        ready,
    })
}

/// Transfers the VM for the request on `conn` to the receiver `prepared`. Returns only if the
/// guest still runs here (with the report of the attempt if it paused the guest); exits the
/// process once the receiver committed.
pub fn perform_prepared(
    vmm: &mut Vmm,
    api: &mut ApiServer,
    conn: ConnId,
    prepared: Prepared,
) -> Failed {
    let Prepared {
        socket,
        chan,
        ready,
    } = prepared;
    let failed = |e| UpdateError::Transfer(socket.clone(), e);
    let mut leg = Leg {
        target: socket.clone(),
        mode: "transfer",
        earlier: Vec::new(),
    };
    match send_ready(vmm, api, (conn, &chan), ready, &mut leg, failed) {
        Ok(()) => committed(vmm, api),
        Err(e) => Failed::after(e, leg.earlier),
    }
}

/// One handover by the transfer protocol.
pub(super) struct Leg {
    /// What the update goes to (the report's target).
    pub target: PathBuf,
    /// The report's mode.
    pub mode: &'static str,
    /// The reports of the update's earlier legs (a cpr-exec through a stand-in has two).
    pub earlier: Vec<UpdateReport>,
}

/// Has the receiver on `chan` build the machine; the guest runs throughout.
fn ready(
    chan: &Channel,
    vmm: &Vmm,
    failed: &impl Fn(TransferError) -> UpdateError,
) -> Result<Ready, UpdateError> {
    let awake = CpusAwake::hold();
    let commit = CommitPage::create().map_err(UpdateError::CommitPage)?;
    prepare_receiver(chan, vmm, &commit).map_err(failed)?;
    Ok(Ready {
        commit,
        _awake: awake,
    })
}

/// Hands the VM to the receiver on `chan` for the request on `conn`, at once. `Ok` once the
/// receiver committed: it runs the guest, and this process must leave everything it handed
/// over alone. `Err` when the guest still runs here (`failed` says why the protocol failed);
/// if the guest was paused for the attempt, the attempt's report is added to `leg.earlier`,
/// so that a later handover of the same update counts that pause too.
pub(super) fn send(
    vmm: &mut Vmm,
    api: &mut ApiServer,
    conn: ConnId,
    chan: &Channel,
    leg: &mut Leg,
    failed: impl Fn(TransferError) -> UpdateError,
) -> Result<(), UpdateError> {
    let ready = ready(chan, vmm, &failed)?;
    send_ready(vmm, api, (conn, chan), ready, leg, failed)
}

/// [`send`] once the receiver is `ready`.
fn send_ready(
    vmm: &mut Vmm,
    api: &mut ApiServer,
    (conn, chan): (ConnId, &Channel),
    ready: Ready,
    leg: &mut Leg,
    failed: impl Fn(TransferError) -> UpdateError,
) -> Result<(), UpdateError> {
    let commit = &ready.commit;
    let earlier = leg.earlier.clone();
    let target = leg.target.clone();
    let mut paused = super::outgoing::pause_for_handoff(vmm, api, conn, target, leg.mode)?;
    paused.flight.earlier = earlier;
    let was_paused = paused.flight.was_paused;
    let (paused_at_ns, kick_ms) = (paused.flight.paused_at_ns, paused.flight.pause_ms);
    let err = match hand_over(chan, vmm, api, paused) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    // The commit point decides: take the VM back, or let the receiver keep it.
    if !commit.try_abort() {
        log::warn!("the receiver committed although the transfer reported: {err}");
        return Ok(());
    }
    // A receiver that refused needs no refusal back (a receiver that replaces it on the
    // same channel must not find one either).
    if !matches!(err, TransferError::Refused(_)) {
        let _ = chan.send(
            &Message::Refused {
                reason: err.to_string(),
            },
            &[],
            &[],
        );
    }
    api.end_handoff();
    if !was_paused {
        if let Err(e) = vmm.resume() {
            log::error!("cannot resume the guest after a failed transfer: {e}");
        }
    }
    leg.earlier
        .push(failed_attempt(vmm, leg.mode, paused_at_ns, kick_ms, &err));
    Err(failed(err))
}

/// The report of a handover that failed after the pause: the guest stopped and runs on here.
fn failed_attempt(
    vmm: &Vmm,
    mode: &str,
    paused_at_ns: u64,
    kick_ms: f64,
    why: &TransferError,
) -> UpdateReport {
    let resumed_at_ns = crate::state::now_ns();
    let pause_ms = resumed_at_ns.saturating_sub(paused_at_ns) as f64 / 1e6;
    let me = std::process::id();
    UpdateReport {
        pause_ms,
        stopped_ms: pause_ms - kick_ms,
        paused_at_ns,
        resumed_at_ns,
        mode: mode.into(),
        from_pid: me,
        phases_ms: super::Phases {
            pause: kick_ms,
            ..Default::default()
        },
        from_version: crate::VERSION.into(),
        to_version: crate::VERSION.into(),
        pid: me,
        binary: vmm.identity.exe.clone(),
        rolled_back: Some(why.to_string()),
        carried_requests: 0,
        legs: Vec::new(),
    }
}

/// Captures, saves and sends the record with every fd but RAM (the receiver has RAM), then
/// waits for the receiver to commit.
fn hand_over(
    chan: &Channel,
    vmm: &Vmm,
    api: &ApiServer,
    paused: Paused,
) -> Result<(), TransferError> {
    let refuse = |e: &dyn std::error::Error| TransferError::Refused(crate::error_chain(e));
    let mut laps = crate::laps::Laps::start("transfer: sender's pause");
    let (handoff, fds) = super::outgoing::save(vmm, api, paused).map_err(|e| refuse(&e))?;
    laps.mark("save");
    let writer = format!("molt {}", crate::VERSION);
    let record = cpr::encode(&writer, HANDOFF_KIND, &handoff).map_err(|e| refuse(&e))?;
    laps.mark("encode");
    let rest: Vec<(String, RawFd)> = fds
        .describe()
        .into_iter()
        .filter(|p| !matches!(p.name.parse::<FdRole>(), Ok(FdRole::Ram(_))))
        .map(|p| (p.name, p.fd))
        .collect();
    chan.send(&Message::Handoff, &record, &rest)?;
    laps.mark("send");
    laps.log();
    log::debug!(
        "transfer: record of {} bytes, {} fds",
        record.len(),
        rest.len()
    );
    expect(chan.recv(COMMIT)?, "committed", |m| {
        matches!(m, Message::Committed { .. })
    })?;
    Ok(())
}

/// The receiver runs the guest: leave its sockets in place (to it).
pub(super) fn let_go(vmm: &Vmm, api: &mut ApiServer) {
    api.set_remove_on_drop(false);
    vmm.serial_out().set_remove_on_drop(false);
}

/// The receiver runs the guest: leave its sockets in place and go.
pub(super) fn committed(vmm: &Vmm, api: &mut ApiServer) -> ! {
    let_go(vmm, api);
    log::info!("transfer committed: the guest runs in the receiver; exiting");
    // No teardown: the vCPUs stay stopped, and nothing here may touch what the receiver owns.
    // The exit's teardown (the address space, the KVM VM: milliseconds of kernel work) runs
    // beside the resumed guest: on CPU time its vCPUs and device backends do not want.
    let stuck = super::sys::every_thread(crate::sched::Policy::IDLE);
    if stuck > 0 {
        log::debug!("{stuck} thread(s) exit at their own priority");
    }
    std::process::exit(0)
}
