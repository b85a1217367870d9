//! virtio-mmio devices on the VMM side: where each sits, its interrupt and notification
//! eventfds, its backing file (disk image or tap), and the transport with the device model.
//!
//! The eventfds and backing files live as long as the VMM process; the transports (which hold
//! a mapping of guest RAM) are attached to each KVM VM in turn and rebuilt from their state
//! after an in-process rebuild or a live update. Device `i` sits at
//! `VIRTIO_MMIO_BASE + i * 0x1000` with interrupt `VIRTIO_FIRST_GSI + i`, announced on the
//! kernel command line as `virtio_mmio.device=4K@<base>:<irq>`.
//!
//! [`backends`] opens the backends a configuration names, or takes them over after a
//! handoff.

mod backends;
pub mod vhost_user;

pub use backends::BackendsState;

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use devices::virtio::{
    Block, MmioState, MmioTransport, ModelState, Net, Rng, VirtioDevice, MMIO_WINDOW_SIZE,
};
use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest physical address of the first virtio-mmio window (in the 32-bit MMIO hole).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Interrupt of the first device (IRQ 4 is the serial port).
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// Offset of the InterruptStatus register in a device's window.
const INTERRUPT_STATUS: u64 = 0x60;
/// InterruptStatus bit "used buffer".
const VIRTIO_MMIO_INT_VRING: u8 = 1;
/// Devices the IOAPIC's 24 pins leave room for.
pub const MAX_VIRTIO_DEVICES: usize = 24 - VIRTIO_FIRST_GSI as usize;

