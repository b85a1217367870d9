//! Taking a snapshot: pause → capture → memory files → state record → sync → rename.
//!
//! [`begin`] runs on the main thread: (live mode) it write-protects RAM while the guest runs,
//! pauses the guest, captures it and (live mode) closes the write protection and resumes the
//! guest. The memory files, the
//! state record, the sync and the rename run on a writer thread, so the main thread keeps
//! answering the API (`vm.info` shows the progress) meanwhile; [`Pending::finish`] collects
//! the result once the snapshot is durable. Nothing is left at the path unless the whole
//! snapshot is durable; on any error the guest is resumed (`stop` and `live` modes, if it ran
//! before) or stays paused (`paused` mode).

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use cpr::snapshot::memory_file_name;
use vmm_sys_util::eventfd::EventFd;

use super::dir::{check_target, Staging};
use super::live::{self, Armed};
use super::ram::RegionSource;
use super::ram_write::{write_regions, WriteCtx};
use super::status::{self, Phase, Progress};
use super::{
    ms, DiskIdentity, Snapshot, SnapshotError, SnapshotMode, SnapshotPhases, SnapshotReport,
    SnapshotRequest, Taken, SNAPSHOT_KIND, STATE_FILE,
};
use crate::components::{self, Running};
use crate::exit::VmExit;
use crate::persist::SaveFds;
use crate::runtime::{RunState, Vmm};
use crate::state::now_ns;
use crate::update::handoff::BookkeepingState;

/// A snapshot being written by its writer thread.
pub struct Pending {
    mode: SnapshotMode,
    was_paused: bool,
    target: PathBuf,
    t0: Instant,
    pause_ms: f64,
    capture_ms: f64,
    progress: Arc<Progress>,
    writer: JoinHandle<Result<SnapshotReport, SnapshotError>>,
}

/// Starts the snapshot `req` asks for; `done` is signalled when the writer finishes.
pub fn begin(
    vmm: &mut Vmm,
    req: &SnapshotRequest,
    done: EventFd,
) -> Result<Pending, SnapshotError> {
    let target = check_target(&req.path)?;
    if let Some(d) = vmm.config().disks.iter().find(|d| d.vhost_user) {
        return Err(SnapshotError::VhostUser(d.path.display().to_string()));
    }
    // The memfds hold all of RAM only once a lazy restore has loaded it.
    super::lazy::wait_until_filled();
    let ram_total = vmm.machine_ref().map_or(0, |m| m.ram().total());
    let progress = Arc::new(Progress::new(req.mode, target.clone(), ram_total));
    // Live mode write-protects RAM before the pause, the guest running (see `live`).
    let armed = match (req.mode, vmm.machine_ref()) {
        (SnapshotMode::Live, Some(m)) => {
            Some(live::arm(m.ram(), progress.clone()).map_err(SnapshotError::Protect)?)
        }
        _ => None,
    };
    let t0 = Instant::now();
    let was_paused = vmm.run_state() == RunState::Paused;
    let paused_at_ns = now_ns();
    vmm.pause().map_err(SnapshotError::Capture)?;
    let pause_ms = ms(t0.elapsed());
    let taken = Taken {
        mode: match req.mode {
            // Recorded as `paused` so that molt versions without live mode read it.
            SnapshotMode::Live => SnapshotMode::Paused,
            m => m,
        },
        live: req.mode == SnapshotMode::Live,
        was_paused,
        paused_at_ns,
        writer: format!("molt {}", crate::VERSION),
    };
    let started = start(vmm, armed, &target, taken, progress.clone(), done);
    let (capture_ms, writer) = match started {
        Ok(s) => s,
        Err(e) => {
            if req.mode != SnapshotMode::Paused && !was_paused {
                if let Err(r) = vmm.resume() {
                    log::error!("cannot resume the guest after a failed snapshot: {r}");
                }
            }
            return Err(e);
        }
    };
    status::publish(Some(progress.clone()));
    Ok(Pending {
        mode: req.mode,
        was_paused,
        target,
        t0,
        pause_ms,
        capture_ms,
        progress,
        writer,
    })
}

impl Pending {
    /// How it is taken.
    pub fn mode(&self) -> SnapshotMode {
        self.mode
    }

    /// Whether the writer is done ([`finish`](Self::finish) will not block).
    pub fn is_finished(&self) -> bool {
        // The writer signals the event loop just before its thread ends: its flag is set
        // by then, the thread may not be finished yet (joining it waits only for that).
        self.progress
            .finished
            .load(std::sync::atomic::Ordering::Acquire)
            || self.writer.is_finished()
    }

