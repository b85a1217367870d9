//! Initial vCPU state: registers, segments, FPU, MSRs and local APIC LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::gdt::{self, CODE32, CODE64};
use crate::layout::{BOOT_STACK_POINTER, GDT_START, IDT_START, PML4_START};
use crate::GuestMemory;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// MSR numbers used at boot.
pub mod msr {
    /// Time stamp counter.
    pub const IA32_TSC: u32 = 0x10;
    /// SYSENTER code segment.
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    /// SYSENTER stack pointer.
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    /// SYSENTER instruction pointer.
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    /// Miscellaneous enables.
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    /// Default memory type and MTRR enable.
    pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
    /// SYSCALL segment selectors.
    pub const STAR: u32 = 0xc000_0081;
    /// 64-bit SYSCALL target.
    pub const LSTAR: u32 = 0xc000_0082;
    /// Compatibility-mode SYSCALL target.
    pub const CSTAR: u32 = 0xc000_0083;
    /// SYSCALL RFLAGS mask.
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// SWAPGS base.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// KVM accepted fewer MSRs than given.
    #[error("KVM set {set} of {wanted} boot MSRs")]
    Msrs {
        /// MSRs set.
        set: usize,
        /// MSRs given.
        wanted: usize,
    },
    /// Writing the GDT/IDT failed.
    #[error("cannot write the GDT")]
    Gdt(#[source] vm_memory::GuestMemoryError),
}

/// How the boot CPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// Linux 64-bit boot protocol: long mode, RSI = zero page.
    Linux64 {
        /// Entry point.
        entry: u64,
        /// Guest address of `boot_params`.
        zero_page: u64,
    },
    /// PVH: 32-bit protected mode without paging, EBX = `hvm_start_info`.
    Pvh {
        /// Entry point (from the ELF note).
        entry: u64,
        /// Guest address of `hvm_start_info`.
        start_info: u64,
    },
}

/// General registers at the entry point.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Linux64 { entry, zero_page } => {
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = zero_page;
        }
        BootEntry::Pvh { entry, start_info } => {
            regs.rip = entry;
            regs.rbx = start_info;
        }
    }
    regs
}

/// Writes the boot GDT and an empty IDT and fills `sregs` for `entry`.
pub fn boot_sregs(
    mem: &GuestMemory,
    entry: BootEntry,
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    let long = matches!(entry, BootEntry::Linux64 { .. });
    let table = gdt::boot_gdt(if long { CODE64 } else { CODE32 });
    for (i, d) in table.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_START + i as u64 * 8))
            .map_err(RegsError::Gdt)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(RegsError::Gdt)?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = gdt::segment(&table, 1);
    let data = gdt::segment(&table, 2);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::segment(&table, 3);
    if long {
        sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
        sregs.cr3 = PML4_START;
        sregs.cr4 = CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
    } else {
        sregs.cr0 = CR0_PE | CR0_ET;
        sregs.cr3 = 0;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    Ok(())
}

/// The MSR values a kernel expects at entry.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(msr::IA32_SYSENTER_CS, 0),
        entry(msr::IA32_SYSENTER_ESP, 0),
        entry(msr::IA32_SYSENTER_EIP, 0),
        entry(msr::STAR, 0),
        entry(msr::CSTAR, 0),
        entry(msr::KERNEL_GS_BASE, 0),
        entry(msr::SYSCALL_MASK, 0),
        entry(msr::LSTAR, 0),
        entry(msr::IA32_TSC, 0),
        // Fast string operations.
        entry(msr::IA32_MISC_ENABLE, 1),
        // MTRRs enabled, default type write-back.
        entry(msr::IA32_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

fn lapic_reg(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    let b = |i: usize| regs[offset + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// State common to every vCPU, BSP or AP: FPU defaults, boot MSRs, LINT0 = ExtINT and
/// LINT1 = NMI on the local APIC.
pub fn setup_common(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| RegsError::Kvm("KVM_SET_FPU", e))?;
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| RegsError::Kvm("KVM_SET_MSRS", e))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Kvm("KVM_GET_LAPIC", e))?;
    let lint0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        with_delivery_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT1,
        with_delivery_mode(lint1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Kvm("KVM_SET_LAPIC", e))
}

/// Puts the boot vCPU at the kernel entry point.
pub fn setup_boot_cpu(vcpu: &VcpuFd, mem: &GuestMemory, entry: BootEntry) -> Result<(), RegsError> {
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Kvm("KVM_GET_SREGS", e))?;
    boot_sregs(mem, entry, &mut sregs)?;
    vcpu.set_sregs(&sregs)
        .map_err(|e| RegsError::Kvm("KVM_SET_SREGS", e))?;
    vcpu.set_regs(&boot_regs(entry))
        .map_err(|e| RegsError::Kvm("KVM_SET_REGS", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux64_entry_state() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let entry = BootEntry::Linux64 {
            entry: 0x100_0000,
            zero_page: 0x7000,
        };
        let regs = boot_regs(entry);
        assert_eq!((regs.rip, regs.rsi, regs.rflags), (0x100_0000, 0x7000, 2));
        let mut s = kvm_sregs::default();
        boot_sregs(&mem, entry, &mut s).unwrap();
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        let gdt1: u64 = mem.read_obj(GuestAddress(GDT_START + 8)).unwrap();
        assert_eq!(gdt1, gdt::descriptor(CODE64, 0, 0xfffff));
    }

    #[test]
    fn pvh_entry_state() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let entry = BootEntry::Pvh {
            entry: 0x100_0000,
            start_info: 0x6000,
        };
        assert_eq!(boot_regs(entry).rbx, 0x6000);
        let mut s = kvm_sregs::default();
        boot_sregs(&mem, entry, &mut s).unwrap();
        assert_eq!((s.cs.l, s.cs.db), (0, 1));
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.efer, 0);
    }

    #[test]
    fn lint_delivery_modes() {
        assert_eq!(with_delivery_mode(0x10000, APIC_MODE_EXTINT), 0x10700);
        assert_eq!(with_delivery_mode(0x700, APIC_MODE_NMI), 0x400);
    }
}
