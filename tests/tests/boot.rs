//! Boots the embedded test guest and checks what it reports: the boot line, ticks numbered
//! 1, 2, 3, … without gaps, memory-test passes, secondary CPUs, and that molt exits with the
//! guest's exit code.

use molt_tests::native::{check_mode, runs_natively, Mode};
use molt_tests::{
    assert_mem_mib, assert_memtest, assert_ticks, boot_line, of_kind, run, GuestLine, Molt, Output,
    RUN_TIMEOUT,
};

/// The `cpu id=<id> n=<n>` progress numbers of one CPU, in order.
fn cpu_progress(lines: &[GuestLine], id: u64) -> Vec<u64> {
    of_kind(lines, "cpu")
        .into_iter()
        .filter(|l| l.num("id") == id && l.get("n").is_some())
        .map(|l| l.num("n"))
        .collect()
}

/// Asserts every CPU `1..cpus` said `cpu id=<i> up` exactly once.
#[track_caller]
fn assert_aps_up(out: &Output, lines: &[GuestLine], cpus: u64) {
    for id in 1..cpus {
        let up = of_kind(lines, "cpu")
            .into_iter()
            .filter(|l| l.num("id") == id && l.has("up"))
            .count();
        assert_eq!(up, 1, "cpu id={id} up\n{}", out.describe());
    }
}

#[test]
fn embedded_guest_boots_ticks_and_exits_with_its_code() {
    for mode in Mode::BOTH {
        let out = run(&[
            "--memory",
            "size=256M",
            "--cmdline",
            &mode.cmdline("console=ttyS0 molt.memtest=8 molt.ticks=8 molt.exit=7"),
        ]);
        out.assert_code(7);
        let lines = out.guest_lines();
        let boot = boot_line(&lines);
        let native = check_mode(&boot, mode);
        assert_eq!(boot.num("cpus"), 1, "{}", out.describe());
        assert_mem_mib(&boot, 256);
        assert_eq!(boot.num("memtest_mib"), 8, "{}", out.describe());
        assert!(boot.num("tsc_khz") > 0);
        assert_eq!(assert_ticks(&lines, 3), 8, "molt.ticks=8 ends after tick 8");
        for tick in of_kind(&lines, "tick") {
            assert_eq!(runs_natively(tick), native, "{mode:?}: {}", tick.raw);
        }
        assert_memtest(&lines, 1);
        assert_eq!(
            of_kind(&lines, "exit").last().map(|l| l.num("code")),
            Some(7),
            "{}",
            out.describe()
        );
        // The boot line comes first; nothing follows the exit line.
        assert_eq!(lines.first().map(|l| l.kind.as_str()), Some("boot"));
        assert_eq!(lines.last().map(|l| l.kind.as_str()), Some("exit"));
        // With one CPU there are no per-CPU lines.
        assert!(of_kind(&lines, "cpu").is_empty(), "{}", out.describe());
    }
}

#[test]
fn guest_reset_ends_molt_with_code_0() {
    let out = run(&["--cmdline", "molt.memtest=0 molt.ticks=3 molt.exit=reset"]);
    out.assert_code(0);
    let lines = out.guest_lines();
    assert_eq!(boot_line(&lines).num("memtest_mib"), 0);
    assert_ticks(&lines, 3);
    assert!(
        of_kind(&lines, "memtest").is_empty(),
        "molt.memtest=0 turns it off"
    );
    assert_eq!(lines.last().map(|l| l.kind.as_str()), Some("reset"));
}

#[test]
fn two_cpus_both_make_progress() {
    // Per-CPU lines come every 500 ms of guest time: 20 ticks leave room for at least two each.
    for mode in Mode::BOTH {
        let out = run(&[
            "--cpus",
            "2",
            "--cmdline",
            &mode.cmdline("molt.memtest=8 molt.ticks=20 molt.exit=0"),
        ]);
        out.assert_code(0);
        let lines = out.guest_lines();
        let boot = boot_line(&lines);
        let native = check_mode(&boot, mode);
        assert_eq!(boot.num("cpus"), 2, "{}", out.describe());
        assert_aps_up(&out, &lines, 2);
        let expected = if native { "native" } else { "emulated" };
        for l in of_kind(&lines, "cpu") {
            if l.has("up") {
                assert_eq!(l.get("mode"), Some(expected), "{}", out.describe());
            } else {
                assert_eq!(runs_natively(l), native, "{mode:?}: {}", l.raw);
            }
        }
        for id in 0..2 {
            let n = cpu_progress(&lines, id);
            assert!(
                n.len() >= 2,
                "cpu id={id} progress {n:?}\n{}",
                out.describe()
            );
            assert!(
                n.iter().enumerate().all(|(i, n)| *n == i as u64 + 1),
                "cpu id={id} progress must go up by one: {n:?}"
            );
        }
        assert_ticks(&lines, 3);
        assert_memtest(&lines, 1);
    }
}

/// Sizes of the memfd-backed mappings of process `pid`, summed per memfd (inode), largest
/// first.
fn memfd_mapping_sizes(pid: u32) -> Vec<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut per_inode = std::collections::BTreeMap::<u64, u64>::new();
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || !f[5].starts_with("/memfd:") {
            continue;
        }
        let (start, end) = f[0].split_once('-').unwrap();
        let size = u64::from_str_radix(end, 16).unwrap() - u64::from_str_radix(start, 16).unwrap();
        *per_inode.entry(f[4].parse().unwrap()).or_default() += size;
    }
    let mut sizes: Vec<u64> = per_inode.into_values().collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    sizes
}

