//! Command lines that name unusable files: molt refuses them with one clear line on stderr and
//! a non-zero exit code, never a panic. (Option syntax errors are in vmm/tests/cli.rs.)

use molt_tests::{run, TempDir};

#[test]
fn missing_kernel_file() {
    let out = run(&["--kernel", "/nonexistent/molt-test/bzImage"]);
    let line = out.assert_error(&["molt: error:", "/nonexistent/molt-test/bzImage"]);
    assert_eq!(out.stderr().len(), 1, "one line: {line}");
    assert_eq!(out.code(), Some(1));
}

#[test]
fn kernel_file_that_is_not_a_kernel() {
    let dir = TempDir::new("garbage-kernel");
    // Pseudo-random bytes (no ELF magic, no bzImage header), and an empty file.
    let mut x: u32 = 0x1234_5678;
    let garbage: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    for (name, bytes) in [("garbage", garbage), ("empty", Vec::new())] {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let p = path.display().to_string();
        let out = run(&["--kernel", &p]);
        out.assert_error(&["molt: error:", &p]);
        assert_eq!(out.stderr().len(), 1, "{}", out.describe());
        assert_eq!(out.code(), Some(1));
    }
}

#[test]
fn missing_initrd_file() {
    let out = run(&["--initrd", "/nonexistent/molt-test/initrd.img"]);
    out.assert_error(&[
        "molt: error:",
        "initrd",
        "/nonexistent/molt-test/initrd.img",
    ]);
    assert_eq!(out.stderr().len(), 1, "{}", out.describe());
}

#[test]
fn serial_paths_that_cannot_be_created() {
    for backend in ["file", "socket"] {
        let spec = format!("{backend}=/nonexistent/molt-test/console");
        let out = run(&["--serial", &spec]);
        out.assert_error(&["molt: error:", "/nonexistent/molt-test/console"]);
        assert_eq!(out.stderr().len(), 1, "{}", out.describe());
    }
}

#[test]
fn unusable_device_backends() {
    let out = run(&["--disk", "path=/nonexistent/molt-test/disk.img"]);
    out.assert_error(&["molt: error:", "/nonexistent/molt-test/disk.img"]);
    assert_eq!(out.code(), Some(1));
    // An fd number that is not open in molt.
    let out = run(&["--net", "fd=987"]);
    out.assert_error(&["molt: error:", "fd=987"]);
    assert_eq!(out.code(), Some(1));
    let out = run(&["--api-socket", "/nonexistent/molt-test/api.sock"]);
    out.assert_error(&["molt: error:", "/nonexistent/molt-test/api.sock"]);
    assert_eq!(out.code(), Some(1));
}
