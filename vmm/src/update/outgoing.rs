//! The old image's side of cpr-exec: pause, capture, hand off, `execve`. Returns only when
//! the update did not happen, after undoing everything: the guest runs on here.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Instant;

use cpr::FdRegistry;

use super::guardian::Guardian;
use super::handoff::{fd_names, ApiConnHandoff, ApiHandoff, Handoff, InFlight};
use super::{
    validate_target, UpdateError, ENV_EXEC_NS, ENV_GUARDIAN_PID, ENV_PREVIOUS_EXE_FD,
    ENV_RECORD_FD, HANDOFF_KIND, PROTOCOL_ENV,
};
use crate::api::{ApiServer, ConnId, CprExecRequest};
use crate::runtime::{RunState, Vmm};
use crate::serial_backend::SerialOut;
use crate::state::now_ns;

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Performs the update `req` asked for on connection `conn`. On success this never returns
/// (the process is the new image); the error says why the guest still runs here.
pub fn perform(
    vmm: &mut Vmm,
    api: &mut ApiServer,
    conn: ConnId,
    req: &CprExecRequest,
) -> UpdateError {
    let target = match &req.binary {
        Some(p) => validate_target(p),
        None => validate_target(&vmm.identity.exe),
    };
    let target = match target {
        Ok(t) => t,
        Err(e) => return e,
    };
    let argv = match &req.args {
        Some(args) => std::iter::once(target.display().to_string())
            .chain(args.iter().cloned())
            .collect(),
        None => vmm.identity.argv.clone(),
    };
    // The guardian starts while the guest still runs; it gets the fds just before execve.
    let guardian = match Guardian::spawn() {
        Ok(g) => Some(g),
        Err(e) => {
            log::warn!("live update without a guardian: {e}");
            None
        }
    };
    let was_paused = vmm.run_state() == RunState::Paused;
    let t0 = Instant::now();
    let paused_at_ns = now_ns();
    if let Err(e) = vmm.pause() {
        return UpdateError::Capture(e.to_string());
    }
    let pause_ms = ms(t0.elapsed());
    let err = hand_off(
        vmm,
        api,
        conn,
        &target,
        argv,
        paused_at_ns,
        pause_ms,
        was_paused,
        guardian,
    );
    if !was_paused {
        if let Err(e) = vmm.resume() {
            log::error!("cannot resume the guest after a failed update: {e}");
        }
    }
    err
}

#[allow(clippy::too_many_arguments)]
fn hand_off(
    vmm: &mut Vmm,
    api: &mut ApiServer,
    conn: ConnId,
    target: &Path,
    argv: Vec<String>,
    paused_at_ns: u64,
    pause_ms: f64,
    was_paused: bool,
    guardian: Option<Guardian>,
) -> UpdateError {
    let t1 = Instant::now();
    let Some(machine) = vmm.machine_ref() else {
        return UpdateError::Capture("no machine".into());
    };
    let state = match machine.capture() {
        Ok(s) => s,
        Err(e) => return UpdateError::Capture(e.to_string()),
    };
    // One update at a time: clients that ask for another meanwhile get 409 now; everything
    // else they sent is carried over and answered by the new image.
    api.refuse_updates();
    let carried = api.carried(conn);
    let mut reg = FdRegistry::new();
    if let Err(e) = register_fds(&mut reg, vmm, api, conn) {
        return UpdateError::Fds(e);
    }
    let mut others = Vec::with_capacity(carried.len());
    for c in carried {
        let name = format!("{}{}", fd_names::API_CONN_PREFIX, c.id);
        if let Err(e) = reg.register(&name, borrow(c.fd)) {
            return UpdateError::Fds(e);
        }
        others.push(ApiConnHandoff {
            id: c.id,
            fd: name,
            unread: c.unread,
        });
    }
    let handoff = Handoff {
        vm: state,
        config: vmm.config().clone(),
        argv: vmm.identity.argv.clone(),
        fds: reg.describe(),
        api: Some(ApiHandoff {
            path: api.path().to_path_buf(),
            waiting: Some(ApiConnHandoff {
                id: conn,
                fd: format!("{}{conn}", fd_names::API_CONN_PREFIX),
                unread: Vec::new(),
            }),
            others,
            next_id: api.next_id(),
        }),
        update: InFlight {
            from_version: crate::VERSION.to_string(),
            target: target.to_path_buf(),
            previous: vmm.identity.exe.clone(),
            paused_at_ns,
            pause_ms,
            save_ms: 0.0,
            saved_at_ns: 0,
            was_paused,
            carried_requests: 0,
        },
        history: vmm.history.clone(),
        counters: vmm.counters.clone(),
        booted_at_ns: vmm.identity.booted_at_ns,
        #[cfg(feature = "test-next")]
        next_only: super::handoff::NextOnly {
            writer: crate::VERSION.to_string(),
        },
    };
    let mut handoff = handoff;
    if let Some(m) = vmm.machine_ref() {
        handoff.update.carried_requests =
            crate::virtio::pending_requests(&handoff.vm.virtio, &m.ram().mem);
    }
    handoff.update.save_ms = ms(t1.elapsed());
    handoff.update.saved_at_ns = now_ns();
    let t_encode = Instant::now();
    let bytes = match cpr::encode(&format!("molt {}", crate::VERSION), HANDOFF_KIND, &handoff) {
        Ok(b) => b,
        Err(e) => return UpdateError::Record(e),
    };
    let record = match cpr::write_sealed(&bytes) {
        Ok(fd) => fd,
        Err(e) => return UpdateError::Memfd(e),
    };
    if let Err(e) = reg.register("record", record.as_fd()) {
        return UpdateError::Fds(e);
    }
    log::info!(
        "live update: {} bytes of state, {} fds preserved, executing {}",
        bytes.len(),
        reg.len(),
        target.display()
    );
    if let Err(e) = reg.preserve_all() {
        return UpdateError::Fds(e);
    }
    let exe_fd = vmm.identity.exe_file.as_ref().map(|f| f.as_raw_fd());
    let t_guardian = Instant::now();
    let guardian = guardian.and_then(|g| {
        let fds: Vec<(String, RawFd)> =
            reg.describe().into_iter().map(|p| (p.name, p.fd)).collect();
        match g.hand_over(&fds) {
            Ok(()) => Some(g),
            Err(e) => {
                log::warn!("live update without a guardian: handover failed: {e}");
                g.dismiss();
                None
            }
        }
    });
    // Last step before execve: hold the address space and the KVM VM so their teardown
    // happens outside the pause.
    let t_holder = Instant::now();
    let holder = match super::holder::Holder::start() {
        Ok(h) => Some(h),
        Err(e) => {
            log::warn!("live update without an address-space holder: {e}");
            None
        }
    };
    log::debug!(
        "update: record and fds {:?}, guardian {:?}, holder {:?}",
        t_guardian - t_encode,
        t_holder - t_guardian,
        t_holder.elapsed()
    );
    let err = exec(
        target,
        &argv,
        record.as_raw_fd(),
        exe_fd,
        guardian.as_ref().map(Guardian::pid),
    );
    // execve failed: undo.
    if let Some(h) = holder {
        h.release();
    }
    if let Err(e) = reg.restore_cloexec() {
        log::error!("cannot restore close-on-exec after a failed update: {e}");
    }
    if let Some(g) = guardian {
        g.dismiss();
    }
    drop(record);
    err
}

