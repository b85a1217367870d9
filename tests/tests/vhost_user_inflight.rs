//! vhost-user disks whose backend tracks inflight requests (`INFLIGHT_SHMFD`; the backend is
//! `molt_tests::vu_backend`, in this process): a backend that dies holding one of the guest's
//! requests, and a new one on the same socket. molt keeps the inflight area and hands it to
//! the new backend, which finishes the request: the guest sees no error and its disk records
//! continue exactly once — also when molt was live-updated while the backend was away.
//!
//! The guest has one request in flight at a time, and molt restarts a ring at its used index,
//! so a backend without the area would take the held request again from the available ring
//! and the guest alone could not tell. What the new backend reports (it adopted the area and
//! resubmitted exactly the held request) is what shows the handover.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use molt_tests::api::{self, Reply};
use molt_tests::vu_backend::{Request, Stats, VuBlkBackend};
use molt_tests::{guest_lines, molt_bin, GuestLine, Molt, TempDir};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// A VM with one vhost-user disk, its console in a file (which travels with the VM).
struct Vm {
    molt: Molt,
    api: PathBuf,
    console: PathBuf,
}

impl Vm {
    fn start(dir: &TempDir, socket: &std::path::Path) -> Vm {
        let api = dir.join("api.sock");
        let console = dir.join("console.log");
        let args = [
            "--api-socket".to_string(),
            api.display().to_string(),
            "--serial".into(),
            format!("file={}", console.display()),
            "--disk".into(),
            format!("vhost_user=on,socket={}", socket.display()),
            "--cmdline".into(),
            "molt.blk=on".into(),
        ];
        let molt = Molt::spawn(&args);
        api::wait_ready(&api, WAIT);
        let vm = Vm { molt, api, console };
        vm.wait_records(3);
        vm
    }

    fn console(&self) -> String {
        let mut text = std::fs::read_to_string(&self.console).unwrap_or_default();
        text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
        text
    }

    fn lines(&self) -> Vec<GuestLine> {
        guest_lines(self.console().lines())
    }

