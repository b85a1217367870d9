//! Guest RAM to and from memory files. Writing reads each region's memfd with `pread` (which
//! allocates nothing for holes) and finds its data with `SEEK_DATA`/`SEEK_HOLE`, so pages the
//! guest never touched cost no I/O and stay holes in the file. Every chunk that holds data is
//! checksummed whole.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use cpr::snapshot::{chunk_checksum, MemoryFile, CHUNK_SIZE};
use nix::unistd::{lseek, Whence};
use vm_memory::{Bytes, GuestAddress};

use super::SnapshotError;
use crate::memory::{GuestRam, RamRegion};

/// The byte ranges of `fd`'s first `size` bytes that hold data. A file system that cannot
/// tell reports everything as data.
pub fn data_extents(fd: impl AsFd, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = fd.as_fd();
    let mut out = Vec::new();
    let mut off = 0u64;
    while off < size {
        let data = match lseek(fd, off as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(nix::errno::Errno::EINVAL) if off == 0 => return Ok(vec![(0, size)]),
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = match lseek(fd, data as i64, Whence::SeekHole) {
            Ok(h) => (h as u64).min(size),
            Err(nix::errno::Errno::ENXIO) => size,
            Err(e) => return Err(e.into()),
        };
        if hole <= data {
            break;
        }
        out.push((data, hole));
        off = hole;
    }
    Ok(out)
}

/// Block alignment of direct I/O.
const DIRECT_ALIGN: u64 = 4096;

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
    c: usize,
    start: u64,
    len: usize,
    sum: u64,
    /// The data extents inside the chunk, in file offsets.
    overlapping: Vec<(u64, u64)>,
    backing: Vec<u8>,
}

/// The 2 MiB-aligned-for-direct-I/O part of a buffer of `CHUNK_SIZE + DIRECT_ALIGN` bytes.
fn aligned(backing: &mut [u8]) -> &mut [u8] {
    let skew = backing.as_ptr().align_offset(DIRECT_ALIGN as usize);
    &mut backing[skew..skew + CHUNK_SIZE as usize]
}

/// The chunks that hold data: index, byte range and the data extents inside.
#[allow(clippy::type_complexity)]
fn chunk_jobs(
    file: &MemoryFile,
    extents: &[(u64, u64)],
) -> Vec<(usize, u64, u64, Vec<(u64, u64)>)> {
    let mut out = Vec::new();
    let mut first = 0;
    for c in 0..file.chunks.len() {
        let (start, end) = file.chunk_range(c);
        while extents.get(first).is_some_and(|e| e.1 <= start) {
            first += 1;
        }
        let overlapping: Vec<(u64, u64)> = extents[first..]
            .iter()
            .take_while(|e| e.0 < end)
            .map(|&(s, e)| (s.max(start), e.min(end)))
            .collect();
        if !overlapping.is_empty() {
            out.push((c, start, end, overlapping));
        }
    }
    out
}

/// Writes `region` into a new sparse memory file at `path` and syncs it.
pub fn write_region(region: &RamRegion, path: &Path) -> Result<MemoryFile, SnapshotError> {
    let err = |what: &'static str| {
        let path = path.to_path_buf();
        move |source| SnapshotError::Write { what, path, source }
    };
    let size = region.size;
    let extents = data_extents(&region.memfd, size).map_err(err("finding the data of"))?;
    let out = create_direct(path).map_err(err("creating"))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut file = MemoryFile {
        file: name,
        size,
        chunk_size: CHUNK_SIZE,
        chunks: vec![None; MemoryFile::chunk_count(size, CHUNK_SIZE)],
        data_bytes: 0,
    };
    // A reader thread reads and checksums chunks while this one writes them: the two halves
    // of the work overlap. Buffers circulate between them.
    let jobs = chunk_jobs(&file, &extents);
    std::thread::scope(|scope| -> Result<(), SnapshotError> {
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Result<Job, SnapshotError>>(2);
        let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        for _ in 0..3 {
            let _ = free_tx.send(vec![0u8; (CHUNK_SIZE + DIRECT_ALIGN) as usize]);
        }
        let memfd = &region.memfd;
        scope.spawn(move || {
            for (c, start, end, overlapping) in jobs {
                let Ok(mut backing) = free_rx.recv() else {
                    return;
                };
                let chunk = &mut aligned(&mut backing)[..(end - start) as usize];
                let job = match memfd.read_exact_at(chunk, start) {
                    Ok(()) => Ok(Job {
                        c,
                        start,
                        len: (end - start) as usize,
                        sum: chunk_checksum(chunk),
                        overlapping,
                        backing,
                    }),
                    Err(source) => Err(SnapshotError::Write {
                        what: "reading guest RAM for",
                        path: path.to_path_buf(),
                        source,
                    }),
                };
                if full_tx.send(job).is_err() {
                    return;
                }
            }
        });
        for job in full_rx {
            let mut job = job?;
            let chunk = &aligned(&mut job.backing)[..job.len];
            file.chunks[job.c] = Some(job.sum);
            for &(s, e) in &job.overlapping {
                // Whole blocks for O_DIRECT: the chunk holds the true bytes around the extent.
                let s = (s - job.start) / DIRECT_ALIGN * DIRECT_ALIGN;
                let e = ((e - job.start).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN).min(job.len as u64);
                let bytes = &chunk[s as usize..e as usize];
                out.write_all_at(bytes, job.start + s)
                    .map_err(err("writing"))?;
                file.data_bytes += e - s;
            }
            let _ = free_tx.send(job.backing);
        }
        Ok(())
    })?;
    // Sized last: on this host's ext4, writing into a file already sized (sparse) runs at a
    // third of the speed of extending it.
    out.set_len(size).map_err(err("sizing"))?;
    out.sync_all().map_err(err("syncing"))?;
    Ok(file)
}

