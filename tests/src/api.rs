//! A minimal client of molt's API socket for the tests: one request per connection.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A response: status and JSON body (`Null` when there is none).
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Parsed body.
    pub body: serde_json::Value,
}

/// Sends `method path` with an optional JSON body and waits up to `timeout` for the reply.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> std::io::Result<Reply> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: molt\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse(&raw).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad HTTP response: {:?}", String::from_utf8_lossy(&raw)),
        )
    })
}

fn parse(raw: &[u8]) -> Option<Reply> {
    let text = std::str::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = if body.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(body).ok()?
    };
    Some(Reply { status, body })
}

/// `GET /api/v1/<endpoint>`.
pub fn get(socket: &Path, endpoint: &str) -> Reply {
    request(
        socket,
        "GET",
        &format!("/api/v1/{endpoint}"),
        None,
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("GET {endpoint}: {e}"))
}

/// `PUT /api/v1/<endpoint>` with `body`.
pub fn put(socket: &Path, endpoint: &str, body: &str) -> Reply {
    request(
        socket,
        "PUT",
        &format!("/api/v1/{endpoint}"),
        Some(body),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("PUT {endpoint}: {e}"))
}

/// Waits until molt answers on `socket`.
pub fn wait_ready(socket: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(r) = request(
            socket,
            "GET",
            "/api/v1/vmm.ping",
            None,
            Duration::from_secs(5),
        ) {
            if r.status == 200 {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "molt did not answer on {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How much of an update's `pause_ms` may lie outside its five phases: this many ms plus
/// [`PHASES_UNACCOUNTED_SHARE`] of `pause_ms`. The phases are consecutive stretches of the
/// pause; between them lies only bookkeeping (0.1–0.4 ms in all on an idle host), unless a
/// loaded host preempts molt right there: with two busy loops and two VMs on two cores,
/// 22 ms of an 842 ms pause were outside the phases. A step of the update left out of the
/// phases, or one timed twice, misses this.
pub const PHASES_UNACCOUNTED_MAX_MS: f64 = 5.0;
/// See [`PHASES_UNACCOUNTED_MAX_MS`].
pub const PHASES_UNACCOUNTED_SHARE: f64 = 0.1;
/// How much the phases may add up to more than `pause_ms`: none of the pause is in two
/// phases, but phases are timed partly on the monotonic and partly on the wall clock
/// (`pause_ms` is wall clock, across the exec), whose rates differ by NTP's slew at most.
pub const PHASES_OVER_MAX_MS: f64 = 1.0;

/// Asserts an update report (`vm.cpr-exec`'s answer) has a positive `pause_ms` and five
/// non-negative phases (`phases_ms`: pause, save, exec, restore, resume) that add up to it,
/// within [`PHASES_UNACCOUNTED_MAX_MS`] (and a share) below and [`PHASES_OVER_MAX_MS`] above;
/// and that the pause's wall-clock times (`paused_at_ns`, `resumed_at_ns`) lie in the past
/// hour and span `pause_ms` (or, in an update of several legs, at least that).
#[track_caller]
pub fn assert_phases_add_up(report: &serde_json::Value) {
    let b = report;
    let pause_ms = b["pause_ms"]
        .as_f64()
        .unwrap_or_else(|| panic!("no pause_ms: {b}"));
    assert!(pause_ms > 0.0, "{b}");
    let mut sum = 0.0;
    for phase in ["pause", "save", "exec", "restore", "resume"] {
        let ms = b["phases_ms"][phase]
            .as_f64()
            .unwrap_or_else(|| panic!("phase {phase} missing: {b}"));
        assert!(ms >= 0.0, "phase {phase} is negative: {b}");
        sum += ms;
    }
    let unaccounted_max = PHASES_UNACCOUNTED_MAX_MS + PHASES_UNACCOUNTED_SHARE * pause_ms;
    assert!(
        sum <= pause_ms + PHASES_OVER_MAX_MS && sum >= pause_ms - unaccounted_max,
        "the phases add up to {sum:.3} ms, pause_ms is {pause_ms:.3} ms (allowed: \
         {unaccounted_max:.3} ms less, {PHASES_OVER_MAX_MS} ms more): {b}"
    );
    assert_pause_placed(b, pause_ms);
}

#[track_caller]
fn assert_pause_placed(b: &serde_json::Value, pause_ms: f64) {
    let at = |k: &str| {
        b[k].as_u64()
            .unwrap_or_else(|| panic!("no {k} in the report: {b}"))
    };
    let (paused, resumed) = (at("paused_at_ns"), at("resumed_at_ns"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let hour = 3_600 * 1_000_000_000;
    assert!(
        now.saturating_sub(hour) < paused && paused <= resumed && resumed <= now,
        "the pause from {paused} to {resumed} ns is not within the last hour before {now}: {b}"
    );
    let span_ms = (resumed - paused) as f64 / 1e6;
    let legs = b["legs"].as_array().map_or(0, Vec::len);
    if legs > 1 {
        // The guest ran between the legs.
        assert!(
            span_ms >= pause_ms - 0.01,
            "{span_ms} ms from pause to resume: {b}"
        );
    } else {
        assert!(
            (span_ms - pause_ms).abs() < 0.01,
            "{span_ms} ms from pause to resume: {b}"
        );
    }
}
