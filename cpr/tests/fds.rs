//! Fd registry tests. They look at process-wide fd numbers and flags, so
//! every test takes `LOCK`: no test opens or closes fds while another runs.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard};

use cpr::{is_cloexec, open_fds, FdError, FdRegistry, Inherited, PreservedFd};

static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn pair() -> (UnixStream, UnixStream) {
    UnixStream::pair().expect("socketpair")
}

fn cloexec_map() -> BTreeMap<RawFd, bool> {
    open_fds()
        .expect("list fds")
        .into_iter()
        .filter_map(|fd| is_cloexec(fd).ok().map(|c| (fd, c)))
        .collect()
}

fn clear_cloexec(fd: RawFd) {
    // SAFETY: F_SETFD takes an integer and touches no memory; `fd` is a
    // test-owned socket.
    assert!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } >= 0);
}

#[test]
fn preserve_touches_exactly_the_registered_fds() {
    let _guard = lock();
    let (a, b) = pair();
    let (c, d) = pair();
    let mut registry = FdRegistry::new();
    registry.register("ram0", &a).expect("register");
    registry.register("serial", &c).expect("register");
    let before = cloexec_map();
    assert_eq!(before.get(&a.as_raw_fd()), Some(&true));

    registry.preserve_all().expect("preserve");
    let during = cloexec_map();
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        during.keys().collect::<Vec<_>>()
    );
    for (fd, was) in &before {
        let registered = *fd == a.as_raw_fd() || *fd == c.as_raw_fd();
        let expected = if registered { false } else { *was };
        assert_eq!(during[fd], expected, "fd {fd}");
    }
    assert_eq!(is_cloexec(b.as_raw_fd()).ok(), Some(true));
    assert_eq!(is_cloexec(d.as_raw_fd()).ok(), Some(true));

    registry.restore_cloexec().expect("restore");
    assert_eq!(cloexec_map(), before);
}

#[test]
fn failed_preserve_undoes_its_changes() {
    let _guard = lock();
    let (a, _a2) = pair();
    let (already, _b2) = pair();
    clear_cloexec(already.as_raw_fd());
    let (gone, _c2) = pair();
    let gone_fd = gone.as_raw_fd();
    let mut registry = FdRegistry::new();
    // Names sort so that the closed fd is reached last.
    registry.register("a-ram", &a).expect("register");
    registry
        .register("b-inherited", &already)
        .expect("register");
    registry.register("z-closed", &gone).expect("register");
    drop(gone);

    let err = registry
        .preserve_all()
        .expect_err("preserve of a closed fd");
    assert!(
        matches!(&err, FdError::Preserve { name, fd, .. } if name == "z-closed" && *fd == gone_fd),
        "{err}"
    );
    assert!(err
        .to_string()
        .contains(&format!("fd {gone_fd} (z-closed)")));
    assert_eq!(is_cloexec(a.as_raw_fd()).ok(), Some(true), "not undone");
    assert_eq!(
        is_cloexec(already.as_raw_fd()).ok(),
        Some(false),
        "over-undone"
    );

    let err = registry
        .restore_cloexec()
        .expect_err("restore of a closed fd");
    assert!(matches!(&err, FdError::Restore { fd, .. } if *fd == gone_fd));
    // The others were still restored.
    assert_eq!(is_cloexec(already.as_raw_fd()).ok(), Some(true));
}

#[test]
fn duplicates_are_refused() {
    let _guard = lock();
    let (a, b) = pair();
    let mut registry = FdRegistry::new();
    registry.register("ram0", &a).expect("register");
    assert!(matches!(
        registry.register("ram0", &b),
        Err(FdError::DuplicateName { .. })
    ));
    assert!(matches!(
        registry.register("ram1", &a),
        Err(FdError::DuplicateFd { existing, .. }) if existing == "ram0"
    ));
    assert_eq!(registry.len(), 1);
    let list = [
        PreservedFd {
            name: "x".into(),
            fd: b.as_raw_fd(),
        },
        PreservedFd {
            name: "y".into(),
            fd: b.as_raw_fd(),
        },
    ];
    // SAFETY: construction fails before anything could be taken.
    let result = unsafe { Inherited::from_numbers(&list) };
    assert!(matches!(result, Err(FdError::DuplicateFd { .. })));
    let negative = [PreservedFd {
        name: "x".into(),
        fd: -1,
    }];
    // SAFETY: construction fails before anything could be taken.
    let result = unsafe { Inherited::from_numbers(&negative) };
    assert!(matches!(result, Err(FdError::InvalidNumber { fd: -1, .. })));
}

