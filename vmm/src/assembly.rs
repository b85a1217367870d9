//! One assembly path: a boot and a restore both end in [`assemble`], which wires the parts,
//! the event loop and the KVM machine into a [`Runtime`]; `main` runs that runtime with
//! [`crate::control::Control`] whichever way it started.

use std::sync::Arc;
use std::time::Instant;

use event_manager::EventManager;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::ApiServer;
use crate::components::Parts;
use crate::config::VmConfig;
use crate::event_loop::{self, Subscriber};
use crate::exit::ExitNotifier;
use crate::machine::{Machine, Prebuilt, Shared};
use crate::memory::GuestRam;
use crate::runtime::{Bookkeeping, Vmm};
use crate::state::VmState;
use crate::Error;

/// A VMM ready to run: the machine with its bookkeeping, its event loop and its API server.
pub struct Runtime {
    /// The VMM.
    pub vmm: Vmm,
    /// Its event loop.
    pub em: EventManager<Subscriber>,
    /// Its API server, not yet subscribed to the event loop.
    pub api: Option<ApiServer>,
    /// The CPUs kept awake for a little while after an update resumed the guest.
    pub awake: Option<crate::update::awake::CpusAwake>,
}

/// Where the KVM machine comes from.
pub enum MachineSource<'a> {
    /// Boot the configured kernel: the vCPUs start running.
    Boot,
    /// Restore captured state over taken-over RAM: the vCPUs start paused (the caller resumes
    /// them when the rest of the handoff is done).
    Restore {
        /// The captured machine.
        state: &'a VmState,
        /// Its RAM, mapped.
        ram: GuestRam,
    },
    /// Restore captured state into a machine built beforehand: the vCPUs start paused.
    RestoreInto {
        /// The captured machine.
        state: &'a VmState,
        /// The KVM VM over its RAM, with its vCPUs.
        prebuilt: Prebuilt,
        /// The KVM handle it was built with.
        kvm: kvm_ioctls::Kvm,
    },
}

/// Wires `parts` and the machine from `source` into a runtime.
pub fn assemble(
    config: VmConfig,
    parts: Parts,
    source: MachineSource<'_>,
    book: Bookkeeping,
    started: Instant,
) -> Result<Runtime, Error> {
    // Before any thread that gets a filter starts.
    crate::seccomp::init(config.seccomp)?;
    let mut laps = crate::laps::Laps::start("assemble");
    let shared = Shared {
        exits: Arc::new(ExitNotifier::new().map_err(Error::EventLoop)?),
        serial_drained: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::EventLoop)?,
        bus: Arc::default(),
        serial_counters: Arc::default(),
        started,
        virtio: Arc::new(parts.virtio),
    };
    // Before any vCPU thread exists: it blocks SIGINT/SIGTERM for them.
    laps.mark("shared");
    let em = event_loop::build(&shared, parts.serial.input())?;
    laps.mark("event loop");
    let out = parts.serial.try_clone().map_err(Error::SerialClone)?;
    let (kvm, machine, paused) = match source {
        MachineSource::Boot => {
            let kvm = crate::vm::open_kvm()?;
            let machine = Machine::boot(&kvm, &config, out, &shared)?;
            (kvm, machine, false)
        }
        MachineSource::Restore { state, ram } => {
            let kvm = crate::vm::open_kvm()?;
            let machine = Machine::restore(&kvm, state, ram, out, &shared)?;
            (kvm, machine, true)
        }
        MachineSource::RestoreInto {
            state,
            prebuilt,
            kvm,
        } => (
            kvm,
            Machine::restore_into(prebuilt, state, out, &shared)?,
            true,
        ),
    };
    laps.mark("machine");
    let vmm = Vmm::new(kvm, config, machine, parts.serial, shared, book, paused);
    laps.mark("vmm");
    laps.log();
    Ok(Runtime {
        vmm,
        em,
        api: parts.api,
        awake: None,
    })
}
