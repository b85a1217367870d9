//! `molt.idle=halt`: when the boot CPU sleeps, and what it counts for the tick line (see
//! irq.rs for the sleep itself).

use crate::devices::Devices;
use crate::serial::Line;

/// The longest sleep (the drivers that only poll, rng and net, and the blk driver's
/// timeout get a look at least this often).
const HALT_MAX_MS: u64 = 10;

pub struct Idle {
    on: bool,
    native: bool,
    khz: u64,
    /// Before sleeping, a request is polled for this long (as Linux's guest halt-polling
    /// does): leaving native execution to sleep costs more than most requests take.
    poll_cycles: u64,
    /// Since the last tick line: how often the CPU slept, and device interrupts taken.
    sleeps: u64,
    irqs: u64,
}

impl Idle {
    /// `on` enables the local APIC (before the devices' lines are routed).
    pub fn new(on: bool, native: bool, khz: u64, poll_us: u64) -> Idle {
        if on {
            crate::irq::init();
        }
        Idle {
            on,
            native,
            khz,
            poll_cycles: khz * poll_us / 1000,
            sleeps: 0,
            irqs: 0,
        }
    }

    /// Lets the drivers see a device interrupt that came.
    pub fn take_interrupt(&mut self, devices: &mut Devices) {
        if crate::irq::take_device() {
            self.irqs += 1;
            devices.interrupt();
        }
    }

    /// Sleeps until an interrupt or `deadline` (TSC; at most [`HALT_MAX_MS`] away) if the
    /// drivers only wait for their devices and have for the polling time; returns whether
    /// it slept.
    pub fn sleep(&mut self, devices: &mut Devices, now: u64, deadline: u64) -> bool {
        let waited = devices
            .waiting_since()
            .map(|since| now.saturating_sub(since));
        if !self.on || !waited.is_some_and(|w| w >= self.poll_cycles) {
            return false;
        }
        let until = deadline.min(now + self.khz * HALT_MAX_MS);
        let now = crate::boot::rdtsc();
        if until <= now {
            return false;
        }
        self.sleeps += 1;
        devices.sleep();
        let ns = crate::cycles_to_us(until - now, self.khz) * 1000;
        crate::irq::halt(ns, self.native);
        true
    }

    /// Adds ` sleeps=<n> irqs=<n>` (since the last call) to a tick line.
    pub fn report(&mut self, line: &mut Line) {
        if self.on {
            line.s(b" sleeps=")
                .dec(self.sleeps)
                .s(b" irqs=")
                .dec(self.irqs);
            (self.sleeps, self.irqs) = (0, 0);
        }
    }
}
