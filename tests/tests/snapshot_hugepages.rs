//! Snapshots of 2 MiB hugetlb RAM and 4 KiB memfd RAM restore into either kind. The huge
//! page pool is host-wide: this test has its own binary (cargo runs test binaries one after
//! another) and puts the pool back afterwards.

use std::time::Duration;

use molt_tests::hugepages::Reservation;
use molt_tests::{api, guest_lines, of_kind, GuestLine, Molt, Stream, TempDir};

const WAIT: Duration = Duration::from_secs(60);

fn ticks(molt: &Molt) -> Vec<u64> {
    let lines = guest_lines(
        molt.lines()
            .iter()
            .filter(|l| l.stream == Stream::Stdout)
            .map(|l| l.text.as_str()),
    );
    of_kind(&lines, "tick").iter().map(|l| l.num("n")).collect()
}

fn wait_tick(molt: &mut Molt, n: u64) {
    molt.wait_line(Stream::Stdout, WAIT, |l| {
        GuestLine::parse(l).is_some_and(|g| g.kind == "tick" && g.num("n") >= n)
    });
}

/// Boots with `memory`, snapshots (stop), restores with `restore_opts`; the restored guest
/// continues from the snapshot's tick and its memtest passes.
fn round_trip(dir: &TempDir, memory: &str, restore_opts: &str) {
    round_trip_after(dir, memory, restore_opts, false);
}

/// [`round_trip`], with a cpr-exec before the snapshot when `update` is set; returns the
/// snapshot's answer.
fn round_trip_after(
    dir: &TempDir,
    memory: &str,
    restore_opts: &str,
    update: bool,
) -> serde_json::Value {
    let (sock, snap) = (dir.join("a.sock"), dir.join("snap"));
    let mut vm = Molt::spawn(&[
        "--api-socket",
        &sock.display().to_string(),
        "--memory",
        memory,
        "--cmdline",
        "console=ttyS0 molt.memtest=4",
    ]);
    api::wait_ready(&sock, WAIT);
    wait_tick(&mut vm, 3);
    if update {
        let r = api::put(&sock, "vm.cpr-exec", "");
        assert_eq!(r.status, 200, "{r:?}");
        wait_tick(&mut vm, 5);
    }
    let body = serde_json::json!({ "path": snap, "mode": "stop" }).to_string();
    let r = api::put(&sock, "vm.snapshot", &body);
    assert_eq!(r.status, 200, "{r:?}");
    let out = vm.finish(WAIT);
    out.assert_code(0);
    let last = of_kind(&out.guest_lines(), "tick")
        .iter()
        .map(|l| l.num("n"))
        .max()
        .unwrap_or(0);

    let sock2 = dir.join("b.sock");
    let mut restored = Molt::spawn(&[
        "--restore".to_string(),
        format!("path={}{restore_opts}", snap.display()),
        "--api-socket".into(),
        sock2.display().to_string(),
    ]);
    api::wait_ready(&sock2, WAIT);
    wait_tick(&mut restored, last + 3);
    assert_eq!(
        ticks(&restored).first(),
        Some(&(last + 1)),
        "{memory} {restore_opts}"
    );
    assert_eq!(api::put(&sock2, "vm.shutdown", "").status, 204);
    let out = restored.finish(WAIT);
    out.assert_code(0);
    let lines = out.guest_lines();
    // (The shutdown may cut the last line short: a complete one ends with `mib_s=`.)
    let passes: Vec<_> = of_kind(&lines, "memtest")
        .into_iter()
        .filter(|p| p.raw.contains("mib_s="))
        .collect();
    assert!(!passes.is_empty(), "no memtest pass after the restore");
    for p in passes {
        assert!(p.has("ok"), "{}", p.raw);
    }
    std::fs::remove_dir_all(&snap).unwrap();
    r.body
}

/// The huge pages two 64 MiB guests need, or `None` once the test is reported skipped.
fn reserve() -> Option<Reservation> {
    Reservation::ensure(2 * 32)
        .map_err(|why| molt_tests::skip("snapshots of hugetlb RAM", &why))
        .ok()
}

#[test]
fn huge_page_and_small_page_snapshots_restore_into_either() {
    let Some(reservation) = reserve() else {
        return;
    };
    let dir = TempDir::new("snapshot-huge");
    round_trip(&dir, "size=64M,hugepages=on", ",hugepages=off,lazy=off");
    round_trip(&dir, "size=64M,hugepages=on", ",lazy=on");
    round_trip(&dir, "size=64M", ",hugepages=on,lazy=on");
    drop(reservation);
}

#[test]
fn hugetlb_ram_adopted_by_a_live_update_is_still_written_sparse() {
    let Some(reservation) = reserve() else {
        return;
    };
    let dir = TempDir::new("snapshot-huge-adopted");
    // The new image's mapping of RAM has no page tables for the huge pages the guest
    // touched before the update; they are found all the same, and the rest stay holes.
    let r = round_trip_after(&dir, "size=64M,hugepages=on", ",lazy=on", true);
    let (written, total) = (r["ram_bytes"].as_u64(), r["ram_total"].as_u64());
    assert_eq!(total, Some(64 << 20), "{r}");
    let written = written.unwrap_or(u64::MAX);
    assert!(written > 0 && written <= 32 << 20, "{r}");
    drop(reservation);
}
