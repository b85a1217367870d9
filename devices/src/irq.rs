//! Interrupt and notification triggers backed by eventfds.

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// A [`vm_superio::Trigger`] that signals an eventfd (registered as a KVM irqfd, or watched
/// by the event loop).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// The underlying eventfd.
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }

    /// A second handle to the same eventfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}
