//! vCPU threads: an explicit state machine (Running / Paused / Exiting) driven by requests
//! from the VMM and kicked out of KVM_RUN with `immediate_exit` plus a signal.

use std::cell::Cell;
use std::collections::VecDeque;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;

use arch::vcpu_state;
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::exit::{ExitNotifier, VmExit};
use crate::pio::PioBus;

/// What a vCPU thread is doing, or is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuRunState {
    /// Executing guest code.
    Running,
    /// Out of KVM_RUN. A PIO/MMIO instruction it stopped in is completed by the next
    /// `KVM_RUN`: a capture makes one with `immediate_exit` first
    /// (`arch::vcpu_state::capture`), a resume simply runs the guest again.
    Paused,
    /// Leaving its loop; the thread ends.
    Exiting,
}

/// Offset from SIGRTMIN of the signal that kicks a vCPU out of KVM_RUN.
const KICK_SIGNAL_OFFSET: i32 = 0;

thread_local! {
    /// This thread's `kvm_run` area, so the kick handler can set `immediate_exit`.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's live kvm_run mapping; it is cleared before
            // the VcpuFd (and its mapping) is dropped. A byte store is signal-safe.
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, kick_handler);
    });
    result
}

/// Work run on a parked vCPU thread, which owns the vCPU fd.
type Job = Box<dyn FnOnce(&mut VcpuFd) + Send>;

struct Shared {
    requested: VcpuRunState,
    current: VcpuRunState,
    jobs: VecDeque<Job>,
    /// After the jobs it runs now, the thread polls for its next request for a moment
    /// rather than sleeping (a restore inside a pause: the request to run follows at once).
    spin_after_jobs: bool,
    /// What a thread started ahead of its machine waits for, until it takes it.
    start: Option<Start>,
    /// A thread started ahead of its machine is set up (signals, filter) and waits.
    ready: bool,
    /// Wall-clock ns when the thread last went from parked to running the guest.
    running_since_ns: u64,
}

/// Stack a capture or a restore may use on a vCPU thread, faulted in ahead.
const WARM_STACK: usize = 64 << 10;
/// Heap blocks of a page faulted in ahead in the thread's malloc arena: freed, they stay
/// there (below glibc's trim threshold) for the capture's or restore's allocations.
const WARM_HEAP_PAGES: usize = 12;

/// Faults in what a capture or a restore on this thread will touch — the top of its stack
/// and some heap in its malloc arena — so that inside a pause they do not fault: a page
/// fault costs several µs under PVM, and a first capture took a dozen of them. Call outside
/// any pause.
pub fn warm_this_thread() {
    #[inline(never)]
    fn stack() {
        let mut buf = [0u8; WARM_STACK];
        std::hint::black_box(&mut buf);
    }
    stack();
    // Not zeroes: a fresh allocation may already read as zero, and its pages untouched.
    let pages: Vec<Vec<u8>> = (0..WARM_HEAP_PAGES).map(|_| vec![0xa5u8; 4096]).collect();
    std::hint::black_box(&pages);
}

/// The control block shared between a vCPU thread and the VMM.
pub struct VcpuControl {
    state: Mutex<Shared>,
    changed: Condvar,
    /// Bumped with every notification, for a thread polling without the lock.
    changes: AtomicU32,
    /// Whether the request is Running (a copy of `requested` readable without the lock).
    run_requested: AtomicBool,
    /// Whether the thread is in (or about to enter) KVM_RUN: only then does a request need
    /// a kick (a signal costs 40–60 µs of the thread's time here, inside the pause).
    in_guest: AtomicBool,
}

impl VcpuControl {
    fn new(initial: VcpuRunState) -> Self {
        Self {
            state: Mutex::new(Shared {
                requested: initial,
                current: VcpuRunState::Paused,
                jobs: VecDeque::new(),
                spin_after_jobs: false,
                start: None,
                ready: false,
                running_since_ns: 0,
            }),
            changed: Condvar::new(),
            changes: AtomicU32::new(0),
            run_requested: AtomicBool::new(initial == VcpuRunState::Running),
            in_guest: AtomicBool::new(false),
        }
    }

