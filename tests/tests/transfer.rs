//! cpr-transfer: a running VM handed to a separately started `molt --incoming PATH`. The
//! guest continues with no tick lost or doubled, the API socket path is answered by the new
//! process, the old one exits 0; every failure before the commit leaves the guest running on
//! the sender with a JSON error.

use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use molt_tests::api::{self, Reply};
use molt_tests::file_vm::{FileVm, WAIT};
use molt_tests::{molt_bin, Molt, TempDir};

const NEXT_BIN: &str = env!("MOLT_NEXT_BIN");
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A VM whose console goes to a file (the file travels with the VM), with an API socket; the
/// guest runs a small memtest unless the arguments give a command line.
struct Vm {
    vm: FileVm,
    /// Owns the directory of the VM's files.
    _dir: TempDir,
}

impl Deref for Vm {
    type Target = FileVm;
    fn deref(&self) -> &FileVm {
        &self.vm
    }
}

impl DerefMut for Vm {
    fn deref_mut(&mut self) -> &mut FileVm {
        &mut self.vm
    }
}

impl Vm {
    fn start(tag: &str, extra: &[&str]) -> Vm {
        let dir = TempDir::new(tag);
        let mut args = extra.to_vec();
        if !extra.contains(&"--cmdline") {
            args.extend(["--cmdline", "molt.memtest=4"]);
        }
        let vm = Vm {
            vm: FileVm::start(dir.path(), &args),
            _dir: dir,
        };
        vm.wait_ticks(2);
        vm
    }

    /// Ticks and memtest passes continue with none lost or repeated, one boot, no failure.
    fn assert_continuous(&self) {
        self.assert_one_boot_no_failure();
        self.assert_sequence("tick", "n");
        self.assert_sequence("memtest", "pass");
    }

    fn shutdown(self) {
        self.vm.shutdown();
    }
}

fn assert_transferred(r: &Reply, from_pid: u64, to_version: &str) {
    assert_eq!(r.status, 200, "{r:?}");
    let b = &r.body;
    assert_eq!(b["mode"], "transfer", "{b}");
    assert_eq!(b["from_pid"], from_pid, "{b}");
    assert_ne!(b["pid"], from_pid, "{b}");
    assert_eq!(b["to_version"], to_version, "{b}");
    assert!(b["rolled_back"].is_null(), "{b}");
    let (pause, stopped) = (
        b["pause_ms"].as_f64().unwrap(),
        b["stopped_ms"].as_f64().unwrap(),
    );
    let kick = b["phases_ms"]["pause"].as_f64().unwrap();
    assert!((pause - kick - stopped).abs() < 0.01, "{b}");
    api::assert_phases_add_up(b);
}

#[test]
fn a_transfer_keeps_the_guest_and_the_api_path_and_the_sender_exits_0() {
    let mut vm = Vm::start("transfer-basic", &["--cpus", "2"]);
    let from = vm.pid();
    let r = vm.transfer_to_this_build();
    assert_transferred(&r, from, VERSION);
    let to = vm.pid();
    assert_eq!(
        r.body["pid"], to,
        "the API path is answered by the new process"
    );
    vm.wait_ticks(3);
    let info = vm.info();
    assert_eq!(info["updates"]["count"], 1, "{info}");
    assert_eq!(info["vcpus"], 2, "{info}");
    // The receiver built its machine on idle CPU time: every thread of it, the vCPUs' too,
    // runs at molt's policy again.
    let idle = molt_tests::host::idle_threads(to);
    assert!(idle.is_empty(), "threads at SCHED_IDLE: {idle:?}");
    // The sender is gone, with exit code 0.
    let deadline = Instant::now() + WAIT;
    while Path::new(&format!("/proc/{from}/status")).exists()
        && !std::fs::read_to_string(format!("/proc/{from}/status"))
            .unwrap_or_default()
            .contains("zombie")
    {
        assert!(Instant::now() < deadline, "the sender did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.assert_continuous();
    vm.shutdown();
}

#[test]
fn transfers_to_the_next_version_and_back_and_mixed_with_cpr_exec() {
    let dir = TempDir::new("transfer-chain-disk");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(8 << 20))
        .unwrap();
    let disk = format!("path={}", img.display());
    let mut vm = Vm::start(
        "transfer-chain",
        &["--disk", &disk, "--cmdline", "molt.memtest=4 molt.blk=on"],
    );
    let pid = vm.pid();
    let r = vm.transfer_to(Path::new(NEXT_BIN), &["--log-level", "info"], &[]);
    assert_transferred(&r, pid, &format!("{VERSION}+next"));
    vm.wait_ticks(2);
    let pid = vm.pid();
    let r = vm.cpr_exec(&molt_bin());
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["mode"], "exec");
    assert_eq!(r.body["pid"], pid);
    vm.wait_ticks(2);
    let r = vm.transfer_to_this_build();
    assert_transferred(&r, pid, VERSION);
    vm.wait_ticks(2);
    // One vCPU leaves a CPU for the receiver's build on idle CPU time (with a vCPU on each
    // CPU, the time limit ends it): its threads run at molt's policy again all the same.
    let idle = molt_tests::host::idle_threads(vm.pid());
    assert!(idle.is_empty(), "threads at SCHED_IDLE: {idle:?}");
    assert_eq!(vm.info()["updates"]["count"], 3);
    vm.assert_continuous();
    // The disk went along: its records continue, in sequence, none failed.
    let records = vm.assert_sequence("blk", "n");
    assert!(records > 3, "too few disk records:\n{}", vm.console());
    vm.shutdown();
}

