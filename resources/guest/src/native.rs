//! Native execution on a PVM host (`molt.native=on`).
//!
//! KVM on the development hosts is PVM, which runs guest code that is not
//! PVM-aware in its instruction emulator (~7e5 simple loop iterations per
//! second). This host's PVM has a control MSR (0x4b564d10) whose bit 0 makes
//! the vCPU run guest code natively instead, when the guest:
//!
//! - runs in long mode on a 64-bit code segment (we always do);
//! - has the U bit at every level of its page tables: [`switch`] loads our
//!   own identity map of the first 4 GiB (2 MiB pages, `P|W|U` everywhere);
//! - takes exceptions through gates with selector 0x33 and DPL 3, on the
//!   current stack: the native IDT of boot.rs, loaded right after the switch
//!   (the GDT must describe 0x33 as 64-bit DPL-3 code, see boot.rs);
//! - reads CPUID before the switch: natively it is not intercepted and
//!   returns the host's values (no hypervisor leaves).
//!
//! Port I/O and `hlt` still exit to the VMM; `int n` must never be used. External
//! interrupts are not delivered natively on this host (a pending local APIC timer vector
//! stays in the IRR, `sti; hlt` never returns), so a guest that sleeps goes back to the
//! emulator for it ([`set_emulated`], irq.rs). Bit
//! 15 lets a plain `iretq` return to native code (the exception handlers never
//! return anyway, except the MSR probes below, which run before the switch).
//!
//! The probes (`rdmsr`/`wrmsr` of an MSR the host may not have) recover from
//! #GP: the #GP stub in boot.rs resumes a faulting `molt_rdmsr_insn` or
//! `molt_wrmsr_insn` at `molt_msr_fault`, which returns 0.

use crate::bootparams::NativeArg;
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

/// PVM signature MSR: reads [`SIGNATURE`] ("PVM") on hosts that have it.
const SIGNATURE_MSR: u32 = 0x4b56_4d11;
/// An MSR no host has (for `molt.native=test-unavailable`).
const MISSING_MSR: u32 = 0x4b56_4d1f;
const SIGNATURE: u64 = 0x4d_5650;
/// PVM control MSR.
const CONTROL_MSR: u32 = 0x4b56_4d10;
/// Bit 0: native execution; bit 10: always set; bit 15: `iretq` with the
/// frame's virtual selectors returns to native mode.
const CONTROL_NATIVE_IRET: u64 = 0x8401;
const CONTROL_NATIVE: u64 = 0x401;
const CONTROL_BIT_NATIVE: u64 = 1;
/// The control MSR's default value (emulated).
const CONTROL_DEFAULT: u64 = 0x400;
/// The control MSR's value in native mode, as read back after the switch.
static CONTROL: AtomicU64 = AtomicU64::new(0);

// u64 molt_rdmsr_safe(u32 msr, u64 *value): 1 and *value set, or 0 on #GP.
// u64 molt_wrmsr_safe(u32 msr, u64 value): 1, or 0 on #GP.
global_asm!(
    ".pushsection .text.msr, \"ax\"",
    ".global molt_rdmsr_safe",
    ".global molt_wrmsr_safe",
    ".global molt_rdmsr_insn",
    ".global molt_wrmsr_insn",
    ".global molt_msr_fault",
    "molt_rdmsr_safe:",
    "    movl %edi, %ecx",
    "molt_rdmsr_insn:",
    "    rdmsr",
    "    shlq $32, %rdx",
    "    movl %eax, %eax",
    "    orq %rdx, %rax",
    "    movq %rax, (%rsi)",
    "    movl $1, %eax",
    "    ret",
    "molt_wrmsr_safe:",
    "    movl %edi, %ecx",
    "    movl %esi, %eax",
    "    movq %rsi, %rdx",
    "    shrq $32, %rdx",
    "molt_wrmsr_insn:",
    "    wrmsr",
    "    movl $1, %eax",
    "    ret",
    "molt_msr_fault:",
    "    xorl %eax, %eax",
    "    ret",
    ".popsection",
    options(att_syntax)
);

