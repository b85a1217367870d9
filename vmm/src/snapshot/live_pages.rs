//! Bookkeeping of a live snapshot's fault thread: the pages written since write protection
//! was armed (one bit per page), and a pool of page buffers, touched in advance, that the
//! pages saved from guest writes are copied into (no allocation, and so no `mmap` or page
//! fault of this process, on the fault path).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::ram_write::AlignedBuf;

/// A set of pages of one region, one bit each.
pub struct PageSet {
    bits: Vec<u64>,
    pages: u64,
    len: usize,
}

impl PageSet {
    /// An empty set of `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            bits: vec![0; pages.div_ceil(64) as usize],
            pages,
            len: 0,
        }
    }

    /// Adds page `i` (false if it was there already).
    pub fn insert(&mut self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        let Some(word) = self.bits.get_mut(w).filter(|_| i < self.pages) else {
            return false;
        };
        if *word & (1 << b) != 0 {
            return false;
        }
        *word |= 1 << b;
        self.len += 1;
        true
    }

    /// Pages in the set.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Empties the set and returns what it held.
    pub fn take(&mut self) -> PageSet {
        let empty = PageSet::new(self.pages);
        std::mem::replace(self, empty)
    }

    /// The runs of consecutive pages: (first page, pages).
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (w, &word) in self.bits.iter().enumerate() {
            let mut rest = word;
            while rest != 0 {
                let b = rest.trailing_zeros() as u64;
                // The run of ones starting at bit b within this word.
                let ones = (!(rest >> b)).trailing_zeros().min(64 - b as u32) as u64;
                let first = w as u64 * 64 + b;
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == first => last.1 += ones,
                    _ => out.push((first, ones)),
                }
                rest = if b + ones >= 64 {
                    0
                } else {
                    rest & !((1u64 << (b + ones)) - 1)
                };
            }
        }
        out
    }
}

/// How long [`Pool::get`] waits for a buffer when none is ready, before it makes one.
const WAIT: Duration = Duration::from_millis(2);

/// Page buffers for the pages the fault thread saves, touched when made. A refill thread
/// ([`Pool::refill`]) makes new ones while the pool runs low, so the fault thread does not
/// pay for fresh memory (~1.4 ms to fault in 2 MiB here) while a vCPU waits.
pub struct Pool {
    page: usize,
    /// Buffers the refill thread keeps ready.
    target: usize,
    /// How long [`get`](Self::get) waits for a buffer ([`WAIT`]).
    wait: Duration,
    free: Mutex<Vec<AlignedBuf>>,
    /// Signalled when the pool runs low (the refill thread waits on it).
    low: Condvar,
    /// Signalled when a buffer comes in (a fault thread waiting for one).
    given: Condvar,
    stop: AtomicBool,
}

impl Pool {
    /// A pool of `target` buffers of `page` bytes, made now.
    pub fn new(page: usize, target: usize) -> Self {
        Self {
            page,
            target,
            wait: WAIT,
            free: Mutex::new((0..target).map(|_| make(page)).collect()),
            low: Condvar::new(),
            given: Condvar::new(),
            stop: AtomicBool::new(false),
        }
    }

    fn free(&self) -> MutexGuard<'_, Vec<AlignedBuf>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer: a ready one, else the first one given back or made within [`WAIT`], else a
    /// new one. While the guest writes faster than the disk takes its pages, the pool runs
    /// dry; the writer then gives a buffer back every ~2 ms and the refill thread makes one
    /// every ~1.4 ms, mostly sooner than the fault thread could make one itself under that load
    /// (5–6.5 ms measured: its page faults compete with everything else on the host).
    pub fn get(&self) -> AlignedBuf {
        let deadline = Instant::now() + self.wait;
        let mut free = self.free();
        loop {
            if free.len() <= self.target / 2 {
                self.low.notify_one();
            }
            if let Some(b) = free.pop() {
                return b;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            free = self
                .given
                .wait_timeout(free, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(free);
        make(self.page)
    }

    /// Gives a buffer back.
    pub fn put(&self, b: AlignedBuf) {
        if b.len() == self.page {
            self.free().push(b);
            self.given.notify_one();
        }
    }

    /// Makes buffers whenever fewer than the target are ready, until [`stop`](Self::stop).
    pub fn refill(&self) {
        let mut free = self.free();
        while !self.stop.load(Relaxed) {
            if free.len() >= self.target {
                free = self
                    .low
                    .wait_timeout(free, Duration::from_millis(50))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            drop(free);
            let b = make(self.page);
            free = self.free();
            free.push(b);
            self.given.notify_one();
        }
    }

    /// Ends [`refill`](Self::refill).
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
        let _guard = self.free();
        self.low.notify_all();
    }
}

/// A buffer of `page` bytes with every page of it faulted in.
fn make(page: usize) -> AlignedBuf {
    let mut b = AlignedBuf::new(page);
    for x in b.iter_mut().step_by(4096) {
        *x = 1;
    }
    std::hint::black_box(&mut b);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_coalesce_across_words() {
        let mut s = PageSet::new(300);
        for i in [0, 1, 2, 63, 64, 65, 70, 127, 128, 299] {
            assert!(s.insert(i));
        }
        assert!(!s.insert(64));
        assert!(!s.insert(300), "outside the set");
        assert_eq!(s.len(), 10);
        assert_eq!(s.runs(), vec![(0, 3), (63, 3), (70, 1), (127, 2), (299, 1)]);
        let taken = s.take();
        assert!(s.is_empty() && s.runs().is_empty());
        assert_eq!(taken.len(), 10);
        let mut full = PageSet::new(128);
        for i in 0..128 {
            full.insert(i);
        }
        assert_eq!(full.runs(), vec![(0, 128)]);
    }

    #[test]
    fn a_buffer_given_back_while_the_pool_is_dry_is_taken_rather_than_a_new_one() {
        let mut p = Pool::new(8192, 1);
        // Longer than the sleep below can be on a loaded host.
        p.wait = Duration::from_secs(60);
        let mut a = p.get();
        a[0] = 42;
        let at = a.as_ptr() as usize;
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_micros(300));
                p.put(a);
            });
            let b = p.get();
            assert_eq!((b.as_ptr() as usize, b[0]), (at, 42), "a new buffer");
        });
    }

    #[test]
    fn buffers_come_back() {
        let p = Pool::new(8192, 2);
        let (a, b, c) = (p.get(), p.get(), p.get());
        assert_eq!((a.len(), b.len(), c.len()), (8192, 8192, 8192));
        p.put(a);
        p.put(AlignedBuf::new(4));
        assert_eq!(p.free().len(), 1);
        // The refill thread tops the pool up to its target, and stops when told.
        std::thread::scope(|s| {
            s.spawn(|| p.refill());
            let t = std::time::Instant::now();
            while p.free().len() < 2 {
                assert!(t.elapsed() < Duration::from_secs(10), "no refill");
                std::thread::sleep(Duration::from_millis(1));
            }
            p.stop();
        });
    }
}
