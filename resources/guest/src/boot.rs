//! Entry points, descriptor tables and the few privileged instructions.
//!
//! Everything that must be assembly lives here: `_start` (the BSP entry from
//! the VMM), the GDT, the 32 exception stubs, the real-mode trampoline that
//! application processors run at 0x8000, and their 64-bit landing point.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Most CPUs the guest brings up; MP-table entries beyond this are ignored.
pub const MAX_CPUS: usize = 32;
/// Stack size of every CPU.
pub const STACK_SIZE: usize = 16 * 1024;
/// Physical address the AP trampoline is copied to (SIPI vector 8).
pub const TRAMPOLINE_ADDR: u64 = 0x8000;

/// Selectors of our GDT (see `molt_gdt` below).
const KERNEL_CS: u16 = 0x08;

/// Stack top for the AP being started, read by `ap_entry64`.
pub static AP_STACK_TOP: AtomicU64 = AtomicU64::new(0);
/// CPU index for the AP being started, read by `ap_entry64`.
pub static AP_INDEX: AtomicU32 = AtomicU32::new(0);

// BSP entry. The VMM jumps here in long mode with RSI = zero page and a tiny
// stack at 0x8ff0. The first instructions write boot marker 1 to port 0x500
// (the VMM times "first guest instruction" with it); only then do we touch
// anything else: zero .bss (8-byte aligned and sized, see linker.ld), switch
// to CPU 0's stack, load our GDT and call `bsp_main(zero_page)`.
global_asm!(
    ".pushsection .text.boot, \"ax\"",
    ".code64",
    ".global _start",
    "_start:",
    "    movw $0x500, %dx",
    "    movb $1, %al",
    "    outb %al, %dx",
    "    cli",
    "    cld",
    "    movq %rsi, %rbx",
    "    leaq __bss_start(%rip), %rdi",
    "    leaq __bss_end(%rip), %rcx",
    "    subq %rdi, %rcx",
    "    shrq $3, %rcx",
    "    xorl %eax, %eax",
    "    rep stosq",
    "    leaq molt_stacks + {stack_size}(%rip), %rsp",
    "    xorl %ebp, %ebp",
    "    call load_gdt",
    "    movq %rbx, %rdi",
    "    call {bsp_main}",
    "    ud2",
    // load_gdt: load molt_gdt, reload CS with a far return and the data
    // segment registers with the flat data selector. Clobbers rax.
    "load_gdt:",
    "    lgdt molt_gdtr(%rip)",
    "    popq %rax",
    "    pushq ${kernel_cs}",
    "    pushq %rax",
    "    movw $0x10, %ax",
    "    movw %ax, %ds",
    "    movw %ax, %es",
    "    movw %ax, %ss",
    "    movw %ax, %fs",
    "    movw %ax, %gs",
    "    lretq",
    // Landing point of the AP trampoline (already in 64-bit mode with our
    // GDT loaded): take the stack and index the BSP prepared, call ap_main.
    ".global ap_entry64",
    "ap_entry64:",
    "    movw $0x10, %ax",
    "    movw %ax, %ds",
    "    movw %ax, %es",
    "    movw %ax, %ss",
    "    movw %ax, %fs",
    "    movw %ax, %gs",
    "    movq {ap_stack}(%rip), %rsp",
    "    movl {ap_index}(%rip), %edi",
    "    xorl %ebp, %ebp",
    "    call {ap_main}",
    "    ud2",
    ".popsection",
    // Per-CPU stacks, in a NOLOAD section of their own (see linker.ld).
    ".pushsection .stacks, \"aw\", @nobits",
    ".balign 4096",
    ".global molt_stacks",
    "molt_stacks:",
    "    .skip {stacks_size}",
    ".popsection",
    // GDT: null, 0x08 64-bit code, 0x10 flat data, 0x18 32-bit code (used by
    // the AP trampoline only), and at 0x28/0x30 the DPL-3 data and 64-bit code
    // segments that native mode runs on (selectors 0x2b/0x33, as in Linux):
    // PVM delivers an exception to a native CPU only through a gate whose
    // selector is 0x33 *and* names such a descriptor in the guest's GDT
    // (measured: with a 4-entry GDT it triple-faults). Accessed bits are
    // preset so the CPU never writes to the table.
    ".pushsection .data.gdt, \"aw\"",
    ".balign 16",
    ".global molt_gdt",
    "molt_gdt:",
    "    .quad 0",
    "    .quad 0x00af9b000000ffff",
    "    .quad 0x00cf93000000ffff",
    "    .quad 0x00cf9b000000ffff",
    "    .quad 0",
    "    .quad 0x00cff3000000ffff",
    "    .quad 0x00affb000000ffff",
    "molt_gdt_end:",
    ".balign 8",
    "    .word 0, 0, 0",
    "molt_gdtr:",
    "    .word molt_gdt_end - molt_gdt - 1",
    "    .quad molt_gdt",
    ".popsection",
    stack_size = const STACK_SIZE,
    stacks_size = const STACK_SIZE * MAX_CPUS,
    kernel_cs = const KERNEL_CS,
    bsp_main = sym crate::bsp_main,
    ap_main = sym crate::smp::ap_main,
    ap_stack = sym AP_STACK_TOP,
    ap_index = sym AP_INDEX,
    options(att_syntax)
);

