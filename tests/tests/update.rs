//! Live update by `vm.cpr-exec`: same PID, guest RAM in place, the guest keeps ticking, and
//! no failure loses the guest.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use molt_tests::api::{self, Reply};
use molt_tests::native::{check_mode, runs_natively, Mode};
use molt_tests::{guest_lines, molt_bin, GuestLine, Line, Molt, Stream, TempDir};
use serde_json::Value;

const NEXT_BIN: &str = env!("MOLT_NEXT_BIN");
const WAIT: Duration = Duration::from_secs(60);
/// molt's version: this crate and molt-vmm both take the workspace's.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The version of the test-next build (`NEXT_BIN`).
fn next_version() -> String {
    format!("{VERSION}+next")
}

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

    /// The parsed tick lines read at or after `since`.
    fn ticks_read_since(&self, since: Instant) -> Vec<GuestLine> {
        stdout_read_since(self.molt.lines(), since)
            .filter(|g| g.kind == "tick")
            .collect()
    }

    /// Waits until `count` tick lines have been read after `after`.
    fn wait_ticks_read_after(&mut self, after: Instant, count: usize) {
        while self
            .ticks_read_since(after)
            .iter()
            .filter(|g| g.get("n").is_some())
            .count()
            < count
        {
            self.wait_ticks(1);
        }
    }

    /// Waits until vCPU 1 prints a progress line (`cpu id=1 n=<n>`, one per 500 ms of its
    /// time) that it printed after the update sent at `sent` and answered at `answered`: one
    /// read after the answer and counting at least two above every such line read before the
    /// request. Between the request and the pause vCPU 1 can add only one line, so the line
    /// waited for was printed after the update; a line printed before it and read late does
    /// not count.
    fn wait_ap_progress_after(&mut self, sent: Instant, answered: Instant) {
        fn ap_count(text: &str) -> Option<u64> {
            GuestLine::parse(text)
                .filter(|g| g.kind == "cpu" && g.get("id") == Some("1") && g.get("n").is_some())
                .map(|g| g.num("n"))
        }
        let out = |l: &&Line| l.stream == Stream::Stdout;
        let before = self
            .molt
            .lines()
            .iter()
            .filter(out)
            .filter(|l| l.at < sent)
            .filter_map(|l| ap_count(&l.text))
            .max()
            .unwrap_or(0);
        while !self
            .molt
            .lines()
            .iter()
            .filter(out)
            .filter(|l| l.at > answered)
            .any(|l| ap_count(&l.text).is_some_and(|n| n >= before + 2))
        {
            self.molt
                .wait_line(Stream::Stdout, WAIT, |t| ap_count(t).is_some());
        }
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

/// The parsed guest lines of `lines` that were read at or after `since`.
fn stdout_read_since(lines: &[Line], since: Instant) -> impl Iterator<Item = GuestLine> + '_ {
    lines
        .iter()
        .filter(move |l| l.stream == Stream::Stdout && l.at >= since)
        .filter_map(|l| GuestLine::parse(&l.text))
}

/// The open fds of `pid` as a multiset of what they refer to: the `/proc/PID/fd` link target
/// with the file's device and inode (so a RAM memfd or the API listener that was recreated
/// instead of kept shows), mapped to how many fds refer to it. fd numbers are left out: a new
/// image holds the same files under other numbers.
fn fd_set(pid: u32) -> BTreeMap<String, usize> {
    let mut set = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("list fds") {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        // An fd can close between the listing and these lookups (an API connection ending).
        let (Ok(target), Ok(meta)) = (std::fs::read_link(&path), std::fs::metadata(&path)) else {
            continue;
        };
        let key = format!(
            "{} (dev {:#x} ino {})",
            target.display(),
            meta.dev(),
            meta.ino()
        );
        *set.entry(key).or_insert(0) += 1;
    }
    set
}

