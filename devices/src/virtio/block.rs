//! virtio-blk over a host file, with synchronous positioned reads and writes.

use std::fs::File;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::chain::{self, Activation, Chain, Cursor, Segment};
use super::{
    read_config_bytes, GuestMemory, ModelState, VirtioDevice, VirtioError, F_VERSION_1, TYPE_BLOCK,
};

/// Bytes per sector, the unit of `capacity` and of request offsets.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest data transfer per copy step, bounding the host buffer a request needs.
const CHUNK: usize = 64 << 10;
/// Request header: type, reserved, sector.
const HEADER_LEN: usize = 16;

/// Errors of the block device; request failures are logged and reach the guest as a status.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file's size cannot be read.
    #[error("cannot read the size of the disk file")]
    FileSize(#[source] std::io::Error),
    /// The serial number does not fit GET_ID.
    #[error("disk id {0:?} is longer than 20 bytes")]
    IdTooLong(String),
    /// A request's buffers are misordered or outside RAM.
    #[error("request buffers are misordered or outside guest RAM")]
    BadBuffers,
    /// A request's header is short, or its buffers have the wrong size or direction.
    #[error("request layout is invalid")]
    BadLayout,
    /// A transfer is empty or not a whole number of sectors.
    #[error("transfer of {0} bytes is not a positive multiple of 512")]
    BadLength(u64),
    /// A transfer reaches past the end of the disk.
    #[error("sectors {sector}..+{sectors} are past the disk's {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Sectors transferred.
        sectors: u64,
        /// Capacity of the disk.
        capacity: u64,
    },
    /// A write to a read-only disk.
    #[error("disk is read-only")]
    ReadOnly,
    /// An unknown request type.
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    /// Guest memory access failed.
    #[error("guest memory access failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// The backing file failed.
    #[error("disk file I/O failed")]
    Io(#[source] std::io::Error),
}

/// Serializable state of a [`Block`] (the file itself is a live resource).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BlockState {
    /// The disk rejects writes.
    pub read_only: bool,
    /// Serial number returned by GET_ID.
    #[serde(default)]
    pub id: String,
    /// Size in sectors as the guest was told.
    pub capacity: u64,
    /// Requests the host's file failed (answered `VIRTIO_BLK_S_IOERR`).
    #[serde(default)]
    pub io_errors: u64,
}

/// The backing file and what the guest knows of it.
struct Disk {
    file: File,
    read_only: bool,
    id: String,
    capacity: u64,
    /// Requests the file failed.
    io_errors: std::sync::atomic::AtomicU64,
}

/// A virtio block device backed by a file.
pub struct Block {
    disk: Disk,
    queues: Activation,
}

impl Block {
    /// A disk over `file` (opened read-write unless `read_only`), its capacity the file size
    /// in whole sectors; `id` (at most 20 bytes) is what GET_ID returns.
    pub fn new(file: File, read_only: bool, id: String) -> Result<Self, BlockError> {
        let len = file.metadata().map_err(BlockError::FileSize)?.len();
        if len % SECTOR_SIZE != 0 {
            log::warn!("virtio-blk: disk size {len} is not a whole number of sectors; tail unused");
        }
        Self::with_capacity(file, read_only, id, len / SECTOR_SIZE, 0)
    }

    /// Rebuilds the device from its state and its (preserved, not reopened) file.
    pub fn from_state(state: &BlockState, file: File) -> Result<Self, BlockError> {
        let len = file.metadata().map_err(BlockError::FileSize)?.len();
        if len / SECTOR_SIZE < state.capacity {
            log::warn!(
                "virtio-blk: disk file shrank to {len} bytes below {} sectors",
                state.capacity
            );
        }
        Self::with_capacity(
            file,
            state.read_only,
            state.id.clone(),
            state.capacity,
            state.io_errors,
        )
    }

    fn with_capacity(
        file: File,
        read_only: bool,
        id: String,
        capacity: u64,
        io_errors: u64,
    ) -> Result<Self, BlockError> {
        if id.len() > VIRTIO_BLK_ID_BYTES as usize {
            return Err(BlockError::IdTooLong(id));
        }
        Ok(Self {
            disk: Disk {
                file,
                read_only,
                id,
                capacity,
                io_errors: io_errors.into(),
            },
            queues: Activation::default(),
        })
    }

