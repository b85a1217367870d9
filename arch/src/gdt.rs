//! Global descriptor table used at kernel entry, and its KVM segment equivalents.

use kvm_bindings::kvm_segment;

/// Builds a GDT descriptor from access/flags bits (`flags` holds the access byte in bits
/// 0..8 and the G/DB/L/AVL nibble in bits 12..16), base and 20-bit limit.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// Flat 64-bit code segment (present, DPL 0, execute/read, L=1, G=1).
pub const CODE64: u16 = 0xa09b;
/// Flat 32-bit code segment (present, DPL 0, execute/read, D=1, G=1).
pub const CODE32: u16 = 0xc09b;
/// Flat data segment (present, DPL 0, read/write, D/B=1, G=1).
pub const DATA: u16 = 0xc093;
/// 32-bit busy TSS.
pub const TSS: u16 = 0x808b;

/// The boot GDT: null, code, data, TSS. `code` is [`CODE64`] for the 64-bit Linux entry and
/// [`CODE32`] for the PVH entry.
pub fn boot_gdt(code: u16) -> [u64; 4] {
    [
        0,
        descriptor(code, 0, 0xfffff),
        descriptor(DATA, 0, 0xfffff),
        descriptor(TSS, 0, 0xfffff),
    ]
}

/// The KVM segment register value for GDT entry `index` of `table`.
pub fn segment(table: &[u64], index: usize) -> kvm_segment {
    let e = table[index];
    let limit = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    let g = ((e >> 55) & 1) as u8;
    kvm_segment {
        base: ((e >> 16) & 0xff_ffff) | ((e >> 32) & 0xff00_0000),
        // KVM wants the limit in bytes.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: (index * 8) as u16,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: u8::from((e >> 47) & 1 == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_segment_is_long_mode() {
        let gdt = boot_gdt(CODE64);
        let cs = segment(&gdt, 1);
        assert_eq!(cs.selector, 0x8);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.base, 0);
    }

    #[test]
    fn data_and_tss_segments() {
        let gdt = boot_gdt(CODE32);
        assert_eq!(segment(&gdt, 1).db, 1);
        let ds = segment(&gdt, 2);
        assert_eq!((ds.selector, ds.type_, ds.db, ds.l), (0x10, 3, 1, 0));
        let tss = segment(&gdt, 3);
        assert_eq!((tss.selector, tss.type_, tss.s), (0x18, 0xb, 0));
    }

    #[test]
    fn descriptor_encoding_matches_the_sdm_layout() {
        // Base 0x12345678, limit 0xabcde, access 0x9a, flags 0xc.
        let d = descriptor(0xc09a, 0x1234_5678, 0xabcde);
        assert_eq!(d, 0x12ca_9a34_5678_bcde);
    }
}
