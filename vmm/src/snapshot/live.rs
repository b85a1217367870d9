//! Live snapshots: the guest is paused only to capture its state; RAM is written while it
//! runs, and a guest write to a page the writer has not read yet blocks the writing thread
//! (vCPU or device) in a userfaultfd write-protect fault until the page is copied aside.
//!
//! Write-protecting all of RAM costs ~160 ms per GiB of 4 KiB pages here, far too long for
//! the pause, so it is armed in two phases:
//!
//! - **Tracking** (before the pause, the guest running): [`arm`] write-protects every region
//!   (shmem and hugetlb, pages never touched included). A write fault now only means "written
//!   since arming": the fault thread records the page in a dirty set and removes its
//!   protection at once, copying nothing. A few rounds then protect the recorded pages again
//!   while the guest runs, until few remain.
//! - **Saving** (from the pause on): [`Armed::freeze`], in the pause, switches the fault
//!   thread to saving under its lock (a fault being served finishes first) and protects the
//!   pages of the dirty set again: every page of RAM is protected at the pause. From then on
//!   a fault copies the page as it was at the pause into a buffer, removes its protection and
//!   the write proceeds, without waiting for the writer. When the writer reads a chunk it
//!   puts the saved pages back over what it read ([`ChunkGate::settle`]) and unprotects the
//!   rest of the chunk, so the snapshot is memory exactly as of the pause.
//!
//! Every page whose protection the fault thread removes while tracking is in the dirty set
//! (it is recorded and unprotected under one lock), so after the switch the protected pages
//! and the dirty set cover all of RAM; re-protecting the set in the pause closes it.
//!
//! Where RAM holds data is looked for after the guest runs again (it takes too long for the
//! pause): a page the guest first wrote after the pause may be found as data, and its saved
//! copy (zeros, as at the pause) is what is written.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use cpr::snapshot::CHUNK_SIZE;
use serde::Serialize;

use super::live_pages::{PageSet, Pool};
use super::ram::RegionSource;
use super::ram_write::{AlignedBuf, ChunkGate};
use super::status::Progress;
use super::uffd::{
    Uffd, FEATURE_PAGEFAULT_FLAG_WP, FEATURE_WP_HUGETLBFS_SHMEM, FEATURE_WP_UNPOPULATED,
};
use crate::config::HUGE_PAGE_SIZE;
use crate::memory::GuestRam;

/// Rounds of re-protecting the pages written while tracking, before the pause.
const ROUNDS: usize = 8;
/// Few enough written pages to protect again inside the pause.
const FEW_PAGES: usize = 256;
/// Bytes write-protected per call while arming (4 KiB pages, 2 MiB pages): short enough
/// that the guest is held back only briefly at a time.
const PIECE_SMALL: u64 = 4 << 20;
const PIECE_HUGE: u64 = 64 << 20;
/// Page buffers made in advance: 2 MiB pages, 4 KiB pages.
const POOL_HUGE: usize = 32;
const POOL_SMALL: usize = 512;

/// What a live snapshot reports about the guest's writes.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LiveReport {
    /// From pausing the guest to resuming it, ms.
    pub guest_stopped_ms: f64,
    /// Write-protecting all of RAM before the pause, the guest running, ms.
    pub arm_ms: f64,
    /// Bytes written by the guest while protection was armed (tracked, not copied) and
    /// protected again in the pause.
    pub pause_protected_bytes: u64,
    /// Protecting them again in the pause, ms.
    pub pause_protect_ms: f64,
    /// Write faults served (both phases).
    pub write_faults: u64,
    /// Of them, before the pause (recorded, nothing copied).
    pub tracked_faults: u64,
    /// Bytes copied aside for the faults after the pause.
    pub saved_bytes: u64,
    /// Fault latency (from the fault thread reading the fault to the page's protection
    /// removed), µs: median.
    pub fault_p50_us: f64,
    /// 99th percentile.
    pub fault_p99_us: f64,
    /// Worst.
    pub fault_max_us: f64,
}

/// One region as the fault thread sees it.
struct Region {
    host: u64,
    size: u64,
    page: u64,
    memfd: File,
}

