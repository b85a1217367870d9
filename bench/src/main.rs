//! `molt-bench`: the live-update pause benchmark of molt (issue 6). See [`cli::Args`].

mod api;
mod cli;
mod config;
mod error;
mod goals;
mod guest_log;
mod hugepages;
mod machine;
mod plot;
mod process;
mod procfs;
mod qemu;
mod report;
mod report_peer;
mod results;
mod run;
mod settle;
mod signals;
mod stats;
mod transfer;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

use crate::config::{parse_size, Config};
use crate::error::{Error, Result};
use crate::results::Report;

/// Hosts with at least this much RAM (GiB) also run 8 GiB guests by default.
const BIG_HOST_GIB: f64 = 20.0;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    signals::install();
    match bench(&args) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(n) => {
            eprintln!("molt-bench: {n} failure(s); see the table");
            ExitCode::from(1)
        }
        Err(e) => {
            // A progress line may be open.
            eprintln!();
            eprintln!("molt-bench: error: {e}");
            ExitCode::from(2)
        }
    }
}

/// The molt binary: `--molt`, else `molt` beside this executable.
fn molt_path(args: &cli::Args) -> Result<PathBuf> {
    let p = match &args.molt {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.join("molt")))
            .unwrap_or_else(|| PathBuf::from("target/release/molt")),
    };
    // molt re-executes its own argv[0] path on update: make it absolute.
    let p = std::path::absolute(&p).map_err(|e| Error::io("cannot resolve --molt", e))?;
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::NoMolt(p))
    }
}

/// The RAM sizes to run, in MiB.
fn sizes(args: &cli::Args, ram_gib: f64) -> Result<Vec<u64>> {
    match &args.sizes {
        Some(list) => list.iter().map(|s| parse_size(s)).collect(),
        None if ram_gib >= BIG_HOST_GIB => Ok(vec![256, 1024, 4096, 8192]),
        None => Ok(vec![256, 1024, 4096]),
    }
}

/// Runs everything; returns the number of failures.
fn bench(args: &cli::Args) -> Result<usize> {
    let molt = molt_path(args)?;
    let machine = machine::describe(&molt);
    let sizes = sizes(args, machine.ram_gib)?;
    let modes = args
        .modes
        .iter()
        .map(|m| config::Mode::parse(m))
        .collect::<Result<Vec<_>>>()?;
    let configs: Vec<Config> = config::matrix(&sizes, &args.vcpus(), &modes);
    let runs = args.runs();
    std::fs::create_dir_all(&args.out)
        .map_err(|e| Error::io(format!("cannot create {}", args.out.display()), e))?;
    let tmp = process::TempDir::new()?;
    // Every update re-executes the binary by path: run a private copy, so a rebuild of the
    // original during the benchmark cannot change (or break) what is measured.
    let copy = tmp.path().join("molt");
    std::fs::copy(&molt, &copy).map_err(|e| {
        Error::io(
            format!("cannot copy {} to {}", molt.display(), copy.display()),
            e,
        )
    })?;
    let opts = run::Options {
        molt: copy,
        runs,
        min_gap: Duration::from_millis(args.min_gap_ms),
        guest_cmdline: args.guest_cmdline.clone(),
        tmp: tmp.path().to_path_buf(),
    };
    eprintln!("molt-bench: {}", machine.line());
    eprintln!(
        "molt-bench: {} configurations × {runs} updates, binary {} (run from a copy)",
        configs.len(),
        molt.display()
    );
    let t0 = Instant::now();
    let mut results = Vec::new();
    for (i, cfg) in configs.iter().enumerate() {
        eprint!(
            "[{:>2}/{}] {:<24} {:>5.0} s ",
            i + 1,
            configs.len(),
            cfg.name(),
            t0.elapsed().as_secs_f64()
        );
        let r = run::run_config(cfg, &opts)?;
        match (&r.skipped, r.pause()) {
            (Some(why), _) => eprintln!("skipped: {why}"),
            (None, Some(p)) => eprintln!(
                "  pause p50 {:.2} ms, p99 {:.2} ms, stopped p50 {:.2} ms, {} failure(s)",
                p.p50,
                p.p99,
                r.stopped().map_or(f64::NAN, |s| s.p50),
                r.failures.len()
            ),
            (None, None) => eprintln!("  no sample; {} failure(s)", r.failures.len()),
        }
        for f in r.failures.iter().take(3) {
            eprintln!("    failure: {f}");
        }
        results.push(r);
    }
    let (peer, peer_skipped) = run_peer(args, &sizes, runs, tmp.path());
    let report = Report {
        machine,
        runs,
        min_gap_ms: args.min_gap_ms,
        guest_cmdline: args.guest_cmdline.clone(),
        configs: results,
        peer,
        peer_skipped,
    };
    write_outputs(&report, &args.out)?;
    eprintln!(
        "molt-bench: done in {:.0} s; wrote {}/results.md, results.json and a plot per mode",
        t0.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(report.failures())
}

/// Runs the QEMU peer for every size with 1 and 2 vCPUs (those of `--vcpus`), if installed.
fn run_peer(
    args: &cli::Args,
    sizes: &[u64],
    runs: usize,
    tmp: &Path,
) -> (Vec<qemu::PeerResult>, Option<String>) {
    if args.no_peer {
        return (Vec::new(), Some("--no-peer".into()));
    }
    let version = match qemu::version() {
        Ok(v) => v,
        Err(why) => {
            eprintln!("molt-bench: {why}");
            return (Vec::new(), Some(why));
        }
    };
    eprintln!("molt-bench: peer: {version}, local migration with x-ignore-shared");
    let mut out = Vec::new();
    for v in args.vcpus().into_iter().filter(|&v| v <= 2) {
        for &mem in sizes {
            eprint!("[peer] qemu {mem} MiB {v} vCPU ");
            let r = qemu::run(tmp, mem, v, runs);
            match r.pause() {
                Some(p) => eprintln!(" STOP→RESUME p50 {:.2} ms, p99 {:.2} ms", p.p50, p.p99),
                None => eprintln!(" no sample: {:?}", r.failures),
            }
            out.push(r);
        }
    }
    (out, None)
}

/// Writes `results.md` (also printed), `results.json` and `pause.png` into `out`.
fn write_outputs(report: &Report, out: &Path) -> Result<()> {
    let md = report::markdown(report);
    print!("{md}");
    let write = |name: &str, data: &[u8]| {
        let p = out.join(name);
        std::fs::write(&p, data).map_err(|e| Error::io(format!("cannot write {}", p.display()), e))
    };
    write("results.md", md.as_bytes())?;
    write(
        "results.json",
        serde_json::to_string_pretty(report)?.as_bytes(),
    )?;
    for (mode, file) in [
        (config::Mode::Exec, "pause.png"),
        (config::Mode::Transfer, "transfer.png"),
        (config::Mode::StandIn, "stand-in.png"),
    ] {
        let rows: Vec<_> = report
            .configs
            .iter()
            .filter(|c| c.config.mode == mode)
            .cloned()
            .collect();
        if rows.is_empty() {
            continue;
        }
        let title = format!(
            "molt cpr-{} vs guest RAM ({})",
            mode.label(),
            report.machine.molt_version
        );
        plot::draw(&rows, &title, &out.join(file))?;
    }
    Ok(())
}
