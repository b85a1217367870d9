//! Seccomp (`--seccomp on|log|off`): every molt thread but the launcher is filtered, filters
//! do not pile up across live updates (100 cpr-exec updates in a row keep working), and a
//! vCPU thread that makes a forbidden syscall kills molt with SIGSYS (or, with `log`, is
//! logged by the kernel and goes on).

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use molt_tests::api::{self, Reply};
use molt_tests::{guest_lines, molt_bin, Molt, Stream, TempDir};

const NEXT_BIN: &str = env!("MOLT_NEXT_BIN");
const WAIT: Duration = Duration::from_secs(60);
/// A cheap guest: ticks only (no memtest), little RAM.
const CHEAP: &[&str] = &["--cmdline", "console=ttyS0", "--memory", "64M"];

struct Vm {
    molt: Molt,
    socket: PathBuf,
    _dir: TempDir,
}

impl Vm {
    fn start(bin: &str, tag: &str, extra: &[&str], env: &[(&str, &str)]) -> Vm {
        let dir = TempDir::new(tag);
        let socket = dir.join("api.sock");
        let mut args = vec!["--api-socket".to_string(), socket.display().to_string()];
        args.extend(CHEAP.iter().chain(extra).map(|s| s.to_string()));
        let molt = Molt::spawn_env(&PathBuf::from(bin), &args, env);
        api::wait_ready(&socket, WAIT);
        Vm {
            molt,
            socket,
            _dir: dir,
        }
    }

    fn put(&self, endpoint: &str, body: &str) -> Reply {
        api::put(&self.socket, endpoint, body)
    }

    fn info(&self) -> serde_json::Value {
        let r = api::get(&self.socket, "vm.info");
        assert_eq!(r.status, 200, "{r:?}");
        r.body
    }

    fn last_tick(&self) -> u64 {
        let out = self
            .molt
            .lines()
            .iter()
            .filter(|l| l.stream == Stream::Stdout);
        guest_lines(out.map(|l| l.text.as_str()))
            .iter()
            .filter(|l| l.kind == "tick" && l.get("n").is_some())
            .map(|l| l.num("n"))
            .max()
            .unwrap_or(0)
    }

    fn wait_ticks(&mut self, more: u64) {
        let target = self.last_tick() + more;
        self.molt.wait_line(Stream::Stdout, WAIT, |l| {
            molt_tests::GuestLine::parse(l)
                .is_some_and(|g| g.kind == "tick" && g.num("n") >= target)
        });
    }
}

/// (thread name, seccomp mode, filters) of every thread of `pid` (kernel workers excluded).
fn threads(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u32>().ok())
        };
        let comm = comm.trim().to_string();
        // KVM's own kernel worker threads (e.g. kvm-nx-lpage-recovery) live in the process.
        if comm.starts_with("kvm-") {
            continue;
        }
        if let (Some(mode), Some(filters)) = (field("Seccomp:"), field("Seccomp_filters:")) {
            out.push((comm, mode, filters));
        }
    }
    out
}

/// Why `list` is not: every thread filtered (mode 2) with at most the vCPU filter on top of
/// the main thread's, except the launcher, which has none.
fn filtering_problem(list: &[(String, u32, u32)]) -> Option<String> {
    if !list.iter().any(|t| t.0 == "launcher") || !list.iter().any(|t| t.0.starts_with("vcpu")) {
        return Some("no launcher or no vCPU thread".into());
    }
    for (name, mode, filters) in list {
        let ok = match name.as_str() {
            "launcher" => (*mode, *filters) == (0, 0),
            _ => *mode == 2 && (1..=2).contains(filters),
        };
        if !ok {
            return Some(format!("{name}: mode {mode}, {filters} filters"));
        }
    }
    None
}

