//! What the benchmark reads about a running molt from `/proc`.

/// Direct children of process `pid`, over all its threads (`/proc/PID/task/*/children`:
/// a child belongs to the thread that forked it).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for tid in tasks(pid) {
        let path = format!("/proc/{pid}/task/{tid}/children");
        if let Ok(text) = std::fs::read_to_string(path) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|w| w.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// Thread ids of process `pid` (empty when it is gone).
pub fn tasks(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Whether process `pid` has a thread named `name` (its `comm`).
pub fn has_thread(pid: u32, name: &str) -> bool {
    tasks(pid).into_iter().any(|tid| {
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
            .is_ok_and(|c| c.trim_end() == name)
    })
}

/// Resident memory of process `pid` in KiB: `VmRSS` plus `HugetlbPages` (hugetlb mappings are
/// not counted in VmRSS). `None` when the process is gone.
pub fn resident_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut total = 0;
    for key in ["VmRSS", "HugetlbPages"] {
        total += status_value(&text, key).unwrap_or(0);
    }
    Some(total)
}

/// The number of a `Key:   N kB` line of a `/proc/.../status` or `/proc/meminfo` text.
pub fn status_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.trim() != key {
            return None;
        }
        v.split_whitespace().next()?.parse().ok()
    })
}

/// A `/proc/meminfo` value (in the unit the file uses, kB for sizes).
pub fn meminfo(key: &str) -> Option<u64> {
    status_value(&std::fs::read_to_string("/proc/meminfo").ok()?, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_process() {
        let me = std::process::id();
        assert!(resident_kib(me).is_some_and(|k| k > 0));
        assert!(tasks(me).contains(&me));
        assert_eq!(status_value("VmRSS:\t  1234 kB\nX: 1", "VmRSS"), Some(1234));
        assert!(meminfo("MemTotal").is_some());
    }
}
