//! Shared helpers of molt's integration tests.
//!
//! The tests run the real `molt` binary ([`molt_bin`]) as a child process ([`Molt`]), read its
//! serial console (stdout by default) and log (stderr) line by line with a deadline, and check
//! the `molt-guest:` lines the embedded test guest prints ([`GuestLine`]). A child is killed and
//! reaped whatever happens: on a timeout, on a failed assertion (the [`Molt`] is dropped while
//! the test panics) and at the end of the test.
//!
//! [`cpio`] writes the newc archives the Linux boot test uses as initramfs and [`linux_init`]
//! builds its `/init`; [`kernel`] fetches Debian's stock kernel and [`linux_log`] reads its
//! boot log.

pub mod api;
pub mod cpio;
pub mod file_vm;
pub mod host;
pub mod hugepages;
pub mod kernel;
pub mod linux_init;
pub mod linux_log;
pub mod native;
pub mod netns;
pub mod vu_backend;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

/// How long a test waits for a VM that should end by itself. A boot of the embedded guest takes
/// 1–3 s here (its code runs in KVM's instruction emulator); the margin covers a loaded machine
/// running several tests at once.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(90);

/// Prefix of every line the embedded test guest prints.
pub const GUEST_PREFIX: &str = "molt-guest: ";

/// Whether every test must really run (`MOLT_REQUIRE_ALL=1`, as CI sets it): a test that
/// cannot run on this host then fails instead of skipping.
pub fn require_all() -> bool {
    std::env::var("MOLT_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Reports that a test (or part of one) cannot run here and why. Under `MOLT_REQUIRE_ALL=1`
/// this is a failure: the CI machine is expected to run everything.
///
/// # Panics
/// When [`require_all`] is true.
pub fn skip(what: &str, why: &str) {
    assert!(
        !require_all(),
        "{what} cannot run here and MOLT_REQUIRE_ALL=1 requires it: {why}"
    );
    eprintln!("SKIPPED: {what}: {why}");
}

/// Path of the `molt` binary under test.
///
/// `MOLT_BIN` when set; otherwise `molt` in the Cargo target directory of the running test
/// executable (`target/<profile>/deps/<test>` → `target/<profile>/molt`). `cargo test
/// --workspace` builds that binary because the `molt-vmm` package has integration tests; with
/// `cargo test -p molt-tests` alone it must be built first (`cargo build -p molt-vmm`).
///
/// # Panics
/// When the binary does not exist, with a message that says how to build it.
pub fn molt_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MOLT_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "MOLT_BIN={} does not name an existing file",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("cannot find the test executable's path");
    let deps = exe
        .parent()
        .expect("test executable has no parent directory");
    let profile_dir = if deps.file_name() == Some(OsStr::new("deps")) {
        deps.parent().unwrap_or(deps)
    } else {
        deps
    };
    let bin = profile_dir.join("molt");
    assert!(
        bin.is_file(),
        "the molt binary is missing: expected {}. Run the tests with `cargo test --workspace` \
         (which builds it), build it with `cargo build -p molt-vmm` (add --release for release \
         tests), or set MOLT_BIN to its path",
        bin.display()
    );
    bin
}

/// Which output stream of the child a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Standard output (the serial console with `--serial stdio`).
    Stdout,
    /// Standard error (molt's log and error messages).
    Stderr,
}

/// One line of the child's output, without its line ending, and when it was read.
#[derive(Clone, Debug)]
pub struct Line {
    /// When the reader thread got the line.
    pub at: Instant,
    /// Which stream.
    pub stream: Stream,
    /// The text (a trailing `\r` is removed as well as the `\n`).
    pub text: String,
    /// Whether it ended with a newline: only the last line of a stream may not (a guest
    /// stopped in the middle of printing one).
    pub complete: bool,
}

fn spawn_reader<R: Read + Send + 'static>(src: R, stream: Stream, tx: Sender<Line>) {
    thread::spawn(move || {
        let mut reader = BufReader::new(src);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let at = Instant::now();
                    let complete = buf.last() == Some(&b'\n');
                    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                        buf.pop();
                    }
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    let line = Line {
                        at,
                        stream,
                        text,
                        complete,
                    };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

/// Starts a thread that notes when process `pid` (a child of ours) exits, without reaping it:
/// `waitid(WEXITED | WNOWAIT)` returns as soon as the child is a zombie, so the instant is
/// exact even though [`Molt::finish`] polls.
fn spawn_exit_watcher(pid: u32) -> Receiver<Instant> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let id: libc::id_t = pid;
        loop {
            // SAFETY: an all-zero siginfo_t is a valid value of the plain C struct, which
            // waitid only writes to; the pointer is valid for the duration of the call.
            let rc = unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                libc::waitid(libc::P_PID, id, &mut info, libc::WEXITED | libc::WNOWAIT)
            };
            if rc == 0 {
                let _ = tx.send(Instant::now());
                return;
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                // ECHILD: already reaped; the poll in `finish` covers that.
                return;
            }
        }
    });
    rx
}