#[test]
fn take_hands_out_cloexec_duplicates_and_keeps_the_originals() {
    let _guard = lock();
    let (a, b) = pair();
    let raw = a.into_raw_fd();
    clear_cloexec(raw); // as after execve with the fd preserved
    let list = [PreservedFd {
        name: "api-listener".into(),
        fd: raw,
    }];
    // SAFETY: `raw` was released by into_raw_fd above and nothing owns it.
    let mut inherited = unsafe { Inherited::from_numbers(&list) }.expect("inherited");
    let owned = inherited.take("api-listener").expect("take");
    assert_ne!(owned.as_raw_fd(), raw);
    assert_eq!(is_cloexec(owned.as_raw_fd()).ok(), Some(true));
    assert_eq!(is_cloexec(raw).ok(), Some(false), "original untouched");
    assert!(inherited.unclaimed().is_empty());
    assert!(matches!(
        inherited.take("api-listener"),
        Err(FdError::TakenTwice { .. })
    ));
    assert!(matches!(
        inherited.take("serial"),
        Err(FdError::UnknownName { .. })
    ));
    assert!(inherited
        .take_optional("serial")
        .expect("optional")
        .is_none());
    // The duplicate works; releasing closes the original only.
    inherited.release_originals();
    assert!(is_cloexec(raw).is_err(), "original not closed");
    let mut stream = UnixStream::from(owned);
    std::io::Write::write_all(&mut stream, b"hi").expect("write");
    let mut buf = [0; 2];
    std::io::Read::read_exact(&mut &b, &mut buf).expect("read");
    assert_eq!(&buf, b"hi");
}

#[test]
fn an_inherited_fd_that_is_not_open_is_refused() {
    let _guard = lock();
    let (a, _b) = pair();
    let raw = a.as_raw_fd();
    drop(a);
    let list = [PreservedFd {
        name: "serial".into(),
        fd: raw,
    }];
    // SAFETY: `raw` is closed and stays closed while the lock is held.
    let err = unsafe { Inherited::from_numbers(&list) }.expect_err("accepted a closed fd");
    assert!(
        matches!(&err, FdError::NotOpen { name, fd, .. } if name == "serial" && *fd == raw),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!("preserved fd {raw} (serial) is not open")
    );
}

#[test]
fn fds_received_by_name_are_taken_the_same_way() {
    let _guard = lock();
    let (a, b) = pair();
    let mut inherited = Inherited::from_owned(vec![("ram0".into(), a.into())]).expect("from owned");
    assert!(inherited.contains("ram0"));
    assert_eq!(inherited.unclaimed(), ["ram0"]);
    let dup = inherited.take("ram0").expect("take");
    let mut stream = UnixStream::from(dup);
    std::io::Write::write_all(&mut stream, b"ok").expect("write");
    let mut buf = [0; 2];
    std::io::Read::read_exact(&mut &b, &mut buf).expect("read");
    assert_eq!(&buf, b"ok");
    assert!(matches!(
        Inherited::from_owned(vec![
            ("x".into(), pair().0.into()),
            ("x".into(), pair().0.into())
        ]),
        Err(FdError::DuplicateName { .. })
    ));
}

#[test]
fn open_fds_lists_exactly_the_open_fds() {
    let _guard = lock();
    let before = open_fds().expect("list");
    for fd in &before {
        assert!(is_cloexec(*fd).is_ok(), "listed fd {fd} is not open");
    }
    let (a, b) = pair();
    let (ra, rb) = (a.as_raw_fd(), b.as_raw_fd());
    let during = open_fds().expect("list");
    assert!(during.contains(&ra) && during.contains(&rb));
    assert_eq!(during.len(), before.len() + 2);
    assert!(during.windows(2).all(|w| w[0] < w[1]), "not sorted");
    drop((a, b));
    assert_eq!(open_fds().expect("list"), before, "fds leaked");
}

#[test]
fn description_travels_in_a_record() {
    let _guard = lock();
    let (a, b) = pair();
    let mut registry = FdRegistry::new();
    registry.register("serial", &a).expect("register");
    registry.register("ram0", &b).expect("register");
    let bytes = cpr::encode("molt test", "fds", &registry.describe()).expect("encode");
    let record: cpr::Record<Vec<PreservedFd>> = cpr::decode_kind(&bytes, "fds").expect("decode");
    assert_eq!(record.state, registry.describe());
    assert_eq!(record.state[0].name, "ram0"); // sorted by name
}