    fn tail(&self) -> String {
        let text = self.console();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The highest completed `kind` line's `key`.
    fn last(&self, kind: &str, key: &str) -> u64 {
        let lines = self.lines();
        let done = lines
            .iter()
            .filter(|l| l.kind == kind && l.get(key).is_some() && !l.has("FAIL"));
        done.map(|l| l.num(key)).max().unwrap_or(0)
    }

    fn wait_for(&self, kind: &str, key: &str, more: u64) {
        let target = self.last(kind, key) + more;
        let deadline = Instant::now() + WAIT;
        while self.last(kind, key) < target {
            assert!(
                Instant::now() < deadline,
                "no {kind} {key}={target}; vm.info {}:\n{}",
                self.device(),
                self.tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_records(&self, more: u64) {
        self.wait_for("blk", "n", more);
    }

    fn wait_ticks(&self, more: u64) {
        self.wait_for("tick", "n", more);
    }

    fn info(&self) -> Value {
        let r = api::get(&self.api, "vm.info");
        assert_eq!(r.status, 200, "{r:?}");
        r.body
    }

    /// The disk's `vhost_user` part of `vm.info`.
    fn device(&self) -> Value {
        self.info()["devices"][0]["vhost_user"].clone()
    }

    /// Waits until molt has noticed that the backend is gone.
    fn wait_disconnected(&self) {
        let deadline = Instant::now() + WAIT;
        while self.device()["state"] != "disconnected" {
            assert!(Instant::now() < deadline, "{}", self.device());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn cpr_exec(&self) -> Reply {
        let body = format!(r#"{{"binary": "{}"}}"#, molt_bin().display());
        api::put(&self.api, "vm.cpr-exec", &body)
    }

    /// No request failed or timed out, every disk record is there exactly once and in
    /// order, and the guest booted once.
    fn assert_records_continuous(&self) {
        let text = self.console();
        assert!(!text.contains("FAIL"), "a request failed:\n{text}");
        let lines = guest_lines(text.lines());
        let records: Vec<u64> = lines
            .iter()
            .filter(|l| l.kind == "blk" && l.get("n").is_some())
            .map(|l| l.num("n"))
            .collect();
        assert!(records.len() > 8, "too few disk records:\n{text}");
        for (i, n) in records.iter().enumerate() {
            assert_eq!(*n, i as u64 + 1, "disk records out of sequence:\n{text}");
        }
        let boots = lines.iter().filter(|l| l.kind == "boot").count();
        assert_eq!(boots, 1, "{text}");
    }

    fn shutdown(self) {
        assert_eq!(api::put(&self.api, "vm.shutdown", "{}").status, 204);
        let out = self.molt.finish(WAIT);
        assert_eq!(out.code(), Some(0), "{}", out.describe());
        out.assert_no_panic();
    }
}

/// An 8 MiB image and the socket path in `dir`.
fn disk(dir: &TempDir) -> (PathBuf, PathBuf) {
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(8 << 20))
        .unwrap();
    (image, dir.join("vhost.sock"))
}

/// molt runs the disk on the current connection, reconnected `reconnects` times, and no
/// request was completed with an error.
fn assert_connected_nothing_failed(device: &Value, reconnects: u64) {
    assert_eq!(device["state"], "connected", "{device}");
    assert_eq!(device["reconnects"], reconnects, "{device}");
    assert_eq!(device["failed_requests"], 0, "{device}");
}

/// The new backend got the inflight area and finished the held request, once, and nothing
/// else went wrong on its side.
fn assert_resubmitted(stats: &Stats, held: Request) {
    assert_eq!(stats.connections, 1, "{stats:?}");
    assert_eq!(stats.areas_adopted, 1, "{stats:?}");
    assert_eq!(stats.resubmitted, vec![held], "{stats:?}");
    assert!(stats.errors.is_empty(), "{stats:?}");
    assert!(stats.completed > 1, "{stats:?}");
}

#[test]
fn a_request_the_dead_backend_held_is_finished_by_the_next_one() {
    let dir = TempDir::new("vhost-inflight");
    let (image, socket) = disk(&dir);
    let mut first = VuBlkBackend::serve(&image, &socket).unwrap();
    let vm = Vm::start(&dir, &socket);
    let held = first.crash_holding_next_request(WAIT).unwrap();
    vm.wait_disconnected();
    // The request is not failed: the inflight area keeps it for the next backend.
    let device = vm.device();
    assert_eq!(device["failed_requests"], 0, "{device}");
    let stats = first.stop();
    assert_eq!(stats.held, Some(held), "{stats:?}");
    assert!(stats.errors.is_empty(), "{stats:?}");

    let second = VuBlkBackend::serve(&image, &socket).unwrap();
    vm.wait_records(5);
    assert_connected_nothing_failed(&vm.device(), 1);
    assert_resubmitted(&second.stats(), held);
    vm.assert_records_continuous();
    vm.shutdown();
    drop(second);
}

#[test]
fn the_inflight_area_survives_an_update_while_the_backend_is_away() {
    let dir = TempDir::new("vhost-inflight-update");
    let (image, socket) = disk(&dir);
    let mut first = VuBlkBackend::serve(&image, &socket).unwrap();
    let vm = Vm::start(&dir, &socket);
    let pid = vm.info()["pid"].clone();
    let held = first.crash_holding_next_request(WAIT).unwrap();
    vm.wait_disconnected();
    drop(first);
    // The new process inherits the area (a kept fd) with the disconnected device.
    let r = vm.cpr_exec();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["pid"], pid);
    vm.wait_ticks(1);
    let device = vm.device();
    assert_eq!(device["state"], "disconnected", "{device}");
    assert_eq!(device["failed_requests"], 0, "{device}");

    let second = VuBlkBackend::serve(&image, &socket).unwrap();
    vm.wait_records(5);
    assert_connected_nothing_failed(&vm.device(), 1);
    assert_resubmitted(&second.stats(), held);
    // The new session survives updates like the first: the backend sees no new connection.
    for i in 0..2 {
        let r = vm.cpr_exec();
        assert_eq!(r.status, 200, "update {i}: {r:?}");
        vm.wait_records(2);
    }
    assert_eq!(vm.info()["updates"]["count"], 3);
    assert_connected_nothing_failed(&vm.device(), 1);
    assert_resubmitted(&second.stats(), held);
    vm.assert_records_continuous();
    vm.shutdown();
    drop(second);
}
