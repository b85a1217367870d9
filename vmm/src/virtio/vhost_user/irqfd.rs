//! Binding a vhost-user device's call eventfd to a KVM VM's interrupt, and unbinding it.
//!
//! The call eventfd outlives every KVM VM the device serves, but KVM (since Linux 6.17) binds
//! an eventfd as irqfd to one VM at a time: a second KVM_IRQFD on it fails with EBUSY while
//! another binding exists, in any VM. So the binding is undone synchronously (KVM_IRQFD with
//! DEASSIGN waits for KVM's cleanup) whenever the VMM pauses the devices — before a handoff
//! hands the eventfd to another VM — and made again when they resume. A restored VM binds
//! when it is resumed, not when it is built. Interrupts the backend raises meanwhile are
//! counted by the eventfd and injected when it is bound again.
//!
//! EBUSY therefore only means that a VM molt no longer holds still has the binding: one
//! whose process died without unbinding (a rollback after a crash), whose last reference
//! the kernel drops a moment later. The binding waits for that, briefly.

use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// How long a binding waits for another VM's binding to go.
const BUSY_WAIT: Duration = Duration::from_secs(2);

/// Binds `evt` as the irqfd of `gsi` in `vm`, waiting up to [`BUSY_WAIT`] while it is still
/// bound elsewhere; returns how many times it found it bound.
pub fn bind(vm: &VmFd, evt: &EventFd, gsi: u32) -> Result<u32, kvm_ioctls::Error> {
    let deadline = Instant::now() + BUSY_WAIT;
    let mut busy = 0;
    loop {
        match vm.register_irqfd(evt, gsi) {
            Err(e) if e.errno() == libc::EBUSY && Instant::now() < deadline => {
                busy += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
            Ok(()) => {
                if busy > 0 {
                    log::debug!("vhost-user: irqfd of GSI {gsi} was bound elsewhere {busy} times");
                }
                return Ok(busy);
            }
        }
    }
}

/// Unbinds `evt` from `gsi` in `vm`; KVM has let go of the eventfd when this returns.
pub fn unbind(vm: &VmFd, evt: &EventFd, gsi: u32) -> Result<(), kvm_ioctls::Error> {
    vm.unregister_irqfd(evt, gsi)
}
