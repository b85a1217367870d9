//! virtio-net over a tap device.
//!
//! The backend carries plain Ethernet frames, one per read or write: a tap opened with
//! `IFF_TAP | IFF_NO_PI` and *without* `IFF_VNET_HDR` ([`open_tap`] does that), or any other
//! datagram fd (tests use a `SOCK_DGRAM` socketpair). No offloads are offered, so the
//! 12-byte `virtio_net_hdr` the guest puts before each frame carries nothing: the device
//! strips it on transmit and writes a zeroed one (`num_buffers = 1`) on receive.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::Queue;

use super::chain::{self, Activation, Chain, Cursor, QueueFault};
use super::{
    read_config_bytes, GuestMemory, ModelState, VirtioDevice, VirtioError, F_VERSION_1, TYPE_NET,
};

/// Receive queue index.
pub const RX_QUEUE: usize = 0;
/// Transmit queue index.
pub const TX_QUEUE: usize = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// `virtio_net_hdr` with `num_buffers`, as used by virtio 1.x.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame read from the backend.
const MAX_FRAME: usize = 65550;

/// Errors of the network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap was opened with `IFF_VNET_HDR`, which this device does not speak.
    #[error("tap fd has IFF_VNET_HDR set; open it without")]
    VnetHdr,
    /// The backend cannot be made non-blocking.
    #[error("cannot make the tap fd non-blocking")]
    NonBlocking(#[source] io::Error),
}

/// Serializable state of a [`Net`] (the tap itself is a live resource).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NetState {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// A frame read from the tap that waits for a receive buffer.
    #[serde(default)]
    pub pending_rx_frame: Option<Vec<u8>>,
}

/// The backend and the frame it delivered that the guest has no buffer for yet.
struct Port {
    tap: File,
    pending: Option<Vec<u8>>,
    buf: Vec<u8>,
}

/// A virtio network card with one receive and one transmit queue.
pub struct Net {
    port: Port,
    mac: [u8; 6],
    queues: Activation,
}

/// Opens the tap interface `name` (created if missing) as `IFF_TAP | IFF_NO_PI`, without a
/// vnet header, non-blocking and close-on-exec.
pub fn open_tap(name: &str) -> io::Result<File> {
    // SAFETY: ifreq is plain C data for which all zeros is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= req.ifr_name.len() || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}"),
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    let tap = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    // SAFETY: TUNSETIFF reads and updates the ifreq we pass, which lives across the call.
    let r = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tap)
}

/// The interface flags of the tap `fd` is open on (`TUNGETIFF`); an error if it is no tap.
pub fn tap_flags(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<i32> {
    // SAFETY: an all-zero ifreq is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF fills the ifreq we own; on fds that are not taps it fails harmlessly.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNGETIFF stored the flags member of the union.
    Ok(i32::from(unsafe { req.ifr_ifru.ifru_flags }))
}

/// Refuses taps with a vnet header and makes the fd non-blocking.
fn prepare(tap: &File) -> Result<(), NetError> {
    let fd = tap.as_raw_fd();
    // SAFETY: as in open_tap.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF fills the ifreq we own; on fds that are not taps it fails harmlessly.
    if unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req) } == 0 {
        // SAFETY: TUNGETIFF stored the flags member of the union.
        let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
        if flags & libc::IFF_VNET_HDR != 0 {
            return Err(NetError::VnetHdr);
        }
    }
    // SAFETY: fcntl on an fd we own, no pointers involved.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(NetError::NonBlocking(io::Error::last_os_error()));
    }
    Ok(())
}

impl Net {
    /// A card with address `mac` over `tap` (see the module docs for what it must be).
    pub fn new(tap: File, mac: [u8; 6]) -> Result<Self, NetError> {
        prepare(&tap)?;
        Ok(Self {
            port: Port {
                tap,
                pending: None,
                buf: vec![0; MAX_FRAME],
            },
            mac,
            queues: Activation::default(),
        })
    }

    /// Rebuilds the card from its state and its (preserved, not reopened) tap.
    pub fn from_state(state: &NetState, tap: File) -> Result<Self, NetError> {
        let mut net = Self::new(tap, state.mac)?;
        net.port.pending = state.pending_rx_frame.clone();
        Ok(net)
    }

    /// The backend (to preserve its fd across a live update).
    pub fn tap(&self) -> &File {
        &self.port.tap
    }