fn borrow(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: only used to register fds that stay open for the rest of the update (owned by
    // the VMM, the API server or the serial backend); the registry does not close them.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

fn register_fds(
    reg: &mut FdRegistry,
    vmm: &Vmm,
    api: &ApiServer,
    conn: ConnId,
) -> Result<(), cpr::FdError> {
    if let Some(m) = vmm.machine_ref() {
        for (i, r) in m.ram().regions.iter().enumerate() {
            reg.register(&fd_names::ram(i), r.memfd.as_fd())?;
        }
    }
    if let Some(f) = &vmm.identity.exe_file {
        reg.register(fd_names::PREVIOUS_EXE, f.as_fd())?;
    }
    for (i, slot) in vmm.shared.virtio.slots.iter().enumerate() {
        if let Some(f) = &slot.backing {
            reg.register(&fd_names::virtio(i), f.as_fd())?;
        }
    }
    match vmm.serial_out() {
        SerialOut::File(f) => reg.register(fd_names::SERIAL_FILE, f.as_fd())?,
        SerialOut::Socket(client) => {
            let guard = client.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(stream) = guard.as_ref() {
                reg.register(fd_names::SERIAL_CLIENT, borrow(stream.as_raw_fd()))?;
            }
        }
        SerialOut::Stdout | SerialOut::Null => {}
    }
    if let Some(fd) = vmm.serial_listener {
        reg.register(fd_names::SERIAL_LISTENER, borrow(fd))?;
    }
    reg.register(fd_names::API_LISTENER, borrow(api.listener_fd()))?;
    if let Some(fd) = api.connection_fd(conn) {
        reg.register(&format!("{}{conn}", fd_names::API_CONN_PREFIX), borrow(fd))?;
    }
    Ok(())
}

fn exec(
    target: &Path,
    argv: &[String],
    record: RawFd,
    exe: Option<RawFd>,
    guardian: Option<u32>,
) -> UpdateError {
    let Ok(path) = CString::new(target.as_os_str().as_bytes()) else {
        return UpdateError::Nul;
    };
    let Some(args) = argv
        .iter()
        .map(|a| CString::new(a.as_str()).ok())
        .collect::<Option<Vec<_>>>()
    else {
        return UpdateError::Nul;
    };
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !PROTOCOL_ENV.iter().any(|p| k == p))
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    let mut push = |k: &str, v: String| {
        if let Ok(c) = CString::new(format!("{k}={v}")) {
            env.push(c);
        }
    };
    push(ENV_RECORD_FD, record.to_string());
    if let Some(fd) = exe {
        push(ENV_PREVIOUS_EXE_FD, fd.to_string());
    }
    if let Some(pid) = guardian {
        push(ENV_GUARDIAN_PID, pid.to_string());
    }
    push(ENV_EXEC_NS, now_ns().to_string());
    let mut argv_p: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut env_p: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    env_p.push(std::ptr::null());
    // SAFETY: path, argv and envp are valid NUL-terminated C strings / NULL-terminated arrays
    // that outlive the call; execve only returns on failure.
    unsafe { libc::execve(path.as_ptr(), argv_p.as_ptr(), env_p.as_ptr()) };
    UpdateError::Exec(target.to_path_buf(), std::io::Error::last_os_error())
}