/// Per region: chunks the writer has read, and pages saved from the guest's writes.
#[derive(Default)]
struct Saved {
    settled: Vec<bool>,
    pages: BTreeMap<u64, AlignedBuf>,
}

/// What the fault thread and the writer share, under one lock.
struct Inner {
    /// Saving (from the pause on) rather than tracking.
    saving: bool,
    /// Per region: pages written while tracking, unprotected.
    dirty: Vec<PageSet>,
    saved: Vec<Saved>,
}

/// Write protection of all guest RAM while a live snapshot is written.
pub struct LiveWp {
    uffd: Uffd,
    regions: Vec<Region>,
    /// Keeps guest RAM mapped at the regions' host addresses while the fault thread reads.
    #[allow(dead_code)]
    mem: arch::GuestMemory,
    inner: Mutex<Inner>,
    pool: Pool,
    latencies_ns: Mutex<Vec<u64>>,
    saved_bytes: AtomicU64,
    tracked_faults: AtomicU64,
    stop: AtomicBool,
    disarmed: AtomicBool,
    progress: Arc<Progress>,
}

/// The armed protection and its fault thread; dropping it removes the protection.
pub struct Armed {
    wp: Arc<LiveWp>,
    /// The fault thread and the pool's refill thread.
    threads: Vec<JoinHandle<()>>,
    arm_ms: f64,
    pause_protected_bytes: u64,
    pause_protect_ms: f64,
}

/// Write-protects every region of `ram` while the guest runs and starts the fault thread
/// in tracking mode; then protects again, in rounds, the pages written meanwhile until few
/// are left for [`Armed::freeze`] in the pause. On error nothing stays protected.
pub fn arm(ram: &GuestRam, progress: Arc<Progress>) -> std::io::Result<Armed> {
    let t0 = Instant::now();
    let sources = RegionSource::all(ram)?;
    let uffd = Uffd::with_features(
        FEATURE_PAGEFAULT_FLAG_WP | FEATURE_WP_HUGETLBFS_SHMEM | FEATURE_WP_UNPOPULATED,
    )?;
    let mut regions = Vec::new();
    let mut saved = Vec::new();
    let mut dirty = Vec::new();
    for s in &sources {
        let page = if s.hugepages { HUGE_PAGE_SIZE } else { 4096 };
        regions.push(Region {
            host: s.host,
            size: s.size,
            page,
            memfd: s.memfd.try_clone()?,
        });
        saved.push(Saved {
            settled: vec![false; s.size.div_ceil(CHUNK_SIZE) as usize],
            pages: BTreeMap::new(),
        });
        dirty.push(PageSet::new(s.size.div_ceil(page)));
    }
    let pool = match regions.first() {
        Some(r) if r.page == HUGE_PAGE_SIZE => Pool::new(r.page as usize, POOL_HUGE),
        _ => Pool::new(4096, POOL_SMALL),
    };
    let wp = Arc::new(LiveWp {
        uffd,
        regions,
        mem: ram.mem.clone(),
        inner: Mutex::new(Inner {
            saving: false,
            dirty,
            saved,
        }),
        pool,
        latencies_ns: Mutex::new(Vec::with_capacity(1 << 16)),
        saved_bytes: 0.into(),
        tracked_faults: 0.into(),
        stop: AtomicBool::new(false),
        disarmed: AtomicBool::new(false),
        progress,
    });
    // Registered before anything is protected: an error here leaves nothing to undo but the
    // registration, which closing the userfaultfd removes.
    for r in &wp.regions {
        wp.uffd.register_wp(r.host, r.size)?;
    }
    let mut armed = Armed {
        wp,
        threads: Vec::new(),
        arm_ms: 0.0,
        pause_protected_bytes: 0,
        pause_protect_ms: 0.0,
    };
    // From here on, dropping `armed` on an error disarms and stops the threads started.
    let serving = armed.wp.clone();
    armed.threads.push(
        std::thread::Builder::new()
            .name("snapshot-wp".into())
            .spawn(move || serving.serve_faults())?,
    );
    let filling = armed.wp.clone();
    armed.threads.push(
        std::thread::Builder::new()
            .name("snapshot-pool".into())
            .spawn(move || filling.pool.refill())?,
    );
    // The fault thread serves writes from here on.
    // Piece by piece: while a range is being protected, KVM holds back every vCPU access to
    // any of it (an MMU-notifier invalidation covers the whole range), so one call over all of
    // RAM would stall the guest as long as a pause would.
    for r in &armed.wp.regions {
        let piece = if r.page == HUGE_PAGE_SIZE {
            PIECE_HUGE
        } else {
            PIECE_SMALL
        };
        let mut off = 0;
        while off < r.size {
            let len = piece.min(r.size - off);
            armed.wp.uffd.write_protect(r.host + off, len, true)?;
            off += len;
        }
    }
    let mut rounds = 0;
    while rounds < ROUNDS {
        let sets = {
            let mut inner = armed.wp.lock();
            if inner.dirty.iter().map(PageSet::len).sum::<usize>() <= FEW_PAGES {
                break;
            }
            inner
                .dirty
                .iter_mut()
                .map(PageSet::take)
                .collect::<Vec<_>>()
        };
        armed.wp.protect(&sets)?;
        rounds += 1;
    }
    armed.arm_ms = super::ms(t0.elapsed());
    log::info!(
        "live snapshot: guest RAM write-protected in {:.1} ms ({rounds} rounds for pages \
         written meanwhile)",
        armed.arm_ms
    );
    Ok(armed)
}

