//! molt's device models.
//!
//! Each device is a pure register state machine in the style of vm-superio: the VMM calls
//! `read(offset)` / `write(offset, value)` from its vCPU exit handling; devices know nothing
//! of epoll, buses or KVM. Each has a serializable `State` beside it, produced by `state()`
//! and turned back into a device by `from_state(state, resources)`, where `resources` are the
//! live things (interrupt triggers, output writers, inherited fds) that cannot be serialized.

pub mod debug_port;
pub mod i8042;
pub mod irq;
pub mod serial;
pub mod virtio;
