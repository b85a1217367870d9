//! Snapshot to disk (`vm.snapshot`) and restore in a new process (`molt --restore`): the
//! restored guest continues where the snapshot left it (ticks, memtest, disk records), can be
//! live-updated and snapshotted again, and every bad snapshot is refused with one clear line.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use molt_tests::api::{self, Reply};
use molt_tests::{assert_memtest, assert_ticks, guest_lines, of_kind, GuestLine, Molt, Output};
use molt_tests::{molt_bin, run, Line, Stream, TempDir};

const WAIT: Duration = Duration::from_secs(60);
const NEXT_BIN: &str = env!("MOLT_NEXT_BIN");
const CMDLINE: &str = "console=ttyS0 molt.memtest=4 molt.blk=on";

/// A disk image for the guest's numbered records.
fn image(dir: &TempDir) -> PathBuf {
    let path = dir.join("disk.img");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(4 << 20))
        .unwrap();
    path
}

/// Boots the embedded guest with a disk and an API socket at `sock`.
fn boot(bin: &Path, sock: &Path, disk: &Path, env: &[(&str, &str)]) -> Molt {
    let args = [
        "--api-socket".to_string(),
        sock.display().to_string(),
        "--disk".into(),
        format!("path={}", disk.display()),
        "--memory".into(),
        "size=64M".into(),
        "--cmdline".into(),
        CMDLINE.into(),
    ];
    let molt = Molt::spawn_env(bin, &args, env);
    api::wait_ready(sock, WAIT);
    molt
}

/// Restores `snap` with an API socket at `sock` (eager unless `lazy`).
fn restore(snap: &Path, sock: &Path, lazy: bool) -> Molt {
    restore_bin(&molt_bin(), snap, sock, lazy)
}

/// Restores `snap` with the molt binary `bin`.
fn restore_bin(bin: &Path, snap: &Path, sock: &Path, lazy: bool) -> Molt {
    let lazy = if lazy { "on" } else { "off" };
    let args = [
        "--restore".to_string(),
        format!("path={},lazy={lazy}", snap.display()),
        "--api-socket".into(),
        sock.display().to_string(),
        "--log-level".into(),
        "info".into(),
    ];
    let molt = Molt::spawn_bin(bin, &args);
    api::wait_ready(sock, WAIT);
    molt
}

fn snapshot(sock: &Path, snap: &Path, mode: &str) -> Reply {
    let body = serde_json::json!({ "path": snap, "mode": mode }).to_string();
    api::put(sock, "vm.snapshot", &body)
}

/// Waits until the guest has printed `more` further lines of `kind` with a number `key`.
fn wait_more(molt: &mut Molt, kind: &str, more: usize) {
    let seen = guest_lines(stdout(molt.lines()))
        .iter()
        .filter(|l| l.kind == kind && l.get("n").is_some())
        .count();
    let mut count = seen;
    molt.wait_line(Stream::Stdout, WAIT, |l| {
        if GuestLine::parse(l).is_some_and(|g| g.kind == kind && g.get("n").is_some()) {
            count += 1;
        }
        count >= seen + more
    });
}

fn stdout(lines: &[Line]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.stream == Stream::Stdout)
        .map(|l| l.text.clone())
        .collect()
}

/// The serial output of several processes that ran the same guest one after the other, as
/// the guest wrote it: a line the guest had half written when one process stopped is
/// completed by the next one.
fn joined(runs: &[Vec<String>]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for run in runs {
        for (i, line) in run.iter().enumerate() {
            match out.last_mut() {
                Some(last) if i == 0 && !line.starts_with("molt-guest: ") => last.push_str(line),
                _ => out.push(line.clone()),
            }
        }
    }
    out
}

/// Checks the guest's whole life across the runs: ticks 1, 2, 3, … without a gap or a
/// repeat, every memtest pass ok, disk records numbered 1, 2, 3, … all ok.
fn assert_continuous(runs: &[Vec<String>], min_ticks: u64) {
    let mut all = joined(runs);
    // The last run ended by vm.shutdown, which may cut its last line short.
    all.pop();
    let lines = guest_lines(all);
    assert_ticks(&lines, min_ticks);
    assert_memtest(&lines, 1);
    let blk: Vec<&GuestLine> = of_kind(&lines, "blk")
        .into_iter()
        .filter(|l| l.get("n").is_some())
        .collect();
    assert!(!blk.is_empty(), "no disk records");
    for (i, l) in blk.iter().enumerate() {
        assert!(l.has("ok"), "disk record failed: {}", l.raw);
        assert_eq!(l.num("n"), i as u64 + 1, "disk records: {}", l.raw);
    }
    for l in &lines {
        assert!(!l.raw.contains("FAIL"), "{}", l.raw);
    }
}