    fn config(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[0..8].copy_from_slice(&self.disk.capacity.to_le_bytes());
        // seg_max: a request's data segments, plus header and status, fit the queue.
        c[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }
}

impl Disk {
    /// Executes one request; returns the length to report as used.
    fn execute(&self, chain: &Chain, mem: &GuestMemory, features: u64) -> u32 {
        // The status byte is the last writable byte; without one the request is dropped.
        let Some((status_addr, data)) = split_status(&chain.writable) else {
            log::debug!(
                "virtio-blk: request {} has no status byte; dropped",
                chain.head
            );
            return 0;
        };
        if !vm_memory::GuestMemoryBackend::check_range(mem, status_addr, 1) {
            log::debug!(
                "virtio-blk: status byte of request {} outside RAM; dropped",
                chain.head
            );
            return 0;
        }
        let (status, written) = match self.request(chain, &data, mem, features) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(e) => {
                match &e {
                    BlockError::Io(_) => {
                        self.io_errors
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        log::warn!("virtio-blk: request {}: {e}", chain.head)
                    }
                    _ => log::debug!("virtio-blk: request {}: {e}", chain.head),
                }
                let status = match e {
                    BlockError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
                    _ => VIRTIO_BLK_S_IOERR,
                };
                (status, 0)
            }
        };
        if let Err(e) = mem.write_obj(status as u8, status_addr) {
            log::debug!("virtio-blk: cannot write status: {e}");
            return 0;
        }
        written.saturating_add(1)
    }

    /// Validates and performs a request whose status byte is already known to be usable.
    /// Returns the data bytes written to the guest.
    fn request(
        &self,
        chain: &Chain,
        data_out: &[Segment],
        mem: &GuestMemory,
        features: u64,
    ) -> Result<u32, BlockError> {
        if chain.misordered || !chain::in_ram(mem, &chain.readable) || !chain::in_ram(mem, data_out)
        {
            return Err(BlockError::BadBuffers);
        }
        let mut input = Cursor::new(&chain.readable);
        let mut header = [0u8; HEADER_LEN];
        if input.read(mem, &mut header).map_err(BlockError::Memory)? != HEADER_LEN {
            return Err(BlockError::BadLayout);
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let out_len: u64 = data_out.iter().map(|s| u64::from(s.len)).sum();
        match kind {
            VIRTIO_BLK_T_IN => {
                if input.remaining() != 0 {
                    return Err(BlockError::BadLayout);
                }
                let offset = self.check_range(sector, out_len)?;
                let mut output = Cursor::new(data_out);
                let mut buf = vec![0u8; out_len.min(CHUNK as u64) as usize];
                let mut done = 0u64;
                while done < out_len {
                    let n = (out_len - done).min(CHUNK as u64) as usize;
                    self.file
                        .read_exact_at(&mut buf[..n], offset + done)
                        .map_err(BlockError::Io)?;
                    output.write(mem, &buf[..n]).map_err(BlockError::Memory)?;
                    done += n as u64;
                }
                // check_range bounds out_len by the segments, each at most u32::MAX long, and
                // a chain's total length is below 2^32 (virtio-queue stops longer ones).
                u32::try_from(out_len).map_err(|_| BlockError::BadLength(out_len))
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(BlockError::ReadOnly);
                }
                if out_len != 0 {
                    return Err(BlockError::BadLayout);
                }
                let len = input.remaining();
                let offset = self.check_range(sector, len)?;
                let mut buf = vec![0u8; len.min(CHUNK as u64) as usize];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(CHUNK as u64) as usize;
                    if input.read(mem, &mut buf[..n]).map_err(BlockError::Memory)? != n {
                        return Err(BlockError::BadLayout);
                    }
                    self.file
                        .write_all_at(&buf[..n], offset + done)
                        .map_err(BlockError::Io)?;
                    done += n as u64;
                }
                if features & (1 << VIRTIO_BLK_F_FLUSH) == 0 {
                    // No FLUSH negotiated: the driver expects write-through.
                    self.file.sync_data().map_err(BlockError::Io)?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.read_only {
                    self.file.sync_data().map_err(BlockError::Io)?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                id[..self.id.len()].copy_from_slice(self.id.as_bytes());
                let n = out_len.min(id.len() as u64) as usize;
                Cursor::new(data_out)
                    .write(mem, &id[..n])
                    .map_err(BlockError::Memory)?;
                Ok(n as u32)
            }
            other => Err(BlockError::Unsupported(other)),
        }
    }

    /// Checks a transfer of `len` bytes at `sector`; returns its byte offset in the file.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, BlockError> {
        if len == 0 || len % SECTOR_SIZE != 0 {
            return Err(BlockError::BadLength(len));
        }
        let sectors = len / SECTOR_SIZE;
        let out_of_range = BlockError::OutOfRange {
            sector,
            sectors,
            capacity: self.capacity,
        };
        // The capacity may come from a saved state: keep every step checked.
        let offset = sector.checked_mul(SECTOR_SIZE);
        match (
            sector.checked_add(sectors),
            offset.and_then(|o| o.checked_add(len)),
        ) {
            (Some(end), Some(_)) if end <= self.capacity => offset.ok_or(out_of_range),
            _ => Err(out_of_range),
        }
    }
}