// The AP trampoline. It is assembled into .rodata (the image never executes
// it in place) and copied to TRAMPOLINE_ADDR, where a SIPI with vector 8
// starts an AP in real mode with CS = 0x0800, IP = 0. All addresses inside
// it are therefore computed as `label - ap_tramp_start + 0x8000`.
// real mode -> protected mode (our GDT, 32-bit code 0x18) -> PAE, CR3 of the
// BSP, EFER of the BSP (LME set) -> paging on -> far jump to the 64-bit code
// selector at ap_entry64 in the image.
global_asm!(
    ".pushsection .rodata.ap_trampoline, \"a\"",
    ".balign 16",
    ".global ap_tramp_start",
    ".global ap_tramp_end",
    ".global ap_tramp_cr3",
    ".global ap_tramp_efer",
    ".code16",
    "ap_tramp_start:",
    "    cli",
    "    cld",
    "    xorw %ax, %ax",
    "    movw %ax, %ds",
    "    lgdtl (ap_tramp_gdtr - ap_tramp_start + {base})",
    "    movl %cr0, %eax",
    "    orl $1, %eax",
    "    movl %eax, %cr0",
    "    ljmpl $0x18, $(ap_tramp_32 - ap_tramp_start + {base})",
    ".code32",
    "ap_tramp_32:",
    "    movw $0x10, %ax",
    "    movw %ax, %ds",
    "    movw %ax, %es",
    "    movw %ax, %ss",
    "    movl %cr4, %eax",
    "    orl $0x20, %eax",
    "    movl %eax, %cr4",
    "    movl (ap_tramp_cr3 - ap_tramp_start + {base}), %eax",
    "    movl %eax, %cr3",
    "    movl $0xc0000080, %ecx",
    "    movl (ap_tramp_efer - ap_tramp_start + {base}), %eax",
    "    orl $0x100, %eax",
    "    xorl %edx, %edx",
    "    wrmsr",
    // PG | WP | NE | ET | MP | PE, and CD/NW cleared.
    "    movl $0x80010033, %eax",
    "    movl %eax, %cr0",
    "    ljmpl ${kernel_cs}, $ap_entry64",
    ".balign 8",
    "ap_tramp_gdtr:",
    "    .word molt_gdt_end - molt_gdt - 1",
    "    .long molt_gdt",
    "    .word 0",
    "ap_tramp_cr3:",
    "    .long 0",
    "ap_tramp_efer:",
    "    .long 0",
    "ap_tramp_end:",
    ".code64",
    ".popsection",
    base = const TRAMPOLINE_ADDR,
    kernel_cs = const KERNEL_CS,
    options(att_syntax)
);

