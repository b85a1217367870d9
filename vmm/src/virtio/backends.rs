//! The virtio devices' backends (disk images, taps, vhost-user sessions): opened from the
//! configuration at boot, kept across a handoff (role [`FdRole::DeviceBacking`], and for
//! vhost-user also the eventfds and the inflight area) and taken over from the inherited fds
//! afterwards — never reopened by path, so a renamed or replaced image cannot slip in, and a
//! vhost-user backend never sees a second connection.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use devices::virtio::{open_tap, MMIO_WINDOW_SIZE};
use serde::{Deserialize, Serialize};

use super::vhost_user::{Connection, ConnectionState, EventFds};
use super::{
    eventfd, Virtio, VirtioKind, VirtioSetupError, VirtioSlot, MAX_VIRTIO_DEVICES,
    VIRTIO_FIRST_GSI, VIRTIO_MMIO_BASE,
};
use crate::config::{NetBackend, VmConfig};
use crate::persist::{FdRole, Persist, PersistError, RestoreFds, SaveFds};

/// Which device each slot holds, as saved (checked against the configuration on restore).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BackendsState {
    /// Slot kinds, in window order.
    pub kinds: Vec<VirtioKind>,
    /// The vhost-user sessions.
    pub vhost_user: Vec<ConnectionState>,
}

/// What the configuration says about one slot.
struct Spec {
    kind: VirtioKind,
    queues: usize,
    read_only: bool,
    id: String,
    mac: [u8; 6],
    /// How to open the backend at boot.
    open: Opener,
}

enum Opener {
    Disk {
        path: std::path::PathBuf,
        writable: bool,
    },
    Tap(String),
    Fd(std::os::fd::RawFd),
    /// A vhost-user backend's socket (connected once the eventfds exist).
    VhostUser(std::path::PathBuf),
    Nothing,
}

/// A locally administered MAC for net device `i` when none is configured.
fn default_mac(i: usize) -> [u8; 6] {
    let pid = std::process::id().to_be_bytes();
    [0x02, 0x6d, pid[2], pid[3], 0x00, i as u8]
}

fn specs(config: &VmConfig) -> Result<Vec<Spec>, VirtioSetupError> {
    let total = config.disks.len() + config.nets.len() + usize::from(config.rng);
    if total > MAX_VIRTIO_DEVICES {
        return Err(VirtioSetupError::TooMany(total));
    }
    let disks = config.disks.iter().map(|d| Spec {
        kind: if d.vhost_user {
            VirtioKind::VhostUserBlock
        } else {
            VirtioKind::Block
        },
        queues: d.num_queues.map_or(1, usize::from),
        read_only: d.readonly,
        id: d.id.clone().unwrap_or_else(|| {
            let name = d.path.file_name().map(|n| n.to_string_lossy().into_owned());
            name.unwrap_or_default().chars().take(20).collect()
        }),
        mac: [0; 6],
        open: if d.vhost_user {
            Opener::VhostUser(d.path.clone())
        } else {
            Opener::Disk {
                path: d.path.clone(),
                writable: !d.readonly,
            }
        },
    });
    let nets = config.nets.iter().enumerate().map(|(i, n)| Spec {
        kind: VirtioKind::Net,
        queues: 2,
        read_only: false,
        id: String::new(),
        mac: n.mac.unwrap_or_else(|| default_mac(i)),
        open: match &n.backend {
            NetBackend::Tap(name) => Opener::Tap(name.clone()),
            NetBackend::Fd(fd) => Opener::Fd(*fd),
        },
    });
    let rng = config.rng.then(|| Spec {
        kind: VirtioKind::Rng,
        queues: 1,
        read_only: false,
        id: String::new(),
        mac: [0; 6],
        open: Opener::Nothing,
    });
    Ok(disks.chain(nets).chain(rng).collect())
}

fn open_backing(open: &Opener) -> Result<Option<File>, VirtioSetupError> {
    Ok(match open {
        Opener::Disk { path, writable } => Some(
            OpenOptions::new()
                .read(true)
                .write(*writable)
                .open(path)
                .map_err(|e| VirtioSetupError::Disk(path.display().to_string(), e))?,
        ),
        Opener::Tap(name) => {
            Some(open_tap(name).map_err(|e| VirtioSetupError::Tap(name.clone(), e))?)
        }
        // SAFETY: `--net fd=N` names an fd the parent passed to molt for it to own;
        // `inherited_fds::check` verified first thing in `main` that it is an open tap
        // named once, before molt opened anything of its own.
        Opener::Fd(fd) => Some(unsafe { File::from_raw_fd(*fd) }),
        Opener::VhostUser(_) | Opener::Nothing => None,
    })
}

