//! Snapshot to disk (`vm.snapshot`) and restore in a new process (`molt --restore`): the
//! restored guest continues where the snapshot left it (ticks, memtest, disk records), can be
//! live-updated and snapshotted again, and restores across versions.

mod snapshot_common;

use std::path::Path;

use molt_tests::{api, guest_lines, molt_bin, of_kind, TempDir};
use snapshot_common::*;

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
