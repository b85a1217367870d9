//! cpr-exec through a stand-in (`{"stand_in": true}`): the guest keeps running while the
//! process executes its new binary, instead of waiting paused for the new image to start and
//! build its KVM VM.
//!
//! 1. The old image starts a stand-in (this binary again, `__cpr-stand-in`) and hands the VM
//!    to it by the transfer protocol over a socket pair: the stand-in builds the machine
//!    while the guest runs, so the pause covers only capture, record and restore.
//! 2. Once the stand-in committed, the old image executes the new binary (same PID) with
//!    one end of a second socket pair (`__cpr-receive FD`); the guest runs in the stand-in
//!    meanwhile.
//! 3. The stand-in hands the VM on to the new image the same way, and exits 0. The new
//!    image answers the request with both handovers' report.
//!
//! Failure before the stand-in committed leaves the guest here, as a failed transfer does.
//! If the new binary cannot be executed, this binary is executed instead and takes the VM
//! back (the report says `rolled_back`). A new image that refuses executes this binary too
//! (an fd of it comes along, [`cpr::StandInEnv`]), which says `Again` on the same channel and
//! takes the VM back in the same PID. A new image that dies leaves the guest in the stand-in
//! (another PID), which answers the request with the error.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Instant;

use cpr::transfer::{Channel, Message};
use cpr::StandInEnv;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

use super::outgoing::plan;
use super::transfer_in::Build;
use super::transfer_out::{self, Leg};
use super::{Failed, UpdateError};
use crate::api::{ApiServer, ConnId, CprExecRequest};
use crate::runtime::Vmm;

/// First argument of the stand-in: `__cpr-stand-in FROM_FD TO_FD`.
pub const STAND_IN_ARG: &str = "__cpr-stand-in";
/// First argument of a new image that takes the VM back from the stand-in:
/// `__cpr-receive FD [the VM's arguments]` (only their log level is used).
pub const RECEIVE_ARG: &str = "__cpr-receive";
/// How long the stand-in waits for the previous binary after the new image refused.
const AGAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

fn pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// Starts the stand-in with `from` (the old image's channel) and `to` (the new image's).
fn spawn(from: &OwnedFd, to: &OwnedFd) -> std::io::Result<u32> {
    for fd in [from, to] {
        super::sys::set_cloexec(fd, false)?;
    }
    let args = [
        STAND_IN_ARG.to_string(),
        from.as_raw_fd().to_string(),
        to.as_raw_fd().to_string(),
        format!("--log-level={}", log::max_level()),
    ];
    // Its own process group: a Ctrl-C in molt's terminal must not kill it while it holds the
    // guest. Started by the unfiltered launcher: a child of a filtered thread could not exec.
    let child = crate::seccomp::launcher::run(move || {
        Command::new("/proc/self/exe")
            .args(args)
            .process_group(0)
            .spawn()
    })
    .unwrap_or_else(|| Err(std::io::Error::other("the launcher thread is gone")));
    for fd in [from, to] {
        let _ = super::sys::set_cloexec(fd, true);
    }
    // The kernel reaps it: molt ignores SIGCHLD.
    Ok(child?.id())
}

/// The old image's side: returns only if the guest still runs here (with the report of the
/// attempt if it paused the guest).
pub fn perform(vmm: &mut Vmm, api: &mut ApiServer, conn: ConnId, req: &CprExecRequest) -> Failed {
    let plan = match plan(vmm, req) {
        Ok(p) => p,
        Err(e) => return e.into(),
    };
    let fds = pair().and_then(|(ours, from)| Ok((ours, from, pair()?)));
    let (ours, from, (new_image, to)) = match fds {
        Ok(f) => f,
        Err(e) => return UpdateError::StandInStart(e).into(),
    };
    let pid = match spawn(&from, &to) {
        Ok(pid) => pid,
        Err(e) => return UpdateError::StandInStart(e).into(),
    };
    drop((from, to));
    let chan = Channel::new(ours);
    let mut leg = Leg {
        target: plan.target.clone(),
        mode: "exec",
        earlier: Vec::new(),
    };
    let failed = |e| UpdateError::StandIn(pid, e);
    if let Err(e) = transfer_out::send(vmm, api, conn, &chan, &mut leg, failed) {
        // It exits by itself once it learns it gets nothing.
        return Failed::after(e, leg.earlier);
    }
    // The stand-in runs the guest: this process becomes the new image.
    transfer_out::let_go(vmm, api);
    log::info!("cpr-exec: the stand-in (pid {pid}) runs the guest; executing the new image");
    become_new_image(vmm, &plan.target, &plan.argv, new_image)
}

