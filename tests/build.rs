//! Builds the "next version" of molt that the live-update tests switch to and back from:
//! `molt-vmm` with the `test-next` feature (another version string, an extra record field and
//! fault injection), in its own target directory so it never waits for the outer build's
//! lock. Its path reaches the tests as `MOLT_NEXT_BIN`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

include!("../resources/build/nested_cargo.rs");

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = manifest_dir.parent().expect("workspace root");
    for dir in [
        "vmm",
        "arch",
        "devices",
        "cpr",
        "resources/guest/src",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    let target_dir = out_dir.join("next-target");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root)
        .args([
            "build",
            "--offline",
            "-p",
            "molt-vmm",
            "--bin",
            "molt",
            "--features",
            "test-next",
            "--target-dir",
        ])
        .arg(&target_dir);
    for (name, _) in env::vars_os() {
        if name.to_str().is_some_and(is_outer_build_var) {
            cmd.env_remove(&name);
        }
    }
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo:?} to build molt (test-next): {e}"));
    if !output.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        panic!("building molt with --features test-next failed; its output is above");
    }
    let built = target_dir.join("debug").join("molt");
    let dest = out_dir.join("molt-next");
    std::fs::copy(&built, &dest)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", built.display(), dest.display()));
    println!("cargo:rustc-env=MOLT_NEXT_BIN={}", dest.display());
}
