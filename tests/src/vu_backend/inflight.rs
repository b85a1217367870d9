//! The inflight-tracking area of split virtqueues, as the vhost-user specification lays it
//! out ("Inflight I/O tracking"). One region per queue:
//!
//! ```text
//! 0   features         u64
//! 8   version          u16   0 until a backend first starts the ring, then 1
//! 10  desc_num         u16   entries that follow (the ring's size)
//! 12  last_batch_head  u16   head of the last batch of used descriptors
//! 14  used_idx         u16   used index once that batch was fully recorded
//! 16  desc[desc_num]   16 bytes each: inflight u8, padding [u8; 5], next u16, counter u64
//! ```
//!
//! A backend marks a descriptor head inflight (with the next value of its submission counter)
//! when it takes it from the available ring, links the heads it returns into the last batch
//! before it publishes the used index, and clears them afterwards. A backend that adopts the
//! area of a dead one ([`InflightArea::start`]) first clears the last batch if the dead one
//! published the used index without recording it, then resubmits every head still marked, in
//! counter order.

use std::fs::File;
use std::sync::atomic::{fence, Ordering};

use nix::sys::memfd::{memfd_create, MFdFlags};
use vhost::vhost_user::message::VhostUserInflight;
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

use super::VuBackendError;

const HEADER: usize = 16;
const ENTRY: usize = 16;
const ALIGN: usize = 64;
const VERSION: u16 = 1;

const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;
const INFLIGHT_AT: usize = 0;
const NEXT_AT: usize = 6;
const COUNTER_AT: usize = 8;

/// Bytes of one queue's region for rings of up to `queue_size` entries.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + ENTRY * usize::from(queue_size)).next_multiple_of(ALIGN)
}

/// What a backend that starts a ring on an adopted area must do first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resume {
    /// Heads still inflight, oldest submission first: to be processed again.
    pub heads: Vec<u16>,
    /// The submission counter to continue with.
    pub next_counter: u64,
}

/// A mapped inflight area (shared with the frontend, which keeps its fd).
pub struct InflightArea {
    map: MmapRegion,
    file: File,
    info: VhostUserInflight,
}

impl InflightArea {
    /// A new zeroed area in a memfd for `num_queues` rings of up to `queue_size` entries (the
    /// backend's answer to GET_INFLIGHT_FD).
    pub fn create(num_queues: u16, queue_size: u16) -> Result<Self, VuBackendError> {
        let size = queue_region_size(queue_size) * usize::from(num_queues);
        let fd = memfd_create(c"molt-test-vu-inflight", MFdFlags::MFD_CLOEXEC)
            .map_err(|e| VuBackendError::Inflight(std::io::Error::from(e)))?;
        let file = File::from(fd);
        file.set_len(size as u64)
            .map_err(VuBackendError::Inflight)?;
        Self::adopt(
            file,
            &VhostUserInflight::new(size as u64, 0, num_queues, queue_size),
        )
    }

    /// Maps an area the frontend handed over (SET_INFLIGHT_FD).
    pub fn adopt(file: File, info: &VhostUserInflight) -> Result<Self, VuBackendError> {
        let needed = queue_region_size(info.queue_size) * usize::from(info.num_queues);
        let size = usize::try_from(info.mmap_size).unwrap_or(0);
        if info.num_queues == 0 || size < needed {
            return Err(bad(info));
        }
        let dup = file.try_clone().map_err(VuBackendError::Inflight)?;
        let map = MmapRegion::from_file(FileOffset::new(dup, info.mmap_offset), size)
            .map_err(|e| VuBackendError::Inflight(std::io::Error::other(e)))?;
        Ok(Self {
            map,
            file,
            info: *info,
        })
    }

    /// Geometry, as GET_INFLIGHT_FD reports it.
    pub fn info(&self) -> VhostUserInflight {
        self.info
    }

