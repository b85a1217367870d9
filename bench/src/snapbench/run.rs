//! One configuration of the snapshot benchmark: boot, (touch RAM), snapshot, `dd` reference,
//! restore; or a live snapshot while the guest's memtest rewrites RAM.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::molt::{field, io, request, BenchError, HugePages, Molt, Result};

/// What one configuration is.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// Guest RAM, MiB.
    pub mib: u64,
    /// 2 MiB huge pages.
    pub huge: bool,
    /// The guest's memtest writes (most of) RAM before (`paused`) or during (`live`) it.
    pub touched: bool,
    /// `stop` or `live`.
    pub mode: &'static str,
}

/// What one configuration measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Sample {
    /// Guest RAM as molt reported it in the snapshot's answer, bytes (the row's label).
    pub ram_total: u64,
    /// RAM data written, bytes.
    pub ram_bytes: u64,
    /// The request, end to end, ms.
    pub total_ms: f64,
    /// The RAM phase, ms.
    pub ram_ms: f64,
    /// RAM written per second of the RAM phase, MB/s.
    pub ram_mb_s: f64,
    /// The same run's `dd bs=1M conv=fdatasync` to the same file system, MB/s.
    pub dd_mb_s: f64,
    /// The guest was stopped (VMM figure), ms.
    pub pause_ms: f64,
    /// Restore: from starting the process to the guest resumed (molt's figure), ms.
    pub restore_resume_ms: f64,
    /// Restore: from starting the process to its API answering (wall clock), ms.
    pub restore_ready_ms: f64,
    /// Restore: until all RAM is back, ms.
    pub restore_all_ms: f64,
    /// Live: write faults, and their latency p50/p99/max in µs.
    pub faults: u64,
    /// Median fault latency, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Worst, µs.
    pub max_us: f64,
    /// Live: the guest's own worst gap between loop iterations during the snapshot, µs.
    pub guest_gap_max_us: u64,
    /// The longest such stall over as many ticks before the snapshot: what the guest's own
    /// serial lines cost it (each byte a port write), with no snapshot running, µs.
    pub guest_gap_before_us: u64,
    /// The restored guest's memtest passed (or no restore was done).
    pub memtest_ok: bool,
}

fn guest_cmdline(c: &Config) -> String {
    if c.touched {
        // The memtest covers all RAM above the guest image and low memory.
        let mib = c.mib.saturating_sub(24);
        format!("console=ttyS0 molt.memtest={mib} molt.memtest_share=100")
    } else {
        "console=ttyS0 molt.memtest=0".into()
    }
}

/// `dd` of `mib` MiB to `dir`, MB/s as dd reports it.
pub fn dd(dir: &Path, mib: u64) -> Result<f64> {
    let file = dir.join("dd.img");
    let out = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", file.display()))
        .args(["bs=1M", &format!("count={mib}"), "conv=fdatasync"])
        .output()
        .map_err(io("running dd"))?;
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    // "... copied, 1.23 s, 456 MB/s"
    let rate = text
        .lines()
        .last()
        .and_then(|l| l.rsplit(", ").next())
        .and_then(|r| {
            let (v, unit) = r.split_once(' ')?;
            let v: f64 = v.parse().ok()?;
            Some(match unit.trim() {
                "GB/s" => v * 1e3,
                "kB/s" => v / 1e3,
                _ => v,
            })
        });
    rate.ok_or_else(|| BenchError::Molt(format!("cannot read dd's rate: {text}")))
}

/// Runs one configuration with `bin`, its files in `dir`.
pub fn run(bin: &Path, dir: &Path, c: &Config) -> Result<Sample> {
    let _pool = if c.huge {
        Some(HugePages::raise(c.mib / 2)?)
    } else {
        None
    };
    let mem = format!(
        "size={}M{}",
        c.mib,
        if c.huge { ",hugepages=on" } else { "" }
    );
    let args: Vec<String> = vec!["--memory".into(), mem, "--cmdline".into(), guest_cmdline(c)];
    let vm = Molt::start(bin, &args, dir, "vm")?;
    let long = Duration::from_secs(300);
    if c.touched {
        // Pass 1 has written every tested word; pass 2 rewrites them.
        vm.wait_serial(long, |l| l.contains("memtest pass=2 ok"))?;
    } else {
        vm.wait_serial(long, |l| l.contains("tick n=3 "))?;
    }
    let snap = dir.join("snap");
    let body = serde_json::json!({ "path": snap, "mode": c.mode }).to_string();
    let before = vm.serial_lines().len();
    let (status, r) = request(&vm.sock, "PUT", "vm.snapshot", Some(&body))?;
    if status != 200 {
        return Err(BenchError::Molt(format!("vm.snapshot: {status} {r}")));
    }
    let num = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    let mut s = Sample {
        ram_total: r["ram_total"].as_u64().unwrap_or(0),
        ram_bytes: r["ram_bytes"].as_u64().unwrap_or(0),
        total_ms: num(&r["phases_ms"]["total"]),
        ram_ms: num(&r["phases_ms"]["ram"]),
        pause_ms: num(&r["phases_ms"]["pause"]) + num(&r["phases_ms"]["capture"]),
        memtest_ok: true,
        ..Sample::default()
    };
    s.ram_mb_s = if s.ram_ms > 0.0 {
        s.ram_bytes as f64 / 1e3 / s.ram_ms
    } else {
        0.0
    };
    if c.mode == "live" {
        let l = &r["live"];
        s.pause_ms = num(&l["guest_stopped_ms"]);
        s.faults = l["write_faults"].as_u64().unwrap_or(0);
        s.p50_us = num(&l["fault_p50_us"]);
        s.p99_us = num(&l["fault_p99_us"]);
        s.max_us = num(&l["fault_max_us"]);
        // The tick after the answer covers the end of the write.
        let n = vm.serial_lines().len();
        let _ = vm.wait_serial(Duration::from_secs(5), |l| {
            l.contains(" tick ") && field(l, "n").is_some()
        });
        std::thread::sleep(Duration::from_millis(250));
        let lines = vm.serial_lines();
        let gaps = |lines: &[String]| -> Vec<u64> {
            lines
                .iter()
                .filter(|l| l.contains(" tick "))
                .filter_map(|l| field(l, "gap_max_us"))
                .collect()
        };
        let during = gaps(&lines[before.min(n)..]);
        let earlier = gaps(&lines[..before.min(n)]);
        s.guest_gap_max_us = during.iter().copied().max().unwrap_or(0);
        s.guest_gap_before_us = earlier
            .iter()
            .rev()
            .take(during.len().max(1))
            .copied()
            .max()
            .unwrap_or(0);
        vm.shutdown()?;
    } else {
        vm.wait_end()?;
    }
    // The reference: as many MiB as the snapshot wrote (at least 256).
    s.dd_mb_s = dd(dir, (s.ram_bytes >> 20).max(256))?;
    if c.mode != "live" {
        restore(bin, dir, &snap, c, &mut s)?;
    }
    remove_snapshot(&snap)?;
    Ok(s)
}

