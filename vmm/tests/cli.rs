//! The `molt` command line: `--help`, `--version`, and option values that are refused before
//! any VM exists (one clear error line, exit code 2 from the option parser, no panic).

use std::path::Path;
use std::time::Duration;

use molt_tests::{Molt, Output};

fn molt(args: &[&str]) -> Output {
    Molt::spawn_bin(Path::new(env!("CARGO_BIN_EXE_molt")), args).finish(Duration::from_secs(30))
}

#[test]
fn help_documents_every_option() {
    for flag in ["--help", "-h"] {
        let out = molt(&[flag]);
        out.assert_code(0);
        let text = out.stdout().join("\n");
        for option in [
            "--kernel",
            "--cmdline",
            "--initrd",
            "--cpus",
            "--memory",
            "--serial",
            "--log-level",
            "--version",
            "--help",
        ] {
            assert!(text.contains(option), "{flag} lacks {option}:\n{text}");
        }
    }
    // The long help spells out the value syntax.
    let text = molt(&["--help"]).stdout().join("\n");
    for syntax in [
        "size=SIZE",
        "hugepages=on",
        "file=PATH",
        "socket=PATH",
        "null",
        "0x501",
    ] {
        assert!(text.contains(syntax), "--help lacks {syntax}:\n{text}");
    }
}

#[test]
fn version_prints_the_version() {
    let out = molt(&["--version"]);
    out.assert_code(0);
    assert_eq!(
        out.stdout(),
        [format!("molt {}", env!("CARGO_PKG_VERSION"))],
        "{}",
        out.describe()
    );
}

#[test]
fn bad_options_are_refused_with_one_clear_error() {
    // (arguments, words the error line must contain)
    let cases: &[(&[&str], &[&str])] = &[
        (&["--bogus"], &["--bogus"]),
        (&["--memory", "size=1M"], &["--memory", "16 MiB"]),
        (&["--memory", "size=bogus"], &["--memory", "bogus"]),
        (&["--memory", "size=1G,hugepages=maybe"], &["hugepages"]),
        (&["--memory", "size=1G,colour=red"], &["colour"]),
        (&["--memory", "size=17M,hugepages=on"], &["2 MiB"]),
        (&["--cpus", "0"], &["--cpus", "0"]),
        (&["--cpus", "many"], &["--cpus", "many"]),
        (&["--serial", "tcp=1"], &["--serial", "tcp=1"]),
        (&["--serial", "file="], &["--serial"]),
        (&["--log-level", "loud"], &["--log-level", "loud"]),
        (&["--kernel"], &["--kernel"]),
        (&["stray-argument"], &["stray-argument"]),
    ];
    for (args, words) in cases {
        let out = molt(args);
        out.assert_error(words);
        assert_eq!(out.code(), Some(2), "{}", out.describe());
        assert!(out.stdout().is_empty(), "{}", out.describe());
    }
}

/// Runs molt with `/dev/null` inherited at fd 5 (and nothing else beyond stdio).
fn molt_with_fd5(args: &[&str]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let null = std::fs::File::open("/dev/null").unwrap();
    let raw = std::os::fd::AsRawFd::as_raw_fd(&null);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_molt"));
    cmd.args(args).stdin(std::process::Stdio::null());
    // SAFETY: dup2 in the child between fork and exec only touches the child's fd table.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 5) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

#[test]
fn net_fds_must_be_inherited_taps_named_once() {
    let cases: [(&[&str], &str); 4] = [
        // Nothing inherited at 3 or 4: molt must not adopt fds of its own.
        (
            &["--net", "fd=3"],
            "--net fd=3: no such open file descriptor",
        ),
        (
            &["--net", "fd=4"],
            "--net fd=4: no such open file descriptor",
        ),
        (&["--net", "fd=5"], "--net fd=5: not a tap interface"),
        (
            &["--net", "fd=5", "--net", "fd=5"],
            "--net fd=5 is named more than once",
        ),
    ];
    for (args, expected) in cases {
        let out = molt_with_fd5(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("molt: error: ") && stderr.contains(expected),
            "{args:?}: expected {expected:?} in {stderr:?}"
        );
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr:?}");
        assert!(out.stdout.is_empty(), "{args:?}: no guest ran");
    }
}