    /// Asks the writer to stop (the VM is ending).
    pub fn cancel(&self) {
        self.progress
            .cancel
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits for the writer and completes the request: a `stop` snapshot ends the VM, a
    /// failed one resumes it (unless `paused` mode).
    pub fn finish(self, vmm: &mut Vmm) -> Result<SnapshotReport, SnapshotError> {
        let result = self
            .writer
            .join()
            .unwrap_or(Err(SnapshotError::WriterPanicked));
        status::publish(None);
        match result {
            Ok(mut report) => {
                report.phases_ms.pause = self.pause_ms;
                report.phases_ms.capture = self.capture_ms;
                report.phases_ms.total = ms(self.t0.elapsed());
                if let Some(live) = &mut report.live {
                    live.guest_stopped_ms += self.pause_ms;
                }
                log::info!(
                    "snapshot written to {}: {} of {} RAM bytes in {:.1} ms",
                    self.target.display(),
                    report.ram_bytes,
                    report.ram_total,
                    report.phases_ms.total
                );
                if self.mode == SnapshotMode::Stop {
                    let why = format!("snapshot written to {}", self.target.display());
                    vmm.shared.exits.end(VmExit::Stopped(why));
                }
                Ok(report)
            }
            Err(e) => {
                if self.mode == SnapshotMode::Stop && !self.was_paused {
                    if let Err(r) = vmm.resume() {
                        log::error!("cannot resume the guest after a failed snapshot: {r}");
                    }
                }
                Err(e)
            }
        }
    }
}

/// Disk identities, and every disk synced so that the snapshot finds on disk what the guest
/// wrote before the pause.
fn disks(vmm: &Vmm) -> Result<Vec<DiskIdentity>, SnapshotError> {
    for (i, slot) in vmm.shared.virtio.slots.iter().enumerate() {
        let Some(f) = slot.backing.as_ref() else {
            continue;
        };
        if f.metadata().is_ok_and(|m| m.is_file()) {
            f.sync_data().map_err(|source| SnapshotError::Write {
                what: "syncing disk",
                path: format!("virtio{i}").into(),
                source,
            })?;
        }
    }
    vmm.config()
        .disks
        .iter()
        .map(|d| {
            let bad = |e: std::io::Error| SnapshotError::Disk(d.path.clone(), e.to_string());
            let path = std::fs::canonicalize(&d.path).map_err(bad)?;
            let m = std::fs::metadata(&path).map_err(bad)?;
            Ok(DiskIdentity {
                path,
                size: m.len(),
                dev: m.dev(),
                ino: m.ino(),
            })
        })
        .collect()
}

type Writer = JoinHandle<Result<SnapshotReport, SnapshotError>>;

/// Captures the paused VM, completes write protection and resumes it (live mode: `armed`),
/// and starts the writer. Returns the capture time.
fn start(
    vmm: &mut Vmm,
    armed: Option<Armed>,
    target: &std::path::Path,
    taken: Taken,
    progress: Arc<Progress>,
    done: EventFd,
) -> Result<(f64, Writer), SnapshotError> {
    let t1 = Instant::now();
    let machine = vmm
        .machine_ref()
        .ok_or(SnapshotError::Capture(crate::Error::NoMachine))?;
    let vm = machine.capture().map_err(SnapshotError::Capture)?;
    // The fds the parts declare are not kept: a snapshot reopens everything by path.
    let running = Running {
        ram: machine.ram(),
        serial: vmm.serial_out(),
        virtio: &vmm.shared.virtio,
        api: None,
    };
    let parts = components::save(&running, &mut SaveFds::new()).map_err(SnapshotError::Save)?;
    let disks = disks(vmm)?;
    // Disks are reopened by path, from wherever the restore runs.
    let mut config = vmm.config().clone();
    for (d, id) in config.disks.iter_mut().zip(&disks) {
        d.path = id.path.clone();
    }
    let sources = RegionSource::all(machine.ram()).map_err(|source| SnapshotError::Write {
        what: "opening guest RAM for",
        path: target.to_path_buf(),
        source,
    })?;
    let staging = Staging::create(target)?;
    let snapshot = Snapshot {
        vm,
        config,
        parts,
        book: BookkeepingState {
            argv: vmm.identity.argv.clone(),
            booted_at_ns: vmm.identity.booted_at_ns,
            counters: vmm.counters.clone(),
            history: vmm.history.clone(),
        },
        memory: Vec::new(),
        disks,
        taken,
    };
    let armed = match armed {
        Some(mut armed) => {
            armed.freeze().map_err(SnapshotError::Protect)?;
            if !snapshot.taken.was_paused {
                vmm.resume().map_err(SnapshotError::Capture)?;
            }
            Some(armed)
        }
        None => None,
    };
    let capture = ms(t1.elapsed());
    let stopped_ms = ms(t1.elapsed());
    let job = Job {
        target: target.to_path_buf(),
        staging,
        sources,
        snapshot,
        armed,
        stopped_ms,
        progress,
    };
    let writer = std::thread::Builder::new()
        .name("snapshot-writer".into())
        .spawn(move || {
            let finished = job.progress.clone();
            let r = job.write();
            finished
                .finished
                .store(true, std::sync::atomic::Ordering::Release);
            if let Err(e) = done.write(1) {
                log::error!("snapshot writer: cannot wake the event loop: {e}");
            }
            r
        })
        .map_err(|source| SnapshotError::Write {
            what: "starting the writer thread for",
            path: target.to_path_buf(),
            source,
        })?;
    Ok((capture, writer))
}

/// What the writer thread owns.
struct Job {
    target: PathBuf,
    staging: Staging,
    sources: Vec<RegionSource>,
    snapshot: Snapshot,
    armed: Option<Armed>,
    stopped_ms: f64,
    progress: Arc<Progress>,
}

impl Job {
    fn write(self) -> Result<SnapshotReport, SnapshotError> {
        let Job {
            target,
            staging,
            sources,
            mut snapshot,
            armed,
            stopped_ms,
            progress,
        } = self;
        let t2 = Instant::now();
        let mut laps = crate::laps::Laps::start("snapshot writer");
        let mut sources = sources;
        RegionSource::find_data(&mut sources).map_err(|source| SnapshotError::Write {
            what: "finding the data of guest RAM for",
            path: target.clone(),
            source,
        })?;
        progress.bytes_total.store(
            sources.iter().map(RegionSource::data_bytes).sum(),
            std::sync::atomic::Ordering::Relaxed,
        );
        laps.mark("find data");
        progress.set_phase(Phase::Ram);
        let ctx = WriteCtx {
            progress: &progress,
            gate: armed.as_ref().map(Armed::gate),
        };
        let paths: Vec<PathBuf> = (0..sources.len())
            .map(|i| staging.path().join(memory_file_name(i)))
            .collect();
        let mut written = Vec::new();
        for ((desc, file), path) in write_regions(&sources, &paths, &ctx)?
            .into_iter()
            .zip(paths)
        {
            snapshot.memory.push(desc);
            written.push((file, path));
        }
        laps.mark("memory files");
        // All synced after all are written: the first sync commits the file system's journal
        // for all of them, the others only wait for the device.
        for (file, path) in written {
            file.sync_all().map_err(|source| SnapshotError::Write {
                what: "syncing",
                path,
                source,
            })?;
        }
        let ram_phase = t2.elapsed();
        laps.mark("sync memory files");
        let live = armed.map(|a| a.finish(stopped_ms));
        drop(sources);

        progress.set_phase(Phase::State);
        let t3 = Instant::now();
        let record = cpr::encode(&snapshot.taken.writer, SNAPSHOT_KIND, &snapshot)
            .map_err(SnapshotError::Encode)?;
        laps.mark("encode");
        let state_path = staging.path().join(STATE_FILE);
        std::fs::File::create_new(&state_path)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, &record)?;
                f.sync_all()
            })
            .map_err(|source| SnapshotError::Write {
                what: "writing",
                path: state_path.clone(),
                source,
            })?;
        #[cfg(feature = "test-next")]
        if std::env::var("MOLT_TEST_FAULT").as_deref() == Ok("snapshot-hang") {
            log::warn!("injected fault: the snapshot writer hangs before the rename");
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
        laps.mark("state file");
        if progress.cancelled() {
            return Err(SnapshotError::Cancelled);
        }
        staging.commit()?;
        laps.mark("commit");
        laps.log();
        let ram_bytes: u64 = snapshot.memory.iter().map(|m| m.data_bytes).sum();
        let secs = ram_phase.as_secs_f64();
        Ok(SnapshotReport {
            path: target,
            mode: if snapshot.taken.live {
                SnapshotMode::Live
            } else {
                snapshot.taken.mode
            },
            state_bytes: record.len() as u64,
            ram_bytes,
            ram_total: snapshot.memory.iter().map(|m| m.size).sum(),
            regions: snapshot.memory.len(),
            phases_ms: SnapshotPhases {
                ram: ms(ram_phase),
                state: ms(t3.elapsed()),
                ..SnapshotPhases::default()
            },
            throughput_mib_s: if secs > 0.0 {
                ram_bytes as f64 / secs / (1 << 20) as f64
            } else {
                0.0
            },
            live,
        })
    }
}