/// Asserts [`filtering_problem`] finds nothing once the image's threads have started (a
/// thread names itself only once it runs, so a moment after an update one may be unnamed).
fn assert_filtered(pid: u32, when: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let list = threads(pid);
        match filtering_problem(&list) {
            None => return,
            Some(p) if Instant::now() >= deadline => panic!("{when}: {p}: {list:?}"),
            Some(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn a_hundred_updates_with_seccomp_on_keep_working() {
    let mut vm = Vm::start(&molt_bin().display().to_string(), "seccomp-soak", &[], &[]);
    let pid = vm.molt.pid();
    vm.wait_ticks(2);
    assert_filtered(pid, "after boot");
    let started = Instant::now();
    for i in 1..=100u64 {
        let r = vm.put("vm.cpr-exec", "{}");
        assert_eq!(r.status, 200, "update {i}: {r:?}");
        assert_eq!(r.body["pid"], pid, "update {i}: {r:?}");
        if i % 25 == 0 {
            assert_filtered(pid, &format!("after update {i}"));
        }
    }
    eprintln!("100 updates in {:?}", started.elapsed());
    assert_eq!(vm.info()["updates"]["count"], 100);
    vm.wait_ticks(3);
    // The other control paths still work under the filters after all those images:
    // pause, resume, an in-process rebuild's cousin (snapshot) and a rollback-free update to
    // another build.
    assert_eq!(vm.put("vm.pause", "").status, 204);
    assert_eq!(vm.put("vm.resume", "").status, 204);
    let snap = TempDir::new("seccomp-soak-snap");
    let body = format!(r#"{{"path": "{}"}}"#, snap.join("s").display());
    let r = vm.put("vm.snapshot", &body);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(vm.put("vm.resume", "").status, 204);
    let r = vm.put("vm.cpr-exec", &format!(r#"{{"binary": "{NEXT_BIN}"}}"#));
    assert_eq!(r.status, 200, "{r:?}");
    assert_filtered(pid, "after the update to the next build");
    vm.wait_ticks(2);
    // Through a stand-in, whose filters are its own; the new image's are in place after.
    let r = vm.put("vm.cpr-exec", r#"{"stand_in": true}"#);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["pid"], pid, "{r:?}");
    assert_eq!(r.body["legs"].as_array().map(Vec::len), Some(2), "{r:?}");
    assert_filtered(pid, "after an update through a stand-in");
    vm.wait_ticks(2);
    assert_eq!(vm.put("vm.shutdown", "").status, 204);
    let out = vm.molt.finish(WAIT);
    out.assert_code(0);
    out.assert_no_panic();
    let ticks: Vec<u64> = out
        .guest_lines()
        .iter()
        .filter(|l| l.kind == "tick" && l.get("n").is_some())
        .map(|l| l.num("n"))
        .collect();
    for (i, n) in ticks.iter().enumerate() {
        assert_eq!(*n, i as u64 + 1, "tick sequence broken: {ticks:?}");
    }
}

#[test]
fn a_vcpu_thread_making_a_forbidden_syscall_kills_molt() {
    let dir = TempDir::new("seccomp-kill");
    let args = [
        "--cmdline",
        "console=ttyS0",
        "--memory",
        "64M",
        "--serial",
        "null",
    ];
    let molt = Molt::spawn_env(
        &PathBuf::from(NEXT_BIN),
        &args,
        &[("MOLT_TEST_SECCOMP", "vcpu")],
    );
    let out = molt.finish(WAIT);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "molt was not killed by SIGSYS: {}",
        out.describe()
    );
    assert!(
        out.stderr()
            .iter()
            .any(|l| l.contains("injecting a forbidden syscall")),
        "{}",
        out.describe()
    );
    drop(dir);
}

/// The kernel's log lines so far (`/dev/kmsg`), or why it cannot be read.
fn kernel_log() -> Result<Vec<String>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .map_err(|e| format!("/dev/kmsg: {e}"))?;
    let mut lines = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => lines.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            // A record overwritten while reading: go on with the next.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) => return Err(format!("/dev/kmsg: {e}")),
        }
    }
    Ok(lines)
}

#[test]
fn with_seccomp_log_a_forbidden_syscall_is_logged_and_molt_goes_on() {
    if let Err(why) = kernel_log() {
        molt_tests::skip("reading the kernel's seccomp log", &why);
        return;
    }
    let mut vm = Vm::start(
        NEXT_BIN,
        "seccomp-log",
        &["--seccomp", "log"],
        &[("MOLT_TEST_SECCOMP", "vcpu")],
    );
    let pid = vm.molt.pid();
    vm.wait_ticks(2);
    assert_eq!(vm.info()["state"], "running");
    let needle = format!(" pid={pid} ");
    let syscall = format!(" syscall={} ", libc::SYS_socket);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = kernel_log().unwrap_or_default();
        if log
            .iter()
            .any(|l| l.contains("type=1326") && l.contains(&needle) && l.contains(&syscall))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no audit record of molt's socket() in the kernel log"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(vm.put("vm.shutdown", "").status, 204);
    vm.molt.finish(WAIT).assert_code(0);
}

#[test]
fn with_seccomp_off_no_thread_is_filtered() {
    let mut vm = Vm::start(
        &molt_bin().display().to_string(),
        "seccomp-off",
        &["--seccomp", "off"],
        &[],
    );
    vm.wait_ticks(1);
    let list = threads(vm.molt.pid());
    assert!(list.iter().all(|t| t.1 == 0 && t.2 == 0), "{list:?}");
    assert!(!list.iter().any(|t| t.0 == "launcher"), "{list:?}");
    assert_eq!(vm.put("vm.shutdown", "").status, 204);
    vm.molt.finish(WAIT).assert_code(0);
}
