//! A running machine: the KVM VM over guest RAM, its vCPU threads and devices. Built either
//! by booting a kernel or by restoring a [`VmState`] over existing RAM memfds; torn down
//! back into those memfds.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use arch::vcpu_state::{self, MsrSet, VcpuIdentity};
use arch::vm_state;
use devices::debug_port::DebugPort;
use devices::i8042::I8042;
use devices::irq::EventFdTrigger;
use devices::serial::{Serial, SerialCounters, SerialResources, COM1_IRQ};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::VmConfig;
use crate::exit::ExitNotifier;
use crate::fault::{self, Step};
use crate::memory::{self, GuestRam, RamRegion};
use crate::pio::PioBus;
use crate::serial_backend::SerialOut;
use crate::state::{PioDevicesState, VmState};
use crate::vcpu::{ParkedThread, VcpuHandle, VcpuRunState};
use crate::virtio::Virtio;
use crate::{boot, vm, Error};

/// What outlives a machine across rebuilds: shared with the event loop.
pub struct Shared {
    /// VM-end notification.
    pub exits: Arc<ExitNotifier>,
    /// Signalled when the guest drains the serial input FIFO.
    pub serial_drained: EventFd,
    /// The current machine's devices (swapped on rebuild).
    pub bus: crate::event_loop::BusCell,
    /// Serial output counters, kept across rebuilds.
    pub serial_counters: Arc<SerialCounters>,
    /// Process start, for boot markers.
    pub started: Instant,
    /// virtio devices (eventfds and backends outlive machines).
    pub virtio: Arc<Virtio>,
}

/// A KVM VM over guest RAM (memory slots, irqchip, PIT) with its vCPUs created but not set
/// and their threads started: everything of a restore that grows with RAM, built before the
/// state is known.
pub struct Prebuilt {
    /// Shared with the virtio devices while they are attached (vhost-user irqfds).
    vm_fd: Arc<VmFd>,
    /// The identities set on the vCPUs (empty if none was known beforehand).
    identities: Vec<VcpuIdentity>,
    /// The vCPU threads, each with its vCPU.
    threads: Vec<ParkedThread>,
    ram: GuestRam,
    has_xsave: bool,
    /// Each vCPU as KVM created it.
    fresh: Vec<vcpu_state::Fresh>,
    /// The vCPU state restores running on the vCPU threads, once begun.
    restoring: Option<Vec<(u8, Option<RestoreRx>)>>,
}

type RestoreRx = std::sync::mpsc::Receiver<Result<(), vcpu_state::VcpuStateError>>;

impl Prebuilt {
    /// Creates the VM over `ram` and `vcpus` vCPUs; when `identities` has one per vCPU
    /// (a transfer sends them ahead), they are set now rather than inside the pause.
    pub fn new(
        kvm: &Kvm,
        ram: GuestRam,
        vcpus: usize,
        identities: &[VcpuIdentity],
    ) -> Result<Self, Error> {
        Self::over(vm::new_vm(kvm)?, ram, vcpus, identities)
    }

