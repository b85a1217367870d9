//! Lap timing of a multi-step operation, logged at debug level (to see where a pause goes).

use std::time::Instant;

/// Marks taken since a start.
#[derive(Debug)]
pub struct Laps {
    what: &'static str,
    last: Instant,
    marks: Vec<(&'static str, u32)>,
}

impl Laps {
    /// Starts timing `what`.
    pub fn start(what: &'static str) -> Self {
        Self {
            what,
            last: Instant::now(),
            marks: Vec::with_capacity(16),
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
            log::debug!("{} (µs): {}", self.what, steps.join(", "));
        }
    }
}
