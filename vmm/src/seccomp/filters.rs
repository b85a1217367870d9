//! The syscall lists. Each list names what its threads do on every path (see the comments);
//! anything else is the mode's action (kill or log). `ioctl` is limited to the ioctl types
//! the thread uses (the type byte of the request: `(request >> 8) & 0xff`).

use std::collections::BTreeMap;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule,
};

use super::ThreadKind;

/// KVM ioctls (KVMIO).
const IOC_KVM: u64 = 0xAE;
/// userfaultfd ioctls (lazy snapshot restore, background snapshots).
const IOC_UFFD: u64 = 0xAA;
/// 'T': terminals (TCGETS, isatty), FIONBIO/FIOCLEX (std's set_nonblocking), TUN (taps).
const IOC_T: u64 = 0x54;
/// Block devices (BLKGETSIZE64 for a disk that is a block device).
const IOC_BLK: u64 = 0x12;

/// Both kinds of threads: memory allocation, locks, the kick signal, time, logging to
/// stderr (with the page faults of a timed step, `getrusage`), thread exit.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_clock_gettime,
    libc::SYS_getrusage,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // A panic aborts the process (raise → tgkill).
    libc::SYS_tgkill,
];

/// A vCPU thread: KVM_RUN and the vCPU state ioctls (capture runs on the vCPU thread), guest
/// PIO/MMIO handled by the device models (serial output: `write` to stdout, a file or the
/// socket client, already connected; interrupts and resets: eventfd writes), and the end of the thread (the
/// vCPU fd and maybe the last reference to a device closed). Nothing that opens, creates or
/// connects anything.
/// `sendto`: std writes to a unix stream socket with `send(MSG_NOSIGNAL)` (serial socket).
/// `read`: the i8042 model's reset eventfd is read back after a guest write to it.
/// `fcntl(F_GETFD)` only: std checks that an fd is open before it closes it (debug builds).
/// `sendmsg`/`recvmsg`: a vhost-user disk's DRIVER_OK and reset reach its backend from the
/// vCPU thread, over the already connected socket (memfds and eventfds passed as SCM_RIGHTS).
const VCPU: &[i64] = &[
    libc::SYS_read,
    libc::SYS_ioctl,
    libc::SYS_fcntl,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
];

/// The main thread and the threads it starts: everything above plus files (disks, snapshot
/// directories, /proc), sockets (API, serial, transfer), the event loop's fds, guest RAM
/// (memfds, userfaultfd), threads and helper processes (a `clone(CLONE_VM)` holder; every
/// child inherits the filter, so none can exec), signals to children (guardian), resource
/// limits. Not: execve, execveat, ptrace, mount, module or key syscalls, bpf, personality.
const CONTROL: &[i64] = &[
    // I/O
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_sync_file_range,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    // Files and directories
    libc::SYS_openat,
    libc::SYS_open,
    libc::SYS_close_range,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rmdir,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_chmod,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_getcwd,
    libc::SYS_fcntl,
    libc::SYS_flock,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_umask,
    // Guest RAM
    libc::SYS_memfd_create,
    libc::SYS_userfaultfd,
    libc::SYS_mincore,
    libc::SYS_mlock,
    libc::SYS_munlock,
    // Sockets
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_shutdown,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    // The event loop
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_signalfd4,
    libc::SYS_poll,
    libc::SYS_ppoll,
    // Threads, helper processes, signals
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    // The live-snapshot fault thread raises its own priority.
    libc::SYS_setpriority,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_setaffinity,
    libc::SYS_rt_sigaction,
    libc::SYS_kill,
    libc::SYS_tkill,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_wait4,
    libc::SYS_waitid,
    // Identity and limits
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getppid,
    libc::SYS_uname,
    libc::SYS_getrlimit,
    libc::SYS_prlimit64,
    libc::SYS_sysinfo,
    libc::SYS_gettimeofday,
    libc::SYS_clock_getres,
    libc::SYS_ioctl,
];

/// The ioctl types a thread may use.
fn ioctl_types(kind: ThreadKind) -> &'static [u64] {
    match kind {
        ThreadKind::Vcpu => &[IOC_KVM],
        ThreadKind::Control => &[IOC_KVM, IOC_UFFD, IOC_T, IOC_BLK],
    }
}

/// Every syscall `kind` may make (some with argument conditions).
pub(super) fn allowed(kind: ThreadKind) -> Vec<i64> {
    let own = match kind {
        ThreadKind::Vcpu => VCPU,
        ThreadKind::Control => CONTROL,
    };
    let mut all: Vec<i64> = COMMON.iter().chain(own).copied().collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// The argument conditions of `sys` for `kind` (empty: any arguments).
fn conditions(kind: ThreadKind, sys: i64) -> Result<Vec<SeccompRule>, BackendError> {
    let arg1 = |op, value| {
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, op, value)
            .and_then(|c| SeccompRule::new(vec![c]))
    };
    match (kind, sys) {
        (_, libc::SYS_ioctl) => ioctl_types(kind)
            .iter()
            .map(|&t| arg1(SeccompCmpOp::MaskedEq(0xff00), t << 8))
            .collect(),
        (ThreadKind::Vcpu, libc::SYS_fcntl) => {
            Ok(vec![arg1(SeccompCmpOp::Eq, libc::F_GETFD as u64)?])
        }
        _ => Ok(Vec::new()),
    }
}

fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
    allowed(kind)
        .into_iter()
        .map(|sys| Ok((sys, conditions(kind, sys)?)))
        .collect()
}

fn arch() -> seccompiler::TargetArch {
    #[cfg(target_arch = "x86_64")]
    {
        seccompiler::TargetArch::x86_64
    }
    #[cfg(target_arch = "aarch64")]
    {
        seccompiler::TargetArch::aarch64
    }
}

/// The filter for `kind`: allowed syscalls pass, anything else gets `mismatch`.
pub(super) fn compile(
    kind: ThreadKind,
    mismatch: SeccompAction,
) -> Result<BpfProgram, BackendError> {
    let filter = SeccompFilter::new(rules(kind)?, mismatch, SeccompAction::Allow, arch())?;
    filter.try_into()
}

/// The filter for `kind` answering a forbidden syscall with EPERM (unit tests).
#[cfg(test)]
pub(super) fn compile_errno(kind: ThreadKind) -> Result<BpfProgram, BackendError> {
    compile(kind, SeccompAction::Errno(libc::EPERM as u32))
}
