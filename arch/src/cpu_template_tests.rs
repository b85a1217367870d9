use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use super::*;
use crate::cpuid::find;

fn entry(function: u32, index: u32, v: u32) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: if function == 7 || function == 0xd {
            KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        } else {
            0
        },
        eax: v,
        ebx: v,
        ecx: v,
        edx: v,
        ..Default::default()
    }
}

fn all_ones() -> CpuId {
    CpuId::from_entries(&[
        entry(1, 0, !0),
        entry(7, 0, !0),
        entry(7, 1, !0),
        entry(0xd, 0, !0),
        entry(0xd, 1, !0),
        entry(0x8000_0001, 0, !0),
    ])
    .unwrap()
}

#[test]
fn host_hides_nothing() {
    let mut c = all_ones();
    CpuTemplate::Host.apply(&mut c);
    assert_eq!(c.as_slice(), all_ones().as_slice());
}

#[test]
fn emulated_hides_what_the_emulator_cannot_run() {
    let mut c = all_ones();
    CpuTemplate::Emulated.apply(&mut c);
    let l1 = find(&c, 1, 0).unwrap();
    for (bit, what) in [
        (13, "CMPXCHG16B"),
        (26, "XSAVE"),
        (27, "OSXSAVE"),
        (28, "AVX"),
        (30, "RDRAND"),
        (23, "POPCNT"),
    ] {
        assert_eq!(l1.ecx & (1 << bit), 0, "{what} visible");
    }
    // The baseline long mode needs stays: FPU, CX8, CMOV, FXSR, SSE, SSE2; and the
    // hypervisor bit.
    for bit in [0, 8, 15, 24, 25, 26] {
        assert_ne!(l1.edx & (1 << bit), 0, "leaf 1 EDX bit {bit} hidden");
    }
    assert_ne!(l1.ecx & (1 << 31), 0);
    let l7 = find(&c, 7, 0).unwrap();
    assert_eq!(l7.ebx & (1 << 5), 0, "AVX2 visible");
    assert_eq!(l7.ebx & (1 << 16), 0, "AVX512F visible");
    assert_eq!(l7.ebx & 1, 0, "FSGSBASE visible");
    assert_ne!(l7.ebx & (1 << 9), 0, "ERMS hidden");
    assert_eq!(l7.ecx, 0);
    assert_eq!(find(&c, 7, 1).unwrap().eax, 0);
    assert!(find(&c, 0xd, 0).is_none() && find(&c, 0xd, 1).is_none());
    let ext = find(&c, 0x8000_0001, 0).unwrap();
    assert_eq!(ext.edx & (1 << 27), 0, "RDTSCP visible");
    assert_ne!(ext.edx & (1 << 29), 0, "long mode hidden");
}

#[test]
fn choices_parse_and_resolve() {
    assert_eq!("auto".parse(), Ok(CpuTemplateChoice::Auto));
    assert_eq!(
        "emulated".parse(),
        Ok(CpuTemplateChoice::Named(CpuTemplate::Emulated))
    );
    assert_eq!(
        "host".parse::<CpuTemplateChoice>().map(|c| c.resolve()),
        Ok(CpuTemplate::Host)
    );
    assert!("t2".parse::<CpuTemplateChoice>().is_err());
    let expected = if Path::new(PVM_MODULE).exists() {
        CpuTemplate::Emulated
    } else {
        CpuTemplate::Host
    };
    assert_eq!(CpuTemplateChoice::Auto.resolve(), expected);
    for t in [CpuTemplate::Host, CpuTemplate::Emulated] {
        assert_eq!(
            t.name().parse::<CpuTemplateChoice>(),
            Ok(CpuTemplateChoice::Named(t))
        );
    }
}
