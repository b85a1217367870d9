//! The goals of issue 6, checked against the 1-vCPU rows:
//! - 2M pages: p50 ≤ 10 ms at 1 GiB; pause(4 GiB) / pause(256 MiB) ≤ 1.2;
//! - 4K pages, RAM touched: p50 ≤ 20 ms at 1 GiB; pause(4 GiB) / pause(256 MiB) ≤ 1.5.
//!
//! "pause" is the p50 of `pause_ms`. The 2M goals are checked for RAM idle and touched alike.

use crate::config::{Pages, Series};
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

/// p50 pause of the 1-vCPU configuration of `series` at `mem_mib`.
pub fn p50_at(configs: &[ConfigResult], series: Series, mem_mib: u64) -> Option<f64> {
    configs
        .iter()
        .find(|c| c.config.vcpus == 1 && c.config.series() == series && c.config.mem_mib == mem_mib)
        .and_then(|c| c.pause())
        .map(|s| s.p50)
}

/// Checks every goal.
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
