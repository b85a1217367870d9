//! molt: a minimal KVM VMM built for live update.
//!
//! Reading order: [`config`] (what the user asked for) → [`memory`] (memfd-backed RAM) →
//! [`vm`] (KVM VM, vCPUs, devices) → [`boot`] (kernel and boot structures) → [`vcpu`]
//! (vCPU threads) → [`event_loop`] (the main thread) → [`run`] (all of it).

pub mod boot;
pub mod cli;
pub mod config;
pub mod event_loop;
pub mod exit;
pub mod guest_image;
pub mod memory;
pub mod pio;
pub mod serial_backend;
pub mod vcpu;
pub mod vm;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use crate::config::VmConfig;
use crate::exit::{ExitNotifier, VmExit};
use crate::vcpu::VcpuHandle;

/// molt's version string, as `molt --version` prints it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

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
    /// Event loop.
    #[error("event loop: {0}")]
    EventLoop(String),
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Builds the VM described by `config`, runs it until it ends, and tears it down.
/// `started` is when the process started (for boot-time markers).
pub fn run(config: &VmConfig, started: Instant) -> Result<VmExit, Error> {
    let signals = event_loop::termination_signalfd()
        .map_err(|e| Error::EventLoop(format!("signalfd: {e}")))?;
    let kvm = vm::open_kvm()?;
    let ram = memory::create(&config.memory)?;
    let vm_fd = vm::create_vm(&kvm, &ram)?;
    let (vcpus, tsc_khz) = vm::create_vcpus(&kvm, &vm_fd, config.cpus)?;
    let entry = boot::load(config, &ram)?;
    vm::setup_boot_vcpu(&vcpus[0], &ram, entry)?;
    let (serial_out, serial_in) = serial_backend::open(&config.serial)?;
    let (bus, dev_events) = vm::create_devices(&vm_fd, serial_out, started)?;
    log::info!(
        "VM ready: {} vCPUs, {} MiB RAM in {} memfd region(s), TSC {tsc_khz} kHz, {} us after start",
        config.cpus,
        ram.total() >> 20,
        ram.regions.len(),
        started.elapsed().as_micros()
    );

    let exits = Arc::new(ExitNotifier::new().map_err(|e| Error::EventLoop(e.to_string()))?);
    let mut em =
        EventManager::<Subscriber>::new().map_err(|e| Error::EventLoop(format!("{e:?}")))?;
    em.add_subscriber(Arc::new(Mutex::new(event_loop::Control::new(
        exits.clone(),
        signals,
    ))));
    em.add_subscriber(Arc::new(Mutex::new(event_loop::SerialInput::new(
        serial_in,
        bus.clone(),
        dev_events.serial_input_drained,
    ))));

    let handles = vcpus
        .into_iter()
        .enumerate()
        .map(|(i, fd)| VcpuHandle::spawn(i as u8, fd, bus.clone(), exits.clone()))
        .collect::<Result<Vec<_>, _>>();
    let handles = match handles {
        Ok(h) => h,
        Err(e) => {
            exits.end(VmExit::Error(e.to_string()));
            return Err(e.into());
        }
    };

    let end = loop {
        if let Some(end) = exits.reason() {
            break end;
        }
        if let Err(e) = em.run() {
            break VmExit::Error(format!("event loop: {e:?}"));
        }
    };
    for h in handles {
        h.join();
    }
    drop(vm_fd);
    drop(ram);
    Ok(end)
}
