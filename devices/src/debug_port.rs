//! molt's debug port: lets a guest mark boot progress and end the VM with an exit code.
//!
//! Two byte-wide I/O ports at [`DEBUG_PORT_BASE`]:
//!
//! | port  | write                                              | read |
//! |-------|----------------------------------------------------|------|
//! | 0x500 | boot-progress marker: the VMM logs the time since it started, with the byte | 0 |
//! | 0x501 | end the VM; the `molt` process exits with the byte as its exit code | 0 |

use serde::{Deserialize, Serialize};

/// First I/O port of the debug device.
pub const DEBUG_PORT_BASE: u16 = 0x500;
/// Number of ports.
pub const DEBUG_PORT_LEN: u16 = 2;
/// Offset of the marker register.
pub const MARKER_OFFSET: u16 = 0;
/// Offset of the exit register.
pub const EXIT_OFFSET: u16 = 1;

/// What a guest write asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebugEvent {
    /// Boot-progress marker with the guest's value.
    Marker(u8),
    /// End the VM with this exit code.
    Exit(u8),
}

/// The debug port device. It holds no registers, so its state is empty.
#[derive(Debug, Default)]
pub struct DebugPort;

/// Serializable state of [`DebugPort`] (empty; kept so every device has one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugPortState {}

impl DebugPort {
    /// Rebuilds the device from its state.
    pub fn from_state(_state: &DebugPortState) -> Self {
        Self
    }

    /// The device's state.
    pub fn state(&self) -> DebugPortState {
        DebugPortState {}
    }

    /// Guest read: always 0.
    pub fn read(&mut self, _offset: u16) -> u8 {
        0
    }

    /// Guest write at `offset` from [`DEBUG_PORT_BASE`].
    pub fn write(&mut self, offset: u16, value: u8) -> Option<DebugEvent> {
        match offset {
            MARKER_OFFSET => Some(DebugEvent::Marker(value)),
            EXIT_OFFSET => Some(DebugEvent::Exit(value)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_map_to_events() {
        let mut d = DebugPort;
        assert_eq!(d.write(0, 7), Some(DebugEvent::Marker(7)));
        assert_eq!(d.write(1, 3), Some(DebugEvent::Exit(3)));
        assert_eq!(d.write(2, 3), None);
        assert_eq!(d.read(1), 0);
    }
}
