//! Command-line options: each value parser, and the whole command line through clap.

use clap::Parser;
use vmm::cli::Cli;
use vmm::config::{
    parse_mac, parse_size, DiskConfig, MemoryConfig, NetBackend, NetConfig, SerialConfig,
    HUGE_PAGE_SIZE, MIN_MEMORY,
};
use vmm::snapshot::RestoreConfig;

/// `data` as text is given to every option parser; NUL-separated, it is a command line.
/// Whatever parses keeps the parsers' promises and reads back the same when written out
/// in the documented syntax.
pub fn options(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for s in text.split('\0') {
        value(s);
    }
    let args = std::iter::once("molt").chain(text.split('\0'));
    if let Ok(cli) = Cli::try_parse_from(args) {
        for d in &cli.vm.disks {
            assert_eq!(disk_text(d).parse::<DiskConfig>().as_ref(), Ok(d));
        }
    }
}

fn on(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn disk_text(d: &DiskConfig) -> String {
    let mut t = format!("path={},readonly={}", d.path.display(), on(d.readonly));
    if let Some(id) = &d.id {
        t.push_str(&format!(",id={id}"));
    }
    t
}

fn value(s: &str) {
    let _ = parse_size(s);
    if let Some(mac) = parse_mac(s) {
        let text = mac.map(|b| format!("{b:02x}")).join(":");
        assert!(text.eq_ignore_ascii_case(s), "{s:?} read as {text}");
    }
    if let Ok(m) = s.parse::<MemoryConfig>() {
        assert!(m.size >= MIN_MEMORY && m.size % 4096 == 0, "{s:?}: {m:?}");
        assert!(!m.hugepages || m.size % HUGE_PAGE_SIZE == 0, "{s:?}: {m:?}");
        let t = format!(
            "size={},hugepages={},prefault={}",
            m.size,
            on(m.hugepages),
            on(m.prefault)
        );
        assert_eq!(t.parse::<MemoryConfig>(), Ok(m));
    }
    if let Ok(d) = s.parse::<DiskConfig>() {
        assert!(d.id.as_ref().is_none_or(|id| (1..=20).contains(&id.len())));
        assert_eq!(disk_text(&d).parse::<DiskConfig>(), Ok(d));
    }
    if let Ok(n) = s.parse::<NetConfig>() {
        let mut t = match &n.backend {
            NetBackend::Tap(name) => {
                assert!((1..16).contains(&name.len()), "{s:?}");
                format!("tap={name}")
            }
            NetBackend::Fd(fd) => {
                assert!(*fd > 2, "{s:?}");
                format!("fd={fd}")
            }
        };
        if let Some(mac) = n.mac {
            assert_eq!(mac[0] & 1, 0, "{s:?}: a multicast MAC accepted");
            t.push_str(&format!(
                ",mac={}",
                mac.map(|b| format!("{b:02x}")).join(":")
            ));
        }
        assert_eq!(t.parse::<NetConfig>(), Ok(n));
    }
    if let Ok(serial) = s.parse::<SerialConfig>() {
        let t = match &serial {
            SerialConfig::Stdio => "stdio".to_string(),
            SerialConfig::Null => "null".to_string(),
            SerialConfig::File(p) => format!("file={}", p.display()),
            SerialConfig::Socket(p) => format!("socket={}", p.display()),
        };
        assert_eq!(t.parse::<SerialConfig>(), Ok(serial));
    }
    if let Ok(r) = s.parse::<RestoreConfig>() {
        let mut t = format!("path={},lazy={}", r.path.display(), on(r.lazy));
        if let Some(h) = r.hugepages {
            t.push_str(&format!(",hugepages={}", on(h)));
        }
        assert_eq!(t.parse::<RestoreConfig>(), Ok(r));
    }
}
