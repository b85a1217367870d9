//! virtio-mmio (version 2) transport and split virtqueues, driven by polling.
//!
//! The guest never enables interrupts: a driver puts a descriptor chain in the
//! available ring, writes the queue index to QueueNotify and checks the used
//! ring in later main-loop iterations. Rings and buffers live in statics
//! (`Dma`) in the image's `.dma` section: below the memory-test area, and at
//! guest physical = virtual addresses (the first 4 GiB are identity-mapped),
//! so their addresses go to the device as they are.

use core::cell::UnsafeCell;
use core::mem::{offset_of, MaybeUninit};
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{compiler_fence, AtomicBool, Ordering};

/// Entries of every queue the guest sets up (a power of two; the devices
/// offer up to 256).
pub const QUEUE_SIZE: u16 = 8;

/// Feature bit VIRTIO_F_VERSION_1 (bit 32).
pub const F_VERSION_1: u64 = 1 << 32;

/// Descriptor flags.
pub const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;

/// InterruptStatus bit: the device used buffers.
pub const INT_USED: u32 = 1;

// Registers of the virtio-mmio window (virtio 1.x, section 4.2.2).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC: u64 = 0x080;
const REG_QUEUE_DRIVER: u64 = 0x090;
const REG_QUEUE_DEVICE: u64 = 0x0a0;
const REG_CONFIG: u64 = 0x100;

const MAGIC: u32 = 0x7472_6976; // "virt"

// Device status bits.
const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 64;
const S_FAILED: u32 = 128;

/// Device IDs the guest has drivers for.
pub const ID_NET: u32 = 1;
pub const ID_BLOCK: u32 = 2;
pub const ID_RNG: u32 = 4;

/// Smallest window the drivers work with (registers plus a little config).
pub const MIN_WINDOW: u64 = 0x200;
/// The identity map covers the first 4 GiB only.
const MAPPED_END: u64 = 4 << 30;

/// Why a device cannot be used (printed after `FAIL`).
pub type Why = &'static str;

