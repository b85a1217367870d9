//! A molt under the snapshot benchmark: started with its serial output and log in files,
//! driven through its API socket, killed and reaped when dropped.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A failed step of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// An OS call failed.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    /// molt answered with something unexpected, or did not answer.
    #[error("{0}")]
    Molt(String),
}

/// The benchmark's result type.
pub type Result<T> = std::result::Result<T, BenchError>;

/// An I/O error with what was being done.
pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |e| BenchError::Io(what, e)
}

/// A running molt.
pub struct Molt {
    child: Child,
    /// Its API socket.
    pub sock: PathBuf,
    /// Where its serial output (the guest's lines) goes.
    pub serial: PathBuf,
    /// Where its log goes.
    pub log: PathBuf,
    /// From starting the process to its API answering, ms.
    pub ready_ms: f64,
}

impl Molt {
    /// Starts `bin args` with `--api-socket` and `--serial` files in `dir` (named `tag.*`)
    /// and waits until it answers.
    pub fn start(bin: &Path, args: &[String], dir: &Path, tag: &str) -> Result<Molt> {
        let sock = dir.join(format!("{tag}.sock"));
        let serial = dir.join(format!("{tag}.serial"));
        let log = dir.join(format!("{tag}.log"));
        // molt appends to a serial file: start from an empty one.
        for stale in [&sock, &serial] {
            let _ = std::fs::remove_file(stale);
        }
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .arg("--api-socket")
            .arg(&sock)
            .arg("--serial")
            .arg(format!("file={}", serial.display()))
            .arg("--log-level")
            .arg("info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).map_err(io("creating the log"))?)
            .process_group(0);
        // SAFETY: runs in the forked child before exec; prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let child = cmd
            .spawn()
            .map_err(io(format!("starting {}", bin.display())))?;
        let mut molt = Molt {
            child,
            sock,
            serial,
            log,
            ready_ms: 0.0,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while request(&molt.sock, "GET", "vmm.ping", None).is_err() {
            if let Ok(Some(status)) = molt.child.try_wait() {
                let log = std::fs::read_to_string(&molt.log).unwrap_or_default();
                return Err(BenchError::Molt(format!("molt exited ({status}): {log}")));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Molt("molt did not answer within 60 s".into()));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        molt.ready_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(molt)
    }

    /// The guest's complete lines so far.
    pub fn serial_lines(&self) -> Vec<String> {
        complete_lines(&std::fs::read_to_string(&self.serial).unwrap_or_default())
    }

    /// Waits until a guest line satisfies `f`.
    pub fn wait_serial(&self, timeout: Duration, f: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.serial_lines().into_iter().find(|l| f(l)) {
                return Ok(l);
            }
            if Instant::now() > deadline {
                return Err(BenchError::Molt(format!(
                    "the guest did not print the expected line within {timeout:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks it to shut down and waits for it to end.
    pub fn shutdown(mut self) -> Result<()> {
        let _ = request(&self.sock, "PUT", "vm.shutdown", None);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(BenchError::Molt(
            "molt did not end after vm.shutdown".into(),
        ))
    }

    /// Waits for it to end by itself (a `stop` snapshot).
    pub fn wait_end(mut self) -> Result<()> {
        self.child.wait().map_err(io("waiting for molt"))?;
        Ok(())
    }
}

impl Drop for Molt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request on a new connection: status and JSON body (`Null` when empty).
pub fn request(
    sock: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
) -> Result<(u16, serde_json::Value)> {
    let what = format!("{method} {endpoint}");
    let mut s = UnixStream::connect(sock).map_err(io(what.clone()))?;
    s.set_read_timeout(Some(Duration::from_secs(300)))
        .map_err(io(what.clone()))?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: molt\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(io(what.clone()))?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(io(what.clone()))?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| BenchError::Molt(format!("{what}: truncated response")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| BenchError::Molt(format!("{what}: no status")))?;
    let body = if body.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(body).map_err(|e| BenchError::Molt(format!("{what}: {e}")))?
    };
    Ok((status, body))
}

/// The lines of `text` that are complete. molt writes the guest's serial output to the file
/// byte by byte as the guest sends it, so the last line may still be arriving: a line read
/// as `memtest pass=3` may be `memtest pass=3 ok` a few port writes later.
pub fn complete_lines(text: &str) -> Vec<String> {
    let done = text.rfind('\n').map_or("", |end| &text[..end]);
    done.lines().map(str::to_string).collect()
}

/// A guest line's `key=<number>`.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// The host's huge page pool raised to hold `pages` more, put back when dropped.
pub struct HugePages(Option<u64>);

const NR: &str = "/proc/sys/vm/nr_hugepages";

impl HugePages {
    /// Raises the pool by `pages` (root only).
    pub fn raise(pages: u64) -> Result<HugePages> {
        let before: u64 = std::fs::read_to_string(NR)
            .map_err(io(NR))?
            .trim()
            .parse()
            .map_err(|_| BenchError::Molt(format!("{NR} is not a number")))?;
        let guard = HugePages(Some(before));
        std::fs::write(NR, format!("{}\n", before + pages)).map_err(io(NR))?;
        Ok(guard)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Some(n) = self.0 {
            let _ = std::fs::write(NR, format!("{n}\n"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_still_arriving_is_not_read() {
        let text = "molt-guest: memtest pass=2 ok mib_s=900\nmolt-guest: memtest pass=3";
        assert_eq!(
            complete_lines(text),
            vec!["molt-guest: memtest pass=2 ok mib_s=900"]
        );
        let text = format!("{text} ok mib_s=850\n");
        let lines = complete_lines(&text);
        assert_eq!(lines.len(), 2);
        assert!(lines[1].contains(" memtest pass=3 ok"));
        assert!(complete_lines("molt-guest: tick n=1 gap_max_us=12").is_empty());
        assert!(complete_lines("").is_empty());
    }
}
