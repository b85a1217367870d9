//! The native-execution control of this project's PVM hosts.
//!
//! Some PVM builds of KVM (a fork seen on the development hosts) run guest code that is not
//! PVM-aware in KVM's instruction emulator unless the guest sets bit 0 of a control MSR, after
//! which the vCPU runs natively (see `resources/guest/src/native.rs` for what the guest must
//! do). molt only needs to know two things: whether the host has the MSR, so that the
//! embedded test guest can be told, and that the MSR is vCPU state KVM does not list in
//! KVM_GET_MSR_INDEX_LIST, so [`crate::vcpu_state`] captures and restores it itself.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

/// Reads [`SIGNATURE`] on hosts that have the control MSR; read-only.
pub const SIGNATURE_MSR: u32 = 0x4b56_4d11;
/// "PVM".
pub const SIGNATURE: u64 = 0x4d_5650;
/// The control MSR (bit 0: run natively).
pub const CONTROL_MSR: u32 = 0x4b56_4d10;

/// Whether this host's KVM has the native-execution control MSR (read through `vcpu`; on
/// other hosts KVM_GET_MSRS reads no entry).
pub fn has_native_control(vcpu: &VcpuFd) -> bool {
    let Ok(mut msrs) = Msrs::from_entries(&[kvm_msr_entry {
        index: SIGNATURE_MSR,
        ..Default::default()
    }]) else {
        return false;
    };
    matches!(vcpu.get_msrs(&mut msrs), Ok(1)) && msrs.as_slice()[0].data == SIGNATURE
}
