//! Live snapshots: the guest is paused only to capture its state and to write-protect all of
//! RAM with userfaultfd (shmem and hugetlb, including pages never touched); then it runs while
//! the writer streams RAM out. A guest write to a page the writer has not read yet blocks the
//! writing thread (vCPU or device) in a write-protect fault. The fault thread serves it at
//! once, without waiting for the writer: it copies the page as it was at the pause into a
//! buffer, removes the protection of that page and the write proceeds. When the writer reads
//! a chunk it puts the saved pages back over what it read ([`ChunkGate::settle`]) and
//! unprotects the rest of the chunk, so the snapshot is memory exactly as of the pause.
//!
//! Where RAM holds data is looked for after the guest runs again (it takes too long for the
//! pause): a page the guest first wrote after the pause may be found as data, and its saved
//! copy (zeros, as at the pause) is what is written.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use cpr::snapshot::CHUNK_SIZE;
use serde::Serialize;

use super::ram::{ChunkGate, RegionSource};
use super::status::Progress;
use super::uffd::{
    Uffd, FEATURE_PAGEFAULT_FLAG_WP, FEATURE_WP_HUGETLBFS_SHMEM, FEATURE_WP_UNPOPULATED,
};
use crate::config::HUGE_PAGE_SIZE;

/// What a live snapshot reports about the guest's writes.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LiveReport {
    /// From pausing the guest to resuming it, ms.
    pub guest_stopped_ms: f64,
    /// Write faults served.
    pub write_faults: u64,
    /// Bytes copied aside for them.
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
    pages: BTreeMap<u64, Vec<u8>>,
}

/// Write protection of all guest RAM while a live snapshot is written.
pub struct LiveWp {
    uffd: Uffd,
    regions: Vec<Region>,
    saved: Mutex<Vec<Saved>>,
    latencies_ns: Mutex<Vec<u64>>,
    saved_bytes: std::sync::atomic::AtomicU64,
    stop: AtomicBool,
    disarmed: AtomicBool,
    progress: Arc<Progress>,
}

/// The armed protection and its fault thread; dropping it removes the protection.
pub struct Armed {
    wp: Arc<LiveWp>,
    thread: Option<JoinHandle<()>>,
}

/// Write-protects every region of `sources` (the guest must be paused) and starts the fault
/// thread.
pub fn arm(sources: &[RegionSource], progress: Arc<Progress>) -> std::io::Result<Armed> {
    let uffd = Uffd::with_features(
        FEATURE_PAGEFAULT_FLAG_WP | FEATURE_WP_HUGETLBFS_SHMEM | FEATURE_WP_UNPOPULATED,
    )?;
    let mut regions = Vec::new();
    let mut saved = Vec::new();
    for s in sources {
        uffd.register_wp(s.host, s.size)?;
        uffd.write_protect(s.host, s.size, true)?;
        regions.push(Region {
            host: s.host,
            size: s.size,
            page: if s.hugepages { HUGE_PAGE_SIZE } else { 4096 },
            memfd: s.memfd.try_clone()?,
        });
        saved.push(Saved {
            settled: vec![false; s.size.div_ceil(CHUNK_SIZE) as usize],
            pages: BTreeMap::new(),
        });
    }
    let wp = Arc::new(LiveWp {
        uffd,
        regions,
        saved: Mutex::new(saved),
        latencies_ns: Mutex::new(Vec::new()),
        saved_bytes: 0.into(),
        stop: AtomicBool::new(false),
        disarmed: AtomicBool::new(false),
        progress,
    });
    let serving = wp.clone();
    let thread = std::thread::Builder::new()
        .name("snapshot-wp".into())
        .spawn(move || serving.serve_faults());
    let thread = match thread {
        Ok(t) => t,
        Err(e) => {
            wp.disarm();
            return Err(e);
        }
    };
    Ok(Armed {
        wp,
        thread: Some(thread),
    })
}