    /// Wakes whoever waits for a change (call with the lock held).
    fn notify(&self) {
        self.changes.fetch_add(1, Ordering::Release);
        self.changed.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn requested(&self) -> VcpuRunState {
        self.lock().requested
    }

    fn report(&self, s: VcpuRunState) {
        let mut st = self.lock();
        if st.current != s {
            if s == VcpuRunState::Running {
                st.running_since_ns = crate::state::now_ns();
            }
            st.current = s;
            self.notify();
        }
    }

    /// Runs jobs on `vcpu` until the thread has its machine and a request to run, then
    /// takes the machine; `None` if the thread is to end first.
    fn wait_for_start(&self, index: u8, vcpu: &mut VcpuFd) -> Option<Start> {
        let mut st = self.lock();
        st.ready = true;
        self.notify();
        drop(st);
        // KVM's work on a vCPU's first KVM_RUN (the VM's NX huge page recovery thread,
        // whose start preempted the resumed vCPU and let others run on its CPU first) is
        // done here, while the machine is still being built, not after the resume.
        vcpu_state::first_entry(vcpu, index);
        let mut st = self.lock();
        loop {
            if st.requested == VcpuRunState::Exiting {
                st.current = VcpuRunState::Exiting;
                st.jobs.clear();
                self.notify();
                return None;
            }
            if !st.jobs.is_empty() {
                // (It may release the lock: everything is looked at again.)
                st = self.run_jobs(st, vcpu);
                continue;
            }
            if st.start.is_some() && st.requested != VcpuRunState::Paused {
                return st.start.take();
            }
            st = self.wait(st);
        }
    }

    /// Parks the thread while the request is Paused, running queued jobs on `vcpu`; returns
    /// the new request.
    fn park(&self, vcpu: &mut VcpuFd) -> VcpuRunState {
        let mut st = self.lock();
        st.current = VcpuRunState::Paused;
        self.notify();
        loop {
            st = self.run_jobs(st, vcpu);
            if st.requested != VcpuRunState::Paused {
                return st.requested;
            }
            st = self.wait(st);
        }
    }

    /// Runs the queued jobs; if one asked for it, polls for the next change for a moment.
    fn run_jobs<'a>(
        &'a self,
        mut st: std::sync::MutexGuard<'a, Shared>,
        vcpu: &mut VcpuFd,
    ) -> std::sync::MutexGuard<'a, Shared> {
        let mut ran = false;
        while let Some(job) = st.jobs.pop_front() {
            drop(st);
            job(vcpu);
            ran = true;
            st = self.lock();
        }
        if ran && std::mem::take(&mut st.spin_after_jobs) {
            let seen = self.changes.load(Ordering::Acquire);
            drop(st);
            crate::spin::changed(&self.changes, seen, crate::spin::PAUSE_SPIN);
            st = self.lock();
        }
        st
    }

    fn wait<'a>(
        &'a self,
        st: std::sync::MutexGuard<'a, Shared>,
    ) -> std::sync::MutexGuard<'a, Shared> {
        if st.jobs.is_empty() {
            self.changed.wait(st).unwrap_or_else(|p| p.into_inner())
        } else {
            st
        }
    }
}

/// The VMM's handle on one vCPU thread.
pub struct VcpuHandle {
    /// vCPU index (= APIC ID).
    pub index: u8,
    control: Arc<VcpuControl>,
    thread: Option<JoinHandle<()>>,
}

/// Errors starting vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The kick signal handler cannot be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The thread cannot be spawned.
    #[error("cannot spawn vCPU thread {0}")]
    Spawn(u8, #[source] std::io::Error),
    /// A thread started ahead of its vCPU ended before it got it.
    #[error("vCPU thread {0} ended before its vCPU was handed to it")]
    Gone(u8),
}

/// What a thread started ahead of its machine waits for.
struct Start {
    bus: Arc<PioBus>,
    exits: Arc<ExitNotifier>,
}