// Exception stubs for vectors 0..31. Each pushes a dummy error code when the
// CPU does not push one, then the vector, and jumps to a common tail that
// calls `exception(vector, error, rip)` (which never returns).
global_asm!(
    ".pushsection .text.isr, \"ax\"",
    ".code64",
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "isr_\\v:",
    ".if \\v == 13",
    "    jmp isr_gp",
    ".endif",
    ".if (\\v == 8) || (\\v == 10) || (\\v == 11) || (\\v == 12) || (\\v == 13) || (\\v == 14) || (\\v == 17) || (\\v == 21) || (\\v == 29) || (\\v == 30)",
    ".else",
    "    pushq $0",
    ".endif",
    "    pushq $\\v",
    "    jmp isr_common",
    ".endr",
    // #GP: a fault of the probing rdmsr/wrmsr in native.rs resumes at
    // molt_msr_fault (the probe reports failure); any other #GP is reported.
    "isr_gp:",
    "    pushq %rax",
    "    leaq molt_rdmsr_insn(%rip), %rax",
    "    cmpq %rax, 16(%rsp)",
    "    je 1f",
    "    leaq molt_wrmsr_insn(%rip), %rax",
    "    cmpq %rax, 16(%rsp)",
    "    je 1f",
    "    popq %rax",
    "    pushq $13",
    "    jmp isr_common",
    "1:",
    "    leaq molt_msr_fault(%rip), %rax",
    "    movq %rax, 16(%rsp)",
    "    popq %rax",
    "    addq $8, %rsp",
    "    iretq",
    "isr_common:",
    "    movq (%rsp), %rdi",
    "    movq 8(%rsp), %rsi",
    "    movq 16(%rsp), %rdx",
    "    andq $-16, %rsp",
    "    call {handler}",
    "    ud2",
    ".popsection",
    ".pushsection .rodata.isr_table, \"a\"",
    ".balign 8",
    ".global isr_table",
    "isr_table:",
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "    .quad isr_\\v",
    ".endr",
    ".popsection",
    handler = sym crate::exception,
    options(att_syntax)
);

extern "C" {
    static __image_end: u8;
    static molt_stacks: u8;
    static isr_table: [u64; 32];
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static ap_tramp_cr3: u8;
    static ap_tramp_efer: u8;
}

/// First byte after the loaded image (including .bss, the stacks and the
/// virtio device memory in .dma).
pub fn image_end() -> u64 {
    core::ptr::addr_of!(__image_end) as u64
}

/// Initial stack pointer of CPU `index` (< MAX_CPUS).
pub fn stack_top(index: usize) -> u64 {
    let base = core::ptr::addr_of!(molt_stacks) as u64;
    base + ((index + 1) * STACK_SIZE) as u64
}

/// The exceptions' 32 vectors and the interrupts' (irq.rs).
const IDT_ENTRIES: usize = 0x22;

/// One 64-bit interrupt gate (16 bytes).
#[derive(Clone, Copy)]
#[repr(C)]
struct IdtEntry {
    low: u64,
    high: u64,
}

#[repr(C, align(16))]
struct Idt([IdtEntry; IDT_ENTRIES]);

/// The IDT of emulated mode: gates into our own 64-bit code segment.
static mut IDT: Idt = Idt([IdtEntry { low: 0, high: 0 }; IDT_ENTRIES]);
/// The IDT of native mode (see native.rs): the same stubs, but the gates must
/// name selector 0x33 (the host's 64-bit user code segment, which native
/// guest code runs on) with DPL 3; there is no IST or stack switch.
static mut IDT_NATIVE: Idt = Idt([IdtEntry { low: 0, high: 0 }; IDT_ENTRIES]);

/// Selector of the gates of the native IDT.
const NATIVE_CS: u16 = 0x33;

fn gate(handler: u64, selector: u16, type_attr: u64) -> IdtEntry {
    IdtEntry {
        low: (handler & 0xffff)
            | (u64::from(selector) << 16)
            | (type_attr << 40)
            | ((handler >> 16) & 0xffff) << 48,
        high: handler >> 32,
    }
}