fn last_tick(lines: &[String]) -> u64 {
    let ticks = guest_lines(lines.iter().map(String::as_str));
    of_kind(&ticks, "tick")
        .iter()
        .map(|l| l.num("n"))
        .max()
        .unwrap_or(0)
}

fn finish(molt: Molt) -> Output {
    let out = molt.finish(WAIT);
    out.assert_code(0);
    out
}

fn stop_and_collect(sock: &Path, molt: Molt) -> Vec<String> {
    let r = api::put(sock, "vm.shutdown", "");
    assert_eq!(r.status, 204, "{r:?}");
    stdout(&finish(molt).lines)
}

#[test]
fn a_stopped_vm_restores_in_a_new_process_and_continues() {
    for lazy in [false, true] {
        let dir = TempDir::new("snapshot-restore");
        let (sock, snap, disk) = (dir.join("a.sock"), dir.join("snap"), image(&dir));
        let mut vm = boot(&molt_bin(), &sock, &disk, &[]);
        wait_more(&mut vm, "tick", 3);
        wait_more(&mut vm, "blk", 3);
        let r = snapshot(&sock, &snap, "stop");
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["mode"], "stop");
        assert_eq!(r.body["regions"], 1);
        // Sparse: far less than the 64 MiB of RAM was written.
        let ram = r.body["ram_bytes"].as_u64().unwrap();
        assert!(ram > 0 && ram < 48 << 20, "{r:?}");
        let first = stdout(&finish(vm).lines);
        let at_snapshot = last_tick(&first);

        let mut restored = restore(&snap, &dir.join("b.sock"), lazy);
        if lazy {
            // The restore reports when the last page of RAM is in.
            restored.wait_stderr("the last page is in", WAIT);
        }
        wait_more(&mut restored, "tick", 3);
        wait_more(&mut restored, "blk", 3);
        let second = stop_and_collect(&dir.join("b.sock"), restored);
        // The first tick after the restore is the one after the snapshot's.
        let ticks = guest_lines(second.iter().map(String::as_str));
        let resumed = of_kind(&ticks, "tick").first().map(|l| l.num("n"));
        assert_eq!(resumed, Some(at_snapshot + 1), "lazy={lazy}");
        assert_continuous(&[first, second], at_snapshot + 2);
    }
}

