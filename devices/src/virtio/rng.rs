//! virtio-rng: fills the guest's buffers from the host's getrandom(2).

use std::io;

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;

use super::chain::{self, Activation, Chain, Cursor};
use super::{GuestMemory, ModelState, VirtioDevice, VirtioError, F_VERSION_1, TYPE_RNG};

/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes given per request; the driver asks again for more.
const MAX_PER_REQUEST: usize = 64 << 10;

/// Serializable state of an [`Rng`]: it has none, the type lets records grow.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RngState {}

/// A virtio entropy device.
#[derive(Default)]
pub struct Rng {
    queues: Activation,
}

impl Rng {
    /// A new device.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the device from its state.
    pub fn from_state(_state: &RngState) -> Self {
        Self::new()
    }
}

/// Fills `buf` from getrandom(2).
fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, memory we borrow
        // mutably for the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Fills the chain's writable buffers (up to [`MAX_PER_REQUEST`]); returns the bytes given.
fn fill(chain: &Chain, mem: &GuestMemory) -> u32 {
    if !chain::in_ram(mem, &chain.writable) {
        log::debug!("virtio-rng: request {} has buffers outside RAM", chain.head);
        return 0;
    }
    let len = chain.writable_len().min(MAX_PER_REQUEST as u64) as usize;
    let mut buf = vec![0u8; len];
    if let Err(e) = getrandom(&mut buf) {
        log::warn!("virtio-rng: getrandom failed: {e}");
        return 0;
    }
    match Cursor::new(&chain.writable).write(mem, &buf) {
        // len <= MAX_PER_REQUEST.
        Ok(n) => n as u32,
        Err(e) => {
            log::debug!("virtio-rng: request {}: {e}", chain.head);
            0
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio-rng: {}-byte config write at {offset:#x} ignored",
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
        let Some((mem, _, queue)) = self.queues.queue(index) else {
            return false;
        };
        match chain::drain(queue, mem, |c| fill(c, mem)) {
            Ok(notify) => notify,
            Err(e) => {
                log::warn!("virtio-rng: queue {index}: {e}");
                self.queues.set_broken();
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
        ModelState::Rng(RngState {})
    }
}
