//! Builds the test guest kernel (`resources/guest`) and leaves it at
//! `$OUT_DIR/molt-guest.elf` for `vmm::guest_image` to embed.
//!
//! The guest is a freestanding x86-64 ELF built with the installed host
//! target: the flags below turn off the SSE family (KVM's instruction emulator,
//! which runs guest code on PVM hosts, cannot execute vector instructions),
//! link it statically at 1 MiB with the guest's linker script, and drop the C
//! runtime. The nested cargo gets its own target directory under OUT_DIR so it
//! never waits for the outer build's lock, and none of the outer build's
//! flags or target settings leak into it.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest's codegen and link flags (everything else is in its Cargo.toml).
fn guest_rustflags(guest_dir: &Path) -> Vec<String> {
    let linker_script = guest_dir.join("linker.ld");
    let mut flags: Vec<String> = [
        "-C",
        "relocation-model=static",
        "-C",
        // rustc warns that this changes the float ABI; the guest uses no
        // floating point at all.
        "target-feature=-sse,-sse2,-sse3,-ssse3,-sse4.1,-sse4.2,-avx,-avx2,-mmx,+soft-float",
        "-C",
        "link-arg=-nostartfiles",
        "-C",
        "link-arg=-nostdlib",
        "-C",
        "link-arg=-static",
        "-C",
        "link-arg=-no-pie",
        "-C",
        "link-arg=-Wl,--build-id=none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    flags.push("-C".into());
    flags.push(format!("link-arg=-Wl,-T,{}", linker_script.display()));
    flags
}

// `is_outer_build_var`, shared with the tests crate's build script.
include!("../resources/build/nested_cargo.rs");

fn main() {
    // The `molt` executable is linked position-dependent: a cpr-exec starts it inside the
    // guest's pause, and a PIE start-up applies some 5000 relative relocations
    // first (each page it writes a page fault, several µs under PVM). Only the link of
    // the binaries changes: the crates stay position-independent code, and proc-macro and
    // build-script crates are not affected.
    println!("cargo:rustc-link-arg-bin=molt=-no-pie");
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let guest_dir = manifest_dir
        .parent()
        .expect("vmm crate has a parent directory")
        .join("resources/guest");
    let target_dir = out_dir.join("guest-target");
    const TARGET: &str = "x86_64-unknown-linux-gnu";

    for path in ["src", "Cargo.toml", "Cargo.lock", "linker.ld"] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(path).display());
    }

    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&guest_dir)
        .args([
            "build",
            "--release",
            "--offline",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir);
    for (name, _) in env::vars_os() {
        if name.to_str().is_some_and(is_outer_build_var) {
            cmd.env_remove(&name);
        }
    }
    // The flags go in the encoded form (separated by 0x1f), which takes
    // precedence over every other source of rustflags, so a path with spaces
    // is fine and no cargo config in a parent directory can add to them.
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        guest_rustflags(&guest_dir).join("\x1f"),
    );

    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo:?} to build the guest: {e}"));
    if !output.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        panic!(
            "building the guest kernel in {} failed ({}); its output is above",
            guest_dir.display(),
            output.status
        );
    }

    let built = target_dir.join(TARGET).join("release").join("molt-guest");
    let dest = out_dir.join("molt-guest.elf");
    std::fs::copy(&built, &dest)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", built.display(), dest.display()));
}