impl Armed {
    /// In the pause: from now on faults save the page as it is, and every page written since
    /// arming is protected again, so all of RAM is.
    pub fn freeze(&mut self) -> std::io::Result<()> {
        let t = Instant::now();
        let mut inner = self.wp.lock();
        inner.saving = true;
        let sets: Vec<PageSet> = inner.dirty.iter_mut().map(PageSet::take).collect();
        // Under the lock: a fault read before the switch is served after it, as a save.
        self.pause_protected_bytes = self.wp.protect(&sets)?;
        drop(inner);
        self.pause_protect_ms = super::ms(t.elapsed());
        Ok(())
    }

    /// The writer's hook.
    pub fn gate(&self) -> &dyn ChunkGate {
        self.wp.as_ref()
    }

    /// Removes the protection, stops the fault thread and reports.
    pub fn finish(mut self, guest_stopped_ms: f64) -> LiveReport {
        self.stop();
        let mut lat = std::mem::take(
            &mut *self
                .wp
                .latencies_ns
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        lat.sort_unstable();
        let pct = |p: f64| -> f64 {
            if lat.is_empty() {
                return 0.0;
            }
            let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
            lat[i] as f64 / 1e3
        };
        LiveReport {
            guest_stopped_ms,
            arm_ms: self.arm_ms,
            pause_protected_bytes: self.pause_protected_bytes,
            pause_protect_ms: self.pause_protect_ms,
            write_faults: lat.len() as u64,
            tracked_faults: self.wp.tracked_faults.load(Relaxed),
            saved_bytes: self.wp.saved_bytes.load(Relaxed),
            fault_p50_us: pct(0.50),
            fault_p99_us: pct(0.99),
            fault_max_us: lat.last().map_or(0.0, |&n| n as f64 / 1e3),
        }
    }

    fn stop(&mut self) {
        self.wp.disarm();
        self.wp.stop.store(true, Relaxed);
        self.wp.pool.stop();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("a thread of the live snapshot panicked");
            }
        }
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        self.stop();
    }
}

impl LiveWp {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Write-protects the pages of `sets` (one per region), run by run. Returns the bytes.
    fn protect(&self, sets: &[PageSet]) -> std::io::Result<u64> {
        let mut bytes = 0;
        for (r, set) in self.regions.iter().zip(sets) {
            if set.is_empty() {
                continue;
            }
            for (first, n) in set.runs() {
                let off = first * r.page;
                let len = (n * r.page).min(r.size - off);
                self.uffd.write_protect(r.host + off, len, true)?;
                bytes += len;
            }
        }
        Ok(bytes)
    }

