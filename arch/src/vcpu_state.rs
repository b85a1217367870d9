//! Capture and restore of one vCPU's complete KVM state.
//!
//! Restore order matters to KVM: CPUID first (it decides which MSRs and XSAVE features are
//! valid), then MP state, registers, segments, XSAVE/XCRs, debug registers, the local APIC
//! (after SREGS, which carry APIC_BASE), MSRs, and vCPU events last (pending exceptions and
//! interrupts refer to everything before).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_SYNC_X86_EVENTS,
    KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS,
};
use kvm_ioctls::{SyncReg, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::blob::Blob;
use crate::regs::msr;

/// One MSR value, by index. Written as the pair `[index, data]` (a record carries dozens
/// and is parsed inside a pause); read from that or from `{"index": .., "data": ..}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub struct MsrValue {
    /// MSR number.
    pub index: u32,
    /// Value.
    pub data: u64,
}

impl Serialize for MsrValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (self.index, self.data).serialize(s)
    }
}

/// The FPU/SSE/AVX state: XSAVE area when KVM has XSAVE, else the legacy FPU block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FpuState {
    /// KVM_GET_XSAVE (4 KiB area) plus XCR0 and friends.
    Xsave {
        /// XSAVE area.
        xsave: Box<Blob<kvm_xsave>>,
        /// Extended control registers.
        xcrs: Box<Blob<kvm_xcrs>>,
    },
    /// KVM_GET_FPU.
    Fpu(Box<Blob<kvm_fpu>>),
}

/// Everything KVM holds for one vCPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (= APIC ID).
    pub index: u8,
    /// General registers.
    pub regs: Blob<kvm_regs>,
    /// Segment, control and descriptor-table registers.
    pub sregs: Blob<kvm_sregs>,
    /// FPU/vector state.
    pub fpu: FpuState,
    /// Local APIC registers.
    pub lapic: Box<Blob<kvm_lapic_state>>,
    /// MSRs, see [`MsrSet`].
    pub msrs: Vec<MsrValue>,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub events: Blob<kvm_vcpu_events>,
    /// Runnable, halted, waiting for SIPI, …
    pub mp_state: Blob<kvm_mp_state>,
    /// DR0–DR3, DR6, DR7.
    pub debugregs: Blob<kvm_debugregs>,
    /// The CPUID that was set on the vCPU.
    pub cpuid: Vec<Blob<kvm_cpuid_entry2>>,
    /// TSC frequency in kHz (0 when KVM cannot say).
    #[serde(default)]
    pub tsc_khz: u32,
}

