//! The Linux zero page (`struct boot_params`) and the kernel command line.

/// Offsets into `struct boot_params` (Linux arch/x86/include/uapi/asm/bootparam.h).
const EXT_CMD_LINE_PTR: u64 = 0x0c8;
const E820_ENTRIES: u64 = 0x1e8;
const CMD_LINE_PTR: u64 = 0x228;
const CMDLINE_SIZE: u64 = 0x238;
const E820_TABLE: u64 = 0x2d0;
const E820_MAX: usize = 128;
const E820_ENTRY_SIZE: u64 = 20;
/// e820 type of usable RAM.
const E820_RAM: u32 = 1;
/// Upper bound on the command line we look at.
const CMDLINE_MAX: usize = 4096;

/// The zero page the VMM passed in RSI.
#[derive(Clone, Copy)]
pub struct ZeroPage(u64);

fn read_u8(addr: u64) -> u8 {
    // SAFETY: `addr` lies in the zero page or the command line the VMM
    // provided, both identity-mapped guest RAM.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

fn read_u32(addr: u64) -> u32 {
    // SAFETY: as in read_u8; the field may be unaligned.
    unsafe { core::ptr::read_unaligned(addr as *const u32) }
}

fn read_u64(addr: u64) -> u64 {
    // SAFETY: as in read_u8; the field may be unaligned.
    unsafe { core::ptr::read_unaligned(addr as *const u64) }
}

impl ZeroPage {
    pub fn new(addr: u64) -> ZeroPage {
        ZeroPage(addr)
    }

    /// The usable-RAM ranges of the e820 map, as (start, end) byte addresses.
    pub fn usable_ram(self) -> impl Iterator<Item = (u64, u64)> {
        let base = self.0;
        let count = (read_u8(base + E820_ENTRIES) as usize).min(E820_MAX);
        (0..count).filter_map(move |i| {
            let entry = base + E820_TABLE + i as u64 * E820_ENTRY_SIZE;
            let (addr, size, kind) = (read_u64(entry), read_u64(entry + 8), read_u32(entry + 16));
            (kind == E820_RAM && size > 0).then(|| (addr, addr.saturating_add(size)))
        })
    }

    /// Total usable RAM in MiB.
    pub fn usable_mib(self) -> u64 {
        self.usable_ram()
            .map(|(start, end)| end - start)
            .sum::<u64>()
            >> 20
    }

    /// The NUL-terminated command line (empty if there is none).
    pub fn cmdline(self) -> &'static [u8] {
        let ptr = u64::from(read_u32(self.0 + CMD_LINE_PTR))
            | u64::from(read_u32(self.0 + EXT_CMD_LINE_PTR)) << 32;
        if ptr == 0 {
            return &[];
        }
        let size = read_u32(self.0 + CMDLINE_SIZE) as usize;
        let max = if size == 0 {
            CMDLINE_MAX
        } else {
            size.min(CMDLINE_MAX)
        };
        let len = (0..max)
            .find(|&i| read_u8(ptr + i as u64) == 0)
            .unwrap_or(max);
        // SAFETY: ptr..ptr+len was just read byte by byte and is guest RAM
        // below the guest image that nothing writes to after boot.
        unsafe { core::slice::from_raw_parts(ptr as *const u8, len) }
    }
}

/// What to do after the last tick.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ExitAction {
    Code(u8),
    Reset,
}

/// A deliberate failure right after the boot line (`molt.crash=`), so the
/// VMM's tests can check how exceptions and panics are reported.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    None,
    /// `ud`: an invalid opcode (vector 6).
    InvalidOpcode,
    /// `pf`: a read above the 4 GiB identity map (vector 14).
    PageFault,
    /// `panic`: a Rust panic.
    Panic,
}

/// `molt.native=on|off`, or the test hook `test-unavailable`: probe an MSR
/// that does not exist instead of PVM's signature (so the #GP recovery and the
/// fallback to emulation run on a host that has the control).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NativeArg {
    Off,
    On,
    TestUnavailable,
}

/// Most `virtio_mmio.device=` entries the guest looks at.
pub const MAX_VIRTIO: usize = 8;

/// `molt.net=<ip>/<prefix>` (the prefix is checked, but the driver only
/// answers; it never routes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NetArg {
    Off,
    On([u8; 4]),
    /// Given, but not an IPv4 address with a prefix length 1..=32.
    Invalid,
}

/// Settings from the command line (`molt.*` and `virtio_mmio.device=`
/// words; everything else ignored).
pub struct Config {
    pub memtest_mib: u64,
    /// `molt.memtest_share=<1..100>`: percent of every page the memtest
    /// covers (default: one word per page).
    pub memtest_share: u64,
    /// `molt.native=`: run natively on a PVM host (see native.rs).
    pub native: NativeArg,
    /// `molt.dirty=<MiB/s>`: dirty RAM at this rate (0 = off).
    pub dirty_mib_s: u64,
    pub tick_ms: u64,
    /// End the VM after this many ticks (0 = never).
    pub ticks: u64,
    pub exit: ExitAction,
    /// `molt.tsc_khz=` (0 = not given).
    pub tsc_khz: u64,
    pub crash: Crash,
    /// `molt.blk=on`: run the block driver on the first virtio-blk device.
    pub blk: bool,
    /// `molt.net=`: run the network driver on the first virtio-net device.
    pub net: NetArg,
    /// `molt.rng=on`: run the entropy driver on the first virtio-rng device.
    pub rng: bool,
    /// `molt.idle=halt`: the BSP sleeps until an interrupt when it has nothing to do,
    /// instead of polling (see irq.rs).
    pub idle_halt: bool,
    /// `molt.halt_poll_us=`: with `molt.idle=halt`, how long a request is polled for before
    /// the CPU sleeps.
    pub halt_poll_us: u64,
    /// `virtio_mmio.device=` windows as (size, base, interrupt line); `None` for an entry
    /// that does not parse.
    pub virtio: [Option<(u64, u64, Option<u32>)>; MAX_VIRTIO],
    pub virtio_count: usize,
}