/// A vCPU thread started with its vCPU ahead of the rest of the machine (creating a thread
/// is the costly part). It runs jobs on its vCPU (restoring its state, in parallel with the
/// VMM's own work) and sleeps otherwise, until it has its machine ([`ParkedThread::start`])
/// *and* a request to run: handing the machine over inside a pause wakes nothing. Dropped
/// unstarted, the thread ends.
pub struct ParkedThread {
    handle: VcpuHandle,
}

impl ParkedThread {
    /// Starts the thread of vCPU `index` with its vCPU; it will begin in the Paused state.
    pub fn spawn(index: u8, mut vcpu: VcpuFd) -> Result<Self, VcpuError> {
        install_kick_handler().map_err(VcpuError::Signal)?;
        let control = Arc::new(VcpuControl::new(VcpuRunState::Paused));
        let ctl = control.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // Started before the event loop blocked them for every later thread:
                // termination signals belong to the event loop's signalfd.
                if let Err(e) = crate::event_loop::block_termination_signals() {
                    log::warn!("vcpu{index}: cannot block SIGINT/SIGTERM: {e}");
                }
                // The filter goes on now if the mode is known (a transfer's receiver sets it
                // before the pause): installing it costs tens of µs that would otherwise
                // fall inside the pause. Otherwise (or if that fails: it tries again and
                // reports) `VcpuLoop::run` installs it.
                let _ = crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu);
                if let Some(s) = ctl.wait_for_start(index, &mut vcpu) {
                    VcpuLoop::new(index, vcpu, s.bus, s.exits, ctl).run();
                }
            })
            .map_err(|e| VcpuError::Spawn(index, e))?;
        // Its set-up (signal mask, seccomp filter: hundreds of µs) must not wait for a pause.
        let mut st = control.lock();
        while !st.ready && st.current != VcpuRunState::Exiting {
            st = control.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        drop(st);
        Ok(Self {
            handle: VcpuHandle {
                index,
                control,
                thread: Some(thread),
            },
        })
    }

    /// Queues `f` on the thread's vCPU (see [`VcpuHandle::queue`]); `spin`: the thread
    /// then polls for its next request for a moment instead of sleeping.
    pub fn queue<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut VcpuFd) -> R + Send + 'static,
        spin: bool,
    ) -> Option<mpsc::Receiver<R>> {
        self.handle.queue_job(f, spin)
    }

    /// The thread, for the scheduler calls of [`crate::affinity`].
    pub fn pthread(&self) -> Option<libc::pthread_t> {
        use std::os::unix::thread::JoinHandleExt;
        self.handle.thread.as_ref().map(|t| t.as_pthread_t())
    }

    /// Hands the thread its machine, paused: it goes on at the first request to run.
    pub fn start(
        self,
        bus: Arc<PioBus>,
        exits: Arc<ExitNotifier>,
    ) -> Result<VcpuHandle, VcpuError> {
        {
            let mut st = self.handle.control.lock();
            if st.current == VcpuRunState::Exiting {
                return Err(VcpuError::Gone(self.handle.index));
            }
            st.start = Some(Start { bus, exits });
        }
        Ok(self.handle)
    }
}

