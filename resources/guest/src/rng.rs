//! virtio-rng test driver (`molt.rng=on`): 16 bytes at boot, then every
//! ~2 s of guest time.
//!
//! ```text
//! molt-guest: rng n=<n> bytes=<32 hex digits> | rng n=<n> FAIL <why>
//! ```
//!
//! n counts from 1; a short answer prints the bytes it has.

use crate::serial::Line;
use crate::virtio::{Dma, Mmio, Queue, Ring, Why, DESC_WRITE};
use crate::Deadline;
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::AtomicBool;

const BYTES: usize = 16;
const PERIOD_MS: u64 = 2000;
const TIMEOUT_MS: u64 = 10_000;

#[repr(C, align(64))]
struct Mem {
    ring: Ring,
    buf: [u8; BYTES],
}

#[link_section = ".dma"]
static MEM: Dma<Mem> = Dma::uninit();
static TAKEN: AtomicBool = AtomicBool::new(false);

pub struct Rng {
    queue: Queue,
    mem: *mut Mem,
    n: u64,
    /// Submission time (TSC) of the request in flight.
    in_flight: Option<u64>,
    timeout_reported: bool,
    timeout_cycles: u64,
    next: Deadline,
}

impl Rng {
    /// Initialises the device and its queue (the `virtio … ok` part).
    pub fn init(mmio: Mmio, now: u64, tsc_khz: u64) -> Result<Rng, Why> {
        let mem = MEM.take(&TAKEN).ok_or("second rng driver")?;
        mmio.negotiate(0)?;
        // SAFETY: `mem` points to MEM, owned by this driver (Dma::take); only
        // addresses are computed.
        let (ring, buf) = unsafe { (addr_of_mut!((*mem).ring), addr_of!((*mem).buf) as u64) };
        let mut queue = mmio.setup_queue(0, ring)?;
        mmio.driver_ok()?;
        queue.set_desc(0, buf, BYTES as u32, DESC_WRITE, 0);
        Ok(Rng {
            queue,
            mem,
            n: 0,
            in_flight: None,
            timeout_reported: false,
            timeout_cycles: TIMEOUT_MS * tsc_khz,
            next: Deadline::new(now, PERIOD_MS * tsc_khz),
        })
    }

    /// Asks for the first bytes.
    pub fn start(&mut self, now: u64) {
        self.submit(now);
    }

    fn submit(&mut self, now: u64) {
        // SAFETY: MEM is owned by this driver and no request is in flight.
        unsafe { addr_of_mut!((*self.mem).buf).write_volatile([0; BYTES]) };
        self.queue.push(0);
        self.queue.notify();
        self.in_flight = Some(now);
    }

    pub fn poll(&mut self, now: u64) {
        let Some(since) = self.in_flight else {
            if self.next.expired(now) {
                self.submit(now);
            }
            return;
        };
        let Some((_, len)) = self.queue.pop_used() else {
            if !self.timeout_reported && now.saturating_sub(since) >= self.timeout_cycles {
                self.timeout_reported = true;
                Line::new()
                    .s(b"rng n=")
                    .dec(self.n + 1)
                    .s(b" FAIL timeout")
                    .print();
            }
            return;
        };
        self.in_flight = None;
        self.timeout_reported = false;
        self.n += 1;
        // SAFETY: the request completed, so the device no longer writes the
        // buffer; MEM is owned by this driver.
        let buf = unsafe { addr_of!((*self.mem).buf).read_volatile() };
        let mut line = Line::new();
        line.s(b"rng n=").dec(self.n);
        if len == 0 {
            line.s(b" FAIL no bytes");
        } else {
            line.s(b" bytes=")
                .hex_bytes(&buf[..(len as usize).min(BYTES)], 0);
        }
        line.print();
    }
}
