//! The embedded guest's execution mode on PVM hosts (README, "PVM hosts"): molt adds
//! `molt.native=on` to the guest's command line where the host can run it natively, and the
//! guest reports `mode=native|emulated` on its boot line and `loops_per_s` (the rate of a
//! two-instruction loop: ~1e9 natively, ~7e5 in KVM's instruction emulator) on its boot,
//! tick and per-CPU lines.

use crate::{is_pvm_host, skip, GuestLine};

/// The command-line word that keeps the guest in KVM's emulator.
pub const OFF: &str = "molt.native=off";

/// A `loops_per_s` only native execution reaches (the emulator stays below 1e6).
pub const NATIVE_LOOPS_PER_S: u64 = 50_000_000;

/// How a test runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// molt's choice: native where the host can.
    Default,
    /// `molt.native=off`.
    Off,
}

impl Mode {
    /// Both modes, for tests that must cover both.
    pub const BOTH: [Mode; 2] = [Mode::Default, Mode::Off];

    /// `cmdline` with this mode's word added.
    pub fn cmdline(self, cmdline: &str) -> String {
        match self {
            Mode::Default => cmdline.to_string(),
            Mode::Off => format!("{cmdline} {OFF}"),
        }
    }
}

/// Whether a guest line's `loops_per_s` is a native one.
///
/// # Panics
/// When the line has no `loops_per_s`.
#[track_caller]
pub fn runs_natively(line: &GuestLine) -> bool {
    line.num("loops_per_s") >= NATIVE_LOOPS_PER_S
}

/// Checks the boot line against `mode` and returns whether the guest runs natively.
///
/// With [`Mode::Off`] the guest must say `mode=emulated` (and, on a PVM host, loop at an
/// emulated rate). By default it must run natively; a host without PVM's native control is
/// reported with [`skip`] (the guest then says `mode=emulated` without a `native=` reason: molt
/// did not offer it).
///
/// # Panics
/// When the boot line contradicts `mode`.
#[track_caller]
pub fn check_mode(boot: &GuestLine, mode: Mode) -> bool {
    let got = boot.get("mode");
    if mode == Mode::Off {
        assert_eq!(got, Some("emulated"), "{}", boot.raw);
        assert!(
            !is_pvm_host() || !runs_natively(boot),
            "molt.native=off, yet a native loop rate: {}",
            boot.raw
        );
        return false;
    }
    if got == Some("native") {
        assert!(runs_natively(boot), "mode=native, yet: {}", boot.raw);
        return true;
    }
    assert_eq!(got, Some("emulated"), "{}", boot.raw);
    assert!(
        boot.get("native").is_none(),
        "molt offered native mode and the guest could not use it: {}",
        boot.raw
    );
    skip(
        "native guest execution",
        "this host's KVM has no PVM native-execution control",
    );
    false
}
