//! The host's 2 MiB huge page pool, for tests of `hugepages=on`.
//!
//! The pool is host-wide: tests that use it run in separate test binaries (cargo runs those
//! one after another) and put the pool back when done.

use crate::meminfo;

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// The pool size, `/proc/sys/vm/nr_hugepages`.
pub fn nr_hugepages() -> Result<u64, String> {
    let text = std::fs::read_to_string(NR_HUGEPAGES)
        .map_err(|e| format!("cannot read {NR_HUGEPAGES}: {e}"))?;
    text.trim()
        .parse()
        .map_err(|_| format!("{NR_HUGEPAGES} holds {text:?}"))
}

fn write_nr_hugepages(n: u64) -> Result<(), String> {
    std::fs::write(NR_HUGEPAGES, format!("{n}\n"))
        .map_err(|e| format!("cannot write {n} to {NR_HUGEPAGES}: {e}"))
}

/// The host's free huge pages, raised to at least `needed` for as long as this lives.
pub struct Reservation {
    /// The pool size to restore on drop, when we changed it.
    restore: Option<u64>,
}

impl Reservation {
    /// Makes at least `needed` huge pages free (raising the pool as root if needed), or
    /// says why that is impossible (the caller prints it as its skip reason).
    pub fn ensure(needed: u64) -> Result<Reservation, String> {
        let free = meminfo("HugePages_Free").ok_or("no HugePages_Free in /proc/meminfo")?;
        if free >= needed {
            return Ok(Reservation { restore: None });
        }
        let before = nr_hugepages()?;
        write_nr_hugepages(before + (needed - free))?;
        let guard = Reservation {
            restore: Some(before),
        };
        let now = meminfo("HugePages_Free").unwrap_or(0);
        if now < needed {
            return Err(format!(
                "raised {NR_HUGEPAGES} from {before} but only {now} huge pages are free, \
                 {needed} needed (host memory too fragmented or limited)"
            ));
        }
        Ok(guard)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(n) = self.restore {
            if let Err(e) = write_nr_hugepages(n) {
                eprintln!("could not restore {NR_HUGEPAGES}: {e}");
            }
        }
    }
}
