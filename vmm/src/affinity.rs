//! Keeping a pause's parallel work on CPUs of its own.
//!
//! A receiver's main thread (a transfer's receiver, or the new image of a cpr-exec) wakes
//! its vCPU threads to restore their vCPUs while it restores the rest, then resumes them. On
//! a host this small the scheduler often wakes a thread on the waker's CPU (it skips the
//! search for an idle CPU when the host looks busy): the two halves of the restore then ran
//! one after the other beside an idle CPU, and with two vCPUs on two CPUs the second vCPU
//! thread waited behind the first, already running the guest, for the rest of its time slice
//! (1.4–1.9 ms); after a cpr-exec the main thread itself waited 1.4 ms behind the resumed
//! vCPU before it could answer the request. For the pause, each vCPU thread is kept on a CPU
//! of its own when there are CPUs enough — the CPUs other than the main thread's first — and
//! the masks are given back after the resume.

/// The vCPU threads moved, with the masks they had.
#[derive(Default)]
pub struct Spread(Vec<(libc::pthread_t, libc::cpu_set_t)>);

impl Spread {
    /// Puts each of `threads` on a CPU of its own, the calling thread's current CPU last, if
    /// their masks have CPUs enough; otherwise changes nothing.
    pub fn one_cpu_each(threads: &[libc::pthread_t]) -> Self {
        // SAFETY: sched_getcpu reads the calling thread's CPU and has no preconditions.
        let here = unsafe { libc::sched_getcpu() };
        let mut moved = Vec::new();
        let Some(mask) = threads.first().and_then(|&t| affinity(t)) else {
            return Self(moved);
        };
        let mut cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            // SAFETY: CPU_ISSET only reads the set; `c` is below CPU_SETSIZE.
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &mask) })
            .collect();
        if cpus.len() < 2 || cpus.len() < threads.len() {
            return Self(moved);
        }
        // The main thread's CPU last: with a CPU to spare, no vCPU thread shares it.
        cpus.sort_by_key(|&c| c as libc::c_int == here);
        for (&thread, &cpu) in threads.iter().zip(&cpus) {
            let Some(old) = affinity(thread) else {
                continue;
            };
            // SAFETY: an all-zero cpu_set_t is a valid empty set.
            let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: `cpu` is below CPU_SETSIZE (it came from the loop above).
            unsafe { libc::CPU_SET(cpu, &mut one) };
            if set_affinity(thread, &one) {
                moved.push((thread, old));
            }
        }
        Self(moved)
    }

    /// Gives the threads their masks back (widening a mask moves nothing).
    pub fn undo(self) {
        for (thread, mask) in &self.0 {
            if !set_affinity(*thread, mask) {
                log::debug!("cannot give a vCPU thread its CPU mask back");
            }
        }
    }
}

fn affinity(thread: libc::pthread_t) -> Option<libc::cpu_set_t> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut mask: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `thread` is a live thread of this process (the caller keeps its handle) and
    // the set is as large as the size given.
    let rc = unsafe {
        libc::pthread_getaffinity_np(thread, std::mem::size_of::<libc::cpu_set_t>(), &mut mask)
    };
    (rc == 0).then_some(mask)
}

fn set_affinity(thread: libc::pthread_t, mask: &libc::cpu_set_t) -> bool {
    // SAFETY: as in `affinity`; the kernel only reads the set.
    unsafe {
        libc::pthread_setaffinity_np(thread, std::mem::size_of::<libc::cpu_set_t>(), mask) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::mpsc;

    fn count(mask: &libc::cpu_set_t) -> i32 {
        // SAFETY: reads the set.
        unsafe { libc::CPU_COUNT(mask) }
    }

    #[test]
    fn one_thread_leaves_the_callers_cpu_and_gets_its_mask_back() {
        let (tx, rx) = mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let _ = rx.recv();
        });
        let thread = t.as_pthread_t();
        let before = affinity(thread).unwrap();
        // SAFETY: reads the calling thread's CPU.
        let here = unsafe { libc::sched_getcpu() } as usize;
        let spread = Spread::one_cpu_each(&[thread]);
        let during = affinity(thread).unwrap();
        if count(&before) >= 2 {
            assert_eq!(count(&during), 1);
            // SAFETY: reads the set.
            assert!(!unsafe { libc::CPU_ISSET(here, &during) });
            assert_eq!(spread.0.len(), 1);
        } else {
            assert_eq!(count(&during), count(&before));
            assert!(spread.0.is_empty());
        }
        spread.undo();
        assert_eq!(count(&affinity(thread).unwrap()), count(&before));
        tx.send(()).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn threads_get_distinct_cpus_or_none_when_there_are_too_few() {
        let (tx, rx) = mpsc::channel::<()>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let rx = rx.clone();
                std::thread::spawn(move || {
                    let _ = rx.lock().map(|r| r.recv());
                })
            })
            .collect();
        let handles: Vec<_> = threads.iter().map(|t| t.as_pthread_t()).collect();
        let before = count(&affinity(handles[0]).unwrap());
        let spread = Spread::one_cpu_each(&handles);
        let masks: Vec<_> = handles.iter().map(|&h| affinity(h).unwrap()).collect();
        if before >= 2 {
            assert!(masks.iter().all(|m| count(m) == 1));
            // SAFETY: CPU_EQUAL only reads the sets.
            assert!(!unsafe { libc::CPU_EQUAL(&masks[0], &masks[1]) });
        } else {
            assert!(spread.0.is_empty());
        }
        spread.undo();
        assert!(handles
            .iter()
            .all(|&h| count(&affinity(h).unwrap()) == before));
        let many: Vec<_> = std::iter::repeat_n(handles[0], before as usize + 1).collect();
        assert!(Spread::one_cpu_each(&many).0.is_empty());
        for _ in &threads {
            let _ = tx.send(());
        }
        drop(tx);
        for t in threads {
            t.join().unwrap();
        }
    }
}
