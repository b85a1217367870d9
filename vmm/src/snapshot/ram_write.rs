//! Writing guest RAM into sparse memory files: only the data extents of each region (see
//! [`RegionSource::find_data`]) are copied from the mapping, chunk by chunk, each chunk
//! checksummed whole; large extents go to the disk with direct I/O, small ones through the
//! page cache.
//!
//! In a live snapshot a [`ChunkGate`] holds the pages the guest wrote since the pause. A
//! saved page that covers a whole chunk (2 MiB hugetlb RAM) is written as soon as the writer
//! is free, ahead of the chunks in order: its buffer then goes back to the fault thread's pool
//! instead of waiting (seconds, at 4 GiB) for the writer to reach it.

use std::fs::{File, OpenOptions};
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;

use cpr::snapshot::{chunk_checksum, MemoryFile, CHUNK_SIZE};

use super::ram::RegionSource;
use super::status::Progress;
use super::SnapshotError;

/// Block alignment of direct I/O.
const DIRECT_ALIGN: usize = 4096;

/// Extents smaller than this are written through the page cache.
const SMALL_EXTENT: u64 = 256 << 10;

/// Snapshots with at most this many chunks of data are written without a reader thread.
const INLINE_CHUNKS: usize = 2;

/// A buffer whose bytes start on a direct-I/O block boundary.
pub struct AlignedBuf {
    backing: Vec<u8>,
    skew: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes (not faulted in yet).
    pub fn new(len: usize) -> Self {
        let backing = vec![0u8; len + DIRECT_ALIGN];
        let skew = backing.as_ptr().align_offset(DIRECT_ALIGN);
        Self { backing, skew, len }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.backing[self.skew..self.skew + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.backing[self.skew..self.skew + self.len]
    }
}

/// The live-snapshot hook of the RAM writer.
pub trait ChunkGate: Sync {
    /// The writer's plan for region `region`: `data[c]` tells whether chunk `c` holds data.
    /// A chunk without data held none at the pause, so the guest may write it freely.
    fn planned(&self, region: usize, data: &[bool]);
    /// `chunk`, the bytes at `start` of region `region`, was just read from the memfd: put
    /// back the pages the guest changed since the pause, and let it write them freely.
    fn settle(&self, region: usize, start: u64, chunk: &mut [u8]) -> std::io::Result<()>;
    /// A page saved from a guest write that covers a whole chunk, taken out of the gate (the
    /// chunk is settled with it): region, start, the chunk's bytes as of the pause.
    fn take_whole(&self) -> Option<(usize, u64, AlignedBuf)>;
    /// Gives back a page [`take_whole`](Self::take_whole) gave, once written.
    fn recycle(&self, page: AlignedBuf);
}

/// How the regions are written.
pub struct WriteCtx<'a> {
    /// Progress shown in `vm.info` (and the cancel flag).
    pub progress: &'a Progress,
    /// Live mode: the pages saved from guest writes.
    pub gate: Option<&'a dyn ChunkGate>,
}

/// Creates a memory file for direct I/O (`O_DIRECT`: RAM streams to the disk without filling
/// the page cache, several times faster here), or for buffered I/O on a file system without
/// it (tmpfs).
fn create_direct(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |flags| {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(flags)
            .open(path)
    };
    match open(libc::O_DIRECT) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // Some file systems create the file and then refuse the flag.
            let _ = std::fs::remove_file(path);
            open(0)
        }
        r => r,
    }
}

/// One chunk read and checksummed, waiting to be written.
struct Job {
    region: usize,
    c: usize,
    start: u64,
    len: usize,
    sum: u64,
    /// The data extents inside the chunk.
    overlapping: Extents,
    buf: AlignedBuf,
    /// The buffer is a page the gate saved (it goes back to the gate).
    saved: bool,
}

/// Byte ranges holding data inside one chunk, in file offsets.
type Extents = Vec<(u64, u64)>;

