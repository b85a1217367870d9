//! The `/init` of the Linux boot test and the initramfs that carries it.
//!
//! `/init` is a tiny static x86-64 program compiled at test time by `gcc -static -nostdlib`
//! from [`INIT_C`]. It uses raw system calls only: it writes [`INIT_OK_LINE`] to
//! `/dev/console` and then asks the kernel to restart the machine
//! (`reboot(LINUX_REBOOT_CMD_RESTART)`), which with `reboot=k` pulses the i8042 reset line
//! and ends molt with exit code 0.
//!
//! Built with [`Variant::DryRun`] the same program writes to its standard output and exits
//! with status 0 instead of restarting, so the tests that run on every host can execute it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::{self, Entry};

/// What `/init` prints.
pub const INIT_OK_LINE: &str = "molt-linux: init ok";

/// Source of `/init`.
pub const INIT_C: &str = r#"/* /init of molt's Linux boot test: one console line, then a machine restart. */
#define SYS_write 1
#define SYS_open 2
#define SYS_reboot 169
#define SYS_exit_group 231
#define O_WRONLY 1
#define LINUX_REBOOT_MAGIC1 0xfee1deadL
#define LINUX_REBOOT_MAGIC2 672274793L
#define LINUX_REBOOT_CMD_RESTART 0x01234567L

static long sys4(long nr, long a, long b, long c, long d)
{
    long ret;
    register long r10 __asm__("r10") = d;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10)
                     : "rcx", "r11", "memory");
    return ret;
}

static const char message[] = "molt-linux: init ok\n";

__attribute__((noreturn)) void _start(void)
{
#ifdef MOLT_INIT_DRY_RUN
    long fd = 1;
#else
    long fd = sys4(SYS_open, (long)"/dev/console", O_WRONLY, 0, 0);
    if (fd < 0)
        fd = 1;
#endif
    sys4(SYS_write, fd, (long)message, sizeof message - 1, 0);
#ifdef MOLT_INIT_DRY_RUN
    sys4(SYS_exit_group, 0, 0, 0, 0);
#else
    sys4(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_RESTART, 0);
    /* Restart refused: exiting makes the kernel panic, and panic=-1 restarts at once. */
    sys4(SYS_exit_group, 1, 0, 0, 0);
#endif
    for (;;)
        ;
}
"#;

/// Which program to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The real `/init`: prints on `/dev/console` and restarts the machine.
    Init,
    /// Safe to run on the host: prints on stdout and exits with status 0.
    DryRun,
}

/// Compiles [`INIT_C`] with gcc into `dir` and returns the executable's path.
pub fn build(dir: &Path, variant: Variant) -> Result<PathBuf, String> {
    let name = match variant {
        Variant::Init => "init",
        Variant::DryRun => "init-dry-run",
    };
    let src = dir.join(format!("{name}.c"));
    let out = dir.join(name);
    std::fs::write(&src, INIT_C).map_err(|e| format!("cannot write {}: {e}", src.display()))?;
    let mut cmd = Command::new("gcc");
    cmd.args([
        "-static",
        "-nostdlib",
        "-O2",
        "-ffreestanding",
        "-fno-stack-protector",
        "-fno-asynchronous-unwind-tables",
        "-fno-pie",
        "-no-pie",
        "-Wall",
        "-Werror",
        "-Wl,--build-id=none",
    ]);
    if variant == Variant::DryRun {
        cmd.arg("-DMOLT_INIT_DRY_RUN");
    }
    cmd.arg("-o").arg(&out).arg(&src);
    let result = cmd
        .output()
        .map_err(|e| format!("cannot run gcc (needed to build the initramfs /init): {e}"))?;
    if !result.status.success() {
        return Err(format!(
            "gcc failed ({}): {}",
            result.status,
            String::from_utf8_lossy(&result.stderr)
        ));
    }
    Ok(out)
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Checks that `elf` is what Linux can run as `/init` without any library: a 64-bit
/// little-endian x86-64 `ET_EXEC` with no interpreter and no dynamic section, whose entry
/// point lies in an executable loadable segment.
pub fn check_static_executable(elf: &[u8]) -> Result<(), String> {
    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const PF_X: u32 = 1;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if elf[4] != 2 || elf[5] != 1 {
        return Err("not a 64-bit little-endian ELF".into());
    }
    if u16_at(elf, 16) != 2 {
        return Err(format!("e_type {} is not ET_EXEC", u16_at(elf, 16)));
    }
    if u16_at(elf, 18) != 62 {
        return Err(format!("e_machine {} is not x86-64", u16_at(elf, 18)));
    }
    let entry = u64_at(elf, 24);
    let phoff = u64_at(elf, 32) as usize;
    let phentsize = usize::from(u16_at(elf, 54));
    let phnum = usize::from(u16_at(elf, 56));
    if phentsize < 56 || phoff + phnum * phentsize > elf.len() {
        return Err("bad program header table".into());
    }
    let mut entry_ok = false;
    for i in 0..phnum {
        let ph = &elf[phoff + i * phentsize..];
        let (kind, flags) = (u32_at(ph, 0), u32_at(ph, 4));
        let (vaddr, memsz) = (u64_at(ph, 16), u64_at(ph, 40));
        match kind {
            PT_INTERP => return Err("has an interpreter (not static)".into()),
            PT_DYNAMIC => return Err("has a dynamic section".into()),
            PT_LOAD if flags & PF_X != 0 && (vaddr..vaddr + memsz).contains(&entry) => {
                entry_ok = true
            }
            _ => {}
        }
    }
    if !entry_ok {
        return Err(format!(
            "entry point {entry:#x} is not in an executable segment"
        ));
    }
    Ok(())
}

/// The initramfs of the Linux boot test: `/dev`, `/dev/console` (5, 1) and `/init`.
pub fn initramfs(init: Vec<u8>) -> Vec<u8> {
    cpio::write(&[
        Entry::dir("dev", 0o755),
        Entry::char_dev("dev/console", 0o600, 5, 1),
        Entry::file("init", 0o755, init),
    ])
}
