//! virtio-blk whose data path is a vhost-user backend (`--disk vhost_user=on,socket=PATH`).
//!
//! molt keeps the virtio-mmio registers and the configuration space; the backend reads the
//! rings and guest RAM directly (the RAM memfds are shared with SET_MEM_TABLE), takes the
//! guest's notifications from the kick eventfds KVM signals on a QueueNotify write
//! (ioeventfds) and raises the interrupt through the call eventfd KVM injects (the irqfd).
//!
//! # Live update: the backend notices nothing
//!
//! The socket, the call and kick eventfds and the inflight area are kept fds (roles
//! `virtio{i}`, `vhost{i}-call`, `vhost{i}-kick{q}`, `vhost{i}-inflight`); the new process
//! registers the same eventfds as irqfd and ioeventfds in its new KVM VM and sends nothing.
//! The addresses the backend translates (memory table and ring addresses) are not molt's
//! mappings but fixed labels, `LABEL_BASE + guest physical address`: the backend maps the
//! memfds itself, so its view stays valid whatever address the new image maps RAM at, and no
//! new memory table or ring address is ever needed. The frontend library's cached feature
//! state starts empty on an inherited socket; molt keeps the negotiated features in its own
//! state and re-establishes the library's view only when the guest re-initializes the device.
//!
//! # A backend that dies
//!
//! [`monitor`] notices the hang-up, keeps the guest running, and reconnects when a backend
//! listens on the socket again. With `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` the new backend
//! gets the old inflight area and resubmits what was in flight; without it, the requests the
//! dead backend had taken are completed with `VIRTIO_BLK_S_IOERR` (assuming it took them in
//! order, as every known backend does).

mod device;
pub mod irqfd;
mod monitor;
mod session;
#[cfg(test)]
mod tests;

pub use device::VhostUserBlk;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::Frontend;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use devices::virtio::GuestMemory;

use crate::persist::{FdRole, PersistError, SaveFds};

/// Where the backend's view of guest RAM starts: "frontend virtual address" of guest physical
/// address 0 in every memory table and ring address molt sends.
pub const LABEL_BASE: u64 = 0x6000_0000_0000;
/// Bytes of virtio-blk configuration space molt reads from the backend.
pub const CONFIG_LEN: usize = 60;
/// Size of each request queue.
pub const QUEUE_SIZE: u16 = 256;

/// Errors talking to a vhost-user backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// Nobody accepts on the socket.
    #[error("cannot connect to the vhost-user backend at {0}")]
    Connect(String, #[source] std::io::Error),
    /// A message failed, or the backend's answer is malformed.
    #[error("vhost-user {0} failed")]
    Protocol(&'static str, #[source] vhost::Error),
    /// The backend is a legacy device.
    #[error("the backend does not offer VIRTIO_F_VERSION_1 (features {0:#x})")]
    NoVersion1(u64),
    /// molt cannot learn the disk's size.
    #[error(
        "the backend does not offer VHOST_USER_PROTOCOL_F_CONFIG (molt needs the disk's capacity)"
    )]
    NoConfig,
    /// Fewer queues than configured.
    #[error("the backend has {offered} queues, {wanted} configured")]
    TooFewQueues {
        /// What the backend has.
        offered: u64,
        /// What the configuration asks for.
        wanted: usize,
    },
    /// The configuration space has an unexpected size.
    #[error("the backend's configuration space is {0} bytes, expected {CONFIG_LEN}")]
    BadConfig(usize),
    /// A new backend lacks features the driver already uses.
    #[error("the new backend lacks features {0:#x} the guest's driver uses")]
    LostFeatures(u64),
    /// Guest RAM cannot be shared.
    #[error("guest memory region at {0:#x} has no fd to share with the backend")]
    MemoryNotShared(u64),
    /// The backend sent something nobody asked for.
    #[error("the backend sent {0} unsolicited bytes")]
    Unsolicited(usize),
    /// The backend closed the connection.
    #[error("the backend closed the connection")]
    HungUp,
    /// No backend is connected.
    #[error("no backend connected")]
    NotConnected,
    /// Socket options.
    #[error("cannot set up the socket")]
    Socket(#[source] std::io::Error),
}

