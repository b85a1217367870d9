//! One vhost-user session over a connected socket: feature negotiation when it is new, and
//! starting or stopping the rings. Every message molt sends lives here.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{Negotiated, VhostUserError, CONFIG_LEN, LABEL_BASE};
use devices::virtio::{GuestMemory, F_VERSION_1};

/// How long molt waits for one reply before it declares the backend broken.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Protocol features molt uses when the backend offers them.
fn wanted_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

fn proto(what: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
    move |e| VhostUserError::Protocol(what, e)
}

/// Wraps a connected (or inherited) socket, with reply timeouts.
pub(super) fn frontend(stream: UnixStream, queues: usize) -> Result<Frontend, VhostUserError> {
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
        .map_err(VhostUserError::Socket)?;
    Ok(Frontend::from_stream(stream, queues as u64))
}

/// Negotiates a new session: owner, features, protocol features, queue count, configuration
/// space. Nothing here touches rings.
pub(super) fn negotiate(fe: &mut Frontend, queues: usize) -> Result<Negotiated, VhostUserError> {
    fe.set_owner().map_err(proto("SET_OWNER"))?;
    let features = fe.get_features().map_err(proto("GET_FEATURES"))?;
    if features & F_VERSION_1 == 0 {
        return Err(VhostUserError::NoVersion1(features));
    }
    if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
        return Err(VhostUserError::NoConfig);
    }
    let offered = fe
        .get_protocol_features()
        .map_err(proto("GET_PROTOCOL_FEATURES"))?;
    let acked = offered & wanted_protocol();
    log::info!(
        "vhost-user: backend features {features:#x}, protocol features {:#x}, using {:#x}",
        offered.bits(),
        acked.bits()
    );
    if !acked.contains(VhostUserProtocolFeatures::CONFIG) {
        return Err(VhostUserError::NoConfig);
    }
    fe.set_protocol_features(acked)
        .map_err(proto("SET_PROTOCOL_FEATURES"))?;
    if acked.contains(VhostUserProtocolFeatures::MQ) {
        let n = fe.get_queue_num().map_err(proto("GET_QUEUE_NUM"))?;
        if n < queues as u64 {
            return Err(VhostUserError::TooFewQueues {
                offered: n,
                wanted: queues,
            });
        }
    } else if queues > 1 {
        return Err(VhostUserError::TooFewQueues {
            offered: 1,
            wanted: queues,
        });
    }
    let buf = [0u8; CONFIG_LEN];
    let (_, config) = fe
        .get_config(0, CONFIG_LEN as u32, VhostUserConfigFlags::WRITABLE, &buf)
        .map_err(proto("GET_CONFIG"))?;
    if config.len() != CONFIG_LEN {
        return Err(VhostUserError::BadConfig(config.len()));
    }
    Ok(Negotiated {
        backend_features: features,
        protocol_features: acked.bits(),
        config,
    })
}

/// Re-establishes the frontend library's view of a session molt inherited, which starts
/// empty: only queries, and the protocol features the session already agreed on (the
/// backend stores them again; neither message resets a device or a ring).
pub(super) fn resync(fe: &mut Frontend, n: &Negotiated) -> Result<(), VhostUserError> {
    fe.get_features().map_err(proto("GET_FEATURES"))?;
    fe.get_protocol_features()
        .map_err(proto("GET_PROTOCOL_FEATURES"))?;
    fe.set_protocol_features(VhostUserProtocolFeatures::from_bits_truncate(
        n.protocol_features,
    ))
    .map_err(proto("SET_PROTOCOL_FEATURES"))
}

/// The memory table molt gives backends: each RAM region's memfd, at the fixed "frontend
/// address" `LABEL_BASE + guest physical address` (see the module documentation).
fn memory_table(mem: &GuestMemory) -> Result<Vec<VhostUserMemoryRegionInfo>, VhostUserError> {
    mem.iter()
        .map(|r| {
            let gpa = r.start_addr().0;
            let fo = r
                .file_offset()
                .ok_or(VhostUserError::MemoryNotShared(gpa))?;
            Ok(VhostUserMemoryRegionInfo {
                guest_phys_addr: gpa,
                memory_size: r.len(),
                userspace_addr: LABEL_BASE + gpa,
                mmap_offset: fo.start(),
                mmap_handle: fo.file().as_raw_fd(),
            })
        })
        .collect()
}

