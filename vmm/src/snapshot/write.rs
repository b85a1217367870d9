//! Taking a snapshot: pause → capture → memory files → state record → sync → rename.
//! Nothing is left at the path unless the whole snapshot is durable; on any error the guest
//! is resumed (`stop` mode, if it ran before) or stays paused (`paused` mode).

use std::os::unix::fs::MetadataExt;
use std::time::Instant;

use cpr::snapshot::memory_file_name;

use super::dir::{check_target, Staging};
use super::ram::write_region;
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

/// Takes the snapshot `req` asks for. In `stop` mode a success ends the VM (molt exits 0 once
/// the answer is sent).
pub fn take(vmm: &mut Vmm, req: &SnapshotRequest) -> Result<SnapshotReport, SnapshotError> {
    let target = check_target(&req.path)?;
    // The memfds hold all of RAM only once a lazy restore has loaded it.
    super::lazy::wait_until_filled();
    let t0 = Instant::now();
    let was_paused = vmm.run_state() == RunState::Paused;
    let paused_at_ns = now_ns();
    vmm.pause().map_err(SnapshotError::Capture)?;
    let pause = ms(t0.elapsed());
    let taken = Taken {
        mode: req.mode,
        was_paused,
        paused_at_ns,
        writer: format!("molt {}", crate::VERSION),
    };
    match write(vmm, &target, taken) {
        Ok(mut report) => {
            report.phases_ms.pause = pause;
            report.phases_ms.total = ms(t0.elapsed());
            log::info!(
                "snapshot written to {}: {} of {} RAM bytes in {:.1} ms",
                target.display(),
                report.ram_bytes,
                report.ram_total,
                report.phases_ms.total
            );
            if req.mode == SnapshotMode::Stop {
                let why = format!("snapshot written to {}", target.display());
                vmm.shared.exits.end(VmExit::Stopped(why));
            }
            Ok(report)
        }
        Err(e) => {
            if req.mode == SnapshotMode::Stop && !was_paused {
                if let Err(r) = vmm.resume() {
                    log::error!("cannot resume the guest after a failed snapshot: {r}");
                }
            }
            Err(e)
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

fn write(
    vmm: &mut Vmm,
    target: &std::path::Path,
    taken: Taken,
) -> Result<SnapshotReport, SnapshotError> {
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
    let capture = ms(t1.elapsed());

    let t2 = Instant::now();
    let staging = Staging::create(target)?;
    let memory = machine
        .ram()
        .regions
        .iter()
        .enumerate()
        .map(|(i, r)| write_region(r, &staging.path().join(memory_file_name(i))))
        .collect::<Result<Vec<_>, _>>()?;
    let ram_phase = t2.elapsed();

    let t3 = Instant::now();
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
        memory,
        disks,
        taken,
    };
    let record = cpr::encode(&snapshot.taken.writer, SNAPSHOT_KIND, &snapshot)
        .map_err(SnapshotError::Encode)?;
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
    staging.commit()?;
    let ram_bytes: u64 = snapshot.memory.iter().map(|m| m.data_bytes).sum();
    let secs = ram_phase.as_secs_f64();
    Ok(SnapshotReport {
        path: target.to_path_buf(),
        mode: snapshot.taken.mode,
        state_bytes: record.len() as u64,
        ram_bytes,
        ram_total: snapshot.memory.iter().map(|m| m.size).sum(),
        regions: snapshot.memory.len(),
        phases_ms: SnapshotPhases {
            capture,
            ram: ms(ram_phase),
            state: ms(t3.elapsed()),
            ..SnapshotPhases::default()
        },
        throughput_mib_s: if secs > 0.0 {
            ram_bytes as f64 / secs / (1 << 20) as f64
        } else {
            0.0
        },
    })
}
