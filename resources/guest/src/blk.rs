//! virtio-blk test driver (`molt.blk=on`): numbered records across the disk.
//!
//! On-disk layout (512-byte sectors, all fields u64 little-endian):
//!
//! ```text
//! sector 0, superblock: 0 magic "MOLTBLKS", 8 last_seq, 16 checksum of words 0..2,
//!                       24..512 zero (not checked)
//! sector n, record n:   0 magic "MOLTBLKR", 8 seq = n, 16 sector = n,
//!                       24..504 payload word w (w = 3..63) = payload(seq, w),
//!                       504 checksum of words 0..63
//! ```
//!
//! `checksum` and `payload` below define the values (integer only, cheap
//! under the instruction emulator: a few instructions per 64-bit word).
//!
//! At boot the driver reads the superblock; if it is valid it reads and
//! verifies records 1..=last_seq and reports the result, then checks the
//! replay ring at the end of the disk ([`crate::blk_ring`]). Then it loops:
//! write record n, read it back and verify it, read and rewrite the next ring
//! slot, every 8 records (and before the records reach the ring) flush (when
//! FLUSH was negotiated) and write the superblock, then n + 1. One request is in flight at a time; `poll` takes
//! its completion and submits the next one (a write in the next call).
//!
//! ```text
//! molt-guest: blk capacity=<sectors> ro=<0|1>
//! molt-guest: blk boot found=0 [FAIL <why>]
//! molt-guest: blk boot found=<last_seq> verified=<count> ok | FAIL seq=<n> <why>
//! molt-guest: blk ring found=<seq> ok | blk ring found=? FAIL slot=<i> <why>
//! molt-guest: blk n=<n> ok | blk n=<n> FAIL <why>
//! molt-guest: blk ring r=<seq> FAIL replay seq=<older> | lost | …
//! molt-guest: blk full
//! molt-guest: blk writes skipped ro=1
//! ```

use crate::blk_ring::{self, RING};
use crate::serial::Line;
use crate::virtio::{Dma, Mmio, Queue, Ring, Why, DESC_NEXT, DESC_WRITE, INT_USED};
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::AtomicBool;

const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const S_OK: u8 = 0;
/// Status byte value before the device answers.
const S_NONE: u8 = 0xff;

/// 64-bit words in a sector.
pub const WORDS: usize = 64;
/// One sector as words.
pub type Words = [u64; WORDS];
const SUPER_MAGIC: u64 = u64::from_le_bytes(*b"MOLTBLKS");
const RECORD_MAGIC: u64 = u64::from_le_bytes(*b"MOLTBLKR");
/// The superblock is rewritten after every this many records.
const SUPER_EVERY: u64 = 8;
/// A request that takes longer is reported (once) as a failure.
const TIMEOUT_MS: u64 = 10_000;

/// Checksum of `words`: FNV-1a over 64-bit words (offset basis
/// 0xcbf29ce484222325, prime 0x100000001b3) with `h ^= h >> 32` after each
/// multiplication.
pub fn checksum(words: &[u64]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &w in words {
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
        h ^= h >> 32;
    }
    h
}

