//! End to end: hand a record memfd and a socket to a freshly exec'd copy of
//! this test binary, the way molt hands them to its new self.
//!
//! The parent run registers the fds, seals the record, clears close-on-exec
//! and re-runs this binary filtered to this very test, with the record fd in
//! an environment variable; that child run adopts the fds and answers over
//! the socket.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use cpr::{FdRegistry, Inherited, PreservedFd};
use serde::{Deserialize, Serialize};

const RECORD_FD_VAR: &str = "MOLT_CPR_TEST_RECORD_FD";
const KIND: &str = "exec-handoff-test";

#[derive(Debug, Serialize, Deserialize)]
struct HandoffState {
    fds: Vec<PreservedFd>,
    /// Fds the child must not have inherited.
    not_preserved: Vec<RawFd>,
    greeting: String,
}

#[test]
fn exec_handoff() {
    match std::env::var(RECORD_FD_VAR) {
        Ok(fd) => child(fd.parse().expect("record fd number")),
        Err(_) => parent(),
    }
}

fn parent() {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let (decoy, _decoy2) = UnixStream::pair().expect("socketpair");
    let mut registry = FdRegistry::new();
    registry.register("control", &theirs).expect("register");
    let state = HandoffState {
        fds: registry.describe(),
        not_preserved: vec![decoy.as_raw_fd(), ours.as_raw_fd()],
        greeting: "hello from the new binary".into(),
    };
    let bytes = cpr::encode("molt test", KIND, &state).expect("encode");
    let record = cpr::write_sealed(&bytes).expect("memfd");
    registry.register("record", &record).expect("register");

    registry.preserve_all().expect("preserve");
    let exe = std::env::current_exe().expect("current exe");
    // The child's output is captured so that its test summary does not mix
    // with ours; it is shown if the child fails.
    let output = Command::new(exe)
        .args(["--exact", "exec_handoff", "--test-threads=1"])
        .env(RECORD_FD_VAR, record.as_raw_fd().to_string())
        .output();
    registry.restore_cloexec().expect("restore");
    assert_eq!(cpr::is_cloexec(theirs.as_raw_fd()).ok(), Some(true));
    let output = output.expect("spawn child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "child run failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut answer = vec![0; state.greeting.len()];
    (&ours).read_exact(&mut answer).expect("read answer");
    assert_eq!(answer, state.greeting.as_bytes());
}

fn child(record_fd: RawFd) {
    let handed = [PreservedFd {
        name: "record".into(),
        fd: record_fd,
    }];
    // SAFETY: the parent cleared close-on-exec on this fd for us and nothing
    // in this process has touched it.
    let mut boot = unsafe { Inherited::from_numbers(&handed) }.expect("record fd");
    let record_fd = boot.take("record").expect("take record");
    assert!(cpr::is_sealed(&record_fd).expect("seals"));
    let bytes = cpr::read_record(&record_fd).expect("read record");
    let record: cpr::Record<HandoffState> = cpr::decode_kind(&bytes, KIND).expect("decode");
    let state = record.state;

    // (The record's duplicate may have reused a number the parent had.)
    for fd in state
        .not_preserved
        .iter()
        .filter(|&&fd| fd != record_fd.as_raw_fd())
    {
        assert!(cpr::is_cloexec(*fd).is_err(), "fd {fd} leaked across exec");
    }
    // SAFETY: the listed fds were preserved by the parent for us and nothing
    // in this process owns them.
    let mut fds = unsafe { Inherited::from_numbers(&state.fds) }.expect("inherited");
    let control = fds.take("control").expect("take control");
    assert!(fds.unclaimed().is_empty());
    let open = cpr::open_fds().expect("list fds");
    assert!(open.contains(&control.as_raw_fd()) && open.contains(&record_fd.as_raw_fd()));
    assert_eq!(cpr::is_cloexec(control.as_raw_fd()).ok(), Some(true));
    // The originals stay open (a rollback would need them) until released.
    let original = state.fds[0].fd;
    assert_ne!(original, control.as_raw_fd());
    assert_eq!(cpr::is_cloexec(original).ok(), Some(false));
    fds.release_originals();
    boot.release_originals();
    assert!(cpr::is_cloexec(original).is_err(), "original not closed");

    let mut stream = UnixStream::from(control);
    stream.write_all(state.greeting.as_bytes()).expect("answer");
}
