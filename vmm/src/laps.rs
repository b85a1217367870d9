//! Lap timing of a multi-step operation, logged at debug level (to see where a pause goes).

use std::time::Instant;

/// Marks taken since a start.
#[derive(Debug)]
pub struct Laps {
    what: &'static str,
    last: Instant,
    marks: Vec<(&'static str, u32)>,
    /// The process's minor page faults at the start (read only at debug level).
    faults: Option<i64>,
}

/// Minor page faults of the whole process so far.
fn minor_faults() -> Option<i64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a `rusage` into the valid pointer given.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    // SAFETY: on success getrusage initialized it (it started zeroed anyway).
    (rc == 0).then(|| unsafe { usage.assume_init() }.ru_minflt)
}

impl Laps {
    /// Starts timing `what`.
    pub fn start(what: &'static str) -> Self {
        Self {
            what,
            last: Instant::now(),
            marks: Vec::with_capacity(16),
            faults: if log::log_enabled!(log::Level::Debug) {
                minor_faults()
            } else {
                None
            },
        }
    }

    /// Ends the step `name` now.
    pub fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        let us = (now - self.last).as_micros() as u32;
        self.marks.push((name, us));
        self.last = now;
    }

    /// Logs the steps (µs each) at debug level.
    pub fn log(&self) {
        if log::log_enabled!(log::Level::Debug) {
            let steps: Vec<String> = self
                .marks
                .iter()
                .map(|(n, us)| format!("{n} {us}"))
                .collect();
            let faults = match (self.faults, minor_faults()) {
                (Some(a), Some(b)) => format!(" [{} page faults]", b - a),
                _ => String::new(),
            };
            log::debug!("{} (µs): {}{faults}", self.what, steps.join(", "));
        }
    }
}
