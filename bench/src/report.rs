//! The markdown report: the machine line, the table of every configuration, the goals, and
//! the failures in detail.

use std::fmt::Write as _;

use crate::config::size_label;
use crate::goals::{self, Check};
use crate::results::{ConfigResult, Phases, Report};

/// A time in ms with two decimals, `—` when absent.
pub fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{v:.2}"))
}

/// The table header (two lines).
const HEADER: &str = "| mode | RAM | pages | RAM use | vCPUs | updates ok | pause p50 | pause p99 | \
pause max | stopped p50 | stopped p99 | phases p50: pause (kick) / save / exec / restore / resume | \
guest gap p50 | idle gap p50 | background p50 | failures |\n\
|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|\n";

/// One table row.
pub fn row(c: &ConfigResult) -> String {
    let cfg = &c.config;
    let use_ = if cfg.touched { "touched" } else { "idle" };
    let head = format!(
        "| {} | {} | {} | {use_} | {} |",
        cfg.mode.label(),
        size_label(cfg.mem_mib),
        cfg.pages.label(),
        cfg.vcpus
    );
    if c.skipped.is_some() {
        return format!("{head} — | — | — | — | — | — | — | — | — | — | skipped (see below) |");
    }
    let pause = c.pause();
    let stopped = c.stopped();
    let phases: Vec<String> = Phases::NAMES.iter().map(|n| ms(c.phase_p50(n))).collect();
    let failures = if c.failures.is_empty() {
        "0".to_string()
    } else {
        format!("**{}**", c.failures.len())
    };
    format!(
        "{head} {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {failures} |",
        c.samples.len(),
        c.attempted,
        ms(pause.map(|s| s.p50)),
        ms(pause.map(|s| s.p99)),
        ms(pause.map(|s| s.max)),
        ms(stopped.map(|s| s.p50)),
        ms(stopped.map(|s| s.p99)),
        phases.join(" / "),
        ms(c.guest_gap_p50()),
        ms(c.idle_gap_p50()),
        ms(c.background_p50()),
    )
}

/// The results table of `configs`.
pub fn table(configs: &[ConfigResult]) -> String {
    let mut s = HEADER.to_string();
    for c in configs {
        s.push_str(&row(c));
        s.push('\n');
    }
    s
}

/// The goals table.
pub fn goals_table(checks: &[Check]) -> String {
    let mut s =
        "| goal | series | measured | target | result |\n|---|---|---:|---:|---|\n".to_string();
    for c in checks {
        let (measured, target) = if c.ratio {
            (
                c.measured.map_or_else(|| "—".into(), |v| format!("{v:.2}")),
                format!("≤ {:.1}", c.target),
            )
        } else {
            (
                c.measured
                    .map_or_else(|| "—".into(), |v| format!("{v:.2} ms")),
                format!("≤ {} ms", c.target),
            )
        };
        let result = match c.pass() {
            Some(true) => "pass",
            Some(false) => "**FAIL**",
            None => "n/a (not measured)",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {measured} | {target} | {result} |",
            c.goal, c.series
        );
    }
    s
}