/// Executes `target` to take the VM back from the stand-in on `chan`; if that fails, this
/// binary again. Exits if neither can run (the stand-in then keeps the guest).
fn become_new_image(vmm: &Vmm, target: &std::path::Path, argv: &[String], chan: OwnedFd) -> ! {
    if let Err(e) = super::sys::set_cloexec(&chan, false) {
        log::error!("cannot pass the stand-in's channel on; it keeps the guest: {e}");
        std::process::exit(1);
    }
    let mut args = vec![
        target.display().to_string(),
        RECEIVE_ARG.to_string(),
        chan.as_raw_fd().to_string(),
    ];
    args.extend(argv.iter().skip(1).cloned());
    // The new image gets this binary too, to take the VM back if it cannot.
    let previous_exe_fd = vmm
        .identity
        .exe_file
        .as_ref()
        .filter(|exe| super::sys::set_cloexec(exe, false).is_ok())
        .map(|exe| exe.as_raw_fd());
    let target_env = StandInEnv {
        previous_exe_fd,
        ..StandInEnv::default()
    }
    .apply(cpr::exec::clean_env());
    let reason = match crate::fault::inject(crate::fault::Step::StandInExec) {
        Err(e) => format!("cannot execute {}: {e}", target.display()),
        Ok(()) => {
            let (path, a, e) = (target.to_path_buf(), args.clone(), target_env);
            match crate::seccomp::launcher::run(move || cpr::exec::exec_path(&path, &a, e)) {
                Some(Err(e)) => format!("cannot execute {}: {e}", target.display()),
                _ => "the launcher thread is gone".to_string(),
            }
        }
    };
    log::error!("cpr-exec: {reason}; taking the VM back on the previous binary");
    if let Some(exe) = vmm
        .identity
        .exe_file
        .as_ref()
        .and_then(|f| f.try_clone().ok())
    {
        args[0] = vmm.identity.exe.display().to_string();
        let env = StandInEnv {
            rollback: Some(reason),
            ..StandInEnv::default()
        }
        .apply(cpr::exec::clean_env());
        let err = crate::seccomp::launcher::run(move || cpr::exec::exec_fd(&exe, &args, env));
        if let Some(Err(e)) = err {
            log::error!("cannot execute the previous binary either: {e}");
        }
    }
    log::error!("cpr-exec: the guest runs on in the stand-in");
    std::process::exit(1)
}

/// An fd number from the command line.
fn fd_arg(arg: Option<String>) -> Option<RawFd> {
    arg?.parse().ok()
}

/// Takes an inherited fd (this process's own from here on).
fn inherited(fd: Option<RawFd>) -> Option<OwnedFd> {
    let fd = fd.filter(|fd| *fd > 2)?;
    // SAFETY: F_GETFD only reads the flags of whatever `fd` is (EBADF if nothing).
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the fd is open (fcntl above), and its number was passed (command line or
    // environment) by the process that made it inheritable for us: nothing else in this
    // process owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    super::sys::set_cloexec(&fd, true).ok()?;
    Some(fd)
}

/// `molt __cpr-receive FD …`: the new image takes the VM over from the stand-in. Returns
/// the exit code. If it cannot, and it is not a rollback already, it executes the previous
/// binary on the same channel, which takes the VM back in this PID.
pub fn receive_main(started: Instant) -> i32 {
    let StandInEnv {
        rollback,
        again,
        previous_exe_fd,
    } = StandInEnv::take();
    let previous = inherited(previous_exe_fd);
    let Some(fd) = inherited(fd_arg(std::env::args().nth(2))) else {
        eprintln!("molt: error: {RECEIVE_ARG} needs the number of an inherited socket");
        return 2;
    };
    let chan = Channel::new(fd);
    if again {
        // The stand-in waits for a new receiver after the refusal of the one before.
        if let Err(e) = chan.send(&Message::Again, &[], &[]) {
            eprintln!("molt: error: the stand-in is gone: {e}");
            return 1;
        }
    }
    let e = match super::transfer_in::take_over(&chan, started, rollback.clone(), Build::AtOnce) {
        Ok(runtime) => {
            drop((chan, previous));
            return crate::run_to_end(Ok(runtime));
        }
        Err(e) => e,
    };
    super::transfer_in::refuse(&chan, &e);
    let (None, Some(previous)) = (rollback, previous) else {
        return 1;
    };
    let reason = crate::error_chain(&e);
    log::error!("cpr-exec: {reason}; taking the VM back on the previous binary");
    let env = StandInEnv {
        rollback: Some(reason),
        again: true,
        previous_exe_fd: None,
    }
    .apply(cpr::exec::clean_env());
    let argv: Vec<String> = std::env::args().collect();
    let kept = super::sys::set_cloexec(&chan, false);
    let Err(e) = kept.map_err(cpr::ExecError::Exec).and_then(|()| {
        // No launcher runs yet: nothing in this image filtered a thread that executes.
        cpr::exec::exec_fd(&previous, &argv, env)
    });
    eprintln!("molt: error: the rollback to the previous binary failed: {e}");
    1
}

/// After the new image failed with `e`: whether a new receiver took its place on `chan`
/// (one that refused executes the previous binary, which says `Again`).
fn replaced(chan: &Channel, e: &cpr::transfer::TransferError) -> bool {
    if !matches!(e, cpr::transfer::TransferError::Refused(_)) {
        return false;
    }
    let deadline = Instant::now() + AGAIN_WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match chan.recv(left) {
            Ok(m) if m.message == Message::Again => return true,
            // Whatever the refusing image sent after its refusal.
            Ok(_) | Err(cpr::transfer::TransferError::Refused(_)) if !left.is_zero() => {}
            _ => return false,
        }
    }
}

