//! Keeping a pause's parallel work off the CPU of the thread that hands it out.
//!
//! A receiver's main thread wakes its vCPU threads to restore their vCPUs while it restores
//! the rest. On a host this small the scheduler often wakes them on the main thread's own
//! CPU (it skips the search for an idle CPU when the host looks busy), so the two halves
//! run one after the other with the other CPU idle. For the pause, each vCPU thread's CPU
//! mask leaves out the main thread's CPU when there are CPUs enough for that; the masks are
//! given back after the resume.

/// The vCPU threads moved, with the masks they had.
#[derive(Default)]
pub struct Spread(Vec<(libc::pthread_t, libc::cpu_set_t)>);

impl Spread {
    /// Keeps `threads` off the calling thread's current CPU if each can still have a CPU of
    /// its own (one vCPU thread on two CPUs, say); otherwise changes nothing.
    pub fn off_this_cpu(threads: &[libc::pthread_t]) -> Self {
        // SAFETY: sched_getcpu reads the calling thread's CPU and has no preconditions.
        let cpu = unsafe { libc::sched_getcpu() };
        let mut moved = Vec::new();
        if cpu < 0 {
            return Self(moved);
        }
        for &thread in threads {
            let Some(mask) = affinity(thread) else {
                continue;
            };
            // SAFETY: CPU_COUNT/CPU_ISSET only read the set.
            let (count, here) = unsafe { (libc::CPU_COUNT(&mask), libc::CPU_ISSET(cpu as usize, &mask)) };
            if !here || (count as usize) <= threads.len() {
                continue;
            }
            let mut elsewhere = mask;
            // SAFETY: `cpu` is below CPU_SETSIZE (the kernel returned it).
            unsafe { libc::CPU_CLR(cpu as usize, &mut elsewhere) };
            if set_affinity(thread, &elsewhere) {
                moved.push((thread, mask));
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
    unsafe { libc::pthread_setaffinity_np(thread, std::mem::size_of::<libc::cpu_set_t>(), mask) == 0 }
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
    fn a_thread_leaves_the_callers_cpu_and_gets_its_mask_back() {
        let (tx, rx) = mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let _ = rx.recv();
        });
        let thread = t.as_pthread_t();
        let before = affinity(thread).unwrap();
        let spread = Spread::off_this_cpu(&[thread]);
        let during = affinity(thread).unwrap();
        if count(&before) >= 2 {
            assert_eq!(count(&during), count(&before) - 1);
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
    fn nothing_moves_when_the_threads_would_share_the_other_cpus() {
        let (tx, rx) = mpsc::channel::<()>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        let threads: Vec<_> = (0..64)
            .map(|_| {
                let rx = rx.clone();
                std::thread::spawn(move || {
                    let _ = rx.lock().map(|r| r.recv());
                })
            })
            .collect();
        let handles: Vec<_> = threads.iter().map(|t| t.as_pthread_t()).collect();
        let before = affinity(handles[0]).unwrap();
        if (count(&before) as usize) <= handles.len() {
            let spread = Spread::off_this_cpu(&handles);
            assert!(spread.0.is_empty());
            assert_eq!(count(&affinity(handles[0]).unwrap()), count(&before));
        }
        for _ in &threads {
            let _ = tx.send(());
        }
        drop(tx);
        for t in threads {
            t.join().unwrap();
        }
    }
}
