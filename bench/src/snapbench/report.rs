//! The snapshot benchmark's table, with the goals of issues 13 and 10 marked pass/fail.

use crate::run::{Config, Sample};

type Row = (Config, Result<Sample, String>);

fn size(mib: u64) -> String {
    if mib >= 1024 && mib % 1024 == 0 {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

/// A row's RAM: what molt reported having (the RAM the VM really had), flagged when it is
/// not what the configuration asked for.
fn ram_label(c: &Config, s: &Sample) -> String {
    let had = s.ram_total >> 20;
    if had == 0 || had == c.mib {
        size(c.mib)
    } else {
        format!("{} (asked {})", size(had), size(c.mib))
    }
}

fn mark(ok: bool) -> &'static str {
    if ok {
        "pass"
    } else {
        "FAIL"
    }
}

/// The markdown tables and the number of failed goals and runs.
pub fn table(rows: &[Row]) -> (String, usize) {
    let mut failures = 0;
    let mut out = String::from(
        "### Snapshot (`stop`) and lazy restore\n\n\
         | RAM | pages | RAM state | written MiB | snapshot ms | RAM MB/s | dd MB/s | ratio | \
         restore: resumed ms (API ready, wall) | all RAM back ms | memtest after restore | goals |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let idle_total = |mib: u64, huge: bool| {
        rows.iter().find_map(|(c, s)| {
            let s = s.as_ref().ok()?;
            (c.mode == "stop" && c.mib == mib && c.huge == huge && !c.touched).then_some(s.total_ms)
        })
    };
    for (c, s) in rows.iter().filter(|(c, _)| c.mode == "stop") {
        let pages = if c.huge { "2M" } else { "4K" };
        let state = if c.touched { "touched" } else { "idle" };
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                failures += 1;
                out.push_str(&format!(
                    "| {} | {pages} | {state} | failed: {e} |||||||||\n",
                    size(c.mib)
                ));
                continue;
            }
        };
        let ratio = s.ram_mb_s / s.dd_mb_s.max(1e-9);
        let mut goals = Vec::new();
        if c.touched {
            goals.push(format!("RAM ≥ 0.8×dd {}", mark(ratio >= 0.8)));
        } else {
            // Idle RAM costs no I/O: what the guest image and its page tables occupy only.
            goals.push(format!(
                "sparse {}",
                mark(s.ram_bytes <= (16 << 20).max((c.mib << 20) / 50))
            ));
        }
        if c.mib == 1024 {
            goals.push(format!(
                "resume ≤ 20 ms {}",
                mark(s.restore_resume_ms <= 20.0)
            ));
        }
        if c.mib == 4096 && !c.touched {
            if let (Some(small), Some(big)) = (idle_total(256, c.huge), idle_total(4096, c.huge)) {
                goals.push(format!(
                    "4 GiB idle ≤ 1.5× 256 MiB idle ({:.1}×) {}",
                    big / small,
                    mark(big <= 1.5 * small)
                ));
            }
        }
        if !s.memtest_ok {
            goals.push("memtest FAIL".into());
        }
        failures += goals.iter().filter(|g| g.contains("FAIL")).count();
        out.push_str(&format!(
            "| {} | {pages} | {state} | {:.1} | {:.1} | {:.0} | {:.0} | {:.2} | {:.1} ({:.1}) | {:.1} | {} | {} |\n",
            ram_label(c, s),
            s.ram_bytes as f64 / (1 << 20) as f64,
            s.total_ms,
            s.ram_mb_s,
            s.dd_mb_s,
            ratio,
            s.restore_resume_ms,
            s.restore_ready_ms,
            s.restore_all_ms,
            if c.touched { mark(s.memtest_ok) } else { "-" },
            goals.join(", ")
        ));
    }
    out.push_str(
        "\n### Live snapshot while the guest's memtest rewrites RAM\n\n\
         | RAM | pages | written MiB | pause ms (VMM) | guest gap_max µs during (before) | total ms | \
         RAM MB/s | dd MB/s | ratio | write faults | fault p50 µs | p99 µs | max µs | goals |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for (c, s) in rows.iter().filter(|(c, _)| c.mode == "live") {
        let pages = if c.huge { "2M" } else { "4K" };
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                failures += 1;
                out.push_str(&format!(
                    "| {} | {pages} | failed: {e} |||||||||||\n",
                    size(c.mib)
                ));
                continue;
            }
        };
        let ratio = s.ram_mb_s / s.dd_mb_s.max(1e-9);
        let goals = [
            format!("pause ≤ 5 ms {}", mark(s.pause_ms <= 5.0)),
            format!("p99 ≤ 1 ms {}", mark(s.p99_us <= 1000.0)),
            format!("max ≤ 10 ms {}", mark(s.max_us <= 10_000.0)),
            format!("≥ 0.7×dd {}", mark(ratio >= 0.7)),
        ];
        failures += goals.iter().filter(|g| g.contains("FAIL")).count();
        out.push_str(&format!(
            "| {} | {pages} | {:.1} | {:.2} | {} ({}) | {:.0} | {:.0} | {:.0} | {:.2} | {} | {:.0} | {:.0} | {:.0} | {} |\n",
            ram_label(c, s),
            s.ram_bytes as f64 / (1 << 20) as f64,
            s.pause_ms,
            s.guest_gap_max_us,
            s.guest_gap_before_us,
            s.total_ms,
            s.ram_mb_s,
            s.dd_mb_s,
            ratio,
            s.faults,
            s.p50_us,
            s.p99_us,
            s.max_us,
            goals.join(", ")
        ));
    }
    (out, failures)
}

/// Every row as JSON.
pub fn json(rows: &[Row]) -> String {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|(c, s)| match s {
            Ok(s) => serde_json::json!({ "config": c, "sample": s }),
            Err(e) => serde_json::json!({ "config": c, "error": e }),
        })
        .collect();
    serde_json::to_string_pretty(&rows).unwrap_or_default()
}
