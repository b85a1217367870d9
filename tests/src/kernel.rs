//! A stock Linux kernel for the tests: Debian's `linux-image-*-amd64-unsigned` package,
//! fetched with `apt-get download`, unpacked with `dpkg-deb`, and its `vmlinux` taken out of
//! the bzImage by [`extract_vmlinux`].
//!
//! Everything is cached under the Cargo target directory (`target/linux-kernel/`), so the
//! package is fetched once per machine and checkout. Concurrent tests share one download: the
//! first takes a lock on the cache directory, the others wait for it.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The package the tests boot. Pinned so the boot log (and where the emulator stops it) does
/// not change under the tests; when the archive no longer has it, the newest
/// `linux-image-6.1.0-N-amd64-unsigned` the package lists know is taken instead.
pub const PINNED_PACKAGE: &str = "linux-image-6.1.0-50-amd64-unsigned";

/// Magic at the start of an xz stream.
pub const XZ_MAGIC: [u8; 6] = [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00];

/// Errors getting the kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A file operation failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A helper program could not run or failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status and stderr, or why it could not start.
        detail: String,
    },
    /// The package holds no `boot/vmlinuz-*`.
    #[error("{0} holds no boot/vmlinuz-*")]
    NoBzImage(PathBuf),
    /// No xz stream in the bzImage.
    #[error("the bzImage holds no xz stream (magic FD 37 7A 58 5A 00)")]
    NoXzStream,
    /// The decompressed payload is not an ELF file.
    #[error("the bzImage's xz payload is not an ELF vmlinux")]
    NotElf,
}

/// The kernel files, in the cache.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// Package name.
    pub package: String,
    /// Kernel release (`6.1.0-50-amd64`).
    pub release: String,
    /// The bzImage (`boot/vmlinuz-<release>`).
    pub bzimage: PathBuf,
    /// The ELF `vmlinux` extracted from it.
    pub vmlinux: PathBuf,
}

/// The cache directory: `linux-kernel/` in the Cargo target directory of the running test
/// executable (`target/<profile>/deps/<test>`).
pub fn cache_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let target = exe.ancestors().nth(3).unwrap_or(Path::new("target"));
    target.join("linux-kernel")
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> KernelError {
    let path = path.to_path_buf();
    move |source| KernelError::Io { what, path, source }
}

/// Runs `cmd`; its stdout on success.
fn run(cmd: &mut Command) -> Result<Vec<u8>, KernelError> {
    let command = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| KernelError::Command {
            command: command.clone(),
            detail: format!("cannot start: {e}"),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(KernelError::Command {
            command,
            detail: format!("{}: {}", out.status, stderr.trim()),
        });
    }
    Ok(out.stdout)
}

