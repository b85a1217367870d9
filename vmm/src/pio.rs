//! Port I/O dispatch: which device answers which port. Unclaimed ports read as 0xff and
//! ignore writes, as on a PC with nothing there.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use devices::debug_port::{DebugEvent, DebugPort, DEBUG_PORT_BASE, DEBUG_PORT_LEN};
use devices::i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
use devices::serial::{Serial, SerialError, COM1_PORT_BASE, COM1_PORT_LEN};
use vmm_sys_util::eventfd::EventFd;

use crate::exit::VmExit;
use crate::serial_backend::SerialOut;

/// The port-I/O devices of a VM.
pub struct PioBus {
    /// COM1.
    pub serial: Mutex<Serial<SerialOut>>,
    /// Keyboard controller (reset line).
    pub i8042: Mutex<I8042>,
    /// Debug port (markers and exit code).
    pub debug: Mutex<DebugPort>,
    /// Signalled by the i8042 when the guest pulses the reset line.
    pub reset_evt: EventFd,
    /// When the VMM started, for boot markers.
    pub started: Instant,
    /// virtio-mmio devices.
    pub virtio: std::sync::Arc<crate::virtio::Virtio>,
    /// Guest output could not be written (reported once).
    pub serial_output_failed: AtomicBool,
}

fn in_range(port: u16, base: u16, len: u16) -> Option<u16> {
    port.checked_sub(base).filter(|off| *off < len)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PioBus {
    /// Guest `in` from `port`.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        let value = if let Some(off) = in_range(port, COM1_PORT_BASE, COM1_PORT_LEN) {
            lock(&self.serial).read(off)
        } else if let Some(off) = in_range(port, I8042_PORT_BASE, I8042_PORT_LEN) {
            lock(&self.i8042).read(off)
        } else if let Some(off) = in_range(port, DEBUG_PORT_BASE, DEBUG_PORT_LEN) {
            lock(&self.debug).read(off)
        } else {
            0xff
        };
        data.fill(0xff);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    /// Guest MMIO read at `addr`; unclaimed addresses read as all ones.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.virtio.mmio_read(addr, data) {
            log::debug!("unclaimed MMIO read at {addr:#x}");
            data.fill(0xff);
        }
    }

    /// Guest MMIO write at `addr`; unclaimed writes are ignored.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !self.virtio.mmio_write(addr, data) {
            log::debug!("unclaimed MMIO write at {addr:#x}");
        }
    }

    /// Guest `out` to `port`; returns how the VM ends if the write ended it.
    pub fn write(&self, port: u16, data: &[u8]) -> Option<VmExit> {
        let value = *data.first()?;
        if let Some(off) = in_range(port, COM1_PORT_BASE, COM1_PORT_LEN) {
            match lock(&self.serial).write(off, value) {
                Ok(()) => {}
                // A closed stdout or a full disk: say so once, then drop output quietly (the
                // serial counters keep the lost bytes).
                Err(SerialError::Output(e)) => {
                    if !self.serial_output_failed.swap(true, Ordering::Relaxed) {
                        log::warn!("serial output failing ({e}); guest output is dropped");
                    }
                }
                Err(e) => log::warn!("serial: {e}"),
            }
        } else if let Some(off) = in_range(port, I8042_PORT_BASE, I8042_PORT_LEN) {
            if let Err(e) = lock(&self.i8042).write(off, value) {
                log::warn!("i8042: {e}");
            }
            if self.reset_evt.read().is_ok() {
                return Some(VmExit::Reset("i8042 reset line"));
            }
        } else if let Some(off) = in_range(port, DEBUG_PORT_BASE, DEBUG_PORT_LEN) {
            match lock(&self.debug).write(off, value)? {
                DebugEvent::Marker(m) => log::info!(
                    "guest marker {m} at {} us since VMM start",
                    self.started.elapsed().as_micros()
                ),
                DebugEvent::Exit(code) => return Some(VmExit::Guest(code)),
            }
        }
        None
    }
}