/// What a session agreed on (kept across live updates).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Negotiated {
    /// virtio features the backend offers.
    pub backend_features: u64,
    /// Protocol features molt acknowledged.
    pub protocol_features: u64,
    /// The device's configuration space.
    pub config: Vec<u8>,
}

/// The inflight area's geometry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InflightState {
    /// Bytes of the area.
    pub mmap_size: u64,
    /// Offset in its fd.
    pub mmap_offset: u64,
    /// Queues it covers.
    pub num_queues: u16,
    /// Entries per queue.
    pub queue_size: u16,
}

/// A vhost-user device's connection in a handoff record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectionState {
    /// Virtio slot.
    pub slot: usize,
    /// What the session agreed on.
    pub negotiated: Negotiated,
    /// A backend was connected (its socket is kept as `virtio{slot}`).
    pub connected: bool,
    /// The backend runs the rings of the current activation.
    pub running: bool,
    /// The inflight area (kept as `vhost{slot}-inflight`).
    pub inflight: Option<InflightState>,
    /// Reconnections so far.
    pub reconnects: u64,
    /// Requests completed with an error after a backend died.
    pub failed_requests: u64,
}

/// A vhost-user device in `vm.info`.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionInfo {
    /// The backend's socket.
    pub socket: PathBuf,
    /// `connected` or `disconnected`.
    pub state: &'static str,
    /// Reconnections so far.
    pub reconnects: u64,
    /// Requests completed with an error after a backend died.
    pub failed_requests: u64,
    /// Why the last connection ended or a reconnection failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The driver's rings as the backend runs them.
struct Rings {
    mem: GuestMemory,
    queues: Vec<Queue>,
    features: u64,
}

struct Inner {
    frontend: Option<Frontend>,
    /// The session's socket (the frontend holds a duplicate).
    socket: Option<Arc<UnixStream>>,
    /// The frontend library's feature view is not established yet (inherited socket).
    adopted: bool,
    negotiated: Negotiated,
    rings: Option<Rings>,
    running: bool,
    inflight: Option<(File, VhostUserInflight)>,
    reconnects: u64,
    failed_requests: u64,
    last_error: Option<String>,
}

/// One vhost-user device's link to its backend, shared by the device model (driven by
/// vCPUs) and the [`monitor`] thread.
pub struct Connection {
    path: PathBuf,
    queues: usize,
    call: EventFd,
    kicks: Vec<EventFd>,
    quiesced: AtomicBool,
    inner: Mutex<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The eventfds of a device: call (irqfd) and one kick (ioeventfd) per queue.
pub struct EventFds {
    /// Call.
    pub call: EventFd,
    /// Kicks.
    pub kicks: Vec<EventFd>,
}

impl Connection {
    fn with(path: &Path, fds: EventFds, inner: Inner, quiesced: bool) -> Arc<Self> {
        let conn = Arc::new(Self {
            path: path.to_path_buf(),
            queues: fds.kicks.len(),
            call: fds.call,
            kicks: fds.kicks,
            quiesced: AtomicBool::new(quiesced),
            inner: Mutex::new(inner),
        });
        monitor::spawn(&conn);
        conn
    }

    /// Connects to the backend at `path` and negotiates (a boot).
    pub fn connect(path: &Path, fds: EventFds) -> Result<Arc<Self>, VhostUserError> {
        let (frontend, socket, negotiated) = open_session(path, fds.kicks.len())?;
        let inner = Inner {
            frontend: Some(frontend),
            socket: Some(Arc::new(socket)),
            adopted: false,
            negotiated,
            rings: None,
            running: false,
            inflight: None,
            reconnects: 0,
            failed_requests: 0,
            last_error: None,
        };
        Ok(Self::with(path, fds, inner, false))
    }

