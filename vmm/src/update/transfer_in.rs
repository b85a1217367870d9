//! The receiver's side of cpr-transfer: `molt --incoming PATH` starts without a VM, waits for
//! one sender on a unix socket at PATH, builds the machine over the sender's RAM while the
//! guest still runs there, then takes the paused VM over, commits, resumes it and answers
//! the request that started the transfer. Before it commits, any failure sends the sender a
//! refusal (it resumes the guest itself) and exits non-zero.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use arch::vcpu_state::VcpuIdentity;
use cpr::transfer::{expect, Channel, Message, TransferError};
use cpr::{CommitPage, Inherited};
use nix::sys::socket::{
    accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};
use serde::Deserialize;

use super::handoff::Handoff;
use super::HANDOFF_KIND;
use crate::assembly::{assemble, MachineSource, Runtime};
use crate::components;
use crate::machine::Prebuilt;
use crate::memory::GuestRam;
use crate::memory_persist::MemoryRegionState;
use crate::persist::{FdRole, Persist, RestoreFds};
use crate::state::now_ns;

/// How long the sender may take between messages before the pause.
const BEFORE_PAUSE: Duration = Duration::from_secs(60);
/// How long the machine is built on idle CPU time only, at most (then at molt's policy).
const YIELD_AT_MOST: Duration = Duration::from_millis(20);
/// How long from Ready to the record (the sender lets the guest settle, pauses, captures
/// and sends).
const HANDOFF: Duration = Duration::from_secs(60);

