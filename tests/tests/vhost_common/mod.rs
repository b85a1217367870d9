//! The VM of the vhost-user tests: one vhost-user disk, the guest writing disk records, its
//! console in a file (which travels with the VM across updates and transfers).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use molt_tests::api::{self, Reply};
use molt_tests::{guest_lines, molt_bin, GuestLine, Molt, TempDir};
use serde_json::Value;

pub const WAIT: Duration = Duration::from_secs(60);

pub struct Vm {
    first: Molt,
    receivers: Vec<Molt>,
    pub api: PathBuf,
    console: PathBuf,
    /// Where transfer sockets go.
    dir: PathBuf,
}

impl Vm {
    /// Boots with the disk served at `socket` and the guest's `cmdline`; returns once the
    /// guest has completed 3 disk records.
    pub fn start(dir: &TempDir, socket: &Path, cmdline: &str) -> Vm {
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
            cmdline.into(),
        ];
        let first = Molt::spawn(&args);
        api::wait_ready(&api, WAIT);
        let vm = Vm {
            first,
            receivers: Vec::new(),
            api,
            console,
            dir: dir.path().to_path_buf(),
        };
        vm.wait_records(3);
        vm
    }

    /// The console's whole lines.
    pub fn console(&self) -> String {
        let mut text = std::fs::read_to_string(&self.console).unwrap_or_default();
        text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
        text
    }

    pub fn lines(&self) -> Vec<GuestLine> {
        guest_lines(self.console().lines())
    }

    /// The highest completed `kind` line's `key`.
    pub fn last(&self, kind: &str, key: &str) -> u64 {
        self.lines()
            .iter()
            .filter(|l| l.kind == kind && l.get(key).is_some() && !l.has("FAIL"))
            .map(|l| l.num(key))
            .max()
            .unwrap_or(0)
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

    pub fn wait_records(&self, more: u64) {
        self.wait_for("blk", "n", more);
    }

    pub fn wait_ticks(&self, more: u64) {
        self.wait_for("tick", "n", more);
    }

    pub fn tail(&self) -> String {
        let text = self.console();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn info(&self) -> Value {
        let r = api::get(&self.api, "vm.info");
        assert_eq!(r.status, 200, "{r:?}");
        r.body
    }

    /// The disk's `vhost_user` part of `vm.info`.
    pub fn device(&self) -> Value {
        self.info()["devices"][0]["vhost_user"].clone()
    }

    /// Waits until molt has noticed that the backend is gone.
    pub fn wait_disconnected(&self) {
        let deadline = Instant::now() + WAIT;
        while self.device()["state"] != "disconnected" {
            assert!(Instant::now() < deadline, "{}", self.device());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn cpr_exec(&self) -> Reply {
        let body = format!(r#"{{"binary": "{}"}}"#, molt_bin().display());
        api::put(&self.api, "vm.cpr-exec", &body)
    }

    /// Transfers the VM to a new `molt --incoming`.
    pub fn transfer(&mut self) -> Reply {
        let socket = self.dir.join(format!("in{}.sock", self.receivers.len()));
        self.receivers
            .push(Molt::spawn_incoming(&molt_bin(), &socket, &[], &[]));
        let body = format!(r#"{{"socket": "{}"}}"#, socket.display());
        api::put(&self.api, "vm.cpr-transfer", &body)
    }

    /// No request failed or timed out, more than `at_least` disk records are there, each
    /// exactly once and in order from 1, and the guest booted once.
    pub fn assert_records_continuous(&self, at_least: usize) {
        let text = self.console();
        assert!(!text.contains("FAIL"), "a request failed:\n{text}");
        let lines = guest_lines(text.lines());
        let records: Vec<u64> = lines
            .iter()
            .filter(|l| l.kind == "blk" && l.get("n").is_some())
            .map(|l| l.num("n"))
            .collect();
        assert!(records.len() > at_least, "too few disk records:\n{text}");
        for (i, n) in records.iter().enumerate() {
            assert_eq!(*n, i as u64 + 1, "disk records out of sequence:\n{text}");
        }
        let boots = lines.iter().filter(|l| l.kind == "boot").count();
        assert_eq!(boots, 1, "{text}");
    }

    /// Shuts the VM down: the process running it exits 0, every process it ran in ended
    /// without a panic.
    pub fn shutdown(self) {
        assert_eq!(api::put(&self.api, "vm.shutdown", "{}").status, 204);
        let out = self.first.finish(WAIT);
        assert_eq!(out.code(), Some(0), "{}", out.describe());
        out.assert_no_panic();
        for r in self.receivers {
            let out = r.finish(WAIT);
            assert!(out.code().is_some(), "{}", out.describe());
            out.assert_no_panic();
        }
    }
}
