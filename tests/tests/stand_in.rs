//! cpr-exec through a stand-in (`{"stand_in": true}`): the VM goes to a stand-in process,
//! the molt process executes the new binary (same PID) while the guest runs there, and the
//! new image takes the VM back. The guest continues with no tick lost or doubled; the report
//! has both handovers; failures leave the guest running with a JSON error.

use std::path::Path;
use std::time::{Duration, Instant};

use molt_tests::api::{self, Reply};
use molt_tests::file_vm::{FileVm, WAIT};
use molt_tests::{molt_bin, TempDir};
use serde_json::Value;

const NEXT_BIN: &str = env!("MOLT_NEXT_BIN");
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A VM with a console file, an API socket and a disk; the guest runs memtest and disk
/// records.
fn start(dir: &TempDir, bin: &Path, env: &[(&str, &str)]) -> FileVm {
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(8 << 20))
        .unwrap();
    let disk = format!("path={}", img.display());
    let args = ["--disk", &disk, "--cmdline", "molt.memtest=4 molt.blk=on"];
    let vm = FileVm::start_with(bin, dir.path(), &args, env);
    vm.wait_ticks(2);
    vm
}

fn gone(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).map_or(true, |s| s.contains("zombie"))
}

fn wait_gone(pid: u64, what: &str) {
    let deadline = Instant::now() + WAIT;
    while !gone(pid) {
        assert!(Instant::now() < deadline, "{what} (pid {pid}) did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A successful stand-in update of the process `pid` to `to_version`: two handovers, the
/// figures their sums; returns the stand-in's pid.
fn assert_updated(r: &Reply, pid: u64, to_version: &str) -> u64 {
    assert_eq!(r.status, 200, "{r:?}");
    let b = &r.body;
    assert_eq!(b["mode"], "exec", "{b}");
    assert_eq!(b["pid"], pid, "same PID: {b}");
    assert_eq!(b["from_pid"], pid, "{b}");
    assert_eq!(b["to_version"], to_version, "{b}");
    assert!(b["rolled_back"].is_null(), "{b}");
    api::assert_phases_add_up(b);
    let legs = b["legs"].as_array().expect("legs");
    assert_eq!(legs.len(), 2, "{b}");
    let stand_in = legs[0]["pid"].as_u64().unwrap();
    assert_ne!(stand_in, pid, "{b}");
    assert_eq!(legs[0]["from_pid"], pid, "{b}");
    assert_eq!(legs[1]["from_pid"], stand_in, "{b}");
    assert_eq!(legs[1]["pid"], pid, "{b}");
    let sum = |k: &str| legs.iter().map(|l| l[k].as_f64().unwrap()).sum::<f64>();
    let f = |k: &str| b[k].as_f64().unwrap();
    assert!((f("pause_ms") - sum("pause_ms")).abs() < 0.01, "{b}");
    assert!((f("stopped_ms") - sum("stopped_ms")).abs() < 0.01, "{b}");
    for l in legs {
        api::assert_phases_add_up(l);
    }
    stand_in
}

/// A stand-in update that ended on the binary that asked, `version`, in the same PID (500,
/// `rolled_back` saying `why`); the guest runs on. Shuts the VM down.
/// The update ended on the previous binary (`version`) for `why`, after `legs` handovers
/// (a refused one included: its pause counts in the report's).
fn assert_rolled_back(vm: FileVm, r: &Reply, version: &str, why: &str, legs: usize) {
    assert_eq!(r.status, 500, "{r:?}");
    let report = &r.body["report"];
    let said = report["rolled_back"].as_str().unwrap_or_default();
    assert!(said.contains(why), "{r:?}");
    let pid = report["from_pid"].clone();
    assert_eq!(report["pid"], pid, "{r:?}");
    assert_eq!(report["to_version"], version, "{r:?}");
    let each = report["legs"].as_array().cloned().unwrap_or_default();
    assert_eq!(each.len(), legs, "{r:?}");
    let sum: f64 = each.iter().filter_map(|l| l["pause_ms"].as_f64()).sum();
    let total = report["pause_ms"].as_f64().unwrap_or_default();
    assert!(total > 0.0 && (sum - total).abs() < 1e-6, "{r:?}");
    let info = vm.info();
    assert_eq!(info["pid"], pid, "{info}");
    assert_eq!(info["version"], version, "{info}");
    assert_eq!(info["updates"]["rollbacks"], 1, "{info}");
    vm.wait_ticks(3);
    vm.wait_for("blk", "n", 2, String::new);
    assert_continuous(&vm);
    vm.shutdown();
}

fn assert_continuous(vm: &FileVm) {
    vm.assert_one_boot_no_failure();
    vm.assert_sequence("tick", "n");
    vm.assert_sequence("memtest", "pass");
    let records = vm.assert_sequence("blk", "n");
    assert!(records > 3, "too few disk records:\n{}", vm.console());
}

#[test]
fn stand_in_updates_keep_the_pid_and_the_guest_to_the_next_version_and_back() {
    let dir = TempDir::new("stand-in");
    let vm = start(&dir, &molt_bin(), &[]);
    let pid = vm.pid();
    let fds = |pid: u64| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let mut fd_counts = Vec::new();
    for (i, (bin, version)) in [
        (Path::new(NEXT_BIN).to_path_buf(), format!("{VERSION}+next")),
        (molt_bin(), VERSION.to_string()),
        (molt_bin(), VERSION.to_string()),
        (molt_bin(), VERSION.to_string()),
    ]
    .iter()
    .enumerate()
    {
        let r = vm.cpr_exec_stand_in(bin);
        let stand_in = assert_updated(&r, pid, version);
        wait_gone(stand_in, "the stand-in");
        let info = vm.info();
        assert_eq!(info["pid"], pid, "{info}");
        assert_eq!(info["updates"]["count"], i as u64 + 1, "{info}");
        assert_eq!(
            info["updates"]["last"]["legs"].as_array().map(Vec::len),
            Some(2)
        );
        vm.wait_for("blk", "n", 2, String::new);
        fd_counts.push(fds(pid));
    }
    // Mixed with a plain cpr-exec.
    let r = vm.cpr_exec(&molt_bin());
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.get("legs").is_none(), "{}", r.body);
    vm.wait_ticks(2);
    assert_eq!(
        fd_counts[1..].iter().max(),
        fd_counts[1..].iter().min(),
        "fds grow: {fd_counts:?}"
    );
    assert_continuous(&vm);
    vm.shutdown();
}

/// The new image refuses before it commits: it executes the previous binary, which takes
/// the VM back from the stand-in in the same PID.
#[test]
fn a_new_image_that_refuses_is_replaced_by_the_previous_binary_in_the_same_pid() {
    let dir = TempDir::new("stand-in-new-refuses");
    // Only the next build (the new image here) reads the fault.
    let vm = start(&dir, &molt_bin(), &[("MOLT_TEST_FAULT", "devices:error")]);
    let r = vm.cpr_exec_stand_in(Path::new(NEXT_BIN));
    // To the stand-in, to the new image (refused: the guest ran on in the stand-in), back.
    let refused = &r.body["report"]["legs"][1];
    let why = refused["rolled_back"].as_str().unwrap_or_default();
    assert!(why.contains("injected"), "{r:?}");
    assert!(refused["pause_ms"].as_f64() > Some(0.0), "{r:?}");
    assert_eq!(refused["pid"], refused["from_pid"], "{r:?}");
    assert_rolled_back(vm, &r, VERSION, "injected", 3);
}

/// The new image dies before it commits: the stand-in resumes the guest and answers.
#[test]
fn a_new_image_that_dies_leaves_the_guest_running_in_the_stand_in() {
    let dir = TempDir::new("stand-in-new-dies");
    let vm = start(&dir, &molt_bin(), &[("MOLT_TEST_FAULT", "devices:exit")]);
    let pid = vm.pid();
    let r = vm.cpr_exec_stand_in(Path::new(NEXT_BIN));
    assert_eq!(r.status, 502, "{r:?}");
    let err = r.body["error"].as_str().unwrap_or_default();
    assert!(err.contains("did not take the VM over"), "{err}");
    assert!(err.contains("stand-in"), "{err}");
    // The stand-in runs the guest and answers on the same socket path.
    let info = vm.info();
    let stand_in = info["pid"].as_u64().unwrap();
    assert_ne!(stand_in, pid, "{info}");
    assert!(err.contains(&stand_in.to_string()), "{err}");
    assert_eq!(info["updates"]["count"], 0, "{info}");
    // A rollback after two pauses: the handover to the stand-in, and the failed one from it.
    let report = &r.body["report"];
    assert_eq!(report["pid"], stand_in, "{r:?}");
    assert_eq!(report["legs"].as_array().map(Vec::len), Some(2), "{r:?}");
    assert!(report["legs"][1]["rolled_back"].is_string(), "{r:?}");
    assert_eq!(
        report["rolled_back"], report["legs"][1]["rolled_back"],
        "{r:?}"
    );
    assert_eq!(info["updates"]["rollbacks"], 1, "{info}");
    assert_eq!(&info["updates"]["last"], report, "{info}");
    vm.wait_ticks(3);
    vm.wait_for("blk", "n", 2, String::new);
    assert_continuous(&vm);
    // The new image (the first PID) exited with the injected code; the stand-in ends with
    // the VM.
    wait_gone(pid, "the new image");
    vm.shutdown_first_exiting(3);
}

/// The stand-in fails before it commits: the guest runs on in the molt that asked.
#[test]
fn a_stand_in_that_fails_leaves_the_guest_where_it_was() {
    let dir = TempDir::new("stand-in-fails");
    // The VM runs on the next build, whose stand-in (the same binary) reads the fault.
    let vm = start(
        &dir,
        Path::new(NEXT_BIN),
        &[("MOLT_TEST_FAULT", "devices:error")],
    );
    let pid = vm.pid();
    let r = vm.cpr_exec_stand_in(&molt_bin());
    assert_eq!(r.status, 502, "{r:?}");
    let err = r.body["error"].as_str().unwrap_or_default();
    assert!(err.contains("handing the VM to the stand-in"), "{err}");
    let info: Value = vm.info();
    assert_eq!(info["pid"], pid, "{info}");
    assert_eq!(info["version"], format!("{VERSION}+next"), "{info}");
    assert_eq!(info["updates"]["count"], 0, "{info}");
    // The guest was paused for the attempt: a rollback, with its pause and why.
    let report = &r.body["report"];
    assert_eq!(report["pid"], pid, "{r:?}");
    assert!(
        report["pause_ms"].as_f64().is_some_and(|p| p > 0.0),
        "{r:?}"
    );
    assert!(report["rolled_back"].is_string(), "{r:?}");
    assert_eq!(info["updates"]["rollbacks"], 1, "{info}");
    vm.wait_ticks(3);
    vm.wait_for("blk", "n", 2, String::new);
    assert_continuous(&vm);
    vm.shutdown();
}

/// The new binary cannot be executed after the stand-in took the VM: molt executes its own
/// binary instead, which takes the VM back in the same PID and says why.
#[test]
fn a_new_binary_that_cannot_be_executed_is_replaced_by_the_running_one() {
    let dir = TempDir::new("stand-in-exec-fails");
    // The next build fails its execve of the new binary when asked to.
    let vm = start(
        &dir,
        Path::new(NEXT_BIN),
        &[("MOLT_TEST_FAULT", "stand-in-exec:error")],
    );
    let r = vm.cpr_exec_stand_in(&molt_bin());
    assert_rolled_back(vm, &r, &format!("{VERSION}+next"), "cannot execute", 2);
}
