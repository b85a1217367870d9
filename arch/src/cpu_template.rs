//! Named CPU templates: CPUID policies applied on top of what KVM supports, as Firecracker's
//! and Cloud Hypervisor's CPU templates are.
//!
//! - [`CpuTemplate::Host`] hides nothing: on hardware KVM guest code runs natively and can use
//!   every feature KVM reports.
//! - [`CpuTemplate::Emulated`] hides what KVM's instruction emulator cannot execute. On a PVM
//!   host, guest code that is not PVM-aware (a stock Linux kernel) runs entirely in that
//!   emulator, which implements a subset of the ISA: `cmpxchg8b` but not `cmpxchg16b` (a
//!   stock Linux stops in SLUB's `lock cmpxchg16b` when it sees CMPXCHG16B), `fxsave` and
//!   `fxrstor` but not `xsave`/`xrstor`, a few SSE moves but no vector arithmetic. The template
//!   leaves the baseline x86-64 features (x87, FXSR, SSE, SSE2, CX8, CMOV, ...) and clears the
//!   extensions a guest picks by CPUID: the XSAVE family, every vector extension beyond SSE2,
//!   and instructions a kernel can do without (POPCNT, RDRAND, RDSEED, RDTSCP, RDPID,
//!   FSGSBASE, INVPCID, SMAP's `stac`/`clac`, ...), as QEMU's `qemu64` model does.
//!
//! This host's PVM honours only the CPUID bits KVM itself reports (here CMPXCHG16B, x2APIC,
//! TSC-deadline in leaf 1): it adds the host's XSAVE, AVX, SSE4, RDRAND, ... to leaf 1 and
//! answers leaf 7 itself, whatever KVM_SET_CPUID2 says. The template is still what a VMM
//! should ask for there, and it is exact on hosts that honour it.

use std::path::Path;
use std::str::FromStr;

use kvm_bindings::CpuId;
use serde::{Deserialize, Serialize};

/// Errors naming a CPU template.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuTemplateError {
    /// Not a template name.
    #[error("unknown CPU template '{0}' (expected auto, host or emulated)")]
    Unknown(String),
}

/// A CPUID policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuTemplate {
    /// Everything KVM supports. The default of a record that names no template: VMs started
    /// before templates existed saw every feature.
    #[default]
    Host,
    /// Only what KVM's instruction emulator can execute (see the module documentation).
    Emulated,
}

/// Where a host that runs non-PVM-aware guest code in the instruction emulator shows itself.
pub const PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// One masked register of one leaf: bits in `keep` survive, all others are cleared.
struct Mask {
    function: u32,
    /// `None`: every sub-leaf.
    index: Option<u32>,
    reg: Reg,
    keep: u32,
}

#[derive(Clone, Copy)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

const fn bits(list: &[u32]) -> u32 {
    let mut m = 0;
    let mut i = 0;
    while i < list.len() {
        m |= 1 << list[i];
        i += 1;
    }
    m
}

/// Leaf 1 ECX bits hidden by [`CpuTemplate::Emulated`]: PCLMULQDQ (1), SSSE3 (9), FMA (12),
/// CMPXCHG16B (13), SSE4.1 (19), SSE4.2 (20), POPCNT (23), AES (25), XSAVE (26), OSXSAVE (27),
/// AVX (28), F16C (29), RDRAND (30). SSE3 (0) stays: x86-64 kernels check for it nowhere,
/// and it is no more executable than SSE2, which long mode requires.
const LEAF1_ECX_HIDDEN: u32 = bits(&[1, 9, 12, 13, 19, 20, 23, 25, 26, 27, 28, 29, 30]);

/// Leaf 7 sub-leaf 0 EBX bits kept: TSC_ADJUST (1), FDP_EXCPTN_ONLY (6), SMEP (7), ERMS (9),
/// ZERO_FCS_FDS (13). Everything else there is a vector extension (AVX2, AVX-512, SHA) or an
/// instruction the emulator lacks (FSGSBASE, BMI1/2, INVPCID, RDSEED, ADX, SMAP's stac/clac,
/// RTM, ...).
const LEAF7_EBX_KEPT: u32 = bits(&[1, 6, 7, 9, 13]);
/// Leaf 7 sub-leaf 0 EDX bits kept: FSRM (4, fast `rep movsb`).
const LEAF7_EDX_KEPT: u32 = bits(&[4]);

/// Leaf 0x8000_0001 ECX bits hidden: ABM/LZCNT (5), SSE4A (6), MISALIGNSSE (7),
/// 3DNowPrefetch (8), XOP (11), FMA4 (16), TBM (21), MWAITX (29).
const EXT1_ECX_HIDDEN: u32 = bits(&[5, 6, 7, 8, 11, 16, 21, 29]);
/// Leaf 0x8000_0001 EDX bits hidden: RDTSCP (27).
const EXT1_EDX_HIDDEN: u32 = bits(&[27]);

