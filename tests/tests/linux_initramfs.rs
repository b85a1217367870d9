//! Booting a Linux kernel of the user's choice through molt's Linux boot path (bzImage, zero
//! page, e820, cmdline, initrd), up to a line printed by the initramfs's `/init`.
//!
//! Only where that can work: `MOLT_LINUX_KERNEL` names a bzImage and KVM is not PVM (on PVM
//! hosts a stock kernel runs in KVM's instruction emulator and never gets that far: see
//! `linux.rs`, which boots Debian's kernel as far as it goes there). Everywhere else the test
//! says why it is skipped. The initramfs tooling — the cpio writer and the gcc build of
//! `/init` — is checked on every host by `initramfs_tooling_works`, so it cannot rot unnoticed.

use std::path::Path;

use molt_tests::cpio::{self, S_IFCHR, S_IFDIR, S_IFMT, S_IFREG};
use molt_tests::linux_init::{self, Variant, INIT_OK_LINE};
use molt_tests::{is_pvm_host, run, TempDir};

/// Builds `/init` and the initramfs in `dir`; returns the initramfs path.
fn build_initramfs(dir: &TempDir) -> std::path::PathBuf {
    let init = linux_init::build(dir.path(), Variant::Init).unwrap_or_else(|e| panic!("{e}"));
    let elf = std::fs::read(&init).unwrap();
    linux_init::check_static_executable(&elf).unwrap_or_else(|e| panic!("/init: {e}"));
    let path = dir.join("initramfs.cpio");
    std::fs::write(&path, linux_init::initramfs(elf)).unwrap();
    path
}

#[test]
fn initramfs_tooling_works() {
    let dir = TempDir::new("initramfs");
    let initramfs = build_initramfs(&dir);

    // The archive reads back with /dev, /dev/console (5, 1) and an executable /init.
    let entries = cpio::read(&std::fs::read(&initramfs).unwrap()).unwrap();
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["dev", "dev/console", "init"]);
    assert_eq!(entries[0].mode & S_IFMT, S_IFDIR);
    assert_eq!(entries[1].mode & S_IFMT, S_IFCHR);
    assert_eq!(entries[1].rdev, (5, 1));
    assert_eq!(entries[2].mode, S_IFREG | 0o755);
    let init = &entries[2].data;
    assert_eq!(init, &std::fs::read(dir.join("init")).unwrap());
    let contains = |needle: &[u8]| init.windows(needle.len()).any(|w| w == needle);
    assert!(contains(b"/dev/console\0"), "/init opens the console");
    assert!(contains(INIT_OK_LINE.as_bytes()), "/init prints its line");

    // The same source built to print on stdout and exit (instead of restarting the machine)
    // runs here: the raw system calls work.
    let dry = linux_init::build(dir.path(), Variant::DryRun).unwrap_or_else(|e| panic!("{e}"));
    linux_init::check_static_executable(&std::fs::read(&dry).unwrap()).unwrap();
    let out = std::process::Command::new(&dry).output().unwrap();
    assert!(out.status.success(), "{:?}", out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{INIT_OK_LINE}\n")
    );
}

/// Why the Linux boot cannot run here, if it cannot.
fn skip_reason() -> Option<String> {
    let Some(kernel) = std::env::var_os("MOLT_LINUX_KERNEL") else {
        return Some("MOLT_LINUX_KERNEL is not set (it names a bzImage to boot)".into());
    };
    if !Path::new(&kernel).is_file() {
        return Some(format!(
            "MOLT_LINUX_KERNEL={} is not a file",
            Path::new(&kernel).display()
        ));
    }
    if is_pvm_host() {
        return Some(
            "KVM on this host is PVM (/sys/module/kvm_pvm exists): only PVM-aware Linux \
             kernels boot here"
                .into(),
        );
    }
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm does not exist".into());
    }
    None
}

#[test]
fn linux_boots_to_its_initramfs() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: Linux boot test: {why}");
        return;
    }
    let kernel = std::env::var("MOLT_LINUX_KERNEL").unwrap();
    let dir = TempDir::new("linux");
    let initramfs = build_initramfs(&dir);
    let out = run(&[
        "--kernel",
        &kernel,
        "--initrd",
        &initramfs.display().to_string(),
        "--cmdline",
        "console=ttyS0 reboot=k panic=-1 rdinit=/init",
    ]);
    assert!(
        out.stdout().iter().any(|l| l.contains(INIT_OK_LINE)),
        "Linux did not reach /init\n{}",
        out.describe()
    );
    out.assert_code(0);
}
