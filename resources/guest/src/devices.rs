//! virtio device discovery and the drivers the command line turned on.
//!
//! Every `virtio_mmio.device=` window is checked and taken through feature
//! negotiation; the first device of each kind whose driver is enabled is
//! set up completely, the others are reset again.
//!
//! ```text
//! molt-guest: virtio devices=<n>
//! molt-guest: virtio id=<device id> base=<hex> ok | … FAIL <why>
//! molt-guest: blk|net|rng FAIL no device            (driver enabled, no usable device)
//! molt-guest: net FAIL bad molt.net                 (not <a.b.c.d>/<1..32>)
//! ```

use crate::blk::Blk;
use crate::bootparams::{Config, NetArg};
use crate::net::Net;
use crate::rng::Rng;
use crate::serial::Line;
use crate::virtio::{self, Mmio, Why, ID_BLOCK, ID_NET, ID_RNG};

#[derive(Default)]
pub struct Devices {
    blk: Option<Blk>,
    net: Option<Net>,
    rng: Option<Rng>,
    /// The net and rng devices, whose interrupts are only acknowledged: their drivers look
    /// at their rings on every wake-up anyway.
    net_irq: Option<Mmio>,
    rng_irq: Option<Mmio>,
}

/// A driver just set up, to start after its `virtio` line.
enum Started {
    None,
    Blk,
    Net,
    Rng,
}

impl Devices {
    /// Finds, reports and initialises the devices. With `interrupts_to` (a local APIC id,
    /// `molt.idle=halt`), routes each started device's interrupt line to that CPU.
    pub fn start(config: &Config, now: u64, tsc_khz: u64, interrupts_to: Option<u8>) -> Devices {
        let mut d = Devices::default();
        Line::new()
            .s(b"virtio devices=")
            .dec(config.virtio_count as u64)
            .print();
        for entry in &config.virtio[..config.virtio_count] {
            let (id, base, result) = match entry {
                None => (0, 0, Err("bad virtio_mmio.device")),
                Some((size, base, irq)) => {
                    match virtio::window_ok(*size, *base).and_then(|m| Ok((m, m.check()?))) {
                        Ok((mmio, id)) => {
                            let started = d.attach(config, mmio, id, now, tsc_khz);
                            let routed = started.and_then(|s| match interrupts_to {
                                Some(apic) => d.route(s, mmio, *irq, apic),
                                None => Ok(s),
                            });
                            (id, *base, routed)
                        }
                        Err(why) => (0, *base, Err(why)),
                    }
                }
            };
            let mut line = Line::new();
            line.s(b"virtio id=").dec(id.into()).s(b" base=").hex(base);
            match result {
                Ok(started) => {
                    line.s(b" ok").print();
                    d.announce(started, now);
                }
                Err(why) => line.s(b" FAIL ").s(why.as_bytes()).print(),
            }
        }
        let missing = |on: bool, present: bool, name: &[u8]| {
            if on && !present {
                Line::new().s(name).s(b" FAIL no device").print();
            }
        };
        missing(config.blk, d.blk.is_some(), b"blk");
        missing(config.rng, d.rng.is_some(), b"rng");
        match config.net {
            NetArg::Invalid => Line::new().s(b"net FAIL bad molt.net").print(),
            NetArg::On(_) => missing(true, d.net.is_some(), b"net"),
            NetArg::Off => {}
        }
        d
    }

    /// Sets up the driver for device `id` if it is enabled and the first of
    /// its kind; otherwise only checks the feature handshake and resets it.
    fn attach(
        &mut self,
        config: &Config,
        mmio: Mmio,
        id: u32,
        now: u64,
        tsc_khz: u64,
    ) -> Result<Started, Why> {
        match (id, config.net) {
            (ID_BLOCK, _) if config.blk && self.blk.is_none() => {
                self.blk = Some(Blk::init(mmio, tsc_khz)?);
                Ok(Started::Blk)
            }
            (ID_NET, NetArg::On(ip)) if self.net.is_none() => {
                self.net = Some(Net::init(mmio, ip, now, tsc_khz)?);
                Ok(Started::Net)
            }
            (ID_RNG, _) if config.rng && self.rng.is_none() => {
                self.rng = Some(Rng::init(mmio, now, tsc_khz)?);
                Ok(Started::Rng)
            }
            // Device ID 0: an empty slot (virtio 1.x, 4.2.2).
            (0, _) => Ok(Started::None),
            _ => {
                let result = mmio.negotiate(0);
                mmio.reset();
                result.map(|_| Started::None)
            }
        }
    }

    /// Routes a started driver's interrupt line, and makes the blk driver wait for it.
    fn route(
        &mut self,
        s: Started,
        mmio: Mmio,
        irq: Option<u32>,
        apic: u8,
    ) -> Result<Started, Why> {
        if matches!(s, Started::None) {
            return Ok(s);
        }
        if !irq.is_some_and(|gsi| crate::irq::route(gsi, apic)) {
            return Err("no usable interrupt line");
        }
        match (&s, &mut self.blk) {
            (Started::Blk, Some(blk)) => blk.wait_for_interrupts(),
            (Started::Net, _) => self.net_irq = Some(mmio),
            (Started::Rng, _) => self.rng_irq = Some(mmio),
            _ => {}
        }
        Ok(s)
    }

    /// A device interrupt came: the drivers read and acknowledge their devices' status.
    pub fn interrupt(&mut self) {
        if let Some(blk) = self.blk.as_mut() {
            blk.interrupt();
        }
        for mmio in [self.net_irq, self.rng_irq].into_iter().flatten() {
            mmio.take_interrupt();
        }
    }

    /// Since when (TSC) every driver has only waited for its device (0: nothing to do);
    /// `None` when one has work.
    pub fn waiting_since(&self) -> Option<u64> {
        self.blk.as_ref().map_or(Some(0), Blk::waiting_since)
    }

    /// The CPU is going to sleep until an interrupt.
    pub fn sleep(&mut self) {
        if let Some(blk) = self.blk.as_mut() {
            blk.sleep();
        }
    }

    /// Lets a driver just set up print its first line and begin.
    fn announce(&mut self, started: Started, now: u64) {
        match (started, &mut self.blk, &self.net, &mut self.rng) {
            (Started::Blk, Some(blk), _, _) => blk.start(),
            (Started::Net, _, Some(net), _) => net.start(),
            (Started::Rng, _, _, Some(rng)) => rng.start(now),
            _ => {}
        }
    }

    /// One step of each driver.
    pub fn poll(&mut self, now: u64) {
        if let Some(blk) = self.blk.as_mut() {
            blk.poll(now);
        }
        if let Some(net) = self.net.as_mut() {
            net.poll(now);
        }
        if let Some(rng) = self.rng.as_mut() {
            rng.poll(now);
        }
    }
}
