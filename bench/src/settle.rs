//! Waiting for an update's background work to end before the next one, so each sample
//! measures the pause and not contention left over from the previous update.
//!
//! After an update, molt's old address space and old KVM VM are torn down by a holder
//! process (a child of molt), a guardian child may still be exiting, and with `prefault=on`
//! a `prefault` thread of the new image faults all guest RAM in again. On 2 host cores all
//! of that competes with the next update. The benchmark waits until
//! 1. molt has no child processes (`/proc/PID/task/*/children` empty: holder and guardian
//!    gone and reaped),
//! 2. with RAM touched: molt has no thread named `prefault`, and its resident memory
//!    (`VmRSS` + `HugetlbPages`) grew by less than 1 MiB over the last 100 ms,
//! 3. at least the minimum gap (`--min-gap-ms`, default 300 ms) has passed since the response,
//!
//! polling every 20 ms, for at most [`TIMEOUT`].

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::process::Molt;
use crate::{procfs, signals};

/// The longest wait for background work (prefaulting 8 GiB of 4K pages takes a few seconds).
pub const TIMEOUT: Duration = Duration::from_secs(120);

const POLL: Duration = Duration::from_millis(20);
const RSS_WINDOW: Duration = Duration::from_millis(100);
const RSS_SLACK_KIB: u64 = 1024;

/// Waits as described in the module documentation, starting the clock at `since` (the
/// update's response). Returns how long after `since` the background work (conditions 1
/// and 2) was first seen finished.
pub fn settle(molt: &mut Molt, touched: bool, since: Instant, min_gap: Duration) -> Result<f64> {
    let pid = molt.pid();
    let mut done_at: Option<Duration> = None;
    let mut rss_mark: Option<(Instant, u64)> = None;
    loop {
        signals::check()?;
        molt.check_alive()?;
        let now = Instant::now();
        if done_at.is_none() && background_done(pid, touched, now, &mut rss_mark) {
            done_at = Some(now.duration_since(since));
        }
        if let Some(d) = done_at {
            if now.duration_since(since) >= min_gap {
                return Ok(d.as_secs_f64() * 1e3);
            }
        }
        if now.duration_since(since) > TIMEOUT {
            return Err(Error::Timeout {
                what: format!(
                    "the update's background work (children {:?}, prefault thread {}, resident \
                     {:?} KiB)",
                    procfs::children(pid),
                    procfs::has_thread(pid, "prefault"),
                    procfs::resident_kib(pid)
                ),
                secs: TIMEOUT.as_secs(),
            });
        }
        std::thread::sleep(POLL);
    }
}

fn background_done(
    pid: u32,
    touched: bool,
    now: Instant,
    rss_mark: &mut Option<(Instant, u64)>,
) -> bool {
    if !procfs::children(pid).is_empty() {
        return false;
    }
    if !touched {
        return true;
    }
    if procfs::has_thread(pid, "prefault") {
        *rss_mark = None;
        return false;
    }
    let Some(rss) = procfs::resident_kib(pid) else {
        return false;
    };
    match *rss_mark {
        None => {
            *rss_mark = Some((now, rss));
            false
        }
        Some((t, r)) if now.duration_since(t) >= RSS_WINDOW && rss <= r + RSS_SLACK_KIB => true,
        Some((t, _)) if now.duration_since(t) >= RSS_WINDOW => {
            *rss_mark = Some((now, rss));
            false
        }
        Some(_) => false,
    }
}
