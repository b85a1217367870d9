//! Live update by `vm.cpr-exec`: same PID, guest RAM in place, the guest keeps ticking, and
//! no failure loses the guest.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use molt_tests::api::{self, Reply};
use molt_tests::native::{check_mode, runs_natively, Mode};
use molt_tests::{guest_lines, molt_bin, GuestLine, Molt, Stream, TempDir};
use serde_json::Value;

const NEXT_BIN: &str = env!("MOLT_NEXT_BIN");
const WAIT: Duration = Duration::from_secs(60);

/// A molt with an API socket, its serial console on stdout.
struct Vm {
    molt: Molt,
    socket: PathBuf,
    _dir: TempDir,
}

impl Vm {
    fn start(tag: &str, extra: &[&str], env: &[(&str, &str)]) -> Vm {
        Vm::start_bin(&molt_bin(), tag, extra, env)
    }

    fn start_bin(bin: &Path, tag: &str, extra: &[&str], env: &[(&str, &str)]) -> Vm {
        Vm::start_full(bin, tag, Mode::Default, extra, env)
    }

    fn start_mode(tag: &str, mode: Mode, extra: &[&str]) -> Vm {
        Vm::start_full(&molt_bin(), tag, mode, extra, &[])
    }

    fn start_full(bin: &Path, tag: &str, mode: Mode, extra: &[&str], env: &[(&str, &str)]) -> Vm {
        let dir = TempDir::new(tag);
        let socket = dir.join("api.sock");
        let mut args = vec![
            "--api-socket".to_string(),
            socket.display().to_string(),
            "--cmdline".into(),
            mode.cmdline("molt.memtest=4"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let molt = Molt::spawn_env(bin, &args, env);
        api::wait_ready(&socket, WAIT);
        Vm {
            molt,
            socket,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.molt.pid()
    }

    fn update(&self, body: &str) -> Reply {
        api::put(&self.socket, "vm.cpr-exec", body)
    }

    fn info(&self) -> Value {
        let r = api::get(&self.socket, "vm.info");
        assert_eq!(r.status, 200, "{r:?}");
        r.body
    }

    /// The guest lines so far.
    fn guest_lines(&self) -> Vec<GuestLine> {
        guest_lines(self.molt.lines().iter().map(|l| l.text.as_str()))
    }

    /// Waits for the boot line and checks the mode (see `check_mode`).
    fn check_mode(&mut self, mode: Mode) -> bool {
        let line = self.molt.wait_stdout("molt-guest: boot ", WAIT);
        let boot = GuestLine::parse(&line.text).expect("a boot line");
        check_mode(&boot, mode)
    }

    /// Asserts every tick and per-CPU progress line ran at the rate of `native`.
    fn assert_rate(&self, native: bool) {
        for l in self.guest_lines() {
            if l.kind == "tick" || (l.kind == "cpu" && l.get("n").is_some()) {
                assert_eq!(runs_natively(&l), native, "{}", l.raw);
            }
        }
    }

    fn last_tick(&mut self) -> u64 {
        guest_lines(self.molt.lines().iter().map(|l| l.text.as_str()))
            .iter()
            .filter(|l| l.kind == "tick")
            .map(|l| l.num("n"))
            .max()
            .unwrap_or(0)
    }

    /// Waits for `more` ticks after the latest one seen.
    fn wait_ticks(&mut self, more: u64) -> u64 {
        let target = self.last_tick() + more;
        self.molt.wait_line(Stream::Stdout, WAIT, |l| {
            GuestLine::parse(l).is_some_and(|g| g.kind == "tick" && g.num("n") >= target)
        });
        target
    }

    /// Every stdout line is an intact guest line; one boot; ticks and memtest passes go up by
    /// exactly one, none lost or doubled; no memtest failure.
    fn assert_guest_continuous(&self) {
        let lines = self.molt.lines();
        let stdout: Vec<&str> = lines
            .iter()
            .filter(|l| l.stream == Stream::Stdout)
            .map(|l| l.text.as_str())
            .collect();
        for l in &stdout {
            assert!(GuestLine::parse(l).is_some(), "garbled serial line {l:?}");
        }
        let parsed = guest_lines(stdout.iter().copied());
        assert_eq!(parsed.iter().filter(|l| l.kind == "boot").count(), 1);
        for kind in ["tick", "memtest"] {
            let key = if kind == "tick" { "n" } else { "pass" };
            let ns: Vec<u64> = parsed
                .iter()
                .filter(|l| l.kind == kind)
                .map(|l| l.num(key))
                .collect();
            assert!(!ns.is_empty(), "no {kind} lines");
            for (i, n) in ns.iter().enumerate() {
                assert_eq!(*n, i as u64 + 1, "{kind} sequence broken: {ns:?}");
            }
        }
        assert!(
            !stdout
                .iter()
                .any(|l| l.contains("FAIL") || l.contains("exception")),
            "guest failure:\n{}",
            stdout.join("\n")
        );
    }
}

fn exe_of(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).expect("read /proc/PID/exe")
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list fds")
        .count()
}

/// The fd count once API connections of finished requests have closed (they linger until the
/// client has read the response).
fn settled_fd_count(pid: u32) -> usize {
    let mut last = fd_count(pid);
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let now = fd_count(pid);
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Guardians are dismissed once the guest runs; allow a dismissed one a moment to go.
fn assert_no_children(pid: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !children(pid).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "children left behind: {:?}",
            children(pid)
                .iter()
                .map(|c| {
                    let read = |f: &str| {
                        std::fs::read(format!("/proc/{c}/{f}"))
                            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                            .unwrap_or_default()
                    };
                    format!("{c}: {} | {}", read("cmdline"), read("stat"))
                })
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_report(r: &Reply, pid: u32, to_version: &str) {
    assert_eq!(r.status, 200, "{r:?}");
    let b = &r.body;
    assert_eq!(b["pid"], pid, "{b}");
    assert_eq!(b["to_version"], to_version, "{b}");
    assert!(b["pause_ms"].as_f64().unwrap() > 0.0, "{b}");
    for phase in ["pause", "save", "exec", "restore", "resume"] {
        assert!(b["phases_ms"][phase].is_number(), "{phase} missing: {b}");
    }
    assert!(b["rolled_back"].is_null(), "{b}");
}

#[test]
fn update_keeps_pid_ram_and_guest() {
    for mode in Mode::BOTH {
        let mut vm = Vm::start_mode("update-basic", mode, &[]);
        let native = vm.check_mode(mode);
        let pid = vm.pid();
        vm.wait_ticks(3);
        let r = vm.update("{}");
        assert_report(&r, pid, "0.1.0");
        assert_eq!(r.body["from_version"], "0.1.0");
        assert_eq!(exe_of(pid), std::fs::canonicalize(molt_bin()).unwrap());
        vm.wait_ticks(3);
        let info = vm.info();
        assert_eq!(info["pid"], pid);
        assert_eq!(info["state"], "running");
        assert_eq!(info["updates"]["count"], 1, "{info}");
        assert_eq!(info["updates"]["last"]["pid"], pid, "{info}");
        vm.assert_guest_continuous();
        vm.assert_rate(native);
    }
}

/// The PVM control MSR is vCPU state molt carries itself: after updates (to another binary
/// and back) both vCPUs still run the guest natively, as its own loop rate shows.
#[test]
fn native_execution_survives_live_updates() {
    let mut vm = Vm::start("update-native", &["--cpus", "2"], &[]);
    if !vm.check_mode(Mode::Default) {
        return;
    }
    let pid = vm.pid();
    vm.wait_ticks(2);
    for bin in [PathBuf::from(NEXT_BIN), molt_bin()] {
        let bin = std::fs::canonicalize(bin).unwrap();
        let r = vm.update(&format!(r#"{{"binary": "{}"}}"#, bin.display()));
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["pid"], pid, "{r:?}");
        vm.wait_ticks(3);
        // And a progress line of the second vCPU from after the update.
        let seen = vm
            .guest_lines()
            .iter()
            .filter(|l| l.kind == "cpu" && l.get("id") == Some("1") && l.get("n").is_some())
            .count();
        vm.molt.wait_line(Stream::Stdout, WAIT, |l| {
            GuestLine::parse(l).is_some_and(|g| {
                g.kind == "cpu"
                    && g.get("id") == Some("1")
                    && g.get("n").and_then(|n| n.parse::<usize>().ok()) > Some(seen)
            })
        });
    }
    vm.assert_rate(true);
    vm.assert_guest_continuous();
}

#[test]
fn update_to_the_next_version_and_back() {
    let mut vm = Vm::start("update-next", &["--cpus", "2"], &[]);
    let pid = vm.pid();
    vm.wait_ticks(2);
    let next = std::fs::canonicalize(NEXT_BIN).unwrap();
    let r = vm.update(&format!(r#"{{"binary": "{}"}}"#, next.display()));
    assert_report(&r, pid, "0.1.0+next");
    assert_eq!(exe_of(pid), next);
    assert_eq!(vm.info()["version"], "0.1.0+next");
    vm.wait_ticks(2);
    let back = std::fs::canonicalize(molt_bin()).unwrap();
    let r = vm.update(&format!(r#"{{"binary": "{}"}}"#, back.display()));
    assert_report(&r, pid, "0.1.0");
    assert_eq!(r.body["from_version"], "0.1.0+next");
    assert_eq!(exe_of(pid), back);
    vm.wait_ticks(4);
    let text: Vec<&str> = vm.molt.lines().iter().map(|l| l.text.as_str()).collect();
    assert!(
        text.iter().any(|l| l.contains("cpu id=1 n=")),
        "the second vCPU made no progress"
    );
    assert_eq!(vm.info()["updates"]["count"], 2);
    vm.assert_guest_continuous();
}

#[test]
fn update_with_huge_pages() {
    let reservation = match molt_tests::hugepages::Reservation::ensure(64) {
        Ok(r) => r,
        Err(why) => {
            molt_tests::skip("hugepages=on live update", &why.to_string());
            return;
        }
    };
    let mut vm = Vm::start("update-huge", &["--memory", "size=128M,hugepages=on"], &[]);
    let pid = vm.pid();
    vm.wait_ticks(2);
    assert_report(&vm.update("{}"), pid, "0.1.0");
    vm.wait_ticks(3);
    assert_eq!(vm.info()["memory"]["hugepages"], true);
    vm.assert_guest_continuous();
    drop(vm);
    drop(reservation);
}

#[test]
fn twenty_updates_leave_fds_and_memory_flat() {
    let mut vm = Vm::start("update-twenty", &[], &[]);
    let pid = vm.pid();
    vm.wait_ticks(2);
    assert_report(&vm.update("{}"), pid, "0.1.0");
    let fds = settled_fd_count(pid);
    let anon = status_kib(pid, "RssAnon:");
    for _ in 1..20 {
        assert_report(&vm.update("{}"), pid, "0.1.0");
    }
    vm.wait_ticks(2);
    assert_eq!(
        settled_fd_count(pid),
        fds,
        "fd count changed over 19 updates"
    );
    let anon_after = status_kib(pid, "RssAnon:");
    assert!(
        anon_after <= anon + anon / 4 + 4096,
        "anonymous RSS grew from {anon} KiB to {anon_after} KiB"
    );
    assert_no_children(pid);
    assert_eq!(vm.info()["updates"]["count"], 20);
    vm.assert_guest_continuous();
}

#[test]
fn refused_and_failed_updates_keep_the_guest_here() {
    let mut vm = Vm::start("update-refused", &[], &[]);
    let pid = vm.pid();
    vm.wait_ticks(2);
    let dir = TempDir::new("update-refused-files");
    let plain = dir.join("not-executable");
    std::fs::write(&plain, "x").unwrap();
    let garbage = dir.join("garbage");
    std::fs::write(&garbage, "not an executable format").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o755)).unwrap();
    let fds = settled_fd_count(pid);
    let cases = [
        (r#"{"binary": "relative/molt"}"#.to_string(), 400),
        (r#"{"binary": "/nonexistent/molt"}"#.to_string(), 400),
        (format!(r#"{{"binary": "{}"}}"#, dir.path().display()), 400),
        (format!(r#"{{"binary": "{}"}}"#, plain.display()), 400),
        (r#"{"binary": "/bin/sh", "colour": "red"}"#.to_string(), 400),
        (format!(r#"{{"binary": "{}"}}"#, garbage.display()), 500),
    ];
    for (body, status) in cases {
        let r = vm.update(&body);
        assert_eq!(r.status, status, "{body}: {r:?}");
        assert!(
            r.body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{r:?}"
        );
        assert_eq!(vm.info()["state"], "running");
    }
    vm.wait_ticks(2);
    assert_eq!(settled_fd_count(pid), fds, "a failed update leaked fds");
    assert_no_children(pid);
    assert_eq!(vm.info()["updates"]["count"], 0);
    assert_eq!(exe_of(pid), std::fs::canonicalize(molt_bin()).unwrap());
    vm.assert_guest_continuous();
}

#[test]
fn a_new_image_that_cannot_restore_rolls_back() {
    for fault in ["panic", "error", "major"] {
        let mut vm = Vm::start(
            &format!("update-fault-{fault}"),
            &[],
            &[("MOLT_TEST_FAULT", fault)],
        );
        let pid = vm.pid();
        vm.wait_ticks(2);
        let r = vm.update(&format!(r#"{{"binary": "{NEXT_BIN}"}}"#));
        assert_eq!(r.status, 500, "{fault}: {r:?}");
        let reason = r.body["report"]["rolled_back"].as_str().unwrap_or_default();
        assert!(!reason.is_empty(), "{fault}: {r:?}");
        assert_eq!(r.body["report"]["pid"], pid);
        assert_eq!(exe_of(pid), std::fs::canonicalize(molt_bin()).unwrap());
        vm.wait_ticks(2);
        let info = vm.info();
        assert_eq!(info["version"], "0.1.0");
        assert_eq!(info["updates"]["rollbacks"], 1, "{info}");
        assert!(info["updates"]["last"]["rolled_back"].is_string(), "{info}");
        vm.assert_guest_continuous();
    }
}

/// Kills a process on drop (the one that took over from a dead molt).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) takes no pointers.
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}

#[test]
fn a_new_binary_that_dies_at_once_loses_nothing() {
    let dir = TempDir::new("update-false");
    let serial = dir.join("console.log");
    let vm = Vm::start(
        "update-false-vm",
        &["--serial", &format!("file={}", serial.display())],
        &[],
    );
    let pid = vm.pid();
    std::thread::sleep(Duration::from_millis(500));
    let r = vm.update(r#"{"binary": "/bin/false"}"#);
    assert_eq!(r.status, 500, "{r:?}");
    let reason = r.body["report"]["rolled_back"].as_str().unwrap_or_default();
    assert!(reason.contains("exited"), "{r:?}");
    // The process that became /bin/false is gone; the guardian runs the guest now.
    let info = vm.info();
    let new_pid = info["pid"].as_u64().unwrap() as u32;
    let _cleanup = KillOnDrop(new_pid);
    assert_ne!(new_pid, pid);
    assert_eq!(info["updates"]["rollbacks"], 1, "{info}");
    let before = std::fs::read_to_string(&serial).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let after = std::fs::read_to_string(&serial).unwrap();
    // Only whole lines: the guest may be in the middle of one.
    let after = &after[..after.rfind('\n').map_or(0, |i| i + 1)];
    assert!(after.len() > before.len(), "the guest stopped printing");
    let ticks: Vec<u64> = guest_lines(after.lines())
        .iter()
        .filter(|l| l.kind == "tick")
        .map(|l| l.num("n"))
        .collect();
    for (i, n) in ticks.iter().enumerate() {
        assert_eq!(*n, i as u64 + 1, "tick sequence broken: {ticks:?}");
    }
    assert!(!after.contains("FAIL"), "{after}");
    let r = api::put(&vm.socket, "vm.shutdown", "{}");
    assert_eq!(r.status, 204, "{r:?}");
    drop(vm);
}

#[test]
fn concurrent_updates_get_409_and_other_clients_are_served() {
    let mut vm = Vm::start("update-concurrent", &[], &[]);
    let pid = vm.pid();
    vm.wait_ticks(2);
    let socket = vm.socket.clone();
    // Both requests are on the wire within microseconds of each other (two connections,
    // written back to back from one thread), so the second one arrives while the first
    // update runs, whatever the scheduling.
    let request = b"PUT /api/v1/vm.cpr-exec HTTP/1.1\r\nHost: molt\r\nConnection: close\r\n\
                    Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
    let mut conns: Vec<UnixStream> = (0..2)
        .map(|_| {
            let c = UnixStream::connect(&socket).unwrap();
            c.set_read_timeout(Some(WAIT)).unwrap();
            c
        })
        .collect();
    for c in &mut conns {
        c.write_all(request).unwrap();
    }
    let reader = {
        let socket = socket.clone();
        std::thread::spawn(move || {
            (0..40)
                .map(|_| {
                    let r = api::get(&socket, "vm.info");
                    std::thread::sleep(Duration::from_millis(2));
                    r.status
                })
                .collect::<Vec<u16>>()
        })
    };
    let updaters: Vec<u16> = conns
        .into_iter()
        .map(|mut c| {
            let mut raw = String::new();
            c.read_to_string(&mut raw).unwrap();
            raw.split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0)
        })
        .collect();
    let mut statuses = updaters;
    statuses.sort();
    assert_eq!(statuses, vec![200, 409]);
    let reads = reader.join().unwrap();
    assert!(reads.iter().all(|s| *s == 200), "{reads:?}");
    assert_eq!(vm.info()["pid"], pid);
    assert_eq!(vm.info()["updates"]["count"], 1);
    vm.wait_ticks(2);
    vm.assert_guest_continuous();
}

#[test]
fn a_serial_socket_client_stays_connected_across_updates() {
    use std::io::{BufRead, BufReader};
    let dir = TempDir::new("update-serial-socket");
    let console = dir.join("console.sock");
    let vm = Vm::start(
        "update-serial-socket-vm",
        &["--serial", &format!("socket={}", console.display())],
        &[],
    );
    let pid = vm.pid();
    let stream = loop {
        match std::os::unix::net::UnixStream::connect(&console) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut reader = BufReader::new(stream);
    let next_tick = |reader: &mut BufReader<std::os::unix::net::UnixStream>| loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "console closed");
        if let Some(g) = GuestLine::parse(line.trim_end()) {
            if g.kind == "tick" {
                return g.num("n");
            }
        }
    };
    let mut last = next_tick(&mut reader);
    for _ in 0..3 {
        assert_report(&vm.update("{}"), pid, "0.1.0");
        // The same connection goes on receiving, with no tick lost or repeated.
        for _ in 0..3 {
            let n = next_tick(&mut reader);
            assert_eq!(n, last + 1, "tick sequence broken on the console");
            last = n;
        }
    }
}

#[test]
fn a_paused_guest_stays_paused_across_an_update() {
    let mut vm = Vm::start("update-paused", &[], &[]);
    let pid = vm.pid();
    vm.wait_ticks(2);
    assert_eq!(api::put(&vm.socket, "vm.pause", "").status, 204);
    std::thread::sleep(Duration::from_millis(200));
    vm.molt.collect_for(Duration::from_millis(100));
    let at_pause = vm.last_tick();
    assert_report(&vm.update("{}"), pid, "0.1.0");
    assert_eq!(vm.info()["state"], "paused");
    vm.molt.collect_for(Duration::from_millis(600));
    assert_eq!(vm.last_tick(), at_pause, "the guest ran while paused");
    assert_eq!(api::put(&vm.socket, "vm.resume", "").status, 204);
    vm.wait_ticks(2);
    vm.assert_guest_continuous();
}
