//! `molt ctl snapshot` shows the snapshot's progress while it waits for the answer: it polls
//! `vm.info` over a second connection and draws a bar on stderr when stdout is a terminal, or
//! prints a plain line now and then when it is not (a log or a pipe). The JSON answer alone
//! goes to stdout either way.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often `vm.info` is polled.
const POLL: Duration = Duration::from_millis(200);
/// How often a plain line is printed.
const LINE_EVERY: Duration = Duration::from_secs(1);
const BAR_WIDTH: usize = 30;

/// The progress shown, on its own thread; stopped when dropped.
pub struct Shown {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Shown {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts showing the progress of the snapshot the molt at `socket` writes.
pub fn show(socket: &Path) -> Shown {
    let stop = Arc::new(AtomicBool::new(false));
    let bar = std::io::stdout().is_terminal();
    let (socket, flag) = (socket.to_path_buf(), stop.clone());
    let thread = std::thread::Builder::new()
        .name("progress".into())
        .spawn(move || poll(&socket, &flag, bar))
        .ok();
    Shown { stop, thread }
}

fn poll(socket: &Path, stop: &AtomicBool, bar: bool) {
    let mut last_line: Option<Instant> = None;
    let mut drawn = false;
    while !stop.load(Relaxed) {
        std::thread::sleep(POLL);
        if stop.load(Relaxed) {
            break;
        }
        let Ok(r) = super::ctl::send(socket, "GET", "/api/v1/vm.info", None, POLL * 5) else {
            continue;
        };
        let Some(s) = r.body.as_ref().and_then(|b| b.get("snapshot")) else {
            continue;
        };
        let text = describe(s, bar);
        let mut err = std::io::stderr().lock();
        if bar {
            let _ = write!(err, "\r\x1b[2K{text}");
            drawn = true;
        } else if last_line.is_none_or(|t| t.elapsed() >= LINE_EVERY) {
            let _ = writeln!(err, "{text}");
            last_line = Some(Instant::now());
        }
        let _ = err.flush();
    }
    if drawn {
        let _ = write!(std::io::stderr(), "\r\x1b[2K");
    }
}

/// One line about a `vm.info` `snapshot` object, with a bar for a terminal.
fn describe(s: &serde_json::Value, bar: bool) -> String {
    let n = |k: &str| s.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let (done, total) = (n("bytes_written"), n("bytes_total"));
    let frac = if total > 0 {
        (done as f64 / total as f64).min(1.0)
    } else {
        0.0
    };
    let mut line = String::from("snapshot ");
    if bar {
        let filled = (frac * BAR_WIDTH as f64) as usize;
        line.push_str(&format!(
            "[{}{}] ",
            "#".repeat(filled),
            ".".repeat(BAR_WIDTH - filled)
        ));
    }
    let percent = (frac * 100.0) as u32;
    let width = if bar { 3 } else { 0 };
    line.push_str(&format!(
        "{percent:>width$}% {}/{} MiB {} {:.1} s",
        done >> 20,
        total >> 20,
        s.get("phase").and_then(|p| p.as_str()).unwrap_or("?"),
        n("elapsed_ms") as f64 / 1e3,
    ));
    if s.get("mode").and_then(|m| m.as_str()) == Some("live") {
        let worst = s
            .get("worst_fault_us")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0);
        line.push_str(&format!(
            " write-faults={} worst={worst:.0}us",
            n("write_faults")
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_describe_the_snapshot() {
        let s = serde_json::json!({"bytes_written": 3 << 20, "bytes_total": 12 << 20,
            "phase": "ram", "elapsed_ms": 1500, "mode": "live", "write_faults": 7,
            "worst_fault_us": 120.4});
        let line = describe(&s, true);
        assert!(line.starts_with("snapshot [#######......"), "{line}");
        assert!(line.contains(" 25% 3/12 MiB ram 1.5 s"), "{line}");
        assert!(line.ends_with("write-faults=7 worst=120us"), "{line}");
        // Plain lines (not a terminal): no bar, and the seconds keep their decimal point.
        let plain = describe(&s, false);
        assert_eq!(
            plain,
            "snapshot 25% 3/12 MiB ram 1.5 s write-faults=7 worst=120us"
        );
    }
}