/// Finds the xz stream in a bzImage (by its magic) and decompresses it with Debian's `xz`
/// (`--single-stream`: the bzImage goes on after the stream). Returns the ELF `vmlinux`.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, KernelError> {
    let start = bzimage
        .windows(XZ_MAGIC.len())
        .position(|w| w == XZ_MAGIC)
        .ok_or(KernelError::NoXzStream)?;
    let command = "xz --decompress --stdout --single-stream";
    let mut child = Command::new("xz")
        .args(["--decompress", "--stdout", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| KernelError::Command {
            command: command.into(),
            detail: format!("cannot start (is xz-utils installed?): {e}"),
        })?;
    let mut stdin = child.stdin.take().ok_or_else(|| KernelError::Command {
        command: command.into(),
        detail: "no stdin pipe".into(),
    })?;
    let payload = bzimage[start..].to_vec();
    // Feed stdin from a thread while the output is read here: both pipes are bounded.
    let feeder = std::thread::spawn(move || {
        // xz stops reading at the end of the stream: a broken pipe after that is expected.
        let _ = stdin.write_all(&payload);
    });
    let out = child.wait_with_output().map_err(|e| KernelError::Command {
        command: command.into(),
        detail: e.to_string(),
    })?;
    let _ = feeder.join();
    if !out.status.success() {
        return Err(KernelError::Command {
            command: command.into(),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    if !out.stdout.starts_with(b"\x7fELF") {
        return Err(KernelError::NotElf);
    }
    Ok(out.stdout)
}

/// An exclusive lock on `dir/lock`, held until the returned file is dropped.
fn lock(dir: &Path) -> Result<File, KernelError> {
    let path = dir.join("lock");
    let f = File::create(&path).map_err(io("cannot create", &path))?;
    // SAFETY: flock on an fd we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    if rc != 0 {
        return Err(io("cannot lock", &path)(std::io::Error::last_os_error()));
    }
    Ok(f)
}

/// The newest `linux-image-6.1.0-N-amd64-unsigned` in apt's package lists.
fn newest_package() -> Option<String> {
    let out = run(Command::new("apt-cache").args([
        "search",
        "--names-only",
        r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
    ]))
    .ok()?;
    let text = String::from_utf8_lossy(&out);
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| {
            let abi = name.strip_prefix("linux-image-6.1.0-")?.split('-').next()?;
            Some((abi.parse::<u32>().ok()?, name.to_string()))
        })
        .max()
        .map(|(_, name)| name)
}

/// Downloads a kernel package into `dir`; returns its name and path.
fn download(dir: &Path) -> Result<(String, PathBuf), KernelError> {
    let get = |pkg: &str| {
        run(Command::new("apt-get")
            .args(["download", "-q", pkg])
            .current_dir(dir))
    };
    let first = match get(PINNED_PACKAGE) {
        Ok(_) => Ok(PINNED_PACKAGE.to_string()),
        Err(e) => {
            // Stale package lists, or the pinned version left the archive.
            eprintln!("{e}; running apt-get update");
            run(Command::new("apt-get").args(["update", "-q"])).map_err(|u| {
                KernelError::Command {
                    command: format!("apt-get download {PINNED_PACKAGE}"),
                    detail: format!("{e}; then {u}"),
                }
            })?;
            match get(PINNED_PACKAGE) {
                Ok(_) => Ok(PINNED_PACKAGE.to_string()),
                Err(e) => match newest_package() {
                    Some(pkg) => get(&pkg).map(|_| pkg),
                    None => Err(e),
                },
            }
        }
    };
    let pkg = first?;
    let entries = std::fs::read_dir(dir).map_err(io("cannot list", dir))?;
    let deb = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&pkg) && n.ends_with(".deb"))
        })
        .ok_or_else(|| KernelError::Command {
            command: format!("apt-get download {pkg}"),
            detail: "no .deb file appeared".into(),
        })?;
    Ok((pkg, deb))
}

/// Unpacks `./boot/vmlinuz-*` of `deb` into `dir`: `dpkg-deb --fsys-tarfile DEB | tar -x`.
fn extract_boot(deb: &Path, dir: &Path) -> Result<(), KernelError> {
    let command = format!(
        "dpkg-deb --fsys-tarfile {} | tar -x ./boot/vmlinuz-*",
        deb.display()
    );
    let fail = |detail: String| KernelError::Command {
        command: command.clone(),
        detail,
    };
    let mut dpkg = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot start dpkg-deb: {e}")))?;
    let pipe = dpkg.stdout.take().ok_or_else(|| fail("no pipe".into()))?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(dir)
        .args(["--wildcards", "./boot/vmlinuz-*"])
        .stdin(pipe)
        .output()
        .map_err(|e| fail(format!("cannot start tar: {e}")))?;
    let dpkg = dpkg.wait().map_err(|e| fail(e.to_string()))?;
    if !dpkg.success() || !tar.status.success() {
        return Err(fail(format!(
            "dpkg-deb {dpkg}, tar {}: {}",
            tar.status,
            String::from_utf8_lossy(&tar.stderr).trim()
        )));
    }
    Ok(())
}

fn read_ready(dir: &Path) -> Option<Kernel> {
    let text = std::fs::read_to_string(dir.join("ready")).ok()?;
    let mut words = text.split_whitespace();
    let (package, release) = (words.next()?.to_string(), words.next()?.to_string());
    let k = Kernel {
        bzimage: dir.join(format!("vmlinuz-{release}")),
        vmlinux: dir.join(format!("vmlinux-{release}")),
        package,
        release,
    };
    (k.bzimage.is_file() && k.vmlinux.is_file()).then_some(k)
}