/// What is left to write: per region, per chunk, the data extents inside it (`None`: a
/// hole, or written already), and the next chunk in order.
struct Plan {
    chunks: Vec<Vec<Option<Extents>>>,
    next: (usize, usize),
    jobs: usize,
}

/// The byte range of chunk `c` of a region of `size` bytes (the last chunk may be short).
fn chunk_range(size: u64, c: usize) -> (u64, u64) {
    let start = c as u64 * CHUNK_SIZE;
    (start, (start + CHUNK_SIZE).min(size))
}

impl Plan {
    fn new(sources: &[RegionSource]) -> Self {
        let mut jobs = 0;
        let chunks = sources
            .iter()
            .map(|src| {
                let mut out = vec![None; MemoryFile::chunk_count(src.size, CHUNK_SIZE)];
                let mut first = 0;
                for (c, slot) in out.iter_mut().enumerate() {
                    let (start, end) = chunk_range(src.size, c);
                    let ext = &src.extents;
                    while ext.get(first).is_some_and(|e| e.1 <= start) {
                        first += 1;
                    }
                    let overlapping: Vec<(u64, u64)> = ext[first..]
                        .iter()
                        .take_while(|e| e.0 < end)
                        .map(|&(s, e)| (s.max(start), e.min(end)))
                        .collect();
                    if !overlapping.is_empty() {
                        *slot = Some(overlapping);
                        jobs += 1;
                    }
                }
                out
            })
            .collect();
        Self {
            chunks,
            next: (0, 0),
            jobs,
        }
    }

    /// The next chunk in order still to write.
    fn next_in_order(&mut self) -> Option<(usize, usize, Extents)> {
        loop {
            let (r, c) = self.next;
            let region = self.chunks.get_mut(r)?;
            if c >= region.len() {
                self.next = (r + 1, 0);
                continue;
            }
            self.next = (r, c + 1);
            if let Some(overlapping) = region[c].take() {
                return Some((r, c, overlapping));
            }
        }
    }
}

/// Reads chunks for writing.
struct Reader<'a> {
    sources: &'a [RegionSource],
    gate: Option<&'a dyn ChunkGate>,
    paths: &'a [PathBuf],
}

impl Reader<'_> {
    /// The next job: a page the gate saved whole, else the next chunk in order, read into a
    /// buffer from `buf`. `None` once everything is read (or `buf` has none to give).
    fn next(
        &self,
        plan: &mut Plan,
        buf: impl FnOnce() -> Option<AlignedBuf>,
    ) -> Option<Result<Job, SnapshotError>> {
        if let Some(job) = self.saved_job(plan) {
            return Some(Ok(job));
        }
        let (r, c, overlapping) = plan.next_in_order()?;
        Some(self.read(r, c, overlapping, buf()?))
    }

    /// A page the gate saved whole, as a job (or given back at once if its chunk held no
    /// data at the pause).
    fn saved_job(&self, plan: &mut Plan) -> Option<Job> {
        let gate = self.gate?;
        while let Some((region, start, page)) = gate.take_whole() {
            let c = (start / CHUNK_SIZE) as usize;
            let found = plan
                .chunks
                .get_mut(region)
                .and_then(|r| r.get_mut(c)?.take());
            let Some(overlapping) = found else {
                gate.recycle(page);
                continue;
            };
            let (start, end) = chunk_range(self.sources[region].size, c);
            let len = (end - start) as usize;
            return Some(Job {
                region,
                c,
                start,
                len,
                sum: chunk_checksum(&page[..len]),
                overlapping,
                buf: page,
                saved: true,
            });
        }
        None
    }

    /// Reads chunk `c` of `region` into `buf` and checksums it. The data extents are copied
    /// from the region's mapping (hugetlbfs serves `pread` at a third of the speed of a copy
    /// here), the rest of the chunk is zero: nothing outside the extents is touched, so no
    /// hole gets a page.
    fn read(
        &self,
        region: usize,
        c: usize,
        overlapping: Extents,
        mut buf: AlignedBuf,
    ) -> Result<Job, SnapshotError> {
        let src = &self.sources[region];
        let (start, end) = chunk_range(src.size, c);
        let chunk = &mut buf[..(end - start) as usize];
        let mut at = start;
        for &(s, e) in &overlapping {
            chunk[(at - start) as usize..(s - start) as usize].fill(0);
            let dst = &mut chunk[(s - start) as usize..(e - start) as usize];
            // SAFETY: `[s, e)` lies within the region (the extents were found inside it),
            // whose mapping at `host` lives as long as the VM; the destination is a distinct
            // buffer of the same length. Guest RAM may change under the copy only in live
            // mode, where the gate then puts back every page written since the pause.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (src.host + s) as *const u8,
                    dst.as_mut_ptr(),
                    dst.len(),
                )
            };
            at = e;
        }
        chunk[(at - start) as usize..].fill(0);
        if let Some(g) = self.gate {
            g.settle(region, start, chunk)
                .map_err(|source| SnapshotError::Write {
                    what: "write-protecting guest RAM for",
                    path: self.paths[region].clone(),
                    source,
                })?;
        }
        let sum = chunk_checksum(chunk);
        Ok(Job {
            region,
            c,
            start,
            len: (end - start) as usize,
            sum,
            overlapping,
            buf,
            saved: false,
        })
    }
}

