//! `molt --restore path=DIR`: a new molt continues the VM a snapshot holds. The record
//! describes the VM; host-side options (`--api-socket`, `--serial`, `--log-level`) come from
//! this command line. Disks are reopened by their recorded path and checked, taps by name,
//! and RAM goes into fresh memfds (so the restored VM can be live-updated again).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Instant;

use super::ram::{fill_region, open_checked};
use super::{lazy, status};
use super::{ms, RestoreConfig, Snapshot, SnapshotError, SNAPSHOT_KIND, STATE_FILE};
use crate::assembly::{assemble, MachineSource, Runtime};
use crate::cli::VmArgs;
use crate::components::Parts;
use crate::config::{NetBackend, VmConfig, HUGE_PAGE_SIZE};
use crate::memory::GuestRam;
use crate::memory_persist::validate_layout;
use crate::runtime::{Bookkeeping, Identity};

/// Reads and decodes the state record of the snapshot at `dir`.
pub fn read_snapshot(dir: &Path) -> Result<Snapshot, SnapshotError> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::Missing(dir.to_path_buf()))
        }
        Err(e) => return Err(SnapshotError::Read(dir.to_path_buf(), e)),
        Ok(m) if !m.is_dir() => {
            return Err(SnapshotError::Inconsistent(
                dir.to_path_buf(),
                "is not a directory".into(),
            ))
        }
        Ok(_) => {}
    }
    let path = dir.join(STATE_FILE);
    let bytes = match std::fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::Missing(dir.to_path_buf()))
        }
        r => r.map_err(|e| SnapshotError::Read(path.clone(), e))?,
    };
    let record = cpr::decode_kind::<Snapshot>(&bytes, SNAPSHOT_KIND)
        .map_err(|e| SnapshotError::Decode(path, e))?;
    log::info!(
        "snapshot {} written by {:?} (format {}.{})",
        dir.display(),
        record.writer,
        record.version.0,
        record.version.1
    );
    Ok(record.state)
}

/// The VM configuration to restore: the snapshot's, with this command line's host side.
fn restored_config(
    snap: &Snapshot,
    opts: &RestoreConfig,
    args: &VmArgs,
) -> Result<VmConfig, SnapshotError> {
    let dir = opts.path.as_path();
    let mut config = snap.config.clone();
    config.serial = args.serial.clone();
    config.api_socket = args.api_socket.clone();
    config.seccomp = args.seccomp;
    config.update_binaries = args.update_binaries.clone();
    if let Some(huge) = opts.hugepages {
        config.memory.hugepages = huge;
        let aligned = snap
            .parts
            .ram
            .iter()
            .all(|r| r.guest_addr % HUGE_PAGE_SIZE == 0 && r.size % HUGE_PAGE_SIZE == 0);
        if huge && !aligned {
            return Err(SnapshotError::Inconsistent(
                dir.to_path_buf(),
                "its RAM regions are not 2 MiB aligned: hugepages=on cannot back them".into(),
            ));
        }
    }
    if let Some(n) = config
        .nets
        .iter()
        .find(|n| matches!(n.backend, NetBackend::Fd(_)))
    {
        return Err(SnapshotError::Inconsistent(
            dir.to_path_buf(),
            format!(
                "its network device used an inherited fd ({:?}), which a new process cannot \
                 reopen",
                n.backend
            ),
        ));
    }
    Ok(config)
}

/// Every disk exists, has its recorded size and is not another file.
fn check_disks(snap: &Snapshot) -> Result<(), SnapshotError> {
    for d in &snap.disks {
        let bad = |why: String| Err(SnapshotError::Disk(d.path.clone(), why));
        let m = match std::fs::metadata(&d.path) {
            Ok(m) => m,
            Err(e) => return bad(format!("cannot open it: {e}")),
        };
        if m.len() != d.size {
            return bad(format!(
                "is {} bytes, the snapshot's disk was {}: another file",
                m.len(),
                d.size
            ));
        }
        if m.dev() == d.dev && m.ino() != d.ino {
            return bad(format!(
                "is another file than the snapshot's (inode {} on the same file system, was {})",
                m.ino(),
                d.ino
            ));
        }
    }
    Ok(())
}

