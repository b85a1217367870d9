//! The VM of the vhost-user tests: one vhost-user disk, the guest writing disk records, its
//! console in a file (which travels with the VM across updates and transfers).
#![allow(dead_code)]

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::time::{Duration, Instant};

use molt_tests::api::Reply;
use molt_tests::file_vm::FileVm;
pub use molt_tests::file_vm::WAIT;
use molt_tests::{molt_bin, TempDir};
use serde_json::Value;

pub struct Vm(FileVm);

impl Deref for Vm {
    type Target = FileVm;
    fn deref(&self) -> &FileVm {
        &self.0
    }
}

impl DerefMut for Vm {
    fn deref_mut(&mut self) -> &mut FileVm {
        &mut self.0
    }
}

impl Vm {
    /// Boots with the disk served at `socket` and the guest's `cmdline`; returns once the
    /// guest has completed 3 disk records.
    pub fn start(dir: &TempDir, socket: &Path, cmdline: &str) -> Vm {
        let disk = format!("vhost_user=on,socket={}", socket.display());
        let vm = Vm(FileVm::start(
            dir.path(),
            &["--disk", &disk, "--cmdline", cmdline],
        ));
        vm.wait_records(3);
        vm
    }

    fn wait_for(&self, kind: &str, key: &str, more: u64) {
        self.0
            .wait_for(kind, key, more, || format!("vm.info {}", self.device()));
    }

    pub fn wait_records(&self, more: u64) {
        self.wait_for("blk", "n", more);
    }

    pub fn wait_ticks(&self, more: u64) {
        self.wait_for("tick", "n", more);
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

    /// A cpr-exec to this build.
    pub fn cpr_exec(&self) -> Reply {
        self.0.cpr_exec(&molt_bin())
    }

    /// Transfers the VM to a new `molt --incoming` of this build.
    pub fn transfer(&mut self) -> Reply {
        self.0.transfer_to_this_build()
    }

    /// No request failed or timed out, more than `at_least` disk records are there, each
    /// exactly once and in order from 1, and the guest booted once.
    pub fn assert_records_continuous(&self, at_least: usize) {
        self.assert_one_boot_no_failure();
        let records = self.assert_sequence("blk", "n");
        assert!(
            records > at_least,
            "too few disk records:\n{}",
            self.console()
        );
    }

    /// Shuts the VM down (see [`FileVm::shutdown`]).
    pub fn shutdown(self) {
        self.0.shutdown();
    }
}
