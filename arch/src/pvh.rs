//! PVH boot: the `hvm_start_info` block a PVH-capable ELF kernel finds through EBX.

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::PVH_INFO_START;
use crate::zeropage::E820Entry;
use crate::GuestMemory;

/// `hvm_start_info.magic` ("xEn3" with the top bit of each byte cleared).
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const START_INFO_SIZE: u64 = std::mem::size_of::<hvm_start_info>() as u64;
const MEMMAP_ENTRY_SIZE: u64 = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
/// Room reserved for the memory map after the start info.
const MAX_MEMMAP_ENTRIES: usize = 32;

/// Errors writing the PVH start info.
#[derive(Debug, thiserror::Error)]
pub enum PvhError {
    /// Too many memory map entries.
    #[error("too many memory map entries for PVH: {0}")]
    TooManyEntries(usize),
    /// Writing to guest memory failed.
    #[error("cannot write the PVH start info")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Writes `hvm_start_info`, its memory map and (for an initrd) its module list at
/// [`PVH_INFO_START`]; returns the start info's guest address (goes into EBX).
pub fn write_start_info(
    mem: &GuestMemory,
    cmdline_addr: u64,
    e820: &[E820Entry],
    initrd: Option<(u64, u32)>,
) -> Result<u64, PvhError> {
    if e820.len() > MAX_MEMMAP_ENTRIES {
        return Err(PvhError::TooManyEntries(e820.len()));
    }
    let memmap_addr = PVH_INFO_START + START_INFO_SIZE;
    let modlist_addr = memmap_addr + MEMMAP_ENTRY_SIZE * MAX_MEMMAP_ENTRIES as u64;
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: cmdline_addr,
        memmap_paddr: memmap_addr,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    for (i, e) in e820.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        mem.write_obj(
            entry,
            GuestAddress(memmap_addr + i as u64 * MEMMAP_ENTRY_SIZE),
        )
        .map_err(PvhError::Write)?;
    }
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: addr,
            size: u64::from(size),
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(modlist_addr))
            .map_err(PvhError::Write)?;
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(PvhError::Write)?;
    Ok(PVH_INFO_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::ram_ranges;
    use crate::zeropage::e820_map;

    #[test]
    fn start_info_describes_memory_and_initrd() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let e820 = e820_map(&ram_ranges(64 << 20)).unwrap();
        let addr = write_start_info(&mem, 0x20000, &e820, Some((0x300_0000, 4096))).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.cmdline_paddr, 0x20000);
        assert_eq!(info.memmap_entries as usize, e820.len());
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(
                info.memmap_paddr + (e820.len() as u64 - 1) * MEMMAP_ENTRY_SIZE,
            ))
            .unwrap();
        assert_eq!(last.addr + last.size, 64 << 20);
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 4096));
    }
}
