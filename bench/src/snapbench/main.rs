//! `molt-snapbench`: the snapshot benchmark of molt (issues 13 and 10). For each RAM size,
//! 4 KiB and 2 MiB pages, idle and touched RAM it takes a `stop` snapshot, writes the same
//! amount with `dd bs=1M conv=fdatasync` to the same file system as the reference, and
//! restores it lazily (to the guest resumed, and until all RAM is back); then, for the live
//! sizes, it takes `live` snapshots while the guest's memtest rewrites RAM. It prints a
//! markdown table with the goals marked pass/fail and writes `OUT.md` and `OUT.json`.
//! Needs root (huge page pool, dropping the page cache).

mod molt;
mod report;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::run::Config;

/// Snapshot benchmark of molt.
#[derive(Debug, Parser)]
#[command(name = "molt-snapbench")]
struct Args {
    /// The molt binary [default: `molt` beside this executable].
    #[arg(long, value_name = "PATH")]
    molt: Option<PathBuf>,
    /// Where snapshots and the `dd` file go (the file system measured).
    #[arg(long, value_name = "DIR", default_value = "/var/tmp/molt-snapbench")]
    dir: PathBuf,
    /// Output files without extension (OUT.md, OUT.json).
    #[arg(long, value_name = "OUT", default_value = "snapshot")]
    out: PathBuf,
    /// RAM sizes of the paused/stop rows, MiB.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096")]
    sizes: Vec<u64>,
    /// RAM sizes of the live rows, MiB (`--live-sizes` alone: no live rows).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "1024,4096")]
    live_sizes: Vec<u64>,
    /// Runs of each configuration; every figure of a row is the median of its runs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let bin = args.molt.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.join("molt")))
            .unwrap_or_else(|| PathBuf::from("target/release/molt"))
    });
    if let Err(e) = std::fs::create_dir_all(&args.dir) {
        eprintln!("molt-snapbench: cannot create {}: {e}", args.dir.display());
        return ExitCode::from(2);
    }
    let mut configs = Vec::new();
    for &mib in &args.sizes {
        for huge in [false, true] {
            for touched in [false, true] {
                configs.push(Config {
                    mib,
                    huge,
                    touched,
                    mode: "stop",
                });
            }
        }
    }
    for &mib in &args.live_sizes {
        for huge in [false, true] {
            configs.push(Config {
                mib,
                huge,
                touched: true,
                mode: "live",
            });
        }
    }
    let mut rows = Vec::new();
    for c in configs {
        eprintln!("molt-snapbench: {c:?}");
        let mut samples = Vec::new();
        let mut failed = None;
        for _ in 0..args.repeat {
            match run::run(&bin, &args.dir, &c) {
                Ok(s) => {
                    eprintln!("  {s:?}");
                    samples.push(s);
                }
                Err(e) => {
                    eprintln!("  failed: {e}");
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
        let sample = match failed {
            Some(e) => Err(e),
            None => Ok(run::median(&samples)),
        };
        rows.push((c, sample));
    }
    let (table, failures) = report::table(&rows);
    println!("{table}");
    let json = report::json(&rows);
    let write = |ext: &str, text: &str| {
        let path = args.out.with_extension(ext);
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("molt-snapbench: cannot write {}: {e}", path.display());
        }
    };
    write("md", &table);
    write("json", &json);
    if failures > 0 {
        eprintln!("molt-snapbench: {failures} goal(s) failed or run(s) did not complete");
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
