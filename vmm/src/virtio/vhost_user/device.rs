//! The virtio-blk model of a vhost-user disk: registers and configuration space for the
//! transport; the rings belong to the backend through the [`Connection`].

use std::sync::Arc;

use devices::virtio::{BlockState, GuestMemory, ModelState, VirtioDevice, VirtioError, TYPE_BLOCK};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO;
use virtio_queue::Queue;

use super::{Connection, QUEUE_SIZE};

/// virtio-blk served by a vhost-user backend.
pub struct VhostUserBlk {
    conn: Arc<Connection>,
    id: String,
    max_sizes: Vec<u16>,
    /// The queues as the driver configured them (their indices are the backend's business).
    queues: Vec<Queue>,
}

impl VhostUserBlk {
    /// A device over `conn`; `id` is its name in logs and state.
    pub fn new(conn: Arc<Connection>, id: String) -> Self {
        let max_sizes = vec![QUEUE_SIZE; conn.queues];
        Self {
            conn,
            id,
            max_sizes,
            queues: Vec::new(),
        }
    }
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn avail_features(&self) -> u64 {
        self.conn.guest_features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.conn.read_config(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "vhost-user-blk {}: {}-byte configuration write at {offset:#x} ignored",
            self.id,
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        acked_features: u64,
    ) -> Result<(), VirtioError> {
        if queues.len() != self.max_sizes.len() {
            return Err(VirtioError::QueueCount {
                expected: self.max_sizes.len(),
                got: queues.len(),
            });
        }
        self.queues = queues.iter().map(super::copy_queue).collect();
        self.conn.activate(mem, queues, acked_features);
        Ok(())
    }

    fn reset(&mut self) {
        self.queues.clear();
        self.conn.deactivate();
    }

    fn process_queue(&mut self, index: usize) -> bool {
        self.conn.kick(index);
        false
    }

    fn queues(&self) -> &[Queue] {
        &self.queues
    }

    fn state(&self) -> ModelState {
        ModelState::Block(BlockState {
            read_only: self.conn.guest_features() & (1 << VIRTIO_BLK_F_RO) != 0,
            id: self.id.clone(),
            capacity: self.conn.capacity(),
            io_errors: self.conn.failed_requests(),
        })
    }
}