/// Word `w` of the payload of record `seq`.
pub fn payload(seq: u64, w: usize) -> u64 {
    seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (w as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

fn fill_record(words: &mut [u64; WORDS], seq: u64) {
    words[0] = RECORD_MAGIC;
    words[1] = seq;
    words[2] = seq;
    for (w, word) in words.iter_mut().enumerate().take(WORDS - 1).skip(3) {
        *word = payload(seq, w);
    }
    words[WORDS - 1] = checksum(&words[..WORDS - 1]);
}

fn check_record(words: &[u64; WORDS], seq: u64) -> Result<(), Why> {
    if words[0] != RECORD_MAGIC {
        return Err("magic");
    }
    // One pass for the checksum and the payload (every instruction is
    // emulated).
    let mut payload_ok = true;
    let mut h = checksum(&words[..3]);
    for (w, &word) in words.iter().enumerate().take(WORDS - 1).skip(3) {
        payload_ok &= word == payload(seq, w);
        h = (h ^ word).wrapping_mul(0x0000_0100_0000_01b3);
        h ^= h >> 32;
    }
    if words[WORDS - 1] != h {
        return Err("checksum");
    }
    if words[1] != seq {
        return Err("seq");
    }
    if words[2] != seq {
        return Err("sector");
    }
    if !payload_ok {
        return Err("payload");
    }
    Ok(())
}

fn fill_super(words: &mut [u64; WORDS], last_seq: u64) {
    words.fill(0);
    words[0] = SUPER_MAGIC;
    words[1] = last_seq;
    words[2] = checksum(&words[..2]);
}

/// Request header (virtio 1.x, 5.2.6).
#[repr(C)]
struct Header {
    kind: u32,
    reserved: u32,
    sector: u64,
}

/// Everything the device reads or writes.
#[repr(C, align(64))]
struct Mem {
    ring: Ring,
    header: Header,
    data: [u64; WORDS],
    status: u8,
}

#[link_section = ".dma"]
static MEM: Dma<Mem> = Dma::uninit();
static TAKEN: AtomicBool = AtomicBool::new(false);

/// A request of the driver's cycle.
#[derive(Clone, Copy)]
enum Req {
    ReadSuper,
    /// Boot check of record n.
    Verify(u64),
    Write(u64),
    ReadBack(u64),
    /// Before the superblock is updated to n.
    Flush(u64),
    WriteSuper(u64),
    /// Boot check of ring slot i.
    RingScan(u64),
    /// Reads the slot ring seq n goes to, before writing it.
    RingRead(u64),
    RingWrite(u64),
}

pub struct Blk {
    mmio: Mmio,
    queue: Queue,
    mem: *mut Mem,
    capacity: u64,
    read_only: bool,
    flush: bool,
    /// The request to submit next; `None` when the driver is done.
    next: Option<Req>,
    /// The request in flight and its submission time (TSC).
    in_flight: Option<(Req, u64)>,
    timeout_reported: bool,
    timeout_cycles: u64,
    /// The device's interrupt line is routed (`molt.idle=halt`).
    interrupt_driven: bool,
    /// The CPU slept while the request in flight was pending: its completion is taken only
    /// after the device's interrupt.
    asleep: bool,
    /// The device's InterruptStatus said it used buffers, since the last completion taken.
    used_signalled: bool,
    /// Boot check: last_seq of the superblock, records verified, first bad.
    found: u64,
    verified: u64,
    first_bad: Option<(u64, Why)>,
    /// Records go to sectors below this; the ring fills the rest.
    record_limit: u64,
    /// Boot check of the ring: what each slot holds.
    ring_slots: [Option<u64>; RING as usize],
    /// The ring seq written next, and the record it follows.
    ring_next: u64,
    after: u64,
    /// Where the records continue once the ring is checked.
    resume_at: u64,
}

impl Blk {
    /// Initialises the device and its queue (the `virtio … ok` part).
    pub fn init(mmio: Mmio, tsc_khz: u64) -> Result<Blk, Why> {
        let mem = MEM.take(&TAKEN).ok_or("second blk driver")?;
        let features = mmio.negotiate(F_RO | F_FLUSH)?;
        // SAFETY: `mem` points to MEM, owned by this driver (Dma::take).
        let ring = unsafe { addr_of_mut!((*mem).ring) };
        let queue = mmio.setup_queue(0, ring)?;
        mmio.driver_ok()?;
        let capacity = u64::from(mmio.config(0)) | u64::from(mmio.config(4)) << 32;
        Ok(Blk {
            mmio,
            queue,
            mem,
            capacity,
            read_only: features & F_RO != 0,
            flush: features & F_FLUSH != 0,
            next: None,
            in_flight: None,
            timeout_reported: false,
            timeout_cycles: TIMEOUT_MS * tsc_khz,
            interrupt_driven: false,
            asleep: false,
            used_signalled: false,
            found: 0,
            verified: 0,
            first_bad: None,
            record_limit: capacity.saturating_sub(RING),
            ring_slots: [None; RING as usize],
            ring_next: 1,
            after: 0,
            resume_at: 1,
        })
    }

    /// Prints the capacity line and starts with the superblock.
    pub fn start(&mut self) {
        Line::new()
            .s(b"blk capacity=")
            .dec(self.capacity)
            .s(b" ro=")
            .dec(self.read_only.into())
            .print();
        self.next = Some(Req::ReadSuper);
    }

    /// Lets the driver sleep through a request (see [`Blk::sleep`]): its device's interrupt
    /// line is routed.
    pub fn wait_for_interrupts(&mut self) {
        self.interrupt_driven = true;
    }

    /// A device interrupt came: reads and acknowledges the device's InterruptStatus.
    pub fn interrupt(&mut self) {
        if self.mmio.take_interrupt() & INT_USED != 0 {
            self.used_signalled = true;
        }
    }

    /// Since when (TSC) the driver has only waited for its device: the request in flight's
    /// submission, or 0 with nothing to do at all; `None` when it has work.
    pub fn waiting_since(&self) -> Option<u64> {
        match self.in_flight {
            Some(_) if self.asleep && self.used_signalled => None,
            Some((_, since)) => Some(since),
            None => self.next.is_none().then_some(0),
        }
    }

    /// The CPU is going to sleep until an interrupt: from now on the request in flight is
    /// taken only once the device's interrupt and its InterruptStatus said it used buffers,
    /// as Linux's virtio-mmio driver does, so a device that completes without a word is seen
    /// (as a timeout). Before, the driver polls its used ring (interrupts are not delivered
    /// to native code on PVM hosts, see irq.rs).
    pub fn sleep(&mut self) {
        if self.interrupt_driven && self.in_flight.is_some() {
            self.asleep = true;
        }
    }

    /// Takes the completion of the request in flight, if any, and submits
    /// the next request. Checking a record and filling the next one cost a
    /// few hundred instructions each: a write waits for the next call when
    /// this one completed a request, so the main loop keeps its cadence.
    pub fn poll(&mut self, now: u64) {
        if let Some((req, since)) = self.in_flight {
            if self.asleep && !self.used_signalled {
                self.check_timeout(req, now.saturating_sub(since));
                return;
            }
            if self.queue.pop_used().is_none() {
                // An interrupt with nothing used (the previous request's, or one raised again
                // after a live update) is spurious: the next one counts.
                self.used_signalled = false;
                self.check_timeout(req, now.saturating_sub(since));
                return;
            }
            self.asleep = false;
            self.used_signalled = false;
            self.in_flight = None;
            self.timeout_reported = false;
            // SAFETY: the request completed, so the device no longer writes
            // the status byte; MEM is owned by this driver.
            let status = unsafe { addr_of!((*self.mem).status).read_volatile() };
            self.complete(req, status);
            if matches!(
                self.next,
                Some(Req::Write(_) | Req::WriteSuper(_) | Req::RingWrite(_))
            ) {
                return;
            }
        }
        if let Some(req) = self.next.take() {
            self.submit(req, now);
        }
    }

    fn check_timeout(&mut self, req: Req, waited: u64) {
        if self.timeout_reported || waited < self.timeout_cycles {
            return;
        }
        self.timeout_reported = true;
        let mut line = Line::new();
        match req {
            Req::Write(n) | Req::ReadBack(n) => line.s(b"blk n=").dec(n).s(b" FAIL timeout"),
            _ => line.s(b"blk FAIL timeout"),
        };
        if self.mmio.needs_reset() {
            line.s(b" device needs reset");
        }
        line.print();
    }

    /// The data buffer, when no request is in flight.
    fn data(&mut self) -> &mut [u64; WORDS] {
        // SAFETY: MEM is owned by this driver, and with no request in
        // flight the device does not access it; the borrow of self keeps
        // this the only reference.
        unsafe { &mut *addr_of_mut!((*self.mem).data) }
    }

    fn submit(&mut self, req: Req, now: u64) {
        let (kind, sector) = match req {
            Req::ReadSuper => (T_IN, 0),
            Req::Verify(n) | Req::ReadBack(n) => (T_IN, n),
            Req::Write(n) => {
                fill_record(self.data(), n);
                (T_OUT, n)
            }
            Req::Flush(_) => (T_FLUSH, 0),
            Req::WriteSuper(n) => {
                fill_super(self.data(), n);
                (T_OUT, 0)
            }
            Req::RingScan(i) => (T_IN, self.record_limit + i),
            Req::RingRead(n) => (T_IN, self.ring_sector(n)),
            Req::RingWrite(n) => {
                let sector = self.ring_sector(n);
                blk_ring::fill(self.data(), n, sector);
                (T_OUT, sector)
            }
        };
        if kind == T_IN {
            // Nothing stale can pass for what the device reads.
            self.data().fill(0);
        }
        let mem = self.mem;
        // SAFETY: MEM is owned by this driver and no request is in flight.
        unsafe {
            addr_of_mut!((*mem).header).write_volatile(Header {
                kind,
                reserved: 0,
                sector,
            });
            addr_of_mut!((*mem).status).write_volatile(S_NONE);
        }
        // SAFETY: only computes addresses inside MEM.
        let (header, data, status) = unsafe {
            (
                addr_of!((*mem).header) as u64,
                addr_of!((*mem).data) as u64,
                addr_of!((*mem).status) as u64,
            )
        };
        if kind == T_FLUSH {
            self.queue.set_desc(0, header, 16, DESC_NEXT, 2);
        } else {
            let write = if kind == T_IN { DESC_WRITE } else { 0 };
            self.queue.set_desc(0, header, 16, DESC_NEXT, 1);
            self.queue
                .set_desc(1, data, (WORDS * 8) as u32, DESC_NEXT | write, 2);
        }
        self.queue.set_desc(2, status, 1, DESC_WRITE, 0);
        self.queue.push(0);
        self.queue.notify();
        self.in_flight = Some((req, now));
    }

    fn complete(&mut self, req: Req, status: u8) {
        match req {
            Req::ReadSuper => self.superblock_read(status),
            Req::Verify(n) => {
                let result = self.read_result(status, n);
                match result {
                    Ok(()) => self.verified += 1,
                    Err(why) => {
                        if self.first_bad.is_none() {
                            self.first_bad = Some((n, why));
                        }
                    }
                }
                if n < self.found {
                    self.next = Some(Req::Verify(n + 1));
                } else {
                    self.boot_report();
                    self.check_ring(self.found + 1);
                }
            }
            Req::Write(n) => {
                if status == S_OK {
                    self.next = Some(Req::ReadBack(n));
                } else {
                    fail_status(n, b" FAIL write status=", status);
                    self.after_record(n);
                }
            }
            Req::ReadBack(n) => {
                let mut line = Line::new();
                line.s(b"blk n=").dec(n);
                match self.read_result(status, n) {
                    Ok(()) => line.s(b" ok"),
                    Err(why) => line.s(b" FAIL read ").s(why.as_bytes()),
                };
                line.print();
                self.after_record(n);
            }
            Req::Flush(n) => {
                if status != S_OK {
                    fail_status(n, b" FAIL flush status=", status);
                }
                self.next = Some(Req::WriteSuper(n));
            }
            Req::WriteSuper(n) => {
                if status != S_OK {
                    fail_status(n, b" FAIL superblock status=", status);
                }
                self.continue_at(n + 1);
            }
            Req::RingScan(i) => self.ring_scanned(i, status),
            Req::RingRead(n) => {
                self.ring_read(n, status);
                self.next = Some(Req::RingWrite(n));
            }
            Req::RingWrite(n) => {
                if status == S_OK {
                    self.ring_next = n + 1;
                } else {
                    ring_fail(n, b"write status", Some(status.into()));
                }
                self.finish_record(self.after);
            }
        }
    }

    fn ring_sector(&self, seq: u64) -> u64 {
        self.record_limit + seq % RING
    }

    /// At boot, after the records: reads every ring slot, then goes on with record `n`.
    fn check_ring(&mut self, n: u64) {
        self.resume_at = n;
        self.next = Some(Req::RingScan(0));
    }

    fn ring_scanned(&mut self, i: u64, status: u8) {
        let sector = self.record_limit + i;
        let slot = if status == S_OK {
            blk_ring::read(self.data(), sector)
        } else {
            Err("ioerr")
        };
        let mut line = Line::new();
        match slot {
            Ok(seq) => self.ring_slots[i as usize] = seq,
            Err(why) => {
                line.s(b"blk ring FAIL slot=").dec(i).s(b" ").s(why.as_bytes());
                line.print();
                self.continue_at(self.resume_at);
                return;
            }
        }
        if i + 1 < RING {
            self.next = Some(Req::RingScan(i + 1));
            return;
        }
        line.s(b"blk ring found=");
        match blk_ring::check_all(&self.ring_slots) {
            Ok(m) => {
                self.ring_next = m + 1;
                line.dec(m).s(b" ok");
            }
            Err((slot, why)) => {
                line.s(b"? FAIL slot=").dec(slot).s(b" ").s(why.as_bytes());
            }
        }
        line.print();
        self.continue_at(self.resume_at);
    }

    /// Checks what the slot ring seq `n` goes to holds: exactly the seq written there `RING`
    /// writes ago.
    fn ring_read(&mut self, n: u64, status: u8) {
        if status != S_OK {
            ring_fail(n, b"read status", Some(status.into()));
            return;
        }
        let sector = self.ring_sector(n);
        match blk_ring::read(self.data(), sector) {
            Ok(seq) if seq == blk_ring::expected_before(n) => {}
            Ok(Some(seq)) => ring_fail(n, b"replay seq", Some(seq)),
            Ok(None) => ring_fail(n, b"lost", None),
            Err(why) => ring_fail(n, why.as_bytes(), None),
        }
    }

    /// Checks a completed read of record `n`.
    fn read_result(&mut self, status: u8, n: u64) -> Result<(), Why> {
        match status {
            S_OK => check_record(self.data(), n),
            S_NONE => Err("status"),
            _ => Err("ioerr"),
        }
    }

    fn superblock_read(&mut self, status: u8) {
        let mut line = Line::new();
        line.s(b"blk boot found=");
        let words = self.data();
        let (magic, last_seq, sum) = (words[0], words[1], words[2]);
        let why = if status != S_OK {
            Some("superblock unreadable")
        } else if magic != SUPER_MAGIC {
            None
        } else if sum != checksum(&[magic, last_seq]) {
            Some("superblock checksum")
        } else if last_seq >= self.record_limit {
            Some("superblock beyond capacity")
        } else {
            self.found = last_seq;
            None
        };
        if self.found > 0 {
            // The summary line comes after the check.
            self.next = Some(Req::Verify(1));
            return;
        }
        line.dec(0);
        if let Some(why) = why {
            line.s(b" FAIL ").s(why.as_bytes());
        }
        line.print();
        self.check_ring(1);
    }

    fn boot_report(&self) {
        let mut line = Line::new();
        line.s(b"blk boot found=")
            .dec(self.found)
            .s(b" verified=")
            .dec(self.verified);
        match self.first_bad {
            None => line.s(b" ok"),
            Some((n, why)) => line.s(b" FAIL seq=").dec(n).s(b" ").s(why.as_bytes()),
        };
        line.print();
    }

    /// After record n: the ring step, then [`Self::finish_record`].
    fn after_record(&mut self, n: u64) {
        self.after = n;
        self.next = Some(Req::RingRead(self.ring_next));
    }

    /// Updates the superblock every SUPER_EVERY records and before the disk is full; else
    /// goes on with n + 1.
    fn finish_record(&mut self, n: u64) {
        if n.is_multiple_of(SUPER_EVERY) || n + 1 >= self.record_limit {
            self.next = Some(if self.flush {
                Req::Flush(n)
            } else {
                Req::WriteSuper(n)
            });
        } else {
            self.continue_at(n + 1);
        }
    }

    /// Writes record n next, unless the disk is read-only or full.
    fn continue_at(&mut self, n: u64) {
        if self.read_only {
            Line::new().s(b"blk writes skipped ro=1").print();
        } else if n >= self.record_limit {
            Line::new().s(b"blk full").print();
        } else {
            self.next = Some(Req::Write(n));
        }
    }
}

fn ring_fail(n: u64, what: &[u8], value: Option<u64>) {
    let mut line = Line::new();
    line.s(b"blk ring r=").dec(n).s(b" FAIL ").s(what);
    if let Some(v) = value {
        line.s(b"=").dec(v);
    }
    line.print();
}

fn fail_status(n: u64, what: &[u8], status: u8) {
    Line::new()
        .s(b"blk n=")
        .dec(n)
        .s(what)
        .dec(status.into())
        .print();
}