#[test]
fn twenty_transfers_in_a_chain_leave_fds_and_memory_flat() {
    let mut vm = Vm::start("transfer-twenty", &[]);
    let r = vm.transfer_to_this_build();
    assert_eq!(r.status, 200, "{r:?}");
    vm.wait_ticks(1);
    let first = vm.pid();
    // No API request in flight while the fds are listed (a closing connection lingers).
    std::thread::sleep(Duration::from_millis(500));
    let (fds, rss) = (
        molt_tests::host::fd_kinds(first),
        molt_tests::host::rss_anon_kib(first),
    );
    for _ in 1..20 {
        let from = vm.pid();
        let r = vm.transfer_to_this_build();
        assert_transferred(&r, from, VERSION);
    }
    vm.wait_ticks(2);
    let last = vm.pid();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        molt_tests::host::fd_kinds(last),
        fds,
        "the fds of the 20th receiver differ from the 1st's"
    );
    assert!(
        !molt_tests::host::holds_cpu_latency_request(last),
        "the receiver still keeps the CPUs awake 500 ms after the transfer"
    );
    let rss_last = molt_tests::host::rss_anon_kib(last);
    assert!(
        rss_last <= rss + rss / 4 + 4096,
        "anonymous RSS grew from {rss} KiB to {rss_last} KiB over 20 transfers"
    );
    assert_eq!(vm.info()["updates"]["count"], 20);
    vm.assert_continuous();
    vm.shutdown();
}

