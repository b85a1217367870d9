//! The few userfaultfd calls lazy restore and live snapshots need, as raw syscalls and
//! ioctls (the `userfaultfd` crate needs libclang at build time). Missing-page mode and
//! write-protect mode (including pages never touched) work on memfd (shmem) and hugetlb
//! mappings on this kernel (`../shared/NOTES.md`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const UFFDIO: u64 = 0xAA;
const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_REGISTER_MODE_WP: u64 = 2;
const UFFDIO_REGISTER_MODE_MINOR: u64 = 4;
/// `UFFDIO_CONTINUE_MODE_DONTWAKE`.
const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1;
/// `UFFD_FEATURE_MINOR_HUGETLBFS`: minor faults on hugetlbfs mappings.
pub const FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
/// Write-protect faults are reported (`UFFD_FEATURE_PAGEFAULT_FLAG_WP`).
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// Write protection of shmem and hugetlb mappings (`UFFD_FEATURE_WP_HUGETLBFS_SHMEM`).
pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// Write protection covers pages not populated yet (`UFFD_FEATURE_WP_UNPOPULATED`).
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `uffd_msg.event` of a page fault.
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}

const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

const UFFDIO_API: u64 = iowr(0x3f, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: u64 = ior(0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ior(0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, std::mem::size_of::<UffdioZeropage>());
const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, std::mem::size_of::<UffdioWriteprotect>());
const UFFDIO_CONTINUE: u64 = iowr(0x07, std::mem::size_of::<UffdioContinue>());

#[repr(C)]
#[derive(Default)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// A userfaultfd, non-blocking.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

/// Runs one ioctl on `fd` with `arg`.
fn ioctl<T>(fd: &OwnedFd, request: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: every request used here takes a pointer to the `repr(C)` struct `T` it is
    // paired with (sizes encoded in the request numbers above); `arg` is valid and writable
    // for the duration of the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// Opens a userfaultfd (close-on-exec, non-blocking) and negotiates the API.
    pub fn new() -> io::Result<Self> {
        Self::with_features(0)
    }

    /// Opens a userfaultfd asking for `features` (all of them, or an error).
    pub fn with_features(features: u64) -> io::Result<Self> {
        // SAFETY: the userfaultfd syscall takes only flags and returns a new fd or -1.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ..UffdioApi::default()
        };
        ioctl(&fd, UFFDIO_API, &mut api)?;
        if api.features & features != features {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("userfaultfd lacks features {:#x}", features & !api.features),
            ));
        }
        Ok(Self { fd })
    }

    /// Registers `[start, start + len)` of this process for the faults of `mode`.
    fn register_mode(&self, start: u64, len: u64, mode: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        ioctl(&self.fd, UFFDIO_REGISTER, &mut reg)
    }

    /// Registers `[start, start + len)` of this process for write-protect faults.
    pub fn register_wp(&self, start: u64, len: u64) -> io::Result<()> {
        self.register_mode(start, len, UFFDIO_REGISTER_MODE_WP)
    }

    /// Write-protects `[start, start + len)` (`on`), or removes the protection and wakes
    /// the threads waiting on it.
    pub fn write_protect(&self, start: u64, len: u64, on: bool) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if on { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
        };
        loop {
            match ioctl(&self.fd, UFFDIO_WRITEPROTECT, &mut wp) {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => continue,
                r => return r,
            }
        }
    }

    /// Waits up to `timeout_ms` for a fault to be pending; true if one may be.
    pub fn wait(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd on the stack.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        match rc {
            n if n > 0 => Ok(true),
            0 => Ok(false),
            _ => {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Registers `[start, start + len)` of this process for missing-page faults.
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        self.register_mode(start, len, UFFDIO_REGISTER_MODE_MISSING)
    }

    /// Registers `[start, start + len)` of this process for minor faults (a page the file
    /// holds but this mapping does not map yet).
    pub fn register_minor(&self, start: u64, len: u64) -> io::Result<()> {
        self.register_mode(start, len, UFFDIO_REGISTER_MODE_MINOR)
    }

    /// Maps into `[start, start + len)` (registered for minor faults) the pages the file
    /// holds there, waking no one; returns the bytes mapped before the first hole (`EFAULT`
    /// if the range starts with one).
    pub fn map_present(&self, start: u64, len: u64) -> io::Result<u64> {
        let mut cont = UffdioContinue {
            range: UffdioRange { start, len },
            mode: UFFDIO_CONTINUE_MODE_DONTWAKE,
            mapped: 0,
        };
        match ioctl(&self.fd, UFFDIO_CONTINUE, &mut cont) {
            Ok(()) => Ok(len),
            // Mapped a run of pages, then met a hole.
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && cont.mapped > 0 => {
                Ok(cont.mapped as u64)
            }
            Err(e) => Err(e),
        }
    }

    /// Unregisters a range (threads blocked on it are woken).
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        ioctl(&self.fd, UFFDIO_UNREGISTER, &mut range)
    }

    /// Wakes threads blocked on a range already filled.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        ioctl(&self.fd, UFFDIO_WAKE, &mut range)
    }

    /// Copies `src` into the missing `page`-sized pages at `dst` and wakes threads waiting for
    /// them. A page already there is not an error: it is left as it is and the copy goes on
    /// after it. Returns how many pages were already there.
    pub fn copy(&self, dst: u64, src: &[u8], page: u64) -> io::Result<u64> {
        let len = src.len() as u64;
        let (mut done, mut present) = (0u64, 0u64);
        while done < len {
            let mut c = UffdioCopy {
                dst: dst + done,
                src: src.as_ptr() as u64 + done,
                len: len - done,
                ..UffdioCopy::default()
            };
            match ioctl(&self.fd, UFFDIO_COPY, &mut c) {
                Ok(()) => break,
                // Part of the range was copied (up to a page that failed), or nothing yet
                // (the mappings were changing): go on where it stopped.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    done += c.copy.max(0) as u64;
                }
                // The first page of what is left is already there.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    done += page;
                    present += 1;
                }
                Err(e) => return Err(e),
            }
        }
        if present > 0 {
            // A thread may wait on a page that was already there.
            self.wake(dst, len)?;
        }
        Ok(present)
    }

    /// Maps zero pages at `[start, start + len)` and wakes threads waiting for them.
    pub fn zero(&self, start: u64, len: u64) -> io::Result<()> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start, len },
            ..UffdioZeropage::default()
        };
        match ioctl(&self.fd, UFFDIO_ZEROPAGE, &mut z) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => self.wake(start, len),
            r => r,
        }
    }

    /// The next page fault's address, if one is pending (`Ok(None)` when none is).
    pub fn next_fault(&self) -> io::Result<Option<u64>> {
        let mut msg = [0u8; 32];
        loop {
            // SAFETY: reads at most 32 bytes (one `struct uffd_msg`) into `msg`.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(None),
                    Some(libc::EINTR) => continue,
                    _ => Err(e),
                };
            }
            if n as usize == msg.len() && msg[0] == UFFD_EVENT_PAGEFAULT {
                let mut addr = [0u8; 8];
                addr.copy_from_slice(&msg[16..24]);
                return Ok(Some(u64::from_ne_bytes(addr)));
            }
        }
    }
}
