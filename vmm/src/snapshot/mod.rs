//! Snapshot to disk and restore in a new process: the third transport of the same capture.
//!
//! `PUT /api/v1/vm.snapshot` ([`write::take`]) pauses the guest, captures the machine with
//! [`crate::machine::Machine::capture`] and the parts with [`crate::components::save`] (the
//! fds they declare are not needed: a snapshot reopens its resources by path), writes one
//! sparse memory file per RAM region and then the state record into a temporary directory
//! beside DIR, syncs it and renames it into place ([`dir`]). The layout is
//! [`cpr::snapshot`]'s.
//!
//! `molt --restore path=DIR` ([`restore::restore`]) reads the record, reopens disks by path
//! (checked) and taps by name, puts RAM into fresh memfds ([`ram`]) and assembles the VM on
//! the same path as a boot or a live update ([`crate::assembly::assemble`]). Host-side
//! options (`--api-socket`, `--serial`, `--log-level`) come from the new command line.

pub mod dir;
mod hugeprobe;
pub mod lazy;
pub mod live;
mod live_pages;
pub mod ram;
mod ram_write;
pub mod restore;
pub mod status;
mod uffd;
pub mod write;

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::components::PartsState;
use crate::config::{ConfigError, VmConfig};
use crate::state::VmState;
use crate::update::handoff::BookkeepingState;

pub use cpr::snapshot::{MemoryFile, SNAPSHOT_KIND, STATE_FILE};

/// What a snapshot does with the VM once it is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// Pause, write, and leave the VM paused (`vm.resume` continues it).
    #[default]
    Paused,
    /// Pause, write, and end molt (exit 0) once the snapshot is durable.
    Stop,
    /// Pause only to capture the state and write-protect RAM; the guest runs while RAM is
    /// written (a write to a page not yet written waits until the page is copied aside).
    Live,
}

/// Body of `PUT /api/v1/vm.snapshot`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The snapshot directory (absolute): replaced atomically if it holds a snapshot.
    pub path: PathBuf,
    /// What happens to the VM afterwards.
    #[serde(default)]
    pub mode: SnapshotMode,
}

/// How a disk was when the snapshot was taken: a restore refuses another file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskIdentity {
    /// The path it is reopened by.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Device of the file system holding it.
    pub dev: u64,
    /// Its inode number there.
    pub ino: u64,
}

/// About the snapshot itself.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Taken {
    /// How it was taken.
    pub mode: SnapshotMode,
    /// Taken in live mode (`mode` then says `paused`, which older molts read).
    pub live: bool,
    /// The guest was paused by a user before the snapshot (a restore leaves it paused).
    pub was_paused: bool,
    /// Wall-clock ns when the guest was paused for it.
    pub paused_at_ns: u64,
    /// molt's version that wrote it.
    pub writer: String,
}

/// The state record of a snapshot (kind [`SNAPSHOT_KIND`]): what a handoff carries, with the
/// memory files and disk identities in place of fds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The KVM machine: vCPUs, VM-wide state, device models.
    pub vm: VmState,
    /// How the VM was configured (host-side options are replaced on restore).
    pub config: VmConfig,
    /// Every part's state (the API server's is not kept).
    pub parts: PartsState,
    /// Counters and history.
    #[serde(default)]
    pub book: BookkeepingState,
    /// One memory file per RAM region, in region order.
    pub memory: Vec<MemoryFile>,
    /// The disks, in configuration order.
    #[serde(default)]
    pub disks: Vec<DiskIdentity>,
    /// About the snapshot.
    #[serde(default)]
    pub taken: Taken,
}

/// Phase timings of a snapshot, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SnapshotPhases {
    /// Stopping the vCPUs.
    pub pause: f64,
    /// Capturing the machine and the parts, syncing the disks.
    pub capture: f64,
    /// Writing and syncing the memory files.
    pub ram: f64,
    /// Writing the state record, syncing and renaming the directory.
    pub state: f64,
    /// The whole request.
    pub total: f64,
}

/// The answer to `vm.snapshot`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SnapshotReport {
    /// Where the snapshot is.
    pub path: PathBuf,
    /// How it was taken.
    pub mode: SnapshotMode,
    /// Bytes of the state record.
    pub state_bytes: u64,
    /// Bytes of guest RAM written (data; the rest are holes).
    pub ram_bytes: u64,
    /// Guest RAM size.
    pub ram_total: u64,
    /// RAM regions (one memory file each).
    pub regions: usize,
    /// Where the time went.
    pub phases_ms: SnapshotPhases,
    /// RAM written per second of the RAM phase, MiB/s.
    pub throughput_mib_s: f64,
    /// Live mode: the guest's pause and its write faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live: Option<live::LiveReport>,
}

/// `--restore path=DIR[,lazy=on|off][,hugepages=on|off]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreConfig {
    /// The snapshot directory.
    pub path: PathBuf,
    /// Load RAM on demand while the guest runs (userfaultfd) instead of all of it first.
    pub lazy: bool,
    /// Back the restored RAM with 2 MiB huge pages (or not), whatever the snapshot's was.
    pub hugepages: Option<bool>,
}