impl VcpuHandle {
    /// Starts a thread for `vcpu`, in state `initial` (Running or Paused).
    pub fn spawn(
        index: u8,
        vcpu: VcpuFd,
        bus: Arc<PioBus>,
        exits: Arc<ExitNotifier>,
        initial: VcpuRunState,
    ) -> Result<Self, VcpuError> {
        install_kick_handler().map_err(VcpuError::Signal)?;
        let control = Arc::new(VcpuControl::new(initial));
        let ctl = control.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // A booting VM is in no pause: its threads warm up for the later ones.
                if initial == VcpuRunState::Running {
                    warm_this_thread();
                }
                VcpuLoop::new(index, vcpu, bus, exits, ctl).run()
            })
            .map_err(|e| VcpuError::Spawn(index, e))?;
        Ok(Self {
            index,
            control,
            thread: Some(thread),
        })
    }

    /// Asks the vCPU to move to `state` and kicks it out of KVM_RUN.
    pub fn request(&self, state: VcpuRunState) {
        {
            let mut st = self.control.lock();
            if st.requested == VcpuRunState::Exiting {
                return;
            }
            st.requested = state;
            self.control
                .run_requested
                .store(state == VcpuRunState::Running, Ordering::SeqCst);
            self.control.notify();
        }
        // Only a thread in KVM_RUN needs a kick; any other wakes on the notification or sees
        // the request before it enters (see `VcpuLoop::step`).
        if state != VcpuRunState::Running && self.control.in_guest.load(Ordering::SeqCst) {
            self.kick();
        }
    }

    /// Interrupts KVM_RUN on the vCPU thread.
    pub fn kick(&self) {
        if let Some(t) = &self.thread {
            // SAFETY: the pthread handle is valid until the thread is joined, which only
            // happens in `join` (consuming `self.thread`); the signal has a handler.
            let rc =
                unsafe { libc::pthread_kill(t.as_pthread_t(), SIGRTMIN() + KICK_SIGNAL_OFFSET) };
            if rc != 0 && rc != libc::ESRCH {
                log::warn!("vcpu{}: kick failed: errno {rc}", self.index);
            }
        }
    }

    /// Waits until the vCPU reports `state` (or has exited).
    pub fn wait_for(&self, state: VcpuRunState) {
        let mut st = self.control.lock();
        while st.current != state && st.current != VcpuRunState::Exiting {
            st = self
                .control
                .changed
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits until the vCPU runs the guest (after a request to run); returns the wall-clock
    /// ns when it went back into the guest, `None` if the thread ended.
    pub fn wait_running(&self) -> Option<u64> {
        self.wait_for(VcpuRunState::Running);
        let st = self.control.lock();
        (st.current == VcpuRunState::Running).then_some(st.running_since_ns)
    }

    /// The state the vCPU last reported.
    pub fn current(&self) -> VcpuRunState {
        self.control.lock().current
    }

    /// Runs `f` with the vCPU fd on the vCPU's own thread once it is parked (request Paused
    /// first) and returns its result; `None` if the thread ended before running it.
    pub fn with_vcpu<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut VcpuFd) -> R + Send + 'static,
    ) -> Option<R> {
        self.queue(f)?.recv().ok()
    }

    /// Queues `f` to run on the vCPU's own thread as soon as it is parked (at once if it
    /// is; queued before a pause request, it runs the moment the vCPU stops, with no
    /// further wake-up). The receiver yields the result, or an error if the thread ended
    /// first; `None` if it has already ended.
    pub fn queue<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut VcpuFd) -> R + Send + 'static,
    ) -> Option<mpsc::Receiver<R>> {
        self.queue_job(f, false)
    }

    fn queue_job<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut VcpuFd) -> R + Send + 'static,
        spin: bool,
    ) -> Option<mpsc::Receiver<R>> {
        let (tx, rx) = mpsc::sync_channel(1);
        let mut st = self.control.lock();
        if st.current == VcpuRunState::Exiting {
            return None;
        }
        st.spin_after_jobs |= spin;
        st.jobs.push_back(Box::new(move |fd: &mut VcpuFd| {
            let _ = tx.send(f(fd));
        }));
        self.control.notify();
        Some(rx)
    }

    /// Asks the thread to exit and joins it.
    pub fn join(mut self) {
        self.request(VcpuRunState::Exiting);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("vcpu{} thread panicked", self.index);
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.request(VcpuRunState::Exiting);
            let _ = t.join();
        }
    }
}

struct VcpuLoop {
    index: u8,
    vcpu: VcpuFd,
    bus: Arc<PioBus>,
    exits: Arc<ExitNotifier>,
    control: Arc<VcpuControl>,
}

enum Step {
    Continue,
    End(VmExit),
}

impl VcpuLoop {
    fn new(
        index: u8,
        vcpu: VcpuFd,
        bus: Arc<PioBus>,
        exits: Arc<ExitNotifier>,
        control: Arc<VcpuControl>,
    ) -> Self {
        Self {
            index,
            vcpu,
            bus,
            exits,
            control,
        }
    }

