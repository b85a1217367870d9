//! The KVM VM of a cpr-exec's new image, built on a thread of its own started first thing in
//! `main`: `KVM_CREATE_VM` runs while the main thread sets up logging and reads the record,
//! then memory slots, irqchip, PIT and vCPUs while the main thread takes the other parts
//! over. The chain memory slots → irqchip → vCPUs is the long pole of the restore; the main
//! thread's work is hidden behind it instead of adding to it.

use std::sync::mpsc::{channel, Sender};
use std::thread::JoinHandle;

use arch::vcpu_state::VcpuIdentity;
use kvm_ioctls::Kvm;

use crate::machine::Prebuilt;
use crate::memory::GuestRam;
use crate::seccomp::SeccompMode;
use crate::Error;

/// What the builder needs once the record is read.
pub struct Job {
    /// Guest RAM, taken over and mapped.
    pub ram: GuestRam,
    /// vCPUs to create.
    pub vcpus: usize,
    /// Their identities (CPUID, TSC rate), set as they are created.
    pub identities: Vec<VcpuIdentity>,
    /// The seccomp mode of the VM (the vCPU threads get their filters as they start).
    pub seccomp: SeccompMode,
}

/// The builder thread.
pub struct EarlyVm {
    job: Sender<Job>,
    handle: JoinHandle<Result<(Kvm, Prebuilt), Error>>,
}

impl EarlyVm {
    /// Starts the builder: it opens /dev/kvm and creates the VM at once, then waits for
    /// [`EarlyVm::build`]. `None` if no thread can be started (the restore then builds the
    /// VM itself).
    pub fn start() -> Option<Self> {
        let (job, rx) = channel::<Job>();
        let handle = std::thread::Builder::new()
            .name("vm-builder".into())
            .spawn(move || {
                // The vCPU threads started here inherit this mask, as they would from the
                // main thread once its event loop exists.
                crate::event_loop::block_termination_signals().map_err(Error::EventLoop)?;
                let kvm = crate::vm::open_kvm()?;
                let vm_fd = crate::vm::new_vm(&kvm)?;
                // A closed channel: the restore failed before it got here.
                let job = rx.recv().map_err(|_| Error::NoMachine)?;
                crate::seccomp::init(job.seccomp)?;
                let prebuilt = Prebuilt::over(vm_fd, job.ram, job.vcpus, &job.identities)?;
                Ok((kvm, prebuilt))
            })
            .ok()?;
        Some(Self { job, handle })
    }

    /// Hands the builder what it needs to finish the machine.
    pub fn build(&self, job: Job) {
        // A builder that is gone already reports why in `finish`.
        let _ = self.job.send(job);
    }

    /// The built machine with the KVM handle it was built with. A panic of the builder
    /// continues on the calling thread.
    pub fn finish(self) -> Result<(Kvm, Prebuilt), Error> {
        drop(self.job);
        match self.handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}
