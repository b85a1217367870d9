//! vhost-user disks served by qemu-storage-daemon: the guest's disk records continue through
//! cpr-exec updates (plain and through a stand-in) and cpr-transfers while the backend keeps its one connection, and a
//! backend that dies and comes back costs the guest nothing but the requests it had taken.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use molt_tests::api;
use molt_tests::{molt_bin, GuestLine, TempDir};
use serde_json::Value;

mod vhost_common;
use vhost_common::{Vm, WAIT};

const QSD: &str = "qemu-storage-daemon";

/// A qemu-storage-daemon exporting one image as vhost-user-blk; killed when dropped.
struct Backend {
    child: Child,
    image: PathBuf,
    socket: PathBuf,
}

impl Backend {
    /// Starts the daemon, or says why the test cannot run.
    fn start(dir: &TempDir) -> Option<Backend> {
        let found = Command::new(QSD)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            molt_tests::skip(
                "vhost-user tests",
                "qemu-storage-daemon is not installed (Debian package qemu-utils)",
            );
            return None;
        }
        let image = dir.join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(8 << 20))
            .unwrap();
        Some(Backend::serve(image, dir.join("vhost.sock")))
    }

    fn serve(image: PathBuf, socket: PathBuf) -> Backend {
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(QSD)
            .args([
                "--blockdev",
                &format!(
                    "driver=file,node-name=disk,filename={}",
                    image.display()
                ),
                "--export",
                &format!(
                    "type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path={},writable=on",
                    socket.display()
                ),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + WAIT;
        while !socket.exists() {
            assert!(Instant::now() < deadline, "{QSD} never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        Backend {
            child,
            image,
            socket,
        }
    }

    /// The daemon's open unix sockets (inodes): its listener and every connection it
    /// accepted and still holds. A reconnection would show up as a new inode.
    fn sockets(&self) -> BTreeSet<String> {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|l| l.display().to_string())
            .filter(|l| l.starts_with("socket:"))
            .collect()
    }

    /// Kills the daemon with one of the guest's requests in its hands: stopped first, it
    /// takes or keeps the request the guest submits next and never completes it.
    fn kill_with_a_request_in_flight(self) -> (PathBuf, PathBuf) {
        let stopped = Command::new("kill")
            .args(["-STOP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(stopped.success(), "kill -STOP {}", self.child.id());
        // The guest always has one request in flight: long enough for its next one.
        std::thread::sleep(Duration::from_millis(300));
        self.kill()
    }

    fn kill(mut self) -> (PathBuf, PathBuf) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        (self.image.clone(), self.socket.clone())
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn assert_connected(device: &Value, reconnects: u64) {
    assert_eq!(device["state"], "connected", "{device}");
    assert_eq!(device["reconnects"], reconnects, "{device}");
}

#[test]
fn disk_records_continue_through_twenty_updates_on_one_backend_connection() {
    let dir = TempDir::new("vhost-exec");
    let Some(backend) = Backend::start(&dir) else {
        return;
    };
    let vm = Vm::start(&dir, &backend.socket, "molt.memtest=4 molt.blk=on");
    let sockets = backend.sockets();
    assert_eq!(sockets.len(), 2, "listener and one connection: {sockets:?}");
    let pid = vm.info()["pid"].clone();
    let mut fds = Vec::new();
    for i in 0..20 {
        let r = vm.cpr_exec();
        assert_eq!(r.status, 200, "update {i}: {r:?}");
        assert_eq!(r.body["pid"], pid);
        vm.wait_records(2);
        if i == 0 || i == 19 {
            // No API request in flight while the fds are listed.
            std::thread::sleep(Duration::from_millis(500));
            fds.push(molt_tests::host::fd_kinds(pid.as_u64().unwrap()));
        }
    }
    assert_eq!(fds[0], fds[1], "molt's fds grew over the updates");
    vm.wait_ticks(1);
    assert_eq!(vm.info()["updates"]["count"], 20);
    assert_connected(&vm.device(), 0);
    assert_eq!(
        backend.sockets(),
        sockets,
        "the backend saw another connection"
    );
    vm.assert_records_continuous(10);
    vm.shutdown();
}

#[test]
fn disk_records_continue_through_transfers_and_updates_and_stand_ins_on_one_backend_connection() {
    let dir = TempDir::new("vhost-transfer");
    let Some(backend) = Backend::start(&dir) else {
        return;
    };
    let mut vm = Vm::start(&dir, &backend.socket, "molt.memtest=4 molt.blk=on");
    let sockets = backend.sockets();
    for i in 0..3 {
        let r = vm.transfer();
        assert_eq!(r.status, 200, "transfer {i}: {r:?}");
        assert_eq!(r.body["mode"], "transfer");
        vm.wait_records(2);
        let r = vm.cpr_exec();
        assert_eq!(r.status, 200, "update after transfer {i}: {r:?}");
        vm.wait_records(2);
        let r = vm.cpr_exec_stand_in(&molt_bin());
        assert_eq!(r.status, 200, "update through a stand-in {i}: {r:?}");
        assert_eq!(r.body["legs"].as_array().map(Vec::len), Some(2), "{r:?}");
        vm.wait_records(2);
    }
    assert_eq!(vm.info()["updates"]["count"], 9);
    // A snapshot would not hold the backend's requests: refused, and the guest runs on.
    let snap = dir.join("snap");
    let r = api::put(
        &vm.api,
        "vm.snapshot",
        &format!(r#"{{"path": "{}"}}"#, snap.display()),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.to_string().contains("vhost-user"), "{r:?}");
    assert!(!snap.exists(), "a refused snapshot left {}", snap.display());
    assert_eq!(vm.info()["state"], "running");
    vm.wait_records(2);
    assert_connected(&vm.device(), 0);
    assert_eq!(
        backend.sockets(),
        sockets,
        "the backend saw another connection"
    );
    vm.assert_records_continuous(10);
    vm.shutdown();
}

/// A guest that sleeps until its disk's interrupt (`molt.idle=halt`, sleeping at once) sees
/// every completion only through the interrupt line and the device's InterruptStatus, as
/// Linux does: a completion whose interrupt an update lost would stop its disk (a timeout).
#[test]
fn a_guest_that_sleeps_until_its_disk_interrupts_keeps_its_disk_through_updates_and_transfers() {
    let dir = TempDir::new("vhost-halt");
    let Some(backend) = Backend::start(&dir) else {
        return;
    };
    let cmdline = "molt.memtest=0 molt.blk=on molt.idle=halt molt.halt_poll_us=0";
    let mut vm = Vm::start(&dir, &backend.socket, cmdline);
    let sockets = backend.sockets();
    for i in 0..4 {
        let r = vm.cpr_exec();
        assert_eq!(r.status, 200, "update {i}: {r:?}");
        vm.wait_records(2);
        let r = vm.transfer();
        assert_eq!(r.status, 200, "transfer {i}: {r:?}");
        vm.wait_records(2);
    }
    let ticks_before = vm.last("tick", "n") as usize;
    vm.wait_ticks(2);
    vm.assert_slept_on_interrupts(ticks_before);
    assert_connected(&vm.device(), 0);
    assert_eq!(
        backend.sockets(),
        sockets,
        "the backend saw another connection"
    );
    vm.assert_records_continuous(10);
    vm.shutdown();
}

#[test]
fn a_backend_that_dies_and_comes_back_is_reconnected_and_the_guest_keeps_running() {
    let dir = TempDir::new("vhost-restart");
    let Some(backend) = Backend::start(&dir) else {
        return;
    };
    let vm = Vm::start(&dir, &backend.socket, "molt.memtest=4 molt.blk=on");
    let (image, socket) = backend.kill_with_a_request_in_flight();
    // The guest keeps ticking while its disk does not answer.
    vm.wait_ticks(2);
    let device = vm.device();
    assert_eq!(device["state"], "disconnected", "{device}");
    // The request the dead backend had taken came back to the guest as an I/O error.
    assert_eq!(device["failed_requests"], 1, "{device}");
    let stalled = vm.last("blk", "n");
    vm.wait_ticks(1);
    assert_eq!(vm.last("blk", "n"), stalled, "records without a backend");
    // An update while the backend is away carries the disconnected device along.
    let r = vm.cpr_exec();
    assert_eq!(r.status, 200, "{r:?}");
    vm.wait_ticks(1);
    assert_eq!(vm.device()["state"], "disconnected");
    let backend = Backend::serve(image, socket);
    vm.wait_records(5);
    // One restart, one reconnection.
    let device = vm.device();
    assert_connected(&device, 1);
    // And the new session survives updates as the first one did.
    let sockets = backend.sockets();
    for _ in 0..3 {
        let r = vm.cpr_exec();
        assert_eq!(r.status, 200, "{r:?}");
        vm.wait_records(2);
    }
    let device = vm.device();
    assert_connected(&device, 1);
    assert_eq!(
        backend.sockets(),
        sockets,
        "the backend saw another connection"
    );
    // Each record once and in order, the one whose write or read-back failed included.
    let lines = vm.lines();
    let records: Vec<u64> = lines
        .iter()
        .filter(|l| l.kind == "blk" && l.get("n").is_some())
        .filter(|l| l.has("ok") || l.has("write") || l.has("read"))
        .map(|l| l.num("n"))
        .collect();
    assert!(
        records.windows(2).all(|w| w[1] == w[0] + 1),
        "records: {records:?}"
    );
    // The request the dead backend had reached the guest as an I/O error (VIRTIO_BLK_S_IOERR;
    // a read-back says `ioerr`, every other request its status), never as silence.
    let failures: Vec<&GuestLine> = lines.iter().filter(|l| l.has("FAIL")).collect();
    let first = failures
        .first()
        .expect("no failed request reached the guest");
    assert!(
        first.raw.contains("status=1") || first.raw.contains("FAIL read ioerr"),
        "{failures:?}"
    );
    // Nothing else failed. A failed write may still have reached the disk, which the guest's
    // replay ring reports when it writes that slot again: only for that slot.
    let slot = (first.has("ring") && first.has("write")).then(|| first.num("r"));
    for later in &failures[1..] {
        assert!(
            slot.is_some_and(|r| later
                .raw
                .ends_with(&format!("blk ring r={r} FAIL replay seq={r}"))),
            "{failures:?}"
        );
    }
    assert_eq!(device["failed_requests"], 1, "{device}");
    vm.shutdown();
    drop(backend);
}

/// A fake backend: answers SET_OWNER silently and GET_FEATURES with `reply`.
fn fake_backend(socket: &Path, reply: Vec<u8>) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let mut header = [0u8; 12];
        while s.read_exact(&mut header).is_ok() {
            let size = u32::from_le_bytes(header[8..12].try_into().unwrap());
            let mut body = vec![0u8; size as usize];
            if s.read_exact(&mut body).is_err() {
                return;
            }
            if header[0] == 1 {
                let _ = s.write_all(&reply);
            }
        }
    })
}

#[test]
fn a_backend_that_talks_garbage_or_lacks_features_is_a_clear_error() {
    let dir = TempDir::new("vhost-garbage");
    let run = |socket: &Path| {
        molt_tests::run(&[
            "--disk".to_string(),
            format!("vhost_user=on,socket={}", socket.display()),
        ])
    };
    let missing = run(&dir.join("nobody.sock"));
    missing.assert_error(&["vhost-user", "cannot connect", "nobody.sock"]);

    let garbage = dir.join("garbage.sock");
    let fake = fake_backend(&garbage, b"\xde\xad\xbe\xef garbage garbage".to_vec());
    run(&garbage).assert_error(&["vhost-user", "GET_FEATURES"]);
    fake.join().unwrap();

    // A well-formed reply offering only features molt does not know (no VERSION_1).
    let odd = dir.join("odd.sock");
    let mut reply = Vec::new();
    for v in [1u32, 0x5, 8] {
        reply.extend_from_slice(&v.to_le_bytes());
    }
    reply.extend_from_slice(&0xfff0_0000_ffffu64.to_le_bytes());
    let fake = fake_backend(&odd, reply);
    run(&odd).assert_error(&["vhost-user", "VIRTIO_F_VERSION_1"]);
    fake.join().unwrap();
}
