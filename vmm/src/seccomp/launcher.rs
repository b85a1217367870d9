//! The one thread molt never filters: it starts processes and executes the next image for
//! the (filtered) main thread, so that a live update's new image starts with no filter at
//! all (filters survive `execve`). Started by [`crate::control::Control`] before the main
//! thread's filter; it blocks the signals the main thread blocks (it is spawned after the
//! event loop blocked SIGINT/SIGTERM), so the process's signal handling does not change.
//!
//! `execve` from this thread ends every other thread, the main thread included, and the
//! process keeps its PID; a failed `execve` returns its error to the main thread.

use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

static LAUNCHER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();

/// Starts the launcher (once per process). Until it runs, [`run`] runs jobs inline.
pub fn start() -> std::io::Result<()> {
    if LAUNCHER.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("launcher".into())
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                job();
            }
        })?;
    let _ = LAUNCHER.set(Mutex::new(tx));
    Ok(())
}

/// Whether [`start`] has run in this process.
pub fn running() -> bool {
    LAUNCHER.get().is_some()
}

/// Runs `f` on the launcher thread and returns its result; inline when there is no launcher.
/// `None` if the launcher is gone.
pub fn run<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
    let Some(tx) = LAUNCHER.get() else {
        return Some(f());
    };
    let (rtx, rrx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = rtx.send(f());
    });
    tx.lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .ok()?;
    rrx.recv().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_on_the_launcher_thread() {
        let inline = run(|| std::thread::current().name().map(String::from));
        start().unwrap();
        assert!(running());
        let there = run(|| std::thread::current().name().map(String::from)).unwrap();
        assert_eq!(there.as_deref(), Some("launcher"));
        assert_ne!(inline.flatten().as_deref(), Some("launcher"));
    }
}