/// What starting the rings needs besides the socket.
pub(super) struct RingSetup<'a> {
    pub mem: &'a GuestMemory,
    pub queues: &'a [Queue],
    /// Features the driver accepted.
    pub features: u64,
    /// Per queue, the available-ring index the backend starts at.
    pub bases: &'a [u16],
    pub call: &'a vmm_sys_util::eventfd::EventFd,
    pub kicks: &'a [vmm_sys_util::eventfd::EventFd],
}

/// Starts every ready ring: features, memory table, inflight area, then per ring size, base,
/// addresses, call and kick, and enables it.
pub(super) fn start_rings(
    fe: &mut Frontend,
    n: &Negotiated,
    inflight: Option<&(std::fs::File, VhostUserInflight)>,
    s: &RingSetup<'_>,
) -> Result<(), VhostUserError> {
    let protocol = n.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    fe.set_features(s.features | protocol)
        .map_err(proto("SET_FEATURES"))?;
    fe.set_mem_table(&memory_table(s.mem)?)
        .map_err(proto("SET_MEM_TABLE"))?;
    if let Some((file, info)) = inflight {
        fe.set_inflight_fd(info, file.as_raw_fd())
            .map_err(proto("SET_INFLIGHT_FD"))?;
    }
    for (i, q) in s.queues.iter().enumerate().filter(|(_, q)| q.ready()) {
        fe.set_vring_num(i, q.size())
            .map_err(proto("SET_VRING_NUM"))?;
        fe.set_vring_base(i, s.bases.get(i).copied().unwrap_or(0))
            .map_err(proto("SET_VRING_BASE"))?;
        let addr = VringConfigData {
            queue_max_size: q.max_size(),
            queue_size: q.size(),
            flags: 0,
            desc_table_addr: LABEL_BASE + q.desc_table(),
            used_ring_addr: LABEL_BASE + q.used_ring(),
            avail_ring_addr: LABEL_BASE + q.avail_ring(),
            log_addr: None,
        };
        fe.set_vring_addr(i, &addr)
            .map_err(proto("SET_VRING_ADDR"))?;
        // The call eventfd before the kick: a backend starts serving a ring as soon as it
        // has its kick eventfd, and after a reconnection that eventfd already counts the
        // guest's notifications, so requests complete at once. libvhost-user (the library of
        // qemu-storage-daemon) drops the connection when it completes one with no call
        // eventfd ("vu_panic: Error writing eventfd").
        fe.set_vring_call(i, s.call)
            .map_err(proto("SET_VRING_CALL"))?;
        let kick = s.kicks.get(i).ok_or(VhostUserError::NotConnected)?;
        fe.set_vring_kick(i, kick)
            .map_err(proto("SET_VRING_KICK"))?;
        if protocol != 0 {
            fe.set_vring_enable(i, true)
                .map_err(proto("SET_VRING_ENABLE"))?;
        }
    }
    Ok(())
}

/// Asks the backend for an inflight-tracking area for `queues` queues of `size` entries.
pub(super) fn inflight_area(
    fe: &mut Frontend,
    queues: usize,
    size: u16,
) -> Result<(std::fs::File, VhostUserInflight), VhostUserError> {
    let ask = VhostUserInflight {
        num_queues: queues as u16,
        queue_size: size,
        ..Default::default()
    };
    let (info, file) = fe.get_inflight_fd(&ask).map_err(proto("GET_INFLIGHT_FD"))?;
    Ok((file, info))
}

/// Stops every ready ring (the driver reset the device): GET_VRING_BASE per ring.
pub(super) fn stop_rings(fe: &Frontend, queues: &[Queue]) -> Result<(), VhostUserError> {
    for (i, _) in queues.iter().enumerate().filter(|(_, q)| q.ready()) {
        fe.get_vring_base(i).map_err(proto("GET_VRING_BASE"))?;
    }
    Ok(())
}
