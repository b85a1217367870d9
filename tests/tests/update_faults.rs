//! A live update that nothing can corrupt: faults injected at every restore step (the "next
//! version" build's `MOLT_TEST_FAULT=<step>:<kind>`), before and after the commit point; the
//! guardian killed; an fd limit too small; a signal in the middle of an update.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use molt_tests::api::{self, Reply};
use molt_tests::{GuestLine, Molt, TempDir};

const NEXT_BIN: &str = env!("MOLT_NEXT_BIN");
const WAIT: Duration = Duration::from_secs(60);
const STEPS_BEFORE_COMMIT: [&str; 7] = [
    "record",
    "memory",
    "vm",
    "vcpus",
    "devices",
    "api",
    "before-resume",
];

/// A molt with an API socket and a serial socket whose output a client collects.
struct Vm {
    molt: Molt,
    api: PathBuf,
    serial: PathBuf,
    ticks: Arc<Mutex<Vec<u64>>>,
    _dir: TempDir,
}

impl Vm {
    fn start(tag: &str, env: &[(&str, &str)]) -> Vm {
        Vm::start_with(&molt_tests::molt_bin(), tag, env, &[])
    }

    fn start_with(bin: &Path, tag: &str, env: &[(&str, &str)], prefix: &[&str]) -> Vm {
        let dir = TempDir::new(tag);
        let api = dir.join("api.sock");
        let serial = dir.join("serial.sock");
        let mut args: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        args.push(bin.display().to_string());
        args.extend(
            [
                "--api-socket",
                &api.display().to_string(),
                "--serial",
                &format!("socket={}", serial.display()),
                "--cmdline",
                "molt.memtest=4",
            ]
            .map(String::from),
        );
        let program = PathBuf::from(&args[0]);
        let molt = Molt::spawn_env(&program, &args[1..], env);
        api::wait_ready(&api, WAIT);
        let ticks = Arc::new(Mutex::new(Vec::new()));
        let stream = UnixStream::connect(&serial).expect("serial socket");
        let sink = ticks.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if let Some(g) = GuestLine::parse(&line).filter(|g| g.kind == "tick") {
                    sink.lock().unwrap().push(g.num("n"));
                }
            }
        });
        let vm = Vm {
            molt,
            api,
            serial,
            ticks,
            _dir: dir,
        };
        vm.wait_tick_after(0);
        vm
    }

    fn last_tick(&self) -> u64 {
        self.ticks.lock().unwrap().last().copied().unwrap_or(0)
    }

    /// Waits for a tick line with n > `n` on the serial client (the guest runs).
    fn wait_tick_after(&self, n: u64) {
        let deadline = Instant::now() + WAIT;
        while self.last_tick() <= n {
            assert!(
                Instant::now() < deadline,
                "no tick after {n} on the serial socket"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ticks went up by one, none lost or doubled.
    fn assert_ticks_continuous(&self) {
        let ticks = self.ticks.lock().unwrap().clone();
        for (i, n) in ticks.iter().enumerate() {
            assert_eq!(*n, i as u64 + 1, "tick sequence broken: {ticks:?}");
        }
    }

    fn update(&self) -> std::io::Result<Reply> {
        let body = format!(r#"{{"binary": "{NEXT_BIN}"}}"#);
        api::request(&self.api, "PUT", "/api/v1/vm.cpr-exec", Some(&body), WAIT)
    }

    fn info(&self) -> serde_json::Value {
        let r = api::get(&self.api, "vm.info");
        assert_eq!(r.status, 200, "{r:?}");
        r.body
    }

    /// Both socket paths still answer: the API with its info, the serial socket with a
    /// connection.
    fn assert_paths_answer(&self, what: &str) {
        assert!(self.api.exists(), "{what}: the API socket file is gone");
        assert!(
            self.serial.exists(),
            "{what}: the serial socket file is gone"
        );
        UnixStream::connect(&self.serial)
            .unwrap_or_else(|e| panic!("{what}: the serial socket does not answer: {e}"));
        self.info();
    }

    fn shutdown(self) {
        let pid = self.info()["pid"].as_u64().unwrap_or(0) as u32;
        let r = api::put(&self.api, "vm.shutdown", "{}");
        assert_eq!(r.status, 204, "{r:?}");
        if pid == self.molt.pid() {
            // (An injected panic left its message in the log: only the exit code counts.)
            let out = self.molt.finish(WAIT);
            assert_eq!(out.code(), Some(0), "{}", out.describe());
            return;
        }
        // The VM runs in the process the guardian became, which the test did not start (its
        // new parent reaps it).
        let deadline = Instant::now() + WAIT;
        while Path::new(&format!("/proc/{pid}")).exists() {
            assert!(Instant::now() < deadline, "process {pid} did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Every step before the commit point, failed by `kind`: the guest runs on, on the previous
/// binary, with no tick lost, and both socket paths still answer.
fn roll_back_at_every_step(kind: &str) {
    for step in STEPS_BEFORE_COMMIT {
        let what = format!("{step}:{kind}");
        let vm = Vm::start(
            &format!("fault-{step}-{kind}"),
            &[("MOLT_TEST_FAULT", &what)],
        );
        let pid = vm.molt.pid();
        let before = vm.last_tick();
        let r = vm
            .update()
            .unwrap_or_else(|e| panic!("{what}: no answer to the update: {e}"));
        assert_eq!(r.status, 500, "{what}: {r:?}");
        let reason = r.body["report"]["rolled_back"].as_str().unwrap_or_default();
        let expected = match kind {
            "exit" => "exited before it resumed the guest".to_string(),
            "panic" => format!("injected panic at {step}"),
            _ => format!("injected fault at {step}"),
        };
        assert!(reason.contains(&expected), "{what}: {r:?}");
        let info = vm.info();
        assert_eq!(info["updates"]["rollbacks"], 1, "{what}: {info}");
        assert_eq!(info["version"], env!("CARGO_PKG_VERSION"), "{what}: {info}");
        if kind != "exit" {
            assert_eq!(info["pid"], pid, "{what}: the same process runs the guest");
        } else {
            // The guardian starts at SCHED_IDLE; the VMM it becomes runs as molt did.
            let guardian = info["pid"].as_u64().unwrap_or(0);
            assert_eq!(
                molt_tests::host::scheduling_policy(guardian),
                Some(libc::SCHED_OTHER as u32),
                "{what}: the VMM after the guardian took over is not at molt's policy"
            );
        }
        vm.wait_tick_after(before + 2);
        vm.assert_paths_answer(&what);
        vm.assert_ticks_continuous();
        vm.shutdown();
    }
}

#[test]
fn a_panic_before_the_commit_point_rolls_back_at_every_step() {
    roll_back_at_every_step("panic");
}

#[test]
fn an_error_before_the_commit_point_rolls_back_at_every_step() {
    roll_back_at_every_step("error");
}

#[test]
fn an_exit_before_the_commit_point_hands_the_guest_to_the_guardian_at_every_step() {
    roll_back_at_every_step("exit");
}

/// After the commit point the new image owns the guest: if it fails, the VM is lost with it,
/// and nothing resumes the record taken before the update (stale vCPU and queue state over
/// newer memory).
#[test]
fn a_failure_after_the_commit_point_never_restores_stale_state() {
    for kind in ["panic", "error", "exit"] {
        let what = format!("after-resume:{kind}");
        let vm = Vm::start(
            &format!("fault-after-{kind}"),
            &[("MOLT_TEST_FAULT", &what)],
        );
        // The waiting request's connection closes without an answer: its owner died.
        let r = vm.update();
        assert!(
            r.as_ref().map_or(true, |r| r.status != 200),
            "{what}: {r:?}"
        );
        let Vm { molt, api, .. } = vm;
        let out = molt.finish(WAIT);
        let code = out.code();
        assert_ne!(code, Some(0), "{what}: {}", out.describe());
        let stderr = out.stderr().join("\n");
        assert!(
            stderr.contains("lost"),
            "{what}: the loss is reported\n{stderr}"
        );
        assert!(
            !stderr.contains("restoring the guest on the previous binary"),
            "{what}: nothing restores stale state\n{stderr}"
        );
        // Nobody serves the guest any more.
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            api::request(&api, "GET", "/api/v1/vm.info", None, Duration::from_secs(2)).is_err(),
            "{what}: a process still serves the VM"
        );
    }
}

#[test]
fn an_update_whose_guardian_was_killed_still_completes() {
    let vm = Vm::start("fault-guardian", &[("MOLT_TEST_FAULT", "kill-guardian")]);
    let before = vm.last_tick();
    let r = vm.update().expect("answer");
    assert_eq!(r.status, 200, "{r:?}");
    vm.wait_tick_after(before + 2);
    assert_eq!(vm.info()["updates"]["count"], 1);
    vm.assert_ticks_continuous();
    vm.shutdown();
}

#[test]
fn an_fd_limit_too_small_for_the_update_is_refused_before_the_pause() {
    let vm = Vm::start_with(
        &molt_tests::molt_bin(),
        "fault-nofile",
        &[],
        &["/usr/bin/prlimit", "--nofile=48:48", "--"],
    );
    let before = vm.info()["counters"]["pauses"].clone();
    let r = vm.update().expect("answer");
    assert_eq!(r.status, 409, "{r:?}");
    let error = r.body["error"].as_str().unwrap_or_default();
    assert!(error.contains("RLIMIT_NOFILE 48"), "{r:?}");
    let info = vm.info();
    assert_eq!(
        info["counters"]["pauses"], before,
        "the guest was not paused"
    );
    assert_eq!(info["updates"]["count"], 0);
    let t = vm.last_tick();
    vm.wait_tick_after(t);
    vm.shutdown();
}

/// A termination signal that arrives while an update runs is not lost and kills nothing by
/// surprise: whichever image receives it ends the VM cleanly (exit 0) once the guest runs,
/// and no guardian resurrects it.
fn signal_during_update(signal: i32, env: &[(&str, &str)], delay: Duration) {
    let vm = Vm::start(&format!("signal-{signal}-{}", delay.as_millis()), env);
    let api = vm.api.clone();
    let update = std::thread::spawn(move || {
        let body = format!(r#"{{"binary": "{NEXT_BIN}"}}"#);
        api::request(&api, "PUT", "/api/v1/vm.cpr-exec", Some(&body), WAIT)
    });
    std::thread::sleep(delay);
    vm.molt.signal(signal);
    let _ = update.join();
    let Vm { molt, api, .. } = vm;
    let out = molt.finish(WAIT);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let stderr = out.stderr().join("\n");
    assert!(
        !stderr.contains("update guardian"),
        "the guardian acted:\n{stderr}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        api::request(&api, "GET", "/api/v1/vm.info", None, Duration::from_secs(2)).is_err(),
        "a process still serves the VM"
    );
}

#[test]
fn sigterm_right_after_an_update_request_ends_the_vm_cleanly() {
    for delay_ms in [0, 1, 2, 3, 4, 6, 8, 12] {
        signal_during_update(libc::SIGTERM, &[], Duration::from_millis(delay_ms));
    }
}

#[test]
fn sigint_while_the_new_image_restores_ends_the_vm_cleanly() {
    // The new image holds its restore for a second: the signal arrives in the middle of it.
    signal_during_update(
        libc::SIGINT,
        &[("MOLT_TEST_FAULT", "record:sleep")],
        Duration::from_millis(300),
    );
}

/// The process group of `pid`, from /proc.
fn pgid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses: state, ppid, pgrp.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

/// The children of `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect()
}

/// A Ctrl-C in molt's terminal goes to its whole process group: the update guardian is not in
/// it, so it survives to protect the guest while the new image restores.
#[test]
fn the_guardian_is_out_of_reach_of_a_terminal_ctrl_c() {
    let vm = Vm::start("guardian-pgrp", &[("MOLT_TEST_FAULT", "record:sleep")]);
    let pid = vm.molt.pid();
    let api = vm.api.clone();
    let update = std::thread::spawn(move || {
        let body = format!(r#"{{"binary": "{NEXT_BIN}"}}"#);
        api::request(&api, "PUT", "/api/v1/vm.cpr-exec", Some(&body), WAIT)
    });
    // The new image sleeps a second in its restore: the guardian exists meanwhile.
    let deadline = Instant::now() + Duration::from_secs(5);
    let guardian = loop {
        let is_guardian = |c: &u32| {
            std::fs::read(format!("/proc/{c}/cmdline"))
                .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains("__cpr-guardian"))
        };
        if let Some(g) = children(pid).into_iter().find(is_guardian) {
            break g;
        }
        assert!(Instant::now() < deadline, "no guardian appeared");
        std::thread::sleep(Duration::from_millis(5));
    };
    let (molt_group, guardian_group) = (pgid(pid), pgid(guardian));
    assert!(molt_group.is_some() && guardian_group.is_some());
    assert_ne!(
        molt_group, guardian_group,
        "the guardian shares molt's process group"
    );
    assert_eq!(
        guardian_group,
        Some(guardian),
        "the guardian leads its own group"
    );
    let r = update.join().unwrap().expect("answer");
    assert_eq!(r.status, 200, "{r:?}");
    vm.shutdown();
}