/// A running `molt` process whose output is collected line by line.
///
/// Dropping it kills the process (SIGKILL) if it still runs and reaps it.
pub struct Molt {
    child: Child,
    args: Vec<String>,
    started: Instant,
    exit_rx: Receiver<Instant>,
    rx: Receiver<Line>,
    lines: Vec<Line>,
    /// Both reader threads have reached end of file.
    eof: bool,
}

impl Molt {
    /// Starts the molt binary under test ([`molt_bin`]) with `args`, stdin from /dev/null.
    pub fn spawn<S: AsRef<str>>(args: &[S]) -> Molt {
        Molt::spawn_bin(&molt_bin(), args)
    }

    /// Starts the binary `bin` with `args`, stdin from /dev/null.
    pub fn spawn_bin<S: AsRef<str>>(bin: &Path, args: &[S]) -> Molt {
        Molt::spawn_env(bin, args, &[])
    }

    /// Starts the binary `bin` with `args` and extra environment variables `env`.
    pub fn spawn_env<S: AsRef<str>>(bin: &Path, args: &[S], env: &[(&str, &str)]) -> Molt {
        let args: Vec<String> = args.iter().map(|a| a.as_ref().to_string()).collect();
        let mut cmd = Command::new(bin);
        cmd.envs(env.iter().copied());
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A RUST_LOG or RUST_BACKTRACE of the developer's shell must not change what the
            // tests see.
            .env_remove("RUST_LOG")
            .env_remove("RUST_BACKTRACE");
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} {args:?}: {e}", bin.display()));
        let (tx, rx) = mpsc::channel();
        spawn_reader(
            child.stdout.take().expect("piped stdout"),
            Stream::Stdout,
            tx.clone(),
        );
        spawn_reader(
            child.stderr.take().expect("piped stderr"),
            Stream::Stderr,
            tx,
        );
        let exit_rx = spawn_exit_watcher(child.id());
        Molt {
            child,
            args,
            started,
            exit_rx,
            rx,
            lines: Vec::new(),
            eof: false,
        }
    }

    /// Starts `bin --incoming socket [extra…]` (a cpr-transfer receiver) with `env` and waits
    /// until it listens on `socket`.
    pub fn spawn_incoming(bin: &Path, socket: &Path, extra: &[&str], env: &[(&str, &str)]) -> Molt {
        let mut args = vec!["--incoming".to_string(), socket.display().to_string()];
        args.extend(extra.iter().map(|a| a.to_string()));
        let molt = Molt::spawn_env(bin, &args, env);
        let deadline = Instant::now() + Duration::from_secs(90);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the receiver never listened");
            std::thread::sleep(Duration::from_millis(5));
        }
        molt
    }

    /// Process id of the child.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When the child was spawned (taken just before the spawn).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The lines read so far, both streams in arrival order.
    pub fn lines(&self) -> &[Line] {
        &self.lines
    }

    /// Takes lines from the readers until `deadline`; returns the index of the first new line
    /// that matches `pred`, if one arrives in time. Returns `None` at the deadline or when both
    /// streams ended.
    fn pump_until(
        &mut self,
        deadline: Instant,
        mut pred: impl FnMut(&Line) -> bool,
    ) -> Option<usize> {
        while !self.eof {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    let hit = pred(&line);
                    self.lines.push(line);
                    if hit {
                        return Some(self.lines.len() - 1);
                    }
                }
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => self.eof = true,
            }
        }
        None
    }

    /// Collects whatever the child prints during `d` (expecting nothing in particular).
    pub fn collect_for(&mut self, d: Duration) {
        self.pump_until(Instant::now() + d, |_| false);
    }

    /// Waits up to `timeout` for a new line of `stream` that satisfies `pred`, and returns it.
    ///
    /// # Panics
    /// When none arrives in time or the output ends first (the child is killed and reaped
    /// on the way out; the message includes everything it printed).
    pub fn wait_line(
        &mut self,
        stream: Stream,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Line {
        let deadline = Instant::now() + timeout;
        match self.pump_until(deadline, |l| l.stream == stream && pred(&l.text)) {
            Some(i) => self.lines[i].clone(),
            None => {
                let why = if self.eof {
                    "output ended"
                } else {
                    "timed out"
                };
                self.kill();
                panic!(
                    "{why} after {:?} waiting for a {stream:?} line\n{}",
                    timeout,
                    describe(&self.args, None, &self.lines)
                );
            }
        }
    }

    /// Waits up to `timeout` for a stdout line containing `needle`.
    pub fn wait_stdout(&mut self, needle: &str, timeout: Duration) -> Line {
        self.wait_line(Stream::Stdout, timeout, |t| t.contains(needle))
    }

    /// Waits up to `timeout` for a stderr line containing `needle`.
    pub fn wait_stderr(&mut self, needle: &str, timeout: Duration) -> Line {
        self.wait_line(Stream::Stderr, timeout, |t| t.contains(needle))
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the child.
    pub fn signal(&self, signal: i32) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill() has no memory-safety preconditions; `pid` is our own child, which is
        // not reaped before `self` is consumed, so the pid cannot name another process.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
    }

    fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// Waits up to `timeout` for the child to exit and collects all its output.
    ///
    /// # Panics
    /// When it does not exit in time (it is killed and reaped first).
    pub fn finish(mut self, timeout: Duration) -> Output {
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => panic!("waiting for molt: {e}"),
            }
            if Instant::now() >= deadline {
                self.kill();
                // Give the readers a moment to deliver what was printed before the kill.
                self.pump_until(Instant::now() + Duration::from_secs(2), |_| false);
                panic!(
                    "molt did not exit within {timeout:?}; killed\n{}",
                    describe(&self.args, None, &self.lines)
                );
            }
            // Collect output while waiting so a chatty child never blocks on a full pipe.
            if self.eof {
                thread::sleep(Duration::from_millis(2));
            } else {
                self.pump_until(Instant::now() + Duration::from_millis(2), |_| false);
            }
        };
        let exited = self
            .exit_rx
            .recv_timeout(Duration::from_secs(1))
            .unwrap_or_else(|_| Instant::now());
        // The pipes close when the process is gone; a bounded wait guards against anything
        // that inherited them.
        self.pump_until(Instant::now() + Duration::from_secs(10), |_| false);
        Output {
            status,
            args: std::mem::take(&mut self.args),
            started: self.started,
            exited,
            lines: std::mem::take(&mut self.lines),
        }
    }
}

