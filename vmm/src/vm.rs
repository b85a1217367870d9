//! Creating the KVM VM: memory slots, in-kernel irqchip and PIT, vCPUs with CPUID and boot
//! state, and the port-I/O devices.

use arch::cpu_template::CpuTemplate;
use arch::cpuid::{self, CpuTopology};
use arch::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use arch::regs::{self, BootEntry};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::memory::{GuestRam, MemoryError};

/// Errors creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// More vCPUs than KVM supports.
    #[error("{wanted} vCPUs requested but KVM supports at most {max}")]
    TooManyVcpus {
        /// Requested.
        wanted: u8,
        /// KVM's limit.
        max: usize,
    },
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// CPUID.
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    /// vCPU registers.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// Eventfd creation.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// An open /dev/kvm.
pub fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(VmError::OpenKvm)
}

/// Creates a VM with guest RAM registered and the in-kernel irqchip and PIT.
pub fn create_vm(kvm: &Kvm, ram: &GuestRam) -> Result<VmFd, VmError> {
    setup_vm(new_vm(kvm)?, ram)
}

/// Creates an empty KVM VM: the first step of [`create_vm`], which a live update's new image
/// takes on its own before it knows the RAM (it costs up to ~0.4 ms on this host).
pub fn new_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let t0 = std::time::Instant::now();
    let vm = kvm
        .create_vm()
        .map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?;
    log::debug!("create VM: KVM_CREATE_VM {:?}", t0.elapsed());
    Ok(vm)
}

/// Registers guest RAM, then creates the in-kernel irqchip and PIT, on a VM from [`new_vm`].
///
/// Memory slots go in before the irqchip: on this host a slot registered after
/// KVM_CREATE_IRQCHIP costs ~5 ms (KVM then waits for an SRCU grace period), before it
/// ~0.1 ms — and slot registration sits inside a live update's pause.
pub fn setup_vm(vm: VmFd, ram: &GuestRam) -> Result<VmFd, VmError> {
    let t1 = std::time::Instant::now();
    ram.register(&vm)?;
    let t2 = std::time::Instant::now();
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(|e| VmError::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(|e| VmError::Kvm("KVM_SET_TSS_ADDR", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;
    log::debug!(
        "create VM: memslots {:?}, irqchip and PIT {:?}",
        t2 - t1,
        t2.elapsed()
    );
    Ok(vm)
}

/// Creates `count` vCPUs with CPUID (KVM's, shaped by `template`) and common state; returns
/// them with the TSC frequency KVM reports.
pub fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    count: u8,
    template: CpuTemplate,
) -> Result<(Vec<VcpuFd>, u32), VmError> {
    let max = kvm.get_max_vcpus();
    if usize::from(count) > max || count == 0 {
        return Err(VmError::TooManyVcpus { wanted: count, max });
    }
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    log::info!("CPU template: {}", template.name());
    let mut vcpus = Vec::with_capacity(count.into());
    let mut tsc_khz = 0;
    for index in 0..count {
        let vcpu = vm
            .create_vcpu(u64::from(index))
            .map_err(|e| VmError::Kvm("KVM_CREATE_VCPU", e))?;
        if index == 0 {
            tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
        }
        let mut cpuid = supported.clone();
        cpuid::filter(
            &mut cpuid,
            CpuTopology {
                index,
                count,
                tsc_khz: (tsc_khz != 0).then_some(tsc_khz),
            },
        )?;
        template.apply(&mut cpuid);
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| VmError::Kvm("KVM_SET_CPUID2", e))?;
        regs::setup_common(&vcpu)?;
        vcpus.push(vcpu);
    }
    Ok((vcpus, tsc_khz))
}

/// Puts the boot vCPU at the kernel's entry. Application processors stay in KVM's
/// wait-for-SIPI state, as on real hardware.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, ram: &GuestRam, entry: BootEntry) -> Result<(), VmError> {
    regs::setup_boot_cpu(vcpu, &ram.mem, entry)?;
    Ok(())
}
