//! Boot-layout tests with tiny kernel images built here.

use std::io::Cursor;

use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::hvm_start_info;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::layout::{ram_ranges, EBDA_START};
use crate::pvh::XEN_HVM_START_MAGIC_VALUE;
use crate::zeropage::{e820_map, E820_RAM};

const RAM: u64 = 64 << 20;
const LOAD: u64 = 0x20_0000;
const CODE: &[u8] = &[0xf4; 0x100]; // hlt

fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
}

fn phdr(kind: u32, offset: u64, addr: u64, size: u64) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&kind.to_le_bytes());
    p.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [offset, addr, addr, size, size, 0x1000] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p
}

/// An ELF64 executable with one PT_LOAD of [`CODE`] at [`LOAD`] and, optionally, a PVH note.
fn fake_elf(entry: u64, pvh_entry: Option<u32>) -> Vec<u8> {
    let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
    let note_off = 64 + 56 * u64::from(phnum);
    let code_off = 0x1000u64;
    let mut e = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&entry.to_le_bytes());
    e.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    e.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, phnum, 64, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend(phdr(1, code_off, LOAD, CODE.len() as u64));
    if let Some(pvh) = pvh_entry {
        e.extend(phdr(4, note_off, 0, 20));
        for v in [4u32, 4, 18] {
            e.extend_from_slice(&v.to_le_bytes());
        }
        e.extend_from_slice(b"Xen\0");
        e.extend_from_slice(&pvh.to_le_bytes());
    }
    e.resize(code_off as usize, 0);
    e.extend_from_slice(CODE);
    e
}

