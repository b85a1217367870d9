//! Property tests (fuzzing without coverage guidance) of the option parsers: any text is
//! parsed or refused with an error, never a panic, and every valid option written in the
//! documented syntax parses back to what was written. `PROPTEST_CASES` sets the number of
//! cases (docs/fuzz/README.md).

use std::path::PathBuf;

use clap::Parser;
use proptest::prelude::*;

use crate::cli::Cli;
use crate::config::*;
use crate::snapshot::RestoreConfig;

/// Fragments of option values glued together: random text alone rarely forms a key.
fn soup() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("size=".to_string()),
        Just("hugepages=".to_string()),
        Just("prefault=".to_string()),
        Just("path=".to_string()),
        Just("readonly=".to_string()),
        Just("id=".to_string()),
        Just("tap=".to_string()),
        Just("fd=".to_string()),
        Just("mac=".to_string()),
        Just("lazy=".to_string()),
        Just("file=".to_string()),
        Just("socket=".to_string()),
        Just("stdio".to_string()),
        Just("null".to_string()),
        Just("on".to_string()),
        Just("off".to_string()),
        Just(",".to_string()),
        Just("=".to_string()),
        Just(":".to_string()),
        Just("+".to_string()),
        Just("-".to_string()),
        "[0-9]{1,22}",
        "[KMGTkmgtiBX]{1,3}",
        "[0-9a-fA-F]{1,3}",
        ".{1,4}",
    ];
    proptest::collection::vec(piece, 0..12).prop_map(|p| p.concat())
}

/// Runs every option parser on `s`; none may panic.
fn parse_all(s: &str) {
    let _ = parse_size(s);
    if let Some(mac) = parse_mac(s) {
        assert!(
            format_mac(mac).eq_ignore_ascii_case(s),
            "{s:?} read as {mac:02x?}"
        );
    }
    if let Ok(m) = s.parse::<MemoryConfig>() {
        assert!(m.size >= MIN_MEMORY && m.size % 4096 == 0, "{s:?}: {m:?}");
        assert!(!m.hugepages || m.size % HUGE_PAGE_SIZE == 0, "{s:?}: {m:?}");
    }
    let _ = s.parse::<SerialConfig>();
    if let Ok(d) = s.parse::<DiskConfig>() {
        assert!(!d.path.as_os_str().is_empty(), "{s:?}");
        assert!(d.id.as_ref().is_none_or(|id| (1..=20).contains(&id.len())));
    }
    if let Ok(n) = s.parse::<NetConfig>() {
        assert!(n.mac.is_none_or(|m| m[0] & 1 == 0), "{s:?}: multicast");
        match n.backend {
            NetBackend::Tap(name) => assert!((1..16).contains(&name.len()), "{s:?}"),
            NetBackend::Fd(fd) => assert!(fd > 2, "{s:?}"),
        }
    }
    let _ = s.parse::<RestoreConfig>();
    for option in [
        "--memory",
        "--disk",
        "--net",
        "--serial",
        "--restore",
        "--cpus",
    ] {
        let _ = Cli::try_parse_from(["molt", option, s]);
    }
}

fn format_mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// `bytes` written with a unit when it divides evenly (`K`, `M`, `G`, with or without `iB`).
fn size_text(bytes: u64, unit: usize, suffix: &str) -> String {
    let (letter, shift) = [("", 0), ("K", 10), ("M", 20), ("G", 30)][unit];
    if shift > 0 && bytes % (1 << shift) == 0 {
        format!("{}{letter}{suffix}", bytes >> shift)
    } else {
        bytes.to_string()
    }
}

fn memory() -> impl Strategy<Value = MemoryConfig> {
    (16u64..=(1 << 20), any::<bool>(), any::<bool>()).prop_map(|(pages, huge, prefault)| {
        let size = if huge {
            (pages / 512).max(8) * HUGE_PAGE_SIZE
        } else {
            pages.max(MIN_MEMORY / 4096) * 4096
        };
        MemoryConfig {
            size,
            hugepages: huge,
            prefault,
        }
    })
}

/// A path as a user types it: no comma (the list separator), not empty.
const PATH: &str = "/?[A-Za-z0-9_./=+ -]{1,30}";

/// A disk on a file, or (`readonly` then false) a vhost-user disk with its queue count.
fn disk() -> impl Strategy<Value = DiskConfig> {
    let vhost_user = proptest::option::of(proptest::option::of(1..=MAX_DISK_QUEUES));
    (
        PATH,
        any::<bool>(),
        proptest::option::of("[A-Za-z0-9_.=-]{1,20}"),
        vhost_user,
    )
        .prop_map(|(path, readonly, id, vhost)| DiskConfig {
            path: PathBuf::from(path),
            readonly: readonly && vhost.is_none(),
            id,
            vhost_user: vhost.is_some(),
            num_queues: vhost.flatten(),
        })
}