/// The fd set once API connections of finished requests have closed (they linger until the
/// client has read the response): the first one that stays the same for 100 ms.
fn settled_fd_set(pid: u32) -> BTreeMap<String, usize> {
    let mut last = fd_set(pid);
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let now = fd_set(pid);
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// Asserts two fd sets are equal, listing what only one of them has.
#[track_caller]
fn assert_same_fds(before: &BTreeMap<String, usize>, after: &BTreeMap<String, usize>, what: &str) {
    let diff = |a: &BTreeMap<String, usize>, b: &BTreeMap<String, usize>| {
        a.iter()
            .filter(|(k, n)| b.get(*k) != Some(*n))
            .map(|(k, n)| format!("  {n} x {k}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        before == after,
        "{what}: the open fds differ\nonly before (or more often):\n{}\nonly after (or more \
         often):\n{}\nall before:\n{}",
        diff(before, after),
        diff(after, before),
        diff(before, &BTreeMap::new())
    );
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

#[track_caller]
fn assert_report(r: &Reply, pid: u32, to_version: &str) {
    assert_eq!(r.status, 200, "{r:?}");
    let b = &r.body;
    assert_eq!(b["pid"], pid, "{b}");
    assert_eq!(b["to_version"], to_version, "{b}");
    api::assert_phases_add_up(b);
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
        assert_report(&r, pid, VERSION);
        assert_eq!(r.body["from_version"], VERSION);
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
        api::assert_phases_add_up(&r.body);
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
    let sent = Instant::now();
    let r = vm.update(&format!(r#"{{"binary": "{}"}}"#, next.display()));
    let answered = Instant::now();
    assert_report(&r, pid, &next_version());
    assert_eq!(r.body["from_version"], VERSION);
    assert_eq!(exe_of(pid), next);
    assert_eq!(vm.info()["version"], next_version());
    vm.wait_ap_progress_after(sent, answered);
    vm.wait_ticks(2);
    let back = std::fs::canonicalize(molt_bin()).unwrap();
    let sent = Instant::now();
    let r = vm.update(&format!(r#"{{"binary": "{}"}}"#, back.display()));
    let answered = Instant::now();
    assert_report(&r, pid, VERSION);
    assert_eq!(r.body["from_version"], next_version());
    assert_eq!(exe_of(pid), back);
    vm.wait_ap_progress_after(sent, answered);
    vm.wait_ticks(2);
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
    assert_report(&vm.update("{}"), pid, VERSION);
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
    let fds = settled_fd_set(pid);
    assert_report(&vm.update("{}"), pid, VERSION);
    // The first update's new image may grow the heap; what it holds from then on must stay.
    let anon = status_kib(pid, "RssAnon:");
    assert_same_fds(&fds, &settled_fd_set(pid), "after the first update");
    for _ in 1..20 {
        assert_report(&vm.update("{}"), pid, VERSION);
    }
    vm.wait_ticks(2);
    assert_same_fds(&fds, &settled_fd_set(pid), "after 20 updates");
    assert!(
        !molt_tests::host::holds_cpu_latency_request(pid.into()),
        "molt still keeps the CPUs awake after the updates"
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
    let fds = settled_fd_set(pid);
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
    assert_same_fds(
        &fds,
        &settled_fd_set(pid),
        "after refused and failed updates",
    );
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
        api::assert_phases_add_up(&r.body["report"]);
        assert_eq!(r.body["report"]["pid"], pid);
        assert_eq!(exe_of(pid), std::fs::canonicalize(molt_bin()).unwrap());
        vm.wait_ticks(2);
        let info = vm.info();
        assert_eq!(info["version"], VERSION);
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
    // The process that became /bin/false is gone; the guardian runs the guest now (and is
    // killed with this test if an assertion below fails).
    let info = vm.info();
    let new_pid = info["pid"].as_u64().unwrap() as u32;
    let _cleanup = KillOnDrop(new_pid);
    assert_eq!(r.status, 500, "{r:?}");
    let reason = r.body["report"]["rolled_back"].as_str().unwrap_or_default();
    assert!(reason.contains("exited"), "{r:?}");
    api::assert_phases_add_up(&r.body["report"]);
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

/// Guardians whose parent was `pid` (an update guardian names its parent in its
/// environment).
fn guardians_of(pid: u32) -> Vec<u32> {
    let needle = format!("MOLT_CPR_GUARDIAN_PARENT={pid}");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
        })
        .collect()
}

/// While a cpr-exec is prepared (its guardian started, the guest not paused yet: a few ms,
/// stretched to 2 s here by the test build) molt serves the API: `vm.info` answers, a second
/// update and a snapshot get 409, and a `vm.shutdown` wins: the update does not happen (409,
/// the VM is ending), molt stops as asked, and the guardian goes with it.
#[test]
fn requests_while_an_update_is_prepared() {
    let mut vm = Vm::start_bin(
        Path::new(NEXT_BIN),
        "update-prepared",
        &[],
        &[("MOLT_TEST_SETTLE_MS", "2000")],
    );
    let pid = vm.pid();
    vm.wait_ticks(2);
    let socket = vm.socket.clone();
    let update = std::thread::spawn(move || api::put(&socket, "vm.cpr-exec", "{}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while guardians_of(pid).is_empty() {
        assert!(Instant::now() < deadline, "no guardian started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let info = vm.info();
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["updates"]["count"], 0, "{info}");
    // The CPUs are kept out of idle states from the preparation on.
    if Path::new(molt_tests::host::CPU_LATENCY).exists() {
        assert!(
            molt_tests::host::holds_cpu_latency_request(pid.into()),
            "no CPU wake-up latency request while the update is prepared"
        );
    } else {
        molt_tests::skip(
            "the CPU wake-up latency request of a prepared update",
            "this host has no /dev/cpu_dma_latency",
        );
    }
    let second = vm.update("{}");
    assert_eq!(second.status, 409, "{second:?}");
    let dir = TempDir::new("update-prepared-snap");
    let body = format!(r#"{{"path": "{}"}}"#, dir.join("snap").display());
    let snap = api::put(&vm.socket, "vm.snapshot", &body);
    assert_eq!(snap.status, 409, "{snap:?}");
    assert!(!update.is_finished(), "the update did not wait");
    let r = api::put(&vm.socket, "vm.shutdown", "{}");
    assert_eq!(r.status, 204, "{r:?}");
    let r = update.join().unwrap();
    assert_eq!(r.status, 409, "{r:?}");
    assert!(
        r.body["error"]
            .as_str()
            .is_some_and(|e| e.contains("ending")),
        "{r:?}"
    );
    let Vm { molt, _dir, .. } = vm;
    molt.finish(WAIT).assert_code(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !guardians_of(pid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "guardians left: {:?}",
            guardians_of(pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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
        assert_report(&vm.update("{}"), pid, VERSION);
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
    assert_report(&vm.update("{}"), pid, VERSION);
    assert_eq!(vm.info()["state"], "paused");
    vm.molt.collect_for(Duration::from_millis(600));
    assert_eq!(vm.last_tick(), at_pause, "the guest ran while paused");
    assert_eq!(api::put(&vm.socket, "vm.resume", "").status, 204);
    vm.wait_ticks(2);
    vm.assert_guest_continuous();
}

/// How long [`holding_wrapper`] holds an update's exec phase, which lies between the capture
/// of the VM and its restore.
const HOLD_MS: f64 = 500.0;
/// Tolerance of the guest-time checks across an update held for `HOLD_MS`. A restore that
/// forgets to advance the guest's clocks leaves the guest about `HOLD_MS` behind (its clocks
/// stand still while no VM exists); one that advances them twice puts it about `HOLD_MS`
/// ahead; a clock that goes backwards is further off still. What the tolerance has to absorb
/// does not grow with the hold: the pause and resume phases (the vCPUs stop a little after
/// the pause begins and run a little before it ends), the guest's own loop (a few ms per
/// iteration, tens when the host is loaded), the time between reading a clock and stamping
/// the capture, and the test's reading of the console. Measured on a 2-core PVM host with
/// two busy loops beside the tests: guest gap minus `pause_ms` +2 to +41 ms, kvmclock minus
/// host time -0.3 to -0.5 ms, ten ticks in 999 to 1346 ms of host time (gaps 90 to 413 ms).
const CLOCK_TOLERANCE_MS: f64 = 150.0;

/// A stand-in for molt as an update's target: it keeps a copy of the state record in
/// `dir/record` (found by its memfd's name), sleeps `HOLD_MS`, then execs molt, whose new
/// image restores the VM as usual, in the same process with the same fds.
fn holding_wrapper(dir: &TempDir) -> PathBuf {
    let script = dir.join("hold-then-molt");
    let text = format!(
        r#"#!/bin/sh
for fd in /proc/$$/fd/*; do
    case "$(readlink "$fd")" in
        */memfd:molt-cpr-record*) cat "$fd" > '{record}' || exit 1 ;;
    esac
done
[ -s '{record}' ] || {{ echo "hold-then-molt: no molt-cpr-record memfd among the fds" >&2; exit 1; }}
sleep {hold}
exec '{molt}' "$@"
"#,
        record = dir.join("record").display(),
        hold = HOLD_MS / 1000.0,
        molt = molt_bin().display(),
    );
    std::fs::write(&script, text).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// The guest clocks as a state record captured them.
#[derive(Debug)]
struct RecordClocks {
    /// Host wall clock of the capture, ns.
    captured_at_ns: u64,
    /// kvmclock, ns.
    kvmclock_ns: u64,
    /// IA32_TSC of each vCPU.
    tsc: Vec<u64>,
    tsc_khz: u64,
}

/// Reads the clocks from a copy of a state record: the 28-byte header, then JSON whose VM
/// state is the object with `captured_at_ns` (wherever the record nests it).
fn record_clocks(path: &Path) -> RecordClocks {
    fn find<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
        match v {
            Value::Object(m) if m.contains_key(key) => Some(v),
            Value::Object(m) => m.values().find_map(|c| find(c, key)),
            Value::Array(a) => a.iter().find_map(|c| find(c, key)),
            _ => None,
        }
    }
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: Value = serde_json::from_slice(bytes.get(28..).unwrap_or_default())
        .unwrap_or_else(|e| panic!("the state record's payload is not JSON: {e}"));
    let vm = find(&json, "captured_at_ns").expect("no VM state in the record");
    let why = || format!("unexpected VM state in the record: {vm}");
    // kvm_clock_data as hex bytes: its first field is the clock, a little-endian u64 (trailing
    // zero bytes are left out of the hex).
    let hex = vm["kvm"]["clock"]
        .as_str()
        .unwrap_or_else(|| panic!("{}", why()));
    let hex = format!("{hex:0<16}");
    let le: Vec<u8> = (0..16)
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap_or_else(|_| panic!("{}", why())))
        .collect();
    let vcpus = vm["vcpus"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", why()));
    RecordClocks {
        captured_at_ns: vm["captured_at_ns"].as_u64().unwrap(),
        kvmclock_ns: u64::from_le_bytes(le.try_into().unwrap()),
        tsc: vcpus
            .iter()
            .map(|v| {
                // Each MSR is an `[index, data]` pair.
                v["msrs"]
                    .as_array()
                    .and_then(|m| m.iter().find(|m| m[0] == 0x10))
                    .and_then(|m| m[1].as_u64())
                    .unwrap_or_else(|| panic!("no IA32_TSC in {v}"))
            })
            .collect(),
        tsc_khz: vcpus[0]["tsc_khz"]
            .as_u64()
            .unwrap_or_else(|| panic!("{}", why())),
    }
}

/// Across a live update the guest's time advances by the time that passed: the guest sees
/// the update as a gap of about `pause_ms` (in its TSC), and from one update's capture to the
/// next the kvmclock and TSC the VMM saved advanced by the host time between the captures,
/// the earlier update's hold included. Each update is held `HOLD_MS` in its exec phase (see
/// [`holding_wrapper`]) so that a forgotten or doubled advance shows (see
/// [`CLOCK_TOLERANCE_MS`]).
///
/// On a PVM host the guest reads the host's TSC whatever the VMM sets, so only the kvmclock
/// check can catch a wrong advance there; on other KVM hosts all three can.
#[test]
fn guest_time_advances_by_the_pause_across_updates() {
    let dir = TempDir::new("update-time-files");
    let wrapper = holding_wrapper(&dir);
    let record = dir.join("record");
    let mut vm = Vm::start("update-time", &[], &[]);
    let pid = vm.pid();
    vm.wait_ticks(3);
    let mut records = Vec::new();
    for i in 1..=3 {
        let sent = Instant::now();
        let r = vm.update(&format!(r#"{{"binary": "{}"}}"#, wrapper.display()));
        let answered = Instant::now();
        assert_report(&r, pid, VERSION);
        let b = &r.body;
        let pause_ms = b["pause_ms"].as_f64().unwrap();
        assert!(
            b["phases_ms"]["exec"].as_f64().unwrap() >= HOLD_MS,
            "update {i}: the wrapper's hold is not in the exec phase: {b}"
        );
        records.push(record_clocks(&record));
        std::fs::remove_file(&record).unwrap();
        // The tick after the update reports the gap; a tick line the pause cut in two
        // carries the gap before it, so the next one has it.
        vm.wait_ticks_read_after(answered, 2);
        let gaps: Vec<u64> = vm
            .ticks_read_since(sent)
            .iter()
            .map(|t| t.num("gap_max_us"))
            .collect();
        let gap_ms = *gaps.iter().max().unwrap() as f64 / 1000.0;
        assert!(
            (gap_ms - pause_ms).abs() <= CLOCK_TOLERANCE_MS,
            "update {i}: the guest saw a gap of {gap_ms:.3} ms in its time, pause_ms is \
             {pause_ms:.3} ms (tolerance {CLOCK_TOLERANCE_MS} ms; gap_max_us of the ticks since \
             the request: {gaps:?}): {b}"
        );
    }
    for (i, w) in records.windows(2).enumerate() {
        let (a, b) = (&w[0], &w[1]);
        let wall_ms = (b.captured_at_ns as f64 - a.captured_at_ns as f64) / 1e6;
        let clock_ms = (b.kvmclock_ns as f64 - a.kvmclock_ns as f64) / 1e6;
        let n = i + 1;
        assert!(
            (clock_ms - wall_ms).abs() <= CLOCK_TOLERANCE_MS,
            "kvmclock advanced {clock_ms:.3} ms from update {n}'s capture to update {}'s, while \
             {wall_ms:.3} ms passed (tolerance {CLOCK_TOLERANCE_MS} ms)\n{a:?}\n{b:?}",
            n + 1
        );
        assert!(a.tsc_khz != 0, "TSC frequency unknown: {a:?}");
        for (cpu, (ta, tb)) in a.tsc.iter().zip(&b.tsc).enumerate() {
            let tsc_ms = (*tb as f64 - *ta as f64) / a.tsc_khz as f64;
            assert!(
                (tsc_ms - wall_ms).abs() <= CLOCK_TOLERANCE_MS,
                "vcpu{cpu}: TSC advanced {tsc_ms:.3} ms from update {n}'s capture to update \
                 {}'s, while {wall_ms:.3} ms passed (tolerance {CLOCK_TOLERANCE_MS} ms)",
                n + 1
            );
        }
    }
    // After the updates the guest's time runs at the host's pace: ten ticks (100 ms of guest
    // time each) take about a second. A tick can come late by its loop gap (and a gap over
    // 100 ms shifts the ticks after it), never early, so the upper bound adds the gaps.
    let start = vm.wait_ticks(1);
    vm.wait_ticks(10);
    let ticks: Vec<(u64, Instant, u64)> = vm
        .molt
        .lines()
        .iter()
        .filter(|l| l.stream == Stream::Stdout)
        .filter_map(|l| GuestLine::parse(&l.text).map(|g| (g, l.at)))
        .filter(|(g, _)| g.kind == "tick" && (start..=start + 10).contains(&g.num("n")))
        .map(|(g, at)| (g.num("n"), at, g.num("gap_max_us")))
        .collect();
    assert_eq!(ticks.len(), 11, "{ticks:?}");
    let host_ms = (ticks[10].1 - ticks[0].1).as_secs_f64() * 1e3;
    let gaps_ms = ticks[1..].iter().map(|t| t.2).sum::<u64>() as f64 / 1000.0;
    assert!(
        host_ms >= 1000.0 - CLOCK_TOLERANCE_MS && host_ms <= 1000.0 + gaps_ms + CLOCK_TOLERANCE_MS,
        "ticks {start}..={} (1000 ms of guest time) took {host_ms:.3} ms of host time (gaps \
         {gaps_ms:.3} ms, tolerance {CLOCK_TOLERANCE_MS} ms)",
        start + 10
    );
    assert_eq!(vm.info()["updates"]["count"], 3);
    vm.assert_guest_continuous();
}