impl Virtio {
    /// Opens the backends `config` names and creates the eventfds.
    pub fn open(config: &VmConfig) -> Result<Self, VirtioSetupError> {
        let specs = specs(config)?;
        let backings = specs
            .iter()
            .map(|s| open_backing(&s.open))
            .collect::<Result<Vec<_>, _>>()?;
        let paths: Vec<Option<PathBuf>> = specs.iter().map(vhost_path).collect();
        let mut virtio = Self::build(specs, backings)?;
        for (i, (slot, path)) in virtio.slots.iter_mut().zip(paths).enumerate() {
            if let Some(path) = path {
                let conn = Connection::connect(&path, slot_eventfds(slot)?)
                    .map_err(|e| VirtioSetupError::VhostUser(i, e))?;
                slot.vhost = Some(conn);
            }
        }
        Ok(virtio)
    }

    fn build(specs: Vec<Spec>, backings: Vec<Option<File>>) -> Result<Self, VirtioSetupError> {
        let slots = specs
            .into_iter()
            .zip(backings)
            .enumerate()
            .map(|(i, (spec, backing))| {
                Ok(VirtioSlot {
                    kind: spec.kind,
                    base: VIRTIO_MMIO_BASE + i as u64 * MMIO_WINDOW_SIZE,
                    gsi: VIRTIO_FIRST_GSI + i as u32,
                    irq: eventfd()?,
                    notify: (0..spec.queues)
                        .map(|_| eventfd())
                        .collect::<Result<_, _>>()?,
                    backing,
                    read_only: spec.read_only,
                    id: spec.id,
                    mac: spec.mac,
                    transport: Mutex::new(None),
                    vhost: None,
                })
            })
            .collect::<Result<Vec<_>, VirtioSetupError>>()?;
        Ok(Self {
            slots,
            quiesced: AtomicBool::new(false),
            vm: Mutex::new(None),
        })
    }
}

impl Persist for Virtio {
    type State = BackendsState;
    type Args = VmConfig;
    type Error = VirtioSetupError;

    fn save(&self, fds: &mut SaveFds) -> Result<BackendsState, PersistError> {
        let mut vhost_user = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(f) = &slot.backing {
                fds.keep(FdRole::DeviceBacking(i), f)?;
            }
            if let Some(conn) = &slot.vhost {
                fds.keep(FdRole::VhostCall(i), borrow(&slot.irq))?;
                for (q, kick) in slot.notify.iter().enumerate() {
                    fds.keep(FdRole::VhostKick(i, q), borrow(kick))?;
                }
                vhost_user.push(conn.save(i, fds)?);
            }
        }
        Ok(BackendsState {
            kinds: self.slots.iter().map(|s| s.kind).collect(),
            vhost_user,
        })
    }

    fn restore(
        state: &BackendsState,
        config: VmConfig,
        fds: &mut RestoreFds,
    ) -> Result<Self, VirtioSetupError> {
        let specs = specs(&config)?;
        let configured: Vec<VirtioKind> = specs.iter().map(|s| s.kind).collect();
        if configured != state.kinds {
            return Err(PersistError::Inconsistent(format!(
                "saved virtio devices {:?} differ from the configured {configured:?}",
                state.kinds
            ))
            .into());
        }
        let backings = specs
            .iter()
            .enumerate()
            .map(|(i, s)| match s.open {
                Opener::Nothing | Opener::VhostUser(_) => Ok(None),
                _ => Ok(Some(File::from(fds.take(FdRole::DeviceBacking(i))?))),
            })
            .collect::<Result<Vec<_>, PersistError>>()?;
        let paths: Vec<Option<PathBuf>> = specs.iter().map(vhost_path).collect();
        let mut virtio = Self::build(specs, backings)?;
        for (i, (slot, path)) in virtio.slots.iter_mut().zip(paths).enumerate() {
            if let Some(path) = path {
                slot.vhost = Some(adopt(i, slot, &path, state, fds)?);
            }
        }
        Ok(virtio)
    }
}

fn vhost_path(spec: &Spec) -> Option<PathBuf> {
    match &spec.open {
        Opener::VhostUser(p) => Some(p.clone()),
        _ => None,
    }
}

