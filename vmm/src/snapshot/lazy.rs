//! Lazy restore: the fresh RAM mappings are registered with userfaultfd (missing-page mode)
//! and the guest runs at once. One filler thread serves page faults first — it loads the
//! faulting page's whole chunk, checks its checksum and copies it in — and fills the other
//! chunks with data in the background between faults. When the last chunk is in, the ranges
//! are unregistered (pages still missing then are holes of the snapshot: the memfd reads
//! them as zeros) and the restore reports it.
//!
//! A chunk whose checksum fails is never copied in: molt ends at once with an error naming
//! the file and the chunk, and the vCPU that needed it never runs on it.
//!
//! While the filler runs the memfds do not yet hold all of RAM, so a live update or a
//! snapshot waits for it ([`wait_until_filled`]).

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use cpr::snapshot::MemoryFile;

use super::ram::load_chunk;
use super::uffd::Uffd;
use super::{ms, SnapshotError};
use crate::config::HUGE_PAGE_SIZE;
use crate::memory::GuestRam;

/// Whether a filler runs in this process (one VM per process).
static FILLING: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

/// Blocks until no lazy restore is filling RAM in this process.
pub fn wait_until_filled() {
    let (lock, cv) = &FILLING;
    let mut filling = lock.lock().unwrap_or_else(|p| p.into_inner());
    if *filling {
        log::info!("waiting for the lazy restore to load the rest of guest RAM");
    }
    while *filling {
        filling = cv.wait(filling).unwrap_or_else(|p| p.into_inner());
    }
}

fn set_filling(on: bool) {
    let (lock, cv) = &FILLING;
    *lock.lock().unwrap_or_else(|p| p.into_inner()) = on;
    cv.notify_all();
}

/// One region as the filler sees it.
struct Region {
    host: u64,
    page: u64,
    file: File,
    desc: MemoryFile,
    path: PathBuf,
    loaded: Vec<bool>,
}

/// Holds the filler's background loading back until it is dropped: page faults are served
/// at once, but the rest of RAM is loaded only once the restore has resumed the guest, so
/// that loading does not compete with the restore for the host's cores.
#[derive(Debug)]
pub struct HoldBackground(Arc<AtomicBool>);