    /// Unregisters all of RAM: no more protection, and every thread waiting is woken.
    fn disarm(&self) {
        if self.disarmed.swap(true, Relaxed) {
            return;
        }
        for r in &self.regions {
            if let Err(e) = self.uffd.unregister(r.host, r.size) {
                log::warn!("live snapshot: cannot unregister guest RAM: {e}");
            }
        }
    }

    fn serve_faults(&self) {
        raise_priority();
        while !self.stop.load(Relaxed) {
            match self.uffd.wait(50) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => {
                    log::error!("live snapshot: waiting for faults: {e}");
                    break;
                }
            }
            loop {
                match self.uffd.next_fault() {
                    Ok(Some(addr)) => {
                        let t = Instant::now();
                        if let Err(e) = self.serve(addr) {
                            if !self.disarmed.load(Relaxed) {
                                log::error!("live snapshot: fault at {addr:#x}: {e}");
                            }
                        }
                        let ns = t.elapsed().as_nanos() as u64;
                        self.progress.fault(ns);
                        self.latencies_ns
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(ns);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        log::error!("live snapshot: reading faults: {e}");
                        return;
                    }
                }
            }
        }
    }

    /// Tracking: records the page at `addr` as written and lets the write proceed. Saving:
    /// saves the page as it was at the pause (unless the writer has it already or it holds
    /// no data), then lets the write proceed.
    fn serve(&self, addr: u64) -> std::io::Result<()> {
        let Some((i, r)) = self
            .regions
            .iter()
            .enumerate()
            .find(|(_, r)| addr >= r.host && addr < r.host + r.size)
        else {
            return Err(std::io::Error::other("outside guest RAM"));
        };
        let off = (addr - r.host) / r.page * r.page;
        let len = r.page.min(r.size - off);
        let mut laps = FaultLaps::start();
        let mut guard = self.lock();
        laps.mark(Lap::Lock);
        let inner = &mut *guard;
        if !inner.saving {
            // Recorded and unprotected under the lock: the switch to saving sees both.
            inner.dirty[i].insert(off / r.page);
            self.tracked_faults.fetch_add(1, Relaxed);
            let done = self.uffd.write_protect(r.host + off, len, false);
            laps.mark(Lap::Unprotect);
            laps.log_if_slow("tracked");
            return done;
        }
        // Pages without data read as zeros: saved too, whether or not the writer will find
        // data there (it looks after the pause).
        let s = &mut inner.saved[i];
        if !s.settled[(off / CHUNK_SIZE) as usize] && !s.pages.contains_key(&off) {
            let mut page = self.pool.get();
            if page.len() as u64 != len {
                page = AlignedBuf::new(len as usize);
            }
            laps.mark(Lap::Buffer);
            if r.page == HUGE_PAGE_SIZE && mapped(r.host + off) {
                // Through the mapping: a quarter of the time of `pread` from hugetlbfs here
                // (~0.25 ms for 2 MiB, against ~1 ms). Only a page mapped here: reading a
                // hole through the mapping would allocate a huge page.
                // SAFETY: `[host + off, host + off + len)` lies in a mapping of guest RAM
                // that `self.mem` keeps mapped, and is present; the page is write-protected,
                // so nothing writes it while it is copied; `page` is `len` bytes, distinct.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (r.host + off) as *const u8,
                        page.as_mut_ptr(),
                        len as usize,
                    );
                }
            } else {
                // A hole reads as zeros without being allocated.
                r.memfd.read_exact_at(&mut page, off)?;
            }
            laps.mark(Lap::Copy);
            s.pages.insert(off, page);
            self.saved_bytes.fetch_add(len, Relaxed);
        }
        drop(guard);
        let done = self.uffd.write_protect(r.host + off, len, false);
        laps.mark(Lap::Unprotect);
        laps.log_if_slow("saved");
        done
    }
}

/// The steps of serving one fault.
#[derive(Clone, Copy)]
enum Lap {
    Lock,
    Buffer,
    Copy,
    Unprotect,
}

/// Where the time of one fault went, logged (debug) when it took over [`SLOW_FAULT`].
struct FaultLaps {
    start: Instant,
    last: Instant,
    us: [u128; 4],
}

