//! Incremental memory test: one u64 per 4 KiB page over the usable RAM above
//! the guest image. Pass n verifies that every page still holds
//! pattern(addr, n - 1) (except pass 1) and writes pattern(addr, n). A call to
//! `step` handles at most `PAGES_PER_STEP` pages, so no main-loop iteration
//! stalls for long.

use crate::bootparams::ZeroPage;
use crate::serial::Line;

const PAGE: u64 = 4096;
const ALIGN: u64 = 2 << 20;
/// The identity map set up by the VMM covers the first 4 GiB only.
const MAPPED_END: u64 = 4 << 30;
const MAX_RANGES: usize = 8;
const PAGES_PER_STEP: u32 = 32;

fn pattern(addr: u64, pass: u64) -> u64 {
    (addr ^ pass.wrapping_mul(0x9e37_79b9_7f4a_7c15)).rotate_left((pass % 64) as u32)
}

pub struct Memtest {
    /// Tested ranges (start, end), 2 MiB aligned starts.
    ranges: [(u64, u64); MAX_RANGES],
    nranges: usize,
    /// Bytes covered by all ranges.
    pub bytes: u64,
    /// The pass in progress (1-based).
    pass: u64,
    /// Position: range index and next address in it.
    range: usize,
    addr: u64,
    /// First mismatch of this pass.
    fail: Option<u64>,
}

impl Memtest {
    /// Chooses up to `mib` MiB of usable RAM at or above `image_end`.
    pub fn new(zero_page: ZeroPage, image_end: u64, mib: u64) -> Memtest {
        let mut t = Memtest {
            ranges: [(0, 0); MAX_RANGES],
            nranges: 0,
            bytes: 0,
            pass: 1,
            range: 0,
            addr: 0,
            fail: None,
        };
        let mut want = mib << 20;
        let floor = image_end.next_multiple_of(ALIGN);
        for (start, end) in zero_page.usable_ram() {
            if want == 0 || t.nranges == MAX_RANGES {
                break;
            }
            let start = start.max(floor).next_multiple_of(ALIGN);
            let end = (end.min(MAPPED_END) / ALIGN) * ALIGN;
            if start >= end {
                continue;
            }
            let len = (end - start).min(want);
            t.ranges[t.nranges] = (start, start + len);
            t.nranges += 1;
            t.bytes += len;
            want -= len;
        }
        t.addr = t.ranges[0].0;
        t
    }

    /// Runs the test for a bounded number of pages; prints a line when a
    /// pass completes.
    pub fn step(&mut self) {
        if self.nranges == 0 {
            return;
        }
        for _ in 0..PAGES_PER_STEP {
            let p = self.addr as *mut u64;
            if self.pass > 1 {
                // SAFETY: `addr` is a page of usable RAM above the guest
                // image and below 4 GiB (identity-mapped) that only the
                // memtest uses.
                let found = unsafe { core::ptr::read_volatile(p) };
                if found != pattern(self.addr, self.pass - 1) && self.fail.is_none() {
                    self.fail = Some(self.addr);
                }
            }
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile(p, pattern(self.addr, self.pass)) };
            self.addr += PAGE;
            if self.addr >= self.ranges[self.range].1 {
                self.range += 1;
                if self.range == self.nranges {
                    self.finish_pass();
                    return;
                }
                self.addr = self.ranges[self.range].0;
            }
        }
    }

    fn finish_pass(&mut self) {
        let mut line = Line::new();
        line.s(b"memtest pass=").dec(self.pass);
        match self.fail {
            None => line.s(b" ok"),
            Some(addr) => line.s(b" FAIL addr=").hex(addr),
        };
        line.print();
        self.pass += 1;
        self.range = 0;
        self.addr = self.ranges[0].0;
        self.fail = None;
    }
}