    /// Moves frames from the tap into receive buffers until either runs out.
    fn receive(&mut self) -> bool {
        let Some((mem, _, queue)) = self.queues.queue(RX_QUEUE) else {
            return false;
        };
        let mut notify = false;
        let result = loop {
            if self.port.pending.is_none() {
                match self.port.read_frame() {
                    Some(frame) => self.port.pending = Some(frame),
                    None => break Ok(()),
                }
            }
            let chain = match chain::pop(queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break Ok(()), // No buffer: the frame waits for the next RX notify.
                Err(e) => break Err(e),
            };
            let frame = self.port.pending.take().unwrap_or_default();
            let len = write_frame(&chain, mem, &frame);
            match chain::complete(queue, mem, chain.head, len) {
                Ok(n) => notify |= n,
                Err(e) => break Err(e),
            }
        };
        self.fault(RX_QUEUE, result) || notify
    }

    /// Sends every frame the guest queued for transmission.
    fn transmit(&mut self) -> bool {
        let Some((mem, _, queue)) = self.queues.queue(TX_QUEUE) else {
            return false;
        };
        let tap = &self.port.tap;
        match chain::drain(queue, mem, |c| send_frame(c, mem, tap)) {
            Ok(notify) => notify,
            Err(e) => self.fault(TX_QUEUE, Err(e)),
        }
    }

    /// Marks the device broken on a queue fault; returns true then (chains completed before
    /// the fault may need an interrupt).
    fn fault(&mut self, queue: usize, result: Result<(), QueueFault>) -> bool {
        match result {
            Ok(()) => false,
            Err(e) => {
                log::warn!("virtio-net: queue {queue}: {e}");
                self.queues.set_broken();
                true
            }
        }
    }
}

impl Port {
    /// The next frame from the backend, `None` when it has none now.
    fn read_frame(&mut self) -> Option<Vec<u8>> {
        loop {
            match self.tap.read(&mut self.buf) {
                Ok(0) => return None,
                Ok(n) => return Some(self.buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) => {
                    log::warn!("virtio-net: tap read failed: {e}");
                    return None;
                }
            }
        }
    }
}

/// Writes header and `frame` into a receive chain; returns the used length (0: dropped).
fn write_frame(chain: &Chain, mem: &GuestMemory, frame: &[u8]) -> u32 {
    let len = VNET_HDR_LEN + frame.len();
    if !chain::in_ram(mem, &chain.writable) || chain.writable_len() < len as u64 {
        log::debug!(
            "virtio-net: receive buffer {} unusable; {len}-byte frame dropped",
            chain.head
        );
        return 0;
    }
    let mut header = [0u8; VNET_HDR_LEN];
    header[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
    let mut out = Cursor::new(&chain.writable);
    match out.write(mem, &header).and_then(|_| out.write(mem, frame)) {
        // len <= VNET_HDR_LEN + MAX_FRAME.
        Ok(_) => len as u32,
        Err(e) => {
            log::debug!("virtio-net: receive buffer {}: {e}", chain.head);
            0
        }
    }
}

/// Sends the frame of a transmit chain to the tap; returns the used length (always 0).
fn send_frame(chain: &Chain, mem: &GuestMemory, mut tap: &File) -> u32 {
    let len = chain.readable_len();
    if !chain::in_ram(mem, &chain.readable)
        || len < VNET_HDR_LEN as u64
        || len > (VNET_HDR_LEN + MAX_FRAME) as u64
    {
        log::debug!(
            "virtio-net: transmit chain {} of {len} bytes dropped",
            chain.head
        );
        return 0;
    }
    let mut data = vec![0u8; len as usize];
    if let Err(e) = Cursor::new(&chain.readable).read(mem, &mut data) {
        log::debug!("virtio-net: transmit chain {}: {e}", chain.head);
        return 0;
    }
    match tap.write(&data[VNET_HDR_LEN..]) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            log::debug!("virtio-net: tap full, frame dropped");
        }
        Err(e) => log::warn!("virtio-net: tap write failed: {e}"),
    }
    0
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        F_VERSION_1 | 1 << VIRTIO_NET_F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio-net: {}-byte config write at {offset:#x} ignored",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        acked_features: u64,
    ) -> Result<(), VirtioError> {
        self.queues.activate(mem, queues, acked_features, 2)
    }

    fn reset(&mut self) {
        self.queues.reset();
        self.port.pending = None;
    }

    fn process_queue(&mut self, index: usize) -> bool {
        match index {
            RX_QUEUE => self.receive(),
            TX_QUEUE => self.transmit(),
            _ => false,
        }
    }

    fn process_backend(&mut self) -> bool {
        self.receive()
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.port.tap.as_raw_fd())
    }

    fn queues(&self) -> &[Queue] {
        self.queues.queues()
    }

    fn needs_reset(&self) -> bool {
        self.queues.is_broken()
    }

    fn state(&self) -> ModelState {
        ModelState::Net(NetState {
            mac: self.mac,
            pending_rx_frame: self.port.pending.clone(),
        })
    }
}
