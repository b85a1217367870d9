//! What `vm.cpr-exec` may execute: a binary writable by group or others, in a directory
//! others can write without the sticky bit, owned by another user, or (with
//! `--update-binaries DIR`) outside DIR is refused with a 400 that says which, and the guest
//! keeps running after each refusal.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use molt_tests::api::{self, Reply};
use molt_tests::{guest_lines, molt_bin, Molt, Stream, TempDir};

const WAIT: Duration = Duration::from_secs(60);

fn copy_molt(to: &Path, mode: u32) -> PathBuf {
    std::fs::copy(molt_bin(), to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode)).unwrap();
    to.to_path_buf()
}

/// An executable that is never run (each one is refused before anything is paused).
fn stand_in(to: &Path, mode: u32) -> PathBuf {
    std::fs::write(to, "#!/bin/sh\nexit 1\n").unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode)).unwrap();
    to.to_path_buf()
}

fn mkdir(p: &Path, mode: u32) -> PathBuf {
    std::fs::create_dir_all(p).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    p.to_path_buf()
}

fn ticks(molt: &Molt) -> u64 {
    let out = molt.lines().iter().filter(|l| l.stream == Stream::Stdout);
    guest_lines(out.map(|l| l.text.as_str()))
        .iter()
        .filter(|l| l.kind == "tick" && l.get("n").is_some())
        .map(|l| l.num("n"))
        .max()
        .unwrap_or(0)
}

fn wait_more_ticks(molt: &mut Molt) {
    let target = ticks(molt) + 2;
    molt.wait_line(Stream::Stdout, WAIT, |l| {
        molt_tests::GuestLine::parse(l).is_some_and(|g| g.kind == "tick" && g.num("n") >= target)
    });
}

fn assert_refused(r: &Reply, needle: &str) {
    assert_eq!(r.status, 400, "{r:?}");
    let msg = r.body["error"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
}

#[test]
fn untrusted_targets_are_refused_and_the_guest_runs_on() {
    let dir = TempDir::new("update-targets");
    let allowed = mkdir(&dir.join("bin"), 0o755);
    let good = copy_molt(&allowed.join("molt"), 0o755);
    let group_writable = stand_in(&allowed.join("molt-g"), 0o775);
    let open_dir = mkdir(&allowed.join("open"), 0o777);
    let in_open_dir = stand_in(&open_dir.join("molt"), 0o755);
    let sticky_dir = mkdir(&allowed.join("sticky"), 0o1777);
    let in_sticky_dir = copy_molt(&sticky_dir.join("molt"), 0o755);
    let outside = stand_in(&mkdir(&dir.join("elsewhere"), 0o755).join("molt"), 0o755);
    let link = allowed.join("link-out");
    std::os::unix::fs::symlink(&outside, &link).unwrap();

    let socket = dir.join("api.sock");
    let args = [
        "--api-socket".to_string(),
        socket.display().to_string(),
        "--cmdline".into(),
        "console=ttyS0".into(),
        "--memory".into(),
        "64M".into(),
        "--update-binaries".into(),
        allowed.display().to_string(),
    ];
    let mut molt = Molt::spawn(&args);
    api::wait_ready(&socket, WAIT);
    wait_more_ticks(&mut molt);
    let update = |bin: &Path| {
        api::put(
            &socket,
            "vm.cpr-exec",
            &format!(r#"{{"binary": "{}"}}"#, bin.display()),
        )
    };
    let mut cases: Vec<(Reply, String)> = vec![
        (
            update(&group_writable),
            "writable by group or others".into(),
        ),
        (
            update(&in_open_dir),
            format!("directory {} is writable by others", open_dir.display()),
        ),
        (update(&outside), "not under --update-binaries".into()),
        (update(&link), "not under --update-binaries".into()),
        // `{}` re-resolves the running binary's recorded path, which is outside DIR.
        (
            api::put(&socket, "vm.cpr-exec", "{}"),
            "not under --update-binaries".into(),
        ),
    ];
    // SAFETY: geteuid() has no arguments.
    if unsafe { libc::geteuid() } == 0 {
        let foreign = stand_in(&allowed.join("molt-nobody"), 0o755);
        std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
        cases.push((update(&foreign), "owned by uid 65534".into()));
    } else {
        molt_tests::skip(
            "refusing a binary owned by another user",
            "needs root to chown",
        );
    }
    for (r, needle) in &cases {
        assert_refused(r, needle);
        let info = api::get(&socket, "vm.info");
        assert_eq!(info.body["state"], "running", "{info:?}");
        assert_eq!(info.body["updates"]["count"], 0, "{info:?}");
    }
    wait_more_ticks(&mut molt);
    // Trusted binaries under DIR are executed: in DIR, and in a sticky world-writable
    // directory under it.
    for bin in [&good, &in_sticky_dir] {
        let r = update(bin);
        assert_eq!(r.status, 200, "{}: {r:?}", bin.display());
        assert_eq!(r.body["pid"], molt.pid());
    }
    wait_more_ticks(&mut molt);
    // The policy travels with the VM: the new image still refuses what is outside DIR.
    assert_refused(&update(&outside), "not under --update-binaries");
    assert_eq!(api::put(&socket, "vm.shutdown", "").status, 204);
    let out = molt.finish(WAIT);
    out.assert_code(0);
    out.assert_no_panic();
}

#[test]
fn a_missing_update_binaries_directory_is_an_error_at_start() {
    let out = molt_tests::run(&["--update-binaries", "/nonexistent/molt-binaries"]);
    out.assert_error(&["--update-binaries", "/nonexistent/molt-binaries"]);
}
