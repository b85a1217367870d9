//! A tiny virtio-mmio driver for tests: sets up split virtqueues in guest memory and drives
//! an `MmioTransport` through its registers the way Linux's virtio_mmio driver does.

#![allow(dead_code)]

use std::fs::File;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use devices::virtio::{GuestMemory, MmioTransport, VirtioDevice};
use vm_memory::{Bytes, FileOffset, GuestAddress};

pub const MEM_SIZE: usize = 4 << 20;
pub const F_VERSION_1: u64 = 1 << 32;

pub const S_ACK: u32 = 1;
pub const S_DRIVER: u32 = 2;
pub const S_DRIVER_OK: u32 = 4;
pub const S_FEATURES_OK: u32 = 8;
pub const S_NEEDS_RESET: u32 = 0x40;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

/// Where the test driver keeps queue `i`'s rings and the data buffers.
const RING_BASE: u64 = 0x10000;
const RING_STRIDE: u64 = 0x10000;
const BUF_BASE: u64 = 0x100000;

/// Anonymous guest memory.
pub fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Guest memory backed by `file` (mapped again to get a second host mapping of the same RAM).
pub fn file_memory(file: &File) -> GuestMemory {
    file.set_len(MEM_SIZE as u64).unwrap();
    let fo = FileOffset::new(file.try_clone().unwrap(), 0);
    GuestMemory::from_ranges_with_files([(GuestAddress(0), MEM_SIZE, Some(fo))]).unwrap()
}

/// Driver-side view of one split virtqueue.
#[derive(Clone, Debug)]
pub struct Vq {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_desc: u16,
    pub avail_idx: u16,
    pub used_seen: u16,
}

/// One descriptor to chain: address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

pub fn rd(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: false,
    }
}

pub fn wr(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: true,
    }
}

pub struct Driver {
    pub t: MmioTransport,
    pub mem: GuestMemory,
    pub irqs: Arc<AtomicUsize>,
    pub vqs: Vec<Vq>,
    next_buf: u64,
    ring_base: u64,
}

pub fn irq_counter() -> (Arc<AtomicUsize>, Box<dyn Fn() + Send>) {
    let irqs = Arc::new(AtomicUsize::new(0));
    let i = irqs.clone();
    (
        irqs,
        Box::new(move || {
            i.fetch_add(1, Ordering::SeqCst);
        }),
    )
}

