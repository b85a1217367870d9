//! What the tests read or set up on the host: a process's fds and anonymous memory from
//! /proc, and a tiny tmpfs in a mount namespace of the calling thread (nothing outside it
//! changes).

use std::path::Path;

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
