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

use molt_tests::vu_backend::{Request, Stats, VuBlkBackend};
use molt_tests::TempDir;
use serde_json::Value;

mod vhost_common;
use vhost_common::{Vm, WAIT};

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
    let vm = Vm::start(&dir, &socket, "molt.blk=on");
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
    vm.assert_records_continuous(8);
    vm.shutdown();
    drop(second);
}

#[test]
fn the_inflight_area_survives_an_update_while_the_backend_is_away() {
    let dir = TempDir::new("vhost-inflight-update");
    let (image, socket) = disk(&dir);
    let mut first = VuBlkBackend::serve(&image, &socket).unwrap();
    let vm = Vm::start(&dir, &socket, "molt.blk=on");
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
    vm.assert_records_continuous(8);
    vm.shutdown();
    drop(second);
}
