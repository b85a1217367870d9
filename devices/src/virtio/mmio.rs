//! virtio-mmio transport, version 2 (virtio 1.x "virt" register layout).

use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::{GuestMemory, ModelState, VirtioDevice, VirtioError, VirtqState, F_VERSION_1};

/// Size of each device's MMIO window (the `4K` of `virtio_mmio.device=4K@…`).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x544c_4f4d; // "MOLT"
const CONFIG_START: u64 = 0x100;

const ERR_SIZE: u8 = 1;
const ERR_DESC: u8 = 2;
const ERR_AVAIL: u8 = 4;
const ERR_USED: u8 = 8;

/// Serializable state of a transport and its device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MmioState {
    /// virtio device type, checked on restore.
    pub device_type: u32,
    /// Device status register.
    pub device_status: u32,
    /// DeviceFeaturesSel.
    #[serde(default)]
    pub features_select: u32,
    /// DriverFeaturesSel.
    #[serde(default)]
    pub driver_features_select: u32,
    /// Features the driver accepted (both halves).
    #[serde(default)]
    pub acked_features: u64,
    /// QueueSel.
    #[serde(default)]
    pub queue_select: u32,
    /// InterruptStatus.
    #[serde(default)]
    pub interrupt_status: u32,
    /// ConfigGeneration.
    #[serde(default)]
    pub config_generation: u32,
    /// The queues, with the device's progress through them.
    pub queues: Vec<VirtqState>,
    /// The device's own state.
    pub device: ModelState,
}

/// A virtio device behind the virtio-mmio version 2 register file.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    irq: Box<dyn Fn() + Send>,
    status: u32,
    features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// Queues being configured; moved to the device at DRIVER_OK.
    queues: Vec<Queue>,
    /// Per queue: rejected register writes (`ERR_*`).
    config_errors: Vec<u8>,
}

fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .map(|&max| {
            Queue::new(max).unwrap_or_else(|e| {
                log::error!(
                    "virtio: queue size {max} of the device is invalid ({e}); queue hidden"
                );
                Queue::default()
            })
        })
        .collect()
}

impl MmioTransport {
    /// Offset of the QueueNotify register, where the VMM may place per-queue ioeventfds.
    pub const NOTIFY_OFFSET: u64 = 0x50;