impl FromStr for RestoreConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::BadOption {
            option: "--restore",
            value: s.to_string(),
            why,
        };
        let (mut path, mut lazy, mut hugepages) = (None, true, None);
        for part in s.split(',').filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("path", v)) if !v.is_empty() => path = Some(PathBuf::from(v)),
                Some(("lazy", "on")) => lazy = true,
                Some(("lazy", "off")) => lazy = false,
                Some(("hugepages", "on")) => hugepages = Some(true),
                Some(("hugepages", "off")) => hugepages = Some(false),
                Some((k @ ("lazy" | "hugepages"), v)) => {
                    return Err(bad(format!("{k}={v}: expected on or off")))
                }
                Some((k, _)) => {
                    return Err(bad(format!(
                        "unknown or empty key '{k}' (expected path, lazy, hugepages)"
                    )))
                }
                None => return Err(bad(format!("'{part}' is not key=value"))),
            }
        }
        let path = path.ok_or_else(|| bad("path=DIR is required".into()))?;
        Ok(Self {
            path,
            lazy,
            hugepages,
        })
    }
}

/// Errors taking or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The snapshot path is unusable (nothing was paused).
    #[error("snapshot path {0}: {1}")]
    BadPath(PathBuf, String),
    /// Pausing or capturing the VM failed.
    #[error("cannot capture the VM")]
    Capture(#[source] crate::Error),
    /// A part cannot be saved.
    #[error("cannot save the VMM's parts")]
    Save(#[source] crate::persist::PersistError),
    /// Encoding the state record failed.
    #[error("cannot encode the snapshot's state record")]
    Encode(#[source] cpr::RecordError),
    /// Writing the snapshot failed (nothing was left at the path).
    #[error("cannot write the snapshot: {what} {path}")]
    Write {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The writer thread panicked (nothing was left at the path).
    #[error("the snapshot writer failed unexpectedly")]
    WriterPanicked,
    /// The VM ended while the snapshot was written (nothing was left at the path).
    #[error("the VM ended before the snapshot was complete")]
    Cancelled,
    /// Another snapshot or a live update is running.
    #[error("a snapshot is being written; try again when it is done")]
    Busy,
    /// A disk's data path is outside molt: its backend keeps serving requests after the
    /// capture, so the snapshot would not be consistent (nothing was paused).
    #[error(
        "disk {0} is a vhost-user disk: snapshots of VMs with vhost-user disks are not supported \
         (live updates are)"
    )]
    VhostUser(String),
    /// Live mode could not arm write protection (nothing was written).
    #[error("cannot write-protect guest RAM for a live snapshot")]
    Protect(#[source] std::io::Error),
    /// No snapshot at the path.
    #[error("no snapshot at {0}")]
    Missing(PathBuf),
    /// Reading a file of the snapshot failed.
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The state record is not a molt snapshot this molt reads.
    #[error("{0} is not a usable molt snapshot")]
    Decode(PathBuf, #[source] cpr::RecordError),
    /// The snapshot contradicts itself or the host.
    #[error("snapshot {0}: {1}")]
    Inconsistent(PathBuf, String),
    /// A memory file is corrupt or truncated.
    #[error("memory file {file}: {why} ({when}); the guest was not run on it")]
    BadMemory {
        /// The memory file.
        file: PathBuf,
        /// What is wrong.
        why: String,
        /// When it was found: before the guest ran, or when a page was first needed.
        when: &'static str,
    },
    /// A disk of the snapshot is missing or another file.
    #[error("disk {0}: {1}")]
    Disk(PathBuf, String),
    /// Lazy restore could not be set up.
    #[error("lazy restore (userfaultfd; lazy=off reads all of RAM first instead)")]
    Lazy(#[source] std::io::Error),
    /// Building the VM failed.
    #[error(transparent)]
    Vmm(#[from] crate::Error),
}

impl SnapshotError {
    /// The HTTP status answering this error.
    pub fn status(&self) -> u16 {
        match self {
            SnapshotError::BadPath(..) | SnapshotError::VhostUser(_) => 400,
            SnapshotError::Busy => 409,
            SnapshotError::Write { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                507
            }
            _ => 500,
        }
    }
}

/// Milliseconds of a duration.
pub(crate) fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_option_parses() {
        let r: RestoreConfig = "path=/s/one".parse().unwrap();
        assert_eq!((r.path, r.lazy), (PathBuf::from("/s/one"), true));
        let r: RestoreConfig = "path=/s,lazy=off".parse().unwrap();
        assert!(!r.lazy && r.hugepages.is_none());
        let r: RestoreConfig = "path=/s,hugepages=on".parse().unwrap();
        assert_eq!(r.hugepages, Some(true));
        for bad in [
            "",
            "lazy=off",
            "path=",
            "path=/s,lazy=maybe",
            "path=/s,x=1",
            "/s",
        ] {
            assert!(bad.parse::<RestoreConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_default_to_paused() {
        let r: SnapshotRequest = serde_json::from_str(r#"{"path": "/s"}"#).unwrap();
        assert_eq!(r.mode, SnapshotMode::Paused);
        let r: SnapshotRequest = serde_json::from_str(r#"{"path": "/s", "mode": "stop"}"#).unwrap();
        assert_eq!(r.mode, SnapshotMode::Stop);
        assert!(serde_json::from_str::<SnapshotRequest>(r#"{"path": "/s", "mode": "x"}"#).is_err());
    }
}