    /// As [`Prebuilt::new`], over an empty VM created beforehand ([`vm::new_vm`]).
    pub fn over(
        vm_fd: VmFd,
        ram: GuestRam,
        vcpus: usize,
        identities: &[VcpuIdentity],
    ) -> Result<Self, Error> {
        let vm_fd = Arc::new(vm::setup_vm(vm_fd, &ram)?);
        fault::inject(Step::Vm)?;
        let vcpus = (0..vcpus as u64)
            .map(|i| {
                vm_fd
                    .create_vcpu(i)
                    .map_err(|e| vm::VmError::Kvm("KVM_CREATE_VCPU", e).into())
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let identities = if identities.len() == vcpus.len() {
            for (i, (fd, id)) in vcpus.iter().zip(identities).enumerate() {
                vcpu_state::set_identity(fd, i as u8, id)?;
            }
            identities.to_vec()
        } else {
            Vec::new()
        };
        let has_xsave = vcpu_state::xsave_usable(&vm_fd);
        let threads = vcpus
            .into_iter()
            .enumerate()
            .map(|(i, fd)| ParkedThread::spawn(i as u8, fd).map_err(Error::from))
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Self {
            vm_fd,
            identities,
            threads,
            ram,
            has_xsave,
            fresh: Vec::new(),
            restoring: None,
        })
    }

    /// Warms the vCPU threads for the pause ([`crate::vcpu::warm_this_thread`]); only worth it
    /// ahead of one.
    pub fn warm_threads(&self) -> Result<(), Error> {
        let jobs: Vec<_> = self
            .threads
            .iter()
            .map(|t| t.queue(|_| crate::vcpu::warm_this_thread(), false))
            .collect();
        for (i, rx) in jobs.into_iter().enumerate() {
            rx.and_then(|rx| rx.recv().ok())
                .ok_or(Error::VcpuGone(i as u8))?;
        }
        Ok(())
    }

    /// Reads each vCPU as KVM created it, so the restore can leave out the ioctls that would
    /// write the same (only worth it ahead of a pause: inside one it costs what it saves).
    pub fn read_fresh(&mut self) -> Result<(), Error> {
        let has_xsave = self.has_xsave;
        let reads: Vec<_> = self
            .threads
            .iter()
            .map(|t| t.queue(move |fd| vcpu_state::Fresh::read(fd, has_xsave), false))
            .collect();
        self.fresh = reads
            .into_iter()
            .enumerate()
            .map(|(i, rx)| {
                rx.and_then(|rx| rx.recv().ok())
                    .ok_or(Error::VcpuGone(i as u8))
            })
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    /// Wakes the vCPU threads to poll for their restore jobs for a moment, each on a CPU of
    /// its own if there are CPUs enough ([`crate::affinity`]; undo the returned spread after
    /// the resume). Called as soon as the pause is known to have begun, the wake-up's
    /// latency (tens of µs here) passes while the record is decoded instead of after it.
    pub fn wake(&self) -> crate::affinity::Spread {
        let threads: Vec<_> = self.threads.iter().filter_map(|t| t.pthread()).collect();
        let spread = crate::affinity::Spread::one_cpu_each(&threads);
        for t in &self.threads {
            // Nothing to wait for: the job only wakes the thread, which then polls.
            let _ = t.queue(|_| (), true);
        }
        spread
    }

    /// Begins restoring the vCPUs of `state`, each on its own thread, while the caller goes
    /// on with the rest of the restore (a second call does nothing). The guest time they
    /// are set to is advanced to now.
    pub fn restore_vcpus(&mut self, state: &VmState) -> Result<(), Error> {
        if self.restoring.is_some() {
            return Ok(());
        }
        state.validate_vcpus()?;
        if self.threads.len() != state.vcpus.len() {
            return Err(Error::PrebuiltMismatch {
                built: self.threads.len(),
                saved: state.vcpus.len(),
            });
        }
        let tsc_advance = state.tsc_ticks(state.elapsed_ns());
        let has_xsave = self.has_xsave;
        let restoring = self
            .threads
            .iter()
            .zip(&state.vcpus)
            .enumerate()
            .map(|(i, (t, v))| {
                let set = self
                    .identities
                    .get(i)
                    .is_some_and(|id| id.cpuid == v.cpuid && id.tsc_khz == v.tsc_khz);
                let v = v.clone();
                let how = vcpu_state::RestoreHow {
                    tsc_advance,
                    has_xsave,
                    identity_set: set,
                    fresh: self.fresh.get(i).cloned().unwrap_or_default(),
                };
                let job = move |fd: &mut VcpuFd| vcpu_state::restore(fd, &v, &how);
                (i as u8, t.queue(job, true))
            })
            .collect();
        self.restoring = Some(restoring);
        Ok(())
    }
}

/// Waits for the vCPU restores begun by [`Prebuilt::restore_vcpus`].
fn vcpus_restored(restoring: Vec<(u8, Option<RestoreRx>)>) -> Result<(), Error> {
    for (index, rx) in restoring {
        rx.and_then(|rx| crate::spin::recv(&rx, crate::spin::PAUSE_SPIN))
            .ok_or(Error::VcpuGone(index))??;
    }
    Ok(())
}

/// vCPU states being captured on their own threads ([`Machine::pause_capturing`]).
pub struct VcpuCaptures(Vec<(u8, Option<CaptureRx>)>);

type CaptureRx =
    std::sync::mpsc::Receiver<Result<vcpu_state::VcpuState, vcpu_state::VcpuStateError>>;

/// The KVM VM and everything running in it.
pub struct Machine {
    vm_fd: Arc<VmFd>,
    ram: GuestRam,
    bus: Arc<PioBus>,
    vcpus: Vec<VcpuHandle>,
    msrs: Arc<MsrSet>,
    has_xsave: bool,
    /// Registers are read through the `kvm_run` area in a capture.
    sync_regs: bool,
    tsc_khz: u32,
    /// Each vCPU's identity (CPUID, TSC rate), which never changes once it ran.
    identities: Arc<Vec<VcpuIdentity>>,
    virtio: Arc<Virtio>,
}

fn build_bus(
    vm_fd: &VmFd,
    shared: &Shared,
    out: SerialOut,
    state: &PioDevicesState,
) -> Result<Arc<PioBus>, Error> {
    let evt = || EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(vm::VmError::EventFd);
    let irq = evt()?;
    vm_fd
        .register_irqfd(&irq, COM1_IRQ)
        .map_err(|e| vm::VmError::Kvm("KVM_IRQFD", e))?;
    let drained = shared
        .serial_drained
        .try_clone()
        .map_err(vm::VmError::EventFd)?;
    let serial = Serial::from_state(
        &state.serial,
        SerialResources {
            irq: EventFdTrigger::new(irq),
            input_drained: EventFdTrigger::new(drained),
            out,
            counters: shared.serial_counters.clone(),
        },
    )
    .map_err(Error::SerialDevice)?;
    let reset = evt()?;
    let i8042 = I8042::from_state(
        &state.i8042,
        EventFdTrigger::new(reset.try_clone().map_err(vm::VmError::EventFd)?),
    );
    let bus = Arc::new(PioBus {
        serial: Mutex::new(serial),
        i8042: Mutex::new(i8042),
        debug: Mutex::new(DebugPort::from_state(&state.debug_port)),
        reset_evt: reset,
        started: shared.started,
        virtio: shared.virtio.clone(),
        serial_output_failed: Default::default(),
    });
    *shared.bus.lock().unwrap_or_else(|p| p.into_inner()) = Some(bus.clone());
    Ok(bus)
}

fn spawn_all(
    fds: Vec<VcpuFd>,
    bus: &Arc<PioBus>,
    shared: &Shared,
    initial: VcpuRunState,
) -> Result<Vec<VcpuHandle>, Error> {
    fds.into_iter()
        .enumerate()
        .map(|(i, fd)| {
            VcpuHandle::spawn(i as u8, fd, bus.clone(), shared.exits.clone(), initial)
                .map_err(Error::from)
        })
        .collect()
}

impl Machine {
    /// Creates RAM and a VM, loads the kernel and starts the vCPUs running.
    pub fn boot(
        kvm: &Kvm,
        config: &VmConfig,
        out: SerialOut,
        shared: &Shared,
    ) -> Result<Self, Error> {
        let ram = memory::create(&config.memory)?;
        let vm_fd = Arc::new(vm::create_vm(kvm, &ram)?);
        let (fds, tsc_khz) = vm::create_vcpus(kvm, &vm_fd, config.cpus, config.cpu_template)?;
        let native = arch::pvm::has_native_control(&fds[0]);
        let entry = boot::load(config, &shared.virtio.cmdline(), native, &ram)?;
        vm::setup_boot_vcpu(&fds[0], &ram, entry)?;
        shared.virtio.attach(&vm_fd, &ram.mem, None)?;
        let msrs = Arc::new(MsrSet::probe(kvm, &fds[0]));
        let has_xsave = vcpu_state::xsave_usable(&vm_fd);
        let identities = fds
            .iter()
            .enumerate()
            .map(|(i, fd)| vcpu_state::identity(fd, i as u8))
            .collect::<Result<Vec<_>, _>>()?;
        let bus = build_bus(&vm_fd, shared, out, &PioDevicesState::default())?;
        let vcpus = spawn_all(fds, &bus, shared, VcpuRunState::Running)?;
        let sync_regs = vcpu_state::sync_regs_usable(&vm_fd);
        Ok(Self {
            vm_fd,
            ram,
            bus,
            vcpus,
            msrs,
            has_xsave,
            sync_regs,
            tsc_khz,
            identities: Arc::new(identities),
            virtio: shared.virtio.clone(),
        })
    }

    /// Builds a new VM over `ram` (mapped from the memfds the captured VM ran on) and
    /// restores `state` into it. The vCPUs start paused; call [`Machine::resume`].
    pub fn restore(
        kvm: &Kvm,
        state: &VmState,
        ram: GuestRam,
        out: SerialOut,
        shared: &Shared,
    ) -> Result<Self, Error> {
        // `restore_into` validates the state (once) before it touches the vCPUs.
        let prebuilt = Prebuilt::new(kvm, ram, state.vcpus.len(), &[])?;
        Self::restore_into(prebuilt, state, out, shared)
    }

    /// Restores `state` into a machine built beforehand (a transfer builds it while the
    /// guest still runs elsewhere). The vCPUs start paused; call [`Machine::resume`].
    pub fn restore_into(
        mut prebuilt: Prebuilt,
        state: &VmState,
        out: SerialOut,
        shared: &Shared,
    ) -> Result<Self, Error> {
        state.validate(shared.virtio.slots.len())?;
        let t2 = Instant::now();
        let mut laps = crate::laps::Laps::start("restore into");
        prebuilt.restore_vcpus(state)?;
        let Prebuilt {
            vm_fd,
            threads,
            ram,
            has_xsave,
            restoring,
            ..
        } = prebuilt;
        // While the vCPU threads restore their vCPUs.
        let bus = build_bus(&vm_fd, shared, out, &state.devices)?;
        laps.mark("bus");
        vcpus_restored(restoring.unwrap_or_default())?;
        let identities: Vec<VcpuIdentity> = state.vcpus.iter().map(|v| v.identity()).collect();
        laps.mark("vcpus");
        fault::inject(Step::Vcpus)?;
        let t3 = Instant::now();
        // After the local APICs: an interrupt the IOAPIC's state delivers must find them set.
        vm_state::restore(&vm_fd, &state.kvm, state.elapsed_ns())?;
        laps.mark("vm state");
        // The MSRs worth saving are the ones the captured state has.
        let msrs = Arc::new(MsrSet::from_indices(
            state
                .vcpus
                .first()
                .map(|v| v.msrs.iter().map(|m| m.index).collect())
                .unwrap_or_default(),
        ));
        let tsc_khz = state.vcpus.first().map(|v| v.tsc_khz).unwrap_or(0);
        shared
            .virtio
            .attach(&vm_fd, &ram.mem, Some(&state.virtio))?;
        laps.mark("virtio");
        let vcpus = threads
            .into_iter()
            .map(|t| {
                t.start(bus.clone(), shared.exits.clone())
                    .map_err(Error::from)
            })
            .collect::<Result<Vec<_>, Error>>()?;
        laps.mark("threads");
        laps.log();
        fault::inject(Step::Devices)?;
        log::debug!(
            "restore: vCPUs {:?}, VM state + devices {:?}",
            t3 - t2,
            t3.elapsed()
        );
        let sync_regs = vcpu_state::sync_regs_usable(&vm_fd);
        Ok(Self {
            vm_fd,
            ram,
            bus,
            vcpus,
            msrs,
            has_xsave,
            sync_regs,
            tsc_khz,
            identities: Arc::new(identities),
            virtio: shared.virtio.clone(),
        })
    }

    /// Stops every vCPU and waits for it (a capture then completes an I/O instruction a vCPU
    /// stopped in).
    pub fn pause(&self) {
        for v in &self.vcpus {
            v.request(VcpuRunState::Paused);
        }
        for v in &self.vcpus {
            v.wait_for(VcpuRunState::Paused);
        }
    }

    /// Lets every vCPU run again.
    pub fn resume(&self) {
        for v in &self.vcpus {
            v.request(VcpuRunState::Running);
        }
    }

    /// Lets every vCPU run again and waits until they all do; returns the wall-clock ns
    /// when the last one went back into the guest (the end of a pause as the guest sees
    /// it, thread wake-up included).
    pub fn resume_confirmed(&self) -> u64 {
        self.resume();
        self.vcpus
            .iter()
            .filter_map(|v| v.wait_running())
            .max()
            .unwrap_or_else(crate::state::now_ns)
    }

    /// Queues a state capture on every vCPU thread: each runs as soon as its vCPU parks.
    pub fn queue_captures(&self) -> VcpuCaptures {
        VcpuCaptures(
            self.vcpus
                .iter()
                .map(|v| {
                    let msrs = self.msrs.clone();
                    let how = vcpu_state::CaptureHow {
                        has_xsave: self.has_xsave,
                        sync_regs: self.sync_regs,
                    };
                    let index = v.index;
                    let ids = self.identities.clone();
                    let rx = v.queue(move |fd| {
                        let known = ids.get(usize::from(index));
                        vcpu_state::capture(fd, index, &msrs, how, known)
                    });
                    (index, rx)
                })
                .collect(),
        )
    }

    /// Pauses with the vCPU captures queued first: every vCPU thread saves its own state
    /// the moment it stops (in parallel, with no second wake-up).
    pub fn pause_capturing(&self) -> VcpuCaptures {
        let captures = self.queue_captures();
        self.pause();
        captures
    }

    /// Captures the whole VM. The machine must be paused.
    pub fn capture(&self) -> Result<VmState, Error> {
        self.capture_with(self.queue_captures())
    }

    /// Captures the whole VM, the vCPUs' states from `captures`. The machine must be paused.
    pub fn capture_with(&self, captures: VcpuCaptures) -> Result<VmState, Error> {
        // The VM-wide state first, while the vCPU threads capture theirs.
        let kvm = vm_state::capture(&self.vm_fd)?;
        let devices = PioDevicesState {
            serial: self
                .bus
                .serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .state(),
            i8042: self
                .bus
                .i8042
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .state(),
            debug_port: self
                .bus
                .debug
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .state(),
        };
        let virtio = self.virtio.states();
        let mut vcpus = Vec::with_capacity(captures.0.len());
        for (index, rx) in captures.0 {
            let state = rx
                .and_then(|rx| crate::spin::recv(&rx, crate::spin::PAUSE_SPIN))
                .ok_or(Error::VcpuGone(index))??;
            vcpus.push(state);
        }
        Ok(VmState {
            vcpus,
            kvm,
            devices,
            virtio,
            captured_at_ns: crate::state::now_ns(),
        })
    }

    /// Ends the vCPU threads, destroys the KVM VM and unmaps RAM; returns the RAM memfds.
    pub fn teardown(self) -> Vec<RamRegion> {
        let (regions, remains) = self.stop();
        remains.destroy();
        regions
    }

    /// Ends the vCPU threads and returns the RAM memfds at once; the KVM VM (whose
    /// destruction takes milliseconds) and the old RAM mapping are destroyed by a background
    /// thread, off the guest's pause.
    pub fn teardown_in_background(self) -> (Vec<RamRegion>, std::thread::JoinHandle<()>) {
        let (regions, remains) = self.stop();
        let handle = std::thread::Builder::new()
            .name("vm-reaper".into())
            .spawn(move || remains.destroy());
        match handle {
            Ok(h) => (regions, h),
            Err(e) => {
                log::warn!("cannot start the VM reaper thread ({e}); destroying inline");
                (regions, std::thread::spawn(|| ()))
            }
        }
    }

    fn stop(self) -> (Vec<RamRegion>, Remains) {
        let t0 = Instant::now();
        for v in self.vcpus {
            v.join();
        }
        log::debug!("teardown: vCPU threads joined in {:?}", t0.elapsed());
        self.virtio.detach();
        let GuestRam { regions, mem, .. } = self.ram;
        (
            regions,
            Remains {
                vm_fd: self.vm_fd,
                bus: self.bus,
                mem,
            },
        )
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Each vCPU's identity (CPUID, TSC rate).
    pub fn identities(&self) -> &[VcpuIdentity] {
        &self.identities
    }

    /// TSC frequency in kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }
}

/// What is left of a stopped machine: destroyed in this order (the KVM VM still refers to
/// the RAM mapping until it is gone).
struct Remains {
    vm_fd: Arc<VmFd>,
    bus: Arc<PioBus>,
    mem: arch::GuestMemory,
}

impl Remains {
    fn destroy(self) {
        let t0 = Instant::now();
        drop(self.vm_fd);
        let t1 = Instant::now();
        drop(self.bus);
        drop(self.mem);
        log::debug!(
            "teardown: KVM VM destroyed in {:?}, RAM unmapped in {:?}",
            t1 - t0,
            t1.elapsed()
        );
    }
}
