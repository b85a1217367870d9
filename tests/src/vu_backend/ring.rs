//! A split virtqueue as the backend runs it, on guest memory it mapped itself: what the
//! frontend configured (size, addresses, base, eventfds) and, once started, the indices.

use std::collections::VecDeque;
use std::fs::File;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::VuBackendError;

const DESC_F_NEXT: u16 = 1;
const DESC_F_INDIRECT: u16 = 4;
const DESC_F_WRITE: u16 = 2;

/// One descriptor of a chain.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    /// Guest physical address of the buffer.
    pub addr: GuestAddress,
    /// Its length.
    pub len: u32,
    /// The device writes it (otherwise reads it).
    pub write: bool,
}

/// A ring while it runs.
pub struct Running {
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    size: u16,
    next_avail: u16,
    next_used: u16,
    /// Submission counter for the inflight area.
    pub counter: u64,
    /// Heads to process again before anything new (from the inflight area).
    pub resubmit: VecDeque<u16>,
}

/// A ring as the frontend configures it.
#[derive(Default)]
pub struct Vring {
    /// Entries (SET_VRING_NUM).
    pub size: u16,
    /// Frontend addresses of the descriptor table, available and used rings.
    pub addrs: Option<[u64; 3]>,
    /// The available index to start at (SET_VRING_BASE).
    pub base: u16,
    /// Where completions are signalled.
    pub call: Option<File>,
    /// What the frontend signals on a notification.
    pub kick: Option<File>,
    /// SET_VRING_ENABLE.
    pub enabled: bool,
    /// Set once the ring runs.
    pub run: Option<Running>,
}

impl Vring {
    /// The ring has everything it needs to run.
    pub fn ready(&self) -> bool {
        self.enabled && self.kick.is_some() && self.addrs.is_some() && self.size > 0
    }
}

impl Running {
    /// A ring at guest addresses `[desc, avail, used]` whose used index in guest memory is
    /// `used_idx`, taking new requests from available index `next_avail`.
    pub fn new(addrs: [GuestAddress; 3], size: u16, next_avail: u16, used_idx: u16) -> Self {
        let [desc, avail, used] = addrs;
        Self {
            desc,
            avail,
            used,
            size,
            next_avail,
            next_used: used_idx,
            counter: 0,
            resubmit: VecDeque::new(),
        }
    }

    /// The next index the backend takes from the available ring.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// The used index as the guest sees it.
    pub fn guest_used_idx(
        mem: &GuestMemoryMmap,
        used: GuestAddress,
    ) -> Result<u16, VuBackendError> {
        mem.load(offset(used, 2), Ordering::Acquire)
            .map_err(VuBackendError::Guest)
    }

    /// Takes the next head the driver made available, if any.
    pub fn pop(&mut self, mem: &GuestMemoryMmap) -> Result<Option<u16>, VuBackendError> {
        let avail_idx: u16 = mem
            .load(offset(self.avail, 2), Ordering::Acquire)
            .map_err(VuBackendError::Guest)?;
        if avail_idx == self.next_avail {
            return Ok(None);
        }
        let slot = 4 + 2 * u64::from(self.next_avail % self.size);
        let head: u16 = mem
            .read_obj(offset(self.avail, slot))
            .map_err(VuBackendError::Guest)?;
        if head >= self.size {
            return Err(VuBackendError::BadChain(head));
        }
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(head))
    }

    /// The descriptors of the chain at `head` (no indirect tables: not offered).
    pub fn chain(&self, mem: &GuestMemoryMmap, head: u16) -> Result<Vec<Desc>, VuBackendError> {
        let mut chain = Vec::new();
        let mut i = head;
        loop {
            if i >= self.size || chain.len() >= usize::from(self.size) {
                return Err(VuBackendError::BadChain(head));
            }
            let mut raw = [0u8; 16];
            mem.read_slice(&mut raw, offset(self.desc, 16 * u64::from(i)))
                .map_err(VuBackendError::Guest)?;
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            if flags & DESC_F_INDIRECT != 0 {
                return Err(VuBackendError::BadChain(head));
            }
            chain.push(Desc {
                addr: GuestAddress(u64::from_le_bytes(raw[..8].try_into().unwrap_or_default())),
                len: u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default()),
                write: flags & DESC_F_WRITE != 0,
            });
            if flags & DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            i = u16::from_le_bytes([raw[14], raw[15]]);
        }
    }

    /// Returns `head` to the driver with `len` bytes written, calling `before_publish` before
    /// the new used index becomes visible; returns that index.
    pub fn push_used(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
        before_publish: impl FnOnce() -> Result<(), VuBackendError>,
    ) -> Result<u16, VuBackendError> {
        let slot = 4 + 8 * u64::from(self.next_used % self.size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, offset(self.used, slot))
            .map_err(VuBackendError::Guest)?;
        before_publish()?;
        self.next_used = self.next_used.wrapping_add(1);
        mem.store(self.next_used, offset(self.used, 2), Ordering::Release)
            .map_err(VuBackendError::Guest)?;
        Ok(self.next_used)
    }
}

fn offset(base: GuestAddress, by: u64) -> GuestAddress {
    GuestAddress(base.0.wrapping_add(by))
}