/// A transfer waits a few ms after the receiver is ready before it pauses the guest (stretched
/// here to 2 s): meanwhile the sender answers other requests, refuses another update or a
/// snapshot, and a shutdown wins: the transfer is refused and so is the receiver.
#[test]
fn requests_while_a_transfer_is_prepared() {
    if !Path::new(molt_tests::host::CPU_LATENCY).exists() {
        return molt_tests::skip(
            "requests while a transfer is prepared",
            "this host has no /dev/cpu_dma_latency (the test sees the preparation by it)",
        );
    }
    let dir = TempDir::new("transfer-prepared");
    let args = ["--cmdline", "molt.memtest=4"];
    let env = [("MOLT_TEST_SETTLE_MS", "2000")];
    let vm = FileVm::start_with(Path::new(NEXT_BIN), dir.path(), &args, &env);
    vm.wait_ticks(2);
    let pid = vm.pid();
    let socket = vm.dir.join("in.sock");
    let receiver = Molt::spawn_incoming(&molt_bin(), &socket, &["--log-level", "info"], &[]);
    let (api_path, body) = (
        vm.api.clone(),
        format!(r#"{{"socket": "{}"}}"#, socket.display()),
    );
    let transfer = std::thread::spawn(move || api::put(&api_path, "vm.cpr-transfer", &body));
    // The sender keeps the CPUs awake from the transfer's start; requests from then on are
    // answered once the receiver is ready.
    let deadline = Instant::now() + WAIT;
    while !molt_tests::host::holds_cpu_latency_request(pid) {
        assert!(Instant::now() < deadline, "the transfer did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let info = vm.info();
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["pid"], pid, "{info}");
    assert_eq!(info["updates"]["count"], 0, "{info}");
    let second = vm.transfer(&vm.dir.join("other.sock"));
    assert_eq!(second.status, 409, "{second:?}");
    let exec = vm.cpr_exec(&molt_bin());
    assert_eq!(exec.status, 409, "{exec:?}");
    let body = format!(r#"{{"path": "{}"}}"#, vm.dir.join("snap").display());
    let snap = api::put(&vm.api, "vm.snapshot", &body);
    assert_eq!(snap.status, 409, "{snap:?}");
    assert!(!transfer.is_finished(), "the transfer did not wait");
    vm.shutdown();
    let r = transfer.join().unwrap();
    assert_eq!(r.status, 409, "{r:?}");
    let error = r.body["error"].as_str().unwrap_or_default();
    assert!(error.contains("ending"), "{r:?}");
    let out = receiver.finish(WAIT);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    out.assert_no_panic();
    assert!(
        out.stderr().iter().any(|l| l.contains("ending")),
        "the receiver does not say why: {}",
        out.describe()
    );
}

/// Every failure before the commit: the guest runs on in the sender, which answers with a JSON
/// error saying why; if the guest was paused for the attempt, the answer also has its report
/// (a rollback: the pause, and why), which `vm.info` keeps as the last update's.
fn assert_kept(vm: &Vm, r: &Reply, pid: u64, why: &str, paused: bool) {
    assert_eq!(r.status, 502, "{r:?}");
    let error = r.body["error"].as_str().unwrap_or_default();
    assert!(error.contains(why), "expected {why:?} in {r:?}");
    assert_eq!(vm.pid(), pid, "the sender keeps the guest");
    let info = vm.info();
    assert_eq!(info["state"], "running");
    let report = &r.body["report"];
    if paused {
        assert_eq!(report["mode"], "transfer", "{r:?}");
        assert_eq!(report["pid"], pid, "{r:?}");
        assert!(
            report["pause_ms"].as_f64().is_some_and(|p| p > 0.0),
            "{r:?}"
        );
        let rolled_back = report["rolled_back"].as_str().unwrap_or_default();
        assert!(rolled_back.contains(why), "expected {why:?} in {r:?}");
        assert_eq!(&info["updates"]["last"], report, "{info}");
    } else {
        assert!(report.is_null(), "no pause, no report: {r:?}");
    }
    vm.wait_ticks(2);
}

#[test]
fn failed_transfers_leave_the_guest_running_on_the_sender() {
    let mut vm = Vm::start("transfer-fail", &[]);
    let pid = vm.pid();
    // Nobody listens.
    let r = vm.transfer(&vm.dir.join("nobody.sock"));
    assert_kept(&vm, &r, pid, "transfer to", false);
    // A receiver that dies in the middle of its restore, after the pause.
    let r = vm.transfer_to(
        Path::new(NEXT_BIN),
        &["--log-level", "info"],
        &[("MOLT_TEST_FAULT", "vcpus:exit")],
    );
    assert_kept(&vm, &r, pid, "closed", true);
    // A receiver that fails its restore refuses, and says why.
    let r = vm.transfer_to(
        Path::new(NEXT_BIN),
        &["--log-level", "info"],
        &[("MOLT_TEST_FAULT", "devices:error")],
    );
    assert_kept(&vm, &r, pid, "injected fault at devices", true);
    // Something that speaks garbage, and something that never answers.
    for garbage in [true, false] {
        let path = vm.dir.join(format!("fake-{garbage}.sock"));
        let listener = fake_receiver(&path);
        let talker = std::thread::spawn(move || {
            let conn = nix::sys::socket::accept(listener.as_raw_fd()).unwrap();
            if garbage {
                let _ = nix::unistd::write(
                    // SAFETY: the accepted fd is owned here until the thread ends.
                    unsafe { std::os::fd::BorrowedFd::borrow_raw(conn) },
                    b"HTTP/1.1 200 OK\r\n\r\n",
                );
            }
            std::thread::sleep(Duration::from_secs(7));
            let _ = nix::unistd::close(conn);
        });
        let r = vm.transfer(&path);
        let why = if garbage {
            "not a molt transfer message"
        } else {
            "no answer"
        };
        assert_kept(&vm, &r, pid, why, false);
        talker.join().unwrap();
    }
    assert_eq!(vm.info()["updates"]["count"], 0);
    assert_eq!(vm.info()["updates"]["rollbacks"], 2);
    vm.assert_continuous();
    vm.shutdown();
}

fn fake_receiver(path: &Path) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(sock.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    listen(&sock, Backlog::new(1).unwrap()).unwrap();
    sock
}
