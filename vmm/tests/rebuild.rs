//! The in-process rebuild — pause, capture, destroy the KVM VM, build a new one over the
//! same memfds, restore, resume — judged from the test guest's serial output. This is the
//! rehearsal for cpr-exec.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arch::regs::msr;
use vmm::config::{KernelSource, MemoryConfig, SerialConfig, VmConfig};
use vmm::runtime::Vmm;
use vmm::state::VmState;

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("molt-rebuild-{}-{name}", std::process::id()))
}

fn boot(cpus: u8, serial: &Path) -> Vmm {
    let _ = env_logger::builder().is_test(true).try_init();
    let _ = std::fs::remove_file(serial);
    let config = VmConfig {
        kernel: KernelSource::Embedded,
        cmdline: "molt.memtest=4".into(),
        initrd: None,
        cpus,
        memory: MemoryConfig {
            size: 64 << 20,
            hugepages: false,
            prefault: false,
        },
        serial: SerialConfig::File(serial.into()),
        api_socket: None,
        disks: Vec::new(),
        nets: Vec::new(),
        rng: false,
        cpu_template: Default::default(),
    };
    vmm::boot(&config, Instant::now()).unwrap().vmm
}

/// The serial output so far, whole lines only (the guest may be in the middle of one).
fn console(serial: &Path) -> String {
    let mut text = std::fs::read_to_string(serial).unwrap_or_default();
    text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
    text
}

fn ticks(serial: &Path) -> Vec<u64> {
    console(serial)
        .lines()
        .filter_map(|l| l.strip_prefix("molt-guest: tick n="))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

fn wait_for_tick(serial: &Path, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ticks(serial).last().copied().unwrap_or(0) < n {
        assert!(
            Instant::now() < deadline,
            "no tick {n} in {}",
            serial.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_guest_healthy(serial: &Path) {
    let text = console(serial);
    assert!(!text.contains("FAIL"), "memtest failure:\n{text}");
    assert!(!text.contains("exception"), "guest exception:\n{text}");
    assert_eq!(
        text.matches("molt-guest: boot").count(),
        1,
        "guest rebooted:\n{text}"
    );
    let t = ticks(serial);
    for w in t.windows(2) {
        assert_eq!(w[1], w[0] + 1, "tick sequence broken: {t:?}");
    }
    assert_eq!(t.first(), Some(&1));
}

fn rebuild_keeps_the_guest_running(cpus: u8) {
    let serial = temp_path(&format!("serial-{cpus}"));
    let mut vmm = boot(cpus, &serial);
    wait_for_tick(&serial, 2);
    for i in 0..3 {
        let before = *ticks(&serial).last().unwrap();
        let report = vmm.rebuild().unwrap();
        assert!(report.total_ms > 0.0);
        wait_for_tick(&serial, before + 2);
        assert!(
            vmm.ended().is_none(),
            "VM ended after rebuild {i}: {:?}",
            vmm.ended()
        );
    }
    let text = console(&serial);
    assert!(
        text.contains("memtest pass="),
        "no memtest progress:\n{text}"
    );
    if cpus > 1 {
        wait_for_tick(&serial, ticks(&serial).last().unwrap() + 6);
        let text = console(&serial);
        assert!(text.contains("cpu id=1 n="), "AP made no progress:\n{text}");
    }
    assert_guest_healthy(&serial);
    vmm.shutdown();
    let _ = std::fs::remove_file(serial);
}

#[test]
fn rebuild_with_one_vcpu() {
    rebuild_keeps_the_guest_running(1);
}

#[test]
fn rebuild_with_two_vcpus() {
    rebuild_keeps_the_guest_running(2);
}

/// Fields that legitimately differ between two captures of the same paused VM.
fn normalise(mut s: VmState) -> VmState {
    s.captured_at_ns = 0;
    s.kvm.clock = Default::default();
    s.kvm.pit = Default::default();
    for v in &mut s.vcpus {
        v.msrs.retain(|m| m.index != msr::IA32_TSC);
    }
    s
}

#[test]
fn capture_rebuild_capture_is_equal() {
    let serial = temp_path("equal");
    let mut vmm = boot(2, &serial);
    wait_for_tick(&serial, 1);
    vmm.pause().unwrap();
    let first = vmm.capture().unwrap();
    vmm.rebuild().unwrap();
    let second = vmm.capture().unwrap();
    assert!(second.captured_at_ns >= first.captured_at_ns);
    let tsc = |s: &VmState| {
        s.vcpus[0]
            .msrs
            .iter()
            .find(|m| m.index == msr::IA32_TSC)
            .map(|m| m.data)
            .unwrap()
    };
    assert!(tsc(&second) >= tsc(&first), "guest TSC went backwards");
    assert!(
        second.kvm.clock.clock >= first.kvm.clock.clock,
        "guest clock went backwards"
    );
    // Round trip through JSON too: what the record carries is what restore sees.
    let json = serde_json::to_string(&second).unwrap();
    let parsed: VmState = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed, second);
    let (a, b) = (normalise(first), normalise(second));
    for (va, vb) in a.vcpus.iter().zip(&b.vcpus) {
        assert_eq!(va.regs, vb.regs, "vcpu{} regs", va.index);
        assert_eq!(va.sregs, vb.sregs, "vcpu{} sregs", va.index);
        assert_eq!(va.fpu, vb.fpu, "vcpu{} fpu", va.index);
        assert_eq!(va.msrs, vb.msrs, "vcpu{} msrs", va.index);
        assert_eq!(va.mp_state, vb.mp_state, "vcpu{} mp_state", va.index);
        assert_eq!(va.cpuid, vb.cpuid, "vcpu{} cpuid", va.index);
    }
    assert_eq!(a, b);
    vmm.resume().unwrap();
    wait_for_tick(&serial, ticks(&serial).last().unwrap() + 2);
    assert_guest_healthy(&serial);
    vmm.shutdown();
    let _ = std::fs::remove_file(serial);
}

#[test]
fn a_state_that_cannot_describe_a_vm_is_refused_before_kvm() {
    use vmm::state::InvalidState;
    let serial = temp_path("invalid");
    let mut vmm = boot(2, &serial);
    wait_for_tick(&serial, 1);
    let good = vmm.capture().unwrap();
    assert!(good.validate(0).is_ok());
    let mut s = good.clone();
    s.vcpus.clear();
    assert!(matches!(s.validate(0), Err(InvalidState::NoVcpu)));
    let mut s = good.clone();
    s.vcpus[1].tsc_khz = 0;
    assert!(matches!(
        s.validate(0),
        Err(InvalidState::NoTscFrequency(1))
    ));
    let mut s = good.clone();
    s.vcpus[1].tsc_khz += 1;
    assert!(matches!(
        s.validate(0),
        Err(InvalidState::TscMismatch { .. })
    ));
    let mut s = good.clone();
    s.vcpus.swap(0, 1);
    assert!(matches!(
        s.validate(0),
        Err(InvalidState::VcpuIndex { position: 0, .. })
    ));
    assert!(matches!(
        good.validate(1),
        Err(InvalidState::VirtioCount {
            saved: 0,
            configured: 1
        })
    ));
    vmm.shutdown();
    let _ = std::fs::remove_file(serial);
}
