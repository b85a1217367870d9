//! The VMM's event loop (event-manager): VM end notifications, termination signals and
//! serial console input.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::exit::{ExitNotifier, VmExit};
use crate::pio::PioBus;
use crate::serial_backend::SerialIn;

/// The current machine's devices; empty while the machine is being rebuilt.
pub type BusCell = Arc<Mutex<Option<Arc<PioBus>>>>;

/// A subscriber of the VMM's event loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Creates the event loop with the lifecycle subscriber (VM end, SIGINT/SIGTERM), serial
/// input and the virtio devices' events. Call before starting vCPU threads: it blocks
/// SIGINT/SIGTERM for the threads to come.
pub fn build(
    shared: &crate::machine::Shared,
    serial_in: SerialIn,
) -> Result<EventManager<Subscriber>, crate::Error> {
    use crate::Error;
    let signals = termination_signalfd().map_err(Error::EventLoop)?;
    let drained = shared
        .serial_drained
        .try_clone()
        .map_err(Error::EventLoop)?;
    let mut em = EventManager::<Subscriber>::new().map_err(Error::EventManager)?;
    em.add_subscriber(Arc::new(Mutex::new(Lifecycle::new(
        shared.exits.clone(),
        signals,
    ))));
    em.add_subscriber(Arc::new(Mutex::new(SerialInput::new(
        serial_in,
        shared.bus.clone(),
        drained,
    ))));
    em.add_subscriber(Arc::new(Mutex::new(VirtioEvents::new(
        shared.virtio.clone(),
    ))));
    Ok(em)
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: the sigset is initialised by sigemptyset before sigaddset fills it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread (and threads it spawns later).
pub fn block_termination_signals() -> io::Result<()> {
    let set = termination_set();
    // SAFETY: pthread_sigmask only reads the initialised set.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Blocks SIGINT and SIGTERM in the calling thread (and threads it spawns later) and returns
/// a signalfd delivering them.
pub fn termination_signalfd() -> io::Result<File> {
    block_termination_signals()?;
    let set = termination_set();
    // SAFETY: signalfd only reads the initialised set; the returned fd is checked and then
    // owned by the File.
    unsafe {
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(File::from_raw_fd(fd))
    }
}

/// Watches the VM-end eventfd and termination signals.
pub struct Lifecycle {
    exits: Arc<ExitNotifier>,
    signals: File,
}

impl Lifecycle {
    /// A lifecycle subscriber over `exits` and the signalfd from [`termination_signalfd`].
    pub fn new(exits: Arc<ExitNotifier>, signals: File) -> Self {
        Self { exits, signals }
    }
}

impl MutEventSubscriber for Lifecycle {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.signals.as_raw_fd() {
            let mut info = [0u8; 128];
            if let Ok(128) = self.signals.read(&mut info) {
                let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                let name = if signo == libc::SIGINT as u32 {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                self.exits.end(VmExit::Stopped(format!("received {name}")));
            }
        } else {
            let _ = self.exits.event_fd().read();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.exits.event_fd().as_raw_fd(), self.signals.as_raw_fd()] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("event loop: cannot watch fd {fd}: {e:?}");
            }
        }
    }
}

/// Feeds host input into the serial input FIFO, pausing the source while the FIFO is full.
pub struct SerialInput {
    source: SerialIn,
    bus: BusCell,
    drained: EventFd,
    pending: Vec<u8>,
    /// The fd currently supplying input (stdin or the socket client).
    reading: Option<RawFd>,
}

impl SerialInput {
    /// Input from `source` into the serial device on `bus`; `drained` is the device's
    /// "input FIFO empty" eventfd.
    pub fn new(source: SerialIn, bus: BusCell, drained: EventFd) -> Self {
        Self {
            source,
            bus,
            drained,
            pending: Vec::new(),
            reading: None,
        }
    }