/// A memory file being written: opened for direct I/O (large extents stream to the disk
/// without filling the page cache) and for buffered I/O (small extents: a few pages written
/// directly cost one synchronous device write each, while buffered ones go out together
/// when the file is synced).
struct Output {
    direct: File,
    buffered: File,
}

/// Writes the data extents of `job` and records its checksum; gives back a chunk buffer
/// (a saved page goes back to the gate).
fn write_job(
    outs: &[Output],
    files: &mut [MemoryFile],
    job: Job,
    ctx: &WriteCtx<'_>,
    paths: &[PathBuf],
) -> Result<Option<AlignedBuf>, SnapshotError> {
    if ctx.progress.cancelled() {
        return Err(SnapshotError::Cancelled);
    }
    #[cfg(feature = "test-next")]
    if std::env::var("MOLT_TEST_FAULT").as_deref() == Ok("snapshot-slow") {
        // Tests need a window in which the RAM write is under way.
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (out, file) = (&outs[job.region], &mut files[job.region]);
    let chunk = &job.buf[..job.len];
    file.chunks[job.c] = Some(job.sum);
    for &(s, e) in &job.overlapping {
        // Whole blocks for O_DIRECT: the chunk holds the true bytes around the extent.
        let align = DIRECT_ALIGN as u64;
        let (bs, be) = (s - job.start, e - job.start);
        let bs = bs / align * align;
        let be = (be.div_ceil(align) * align).min(job.len as u64);
        let bytes = &chunk[bs as usize..be as usize];
        let fd = if be - bs < SMALL_EXTENT {
            &out.buffered
        } else {
            &out.direct
        };
        fd.write_all_at(bytes, job.start + bs)
            .map_err(|source| SnapshotError::Write {
                what: "writing",
                path: paths[job.region].clone(),
                source,
            })?;
        file.data_bytes += be - bs;
        ctx.progress.bytes_written.fetch_add(e - s, Relaxed);
    }
    match (job.saved, ctx.gate) {
        (true, Some(g)) => {
            g.recycle(job.buf);
            Ok(None)
        }
        _ => Ok(Some(job.buf)),
    }
}

/// Writes each of `sources` into a new sparse memory file (`paths`, one each). The caller
/// syncs the files it gets back (a snapshot syncs all of its files together: one journal
/// commit, not one each).
pub fn write_regions(
    sources: &[RegionSource],
    paths: &[PathBuf],
    ctx: &WriteCtx<'_>,
) -> Result<Vec<(MemoryFile, File)>, SnapshotError> {
    let mut laps = crate::laps::Laps::start("memory files");
    let mut outs = Vec::new();
    let mut files = Vec::new();
    for (src, path) in sources.iter().zip(paths) {
        let err = |what: &'static str| {
            let path = path.clone();
            move |source| SnapshotError::Write { what, path, source }
        };
        let direct = create_direct(path).map_err(err("creating"))?;
        let buffered = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(err("opening"))?;
        outs.push(Output { direct, buffered });
        files.push(MemoryFile {
            file: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            size: src.size,
            chunk_size: CHUNK_SIZE,
            chunks: vec![None; MemoryFile::chunk_count(src.size, CHUNK_SIZE)],
            data_bytes: 0,
        });
    }
    let mut plan = Plan::new(sources);
    if let Some(g) = ctx.gate {
        for (r, chunks) in plan.chunks.iter().enumerate() {
            let data: Vec<bool> = chunks.iter().map(Option::is_some).collect();
            g.planned(r, &data);
        }
    }
    laps.mark("create");
    let reader = Reader {
        sources,
        gate: ctx.gate,
        paths,
    };
    let chunk_buf = || AlignedBuf::new(CHUNK_SIZE as usize);
    if plan.jobs <= INLINE_CHUNKS {
        // Few chunks (an idle guest's RAM): read and write them on this thread. A pipeline's
        // thread and buffers cost more than they save here, and on a busy host every hand-off
        // between threads waits for a core.
        let mut buf = None;
        while let Some(job) = reader.next(&mut plan, || Some(buf.take().unwrap_or_else(chunk_buf)))
        {
            let job = job?;
            laps.mark("read");
            buf = write_job(&outs, &mut files, job, ctx, paths)?.or(buf);
            laps.mark("write");
        }
    } else {
        // A reader thread reads and checksums chunks while this one writes them: the two
        // halves of the work overlap. Buffers circulate between them.
        std::thread::scope(|scope| -> Result<(), SnapshotError> {
            let (full_tx, full_rx) = mpsc::sync_channel::<Result<Job, SnapshotError>>(2);
            let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();
            for _ in 0..3 {
                let _ = free_tx.send(chunk_buf());
            }
            let reader = &reader;
            scope.spawn(move || {
                while let Some(job) = reader.next(&mut plan, || free_rx.recv().ok()) {
                    if full_tx.send(job).is_err() {
                        return;
                    }
                }
            });
            for job in full_rx {
                if let Some(buf) = write_job(&outs, &mut files, job?, ctx, paths)? {
                    let _ = free_tx.send(buf);
                }
            }
            Ok(())
        })?;
    }
    // Sized last: on this host's ext4, writing into a file already sized (sparse) runs at a
    // third of the speed of extending it.
    laps.mark("data");
    let mut done = Vec::new();
    for ((out, file), path) in outs.into_iter().zip(files).zip(paths) {
        out.direct
            .set_len(file.size)
            .map_err(|source| SnapshotError::Write {
                what: "sizing",
                path: path.clone(),
                source,
            })?;
        // Syncing either fd syncs the file, whichever fd wrote its pages.
        done.push((file, out.direct));
    }
    laps.mark("size");
    laps.log();
    Ok(done)
}

/// Writes `src` into a new sparse memory file at `path` and syncs it.
#[cfg(test)]
pub fn write_region(
    src: &RegionSource,
    path: &Path,
    ctx: &WriteCtx<'_>,
) -> Result<MemoryFile, SnapshotError> {
    let mut done = write_regions(std::slice::from_ref(src), &[path.to_path_buf()], ctx)?;
    let (desc, file) = done.remove(0);
    file.sync_all().map_err(|source| SnapshotError::Write {
        what: "syncing",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(desc)
}
