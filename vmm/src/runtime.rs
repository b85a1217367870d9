//! The VMM's control plane: owns the machine and carries out pause, resume, capture,
//! in-process rebuild and shutdown, keeping the counters `vm.info` reports.

use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

use std::fs::File;
use std::path::PathBuf;

use crate::config::VmConfig;
use crate::exit::VmExit;
use crate::machine::{Machine, Shared};
use crate::serial_backend::SerialOut;
use crate::state::{now_ns, VmState};
use crate::update::UpdateHistory;
use crate::Error;

/// Run state as `vm.info` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// vCPUs executing.
    Running,
    /// vCPUs parked.
    Paused,
}

/// Counters reported by `vm.info`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    /// Successful pauses.
    pub pauses: u64,
    /// Successful resumes.
    pub resumes: u64,
    /// State captures.
    pub captures: u64,
    /// Rebuilds of the KVM VM from captured state.
    pub rebuilds: u64,
    /// Bytes the guest wrote to the serial port.
    pub serial_out_bytes: u64,
}

/// `GET /api/v1/vm.info`.
#[derive(Clone, Debug, Serialize)]
pub struct VmInfo {
    /// Running or paused.
    pub state: RunState,
    /// Process id.
    pub pid: u32,
    /// molt's version.
    pub version: &'static str,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Guest RAM.
    pub memory: MemoryInfo,
    /// TSC frequency in kHz.
    pub tsc_khz: u32,
    /// CPU template (`--cpu-template`, resolved; kept across live updates).
    pub cpu_template: &'static str,
    /// Since the VM booted (across updates).
    pub uptime_ms: u64,
    /// The binary running the VM.
    pub binary: PathBuf,
    /// Counters.
    pub counters: Counters,
    /// virtio devices, in window order.
    pub devices: Vec<crate::virtio::DeviceInfo>,
    /// Live updates so far.
    pub updates: UpdatesInfo,
    /// The snapshot being written, while one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<crate::snapshot::status::ProgressInfo>,
    /// How far RAM is back, in a molt restored from a snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<crate::snapshot::status::RestoreInfo>,
}

/// Guest RAM in `vm.info`.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryInfo {
    /// Bytes.
    pub size: u64,
    /// Backed by 2 MiB huge pages.
    pub hugepages: bool,
    /// Regions.
    pub regions: Vec<crate::memory_persist::MemoryRegionState>,
}

/// Updates in `vm.info`.
#[derive(Clone, Debug, Serialize)]
pub struct UpdatesInfo {
    /// Updates that completed on the new binary.
    pub count: u64,
    /// Updates rolled back.
    pub rollbacks: u64,
    /// The last update's report.
    pub last: Option<crate::update::UpdateReport>,
}

/// Phase timings of one rebuild.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RebuildReport {
    /// Pausing all vCPUs.
    pub pause_ms: f64,
    /// Capturing state.
    pub capture_ms: f64,
    /// Tearing down the old VM.
    pub teardown_ms: f64,
    /// Creating the new VM and restoring state.
    pub restore_ms: f64,
    /// Resuming vCPUs.
    pub resume_ms: f64,
    /// Pause to resume, as the guest sees it.
    pub total_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Who this VMM process is, for live updates: its binary and how it was started.
#[derive(Debug)]
pub struct Identity {
    /// The argv the VM was started with (the default for an update).
    pub argv: Vec<String>,
    /// Path of the running binary.
    pub exe: PathBuf,
    /// The running binary, open: an update can roll back to it even if the file at `exe`
    /// was replaced meanwhile.
    pub exe_file: Option<File>,
    /// Wall-clock ns when the VM booted.
    pub booted_at_ns: u64,
}

impl Identity {
    /// This process: argv from the command line, the binary from /proc/self/exe.
    pub fn current() -> Self {
        // The path of the binary, even if the file there was replaced since it started
        // (the kernel then reports "<path> (deleted)"): an update re-executes that path.
        let exe = std::env::current_exe()
            .map(|p| {
                let s = p.to_string_lossy();
                match s.strip_suffix(" (deleted)") {
                    Some(path) => PathBuf::from(path),
                    None => p,
                }
            })
            .unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
        Self {
            argv: std::env::args().collect(),
            exe_file: File::open("/proc/self/exe")
                .map_err(|e| log::warn!("cannot open /proc/self/exe: {e}"))
                .ok(),
            exe,
            booted_at_ns: now_ns(),
        }
    }
}