/// Splits the writable buffers into the status byte's address and the data buffers before it.
fn split_status(writable: &[Segment]) -> Option<(GuestAddress, Vec<Segment>)> {
    let (last, rest) = writable.split_last()?;
    let status = last.addr.checked_add(u64::from(last.len.checked_sub(1)?))?;
    let mut data = rest.to_vec();
    if last.len > 1 {
        data.push(Segment {
            addr: last.addr,
            len: last.len - 1,
        });
    }
    Some((status, data))
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let mut f = F_VERSION_1
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if self.disk.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio-blk: {}-byte config write at {offset:#x} ignored",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        acked_features: u64,
    ) -> Result<(), VirtioError> {
        self.queues.activate(mem, queues, acked_features, 1)
    }

    fn reset(&mut self) {
        self.queues.reset();
    }

    fn process_queue(&mut self, index: usize) -> bool {
        let Some((mem, features, queue)) = self.queues.queue(index) else {
            return false;
        };
        let disk = &self.disk;
        match chain::drain(queue, mem, |c| disk.execute(c, mem, features)) {
            Ok(notify) => notify,
            Err(e) => {
                log::warn!("virtio-blk: queue {index}: {e}");
                self.queues.set_broken();
                // Chains completed before the fault are in the used ring.
                true
            }
        }
    }

    fn queues(&self) -> &[Queue] {
        self.queues.queues()
    }

    fn needs_reset(&self) -> bool {
        self.queues.is_broken()
    }

    fn state(&self) -> ModelState {
        ModelState::Block(BlockState {
            read_only: self.disk.read_only,
            id: self.disk.id.clone(),
            capacity: self.disk.capacity,
            io_errors: self
                .disk
                .io_errors
                .load(std::sync::atomic::Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(capacity: u64) -> Disk {
        Disk {
            file: vmm_sys_util::tempfile::TempFile::new().unwrap().into_file(),
            read_only: false,
            id: String::new(),
            capacity,
            io_errors: 0.into(),
        }
    }

    #[test]
    fn range_checks_never_overflow() {
        let d = disk(u64::MAX);
        assert!(d.check_range(u64::MAX / 512, 512).is_err());
        assert!(d.check_range(u64::MAX - 1, 1024).is_err());
        assert_eq!(d.check_range(2, 512).unwrap(), 1024);
        let d = disk(4);
        assert!(d.check_range(3, 512).is_ok());
        assert!(d.check_range(3, 1024).is_err());
        assert!(d.check_range(0, 0).is_err());
        assert!(d.check_range(0, 511).is_err());
    }

    #[test]
    fn status_is_the_last_writable_byte() {
        let seg = |addr, len| Segment {
            addr: GuestAddress(addr),
            len,
        };
        let (status, data) = split_status(&[seg(0x100, 512), seg(0x400, 1)]).unwrap();
        assert_eq!((status, data), (GuestAddress(0x400), vec![seg(0x100, 512)]));
        let (status, data) = split_status(&[seg(0x100, 513)]).unwrap();
        assert_eq!((status, data), (GuestAddress(0x300), vec![seg(0x100, 512)]));
        assert!(split_status(&[]).is_none());
        assert!(split_status(&[seg(0x100, 0)]).is_none());
        assert!(split_status(&[seg(u64::MAX, 2)]).is_none());
    }
}