/// Errors receiving a VM (before the commit: the sender keeps the guest).
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The listening socket cannot be set up.
    #[error("cannot listen on {0}")]
    Listen(std::path::PathBuf, #[source] std::io::Error),
    /// The exchange failed.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The machine description is unusable.
    #[error("unusable machine description")]
    Machine(#[source] serde_json::Error),
    /// The record cannot be decoded.
    #[error("cannot decode the handoff record")]
    Decode(#[source] cpr::RecordError),
    /// The received fds do not fit.
    #[error("the received fds do not fit")]
    Fds(#[source] cpr::FdError),
    /// Fds no part claims.
    #[error("the sender handed over fds no part claims: {0:?}")]
    Unclaimed(Vec<String>),
    /// The commit page is unusable.
    #[error("unusable commit page")]
    CommitPage(#[source] std::io::Error),
    /// Building or restoring the VMM failed.
    #[error("cannot rebuild the VMM")]
    Vmm(#[from] crate::Error),
    /// RAM cannot be taken over.
    #[error("cannot take over guest RAM")]
    Memory(#[from] crate::memory::MemoryError),
    /// The sender took the VM back before the commit.
    #[error(transparent)]
    TakenBack(#[from] super::incoming::IncomingError),
}

#[derive(Deserialize)]
struct MachineSpec {
    ram: Vec<MemoryRegionState>,
    vcpus: usize,
    /// Each vCPU's CPUID and TSC rate (newer senders): set before the pause.
    #[serde(default)]
    identities: Vec<VcpuIdentity>,
    /// The VM's seccomp mode (newer senders): the filters are compiled, and the vCPU threads
    /// filtered, before the pause.
    #[serde(default)]
    seccomp: Option<crate::seccomp::SeccompMode>,
}

/// Binds PATH (mode 0600, a stale socket replaced) and waits for one sender.
fn accept_one(path: &Path) -> Result<Channel, ReceiveError> {
    let err = |e: nix::Error| ReceiveError::Listen(path.to_path_buf(), e.into());
    if std::fs::symlink_metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    }) {
        let _ = std::fs::remove_file(path);
    }
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err)?;
    // Bound and listening under a temporary name, then renamed into place: whoever sees PATH
    // can connect.
    let mut staging = path.as_os_str().to_owned();
    staging.push(format!(".{}", std::process::id()));
    let staging = std::path::PathBuf::from(staging);
    let addr = UnixAddr::new(&staging).map_err(err)?;
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = bind(sock.as_raw_fd(), &addr);
    nix::sys::stat::umask(old);
    bound.map_err(err)?;
    let listening = Backlog::new(1)
        .and_then(|b| listen(&sock, b))
        .map_err(err)
        .and_then(|()| {
            std::fs::rename(&staging, path).map_err(|e| ReceiveError::Listen(path.to_path_buf(), e))
        });
    if let Err(e) = listening {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    log::info!("waiting for a VM on {}", path.display());
    let conn = accept(sock.as_raw_fd()).map_err(err);
    // One sender: the path goes as soon as it is connected (or failed).
    let _ = std::fs::remove_file(path);
    let conn = conn?;
    // SAFETY: accept returned a new connected socket owned by nobody else.
    let conn = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(conn) };
    nix::fcntl::fcntl(
        &conn,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(err)?;
    Ok(Channel::new(conn))
}

/// What the receiver builds before the pause.
struct Built {
    machine: Prebuilt,
    kvm: kvm_ioctls::Kvm,
    commit: CommitPage,
    identity: crate::runtime::Identity,
}

/// How a receiver builds its machine while the guest still runs in the sender.
pub(super) enum Build {
    /// On idle CPU time (for at most [`YIELD_AT_MOST`]), over the KVM VM it made when it
    /// started, if it could: a receiver started ahead of the transfer, whose build only the
    /// request waits for. (KVM_CREATE_VM's work, with the kworkers it wakes, is then not on
    /// the CPUs the guest and its backends need during the request.)
    Yielding(Option<EmptyVm>),
    /// At molt's policy: the legs of a cpr-exec through a stand-in, whose processes start
    /// inside the request and keep both CPUs of a small host busy (built on idle time, each leg
    /// waited up to the time limit and the request took twice as long).
    AtOnce,
}

/// An open /dev/kvm and an empty KVM VM on it ([`crate::vm::new_vm`]).
pub(super) struct EmptyVm {
    kvm: kvm_ioctls::Kvm,
    vm: kvm_ioctls::VmFd,
}

impl EmptyVm {
    /// Makes one, or says why not.
    pub fn create() -> Result<Self, crate::Error> {
        let kvm = crate::vm::open_kvm()?;
        let vm = crate::vm::new_vm(&kvm)?;
        Ok(Self { kvm, vm })
    }
}

/// Hello, then the machine built over the sender's RAM while the guest runs there.
fn prebuild(chan: &Channel, build: Build) -> Result<Built, ReceiveError> {
    expect(chan.recv(BEFORE_PAUSE)?, "hello", |m| {
        matches!(m, Message::Hello { .. })
    })?;
    let writer = format!("molt {}", crate::VERSION);
    chan.send(&Message::Hello { writer }, &[], &[])?;
    let prepare = expect(chan.recv(BEFORE_PAUSE)?, "prepare", |m| {
        matches!(m, Message::Prepare { .. })
    })?;
    let Message::Prepare { machine } = prepare.message else {
        unreachable!("checked by expect");
    };
    // The guest runs in the sender meanwhile: building the machine (~2 ms of CPU) on idle CPU
    // time takes none from its vCPUs or its device backends (a vhost-user disk's daemon woken
    // on a busy CPU waits there); every thread here runs at molt's policy again before Ready.
    let (yielding, early) = match build {
        Build::Yielding(early) => (super::sys::Yielding::begin(YIELD_AT_MOST), early),
        Build::AtOnce => (None, None),
    };
    let spec: MachineSpec = serde_json::from_value(machine).map_err(ReceiveError::Machine)?;
    let mut fds = RestoreFds::new(Inherited::from_owned(prepare.fds).map_err(ReceiveError::Fds)?);
    let ram = GuestRam::restore(&spec.ram, (), &mut fds)?;
    let commit = fds
        .take(FdRole::Commit)
        .map_err(crate::Error::from)
        .and_then(|fd| {
            CommitPage::from_fd(fd).map_err(|e| {
                crate::Error::Persist(crate::persist::PersistError::Unusable(FdRole::Commit, e))
            })
        })?;
    let unclaimed = fds.unclaimed();
    if !unclaimed.is_empty() {
        return Err(ReceiveError::Unclaimed(unclaimed));
    }
    if let Some(mode) = spec.seccomp {
        crate::seccomp::init(mode).map_err(crate::Error::from)?;
    }
    let EmptyVm { kvm, vm } = match early {
        Some(e) => e,
        None => EmptyVm::create()?,
    };
    let mut machine = Prebuilt::over(vm, ram, spec.vcpus, &spec.identities)?;
    machine.read_fresh()?;
    machine.warm_threads()?;
    crate::vcpu::warm_this_thread();
    let identity = crate::runtime::Identity::current();
    super::sys::populate_own_code();
    if let Some(y) = yielding {
        y.end();
    }
    chan.send(&Message::Ready, &[], &[])?;
    Ok(Built {
        machine,
        kvm,
        commit,
        identity,
    })
}

/// A VM received and running here; the request that started the handoff not answered yet.
pub(super) struct Received {
    /// The VMM running the guest.
    pub runtime: Runtime,
    /// The record it came with.
    pub handoff: Handoff,
    /// Where the pause went.
    pub phases: super::Phases,
    /// Wall-clock ns when the guest ran again.
    pub resumed_ns: u64,
}

/// Receives the paused VM and resumes it here.
pub(super) fn receive(
    chan: &Channel,
    started: Instant,
    build: Build,
) -> Result<Received, ReceiveError> {
    let Built {
        machine: mut prebuilt,
        kvm,
        commit,
        identity,
    } = prebuild(chan, build)?;
    // The sender pauses the guest a few ms after it reads Ready (a running guest's devices
    // settle first); the record follows the pause within a millisecond or so. The sender keeps
    // the CPUs out of idle states meanwhile, so this wait ends without a wake-up's latency.
    let handoff = chan.recv(HANDOFF)?;
    let handoff = expect(handoff, "handoff", |m| *m == Message::Handoff)?;
    let received_ns = now_ns();
    let spread = prebuilt.wake();
    let mut laps = crate::laps::Laps::start("transfer: receiver's pause");
    let h = cpr::decode_kind::<Handoff>(&handoff.payload, HANDOFF_KIND)
        .map_err(ReceiveError::Decode)?
        .state;
    laps.mark("decode");
    // The vCPU threads restore their vCPUs while this thread restores the rest.
    prebuilt.restore_vcpus(&h.vm)?;
    laps.mark("vcpus queued");
    let mut fds = RestoreFds::new(Inherited::from_owned(handoff.fds).map_err(ReceiveError::Fds)?);
    laps.mark("fds");
    let (parts, api) = components::restore_parts(&h.parts, &h.config, &mut fds)?;
    let unclaimed = fds.unclaimed();
    if !unclaimed.is_empty() {
        return Err(ReceiveError::Unclaimed(unclaimed));
    }
    laps.mark("parts");
    let book = h.book.taken_over_by(identity);
    let source = MachineSource::RestoreInto {
        state: &h.vm,
        prebuilt,
        kvm,
    };
    let mut runtime = assemble(h.config.clone(), parts, source, book, started)?;
    laps.mark("assemble");
    let restore_ms = now_ns().saturating_sub(received_ns) as f64 / 1e6;
    let resume_from_ns = now_ns();
    super::incoming::take_ownership(&commit, &mut runtime)?;
    laps.mark("commit");
    // The pause ends when the last vCPU is back in the guest.
    let resumed_ns = if h.update.was_paused {
        now_ns()
    } else {
        runtime.vmm.resume_confirmed()?
    };
    laps.mark("resume");
    // The sender's request ends when it exits, after Committed.
    runtime.awake = super::awake::CpusAwake::after_resume();
    laps.log();
    spread.undo();
    super::incoming::rebuild_api(&mut runtime, api);
    let resume_ms = resumed_ns.saturating_sub(resume_from_ns) as f64 / 1e6;
    // systemd learns the new main PID before the sender (the old one) exits.
    crate::sd_notify::ready();
    let _ = chan.send(
        &Message::Committed {
            pid: std::process::id(),
        },
        &[],
        &[],
    );
    let phases = h.update.phases(received_ns, restore_ms, resume_ms);
    fds.release_originals();
    Ok(Received {
        runtime,
        handoff: h,
        phases,
        resumed_ns,
    })
}

/// Tells the sender why the VM was not taken over (it keeps the guest) and says it here.
pub(super) fn refuse(chan: &Channel, e: &ReceiveError) {
    let reason = crate::error_chain(e);
    let _ = chan.send(
        &Message::Refused {
            reason: reason.clone(),
        },
        &[],
        &[],
    );
    eprintln!("molt: error: receiving the VM failed (the sender keeps it): {reason}");
}

/// Receives the VM on `chan` and answers the request that started the handoff. `rollback`
/// says why this binary runs instead of the one the update asked for.
pub(super) fn take_over(
    chan: &Channel,
    started: Instant,
    rollback: Option<String>,
    build: Build,
) -> Result<Runtime, ReceiveError> {
    let mut got = receive(chan, started, build)?;
    let (h, phases) = (&got.handoff, got.phases.clone());
    super::incoming::finish(h, &mut got.runtime, phases, got.resumed_ns, rollback);
    Ok(got.runtime)
}

/// Receives the VM on `chan`, answers the request that started the handoff and runs the VM;
/// returns the process exit code.
fn run_on(chan: Channel, early: Option<EmptyVm>, started: Instant) -> i32 {
    match take_over(&chan, started, None, Build::Yielding(early)) {
        Ok(runtime) => {
            // The sender is done with us (it exits once it read Committed).
            drop(chan);
            crate::run_to_end(Ok(runtime))
        }
        Err(e) => {
            refuse(&chan, &e);
            1
        }
    }
}

/// `molt --incoming PATH`: returns the process exit code.
pub fn run(path: &Path, started: Instant) -> i32 {
    // Made now, long before a sender comes (or when it does, reporting to it why not).
    let early = EmptyVm::create()
        .map_err(|e| log::debug!("the KVM VM is made when a sender comes: {e}"))
        .ok();
    match accept_one(path) {
        Ok(chan) => run_on(chan, early, started),
        Err(e) => {
            eprintln!("molt: error: {}", crate::error_chain(&e));
            1
        }
    }
}