extern "C" {
    fn molt_rdmsr_safe(msr: u32, value: *mut u64) -> u64;
    fn molt_wrmsr_safe(msr: u32, value: u64) -> u64;
}

/// Reads `msr`, or `None` if the CPU refuses (#GP).
fn rdmsr_safe(msr: u32) -> Option<u64> {
    let mut value = 0;
    // SAFETY: the probe only reads an MSR into `value`; a #GP is caught by the
    // #GP stub, which resumes at molt_msr_fault (the emulated-mode IDT must be
    // loaded, which it is on every CPU before it calls `switch`).
    let ok = unsafe { molt_rdmsr_safe(msr, &mut value) };
    (ok != 0).then_some(value)
}

/// Writes `msr`; false if the CPU refuses (#GP).
fn wrmsr_safe(msr: u32, value: u64) -> bool {
    // SAFETY: as in rdmsr_safe; the only MSR written is the PVM control MSR,
    // which changes how KVM runs this vCPU, not what memory means.
    unsafe { molt_wrmsr_safe(msr, value) != 0 }
}

/// Execution mode of a CPU, as reported on the boot and `cpu … up` lines.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Native execution is on.
    Native,
    /// Not asked for (`molt.native` absent or `off`).
    Off,
    /// Asked for, but the host has no PVM control MSR.
    Unavailable,
    /// Asked for, but the host refused the switch.
    Refused,
}

impl Mode {
    pub fn is_native(self) -> bool {
        self == Mode::Native
    }

    /// `mode=native|emulated`, plus why not native when it was asked for.
    pub fn describe(self) -> &'static [u8] {
        match self {
            Mode::Native => b"mode=native",
            Mode::Off => b"mode=emulated",
            Mode::Unavailable => b"mode=emulated native=unavailable",
            Mode::Refused => b"mode=emulated native=refused",
        }
    }
}

const PAGE_ENTRIES: usize = 512;
/// One PML4, one PDPT and four page directories: 4 GiB in 2 MiB pages.
const DIRECTORIES: usize = 4;
const PRESENT_WRITABLE_USER: u64 = 0b111;
const PAGE_2M: u64 = 1 << 7;

#[repr(C, align(4096))]
struct Tables([[u64; PAGE_ENTRIES]; 2 + DIRECTORIES]);

/// Our page tables, zeroed with .bss and filled once by the BSP.
static mut TABLES: Tables = Tables([[0; PAGE_ENTRIES]; 2 + DIRECTORIES]);

/// Fills the identity map of [0, 4 GiB) with the U bit at every level, the
/// 2 MiB pages `from..to` of it (as indices over all four directories), and
/// returns its CR3 value. Only the BSP calls it, before any AP starts.
fn fill_tables(from: usize, to: usize) -> u64 {
    let base = core::ptr::addr_of_mut!(TABLES).cast::<[u64; PAGE_ENTRIES]>();
    // SAFETY: TABLES is a static only this function writes, on the BSP before
    // any AP starts; the pointers stay inside its 6 tables. Entries the CPU
    // may already use (from an earlier call) are rewritten with equal values.
    unsafe {
        let (pml4, pdpt) = (base, base.add(1));
        (*pml4)[0] = pdpt as u64 | PRESENT_WRITABLE_USER;
        for d in 0..DIRECTORIES {
            (*pdpt)[d] = base.add(2 + d) as u64 | PRESENT_WRITABLE_USER;
        }
        for page in from..to {
            let pd = base.add(2 + page / PAGE_ENTRIES);
            (*pd)[page % PAGE_ENTRIES] = (page as u64) << 21 | PAGE_2M | PRESENT_WRITABLE_USER;
        }
        pml4 as u64
    }
}

