//! sd_notify: a molt started with `NOTIFY_SOCKET` says `READY=1` (and its `MAINPID=`) once
//! the guest runs, `MAINPID=` of the process that takes the VM over (a transfer receiver, a
//! guardian after a failed update) and `STOPPING=1` when it shuts the VM down. The listener
//! is an abstract socket (`@name`), as systemd's usually is.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use molt_tests::{api, Molt, TempDir};

const WAIT: Duration = Duration::from_secs(60);

struct Listener {
    sock: UnixDatagram,
    name: String,
}

impl Listener {
    fn new(tag: &str) -> Listener {
        let name = format!("molt-test-notify-{}-{tag}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Listener {
            sock,
            name: format!("@{name}"),
        }
    }

    /// Messages until one contains `needle` (all of them, that one last).
    fn until(&self, needle: &str) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = msg.contains(needle);
                seen.push(msg);
                if done {
                    return seen;
                }
            }
            assert!(Instant::now() < deadline, "no {needle:?}; got {seen:?}");
        }
    }

    /// Messages that arrive within `d`.
    fn drain(&self, d: Duration) -> Vec<String> {
        let deadline = Instant::now() + d;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        seen
    }
}

fn start(dir: &TempDir, notify: &Listener, extra: &[&str]) -> (Molt, PathBuf) {
    let socket = dir.join("api.sock");
    let mut args = vec![
        "--api-socket".to_string(),
        socket.display().to_string(),
        "--cmdline".into(),
        "console=ttyS0".into(),
        "--memory".into(),
        "64M".into(),
        "--serial".into(),
        format!("file={}", dir.join("console.log").display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let molt = Molt::spawn_env(
        &molt_tests::molt_bin(),
        &args,
        &[("NOTIFY_SOCKET", &notify.name)],
    );
    (molt, socket)
}

#[test]
fn ready_then_mainpid_of_the_receiver_then_stopping() {
    let notify = Listener::new("transfer");
    let dir = TempDir::new("notify-transfer");
    let (first, socket) = start(&dir, &notify, &[]);
    let ready = notify.until("READY=1");
    assert!(
        ready
            .last()
            .unwrap()
            .contains(&format!("MAINPID={}", first.pid())),
        "{ready:?}"
    );
    assert!(!ready.iter().any(|m| m.contains("STOPPING")), "{ready:?}");
    api::wait_ready(&socket, WAIT);

    // A live update in place: the same PID stays the main one; nothing says stopping.
    let r = api::put(&socket, "vm.cpr-exec", "{}");
    assert_eq!(r.status, 200, "{r:?}");
    let after_exec = notify.drain(Duration::from_millis(500));
    assert!(
        after_exec
            .iter()
            .all(|m| !m.contains("STOPPING") && !m.contains("MAINPID=")
                || m.contains(&format!("MAINPID={}", first.pid()))),
        "{after_exec:?}"
    );

    // Through a stand-in: the stand-in is the main process while it holds the guest, then
    // the same PID again; nothing says stopping.
    let r = api::put(&socket, "vm.cpr-exec", r#"{"stand_in": true}"#);
    assert_eq!(r.status, 200, "{r:?}");
    let stand_in = r.body["legs"][0]["pid"]
        .as_u64()
        .expect("the stand-in's pid");
    let msgs = notify.until(&format!("MAINPID={}", first.pid()));
    let at = |pid: u64| {
        msgs.iter()
            .position(|m| m.contains(&format!("MAINPID={pid}")))
    };
    let (held, back) = (at(stand_in), at(u64::from(first.pid())));
    assert!(held.is_some() && held < back, "{msgs:?}");
    assert!(!msgs.iter().any(|m| m.contains("STOPPING")), "{msgs:?}");

    // A transfer: the receiver (started by the operator, in the service's environment) is
    // the main process from then on; the sender exits without STOPPING=1.
    let incoming = dir.join("in.sock");
    let receiver = Molt::spawn_incoming(
        &molt_tests::molt_bin(),
        &incoming,
        &[],
        &[("NOTIFY_SOCKET", &notify.name)],
    );
    let body = format!(r#"{{"socket": "{}"}}"#, incoming.display());
    let r = api::put(&socket, "vm.cpr-transfer", &body);
    assert_eq!(r.status, 200, "{r:?}");
    let moved = notify.until(&format!("MAINPID={}", receiver.pid()));
    assert!(!moved.iter().any(|m| m.contains("STOPPING")), "{moved:?}");
    first.finish(WAIT).assert_code(0);
    let quiet = notify.drain(Duration::from_millis(300));
    assert!(!quiet.iter().any(|m| m.contains("STOPPING")), "{quiet:?}");

    // Shutdown of the receiver: STOPPING=1.
    assert_eq!(api::put(&socket, "vm.shutdown", "").status, 204);
    notify.until("STOPPING=1");
    receiver.finish(WAIT).assert_code(0);
}

/// Kills the process that took over (not our child) if the test fails half-way.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) takes no pointers; the process may be gone already.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

#[test]
fn a_guardian_takeover_reports_the_new_main_pid() {
    let notify = Listener::new("takeover");
    let dir = TempDir::new("notify-takeover");
    let (molt, socket) = start(&dir, &notify, &[]);
    notify.until("READY=1");
    api::wait_ready(&socket, WAIT);
    // The new image dies at once: the guardian takes the VM over in a new process.
    let r = api::put(&socket, "vm.cpr-exec", r#"{"binary": "/bin/false"}"#);
    assert_eq!(r.status, 500, "{r:?}");
    let info = api::get(&socket, "vm.info");
    let new_pid = info.body["pid"].as_u64().unwrap();
    assert_ne!(new_pid, molt.pid() as u64);
    let _cleanup = KillOnDrop(new_pid as i32);
    let msgs = notify.until(&format!("MAINPID={new_pid}"));
    assert!(!msgs.iter().any(|m| m.contains("STOPPING")), "{msgs:?}");
    assert_eq!(api::put(&socket, "vm.shutdown", "").status, 204);
    notify.until("STOPPING=1");
    // The original process became /bin/false and is gone.
    let _ = molt.finish(WAIT);
}
