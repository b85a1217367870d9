//! Capture and restore of VM-wide KVM state: the in-kernel PIC pair, IOAPIC, PIT and the
//! KVM clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::blob::Blob;

/// VM-wide interrupt controller, timer and clock state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmKvmState {
    /// Master 8259.
    pub pic_master: Box<Blob<kvm_irqchip>>,
    /// Slave 8259.
    pub pic_slave: Box<Blob<kvm_irqchip>>,
    /// IOAPIC.
    pub ioapic: Box<Blob<kvm_irqchip>>,
    /// 8254 PIT.
    pub pit: Blob<kvm_pit_state2>,
    /// kvmclock base (nanoseconds of guest time).
    pub clock: Blob<kvm_clock_data>,
}

/// Errors capturing or restoring VM state.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// A KVM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
}

fn get_chip(
    vm: &VmFd,
    chip_id: u32,
    what: &'static str,
) -> Result<Box<Blob<kvm_irqchip>>, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(|e| VmStateError::Kvm(what, e))?;
    Ok(Box::new(Blob(chip)))
}

/// Reads the VM-wide state (vCPUs must be paused).
pub fn capture(vm: &VmFd) -> Result<VmKvmState, VmStateError> {
    Ok(VmKvmState {
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
        pit: Blob(
            vm.get_pit2()
                .map_err(|e| VmStateError::Kvm("KVM_GET_PIT2", e))?,
        ),
        clock: Blob(
            vm.get_clock()
                .map_err(|e| VmStateError::Kvm("KVM_GET_CLOCK", e))?,
        ),
    })
}

/// Writes the VM-wide state into a new VM (irqchip and PIT already created). The clock is
/// advanced by `elapsed_ns`, the time between capture and restore, so guest time never goes
/// backwards and keeps pace with the host.
pub fn restore(vm: &VmFd, state: &VmKvmState, elapsed_ns: u64) -> Result<(), VmStateError> {
    for (chip, what) in [
        (&state.pic_master, "KVM_SET_IRQCHIP (PIC master)"),
        (&state.pic_slave, "KVM_SET_IRQCHIP (PIC slave)"),
        (&state.ioapic, "KVM_SET_IRQCHIP (IOAPIC)"),
    ] {
        vm.set_irqchip(&chip.0)
            .map_err(|e| VmStateError::Kvm(what, e))?;
    }
    vm.set_pit2(&state.pit.0)
        .map_err(|e| VmStateError::Kvm("KVM_SET_PIT2", e))?;
    let clock = kvm_clock_data {
        clock: state.clock.clock.saturating_add(elapsed_ns),
        ..Default::default()
    };
    vm.set_clock(&clock)
        .map_err(|e| VmStateError::Kvm("KVM_SET_CLOCK", e))?;
    Ok(())
}
