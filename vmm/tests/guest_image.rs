//! Checks the embedded test guest: it must be an ELF64 x86-64 executable with
//! its entry point inside a loaded segment, and its code must not contain a
//! single SSE/AVX/x87/MMX instruction or vector register, because on PVM
//! hosts KVM's instruction emulator runs guest code and fails on those, nor
//! `int n`, which is fatal when the guest runs natively there.

use iced_x86::{CpuidFeature, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use vmm::guest_image::GUEST_KERNEL;

const PT_LOAD: u32 = 1;
const SHF_EXECINSTR: u64 = 4;
const EM_X86_64: u16 = 62;

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

struct Segment {
    kind: u32,
    vaddr: u64,
    memsz: u64,
}

struct Section {
    flags: u64,
    addr: u64,
    offset: usize,
    size: usize,
}

fn segments(elf: &[u8]) -> Vec<Segment> {
    let (phoff, phentsize, phnum) = (
        u64_at(elf, 0x20) as usize,
        u16_at(elf, 0x36) as usize,
        u16_at(elf, 0x38),
    );
    (0..phnum as usize)
        .map(|i| {
            let ph = phoff + i * phentsize;
            Segment {
                kind: u32_at(elf, ph),
                vaddr: u64_at(elf, ph + 0x10),
                memsz: u64_at(elf, ph + 0x28),
            }
        })
        .collect()
}

fn sections(elf: &[u8]) -> Vec<Section> {
    let (shoff, shentsize, shnum) = (
        u64_at(elf, 0x28) as usize,
        u16_at(elf, 0x3a) as usize,
        u16_at(elf, 0x3c),
    );
    (0..shnum as usize)
        .map(|i| {
            let sh = shoff + i * shentsize;
            Section {
                flags: u64_at(elf, sh + 0x08),
                addr: u64_at(elf, sh + 0x10),
                offset: u64_at(elf, sh + 0x18) as usize,
                size: u64_at(elf, sh + 0x20) as usize,
            }
        })
        .collect()
}

#[test]
fn guest_is_elf64_x86_64_with_entry_in_a_load_segment() {
    let elf = GUEST_KERNEL;
    assert!(elf.len() > 64, "guest image too small: {} bytes", elf.len());
    assert_eq!(&elf[..4], b"\x7fELF", "no ELF magic");
    assert_eq!(elf[4], 2, "not ELFCLASS64");
    assert_eq!(elf[5], 1, "not little-endian");
    assert_eq!(u16_at(elf, 0x10), 2, "not ET_EXEC");
    assert_eq!(u16_at(elf, 0x12), EM_X86_64, "not x86-64");
    let entry = u64_at(elf, 0x18);
    let loads: Vec<_> = segments(elf)
        .into_iter()
        .filter(|s| s.kind == PT_LOAD)
        .collect();
    assert!(!loads.is_empty(), "no PT_LOAD segment");
    assert!(
        loads
            .iter()
            .any(|s| s.vaddr <= entry && entry < s.vaddr + s.memsz),
        "entry {entry:#x} is not inside a PT_LOAD segment"
    );
    assert!(
        loads.iter().all(|s| s.vaddr >= 0x10_0000),
        "a PT_LOAD segment starts below 1 MiB"
    );
}

/// CPUID features whose instructions KVM's emulator cannot run (vector and
/// floating-point extensions and their state management).
fn is_forbidden_feature(feature: CpuidFeature) -> bool {
    const PREFIXES: &[&str] = &[
        "SSE",
        "AVX",
        "FMA",
        "F16C",
        "MMX",
        "FPU",
        "D3NOW",
        "CYRIX_D3NOW",
        "CYRIX_FPU",
        "AES",
        "VAES",
        "PCLMULQDQ",
        "VPCLMULQDQ",
        "SHA",
        "GFNI",
        "XOP",
        "AMX",
        "KNC",
        "FXSR",
        "XSAVE",
        "KL",
        "AESKLE",
        "WIDE_KL",
        "SM3",
        "SM4",
    ];
    let name = format!("{feature:?}");
    PREFIXES.iter().any(|p| name.starts_with(p))
}

fn is_vector_register(reg: Register) -> bool {
    reg != Register::None
        && (reg.is_xmm()
            || reg.is_ymm()
            || reg.is_zmm()
            || reg.is_mm()
            || reg.is_st()
            || reg.is_k()
            || reg.is_tmm())
}

/// Why `instr` is not allowed in the guest, if it is not.
fn violation(instr: &Instruction) -> Option<String> {
    // `int n` ends KVM_RUN with an internal error when the guest runs natively on PVM. (int3
    // is what the linker pads between functions with, never executed.)
    if matches!(instr.mnemonic(), Mnemonic::Int | Mnemonic::Into) {
        return Some("is a software interrupt (fatal in PVM's native mode)".into());
    }
    for i in 0..instr.op_count() {
        if instr.op_kind(i) == OpKind::Register && is_vector_register(instr.op_register(i)) {
            return Some(format!("uses register {:?}", instr.op_register(i)));
        }
    }
    for reg in [instr.memory_base(), instr.memory_index()] {
        if is_vector_register(reg) {
            return Some(format!("addresses memory through {reg:?}"));
        }
    }
    let features: Vec<_> = instr
        .cpuid_features()
        .iter()
        .copied()
        .filter(|&f| is_forbidden_feature(f))
        .collect();
    if !features.is_empty() {
        return Some(format!("needs {features:?}"));
    }
    None
}

#[test]
fn guest_code_has_no_vector_or_x87_instructions() {
    let elf = GUEST_KERNEL;
    let mut decoded = 0usize;
    let mut bad = Vec::new();
    for section in sections(elf)
        .iter()
        .filter(|s| s.flags & SHF_EXECINSTR != 0)
    {
        let code = &elf[section.offset..section.offset + section.size];
        let mut decoder = Decoder::with_ip(64, code, section.addr, DecoderOptions::NONE);
        let mut instr = Instruction::default();
        while decoder.can_decode() {
            decoder.decode_out(&mut instr);
            decoded += 1;
            if instr.is_invalid() {
                // Padding or data between functions; not executable code.
                continue;
            }
            if let Some(why) = violation(&instr) {
                let start = (instr.ip() - section.addr) as usize;
                let bytes: Vec<String> = code[start..start + instr.len()]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                bad.push(format!(
                    "{:#x}: {:?} [{}] {why}",
                    instr.ip(),
                    instr.code(),
                    bytes.join(" ")
                ));
            }
        }
    }
    assert!(
        decoded > 100,
        "decoded only {decoded} instructions: no executable section found?"
    );
    assert!(
        bad.is_empty(),
        "the guest contains {} instruction(s) that KVM's emulator cannot run:\n{}",
        bad.len(),
        bad.join("\n")
    );
}
