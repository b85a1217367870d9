//! Incremental memory test over the usable RAM above the guest image: the
//! first `words` u64 of every 4 KiB page (one by default, all 512 with
//! `molt.memtest_share=100`). Pass n verifies that every tested word still
//! holds pattern(addr, n - 1) (except pass 1) and writes pattern(addr, n). A
//! call to `step` handles a bounded number of words (more when the CPU runs
//! natively), so no main-loop iteration stalls for long. A pass starts at most
//! every `MIN_PASS_MS` (a pass over a few MiB takes a millisecond natively) and
//! its line reports the throughput of the pass while it ran:
//!
//! ```text
//! molt-guest: memtest pass=<n> ok mib_s=<MiB tested per second>
//! ```

use crate::bootparams::ZeroPage;
use crate::serial::Line;

const PAGE: u64 = 4096;
const ALIGN: u64 = 2 << 20;
/// The identity map set up by the VMM covers the first 4 GiB only.
const MAPPED_END: u64 = 4 << 30;
const MAX_RANGES: usize = 8;
const WORDS_PER_PAGE: u64 = PAGE / 8;
/// Words per `step`: emulated, as many as the one-word-per-page test always
/// did; natively ~10-50 µs of work.
const STEP_WORDS_EMULATED: u64 = 32;
const STEP_WORDS_NATIVE: u64 = 16 * 1024;
const MIN_PASS_MS: u64 = 100;

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
    /// Words tested per page and per step.
    words: u64,
    step_words: u64,
    /// Whether a pass is under way, the TSC at its start, and the earliest
    /// start of the next one.
    running: bool,
    pass_start: u64,
    next_pass: u64,
    tsc_khz: u64,
}

impl Memtest {
    /// Chooses up to `mib` MiB of usable RAM at or above `image_end`;
    /// `share` is the percent of every page to test (0: one word).
    pub fn new(
        zero_page: ZeroPage,
        image_end: u64,
        mib: u64,
        share: u64,
        native: bool,
        tsc_khz: u64,
    ) -> Memtest {
        let mut t = Memtest {
            ranges: [(0, 0); MAX_RANGES],
            nranges: 0,
            bytes: 0,
            pass: 1,
            range: 0,
            addr: 0,
            fail: None,
            words: (share * WORDS_PER_PAGE).div_ceil(100).clamp(1, WORDS_PER_PAGE),
            step_words: if native {
                STEP_WORDS_NATIVE
            } else {
                STEP_WORDS_EMULATED
            },
            running: false,
            pass_start: 0,
            next_pass: 0,
            tsc_khz,
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

    /// Percent of each page tested.
    pub fn share(&self) -> u64 {
        (self.words * 100).div_ceil(WORDS_PER_PAGE)
    }

    /// End of the highest tested range (`floor` when the test is off).
    pub fn end(&self, floor: u64) -> u64 {
        self.ranges[..self.nranges]
            .iter()
            .map(|r| r.1)
            .fold(floor, u64::max)
    }

    /// Runs the test for a bounded number of words; prints a line when a
    /// pass completes.
    pub fn step(&mut self, now: u64) {
        if self.nranges == 0 || now < self.next_pass {
            return;
        }
        if !self.running {
            self.running = true;
            self.pass_start = now;
        }
        let mut budget = self.step_words;
        while budget > 0 {
            let page = self.addr;
            for w in 0..self.words {
                let addr = page + w * 8;
                let p = addr as *mut u64;
                if self.pass > 1 {
                    // SAFETY: `addr` is in a page of usable RAM above the
                    // guest image and below 4 GiB (identity-mapped) that only
                    // the memtest uses.
                    let found = unsafe { core::ptr::read_volatile(p) };
                    if found != pattern(addr, self.pass - 1) && self.fail.is_none() {
                        self.fail = Some(addr);
                    }
                }
                // SAFETY: as above.
                unsafe { core::ptr::write_volatile(p, pattern(addr, self.pass)) };
            }
            budget = budget.saturating_sub(self.words);
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
        let now = crate::boot::rdtsc();
        let cycles = now.saturating_sub(self.pass_start).max(1);
        let tested_kib = (self.bytes >> 10) * self.words / WORDS_PER_PAGE;
        // KiB * cycles per second / cycles, in MiB (no overflow below 4 GiB).
        let mib_s = tested_kib * 1000 * self.tsc_khz / cycles / 1024;
        line.s(b" mib_s=").dec(mib_s);
        line.print();
        self.running = false;
        self.next_pass = self.pass_start + MIN_PASS_MS * self.tsc_khz;
        self.pass += 1;
        self.range = 0;
        self.addr = self.ranges[0].0;
        self.fail = None;
    }
}