/// Errors capturing or restoring vCPU state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM ioctl failed.
    #[error("vcpu{0}: {1} failed")]
    Kvm(u8, &'static str, #[source] kvm_ioctls::Error),
    /// KVM read or wrote fewer MSRs than asked.
    #[error("vcpu{index}: KVM handled {done} of {wanted} MSRs (stopped at {stopped:#x})")]
    Msrs {
        /// vCPU.
        index: u8,
        /// Processed.
        done: usize,
        /// Asked.
        wanted: usize,
        /// First MSR not processed.
        stopped: u32,
    },
    /// Too many MSRs or CPUID entries for KVM's arrays.
    #[error("vcpu{0}: too many {1} entries")]
    TooMany(u8, &'static str),
    /// The state holds an XSAVE area but this host's KVM has no XSAVE.
    #[error("vcpu{0}: saved state has XSAVE but this host's KVM does not")]
    NoXsave(u8),
}

/// MSRs beyond KVM_GET_MSR_INDEX_LIST that a vCPU needs to resume exactly.
const EXTRA_MSRS: &[u32] = &[
    msr::IA32_TSC,
    0x3b,  // IA32_TSC_ADJUST
    0x6e0, // IA32_TSC_DEADLINE
    msr::IA32_MISC_ENABLE,
    0x277, // IA32_PAT
    msr::IA32_MTRR_DEF_TYPE,
    0xfe, // IA32_MTRRCAP (read-only, harmless)
    0x250,
    0x258,
    0x259, // fixed-range MTRRs
    0x268,
    0x269,
    0x26a,
    0x26b,
    0x26c,
    0x26d,
    0x26e,
    0x26f,
    0x200,
    0x201,
    0x202,
    0x203,
    0x204,
    0x205,
    0x206,
    0x207, // variable MTRRs 0-3
    0x208,
    0x209,
    0x20a,
    0x20b,
    0x20c,
    0x20d,
    0x20e,
    0x20f, // variable MTRRs 4-7
    msr::IA32_SYSENTER_CS,
    msr::IA32_SYSENTER_ESP,
    msr::IA32_SYSENTER_EIP,
    msr::STAR,
    msr::LSTAR,
    msr::CSTAR,
    msr::SYSCALL_MASK,
    msr::KERNEL_GS_BASE,
    0xc000_0103, // TSC_AUX
    0x4b56_4d00,
    0x4b56_4d01,
    0x4b56_4d02,
    0x4b56_4d03, // kvmclock, async PF, steal time, EOI
    0x4b56_4d04,
    0x4b56_4d05,
    0x4b56_4d06,
    0x4b56_4d07, // poll control etc.
    0x11,
    0x12, // old kvmclock wall clock / system time
];

/// MSRs that must not be written back on restore (read-only or host-owned).
const READ_ONLY_MSRS: &[u32] = &[0xfe];

/// The MSRs saved for every vCPU: KVM's index list plus [`EXTRA_MSRS`], keeping only those
/// this KVM can actually read (probed once, one by one).
#[derive(Clone, Debug, Default)]
pub struct MsrSet(Vec<u32>);

impl MsrSet {
    /// Probes which candidate MSRs `vcpu` can read. On a host with PVM's native-execution
    /// control ([`crate::pvm`]) the control MSR is one of them, so a guest that runs natively
    /// keeps doing so across every capture and restore.
    pub fn probe(kvm: &kvm_ioctls::Kvm, vcpu: &VcpuFd) -> Self {
        let mut candidates: Vec<u32> = kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        candidates.extend_from_slice(EXTRA_MSRS);
        if crate::pvm::has_native_control(vcpu) {
            candidates.push(crate::pvm::CONTROL_MSR);
        }
        candidates.sort_unstable();
        candidates.dedup();
        let readable = candidates
            .into_iter()
            .filter(|&index| {
                Msrs::from_entries(&[kvm_msr_entry {
                    index,
                    ..Default::default()
                }])
                .ok()
                .and_then(|mut m| vcpu.get_msrs(&mut m).ok())
                    == Some(1)
            })
            .collect();
        Self(readable)
    }

    /// A set known to be readable (e.g. the MSRs of a captured state).
    pub fn from_indices(indices: Vec<u32>) -> Self {
        Self(indices)
    }

    /// The MSR numbers.
    pub fn indices(&self) -> &[u32] {
        &self.0
    }
}

fn kvm(index: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |e| VcpuStateError::Kvm(index, what, e)
}

/// KVM processes MSRs in order and stops at the first it refuses: all or an error naming it.
fn all_msrs(index: u8, done: usize, entries: &[kvm_msr_entry]) -> Result<(), VcpuStateError> {
    match entries.get(done) {
        None => Ok(()),
        Some(stopped) => Err(VcpuStateError::Msrs {
            index,
            done,
            wanted: entries.len(),
            stopped: stopped.index,
        }),
    }
}

/// What a capture may use of this KVM.
#[derive(Clone, Copy, Debug, Default)]
pub struct CaptureHow {
    /// XSAVE ([`xsave_usable`]).
    pub has_xsave: bool,
    /// Registers through the `kvm_run` area ([`sync_regs_usable`]).
    pub sync_regs: bool,
}

/// The `kvm_run` areas this capture reads registers through.
const SYNC_READ: [SyncReg; 3] = [
    SyncReg::Register,
    SyncReg::SystemRegister,
    SyncReg::VcpuEvents,
];

/// Whether this KVM copies registers, segment registers and pending events into the
/// `kvm_run` area on exit (`KVM_CAP_SYNC_REGS`).
pub fn sync_regs_usable(vm: &kvm_ioctls::VmFd) -> bool {
    let needed = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS;
    let have = vm.check_extension_int(kvm_ioctls::Cap::SyncRegs);
    have > 0 && (have as u32 & needed) == needed
}

/// Re-enters `KVM_RUN` with `immediate_exit` set: KVM completes a PIO/MMIO instruction the
/// vCPU stopped in (an IN's data written back, the instruction stepped over) and returns
/// without running guest code, so the state read next is the state after it. With `sync`
/// it also returns registers, segment registers and pending events through the `kvm_run`
/// area: one ioctl instead of three (13 µs against 31 here). `None` if not synced or KVM
/// did not return as expected.
fn run_immediate(
    vcpu: &mut VcpuFd,
    index: u8,
    sync: bool,
) -> Option<(kvm_regs, kvm_sregs, kvm_vcpu_events)> {
    if sync {
        for r in SYNC_READ {
            vcpu.set_sync_valid_reg(r);
        }
    }
    let interrupted = enter_immediate(vcpu)
        .map_err(|what| log::warn!("vcpu{index}: completing pending I/O: {what}"))
        .is_ok();
    if !sync {
        return None;
    }
    for r in SYNC_READ {
        vcpu.clear_sync_valid_reg(r);
    }
    interrupted.then(|| {
        let s = vcpu.sync_regs();
        (s.regs, s.sregs, s.events)
    })
}

/// Enters `KVM_RUN` once with `immediate_exit` set, without running guest code, from the
/// thread that will run the vCPU: KVM binds the vCPU to its caller on its first KVM_RUN, and
/// on the VM's first one it starts the VM's NX huge page recovery thread, whose first run
/// preempts the caller. Done ahead of a resume, neither falls after it. `false` (and a
/// warning) if KVM did not return as expected; the vCPU is usable either way.
pub fn first_entry(vcpu: &mut VcpuFd, index: u8) -> bool {
    enter_immediate(vcpu)
        .map_err(|what| log::warn!("vcpu{index}: first entry: {what}"))
        .is_ok()
}

/// `KVM_RUN` with `immediate_exit` set (cleared again after): `Ok` when KVM returned EINTR
/// without running guest code, as it should; otherwise what it did instead.
fn enter_immediate(vcpu: &mut VcpuFd) -> Result<(), String> {
    vcpu.set_kvm_immediate_exit(1);
    let r = match vcpu.run() {
        Err(e)
            if std::io::Error::from_raw_os_error(e.errno()).kind()
                == std::io::ErrorKind::Interrupted =>
        {
            Ok(())
        }
        Err(e) => Err(e.to_string()),
        Ok(_) => Err("an unexpected exit".to_string()),
    };
    vcpu.set_kvm_immediate_exit(0);
    r
}

/// Reads the complete state of a vCPU that is out of KVM_RUN, completing first any PIO/MMIO
/// it stopped in ([`run_immediate`]); `known` is its identity if the caller keeps it (two
/// ioctls fewer).
pub fn capture(
    vcpu: &mut VcpuFd,
    index: u8,
    msrs: &MsrSet,
    how: CaptureHow,
    known: Option<&VcpuIdentity>,
) -> Result<VcpuState, VcpuStateError> {
    let synced = run_immediate(vcpu, index, how.sync_regs);
    let (regs, sregs, synced_events) = match synced {
        Some((regs, sregs, events)) => (regs, sregs, Some(events)),
        None => (
            vcpu.get_regs().map_err(kvm(index, "KVM_GET_REGS"))?,
            vcpu.get_sregs().map_err(kvm(index, "KVM_GET_SREGS"))?,
            None,
        ),
    };
    let has_xsave = how.has_xsave;
    let fpu = if has_xsave {
        FpuState::Xsave {
            xsave: Box::new(Blob(vcpu.get_xsave().map_err(kvm(index, "KVM_GET_XSAVE"))?)),
            xcrs: Box::new(Blob(vcpu.get_xcrs().map_err(kvm(index, "KVM_GET_XCRS"))?)),
        }
    } else {
        FpuState::Fpu(Box::new(Blob(
            vcpu.get_fpu().map_err(kvm(index, "KVM_GET_FPU"))?,
        )))
    };
    let lapic = Box::new(Blob(vcpu.get_lapic().map_err(kvm(index, "KVM_GET_LAPIC"))?));
    let entries: Vec<kvm_msr_entry> = msrs
        .indices()
        .iter()
        .map(|&i| kvm_msr_entry {
            index: i,
            ..Default::default()
        })
        .collect();
    let mut kvm_msrs =
        Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany(index, "MSR"))?;
    let done = vcpu
        .get_msrs(&mut kvm_msrs)
        .map_err(kvm(index, "KVM_GET_MSRS"))?;
    all_msrs(index, done, &entries)?;
    let msrs = kvm_msrs
        .as_slice()
        .iter()
        .map(|e| MsrValue {
            index: e.index,
            data: e.data,
        })
        .collect();
    let events = match synced_events {
        Some(e) => e,
        None => vcpu
            .get_vcpu_events()
            .map_err(kvm(index, "KVM_GET_VCPU_EVENTS"))?,
    };
    let mp_state = vcpu
        .get_mp_state()
        .map_err(kvm(index, "KVM_GET_MP_STATE"))?;
    let debugregs = vcpu
        .get_debug_regs()
        .map_err(kvm(index, "KVM_GET_DEBUGREGS"))?;
    // The identity never changes once the vCPU ran: read it only if the caller does not
    // know it.
    let VcpuIdentity { cpuid, tsc_khz } = match known {
        Some(id) => id.clone(),
        None => identity(vcpu, index)?,
    };
    Ok(VcpuState {
        index,
        regs: Blob(regs),
        sregs: Blob(sregs),
        fpu,
        lapic,
        msrs,
        events: Blob(events),
        mp_state: Blob(mp_state),
        debugregs: Blob(debugregs),
        cpuid,
        tsc_khz,
    })
}

