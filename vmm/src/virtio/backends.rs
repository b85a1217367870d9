//! The virtio devices' backends (disk images, taps): opened from the configuration at boot,
//! kept across a handoff (role [`FdRole::DeviceBacking`]) and taken over from the inherited
//! fds afterwards — never reopened by path, so a renamed or replaced image cannot slip in.

use std::fs::{File, OpenOptions};
use std::os::fd::FromRawFd;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use devices::virtio::{open_tap, MMIO_WINDOW_SIZE};
use serde::{Deserialize, Serialize};

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
}

/// What the configuration says about one slot.
struct Spec {
    kind: VirtioKind,
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
        kind: VirtioKind::Block,
        read_only: d.readonly,
        id: d.id.clone().unwrap_or_else(|| {
            let name = d.path.file_name().map(|n| n.to_string_lossy().into_owned());
            name.unwrap_or_default().chars().take(20).collect()
        }),
        mac: [0; 6],
        open: Opener::Disk {
            path: d.path.clone(),
            writable: !d.readonly,
        },
    });
    let nets = config.nets.iter().enumerate().map(|(i, n)| Spec {
        kind: VirtioKind::Net,
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
        Opener::Nothing => None,
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
        Self::build(specs, backings)
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
                    notify: (0..spec.kind.queues())
                        .map(|_| eventfd())
                        .collect::<Result<_, _>>()?,
                    backing,
                    read_only: spec.read_only,
                    id: spec.id,
                    mac: spec.mac,
                    transport: Mutex::new(None),
                })
            })
            .collect::<Result<Vec<_>, VirtioSetupError>>()?;
        Ok(Self {
            slots,
            quiesced: AtomicBool::new(false),
        })
    }
}

impl Persist for Virtio {
    type State = BackendsState;
    type Args = VmConfig;
    type Error = VirtioSetupError;

    fn save(&self, fds: &mut SaveFds) -> Result<BackendsState, PersistError> {
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(f) = &slot.backing {
                fds.keep(FdRole::DeviceBacking(i), f)?;
            }
        }
        Ok(BackendsState {
            kinds: self.slots.iter().map(|s| s.kind).collect(),
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
                Opener::Nothing => Ok(None),
                _ => Ok(Some(File::from(fds.take(FdRole::DeviceBacking(i))?))),
            })
            .collect::<Result<Vec<_>, PersistError>>()?;
        Self::build(specs, backings)
    }
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
                readonly: false,
                id: None,
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
        };
        let mut none = RestoreFds::new(cpr::Inherited::default());
        assert!(matches!(
            Virtio::restore(&other, config, &mut none),
            Err(VirtioSetupError::Persist(PersistError::Inconsistent(_)))
        ));
        std::fs::remove_file(path).unwrap();
    }
}
