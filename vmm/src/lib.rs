//! molt: a minimal KVM VMM built for live update.
//!
//! Reading order: [`config`] (what the user asked for) → [`components`] (the parts a VMM
//! runs with, and how each is saved and taken over: [`persist`]) → [`memory`] (memfd-backed
//! RAM) → [`machine`] (the KVM VM, its vCPUs and devices) → [`assembly`] (one path from parts
//! to a running VMM, for a boot and for a restore) → [`control`] (the main thread: event
//! loop and API requests) → [`update`] (live update: pause → save → hand over → restore →
//! resume).

pub mod affinity;
pub mod api;
pub mod assembly;
pub mod boot;
pub mod cli;
pub mod components;
pub mod config;
pub mod control;
pub mod event_loop;
pub mod exit;
pub mod fault;
pub mod guest_image;
pub mod inherited_fds;
pub mod laps;
pub mod machine;
pub mod memory;
pub mod memory_persist;
pub mod persist;
pub mod pio;
pub mod runtime;
pub mod sched;
pub mod sd_notify;
pub mod seccomp;
pub mod serial_backend;
pub mod snapshot;
pub mod spin;
pub mod state;
pub mod update;
pub mod vcpu;
pub mod virtio;
pub mod vm;

use std::time::Instant;

use crate::assembly::{assemble, MachineSource, Runtime};
use crate::components::Parts;
use crate::config::VmConfig;
use crate::exit::VmExit;
use crate::runtime::Bookkeeping;

/// molt's version string, as `molt --version` prints it.
#[cfg(not(feature = "test-next"))]
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// molt's version string (the live-update tests' "next version" build).
#[cfg(feature = "test-next")]
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+next");

/// Errors that stop molt before or while running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// VM creation.
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// Serial backend.
    #[error(transparent)]
    Serial(#[from] serial_backend::SerialBackendError),
    /// vCPU threads.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// Capturing or restoring a vCPU failed.
    #[error(transparent)]
    VcpuState(#[from] arch::vcpu_state::VcpuStateError),
    /// Capturing or restoring VM-wide KVM state failed.
    #[error(transparent)]
    VmKvmState(#[from] arch::vm_state::VmStateError),
    /// The serial device refused its saved state.
    #[error("cannot restore the serial device")]
    SerialDevice(#[source] devices::serial::SerialError),
    /// A machine built beforehand does not fit the state.
    #[error("the machine built beforehand has {built} vCPUs, the state {saved}")]
    PrebuiltMismatch {
        /// vCPUs built.
        built: usize,
        /// vCPUs in the state.
        saved: usize,
    },
    /// A vCPU thread ended before it could be captured.
    #[error("vcpu{0}: its thread has ended")]
    VcpuGone(u8),
    /// A captured state that cannot describe a VM.
    #[error("invalid VM state")]
    InvalidState(#[from] state::InvalidState),
    /// A fault injected by the tests' "next version" build.
    #[cfg(feature = "test-next")]
    #[error("injected fault at {0}")]
    Injected(&'static str),
    /// A part cannot be saved or taken over.
    #[error(transparent)]
    Persist(#[from] persist::PersistError),
    /// The machine is being rebuilt or was torn down.
    #[error("no machine")]
    NoMachine,
    /// The serial output cannot be duplicated.
    #[error("cannot duplicate the serial output")]
    SerialClone(#[source] std::io::Error),
    /// API server.
    #[error(transparent)]
    Api(#[from] api::ApiError),
    /// virtio devices.
    #[error(transparent)]
    Virtio(#[from] virtio::VirtioSetupError),
    /// Creating an fd of the event loop (eventfd, signalfd) failed.
    #[error("event loop setup")]
    EventLoop(#[source] std::io::Error),
    /// Seccomp filters.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// The event manager failed.
    #[error("event manager")]
    EventManager(#[source] event_manager::Error),
}

/// `e` and its sources joined by ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Boots the VM described by `config` (everything it names opened, the guest running).
/// `started` is when the process started (for boot-time markers).
pub fn boot(config: &VmConfig, started: Instant) -> Result<Runtime, Error> {
    let parts = Parts::open(config)?;
    let runtime = assemble(
        config.clone(),
        parts,
        MachineSource::Boot,
        Bookkeeping::new(),
        started,
    )?;
    log::info!(
        "VM running: {} vCPUs, {} MiB RAM, {} us after start",
        config.cpus,
        config.memory.size >> 20,
        started.elapsed().as_micros()
    );
    Ok(runtime)
}

/// Runs a booted or restored VMM until the VM ends; returns the process exit code (the one
/// place that maps how molt ended to its exit status).
pub fn run_to_end(runtime: Result<Runtime, Error>) -> i32 {
    match runtime.map(|rt| control::Control::new(rt).run()) {
        Ok(VmExit::Error(e)) => {
            eprintln!("molt: error: {e}");
            1
        }
        Ok(end) => {
            log::info!("{end}");
            end.exit_code()
        }
        Err(e) => {
            eprintln!("molt: error: {}", error_chain(&e));
            1
        }
    }
}