/// The whole markdown document.
pub fn markdown(r: &Report) -> String {
    let mut s = String::from("# molt live-update benchmark\n\n");
    let _ = writeln!(s, "Machine: {}.\n", r.machine.line());
    let _ = writeln!(
        s,
        "{} updates (`PUT /api/v1/vm.cpr-exec`, body `{{}}` for *exec* and \
         `{{\"stand_in\": true}}` for *stand-in*, whose figures add up both of its pauses; or \
         `PUT /api/v1/vm.cpr-transfer` to a `molt --incoming` started beside it) per \
         configuration, embedded test \
         guest (`{}`). *stopped* is `stopped_ms` (all vCPUs stopped → the last one back in \
         the guest), *pause* adds the kick (the `pause` phase). Times in ms; p50/p99 by nearest rank (with 20 updates the \
         p99 is the largest). *pause* is molt's `pause_ms` (vCPUs stopped → running again) and \
         the phases its `phases_ms`. *guest gap* is the largest `gap_max_us` of the guest's tick \
         lines up to the first tick printed after the response; *idle gap* is the same figure \
         for ticks without an update (the guest's own jitter, mostly its own tick line). *background* \
         is how long after the response molt still had children (the holder tearing down the \
         old address space and KVM VM) or, with RAM touched, a `prefault` thread or a growing \
         RSS; the next update waits for that and at least {} ms. RAM *touched* = \
         `prefault=on`.\n",
        r.runs, r.guest_cmdline, r.min_gap_ms
    );
    s.push_str(&table(&r.configs));
    s.push_str(&crate::report_peer::section(r));
    s.push_str("\n## Goals (issue 14, p50 stopped span)\n\n");
    s.push_str(&goals_table(&goals::evaluate_stopped(&r.configs, &r.peer)));
    s.push_str("\n## Goals (issue 6, cpr-exec 1-vCPU rows, p50 pause)\n\n");
    s.push_str(&goals_table(&goals::evaluate(&r.configs)));
    let skipped: Vec<&ConfigResult> = r.configs.iter().filter(|c| c.skipped.is_some()).collect();
    if !skipped.is_empty() {
        s.push_str("\n## Skipped\n\n");
        for c in skipped {
            let _ = writeln!(
                s,
                "- {}: {}",
                c.config.name(),
                c.skipped.as_deref().unwrap_or_default()
            );
        }
    }
    let _ = writeln!(s, "\n## Failures: {}\n", r.failures());
    for c in r.configs.iter().filter(|c| !c.failures.is_empty()) {
        for f in c.failures.iter().take(10) {
            let _ = writeln!(s, "- {}: {f}", c.config.name());
        }
        if c.failures.len() > 10 {
            let _ = writeln!(s, "- {}: … {} more", c.config.name(), c.failures.len() - 10);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Pages;
    use crate::results::fake::result;

    #[test]
    fn rows_and_goals() {
        let mut a = result(1024, Pages::Huge, false, &[4.0, 5.0, 3.0, 6.0]);
        a.failures.push("update 2: HTTP 500: {}".into());
        let mut skipped = result(8192, Pages::Huge, true, &[]);
        skipped.skipped = Some("no huge pages".into());
        let t = table(&[a.clone(), skipped.clone()]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("| mode | RAM | pages |"));
        assert_eq!(
            lines[2],
            "| exec | 1 GiB | 2M | idle | 1 | 4/4 | 4.00 | 6.00 | 6.00 | 3.90 | 5.90 | \
             0.10 / 0.20 / 1.50 / 2.10 / 0.10 | 5.00 | 4.00 | 50.00 | **1** |"
        );
        assert!(lines[3].contains("| exec | 8 GiB | 2M | touched | 1 | — |"));
        assert!(lines[3].ends_with("skipped (see below) |"));
        // Every row has as many cells as the header.
        let cells = |l: &str| l.matches('|').count();
        assert!(lines.iter().all(|l| cells(l) == cells(lines[0])));

        let small = result(256, Pages::Huge, false, &[3.0]);
        let big = result(4096, Pages::Huge, false, &[4.5]);
        let checks = goals::evaluate(&[small, a, big]);
        assert_eq!(checks[0].measured, Some(4.0));
        assert_eq!(checks[0].pass(), Some(true));
        assert_eq!(checks[1].measured, Some(1.5));
        assert_eq!(checks[1].pass(), Some(false));
        assert_eq!(checks[2].pass(), None);
        let g = goals_table(&checks);
        assert!(g.contains("| p50 at 1 GiB | 2M idle | 4.00 ms | ≤ 10 ms | pass |"));
        assert!(g.contains("| p50(4 GiB) / p50(256 MiB) | 2M idle | 1.50 | ≤ 1.2 | **FAIL** |"));
        assert!(g.contains("| p50 at 1 GiB | 4K touched | — | ≤ 20 ms | n/a (not measured) |"));
        assert_eq!(ms(None), "—");
        assert_eq!(ms(Some(1.234)), "1.23");
    }
}
