//! Helpers of the snapshot tests: boot a guest with a disk, snapshot it, restore it, and
//! judge the guest's whole life across the processes that ran it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use molt_tests::api::{self, Reply};
use molt_tests::{assert_memtest, assert_ticks, guest_lines, of_kind, GuestLine, Molt, Output};
use molt_tests::{molt_bin, Line, Stream, TempDir};

pub const WAIT: Duration = Duration::from_secs(60);
pub const NEXT_BIN: &str = env!("MOLT_NEXT_BIN");
pub const CMDLINE: &str = "console=ttyS0 molt.memtest=4 molt.blk=on";

/// A disk image for the guest's numbered records.
pub fn image(dir: &TempDir) -> PathBuf {
    let path = dir.join("disk.img");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(4 << 20))
        .unwrap();
    path
}

/// Boots the embedded guest with a disk and an API socket at `sock`.
pub fn boot(bin: &Path, sock: &Path, disk: &Path, env: &[(&str, &str)]) -> Molt {
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
pub fn restore(snap: &Path, sock: &Path, lazy: bool) -> Molt {
    restore_bin(&molt_bin(), snap, sock, lazy)
}

/// Restores `snap` with the molt binary `bin`.
pub fn restore_bin(bin: &Path, snap: &Path, sock: &Path, lazy: bool) -> Molt {
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

pub fn snapshot(sock: &Path, snap: &Path, mode: &str) -> Reply {
    let body = serde_json::json!({ "path": snap, "mode": mode }).to_string();
    api::put(sock, "vm.snapshot", &body)
}

/// Waits until the guest has printed `more` further lines of `kind` with a number `key`.
pub fn wait_more(molt: &mut Molt, kind: &str, more: usize) {
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

pub fn stdout(lines: &[Line]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.stream == Stream::Stdout)
        .map(|l| l.text.clone())
        .collect()
}

/// The serial output of several processes that ran the same guest one after the other, as
/// the guest wrote it: a line the guest had half written when one process stopped is
/// completed by the next one.
pub fn joined(runs: &[Vec<String>]) -> Vec<String> {
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
pub fn assert_continuous(runs: &[Vec<String>], min_ticks: u64) {
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

pub fn last_tick(lines: &[String]) -> u64 {
    let ticks = guest_lines(lines.iter().map(String::as_str));
    of_kind(&ticks, "tick")
        .iter()
        .map(|l| l.num("n"))
        .max()
        .unwrap_or(0)
}

pub fn finish(molt: Molt) -> Output {
    let out = molt.finish(WAIT);
    out.assert_code(0);
    out
}

pub fn stop_and_collect(sock: &Path, molt: Molt) -> Vec<String> {
    let r = api::put(sock, "vm.shutdown", "");
    assert_eq!(r.status, 204, "{r:?}");
    stdout(&finish(molt).lines)
}
