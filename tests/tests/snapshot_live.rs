//! Live snapshots (`"mode": "live"`): the guest keeps running while RAM is written, its
//! memtest rewriting most of RAM meanwhile; the snapshot is memory exactly as of the pause
//! (the restored guest's memtest is the judge), updates and snapshots requested meanwhile get
//! 409, `kill -9` in the middle leaves the previous snapshot, for 4 KiB and 2 MiB RAM.
//!
//! The test build (`MOLT_TEST_FAULT=snapshot-slow`) writes RAM slowly, so the write lasts
//! seconds whatever the disk: ticks advance and the memtest rewrites RAM during it.

mod snapshot_common;

use std::path::Path;
use std::time::{Duration, Instant};

use molt_tests::hugepages::Reservation;
use molt_tests::{api, guest_lines, of_kind, GuestLine, Molt, Stream, TempDir};
use snapshot_common::{stdout, NEXT_BIN, WAIT};

const SLOW: [(&str, &str); 1] = [("MOLT_TEST_FAULT", "snapshot-slow")];

/// Boots the test build with `memory` and a memtest over most of it, every word of every
/// page, and waits until the memtest has written all of it.
fn boot(dir: &TempDir, memory: &str, memtest_mib: u64) -> (Molt, std::path::PathBuf) {
    let sock = dir.join("a.sock");
    let cmdline = format!("console=ttyS0 molt.memtest={memtest_mib} molt.memtest_share=100");
    let args = [
        "--api-socket".to_string(),
        sock.display().to_string(),
        "--memory".into(),
        memory.into(),
        "--cmdline".into(),
        cmdline,
    ];
    let mut vm = Molt::spawn_env(Path::new(NEXT_BIN), &args, &SLOW);
    api::wait_ready(&sock, WAIT);
    wait_guest(&mut vm, "memtest", 2);
    (vm, sock)
}

/// Waits until the guest has printed `n` lines of `kind` in all.
fn wait_guest(vm: &mut Molt, kind: &str, n: usize) {
    let mut seen = guest_lines(stdout(vm.lines()))
        .iter()
        .filter(|l| l.kind == kind)
        .count();
    if seen >= n {
        return;
    }
    vm.wait_line(Stream::Stdout, WAIT, |l| {
        seen += GuestLine::parse(l).is_some_and(|g| g.kind == kind) as usize;
        seen >= n
    });
}

fn ticks(lines: &[String]) -> Vec<u64> {
    let lines = guest_lines(lines.iter().map(String::as_str));
    of_kind(&lines, "tick").iter().map(|l| l.num("n")).collect()
}

fn live_body(snap: &Path) -> String {
    serde_json::json!({ "path": snap, "mode": "live" }).to_string()
}

