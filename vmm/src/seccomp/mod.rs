//! Per-thread seccomp filters (`--seccomp on|log|off`, default on), compiled with rust-vmm's
//! `seccompiler`.
//!
//! A filter survives `execve` and cannot be removed, and filters stack: a filter on the
//! thread that executes a live update would be inherited by every later image and pile up
//! until `seccomp()` fails. So molt filters every thread except one:
//!
//! - vCPU threads ([`ThreadKind::Vcpu`]): guest exits (PIO/MMIO), KVM_RUN and the KVM state
//!   ioctls, writes to the serial output and to eventfds. Installed by the thread itself
//!   before it enters the guest.
//! - The main thread ([`ThreadKind::Control`]): the event loop (API connections, serial
//!   input, virtio device emulation) and the control plane (pause, capture, snapshots,
//!   transfers, rebuilds). Installed when [`crate::control::Control`] starts; every thread it
//!   starts afterwards (vCPUs after a rebuild, the VM reaper, snapshot writers) inherits it.
//!   No `execve`/`execveat`.
//! - The [`launcher`]: a thread started before the main thread's filter that stays
//!   unfiltered and does only two things for the main thread: start the update guardian
//!   (a fork and exec) and `execve` the new image. The new image therefore starts without
//!   any filter and installs its own set: none accumulates across updates.
//!
//! Trade-off: the threads share one address space, so a thread compromised despite its
//! filter could still corrupt what the launcher executes; the filters bound what a
//! compromised thread can ask the kernel directly (no exec, no new network peers from a vCPU
//! thread, no ptrace, no mounts...), not what it can make the launcher do.

mod filters;
pub mod launcher;

use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction};
use serde::{Deserialize, Serialize};

/// `--seccomp`: what a filtered thread's forbidden syscall does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// Kill molt (SIGSYS).
    #[default]
    On,
    /// Allow the syscall and log it to the kernel audit log.
    Log,
    /// No filters.
    Off,
}

/// The threads that get a filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread.
    Vcpu,
    /// The main thread (event loop, API, device emulation, control plane) and its helpers.
    Control,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Control => "control",
        }
    }
}

/// Errors compiling or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A filter cannot be compiled.
    #[error("cannot compile the {0} seccomp filter")]
    Compile(&'static str, #[source] seccompiler::BackendError),
    /// The kernel refused a filter.
    #[error("cannot install the {0} seccomp filter")]
    Install(&'static str, #[source] seccompiler::Error),
    /// The launcher thread cannot be started.
    #[error("cannot start the launcher thread")]
    Launcher(#[source] std::io::Error),
    /// The mode was already set to another value in this process.
    #[error("seccomp mode already set to {0:?}")]
    ModeSet(SeccompMode),
}

struct Programs {
    mode: SeccompMode,
    vcpu: BpfProgram,
    control: BpfProgram,
}

static PROGRAMS: OnceLock<Programs> = OnceLock::new();

/// Sets this process's mode and compiles its filters (before any thread that gets one
/// starts). Setting the same mode again is a no-op. Without a call, nothing is filtered.
pub fn init(mode: SeccompMode) -> Result<(), SeccompError> {
    if let Some(p) = PROGRAMS.get() {
        return match p.mode == mode {
            true => Ok(()),
            false => Err(SeccompError::ModeSet(p.mode)),
        };
    }
    let mismatch = match mode {
        SeccompMode::On => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Off => {
            let _ = PROGRAMS.set(Programs {
                mode,
                vcpu: Vec::new(),
                control: Vec::new(),
            });
            return Ok(());
        }
    };
    let compile = |kind: ThreadKind| {
        filters::compile(kind, mismatch.clone()).map_err(|e| SeccompError::Compile(kind.name(), e))
    };
    let programs = Programs {
        mode,
        vcpu: compile(ThreadKind::Vcpu)?,
        control: compile(ThreadKind::Control)?,
    };
    let _ = PROGRAMS.set(programs);
    Ok(())
}

/// The mode set by [`init`] (off without one).
pub fn mode() -> SeccompMode {
    PROGRAMS.get().map_or(SeccompMode::Off, |p| p.mode)
}

thread_local! {
    /// Whether [`apply`] installed a filter on this thread (it is not installed twice).
    static APPLIED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs the filter for `kind` on the calling thread (nothing when off, or when this
/// thread has its filter already: a vCPU thread started ahead of its vCPU installs it early).
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(p) = PROGRAMS.get() else {
        return Ok(());
    };
    if APPLIED.get() {
        return Ok(());
    }
    let prog = match kind {
        ThreadKind::Vcpu => &p.vcpu,
        ThreadKind::Control => &p.control,
    };
    if prog.is_empty() {
        return Ok(());
    }
    seccompiler::apply_filter(prog).map_err(|e| SeccompError::Install(kind.name(), e))?;
    APPLIED.set(true);
    log::debug!("seccomp: {} filter installed ({:?})", kind.name(), p.mode);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_in_both_modes() {
        for action in [SeccompAction::KillProcess, SeccompAction::Log] {
            for kind in [ThreadKind::Vcpu, ThreadKind::Control] {
                let prog = filters::compile(kind, action.clone()).unwrap();
                assert!(!prog.is_empty());
            }
        }
    }

    #[test]
    fn no_filter_allows_exec() {
        for kind in [ThreadKind::Vcpu, ThreadKind::Control] {
            let allowed = filters::allowed(kind);
            for sys in [libc::SYS_execve, libc::SYS_execveat, libc::SYS_ptrace] {
                assert!(!allowed.contains(&sys), "{kind:?} allows {sys}");
            }
        }
        let vcpu = filters::allowed(ThreadKind::Vcpu);
        for sys in [libc::SYS_socket, libc::SYS_openat, libc::SYS_clone3] {
            assert!(!vcpu.contains(&sys), "vcpu allows {sys}");
        }
    }

    #[test]
    fn a_filter_binds_only_its_thread() {
        // A thread with the vCPU filter in errno mode: its socket() fails with EPERM and the
        // process (this test) goes on; other threads are not filtered.
        let prog = filters::compile_errno(ThreadKind::Vcpu).unwrap();
        let handle = std::thread::spawn(move || {
            seccompiler::apply_filter(&prog).unwrap();
            // SAFETY: socket() takes no pointer arguments.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            (fd, std::io::Error::last_os_error().raw_os_error())
        });
        let (fd, errno) = handle.join().unwrap();
        assert_eq!((fd, errno), (-1, Some(libc::EPERM)));
        // SAFETY: as above, on an unfiltered thread.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0);
        // SAFETY: closing the socket just created.
        unsafe { libc::close(fd) };
    }
}