    fn run(mut self) {
        // The filter goes on before the first guest instruction runs.
        if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu) {
            let why = format!("vcpu{}: {}", self.index, crate::error_chain(&e));
            self.exits.end(VmExit::Error(why));
            self.finish();
            return;
        }
        crate::fault::forbidden_syscall("vcpu");
        KVM_RUN.with(|r| r.set(self.vcpu.get_kvm_run() as *mut kvm_run));
        loop {
            match self.control.requested() {
                VcpuRunState::Exiting => break,
                VcpuRunState::Paused => {
                    if self.control.park(&mut self.vcpu) == VcpuRunState::Exiting {
                        break;
                    }
                    continue;
                }
                VcpuRunState::Running => self.control.report(VcpuRunState::Running),
            }
            match self.step() {
                Step::Continue => {}
                Step::End(why) => {
                    self.exits.end(why);
                    // Stay out of the guest until the VMM tears the VM down.
                    let mut st = self.control.lock();
                    if st.requested == VcpuRunState::Running {
                        st.requested = VcpuRunState::Paused;
                    }
                }
            }
        }
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
        self.finish();
    }

    /// Reports the thread's end.
    fn finish(&self) {
        let mut st = self.control.lock();
        st.current = VcpuRunState::Exiting;
        // Jobs queued after the last park are dropped, which wakes their waiters.
        st.jobs.clear();
        self.control.notify();
    }

    fn step(&mut self) -> Step {
        let index = self.index;
        // Announce the entry, then look at the request once more: a requester that changed
        // it after this thread's look sees `in_guest` and kicks.
        self.control.in_guest.store(true, Ordering::SeqCst);
        if !self.control.run_requested.load(Ordering::SeqCst) {
            self.control.in_guest.store(false, Ordering::SeqCst);
            return Step::Continue;
        }
        let exit = self.vcpu.run();
        self.control.in_guest.store(false, Ordering::SeqCst);
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                self.bus.read(port, data);
                Step::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => match self.bus.write(port, data) {
                Some(end) => Step::End(end),
                None => Step::Continue,
            },
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.bus.mmio_read(addr, data);
                Step::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.bus.mmio_write(addr, data);
                Step::Continue
            }
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => Step::Continue,
            Ok(VcpuExit::Shutdown) => Step::End(VmExit::Reset("triple fault")),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Step::End(VmExit::PowerOff),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Step::End(VmExit::Reset("system event")),
                other => Step::End(VmExit::Error(format!(
                    "vcpu{index}: guest system event {other}"
                ))),
            },
            Ok(VcpuExit::InternalError) => {
                // SAFETY: KVM filled the `internal` member for KVM_EXIT_INTERNAL_ERROR.
                let sub = unsafe { self.vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let hint = if sub == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
                    " (emulation failure: the guest ran an instruction KVM cannot emulate, \
                     e.g. SSE/AVX under PVM)"
                } else {
                    ""
                };
                let rip = self
                    .vcpu
                    .get_regs()
                    .map(|r| format!(" at rip {:#x}", r.rip))
                    .unwrap_or_default();
                Step::End(VmExit::Error(format!(
                    "vcpu{index}: KVM internal error, suberror {sub}{rip}{hint}"
                )))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Step::End(VmExit::Error(format!(
                "vcpu{index}: VM entry failed, hardware reason {reason:#x} on host cpu {cpu}"
            ))),
            Ok(other) => Step::End(VmExit::Error(format!(
                "vcpu{index}: unexpected exit {other:?}"
            ))),
            Err(e) => match e.errno() {
                // Kicked: immediate_exit was set (any pending I/O is now complete).
                libc::EINTR => {
                    self.vcpu.set_kvm_immediate_exit(0);
                    Step::Continue
                }
                // An AP woken by INIT/SIPI; run again.
                libc::EAGAIN => Step::Continue,
                _ => Step::End(VmExit::Error(format!("vcpu{index}: KVM_RUN failed: {e}"))),
            },
        }
    }
}
