//! Taking descriptor chains from a queue without trusting them.
//!
//! virtio-queue's chain iterator quietly stops at a descriptor loop, an index past the queue
//! or an unreadable table; [`pop`] turns that into [`QueueFault::BrokenChain`]. Buffers are
//! only described here ([`Segment`]s); whether they lie in RAM is for the device to check
//! with [`in_ram`], so that it can still report an error through a usable status byte.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryError};

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::{GuestMemory, VirtioError};

/// Why a queue cannot be processed any further.
#[derive(Debug, thiserror::Error)]
pub(crate) enum QueueFault {
    /// The available ring index is unreadable or runs ahead by more than the queue size.
    #[error("available ring is corrupt")]
    AvailRing(#[source] virtio_queue::Error),
    /// The chain does not end: a loop, a `next` past the queue, or a table outside RAM.
    #[error("descriptor chain at head {0} does not end")]
    BrokenChain(u16),
    /// Writing the used ring failed.
    #[error("cannot write the used ring")]
    UsedRing(#[source] virtio_queue::Error),
}

/// One guest buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A descriptor chain split into device-readable and device-writable buffers.
#[derive(Debug, Default)]
pub(crate) struct Chain {
    /// Head descriptor index, to return in the used ring.
    pub head: u16,
    /// Device-readable buffers, in order.
    pub readable: Vec<Segment>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Segment>,
    /// A readable buffer followed a writable one (forbidden by the spec).
    pub misordered: bool,
}

impl Chain {
    /// Total length of the readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Total length of the writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// A device's queues between DRIVER_OK and reset, and whether a driver error broke them
/// (the device then ignores them until the driver resets it).
#[derive(Default)]
pub(crate) struct Activation {
    active: Option<Active>,
    broken: bool,
}

impl Activation {
    /// Takes the queues at DRIVER_OK, checking there are `expected` of them.
    pub fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        features: u64,
        expected: usize,
    ) -> Result<(), VirtioError> {
        self.active = Some(Active::new(mem, queues, features, expected)?);
        self.broken = false;
        Ok(())
    }

    /// Back to the state before DRIVER_OK.
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Guest memory, accepted features and queue `index`, while active and not broken.
    pub fn queue(&mut self, index: usize) -> Option<(&GuestMemory, u64, &mut Queue)> {
        if self.broken {
            return None;
        }
        let active = self.active.as_mut()?;
        let queue = active.queues.get_mut(index)?;
        Some((&active.mem, active.features, queue))
    }

    /// The queues (empty before DRIVER_OK).
    pub fn queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| &a.queues)
    }

    /// Marks the queues unusable until the next reset.
    pub fn set_broken(&mut self) {
        self.broken = true;
    }

    /// Whether a driver error broke the queues.
    pub fn is_broken(&self) -> bool {
        self.broken
    }
}

/// What a device holds between DRIVER_OK and reset.
struct Active {
    /// Guest memory.
    mem: GuestMemory,
    /// The queues, as validated by the transport.
    queues: Vec<Queue>,
    /// Features the driver accepted.
    features: u64,
}

impl Active {
    /// Checks that the device got `expected` queues.
    fn new(
        mem: GuestMemory,
        queues: Vec<Queue>,
        features: u64,
        expected: usize,
    ) -> Result<Self, VirtioError> {
        if queues.len() != expected {
            return Err(VirtioError::QueueCount {
                expected,
                got: queues.len(),
            });
        }
        Ok(Self {
            mem,
            queues,
            features,
        })
    }
}

/// Takes every chain available in `queue`, lets `handle` execute it and returns it with the
/// length `handle` wrote. Returns whether the used ring changed and the driver wants to know.
pub(crate) fn drain(
    queue: &mut Queue,
    mem: &GuestMemory,
    mut handle: impl FnMut(&Chain) -> u32,
) -> Result<bool, QueueFault> {
    let mut notify = false;
    while let Some(chain) = pop(queue, mem)? {
        let len = handle(&chain);
        notify |= complete(queue, mem, chain.head, len)?;
    }
    Ok(notify)
}

/// Takes the next chain from `queue`. `Ok(None)` when the ring is empty or the queue is not
/// ready.
pub(crate) fn pop(queue: &mut Queue, mem: &GuestMemory) -> Result<Option<Chain>, QueueFault> {
    let mut avail = match queue.iter(mem) {
        Ok(avail) => avail,
        Err(virtio_queue::Error::QueueNotReady) => return Ok(None),
        Err(e) => return Err(QueueFault::AvailRing(e)),
    };
    let Some(descriptors) = avail.next() else {
        return Ok(None);
    };
    let mut chain = Chain {
        head: descriptors.head_index(),
        ..Chain::default()
    };
    let mut ended = false;
    for d in descriptors {
        ended = !d.has_next();
        let segment = Segment {
            addr: d.addr(),
            len: d.len(),
        };
        if d.is_write_only() {
            chain.writable.push(segment);
        } else {
            chain.misordered |= !chain.writable.is_empty();
            chain.readable.push(segment);
        }
    }
    if !ended {
        return Err(QueueFault::BrokenChain(chain.head));
    }
    Ok(Some(chain))
}