fn net() -> impl Strategy<Value = NetConfig> {
    let backend = prop_oneof![
        "[A-Za-z0-9_.=-]{1,15}".prop_map(NetBackend::Tap),
        (3..=i32::MAX).prop_map(NetBackend::Fd),
    ];
    let mac = proptest::option::of(any::<[u8; 6]>().prop_map(|mut m| {
        m[0] &= !1;
        m
    }));
    (backend, mac).prop_map(|(backend, mac)| NetConfig { backend, mac })
}

fn serial() -> impl Strategy<Value = SerialConfig> {
    prop_oneof![
        Just(SerialConfig::Stdio),
        Just(SerialConfig::Null),
        "[^\0]{1,30}".prop_map(|p| SerialConfig::File(p.into())),
        "[^\0]{1,30}".prop_map(|p| SerialConfig::Socket(p.into())),
    ]
}

proptest! {
    #[test]
    fn arbitrary_text_parses_or_is_refused(s in ".{0,40}") {
        parse_all(&s);
    }

    #[test]
    fn option_soup_parses_or_is_refused(s in soup()) {
        parse_all(&s);
    }

    #[test]
    fn sizes_read_back(n in 0u64..(1 << 44), unit in 0..4usize, suffix in "|B|iB") {
        prop_assert_eq!(parse_size(&size_text(n, unit, &suffix)), Ok(n));
        let shifted = n.checked_mul(1 << 30);
        prop_assert_eq!(parse_size(&format!("{n}G")).ok(), shifted);
    }

    #[test]
    fn memory_options_round_trip(m in memory(), unit in 0..4usize, order in any::<bool>()) {
        let on = |b: bool| if b { "on" } else { "off" };
        let size = format!("size={}", size_text(m.size, unit, ""));
        let flags = format!("hugepages={},prefault={}", on(m.hugepages), on(m.prefault));
        let text = if order { format!("{size},{flags}") } else { format!("{flags},{size}") };
        prop_assert_eq!(text.parse::<MemoryConfig>(), Ok(m));
        let cli = Cli::try_parse_from(["molt", "--memory", &text]).unwrap();
        prop_assert_eq!(cli.vm.memory, m);
    }

    #[test]
    fn disk_options_round_trip(d in disk()) {
        let mut text = if d.vhost_user {
            format!("vhost_user=on,socket={}", d.path.display())
        } else {
            format!("path={}", d.path.display())
        };
        if let Some(n) = d.num_queues {
            text.push_str(&format!(",num_queues={n}"));
        }
        if d.readonly {
            text.push_str(",readonly=on");
        }
        if let Some(id) = &d.id {
            text.push_str(&format!(",id={id}"));
        }
        prop_assert_eq!(text.parse::<DiskConfig>(), Ok(d.clone()));
        let cli = Cli::try_parse_from(["molt", "--disk", &text, "--disk", &text]).unwrap();
        prop_assert_eq!(cli.vm.disks, vec![d.clone(), d]);
    }

    #[test]
    fn net_options_round_trip(n in net(), upper in any::<bool>()) {
        let mut text = match &n.backend {
            NetBackend::Tap(name) => format!("tap={name}"),
            NetBackend::Fd(fd) => format!("fd={fd}"),
        };
        if let Some(mac) = n.mac {
            let mac = format_mac(mac);
            let mac = if upper { mac.to_ascii_uppercase() } else { mac };
            text.push_str(&format!(",mac={mac}"));
        }
        prop_assert_eq!(text.parse::<NetConfig>(), Ok(n.clone()));
        let cli = Cli::try_parse_from(["molt", "--net", &text]).unwrap();
        prop_assert_eq!(cli.vm.nets, vec![n]);
    }

    #[test]
    fn serial_and_restore_options_round_trip(
        s in serial(),
        path in PATH,
        lazy in any::<bool>(),
        huge in proptest::option::of(any::<bool>()),
    ) {
        let text = match &s {
            SerialConfig::Stdio => "stdio".to_string(),
            SerialConfig::Null => "null".to_string(),
            SerialConfig::File(p) => format!("file={}", p.display()),
            SerialConfig::Socket(p) => format!("socket={}", p.display()),
        };
        prop_assert_eq!(text.parse::<SerialConfig>(), Ok(s));
        let on = |b: bool| if b { "on" } else { "off" };
        let mut text = format!("path={path},lazy={}", on(lazy));
        if let Some(h) = huge {
            text.push_str(&format!(",hugepages={}", on(h)));
        }
        let want = RestoreConfig { path: path.into(), lazy, hugepages: huge };
        prop_assert_eq!(text.parse::<RestoreConfig>(), Ok(want));
    }
}
