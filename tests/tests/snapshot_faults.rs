//! Snapshot faults: every bad snapshot or request is refused with one clear line, `kill -9`
//! while writing leaves the previous snapshot, and a full file system fails the snapshot
//! while the guest runs on.

mod snapshot_common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use molt_tests::{api, molt_bin, run, Molt, TempDir};
use snapshot_common::*;

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

#[test]
fn a_full_file_system_fails_the_snapshot_and_the_guest_runs_on() {
    let dir = TempDir::new("snapshot-full");
    let (sock, disk, mnt) = (dir.join("a.sock"), image(&dir), dir.join("mnt"));
    std::fs::create_dir(&mnt).unwrap();
    let (mnt2, sock2, disk2) = (mnt.clone(), sock.clone(), disk.clone());
    // The namespace belongs to this thread; molt, started from it, lives in it.
    let started = std::thread::spawn(move || -> Result<Molt, String> {
        molt_tests::host::tiny_tmpfs(&mnt2)?;
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