/// Fills both IDTs with the 32 exception stubs and the interrupt handlers. Called once, by
/// the BSP, before any AP is started.
pub fn init_idt() {
    let exceptions = (0..32).map(|v| {
        // SAFETY: isr_table is a read-only table of 32 addresses in .rodata.
        (v, unsafe {
            core::ptr::addr_of!(isr_table).cast::<u64>().add(v).read()
        })
    });
    for (v, handler) in exceptions.chain(crate::irq::handlers()) {
        // SAFETY: only the BSP writes the IDTs, before APs exist and before
        // any CPU loads them; nothing else references them meanwhile.
        unsafe {
            // Present, DPL 0, 64-bit interrupt gate, IST 0.
            core::ptr::addr_of_mut!(IDT.0[v]).write(gate(handler, KERNEL_CS, 0x8e));
            // Present, DPL 3, 64-bit interrupt gate, IST 0.
            core::ptr::addr_of_mut!(IDT_NATIVE.0[v]).write(gate(handler, NATIVE_CS, 0xee));
        }
    }
}

/// Loads the IDT of the calling CPU's execution mode.
pub fn load_idt(native: bool) {
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let base = if native {
        core::ptr::addr_of!(IDT_NATIVE) as u64
    } else {
        core::ptr::addr_of!(IDT) as u64
    };
    let ptr = Pointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base,
    };
    // SAFETY: both IDTs are fully initialised (init_idt ran) and static.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags)) };
}

/// The AP trampoline bytes as assembled into the image.
pub fn trampoline() -> &'static [u8] {
    // SAFETY: ap_tramp_start..ap_tramp_end is a contiguous, read-only range
    // in .rodata defined by the assembly above.
    unsafe {
        let start = core::ptr::addr_of!(ap_tramp_start);
        let len = core::ptr::addr_of!(ap_tramp_end) as usize - start as usize;
        core::slice::from_raw_parts(start, len)
    }
}

/// Offsets of the CR3 and EFER slots inside the trampoline.
pub fn trampoline_slots() -> (usize, usize) {
    let start = core::ptr::addr_of!(ap_tramp_start) as usize;
    (
        core::ptr::addr_of!(ap_tramp_cr3) as usize - start,
        core::ptr::addr_of!(ap_tramp_efer) as usize - start,
    )
}

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O to devices of the VMM; no memory is touched.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port I/O to devices of the VMM; no memory is touched.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// CPUID leaf `leaf`, subleaf 0: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: cpuid has no side effects; rbx (reserved by LLVM) is saved and
    // restored around it.
    unsafe {
        asm!(
            "mov {tmp:r}, rbx",
            "cpuid",
            "xchg {tmp:r}, rbx",
            tmp = out(reg) b,
            inout("eax") leaf => a,
            inout("ecx") 0u32 => c,
            out("edx") d,
            options(nomem, nostack, preserves_flags)
        );
    }
    (a, b, c, d)
}

pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reading an architectural MSR (EFER) that exists on x86-64.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

pub fn read_cr3() -> u64 {
    let value: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Stops this CPU for good (interrupts are disabled, so `hlt` never returns
/// for long; loop anyway).
pub fn halt() -> ! {
    loop {
        // SAFETY: cli; hlt only stops the CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

// Debug device and reset line.
const PORT_MARKER: u16 = 0x500;
const PORT_EXIT: u16 = 0x501;
const PORT_I8042: u16 = 0x64;

/// Writes a boot-progress marker (the VMM logs when it arrives).
pub fn marker(value: u8) {
    outb(PORT_MARKER, value);
}

/// Ends the VM; the VMM exits with `code`.
pub fn exit(code: u8) -> ! {
    outb(PORT_EXIT, code);
    halt()
}

/// Resets the machine through the i8042 reset line; the VMM stops the VM.
pub fn reset() -> ! {
    outb(PORT_I8042, 0xfe);
    halt()
}

/// Publishes the stack and index that the next AP to start will take in
/// `ap_entry64`.
pub fn prepare_ap(index: u32) {
    AP_STACK_TOP.store(stack_top(index as usize), Ordering::SeqCst);
    AP_INDEX.store(index, Ordering::SeqCst);
}
