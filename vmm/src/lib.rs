//! molt: a minimal KVM VMM built for live update.
//!
//! Reading order: [`config`] (what the user asked for) → [`memory`] (memfd-backed RAM) →
//! [`vm`] (KVM VM, vCPUs, devices) → [`boot`] (kernel and boot structures) → [`vcpu`]
//! (vCPU threads) → [`event_loop`] (the main thread) → [`run`] (all of it).

pub mod api;
pub mod boot;
pub mod cli;
pub mod config;
pub mod control;
pub mod event_loop;
pub mod exit;
pub mod guest_image;
pub mod machine;
pub mod memory;
pub mod pio;
pub mod runtime;
pub mod serial_backend;
pub mod state;
pub mod update;
pub mod vcpu;
pub mod virtio;
pub mod vm;

use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::VmConfig;
use crate::exit::{ExitNotifier, VmExit};
use crate::machine::Shared;
use crate::runtime::Vmm;

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
    /// Restoring captured state failed.
    #[error("restore: {0}")]
    Restore(String),
    /// Capturing state failed.
    #[error("capture: {0}")]
    Capture(String),
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
    /// Event loop.
    #[error("event loop: {0}")]
    EventLoop(String),
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

/// Builds the VM described by `config`, runs it until it ends, and tears it down.
/// `started` is when the process started (for boot-time markers).
pub fn run(config: &VmConfig, started: Instant) -> Result<VmExit, Error> {
    let event_err = |e: std::io::Error| Error::EventLoop(e.to_string());
    let shared = Shared {
        exits: Arc::new(ExitNotifier::new().map_err(event_err)?),
        serial_drained: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(event_err)?,
        bus: Arc::default(),
        serial_counters: Arc::default(),
        started,
        virtio: Arc::new(virtio::Virtio::open(config, None)?),
    };
    let api = config
        .api_socket
        .as_deref()
        .map(api::ApiServer::bind)
        .transpose()?;
    let (serial_out, serial_in) = serial_backend::open(&config.serial)?;
    let serial_listener = serial_in.listener_fd();
    let em = control::event_loop(&shared, serial_in)?;
    let mut vmm = Vmm::boot(config.clone(), serial_out, shared)?;
    vmm.serial_listener = serial_listener;
    log::info!(
        "VM running: {} vCPUs, {} MiB RAM, {} us after start",
        config.cpus,
        config.memory.size >> 20,
        started.elapsed().as_micros()
    );
    Ok(control::Control::new(vmm, em, api).run())
}
