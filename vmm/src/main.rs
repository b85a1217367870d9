//! The `molt` binary.

use std::time::Instant;

use clap::Parser;
use vmm::cli::Cli;
use vmm::exit::VmExit;

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

fn main() {
    let started = Instant::now();
    let cli = Cli::parse();
    env_logger::Builder::new()
        .filter_level(cli.log_level)
        .format_target(false)
        .init();
    let code = match vmm::run(&cli.vm_config(), started) {
        Ok(VmExit::Error(e)) => {
            eprintln!("molt: error: {e}");
            1
        }
        Ok(end) => {
            log::info!("{end}");
            end.exit_code()
        }
        Err(e) => {
            eprintln!("molt: error: {}", error_chain(&e));
            1
        }
    };
    std::process::exit(code);
}
