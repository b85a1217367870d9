//! How a VM ends, and the one-shot notification that tells the event loop it did.

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote this code to the debug exit port.
    Guest(u8),
    /// The guest reset the machine (i8042 reset line, triple fault, or a reset system event);
    /// molt ends the VM rather than rebooting it.
    Reset(&'static str),
    /// The guest powered off (PSCI/ACPI shutdown system event).
    PowerOff,
    /// The VMM was asked to stop (signal or API).
    Stopped(String),
    /// A fatal error in the VMM or an unrecoverable vCPU exit.
    Error(String),
}

impl VmExit {
    /// The molt process exit code for this end.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::Guest(code) => i32::from(*code),
            VmExit::Reset(_) | VmExit::PowerOff | VmExit::Stopped(_) => 0,
            VmExit::Error(_) => 1,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Guest(code) => write!(f, "guest exited with code {code}"),
            VmExit::Reset(how) => write!(f, "guest reset ({how})"),
            VmExit::PowerOff => write!(f, "guest powered off"),
            VmExit::Stopped(why) => write!(f, "stopped: {why}"),
            VmExit::Error(e) => write!(f, "{e}"),
        }
    }
}

/// First end wins; the eventfd wakes the event loop.
pub struct ExitNotifier {
    reason: Mutex<Option<VmExit>>,
    evt: EventFd,
}

impl ExitNotifier {
    /// A notifier with no end recorded.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    /// Records `why` unless an end is already recorded, and wakes the event loop.
    pub fn end(&self, why: VmExit) {
        let mut reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if reason.is_none() {
            log::info!("VM ending: {why}");
            *reason = Some(why);
        }
        if let Err(e) = self.evt.write(1) {
            log::error!("cannot wake the event loop: {e}");
        }
    }

    /// The recorded end, if any.
    pub fn reason(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The eventfd the event loop watches.
    pub fn event_fd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_end_wins() {
        let n = ExitNotifier::new().unwrap();
        assert_eq!(n.reason(), None);
        n.end(VmExit::Guest(3));
        n.end(VmExit::Error("later".into()));
        assert_eq!(n.reason(), Some(VmExit::Guest(3)));
        assert_eq!(n.reason().unwrap().exit_code(), 3);
        assert_eq!(n.event_fd().read().unwrap(), 2);
    }
}