/// Duplicates of a slot's eventfds for its vhost-user connection.
fn slot_eventfds(slot: &VirtioSlot) -> Result<EventFds, VirtioSetupError> {
    Ok(EventFds {
        call: slot.irq.try_clone().map_err(VirtioSetupError::EventFd)?,
        kicks: slot
            .notify
            .iter()
            .map(|k| k.try_clone().map_err(VirtioSetupError::EventFd))
            .collect::<Result<_, _>>()?,
    })
}

fn borrow(evt: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the eventfd is open for as long as `evt` is borrowed.
    unsafe { BorrowedFd::borrow_raw(evt.as_raw_fd()) }
}

fn eventfd_of(fds: &mut RestoreFds, role: FdRole) -> Result<EventFd, PersistError> {
    let fd = fds.take(role)?;
    // SAFETY: `fd` is an owned eventfd (the role says so) whose ownership moves into the
    // EventFd.
    Ok(unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) })
}

/// Takes vhost-user slot `i`'s session over: the same call and kick eventfds (the backend
/// holds them), the socket and the inflight area.
fn adopt(
    i: usize,
    slot: &mut VirtioSlot,
    path: &std::path::Path,
    state: &BackendsState,
    fds: &mut RestoreFds,
) -> Result<Arc<Connection>, VirtioSetupError> {
    let saved = state
        .vhost_user
        .iter()
        .find(|c| c.slot == i)
        .ok_or_else(|| {
            PersistError::Inconsistent(format!("no saved vhost-user session for device {i}"))
        })?;
    slot.irq = eventfd_of(fds, FdRole::VhostCall(i))?;
    for (q, kick) in slot.notify.iter_mut().enumerate() {
        *kick = eventfd_of(fds, FdRole::VhostKick(i, q))?;
    }
    let socket = if saved.connected {
        Some(fds.take(FdRole::DeviceBacking(i))?)
    } else {
        None
    };
    let inflight = match saved.inflight {
        Some(_) => Some(File::from(fds.take(FdRole::VhostInflight(i))?)),
        None => None,
    };
    Connection::adopt(path, slot_eventfds(slot)?, saved, socket, inflight)
        .map_err(|e| VirtioSetupError::VhostUser(i, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DiskConfig, KernelSource, MemoryConfig, SerialConfig};
    use crate::persist::RestoreFds;

    fn config_with_disk(path: std::path::PathBuf) -> VmConfig {
        VmConfig {
            kernel: KernelSource::Embedded,
            cmdline: String::new(),
            initrd: None,
            cpus: 1,
            memory: MemoryConfig::default(),
            serial: SerialConfig::Null,
            api_socket: None,
            disks: vec![DiskConfig {
                path,
                ..DiskConfig::default()
            }],
            nets: Vec::new(),
            rng: true,
            cpu_template: Default::default(),
            seccomp: Default::default(),
            update_binaries: None,
        }
    }

    #[test]
    fn a_disk_whose_fd_was_not_handed_over_is_an_error_never_a_reopen() {
        let path = std::env::temp_dir().join(format!("molt-backends-{}.img", std::process::id()));
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let config = config_with_disk(path.clone());
        let state = BackendsState {
            kinds: vec![VirtioKind::Block, VirtioKind::Rng],
            ..BackendsState::default()
        };
        let mut none = RestoreFds::new(cpr::Inherited::default());
        let err = Virtio::restore(&state, config.clone(), &mut none).err();
        assert!(
            matches!(
                err,
                Some(VirtioSetupError::Persist(PersistError::Missing(
                    FdRole::DeviceBacking(0),
                    _
                )))
            ),
            "{err:?}"
        );
        // The same disk handed over: taken, and the rng needs nothing.
        let file = std::fs::File::open(&path).unwrap();
        let inherited =
            cpr::Inherited::from_owned(vec![(FdRole::DeviceBacking(0).to_string(), file.into())])
                .unwrap();
        let mut fds = RestoreFds::new(inherited);
        let virtio = Virtio::restore(&state, config.clone(), &mut fds).unwrap();
        assert_eq!(virtio.slots.len(), 2);
        assert!(fds.unclaimed().is_empty());
        // A state that names other devices than the configuration is refused.
        let other = BackendsState {
            kinds: vec![VirtioKind::Net],
            ..BackendsState::default()
        };
        let mut none = RestoreFds::new(cpr::Inherited::default());
        assert!(matches!(
            Virtio::restore(&other, config, &mut none),
            Err(VirtioSetupError::Persist(PersistError::Inconsistent(_)))
        ));
        std::fs::remove_file(path).unwrap();
    }
}