/// A bzImage: one setup sector after the boot sector, then [`CODE`] as the protected-mode
/// kernel loaded at 1 MiB.
fn fake_bzimage(xloadflags: u16) -> Vec<u8> {
    let mut b = vec![0u8; 1024];
    b[0x1f1] = 1; // setup_sects
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    b[0x211] = 1; // LOADED_HIGH
    b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    b[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
    b.extend_from_slice(CODE);
    b
}

fn boot(image: &[u8], cmdline: &str, initrd: Option<&[u8]>) -> (GuestMemory, BootLayout) {
    let mem = memory();
    let ram = ram_ranges(RAM);
    let layout = load(
        &mem,
        &mut Cursor::new(image),
        BootConfig {
            cmdline,
            initrd,
            cpus: 2,
            ram: &ram,
        },
    )
    .unwrap();
    (mem, layout)
}

fn read_cstr(mem: &GuestMemory, addr: u64) -> String {
    let mut buf = vec![0u8; 256];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    let end = buf.iter().position(|b| *b == 0).unwrap();
    String::from_utf8(buf[..end].to_vec()).unwrap()
}

#[test]
fn elf_uses_the_64bit_entry_and_zero_page() {
    let initrd = vec![0x5a; 8192];
    let (mem, layout) = boot(
        &fake_elf(LOAD + 0x10, None),
        "console=ttyS0 molt.memtest=8",
        Some(&initrd),
    );
    assert_eq!(
        layout.entry,
        BootEntry::Linux64 {
            entry: LOAD + 0x10,
            zero_page: ZERO_PAGE_START
        }
    );
    let mut code = [0u8; 0x100];
    mem.read_slice(&mut code, GuestAddress(LOAD)).unwrap();
    assert_eq!(&code[..], CODE);

    let zp: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
    assert_eq!({ zp.hdr.header }, 0x5372_6448);
    assert_eq!({ zp.hdr.cmd_line_ptr } as u64, CMDLINE_START);
    assert_eq!({ zp.hdr.cmdline_size }, 28);
    assert_eq!(
        read_cstr(&mem, CMDLINE_START),
        "console=ttyS0 molt.memtest=8"
    );

    // The initrd sits page aligned at the top of RAM, above the kernel, intact.
    let (addr, size) = layout.initrd.unwrap();
    assert_eq!(
        ({ zp.hdr.ramdisk_image } as u64, { zp.hdr.ramdisk_size }),
        (addr, size)
    );
    assert_eq!(addr % 4096, 0);
    assert!(addr >= layout.kernel_end && addr + u64::from(size) <= RAM);
    let mut back = vec![0u8; 8192];
    mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
    assert_eq!(back, initrd);

    // e820 in the zero page equals the map derived from the RAM regions.
    let expected = e820_map(&ram_ranges(RAM)).unwrap();
    assert_eq!(zp.e820_entries as usize, expected.len());
    for (got, want) in zp.e820_table.iter().zip(&expected) {
        assert_eq!(
            ({ got.addr }, { got.size }, { got.r#type }),
            (want.addr, want.size, want.kind)
        );
    }
    let usable: u64 = expected
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .map(|e| e.size)
        .sum();
    assert!(usable > RAM - (1 << 20));

    // Identity page tables and the MP table are in place.
    for va in [0u64, LOAD + 0x10, RAM - 1, 0xfee0_0000] {
        assert_eq!(
            crate::paging::translate(&mem, crate::layout::PML4_START, va),
            Some(va)
        );
    }
    let mut mp = [0u8; 4];
    mem.read_slice(&mut mp, GuestAddress(EBDA_START)).unwrap();
    assert_eq!(&mp, b"_MP_");
}

#[test]
fn elf_with_pvh_note_uses_pvh() {
    let (mem, layout) = boot(
        &fake_elf(LOAD, Some(LOAD as u32 + 0x40)),
        "root=/dev/vda",
        None,
    );
    let BootEntry::Pvh { entry, start_info } = layout.entry else {
        panic!("expected a PVH entry, got {:?}", layout.entry);
    };
    assert_eq!(entry, LOAD + 0x40);
    let info: hvm_start_info = mem.read_obj(GuestAddress(start_info)).unwrap();
    assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
    assert_eq!(read_cstr(&mem, info.cmdline_paddr), "root=/dev/vda");
    assert_eq!(info.nr_modules, 0);
}

#[test]
fn bzimage_keeps_its_header_and_enters_at_0x200() {
    let initrd = vec![1u8; 4096];
    let (mem, layout) = boot(&fake_bzimage(1), "quiet", Some(&initrd));
    assert_eq!(
        layout.entry,
        BootEntry::Linux64 {
            entry: 0x10_0200,
            zero_page: ZERO_PAGE_START
        }
    );
    let zp: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
    assert_eq!({ zp.hdr.version }, 0x020f);
    assert_eq!({ zp.hdr.type_of_loader }, 0xff);
    assert_eq!({ zp.hdr.cmdline_size }, 5);
    let ramdisk = zp.hdr.ramdisk_image;
    assert!(u64::from(ramdisk) >= layout.kernel_end);
    let mut code = [0u8; 0x100];
    mem.read_slice(&mut code, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(&code[..], CODE);
}

#[test]
fn bzimage_without_64bit_entry_is_refused() {
    let mem = memory();
    let ram = ram_ranges(RAM);
    let err = load(
        &mem,
        &mut Cursor::new(fake_bzimage(0)),
        BootConfig {
            cmdline: "",
            initrd: None,
            cpus: 1,
            ram: &ram,
        },
    )
    .unwrap_err();
    assert!(matches!(err, LoaderError::No64BitEntry), "{err}");
}

#[test]
fn garbage_and_oversized_inputs_are_errors() {
    let mem = memory();
    let ram = ram_ranges(RAM);
    let cfg = |initrd| BootConfig {
        cmdline: "",
        initrd,
        cpus: 1,
        ram: &ram,
    };
    let err = load(&mem, &mut Cursor::new(vec![0u8; 4096]), cfg(None)).unwrap_err();
    assert!(matches!(err, LoaderError::UnknownFormat), "{err}");
    let big = vec![0u8; RAM as usize];
    let err = load(
        &mem,
        &mut Cursor::new(fake_elf(LOAD, None)),
        cfg(Some(&big)),
    )
    .unwrap_err();
    assert!(matches!(err, LoaderError::InitrdTooLarge { .. }), "{err}");
    let long = "x".repeat(CMDLINE_MAX_SIZE + 1);
    let err = load(
        &mem,
        &mut Cursor::new(fake_elf(LOAD, None)),
        BootConfig {
            cmdline: &long,
            initrd: None,
            cpus: 1,
            ram: &ram,
        },
    )
    .unwrap_err();
    assert!(matches!(err, LoaderError::Cmdline(_)), "{err}");
}