impl Drop for HoldBackground {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Registers `ram` (fresh, never touched) with userfaultfd and starts the filler; it loads
/// RAM in the background once the returned hold is dropped.
pub fn start(
    ram: &GuestRam,
    files: &[File],
    descs: &[MemoryFile],
    dir: &std::path::Path,
    started: Instant,
) -> Result<HoldBackground, SnapshotError> {
    let uffd = Uffd::new().map_err(SnapshotError::Lazy)?;
    let hosts = ram.host_ranges();
    let mut regions = Vec::new();
    for (((host, len), file), (desc, r)) in
        hosts.iter().zip(files).zip(descs.iter().zip(&ram.regions))
    {
        uffd.register(*host as u64, *len as u64)
            .map_err(SnapshotError::Lazy)?;
        regions.push(Region {
            host: *host as u64,
            page: if r.hugepages { HUGE_PAGE_SIZE } else { 4096 },
            file: file.try_clone().map_err(SnapshotError::Lazy)?,
            desc: desc.clone(),
            path: dir.join(&desc.file),
            loaded: vec![false; desc.chunks.len()],
        });
    }
    set_filling(true);
    let go = Arc::new(AtomicBool::new(false));
    let hold = HoldBackground(go.clone());
    let spawned = std::thread::Builder::new()
        .name("lazy-restore".into())
        .spawn(move || {
            Filler { uffd, regions, go }.run(started);
            set_filling(false);
        });
    if let Err(e) = spawned {
        set_filling(false);
        return Err(SnapshotError::Lazy(e));
    }
    Ok(hold)
}

/// Why the filler stops early.
enum Stop {
    /// Guest RAM was unmapped: the VM ended while RAM was still being loaded.
    Gone,
    /// Bad memory or a failed userfaultfd call: molt must end.
    Fail(String),
}

impl From<String> for Stop {
    fn from(msg: String) -> Self {
        Stop::Fail(msg)
    }
}

/// A failed userfaultfd call on guest RAM; ENOENT means the mapping is gone.
fn uffd_err(what: String) -> impl FnOnce(std::io::Error) -> Stop {
    move |e| {
        if e.raw_os_error() == Some(libc::ENOENT) {
            Stop::Gone
        } else {
            Stop::Fail(format!("lazy restore: {what}: {e}"))
        }
    }
}

struct Filler {
    uffd: Uffd,
    regions: Vec<Region>,
    /// Background loading may start ([`HoldBackground`]).
    go: Arc<AtomicBool>,
}

impl Filler {
    fn run(mut self, started: Instant) {
        let t0 = Instant::now();
        let (mut faults, mut background) = (0u64, 0u64);
        let mut buf = vec![0u8; cpr::snapshot::CHUNK_SIZE as usize];
        let mut next = (0usize, 0usize);
        loop {
            // Faults first: a vCPU (or a device) is waiting.
            loop {
                match self.uffd.next_fault() {
                    Ok(Some(addr)) => {
                        faults += 1;
                        log::debug!("lazy restore: fault at {addr:#x}");
                        if let Err(msg) = self.serve(addr, &mut buf) {
                            return self.fail(msg);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        return self.fail(Stop::Fail(format!("lazy restore: reading faults: {e}")))
                    }
                }
            }
            if !self.go.load(Ordering::Acquire) {
                // Only faults until the restore is done; they wake this thread.
                if let Err(e) = self.uffd.wait(1) {
                    return self.fail(Stop::Fail(format!("lazy restore: waiting for faults: {e}")));
                }
                continue;
            }
            let Some((r, c)) = self.next_unloaded(&mut next) else {
                break;
            };
            background += 1;
            if let Err(msg) = self.load(r, c, &mut buf, "found while loading it in the background")
            {
                return self.fail(msg);
            }
        }
        for r in &self.regions {
            if let Err(e) = self.uffd.unregister(r.host, r.desc.size) {
                log::warn!("lazy restore: cannot unregister guest RAM: {e}");
            }
        }
        super::status::restore_done(started.elapsed());
        log::info!(
            "lazy restore: the last page is in after {:.1} ms ({faults} faults served, \
             {background} chunks loaded in the background)",
            ms(t0.elapsed())
        );
    }

    /// Ends molt with `msg`: a vCPU waiting for a bad chunk sleeps in a page fault that can
    /// neither be served nor interrupted, and closing the userfaultfd would let it run on
    /// zeros, so the process ends at once (exit status 1) and the guest never runs on it.
    fn fail(self, stop: Stop) {
        match stop {
            Stop::Gone => log::debug!("lazy restore: guest RAM is gone (the VM ended)"),
            Stop::Fail(msg) => {
                eprintln!("molt: error: {msg}");
                std::process::exit(1);
            }
        }
    }

    /// The next chunk with data not loaded yet.
    fn next_unloaded(&self, next: &mut (usize, usize)) -> Option<(usize, usize)> {
        while let Some(r) = self.regions.get(next.0) {
            while next.1 < r.desc.chunks.len() {
                let c = next.1;
                if r.desc.chunks[c].is_some() && !r.loaded[c] {
                    return Some((next.0, c));
                }
                next.1 += 1;
            }
            *next = (next.0 + 1, 0);
        }
        None
    }

    /// Serves a fault at host address `addr`.
    fn serve(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), Stop> {
        let Some(r) = self
            .regions
            .iter()
            .position(|r| addr >= r.host && addr < r.host + r.desc.size)
        else {
            return Err(Stop::Fail(format!(
                "lazy restore: a fault at {addr:#x} outside guest RAM"
            )));
        };
        let region = &self.regions[r];
        let c = ((addr - region.host) / region.desc.chunk_size) as usize;
        if region.loaded[c] {
            let (start, end) = region.desc.chunk_range(c);
            return self
                .uffd
                .wake(region.host + start, end - start)
                .map_err(uffd_err(format!("waking {addr:#x}")));
        }
        if region.desc.chunks[c].is_some() {
            return self.load(r, c, buf, "found when the guest first needed a page of it");
        }
        // A hole of the snapshot: zeros, one page at a time.
        let page = (addr - region.host) / region.page * region.page;
        let result = if region.page == 4096 {
            self.uffd.zero(region.host + page, region.page)
        } else {
            buf.fill(0);
            // Already there (a fault read before the page was served) is fine.
            self.uffd
                .copy(
                    region.host + page,
                    &buf[..region.page as usize],
                    region.page,
                )
                .map(drop)
        };
        result.map_err(uffd_err(format!("zero page at {addr:#x}")))
    }

    /// Loads chunk `c` of region `r`, checks it and copies it in.
    fn load(&mut self, r: usize, c: usize, buf: &mut [u8], when: &'static str) -> Result<(), Stop> {
        let region = &mut self.regions[r];
        let (start, end) = region.desc.chunk_range(c);
        let chunk = &mut buf[..(end - start) as usize];
        let sum = region.desc.chunks[c].unwrap_or_default();
        load_chunk(&region.file, chunk, start, sum, &region.path, when)
            .map_err(|e| e.to_string())?;
        let present = self
            .uffd
            .copy(region.host + start, chunk, region.page)
            .map_err(uffd_err(format!(
                "copying {} at {start:#x}",
                region.path.display()
            )))?;
        if present > 0 {
            // Only the loader puts pages into lazily restored RAM: one that is already there
            // was written around it. The rest of the chunk is still copied.
            log::warn!(
                "lazy restore: {present} page(s) of {} at {start:#x} were already in guest RAM \
                 and were kept",
                region.path.display()
            );
        }
        region.loaded[c] = true;
        super::status::restore_loaded(end - start);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::config::MemoryConfig;

    #[test]
    fn faulting_pages_come_from_the_memory_file_and_the_rest_follows() {
        let cfg = MemoryConfig {
            size: 32 << 20,
            hugepages: false,
            prefault: false,
        };
        let ram = crate::memory::create(&cfg).unwrap();
        // Every other chunk holds data; the rest are holes.
        for i in 0..8u64 {
            ram.mem
                .write_obj(0x5a5a_0000 + i, GuestAddress(i * (4 << 20) + 0x123 * 8))
                .unwrap();
        }
        let dir = std::env::temp_dir().join(format!("molt-lazy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let desc = super::super::ram::tests::write_all_of(&ram, &dir.join("ram0.mem"));
        let file = super::super::ram::open_checked(&dir, &desc, 32 << 20).unwrap();

        let fresh = crate::memory::create(&cfg).unwrap();
        if let Err(e) = start(&fresh, &[file], &[desc], &dir, Instant::now()) {
            let why = crate::error_chain(&e);
            return molt_tests::skip("lazy restore (userfaultfd)", &why);
        }
        // Reads from this thread fault; the filler serves them (or got there first).
        for i in (0..8u64).rev() {
            let v: u64 = fresh
                .mem
                .read_obj(GuestAddress(i * (4 << 20) + 0x123 * 8))
                .unwrap();
            assert_eq!(v, 0x5a5a_0000 + i);
        }
        // A page of a hole reads as zeros.
        let z: u64 = fresh.mem.read_obj(GuestAddress(31 << 20)).unwrap();
        assert_eq!(z, 0);
        let z: u64 = fresh.mem.read_obj(GuestAddress((2 << 20) + 8)).unwrap();
        assert_eq!(z, 0);
        wait_until_filled();
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A value that tells page `addr` apart from every other.
    fn tag(addr: u64) -> u64 {
        addr ^ 0x6d6f_6c74_0000_0000
    }

    /// Writes every region of `ram` into `dir` as a paused snapshot does; its files, opened.
    fn snapshot_of(ram: &GuestRam, dir: &std::path::Path) -> (Vec<File>, Vec<MemoryFile>) {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir(dir).unwrap();
        let mut sources = super::super::ram::RegionSource::all(ram).unwrap();
        super::super::ram::RegionSource::find_data(&mut sources).unwrap();
        let paths: Vec<_> = (0..sources.len())
            .map(|i| dir.join(format!("ram{i}.mem")))
            .collect();
        let progress = super::super::status::Progress::new(
            super::super::SnapshotMode::Paused,
            dir.to_path_buf(),
            ram.total(),
        );
        let ctx = super::super::ram_write::WriteCtx {
            progress: &progress,
            gate: None,
        };
        let mut descs = Vec::new();
        for (desc, file) in super::super::ram_write::write_regions(&sources, &paths, &ctx).unwrap()
        {
            file.sync_all().unwrap();
            descs.push(desc);
        }
        let files = descs
            .iter()
            .map(|d| super::super::ram::open_checked(dir, d, d.size).unwrap())
            .collect();
        (files, descs)
    }

    #[test]
    fn concurrent_faults_and_the_background_fill_restore_every_page_of_both_regions() {
        // RAM over the 32-bit hole: two regions, sparse but for 8 MiB below the hole and
        // the 8 MiB above it; every page of those holds its own tag in its first and last
        // words.
        let hole = arch::layout::MMIO_HOLE_START;
        let high = arch::layout::HIGH_RAM_START;
        let cfg = MemoryConfig {
            size: hole + (8 << 20),
            hugepages: false,
            prefault: false,
        };
        let ram = crate::memory::create(&cfg).unwrap();
        assert_eq!(ram.regions.len(), 2);
        let pages: Vec<u64> = (hole - (8 << 20)..hole)
            .chain(high..high + (8 << 20))
            .step_by(4096)
            .collect();
        for &p in &pages {
            ram.mem.write_obj(tag(p), GuestAddress(p)).unwrap();
            ram.mem.write_obj(!tag(p), GuestAddress(p + 4088)).unwrap();
        }
        let dir = std::env::temp_dir().join(format!("molt-lazy-mt-{}", std::process::id()));
        let (files, descs) = snapshot_of(&ram, &dir);
        drop(ram);

        let fresh = crate::memory::create(&cfg).unwrap();
        if let Err(e) = start(&fresh, &files, &descs, &dir, Instant::now()) {
            let why = crate::error_chain(&e);
            return molt_tests::skip("lazy restore (userfaultfd)", &why);
        }
        // Four threads fault on the pages in different orders while the filler also loads
        // them in the background; each reads holes too.
        let fresh = std::sync::Arc::new(fresh);
        let pages = std::sync::Arc::new(pages);
        let readers: Vec<_> = (0..4usize)
            .map(|t| {
                let (mem, pages) = (fresh.clone(), pages.clone());
                std::thread::spawn(move || {
                    let n = pages.len();
                    for k in 0..n {
                        let i = match t {
                            0 => k,
                            1 => n - 1 - k,
                            2 => (k * 7919) % n,
                            _ => (k + n / 2) % n,
                        };
                        let p = pages[i];
                        let first: u64 = mem.mem.read_obj(GuestAddress(p)).unwrap();
                        let last: u64 = mem.mem.read_obj(GuestAddress(p + 4088)).unwrap();
                        assert_eq!((first, last), (tag(p), !tag(p)), "page {p:#x}");
                        if k % 512 == 0 {
                            let h = (k as u64 * 4096 * 97) % (hole - (8 << 20));
                            let z: u64 = mem.mem.read_obj(GuestAddress(h)).unwrap();
                            assert_eq!(z, 0, "hole page {h:#x}");
                        }
                    }
                })
            })
            .collect();
        for r in readers {
            r.join().unwrap();
        }
        wait_until_filled();
        // After the filler is done (RAM unregistered), every page still holds its data.
        for &p in pages.iter() {
            let v: u64 = fresh.mem.read_obj(GuestAddress(p)).unwrap();
            assert_eq!(v, tag(p), "page {p:#x}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_page_already_in_ram_does_not_keep_the_rest_of_its_chunk_out() {
        use std::os::unix::fs::FileExt;
        let cfg = MemoryConfig {
            size: 8 << 20,
            hugepages: false,
            prefault: false,
        };
        let ram = crate::memory::create(&cfg).unwrap();
        // Chunk 1 (2..4 MiB) holds data on every page.
        for p in ((2 << 20)..(4 << 20)).step_by(4096) {
            ram.mem.write_obj(tag(p), GuestAddress(p)).unwrap();
        }
        let dir = std::env::temp_dir().join(format!("molt-lazy-pre-{}", std::process::id()));
        let (files, descs) = snapshot_of(&ram, &dir);
        drop(ram);

        // A page in the middle of that chunk is put into the fresh memfd around the loader.
        let fresh = crate::memory::create(&cfg).unwrap();
        let mid = 3 << 20;
        fresh.regions[0]
            .memfd
            .write_all_at(&0x77u64.to_ne_bytes(), mid)
            .unwrap();
        if let Err(e) = start(&fresh, &files, &descs, &dir, Instant::now()) {
            let why = crate::error_chain(&e);
            return molt_tests::skip("lazy restore (userfaultfd)", &why);
        }
        // The pages after it come from the snapshot, not as zeros; the page itself is kept.
        for p in [mid + 4096, (4 << 20) - 4096, 2 << 20] {
            let v: u64 = fresh.mem.read_obj(GuestAddress(p)).unwrap();
            assert_eq!(v, tag(p), "page {p:#x}");
        }
        let v: u64 = fresh.mem.read_obj(GuestAddress(mid)).unwrap();
        assert_eq!(v, 0x77);
        wait_until_filled();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
