//! Interrupts, for `molt.idle=halt`: the BSP sleeps in `hlt` when it has nothing to do and
//! wakes on a device interrupt or its local APIC timer, as an OS's idle loop does.
//!
//! - The local APIC is enabled; its timer (one-shot, [`TIMER_VECTOR`]) is armed for the next
//!   deadline before each halt.
//! - Every device interrupt line in use is routed through the I/O APIC, edge-triggered, to the
//!   BSP on [`DEVICE_VECTOR`]; the handler records that a device interrupt came, and the drivers
//!   then read and acknowledge their devices' InterruptStatus, as Linux's virtio-mmio driver does.
//! - On a PVM host running natively, interrupts are not delivered (see native.rs), so each halt
//!   switches the CPU back to the emulator first (emulated IDT, native bit cleared), and back to
//!   native execution once woken: ~70 µs per halt, measured.
//!
//! Interrupts are enabled only between `sti` and `hlt`; the `sti` shadow makes that pair atomic,
//! so an interrupt raised after the last check of the rings wakes the `hlt` at once. Natively
//! the CPU's own flag does not keep them out: with two vCPUs, device interrupts also reach the
//! boot CPU while it runs natively (with one, none did), through the native IDT's gates for
//! the same handlers, which is harmless.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, Ordering};

/// Vector of the local APIC timer.
pub const TIMER_VECTOR: usize = 0x20;
/// Vector of every device interrupt.
pub const DEVICE_VECTOR: usize = 0x21;

const LAPIC: u64 = 0xfee0_0000;
const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INITIAL: u64 = 0x380;
const LAPIC_TIMER_DIVIDE: u64 = 0x3e0;
/// Software-enabled, spurious vector 0xff.
const SVR_ENABLE: u32 = 0x1ff;
/// Divide by 1 (KVM's APIC bus runs at 1 GHz: one count per ns).
const DIVIDE_BY_1: u32 = 0xb;

const IOAPIC: u64 = 0xfec0_0000;
const IOAPIC_WINDOW: u64 = 0x10;
const IOAPIC_REDIRECTION: u32 = 0x10;
const IOAPIC_PINS: u32 = 24;

/// Set by the device interrupt's handler, taken by [`take_device`].
static DEVICE: AtomicBool = AtomicBool::new(false);

// The handlers: the device one records the interrupt; both end it at the local APIC.
global_asm!(
    ".pushsection .text.irq, \"ax\"",
    ".global molt_irq_timer",
    ".global molt_irq_device",
    "molt_irq_device:",
    "    movb $1, {device}(%rip)",
    "molt_irq_timer:",
    "    pushq %rax",
    "    movabsq ${eoi}, %rax",
    "    movl $0, (%rax)",
    "    popq %rax",
    "    iretq",
    ".popsection",
    device = sym DEVICE,
    eoi = const LAPIC + LAPIC_EOI,
    options(att_syntax)
);

extern "C" {
    fn molt_irq_timer();
    fn molt_irq_device();
}

/// The handlers' addresses, by vector, for the IDTs.
pub fn handlers() -> [(usize, u64); 2] {
    [
        (TIMER_VECTOR, molt_irq_timer as usize as u64),
        (DEVICE_VECTOR, molt_irq_device as usize as u64),
    ]
}

fn lapic_write(reg: u64, value: u32) {
    // SAFETY: the local APIC's page lies in the identity-mapped first 4 GiB; an aligned
    // 32-bit access to one of its registers is an access KVM's APIC emulates.
    unsafe { core::ptr::write_volatile((LAPIC + reg) as *mut u32, value) }
}

fn ioapic_write(reg: u32, value: u32) {
    // SAFETY: as for the local APIC: the I/O APIC's select and window registers, 32-bit.
    unsafe {
        core::ptr::write_volatile(IOAPIC as *mut u32, reg);
        core::ptr::write_volatile((IOAPIC + IOAPIC_WINDOW) as *mut u32, value);
    }
}

/// Enables this CPU's local APIC and sets up its timer (not armed).
pub fn init() {
    lapic_write(LAPIC_SVR, SVR_ENABLE);
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_TIMER_DIVIDE, DIVIDE_BY_1);
    lapic_write(LAPIC_LVT_TIMER, TIMER_VECTOR as u32);
}

/// Routes I/O APIC pin `gsi` to CPU `apic_id` on [`DEVICE_VECTOR`], edge-triggered.
/// False when the pin does not exist.
pub fn route(gsi: u32, apic_id: u8) -> bool {
    if gsi >= IOAPIC_PINS {
        return false;
    }
    ioapic_write(IOAPIC_REDIRECTION + 2 * gsi + 1, u32::from(apic_id) << 24);
    // Fixed delivery, physical destination, active high, edge, unmasked.
    ioapic_write(IOAPIC_REDIRECTION + 2 * gsi, DEVICE_VECTOR as u32);
    true
}

/// Whether a device interrupt came since the last call.
pub fn take_device() -> bool {
    DEVICE.swap(false, Ordering::Acquire)
}

/// Sleeps until an interrupt: a device's, or the timer's after `ns` nanoseconds.
pub fn halt(ns: u64, native: bool) {
    lapic_write(LAPIC_TIMER_INITIAL, ns.clamp(1, u64::from(u32::MAX)) as u32);
    if native {
        crate::boot::load_idt(false);
        crate::native::set_emulated(true);
    }
    // SAFETY: the IDT loaded has gates for both vectors; their handlers preserve every
    // register and flag they touch (`iretq` restores RFLAGS), and interrupts are off again
    // before anything else runs.
    unsafe { asm!("sti", "hlt", "cli", options(nostack)) };
    if native {
        crate::native::set_emulated(false);
        crate::boot::load_idt(true);
    }
    lapic_write(LAPIC_TIMER_INITIAL, 0);
}
