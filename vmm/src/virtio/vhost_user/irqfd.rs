//! Binding a vhost-user device's call eventfd to a KVM VM's interrupt, and unbinding it.
//!
//! The call eventfd outlives every KVM VM the device serves, but KVM binds an eventfd as
//! irqfd to one VM at a time (a second KVM_IRQFD on it fails with EBUSY while the first
//! binding exists, and a closed VM releases its bindings asynchronously). So the binding is
//! undone synchronously (KVM_IRQFD with DEASSIGN flushes KVM's cleanup) whenever the VMM
//! pauses the devices — before a handoff hands the eventfd to another VM — and made again
//! when they resume here. Interrupts the backend raises meanwhile are counted by the eventfd
//! and injected when it is bound again.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_irqfd, KVM_IRQFD_FLAG_DEASSIGN};
use vmm_sys_util::eventfd::EventFd;

/// `_IOW(KVMIO, 0x76, struct kvm_irqfd)`.
const KVM_IRQFD: libc::c_ulong = 0x4020_ae76;
const _: () = assert!(std::mem::size_of::<kvm_irqfd>() == 32);

/// How long a binding waits for another VM's binding to go (a VM that just closed releases
/// its irqfds from a kernel work queue).
const BUSY_WAIT: Duration = Duration::from_secs(2);

/// Binds (`assign`) or unbinds `evt` as the irqfd of `gsi` in the VM `vm`; a binding waits
/// up to [`BUSY_WAIT`] while the eventfd is still bound elsewhere.
pub fn set(vm: RawFd, evt: &EventFd, gsi: u32, assign: bool) -> io::Result<()> {
    let deadline = Instant::now() + BUSY_WAIT;
    loop {
        match ioctl(vm, evt, gsi, assign) {
            Err(e) if assign && e.raw_os_error() == Some(libc::EBUSY) => {
                if Instant::now() >= deadline {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            r => return r,
        }
    }
}

fn ioctl(vm: RawFd, evt: &EventFd, gsi: u32, assign: bool) -> io::Result<()> {
    let arg = kvm_irqfd {
        fd: evt.as_raw_fd() as u32,
        gsi,
        flags: if assign { 0 } else { KVM_IRQFD_FLAG_DEASSIGN },
        ..Default::default()
    };
    // SAFETY: KVM_IRQFD reads one kvm_irqfd, which lives across the call; `vm` is a KVM VM
    // fd the caller keeps open.
    let rc = unsafe { libc::ioctl(vm, KVM_IRQFD as _, &arg) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
