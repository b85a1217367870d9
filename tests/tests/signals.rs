//! SIGTERM and SIGINT stop a running VM cleanly: exit code 0, every vCPU thread joined, the
//! serial socket file removed.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use molt_tests::{Molt, TempDir, RUN_TIMEOUT};

/// How long molt may take to stop after a signal: a kick reaches a vCPU in KVM's emulator only
/// between instruction batches (a few ms); a second is already generous.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn connect(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() >= deadline => {
                panic!("cannot connect to {}: {e}", path.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

#[test]
fn sigterm_stops_a_running_vm_cleanly() {
    let dir = TempDir::new("sigterm");
    let sock = dir.join("console.sock");
    // No molt.ticks: the guest runs until stopped.
    let molt = Molt::spawn(&[
        "--cpus",
        "2",
        "--serial",
        &format!("socket={}", sock.display()),
        "--cmdline",
        "molt.memtest=8",
    ]);
    let pid = molt.pid();
    let mut client = connect(&sock);
    // Wait until the guest runs: its first tick reaches the client.
    client.set_read_timeout(Some(RUN_TIMEOUT)).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("molt-guest: tick n=") {
        let n = client.read(&mut buf).expect("reading the serial socket");
        assert!(
            n > 0,
            "socket closed early: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    let threads = threads_of(pid);
    assert!(
        threads >= 3,
        "expected the main thread and two vCPU threads, /proc/{pid}/task has {threads}"
    );

    let signalled = Instant::now();
    molt.signal(libc::SIGTERM);
    let out = molt.finish(STOP_TIMEOUT);
    let took = out.exited - signalled;
    out.assert_code(0);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} is gone"
    );
    assert!(!sock.exists(), "socket file removed on exit");
    // The client sees the end of the connection once molt is gone.
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    loop {
        match client.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => panic!("expected end of file on the serial socket, got {e}"),
        }
    }
    eprintln!("SIGTERM → exit took {took:?}");
}

#[test]
fn sigint_stops_a_running_vm_with_code_0() {
    let mut molt = Molt::spawn(&["--cmdline", "molt.memtest=8"]);
    molt.wait_stdout("molt-guest: tick n=1 ", RUN_TIMEOUT);
    molt.signal(libc::SIGINT);
    let out = molt.finish(STOP_TIMEOUT);
    out.assert_code(0);
}
