//! The `molt` binary.

use std::time::Instant;

use clap::Parser;
use vmm::cli::{Cli, Command};
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
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::SIGCHLD,
            nix::sys::signal::SigHandler::SigIgn,
        )
    };
}

fn main() {
    let started = Instant::now();
    let main_ns = vmm::state::now_ns();
    // The update's helper processes inherit the record's environment too: check for them
    // first.
    let role = std::env::args().nth(1);
    let role = role.as_deref();
    if role == Some(update::GUARDIAN_ARG) {
        std::process::exit(update::guardian::main());
    }
    let stand_in = role == Some(update::stand_in::STAND_IN_ARG);
    if stand_in || role == Some(update::stand_in::RECEIVE_ARG) {
        reap_children_automatically();
        let level = vmm::cli::log_level_arg(std::env::args()).unwrap_or(log::LevelFilter::Warn);
        init_logging(level);
        std::process::exit(if stand_in {
            update::stand_in::stand_in_main(started)
        } else {
            update::stand_in::receive_main(started)
        });
    }
    // A live update: this image continues a running VM (its command line's resources are
    // not used; the handoff record describes the VM).
    if let Some(env) = update::incoming::detect() {
        // The guest is paused: the KVM VM is created at once, beside what follows.
        let early = update::early_vm::EarlyVm::start();
        reap_children_automatically();
        // Only the log level is needed now (a full parse costs ~0.2 ms inside the pause).
        let level = vmm::cli::log_level_arg(std::env::args()).unwrap_or(log::LevelFilter::Warn);
        init_logging(level);
        if let Some(exec_ns) = env.exec_ns {
            log::debug!(
                "new image (µs): execve to main {}, main to logging {}",
                main_ns.saturating_sub(exec_ns) / 1000,
                vmm::state::now_ns().saturating_sub(main_ns) / 1000
            );
        }
        let code = match update::incoming::restore(&env, started, early) {
            Ok(runtime) => vmm::run_to_end(Ok(runtime)),
            Err(reason) => update::incoming::roll_back(&env, &reason),
        };
        std::process::exit(code);
    }
    let mut cli = Cli::parse();
    if let Some(Command::Ctl(args)) = cli.command {
        std::process::exit(vmm::api::ctl::ctl_main(args));
    }
    if let Some(dir) = &cli.vm.update_binaries {
        match update::target::allowed_dir(dir) {
            Ok(canonical) => cli.vm.update_binaries = Some(canonical),
            Err(e) => {
                eprintln!("molt: error: --update-binaries: {}", vmm::error_chain(&e));
                std::process::exit(1);
            }
        }
    }
    if let Some(path) = &cli.vm.incoming {
        init_logging(cli.vm.log_level);
        reap_children_automatically();
        let ignored = std::env::args().skip(1).filter(|a| {
            a.starts_with("--")
                && !["--incoming", "--log-level"]
                    .iter()
                    .any(|k| a.starts_with(k))
        });
        let ignored: Vec<String> = ignored.collect();
        if !ignored.is_empty() {
            log::warn!(
                "--incoming: ignoring {}: the VM and its options come from the sender",
                ignored.join(", ")
            );
        }
        std::process::exit(update::transfer_in::run(path, started));
    }
    if let Some(opts) = &cli.vm.restore {
        init_logging(cli.vm.log_level);
        reap_children_automatically();
        std::process::exit(vmm::snapshot::restore::main(opts, &cli.vm, started));
    }
    let config = cli.vm.vm_config();
    // Before molt opens anything of its own: fds named on the command line must be the
    // parent's.
    if let Err(e) = vmm::inherited_fds::check(&config) {
        eprintln!("molt: error: {}", vmm::error_chain(&e));
        std::process::exit(1);
    }
    init_logging(cli.vm.log_level);
    reap_children_automatically();
    std::process::exit(vmm::run_to_end(vmm::boot(&config, started)));
}
