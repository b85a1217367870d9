//! The host's 2 MiB huge page pool (`/proc/sys/vm/nr_hugepages`), raised for a `hugepages=on`
//! configuration and put back when the [`Reservation`] is dropped (also on error, panic or
//! interrupt: the benchmark returns through the guards).

use crate::error::{Error, Result};
use crate::procfs::meminfo;

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

fn read_pool() -> Result<u64> {
    let text = std::fs::read_to_string(NR_HUGEPAGES)
        .map_err(|e| Error::io(format!("cannot read {NR_HUGEPAGES}"), e))?;
    text.trim()
        .parse()
        .map_err(|_| Error::HugePages(format!("{NR_HUGEPAGES} holds {text:?}")))
}

fn write_pool(n: u64) -> Result<()> {
    std::fs::write(NR_HUGEPAGES, format!("{n}\n"))
        .map_err(|e| Error::io(format!("cannot write {n} to {NR_HUGEPAGES}"), e))
}

/// At least `needed` free huge pages for as long as this lives.
pub struct Reservation {
    /// The pool size to restore on drop, when we changed it.
    restore: Option<u64>,
}

impl Reservation {
    /// Makes `needed` huge pages free, raising the pool (root only) when fewer are free.
    /// The error says why that is impossible; the pool is already restored then.
    pub fn ensure(needed: u64) -> Result<Reservation> {
        let free = meminfo("HugePages_Free")
            .ok_or_else(|| Error::HugePages("no HugePages_Free in /proc/meminfo".into()))?;
        if free >= needed {
            return Ok(Reservation { restore: None });
        }
        let before = read_pool()?;
        // Built before the write: if the write half-succeeds, dropping it restores the pool.
        let guard = Reservation {
            restore: Some(before),
        };
        write_pool(before + (needed - free))?;
        let now = meminfo("HugePages_Free").unwrap_or(0);
        if now < needed {
            return Err(Error::HugePages(format!(
                "host cannot supply {needed} free 2 MiB pages: raising {NR_HUGEPAGES} from \
                 {before} left {now} free (memory too fragmented or too small)"
            )));
        }
        Ok(guard)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(n) = self.restore {
            if let Err(e) = write_pool(n) {
                eprintln!("molt-bench: warning: could not restore {NR_HUGEPAGES}: {e}");
            }
        }
    }
}