/// Restores `snap` (lazily) and measures until the guest runs and until all RAM is back.
fn restore(bin: &Path, dir: &Path, snap: &Path, c: &Config, s: &mut Sample) -> Result<()> {
    // The memory files are read from the disk, not the page cache.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1\n");
    let args = vec!["--restore".into(), format!("path={}", snap.display())];
    let vm = Molt::start(bin, &args, dir, "restored")?;
    s.restore_ready_ms = vm.ready_ms;
    let log = std::fs::read_to_string(&vm.log).unwrap_or_default();
    // "restored the VM of DIR in 12.3 ms"
    s.restore_resume_ms = log
        .lines()
        .find_map(|l| l.split("restored the VM of ").nth(1))
        .and_then(|l| l.rsplit(" in ").next())
        .and_then(|l| l.trim_end_matches(" ms").parse().ok())
        .unwrap_or(0.0);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (_, info) = request(&vm.sock, "GET", "vm.info", None)?;
        if info["restore"]["done"] == true {
            s.restore_all_ms = info["restore"]["done_ms"].as_f64().unwrap_or(0.0);
            break;
        }
        if Instant::now() > deadline {
            return Err(BenchError::Molt(
                "the restore did not load all of RAM".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if c.touched {
        // The restored guest's next memtest pass checks what the snapshot held.
        let line = vm.wait_serial(Duration::from_secs(120), |l| l.contains(" memtest pass="))?;
        s.memtest_ok = line.contains(" ok");
        if !s.memtest_ok {
            // Keep the guest's output: the next run starts a new serial file.
            let kept = vm.serial.with_extension("serial.failed");
            let _ = std::fs::copy(&vm.serial, &kept);
            eprintln!(
                "  restored guest: {line} (output kept in {})",
                kept.display()
            );
        }
    }
    vm.shutdown()
}

fn remove_snapshot(snap: &Path) -> Result<()> {
    if snap.exists() {
        std::fs::remove_dir_all(snap).map_err(io("removing the snapshot"))?;
    }
    Ok(())
}

/// The median of each figure of `samples` (the memtest passed only if it passed in all).
pub fn median(samples: &[Sample]) -> Sample {
    let values: Vec<serde_json::Value> = samples
        .iter()
        .filter_map(|s| serde_json::to_value(s).ok())
        .collect();
    let Some(serde_json::Value::Object(first)) = values.first() else {
        return Sample::default();
    };
    let mut out = serde_json::Map::new();
    for key in first.keys() {
        let mut nums: Vec<f64> = values.iter().filter_map(|v| v[key].as_f64()).collect();
        let v = if nums.is_empty() {
            serde_json::Value::Bool(values.iter().all(|v| v[key] == true))
        } else {
            nums.sort_by(f64::total_cmp);
            let m = nums[nums.len() / 2];
            if first[key].is_u64() {
                serde_json::json!(m as u64)
            } else {
                serde_json::json!(m)
            }
        };
        out.insert(key.clone(), v);
    }
    serde_json::from_value(serde_json::Value::Object(out)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_taken_per_figure() {
        let a = Sample {
            ram_total: 4 << 30,
            total_ms: 30.0,
            restore_resume_ms: 5.0,
            memtest_ok: true,
            ..Sample::default()
        };
        let b = Sample {
            total_ms: 10.0,
            restore_resume_ms: 50.0,
            memtest_ok: false,
            ..a.clone()
        };
        let c = Sample {
            total_ms: 20.0,
            restore_resume_ms: 7.0,
            ..a.clone()
        };
        let m = median(&[a, b, c]);
        assert_eq!((m.total_ms, m.restore_resume_ms), (20.0, 7.0));
        assert_eq!(m.ram_total, 4 << 30);
        assert!(!m.memtest_ok);
    }
}