/// Checks a memory file's description against the region it restores and opens the file.
pub fn open_checked(dir: &Path, desc: &MemoryFile, size: u64) -> Result<File, SnapshotError> {
    let path = dir.join(&desc.file);
    let bad = |why: String| SnapshotError::BadMemory {
        file: path.clone(),
        why,
        when: "found before the guest ran",
    };
    if !desc.is_consistent() || desc.size != size {
        return Err(bad(format!(
            "its description does not fit a {size}-byte region"
        )));
    }
    let file = File::open(&path).map_err(|e| SnapshotError::Read(path.clone(), e))?;
    let len = file
        .metadata()
        .map_err(|e| SnapshotError::Read(path.clone(), e))?
        .len();
    if len != size {
        return Err(bad(format!(
            "truncated or resized: {len} bytes, the snapshot wrote {size}"
        )));
    }
    Ok(file)
}

/// Fills region `index` of `ram` (fresh, all zeros) from its memory file, checking every
/// chunk before the guest can run on it. Returns the bytes read.
pub fn fill_region(
    ram: &GuestRam,
    index: usize,
    file: &File,
    desc: &MemoryFile,
    path: &Path,
) -> Result<u64, SnapshotError> {
    let base = ram.regions.get(index).map(|r| r.guest_addr).unwrap_or(0);
    let mut buf = vec![0u8; desc.chunk_size as usize];
    let mut read = 0;
    for (c, sum) in desc.chunks.iter().enumerate() {
        let Some(sum) = sum else { continue };
        let (start, end) = desc.chunk_range(c);
        let chunk = &mut buf[..(end - start) as usize];
        load_chunk(file, chunk, start, *sum, path, "found before the guest ran")?;
        ram.mem
            .write_slice(chunk, GuestAddress(base + start))
            .map_err(|e| SnapshotError::Inconsistent(path.to_path_buf(), e.to_string()))?;
        read += end - start;
    }
    Ok(read)
}

/// Reads one chunk at `start` of `file` into `chunk` and checks it against `sum`.
pub fn load_chunk(
    file: &File,
    chunk: &mut [u8],
    start: u64,
    sum: u64,
    path: &Path,
    when: &'static str,
) -> Result<(), SnapshotError> {
    let bad = |why: String| SnapshotError::BadMemory {
        file: path.to_path_buf(),
        why,
        when,
    };
    file.read_exact_at(chunk, start).map_err(|e| {
        bad(format!(
            "cannot read bytes {start:#x}+{:#x}: {e}",
            chunk.len()
        ))
    })?;
    if chunk_checksum(chunk) != sum {
        return Err(bad(format!(
            "the chunk at {start:#x}..{:#x} fails its checksum (corrupt)",
            start + chunk.len() as u64
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MemoryConfig;

    #[test]
    fn untouched_ram_is_a_hole_and_touched_ram_comes_back() {
        let cfg = MemoryConfig {
            size: 16 << 20,
            hugepages: false,
            prefault: false,
        };
        let ram = crate::memory::create(&cfg).unwrap();
        ram.mem
            .write_obj(0x1234_5678u32, GuestAddress(0x5000))
            .unwrap();
        ram.mem.write_obj(0xabcdu16, GuestAddress(9 << 20)).unwrap();
        let dir = std::env::temp_dir().join(format!("molt-snapram-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("ram0.mem");
        let desc = write_region(&ram.regions[0], &path).unwrap();
        // Two pages of data in two chunks, everything else holes.
        assert_eq!(desc.data_bytes, 2 * 4096);
        assert_eq!(desc.chunks.iter().filter(|c| c.is_some()).count(), 2);
        let file = File::open(&path).unwrap();
        assert_eq!(data_extents(&file, 16 << 20).unwrap().len(), 2);

        let fresh = crate::memory::create(&cfg).unwrap();
        let file = open_checked(&dir, &desc, 16 << 20).unwrap();
        fill_region(&fresh, 0, &file, &desc, &path).unwrap();
        assert_eq!(
            fresh.mem.read_obj::<u32>(GuestAddress(0x5000)).unwrap(),
            0x1234_5678
        );
        assert_eq!(
            fresh.mem.read_obj::<u16>(GuestAddress(9 << 20)).unwrap(),
            0xabcd
        );

        // A flipped byte is found, and so is a truncated file.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff], 0x5001).unwrap();
        let fresh = crate::memory::create(&cfg).unwrap();
        let err = fill_region(&fresh, 0, &file, &desc, &path).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        f.set_len(8 << 20).unwrap();
        let err = open_checked(&dir, &desc, 16 << 20).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
