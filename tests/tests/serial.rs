//! The serial console backends: `--serial file=PATH`, `socket=PATH` and `null`.

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use molt_tests::{
    assert_memtest, assert_ticks, boot_line, guest_lines, of_kind, run, Molt, TempDir, RUN_TIMEOUT,
};

#[test]
fn file_backend_gets_the_console_and_stdout_stays_quiet() {
    let dir = TempDir::new("serial-file");
    let path = dir.join("console.log");
    std::fs::write(&path, "line from before\n").unwrap();
    let out = run(&[
        "--serial",
        &format!("file={}", path.display()),
        "--cmdline",
        "molt.memtest=2 molt.ticks=5 molt.exit=5",
    ]);
    out.assert_code(5);
    assert!(
        out.stdout().is_empty(),
        "stdout must stay empty\n{}",
        out.describe()
    );
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.starts_with("line from before\n"),
        "the file is appended to: {text:?}"
    );
    let lines = guest_lines(text.lines());
    assert_eq!(boot_line(&lines).num("cpus"), 1, "{text}");
    assert_ticks(&lines, 3);
    assert_memtest(&lines, 1);
}

#[test]
fn null_backend_discards_the_console() {
    let out = run(&[
        "--serial",
        "null",
        "--cmdline",
        "molt.memtest=0 molt.ticks=3 molt.exit=9",
    ]);
    out.assert_code(9);
    assert!(out.stdout().is_empty(), "{}", out.describe());
}

/// Waits until something listens on the unix socket `path` and connects to it.
fn connect(path: &Path, molt: &Molt) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "nothing listens on {} after 30 s (molt pid {})",
            path.display(),
            molt.pid()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads `stream` until `done` is true of the complete lines read so far, or it ends (`None`
/// when the deadline passes first). Returns the lines and whether the stream ended.
fn read_lines(
    stream: &mut UnixStream,
    timeout: Duration,
    mut done: impl FnMut(&[String]) -> bool,
) -> (Vec<String>, bool) {
    let deadline = Instant::now() + timeout;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let complete: Vec<String> = text
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| l.trim_end().to_string())
            .collect();
        if done(&complete) {
            return (complete, false);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out reading the serial socket; got {text:?}"
        );
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return (complete, true),
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("reading the serial socket: {e}"),
        }
    }
}

#[test]
fn socket_backend_streams_the_console_to_a_client() {
    let dir = TempDir::new("serial-socket");
    let path = dir.join("console.sock");
    let molt = Molt::spawn(&[
        "--serial",
        &format!("socket={}", path.display()),
        "--cmdline",
        "molt.memtest=8 molt.ticks=30 molt.exit=3",
    ]);
    let mut client = connect(&path, &molt);
    // Output is dropped while no client is attached, so the first lines may be missed: what
    // arrives must still be consecutive ticks.
    let (lines, _) = read_lines(&mut client, Duration::from_secs(60), |ls| {
        of_kind(&guest_lines(ls), "tick").len() >= 3
    });
    let ticks: Vec<u64> = of_kind(&guest_lines(&lines), "tick")
        .iter()
        .map(|l| l.num("n"))
        .collect();
    assert!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "ticks over the socket must go up by one: {ticks:?}"
    );
    // The guest ends the VM after tick 30; the client then sees the rest and end of file.
    let (rest, ended) = read_lines(&mut client, RUN_TIMEOUT, |ls| {
        ls.iter().any(|l| l.contains("molt-guest: exit code=3"))
    });
    assert!(
        rest.iter().any(|l| l.contains("molt-guest: exit code=3")),
        "ended={ended}: {rest:?}"
    );
    let out = molt.finish(RUN_TIMEOUT);
    out.assert_code(3);
    assert!(out.stdout().is_empty(), "{}", out.describe());
    let (_, ended) = read_lines(&mut client, Duration::from_secs(10), |_| false);
    assert!(ended, "the client sees end of file when molt exits");
    assert!(!path.exists(), "molt removes its socket file on exit");
}