    /// Pushes pending bytes into the FIFO; returns true when all of them fit.
    fn flush_pending(&mut self) -> bool {
        if self.pending.is_empty() {
            return true;
        }
        let Some(bus) = self.bus.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return false;
        };
        let mut serial = bus.serial.lock().unwrap_or_else(|p| p.into_inner());
        match serial.enqueue_input(&self.pending) {
            Ok(n) => {
                self.pending.drain(..n);
            }
            Err(e) => {
                log::warn!("serial input dropped: {e}");
                self.pending.clear();
            }
        }
        self.pending.is_empty()
    }

    fn read_from(&mut self, fd: RawFd, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        // SAFETY: reading into a stack buffer of the given length from an fd we watch.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            self.pending.extend_from_slice(&buf[..n as usize]);
            if !self.flush_pending() {
                // Stop reading until the guest drains the FIFO.
                let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
            }
            return;
        }
        let err = io::Error::last_os_error();
        if n < 0 && err.kind() == io::ErrorKind::WouldBlock {
            return;
        }
        // EOF or error: this source is finished.
        let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
        self.reading = None;
        if let SerialIn::Socket(backend) = &self.source {
            *backend.client() = None;
            log::info!("serial socket client disconnected");
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        let SerialIn::Socket(backend) = &self.source else {
            return;
        };
        let Ok((stream, _)) = backend.listener.accept() else {
            return;
        };
        let mut guard = backend.client();
        if guard.is_some() {
            log::warn!("serial socket: refusing a second client");
            return;
        }
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("serial socket: {e}");
            return;
        }
        let fd = stream.as_raw_fd();
        *guard = Some(stream);
        drop(guard);
        if ops.add(Events::new_raw(fd, EventSet::IN)).is_ok() {
            self.reading = Some(fd);
        }
        log::info!("serial socket client connected");
    }
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.drained.as_raw_fd() {
            let _ = self.drained.read();
            if self.flush_pending() {
                if let Some(src) = self.reading {
                    // Re-arm the source (ignored if it is still armed).
                    let _ = ops.add(Events::new_raw(src, EventSet::IN));
                }
            }
        } else if let SerialIn::Socket(backend) = &self.source {
            if fd == backend.listener.as_raw_fd() {
                self.accept(ops);
            } else {
                self.read_from(fd, ops);
            }
        } else {
            self.read_from(fd, ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.drained, EventSet::IN));
        match &self.source {
            SerialIn::Stdin => {
                let fd = libc::STDIN_FILENO;
                // epoll refuses regular files and /dev/null; such stdin simply gives no input.
                if ops.add(Events::new_raw(fd, EventSet::IN)).is_ok() {
                    self.reading = Some(fd);
                }
            }
            SerialIn::Socket(backend) => {
                let _ = ops.add(Events::new(&backend.listener, EventSet::IN));
            }
            SerialIn::None => {}
        }
    }
}

/// Queue notifications (ioeventfds) and backend input (taps) of the virtio devices.
pub struct VirtioEvents {
    virtio: Arc<crate::virtio::Virtio>,
    by_fd: std::collections::HashMap<RawFd, (usize, Option<usize>)>,
}

impl VirtioEvents {
    /// Watches the fds of `virtio`'s devices.
    pub fn new(virtio: Arc<crate::virtio::Virtio>) -> Self {
        let by_fd = virtio
            .watched_fds()
            .into_iter()
            .map(|(fd, slot, queue)| (fd, (slot, queue)))
            .collect();
        Self { virtio, by_fd }
    }
}

impl MutEventSubscriber for VirtioEvents {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if let Some(&(slot, queue)) = self.by_fd.get(&events.fd()) {
            self.virtio.service(slot, queue);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (&fd, &(_, queue)) in &self.by_fd {
            // Backends are edge-triggered: a device without guest buffers holds one frame and
            // reads again when the guest refills its queue.
            let set = match queue {
                Some(_) => EventSet::IN,
                None => EventSet::IN | EventSet::EDGE_TRIGGERED,
            };
            if let Err(e) = ops.add(Events::new_raw(fd, set)) {
                log::error!("event loop: cannot watch virtio fd {fd}: {e:?}");
            }
        }
    }
}
