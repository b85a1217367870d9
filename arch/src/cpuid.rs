//! CPUID given to each vCPU: what KVM supports, with topology, APIC IDs and the hypervisor
//! leaves filled in.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Hypervisor-present bit in leaf 1 ECX.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Hyper-threading bit in leaf 1 EDX (set when the package has several logical CPUs).
const EDX_HTT: u32 = 1 << 28;
/// Base of KVM's hypervisor leaves.
pub const HYPERVISOR_BASE: u32 = 0x4000_0000;
/// Hypervisor timing leaf: EAX = TSC kHz, EBX = local APIC timer kHz.
pub const HYPERVISOR_TIMING: u32 = 0x4000_0010;
/// KVM's local APIC timer runs at 1 GHz.
const LAPIC_TIMER_KHZ: u32 = 1_000_000;

/// Errors adjusting CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// The CPUID array is full.
    #[error("cannot add CPUID leaf {0:#x}")]
    Full(u32, #[source] vmm_sys_util::fam::Error),
}

/// Topology of the VM, as seen by one vCPU.
#[derive(Clone, Copy, Debug)]
pub struct CpuTopology {
    /// This vCPU's index, which is also its APIC ID.
    pub index: u8,
    /// Number of vCPUs (one package, one core each, one thread per core).
    pub count: u8,
    /// TSC frequency to advertise in the hypervisor timing leaf.
    pub tsc_khz: Option<u32>,
}

fn bits_for(count: u8) -> u32 {
    (count.max(1) as u32).next_power_of_two().trailing_zeros()
}

/// Adjusts KVM's supported CPUID for one vCPU.
pub fn filter(cpuid: &mut CpuId, topo: CpuTopology) -> Result<(), CpuidError> {
    let id = u32::from(topo.index);
    let count = u32::from(topo.count);
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_00ff) | (id << 24) | (count << 16) | (8 << 8);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            4 => {
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
            }
            0xb | 0x1f => {
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = bits_for(topo.count);
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            HYPERVISOR_BASE if topo.tsc_khz.is_some() => {
                e.eax = e.eax.max(HYPERVISOR_TIMING);
            }
            _ => {}
        }
    }
    if let Some(khz) = topo.tsc_khz {
        let present = cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == HYPERVISOR_TIMING);
        if !present {
            cpuid
                .push(kvm_cpuid_entry2 {
                    function: HYPERVISOR_TIMING,
                    eax: khz,
                    ebx: LAPIC_TIMER_KHZ,
                    ..Default::default()
                })
                .map_err(|e| CpuidError::Full(HYPERVISOR_TIMING, e))?;
        }
        for e in cpuid.as_mut_slice() {
            if e.function == HYPERVISOR_TIMING {
                e.eax = khz;
                e.ebx = LAPIC_TIMER_KHZ;
            }
        }
    }
    Ok(())
}

/// Looks up a leaf (and sub-leaf, for leaves with a significant index).
pub fn find(cpuid: &CpuId, function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid.as_slice().iter().find(|e| {
        e.function == function
            && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == index)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0000,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: HYPERVISOR_BASE,
                eax: 0x4000_0001,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn apic_id_topology_and_timing_leaf() {
        let mut c = sample();
        filter(
            &mut c,
            CpuTopology {
                index: 2,
                count: 3,
                tsc_khz: Some(2_000_000),
            },
        )
        .unwrap();
        let l1 = find(&c, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 3);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        let topo = find(&c, 0xb, 1).unwrap();
        assert_eq!((topo.eax, topo.ebx, topo.edx), (2, 3, 2));
        assert_eq!(find(&c, HYPERVISOR_BASE, 0).unwrap().eax, HYPERVISOR_TIMING);
        assert_eq!(find(&c, HYPERVISOR_TIMING, 0).unwrap().eax, 2_000_000);
    }
}
