//! Identity page tables for the 64-bit entry: the first 4 GiB mapped with 2 MiB pages.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{PDE_START, PDPTE_START, PML4_START};
use crate::GuestMemory;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const PAGE_SIZE_2M: u64 = 1 << 7;
/// Number of page directories (each maps 1 GiB).
pub const PD_COUNT: u64 = 4;

/// Errors writing page tables.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    /// Guest memory does not cover the page-table area.
    #[error("cannot write page tables at {0:#x}")]
    Write(u64, #[source] vm_memory::GuestMemoryError),
}

/// Writes PML4, PDPT and page directories identity-mapping `[0, 4 GiB)`; returns the CR3
/// value.
pub fn setup_identity_tables(mem: &GuestMemory) -> Result<u64, PagingError> {
    let write = |addr: u64, val: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|e| PagingError::Write(addr, e))
    };
    write(PML4_START, PDPTE_START | PRESENT | WRITABLE)?;
    for pd in 0..PD_COUNT {
        let pd_addr = PDE_START + pd * 0x1000;
        write(PDPTE_START + pd * 8, pd_addr | PRESENT | WRITABLE)?;
        for i in 0..512u64 {
            let phys = ((pd << 9) + i) << 21;
            write(pd_addr + i * 8, phys | PRESENT | WRITABLE | PAGE_SIZE_2M)?;
        }
    }
    Ok(PML4_START)
}

/// Walks the tables written by [`setup_identity_tables`] and translates `va` (test helper and
/// sanity check).
pub fn translate(mem: &GuestMemory, cr3: u64, va: u64) -> Option<u64> {
    let read = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).ok();
    let pml4e = read((cr3 & !0xfff) + ((va >> 39) & 0x1ff) * 8)?;
    if pml4e & PRESENT == 0 {
        return None;
    }
    let pdpte = read((pml4e & 0x000f_ffff_ffff_f000) + ((va >> 30) & 0x1ff) * 8)?;
    if pdpte & PRESENT == 0 {
        return None;
    }
    let pde = read((pdpte & 0x000f_ffff_ffff_f000) + ((va >> 21) & 0x1ff) * 8)?;
    if pde & PRESENT == 0 || pde & PAGE_SIZE_2M == 0 {
        return None;
    }
    Some((pde & 0x000f_ffff_ffe0_0000) | (va & 0x1f_ffff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_maps_first_4g() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = setup_identity_tables(&mem).unwrap();
        for va in [
            0u64,
            0x1234,
            0x20_0000,
            0x7fff_ffff,
            0xfee0_0300,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&mem, cr3, va), Some(va), "va {va:#x}");
        }
        assert_eq!(translate(&mem, cr3, 1 << 32), None);
    }
}