impl Drop for Molt {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Everything a finished molt run produced.
#[derive(Debug)]
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// The arguments it ran with.
    pub args: Vec<String>,
    /// When it was spawned.
    pub started: Instant,
    /// When it exited (became a zombie).
    pub exited: Instant,
    /// All output lines, both streams in arrival order.
    pub lines: Vec<Line>,
}

impl Output {
    /// The exit code, `None` if a signal killed the process.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Lines of one stream.
    pub fn stream(&self, stream: Stream) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|l| l.stream == stream)
            .map(|l| l.text.as_str())
            .collect()
    }

    /// Standard output lines.
    pub fn stdout(&self) -> Vec<&str> {
        self.stream(Stream::Stdout)
    }

    /// Standard error lines.
    pub fn stderr(&self) -> Vec<&str> {
        self.stream(Stream::Stderr)
    }

    /// The parsed `molt-guest:` lines of standard output, without an unfinished last one (a
    /// guest stopped in the middle of a line leaves it cut short).
    pub fn guest_lines(&self) -> Vec<GuestLine> {
        let complete = self
            .lines
            .iter()
            .filter(|l| l.stream == Stream::Stdout && l.complete)
            .map(|l| l.text.as_str());
        guest_lines(complete)
    }

    /// A multi-line description for assertion messages: command, status and all output.
    pub fn describe(&self) -> String {
        describe(&self.args, Some(self.status), &self.lines)
    }

    /// Asserts the process exited with `code` and did not panic.
    #[track_caller]
    pub fn assert_code(&self, code: i32) {
        self.assert_no_panic();
        assert_eq!(
            self.code(),
            Some(code),
            "unexpected exit status\n{}",
            self.describe()
        );
    }

    /// Asserts nothing on stderr says that molt panicked.
    #[track_caller]
    pub fn assert_no_panic(&self) {
        assert!(
            !self.stderr().iter().any(|l| l.contains("panicked")),
            "molt panicked\n{}",
            self.describe()
        );
    }

    /// Asserts molt failed the way a bad command line or an unusable resource should make it
    /// fail: a non-zero exit code (not a signal), no panic, and a first stderr line that starts
    /// with `molt: error: ` (`clap` errors for options: `error: `) and contains every one of
    /// `needles` (case-insensitive). Returns that line.
    #[track_caller]
    pub fn assert_error(&self, needles: &[&str]) -> String {
        self.assert_no_panic();
        let code = self.code();
        assert!(
            matches!(code, Some(c) if c != 0),
            "expected a non-zero exit code\n{}",
            self.describe()
        );
        let stderr = self.stderr();
        let first = stderr.first().copied().unwrap_or_default();
        assert!(
            first.starts_with("molt: error: ") || first.starts_with("error: "),
            "expected an error line on stderr\n{}",
            self.describe()
        );
        let lower = first.to_lowercase();
        for n in needles {
            assert!(
                lower.contains(&n.to_lowercase()),
                "error line lacks {n:?}\n{}",
                self.describe()
            );
        }
        first.to_string()
    }
}

