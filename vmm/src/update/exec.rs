//! The exec transport: the record goes into a sealed memfd, exactly the declared fds lose
//! close-on-exec, a guardian gets copies, a holder keeps the old address space for teardown
//! after the pause, and the process `execve`s the new binary with the `cpr` environment
//! contract. Returns only when the exec failed, after undoing every step.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use cpr::{CommitPage, ExecEnv, FdRegistry, Transport};

use super::guardian::Guardian;
use super::holder::Holder;
use super::UpdateError;
use crate::persist::FdRole;
use crate::state::now_ns;

/// Hands the VM to a new image of this process.
pub struct ExecTransport<'a> {
    /// The binary to execute.
    pub target: PathBuf,
    /// Its argv.
    pub argv: Vec<String>,
    /// The running binary, kept for a rollback.
    pub previous_exe: Option<&'a File>,
    /// Started before the pause; gets the fds just before `execve`.
    pub guardian: Option<Guardian>,
    /// Started before the pause: holds the address space and the KVM VM across `execve`.
    pub holder: Option<Holder>,
    /// The handoff's commit page, created before the pause.
    pub commit: CommitPage,
}

impl Transport for ExecTransport<'_> {
    type Error = UpdateError;

    fn deliver(&mut self, record: &[u8], fds: &mut FdRegistry) -> Result<(), UpdateError> {
        let memfd = cpr::write_sealed(record).map_err(UpdateError::Memfd)?;
        fds.register(&FdRole::Record.to_string(), &memfd)
            .map_err(UpdateError::Fds)?;
        fds.register(&FdRole::Commit.to_string(), self.commit.fd())
            .map_err(UpdateError::Fds)?;
        if let Some(exe) = self.previous_exe {
            fds.register(&FdRole::PreviousExe.to_string(), exe)
                .map_err(UpdateError::Fds)?;
        }
        log::info!(
            "live update: {} bytes of state, {} fds preserved, executing {}",
            record.len(),
            fds.len(),
            self.target.display()
        );
        fds.preserve_all().map_err(UpdateError::Fds)?;
        let err = self.exec_with_safety_nets(memfd.as_fd().as_raw_fd(), fds);
        // execve failed: undo.
        if let Err(e) = fds.restore_cloexec() {
            log::error!("cannot restore close-on-exec after a failed update: {e}");
        }
        Err(err)
    }
}

impl ExecTransport<'_> {
    /// Gives the guardian its copies, starts the holder, and executes; returns the error once
    /// the guardian and the holder are gone again.
    fn exec_with_safety_nets(&mut self, record_fd: RawFd, fds: &FdRegistry) -> UpdateError {
        let t0 = Instant::now();
        let guardian = self.guardian.take().and_then(|g| {
            let list: Vec<(String, RawFd)> =
                fds.describe().into_iter().map(|p| (p.name, p.fd)).collect();
            match g.hand_over(&list) {
                Ok(()) => Some(g),
                Err(e) => {
                    log::warn!("live update without a guardian: handover failed: {e}");
                    g.dismiss();
                    None
                }
            }
        });
        log::debug!("update: guardian {:?}", t0.elapsed());
        let holder = self.holder.take();
        // The next image dismisses the guardian through a pidfd (it keeps only this one fd
        // besides the declared ones; the guardian does not get a copy of it).
        let guardian_pidfd = guardian
            .as_ref()
            .filter(|g| super::sys::set_cloexec(g.pidfd(), false).is_ok())
            .map(|g| g.pidfd().as_raw_fd());
        let env = ExecEnv {
            record_fd,
            previous_exe_fd: self.previous_exe.map(|f| f.as_raw_fd()),
            exec_ns: Some(now_ns()),
            rollback: None,
            takeover: false,
            guardian_pidfd,
            commit_fd: Some(self.commit.fd().as_raw_fd()),
        };
        let err = exec(&self.target, &self.argv, env);
        if let Some(h) = holder {
            h.release();
        }
        if let Some(g) = guardian {
            g.dismiss();
        }
        err
    }
}

/// Executes on the unfiltered launcher thread (a seccomp filter on the exec'ing thread would
/// be inherited by the new image).
fn exec(target: &Path, argv: &[String], env: ExecEnv) -> UpdateError {
    let vars = env.apply(cpr::exec::clean_env());
    let (path, argv) = (target.to_path_buf(), argv.to_vec());
    let result = crate::seccomp::launcher::run(move || cpr::exec::exec_path(&path, &argv, vars));
    match result {
        Some(Err(e)) => UpdateError::Exec(target.to_path_buf(), e),
        Some(Ok(never)) => match never {},
        None => UpdateError::Exec(
            target.to_path_buf(),
            cpr::ExecError::Exec(std::io::Error::other("the launcher thread is gone")),
        ),
    }
}

impl Drop for ExecTransport<'_> {
    fn drop(&mut self) {
        // A handover that failed before the guardian got its fds: it has nothing to guard.
        if let Some(g) = self.guardian.take() {
            g.dismiss();
        }
        if let Some(h) = self.holder.take() {
            h.release();
        }
    }
}
