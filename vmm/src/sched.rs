//! Scheduling policies of molt's threads: read, set, and whether `SCHED_IDLE` can be undone.
//! The update path runs its helpers on idle CPU time ([`crate::update`]); a live snapshot's
//! fault thread runs ahead of everything ([`crate::snapshot`]).

use std::io;

/// A scheduling policy with its static priority, as `sched_getscheduler` and
/// `sched_getparam` report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    policy: libc::c_int,
    priority: libc::c_int,
}

impl Policy {
    /// `SCHED_FIFO` at the lowest real-time priority: the thread runs ahead of every thread
    /// at a normal policy whenever it is runnable (for threads that sleep between short,
    /// bounded pieces of work).
    pub const FIFO_LOWEST: Self = Self {
        policy: libc::SCHED_FIFO,
        priority: 1,
    };

    /// `SCHED_IDLE`: the thread runs only on CPU time no other thread wants, and any other
    /// thread that wakes takes its CPU at once.
    pub const IDLE: Self = Self {
        policy: libc::SCHED_IDLE,
        priority: 0,
    };

    /// Whether this process may go back from `SCHED_IDLE` to a normal policy at nice 0:
    /// with `CAP_SYS_NICE`, or an `RLIMIT_NICE` that allows nice 0 (20 or more).
    pub fn idle_is_undoable() -> bool {
        use nix::sys::resource::{getrlimit, Resource};
        const CAP_SYS_NICE: u32 = 23;
        if getrlimit(Resource::RLIMIT_NICE).is_ok_and(|(soft, _)| soft >= 20) {
            return true;
        }
        std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
                .is_some_and(|caps| caps & (1 << CAP_SYS_NICE) != 0)
        })
    }

    /// Whether this is a normal (time-sharing) policy: `SCHED_OTHER` or `SCHED_BATCH`.
    pub fn is_normal(self) -> bool {
        matches!(self.policy, libc::SCHED_OTHER | libc::SCHED_BATCH)
    }

    /// The policy of thread `tid` (0: the calling thread).
    pub fn of(tid: i32) -> io::Result<Self> {
        // SAFETY: sched_getscheduler takes a thread id and returns the policy or -1.
        let policy = unsafe { libc::sched_getscheduler(tid) };
        if policy < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_getparam writes one sched_param we own.
        if unsafe { libc::sched_getparam(tid, &mut param) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            policy,
            priority: param.sched_priority,
        })
    }

    /// Gives thread `tid` (0: the calling thread) this policy.
    pub fn apply(self, tid: i32) -> io::Result<()> {
        let param = libc::sched_param {
            sched_priority: self.priority,
        };
        // SAFETY: sched_setscheduler reads one sched_param we own.
        if unsafe { libc::sched_setscheduler(tid, self.policy, &param) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_goes_to_sched_idle_and_back_when_that_is_undoable() {
        std::thread::spawn(|| {
            let before = Policy::of(0).expect("own policy");
            Policy::IDLE.apply(0).expect("to SCHED_IDLE");
            assert_eq!(Policy::of(0).expect("own policy"), Policy::IDLE);
            let back = before.apply(0);
            assert_eq!(back.is_ok(), Policy::idle_is_undoable(), "{back:?}");
            if back.is_ok() {
                assert_eq!(Policy::of(0).expect("own policy"), before);
            }
        })
        .join()
        .expect("the thread");
    }

    #[test]
    fn a_thread_goes_to_fifo_when_it_may_and_is_normal_otherwise() {
        std::thread::spawn(|| {
            let before = Policy::of(0).expect("own policy");
            assert!(before.is_normal(), "{before:?}");
            match Policy::FIFO_LOWEST.apply(0) {
                Ok(()) => {
                    let now = Policy::of(0).expect("own policy");
                    assert_eq!(now, Policy::FIFO_LOWEST);
                    assert!(!now.is_normal());
                }
                Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
            }
        })
        .join()
        .expect("the thread");
    }
}
