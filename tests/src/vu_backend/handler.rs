//! The backend's side of one connection: what the frontend's messages set up (the
//! `vhost` crate parses them and calls [`VhostUserBackendReqHandlerMut`]), and serving the
//! rings it started.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Backend, GpuBackend, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use super::inflight::InflightArea;
use super::ring::{Running, Vring};
use super::{blk, Request, Shared, VuBackendError};

type VhostResult<T> = vhost::vhost_user::Result<T>;

const F_BLK_FLUSH: u64 = 1 << 9;
const F_VERSION_1: u64 = 1 << 32;
/// Bytes of virtio-blk configuration space (capacity first, the rest zero).
const CONFIG_LEN: usize = 60;

/// A request this backend does not take (its feature is not offered).
fn refused<T>() -> VhostResult<T> {
    Err(vhost::vhost_user::Error::InvalidOperation(
        "not offered by the test backend",
    ))
}

fn failed(e: VuBackendError) -> vhost::vhost_user::Error {
    log::warn!("test vhost-user backend: {e}");
    vhost::vhost_user::Error::ReqHandlerError(std::io::Error::other(e.to_string()))
}

/// One frontend's device.
pub(super) struct Device {
    image: Arc<File>,
    /// Sectors.
    capacity: u64,
    shared: Arc<Shared>,
    acked_features: u64,
    mem: Option<GuestMemoryMmap>,
    /// (frontend address, size, guest physical address) of each memory region.
    table: Vec<(u64, u64, u64)>,
    vrings: Vec<Vring>,
    inflight: Option<InflightArea>,
}

impl Device {
    pub(super) fn new(image: Arc<File>, capacity: u64, queues: u16, shared: Arc<Shared>) -> Self {
        Self {
            image,
            capacity,
            shared,
            acked_features: 0,
            mem: None,
            table: Vec::new(),
            vrings: (0..queues).map(|_| Vring::default()).collect(),
            inflight: None,
        }
    }

    /// The kick eventfds of the rings the frontend set up.
    pub(super) fn kicks(&self) -> Vec<RawFd> {
        let kicks = self.vrings.iter().filter_map(|v| v.kick.as_ref());
        kicks.map(AsRawFd::as_raw_fd).collect()
    }

    /// Takes the notification count off kick eventfd `fd` (readable).
    pub(super) fn drain_kick(&self, fd: RawFd) {
        let kick = self.vrings.iter().filter_map(|v| v.kick.as_ref());
        if let Some(mut k) = kick.into_iter().find(|k| k.as_raw_fd() == fd) {
            let mut count = [0u8; 8];
            let _ = k.read(&mut count);
        }
    }

    fn translate(&self, label: u64) -> Result<GuestAddress, VuBackendError> {
        self.table
            .iter()
            .find(|(start, size, _)| label >= *start && label - start < *size)
            .map(|(start, _, gpa)| GuestAddress(gpa + (label - start)))
            .ok_or(VuBackendError::Unmapped(label))
    }

    /// Starts ring `q`: from the inflight area when it lists unfinished requests (they are
    /// processed again first, and new ones follow them in the available ring), else at the
    /// base the frontend set.
    fn start(&mut self, q: usize, mem: &GuestMemoryMmap) -> Result<(), VuBackendError> {
        let Some(addrs) = self.vrings[q].addrs else {
            return Ok(());
        };
        let [desc, used, avail] = addrs.map(|a| self.translate(a));
        let (desc, used, avail) = (desc?, used?, avail?);
        let used_idx = Running::guest_used_idx(mem, used)?;
        let vr = &mut self.vrings[q];
        let resume = match &self.inflight {
            Some(area) => area.start(q as u16, vr.size, used_idx)?,
            None => None,
        };
        let next_avail = match &resume {
            Some(r) => used_idx.wrapping_add(r.heads.len() as u16),
            None => vr.base,
        };
        let mut run = Running::new([desc, avail, used], vr.size, next_avail, used_idx);
        if let Some(r) = resume {
            log::info!(
                "test vhost-user backend: queue {q} resumes with heads {:?} inflight",
                r.heads
            );
            run.counter = r.next_counter;
            run.resubmit = r.heads.into();
        }
        vr.run = Some(run);
        Ok(())
    }

    /// Serves every running ring until it has nothing more. Returns the request it took and
    /// kept, when the test asked it to hold one (the connection is then to be dropped).
    pub(super) fn serve(&mut self) -> Result<Option<Request>, VuBackendError> {
        let Some(mem) = self.mem.clone() else {
            return Ok(None);
        };
        for q in 0..self.vrings.len() {
            if self.vrings[q].run.is_none() && self.vrings[q].ready() {
                self.start(q, &mem)?;
            }
            if let Some(held) = self.serve_ring(q, &mem)? {
                return Ok(Some(held));
            }
        }
        Ok(None)
    }

