//! virtio devices (block, net, rng) behind a virtio-mmio transport.
//!
//! Like the other device models in this crate these are pure state machines: the VMM feeds
//! them MMIO accesses, queue notifications and "backend readable" events, and they answer by
//! touching guest memory, their backing file or tap, and calling an interrupt closure. They
//! own no threads, no epoll and no KVM objects.
//!
//! # Layout the VMM uses
//!
//! Each device gets a 4 KiB MMIO window (`MMIO_WINDOW_SIZE`); molt places device `i` at
//! `0xd000_0000 + i * 0x1000` with IRQ `5 + i`. Inside the window:
//!
//! | offset          | what                                                             |
//! |-----------------|------------------------------------------------------------------|
//! | `0x000..0x100`  | virtio-mmio version 2 registers, 32-bit aligned accesses only     |
//! | `0x050`         | `QueueNotify` ([`MmioTransport::NOTIFY_OFFSET`]): value = queue   |
//! | `0x100..`       | device configuration space, any access width                      |
//!
//! Accesses are routed to [`MmioTransport::read`] / [`MmioTransport::write`] with the offset
//! inside the window. A notification can bypass the exit: register an ioeventfd on
//! `base + 0x50`, length 4, with datamatch = queue index, one per queue
//! ([`MmioTransport::queue_count`]), and call [`MmioTransport::notify`] when it fires. The
//! interrupt closure given to the transport should write the device's irqfd.
//!
//! Linux learns about the devices from its command line (needs
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y`), one parameter per device:
//!
//! ```text
//! virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6
//! ```
//!
//! (syntax `<size>@<base>:<irq>[:<platform device id>]`).
//!
//! # Live update
//!
//! [`MmioTransport::state`] captures the transport registers, the queues (with their
//! next-available / next-used indices) and the device state. Requests are processed
//! synchronously inside `notify`/`write`/`backend_ready`, so between two calls every chain
//! taken from an available ring is already in the used ring: a state taken then, restored
//! with [`MmioTransport::from_state`] over the same guest RAM, continues with the first chain
//! not yet taken. After restoring, call [`MmioTransport::resume`] once: a notification that
//! reached the old process but was not processed is not lost that way.

mod block;
mod chain;
mod mmio;
mod net;
mod rng;

use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;

pub use block::{Block, BlockError, BlockState};
pub use mmio::{MmioState, MmioTransport, MMIO_WINDOW_SIZE};
pub use net::{open_tap, tap_flags, Net, NetError, NetState};
pub use rng::{Rng, RngState};

/// Guest memory as the VMM maps it (the same type as `arch::GuestMemory`).
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// virtio device type of a network card.
pub const TYPE_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// virtio device type of a block device.
pub const TYPE_BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// virtio device type of an entropy source.
pub const TYPE_RNG: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

/// Feature bit `VIRTIO_F_VERSION_1` as a mask; every device offers it and the transport
/// requires the driver to accept it.
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Errors of the virtio transport and device activation.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The device got a different number of queues than it has.
    #[error("device has {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues it was given.
        got: usize,
    },
    /// A saved state belongs to another kind of device.
    #[error("saved state is for device type {saved}, the device is type {actual}")]
    DeviceType {
        /// Type in the saved state.
        saved: u32,
        /// Type of the device given.
        actual: u32,
    },
    /// A saved queue cannot be rebuilt.
    #[error("saved state of queue {index} is invalid")]
    QueueState {
        /// Queue index.
        index: usize,
        /// What virtio-queue found wrong.
        #[source]
        source: virtio_queue::Error,
    },
    /// A saved queue does not fit in guest memory.
    #[error("saved queue {0} lies outside guest memory")]
    QueueOutsideMemory(usize),
    /// The device refused activation from a saved state.
    #[error("cannot activate the restored device")]
    Activate(#[source] Box<VirtioError>),
}

/// A virtio device model, driven by a transport ([`MmioTransport`]).
pub trait VirtioDevice: Send {
    /// virtio device type ([`TYPE_BLOCK`], [`TYPE_NET`], [`TYPE_RNG`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver, [`F_VERSION_1`] included.
    fn avail_features(&self) -> u64;
    /// Reads the configuration space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space at `offset`; read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Driver set DRIVER_OK: queues are ready (validated by the transport).
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        acked_features: u64,
    ) -> Result<(), VirtioError>;
    /// Back to the pre-activation state; drops the queues.
    fn reset(&mut self);
    /// Processes queue `index` after a notification. Returns true if the used ring changed
    /// (an interrupt is needed).
    fn process_queue(&mut self, index: usize) -> bool;
    /// The backend has input (net: the tap is readable). Returns true if the used ring changed.
    fn process_backend(&mut self) -> bool {
        false
    }
    /// Fd the VMM should watch for [`VirtioDevice::process_backend`] (net: the tap), if any.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// The queues handed over at activation, in their current state; empty before.
    fn queues(&self) -> &[Queue];
    /// True once the guest broke a queue beyond repair (a descriptor loop, an impossible
    /// available index): the transport then sets DEVICE_NEEDS_RESET and stops processing.
    fn needs_reset(&self) -> bool {
        false
    }
    /// Serializable device state (no queues: the transport saves those).
    fn state(&self) -> ModelState;
}

/// State of one of this crate's devices, tagged by kind.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type")]
pub enum ModelState {
    /// virtio-blk.
    Block(BlockState),
    /// virtio-net.
    Net(NetState),
    /// virtio-rng.
    Rng(RngState),
}

/// Serializable mirror of [`virtio_queue::QueueState`], plus the transport's record of
/// rejected configuration writes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct VirtqState {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Size the driver selected.
    pub size: u16,
    /// The driver set QueueReady.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest address of the used (device) ring.
    pub used_ring: u64,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX in use.
    pub event_idx_enabled: bool,
    /// Bit mask of queue registers whose last write was rejected (1 size, 2 descriptor
    /// table, 4 available ring, 8 used ring); DRIVER_OK fails while one is set.
    pub config_errors: u8,
}

impl VirtqState {
    /// The serializable form of `queue`.
    pub fn of(queue: &Queue, config_errors: u8) -> Self {
        let s = queue.state();
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            config_errors,
        }
    }

    /// Rebuilds the queue, validating sizes and alignments.
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// Copies `config[offset..]` into `data`, zeros past its end.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}
