//! SIGINT/SIGTERM turn into an [`Error::Interrupted`](crate::error::Error::Interrupted) at the
//! next check, so the guards (molt processes, huge page pool, temporary directory) are
//! dropped and undo what they did instead of the process dying on the spot.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Installs the handler for SIGINT and SIGTERM.
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; it is a
        // valid `extern "C" fn(c_int)` for the whole life of the process.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// `Err(Interrupted)` once a signal arrived.
pub fn check() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}
