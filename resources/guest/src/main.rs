//! molt-guest: the test guest kernel of the molt VMM.
//!
//! A freestanding x86-64 ELF booted with Linux's 64-bit boot protocol. It
//! reports on the serial port, one machine-parseable line per event:
//!
//! ```text
//! molt-guest: boot cpus=<n> mem_mib=<n> tsc_khz=<n> memtest_mib=<n> memtest_share=<%>
//!             mode=native|emulated [native=unavailable|refused] loops_per_s=<n>
//! molt-guest: tick n=<n> gap_max_us=<us> loops_per_s=<n>
//! molt-guest: memtest pass=<n> ok mib_s=<n> | memtest pass=<n> FAIL addr=<hex> …
//! molt-guest: cpu id=<i> up mode=… | cpu id=<i> n=<n> loops_per_s=<n>
//! molt-guest: dirty mib_s=<n> target=<n> mib=<n>      (see dirty.rs)
//! molt-guest: exit code=<c> | reset
//! molt-guest: cpu id=<i> timeout                      (an AP did not start)
//! molt-guest: exception vector=<v> error=<hex> rip=<hex> | panic at <file>:<line>
//! molt-guest: virtio devices=<n>
//! molt-guest: virtio id=<device id> base=<hex> ok | … FAIL <why>
//! molt-guest: blk … | net … | rng …                 (see blk.rs, net.rs, rng.rs)
//! ```
//!
//! `loops_per_s` is the rate of a two-instruction loop, measured at boot and at
//! every tick: ~1e9 when the CPU runs natively, ~1e6 in KVM's emulator.
//!
//! Command line words (others are ignored): `molt.memtest=<MiB>` (0 = off),
//! `molt.memtest_share=<1..100>` (percent of every page tested; default one
//! word), `molt.native=on` (run natively on a PVM host, see native.rs; the
//! VMM adds it where the host can; the test hook `molt.native=test-unavailable`
//! exercises the fallback), `molt.dirty=<MiB/s>` (a memory load, see
//! dirty.rs), `molt.tick_ms=<ms>` (default 100), `molt.ticks=<n>` (end the VM after tick
//! n), `molt.exit=<0..255>|reset` (how to end it), `molt.tsc_khz=<kHz>` (used
//! when the hypervisor does not report the TSC frequency), the test hook
//! `molt.crash=ud|pf|panic` (fail right after boot), the virtio drivers
//! `molt.blk=on`, `molt.net=<ip>/<prefix>` and `molt.rng=on` (polled, see
//! devices.rs), and `virtio_mmio.device=<size>@<base>:<irq>`, which the VMM
//! adds for each virtio-mmio device as it does for Linux.
//!
//! KVM on the development hosts (PVM) runs this code in its instruction
//! emulator (all of it without `molt.native=on`, the first steps of every CPU
//! with it), which cannot execute SSE/AVX/x87: the build disables them and
//! `vmm/tests/guest_image.rs` checks the image. For the same reason nothing
//! here uses `core::fmt` or floating point, and every main-loop iteration does
//! only a little work. The guest polls; only with `molt.idle=halt` does the
//! boot CPU enable interrupts, between `sti` and `hlt` (irq.rs).

#![no_std]
#![no_main]

mod blk;
mod blk_ring;
mod boot;
mod bootparams;
mod devices;
mod dirty;
mod idle;
mod irq;
mod mem;
mod memtest;
mod native;
mod net;
mod rng;
mod serial;
mod smp;
mod virtio;

use bootparams::{Config, Crash, ExitAction, ZeroPage};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use serial::Line;

/// TSC frequency in kHz, set once by the BSP before APs start.
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
/// The tick counter, kept in guest RAM so it survives a live update.
static TICKS: AtomicU64 = AtomicU64::new(0);
/// Number of CPUs (the per-CPU lines are printed only if > 1).
static CPU_COUNT: AtomicU64 = AtomicU64::new(1);
/// Whether the BSP runs natively (the APs follow it).
static NATIVE: AtomicBool = AtomicBool::new(false);

/// The BSP's execution mode, for the APs.
pub fn bsp_mode() -> native::Mode {
    if NATIVE.load(Ordering::Acquire) {
        native::Mode::Native
    } else {
        native::Mode::Off
    }
}

const DEFAULT_TSC_KHZ: u64 = 2_000_000;
const CPU_LINE_MS: u64 = 500;

/// Where the TSC frequency came from.
#[derive(PartialEq, Eq)]
enum TscSource {
    Reported,
    Assumed,
}

