//! Guest RAM to and from memory files. Where each region holds data is found with
//! `SEEK_DATA`/`SEEK_HOLE` (4 KiB memfd RAM) or from this process's page tables with
//! `mincore` (2 MiB hugetlb RAM, where hugetlbfs reports everything as data); the writer
//! ([`super::ram_write`]) copies only those extents, so pages the guest never touched cost no
//! I/O, get no page and stay holes in the file. Every chunk that holds data is checksummed
//! whole, and checked when it is read back.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use cpr::snapshot::{chunk_checksum, MemoryFile};
use nix::unistd::{lseek, Whence};
use vm_memory::{Bytes, GuestAddress};

use super::SnapshotError;
use crate::config::HUGE_PAGE_SIZE;
use crate::memory::GuestRam;

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

/// One region to write: its memfd, where this process maps it, and where its data was when
/// the guest was paused.
#[derive(Debug)]
pub struct RegionSource {
    /// A duplicate of the region's memfd.
    pub memfd: File,
    /// Bytes.
    pub size: u64,
    /// Backed by 2 MiB hugetlb pages.
    pub hugepages: bool,
    /// Host address of its mapping in this process.
    pub host: u64,
    /// Every page that holds data was mapped through `host` (see [`GuestRam::mapped_here`]).
    pub mapped_here: bool,
    /// Byte ranges holding data ([`find_data`](Self::find_data)); everything else is
    /// written as holes.
    pub extents: Vec<(u64, u64)>,
}

impl RegionSource {
    /// Every region of `ram`; their data is not looked for yet.
    pub fn all(ram: &GuestRam) -> std::io::Result<Vec<RegionSource>> {
        ram.regions
            .iter()
            .zip(ram.host_ranges())
            .map(|(r, (host, _))| {
                Ok(RegionSource {
                    memfd: r.memfd.try_clone()?,
                    size: r.size,
                    hugepages: r.hugepages,
                    host: host as u64,
                    mapped_here: ram.mapped_here,
                    extents: Vec::new(),
                })
            })
            .collect()
    }

    /// Finds where the region holds data (`SEEK_DATA` on 4 KiB memfds, `mincore` on the
    /// mapping of hugetlb ones): this takes a while (~125 ms for 1 GiB of touched 4 KiB
    /// pages here), so it runs on the writer thread. Found after the pause it may include
    /// pages the guest wrote since, which is harmless: their contents as of the pause (zeros)
    /// are written.
    pub fn find_data(sources: &mut [RegionSource]) -> std::io::Result<()> {
        let t0 = std::time::Instant::now();
        for r in sources.iter_mut() {
            r.extents = if !r.hugepages {
                data_extents(&r.memfd, r.size)?
            } else if r.mapped_here {
                mapped_extents(r.host, r.size, HUGE_PAGE_SIZE)?
            } else {
                // Adopted from another process: this mapping's page tables do not show
                // which huge pages hold data, and hugetlbfs has no SEEK_DATA.
                match super::hugeprobe::hugetlb_extents(&r.memfd, r.size) {
                    Ok(found) => found,
                    Err(e) => {
                        log::info!(
                            "snapshot: hugetlb RAM adopted from another process is written \
                             whole (cannot probe its huge pages: {e})"
                        );
                        vec![(0, r.size)]
                    }
                }
            };
        }
        log::info!(
            "snapshot: the data of guest RAM found in {:.3} ms ({})",
            super::ms(t0.elapsed()),
            if sources.iter().any(|r| r.hugepages && !r.mapped_here) {
                "hugetlb adopted: userfaultfd minor-fault probe"
            } else if sources.iter().any(|r| r.hugepages) {
                "hugetlb: mincore on the mapping"
            } else {
                "memfd: SEEK_DATA/SEEK_HOLE"
            }
        );
        Ok(())
    }

    /// Bytes of data found.
    pub fn data_bytes(&self) -> u64 {
        self.extents.iter().map(|(s, e)| e - s).sum()
    }
}

/// The byte ranges of the mapping `[host, host + size)` whose `page`-sized pages are present
/// in this process's page tables (`mincore`). Hugetlbfs has no `SEEK_DATA` (it reports
/// everything as data), but a huge page of guest RAM created by this process is mapped here
/// from the moment anything (the guest through KVM, or molt) first touched it.
pub fn mapped_extents(host: u64, size: u64, page: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut add = |s: u64| {
        let e = (s + page).min(size);
        match out.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => out.push((s, e)),
        }
    };
    if page > 4096 {
        // One 4 KiB probe per page: a huge page is mapped whole. Asking for the whole range
        // instead makes the kernel fill a byte per 4 KiB (1 MiB of answer for 4 GiB of RAM,
        // 28 ms here against ~3 ms for 2048 probes).
        let mut byte = 0u8;
        for s in (0..size).step_by(page as usize) {
            // SAFETY: mincore only reads the page tables of one 4 KiB page of the range (a
            // live mapping of guest RAM) and writes one byte into `byte`.
            let rc = unsafe { libc::mincore((host + s) as *mut libc::c_void, 4096, &mut byte) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if byte & 1 != 0 {
                add(s);
            }
        }
        return Ok(out);
    }
    let mut vec = vec![0u8; size.div_ceil(4096) as usize];
    // SAFETY: mincore only reads the page tables of the range (a live mapping of guest RAM)
    // and writes one byte per 4 KiB page into `vec`, which is that long.
    let rc = unsafe { libc::mincore(host as *mut libc::c_void, size as usize, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    for (i, v) in vec.iter().enumerate() {
        if v & 1 != 0 {
            add(i as u64 * 4096);
        }
    }
    Ok(out)
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
pub(crate) mod tests {
    use std::fs::OpenOptions;

    use super::super::ram_write::{write_region, WriteCtx};
    use super::super::status::Progress;
    use super::*;
    use crate::config::MemoryConfig;

    /// Writes region 0 of `ram` to `path` (a paused snapshot's way).
    pub(crate) fn write_all_of(ram: &GuestRam, path: &Path) -> MemoryFile {
        let mut all = RegionSource::all(ram).unwrap();
        RegionSource::find_data(&mut all).unwrap();
        let src = all.remove(0);
        let progress = Progress::new(super::super::SnapshotMode::Paused, path.into(), src.size);
        let ctx = WriteCtx {
            progress: &progress,
            gate: None,
        };
        write_region(&src, path, &ctx).unwrap()
    }

    #[test]
    fn mapped_pages_are_found_in_the_page_tables() {
        let cfg = MemoryConfig {
            size: 16 << 20,
            hugepages: false,
            prefault: false,
        };
        let ram = crate::memory::create(&cfg).unwrap();
        ram.mem.write_obj(1u8, GuestAddress(0)).unwrap();
        ram.mem.write_obj(1u8, GuestAddress(0x3000)).unwrap();
        ram.mem.write_obj(1u8, GuestAddress(0x5000)).unwrap();
        ram.mem.write_obj(1u8, GuestAddress(0x6000)).unwrap();
        let (host, _) = ram.host_ranges()[0];
        let found = mapped_extents(host as u64, 16 << 20, 4096).unwrap();
        assert_eq!(found, vec![(0, 0x1000), (0x3000, 0x4000), (0x5000, 0x7000)]);
        // By huge page (judged by its first 4 KiB, all of which a hugetlb mapping maps).
        let found = mapped_extents(host as u64, 16 << 20, HUGE_PAGE_SIZE).unwrap();
        assert_eq!(found, vec![(0, HUGE_PAGE_SIZE)]);
    }

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
        let desc = write_all_of(&ram, &path);
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
