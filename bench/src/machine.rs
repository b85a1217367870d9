//! The line on the machine at the top of the report.

use std::path::Path;
use std::process::Command;

use crate::procfs::meminfo;
use crate::results::Machine;

/// Describes this host and the molt binary `molt`.
pub fn describe(molt: &Path) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let ram_gib = meminfo("MemTotal").unwrap_or(0) as f64 / (1024.0 * 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let molt_version = Command::new(molt)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "molt (version unknown)".into());
    let load_at_start = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN);
    Machine {
        cpu,
        cores,
        ram_gib,
        kernel,
        pvm: Path::new("/sys/module/kvm_pvm").exists(),
        molt_version,
        load_at_start,
    }
}

impl Machine {
    /// One line: CPU, cores, RAM, kernel, KVM flavour, molt version, load.
    pub fn line(&self) -> String {
        format!(
            "{}, {} cores, {:.1} GiB RAM, Linux {}, KVM {}, {}, load {:.2} at start",
            self.cpu,
            self.cores,
            self.ram_gib,
            self.kernel,
            if self.pvm {
                "PVM (kvm_pvm)"
            } else {
                "(not PVM)"
            },
            self.molt_version,
            self.load_at_start
        )
    }
}
