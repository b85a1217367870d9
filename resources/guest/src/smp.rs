//! CPU discovery from the Intel MP table and AP start-up (INIT + SIPI).
//!
//! Index 0 is the BSP; the other CPUs are numbered in MP-table order.

use crate::boot::{self, MAX_CPUS, TRAMPOLINE_ADDR};
use crate::serial::Line;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// The CPUs found in the MP table.
pub struct Cpus {
    pub count: usize,
    /// Local APIC ID of each CPU, BSP first.
    pub apic_ids: [u8; MAX_CPUS],
    /// Physical address of the local APIC.
    pub lapic: u64,
}

const DEFAULT_LAPIC: u64 = 0xfee0_0000;
const MP_ENTRY_PROCESSOR: u8 = 0;
const PROCESSOR_ENTRY_SIZE: u64 = 20;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;

/// Reads a `T` at `addr` in the low 1 MiB (BIOS areas) or in the MP
/// configuration table the VMM wrote.
fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: all of those are identity-mapped guest RAM (or ROM-like
    // memory) that reads without side effects; the read may be unaligned.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

fn read_u8(addr: u64) -> u8 {
    read(addr)
}

fn read_u16(addr: u64) -> u16 {
    read(addr)
}

fn read_u32(addr: u64) -> u32 {
    read(addr)
}

/// Whether the bytes at `addr..addr + len` add up to 0 (mod 256).
///
/// Every instruction is emulated, so this reads 8 bytes at a time: the even
/// and the odd bytes of each word are added into four 16-bit lanes (at most
/// 510 per word, so 128 words cannot overflow a lane), which are folded at
/// the end; only the low 8 bits of the lane sum matter.
fn checksum_ok(addr: u64, len: u64) -> bool {
    const EVEN_BYTES: u64 = 0x00ff_00ff_00ff_00ff;
    let fold = |lanes: u64| (lanes + (lanes >> 16) + (lanes >> 32) + (lanes >> 48)) as u8;
    let words = len / 8;
    let mut sum = 0u8;
    let mut lanes = 0u64;
    for i in 0..words {
        let w: u64 = read(addr + i * 8);
        lanes += (w & EVEN_BYTES) + ((w >> 8) & EVEN_BYTES);
        if i % 128 == 127 {
            sum = sum.wrapping_add(fold(lanes));
            lanes = 0;
        }
    }
    sum = sum.wrapping_add(fold(lanes));
    for i in words * 8..len {
        sum = sum.wrapping_add(read_u8(addr + i));
    }
    sum == 0
}

/// Looks for the "_MP_" floating pointer structure in `start..start+len`.
fn scan(start: u64, len: u64) -> Option<u64> {
    (start..start + len).step_by(16).find(|&a| {
        read_u32(a) == u32::from_le_bytes(*b"_MP_") && read_u8(a + 8) == 1 && checksum_ok(a, 16)
    })
}

/// Finds the floating pointer where Linux looks for it: the first KiB of the
/// EBDA, the last KiB of base memory, and the BIOS ROM area.
fn find_floating_pointer() -> Option<u64> {
    let ebda = u64::from(read_u16(0x40e)) << 4;
    let ebda_hit = if (0x8_0000..0xa_0000).contains(&ebda) {
        scan(ebda, 1024)
    } else {
        None
    };
    ebda_hit
        .or_else(|| scan(0x9_fc00, 1024))
        .or_else(|| scan(0xf_0000, 0x1_0000))
}

impl Cpus {
    /// Reads the MP table; `bsp_apic_id` is our own APIC ID (from CPUID,
    /// which the caller reads before the CPU may run natively).
    pub fn discover(bsp_apic_id: u8) -> Cpus {
        let mut cpus = Cpus {
            count: 1,
            apic_ids: [0; MAX_CPUS],
            lapic: DEFAULT_LAPIC,
        };
        let Some(mpf) = find_floating_pointer() else {
            return cpus;
        };
        let table = u64::from(read_u32(mpf + 4));
        if table == 0 {
            // A "default configuration" (feature byte 1 != 0): two CPUs.
            if read_u8(mpf + 11) != 0 {
                cpus.count = 2;
                cpus.apic_ids[1] = 1;
            }
            return cpus;
        }
        let len = u64::from(read_u16(table + 4));
        if read_u32(table) != u32::from_le_bytes(*b"PCMP") || !checksum_ok(table, len) {
            return cpus;
        }
        let lapic = u64::from(read_u32(table + 36));
        if lapic != 0 {
            cpus.lapic = lapic;
        }
        // Collect enabled processors: the BSP goes to index 0, the others
        // follow in table order. Entries are sorted by type (MP spec 1.4,
        // 4.3), so the processors are all at the start.
        let mut count = 1;
        let mut have_bsp = false;
        let entries = read_u16(table + 34);
        let mut entry = table + 44;
        for _ in 0..entries {
            if entry + PROCESSOR_ENTRY_SIZE > table + len || read_u8(entry) != MP_ENTRY_PROCESSOR {
                break;
            }
            let flags = read_u8(entry + 3);
            if flags & CPU_ENABLED != 0 {
                let apic_id = read_u8(entry + 1);
                if flags & CPU_BSP != 0 && !have_bsp {
                    cpus.apic_ids[0] = apic_id;
                    have_bsp = true;
                } else if count < MAX_CPUS {
                    cpus.apic_ids[count] = apic_id;
                    count += 1;
                }
            }
            entry += PROCESSOR_ENTRY_SIZE;
        }
        if !have_bsp {
            // No CPU flagged as BSP: trust our own APIC ID for index 0.
            cpus.apic_ids[0] = bsp_apic_id;
            if let Some(i) = (1..count).find(|&i| cpus.apic_ids[i] == cpus.apic_ids[0]) {
                cpus.apic_ids.copy_within(i + 1..count, i);
                count -= 1;
            }
        }
        cpus.count = count;
        cpus
    }
}

// Local APIC registers.
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
const ICR_PENDING: u32 = 1 << 12;
const ICR_INIT_ASSERT: u32 = 0x0000_4500; // INIT, level assert, edge
const ICR_STARTUP: u32 = 0x0000_4600; // start-up IPI, vector in bits 0..7

fn send_ipi(lapic: u64, apic_id: u8, command: u32) {
    // SAFETY: xAPIC MMIO registers of this CPU's local APIC, identity-mapped;
    // the high half (destination) is written before the low half, which
    // sends the IPI.
    unsafe {
        core::ptr::write_volatile((lapic + ICR_HIGH) as *mut u32, u32::from(apic_id) << 24);
        core::ptr::write_volatile((lapic + ICR_LOW) as *mut u32, command);
    }
    for _ in 0..1000 {
        // SAFETY: as above; reading ICR low has no side effects.
        if unsafe { core::ptr::read_volatile((lapic + ICR_LOW) as *const u32) } & ICR_PENDING == 0 {
            break;
        }
    }
}

/// Index of the last AP that reached `ap_main`.
static ARRIVED: AtomicU32 = AtomicU32::new(0);
/// Set once the BSP has started every AP it could.
static ALL_UP: AtomicBool = AtomicBool::new(false);

/// Waits until AP `index` has arrived or `ms` milliseconds passed.
fn wait_arrival(index: u32, ms: u64, tsc_khz: u64) -> bool {
    let start = boot::rdtsc();
    while boot::rdtsc().wrapping_sub(start) < ms * tsc_khz {
        if ARRIVED.load(Ordering::Acquire) == index {
            return true;
        }
    }
    false
}

/// Copies the trampoline to 0x8000 and starts the APs one at a time, then
/// lets them go on.
pub fn start_aps(cpus: &Cpus, tsc_khz: u64) {
    start_each(cpus, tsc_khz);
    ALL_UP.store(true, Ordering::Release);
}

fn start_each(cpus: &Cpus, tsc_khz: u64) {
    let code = boot::trampoline();
    let (cr3_slot, efer_slot) = boot::trampoline_slots();
    let dst = TRAMPOLINE_ADDR as *mut u8;
    // SAFETY: 0x8000..0x9000 is free low RAM (the VMM's boot stack page,
    // left behind in _start); the trampoline is a few hundred bytes. The
    // slots are 4-byte fields inside the copied code.
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), dst, code.len());
        core::ptr::write_unaligned(dst.add(cr3_slot).cast::<u32>(), boot::read_cr3() as u32);
        // EFER without LMA (read-only bit); the trampoline adds LME.
        let efer = boot::rdmsr(0xc000_0080) & !(1 << 10);
        core::ptr::write_unaligned(dst.add(efer_slot).cast::<u32>(), efer as u32);
    }
    for index in 1..cpus.count as u32 {
        let apic_id = cpus.apic_ids[index as usize];
        if apic_id == cpus.apic_ids[0] {
            continue; // never INIT ourselves
        }
        boot::prepare_ap(index);
        send_ipi(cpus.lapic, apic_id, ICR_INIT_ASSERT);
        // On hardware 10 ms; KVM handles INIT at once.
        wait_arrival(index, 1, tsc_khz);
        send_ipi(
            cpus.lapic,
            apic_id,
            ICR_STARTUP | (TRAMPOLINE_ADDR >> 12) as u32,
        );
        if !wait_arrival(index, 200, tsc_khz) {
            send_ipi(
                cpus.lapic,
                apic_id,
                ICR_STARTUP | (TRAMPOLINE_ADDR >> 12) as u32,
            );
            if !wait_arrival(index, 2000, tsc_khz) {
                // Stop here: a late AP would take the stack and index we
                // would prepare for the next one.
                Line::new()
                    .s(b"cpu id=")
                    .dec(index.into())
                    .s(b" timeout")
                    .print();
                return;
            }
        }
    }
}

/// Rust entry of an AP (called by `ap_entry64` on its own stack).
pub extern "C" fn ap_main(index: u32) -> ! {
    boot::load_idt(false);
    ARRIVED.store(index, Ordering::Release);
    // Measured: while an AP runs natively, KVM's emulator fails (internal
    // error) on the far jump of the next AP's trampoline. So the APs switch
    // only once all of them are up.
    while !ALL_UP.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    let mode = crate::native::switch_ap(crate::bsp_mode());
    Line::new()
        .s(b"cpu id=")
        .dec(index.into())
        .s(b" up ")
        .s(mode.describe())
        .print();
    let mut ticker = crate::CpuTicker::new(index);
    loop {
        ticker.poll(boot::rdtsc());
    }
}
