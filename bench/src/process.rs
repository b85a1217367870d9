//! A running molt under test, killed and reaped whatever happens, and the benchmark's
//! temporary directory.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::procfs;

/// A molt process. Dropping it kills it (SIGKILL), its direct children first (an update's
/// holder or guardian), and reaps it.
pub struct Molt {
    child: Child,
    stderr_path: PathBuf,
}

impl Molt {
    /// Starts `bin args`, stdin from /dev/null, stdout and stderr appended to `out_dir/molt.out`
    /// and `out_dir/molt.err`. molt runs in its own process group, so a Ctrl-C on the terminal
    /// reaches only the benchmark (which then stops molt itself), and gets SIGKILL if the
    /// benchmark dies without cleaning up.
    pub fn spawn(bin: &Path, args: &[String], out_dir: &Path) -> Result<Molt> {
        Self::spawn_named(bin, args, out_dir, "molt")
    }

    /// Like [`Molt::spawn`], its output in `<name>.out` and `<name>.err`.
    pub fn spawn_named(bin: &Path, args: &[String], out_dir: &Path, name: &str) -> Result<Molt> {
        let open = |file: String| {
            let p = out_dir.join(file);
            File::create(&p).map_err(|e| Error::io(format!("cannot create {}", p.display()), e))
        };
        let stderr_path = out_dir.join(format!("{name}.err"));
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(open(format!("{name}.out"))?)
            .stderr(open(format!("{name}.err"))?)
            .env_remove("RUST_LOG")
            .env_remove("RUST_BACKTRACE")
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl,
        // which is async-signal-safe; it touches no memory shared with the parent's threads.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("cannot start {}", bin.display()), e))?;
        Ok(Molt { child, stderr_path })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Err(MoltDied)` when the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Error::MoltDied {
                status: status.to_string(),
                stderr: self.stderr_tail(),
            }),
            Err(e) => Err(Error::io("cannot check the molt process", e)),
        }
    }

    /// Waits up to `timeout` for the process to exit; returns its exit code (`None`: killed
    /// by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status.code()),
                Ok(None) if Instant::now() >= deadline => {
                    return Err(Error::Timeout {
                        what: "molt to exit after vm.shutdown".into(),
                        secs: timeout.as_secs(),
                    })
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(Error::io("cannot wait for molt", e)),
            }
        }
    }

    /// Up to the last 10 lines of molt's standard error, joined with ` | `.
    pub fn stderr_tail(&self) -> String {
        let lines = self.stderr_lines();
        let skip = lines.len().saturating_sub(10);
        let tail = lines[skip..].join(" | ");
        if tail.is_empty() {
            "(empty)".into()
        } else {
            tail
        }
    }

    /// All lines molt wrote to standard error so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.stderr_path)
            .map(|t| t.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }
}

impl Drop for Molt {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            for pid in procfs::children(self.child.id()) {
                if let Ok(pid) = libc::pid_t::try_from(pid) {
                    // SAFETY: kill() has no memory-safety preconditions. The pid was read just
                    // now from our still-running child's list of children, which molt reaps
                    // itself; at worst the signal misses an already-exited process.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A directory under the system temporary directory, removed with its contents on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `molt-bench-<pid>`.
    pub fn new() -> Result<TempDir> {
        let path = std::env::temp_dir().join(format!("molt-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .map_err(|e| Error::io(format!("cannot create {}", path.display()), e))?;
        Ok(TempDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
