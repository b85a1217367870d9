//! Intel MultiProcessor Specification 1.4 table, so guests find every vCPU and the IOAPIC.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{APIC_START, EBDA_START, IOAPIC_START};
use crate::GuestMemory;

/// Largest vCPU count the table (and molt) supports: APIC IDs 0..MAX_CPUS, IOAPIC after them.
pub const MAX_CPUS: u8 = 254;
/// IOAPIC interrupt pins routed from ISA IRQs.
const IOAPIC_PINS: u8 = 24;
const FLOATING_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Family 6 stepping signature reported for each processor.
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC feature bits.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// The vCPU count is outside 1..=MAX_CPUS.
    #[error("{0} vCPUs do not fit in an MP table (1..={MAX_CPUS})")]
    TooManyCpus(u8),
    /// Writing to guest memory failed.
    #[error("cannot write the MP table")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

fn entries(cpus: u8) -> (Vec<u8>, u16) {
    let mut e = Vec::new();
    let mut count = 0u16;
    for id in 0..cpus {
        e.extend_from_slice(&[0, id, APIC_VERSION]);
        e.push(CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 });
        e.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        e.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        e.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus 0: ISA.
    e.extend_from_slice(&[1, 0]);
    e.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic_id = cpus;
    e.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    e.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // I/O interrupt assignments: ISA IRQ n -> IOAPIC pin n (IRQ 0 as ExtINT).
    for irq in 0..IOAPIC_PINS {
        let kind = if irq == 0 { 3 } else { 0 };
        e.extend_from_slice(&[3, kind, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1 of every local APIC.
    e.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    e.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;
    (e, count)
}

/// The table bytes for `cpus` vCPUs, to be placed at guest address `base`.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let (body, count) = entries(cpus);
    let table_addr = base + FLOATING_SIZE as u64;
    let mut fp = Vec::with_capacity(FLOATING_SIZE);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);

    let mut hdr = Vec::with_capacity(HEADER_SIZE);
    hdr.extend_from_slice(b"PCMP");
    hdr.extend_from_slice(&((HEADER_SIZE + body.len()) as u16).to_le_bytes());
    hdr.extend_from_slice(&[4, 0]);
    hdr.extend_from_slice(b"MOLT    ");
    hdr.extend_from_slice(b"000000000000");
    hdr.extend_from_slice(&[0; 6]); // OEM table pointer and size
    hdr.extend_from_slice(&count.to_le_bytes());
    hdr.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    hdr.extend_from_slice(&[0; 4]);
    let mut table = hdr;
    table.extend_from_slice(&body);
    table[7] = checksum(&table);

    fp.extend_from_slice(&table);
    Ok(fp)
}

/// Writes the MP table for `cpus` vCPUs at [`EBDA_START`].
pub fn write(mem: &GuestMemory, cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(cpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::HIMEM_START;

    #[test]
    fn checksums_and_processor_entries() {
        let t = build(4, EBDA_START).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(checksum(&t[..16]), 0);
        let len = u16::from_le_bytes([t[20], t[21]]) as usize;
        assert_eq!(&t[16..20], b"PCMP");
        assert_eq!(checksum(&t[16..16 + len]), 0);
        let cpus: Vec<(u8, u8)> = t[16 + HEADER_SIZE..]
            .chunks(20)
            .take(4)
            .map(|c| (c[1], c[3]))
            .collect();
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
        assert!(EBDA_START + t.len() as u64 <= HIMEM_START);
    }

    #[test]
    fn bad_cpu_counts() {
        assert!(build(0, EBDA_START).is_err());
        assert!(build(255, EBDA_START).is_err());
        assert!((build(MAX_CPUS, EBDA_START).unwrap().len() as u64) < HIMEM_START - EBDA_START);
    }
}
