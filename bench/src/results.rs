//! What the benchmark records: the raw samples of every configuration (`results.json`) and
//! the figures derived from them.

use serde::Serialize;

use crate::config::Config;
use crate::stats::{median, Summary};

/// The phases of one update as molt reports them (`phases_ms`), in ms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Phases {
    /// Stopping the vCPUs and quiescing devices.
    pub pause: f64,
    /// Capturing the VM state and writing the handoff record.
    pub save: f64,
    /// From `execve` in the old image to `main` of the new one.
    pub exec: f64,
    /// Rebuilding the VM in the new image.
    pub restore: f64,
    /// Starting the vCPUs again.
    pub resume: f64,
}

impl Phases {
    /// The phase names, in order.
    pub const NAMES: [&'static str; 5] = ["pause", "save", "exec", "restore", "resume"];

    /// The phase called `name` (one of [`Phases::NAMES`]).
    pub fn get(&self, name: &str) -> f64 {
        match name {
            "pause" => self.pause,
            "save" => self.save,
            "exec" => self.exec,
            "restore" => self.restore,
            "resume" => self.resume,
            _ => f64::NAN,
        }
    }
}

/// One successful update.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// 1-based number of the update within its configuration.
    pub update: usize,
    /// `pause_ms` of the response: the request to stop the vCPUs → vCPUs running again.
    pub pause_ms: f64,
    /// `stopped_ms` of the response: all vCPUs stopped → running again (`pause_ms` less the
    /// kick, the `pause` phase).
    pub stopped_ms: f64,
    /// `phases_ms` of the response.
    pub phases_ms: Phases,
    /// The largest `gap_max_us` (in ms) of the guest's tick lines from the request until the
    /// first tick printed after the response: the pause as the guest saw it.
    pub guest_gap_ms: Option<f64>,
    /// Wall time of the HTTP request as the client saw it.
    pub request_ms: f64,
    /// From the response until molt had no child processes (the update's holder and
    /// guardian gone) and, with RAM touched, no `prefault` thread and a steady RSS.
    pub background_ms: f64,
    /// Version of the image that paused the guest.
    pub from_version: String,
    /// Version of the image that resumed it.
    pub to_version: String,
}

/// Everything recorded for one configuration.
#[derive(Clone, Debug, Serialize)]
pub struct ConfigResult {
    /// The configuration.
    pub config: Config,
    /// Why it did not run, when it did not (not a failure: e.g. no huge pages).
    pub skipped: Option<String>,
    /// Successful updates.
    pub samples: Vec<Sample>,
    /// Updates requested.
    pub attempted: usize,
    /// Every failure: a non-200 response, a rollback, a wrong PID, tick numbers that do not
    /// go up by one, molt dying or panicking, a wait that timed out.
    pub failures: Vec<String>,
    /// `gap_max_us` (ms) of ticks whose interval had no update in it: the guest's own jitter.
    pub idle_gaps_ms: Vec<f64>,
    /// From starting molt to the guest's first tick line.
    pub boot_ms: Option<f64>,
    /// `updates.count` of `vm.info` after the last update.
    pub updates_reported: Option<u64>,
    /// What molt wrote to stderr (warnings; empty normally).
    pub molt_stderr: Vec<String>,
}

impl ConfigResult {
    /// An empty result for `config`.
    pub fn new(config: Config) -> ConfigResult {
        ConfigResult {
            config,
            skipped: None,
            samples: Vec::new(),
            attempted: 0,
            failures: Vec::new(),
            idle_gaps_ms: Vec::new(),
            boot_ms: None,
            updates_reported: None,
            molt_stderr: Vec::new(),
        }
    }

    /// Summary of `pause_ms`.
    pub fn pause(&self) -> Option<Summary> {
        Summary::of(&self.samples.iter().map(|s| s.pause_ms).collect::<Vec<_>>())
    }

    /// Summary of `stopped_ms`.
    pub fn stopped(&self) -> Option<Summary> {
        Summary::of(
            &self
                .samples
                .iter()
                .map(|s| s.stopped_ms)
                .collect::<Vec<_>>(),
        )
    }

    /// Median of phase `name`.
    pub fn phase_p50(&self, name: &str) -> Option<f64> {
        median(
            &self
                .samples
                .iter()
                .map(|s| s.phases_ms.get(name))
                .collect::<Vec<_>>(),
        )
    }

    /// Median of the guest-observed gap.
    pub fn guest_gap_p50(&self) -> Option<f64> {
        median(
            &self
                .samples
                .iter()
                .filter_map(|s| s.guest_gap_ms)
                .collect::<Vec<_>>(),
        )
    }

    /// Median of the guest's gaps in ticks without an update.
    pub fn idle_gap_p50(&self) -> Option<f64> {
        median(&self.idle_gaps_ms)
    }

    /// Median time the background work took after an update.
    pub fn background_p50(&self) -> Option<f64> {
        median(
            &self
                .samples
                .iter()
                .map(|s| s.background_ms)
                .collect::<Vec<_>>(),
        )
    }
}

/// The machine the benchmark ran on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// `model name` of /proc/cpuinfo.
    pub cpu: String,
    /// Online CPUs.
    pub cores: usize,
    /// MemTotal in GiB.
    pub ram_gib: f64,
    /// Kernel release.
    pub kernel: String,
    /// Whether KVM is PVM (`/sys/module/kvm_pvm`).
    pub pvm: bool,
    /// `molt --version`.
    pub molt_version: String,
    /// 1-minute load average when the benchmark started.
    pub load_at_start: f64,
}

/// The whole run, as written to `results.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// Updates per configuration.
    pub runs: usize,
    /// Minimum time between the end of one update and the next request, ms.
    pub min_gap_ms: u64,
    /// The guest's command line (molt adds `molt.native=on` on hosts that can run it natively).
    pub guest_cmdline: String,
    /// Every configuration.
    pub configs: Vec<ConfigResult>,
    /// The QEMU peer, side by side (empty when not run).
    pub peer: Vec<crate::qemu::PeerResult>,
    /// Why the peer did not run, when it did not.
    pub peer_skipped: Option<String>,
}

impl Report {
    /// Total failures over all configurations.
    pub fn failures(&self) -> usize {
        self.configs.iter().map(|c| c.failures.len()).sum()
    }
}

/// Synthetic results for the unit tests of the report and the plot.
#[cfg(test)]
pub mod fake {
    use super::*;
    use crate::config::Pages;

    /// A 1-vCPU configuration whose updates paused for `pauses` ms.
    pub fn result(mem_mib: u64, pages: Pages, touched: bool, pauses: &[f64]) -> ConfigResult {
        let mut r = ConfigResult::new(Config {
            mode: crate::config::Mode::Exec,
            mem_mib,
            pages,
            touched,
            vcpus: 1,
        });
        r.attempted = pauses.len();
        r.samples = pauses
            .iter()
            .enumerate()
            .map(|(i, &p)| Sample {
                update: i + 1,
                pause_ms: p,
                stopped_ms: p - 0.1,
                phases_ms: Phases {
                    pause: 0.1,
                    save: 0.2,
                    exec: 1.5,
                    restore: p - 1.9,
                    resume: 0.1,
                },
                guest_gap_ms: Some(p + 1.0),
                request_ms: p + 2.0,
                background_ms: 50.0,
                from_version: "0.1.0".into(),
                to_version: "0.1.0".into(),
            })
            .collect();
        r.idle_gaps_ms = vec![4.0, 4.1, 1.6];
        r
    }
}