    fn serve_ring(
        &mut self,
        q: usize,
        mem: &GuestMemoryMmap,
    ) -> Result<Option<Request>, VuBackendError> {
        let Device {
            image,
            capacity,
            shared,
            vrings,
            inflight,
            ..
        } = self;
        let vr = &mut vrings[q];
        let Some(run) = vr.run.as_mut().filter(|_| vr.enabled) else {
            return Ok(None);
        };
        let qi = q as u16;
        loop {
            let (head, again) = match run.resubmit.pop_front() {
                Some(h) => (h, true),
                None => match run.pop(mem)? {
                    Some(h) => (h, false),
                    None => return Ok(None),
                },
            };
            let chain = run.chain(mem, head)?;
            let h = blk::header(mem, &chain)?;
            let req = Request {
                queue: qi,
                head,
                kind: h.kind,
                sector: h.sector,
            };
            if again {
                shared.note(|s| s.resubmitted.push(req));
            } else {
                // Inflight before anything is done with it, as the specification asks.
                if let Some(area) = inflight.as_ref() {
                    area.take(qi, head, run.counter)?;
                }
                run.counter += 1;
                if shared.hold.swap(false, Ordering::SeqCst) {
                    return Ok(Some(req));
                }
            }
            let len = blk::execute(mem, image, *capacity, &chain)?;
            let area = inflight.as_ref();
            let used = run.push_used(mem, head, len, || {
                area.map_or(Ok(()), |a| a.before_used(qi, head))
            })?;
            if let Some(a) = area {
                a.after_used(qi, head, used)?;
            }
            if let Some(mut call) = vr.call.as_ref() {
                call.write_all(&1u64.to_le_bytes())
                    .map_err(VuBackendError::Eventfd)?;
            }
            shared.note(|s| s.completed += 1);
        }
    }

    fn vring(&mut self, index: u32) -> VhostResult<&mut Vring> {
        self.vrings
            .get_mut(index as usize)
            .ok_or(vhost::vhost_user::Error::InvalidParam)
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..8].copy_from_slice(&self.capacity.to_le_bytes());
        c
    }
}

impl VhostUserBackendReqHandlerMut for Device {
    fn set_owner(&mut self) -> VhostResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        let queues = self.vrings.len() as u16;
        *self = Device::new(
            self.image.clone(),
            self.capacity,
            queues,
            self.shared.clone(),
        );
        Ok(())
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        refused()
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        Ok(F_VERSION_1 | F_BLK_FLUSH | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
    }

    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        self.acked_features = features;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VhostResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        let mut regions: Vec<_> = ctx.iter().zip(files).collect();
        regions.sort_by_key(|(r, _)| r.guest_phys_addr);
        let ranges = regions.iter().map(|(r, f)| {
            let file = f
                .try_clone()
                .map_err(|e| failed(VuBackendError::Map(e.to_string())))?;
            Ok((
                GuestAddress(r.guest_phys_addr),
                r.memory_size as usize,
                Some(FileOffset::new(file, r.mmap_offset)),
            ))
        });
        let ranges = ranges.collect::<VhostResult<Vec<_>>>()?;
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges)
            .map_err(|e| failed(VuBackendError::Map(e.to_string())))?;
        self.table = regions
            .iter()
            .map(|(r, _)| (r.user_addr, r.memory_size, r.guest_phys_addr))
            .collect();
        self.mem = Some(mem);
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        let size = u16::try_from(num).map_err(|_| vhost::vhost_user::Error::InvalidParam)?;
        self.vring(index)?.size = size;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostResult<()> {
        self.vring(index)?.addrs = Some([descriptor, used, available]);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        self.vring(index)?.base = base as u16;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        let vr = self.vring(index)?;
        let next = vr.run.take().map_or(vr.base, |r| r.next_avail());
        vr.kick = None;
        vr.enabled = false;
        Ok(VhostUserVringState::new(index, u32::from(next)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let protocol = self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let vr = self.vring(u32::from(index))?;
        vr.kick = fd;
        // Without protocol features a ring runs as soon as it has its kick.
        if protocol == 0 {
            vr.enabled = true;
        }
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        self.vring(u32::from(index))?.call = fd;
        Ok(())
    }

    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> VhostResult<()> {
        refused()
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    fn set_protocol_features(&mut self, _features: u64) -> VhostResult<()> {
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        self.vring(index)?.enabled = enable;
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<Vec<u8>> {
        let config = self.config();
        let mut out = vec![0u8; size as usize];
        let src = config.get(offset as usize..).unwrap_or_default();
        let n = src.len().min(out.len());
        out[..n].copy_from_slice(&src[..n]);
        Ok(out)
    }

    fn set_config(&mut self, _: u32, _: &[u8], _: VhostUserConfigFlags) -> VhostResult<()> {
        refused()
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VhostResult<()> {
        refused()
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        refused()
    }

    fn get_inflight_fd(
        &mut self,
        ask: &VhostUserInflight,
    ) -> VhostResult<(VhostUserInflight, File)> {
        let area = InflightArea::create(ask.num_queues, ask.queue_size).map_err(failed)?;
        let info = area.info();
        let file = area.file().try_clone();
        let file = file.map_err(|e| failed(VuBackendError::Inflight(e)))?;
        self.inflight = Some(area);
        Ok((info, file))
    }

    fn set_inflight_fd(&mut self, info: &VhostUserInflight, file: File) -> VhostResult<()> {
        let area = InflightArea::adopt(file, info).map_err(failed)?;
        self.shared.note(|s| s.areas_adopted += 1);
        self.inflight = Some(area);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        refused()
    }

    fn add_mem_region(
        &mut self,
        _: &VhostUserSingleMemoryRegion,
        _: File,
        _: Option<bool>,
    ) -> VhostResult<Option<VhostUserMemoryRegionBase>> {
        refused()
    }

    fn remove_mem_region(&mut self, _: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        refused()
    }

    fn set_device_state_fd(
        &mut self,
        _: VhostTransferStateDirection,
        _: VhostTransferStatePhase,
        _: File,
    ) -> VhostResult<Option<File>> {
        refused()
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        refused()
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        refused()
    }

    fn set_log_base(&mut self, _: &VhostUserLog, _: File) -> VhostResult<()> {
        refused()
    }
}
