//! What the tests read or set up on the host: a process's fds, anonymous memory and its
//! threads' scheduling policies from /proc, and a tiny tmpfs in a mount namespace of the
//! calling thread (nothing outside it changes).

use std::path::Path;

/// `SCHED_IDLE`, as `/proc/PID/stat` reports a thread's policy.
pub const SCHED_IDLE: u32 = 5;

/// The name and scheduling policy (field 41) of the `/proc` stat file at `stat`.
fn name_and_policy(stat: &Path) -> Option<(String, u32)> {
    let stat = std::fs::read_to_string(stat).ok()?;
    // Fields from the third on follow the command name's closing parenthesis.
    let (pid_name, rest) = stat.rsplit_once(')')?;
    let policy = rest.split_whitespace().nth(41 - 3)?.parse().ok()?;
    let name = pid_name.split_once('(').map_or(pid_name, |(_, n)| n);
    Some((name.to_string(), policy))
}

/// The scheduling policy of process `pid` (of its main thread).
pub fn scheduling_policy(pid: u64) -> Option<u32> {
    name_and_policy(Path::new(&format!("/proc/{pid}/stat"))).map(|(_, p)| p)
}

/// The names of the threads of process `pid` that run at `SCHED_IDLE`.
pub fn idle_threads(pid: u64) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("the threads of process {pid}: {e}"))
        .filter_map(|t| name_and_policy(&t.ok()?.path().join("stat")))
        .filter(|(_, policy)| *policy == SCHED_IDLE)
        .map(|(name, _)| name)
        .collect()
}

/// The fds of `pid` by what they point to. Numbers, and the inode numbers of sockets and
/// anonymous inodes, legitimately differ from one process (or update) to the next: only their
/// kind is kept.
pub fn fd_kinds(pid: u64) -> Vec<String> {
    let mut kinds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|p| p.display().to_string())
                .map(|s| match s.split_once(":[") {
                    Some((kind, _)) => kind.to_string(),
                    None => s,
                })
                .collect()
        })
        .unwrap_or_default();
    kinds.sort();
    kinds
}

/// The kernel's CPU wake-up latency request device, which molt holds open around updates.
pub const CPU_LATENCY: &str = "/dev/cpu_dma_latency";

/// Whether `pid` holds a CPU wake-up latency request (has [`CPU_LATENCY`] open).
pub fn holds_cpu_latency_request(pid: u64) -> bool {
    fd_kinds(pid).iter().any(|k| k == CPU_LATENCY)
}

/// `RssAnon` of `pid`, in KiB (0 if it cannot be read).
pub fn rss_anon_kib(pid: u64) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Puts the calling thread in a new mount namespace (mounts private) and mounts a 1 MiB
/// tmpfs at `dir` there; processes the thread starts see it, the host does not. An error
/// says why it is impossible (the caller skips).
pub fn tiny_tmpfs(dir: &Path) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    use nix::sched::{unshare, CloneFlags};
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare(CLONE_NEWNS): {e}"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("making mounts private: {e}"))?;
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("size=1m"),
    )
    .map_err(|e| format!("mounting a tmpfs: {e}"))
}
