//! A memory load for the VMM's live-snapshot and transfer benchmarks:
//! `molt.dirty=<MiB/s>` writes whole 4 KiB pages of the usable RAM above the
//! memtest's (cycling through it) at that rate, and reports every second the
//! rate it achieved (lower than asked when the CPU cannot keep up, e.g.
//! emulated):
//!
//! ```text
//! molt-guest: dirty mib_s=<achieved> target=<asked> mib=<size of the area>
//! ```
//!
//! The rate is paced on the TSC with a credit of at most `MAX_CREDIT_MS` of
//! pages, so a pause of the VM does not cause a burst afterwards.

use crate::bootparams::ZeroPage;
use crate::serial::Line;

const PAGE: u64 = 4096;
const PAGES_PER_MIB: u64 = 256;
/// The identity map covers the first 4 GiB only.
const MAPPED_END: u64 = 4 << 30;
const MAX_RANGES: usize = 8;
/// Most pages one `step` writes (1 MiB).
const STEP_PAGES: u64 = 256;
const MAX_CREDIT_MS: u64 = 50;
const REPORT_MS: u64 = 1000;

pub struct Dirty {
    ranges: [(u64, u64); MAX_RANGES],
    nranges: usize,
    bytes: u64,
    mib_s: u64,
    /// Next page to write: range index and address in it.
    range: usize,
    addr: u64,
    /// Pages owed, in units of 1/(TSC cycles per second) pages.
    credit: u64,
    last: u64,
    /// Pages written since the last report, and when that was.
    written: u64,
    report_start: u64,
    cycles_per_s: u64,
    /// The value written into the pages (changes every pass).
    fill: u64,
}

impl Dirty {
    /// Takes the usable RAM from `floor` (above the image and the memtest)
    /// to 4 GiB; `mib_s` 0 turns the load off.
    pub fn new(zero_page: ZeroPage, floor: u64, mib_s: u64, tsc_khz: u64, now: u64) -> Dirty {
        let mut d = Dirty {
            ranges: [(0, 0); MAX_RANGES],
            nranges: 0,
            bytes: 0,
            mib_s,
            range: 0,
            addr: 0,
            credit: 0,
            last: now,
            written: 0,
            report_start: now,
            cycles_per_s: tsc_khz * 1000,
            fill: 1,
        };
        if mib_s == 0 {
            return d;
        }
        for (start, end) in zero_page.usable_ram() {
            if d.nranges == MAX_RANGES {
                break;
            }
            let start = start.max(floor).next_multiple_of(PAGE);
            let end = end.min(MAPPED_END) / PAGE * PAGE;
            if start < end {
                d.ranges[d.nranges] = (start, end);
                d.nranges += 1;
                d.bytes += end - start;
            }
        }
        d.addr = d.ranges[0].0;
        d
    }

    /// Writes the pages due by `now`; prints the achieved rate every second.
    pub fn step(&mut self, now: u64) {
        if self.mib_s == 0 {
            return;
        }
        if self.nranges == 0 {
            self.mib_s = 0;
            Line::new().s(b"dirty FAIL no free RAM").print();
            return;
        }
        let delta = now.saturating_sub(self.last).min(self.cycles_per_s);
        self.last = now;
        let max_credit = self.mib_s * PAGES_PER_MIB * self.cycles_per_s / 1000 * MAX_CREDIT_MS;
        self.credit = (self.credit + delta * self.mib_s * PAGES_PER_MIB).min(max_credit);
        let due = (self.credit / self.cycles_per_s).min(STEP_PAGES);
        self.credit -= due * self.cycles_per_s;
        for _ in 0..due {
            // `addr` is a page of usable RAM above the guest image and the
            // memtest's ranges, below 4 GiB (identity-mapped), only ours.
            fill_page(self.addr, self.fill);
            self.addr += PAGE;
            if self.addr >= self.ranges[self.range].1 {
                self.range = (self.range + 1) % self.nranges;
                self.addr = self.ranges[self.range].0;
                if self.range == 0 {
                    self.fill = self.fill.wrapping_add(1);
                }
            }
        }
        self.written += due;
        let elapsed = now.saturating_sub(self.report_start);
        if elapsed >= self.cycles_per_s / 1000 * REPORT_MS {
            let achieved = self.written * self.cycles_per_s / PAGES_PER_MIB / elapsed.max(1);
            Line::new()
                .s(b"dirty mib_s=")
                .dec(achieved)
                .s(b" target=")
                .dec(self.mib_s)
                .s(b" mib=")
                .dec(self.bytes >> 20)
                .print();
            self.written = 0;
            self.report_start = now;
        }
    }
}

/// Writes `value` into every word of the page at `addr`.
fn fill_page(addr: u64, value: u64) {
    // SAFETY: the caller passes a whole page of RAM only the load uses;
    // `rep stosq` writes exactly 512 words there and uses no vector registers.
    unsafe {
        core::arch::asm!(
            "rep stosq",
            inout("rdi") addr => _,
            inout("rcx") PAGE / 8 => _,
            in("rax") value,
            options(nostack, preserves_flags)
        )
    };
}