#[test]
fn a_restored_vm_is_live_updated_and_snapshotted_again() {
    let dir = TempDir::new("snapshot-again");
    let (sock, snap, disk) = (dir.join("a.sock"), dir.join("snap"), image(&dir));
    let mut vm = boot(&molt_bin(), &sock, &disk, &[]);
    wait_more(&mut vm, "tick", 3);
    // Paused mode: the VM stays paused until vm.resume; this one is shut down instead.
    let r = snapshot(&sock, &snap, "paused");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(api::get(&sock, "vm.info").body["state"], "paused");
    let first = stop_and_collect(&sock, vm);

    let sock2 = dir.join("b.sock");
    let mut restored = restore(&snap, &sock2, true);
    wait_more(&mut restored, "tick", 2);
    let pid = restored.pid();
    let r = api::put(&sock2, "vm.cpr-exec", "");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["pid"], pid);
    wait_more(&mut restored, "tick", 2);
    // The same path again: the previous snapshot is replaced as a whole.
    let r = snapshot(&sock2, &snap, "stop");
    assert_eq!(r.status, 200, "{r:?}");
    let second = stdout(&finish(restored).lines);

    let sock3 = dir.join("c.sock");
    let mut again = restore(&snap, &sock3, false);
    wait_more(&mut again, "tick", 2);
    let info = api::get(&sock3, "vm.info").body;
    assert_eq!(info["updates"]["count"], 1, "{info}");
    let third = stop_and_collect(&sock3, again);
    assert_continuous(&[first, second, third], 7);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains("snapshot-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Copies a snapshot directory (its files) to `to`.
fn copy_snapshot(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Offset of the first chunk of RAM the snapshot wrote data for.
fn first_data_chunk(snap: &Path) -> u64 {
    let bytes = std::fs::read(snap.join("state.molt")).unwrap();
    let payload: serde_json::Value = serde_json::from_slice(&bytes[28..]).unwrap();
    let mem = &payload["state"]["memory"][0];
    let chunks = mem["chunks"].as_array().unwrap();
    let i = chunks.iter().position(|c| !c.is_null()).unwrap() as u64;
    i * mem["chunk_size"].as_u64().unwrap()
}

fn restore_fails(snap: &Path, extra: &[&str], needles: &[&str]) {
    restore_fails_with(snap, "off", extra, needles)
}

fn restore_fails_with(snap: &Path, lazy: &str, extra: &[&str], needles: &[&str]) {
    let mut args = vec![
        "--restore".to_string(),
        format!("path={},lazy={lazy}", snap.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["--serial".into(), "null".into()]);
    let out = run(&args);
    out.assert_error(needles);
}

#[test]
fn bad_snapshots_and_requests_are_refused_with_one_clear_line() {
    let dir = TempDir::new("snapshot-bad");
    let (sock, good, disk) = (dir.join("a.sock"), dir.join("good"), image(&dir));
    let mut vm = boot(&molt_bin(), &sock, &disk, &[]);
    wait_more(&mut vm, "tick", 2);

    // Refused requests: nothing paused, the guest keeps running.
    let file = dir.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let other = dir.join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), b"x").unwrap();
    for (path, needle) in [
        (file.as_path(), "not a directory"),
        (other.as_path(), "something else"),
        (Path::new("/nonexistent-molt/snap"), "parent directory"),
    ] {
        let r = snapshot(&sock, path, "stop");
        assert_eq!(r.status, 400, "{r:?}");
        assert!(r.body["error"].as_str().unwrap().contains(needle), "{r:?}");
    }
    assert_eq!(snapshot(&sock, Path::new("rel"), "stop").status, 400);
    assert_eq!(api::get(&sock, "vm.info").body["state"], "running");
    wait_more(&mut vm, "tick", 1);
    assert_eq!(std::fs::read(other.join("notes.txt")).unwrap(), b"x");

    let r = snapshot(&sock, &good, "stop");
    assert_eq!(r.status, 200, "{r:?}");
    finish(vm);

    let variant = |name: &str| {
        let p = dir.join(name);
        copy_snapshot(&good, &p);
        p
    };
    restore_fails(&dir.join("missing"), &[], &["no snapshot at"]);
    restore_fails(&file, &[], &["not a directory"]);
    let foreign = variant("foreign");
    std::fs::write(foreign.join("state.molt"), vec![7u8; 4096]).unwrap();
    restore_fails(
        &foreign,
        &[],
        &["not a usable molt snapshot", "not a molt state record"],
    );
    let future = variant("future");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(future.join("state.molt"))
        .unwrap();
    f.write_all_at(&2u16.to_le_bytes(), 8).unwrap();
    restore_fails(&future, &[], &["unsupported record version 2."]);
    let corrupt = variant("corrupt");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(corrupt.join("state.molt"))
        .unwrap();
    f.write_all_at(b"#", 200).unwrap();
    restore_fails(&corrupt, &[], &["checksum mismatch"]);
    let bad_ram = variant("bad-ram");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(bad_ram.join("ram0.mem"))
        .unwrap();
    let mut byte = [0u8];
    let at = first_data_chunk(&bad_ram) + 100;
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[!byte[0]], at).unwrap();
    restore_fails(
        &bad_ram,
        &[],
        &["ram0.mem", "fails its checksum", "not run"],
    );
    // Lazily: found when the page is first needed or while loading in the background, and
    // the VM ends with the same clear line.
    restore_fails_with(
        &bad_ram,
        "on",
        &[],
        &["ram0.mem", "fails its checksum", "found"],
    );
    let short = variant("short");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(short.join("ram0.mem"))
        .unwrap();
    f.set_len(1 << 20).unwrap();
    restore_fails(&short, &[], &["ram0.mem", "truncated"]);
    let no_ram = variant("no-ram");
    std::fs::remove_file(no_ram.join("ram0.mem")).unwrap();
    restore_fails(&no_ram, &[], &["ram0.mem"]);
    // The disk: another size, then missing.
    std::fs::File::options()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    restore_fails(&good, &[], &["disk", "another file"]);
    std::fs::remove_file(&disk).unwrap();
    restore_fails(&good, &[], &["disk", "cannot open"]);
    // VM-shape options conflict with the snapshot's.
    restore_fails(&good, &["--memory", "size=1G"], &["--memory"]);
}