/// Memory a driver shares with its device: a static in the `.dma` section,
/// which `_start` does not zero (under the instruction emulator that would
/// add milliseconds to every boot). `take` hands it out once, uninitialised
/// except that `setup_queue` clears each ring.
pub struct Dma<T> {
    cell: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY: the contents are reached only through the pointer `take` returns,
// and `take` returns it at most once (guarded by the flag it is given), so
// only one driver (on the BSP) ever accesses the memory; the device's
// accesses are ordered by the ring protocol.
unsafe impl<T> Sync for Dma<T> {}

impl<T> Dma<T> {
    pub const fn uninit() -> Dma<T> {
        Dma {
            cell: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// The memory, the first time `taken` is passed in only.
    pub fn take(&'static self, taken: &AtomicBool) -> Option<*mut T> {
        (!taken.swap(true, Ordering::AcqRel)).then(|| self.cell.get().cast::<T>())
    }
}

/// The registers of one device.
#[derive(Clone, Copy)]
pub struct Mmio {
    pub base: u64,
}

impl Mmio {
    fn read(self, offset: u64) -> u32 {
        // SAFETY: `base` is a virtio-mmio window from the command line,
        // checked to lie in the identity-mapped first 4 GiB and to be at
        // least MIN_WINDOW long; the access is 32-bit and aligned, and
        // becomes an MMIO exit that the VMM handles.
        unsafe { core::ptr::read_volatile((self.base + offset) as *const u32) }
    }

    fn write(self, offset: u64, value: u32) {
        // SAFETY: as in `read`.
        unsafe { core::ptr::write_volatile((self.base + offset) as *mut u32, value) }
    }

    pub fn device_id(self) -> u32 {
        self.read(REG_DEVICE_ID)
    }

    /// A 32-bit word of the device configuration space.
    pub fn config(self, offset: u64) -> u32 {
        self.read(REG_CONFIG + offset)
    }

    pub fn status(self) -> u32 {
        self.read(REG_STATUS)
    }

    /// Reads and acknowledges the device's InterruptStatus (bit 0: used buffers, bit 1:
    /// configuration change).
    pub fn take_interrupt(self) -> u32 {
        let status = self.read(REG_INTERRUPT_STATUS);
        if status != 0 {
            self.write(REG_INTERRUPT_ACK, status);
        }
        status
    }

    pub fn needs_reset(self) -> bool {
        self.status() & S_NEEDS_RESET != 0
    }

    pub fn reset(self) {
        self.write(REG_STATUS, 0);
    }

    /// Checks the magic value and version, without touching the device.
    pub fn check(self) -> Result<u32, Why> {
        if self.read(REG_MAGIC) != MAGIC {
            return Err("bad magic");
        }
        if self.read(REG_VERSION) != 2 {
            return Err("bad version");
        }
        Ok(self.device_id())
    }

    /// First half of the initialisation (virtio 1.x, 3.1.1): reset,
    /// ACKNOWLEDGE, DRIVER, feature negotiation and FEATURES_OK. Accepts
    /// VERSION_1 and those of `wanted` the device offers; returns them.
    pub fn negotiate(self, wanted: u64) -> Result<u64, Why> {
        self.reset();
        if self.status() != 0 {
            return Err("reset failed");
        }
        self.write(REG_STATUS, S_ACKNOWLEDGE);
        self.write(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
        self.write(REG_DEVICE_FEATURES_SEL, 0);
        let low = self.read(REG_DEVICE_FEATURES);
        self.write(REG_DEVICE_FEATURES_SEL, 1);
        let high = self.read(REG_DEVICE_FEATURES);
        let offered = u64::from(low) | u64::from(high) << 32;
        if offered & F_VERSION_1 == 0 {
            self.fail();
            return Err("no VERSION_1");
        }
        let accepted = offered & (wanted | F_VERSION_1);
        self.write(REG_DRIVER_FEATURES_SEL, 0);
        self.write(REG_DRIVER_FEATURES, accepted as u32);
        self.write(REG_DRIVER_FEATURES_SEL, 1);
        self.write(REG_DRIVER_FEATURES, (accepted >> 32) as u32);
        self.write(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        let status = self.status();
        if status & S_NEEDS_RESET != 0 {
            self.fail();
            return Err("device needs reset");
        }
        if status & S_FEATURES_OK == 0 {
            self.fail();
            return Err("FEATURES_OK refused");
        }
        Ok(accepted)
    }

    /// Clears `ring`, configures queue `index` over it (QueueNum =
    /// QUEUE_SIZE) and marks it ready.
    pub fn setup_queue(self, index: u16, ring: *mut Ring) -> Result<Queue, Why> {
        // SAFETY: `ring` is ring memory of the calling driver (Dma::take),
        // which the device does not use before QueueReady.
        unsafe { ring.write_volatile(Ring::ZERO) };
        self.write(REG_QUEUE_SEL, index.into());
        if self.read(REG_QUEUE_READY) != 0 {
            self.fail();
            return Err("queue already ready");
        }
        let max = self.read(REG_QUEUE_NUM_MAX);
        if max == 0 {
            self.fail();
            return Err("queue missing");
        }
        if max < u32::from(QUEUE_SIZE) {
            self.fail();
            return Err("queue too small");
        }
        self.write(REG_QUEUE_NUM, QUEUE_SIZE.into());
        let base = ring as u64;
        let addresses = [
            (REG_QUEUE_DESC, base + offset_of!(Ring, desc) as u64),
            (REG_QUEUE_DRIVER, base + offset_of!(Ring, avail) as u64),
            (REG_QUEUE_DEVICE, base + offset_of!(Ring, used) as u64),
        ];
        for (reg, addr) in addresses {
            self.write(reg, addr as u32);
            self.write(reg + 4, (addr >> 32) as u32);
        }
        self.write(REG_QUEUE_READY, 1);
        Ok(Queue {
            mmio: self,
            index,
            ring,
            next_avail: 0,
            last_used: 0,
        })
    }

    /// Last step of the initialisation: DRIVER_OK, and checks the device
    /// took it.
    pub fn driver_ok(self) -> Result<(), Why> {
        self.write(
            REG_STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        let status = self.status();
        if status & S_NEEDS_RESET != 0 {
            self.fail();
            return Err("device needs reset");
        }
        if status & S_DRIVER_OK == 0 {
            self.fail();
            return Err("DRIVER_OK refused");
        }
        Ok(())
    }

    /// Gives up on the device (sets FAILED).
    fn fail(self) {
        self.write(REG_STATUS, self.status() | S_FAILED);
    }
}

/// One descriptor of the descriptor table.
#[repr(C)]
pub struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// The driver area (available ring), without event index.
#[repr(C, align(2))]
pub struct Avail {
    flags: u16,
    idx: u16,
    ring: [u16; QUEUE_SIZE as usize],
    used_event: u16,
}

#[repr(C)]
pub struct UsedElem {
    id: u32,
    len: u32,
}

/// The device area (used ring).
#[repr(C, align(4))]
pub struct Used {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QUEUE_SIZE as usize],
    avail_event: u16,
}

/// The three parts of a split virtqueue, properly aligned (16, 2 and 4).
#[repr(C, align(16))]
pub struct Ring {
    desc: [Desc; QUEUE_SIZE as usize],
    avail: Avail,
    used: Used,
}

impl Ring {
    /// All zeros: what the rings must hold before the device sees them.
    pub const ZERO: Ring = Ring {
        desc: [const {
            Desc {
                addr: 0,
                len: 0,
                flags: 0,
                next: 0,
            }
        }; QUEUE_SIZE as usize],
        avail: Avail {
            flags: 0,
            idx: 0,
            ring: [0; QUEUE_SIZE as usize],
            used_event: 0,
        },
        used: Used {
            flags: 0,
            idx: 0,
            ring: [const { UsedElem { id: 0, len: 0 } }; QUEUE_SIZE as usize],
            avail_event: 0,
        },
    };
}

/// A configured virtqueue and the driver's position in it.
pub struct Queue {
    mmio: Mmio,
    index: u16,
    ring: *mut Ring,
    /// Next free available-ring slot (free-running, mod 2^16).
    next_avail: u16,
    /// Next used-ring entry to consume (free-running).
    last_used: u16,
}

impl Queue {
    /// Writes descriptor `i` (< QUEUE_SIZE). Only for descriptors the device
    /// does not own now.
    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let i = usize::from(i % QUEUE_SIZE);
        // SAFETY: `ring` is this queue's ring memory, owned by the driver
        // (Dma::take); descriptor i is not in the device's hands, so
        // nobody else accesses it now.
        unsafe {
            addr_of_mut!((*self.ring).desc[i]).write_volatile(Desc {
                addr,
                len,
                flags,
                next,
            });
        }
    }

    /// Makes the chain starting at descriptor `head` available (no notify).
    pub fn push(&mut self, head: u16) {
        let slot = usize::from(self.next_avail % QUEUE_SIZE);
        self.next_avail = self.next_avail.wrapping_add(1);
        // SAFETY: as in set_desc; the slot is free because the driver never
        // has more than QUEUE_SIZE chains outstanding. The buffers and
        // descriptors are written before the index (x86 keeps stores in
        // order; the fence keeps the compiler from reordering them).
        unsafe {
            addr_of_mut!((*self.ring).avail.ring[slot]).write_volatile(head);
            compiler_fence(Ordering::SeqCst);
            addr_of_mut!((*self.ring).avail.idx).write_volatile(self.next_avail);
        }
    }

    /// Tells the device to look at the available ring.
    pub fn notify(&self) {
        self.mmio.write(REG_QUEUE_NOTIFY, self.index.into());
    }

    /// The next used chain: (head descriptor, bytes written by the device).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: the used ring belongs to the queue's ring memory; the
        // device writes an element before it publishes the index, so the
        // element at `last_used` is complete once the index passed it.
        unsafe {
            let idx = addr_of!((*self.ring).used.idx).read_volatile();
            if idx == self.last_used {
                return None;
            }
            compiler_fence(Ordering::SeqCst);
            let slot = usize::from(self.last_used % QUEUE_SIZE);
            let id = addr_of!((*self.ring).used.ring[slot].id).read_volatile();
            let len = addr_of!((*self.ring).used.ring[slot].len).read_volatile();
            self.last_used = self.last_used.wrapping_add(1);
            compiler_fence(Ordering::SeqCst);
            Some((id as u16, len))
        }
    }
}

/// Splits `size@base:irq[:id]` (a `virtio_mmio.device=` value) into size,
/// base and interrupt line. Size takes an optional K/M/G suffix, as in Linux.
pub fn parse_device(value: &[u8]) -> Option<(u64, u64, Option<u32>)> {
    let at = value.iter().position(|&c| c == b'@')?;
    let (size, rest) = (&value[..at], &value[at + 1..]);
    let (digits, shift) = match size.last()? {
        b'k' | b'K' => (&size[..size.len() - 1], 10),
        b'm' | b'M' => (&size[..size.len() - 1], 20),
        b'g' | b'G' => (&size[..size.len() - 1], 30),
        _ => (size, 0),
    };
    let size = crate::bootparams::parse_num(digits)?.checked_mul(1 << shift)?;
    let colon = rest.iter().position(|&c| c == b':').unwrap_or(rest.len());
    let base = crate::bootparams::parse_num(&rest[..colon])?;
    let irq = rest.get(colon + 1..).map(|r| {
        let end = r.iter().position(|&c| c == b':').unwrap_or(r.len());
        &r[..end]
    });
    let irq = irq
        .and_then(crate::bootparams::parse_num)
        .and_then(|n| u32::try_from(n).ok());
    Some((size, base, irq))
}

/// Whether a window is usable at all (mapped, large enough, aligned).
pub fn window_ok(size: u64, base: u64) -> Result<Mmio, Why> {
    if size < MIN_WINDOW || !base.is_multiple_of(4) {
        return Err("bad window");
    }
    if base.checked_add(size).is_none_or(|end| end > MAPPED_END) {
        return Err("window not mapped");
    }
    Ok(Mmio { base })
}
