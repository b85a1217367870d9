//! Faults a test build can inject into a restore (the tests' "next version" build, feature
//! `test-next`): `MOLT_TEST_FAULT=<step>:<kind>` fails the new image at `step` by `panic`,
//! `error` or `exit`. In a normal build every injection point is a no-op.

/// The steps of a restore, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The record was read.
    Record,
    /// Guest RAM was taken over and mapped.
    Memory,
    /// The KVM VM and its memory slots exist.
    Vm,
    /// The vCPUs were created and restored.
    Vcpus,
    /// The devices are restored and wired.
    Devices,
    /// The API server was taken over.
    Api,
    /// Everything is ready; the handoff is not committed yet.
    BeforeResume,
    /// The handoff is committed and the guest runs.
    AfterResume,
    /// Not a restore step: the old image of a cpr-exec through a stand-in is about to
    /// execute the new binary (an error here stands for `execve` failing).
    StandInExec,
}

impl Step {
    /// The step's name in `MOLT_TEST_FAULT`.
    pub fn name(self) -> &'static str {
        match self {
            Step::Record => "record",
            Step::Memory => "memory",
            Step::Vm => "vm",
            Step::Vcpus => "vcpus",
            Step::Devices => "devices",
            Step::Api => "api",
            Step::BeforeResume => "before-resume",
            Step::AfterResume => "after-resume",
            Step::StandInExec => "stand-in-exec",
        }
    }
}

/// Fails here if the test build was asked to.
#[cfg(feature = "test-next")]
pub fn inject(step: Step) -> Result<(), crate::Error> {
    let Ok(spec) = std::env::var("MOLT_TEST_FAULT") else {
        return Ok(());
    };
    let Some((at, kind)) = spec.split_once(':') else {
        return Ok(());
    };
    if at != step.name() {
        return Ok(());
    }
    log::warn!("injecting {kind} at {}", step.name());
    match kind {
        "panic" => panic!("injected panic at {}", step.name()),
        "exit" => std::process::exit(3),
        // Not a failure: holds the restore for a second so a test can act in the middle.
        "sleep" => {
            std::thread::sleep(std::time::Duration::from_secs(1));
            Ok(())
        }
        _ => Err(crate::Error::Injected(step.name())),
    }
}

/// `MOLT_TEST_SECCOMP=<thread>` (test build): the thread named (`vcpu`) makes a syscall its
/// seccomp filter forbids, `socket()`, right after installing the filter.
#[cfg(feature = "test-next")]
pub fn forbidden_syscall(thread: &str) {
    if std::env::var("MOLT_TEST_SECCOMP").as_deref() != Ok(thread) {
        return;
    }
    log::warn!("injecting a forbidden syscall (socket) on a {thread} thread");
    // SAFETY: socket() takes no pointers; the fd (if the filter only logs) is closed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd >= 0 {
            libc::close(fd);
        }
    }
}

/// Makes a forbidden syscall if the test build was asked to (never, in this build).
#[cfg(not(feature = "test-next"))]
#[inline(always)]
pub fn forbidden_syscall(_thread: &str) {}

/// Fails here if the test build was asked to (never, in this build).
#[cfg(not(feature = "test-next"))]
#[inline(always)]
pub fn inject(_step: Step) -> Result<(), crate::Error> {
    Ok(())
}
