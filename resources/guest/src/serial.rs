//! Output: a polled 16550 at 0x3f8 and a line buffer with integer formatting.
//!
//! No `core::fmt` anywhere (the precompiled `core` uses SSE in it): lines are
//! assembled byte by byte in a `Line` and written under a spinlock, so lines of
//! different CPUs never interleave.

use crate::boot::{inb, outb};
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 0x20;

static LOCK: AtomicBool = AtomicBool::new(false);

fn put_byte(byte: u8) {
    // Bounded, so that a missing UART cannot hang the guest.
    for _ in 0..100_000 {
        if inb(LSR) & LSR_THR_EMPTY != 0 {
            break;
        }
    }
    outb(COM1, byte);
}

/// Writes `bytes` to the UART while holding the serial lock. With `force`, the
/// lock is taken after a bounded wait even if someone else holds it (for the
/// exception and panic paths, which may interrupt a holder on this CPU).
/// With `keep`, the lock stays taken: nothing can follow this line (the VM
/// is about to end, and a CPU's line cut short by the exit would be garbled).
fn write_locked(bytes: &[u8], force: bool, keep: bool) {
    let mut spins: u32 = 0;
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        spins += 1;
        if force && spins > 100_000 {
            break;
        }
    }
    for &b in bytes {
        put_byte(b);
    }
    if !keep {
        LOCK.store(false, Ordering::Release);
    }
}

const LINE_CAP: usize = 160;

/// One output line, always starting with `molt-guest: `.
pub struct Line {
    buf: [u8; LINE_CAP],
    len: usize,
}

impl Line {
    pub fn new() -> Line {
        let mut line = Line {
            buf: [0; LINE_CAP],
            len: 0,
        };
        line.s(b"molt-guest: ");
        line
    }

    /// Appends raw bytes (silently truncated at the capacity, keeping room
    /// for the newline).
    pub fn s(&mut self, bytes: &[u8]) -> &mut Line {
        for &b in bytes {
            if self.len < LINE_CAP - 1 {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        self
    }

    /// Appends `value` in decimal.
    pub fn dec(&mut self, mut value: u64) -> &mut Line {
        let mut digits = [0u8; 20];
        let mut n = 0;
        loop {
            digits[n] = b'0' + (value % 10) as u8;
            n += 1;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        while n > 0 {
            n -= 1;
            self.s(&[digits[n]]);
        }
        self
    }

    /// Appends `value` as `0x` followed by lowercase hex digits.
    pub fn hex(&mut self, value: u64) -> &mut Line {
        self.s(b"0x");
        let mut started = false;
        for shift in (0..16).rev() {
            let nibble = ((value >> (shift * 4)) & 0xf) as u8;
            if nibble != 0 || started || shift == 0 {
                started = true;
                self.s(&[if nibble < 10 {
                    b'0' + nibble
                } else {
                    b'a' + nibble - 10
                }]);
            }
        }
        self
    }

    /// Appends `bytes` as two lowercase hex digits each, `sep` between them
    /// (0: none).
    pub fn hex_bytes(&mut self, bytes: &[u8], sep: u8) -> &mut Line {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for (i, &b) in bytes.iter().enumerate() {
            if i > 0 && sep != 0 {
                self.s(&[sep]);
            }
            self.s(&[DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0xf)]]);
        }
        self
    }

    /// Appends an IPv4 address in dotted decimal.
    pub fn ipv4(&mut self, ip: [u8; 4]) -> &mut Line {
        for (i, &octet) in ip.iter().enumerate() {
            if i > 0 {
                self.s(b".");
            }
            self.dec(octet.into());
        }
        self
    }

    /// Terminates the line and writes it out atomically.
    pub fn print(&mut self) {
        self.buf[self.len] = b'\n';
        write_locked(&self.buf[..self.len + 1], false, false);
    }

    /// Like `print`, for the last line before the VM ends: no other line
    /// follows it.
    pub fn print_last(&mut self) {
        self.buf[self.len] = b'\n';
        write_locked(&self.buf[..self.len + 1], false, true);
    }

    /// Like `print_last`, for the exception and panic paths.
    pub fn print_forced(&mut self) {
        self.buf[self.len] = b'\n';
        write_locked(&self.buf[..self.len + 1], true, true);
    }
}