/// Parses a decimal or `0x` hexadecimal number.
pub fn parse_num(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut value: u64 = 0;
    for &c in digits {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        } as u64;
        if d >= radix {
            return None;
        }
        value = value.checked_mul(radix)?.checked_add(d)?;
    }
    Some(value)
}

/// Parses `a.b.c.d/prefix`.
fn parse_net(s: &[u8]) -> NetArg {
    let mut ip = [0u8; 4];
    let slash = s.iter().position(|&c| c == b'/').unwrap_or(s.len());
    let mut parts = s[..slash].split(|&c| c == b'.');
    for octet in ip.iter_mut() {
        match parts.next().and_then(parse_num) {
            Some(v) if v <= 255 => *octet = v as u8,
            _ => return NetArg::Invalid,
        }
    }
    if parts.next().is_some() {
        return NetArg::Invalid;
    }
    match s.get(slash + 1..).and_then(parse_num) {
        Some(1..=32) => NetArg::On(ip),
        _ => NetArg::Invalid,
    }
}

/// If `word` is `key` followed by a value, returns the value.
fn value_of<'a>(word: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    if word.len() > key.len() && word[..key.len()] == *key {
        Some(&word[key.len()..])
    } else {
        None
    }
}

impl Config {
    pub fn parse(cmdline: &[u8]) -> Config {
        let mut config = Config {
            memtest_mib: 0,
            memtest_share: 0,
            native: NativeArg::Off,
            dirty_mib_s: 0,
            tick_ms: 100,
            ticks: 0,
            exit: ExitAction::Code(0),
            tsc_khz: 0,
            crash: Crash::None,
            blk: false,
            net: NetArg::Off,
            rng: false,
            idle_halt: false,
            halt_poll_us: 200,
            virtio: [None; MAX_VIRTIO],
            virtio_count: 0,
        };
        let words = cmdline
            .split(|&c| c == b' ' || c == b'\t' || c == b'\n')
            .filter(|w| !w.is_empty());
        for word in words {
            if let Some(v) = value_of(word, b"molt.memtest=").and_then(parse_num) {
                config.memtest_mib = v;
            } else if let Some(v) = value_of(word, b"molt.memtest_share=").and_then(parse_num) {
                config.memtest_share = v.min(100);
            } else if let Some(v) = value_of(word, b"molt.native=") {
                config.native = match v {
                    b"on" => NativeArg::On,
                    b"test-unavailable" => NativeArg::TestUnavailable,
                    _ => NativeArg::Off,
                };
            } else if let Some(v) = value_of(word, b"molt.dirty=").and_then(parse_num) {
                config.dirty_mib_s = v;
            } else if let Some(v) = value_of(word, b"molt.tick_ms=").and_then(parse_num) {
                if v > 0 {
                    config.tick_ms = v;
                }
            } else if let Some(v) = value_of(word, b"molt.ticks=").and_then(parse_num) {
                config.ticks = v;
            } else if let Some(v) = value_of(word, b"molt.tsc_khz=").and_then(parse_num) {
                config.tsc_khz = v;
            } else if let Some(v) = value_of(word, b"molt.crash=") {
                config.crash = match v {
                    b"ud" => Crash::InvalidOpcode,
                    b"pf" => Crash::PageFault,
                    b"panic" => Crash::Panic,
                    _ => config.crash,
                };
            } else if let Some(v) = value_of(word, b"molt.blk=") {
                config.blk = v == b"on";
            } else if let Some(v) = value_of(word, b"molt.net=") {
                config.net = parse_net(v);
            } else if let Some(v) = value_of(word, b"molt.rng=") {
                config.rng = v == b"on";
            } else if let Some(v) = value_of(word, b"molt.idle=") {
                config.idle_halt = v == b"halt";
            } else if let Some(v) = value_of(word, b"molt.halt_poll_us=").and_then(parse_num) {
                config.halt_poll_us = v;
            } else if let Some(v) = value_of(word, b"virtio_mmio.device=") {
                if config.virtio_count < MAX_VIRTIO {
                    config.virtio[config.virtio_count] = crate::virtio::parse_device(v);
                    config.virtio_count += 1;
                }
            } else if let Some(v) = value_of(word, b"molt.exit=") {
                if v == b"reset" {
                    config.exit = ExitAction::Reset;
                } else if let Some(code) = parse_num(v).filter(|&c| c <= 255) {
                    config.exit = ExitAction::Code(code as u8);
                }
            }
        }
        config
    }
}