    /// Takes over a session from a handoff: the socket (if one was connected), the inflight
    /// area. Sends nothing; starts quiesced (the VMM resumes it).
    pub fn adopt(
        path: &Path,
        fds: EventFds,
        state: &ConnectionState,
        socket: Option<OwnedFd>,
        inflight: Option<File>,
    ) -> Result<Arc<Self>, VhostUserError> {
        let (frontend, socket) = match socket {
            Some(fd) => {
                let stream = UnixStream::from(fd);
                let dup = stream.try_clone().map_err(VhostUserError::Socket)?;
                (
                    Some(session::frontend(dup, fds.kicks.len())?),
                    Some(Arc::new(stream)),
                )
            }
            None => (None, None),
        };
        let inflight = inflight.zip(state.inflight).map(|(f, i)| {
            (
                f,
                VhostUserInflight::new(i.mmap_size, i.mmap_offset, i.num_queues, i.queue_size),
            )
        });
        let inner = Inner {
            running: state.running && frontend.is_some(),
            frontend,
            socket,
            adopted: true,
            negotiated: state.negotiated.clone(),
            rings: None,
            inflight,
            reconnects: state.reconnects,
            failed_requests: state.failed_requests,
            last_error: None,
        };
        Ok(Self::with(path, fds, inner, true))
    }

    /// The state a handoff carries; declares the socket (if connected) and the inflight
    /// area as device `slot`'s (the eventfds are the slot's to declare).
    pub fn save(&self, slot: usize, fds: &mut SaveFds) -> Result<ConnectionState, PersistError> {
        let inner = lock(&self.inner);
        if let Some(s) = &inner.socket {
            fds.keep(FdRole::DeviceBacking(slot), s.as_ref())?;
        }
        if let Some((f, _)) = &inner.inflight {
            fds.keep(FdRole::VhostInflight(slot), f)?;
        }
        Ok(ConnectionState {
            slot,
            negotiated: inner.negotiated.clone(),
            connected: inner.socket.is_some(),
            running: inner.running,
            inflight: inner.inflight.as_ref().map(|(_, i)| InflightState {
                mmap_size: i.mmap_size,
                mmap_offset: i.mmap_offset,
                num_queues: i.num_queues,
                queue_size: i.queue_size,
            }),
            reconnects: inner.reconnects,
            failed_requests: inner.failed_requests,
        })
    }

    /// `vm.info`'s view.
    pub fn info(&self) -> ConnectionInfo {
        let inner = lock(&self.inner);
        ConnectionInfo {
            socket: self.path.clone(),
            state: if inner.socket.is_some() {
                "connected"
            } else {
                "disconnected"
            },
            reconnects: inner.reconnects,
            failed_requests: inner.failed_requests,
            last_error: inner.last_error.clone(),
        }
    }

    /// Stops (true) or restarts the monitor's work; restarting signals each queue's
    /// interrupt once, so completions the backend made while the VMM was switching reach
    /// the driver.
    pub fn set_quiesced(&self, stop: bool) {
        self.quiesced.store(stop, Ordering::SeqCst);
        if !stop {
            for _ in 0..self.queues {
                if let Err(e) = self.call.write(1) {
                    log::warn!("vhost-user {}: interrupt: {e}", self.path.display());
                }
            }
        }
    }

    fn quiesced(&self) -> bool {
        self.quiesced.load(Ordering::SeqCst)
    }

    /// Features the guest is offered: the backend's, less what molt cannot pass on.
    pub fn guest_features(&self) -> u64 {
        use virtio_bindings::virtio_blk::*;
        use virtio_bindings::virtio_config::*;
        use virtio_bindings::virtio_ring::*;
        let mut known = [
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_GEOMETRY,
            VIRTIO_BLK_F_RO,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_F_VERSION_1,
        ]
        .iter()
        .fold(0u64, |m, b| m | 1 << b);
        if self.queues > 1 {
            known |= 1 << VIRTIO_BLK_F_MQ;
        }
        lock(&self.inner).negotiated.backend_features & known
    }

