//! Short busy-waits inside a pause. Waking a sleeping thread costs 15–60 µs on these hosts
//! (a futex wake, and an idle host CPU to bring back), several times over in a pause of a
//! few hundred µs. Where the other side is known to answer within microseconds, the waiter
//! polls first and sleeps only after a bound.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

/// How long a waiter inside a pause polls before it sleeps.
pub const PAUSE_SPIN: Duration = Duration::from_millis(2);

/// Polls `done` until it returns true or `limit` passed; returns whether it did. Between
/// rounds of polls it yields the CPU to any other runnable thread (a pause has more threads
/// at work than this host has CPUs: the poller must not slow the thread it waits for).
pub fn until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        for _ in 0..64 {
            if done() {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::yield_now();
    }
}

/// Receives from `rx`, polling for up to `limit` before blocking; `None` if the sender is
/// gone.
pub fn recv<T>(rx: &Receiver<T>, limit: Duration) -> Option<T> {
    let mut got = None;
    let mut gone = false;
    until(limit, || match rx.try_recv() {
        Ok(v) => {
            got = Some(v);
            true
        }
        Err(TryRecvError::Empty) => false,
        Err(TryRecvError::Disconnected) => {
            gone = true;
            true
        }
    });
    match (got, gone) {
        (Some(v), _) => Some(v),
        (None, true) => None,
        (None, false) => rx.recv().ok(),
    }
}

/// Polls until `counter` moves from `seen` or `limit` passed; returns whether it moved.
pub fn changed(counter: &AtomicU32, seen: u32, limit: Duration) -> bool {
    until(limit, || counter.load(Ordering::Acquire) != seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recv_gets_a_value_sent_after_the_spin_and_sees_a_gone_sender() {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(7).unwrap();
        });
        assert_eq!(recv(&rx, Duration::from_micros(100)), Some(7));
        t.join().unwrap();
        assert_eq!(recv(&rx, Duration::from_micros(100)), None);
    }

    #[test]
    fn changed_sees_a_move_and_gives_up_after_its_bound() {
        let c = AtomicU32::new(3);
        assert!(!changed(&c, 3, Duration::from_micros(200)));
        c.store(4, Ordering::Release);
        assert!(changed(&c, 3, Duration::from_millis(1)));
    }
}
