//! The test guest kernel (`resources/guest`), built by `build.rs`.

/// The molt test guest: an ELF64 x86-64 executable, statically linked at
/// 1 MiB, booted with Linux's 64-bit boot protocol. It is what the VMM boots
/// when no `--kernel` is given.
pub static GUEST_KERNEL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/molt-guest.elf"));
