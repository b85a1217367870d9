use std::io::Write;
use std::os::fd::AsRawFd;

use super::*;
use crate::record;

#[test]
fn round_trip_through_memfd() {
    let state: Vec<u64> = (0..1000).collect();
    let bytes = record::encode("molt test", "numbers", &state).expect("encode");
    let fd = write_sealed(&bytes).expect("write");
    assert_eq!(read_record(&fd).expect("read"), bytes);
    // Reading twice works: pread leaves the offset alone.
    let again = read_record(&fd).expect("read again");
    let decoded: record::Record<Vec<u64>> = record::decode(&again).expect("decode");
    assert_eq!(decoded.state, state);
}

#[test]
fn memfd_is_cloexec_and_named() {
    let fd = write_sealed(b"x").expect("write");
    // SAFETY: F_GETFD touches no memory; `fd` is open.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    assert!(flags >= 0 && flags & libc::FD_CLOEXEC != 0);
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("link");
    assert_eq!(link.to_string_lossy(), "/memfd:molt-cpr-record (deleted)");
}

#[test]
fn memfd_is_sealed() {
    let fd = write_sealed(b"sealed record").expect("write");
    assert_eq!(seals(&fd).expect("seals"), RECORD_SEALS);
    assert!(is_sealed(&fd).expect("seals"));
    let mut file = File::from(fd);
    let err = file
        .write_all(b"overwrite")
        .expect_err("write to sealed memfd");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    assert!(file.write_all_at(b"X", 0).is_err());
    assert!(file.set_len(1).is_err(), "shrink allowed");
    assert!(file.set_len(1 << 20).is_err(), "grow allowed");
    // SAFETY: F_ADD_SEALS takes an integer and touches no memory.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, 0) };
    assert!(ret < 0, "seals still changeable");
    assert_eq!(read_record(&file).expect("read"), b"sealed record");
}

#[test]
fn empty_record_reads_back_empty() {
    let fd = write_sealed(&[]).expect("write");
    assert!(read_record(&fd).expect("read").is_empty());
}

#[test]
fn oversize_fd_is_refused() {
    let file = File::from(create().expect("memfd"));
    let size = MAX_RECORD_LEN as u64 + 1;
    file.set_len(size).expect("grow");
    let err = read_record(&file).expect_err("read oversize");
    assert!(
        matches!(err, MemfdError::TooLarge { size: s } if s == size),
        "{err}"
    );
}

#[test]
fn oversize_write_is_refused() {
    let big = vec![0u8; MAX_RECORD_LEN + 1];
    let err = write_sealed(&big).expect_err("write oversize");
    assert!(matches!(err, MemfdError::TooLarge { .. }));
}

#[test]
fn non_regular_fds_are_refused() {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 just returned these fds; nothing else owns them.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    assert!(matches!(
        read_record(&r),
        Err(MemfdError::NotRegular { .. })
    ));
    drop((r, w));
    let dir = File::open("/proc/self").expect("open dir");
    assert!(matches!(
        read_record(&dir),
        Err(MemfdError::NotRegular { .. })
    ));
    let null = File::open("/dev/null").expect("open /dev/null");
    assert!(matches!(
        read_record(&null),
        Err(MemfdError::NotRegular { .. })
    ));
    assert!(matches!(seals(&null), Err(MemfdError::GetSeals { .. })));
}

#[test]
fn unsealed_regular_file_is_still_read() {
    let mut file = File::from(create().expect("memfd"));
    file.write_all(b"loose").expect("write");
    assert!(!is_sealed(&file).expect("seals"));
    assert_eq!(read_record(&file).expect("read"), b"loose");
}
