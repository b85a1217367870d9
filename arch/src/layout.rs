//! Guest physical memory map shared by the boot code, the VMM and (by contract) guests.

/// GDT used at kernel entry.
pub const GDT_START: u64 = 0x500;
/// Empty IDT loaded at kernel entry (Linux loads its own).
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map and module list.
pub const PVH_INFO_START: u64 = 0x6000;
/// Linux zero page (`struct boot_params`); RSI points here at the 64-bit entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer (a temporary stack the kernel replaces).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table (PML4).
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Four page directories of 2 MiB pages covering the first 4 GiB.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line accepted, NUL included.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area; the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte above the legacy BIOS area: kernels are loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (1 GiB below 4 GiB).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First RAM address above the 32-bit MMIO hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// Address KVM uses for its TSS (three pages just below the IOAPIC hole, inside the MMIO hole).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Address KVM uses for its identity map page (one page below the TSS).
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// A RAM region of the guest: guest physical start and size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    /// Guest physical address of the first byte.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
}

impl RamRange {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// Splits `size` bytes of RAM into the regions Linux expects on x86-64: one below the 32-bit
/// MMIO hole and, when there is more, one starting at 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<RamRange> {
    let low = size.min(MMIO_HOLE_START);
    let mut ranges = vec![RamRange {
        start: 0,
        size: low,
    }];
    if size > low {
        ranges.push(RamRange {
            start: HIGH_RAM_START,
            size: size - low,
        });
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_region() {
        assert_eq!(
            ram_ranges(256 << 20),
            vec![RamRange {
                start: 0,
                size: 256 << 20
            }]
        );
    }

    #[test]
    fn large_ram_skips_the_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].end(), MMIO_HOLE_START);
        assert_eq!(r[1].start, HIGH_RAM_START);
        assert_eq!(r[0].size + r[1].size, 4 << 30);
    }

    #[test]
    fn fixed_structures_do_not_overlap() {
        let mut areas = [
            (GDT_START, 0x20),
            (IDT_START, 0x8),
            (PVH_INFO_START, 0x1000),
            (ZERO_PAGE_START, 0x1000),
            (0x8000, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x4000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (EBDA_START, HIMEM_START - EBDA_START),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:x?} overlaps {:x?}",
                w[0],
                w[1]
            );
        }
    }
}
