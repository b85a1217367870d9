//! Guest RAM: every byte comes from a memfd mapped MAP_SHARED, one memfd per region, so
//! that a live update can hand the memfds to the next process and map them again.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use arch::layout::{ram_ranges, RamRange};
use arch::GuestMemory;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::config::{MemoryConfig, HUGE_PAGE_SIZE};

/// Errors creating or mapping guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("cannot create memfd for guest RAM")]
    Memfd(#[source] std::io::Error),
    /// ftruncate failed.
    #[error("cannot size guest RAM memfd to {0} bytes")]
    Size(u64, #[source] std::io::Error),
    /// The host has too few free huge pages.
    #[error(
        "hugepages=on needs {needed} free 2 MiB huge pages but the host has {free} \
         (raise /proc/sys/vm/nr_hugepages)"
    )]
    NoHugePages {
        /// Pages the VM needs.
        needed: u64,
        /// Free pages on the host.
        free: u64,
    },
    /// mmap failed.
    #[error("cannot map {0} bytes of guest RAM")]
    Map(u64, #[source] vm_memory::mmap::MmapRegionError),
    /// vm-memory refused the region layout.
    #[error("invalid guest RAM layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    /// KVM refused a memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {0} failed")]
    Slot(u32, #[source] kvm_ioctls::Error),
    /// Inherited RAM does not match its saved layout.
    #[error("cannot take over guest RAM")]
    Persist(#[from] crate::persist::PersistError),
}

/// One region of guest RAM and what backs it: exactly what a live update must preserve.
#[derive(Debug)]
pub struct RamRegion {
    /// Guest physical start address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// The memfd holding the region's contents.
    pub memfd: File,
    /// Backed by 2 MiB hugetlb pages.
    pub hugepages: bool,
}

/// All guest RAM: the regions and their mapping in this process.
pub struct GuestRam {
    /// Regions, in guest address order.
    pub regions: Vec<RamRegion>,
    /// The regions mapped into this process.
    pub mem: GuestMemory,
    /// Every page holding data was faulted in through this mapping (RAM created by this
    /// process, not adopted from another): then the mapping's page tables show where the
    /// data of a hugetlb region is (`mincore`), which `SEEK_DATA` cannot on hugetlbfs.
    pub mapped_here: bool,
}

fn memfd_create(name: &str, hugepages: bool) -> Result<File, MemoryError> {
    let cname = CString::new(name).map_err(|e| MemoryError::Memfd(e.into()))?;
    let mut flags = libc::MFD_CLOEXEC;
    if hugepages {
        flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    // SAFETY: `cname` is a valid NUL-terminated string; the call has no other inputs.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Free 2 MiB huge pages on the host, from /proc/meminfo.
pub fn free_huge_pages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("HugePages_Free:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn map_region(region: &RamRegion, populate: bool) -> Result<GuestRegionMmap, MemoryError> {
    let file = region.memfd.try_clone().map_err(MemoryError::Memfd)?;
    // Hugetlb mappings reserve their pages at mmap time unless MAP_NORESERVE is given; we
    // want that reservation, so a short host fails here rather than with SIGBUS later.
    let mut flags = if region.hugepages {
        libc::MAP_SHARED
    } else {
        libc::MAP_SHARED | libc::MAP_NORESERVE
    };
    if populate {
        flags |= libc::MAP_POPULATE;
    }
    let mapping = MmapRegionBuilder::new(region.size as usize)
        .with_file_offset(FileOffset::new(file, 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags)
        .build()
        .map_err(|e| {
            if region.hugepages {
                MemoryError::NoHugePages {
                    needed: region.size / HUGE_PAGE_SIZE,
                    free: free_huge_pages(),
                }
            } else {
                MemoryError::Map(region.size, e)
            }
        })?;
    GuestRegionMmap::new(mapping, GuestAddress(region.guest_addr)).ok_or(MemoryError::Layout(
        vm_memory::GuestRegionCollectionError::NoMemoryRegion,
    ))
}

/// Maps existing regions (at whatever host address the kernel picks); `populate` faults
/// every page in now (MAP_POPULATE).
pub fn map_regions(regions: Vec<RamRegion>, populate: bool) -> Result<GuestRam, MemoryError> {
    let mapped = regions
        .iter()
        .map(|r| map_region(r, populate))
        .collect::<Result<Vec<_>, _>>()?;
    let mem = GuestMemory::from_regions(mapped).map_err(MemoryError::Layout)?;
    Ok(GuestRam {
        regions,
        mem,
        mapped_here: populate,
    })
}

/// Creates guest RAM as configured: memfds sized and mapped.
pub fn create(config: &MemoryConfig) -> Result<GuestRam, MemoryError> {
    if config.hugepages {
        let needed = config.size / HUGE_PAGE_SIZE;
        let free = free_huge_pages();
        if free < needed {
            return Err(MemoryError::NoHugePages { needed, free });
        }
    }
    let regions = ram_ranges(config.size)
        .into_iter()
        .enumerate()
        .map(|(i, RamRange { start, size })| {
            let memfd = memfd_create(&format!("molt-ram{i}"), config.hugepages)?;
            memfd
                .set_len(size)
                .map_err(|e| MemoryError::Size(size, e))?;
            Ok(RamRegion {
                guest_addr: start,
                size,
                memfd,
                hugepages: config.hugepages,
            })
        })
        .collect::<Result<Vec<_>, MemoryError>>()?;
    let mut ram = map_regions(regions, config.prefault)?;
    ram.mapped_here = true;
    Ok(ram)
}

impl GuestRam {
    /// The RAM ranges, for the boot layout.
    pub fn ranges(&self) -> Vec<RamRange> {
        self.regions
            .iter()
            .map(|r| RamRange {
                start: r.guest_addr,
                size: r.size,
            })
            .collect()
    }

    /// Registers every region as a KVM memory slot (slot i = region i).
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        for (slot, region) in self.mem.iter().enumerate() {
            let slot = slot as u32;
            let host = self
                .mem
                .get_host_address(region.start_addr())
                .map_err(|_| {
                    MemoryError::Layout(vm_memory::GuestRegionCollectionError::NoMemoryRegion)
                })?;
            let desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live mapping owned by `self.mem`, which outlives
            // the VM's use of it (the VM is torn down before guest RAM is unmapped).
            unsafe { vm.set_user_memory_region(desc) }.map_err(|e| MemoryError::Slot(slot, e))?;
        }
        Ok(())
    }

    /// Host address and length of each mapped region.
    pub fn host_ranges(&self) -> Vec<(usize, usize)> {
        self.mem
            .iter()
            .filter_map(|r| {
                let host = self.mem.get_host_address(r.start_addr()).ok()?;
                Some((host as usize, r.len() as usize))
            })
            .collect()
    }

    /// Total RAM in bytes.
    pub fn total(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }
}

/// Faults the host ranges in (MADV_POPULATE_WRITE) without touching their contents. Safe to
/// run beside a rebuild: a range that was unmapped meanwhile just fails.
pub fn populate(ranges: &[(usize, usize)]) {
    for &(addr, len) in ranges {
        // SAFETY: madvise only faults pages of whatever mapping is at the range (never reads
        // or writes their contents from userspace); an unmapped range makes it fail.
        let rc =
            unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
        if rc != 0 {
            log::debug!("populating guest RAM: {}", std::io::Error::last_os_error());
        }
    }
}

impl AsRawFd for RamRegion {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.memfd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ram_is_memfd_backed_and_shared() {
        let ram = create(&MemoryConfig {
            size: 64 << 20,
            hugepages: false,
            prefault: false,
        })
        .unwrap();
        assert_eq!(ram.regions.len(), 1);
        assert_eq!(ram.total(), 64 << 20);
        ram.mem
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        // A second mapping of the same memfd sees the write: the mapping is MAP_SHARED.
        let again = map_regions(
            vec![RamRegion {
                guest_addr: 0,
                size: 64 << 20,
                memfd: ram.regions[0].memfd.try_clone().unwrap(),
                hugepages: false,
            }],
            false,
        )
        .unwrap();
        assert_eq!(
            again.mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        let link =
            std::fs::read_link(format!("/proc/self/fd/{}", ram.regions[0].as_raw_fd())).unwrap();
        assert!(
            link.to_string_lossy().contains("memfd:molt-ram0"),
            "{link:?}"
        );
    }

    #[test]
    fn large_ram_has_two_regions() {
        let ram = create(&MemoryConfig {
            size: 4 << 30,
            hugepages: false,
            prefault: false,
        })
        .unwrap();
        let r = ram.ranges();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].start, 1 << 32);
    }
}
