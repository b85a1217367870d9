//! Keeps the old image's address space and KVM VM alive across `execve`, so their teardown
//! happens after the new image runs the guest instead of inside the guest's pause.
//!
//! execve tears down the calling process's address space (tens of ms per GiB of populated
//! 4K-page guest RAM) and closes its KVM fds (destroying a KVM VM takes ~15 ms on this host).
//! Before the pause we start a holder: a process that shares our address space
//! (`clone(CLONE_VM)`, not a thread) and has a copy of our fd table (the KVM fds are open by
//! then; fds made later need no holding). execve then only drops references. The holder
//! waits until the exec has closed our end of a pipe, then until the handoff's commit page
//! is decided (the new image marks it just before it resumes the guest), and exits: the
//! kernel tears both down in the holder's exit, beside the resumed guest. Exiting at the
//! exec already would put that teardown (~20 ms of kernel work, and the locks and TLB
//! shootdowns of freeing the old VM's memory) beside the new image's start-up, inside the
//! pause. The holder runs at `SCHED_IDLE` from its first instruction: neither its polling of
//! the commit page (a wake-up every millisecond through the pause) nor its exit's teardown
//! takes CPU from the new image, the resumed guest's vCPUs or its device backends.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cpr::CommitPage;

use nix::fcntl::OFlag;

use super::sys;

/// Stack of the holder: it only calls close, read, nanosleep, sched_setscheduler and _exit.
const STACK_SIZE: usize = 64 << 10;
/// How often the holder looks at the commit page after the exec.
const WATCH_EVERY_NS: i64 = 1_000_000;
/// How long it waits for the commit page to be decided before it exits anyway.
const WATCH_AT_MOST: u32 = 10_000;

/// What the holder is given, at the bottom of its stack mapping (the stack grows down from
/// the top).
#[repr(C)]
struct HoldArgs {
    read_end: i32,
    write_end: i32,
    /// The commit page's word, mapped in the shared address space (which the holder keeps
    /// mapped after the exec).
    commit: *const AtomicU64,
}

/// A running holder.
pub struct Holder {
    pid: i32,
    /// Our end of the pipe; execve closes it (CLOEXEC), which lets the holder go.
    release: OwnedFd,
    stack: *mut libc::c_void,
}

/// Holder entry point. `arg` points at its [`HoldArgs`]. It must touch nothing it shares with
/// the VMM's threads but the commit word: only raw system calls.
extern "C" fn hold(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `start` wrote the arguments at the bottom of this holder's own stack mapping,
    // which nothing else uses.
    let args = unsafe { std::ptr::read(arg as *const HoldArgs) };
    let mut byte = 0u8;
    let pause = libc::timespec {
        tv_sec: 0,
        tv_nsec: WATCH_EVERY_NS,
    };
    let idle = libc::sched_param { sched_priority: 0 };
    // SAFETY: raw system calls on fds this process owns (its copy of the fd table) and on
    // values on its own stack. The commit word lives in a shared mapping of the address
    // space this holder keeps alive (after the exec, only the holder keeps it); it is read
    // atomically.
    unsafe {
        libc::syscall(
            libc::SYS_sched_setscheduler,
            0,
            libc::SCHED_IDLE,
            &idle as *const libc::sched_param,
        );
        libc::syscall(libc::SYS_close, args.write_end);
        let n = libc::syscall(libc::SYS_read, args.read_end, &mut byte as *mut u8, 1usize);
        // 0: the exec closed the pipe. A byte: the update was given up (`release`).
        if n == 0 {
            for _ in 0..WATCH_AT_MOST {
                if (*args.commit).load(Ordering::SeqCst) != 0 {
                    break;
                }
                libc::syscall(
                    libc::SYS_nanosleep,
                    &pause as *const libc::timespec,
                    std::ptr::null_mut::<libc::timespec>(),
                );
            }
        }
        libc::syscall(libc::SYS_exit, 0);
    }
    0
}

impl Holder {
    /// Starts a holder sharing this process's address space and holding copies of its fds;
    /// after the exec it lives until `commit` is decided.
    pub fn start(commit: &CommitPage) -> io::Result<Self> {
        let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        // SAFETY: a fresh anonymous mapping for the holder's stack.
        let stack = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                STACK_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if stack == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let arg = stack.cast::<HoldArgs>();
        // SAFETY: the bottom of the fresh mapping is writable, page-aligned and far below
        // the part the holder's stack will use.
        unsafe {
            arg.write(HoldArgs {
                read_end: read_end.as_raw_fd(),
                write_end: write_end.as_raw_fd(),
                commit: commit.word_ptr(),
            })
        };
        // SAFETY: the child runs `hold` on its own stack (top of the mapping, 16-byte aligned)
        // in our address space; `hold` only makes raw system calls. SIGCHLD is ignored by
        // molt, so the kernel reaps it.
        let pid = unsafe {
            libc::clone(
                hold,
                stack.cast::<u8>().add(STACK_SIZE).cast(),
                libc::CLONE_VM | libc::SIGCHLD,
                arg.cast(),
            )
        };
        // Our copy of the read end is not needed: the holder has its own.
        drop(read_end);
        if pid < 0 {
            let e = io::Error::last_os_error();
            // SAFETY: unmapping the stack no child runs on.
            unsafe { libc::munmap(stack, STACK_SIZE) };
            return Err(e);
        }
        Ok(Self {
            pid,
            release: write_end,
            stack,
        })
    }

    /// The update did not happen (execve failed): lets the holder exit and frees its stack.
    pub fn release(self) {
        let pidfd = sys::pidfd_open(self.pid);
        // A byte (rather than the end of the pipe an exec makes) lets it go at once.
        let _ = nix::unistd::write(&self.release, &[1]);
        drop(self.release);
        if let Ok(pidfd) = pidfd {
            if !sys::wait_readable(&pidfd, Duration::from_secs(1)).unwrap_or(false) {
                // Never unmap a stack that may still be in use.
                log::warn!("update holder {} did not exit; leaking its stack", self.pid);
                return;
            }
        }
        // SAFETY: the holder has exited (or was already gone: pidfd_open failed with ESRCH),
        // so nothing runs on the stack any more.
        unsafe { libc::munmap(self.stack, STACK_SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::Policy;

    #[test]
    fn the_holder_runs_at_sched_idle_from_its_start() {
        let commit = CommitPage::create().expect("commit page");
        let holder = Holder::start(&commit).expect("holder");
        // It moves itself there first thing: give it the moment that takes.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut policy = Policy::of(holder.pid).expect("the holder's policy");
        while policy != Policy::IDLE && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
            policy = Policy::of(holder.pid).expect("the holder's policy");
        }
        let pid = holder.pid;
        holder.release();
        assert_eq!(policy, Policy::IDLE, "holder {pid}");
    }
}
