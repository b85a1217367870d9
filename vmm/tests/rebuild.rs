//! The in-process rebuild — pause, capture, destroy the KVM VM, build a new one over the
//! same memfds, restore, resume — judged from the test guest's serial output. This is the
//! rehearsal for cpr-exec.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arch::regs::msr;
use vmm::config::{KernelSource, MemoryConfig, SerialConfig, VmConfig};
use vmm::exit::ExitNotifier;
use vmm::machine::{Machine, Shared};
use vmm::runtime::Vmm;
use vmm::serial_backend;
use vmm::state::VmState;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("molt-rebuild-{}-{name}", std::process::id()))
}

fn config(cpus: u8, serial: &Path) -> VmConfig {
    VmConfig {
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
        seccomp: Default::default(),
        update_binaries: None,
    }
}

fn shared(config: &VmConfig) -> Shared {
    Shared {
        exits: Arc::new(ExitNotifier::new().unwrap()),
        serial_drained: EventFd::new(EFD_NONBLOCK).unwrap(),
        bus: Arc::default(),
        serial_counters: Arc::default(),
        started: Instant::now(),
        virtio: Arc::new(vmm::virtio::Virtio::open(config).unwrap()),
    }
}

fn boot(cpus: u8, serial: &Path) -> Vmm {
    let _ = env_logger::builder().is_test(true).try_init();
    let _ = std::fs::remove_file(serial);
    let config = config(cpus, serial);
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

/// The `n` of every `cpu id=1 n=<n>` line (vCPU 1's progress, one line per 500 ms).
fn ap_counts(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("molt-guest: cpu id=1 n="))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Waits until vCPU 1 prints a progress line that it started after byte `offset` of the
/// console and that counts higher than every such line before `offset`: proof that the AP
/// ran after whatever happened when the console had `offset` bytes. `offset` is a line start
/// (see [`console`]), but the line there may have been begun before (a vCPU paused in the
/// middle of a line finishes it after the resume), so that first line does not count.
fn wait_for_ap_progress_after(serial: &Path, offset: usize) {
    let text = console(serial);
    let before = ap_counts(&text[..offset]).into_iter().max().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = console(serial);
        let after = ap_counts(text[offset..].split_once('\n').map_or("", |(_, rest)| rest));
        if after.iter().any(|n| *n > before) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "vCPU 1 printed nothing new after byte {offset} (its last count before: {before}):\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rebuild_keeps_the_guest_running(cpus: u8) {
    let serial = temp_path(&format!("serial-{cpus}"));
    let mut vmm = boot(cpus, &serial);
    wait_for_tick(&serial, 2);
    for i in 0..3 {
        let before = *ticks(&serial).last().unwrap();
        let report = vmm.rebuild().unwrap();
        assert!(report.total_ms > 0.0);
        let offset = console(&serial).len();
        wait_for_tick(&serial, before + 2);
        assert!(
            vmm.ended().is_none(),
            "VM ended after rebuild {i}: {:?}",
            vmm.ended()
        );
        if cpus > 1 {
            wait_for_ap_progress_after(&serial, offset);
        }
    }
    let text = console(&serial);
    assert!(
        text.contains("memtest pass="),
        "no memtest progress:\n{text}"
    );
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

fn tsc(s: &VmState, vcpu: usize) -> u64 {
    s.vcpus[vcpu]
        .msrs
        .iter()
        .find(|m| m.index == msr::IA32_TSC)
        .map(|m| m.data)
        .expect("the capture has no IA32_TSC")
}

/// Asserts that from capture `a` to capture `b` of a VM that stayed paused in between, every
/// vCPU's TSC and the kvmclock advanced by the host time between the captures
/// (`captured_at_ns`), give or take `tolerance_ms`. The TSC runs at `tsc_khz`, which must be
/// known: without it restore cannot advance the TSC at all.
#[track_caller]
fn assert_guest_time_advanced(a: &VmState, b: &VmState, tolerance_ms: f64) {
    let wall_ms = (b.captured_at_ns as f64 - a.captured_at_ns as f64) / 1e6;
    let clock_ms = (b.kvm.clock.clock as f64 - a.kvm.clock.clock as f64) / 1e6;
    assert!(
        (clock_ms - wall_ms).abs() <= tolerance_ms,
        "kvmclock advanced {clock_ms:.3} ms while {wall_ms:.3} ms passed between the captures \
         (tolerance {tolerance_ms} ms)"
    );
    for (va, vb) in a.vcpus.iter().zip(&b.vcpus) {
        let khz = vb.tsc_khz;
        assert!(khz != 0, "vcpu{}: TSC frequency unknown", vb.index);
        let i = usize::from(va.index);
        let tsc_ms = (tsc(b, i) as f64 - tsc(a, i) as f64) / khz as f64;
        assert!(
            (tsc_ms - wall_ms).abs() <= tolerance_ms,
            "vcpu{i}: TSC advanced {tsc_ms:.3} ms (at {khz} kHz) while {wall_ms:.3} ms passed \
             between the captures (tolerance {tolerance_ms} ms)"
        );
    }
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
    // The VM stayed paused from one capture to the other; its clocks must have advanced by
    // the host time between them, the rebuild included. The rebuild leaves a few ms between
    // its capture and its restore, so this does not tell a forgotten advance from a right
    // one (`restore_advances_guest_time_by_the_time_since_capture` does); it catches clocks
    // that go backwards or jump.
    assert_guest_time_advanced(&first, &second, 50.0);
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

/// Restore sets the guest's TSC and kvmclock to where they would be had the VM stayed: the
/// captured values plus the time since the capture. A restore that forgot the advance would
/// leave the guest `HOLD` behind the host (its clocks stop while no VM exists); one that
/// advanced twice would put it `HOLD` ahead. Both miss the tolerance by far: what it has to
/// absorb is the time between reading the clocks and stamping `captured_at_ns` within each
/// capture, and between computing the advance and setting the TSC within restore (µs to a few
/// ms, more when a loaded host preempts the thread), nothing that grows with `HOLD`.
///
/// On a PVM host the guest's TSC is the host's whatever the VMM sets (KVM reports it so), so
/// there only the kvmclock check can catch a wrong advance; on other KVM hosts both can.
#[test]
fn restore_advances_guest_time_by_the_time_since_capture() {
    const HOLD: Duration = Duration::from_millis(500);
    const TOLERANCE_MS: f64 = 150.0;
    let _ = env_logger::builder().is_test(true).try_init();
    let serial = temp_path("clock");
    let _ = std::fs::remove_file(&serial);
    let config = config(2, &serial);
    let out = serial_backend::open(&config.serial).unwrap();
    let shared = shared(&config);
    let kvm = vmm::vm::open_kvm().unwrap();
    let machine = Machine::boot(&kvm, &config, out.try_clone().unwrap(), &shared).unwrap();
    wait_for_tick(&serial, 1);
    machine.pause();
    let captured = machine.capture().unwrap();
    let regions = machine.teardown();
    std::thread::sleep(HOLD);
    let ram = vmm::memory::map_regions(regions, false).unwrap();
    let machine = Machine::restore(&kvm, &captured, ram, out, &shared).unwrap();
    // The restored machine starts paused: its clocks are what restore set, plus the time
    // since (which `captured_at_ns` of this second capture accounts for).
    let restored = machine.capture().unwrap();
    let held_ms = (restored.captured_at_ns - captured.captured_at_ns) as f64 / 1e6;
    assert!(
        held_ms >= HOLD.as_secs_f64() * 1e3,
        "only {held_ms:.3} ms between the captures"
    );
    assert_guest_time_advanced(&captured, &restored, TOLERANCE_MS);
    machine.resume();
    wait_for_tick(&serial, ticks(&serial).last().unwrap() + 2);
    assert_guest_healthy(&serial);
    machine.teardown();
    let _ = std::fs::remove_file(serial);
}
