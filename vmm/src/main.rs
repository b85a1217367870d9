//! The `molt` binary.

use std::time::Instant;

use clap::Parser;
use vmm::cli::{Cli, Command};
use vmm::exit::VmExit;
use vmm::update;

fn init_logging(level: log::LevelFilter) {
    env_logger::Builder::new()
        .filter_level(level)
        .format_target(false)
        .init();
}

/// Children (the update guardian) are reaped by the kernel: an ignored SIGCHLD is kept across
/// execve, so no image ever leaves a zombie behind, whichever image started the child.
fn reap_children_automatically() {
    // SAFETY: setting a signal disposition to SIG_IGN involves no handler code.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
}

fn main() {
    let started = Instant::now();
    // The update guardian inherits the record's environment too: check for it first.
    if std::env::args().nth(1).as_deref() == Some(update::GUARDIAN_ARG) {
        std::process::exit(update::guardian::main());
    }
    // A live update: this image continues a running VM (its command line's resources are
    // not used; the handoff record describes the VM).
    if let Some(incoming) = update::incoming::detect() {
        reap_children_automatically();
        let level = Cli::try_parse()
            .map(|c| c.vm.log_level)
            .unwrap_or(log::LevelFilter::Warn);
        init_logging(level);
        std::process::exit(update::incoming::run(incoming, started));
    }
    let cli = Cli::parse();
    if let Some(Command::Ctl(args)) = cli.command {
        std::process::exit(vmm::api::ctl::ctl_main(args));
    }
    init_logging(cli.vm.log_level);
    reap_children_automatically();
    let code = match vmm::run(&cli.vm.vm_config(), started) {
        Ok(VmExit::Error(e)) => {
            eprintln!("molt: error: {e}");
            1
        }
        Ok(end) => {
            log::info!("{end}");
            end.exit_code()
        }
        Err(e) => {
            eprintln!("molt: error: {}", vmm::error_chain(&e));
            1
        }
    };
    std::process::exit(code);
}
