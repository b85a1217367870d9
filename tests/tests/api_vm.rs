//! The API socket against a running VM: pause/resume as the guest sees it, bad requests that
//! leave the guest running, shutdown, and `molt ctl`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use molt_tests::api::{self, request};
use molt_tests::{guest_lines, molt_bin, GuestLine, Molt, Stream, TempDir};

const WAIT: Duration = Duration::from_secs(60);

struct Vm {
    molt: Molt,
    socket: PathBuf,
    _dir: TempDir,
}

impl Vm {
    fn start(tag: &str) -> Vm {
        let dir = TempDir::new(tag);
        let socket = dir.join("api.sock");
        let molt = Molt::spawn(&[
            "--api-socket",
            &socket.display().to_string(),
            "--cmdline",
            "molt.memtest=2",
        ]);
        api::wait_ready(&socket, WAIT);
        Vm {
            molt,
            socket,
            _dir: dir,
        }
    }

    fn ticks(&self) -> Vec<u64> {
        guest_lines(self.molt.lines().iter().map(|l| l.text.as_str()))
            .iter()
            .filter(|l| l.kind == "tick")
            .map(|l| l.num("n"))
            .collect()
    }

    fn wait_tick(&mut self, n: u64) {
        self.molt.wait_line(Stream::Stdout, WAIT, |l| {
            GuestLine::parse(l).is_some_and(|g| g.kind == "tick" && g.num("n") >= n)
        });
    }

    fn last_tick(&self) -> u64 {
        self.ticks().last().copied().unwrap_or(0)
    }

    /// Collects output for `d` without expecting anything.
    fn idle(&mut self, d: Duration) {
        self.molt.collect_for(d);
    }
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let mut vm = Vm::start("api-pause");
    vm.wait_tick(2);
    assert_eq!(api::put(&vm.socket, "vm.pause", "").status, 204);
    let info = api::get(&vm.socket, "vm.info").body;
    assert_eq!(info["state"], "paused", "{info}");
    let at_pause = vm.last_tick();
    vm.idle(Duration::from_millis(700));
    // At most a tick already on its way out of the guest when it paused.
    assert!(vm.last_tick() <= at_pause + 1, "ticks went on while paused");
    let paused_at = vm.last_tick();
    vm.idle(Duration::from_millis(500));
    assert_eq!(vm.last_tick(), paused_at, "ticks went on while paused");
    // Pausing twice is fine.
    assert_eq!(api::put(&vm.socket, "vm.pause", "{}").status, 204);
    assert_eq!(api::put(&vm.socket, "vm.resume", "").status, 204);
    assert_eq!(api::get(&vm.socket, "vm.info").body["state"], "running");
    vm.wait_tick(paused_at + 2);
    let ticks = vm.ticks();
    for w in ticks.windows(2) {
        assert_eq!(w[1], w[0] + 1, "tick sequence broken: {ticks:?}");
    }
    let info = api::get(&vm.socket, "vm.info").body;
    assert_eq!(info["counters"]["pauses"], 1, "{info}");
    assert_eq!(info["counters"]["resumes"], 1, "{info}");
}

fn raw(socket: &std::path::Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn bad_requests_get_json_errors_and_the_guest_keeps_running() {
    let mut vm = Vm::start("api-bad");
    vm.wait_tick(1);
    let t = Duration::from_secs(10);
    let cases: Vec<(&str, &str, Option<String>, u16)> = vec![
        ("GET", "/api/v1/nope", None, 404),
        ("DELETE", "/api/v1/vm.info", None, 405),
        ("PUT", "/api/v1/vm.info", None, 405),
        ("PUT", "/api/v1/vm.pause", Some("{not json".into()), 400),
        ("PUT", "/api/v1/vm.cpr-exec", Some("[1, 2]".into()), 400),
        ("PUT", "/api/v1/vm.pause", Some("x".repeat(2 << 20)), 413),
    ];
    for (method, path, body, status) in cases {
        let r = request(&vm.socket, method, path, body.as_deref(), t).unwrap();
        assert_eq!(r.status, status, "{method} {path}: {r:?}");
        assert!(r.body["error"].is_string(), "{method} {path}: {r:?}");
    }
    let garbage = raw(
        &vm.socket,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
    );
    assert!(garbage.starts_with("HTTP/1.1 4"), "{garbage:?}");
    assert!(garbage.contains("\"error\""), "{garbage:?}");
    // A client that connects and says nothing does not hold anything up.
    let _silent = UnixStream::connect(&vm.socket).unwrap();
    assert_eq!(api::get(&vm.socket, "vmm.ping").status, 200);
    let now = vm.last_tick();
    vm.wait_tick(now + 3);
    assert_eq!(api::get(&vm.socket, "vm.info").body["state"], "running");
}

#[test]
fn shutdown_ends_molt_cleanly() {
    let vm = Vm::start("api-shutdown");
    let socket = vm.socket.clone();
    assert_eq!(api::put(&socket, "vm.shutdown", "").status, 204);
    let out = vm.molt.finish(WAIT);
    out.assert_code(0);
    assert!(!socket.exists(), "the API socket is removed on exit");
}

fn ctl(socket: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(molt_bin())
        .arg("ctl")
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run molt ctl")
}

#[test]
fn molt_ctl_drives_the_vm() {
    let vm = Vm::start("api-ctl");
    let ping = ctl(&vm.socket, &["ping"]);
    assert!(ping.status.success(), "{ping:?}");
    let v: serde_json::Value = serde_json::from_slice(&ping.stdout).unwrap();
    assert_eq!(v["pid"], vm.molt.pid());
    let info = ctl(&vm.socket, &["info"]);
    assert!(info.status.success(), "{info:?}");
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["state"], "running");
    assert!(ctl(&vm.socket, &["pause"]).status.success());
    let v: serde_json::Value = serde_json::from_slice(&ctl(&vm.socket, &["info"]).stdout).unwrap();
    assert_eq!(v["state"], "paused");
    assert!(ctl(&vm.socket, &["resume"]).status.success());
    let bad = ctl(&vm.socket, &["cpr-exec", "--binary", "relative"]);
    assert!(!bad.status.success());
    assert!(!bad.stderr.is_empty(), "{bad:?}");
    assert!(ctl(&vm.socket, &["shutdown"]).status.success());
    vm.molt.finish(WAIT).assert_code(0);
    let gone = ctl(&vm.socket, &["ping"]);
    assert!(!gone.status.success(), "ping of a stopped molt must fail");
}