/// Creates fresh RAM with the snapshot's layout and checks every memory file against it.
fn fresh_ram(
    snap: &Snapshot,
    config: &VmConfig,
    dir: &Path,
    lazy: bool,
) -> Result<(GuestRam, Vec<std::fs::File>), SnapshotError> {
    let bad = |why: String| SnapshotError::Inconsistent(dir.to_path_buf(), why);
    validate_layout(&snap.parts.ram).map_err(|e| bad(e.to_string()))?;
    if snap.memory.len() != snap.parts.ram.len() {
        return Err(bad(format!(
            "{} memory files for {} RAM regions",
            snap.memory.len(),
            snap.parts.ram.len()
        )));
    }
    let files = snap
        .memory
        .iter()
        .zip(&snap.parts.ram)
        .map(|(m, r)| open_checked(dir, m, r.size))
        .collect::<Result<Vec<_>, _>>()?;
    let mut memory = config.memory;
    // Lazily restored RAM must stay unpopulated until its pages are loaded.
    memory.prefault &= !lazy;
    let ram = crate::memory::create(&memory).map_err(crate::Error::from)?;
    let placement = |l: &[crate::memory_persist::MemoryRegionState]| -> Vec<(u64, u64)> {
        l.iter().map(|r| (r.guest_addr, r.size)).collect()
    };
    if placement(&ram.layout()) != placement(&snap.parts.ram) {
        return Err(bad(format!(
            "its RAM layout {:?} is not the one molt builds for {} bytes",
            snap.parts.ram, config.memory.size
        )));
    }
    Ok((ram, files))
}

/// Restores the snapshot `opts` names with the host-side options of `args`; the guest runs
/// (unless it was paused when the snapshot was taken) when this returns.
pub fn restore(
    opts: &RestoreConfig,
    args: &VmArgs,
    started: Instant,
) -> Result<Runtime, SnapshotError> {
    let dir = opts.path.as_path();
    let mut laps = crate::laps::Laps::start("restore");
    let snap = read_snapshot(dir)?;
    laps.mark("record");
    let config = restored_config(&snap, opts, args)?;
    check_disks(&snap)?;
    laps.mark("config and disks");
    let (ram, files) = fresh_ram(&snap, &config, dir, opts.lazy)?;
    laps.mark("memory files and memfds");
    let parts = Parts::open(&config)?;
    laps.mark("parts");
    let kinds: Vec<_> = parts.virtio.slots.iter().map(|s| s.kind).collect();
    if kinds != snap.parts.devices.kinds {
        return Err(SnapshotError::Inconsistent(
            dir.to_path_buf(),
            format!(
                "its virtio devices {:?} differ from the configured {kinds:?}",
                snap.parts.devices.kinds
            ),
        ));
    }
    let data: u64 = snap
        .memory
        .iter()
        .map(|m| {
            (0..m.chunks.len())
                .filter(|&c| m.chunks[c].is_some())
                .map(|c| m.chunk_range(c))
                .map(|(s, e)| e - s)
                .sum::<u64>()
        })
        .sum();
    status::restore_started(opts.lazy, data);
    // Held until the guest runs: loading the rest of RAM waits until then.
    let mut hold = None;
    if opts.lazy {
        match lazy::start(&ram, &files, &snap.memory, dir, started) {
            Ok(h) => hold = Some(h),
            Err(e) => {
                log::warn!("{}; reading all of RAM first", crate::error_chain(&e));
                status::restore_started(false, data);
            }
        }
    }
    let lazy = hold.is_some();
    laps.mark("userfaultfd");
    if !lazy {
        let t_fill = Instant::now();
        let mut read = 0;
        for (i, (file, desc)) in files.iter().zip(&snap.memory).enumerate() {
            read += fill_region(&ram, i, file, desc, &dir.join(&desc.file))?;
        }
        status::restore_loaded(read);
        status::restore_done(started.elapsed());
        log::info!(
            "restore: {read} bytes of guest RAM read in {:.1} ms",
            ms(t_fill.elapsed())
        );
    }
    let book = Bookkeeping {
        counters: snap.book.counters.clone(),
        identity: Identity {
            booted_at_ns: snap.book.booted_at_ns,
            ..Identity::current()
        },
        history: snap.book.history.clone(),
    };
    let source = MachineSource::Restore {
        state: &snap.vm,
        ram,
    };
    laps.mark("eager fill");
    let mut runtime = assemble(config, parts, source, book, started)?;
    laps.mark("assemble");
    if !snap.taken.was_paused {
        runtime.vmm.resume()?;
    }
    laps.mark("resume");
    drop(hold);
    laps.log();
    if runtime.vmm.config().memory.prefault {
        runtime.vmm.populate_in_background();
    }
    log::info!(
        "restored the VM of {} in {:.1} ms",
        dir.display(),
        ms(started.elapsed())
    );
    Ok(runtime)
}

/// `molt --restore`: restores and runs the VM to its end; returns the exit code.
pub fn main(opts: &RestoreConfig, args: &VmArgs, started: Instant) -> i32 {
    match restore(opts, args, started) {
        Ok(runtime) => crate::run_to_end(Ok(runtime)),
        Err(e) => {
            eprintln!("molt: error: {}", crate::error_chain(&e));
            1
        }
    }
}