/// Returns `head` to the driver with `len` bytes written. Returns whether the driver wants
/// an interrupt for it.
pub(crate) fn complete(
    queue: &mut Queue,
    mem: &GuestMemory,
    head: u16,
    len: u32,
) -> Result<bool, QueueFault> {
    queue
        .add_used(mem, head, len)
        .map_err(QueueFault::UsedRing)?;
    queue.needs_notification(mem).map_err(QueueFault::UsedRing)
}

/// True if every byte of `segments` is guest RAM.
pub(crate) fn in_ram(mem: &GuestMemory, segments: &[Segment]) -> bool {
    segments
        .iter()
        .all(|s| vm_memory::GuestMemoryBackend::check_range(mem, s.addr, s.len as usize))
}

/// A position in a list of segments, read or written sequentially.
pub(crate) struct Cursor<'a> {
    segments: &'a [Segment],
    index: usize,
    offset: u32,
}

impl<'a> Cursor<'a> {
    /// A cursor at the first byte of `segments`.
    pub fn new(segments: &'a [Segment]) -> Self {
        Self {
            segments,
            index: 0,
            offset: 0,
        }
    }

    /// Bytes left.
    pub fn remaining(&self) -> u64 {
        let rest: u64 = self
            .segments
            .iter()
            .skip(self.index)
            .map(|s| u64::from(s.len))
            .sum();
        rest - u64::from(self.offset)
    }

    /// The next contiguous piece, at most `max` bytes, and advances past it.
    fn next_piece(&mut self, max: usize) -> Option<(GuestAddress, usize)> {
        while let Some(s) = self.segments.get(self.index) {
            let left = (s.len - self.offset) as usize;
            if left == 0 {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            let n = left.min(max);
            let addr = s.addr.checked_add(u64::from(self.offset))?;
            // n <= left <= u32::MAX.
            self.offset += n as u32;
            return Some((addr, n));
        }
        None
    }

    /// Copies guest bytes into `buf`; returns how many (less than `buf.len()` at the end).
    pub fn read(&mut self, mem: &GuestMemory, buf: &mut [u8]) -> Result<usize, GuestMemoryError> {
        let mut done = 0;
        while done < buf.len() {
            let Some((addr, n)) = self.next_piece(buf.len() - done) else {
                break;
            };
            mem.read_slice(&mut buf[done..done + n], addr)?;
            done += n;
        }
        Ok(done)
    }

    /// Copies `buf` into guest memory; returns how many bytes fitted.
    pub fn write(&mut self, mem: &GuestMemory, buf: &[u8]) -> Result<usize, GuestMemoryError> {
        let mut done = 0;
        while done < buf.len() {
            let Some((addr, n)) = self.next_piece(buf.len() - done) else {
                break;
            };
            mem.write_slice(&buf[done..done + n], addr)?;
            done += n;
        }
        Ok(done)
    }
}

#[cfg(test)]
#[path = "chain_props.rs"]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_spans_segments() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let segs = [
            Segment {
                addr: GuestAddress(0x100),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x200),
                len: 0,
            },
            Segment {
                addr: GuestAddress(0x300),
                len: 5,
            },
        ];
        let mut w = Cursor::new(&segs);
        assert_eq!(w.remaining(), 8);
        assert_eq!(w.write(&mem, b"abcdefghij").unwrap(), 8);
        assert_eq!(w.remaining(), 0);
        let mut buf = [0u8; 4];
        mem.read_slice(&mut buf, GuestAddress(0x300)).unwrap();
        assert_eq!(&buf, b"defg");
        let mut r = Cursor::new(&segs);
        let mut all = [0u8; 10];
        assert_eq!(r.read(&mem, &mut all).unwrap(), 8);
        assert_eq!(&all[..8], b"abcdefgh");
    }

    #[test]
    fn ram_check() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let ok = Segment {
            addr: GuestAddress(0xff0),
            len: 0x10,
        };
        let bad = Segment {
            addr: GuestAddress(0xff0),
            len: 0x11,
        };
        assert!(in_ram(&mem, &[ok]));
        assert!(!in_ram(&mem, &[ok, bad]));
    }
}