impl Driver {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory) -> Self {
        Self::with_region(device, mem, 0)
    }

    /// A driver whose rings and buffers are offset by `region` (several drivers, one RAM).
    pub fn with_region(device: Box<dyn VirtioDevice>, mem: GuestMemory, region: u64) -> Self {
        let (irqs, irq) = irq_counter();
        Self {
            t: MmioTransport::new(device, mem.clone(), irq),
            mem,
            irqs,
            vqs: Vec::new(),
            next_buf: BUF_BASE + region * 0x80000,
            ring_base: RING_BASE + region * 0x40000,
        }
    }

    pub fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn w32(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    pub fn status(&mut self) -> u32 {
        self.r32(0x70)
    }

    pub fn device_features(&mut self) -> u64 {
        self.w32(0x14, 0);
        let lo = self.r32(0x10) as u64;
        self.w32(0x14, 1);
        let hi = self.r32(0x10) as u64;
        lo | hi << 32
    }

    /// Reset, ACK, DRIVER, features, FEATURES_OK; returns whether FEATURES_OK stuck.
    pub fn negotiate(&mut self, features: u64) -> bool {
        assert_eq!(self.r32(0x00), 0x7472_6976);
        assert_eq!(self.r32(0x04), 2);
        self.w32(0x70, 0);
        assert_eq!(self.status(), 0);
        self.w32(0x70, S_ACK);
        self.w32(0x70, S_ACK | S_DRIVER);
        let offered = self.device_features();
        let f = features & offered;
        self.w32(0x24, 0);
        self.w32(0x20, f as u32);
        self.w32(0x24, 1);
        self.w32(0x20, (f >> 32) as u32);
        self.w32(0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
        self.status() & S_FEATURES_OK != 0
    }

    /// Sets up queue `index` with `size` entries (rings placed by the driver).
    pub fn setup_queue(&mut self, index: u32, size: u16) {
        self.w32(0x30, index);
        let max = self.r32(0x34);
        assert!(max > 0, "queue {index} not available");
        assert_eq!(self.r32(0x44), 0, "queue {index} already ready");
        let desc = self.ring_base + u64::from(index) * RING_STRIDE;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        self.set_queue_regs(size as u32, desc, avail, used);
        self.w32(0x44, 1);
        let vq = Vq {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        let i = index as usize;
        if self.vqs.len() <= i {
            self.vqs.resize(i + 1, vq.clone());
        }
        self.vqs[i] = vq;
        // Rings start zeroed.
        let zero = vec![0u8; (16 + 2 + 8) * size as usize + 12];
        self.mem
            .write_slice(&zero[..16 * size as usize], GuestAddress(desc))
            .unwrap();
        self.mem
            .write_slice(&zero[..6 + 2 * size as usize], GuestAddress(avail))
            .unwrap();
        self.mem
            .write_slice(&zero[..6 + 8 * size as usize], GuestAddress(used))
            .unwrap();
    }

    pub fn set_queue_regs(&mut self, size: u32, desc: u64, avail: u64, used: u64) {
        self.w32(0x38, size);
        self.w32(0x80, desc as u32);
        self.w32(0x84, (desc >> 32) as u32);
        self.w32(0x90, avail as u32);
        self.w32(0x94, (avail >> 32) as u32);
        self.w32(0xa0, used as u32);
        self.w32(0xa4, (used >> 32) as u32);
    }

    pub fn driver_ok(&mut self) {
        let s = self.status();
        self.w32(0x70, s | S_DRIVER_OK);
    }

    /// Full Linux-style bring-up of every queue at its maximum size. Panics on refusal.
    pub fn init(&mut self, features: u64) {
        assert!(self.negotiate(features), "FEATURES_OK refused");
        for q in 0..self.t.queue_count() as u32 {
            self.w32(0x30, q);
            let max = self.r32(0x34) as u16;
            self.setup_queue(q, max.min(64));
        }
        self.driver_ok();
        assert_eq!(self.status() & (S_DRIVER_OK | S_NEEDS_RESET), S_DRIVER_OK);
    }

    /// A guest buffer of `len` bytes filled with `fill`.
    pub fn alloc(&mut self, len: usize, fill: u8) -> u64 {
        let addr = self.next_buf;
        self.next_buf = (addr + len as u64 + 15) & !15;
        self.mem
            .write_slice(&vec![fill; len], GuestAddress(addr))
            .unwrap();
        addr
    }

    pub fn write_desc(&mut self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let vq = &self.vqs[q];
        let at = GuestAddress(vq.desc + 16 * u64::from(index));
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, at).unwrap();
    }

    /// Publishes `head` in the available ring.
    pub fn publish(&mut self, q: usize, head: u16) {
        let vq = &mut self.vqs[q];
        let slot = vq.avail + 4 + 2 * u64::from(vq.avail_idx % vq.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        vq.avail_idx = vq.avail_idx.wrapping_add(1);
        let (idx, at) = (vq.avail_idx, vq.avail + 2);
        self.mem.write_obj(idx.to_le(), GuestAddress(at)).unwrap();
    }

    /// Writes a chain of descriptors for `bufs` and publishes it; returns its head.
    pub fn add(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let size = self.vqs[q].size;
        let head = self.vqs[q].next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let index = (head + i as u16) % size;
            let last = i + 1 == bufs.len();
            let flags = if b.write { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
            self.write_desc(q, index, b.addr, b.len, flags, (index + 1) % size);
        }
        self.vqs[q].next_desc = (head + bufs.len() as u16) % size;
        self.publish(q, head);
        head
    }

    pub fn kick(&mut self, q: u32) {
        self.w32(MmioTransport::NOTIFY_OFFSET, q);
    }

    /// New used-ring entries since the last call: (head, len).
    pub fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let vq = self.vqs[q].clone();
        let idx: u16 = self.mem.read_obj(GuestAddress(vq.used + 2)).unwrap();
        let mut out = Vec::new();
        let mut seen = vq.used_seen;
        while seen != idx {
            let at = vq.used + 4 + 8 * u64::from(seen % vq.size);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            seen = seen.wrapping_add(1);
        }
        self.vqs[q].used_seen = seen;
        out
    }

    /// Reads InterruptStatus and acknowledges it.
    pub fn ack_interrupt(&mut self) -> u32 {
        let s = self.r32(0x60);
        self.w32(0x64, s);
        s
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    pub fn byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    pub fn irq_count(&self) -> usize {
        self.irqs.load(Ordering::SeqCst)
    }

    /// Replaces the transport by one rebuilt from a JSON round trip of its state, over `mem`.
    pub fn rebuild(
        &mut self,
        mem: GuestMemory,
        device: impl FnOnce(&devices::virtio::ModelState) -> Box<dyn VirtioDevice>,
    ) {
        let json = serde_json::to_string(&self.t.state()).unwrap();
        let state: devices::virtio::MmioState = serde_json::from_str(&json).unwrap();
        let (irqs, irq) = irq_counter();
        let dev = device(&state.device);
        self.t = MmioTransport::from_state(&state, dev, mem.clone(), irq).unwrap();
        self.mem = mem;
        self.irqs = irqs;
    }
}