    /// The fd the frontend keeps.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn queue(&self, q: u16) -> Result<VolatileSlice<'_>, VuBackendError> {
        if q >= self.info.num_queues {
            return Err(VuBackendError::NoQueue(q));
        }
        let len = queue_region_size(self.info.queue_size);
        self.map
            .get_slice(usize::from(q) * len, len)
            .map_err(|e| VuBackendError::Inflight(std::io::Error::other(e)))
    }

    /// Starts ring `q` of `ring_size` entries whose used index in guest memory is `used_idx`:
    /// a fresh region is initialised (`None`); a used one is repaired and what it says is
    /// still inflight returned.
    pub fn start(
        &self,
        q: u16,
        ring_size: u16,
        used_idx: u16,
    ) -> Result<Option<Resume>, VuBackendError> {
        let r = self.queue(q)?;
        if ring_size > self.info.queue_size {
            return Err(bad(&self.info));
        }
        if get::<u16>(&r, VERSION_AT)? == 0 {
            let zero = vec![0u8; HEADER + ENTRY * usize::from(ring_size)];
            r.write_slice(&zero, 0).map_err(mem_err)?;
            put(&r, DESC_NUM_AT, ring_size)?;
            put(&r, USED_IDX_AT, used_idx)?;
            put(&r, VERSION_AT, VERSION)?;
            return Ok(None);
        }
        let num = get::<u16>(&r, DESC_NUM_AT)?.min(self.info.queue_size);
        let recorded = get::<u16>(&r, USED_IDX_AT)?;
        if recorded != used_idx {
            // The dead backend published a batch it did not finish recording: those heads
            // are complete, whatever their entries say.
            let mut head = get::<u16>(&r, LAST_BATCH_HEAD_AT)?;
            for _ in 0..used_idx.wrapping_sub(recorded) {
                if head >= num {
                    break;
                }
                put(&r, entry(head) + INFLIGHT_AT, 0u8)?;
                head = get::<u16>(&r, entry(head) + NEXT_AT)?;
            }
            put(&r, USED_IDX_AT, used_idx)?;
        }
        let mut pending = Vec::new();
        for head in 0..num {
            if get::<u8>(&r, entry(head) + INFLIGHT_AT)? == 1 {
                pending.push((get::<u64>(&r, entry(head) + COUNTER_AT)?, head));
            }
        }
        pending.sort_unstable();
        let next_counter = pending.last().map_or(0, |(c, _)| c + 1);
        Ok(Some(Resume {
            heads: pending.into_iter().map(|(_, h)| h).collect(),
            next_counter,
        }))
    }

    /// `head` was taken from the available ring as submission number `counter`.
    pub fn take(&self, q: u16, head: u16, counter: u64) -> Result<(), VuBackendError> {
        let r = self.queue(q)?;
        put(&r, entry(head) + COUNTER_AT, counter)?;
        fence(Ordering::Release);
        put(&r, entry(head) + INFLIGHT_AT, 1u8)
    }

    /// `head` is about to be published in the used ring, as a batch of its own.
    pub fn before_used(&self, q: u16, head: u16) -> Result<(), VuBackendError> {
        let r = self.queue(q)?;
        let last = get::<u16>(&r, LAST_BATCH_HEAD_AT)?;
        put(&r, entry(head) + NEXT_AT, last)?;
        put(&r, LAST_BATCH_HEAD_AT, head)?;
        fence(Ordering::Release);
        Ok(())
    }

    /// `head` was published and the used index is now `used_idx`.
    pub fn after_used(&self, q: u16, head: u16, used_idx: u16) -> Result<(), VuBackendError> {
        let r = self.queue(q)?;
        fence(Ordering::Release);
        put(&r, entry(head) + INFLIGHT_AT, 0u8)?;
        fence(Ordering::Release);
        put(&r, USED_IDX_AT, used_idx)
    }
}

fn bad(info: &VhostUserInflight) -> VuBackendError {
    VuBackendError::BadInflight {
        size: info.mmap_size,
        queues: info.num_queues,
        queue_size: info.queue_size,
    }
}

fn entry(head: u16) -> usize {
    HEADER + ENTRY * usize::from(head)
}

fn mem_err(e: vm_memory::volatile_memory::Error) -> VuBackendError {
    VuBackendError::Inflight(std::io::Error::other(e))
}

fn get<T: vm_memory::ByteValued>(r: &VolatileSlice<'_>, at: usize) -> Result<T, VuBackendError> {
    r.read_obj(at).map_err(mem_err)
}

fn put<T: vm_memory::ByteValued>(
    r: &VolatileSlice<'_>,
    at: usize,
    v: T,
) -> Result<(), VuBackendError> {
    r.write_obj(v, at).map_err(mem_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second mapping of the same memory, as the next backend process gets it.
    fn reopen(a: &InflightArea) -> InflightArea {
        InflightArea::adopt(a.file().try_clone().unwrap(), &a.info()).unwrap()
    }

    #[test]
    fn a_fresh_area_resubmits_nothing_and_a_new_backend_gets_the_unfinished_heads_oldest_first() {
        let a = InflightArea::create(1, 256).unwrap();
        assert_eq!(a.info().mmap_size, 4160);
        assert_eq!(a.start(0, 128, 7).unwrap(), None);
        // Heads 5, 2, 9 taken in that order; 2 completes (used index 7 -> 8).
        a.take(0, 5, 0).unwrap();
        a.take(0, 2, 1).unwrap();
        a.take(0, 9, 2).unwrap();
        a.before_used(0, 2).unwrap();
        a.after_used(0, 2, 8).unwrap();
        // The backend dies; the next one adopts the same memory.
        let b = reopen(&a);
        let resume = b.start(0, 128, 8).unwrap();
        assert_eq!(
            resume,
            Some(Resume {
                heads: vec![5, 9],
                next_counter: 3
            })
        );
        // Nothing completed meanwhile: a third backend gets the same.
        assert_eq!(reopen(&b).start(0, 128, 8).unwrap(), resume);
    }

    #[test]
    fn a_batch_published_but_not_recorded_is_not_resubmitted() {
        let a = InflightArea::create(2, 64).unwrap();
        assert_eq!(a.start(1, 64, 0).unwrap(), None);
        a.take(1, 3, 10).unwrap();
        a.take(1, 4, 11).unwrap();
        a.before_used(1, 4).unwrap();
        // Died after the guest saw used index 1, before after_used: head 4 still says inflight.
        let b = reopen(&a);
        let resume = b.start(1, 64, 1).unwrap().unwrap();
        assert_eq!(resume.heads, vec![3]);
        assert_eq!(resume.next_counter, 11);
        // Queue 0 was never started: its region is fresh.
        assert_eq!(b.start(0, 64, 0).unwrap(), None);
    }

    #[test]
    fn an_area_too_small_for_its_geometry_is_refused() {
        let a = InflightArea::create(1, 16).unwrap();
        let mut info = a.info();
        info.num_queues = 4;
        assert!(InflightArea::adopt(a.file().try_clone().unwrap(), &info).is_err());
        assert!(a.start(0, 32, 0).is_err(), "a ring larger than the area");
    }
}