fn describe(args: &[String], status: Option<ExitStatus>, lines: &[Line]) -> String {
    let mut s = format!("command: molt {}\n", args.join(" "));
    if let Some(st) = status {
        let _ = writeln!(s, "status: {st}");
    }
    for (stream, name) in [(Stream::Stdout, "stdout"), (Stream::Stderr, "stderr")] {
        let _ = writeln!(s, "--- {name} ---");
        let ls: Vec<&Line> = lines.iter().filter(|l| l.stream == stream).collect();
        // Keep assertion messages readable: the first and the last lines are what matter.
        let skip = ls.len().saturating_sub(200);
        for (i, l) in ls.iter().enumerate() {
            if i == 100 && skip > 0 {
                let _ = writeln!(s, "... ({skip} lines left out) ...");
            }
            if i < 100 || i >= 100 + skip {
                let _ = writeln!(s, "{}", l.text);
            }
        }
    }
    s
}

/// Runs molt with `args` until it exits (at most [`RUN_TIMEOUT`]).
pub fn run<S: AsRef<str>>(args: &[S]) -> Output {
    Molt::spawn(args).finish(RUN_TIMEOUT)
}

/// One `molt-guest:` line, split into its event kind, `key=value` fields and bare words.
///
/// `molt-guest: memtest pass=3 ok` → kind `memtest`, fields `{pass: 3}`, flags `[ok]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestLine {
    /// First word after the prefix: `boot`, `tick`, `memtest`, `cpu`, `exit`, `reset`, …
    pub kind: String,
    /// `key=value` words.
    pub fields: BTreeMap<String, String>,
    /// Words without `=`.
    pub flags: Vec<String>,
    /// The whole line.
    pub raw: String,
}

impl GuestLine {
    /// Parses a line; `None` unless it is a `molt-guest:` line (the prefix may follow other
    /// text, e.g. a partial line of output before it).
    pub fn parse(line: &str) -> Option<GuestLine> {
        let rest = &line[line.find(GUEST_PREFIX)? + GUEST_PREFIX.len()..];
        let mut words = rest.split_ascii_whitespace();
        let kind = words.next()?.to_string();
        let mut fields = BTreeMap::new();
        let mut flags = Vec::new();
        for w in words {
            match w.split_once('=') {
                Some((k, v)) => {
                    fields.insert(k.to_string(), v.to_string());
                }
                None => flags.push(w.to_string()),
            }
        }
        Some(GuestLine {
            kind,
            fields,
            flags,
            raw: line.to_string(),
        })
    }

    /// The value of field `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// The numeric value of field `key`.
    ///
    /// # Panics
    /// When the field is missing or not a decimal number.
    #[track_caller]
    pub fn num(&self, key: &str) -> u64 {
        self.get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no numeric field {key}= in {:?}", self.raw))
    }

    /// Whether the line has the bare word `flag`.
    pub fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

/// The `molt-guest:` lines among `lines`, parsed.
pub fn guest_lines<S: AsRef<str>>(lines: impl IntoIterator<Item = S>) -> Vec<GuestLine> {
    lines
        .into_iter()
        .filter_map(|l| GuestLine::parse(l.as_ref()))
        .collect()
}

/// The guest lines of kind `kind`.
pub fn of_kind<'a>(lines: &'a [GuestLine], kind: &str) -> Vec<&'a GuestLine> {
    lines.iter().filter(|l| l.kind == kind).collect()
}

/// The single `boot` line.
///
/// # Panics
/// Unless there is exactly one.
#[track_caller]
pub fn boot_line(lines: &[GuestLine]) -> GuestLine {
    let boots = of_kind(lines, "boot");
    assert_eq!(boots.len(), 1, "expected one boot line, got {boots:#?}");
    boots[0].clone()
}

