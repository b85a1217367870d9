//! The command line of `molt-bench`.

use std::path::PathBuf;

use clap::Parser;

/// Live-update benchmark of molt: runs the molt binary with its embedded test guest, performs
/// N live updates (cpr-exec and cpr-transfer) per configuration — RAM size × 4K/2M pages × RAM idle/touched ×
/// vCPUs — next to QEMU's local migration as a peer when it is installed, and writes a
/// markdown table (stdout and DIR/results.md), the raw samples
/// (DIR/results.json) and a plot (DIR/pause.png). Exits 1 when any update failed.
///
/// Needs root for 2 MiB pages (it raises /proc/sys/vm/nr_hugepages for those configurations
/// and restores it). Progress goes to stderr.
#[derive(Debug, Parser)]
#[command(name = "molt-bench", version)]
pub struct Args {
    /// Updates per configuration [default: 20, or 5 with --quick].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub runs: Option<u32>,

    /// Smoke run: 1 vCPU only and 5 updates per configuration (unless --runs is given).
    #[arg(long)]
    pub quick: bool,

    /// Output directory.
    #[arg(long, value_name = "DIR", default_value = "bench-results")]
    pub out: PathBuf,

    /// The molt binary [default: `molt` beside this executable, i.e. target/release/molt].
    #[arg(long, value_name = "PATH")]
    pub molt: Option<PathBuf>,

    /// RAM sizes, comma-separated (M or G suffix) [default: 256M,1G,4G, plus 8G when the host
    /// has at least 20 GiB of RAM].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub sizes: Option<Vec<String>>,

    /// vCPU counts, comma-separated [default: 1,2,4; 1 with --quick].
    #[arg(long, value_name = "LIST", value_delimiter = ',',
          value_parser = clap::value_parser!(u8).range(1..=64))]
    pub vcpus: Option<Vec<u8>>,

    /// Minimum time from one update's response to the next request, in ms (the benchmark
    /// also waits for the update's background work to end).
    #[arg(long, value_name = "MS", default_value_t = 300)]
    pub min_gap_ms: u64,

    /// Hand-over modes, comma-separated: exec (`vm.cpr-exec`), transfer (`vm.cpr-transfer`
    /// to a separately started `molt --incoming`), stand-in (`vm.cpr-exec` through a stand-in
    /// process).
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "exec,transfer"
    )]
    pub modes: Vec<String>,

    /// Do not run the QEMU peer (local migration with x-ignore-shared) even if
    /// qemu-system-x86_64 is installed.
    #[arg(long)]
    pub no_peer: bool,

    /// The guest's command line (e.g. add `molt.native=off` to keep it in KVM's emulator on a
    /// PVM host, or `molt.dirty=<MiB/s>` for a memory load).
    #[arg(long, value_name = "WORDS", default_value = "molt.memtest=0")]
    pub guest_cmdline: String,
}

impl Args {
    /// Updates per configuration.
    pub fn runs(&self) -> usize {
        let default = if self.quick { 5 } else { 20 };
        self.runs.map_or(default, |n| n as usize)
    }

    /// vCPU counts to run.
    pub fn vcpus(&self) -> Vec<u8> {
        match &self.vcpus {
            Some(v) => v.clone(),
            None if self.quick => vec![1],
            None => vec![1, 2, 4],
        }
    }
}
