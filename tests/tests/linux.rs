//! A stock Linux kernel (Debian's `linux-image-6.1.0-*-amd64-unsigned`, see
//! `molt_tests::kernel`) on molt's Linux boot path, on every host.
//!
//! On a PVM host the kernel is not PVM-aware, so all of it runs in KVM's instruction emulator
//! (~1 M instructions/s) and stops where the emulator cannot execute an instruction; the test
//! prints the last line it reached and what stopped it. What it checks is what molt set up and
//! what a live update must keep: the command line, the e820 map and the RAM size as Linux
//! reports them, and a boot log that goes on across a `vm.cpr-exec` with no line lost or
//! doubled (compared with a second VM that boots the same kernel without an update).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use arch::layout::ram_ranges;
use arch::zeropage::{e820_map, E820_RAM};
use molt_tests::kernel::{self, debian_kernel, Kernel, PINNED_PACKAGE};
use molt_tests::linux_log::{self, E820Line};
use molt_tests::{api, skip, Molt, Output, Stream, TempDir};

/// `noxsave`: this host's PVM shows the guest the host's XSAVE, AVX, RDRAND, ... in CPUID
/// leaf 1 whatever the VMM sets with KVM_SET_CPUID2 (it only honours the bits KVM itself
/// reports, such as CMPXCHG16B, which the `emulated` CPU template hides), and KVM's emulator
/// cannot execute `xrstor`: without `noxsave` Linux stops in its FPU initialization.
const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 nokaslr panic=-1 noxsave";
const RAM: u64 = 512 << 20;
/// The first kernel line comes after ~40 s of emulated start-up here, the last (~2.5 min in)
/// is followed by the emulation failure that ends molt. Two VMs run side by side on a machine
/// other tests load too: allow several times that, but not hours.
const BOOT_LIMIT: Duration = Duration::from_secs(20 * 60);
/// The line after which the live update happens: early, so most of the log comes after it.
const UPDATE_AFTER: &str = "Hypervisor detected";

fn kernel(what: &str) -> Option<Kernel> {
    match debian_kernel() {
        Ok(k) => Some(k),
        Err(e) => {
            skip(
                what,
                &format!("cannot get Debian's kernel package ({PINNED_PACKAGE} or newer): {e}"),
            );
            None
        }
    }
}

