//! Reads the guest's serial log (molt's `--serial file=PATH`) as it grows and keeps the
//! `molt-guest: tick n=<n> gap_max_us=<us>` lines, each with the file offset it starts at.
//!
//! A tick's `gap_max_us` is the longest stretch the guest went without running during the
//! ~100 ms before it: the first tick printed after a live update carries the pause the guest
//! observed.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Prefix of the embedded test guest's lines.
const GUEST_PREFIX: &str = "molt-guest: ";

/// One tick line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tick {
    /// The tick number (1, 2, 3, … without gaps or repeats in a healthy guest).
    pub n: u64,
    /// The longest gap in the guest's run during this tick, in µs.
    pub gap_max_us: u64,
    /// Offset in the log where the line starts.
    pub offset: u64,
}

/// Parses a tick line; `None` for any other line.
pub fn parse_tick(line: &str) -> Option<(u64, u64)> {
    let rest = &line[line.find(GUEST_PREFIX)? + GUEST_PREFIX.len()..];
    let mut words = rest.split_ascii_whitespace();
    if words.next()? != "tick" {
        return None;
    }
    let (mut n, mut gap) = (None, None);
    for w in words {
        match w.split_once('=') {
            Some(("n", v)) => n = v.parse().ok(),
            Some(("gap_max_us", v)) => gap = v.parse().ok(),
            _ => {}
        }
    }
    Some((n?, gap?))
}

/// The serial log, read incrementally.
pub struct GuestLog {
    path: PathBuf,
    /// Bytes consumed so far (complete lines only).
    offset: u64,
    /// Every tick line seen, in order.
    pub ticks: Vec<Tick>,
    /// Problems seen in the guest's output: tick numbers that do not go up by one, failed
    /// memory tests, unparsable tick lines.
    pub problems: Vec<String>,
}

impl GuestLog {
    /// A reader of `path` (which need not exist yet).
    pub fn new(path: &Path) -> GuestLog {
        GuestLog {
            path: path.to_path_buf(),
            offset: 0,
            ticks: Vec::new(),
            problems: Vec::new(),
        }
    }

    /// The log's current size in bytes (0 when it does not exist yet).
    pub fn size(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    /// Reads the complete lines added since the last call.
    pub fn poll(&mut self) -> Result<()> {
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(format!("cannot open {}", self.path.display()), e)),
        };
        let io = |e| Error::io(format!("cannot read {}", self.path.display()), e);
        f.seek(SeekFrom::Start(self.offset)).map_err(io)?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map_err(io)?;
        let mut start = 0;
        while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&buf[start..start + nl]);
            self.take_line(line.trim_end_matches('\r'), self.offset + start as u64);
            start += nl + 1;
        }
        self.offset += start as u64;
        Ok(())
    }

    fn take_line(&mut self, line: &str, offset: u64) {
        if !line.contains(GUEST_PREFIX) {
            return;
        }
        if line.contains(" FAIL") || line.contains("panic") {
            self.problems.push(format!("guest: {line}"));
        }
        let Some((n, gap_max_us)) = parse_tick(line) else {
            if line.contains("molt-guest: tick") {
                self.problems.push(format!("unparsable tick line {line:?}"));
            }
            return;
        };
        let expected = self.ticks.last().map_or(n, |t| t.n + 1);
        if n != expected {
            self.problems
                .push(format!("tick n={n} follows n={}", expected.wrapping_sub(1)));
        }
        self.ticks.push(Tick {
            n,
            gap_max_us,
            offset,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ticks() {
        assert_eq!(
            parse_tick("molt-guest: tick n=12 gap_max_us=4096\r"),
            Some((12, 4096))
        );
        assert_eq!(parse_tick("molt-guest: memtest pass=1 ok"), None);
        assert_eq!(parse_tick("molt-guest: tick n=x gap_max_us=1"), None);
    }

    #[test]
    fn reads_incrementally_and_flags_gaps() {
        let dir = std::env::temp_dir().join(format!("molt-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("log");
        std::fs::write(
            &p,
            "boot\nmolt-guest: tick n=1 gap_max_us=5\nmolt-guest: ti",
        )
        .unwrap();
        let mut log = GuestLog::new(&p);
        log.poll().unwrap();
        assert_eq!(log.ticks.len(), 1);
        assert_eq!(log.ticks[0].offset, 5);
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        std::io::Write::write_all(
            &mut f,
            b"ck n=2 gap_max_us=9\nmolt-guest: tick n=4 gap_max_us=1\n",
        )
        .unwrap();
        log.poll().unwrap();
        assert_eq!(
            log.ticks.iter().map(|t| t.n).collect::<Vec<_>>(),
            vec![1, 2, 4]
        );
        assert_eq!(log.problems, vec!["tick n=4 follows n=2".to_string()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