/// Takes a live snapshot of the guest at `sock` to `snap` while the guest runs; checks on
/// the way that the API answers, shows progress and refuses updates and other snapshots.
/// Returns the ticks between which the snapshot was taken (the last one printed before the
/// request, the first one printed after the answer) and the report.
fn live_snapshot(vm: &mut Molt, sock: &Path, snap: &Path) -> ((u64, u64), serde_json::Value) {
    // Lines the guest printed so far (the test reads them only when asked).
    vm.collect_for(Duration::from_millis(20));
    let before = stdout(vm.lines()).len();
    let tick_before = ticks(&stdout(vm.lines())).last().copied().unwrap_or(0);
    let (sock_c, body) = (sock.to_path_buf(), live_body(snap));
    let request = std::thread::spawn(move || {
        api::request(&sock_c, "PUT", "/api/v1/vm.snapshot", Some(&body), WAIT)
    });
    // While RAM is written: vm.info shows it, and everything that would disturb it is 409.
    let deadline = Instant::now() + WAIT;
    let progress = loop {
        let info = api::get(sock, "vm.info").body;
        if info["snapshot"]["phase"] == "ram" {
            break info["snapshot"].clone();
        }
        assert!(
            !request.is_finished(),
            "the snapshot ended before its RAM phase was seen"
        );
        assert!(
            Instant::now() < deadline,
            "no snapshot progress in vm.info: {info}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(progress["mode"], "live", "{progress}");
    assert!(progress["bytes_total"].as_u64().unwrap() > 0, "{progress}");
    assert_eq!(api::get(sock, "vm.info").body["state"], "running");
    let other = snap.with_file_name("other");
    let r = api::put(sock, "vm.snapshot", &live_body(&other));
    assert_eq!(r.status, 409, "{r:?}");
    let r = api::put(sock, "vm.cpr-exec", "");
    assert_eq!(r.status, 409, "{r:?}");
    let transfer = serde_json::json!({ "socket": snap.with_file_name("in.sock") }).to_string();
    let r = api::put(sock, "vm.cpr-transfer", &transfer);
    assert_eq!(r.status, 409, "{r:?}");
    while !request.is_finished() {
        vm.collect_for(Duration::from_millis(50));
    }
    let r = request
        .join()
        .unwrap()
        .expect("no answer to the live snapshot");
    assert_eq!(r.status, 200, "{r:?}");
    let answered = stdout(vm.lines()).len();
    wait_guest(vm, "tick", ticks(&stdout(vm.lines())).len() + 1);
    let tick_after = ticks(&stdout(vm.lines())[answered..])[0];
    // The guest ran during the write: ticks advanced and its memtest wrote to protected RAM.
    let during = ticks(&stdout(vm.lines())[before..answered]);
    assert!(during.len() >= 3, "ticks during the write: {during:?}");
    assert_eq!(r.body["mode"], "live");
    let live = &r.body["live"];
    assert!(live["write_faults"].as_u64().unwrap() > 0, "{}", r.body);
    assert!(live["guest_stopped_ms"].as_f64().is_some(), "{}", r.body);
    assert!(
        live["fault_max_us"].as_f64().unwrap() >= live["fault_p50_us"].as_f64().unwrap(),
        "{}",
        r.body
    );
    assert!(!other.exists());
    ((tick_before, tick_after), r.body)
}

/// Restores `snap` and checks the guest: it continues from the snapshot's tick and its
/// memtest passes over what the snapshot held.
fn restore_and_check(dir: &TempDir, snap: &Path, taken: (u64, u64), extra: &[&str]) {
    let sock = dir.join("b.sock");
    let mut args = vec![
        "--restore".to_string(),
        format!("path={}", snap.display()),
        "--api-socket".into(),
        sock.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut restored = Molt::spawn_bin(Path::new(NEXT_BIN), &args);
    api::wait_ready(&sock, WAIT);
    wait_guest(&mut restored, "memtest", 2);
    wait_guest(&mut restored, "tick", 3);
    // vm.info tells when the last page of RAM is in.
    let deadline = Instant::now() + WAIT;
    let info = loop {
        let info = api::get(&sock, "vm.info").body;
        if info["restore"]["done"] == true {
            break info;
        }
        assert!(
            Instant::now() < deadline,
            "the restore never finished: {info}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let restore = &info["restore"];
    assert_eq!(restore["lazy"], true, "{info}");
    assert!(
        restore["bytes_total"].as_u64().unwrap() >= 96 << 20,
        "{info}"
    );
    assert_eq!(restore["bytes_in"], restore["bytes_total"], "{info}");
    assert!(restore["done_ms"].as_f64().unwrap() > 0.0, "{info}");
    let r = api::put(&sock, "vm.shutdown", "");
    assert_eq!(r.status, 204, "{r:?}");
    let out = restored.finish(WAIT);
    out.assert_code(0);
    let lines = out.guest_lines();
    let t: Vec<u64> = of_kind(&lines, "tick").iter().map(|l| l.num("n")).collect();
    // The guest continues from the tick it had printed at the pause.
    assert!(
        t[0] > taken.0 && t[0] <= taken.1,
        "restored ticks {t:?}; the snapshot was taken between ticks {taken:?}"
    );
    assert!(t.windows(2).all(|w| w[1] == w[0] + 1), "{t:?}");
    let memtest = of_kind(&lines, "memtest");
    assert!(memtest.len() >= 2, "{}", out.describe());
    for l in memtest {
        assert!(
            l.has("ok"),
            "memtest after restoring a live snapshot: {}",
            l.raw
        );
    }
}

fn round_trip(tag: &str, memory: &str, restore_extra: &[&str]) {
    let dir = TempDir::new(tag);
    let snap = dir.join("snap");
    let (mut vm, sock) = boot(&dir, memory, 96);
    let (taken, report) = live_snapshot(&mut vm, &sock, &snap);
    assert!(
        report["ram_bytes"].as_u64().unwrap() >= 96 << 20,
        "{report}"
    );
    // The guest runs on after a live snapshot.
    wait_guest(&mut vm, "memtest", 8);
    let r = api::put(&sock, "vm.shutdown", "");
    assert_eq!(r.status, 204, "{r:?}");
    let out = vm.finish(WAIT);
    out.assert_code(0);
    assert!(!out.describe().contains("FAIL"), "{}", out.describe());
    restore_and_check(&dir, &snap, taken, restore_extra);
}

#[test]
fn a_live_snapshot_of_4k_ram_is_ram_as_of_the_pause() {
    round_trip("live-4k", "size=128M", &[]);
}

#[test]
fn a_live_snapshot_of_hugepage_ram_is_ram_as_of_the_pause() {
    let _pool = match Reservation::ensure(64) {
        Ok(r) => r,
        Err(why) => return molt_tests::skip("live snapshot of 2 MiB pages", &why),
    };
    round_trip("live-2m", "size=128M,hugepages=on", &[]);
}

#[test]
fn kill_9_during_a_live_snapshot_leaves_the_previous_one() {
    let dir = TempDir::new("live-kill");
    let snap = dir.join("snap");
    let (mut vm, sock) = boot(&dir, "size=128M", 96);
    let (taken, _) = live_snapshot(&mut vm, &sock, &snap);
    let previous = std::fs::read(snap.join("state.molt")).unwrap();
    // A second one, killed while its RAM is being written.
    let (sock_c, body) = (sock.clone(), live_body(&snap));
    let request = std::thread::spawn(move || {
        api::request(&sock_c, "PUT", "/api/v1/vm.snapshot", Some(&body), WAIT)
    });
    let deadline = Instant::now() + WAIT;
    loop {
        let info = api::get(&sock, "vm.info").body;
        if info["snapshot"]["bytes_written"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second snapshot never wrote: {info}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.signal(libc::SIGKILL);
    drop(vm.finish(WAIT));
    assert!(
        request.join().unwrap().is_err(),
        "no answer from a killed molt"
    );
    assert_eq!(std::fs::read(snap.join("state.molt")).unwrap(), previous);
    assert!(
        dir.join(".snap.snapshot-tmp").exists(),
        "killed before staging?"
    );
    restore_and_check(&dir, &snap, taken, &[]);
}