impl Armed {
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
            write_faults: lat.len() as u64,
            saved_bytes: self.wp.saved_bytes.load(Relaxed),
            fault_p50_us: pct(0.50),
            fault_p99_us: pct(0.99),
            fault_max_us: lat.last().map_or(0.0, |&n| n as f64 / 1e3),
        }
    }

    fn stop(&mut self) {
        self.wp.disarm();
        self.wp.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the live snapshot's fault thread panicked");
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
        // A vCPU waits on every fault served here: ahead of the writer threads for the CPU
        // (a nice value below theirs; refused without CAP_SYS_NICE, which only costs latency).
        // SAFETY: setpriority on this thread's own id; no memory is passed.
        let rc =
            unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -10) };
        if rc != 0 {
            log::debug!(
                "live snapshot: fault thread keeps its priority: {}",
                std::io::Error::last_os_error()
            );
        }
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

    /// Saves the page at `addr` as it was at the pause (unless the writer has it already or
    /// it held no data), then lets the write proceed.
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
        {
            // Pages without data read as zeros: saved too, whether or not the writer will
            // find data there (it looks after the pause).
            let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
            let s = &mut saved[i];
            if !s.settled[(off / CHUNK_SIZE) as usize] && !s.pages.contains_key(&off) {
                let mut page = vec![0u8; len as usize];
                r.memfd.read_exact_at(&mut page, off)?;
                s.pages.insert(off, page);
                self.saved_bytes.fetch_add(len, Relaxed);
            }
        }
        self.uffd.write_protect(r.host + off, len, false)
    }
}

impl ChunkGate for LiveWp {
    fn settle(&self, region: usize, start: u64, chunk: &mut [u8]) -> std::io::Result<()> {
        let end = start + chunk.len() as u64;
        {
            let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
            let s = &mut saved[region];
            let offs: Vec<u64> = s.pages.range(start..end).map(|(&o, _)| o).collect();
            for off in offs {
                if let Some(page) = s.pages.remove(&off) {
                    let at = (off - start) as usize;
                    chunk[at..at + page.len()].copy_from_slice(&page);
                }
            }
            s.settled[(start / CHUNK_SIZE) as usize] = true;
        }
        let r = &self.regions[region];
        self.uffd.write_protect(r.host + start, end - start, false)
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use vm_memory::{Bytes, GuestAddress};

    use super::super::ram::{open_checked, write_region, WriteCtx};
    use super::super::SnapshotMode;
    use super::*;
    use crate::config::MemoryConfig;

    #[test]
    fn the_snapshot_is_memory_as_of_arming_while_another_thread_writes() {
        let cfg = MemoryConfig {
            size: 16 << 20,
            hugepages: false,
            prefault: false,
        };
        let ram = crate::memory::create(&cfg).unwrap();
        // Data in the first 8 MiB; the rest is never touched before arming.
        for i in 0..(8u64 << 20) / 4096 {
            ram.mem.write_obj(i, GuestAddress(i * 4096)).unwrap();
        }
        let mut sources = RegionSource::all(&ram).unwrap();
        let progress = Arc::new(Progress::new(SnapshotMode::Live, "/x".into(), 16 << 20));
        let armed = match arm(&sources, progress.clone()) {
            Ok(a) => a,
            Err(e) => {
                return molt_tests::skip(
                    "live snapshot (userfaultfd write-protect)",
                    &e.to_string(),
                )
            }
        };
        RegionSource::find_data(&mut sources).unwrap();
        // Another thread rewrites every page, data and holes, while the region is written;
        // each write waits until the fault thread has saved the page.
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in (0..(16u64 << 20) / 4096).rev() {
                    ram.mem.write_obj(!i, GuestAddress(i * 4096)).unwrap();
                }
            });
            let dir = std::env::temp_dir().join(format!("molt-live-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir(&dir).unwrap();
            let path = dir.join("ram0.mem");
            let ctx = WriteCtx {
                index: 0,
                progress: &progress,
                gate: Some(armed.gate()),
            };
            let desc = write_region(&sources[0], &path, &ctx).unwrap();
            let file: File = open_checked(&dir, &desc, 16 << 20).unwrap();
            let mut word = [0u8; 8];
            for i in 0..(16u64 << 20) / 4096 {
                file.read_exact_at(&mut word, i * 4096).unwrap();
                let want = if i < 2048 { i } else { 0 };
                assert_eq!(u64::from_ne_bytes(word), want, "page {i}");
            }
            std::fs::remove_dir_all(dir).unwrap();
        });
        let report = armed.finish(0.0);
        assert!(report.write_faults > 0, "{report:?}");
        assert!(report.fault_max_us >= report.fault_p50_us);
        // The writes went through: memory holds the new words.
        assert_eq!(ram.mem.read_obj::<u64>(GuestAddress(4096)).unwrap(), !1);
    }
}