fn args(kernel: &std::path::Path) -> Vec<String> {
    let mut a: Vec<String> = ["--kernel", &kernel.display().to_string(), "--memory"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(["size=512M".into(), "--cmdline".into(), CMDLINE.into()]);
    a
}

/// molt's e820 map for [`RAM`], as Linux prints it.
fn molt_e820() -> Vec<E820Line> {
    e820_map(&ram_ranges(RAM))
        .expect("e820 map")
        .iter()
        .map(|e| E820Line {
            start: e.addr,
            end: e.addr + e.size - 1,
            kind: if e.kind == E820_RAM {
                "usable"
            } else {
                "reserved"
            }
            .into(),
        })
        .collect()
}

/// KiB Linux counts as RAM in its `Memory: avail/total` line: the whole pages of the usable
/// e820 ranges, less page 0, which Linux keeps for the BIOS (`trim_bios_range`).
fn expected_total_kib(map: &[E820Line]) -> u64 {
    let pages: u64 = map
        .iter()
        .filter(|e| e.kind == "usable")
        .map(|e| ((e.end + 1) / 4096).saturating_sub(e.start.div_ceil(4096)))
        .sum();
    (pages - 1) * 4
}

/// How many times each line shape (digits masked) occurs in the kernel log.
fn shapes(texts: &[&str]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for t in texts {
        *m.entry(linux_log::shape(t)).or_default() += 1;
    }
    m
}

/// The instruction bytes at the `rip` an emulation failure names, as `0f ae 2f ..`.
fn stopped_at(k: &Kernel, reason: &str) -> Option<(u64, Vec<u8>)> {
    let hex = reason
        .split("at rip 0x")
        .nth(1)?
        .split_whitespace()
        .next()?;
    let rip = u64::from_str_radix(hex, 16).ok()?;
    let elf = std::fs::read(&k.vmlinux).ok()?;
    Some((rip, kernel::bytes_at(&elf, rip, 8)?.to_vec()))
}

/// Whether `code` starts with an XSAVE-family instruction (`0f ae /4 /5 /6`, `0f c7 /3 /4 /5`,
/// after an optional REX prefix).
fn is_xsave_family(code: &[u8]) -> bool {
    let code = match code.first() {
        Some(b) if b & 0xf0 == 0x40 => &code[1..],
        _ => code,
    };
    match code {
        [0x0f, 0xae, modrm, ..] => (4..=6).contains(&((modrm >> 3) & 7)) && modrm >> 6 != 3,
        [0x0f, 0xc7, modrm, ..] => (3..=5).contains(&((modrm >> 3) & 7)) && modrm >> 6 != 3,
        _ => false,
    }
}

/// What ended the run: the stderr error line, or the exit status.
fn stop_reason(out: &Output) -> String {
    out.stderr()
        .iter()
        .find(|l| l.starts_with("molt: error: "))
        .map(|l| l.to_string())
        .unwrap_or_else(|| format!("molt exited: {}", out.status))
}

fn check_boot_log(out: &Output) -> Vec<String> {
    let stdout = out.stdout();
    let texts = linux_log::texts(stdout.iter().copied());
    assert!(
        texts.iter().any(|t| t.starts_with("Linux version ")),
        "no `Linux version` line\n{}",
        out.describe()
    );
    assert_eq!(
        linux_log::command_line(&texts),
        Some(CMDLINE),
        "{}",
        out.describe()
    );
    let map = molt_e820();
    assert_eq!(linux_log::e820(&texts), map, "e820 map\n{}", out.describe());
    let (avail, total) = linux_log::memory_kib(&texts)
        .unwrap_or_else(|| panic!("no `Memory:` line\n{}", out.describe()));
    assert_eq!(total, expected_total_kib(&map), "Memory: {avail}K/{total}K");
    let at = texts
        .iter()
        .position(|t| t.starts_with("Memory: "))
        .unwrap();
    assert!(
        texts.len() > at + 20,
        "Linux stopped soon after its `Memory:` line\n{}",
        out.describe()
    );
    assert!(
        texts.iter().any(|t| t.starts_with("x86/fpu: ")),
        "Linux did not reach its FPU initialization\n{}",
        out.describe()
    );
    // Timestamps never go backwards: no line from before the update shows up after it.
    let stamps: Vec<u64> = stdout
        .iter()
        .filter_map(|l| linux_log::split_timestamp(l).map(|(us, _)| us))
        .collect();
    assert!(
        stamps.windows(2).all(|w| w[0] <= w[1]),
        "timestamps go backwards\n{}",
        out.describe()
    );
    texts.iter().map(|t| t.to_string()).collect()
}

#[test]
fn stock_vmlinux_boots_as_far_as_it_can_across_a_live_update() {
    let Some(k) = kernel("stock Linux boot test") else {
        return;
    };
    let dir = TempDir::new("linux");
    let socket: PathBuf = dir.join("api.sock");
    let mut a = args(&k.vmlinux);
    let reference = Molt::spawn(&a);
    a.extend(["--api-socket".into(), socket.display().to_string()]);
    let mut vm = Molt::spawn(&a);
    api::wait_ready(&socket, Duration::from_secs(60));

    let started = Instant::now();
    vm.wait_stdout("Linux version", BOOT_LIMIT);
    vm.wait_stdout(UPDATE_AFTER, BOOT_LIMIT);
    let r = api::put(&socket, "vm.cpr-exec", "{}");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body["rolled_back"].is_null(), "{r:?}");
    let updated = Instant::now();
    let left = BOOT_LIMIT.saturating_sub(started.elapsed());
    let out = vm.finish(left);
    let reference = reference.finish(BOOT_LIMIT.saturating_sub(started.elapsed()));
    out.assert_no_panic();
    reference.assert_no_panic();

    let texts = check_boot_log(&out);
    let ref_texts = check_boot_log(&reference);
    let after = out
        .lines
        .iter()
        .filter(|l| l.stream == Stream::Stdout && l.at > updated)
        .count();
    assert!(
        after >= 20,
        "only {after} lines after the update\n{}",
        out.describe()
    );
    // The same kernel on the same VM prints the same lines, up to the numbers in them
    // (timestamps, clock offsets, TSC figures): a line lost or doubled by the update shows.
    let (got, want) = (
        shapes(&texts.iter().map(String::as_str).collect::<Vec<_>>()),
        shapes(&ref_texts.iter().map(String::as_str).collect::<Vec<_>>()),
    );
    let differ: Vec<_> = got
        .keys()
        .chain(want.keys())
        .filter(|s| got.get(*s) != want.get(*s))
        .map(|s| (s, got.get(s), want.get(s)))
        .collect();
    assert!(
        differ.is_empty(),
        "lines differ (shape, with update, without): {differ:#?}"
    );
    let reason = stop_reason(&out);
    assert_eq!(reason, stop_reason(&reference));
    let code = stopped_at(&k, &reason);
    if let Some((_, bytes)) = &code {
        assert!(
            !is_xsave_family(bytes),
            "Linux stopped in its FPU initialization ({bytes:02x?}): {reason}"
        );
    }
    eprintln!(
        "{} ({}): {} kernel lines, {after} after the live update; last line: {:?}; then: {}{}",
        k.package,
        k.release,
        texts.len(),
        texts.last().map(String::as_str).unwrap_or(""),
        reason,
        code.map(|(rip, b)| format!("; code at {rip:#x}: {b:02x?}"))
            .unwrap_or_default()
    );
}

#[test]
fn xsave_family_is_recognized() {
    assert!(is_xsave_family(&[0x48, 0x0f, 0xae, 0x2f])); // xrstor64 (%rdi)
    assert!(is_xsave_family(&[0x48, 0x0f, 0xc7, 0x1f])); // xrstors64 (%rdi)
    assert!(is_xsave_family(&[0x0f, 0xae, 0x27])); // xsave (%rdi)
    assert!(!is_xsave_family(&[0x0f, 0xae, 0x07])); // fxsave (%rdi)
    assert!(!is_xsave_family(&[0x0f, 0xae, 0xe8])); // lfence
    assert!(!is_xsave_family(&[0xcc, 0x90])); // int3
}

#[test]
fn stock_bzimage_starts_its_decompressor() {
    let Some(k) = kernel("stock bzImage boot test") else {
        return;
    };
    // The decompressor's first words (Debian builds without X86_VERBOSE_BOOTUP, so it prints
    // nothing before or after them); the decompression that follows takes far longer than a
    // test waits under emulation (see the README). Dropping `vm` kills it.
    let mut vm = Molt::spawn(&args(&k.bzimage));
    vm.wait_stdout(
        "KASLR disabled: 'nokaslr' on cmdline.",
        Duration::from_secs(120),
    );
}
