//! Host I/O errors under a disk: the disk image sits on a tiny tmpfs (mounted in a mount
//! namespace the test creates, so nothing on the host changes) that is full, so the guest's
//! writes fail with ENOSPC. The guest gets `VIRTIO_BLK_S_IOERR`, molt and the other devices
//! keep running, and `vm.info` counts the errors.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use molt_tests::api;
use molt_tests::{GuestLine, Molt, Stream, TempDir};

const WAIT: Duration = Duration::from_secs(60);

/// In a new mount namespace of the calling thread: mounts a 1 MiB tmpfs at `dir`, puts a
/// sparse 4 MiB disk image on it and fills the rest, so every first write to a page of the
/// image fails.
fn full_tmpfs_with_disk(dir: &Path) -> Result<PathBuf, String> {
    molt_tests::host::tiny_tmpfs(dir)?;
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(4 << 20))
        .map_err(|e| format!("disk image: {e}"))?;
    let mut filler = std::fs::File::create(dir.join("filler")).map_err(|e| e.to_string())?;
    let block = vec![0xa5u8; 4096];
    while filler.write_all(&block).is_ok() {}
    Ok(img)
}

#[test]
fn a_full_host_file_system_fails_guest_writes_and_nothing_else() {
    let dir = TempDir::new("disk-errors");
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let sock = dir.join("api.sock");
    let (mnt2, sock2) = (mnt.clone(), sock.clone());
    // The namespace belongs to this thread; molt, started from it, lives in it.
    let started = std::thread::spawn(move || -> Result<Molt, String> {
        let img = full_tmpfs_with_disk(&mnt2)?;
        Ok(Molt::spawn(&[
            "--disk",
            &format!("path={}", img.display()),
            "--rng",
            "--api-socket",
            &sock2.display().to_string(),
            "--cmdline",
            "molt.memtest=0 molt.blk=on molt.rng=on",
        ]))
    })
    .join()
    .unwrap();
    let mut molt = match started {
        Ok(m) => m,
        Err(why) => {
            molt_tests::skip("disk errors on a full tmpfs", &why);
            return;
        }
    };
    let failed = molt.wait_line(Stream::Stdout, WAIT, |l| l.contains("FAIL write status=1"));
    assert!(failed.text.contains("blk n="), "{failed:?}");
    api::wait_ready(&sock, WAIT);
    // The guest and the other devices go on.
    let tick = |m: &mut Molt| {
        let l = m.wait_line(Stream::Stdout, WAIT, |l| {
            GuestLine::parse(l).is_some_and(|g| g.kind == "tick")
        });
        GuestLine::parse(&l.text).map(|g| g.num("n")).unwrap_or(0)
    };
    let first = tick(&mut molt);
    let later = (0..3).map(|_| tick(&mut molt)).last().unwrap_or(0);
    assert!(later > first, "the guest stopped ticking");
    let info = api::get(&sock, "vm.info").body;
    let devices = info["devices"].as_array().cloned().unwrap_or_default();
    assert_eq!(devices.len(), 2, "{info}");
    assert_eq!(devices[0]["kind"], "block");
    let errors = devices[0]["io_errors"].as_u64().unwrap_or(0);
    assert!(errors > 0, "no I/O error counted: {info}");
    assert_eq!(devices[1]["kind"], "rng");
    assert!(devices[1].get("io_errors").is_none(), "{info}");
    assert!(
        molt.lines()
            .iter()
            .any(|l| GuestLine::parse(&l.text).is_some_and(|g| g.kind == "rng")),
        "the rng stopped"
    );
    // A live update keeps the count.
    let r = api::put(&sock, "vm.cpr-exec", "{}");
    assert_eq!(r.status, 200, "{r:?}");
    let after = api::get(&sock, "vm.info").body;
    assert!(
        after["devices"][0]["io_errors"].as_u64().unwrap_or(0) >= errors,
        "{after}"
    );
    let r = api::put(&sock, "vm.shutdown", "{}");
    assert_eq!(r.status, 204);
    molt.finish(WAIT).assert_code(0);
}