/// Errors setting up virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioSetupError {
    /// Too many devices.
    #[error("{0} virtio devices requested; at most {MAX_VIRTIO_DEVICES} fit")]
    TooMany(usize),
    /// A disk image cannot be opened.
    #[error("cannot open disk {0}")]
    Disk(String, #[source] std::io::Error),
    /// A tap cannot be opened.
    #[error("cannot open tap {0}")]
    Tap(String, #[source] std::io::Error),
    /// The device model refused its backend or state.
    #[error("virtio device {0}")]
    Device(usize, #[source] Box<dyn std::error::Error + Send + Sync>),
    /// A saved device state is for another kind of device.
    #[error("virtio device {0}: saved state is for a {1:?} device, the slot holds a {2:?}")]
    WrongKind(usize, VirtioKind, VirtioKind),
    /// The backends cannot be taken over from a handoff.
    #[error("cannot take over the virtio backends")]
    Persist(#[from] crate::persist::PersistError),
    /// A vhost-user backend cannot be used.
    #[error("vhost-user disk {0}")]
    VhostUser(usize, #[source] vhost_user::VhostUserError),
    /// eventfd creation.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// KVM refused the irqfd or ioeventfd.
    #[error("cannot wire virtio device {0} into KVM")]
    Kvm(usize, #[source] kvm_ioctls::Error),
    /// Saved state does not match the configured devices.
    #[error("saved virtio state has {saved} devices, the VM has {configured}")]
    StateMismatch {
        /// In the state.
        saved: usize,
        /// Configured.
        configured: usize,
    },
}

/// What kind of device a slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VirtioKind {
    /// virtio-blk.
    Block,
    /// virtio-net.
    Net,
    /// virtio-rng.
    Rng,
    /// virtio-blk served by a vhost-user backend.
    VhostUserBlock,
}

/// One device: its place, its eventfds, its backend, its transport.
pub struct VirtioSlot {
    /// Kind.
    pub kind: VirtioKind,
    /// Guest physical base of its window.
    pub base: u64,
    /// Its interrupt.
    pub gsi: u32,
    irq: EventFd,
    notify: Vec<EventFd>,
    /// Disk image or tap (kept across rebuilds and live updates).
    pub backing: Option<File>,
    read_only: bool,
    id: String,
    mac: [u8; 6],
    transport: Mutex<Option<MmioTransport>>,
    /// The backend connection of a vhost-user device.
    vhost: Option<Arc<vhost_user::Connection>>,
}

/// State of one device in a `VmState`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotState {
    /// Kind (checked on restore).
    pub kind: VirtioKind,
    /// Transport, queues and device state.
    pub mmio: MmioState,
}

/// One device in `vm.info`.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceInfo {
    /// Its kind.
    pub kind: VirtioKind,
    /// Requests its host backend failed (disks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io_errors: Option<u64>,
    /// The backend connection of a vhost-user device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vhost_user: Option<vhost_user::ConnectionInfo>,
}

/// All virtio devices of the VMM.
pub struct Virtio {
    /// The devices, in window order.
    pub slots: Vec<VirtioSlot>,
    quiesced: AtomicBool,
    /// The KVM VM the devices are attached to (between `attach` and `detach`), and whether
    /// the vhost-user devices' call eventfds are bound in it.
    vm: Mutex<Option<(Arc<VmFd>, bool)>>,
}

fn eventfd() -> Result<EventFd, VirtioSetupError> {
    EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(VirtioSetupError::EventFd)
}

impl Virtio {
    /// The kernel command-line words announcing the devices.
    pub fn cmdline(&self) -> String {
        self.slots
            .iter()
            .map(|s| format!("virtio_mmio.device=4K@{:#x}:{}", s.base, s.gsi))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn device(
        &self,
        i: usize,
        state: Option<&ModelState>,
    ) -> Result<Box<dyn VirtioDevice>, VirtioSetupError> {
        let slot = &self.slots[i];
        let err = |e: Box<dyn std::error::Error + Send + Sync>| VirtioSetupError::Device(i, e);
        let backing = || -> Result<File, VirtioSetupError> {
            let file = slot
                .backing
                .as_ref()
                .ok_or_else(|| err("the device has no backend".into()))?;
            file.try_clone().map_err(|e| err(e.into()))
        };
        Ok(match (slot.kind, state) {
            (VirtioKind::Block, None) => Box::new(
                Block::new(backing()?, slot.read_only, slot.id.clone())
                    .map_err(|e| err(e.into()))?,
            ),
            (VirtioKind::Block, Some(ModelState::Block(s))) => {
                Box::new(Block::from_state(s, backing()?).map_err(|e| err(e.into()))?)
            }
            (VirtioKind::Net, None) => {
                Box::new(Net::new(backing()?, slot.mac).map_err(|e| err(e.into()))?)
            }
            (VirtioKind::Net, Some(ModelState::Net(s))) => {
                Box::new(Net::from_state(s, backing()?).map_err(|e| err(e.into()))?)
            }
            (VirtioKind::VhostUserBlock, None | Some(ModelState::Block(_))) => {
                let conn = slot
                    .vhost
                    .clone()
                    .ok_or_else(|| err("the device has no backend connection".into()))?;
                Box::new(vhost_user::VhostUserBlk::new(conn, slot.id.clone()))
            }
            (VirtioKind::Rng, None) => Box::new(Rng::new()),
            (VirtioKind::Rng, Some(ModelState::Rng(s))) => Box::new(Rng::from_state(s)),
            (kind, Some(s)) => {
                let saved = match s {
                    ModelState::Block(_) => VirtioKind::Block,
                    ModelState::Net(_) => VirtioKind::Net,
                    ModelState::Rng(_) => VirtioKind::Rng,
                };
                return Err(VirtioSetupError::WrongKind(i, saved, kind));
            }
        })
    }

    /// Builds the transports over `mem` (fresh, or from `states`) and wires their interrupts
    /// and notifications into the KVM VM `vm`. The vhost-user devices' interrupts are bound
    /// now on a boot, and when the VMM resumes a restored VM (see [`vhost_user::irqfd`]).
    pub fn attach(
        &self,
        vm: &Arc<VmFd>,
        mem: &arch::GuestMemory,
        states: Option<&[SlotState]>,
    ) -> Result<(), VirtioSetupError> {
        if let Some(states) = states {
            if states.len() != self.slots.len() {
                return Err(VirtioSetupError::StateMismatch {
                    saved: states.len(),
                    configured: self.slots.len(),
                });
            }
        }
        for (i, slot) in self.slots.iter().enumerate() {
            let irq = slot.irq.try_clone().map_err(VirtioSetupError::EventFd)?;
            let raise: Box<dyn Fn() + Send> = Box::new(move || {
                if let Err(e) = irq.write(1) {
                    log::warn!("virtio interrupt: {e}");
                }
            });
            let state = states.map(|s| &s[i]);
            if let Some(s) = state {
                if s.kind != slot.kind {
                    return Err(VirtioSetupError::WrongKind(i, s.kind, slot.kind));
                }
            }
            let device = self.device(i, state.map(|s| &s.mmio.device))?;
            let transport = match state {
                None => MmioTransport::new(device, mem.clone(), raise),
                Some(s) => MmioTransport::from_state(&s.mmio, device, mem.clone(), raise)
                    .map_err(|e| VirtioSetupError::Device(i, e.into()))?,
            };
            if slot.vhost.is_some() {
                if states.is_none() {
                    vhost_user::irqfd::bind(vm, &slot.irq, slot.gsi)
                        .map_err(|e| VirtioSetupError::Kvm(i, e))?;
                }
            } else {
                vm.register_irqfd(&slot.irq, slot.gsi)
                    .map_err(|e| VirtioSetupError::Kvm(i, e))?;
            }
            for (q, evt) in slot.notify.iter().enumerate() {
                let addr = IoEventAddress::Mmio(slot.base + MmioTransport::NOTIFY_OFFSET);
                vm.register_ioevent(evt, &addr, q as u32)
                    .map_err(|e| VirtioSetupError::Kvm(i, e))?;
            }
            *lock(&slot.transport) = Some(transport);
        }
        *lock(&self.vm) = Some((vm.clone(), states.is_none()));
        Ok(())
    }

    /// Drops the transports (before the KVM VM they were wired to goes away).
    pub fn detach(&self) {
        self.bind_vhost_irqfds(false);
        *lock(&self.vm) = None;
        for slot in &self.slots {
            *lock(&slot.transport) = None;
        }
    }

    /// Binds or unbinds the vhost-user devices' call eventfds in the current VM (see
    /// [`vhost_user::irqfd`]).
    fn bind_vhost_irqfds(&self, bind: bool) {
        let mut vm = lock(&self.vm);
        let Some((vm, bound)) = vm.as_mut() else {
            return;
        };
        if *bound == bind {
            return;
        }
        for slot in self.slots.iter().filter(|s| s.vhost.is_some()) {
            let done = if bind {
                vhost_user::irqfd::bind(vm, &slot.irq, slot.gsi).map(|_| ())
            } else {
                vhost_user::irqfd::unbind(vm, &slot.irq, slot.gsi)
            };
            if let Err(e) = done {
                log::error!("vhost-user: irqfd of GSI {} (bind {bind}): {e}", slot.gsi);
            }
        }
        *bound = bind;
    }

    /// The devices' state (call with the vCPUs paused and the devices quiesced).
    pub fn states(&self) -> Vec<SlotState> {
        self.slots
            .iter()
            .filter_map(|s| {
                lock(&s.transport).as_ref().map(|t| SlotState {
                    kind: s.kind,
                    mmio: t.state(),
                })
            })
            .collect()
    }

    /// Each device as `vm.info` shows it.
    pub fn info(&self) -> Vec<DeviceInfo> {
        self.slots
            .iter()
            .map(|s| DeviceInfo {
                kind: s.kind,
                io_errors: match lock(&s.transport).as_ref().map(|t| t.state().device) {
                    Some(ModelState::Block(b)) => Some(b.io_errors),
                    _ => None,
                },
                vhost_user: s.vhost.as_ref().map(|c| c.info()),
            })
            .collect()
    }

    /// Stops (true) or restarts (false) request processing. Restarting processes whatever
    /// the guest queued meanwhile, as its notifications were not acted on.
    pub fn quiesce(&self, stop: bool) {
        let mut laps = crate::laps::Laps::start(if stop {
            "virtio: quiesce"
        } else {
            "virtio: resume"
        });
        self.quiesced.store(stop, Ordering::SeqCst);
        if stop {
            self.bind_vhost_irqfds(false);
            laps.mark("irqfds unbound");
        }
        for conn in self.slots.iter().filter_map(|s| s.vhost.as_ref()) {
            conn.set_quiesced(stop);
        }
        laps.mark("vhost-user");
        if !stop {
            self.bind_vhost_irqfds(true);
            laps.mark("irqfds bound");
            for slot in &self.slots {
                if let Some(t) = lock(&slot.transport).as_mut() {
                    t.resume();
                }
            }
            laps.mark("transports");
        }
        laps.log();
    }

    fn slot_at(&self, addr: u64) -> Option<(&VirtioSlot, u64)> {
        let i = addr.checked_sub(VIRTIO_MMIO_BASE)? / MMIO_WINDOW_SIZE;
        let slot = self.slots.get(i as usize)?;
        Some((slot, addr - slot.base))
    }

    /// A vCPU's MMIO read; false if no device claims `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((slot, offset)) = self.slot_at(addr) else {
            return false;
        };
        match lock(&slot.transport).as_mut() {
            Some(t) => t.read(offset, data),
            None => data.fill(0),
        }
        if slot.vhost.is_some() && offset == INTERRUPT_STATUS && data.len() == 4 {
            // The backend raises the interrupt itself (call eventfd into the irqfd), so the
            // transport never learns of used buffers: the driver always checks its rings.
            data[0] |= VIRTIO_MMIO_INT_VRING;
        }
        true
    }

    /// A vCPU's MMIO write; false if no device claims `addr`.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((slot, offset)) = self.slot_at(addr) else {
            return false;
        };
        if offset == MmioTransport::NOTIFY_OFFSET {
            log::trace!("virtio: queue notify by MMIO exit (no ioeventfd match)");
        }
        if let Some(t) = lock(&slot.transport).as_mut() {
            t.write(offset, data);
        }
        true
    }

    /// The fds the event loop watches: (fd, slot, Some(queue)) for notifications and
    /// (fd, slot, None) for backends.
    pub fn watched_fds(&self) -> Vec<(RawFd, usize, Option<usize>)> {
        let mut fds = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.vhost.is_some() {
                // The backend reads these kicks.
                continue;
            }
            for (q, evt) in slot.notify.iter().enumerate() {
                fds.push((evt.as_raw_fd(), i, Some(q)));
            }
            if slot.kind == VirtioKind::Net {
                if let Some(f) = &slot.backing {
                    fds.push((f.as_raw_fd(), i, None));
                }
            }
        }
        fds
    }

    /// Event-loop work for slot `i`: a queue notification (after draining its eventfd) or
    /// backend input.
    pub fn service(&self, i: usize, queue: Option<usize>) {
        let Some(slot) = self.slots.get(i) else {
            return;
        };
        if let Some(q) = queue {
            let _ = slot.notify[q].read();
            log::trace!("virtio: queue {q} of device {i} notified by ioeventfd");
        }
        if self.quiesced.load(Ordering::SeqCst) {
            return;
        }
        if let Some(t) = lock(&slot.transport).as_mut() {
            match queue {
                Some(q) => t.notify(q),
                None => t.backend_ready(),
            }
        }
    }
}

/// Requests the guest has made available but the devices have not taken yet: what a live
/// update carries over in the queue state.
pub fn pending_requests(states: &[SlotState], mem: &arch::GuestMemory) -> u64 {
    use vm_memory::{Bytes, GuestAddress};
    states
        .iter()
        // A vhost-user backend's progress is its own; molt's copy of the indices is stale.
        .filter(|s| s.kind != VirtioKind::VhostUserBlock)
        .flat_map(|s| s.mmio.queues.iter())
        .filter(|q| q.ready)
        .filter_map(|q| {
            let avail_idx: u16 = mem.read_obj(GuestAddress(q.avail_ring + 2)).ok()?;
            Some(u64::from(avail_idx.wrapping_sub(q.next_avail)))
        })
        .sum()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
