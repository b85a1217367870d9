//! Which huge pages of a hugetlb memfd hold data, seen from a process that did not create
//! them (RAM adopted after a live update). Hugetlbfs reports every byte as data to
//! `SEEK_DATA`, `cachestat` refuses it, and `mincore` only sees this process's page tables,
//! which are empty for an adopted mapping. What works: a private mapping of the memfd
//! registered with userfaultfd in minor-fault mode, where `UFFDIO_CONTINUE` maps a huge page
//! only if the file holds one (and fails with `EFAULT` on a hole) — without allocating a page
//! or touching guest RAM. One call maps a run of present pages and stops at the first hole.

use std::io;
use std::os::fd::AsRawFd;

use super::uffd::{Uffd, FEATURE_MINOR_HUGETLBFS};
use crate::config::HUGE_PAGE_SIZE;

/// A read-only mapping of a memfd that only this module uses; unmapped when dropped.
struct ProbeMap {
    addr: u64,
    len: usize,
}

impl ProbeMap {
    fn new(memfd: &impl AsRawFd, len: usize) -> io::Result<Self> {
        // SAFETY: a new shared read-only mapping of the memfd at an address the kernel picks;
        // nothing reads through it (the probe only maps pages into it) and Drop unmaps it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                memfd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            addr: addr as u64,
            len,
        })
    }
}

impl Drop for ProbeMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` created, which nothing else refers to.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// The byte ranges of the hugetlb memfd `memfd` (`size` bytes, a multiple of 2 MiB) that
/// hold huge pages.
pub fn hugetlb_extents(memfd: &impl AsRawFd, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let map = ProbeMap::new(memfd, size as usize)?;
    let uffd = Uffd::with_features(FEATURE_MINOR_HUGETLBFS)?;
    uffd.register_minor(map.addr, size)?;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut off = 0u64;
    while off < size {
        let present = match uffd.map_present(map.addr + off, size - off) {
            Ok(n) => n,
            // The first page is a hole.
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => 0,
            Err(e) => return Err(e),
        };
        if present > 0 {
            match out.last_mut() {
                Some(last) if last.1 == off => last.1 = off + present,
                _ => out.push((off, off + present)),
            }
        }
        // Past the run and the hole that ended it.
        off += present
            + if off + present < size {
                HUGE_PAGE_SIZE
            } else {
                0
            };
    }
    // The registration ends with the userfaultfd and the mapping.
    drop(uffd);
    drop(map);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::config::MemoryConfig;

    #[test]
    fn huge_pages_written_by_another_mapping_are_found() {
        let _pool = match molt_tests::hugepages::Reservation::ensure(16) {
            Ok(p) => p,
            Err(why) => return molt_tests::skip("hugetlb RAM", &why),
        };
        let cfg = MemoryConfig {
            size: 32 << 20,
            hugepages: true,
            prefault: false,
        };
        let ram = match crate::memory::create(&cfg) {
            Ok(r) => r,
            Err(e) => return molt_tests::skip("hugetlb RAM", &e.to_string()),
        };
        for page in [0u64, 1, 2, 7, 15] {
            ram.mem
                .write_obj(1u8, GuestAddress(page * HUGE_PAGE_SIZE + 4096))
                .unwrap();
        }
        let found = match hugetlb_extents(&ram.regions[0].memfd, 32 << 20) {
            Ok(f) => f,
            Err(e) => {
                return molt_tests::skip("userfaultfd minor faults on hugetlbfs", &e.to_string())
            }
        };
        let mb = |p: u64| p * HUGE_PAGE_SIZE;
        assert_eq!(found, vec![(0, mb(3)), (mb(7), mb(8)), (mb(15), mb(16))]);
        // Probing allocated nothing: the holes are still holes.
        let again = hugetlb_extents(&ram.regions[0].memfd, 32 << 20).unwrap();
        assert_eq!(again, found);
        // Nothing was changed in guest RAM.
        assert_eq!(
            ram.mem.read_obj::<u8>(GuestAddress(mb(7) + 4096)).unwrap(),
            1
        );
        assert_eq!(ram.mem.read_obj::<u8>(GuestAddress(mb(7))).unwrap(), 0);
    }
}
