//! Keeps the old image's address space and KVM VM alive across `execve`, so their teardown
//! happens after the new image runs the guest instead of inside the guest's pause.
//!
//! execve tears down the calling process's address space (tens of ms per GiB of populated
//! 4K-page guest RAM) and closes its KVM fds (destroying a KVM VM takes ~15 ms on this host).
//! Before the pause we start a holder: a process that shares our address space
//! (`clone(CLONE_VM)`, not a thread) and has a copy of our fd table (the KVM fds are open by
//! then; fds made later need no holding). execve then only drops references; the holder waits until the exec has closed our end of a pipe, exits, and the
//! kernel tears both down in the holder's exit, beside the resumed guest.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::fcntl::OFlag;

use super::sys;

/// Stack of the holder: it only calls close, read and _exit.
const STACK_SIZE: usize = 64 << 10;

/// A running holder.
pub struct Holder {
    pid: i32,
    /// Our end of the pipe; execve closes it (CLOEXEC), which lets the holder go.
    release: OwnedFd,
    stack: *mut libc::c_void,
}

/// Holder entry point. `arg` packs the pipe's read end (high 32 bits) and write end. It must
/// touch nothing it shares with the VMM's threads: only raw system calls.
extern "C" fn hold(arg: *mut libc::c_void) -> libc::c_int {
    let v = arg as usize as u64;
    let (read_end, write_end) = ((v >> 32) as i32, (v & 0xffff_ffff) as i32);
    let mut byte = 0u8;
    // SAFETY: raw system calls on fds this process owns (its copy of the fd table) and a byte
    // on its own stack; no memory shared with the VMM's threads is touched.
    unsafe {
        libc::syscall(libc::SYS_close, write_end);
        libc::syscall(libc::SYS_read, read_end, &mut byte as *mut u8, 1usize);
        libc::syscall(libc::SYS_exit, 0);
    }
    0
}

impl Holder {
    /// Starts a holder sharing this process's address space and holding copies of its fds.
    pub fn start() -> io::Result<Self> {
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
        let arg = ((read_end.as_raw_fd() as u32 as u64) << 32 | write_end.as_raw_fd() as u32 as u64)
            as usize;
        // SAFETY: the child runs `hold` on its own stack (top of the mapping, 16-byte aligned)
        // in our address space; `hold` only makes raw system calls. SIGCHLD is ignored by
        // molt, so the kernel reaps it.
        let pid = unsafe {
            libc::clone(
                hold,
                stack.cast::<u8>().add(STACK_SIZE).cast(),
                libc::CLONE_VM | libc::SIGCHLD,
                arg as *mut libc::c_void,
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
        // Closing our end makes the holder's read return.
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