fn load_cr3(cr3: u64) {
    // SAFETY: our tables identity-map the same first 4 GiB as the VMM's, with
    // the same memory types, at least over everything the guest has used so
    // far (see switch_bsp); everything the guest uses lies below 4 GiB.
    unsafe { asm!("mov cr3, {}", in(reg) cr3, options(nostack, preserves_flags)) };
}

/// Whether the host has the PVM control MSR (its signature MSR says "PVM").
fn host_has_control(signature_msr: u32) -> bool {
    rdmsr_safe(signature_msr) == Some(SIGNATURE)
}

/// Switches the BSP to native execution: our page tables, the control MSR,
/// the native IDT. Leaves the CPU as it was (emulated, emulated IDT) when the
/// host has no control MSR or refuses it.
pub fn switch_bsp(wanted: NativeArg) -> Mode {
    let signature_msr = match wanted {
        NativeArg::Off => return Mode::Off,
        NativeArg::On => SIGNATURE_MSR,
        NativeArg::TestUnavailable => MISSING_MSR,
    };
    if !host_has_control(signature_msr) {
        return Mode::Unavailable;
    }
    // Writing all 2048 entries costs ~20 ms in KVM's emulator: map only the
    // pages up to the end of the image (the boot data, the command line, the
    // stacks and the tables lie below it) before the switch, the rest after.
    let all = DIRECTORIES * PAGE_ENTRIES;
    let early = (crate::boot::image_end().div_ceil(1 << 21) as usize).min(all);
    load_cr3(fill_tables(0, early));
    let mode = switch_this_cpu();
    load_cr3(fill_tables(early, all));
    mode
}

/// Switches an AP (already on the BSP's page tables, which the trampoline
/// loaded) to native execution, if the BSP runs natively.
pub fn switch_ap(bsp: Mode) -> Mode {
    if !bsp.is_native() {
        return bsp;
    }
    switch_this_cpu()
}

fn switch_this_cpu() -> Mode {
    if !wrmsr_safe(CONTROL_MSR, CONTROL_NATIVE_IRET) && !wrmsr_safe(CONTROL_MSR, CONTROL_NATIVE) {
        return Mode::Refused;
    }
    match rdmsr_safe(CONTROL_MSR) {
        Some(v) if v & CONTROL_BIT_NATIVE != 0 => {
            CONTROL.store(v, Ordering::Relaxed);
            crate::boot::load_idt(true);
            Mode::Native
        }
        _ => Mode::Refused,
    }
}

/// Leaves native execution for the emulator (`true`) or returns to it (`false`), on a CPU
/// that runs natively, with the emulated-mode IDT loaded (a refusal is a #GP, which only
/// that IDT recovers from). For `hlt` with interrupts, which are delivered only in the
/// emulator (see irq.rs).
pub fn set_emulated(emulated: bool) {
    let native = CONTROL.load(Ordering::Relaxed);
    // Bit 15 without bit 0 stops the vCPU for good (measured): the emulator gets the default.
    let value = if emulated { CONTROL_DEFAULT } else { native };
    wrmsr_safe(CONTROL_MSR, value);
}

/// Iterations per second of a two-instruction loop (`dec; jnz`), measured in
/// chunks for at least ~50 µs: the figure that tells native (~1e9) from
/// emulated (~1e6) execution. The fastest chunk counts, so a pause of the VM
/// during the measurement (a live update, say) does not lower the figure.
pub fn loop_rate(tsc_khz: u64) -> u64 {
    const CHUNK: u64 = 1000;
    let min_cycles = tsc_khz * 50 / 1000;
    let start = crate::boot::rdtsc();
    let mut fastest = u64::MAX;
    loop {
        let before = crate::boot::rdtsc();
        // SAFETY: a register-only countdown loop.
        unsafe {
            asm!(
                "2:",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) CHUNK => _,
                options(nomem, nostack)
            )
        };
        let after = crate::boot::rdtsc();
        fastest = fastest.min(after.wrapping_sub(before).max(1));
        if after.wrapping_sub(start) >= min_cycles {
            break;
        }
    }
    CHUNK * (tsc_khz * 1000) / fastest
}