#[test]
fn kill_9_while_writing_leaves_the_previous_snapshot() {
    let dir = TempDir::new("snapshot-kill");
    let (sock, snap, disk) = (dir.join("a.sock"), dir.join("snap"), image(&dir));
    let mut vm = boot(&molt_bin(), &sock, &disk, &[]);
    wait_more(&mut vm, "tick", 2);
    assert_eq!(snapshot(&sock, &snap, "stop").status, 200);
    let first = stdout(&finish(vm).lines);
    let before = std::fs::read(snap.join("state.molt")).unwrap();

    // The test build hangs after writing everything but before the rename.
    let sock2 = dir.join("b.sock");
    let disk2 = dir.join("disk2.img");
    std::fs::copy(&disk, &disk2).unwrap();
    let mut doomed = boot(
        Path::new(NEXT_BIN),
        &sock2,
        &disk2,
        &[("MOLT_TEST_FAULT", "snapshot-hang")],
    );
    wait_more(&mut doomed, "tick", 2);
    let body = serde_json::json!({ "path": snap, "mode": "stop" }).to_string();
    let sock_c = sock2.clone();
    let request = std::thread::spawn(move || {
        api::request(&sock_c, "PUT", "/api/v1/vm.snapshot", Some(&body), WAIT)
    });
    let staged = dir.join(".snap.snapshot-tmp").join("state.molt");
    let deadline = Instant::now() + WAIT;
    while !staged.exists() {
        assert!(Instant::now() < deadline, "the snapshot was never staged");
        std::thread::sleep(Duration::from_millis(20));
    }
    doomed.signal(libc::SIGKILL);
    drop(doomed.finish(WAIT));
    assert!(
        request.join().unwrap().is_err(),
        "no answer from a killed molt"
    );
    assert_eq!(std::fs::read(snap.join("state.molt")).unwrap(), before);

    // The previous snapshot restores; the next snapshot clears the torn one away.
    let sock3 = dir.join("c.sock");
    let mut restored = restore(&snap, &sock3, true);
    wait_more(&mut restored, "tick", 2);
    assert_eq!(snapshot(&sock3, &snap, "stop").status, 200);
    let second = stdout(&finish(restored).lines);
    assert!(!dir.join(".snap.snapshot-tmp").exists());
    assert_continuous(&[first, second], 3);
}

/// In a new mount namespace of the calling thread: a 1 MiB tmpfs at `dir`.
fn tiny_tmpfs(dir: &Path) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    use nix::sched::{unshare, CloneFlags};
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare(CLONE_NEWNS): {e}"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making mounts private: {e}"))?;
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("size=1m"),
    )
    .map_err(|e| format!("mounting a tmpfs: {e}"))
}

#[test]
fn a_full_file_system_fails_the_snapshot_and_the_guest_runs_on() {
    let dir = TempDir::new("snapshot-full");
    let (sock, disk, mnt) = (dir.join("a.sock"), image(&dir), dir.join("mnt"));
    std::fs::create_dir(&mnt).unwrap();
    let (mnt2, sock2, disk2) = (mnt.clone(), sock.clone(), disk.clone());
    // The namespace belongs to this thread; molt, started from it, lives in it.
    let started = std::thread::spawn(move || -> Result<Molt, String> {
        tiny_tmpfs(&mnt2)?;
        Ok(boot(&molt_bin(), &sock2, &disk2, &[]))
    })
    .join()
    .unwrap();
    let mut vm = match started {
        Ok(m) => m,
        Err(why) => return molt_tests::skip("snapshots to a full file system", &why),
    };
    wait_more(&mut vm, "tick", 2);
    // molt's view of the tmpfs.
    let seen = PathBuf::from(format!("/proc/{}/root{}", vm.pid(), mnt.display()));
    for (mode, state) in [("stop", "running"), ("paused", "paused")] {
        let r = snapshot(&sock, &mnt.join("snap"), mode);
        assert_eq!(r.status, 507, "{r:?}");
        let error = r.body["error"].as_str().unwrap_or_default();
        assert!(error.contains("No space left on device"), "{r:?}");
        assert_eq!(api::get(&sock, "vm.info").body["state"], state);
        let left: Vec<_> = std::fs::read_dir(&seen).unwrap().collect();
        assert!(left.is_empty(), "a torn snapshot was left: {left:?}");
    }
    assert_eq!(api::put(&sock, "vm.resume", "").status, 204);
    wait_more(&mut vm, "tick", 2);
    let lines = stop_and_collect(&sock, vm);
    assert_continuous(&[lines], 4);
}

#[test]
fn snapshots_restore_across_versions_both_ways() {
    let dir = TempDir::new("snapshot-versions");
    let (sock, snap, disk) = (dir.join("a.sock"), dir.join("snap"), image(&dir));
    let mut vm = boot(&molt_bin(), &sock, &disk, &[]);
    wait_more(&mut vm, "tick", 2);
    assert_eq!(snapshot(&sock, &snap, "stop").status, 200);
    let first = stdout(&finish(vm).lines);
    // N → N+1.
    let sock2 = dir.join("b.sock");
    let mut next = restore_bin(Path::new(NEXT_BIN), &snap, &sock2, true);
    wait_more(&mut next, "tick", 2);
    assert!(api::get(&sock2, "vmm.ping").body["version"]
        .as_str()
        .unwrap_or_default()
        .ends_with("+next"));
    assert_eq!(snapshot(&sock2, &snap, "stop").status, 200);
    let second = stdout(&finish(next).lines);
    // N+1 → N.
    let sock3 = dir.join("c.sock");
    let mut back = restore(&snap, &sock3, false);
    wait_more(&mut back, "tick", 2);
    let third = stop_and_collect(&sock3, back);
    assert_continuous(&[first, second, third], 5);
}