/// Asserts there are at least `min` tick lines, numbered 1, 2, 3, … without gaps or repeats.
/// Returns the last tick number.
#[track_caller]
pub fn assert_ticks(lines: &[GuestLine], min: u64) -> u64 {
    let ticks: Vec<u64> = of_kind(lines, "tick").iter().map(|l| l.num("n")).collect();
    assert!(
        ticks.len() as u64 >= min,
        "expected at least {min} ticks, got {ticks:?}"
    );
    for (i, n) in ticks.iter().enumerate() {
        assert_eq!(
            *n,
            i as u64 + 1,
            "tick numbers must go up by one: {ticks:?}"
        );
    }
    for t in of_kind(lines, "tick") {
        t.num("gap_max_us");
    }
    ticks.len() as u64
}

/// Asserts the memory test completed at least `min` passes, numbered from 1, all `ok`.
#[track_caller]
pub fn assert_memtest(lines: &[GuestLine], min: u64) {
    let passes = of_kind(lines, "memtest");
    for (i, p) in passes.iter().enumerate() {
        assert!(p.has("ok") && !p.has("FAIL"), "memtest failed: {:?}", p.raw);
        assert_eq!(
            p.num("pass"),
            i as u64 + 1,
            "memtest pass numbers: {passes:#?}"
        );
    }
    assert!(
        passes.len() as u64 >= min,
        "expected at least {min} memtest passes, got {passes:#?}"
    );
}

/// Asserts `mem_mib` of a boot line is within 2 MiB below `mib` (the guest counts the usable
/// RAM of its e820 map, which leaves out the few reserved low pages).
#[track_caller]
pub fn assert_mem_mib(boot: &GuestLine, mib: u64) {
    let got = boot.num("mem_mib");
    assert!(
        got <= mib && got + 2 >= mib,
        "mem_mib={got}, expected about {mib}: {:?}",
        boot.raw
    );
}

/// A directory under the system temporary directory, removed with its contents on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `molt-test-<pid>-<n>-<tag>` (unique within and across test processes).
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("molt-test-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Whether KVM on this host is PVM (`/sys/module/kvm_pvm` exists), where only PVM-aware Linux
/// kernels boot.
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// A `/proc/meminfo` value (the number, in the unit the file uses).
pub fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.trim() != key {
            return None;
        }
        v.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_guest_lines() {
        let l = GuestLine::parse("molt-guest: memtest pass=3 FAIL addr=0x200000\r").unwrap();
        assert_eq!(l.kind, "memtest");
        assert_eq!(l.num("pass"), 3);
        assert_eq!(l.get("addr"), Some("0x200000"));
        assert!(l.has("FAIL") && !l.has("ok"));
        let b = GuestLine::parse("junk molt-guest: boot cpus=2 mem_mib=255").unwrap();
        assert_eq!((b.kind.as_str(), b.num("cpus")), ("boot", 2));
        assert!(GuestLine::parse("[INFO] VM ready").is_none());
        assert!(GuestLine::parse("molt-guest: ").is_none());
    }

    #[test]
    fn tick_and_memtest_checks() {
        let ok = guest_lines([
            "molt-guest: tick n=1 gap_max_us=5",
            "molt-guest: memtest pass=1 ok",
            "molt-guest: tick n=2 gap_max_us=5",
            "molt-guest: tick n=3 gap_max_us=5",
        ]);
        assert_eq!(assert_ticks(&ok, 3), 3);
        assert_memtest(&ok, 1);
        let gap = guest_lines([
            "molt-guest: tick n=1 gap_max_us=1",
            "molt-guest: tick n=3 gap_max_us=1",
        ]);
        assert!(std::panic::catch_unwind(|| assert_ticks(&gap, 1)).is_err());
        let fail = guest_lines(["molt-guest: memtest pass=1 FAIL addr=0x1000"]);
        assert!(std::panic::catch_unwind(|| assert_memtest(&fail, 1)).is_err());
    }

    #[test]
    fn temp_dirs_are_unique_and_removed() {
        let a = TempDir::new("x");
        let b = TempDir::new("x");
        assert_ne!(a.path(), b.path());
        let p = a.path().to_path_buf();
        std::fs::write(a.join("f"), b"1").unwrap();
        drop(a);
        assert!(!p.exists());
    }

    #[test]
    fn meminfo_has_totals() {
        assert!(meminfo("MemTotal").unwrap() > 0);
        assert!(meminfo("NoSuchKey").is_none());
    }
}