/// TSC frequency: the hypervisor's timing leaf 0x40000010, then
/// `molt.tsc_khz=`, then CPUID 0x15, else an assumed 2 GHz.
fn tsc_khz(config: &Config) -> (u64, TscSource) {
    if boot::cpuid(0x4000_0000).0 >= 0x4000_0010 {
        let khz = u64::from(boot::cpuid(0x4000_0010).0);
        if khz != 0 {
            return (khz, TscSource::Reported);
        }
    }
    if config.tsc_khz != 0 {
        return (config.tsc_khz, TscSource::Reported);
    }
    if boot::cpuid(0).0 >= 0x15 {
        let (denominator, numerator, crystal_hz, _) = boot::cpuid(0x15);
        if denominator != 0 && numerator != 0 && crystal_hz != 0 {
            let khz = u64::from(crystal_hz) * u64::from(numerator) / u64::from(denominator) / 1000;
            if khz != 0 {
                return (khz, TscSource::Reported);
            }
        }
    }
    (DEFAULT_TSC_KHZ, TscSource::Assumed)
}

/// TSC cycles to microseconds, without overflow for any realistic value.
fn cycles_to_us(cycles: u64, khz: u64) -> u64 {
    cycles / khz * 1000 + cycles % khz * 1000 / khz
}

/// A periodic deadline on the TSC. Falls back to "now + period" instead of
/// catching up after a long stall (or a TSC that went backwards), so a pause
/// of the VM never causes a burst of lines.
struct Deadline {
    next: u64,
    period: u64,
}

impl Deadline {
    fn new(now: u64, period: u64) -> Deadline {
        Deadline {
            next: now + period,
            period,
        }
    }

    /// True (and re-armed) when the deadline has passed.
    fn expired(&mut self, now: u64) -> bool {
        if now < self.next {
            if self.next - now > self.period {
                self.next = now + self.period;
            }
            return false;
        }
        self.next += self.period;
        if self.next <= now {
            self.next = now + self.period;
        }
        true
    }
}

/// The `cpu id=<i> n=<n>` lines every CPU prints when there are several.
pub struct CpuTicker {
    index: u32,
    n: u64,
    deadline: Deadline,
}

impl CpuTicker {
    pub fn new(index: u32) -> CpuTicker {
        let period = TSC_KHZ.load(Ordering::Relaxed) * CPU_LINE_MS;
        CpuTicker {
            index,
            n: 0,
            deadline: Deadline::new(boot::rdtsc(), period),
        }
    }

    pub fn poll(&mut self, now: u64) {
        if self.deadline.expired(now) {
            self.n += 1;
            let loops_per_s = native::loop_rate(TSC_KHZ.load(Ordering::Relaxed));
            Line::new()
                .s(b"cpu id=")
                .dec(self.index.into())
                .s(b" n=")
                .dec(self.n)
                .s(b" loops_per_s=")
                .dec(loops_per_s)
                .print();
        }
    }
}

