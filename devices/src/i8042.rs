//! i8042 keyboard controller, reduced to what VMs use it for: the CPU reset line.

use serde::{Deserialize, Serialize};

use crate::irq::EventFdTrigger;

/// First I/O port of the controller (data port); the command/status port is at +4.
pub const I8042_PORT_BASE: u16 = 0x60;
/// Ports covered, 0x60..=0x64.
pub const I8042_PORT_LEN: u16 = 5;

/// The controller: writing 0xfe to the command port signals the reset trigger.
pub struct I8042 {
    inner: vm_superio::I8042Device<EventFdTrigger>,
}

/// Serializable state of [`I8042`]. The controller keeps no registers; the type exists so
/// records can grow fields here without a format change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {}

impl I8042 {
    /// A controller signalling `reset` when the guest pulses the reset line.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self {
            inner: vm_superio::I8042Device::new(reset),
        }
    }

    /// Rebuilds the controller from its state and live reset trigger.
    pub fn from_state(_state: &I8042State, reset: EventFdTrigger) -> Self {
        Self::new(reset)
    }

    /// The controller's state.
    pub fn state(&self) -> I8042State {
        I8042State {}
    }

    /// Guest read at `offset` from [`I8042_PORT_BASE`].
    pub fn read(&mut self, offset: u16) -> u8 {
        self.inner.read(offset as u8)
    }

    /// Guest write at `offset` from [`I8042_PORT_BASE`].
    pub fn write(&mut self, offset: u16, value: u8) -> std::io::Result<()> {
        self.inner.write(offset as u8, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn reset_command_signals_the_trigger() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(EventFdTrigger::new(evt.try_clone().unwrap()));
        dev.write(0, 0xfe).unwrap();
        assert!(evt.read().is_err(), "data port write must not reset");
        dev.write(4, 0xfe).unwrap();
        assert_eq!(evt.read().unwrap(), 1);
    }
}
