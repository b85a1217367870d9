//! 16550A UART (vm-superio's model) with a serializable state.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialEvents;

use crate::irq::EventFdTrigger;

/// I/O port of COM1.
pub const COM1_PORT_BASE: u16 = 0x3f8;
/// Registers covered.
pub const COM1_PORT_LEN: u16 = 8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;

/// Errors of the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The saved input FIFO is larger than the device's.
    #[error("saved serial input FIFO holds {0} bytes, more than the device's")]
    FifoTooLarge(usize),
    /// Raising the interrupt failed.
    #[error("cannot raise the serial interrupt")]
    Interrupt(#[source] std::io::Error),
    /// Writing guest output to the backend failed (the byte is lost).
    #[error("cannot write serial output")]
    Output(#[source] std::io::Error),
    /// The input FIFO is full.
    #[error("serial input FIFO is full")]
    FifoFull,
}

/// Serializable register and FIFO state. `Default` is the UART's reset state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SerialState {
    /// DLL.
    pub baud_divisor_low: u8,
    /// DLM.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl Default for SerialState {
    fn default() -> Self {
        vm_superio::serial::SerialState::default().into()
    }
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// Counters and the "input FIFO drained" notification.
#[derive(Debug, Default)]
pub struct SerialCounters {
    /// Bytes the guest wrote.
    pub out_bytes: AtomicU64,
    /// Bytes lost because the output failed.
    pub lost_bytes: AtomicU64,
}

/// The live resources a serial device is built from.
pub struct SerialResources<W: Write> {
    /// Interrupt line (an irqfd on IRQ 4).
    pub irq: EventFdTrigger,
    /// Signalled when the guest has drained the input FIFO, so the VMM can feed it again.
    pub input_drained: EventFdTrigger,
    /// Where guest output goes.
    pub out: W,
    /// Shared counters.
    pub counters: Arc<SerialCounters>,
}

/// [`SerialEvents`] forwarding to counters and the drain notification.
pub struct Events {
    input_drained: EventFdTrigger,
    counters: Arc<SerialCounters>,
}

impl SerialEvents for Events {
    fn buffer_read(&self) {}

    fn out_byte(&self) {
        self.counters.out_bytes.fetch_add(1, Ordering::Relaxed);
    }

    fn tx_lost_byte(&self) {
        self.counters.lost_bytes.fetch_add(1, Ordering::Relaxed);
    }

    fn in_buffer_empty(&self) {
        if let Err(e) = vm_superio::Trigger::trigger(&self.input_drained) {
            log::warn!("serial: cannot signal drained input: {e}");
        }
    }
}

/// A 16550A UART.
pub struct Serial<W: Write> {
    inner: vm_superio::Serial<EventFdTrigger, Events, W>,
}

impl<W: Write> Serial<W> {
    /// A UART in its reset state.
    pub fn new(res: SerialResources<W>) -> Self {
        // The default state has an empty FIFO and no pending interrupt, so this cannot fail.
        Self::from_state(&SerialState::default(), res)
            .unwrap_or_else(|_| unreachable!("default serial state is valid"))
    }

    /// Rebuilds a UART from saved state and live resources.
    pub fn from_state(state: &SerialState, res: SerialResources<W>) -> Result<Self, SerialError> {
        let events = Events {
            input_drained: res.input_drained,
            counters: res.counters,
        };
        let inner = vm_superio::Serial::from_state(&state.into(), res.irq, events, res.out)
            .map_err(|e| match e {
                vm_superio::serial::Error::FullFifo => {
                    SerialError::FifoTooLarge(state.in_buffer.len())
                }
                vm_superio::serial::Error::Trigger(e) => SerialError::Interrupt(e),
                vm_superio::serial::Error::IOError(e) => SerialError::Output(e),
            })?;
        Ok(Self { inner })
    }

    /// The UART's state.
    pub fn state(&self) -> SerialState {
        self.inner.state().into()
    }

    /// Guest read of register `offset`.
    pub fn read(&mut self, offset: u16) -> u8 {
        self.inner.read(offset as u8)
    }

    /// Guest write of register `offset`.
    pub fn write(&mut self, offset: u16, value: u8) -> Result<(), SerialError> {
        self.inner.write(offset as u8, value).map_err(|e| match e {
            vm_superio::serial::Error::Trigger(e) => SerialError::Interrupt(e),
            vm_superio::serial::Error::IOError(e) => SerialError::Output(e),
            vm_superio::serial::Error::FullFifo => SerialError::FifoFull,
        })
    }

    /// Free space in the input FIFO.
    pub fn input_room(&self) -> usize {
        self.inner.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        let n = bytes.len().min(self.input_room());
        if n == 0 {
            return Ok(0);
        }
        self.inner
            .enqueue_raw_bytes(&bytes[..n])
            .map_err(|e| match e {
                vm_superio::serial::Error::Trigger(e) | vm_superio::serial::Error::IOError(e) => {
                    SerialError::Interrupt(e)
                }
                vm_superio::serial::Error::FullFifo => SerialError::FifoFull,
            })
    }

    /// The output writer.
    pub fn writer_mut(&mut self) -> &mut W {
        self.inner.writer_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn resources(out: Vec<u8>) -> (SerialResources<Vec<u8>>, EventFd) {
        let drained = EventFd::new(EFD_NONBLOCK).unwrap();
        (
            SerialResources {
                irq: EventFdTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                input_drained: EventFdTrigger::new(drained.try_clone().unwrap()),
                out,
                counters: Arc::default(),
            },
            drained,
        )
    }

    #[test]
    fn output_goes_to_the_writer() {
        let (res, _) = resources(Vec::new());
        let mut s = Serial::new(res);
        for b in b"hi\n" {
            s.write(0, *b).unwrap();
        }
        assert_eq!(s.writer_mut(), b"hi\n");
    }

    #[test]
    fn state_round_trip_keeps_registers_and_fifo() {
        let (res, _) = resources(Vec::new());
        let mut s = Serial::new(res);
        s.write(7, 0x5a).unwrap(); // scratch
        s.write(3, 0x03).unwrap(); // 8N1
        assert_eq!(s.enqueue_input(b"abc").unwrap(), 3);
        let state = s.state();
        let json = serde_json::to_string(&state).unwrap();
        let back: SerialState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let (res, drained) = resources(Vec::new());
        let mut t = Serial::from_state(&back, res).unwrap();
        assert_eq!(t.read(7), 0x5a);
        assert_eq!(t.read(3), 0x03);
        assert_eq!([t.read(0), t.read(0), t.read(0)], *b"abc");
        assert_eq!(
            drained.read().unwrap(),
            1,
            "drain notification after the last byte"
        );
    }

    #[test]
    fn default_state_is_the_reset_state() {
        let (res, _) = resources(Vec::new());
        let mut s = Serial::from_state(&SerialState::default(), res).unwrap();
        // LSR: transmitter holding register empty and idle.
        assert_eq!(s.read(5) & 0x60, 0x60);
        let partial: SerialState = serde_json::from_str(r#"{"scratch": 7}"#).unwrap();
        assert_eq!(partial.line_status, SerialState::default().line_status);
    }

    #[test]
    fn oversized_fifo_is_refused() {
        let (res, _) = resources(Vec::new());
        let state = SerialState {
            in_buffer: vec![0; 1000],
            ..Default::default()
        };
        assert!(matches!(
            Serial::from_state(&state, res),
            Err(SerialError::FifoTooLarge(1000))
        ));
    }

    #[test]
    fn input_beyond_the_fifo_is_not_accepted() {
        let (res, _) = resources(Vec::new());
        let mut s = Serial::new(res);
        let room = s.input_room();
        assert_eq!(s.enqueue_input(&vec![1; room + 10]).unwrap(), room);
        assert_eq!(s.enqueue_input(b"x").unwrap(), 0);
    }
}
