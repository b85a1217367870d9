//! Keeps the host's CPUs out of idle states around an update's pause.
//!
//! An idle CPU that halts takes a while to wake: on this kind of host (a cloud VM whose
//! `haltpoll` cpuidle driver does not poll), tens to hundreds of µs, because its own
//! hypervisor must run it again. An update's pause is a relay of wake-ups between threads and
//! processes (the vCPU threads, the new image, its builder thread, the holder, a vhost-user
//! backend), each landing on whichever CPU is free; each one paid that latency. A PM QoS
//! request for zero wake-up latency (`/dev/cpu_dma_latency`, the kernel's
//! `cpu_latency_qos` interface) makes idle CPUs poll instead of halt while it is held.
//!
//! It is held from an update's preparation (old image or transfer sender) until shortly after
//! the guest runs again (new image or receiver), so the polling costs a few tens of ms of idle
//! CPU time per update. Closing the fd withdraws the request; the holder's copy of the fd
//! table keeps the old image's request across `execve` until the commit. Without the device
//! or the permission to open it, updates go on as before.

use std::fs::File;
use std::io::Write;
use std::time::{Duration, Instant};

/// The kernel's CPU wake-up latency request device.
const DEVICE: &str = "/dev/cpu_dma_latency";
/// How long the request is kept after the guest runs again: the guest's devices catch up.
pub const AFTER_RESUME: Duration = Duration::from_millis(20);

/// A held request for zero CPU wake-up latency; dropping it withdraws the request.
#[derive(Debug)]
pub struct CpusAwake {
    _request: File,
    until: Option<Instant>,
}

impl CpusAwake {
    /// Asks the kernel to keep every CPU out of idle states until dropped; `None` (logged)
    /// when the request cannot be made.
    pub fn hold() -> Option<Self> {
        let made = File::options().write(true).open(DEVICE).and_then(|mut f| {
            f.write_all(&0i32.to_ne_bytes())?;
            Ok(f)
        });
        match made {
            Ok(request) => Some(Self {
                _request: request,
                until: None,
            }),
            Err(e) => {
                log::debug!("the CPUs may idle through the update: {DEVICE}: {e}");
                None
            }
        }
    }

    /// A request made now, to be withdrawn [`AFTER_RESUME`] from now.
    pub fn after_resume() -> Option<Self> {
        Self::hold().map(|mut h| {
            h.until = Some(Instant::now() + AFTER_RESUME);
            h
        })
    }

    /// When the event loop withdraws the request (`None`: whoever holds it drops it).
    pub fn until(&self) -> Option<Instant> {
        self.until
    }
}