/// What the VMM keeps about itself across handoffs: who it is, its counters, its updates.
#[derive(Debug)]
pub struct Bookkeeping {
    /// Counters for `vm.info`.
    pub counters: Counters,
    /// Process identity for updates.
    pub identity: Identity,
    /// Updates so far.
    pub history: UpdateHistory,
}

impl Bookkeeping {
    /// A freshly booted VMM's.
    pub fn new() -> Self {
        Self {
            counters: Counters::default(),
            identity: Identity::current(),
            history: UpdateHistory::default(),
        }
    }
}

impl Default for Bookkeeping {
    fn default() -> Self {
        Self::new()
    }
}

/// The VMM: configuration, KVM handle, the machine, and bookkeeping.
pub struct Vmm {
    kvm: Kvm,
    config: VmConfig,
    machine: Option<Machine>,
    serial_out: SerialOut,
    /// State shared with the event loop.
    pub shared: Shared,
    paused: bool,
    /// Counters for `vm.info`.
    pub counters: Counters,
    /// Process identity for updates.
    pub identity: Identity,
    /// Updates so far.
    pub history: UpdateHistory,
    /// Destroys the previous KVM VM after a rebuild.
    reaper: Option<std::thread::JoinHandle<()>>,
}

impl Vmm {
    /// A VMM around `machine` (see [`crate::assembly::assemble`]). A paused machine keeps its
    /// devices quiesced until [`Vmm::resume`].
    pub fn new(
        kvm: Kvm,
        config: VmConfig,
        machine: Machine,
        serial_out: SerialOut,
        shared: Shared,
        book: Bookkeeping,
        paused: bool,
    ) -> Self {
        if paused {
            shared.virtio.quiesce(true);
        }
        Self {
            kvm,
            config,
            machine: Some(machine),
            serial_out,
            shared,
            paused,
            counters: book.counters,
            identity: book.identity,
            history: book.history,
            reaper: None,
        }
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The serial output sink.
    pub fn serial_out(&self) -> &SerialOut {
        &self.serial_out
    }

    /// Faults guest RAM into this process on a background thread (after a restore, so the
    /// guest does not take those faults itself).
    pub fn populate_in_background(&self) {
        let Some(m) = &self.machine else { return };
        let ranges = m.ram().host_ranges();
        let spawned = std::thread::Builder::new()
            .name("prefault".into())
            .spawn(move || crate::memory::populate(&ranges));
        if let Err(e) = spawned {
            log::debug!("prefault thread: {e}");
        }
    }

    /// The machine, if one runs.
    pub fn machine_ref(&self) -> Option<&Machine> {
        self.machine.as_ref()
    }

    fn machine(&self) -> Result<&Machine, Error> {
        self.machine.as_ref().ok_or(Error::NoMachine)
    }

    /// Pauses every vCPU (no-op when already paused).
    pub fn pause(&mut self) -> Result<(), Error> {
        if !self.paused {
            self.machine()?.pause();
            self.shared.virtio.quiesce(true);
            self.paused = true;
            self.counters.pauses += 1;
        }
        Ok(())
    }

    /// Pauses with a state capture queued on every vCPU thread first (each vCPU saves its
    /// own state the moment it stops); collect them with [`Machine::capture_with`].
    pub fn pause_capturing(&mut self) -> Result<crate::machine::VcpuCaptures, Error> {
        if self.paused {
            return Ok(self.machine()?.queue_captures());
        }
        let captures = self.machine()?.pause_capturing();
        self.shared.virtio.quiesce(true);
        self.paused = true;
        self.counters.pauses += 1;
        Ok(captures)
    }

    /// Resumes every vCPU (no-op when running).
    pub fn resume(&mut self) -> Result<(), Error> {
        if self.paused {
            self.shared.virtio.quiesce(false);
            self.machine()?.resume();
            self.paused = false;
            self.counters.resumes += 1;
        }
        Ok(())
    }

    /// Resumes every vCPU and waits until they run; returns the wall-clock ns when the last
    /// one went back into the guest (now, if the VM was not paused).
    pub fn resume_confirmed(&mut self) -> Result<u64, Error> {
        if !self.paused {
            return Ok(now_ns());
        }
        self.shared.virtio.quiesce(false);
        let at = self.machine()?.resume_confirmed();
        self.paused = false;
        self.counters.resumes += 1;
        Ok(at)
    }

    /// Current run state.
    pub fn run_state(&self) -> RunState {
        if self.paused {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    /// Captures the VM; pauses it first if needed and leaves it as it was.
    pub fn capture(&mut self) -> Result<VmState, Error> {
        let was_paused = self.paused;
        self.pause()?;
        let state = self.machine()?.capture();
        if !was_paused {
            self.resume()?;
        }
        self.counters.captures += 1;
        state
    }

    /// Rehearsal of a live update inside this process: pause, capture, destroy the KVM VM,
    /// build a new one over the same memfds (mapped at new addresses), restore, resume.
    pub fn rebuild(&mut self) -> Result<RebuildReport, Error> {
        self.reap();
        let t0 = Instant::now();
        let was_paused = self.paused;
        self.pause()?;
        let t1 = Instant::now();
        let state = self.machine()?.capture()?;
        let t2 = Instant::now();
        let machine = self.machine.take().ok_or(Error::NoMachine)?;
        let (regions, reaper) = machine.teardown_in_background();
        self.reaper = Some(reaper);
        let t3 = Instant::now();
        let out = self.serial_out.try_clone().map_err(Error::SerialClone)?;
        let ram = crate::memory::map_regions(regions, false)?;
        let machine = Machine::restore(&self.kvm, &state, ram, out, &self.shared)?;
        let t4 = Instant::now();
        self.machine = Some(machine);
        self.counters.rebuilds += 1;
        self.counters.captures += 1;
        self.paused = true;
        if !was_paused {
            self.resume()?;
            self.counters.resumes -= 1;
        }
        // Input that waited while the devices were rebuilt can flow again.
        let _ = self.shared.serial_drained.write(1);
        let t5 = Instant::now();
        Ok(RebuildReport {
            pause_ms: ms(t1 - t0),
            capture_ms: ms(t2 - t1),
            teardown_ms: ms(t3 - t2),
            restore_ms: ms(t4 - t3),
            resume_ms: ms(t5 - t4),
            total_ms: ms(t5 - t0),
        })
    }

    /// The `vm.info` document.
    pub fn info(&self) -> VmInfo {
        let mut counters = self.counters.clone();
        counters.serial_out_bytes = self
            .shared
            .serial_counters
            .out_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        let (regions, vcpus, tsc_khz) = match &self.machine {
            Some(m) => (m.ram().layout(), m.vcpu_count(), m.tsc_khz()),
            None => (Vec::new(), 0, 0),
        };
        VmInfo {
            state: self.run_state(),
            pid: std::process::id(),
            version: crate::VERSION,
            vcpus,
            memory: MemoryInfo {
                size: self.config.memory.size,
                hugepages: self.config.memory.hugepages,
                regions,
            },
            tsc_khz,
            cpu_template: self.config.cpu_template.name(),
            uptime_ms: now_ns().saturating_sub(self.identity.booted_at_ns) / 1_000_000,
            binary: self.identity.exe.clone(),
            counters,
            devices: self.shared.virtio.info(),
            updates: UpdatesInfo {
                count: self.history.updates,
                rollbacks: self.history.rollbacks,
                last: self.history.last.clone(),
            },
            snapshot: crate::snapshot::status::snapshot(),
            restore: crate::snapshot::status::restore(),
        }
    }

    /// Waits for the previous KVM VM's destruction to finish.
    fn reap(&mut self) {
        if let Some(r) = self.reaper.take() {
            if r.join().is_err() {
                log::error!("the VM reaper thread panicked");
            }
        }
    }

    /// Stops the machine: every vCPU thread joined, the VM destroyed.
    pub fn shutdown(mut self) {
        if let Some(m) = self.machine.take() {
            drop(m.teardown());
        }
        self.reap();
    }

    /// How the VM ended, if it did.
    pub fn ended(&self) -> Option<VmExit> {
        self.shared.exits.reason()
    }
}
