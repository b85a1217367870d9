//! `VmState`: everything needed to rebuild a running VM in a new KVM VM, possibly in another
//! process — vCPUs, VM-wide KVM state, the memory layout and every device.

use std::time::{SystemTime, UNIX_EPOCH};

use arch::vcpu_state::VcpuState;
use arch::vm_state::VmKvmState;
use devices::debug_port::DebugPortState;
use devices::i8042::I8042State;
use devices::serial::SerialState;
use serde::{Deserialize, Serialize};

/// Record kind of a [`VmState`] in a `cpr` record.
pub const VM_STATE_KIND: &str = "vm-state";

/// One guest RAM region: where it sits and which preserved memfd backs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionState {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Backed by 2 MiB hugetlb pages.
    #[serde(default)]
    pub hugepages: bool,
    /// Name of the memfd in the preserved-fd registry (`ram0`, `ram1`, …).
    pub memfd: String,
}

/// State of the port-I/O devices.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DevicesState {
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
    /// Guest RAM layout.
    pub memory: Vec<MemoryRegionState>,
    /// Devices.
    #[serde(default)]
    pub devices: DevicesState,
    /// virtio devices, in window order.
    #[serde(default)]
    pub virtio: Vec<crate::virtio::VirtioDeviceState>,
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

impl VmState {
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
