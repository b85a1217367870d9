//! `VmState`: everything needed to rebuild a running VM in a new KVM VM, possibly in another
//! process — vCPUs, VM-wide KVM state and every device model. (RAM's layout and the devices'
//! backends are parts of their own, see [`crate::components`].)

use std::time::{SystemTime, UNIX_EPOCH};

use arch::vcpu_state::VcpuState;
use arch::vm_state::VmKvmState;
use devices::debug_port::DebugPortState;
use devices::i8042::I8042State;
use devices::serial::SerialState;
use serde::{Deserialize, Serialize};

/// Record kind of a [`VmState`] in a `cpr` record.
pub const VM_STATE_KIND: &str = "vm-state";

/// State of the port-I/O devices.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PioDevicesState {
    /// COM1.
    pub serial: SerialState,
    /// Keyboard controller.
    pub i8042: I8042State,
    /// Debug port.
    pub debug_port: DebugPortState,
}

/// The whole VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    /// Per-vCPU KVM state, in index order.
    pub vcpus: Vec<VcpuState>,
    /// PIC, IOAPIC, PIT, clock.
    pub kvm: VmKvmState,
    /// Port-I/O devices.
    #[serde(default)]
    pub devices: PioDevicesState,
    /// virtio transports and device models, in window order.
    #[serde(default)]
    pub virtio: Vec<crate::virtio::SlotState>,
    /// Host wall-clock time of the capture (ns since the epoch): the restorer advances guest
    /// time by the time that passed since.
    pub captured_at_ns: u64,
}

/// Now, in ns since the epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A captured state that cannot describe a VM; nothing is touched in KVM.
#[derive(Debug, thiserror::Error)]
pub enum InvalidState {
    /// No vCPU at all.
    #[error("the state has no vCPU")]
    NoVcpu,
    /// More vCPUs than molt supports.
    #[error("the state has {0} vCPUs, more than {MAX_VCPUS}")]
    TooManyVcpus(usize),
    /// vCPU indices are not 0, 1, 2, …
    #[error("vCPU {position} of the state has index {index}")]
    VcpuIndex {
        /// Position in the list.
        position: usize,
        /// Index it claims.
        index: u8,
    },
    /// A vCPU without a TSC frequency (guest time could not be advanced).
    #[error("vCPU {0} has no TSC frequency")]
    NoTscFrequency(u8),
    /// The vCPUs disagree on the TSC frequency.
    #[error("vCPU {index} runs its TSC at {khz} kHz, vCPU 0 at {first} kHz")]
    TscMismatch {
        /// The vCPU.
        index: u8,
        /// Its frequency.
        khz: u32,
        /// vCPU 0's.
        first: u32,
    },
    /// The virtio states do not match the devices.
    #[error("the state has {saved} virtio devices, the VM has {configured}")]
    VirtioCount {
        /// In the state.
        saved: usize,
        /// Configured.
        configured: usize,
    },
}

/// Most vCPUs a VM may have (APIC IDs of an xAPIC, less the broadcast ID).
pub const MAX_VCPUS: usize = 254;

impl VmState {
    /// Checks what can be checked before touching KVM: the vCPU list and its TSC frequency,
    /// and that the virtio states match the `virtio_devices` configured.
    pub fn validate(&self, virtio_devices: usize) -> Result<(), InvalidState> {
        self.validate_vcpus()?;
        if self.virtio.len() != virtio_devices {
            return Err(InvalidState::VirtioCount {
                saved: self.virtio.len(),
                configured: virtio_devices,
            });
        }
        Ok(())
    }

    /// Checks the vCPU list and its TSC frequency.
    pub fn validate_vcpus(&self) -> Result<(), InvalidState> {
        let first = self.vcpus.first().ok_or(InvalidState::NoVcpu)?;
        if self.vcpus.len() > MAX_VCPUS {
            return Err(InvalidState::TooManyVcpus(self.vcpus.len()));
        }
        for (position, v) in self.vcpus.iter().enumerate() {
            if usize::from(v.index) != position {
                return Err(InvalidState::VcpuIndex {
                    position,
                    index: v.index,
                });
            }
            if v.tsc_khz == 0 {
                return Err(InvalidState::NoTscFrequency(v.index));
            }
            if v.tsc_khz != first.tsc_khz {
                return Err(InvalidState::TscMismatch {
                    index: v.index,
                    khz: v.tsc_khz,
                    first: first.tsc_khz,
                });
            }
        }
        Ok(())
    }

    /// Nanoseconds since the capture (0 if the host clock went backwards).
    pub fn elapsed_ns(&self) -> u64 {
        now_ns().saturating_sub(self.captured_at_ns)
    }

    /// TSC ticks in `ns` at this VM's TSC rate.
    pub fn tsc_ticks(&self, ns: u64) -> u64 {
        let khz = self.vcpus.first().map(|v| v.tsc_khz).unwrap_or(0);
        (u128::from(ns) * u128::from(khz) / 1_000_000) as u64
    }
}