/// Rust entry of the BSP, called by `_start` on CPU 0's stack.
pub extern "C" fn bsp_main(zero_page: u64) -> ! {
    boot::init_idt();
    boot::load_idt(false);
    // The 8259 PICs come out of reset unmasked with vector base 0; devices' interrupts
    // (polled here) must not reach a CPU through them as "exceptions" (running natively,
    // `cli` does not keep them out). Every OS masks or reprograms them first.
    boot::outb(0x21, 0xff);
    boot::outb(0xa1, 0xff);

    let zero_page = ZeroPage::new(zero_page);
    let config = Config::parse(zero_page.cmdline());
    // CPUID first: natively it is not intercepted and shows the host's.
    let (khz, tsc_source) = tsc_khz(&config);
    TSC_KHZ.store(khz, Ordering::Relaxed);
    let apic_id = (boot::cpuid(1).1 >> 24) as u8;
    let mode = native::switch_bsp(config.native);
    NATIVE.store(mode.is_native(), Ordering::Release);
    let cpus = smp::Cpus::discover(apic_id);
    CPU_COUNT.store(cpus.count as u64, Ordering::Relaxed);
    let mut memtest = memtest::Memtest::new(
        zero_page,
        boot::image_end(),
        config.memtest_mib,
        config.memtest_share,
        mode.is_native(),
        khz,
    );
    let mut dirty = dirty::Dirty::new(
        zero_page,
        memtest.end(boot::image_end()),
        config.dirty_mib_s,
        khz,
        boot::rdtsc(),
    );

    boot::marker(2);
    let mut line = Line::new();
    line.s(b"boot cpus=")
        .dec(cpus.count as u64)
        .s(b" mem_mib=")
        .dec(zero_page.usable_mib())
        .s(b" tsc_khz=")
        .dec(khz)
        .s(b" memtest_mib=")
        .dec(memtest.bytes >> 20)
        .s(b" memtest_share=")
        .dec(memtest.share())
        .s(b" ")
        .s(mode.describe())
        .s(b" loops_per_s=")
        .dec(native::loop_rate(khz));
    if tsc_source == TscSource::Assumed {
        line.s(b" tsc=assumed");
    }
    line.print();

    if cpus.count > 1 {
        smp::start_aps(&cpus, khz);
    }
    crash(config.crash);
    // Sleeping when idle leaves the CPU to others (a vhost-user backend, say), but a memory
    // test or load has always something to do.
    let halt = config.idle_halt && memtest.bytes == 0 && config.dirty_mib_s == 0;
    let mut idle = idle::Idle::new(halt, mode.is_native(), khz, config.halt_poll_us);
    let mut devices = devices::Devices::start(&config, boot::rdtsc(), khz, halt.then_some(apic_id));

    let mut tick = Deadline::new(boot::rdtsc(), khz * config.tick_ms);
    let mut cpu_ticker = CpuTicker::new(0);
    let mut prev = boot::rdtsc();
    let mut gap_max = 0;
    loop {
        let now = boot::rdtsc();
        gap_max = gap_max.max(now.saturating_sub(prev));
        prev = now;

        idle.take_interrupt(&mut devices);
        memtest.step(now);
        dirty.step(now);
        devices.poll(now);

        if tick.expired(now) {
            let n = TICKS.fetch_add(1, Ordering::Relaxed) + 1;
            // The measurement is not a gap of the loop (the line, as before,
            // counts in the next tick's gap).
            let before = boot::rdtsc();
            let loops_per_s = native::loop_rate(khz);
            prev += boot::rdtsc() - before;
            let mut line = Line::new();
            line.s(b"tick n=")
                .dec(n)
                .s(b" gap_max_us=")
                .dec(cycles_to_us(gap_max, khz))
                .s(b" loops_per_s=")
                .dec(loops_per_s);
            idle.report(&mut line);
            line.print();
            gap_max = 0;
            if config.ticks != 0 && n >= config.ticks {
                finish(config.exit);
            }
        }
        let smp = CPU_COUNT.load(Ordering::Relaxed) > 1;
        if smp {
            cpu_ticker.poll(now);
        }
        let deadline = if smp {
            tick.next.min(cpu_ticker.deadline.next)
        } else {
            tick.next
        };
        if idle.sleep(&mut devices, now, deadline) {
            // Time asleep is not a gap of the loop.
            prev = boot::rdtsc();
        }
    }
}

/// Fails on purpose as `molt.crash=` asked (a test hook).
fn crash(kind: Crash) {
    match kind {
        Crash::None => {}
        // SAFETY: ud2 raises #UD, whose handler ends the VM.
        Crash::InvalidOpcode => unsafe { core::arch::asm!("ud2", options(nomem, nostack)) },
        Crash::PageFault => {
            // SAFETY: nothing is mapped at 1 TiB, so the read raises #PF,
            // whose handler ends the VM; the value is never used.
            unsafe { core::ptr::read_volatile((1u64 << 40) as *const u64) };
        }
        Crash::Panic => panic!("molt.crash=panic"),
    }
}

/// Ends the VM as `molt.exit=` asked.
fn finish(action: ExitAction) -> ! {
    match action {
        ExitAction::Code(code) => {
            Line::new().s(b"exit code=").dec(code.into()).print_last();
            boot::exit(code)
        }
        ExitAction::Reset => {
            Line::new().s(b"reset").print_last();
            boot::reset()
        }
    }
}

/// Common handler of CPU exceptions 0..31 (called from the stubs in boot.rs).
pub extern "C" fn exception(vector: u64, error: u64, rip: u64) -> ! {
    Line::new()
        .s(b"exception vector=")
        .dec(vector)
        .s(b" error=")
        .hex(error)
        .s(b" rip=")
        .hex(rip)
        .print_forced();
    boot::exit(0xfe)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut line = Line::new();
    line.s(b"panic at ");
    match info.location() {
        Some(loc) => line.s(loc.file().as_bytes()).s(b":").dec(loc.line().into()),
        None => line.s(b"unknown"),
    };
    line.print_forced();
    boot::exit(0xfd)
}