/// What a vCPU is before it has any state: its CPUID and TSC rate. A restore sets it first;
/// a transfer sets it on the new vCPUs before the pause, as it does not change.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VcpuIdentity {
    /// The CPUID set on the vCPU.
    pub cpuid: Vec<Blob<kvm_cpuid_entry2>>,
    /// TSC frequency in kHz (0: unknown, leave the host's).
    pub tsc_khz: u32,
}

impl VcpuState {
    /// This vCPU's identity.
    pub fn identity(&self) -> VcpuIdentity {
        VcpuIdentity {
            cpuid: self.cpuid.clone(),
            tsc_khz: self.tsc_khz,
        }
    }
}

/// Reads the identity of a vCPU that is not running.
pub fn identity(vcpu: &VcpuFd, index: u8) -> Result<VcpuIdentity, VcpuStateError> {
    let cpuid = vcpu
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm(index, "KVM_GET_CPUID2"))?
        .as_slice()
        .iter()
        .map(|e| Blob(*e))
        .collect();
    Ok(VcpuIdentity {
        cpuid,
        tsc_khz: vcpu.get_tsc_khz().unwrap_or(0),
    })
}

/// Sets the identity of vCPU `index`, created and never run.
pub fn set_identity(vcpu: &VcpuFd, index: u8, id: &VcpuIdentity) -> Result<(), VcpuStateError> {
    if id.tsc_khz != 0 && vcpu.get_tsc_khz().ok() != Some(id.tsc_khz) {
        // Keep the guest's TSC rate when the host's differs (needs TSC scaling).
        if let Err(e) = vcpu.set_tsc_khz(id.tsc_khz) {
            log::warn!("vcpu{index}: cannot keep TSC at {} kHz: {e}", id.tsc_khz);
        }
    }
    let entries: Vec<kvm_cpuid_entry2> = id.cpuid.iter().map(|e| e.0).collect();
    let cpuid =
        CpuId::from_entries(&entries).map_err(|_| VcpuStateError::TooMany(index, "CPUID"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(kvm(index, "KVM_SET_CPUID2"))
}

/// Registers of a vCPU as KVM created it, read before a restore so the restore can leave out
/// the ioctls that would write what is already there (each costs ~10 µs inside a pause).
/// Only state no other restore step touches is compared.
#[derive(Clone, Debug, Default)]
pub struct Fresh {
    mp_state: Option<Blob<kvm_mp_state>>,
    debugregs: Option<Blob<kvm_debugregs>>,
    xcrs: Option<Blob<kvm_xcrs>>,
}

impl Fresh {
    /// Reads them from `vcpu`, which must not have run (what cannot be read is written).
    pub fn read(vcpu: &VcpuFd, has_xsave: bool) -> Self {
        Self {
            mp_state: vcpu.get_mp_state().ok().map(Blob),
            debugregs: vcpu.get_debug_regs().ok().map(Blob),
            xcrs: has_xsave.then(|| vcpu.get_xcrs().ok().map(Blob)).flatten(),
        }
    }
}

/// How to restore a vCPU besides its state.
#[derive(Clone, Debug, Default)]
pub struct RestoreHow {
    /// Added to IA32_TSC so the guest's TSC accounts for the time the VM spent between
    /// capture and restore.
    pub tsc_advance: u64,
    /// KVM has XSAVE (see [`xsave_usable`]).
    pub has_xsave: bool,
    /// The vCPU's identity (CPUID, TSC rate) is set already.
    pub identity_set: bool,
    /// The vCPU as created, if read ([`Fresh::read`]).
    pub fresh: Fresh,
}

/// Writes `state` into a freshly created vCPU, whose identity is set first unless it already
/// is (`how`).
pub fn restore(vcpu: &VcpuFd, state: &VcpuState, how: &RestoreHow) -> Result<(), VcpuStateError> {
    let RestoreHow {
        tsc_advance,
        has_xsave,
        identity_set,
        ref fresh,
    } = *how;
    let index = state.index;
    if !identity_set {
        set_identity(vcpu, index, &state.identity())?;
    }
    if fresh.mp_state.as_ref() != Some(&state.mp_state) {
        vcpu.set_mp_state(state.mp_state.0)
            .map_err(kvm(index, "KVM_SET_MP_STATE"))?;
    }
    vcpu.set_regs(&state.regs)
        .map_err(kvm(index, "KVM_SET_REGS"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(kvm(index, "KVM_SET_SREGS"))?;
    match &state.fpu {
        FpuState::Xsave { xsave, xcrs } => {
            if !has_xsave {
                return Err(VcpuStateError::NoXsave(index));
            }
            // SAFETY: `has_xsave` was derived from KVM_CAP_XSAVE2 reporting an XSAVE size of
            // at most the 4 KiB of `kvm_xsave`, so KVM reads only within the struct.
            unsafe { vcpu.set_xsave(&xsave.0) }.map_err(kvm(index, "KVM_SET_XSAVE"))?;
            if fresh.xcrs.as_ref() != Some(&**xcrs) {
                vcpu.set_xcrs(&xcrs.0).map_err(kvm(index, "KVM_SET_XCRS"))?;
            }
        }
        FpuState::Fpu(fpu) => vcpu.set_fpu(&fpu.0).map_err(kvm(index, "KVM_SET_FPU"))?,
    }
    if fresh.debugregs.as_ref() != Some(&state.debugregs) {
        vcpu.set_debug_regs(&state.debugregs)
            .map_err(kvm(index, "KVM_SET_DEBUGREGS"))?;
    }
    vcpu.set_lapic(&state.lapic.0)
        .map_err(kvm(index, "KVM_SET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = state
        .msrs
        .iter()
        .filter(|m| !READ_ONLY_MSRS.contains(&m.index))
        .map(|m| kvm_msr_entry {
            index: m.index,
            data: if m.index == msr::IA32_TSC {
                m.data.wrapping_add(tsc_advance)
            } else {
                m.data
            },
            ..Default::default()
        })
        .collect();
    let kvm_msrs =
        Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany(index, "MSR"))?;
    let done = vcpu
        .set_msrs(&kvm_msrs)
        .map_err(kvm(index, "KVM_SET_MSRS"))?;
    all_msrs(index, done, &entries)?;
    vcpu.set_vcpu_events(&state.events)
        .map_err(kvm(index, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Whether this KVM supports XSAVE with an area that fits `kvm_xsave` (4 KiB).
pub fn xsave_usable(vm: &kvm_ioctls::VmFd) -> bool {
    use kvm_ioctls::Cap;
    if !vm.check_extension(Cap::Xsave) {
        return false;
    }
    let size = vm.check_extension_int(Cap::Xsave2);
    size <= 0 || size as usize <= std::mem::size_of::<kvm_xsave>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_read_through_kvm_run_are_what_the_ioctls_read() {
        let skip = |why: &str| {
            let required = std::env::var("MOLT_REQUIRE_ALL").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "{why}, and MOLT_REQUIRE_ALL=1 requires this test"
            );
            eprintln!("skipped: {why}");
        };
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            return skip("no /dev/kvm");
        };
        let vm = kvm.create_vm().unwrap();
        if !sync_regs_usable(&vm) {
            return skip("KVM_CAP_SYNC_REGS lacks registers, segment registers or events");
        }
        vm.create_irq_chip().unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rax = 0x1234_5678;
        regs.rbx = 0x9abc;
        vcpu.set_regs(&regs).unwrap();
        let (r, s, e) =
            run_immediate(&mut vcpu, 0, true).expect("KVM_RUN with immediate_exit returns EINTR");
        assert_eq!((r.rax, r.rbx), (0x1234_5678, 0x9abc));
        assert_eq!(Blob(r), Blob(vcpu.get_regs().unwrap()));
        assert_eq!(Blob(s), Blob(vcpu.get_sregs().unwrap()));
        assert_eq!(Blob(e), Blob(vcpu.get_vcpu_events().unwrap()));
        // The vCPU went back to its normal runs: nothing asked of the kvm_run area.
        let run = vcpu.get_kvm_run();
        assert_eq!((run.kvm_valid_regs, run.immediate_exit), (0, 0));
    }

    #[test]
    fn a_first_entry_runs_no_guest_code_and_leaves_the_vcpu_to_be_set_up() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            let required = std::env::var("MOLT_REQUIRE_ALL").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "no /dev/kvm, and MOLT_REQUIRE_ALL=1 requires this test"
            );
            return eprintln!("skipped: no /dev/kvm");
        };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let regs = vcpu.get_regs().unwrap();
        assert!(first_entry(&mut vcpu, 0));
        assert_eq!(Blob(regs), Blob(vcpu.get_regs().unwrap()));
        assert_eq!(vcpu.get_kvm_run().immediate_exit, 0);
        // KVM refuses a new CPUID once a vCPU has run guest code: the identity a restore
        // sets after the first entry still goes in.
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        vcpu.set_cpuid2(&cpuid)
            .expect("CPUID set after the first entry");
    }

    #[test]
    fn msr_values_are_pairs_and_older_objects_still_read() {
        let m = MsrValue {
            index: 0x10,
            data: 1 << 40,
        };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, "[16,1099511627776]");
        assert_eq!(serde_json::from_str::<MsrValue>(&json).unwrap(), m);
        let old = r#"{"index":16,"data":1099511627776,"added":1}"#;
        assert_eq!(serde_json::from_str::<MsrValue>(old).unwrap(), m);
    }
}
