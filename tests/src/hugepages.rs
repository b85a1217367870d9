//! The host's 2 MiB huge page pool, for tests of `hugepages=on`.
//!
//! The pool is host-wide. Test binaries run one after another; the tests inside one run in
//! parallel, so each [`Reservation`] adds pages of its own and gives back just those.

use std::sync::{Mutex, MutexGuard};

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

/// Reservations of this process are made and given back one at a time.
static POOL_LOCK: Mutex<()> = Mutex::new(());

fn pool_lock() -> MutexGuard<'static, ()> {
    POOL_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `needed` huge pages added to the host's pool for as long as this lives (tests in one
/// binary run in parallel: each adds its own pages and takes back only those, so one test
/// giving its pages back never takes another's).
pub struct Reservation {
    /// Pages this reservation added to the pool.
    added: u64,
}

impl Reservation {
    /// Adds `needed` huge pages to the pool (as root), or, where the pool cannot be raised,
    /// checks that `needed` are free; or says why neither works (the caller prints it as its
    /// skip reason).
    pub fn ensure(needed: u64) -> Result<Reservation, String> {
        let _lock = pool_lock();
        let free = meminfo("HugePages_Free").ok_or("no HugePages_Free in /proc/meminfo")?;
        let before = nr_hugepages()?;
        if let Err(e) = write_nr_hugepages(before + needed) {
            return if free >= needed {
                Ok(Reservation { added: 0 })
            } else {
                Err(format!("{free} huge pages free, {needed} needed, and {e}"))
            };
        }
        let added = nr_hugepages()?.saturating_sub(before);
        let guard = Reservation { added };
        if added < needed && free + added < needed {
            return Err(format!(
                "raised {NR_HUGEPAGES} from {before} by {needed} but it grew by {added}, \
                 {free} were free before (host memory too fragmented or limited)"
            ));
        }
        Ok(guard)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.added == 0 {
            return;
        }
        let _lock = pool_lock();
        let result =
            nr_hugepages().and_then(|now| write_nr_hugepages(now.saturating_sub(self.added)));
        if let Err(e) = result {
            eprintln!("could not give back {} huge pages: {e}", self.added);
        }
    }
}