/// Debian's kernel, from the cache or fetched into it.
pub fn debian_kernel() -> Result<Kernel, KernelError> {
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
    let _lock = lock(&dir)?;
    if let Some(k) = read_ready(&dir) {
        return Ok(k);
    }
    let work = dir.join("download");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(io("cannot create", &work))?;
    let (package, deb) = download(&work)?;
    eprintln!("fetched {}", deb.display());
    // Only boot/ is wanted: the modules would take hundreds of MB.
    extract_boot(&deb, &work)?;
    let boot = work.join("boot");
    let bz = std::fs::read_dir(&boot)
        .map_err(io("cannot list", &boot))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or_else(|| KernelError::NoBzImage(deb.clone()))?;
    let release = bz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .ok_or_else(|| KernelError::NoBzImage(deb.clone()))?
        .to_string();
    let image = std::fs::read(&bz).map_err(io("cannot read", &bz))?;
    let vmlinux = extract_vmlinux(&image)?;
    let k = Kernel {
        bzimage: dir.join(format!("vmlinuz-{release}")),
        vmlinux: dir.join(format!("vmlinux-{release}")),
        package,
        release,
    };
    std::fs::write(&k.bzimage, &image).map_err(io("cannot write", &k.bzimage))?;
    std::fs::write(&k.vmlinux, &vmlinux).map_err(io("cannot write", &k.vmlinux))?;
    let ready = dir.join("ready");
    std::fs::write(&ready, format!("{} {}\n", k.package, k.release))
        .map_err(io("cannot write", &ready))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(k)
}

/// The bytes of an ELF64 file's loaded image at virtual address `vaddr` (up to `len`, within
/// one program header's file contents): what a kernel executed at a given `rip`.
pub fn bytes_at(elf: &[u8], vaddr: u64, len: usize) -> Option<&[u8]> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    if !elf.starts_with(b"\x7fELF\x02") {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let (phentsize, phnum) = (usize::from(u16_at(0x36)?), usize::from(u16_at(0x38)?));
    (0..phnum).find_map(|i| {
        let ph = phoff + i * phentsize;
        let (offset, va, filesz) = (u64_at(ph + 8)?, u64_at(ph + 0x10)?, u64_at(ph + 0x20)?);
        let rel = vaddr.checked_sub(va).filter(|r| *r < filesz)?;
        let start = usize::try_from(offset + rel).ok()?;
        let end = start + len.min(usize::try_from(filesz - rel).ok()?);
        elf.get(start..end)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bytes_at_a_virtual_address() {
        // An ELF64 header with one program header: file offset 0x100, vaddr 0x1000, 4 bytes.
        let mut elf = vec![0u8; 0x104];
        elf[..5].copy_from_slice(b"\x7fELF\x02");
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[0x48..0x50].copy_from_slice(&0x100u64.to_le_bytes());
        elf[0x50..0x58].copy_from_slice(&0x1000u64.to_le_bytes());
        elf[0x60..0x68].copy_from_slice(&4u64.to_le_bytes());
        elf[0x100..].copy_from_slice(&[0xcc, 0x90, 0x0f, 0xae]);
        assert_eq!(bytes_at(&elf, 0x1000, 2), Some(&[0xcc, 0x90][..]));
        assert_eq!(bytes_at(&elf, 0x1002, 8), Some(&[0x0f, 0xae][..]));
        assert_eq!(bytes_at(&elf, 0x1004, 1), None);
        assert_eq!(bytes_at(&elf[..4], 0x1000, 1), None);
    }

    #[test]
    fn finds_and_decompresses_the_xz_stream() {
        let elf = b"\x7fELF and then the kernel".repeat(100);
        let mut xz = Command::new("xz")
            .args(["--compress", "--stdout", "--check=crc32"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("xz is installed (.ci/run installs xz-utils)");
        xz.stdin.take().unwrap().write_all(&elf).unwrap();
        let stream = xz.wait_with_output().unwrap().stdout;
        // A bzImage: setup code and decompressor before the stream, more code after it.
        let mut image = vec![0x55u8; 5000];
        image.extend_from_slice(&stream);
        image.extend_from_slice(&[0xaa; 300]);
        assert_eq!(extract_vmlinux(&image).unwrap(), elf);
        assert!(matches!(
            extract_vmlinux(&[0u8; 100]),
            Err(KernelError::NoXzStream)
        ));
        let mut not_elf = Command::new("xz")
            .args(["--compress", "--stdout"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        not_elf.stdin.take().unwrap().write_all(b"MZ").unwrap();
        let s = not_elf.wait_with_output().unwrap().stdout;
        assert!(matches!(extract_vmlinux(&s), Err(KernelError::NotElf)));
    }
}
