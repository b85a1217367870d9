//! The goals of issue 6, checked against the 1-vCPU rows:
//! - 2M pages: p50 ≤ 10 ms at 1 GiB; pause(4 GiB) / pause(256 MiB) ≤ 1.2;
//! - 4K pages, RAM touched: p50 ≤ 20 ms at 1 GiB; pause(4 GiB) / pause(256 MiB) ≤ 1.5.
//!
//! "pause" is the p50 of `pause_ms`. The 2M goals are checked for RAM idle and touched alike.
//!
//! And those of issue 14, on the p50 of `stopped_ms` (all vCPUs stopped → running again):
//! - cpr-transfer at 1 GiB, 2M and 4K: ≤ 0.5 ms; stopped(4 GiB) / stopped(256 MiB) ≤ 1.1;
//! - cpr-transfer / QEMU's STOP→RESUME at 1 GiB, same run: ≤ 0.5;
//! - cpr-transfer with 2 vCPUs at 1 GiB: ≤ 0.8 ms;
//! - cpr-exec at 1 GiB, 2M: ≤ 2.0 ms.

use crate::config::{Mode, Pages, Series};
use crate::qemu::PeerResult;
use crate::results::ConfigResult;

/// One goal, checked for one series.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    /// What is measured, e.g. `p50 at 1 GiB`.
    pub goal: String,
    /// The series, e.g. `2M idle`.
    pub series: String,
    /// The measured value (ms, or a ratio), `None` without data.
    pub measured: Option<f64>,
    /// Whether the value is a ratio (else ms).
    pub ratio: bool,
    /// The upper bound.
    pub target: f64,
}

impl Check {
    /// `Some(true)` when met, `Some(false)` when missed, `None` without data.
    pub fn pass(&self) -> Option<bool> {
        self.measured.map(|m| m <= self.target)
    }
}

fn find(
    configs: &[ConfigResult],
    mode: Mode,
    vcpus: u8,
    series: Series,
    mem_mib: u64,
) -> Option<&ConfigResult> {
    configs.iter().find(|c| {
        let k = &c.config;
        k.mode == mode && k.vcpus == vcpus && k.series() == series && k.mem_mib == mem_mib
    })
}

/// p50 pause of the 1-vCPU cpr-exec configuration of `series` at `mem_mib`.
pub fn p50_at(configs: &[ConfigResult], series: Series, mem_mib: u64) -> Option<f64> {
    find(configs, Mode::Exec, 1, series, mem_mib)
        .and_then(|c| c.pause())
        .map(|s| s.p50)
}

/// p50 stopped span of the `mode` configuration with `vcpus` of `series` at `mem_mib`.
pub fn stopped_at(
    configs: &[ConfigResult],
    mode: Mode,
    vcpus: u8,
    series: Series,
    mem_mib: u64,
) -> Option<f64> {
    find(configs, mode, vcpus, series, mem_mib)
        .and_then(|c| c.stopped())
        .map(|s| s.p50)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// Checks the goals of issue 14 (stopped span, transfer and exec, and the peer).
pub fn evaluate_stopped(configs: &[ConfigResult], peer: &[PeerResult]) -> Vec<Check> {
    let idle = |pages| Series {
        pages,
        touched: false,
    };
    let xfer = |vcpus, series, mem| stopped_at(configs, Mode::Transfer, vcpus, series, mem);
    let check = |goal: &str, series: Series, measured, ratio, target| Check {
        goal: goal.into(),
        series: series.label(),
        measured,
        ratio,
        target,
    };
    let mut out = Vec::new();
    for pages in [Pages::Huge, Pages::Small] {
        let s = idle(pages);
        out.push(check(
            "transfer stopped p50 at 1 GiB",
            s,
            xfer(1, s, 1024),
            false,
            0.5,
        ));
        out.push(check(
            "transfer stopped(4 GiB) / stopped(256 MiB)",
            s,
            ratio(xfer(1, s, 4096), xfer(1, s, 256)),
            true,
            1.1,
        ));
    }
    let qemu_1g = peer
        .iter()
        .find(|p| p.vcpus == 1 && p.mem_mib == 1024)
        .and_then(|p| p.pause())
        .map(|s| s.p50);
    let s = idle(Pages::Small);
    out.push(check(
        "transfer stopped / QEMU STOP→RESUME at 1 GiB",
        s,
        ratio(xfer(1, s, 1024), qemu_1g),
        true,
        0.5,
    ));
    out.push(check(
        "transfer stopped p50, 2 vCPUs, 1 GiB",
        s,
        xfer(2, s, 1024),
        false,
        0.8,
    ));
    let h = idle(Pages::Huge);
    out.push(check(
        "exec stopped p50 at 1 GiB",
        h,
        stopped_at(configs, Mode::Exec, 1, h, 1024),
        false,
        2.0,
    ));
    out.push(check(
        "exec through a stand-in stopped p50 at 1 GiB (both pauses)",
        h,
        stopped_at(configs, Mode::StandIn, 1, h, 1024),
        false,
        2.0,
    ));
    out
}

/// Checks every goal of issue 6.
pub fn evaluate(configs: &[ConfigResult]) -> Vec<Check> {
    let small_touched = Series {
        pages: Pages::Small,
        touched: true,
    };
    let huge = |touched| Series {
        pages: Pages::Huge,
        touched,
    };
    let mut out = Vec::new();
    for (series, p50_max, ratio_max) in [
        (huge(false), 10.0, 1.2),
        (huge(true), 10.0, 1.2),
        (small_touched, 20.0, 1.5),
    ] {
        out.push(Check {
            goal: "p50 at 1 GiB".into(),
            series: series.label(),
            measured: p50_at(configs, series, 1024),
            ratio: false,
            target: p50_max,
        });
        let ratio = match (p50_at(configs, series, 4096), p50_at(configs, series, 256)) {
            (Some(big), Some(small)) if small > 0.0 => Some(big / small),
            _ => None,
        };
        out.push(Check {
            goal: "p50(4 GiB) / p50(256 MiB)".into(),
            series: series.label(),
            measured: ratio,
            ratio: true,
            target: ratio_max,
        });
    }
    out
}
