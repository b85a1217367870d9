//! Boot-time benchmark of `molt` with its embedded test guest (not a test: it only measures
//! and prints).
//!
//! ```text
//! cargo bench -p molt-vmm --bench boot                 # 10 runs
//! cargo bench -p molt-vmm --bench boot -- --runs 30
//! cargo bench -p molt-vmm --bench boot -- --cmdline "molt.memtest=0 molt.ticks=1 molt.native=off"
//! ```
//!
//! `cargo bench` builds the `molt` binary with the optimized bench profile and this program
//! runs that binary (`MOLT_BIN=/path/to/molt` runs another one). Each run spawns
//! `molt --log-level info --serial stdio --cmdline "molt.memtest=0 molt.ticks=1"` (or the
//! `--cmdline` given) and measures,
//! from just before the spawn:
//!
//! - the `guest marker 1` log line: the guest's very first instruction writes marker 1 to the
//!   debug port 0x500, and molt logs it together with its own figure (microseconds since molt's
//!   `main` started), which is reported as well;
//! - the first `molt-guest: tick n=1` line on the serial console (about 100 ms of guest time
//!   after boot);
//! - the process exit (the guest ends the VM after tick 1).
//!
//! The goal of issue 2 is at most 20 ms from VMM start to the first guest instruction.

use std::path::PathBuf;
use std::time::Duration;

use molt_tests::{Molt, Stream};

const GOAL_FIRST_INSTRUCTION_MS: f64 = 20.0;
const DEFAULT_RUNS: usize = 10;
const TIMEOUT: Duration = Duration::from_secs(60);
const ARGS: &[&str] = &["--log-level", "info", "--serial", "stdio", "--cmdline"];
const DEFAULT_CMDLINE: &str = "molt.memtest=0 molt.ticks=1";

/// One run's figures, in milliseconds.
struct Sample {
    marker: f64,
    marker_vmm: f64,
    tick: f64,
    exit: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The number in `… guest marker 1 at <us> us since VMM start`.
fn vmm_marker_us(line: &str) -> Option<u64> {
    let rest = &line[line.find("guest marker 1 at ")? + "guest marker 1 at ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

fn run_once(bin: &std::path::Path, args: &[String]) -> Result<Sample, String> {
    let mut molt = Molt::spawn_bin(bin, args);
    let started = molt.started();
    let marker = molt.wait_line(Stream::Stderr, TIMEOUT, |l| {
        l.contains("guest marker 1 at ")
    });
    let marker_vmm = vmm_marker_us(&marker.text)
        .ok_or_else(|| format!("cannot read the time in {:?}", marker.text))?;
    let tick = molt.wait_stdout("molt-guest: tick n=1 ", TIMEOUT);
    let out = molt.finish(TIMEOUT);
    if out.code() != Some(0) {
        return Err(format!("molt failed\n{}", out.describe()));
    }
    Ok(Sample {
        marker: ms(marker.at - started),
        marker_vmm: marker_vmm as f64 / 1000.0,
        tick: ms(tick.at - started),
        exit: ms(out.exited - started),
    })
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (median(&v), v[0], v[v.len() - 1])
}

/// `--runs N` and `--cmdline WORDS`.
fn options_from_args() -> (usize, String) {
    let mut args = std::env::args().skip(1);
    let mut runs = std::env::var("MOLT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_RUNS);
    let mut cmdline = DEFAULT_CMDLINE.to_string();
    // cargo passes --bench (and any filter); only --runs and --cmdline mean something here.
    while let Some(a) = args.next() {
        if a == "--runs" {
            runs = args
                .next()
                .and_then(|v| v.parse().ok())
                .expect("--runs needs a number");
        } else if a == "--cmdline" {
            cmdline = args
                .next()
                .expect("--cmdline needs the guest's command line");
        }
    }
    (runs.max(1), cmdline)
}

fn main() {
    let bin = std::env::var_os("MOLT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_molt")));
    let (runs, cmdline) = options_from_args();
    let args: Vec<String> = ARGS
        .iter()
        .map(|s| s.to_string())
        .chain([cmdline])
        .collect();
    let release_path = bin
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "release");
    if cfg!(debug_assertions) || !release_path {
        eprintln!(
            "warning: {} may not be an optimized build (run `cargo bench -p molt-vmm --bench \
             boot`, or set MOLT_BIN to target/release/molt); figures are not representative",
            bin.display()
        );
    }
    println!("molt boot benchmark: {} ({runs} runs)", bin.display());
    println!("command: molt {}", args.join(" "));

    // One run first to bring the binary and the guest into the page cache.
    if let Err(e) = run_once(&bin, &args) {
        eprintln!("warm-up run failed: {e}");
        std::process::exit(1);
    }
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs {
        match run_once(&bin, &args) {
            Ok(s) => samples.push(s),
            Err(e) => {
                eprintln!("run {} failed: {e}", i + 1);
                std::process::exit(1);
            }
        }
    }

    let rows: [(&str, Vec<f64>); 4] = [
        (
            "spawn → first guest instruction (marker 1 logged)",
            samples.iter().map(|s| s.marker).collect(),
        ),
        (
            "molt start → first guest instruction (molt's own figure)",
            samples.iter().map(|s| s.marker_vmm).collect(),
        ),
        (
            "spawn → first tick (`tick n=1` on serial)",
            samples.iter().map(|s| s.tick).collect(),
        ),
        (
            "spawn → process exit",
            samples.iter().map(|s| s.exit).collect(),
        ),
    ];
    println!();
    println!("| metric ({runs} runs) | median | min | max |");
    println!("|---|---:|---:|---:|");
    let mut first_instruction = 0.0;
    for (i, (name, values)) in rows.into_iter().enumerate() {
        let (med, min, max) = stats(values);
        if i == 0 {
            first_instruction = med;
        }
        println!("| {name} | {med:.1} ms | {min:.1} ms | {max:.1} ms |");
    }
    println!();
    let verdict = if first_instruction <= GOAL_FIRST_INSTRUCTION_MS {
        "met"
    } else {
        "NOT met"
    };
    println!(
        "goal: ≤ {GOAL_FIRST_INSTRUCTION_MS:.0} ms from start to the first guest instruction: \
         {verdict} (median {first_instruction:.1} ms from spawn)"
    );
}
