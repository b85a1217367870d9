//! Linux's zero page (`struct boot_params`) and the e820 memory map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{RamRange, EBDA_START, HIMEM_START, ZERO_PAGE_START};
use crate::GuestMemory;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// One entry of the e820 map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// Errors building the zero page.
#[derive(Debug, thiserror::Error)]
pub enum ZeroPageError {
    /// More e820 entries than the zero page holds.
    #[error("too many e820 entries: {0}")]
    TooManyE820Entries(usize),
    /// Writing to guest memory failed.
    #[error("cannot write the zero page")]
    Write(#[source] vm_memory::GuestMemoryError),
    /// The RAM layout leaves no room for the kernel.
    #[error("guest RAM ends at {0:#x}, below the kernel load area at {HIMEM_START:#x}")]
    TooLittleRam(u64),
}

/// The e820 map for the given RAM regions: the low region is split around the legacy BIOS
/// area `[EBDA_START, 1 MiB)`, which is reported reserved.
pub fn e820_map(ram: &[RamRange]) -> Result<Vec<E820Entry>, ZeroPageError> {
    let mut map = Vec::with_capacity(ram.len() + 2);
    for r in ram {
        if r.start < HIMEM_START {
            if r.end() <= HIMEM_START {
                return Err(ZeroPageError::TooLittleRam(r.end()));
            }
            map.push(E820Entry {
                addr: r.start,
                size: EBDA_START - r.start,
                kind: E820_RAM,
            });
            map.push(E820Entry {
                addr: EBDA_START,
                size: HIMEM_START - EBDA_START,
                kind: E820_RESERVED,
            });
            map.push(E820Entry {
                addr: HIMEM_START,
                size: r.end() - HIMEM_START,
                kind: E820_RAM,
            });
        } else {
            map.push(E820Entry {
                addr: r.start,
                size: r.size,
                kind: E820_RAM,
            });
        }
    }
    Ok(map)
}

/// What goes into the zero page besides the e820 map.
#[derive(Clone, Copy, Debug, Default)]
pub struct ZeroPageConfig {
    /// The kernel's own setup header (bzImage), or `None` for an ELF kernel.
    pub header: Option<setup_header>,
    /// Guest address and length (without the NUL) of the command line.
    pub cmdline: (u64, u32),
    /// Guest address and size of the initrd, if any.
    pub initrd: Option<(u64, u32)>,
}

/// Builds `boot_params` for the 64-bit boot protocol.
pub fn build(config: &ZeroPageConfig, e820: &[E820Entry]) -> Result<boot_params, ZeroPageError> {
    let mut params = boot_params::default();
    if let Some(hdr) = config.header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = config.cmdline.0 as u32;
    params.ext_cmd_line_ptr = (config.cmdline.0 >> 32) as u32;
    params.hdr.cmdline_size = config.cmdline.1;
    if let Some((addr, size)) = config.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.hdr.ramdisk_size = size;
    }
    if e820.len() > params.e820_table.len() {
        return Err(ZeroPageError::TooManyE820Entries(e820.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    Ok(params)
}

/// Writes `params` at [`ZERO_PAGE_START`].
pub fn write(mem: &GuestMemory, params: &boot_params) -> Result<(), ZeroPageError> {
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_START))
        .map_err(ZeroPageError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::ram_ranges;

    #[test]
    fn e820_covers_exactly_the_ram_regions() {
        let ram = ram_ranges(5 << 30);
        let map = e820_map(&ram).unwrap();
        let usable: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(usable, (5u64 << 30) - (HIMEM_START - EBDA_START));
        for e in map.iter().filter(|e| e.kind == E820_RAM) {
            assert!(
                ram.iter()
                    .any(|r| e.addr >= r.start && e.addr + e.size <= r.end()),
                "{e:x?} outside RAM"
            );
        }
        assert!(map.windows(2).all(|w| w[0].addr + w[0].size <= w[1].addr));
    }

    #[test]
    fn tiny_ram_is_refused() {
        assert!(matches!(
            e820_map(&ram_ranges(512 << 10)),
            Err(ZeroPageError::TooLittleRam(_))
        ));
    }

    #[test]
    fn elf_zero_page_gets_a_synthesised_header() {
        let e820 = e820_map(&ram_ranges(64 << 20)).unwrap();
        let cfg = ZeroPageConfig {
            header: None,
            cmdline: (0x20000, 12),
            initrd: Some((0x3f0_0000, 0x1234)),
        };
        let p = build(&cfg, &e820).unwrap();
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, 12);
        assert_eq!({ p.hdr.ramdisk_image }, 0x3f0_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!(p.e820_entries as usize, e820.len());
    }
}