/// `molt __cpr-stand-in FROM TO`: receives the VM on FROM, hands it on over TO, exits 0.
/// If the second handover fails the guest runs on here and this process stays its VMM.
pub fn stand_in_main(started: Instant) -> i32 {
    let mut args = std::env::args().skip(2);
    let (Some(from), Some(to)) = (
        inherited(fd_arg(args.next())),
        inherited(fd_arg(args.next())),
    ) else {
        eprintln!("molt: error: {STAND_IN_ARG} needs two inherited sockets");
        return 2;
    };
    let from = Channel::new(from);
    let mut got = match super::transfer_in::receive(&from, started, Build::AtOnce) {
        Ok(got) => got,
        Err(e) => {
            super::transfer_in::refuse(&from, &e);
            return 1;
        }
    };
    drop(from);
    let h = &got.handoff;
    let first = super::incoming::leg_report(
        h,
        &got.runtime.vmm,
        got.phases.clone(),
        got.resumed_ns,
        None,
    );
    let waiting = h.parts.api.as_ref().and_then(|a| a.waiting);
    let target = h.update.target.clone();
    let runtime = &mut got.runtime;
    let Some(api) = runtime.api.as_mut() else {
        log::error!("cpr-exec: the stand-in has no API server; it keeps the guest");
        return crate::run_to_end(Ok(got.runtime));
    };
    let to = Channel::new(to);
    let mut leg = Leg {
        target: target.clone(),
        mode: "exec",
        earlier: vec![first],
    };
    // A client that hung up has no connection to carry: an id no connection has.
    let conn = waiting.unwrap_or(ConnId::MAX);
    let me = std::process::id();
    let failed = |e| UpdateError::NewImage(target.clone(), me, e);
    let mut result = transfer_out::send(&mut runtime.vmm, api, conn, &to, &mut leg, failed);
    // A new image that refused executes the previous binary, which takes the VM back on the
    // same channel.
    while let Err(UpdateError::NewImage(_, _, e)) = &result {
        if !replaced(&to, e) {
            break;
        }
        log::warn!("cpr-exec: the new image refused; the previous binary takes the VM back");
        // The refused attempt's pause is in `leg` now: the report counts it.
        result = transfer_out::send(&mut runtime.vmm, api, conn, &to, &mut leg, failed);
    }
    match result {
        Ok(()) => transfer_out::committed(&runtime.vmm, api),
        Err(e) => {
            log::error!("cpr-exec: {}", crate::error_chain(&e));
            // The stand-in keeps the guest: the update rolled back after its first leg.
            let failed = Failed::after(e, std::mem::take(&mut leg.earlier));
            api.respond(conn, failed.response(&mut runtime.vmm.history));
            api.end_handoff();
        }
    }
    crate::run_to_end(Ok(got.runtime))
}
