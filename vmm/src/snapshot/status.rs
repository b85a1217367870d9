//! What `vm.info` shows about snapshots: the progress of one being written, and how far a
//! restore has loaded guest RAM. One VM per process, so both live in statics that the writer
//! and filler threads update with atomics and the API thread reads.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use super::SnapshotMode;

/// Where a snapshot is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Pausing and capturing the VM, finding where RAM holds data.
    Capture,
    /// Writing guest RAM.
    Ram,
    /// Writing the state record, syncing and renaming.
    State,
}

/// A snapshot being written, shared by the API thread and the writer.
#[derive(Debug)]
pub struct Progress {
    mode: SnapshotMode,
    path: PathBuf,
    started: Instant,
    phase: AtomicU8,
    /// Bytes of guest RAM data written so far.
    pub bytes_written: AtomicU64,
    /// Bytes of guest RAM data to write (the rest are holes).
    pub bytes_total: AtomicU64,
    ram_total: u64,
    /// Write faults served (live mode).
    pub faults: AtomicU64,
    /// The slowest write fault so far, ns (live mode).
    pub worst_fault_ns: AtomicU64,
    /// Set to stop the writer (the VM is ending).
    pub cancel: AtomicBool,
    /// Set by the writer once it has its result (its thread ends right after).
    pub finished: AtomicBool,
}

/// `vm.info`'s `snapshot` while one is written.
#[derive(Clone, Debug, Serialize)]
pub struct ProgressInfo {
    /// Where it goes.
    pub path: PathBuf,
    /// How it is taken.
    pub mode: SnapshotMode,
    /// What it is doing.
    pub phase: Phase,
    /// Bytes of RAM data written.
    pub bytes_written: u64,
    /// Bytes of RAM data to write in all.
    pub bytes_total: u64,
    /// Guest RAM size.
    pub ram_total: u64,
    /// Write faults served so far (live mode).
    pub write_faults: u64,
    /// The slowest of them, µs.
    pub worst_fault_us: f64,
    /// Since the request, ms.
    pub elapsed_ms: u64,
}

impl Progress {
    /// A snapshot of `ram_total` bytes of RAM to `path`, starting now.
    pub fn new(mode: SnapshotMode, path: PathBuf, ram_total: u64) -> Self {
        Self {
            mode,
            path,
            started: Instant::now(),
            phase: AtomicU8::new(Phase::Capture as u8),
            bytes_written: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            ram_total,
            faults: AtomicU64::new(0),
            worst_fault_ns: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
            finished: AtomicBool::new(false),
        }
    }

    /// Enters `phase`.
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Relaxed);
    }

    /// Counts one write fault that took `ns`.
    pub fn fault(&self, ns: u64) {
        self.faults.fetch_add(1, Relaxed);
        self.worst_fault_ns.fetch_max(ns, Relaxed);
    }

    /// Whether the writer should stop.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Relaxed)
    }

    fn info(&self) -> ProgressInfo {
        let phase = match self.phase.load(Relaxed) {
            0 => Phase::Capture,
            1 => Phase::Ram,
            _ => Phase::State,
        };
        ProgressInfo {
            path: self.path.clone(),
            mode: self.mode,
            phase,
            bytes_written: self.bytes_written.load(Relaxed),
            bytes_total: self.bytes_total.load(Relaxed),
            ram_total: self.ram_total,
            write_faults: self.faults.load(Relaxed),
            worst_fault_us: self.worst_fault_ns.load(Relaxed) as f64 / 1e3,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}

static CURRENT: Mutex<Option<Arc<Progress>>> = Mutex::new(None);

/// Makes `p` the snapshot `vm.info` shows (`None`: no snapshot runs).
pub fn publish(p: Option<Arc<Progress>>) {
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = p;
}

/// The snapshot being written, if one is.
pub fn snapshot() -> Option<ProgressInfo> {
    CURRENT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|p| p.info())
}

/// `vm.info`'s `restore` in a restored molt: how far RAM is back.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreInfo {
    /// RAM is loaded on demand while the guest runs.
    pub lazy: bool,
    /// Bytes of RAM data the snapshot holds.
    pub bytes_total: u64,
    /// Bytes of it loaded so far.
    pub bytes_in: u64,
    /// Whether all of it is in.
    pub done: bool,
    /// From the start of the restore until the last page was in, ms.
    pub done_ms: Option<f64>,
}

/// How far a restore is; `total == u64::MAX` until a restore starts.
struct Restore {
    lazy: AtomicBool,
    total: AtomicU64,
    bytes_in: AtomicU64,
    /// µs from the start of the restore to the last page, +1 (0: not yet).
    done_us: AtomicU64,
}

static RESTORE: Restore = Restore {
    lazy: AtomicBool::new(false),
    total: AtomicU64::new(u64::MAX),
    bytes_in: AtomicU64::new(0),
    done_us: AtomicU64::new(0),
};

/// A restore of `total` bytes of RAM data starts.
pub fn restore_started(lazy: bool, total: u64) {
    RESTORE.lazy.store(lazy, Relaxed);
    RESTORE.bytes_in.store(0, Relaxed);
    RESTORE.done_us.store(0, Relaxed);
    RESTORE.total.store(total, Relaxed);
}

/// `bytes` more of RAM are in.
pub fn restore_loaded(bytes: u64) {
    RESTORE.bytes_in.fetch_add(bytes, Relaxed);
}

/// The last page is in, `since_start` after the restore started.
pub fn restore_done(since_start: std::time::Duration) {
    RESTORE
        .done_us
        .store(since_start.as_micros() as u64 + 1, Relaxed);
}

/// The restore this process started from, if it did.
pub fn restore() -> Option<RestoreInfo> {
    let total = RESTORE.total.load(Relaxed);
    if total == u64::MAX {
        return None;
    }
    let done_us = RESTORE.done_us.load(Relaxed);
    Some(RestoreInfo {
        lazy: RESTORE.lazy.load(Relaxed),
        bytes_total: total,
        bytes_in: RESTORE.bytes_in.load(Relaxed),
        done: done_us > 0,
        done_ms: (done_us > 0).then(|| (done_us - 1) as f64 / 1e3),
    })
}