const EMULATED: &[Mask] = &[
    Mask {
        function: 1,
        index: None,
        reg: Reg::Ecx,
        keep: !LEAF1_ECX_HIDDEN,
    },
    Mask {
        function: 7,
        index: Some(0),
        reg: Reg::Ebx,
        keep: LEAF7_EBX_KEPT,
    },
    // Leaf 7 sub-leaf 0 ECX: AVX-512 VBMI/VNNI/..., GFNI, VAES, PKU, RDPID, MOVDIR*, ...
    Mask {
        function: 7,
        index: Some(0),
        reg: Reg::Ecx,
        keep: 0,
    },
    Mask {
        function: 7,
        index: Some(0),
        reg: Reg::Edx,
        keep: LEAF7_EDX_KEPT,
    },
    // Leaf 7 sub-leaf 1: AVX-VNNI, AVX512_BF16, ...
    Mask {
        function: 7,
        index: Some(1),
        reg: Reg::Eax,
        keep: 0,
    },
    Mask {
        function: 0x8000_0001,
        index: None,
        reg: Reg::Ecx,
        keep: !EXT1_ECX_HIDDEN,
    },
    Mask {
        function: 0x8000_0001,
        index: None,
        reg: Reg::Edx,
        keep: !EXT1_EDX_HIDDEN,
    },
];

/// Leaves removed whole by [`CpuTemplate::Emulated`]: 0xd (XSAVE state components; without
/// XSAVE the guest must not read sizes or XSAVEOPT/XSAVEC/XSAVES from it).
const EMULATED_REMOVED: &[u32] = &[0xd];

impl CpuTemplate {
    /// The template molt picks when none is asked for: [`CpuTemplate::Emulated`] on a PVM
    /// host ([`PVM_MODULE`] exists), where guest code that is not PVM-aware is emulated;
    /// [`CpuTemplate::Host`] elsewhere.
    pub fn for_this_host() -> Self {
        if Path::new(PVM_MODULE).exists() {
            CpuTemplate::Emulated
        } else {
            CpuTemplate::Host
        }
    }

    /// The template's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            CpuTemplate::Host => "host",
            CpuTemplate::Emulated => "emulated",
        }
    }

    /// Applies the template to a vCPU's CPUID (after [`crate::cpuid::filter`]).
    pub fn apply(self, cpuid: &mut CpuId) {
        if self == CpuTemplate::Host {
            return;
        }
        let kept: Vec<_> = cpuid
            .as_slice()
            .iter()
            .filter(|e| !EMULATED_REMOVED.contains(&e.function))
            .copied()
            .collect();
        if kept.len() != cpuid.as_slice().len() {
            // Rebuilding from fewer entries than the array held cannot exceed its capacity.
            if let Ok(c) = CpuId::from_entries(&kept) {
                *cpuid = c;
            }
        }
        for e in cpuid.as_mut_slice() {
            for m in EMULATED {
                if e.function != m.function || m.index.is_some_and(|i| i != e.index) {
                    continue;
                }
                let r = match m.reg {
                    Reg::Eax => &mut e.eax,
                    Reg::Ebx => &mut e.ebx,
                    Reg::Ecx => &mut e.ecx,
                    Reg::Edx => &mut e.edx,
                };
                *r &= m.keep;
            }
        }
    }
}

/// A template choice on the command line: a template, or `auto` ([`CpuTemplate::for_this_host`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuTemplateChoice {
    /// Decided by the host.
    #[default]
    Auto,
    /// This template.
    Named(CpuTemplate),
}

impl CpuTemplateChoice {
    /// The template this choice stands for on this host.
    pub fn resolve(self) -> CpuTemplate {
        match self {
            CpuTemplateChoice::Auto => CpuTemplate::for_this_host(),
            CpuTemplateChoice::Named(t) => t,
        }
    }
}

impl FromStr for CpuTemplateChoice {
    type Err = CpuTemplateError;

    fn from_str(s: &str) -> Result<Self, CpuTemplateError> {
        match s {
            "auto" => Ok(CpuTemplateChoice::Auto),
            "host" => Ok(CpuTemplateChoice::Named(CpuTemplate::Host)),
            "emulated" => Ok(CpuTemplateChoice::Named(CpuTemplate::Emulated)),
            _ => Err(CpuTemplateError::Unknown(s.to_string())),
        }
    }
}

#[cfg(test)]
#[path = "cpu_template_tests.rs"]
mod tests;
