//! The few system calls of the update path that `nix` does not cover (pidfd, `clone` with a
//! shared address space lives in [`super::holder`]), each wrapped once.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::sched::Policy;

/// Sets or clears close-on-exec on `fd`.
pub fn set_cloexec(fd: impl AsFd, on: bool) -> io::Result<()> {
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// A pidfd for process `pid` (readable once it exits).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Waits until `fd` is readable or `timeout` passes: `Ok(true)` if it became readable,
/// `Ok(false)` on the timeout, an error if it cannot be waited for.
pub fn wait_readable(fd: &OwnedFd, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(n) if n > 0 => return Ok(true),
            Ok(_) => return Ok(false),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// SIGKILL to the process `pidfd` refers to (never to a recycled pid).
pub fn kill_pidfd(pidfd: impl AsFd) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a pidfd we hold, no siginfo, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_fd().as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts each fd at the number given with it (inheritable), whatever this process had there:
/// first every fd moves out of the way (to numbers ≥ 1000), then onto its number. Returns the
/// names and numbers, or the name of the fd that could not be placed.
pub fn place_at_numbers(
    fds: Vec<(String, RawFd, OwnedFd)>,
) -> Result<Vec<(String, RawFd)>, (String, io::Error)> {
    let mut staged = Vec::with_capacity(fds.len());
    for (name, at, fd) in fds {
        match fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(1000)) {
            // SAFETY: F_DUPFD_CLOEXEC returned a new fd owned by nobody else.
            Ok(high) => staged.push((name, at, unsafe { OwnedFd::from_raw_fd(high) })),
            Err(e) => return Err((name, e.into())),
        }
    }
    let mut placed = Vec::with_capacity(staged.len());
    for (name, at, high) in staged {
        // SAFETY: dup2 onto a number this process does not use for anything of its own any
        // more (its own copies were moved above); the copy at `at` is inheritable on purpose
        // and owned by the image executed next.
        if unsafe { libc::dup2(high.as_raw_fd(), at) } < 0 {
            return Err((name, io::Error::last_os_error()));
        }
        placed.push((name, at));
    }
    Ok(placed)
}

/// Work that runs beside the guest and is not in a hurry (a receiver building its machine
/// before the sender pauses the guest): the calling thread, and every thread it starts
/// meanwhile, runs at `SCHED_IDLE` until [`Yielding::end`] (or a drop) gives every thread of
/// the process its policy back. A watchdog thread does that after `limit` if the work is still
/// going (busy CPUs would starve it). Nothing happens when the process could not take its
/// policy back ([`Policy::idle_is_undoable`]) or does not run at a normal policy.
pub struct Yielding {
    prior: Policy,
    /// Dropped at the end, which wakes the watchdog.
    done: Option<std::sync::mpsc::Sender<()>>,
    watchdog: Option<std::thread::JoinHandle<()>>,
}

impl Yielding {
    /// Starts yielding, for at most `limit`.
    pub fn begin(limit: Duration) -> Option<Self> {
        let prior = Policy::of(0).ok()?;
        let normal = prior.is_normal();
        if !normal || !Policy::idle_is_undoable() {
            return None;
        }
        let (done, wait) = std::sync::mpsc::channel::<()>();
        // Started before the calling thread goes idle, so it keeps the prior policy.
        let watchdog = std::thread::Builder::new()
            .name("yield-limit".into())
            .spawn(move || {
                if wait.recv_timeout(limit) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                    log::debug!("still building after {limit:?}: back at molt's priority");
                    every_thread(prior);
                }
            })
            .ok()?;
        let this = Self {
            prior,
            done: Some(done),
            watchdog: Some(watchdog),
        };
        if let Err(e) = Policy::IDLE.apply(0) {
            log::debug!("not yielding: {e}");
        }
        Some(this)
    }

    /// Every thread of the process back at the policy it had (as a drop does).
    pub fn end(self) {}
}

impl Drop for Yielding {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        let stuck = every_thread(self.prior);
        if stuck > 0 {
            log::warn!("{stuck} thread(s) could not take molt's scheduling policy back");
        }
    }
}

/// Gives every thread of this process `policy`; returns how many it could not move.
pub fn every_thread(policy: Policy) -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 1;
    };
    apply_to(
        policy,
        tasks.filter_map(|t| t.ok()?.file_name().to_str()?.parse::<i32>().ok()),
    )
}

/// Gives the threads `tids` `policy`; returns how many it could not move.
fn apply_to(policy: Policy, tids: impl Iterator<Item = i32>) -> usize {
    tids.filter(|&tid| policy.apply(tid).is_err()).count()
}

/// Maps in every page of this process's own binary (code and read-only data) ahead of a
/// handoff's pause, so the paths that run inside the pause for the first time take no page
/// faults there (each costs microseconds on a virtualised host). Best effort: a kernel
/// without `MADV_POPULATE_READ` (5.14) just skips it.
pub fn populate_own_code() {
    const MADV_POPULATE_READ: libc::c_int = 22;
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return;
    };
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    let exe = exe.to_string_lossy();
    for line in maps.lines().filter(|l| l.ends_with(exe.as_ref())) {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        if !perms.starts_with('r') || end <= start {
            continue;
        }
        // SAFETY: the range is a mapping of this process as /proc/self/maps lists it;
        // MADV_POPULATE_READ only faults its pages in, changing no contents.
        let rc =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, MADV_POPULATE_READ) };
        if rc != 0 {
            log::debug!("populating {range}: {}", io::Error::last_os_error());
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_threads_are_put_at_sched_idle_by_their_ids() {
        let (tids, seen) = (std::sync::mpsc::channel(), std::sync::mpsc::channel());
        let go = std::sync::Arc::new(std::sync::Barrier::new(3));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (tids, seen, go) = (tids.0.clone(), seen.0.clone(), go.clone());
                std::thread::spawn(move || {
                    tids.send(nix::unistd::gettid().as_raw()).unwrap();
                    go.wait();
                    seen.send(Policy::of(0).expect("own policy")).unwrap();
                })
            })
            .collect();
        let ids: Vec<i32> = (0..2).map(|_| tids.1.recv().unwrap()).collect();
        assert_eq!(apply_to(Policy::IDLE, ids.into_iter()), 0);
        go.wait();
        for t in threads {
            t.join().expect("the thread");
            assert_eq!(seen.1.recv().unwrap(), Policy::IDLE);
        }
        // A thread that is gone is counted, not fatal.
        assert_eq!(apply_to(Policy::IDLE, std::iter::once(i32::MAX)), 1);
    }
}