#[test]
fn ram_above_4g_and_four_cpus() {
    // 5 GiB: 3 GiB below the 32-bit MMIO hole and 2 GiB from 4 GiB up, one memfd each.
    let mut molt = Molt::spawn(&[
        "--cpus",
        "4",
        "--memory",
        "size=5G",
        "--cmdline",
        "molt.memtest=4 molt.ticks=8 molt.exit=0",
    ]);
    molt.wait_stdout("molt-guest: boot ", RUN_TIMEOUT);
    let sizes = memfd_mapping_sizes(molt.pid());
    let out = molt.finish(RUN_TIMEOUT);
    out.assert_code(0);
    assert!(
        sizes.len() >= 2 && sizes[..2] == [3 << 30, 2 << 30],
        "expected memfd mappings of 3 GiB and 2 GiB, got {sizes:?}"
    );
    let lines = out.guest_lines();
    let boot = boot_line(&lines);
    assert_eq!(boot.num("cpus"), 4, "{}", out.describe());
    assert_mem_mib(&boot, 5 << 10);
    assert_aps_up(&out, &lines, 4);
    assert_ticks(&lines, 3);
    assert_memtest(&lines, 1);
}

#[test]
fn guest_exceptions_and_panics_end_molt_with_the_guest_code() {
    // molt.crash= makes the guest fail right after its boot line: the exception handler
    // reports the vector and exits with 0xfe, the panic handler with 0xfd.
    // Natively, exceptions take the guest's native IDT (see resources/guest/src/native.rs).
    let cases = [
        ("ud", 0xfe, "exception", Some(6)),
        ("pf", 0xfe, "exception", Some(14)),
        ("panic", 0xfd, "panic", None),
    ];
    for (mode, (crash, code, kind, field)) in Mode::BOTH
        .into_iter()
        .flat_map(|m| cases.into_iter().map(move |c| (m, c)))
    {
        let cmdline = mode.cmdline(&format!("molt.memtest=0 molt.crash={crash}"));
        let out = run(&["--cmdline", &cmdline]);
        out.assert_code(code);
        let lines = out.guest_lines();
        check_mode(&boot_line(&lines), mode);
        let last = lines.last().unwrap();
        assert_eq!(last.kind, kind, "{}", out.describe());
        if let Some(vector) = field {
            assert_eq!(last.num("vector"), vector, "{}", out.describe());
            assert!(last.get("rip").is_some(), "{}", out.describe());
        }
    }
}

#[test]
fn memory_load_knobs_test_whole_pages_and_dirty_ram_beside_the_memtest() {
    // molt.memtest_share=100 tests every word of every page; molt.dirty= writes other RAM at a
    // paced rate: were its pages among the memtest's, the memtest would fail.
    let out = run(&[
        "--memory",
        "size=128M",
        "--cmdline",
        "molt.memtest=8 molt.memtest_share=100 molt.dirty=16 molt.ticks=25 molt.exit=0",
    ]);
    out.assert_code(0);
    let lines = out.guest_lines();
    let boot = boot_line(&lines);
    if !check_mode(&boot, Mode::Default) {
        return; // emulated, a whole-page memtest pass takes minutes
    }
    assert_eq!(boot.num("memtest_share"), 100, "{}", out.describe());
    assert_memtest(&lines, 2);
    let dirty = of_kind(&lines, "dirty");
    assert!(!dirty.is_empty(), "no dirty lines\n{}", out.describe());
    for d in dirty {
        assert_eq!(d.num("target"), 16, "{}", d.raw);
        // The area is the RAM above the memtest's 8 MiB, and the pacing never overshoots.
        assert!((100..120).contains(&d.num("mib")), "{}", d.raw);
        assert!(d.num("mib_s") <= 18, "{}", d.raw);
    }
}

#[test]
fn a_guest_that_cannot_run_natively_says_so_and_runs_emulated() {
    // The test hook molt.native=test-unavailable makes the guest probe an MSR no host has
    // instead of PVM's signature: the probe's #GP must be caught and every CPU fall back to the
    // emulator (molt adds nothing: the command line has a molt.native= word).
    let out = run(&[
        "--cpus",
        "2",
        "--cmdline",
        "molt.memtest=2 molt.native=test-unavailable molt.ticks=5 molt.exit=0",
    ]);
    out.assert_code(0);
    let lines = out.guest_lines();
    let boot = boot_line(&lines);
    assert_eq!(boot.get("mode"), Some("emulated"), "{}", out.describe());
    assert_eq!(
        boot.get("native"),
        Some("unavailable"),
        "{}",
        out.describe()
    );
    assert_aps_up(&out, &lines, 2);
    for l in of_kind(&lines, "cpu").into_iter().filter(|l| l.has("up")) {
        assert_eq!(l.get("mode"), Some("emulated"), "{}", out.describe());
    }
    assert_ticks(&lines, 5);
    if molt_tests::is_pvm_host() {
        for tick in of_kind(&lines, "tick") {
            assert!(!runs_natively(tick), "{}", tick.raw);
        }
    }
}