/// A fault served slower than this is logged with its steps.
const SLOW_FAULT: std::time::Duration = std::time::Duration::from_millis(1);

impl FaultLaps {
    fn start() -> Self {
        let now = Instant::now();
        Self {
            start: now,
            last: now,
            us: [0; 4],
        }
    }

    fn mark(&mut self, lap: Lap) {
        let now = Instant::now();
        self.us[lap as usize] = (now - self.last).as_micros();
        self.last = now;
    }

    fn log_if_slow(&self, kind: &str) {
        let total = self.start.elapsed();
        if total >= SLOW_FAULT {
            let [lock, buffer, copy, unprotect] = self.us;
            log::debug!(
                "live snapshot: {kind} fault took {} µs: lock {lock}, buffer {buffer}, copy \
                 {copy}, unprotect {unprotect}",
                total.as_micros()
            );
        }
    }
}

/// Whether the page at `addr` (page-aligned, in a live mapping) is mapped in this process.
fn mapped(addr: u64) -> bool {
    let mut v = 0u8;
    // SAFETY: mincore reads the page tables of one page of a live mapping and writes one
    // byte into `v`.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, 4096, &mut v) };
    rc == 0 && v & 1 != 0
}

/// A vCPU waits on every fault the calling thread serves: it runs ahead of everything else
/// that is runnable (`SCHED_FIFO`; it sleeps between faults and each fault is bounded work),
/// or at least ahead of the writer threads (a nice value below theirs). Refused without
/// CAP_SYS_NICE, which only costs latency.
fn raise_priority() {
    let Err(fifo) = crate::sched::Policy::FIFO_LOWEST.apply(0) else {
        return;
    };
    // SAFETY: setpriority on this thread's own id; no memory is passed.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -10) };
    if rc != 0 {
        log::debug!(
            "live snapshot: fault thread keeps its priority: {fifo}; {}",
            std::io::Error::last_os_error()
        );
    }
}

impl ChunkGate for LiveWp {
    fn planned(&self, region: usize, data: &[bool]) {
        let holes = {
            let mut inner = self.lock();
            let Some(s) = inner.saved.get_mut(region) else {
                return;
            };
            for (settled, _) in s.settled.iter_mut().zip(data).filter(|(_, d)| !**d) {
                *settled = true;
            }
            let held = std::mem::take(&mut s.pages);
            let (holes, kept) = held.into_iter().partition(|(off, _)| {
                !data
                    .get((off / CHUNK_SIZE) as usize)
                    .copied()
                    .unwrap_or(false)
            });
            s.pages = kept;
            holes
        };
        // Saved from chunks that held no data at the pause: nothing of them is written.
        for (_, page) in holes {
            self.pool.put(page);
        }
    }

    fn take_whole(&self) -> Option<(usize, u64, AlignedBuf)> {
        let mut inner = self.lock();
        for (i, s) in inner.saved.iter_mut().enumerate() {
            if self.regions[i].page != CHUNK_SIZE {
                continue;
            }
            if let Some((off, page)) = s.pages.pop_first() {
                s.settled[(off / CHUNK_SIZE) as usize] = true;
                return Some((i, off, page));
            }
        }
        None
    }

    fn recycle(&self, page: AlignedBuf) {
        self.pool.put(page);
    }

    fn settle(&self, region: usize, start: u64, chunk: &mut [u8]) -> std::io::Result<()> {
        let end = start + chunk.len() as u64;
        let pages = {
            let mut inner = self.lock();
            let s = &mut inner.saved[region];
            let rest = s.pages.split_off(&end);
            let pages = s.pages.split_off(&start);
            s.pages.extend(rest);
            s.settled[(start / CHUNK_SIZE) as usize] = true;
            pages
        };
        // Copied outside the lock: the fault thread does not wait for it.
        for (off, page) in &pages {
            let at = (off - start) as usize;
            chunk[at..at + page.len()].copy_from_slice(page);
        }
        for (_, page) in pages {
            self.pool.put(page);
        }
        let r = &self.regions[region];
        self.uffd.write_protect(r.host + start, end - start, false)
    }
}

#[cfg(test)]
#[path = "live_tests.rs"]
mod tests;