    /// A transport for a device that has not been activated; `irq` raises its interrupt.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory, irq: Box<dyn Fn() + Send>) -> Self {
        let queues = fresh_queues(device.as_ref());
        let config_errors = vec![0; queues.len()];
        Self {
            device,
            mem,
            irq,
            status: 0,
            features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            interrupt_status: 0,
            config_generation: 0,
            queues,
            config_errors,
        }
    }

    /// Rebuilds a transport from its state over (the same) guest memory. `device` must have
    /// been rebuilt from `state.device` and not be activated. Call [`Self::resume`] next.
    pub fn from_state(
        state: &MmioState,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irq: Box<dyn Fn() + Send>,
    ) -> Result<Self, VirtioError> {
        if state.device_type != device.device_type() {
            return Err(VirtioError::DeviceType {
                saved: state.device_type,
                actual: device.device_type(),
            });
        }
        let expected = device.queue_max_sizes().len();
        if state.queues.len() != expected {
            return Err(VirtioError::QueueCount {
                expected,
                got: state.queues.len(),
            });
        }
        let mut queues = Vec::with_capacity(expected);
        for (index, q) in state.queues.iter().enumerate() {
            let queue = q
                .to_queue()
                .map_err(|source| VirtioError::QueueState { index, source })?;
            queues.push(queue);
        }
        let mut t = Self {
            device,
            mem,
            irq,
            status: state.device_status,
            features_select: state.features_select,
            driver_features_select: state.driver_features_select,
            acked_features: state.acked_features,
            queue_select: state.queue_select,
            interrupt_status: state.interrupt_status,
            config_generation: state.config_generation,
            queues,
            config_errors: state.queues.iter().map(|q| q.config_errors).collect(),
        };
        if t.activated() {
            for (index, q) in t.queues.iter().enumerate() {
                if q.ready() && !q.is_valid(&t.mem) {
                    return Err(VirtioError::QueueOutsideMemory(index));
                }
            }
            let queues = std::mem::take(&mut t.queues);
            t.device
                .activate(t.mem.clone(), queues, t.acked_features)
                .map_err(|e| VirtioError::Activate(Box::new(e)))?;
        }
        Ok(t)
    }

    /// The transport's state, queues and device state included.
    pub fn state(&self) -> MmioState {
        let queues = (0..self.queue_count())
            .filter_map(|i| {
                let errors = self.config_errors.get(i).copied().unwrap_or(0);
                self.queue(i).map(|q| VirtqState::of(q, errors))
            })
            .collect();
        MmioState {
            device_type: self.device.device_type(),
            device_status: self.status,
            features_select: self.features_select,
            driver_features_select: self.driver_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues,
            device: self.device.state(),
        }
    }

    /// After [`Self::from_state`], once the interrupt closure works: processes whatever the
    /// driver queued meanwhile (a notification the old process received but did not act on
    /// is not lost), and raises the interrupt again if one was pending (a spurious one is
    /// harmless to the driver).
    pub fn resume(&mut self) {
        let mut used = false;
        if self.usable() {
            for i in 0..self.queue_count() {
                used |= self.device.process_queue(i);
            }
            used |= self.device.process_backend();
            self.after_processing(used);
        }
        if self.interrupt_status != 0 && !used {
            (self.irq)();
        }
    }

    /// Number of queues of the device.
    pub fn queue_count(&self) -> usize {
        self.device.queue_max_sizes().len()
    }

    /// Fd whose readability the VMM reports through [`Self::backend_ready`].
    pub fn backend_fd(&self) -> Option<RawFd> {
        self.device.backend_fd()
    }

    /// The device's type.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// Device status register (for diagnostics: DEVICE_NEEDS_RESET is bit 6).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The driver notified `queue` (QueueNotify write or its ioeventfd).
    pub fn notify(&mut self, queue: usize) {
        if !self.usable() {
            log::debug!("virtio: notify of queue {queue} on an inactive device ignored");
            return;
        }
        if queue >= self.queue_count() {
            log::debug!("virtio: notify of nonexistent queue {queue} ignored");
            return;
        }
        let used = self.device.process_queue(queue);
        self.after_processing(used);
    }

    /// The backend fd is readable.
    pub fn backend_ready(&mut self) {
        if !self.usable() {
            return;
        }
        let used = self.device.process_backend();
        self.after_processing(used);
    }

    /// Guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_START {
            self.device.read_config(offset - CONFIG_START, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 || offset % 4 != 0 {
            log::debug!(
                "virtio: {}-byte register read at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        let value = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => match self.features_select {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            0x34 => self.selected().map_or(0, |q| q.max_size().into()),
            0x44 => self.selected().map_or(0, |q| q.ready().into()),
            0x60 => self.interrupt_status,
            0x70 => self.status,
            // No shared memory regions: length reads as -1.
            0xb0 | 0xb4 => u32::MAX,
            0xfc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Guest write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_START {
            self.device.write_config(offset - CONFIG_START, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!(
                "virtio: {}-byte register write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if offset % 4 != 0 {
            log::debug!("virtio: unaligned register write at {offset:#x} ignored");
            return;
        }
        let v = u32::from_le_bytes(bytes);
        match offset {
            0x14 => self.features_select = v,
            0x20 => self.write_driver_features(v),
            0x24 => self.driver_features_select = v,
            0x30 => self.queue_select = v,
            0x38 | 0x44 | 0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => self.write_queue(offset, v),
            Self::NOTIFY_OFFSET => self.notify(v as usize),
            0x64 => self.interrupt_status &= !v,
            0x70 => self.write_status(v),
            _ => log::debug!("virtio: write of {v:#x} to register {offset:#x} ignored"),
        }
    }

    fn activated(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
    }

    fn usable(&self) -> bool {
        self.activated() && self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0
    }

    fn queue(&self, index: usize) -> Option<&Queue> {
        if self.activated() {
            self.device.queues().get(index)
        } else {
            self.queues.get(index)
        }
    }

    fn selected(&self) -> Option<&Queue> {
        self.queue(self.queue_select as usize)
    }

    fn after_processing(&mut self, used: bool) {
        if used {
            self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
            (self.irq)();
        }
        if self.device.needs_reset() && self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
            log::warn!(
                "virtio: device type {} needs a reset after bad guest input",
                self.device.device_type()
            );
            self.fail();
        }
    }

    /// Sets DEVICE_NEEDS_RESET and tells the driver with a configuration interrupt.
    fn fail(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
        (self.irq)();
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            log::debug!("virtio: driver features written after FEATURES_OK ignored");
            return;
        }
        match self.driver_features_select {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | u64::from(v) << 32,
            s => log::debug!("virtio: driver features word {s} ignored"),
        }
    }

    fn write_queue(&mut self, offset: u64, v: u32) {
        if self.activated() {
            log::debug!("virtio: queue register {offset:#x} written after DRIVER_OK ignored");
            return;
        }
        let index = self.queue_select as usize;
        let (Some(q), Some(errors)) = (
            self.queues.get_mut(index),
            self.config_errors.get_mut(index),
        ) else {
            log::debug!("virtio: register {offset:#x} of nonexistent queue {index} ignored");
            return;
        };
        // Alignment depends on the low half only: a high-half write (bit 0) cannot fail and
        // must not clear the record of a rejected low half.
        let low = |old: u64| GuestAddress((old & !0xffff_ffff) | u64::from(v));
        let high = |old: u64| GuestAddress((old & 0xffff_ffff) | u64::from(v) << 32);
        let (bit, result) = match offset {
            0x38 => (
                ERR_SIZE,
                u16::try_from(v)
                    .map_err(|_| virtio_queue::Error::InvalidSize)
                    .and_then(|size| q.try_set_size(size)),
            ),
            0x44 => {
                q.set_ready(v == 1);
                return;
            }
            0x80 => (ERR_DESC, q.try_set_desc_table_address(low(q.desc_table()))),
            0x84 => (0, q.try_set_desc_table_address(high(q.desc_table()))),
            0x90 => (ERR_AVAIL, q.try_set_avail_ring_address(low(q.avail_ring()))),
            0x94 => (0, q.try_set_avail_ring_address(high(q.avail_ring()))),
            0xa0 => (ERR_USED, q.try_set_used_ring_address(low(q.used_ring()))),
            _ => (0, q.try_set_used_ring_address(high(q.used_ring()))),
        };
        match result {
            Ok(()) => *errors &= !bit,
            Err(e) => {
                log::debug!("virtio: queue {index}: {v:#x} at register {offset:#x} rejected: {e}");
                *errors |= bit;
            }
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let new = v & !self.status;
        // Only a reset clears these (a driver must never clear status bits).
        let sticky =
            VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FEATURES_OK;
        let mut status = v | (self.status & sticky);
        if new & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            status &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        if new & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            status &= !VIRTIO_CONFIG_S_DRIVER_OK;
            self.status = status;
            if self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
                self.activate();
            }
            return;
        }
        self.status = status;
    }

    fn features_acceptable(&self) -> bool {
        let extra = self.acked_features & !self.device.avail_features();
        if extra != 0 {
            log::warn!(
                "virtio: driver accepted features {extra:#x} never offered; FEATURES_OK refused"
            );
            return false;
        }
        if self.acked_features & F_VERSION_1 == 0 {
            log::warn!("virtio: driver did not accept VIRTIO_F_VERSION_1; FEATURES_OK refused");
            return false;
        }
        true
    }

    fn activate(&mut self) {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            log::warn!("virtio: DRIVER_OK without FEATURES_OK refused");
            self.fail();
            return;
        }
        for (index, q) in self.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            let errors = self.config_errors.get(index).copied().unwrap_or(0);
            if errors != 0 || !q.is_valid(&self.mem) {
                log::warn!("virtio: queue {index} badly configured (errors {errors:#x}); DRIVER_OK refused");
                self.fail();
                return;
            }
        }
        let queues = std::mem::take(&mut self.queues);
        match self
            .device
            .activate(self.mem.clone(), queues, self.acked_features)
        {
            Ok(()) => self.status |= VIRTIO_CONFIG_S_DRIVER_OK,
            Err(e) => {
                log::warn!("virtio: activation refused: {e}");
                self.queues = fresh_queues(self.device.as_ref());
                self.fail();
            }
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        self.queues = fresh_queues(self.device.as_ref());
        self.config_errors = vec![0; self.queues.len()];
        self.status = 0;
        self.features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.interrupt_status = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_is_send() {
        fn send<T: Send>() {}
        send::<MmioTransport>();
    }
}