    /// Reads the configuration space (the queue count is molt's).
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = lock(&self.inner).negotiated.config.clone();
        if let Some(n) = config.get_mut(34..36) {
            n.copy_from_slice(&(self.queues as u16).to_le_bytes());
        }
        data.fill(0);
        let Some(src) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) else {
            return;
        };
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }

    /// The disk's size in sectors.
    pub fn capacity(&self) -> u64 {
        let inner = lock(&self.inner);
        let c = inner.negotiated.config.get(..8).unwrap_or(&[0; 8]);
        u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))
    }

    /// Requests failed to the guest so far.
    pub fn failed_requests(&self) -> u64 {
        lock(&self.inner).failed_requests
    }

    /// The driver set DRIVER_OK (or a restore re-activated the device): the backend starts
    /// the rings, unless it already runs them (an inherited session).
    pub fn activate(&self, mem: GuestMemory, queues: Vec<Queue>, features: u64) {
        let mut inner = lock(&self.inner);
        inner.rings = Some(Rings {
            mem,
            queues,
            features,
        });
        if inner.running {
            return;
        }
        if inner.frontend.is_some() {
            if let Err(e) = self.start(&mut inner) {
                self.drop_session(&mut inner, &e);
            }
        }
    }

    /// The driver reset the device: the backend stops the rings.
    pub fn deactivate(&self) {
        let mut inner = lock(&self.inner);
        let rings = inner.rings.take();
        // The inflight area describes the rings the reset ended: a backend handed it with
        // the driver's next rings would resubmit their descriptors (requests of a dead backend,
        // or ones a live backend had not finished) into rings that never made them available.
        // The next activation asks for a fresh one.
        inner.inflight = None;
        if inner.running {
            inner.running = false;
            if let (Some(fe), Some(r)) = (&inner.frontend, &rings) {
                if let Err(e) = session::stop_rings(fe, &r.queues) {
                    self.drop_session(&mut inner, &e);
                }
            }
        }
    }

    /// A notification that reached molt instead of the backend (an MMIO exit).
    pub fn kick(&self, queue: usize) {
        if let Some(k) = self.kicks.get(queue) {
            if let Err(e) = k.write(1) {
                log::warn!("vhost-user {}: kick: {e}", self.path.display());
            }
        }
    }

    /// Starts the rings on the current session.
    fn start(&self, inner: &mut Inner) -> Result<(), VhostUserError> {
        let Inner {
            frontend,
            adopted,
            negotiated,
            rings,
            inflight,
            running,
            ..
        } = inner;
        let (Some(fe), Some(rings)) = (frontend.as_mut(), rings.as_ref()) else {
            return Ok(());
        };
        let lost = rings.features & !negotiated.backend_features;
        if lost != 0 {
            return Err(VhostUserError::LostFeatures(lost));
        }
        if *adopted {
            session::resync(fe, negotiated)?;
            *adopted = false;
        }
        let inflight_ok = negotiated.protocol_features
            & vhost::vhost_user::message::VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits()
            != 0;
        if inflight_ok && inflight.is_none() {
            *inflight = Some(session::inflight_area(fe, self.queues, QUEUE_SIZE)?);
        }
        let setup = session::RingSetup {
            mem: &rings.mem,
            queues: &rings.queues,
            features: rings.features,
            bases: &monitor::used_indices(&rings.mem, &rings.queues),
            call: &self.call,
            kicks: &self.kicks,
        };
        session::start_rings(
            fe,
            negotiated,
            inflight.as_ref().filter(|_| inflight_ok),
            &setup,
        )?;
        *running = true;
        Ok(())
    }

    /// Ends the session after `why`; the monitor reconnects later.
    fn drop_session(&self, inner: &mut Inner, why: &VhostUserError) {
        log::warn!(
            "vhost-user {}: backend lost: {}",
            self.path.display(),
            error_chain(why)
        );
        inner.last_error = Some(error_chain(why));
        inner.frontend = None;
        inner.socket = None;
        inner.running = false;
        monitor::after_loss(self, inner);
    }
}

/// Connects and negotiates a new session.
fn open_session(
    path: &Path,
    queues: usize,
) -> Result<(Frontend, UnixStream, Negotiated), VhostUserError> {
    let stream = UnixStream::connect(path)
        .map_err(|e| VhostUserError::Connect(path.display().to_string(), e))?;
    let dup = stream.try_clone().map_err(VhostUserError::Socket)?;
    let mut fe = session::frontend(dup, queues)?;
    let negotiated = session::negotiate(&mut fe, queues)?;
    Ok((fe, stream, negotiated))
}

/// A copy of `q` (virtio-queue's `Queue` is not `Clone`).
fn copy_queue(q: &Queue) -> Queue {
    Queue::try_from(q.state()).unwrap_or_else(|e| {
        log::error!("vhost-user: queue copy refused ({e})");
        Queue::default()
    })
}

/// `error: cause: cause` on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}
