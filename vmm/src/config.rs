//! What the user asked for: the VM configuration and the parsers for its option syntax.

use std::path::PathBuf;
use std::str::FromStr;

use arch::cpu_template::CpuTemplate;
use serde::{Deserialize, Serialize};

/// Default RAM size.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// Smallest RAM size accepted.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Huge page size used with `hugepages=on`.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;
/// Default command line of the embedded test guest.
pub const EMBEDDED_GUEST_CMDLINE: &str = "console=ttyS0 molt.memtest=8";
/// Default command line for a user-supplied kernel.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Errors in option values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size that does not parse.
    #[error("invalid size '{0}' (expected e.g. 512M, 1G, 1073741824)")]
    BadSize(String),
    /// Memory too small.
    #[error("memory size {0} is below the minimum of 16 MiB")]
    MemoryTooSmall(u64),
    /// Memory size not a multiple of the huge page size.
    #[error("memory size {0} is not a multiple of 2 MiB, required with hugepages=on")]
    NotHugeAligned(u64),
    /// Memory size not a multiple of the page size.
    #[error("memory size {0} is not a multiple of 4 KiB")]
    NotPageAligned(u64),
    /// Unknown key or malformed key=value list.
    #[error("invalid {option} value '{value}': {why}")]
    BadOption {
        /// Option name.
        option: &'static str,
        /// What the user gave.
        value: String,
        /// What is wrong.
        why: String,
    },
}

/// Parses `512M`, `1G`, `2GiB`, `1048576` (bytes).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

fn on_off(option: &'static str, key: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(ConfigError::BadOption {
            option,
            value: format!("{key}={v}"),
            why: "expected on or off".into(),
        }),
    }
}

/// `--memory size=SIZE[,hugepages=on]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Bytes of guest RAM.
    pub size: u64,
    /// Back RAM with 2 MiB hugetlb pages.
    pub hugepages: bool,
    /// Fault all of guest RAM in at boot (and again in the background after a live update).
    #[serde(default)]
    pub prefault: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size: DEFAULT_MEMORY,
            hugepages: false,
            prefault: false,
        }
    }
}

impl FromStr for MemoryConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let mut cfg = MemoryConfig::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("size", v)) => cfg.size = parse_size(v)?,
                Some(("hugepages", v)) => cfg.hugepages = on_off("--memory", "hugepages", v)?,
                Some(("prefault", v)) => cfg.prefault = on_off("--memory", "prefault", v)?,
                None => cfg.size = parse_size(part)?,
                Some((k, _)) => {
                    return Err(ConfigError::BadOption {
                        option: "--memory",
                        value: s.to_string(),
                        why: format!("unknown key '{k}' (expected size, hugepages, prefault)"),
                    })
                }
            }
        }
        if cfg.size < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall(cfg.size));
        }
        if cfg.hugepages && cfg.size % HUGE_PAGE_SIZE != 0 {
            return Err(ConfigError::NotHugeAligned(cfg.size));
        }
        if cfg.size % 4096 != 0 {
            return Err(ConfigError::NotPageAligned(cfg.size));
        }
        Ok(cfg)
    }
}

/// `--serial stdio|file=PATH|socket=PATH|null`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SerialConfig {
    /// Output to stdout, input from stdin.
    #[default]
    Stdio,
    /// Output appended to a file (created if missing); no input.
    File(PathBuf),
    /// A unix socket the VMM listens on; one client at a time gets output and sends input.
    Socket(PathBuf),
    /// Output discarded.
    Null,
}

impl FromStr for SerialConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::BadOption {
            option: "--serial",
            value: s.to_string(),
            why: why.to_string(),
        };
        match s.split_once('=') {
            None if s == "stdio" => Ok(Self::Stdio),
            None if s == "null" => Ok(Self::Null),
            Some((_, "")) => Err(bad("empty path")),
            Some(("file", p)) => Ok(Self::File(p.into())),
            Some(("socket", p)) => Ok(Self::Socket(p.into())),
            _ => Err(bad("expected stdio, file=PATH, socket=PATH or null")),
        }
    }
}

/// `--disk path=FILE[,readonly=on][,id=ID]` or
/// `--disk vhost_user=on,socket=PATH[,num_queues=N][,id=ID]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Backing file (the backend's socket with `vhost_user`).
    pub path: PathBuf,
    /// Refuse guest writes.
    #[serde(default)]
    pub readonly: bool,
    /// Serial number the guest reads with GET_ID (default: the file name).
    #[serde(default)]
    pub id: Option<String>,
    /// The data path is a vhost-user backend listening on `path`.
    #[serde(default)]
    pub vhost_user: bool,
    /// Request queues (vhost-user only; default 1).
    #[serde(default)]
    pub num_queues: Option<u16>,
}

/// Most request queues a vhost-user disk may have.
pub const MAX_DISK_QUEUES: u16 = 8;

impl FromStr for DiskConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::BadOption {
            option: "--disk",
            value: s.to_string(),
            why,
        };
        let (mut path, mut readonly, mut id) = (None, false, None);
        let (mut vhost_user, mut socket, mut num_queues) = (false, None, None);
        for part in s.split(',').filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("path", v)) if !v.is_empty() => path = Some(PathBuf::from(v)),
                Some(("vhost_user", v)) => vhost_user = on_off("--disk", "vhost_user", v)?,
                Some(("socket", v)) if !v.is_empty() => socket = Some(PathBuf::from(v)),
                Some(("num_queues", v)) => match v.parse::<u16>() {
                    Ok(n) if (1..=MAX_DISK_QUEUES).contains(&n) => num_queues = Some(n),
                    _ => return Err(bad(format!("num_queues must be 1 to {MAX_DISK_QUEUES}"))),
                },
                Some(("readonly", v)) => readonly = on_off("--disk", "readonly", v)?,
                Some(("id", v)) if !v.is_empty() && v.len() <= 20 => id = Some(v.to_string()),
                Some(("id", _)) => return Err(bad("id must be 1 to 20 characters".into())),
                Some((k, _)) => {
                    return Err(bad(format!(
                        "unknown or empty key '{k}' (expected path, readonly, id, \
                         vhost_user, socket, num_queues)"
                    )))
                }
                None => return Err(bad(format!("'{part}' is not key=value"))),
            }
        }
        if vhost_user {
            if path.is_some() || readonly {
                return Err(bad(
                    "a vhost_user disk takes socket=PATH; path and readonly are the backend's"
                        .into(),
                ));
            }
            let path = socket.ok_or_else(|| bad("socket=PATH is required".into()))?;
            return Ok(Self {
                path,
                readonly,
                id,
                vhost_user,
                num_queues,
            });
        }
        if socket.is_some() || num_queues.is_some() {
            return Err(bad("socket and num_queues need vhost_user=on".into()));
        }
        let path = path.ok_or_else(|| bad("path=FILE is required".into()))?;
        Ok(Self {
            path,
            readonly,
            id,
            ..Self::default()
        })
    }
}

/// Where a virtio-net device sends and receives frames.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetBackend {
    /// A tap interface opened by name.
    Tap(String),
    /// An already opened tap fd inherited from the parent.
    Fd(i32),
}

/// `--net tap=NAME[,mac=MAC]` or `--net fd=N[,mac=MAC]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Backend.
    pub backend: NetBackend,
    /// Guest MAC address (default: a locally administered address derived from the index).
    #[serde(default)]
    pub mac: Option<[u8; 6]>,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        // Exactly two hex digits: `from_str_radix` alone would also take "+f".
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

impl FromStr for NetConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::BadOption {
            option: "--net",
            value: s.to_string(),
            why,
        };
        let (mut backend, mut mac) = (None, None);
        for part in s.split(',').filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("tap", v)) if !v.is_empty() && v.len() < 16 => {
                    backend = Some(NetBackend::Tap(v.to_string()))
                }
                Some(("tap", _)) => return Err(bad("tap names are 1 to 15 characters".into())),
                Some(("fd", v)) => match v.parse::<i32>() {
                    Ok(n) if n > 2 => backend = Some(NetBackend::Fd(n)),
                    _ => return Err(bad(format!("fd '{v}' is not an inherited fd number"))),
                },
                Some(("mac", v)) => {
                    let m = parse_mac(v).ok_or_else(|| bad(format!("bad MAC '{v}'")))?;
                    if m[0] & 1 != 0 {
                        return Err(bad(format!("MAC {v} is a multicast address")));
                    }
                    mac = Some(m);
                }
                Some((k, _)) => {
                    return Err(bad(format!("unknown key '{k}' (expected tap, fd, mac)")))
                }
                None => return Err(bad(format!("'{part}' is not key=value"))),
            }
        }
        let backend = backend.ok_or_else(|| bad("tap=NAME or fd=N is required".into()))?;
        Ok(Self { backend, mac })
    }
}

/// The kernel to boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelSource {
    /// The test guest built into the molt binary.
    Embedded,
    /// A bzImage or ELF vmlinux on disk.
    File(PathBuf),
}

/// Everything needed to build the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Kernel.
    pub kernel: KernelSource,
    /// Kernel command line.
    pub cmdline: String,
    /// Initrd path.
    pub initrd: Option<PathBuf>,
    /// Number of vCPUs.
    pub cpus: u8,
    /// RAM.
    pub memory: MemoryConfig,
    /// Serial console backend.
    pub serial: SerialConfig,
    /// API socket path.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// virtio-blk disks.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// A virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// CPUID policy, resolved (`auto` never appears here). Part of the live-update record:
    /// the VM keeps the template it booted with; a record without it is `host`.
    #[serde(default)]
    pub cpu_template: CpuTemplate,
    /// Seccomp filters (`--seccomp`). Part of the live-update record, like the update policy
    /// below: a client cannot drop them by naming other arguments for the next image.
    #[serde(default)]
    pub seccomp: crate::seccomp::SeccompMode,
    /// `--update-binaries`: `vm.cpr-exec` only executes binaries under this directory
    /// (canonical path).
    #[serde(default)]
    pub update_binaries: Option<PathBuf>,
}

#[cfg(test)]
#[path = "config_props.rs"]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        for bad in ["", "G", "1X", "-1G", "1.5G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn memory_option() {
        let m: MemoryConfig = "size=1G,hugepages=on".parse().unwrap();
        assert_eq!((m.size, m.hugepages), (1 << 30, true));
        assert_eq!("512M".parse::<MemoryConfig>().unwrap().size, 512 << 20);
        assert!(matches!(
            "size=1M".parse::<MemoryConfig>(),
            Err(ConfigError::MemoryTooSmall(_))
        ));
        assert!(matches!(
            "size=17M,hugepages=on".parse::<MemoryConfig>(),
            Err(ConfigError::NotHugeAligned(_))
        ));
        assert!("size=1G,huge=on".parse::<MemoryConfig>().is_err());
        assert!("size=1G,hugepages=maybe".parse::<MemoryConfig>().is_err());
    }

    #[test]
    fn disk_and_net_options() {
        let d: DiskConfig = "path=/tmp/a.img,readonly=on".parse().unwrap();
        assert_eq!((d.path.to_str(), d.readonly), (Some("/tmp/a.img"), true));
        assert!("readonly=on".parse::<DiskConfig>().is_err());
        assert!("path=/x,size=1G".parse::<DiskConfig>().is_err());
        let v: DiskConfig = "vhost_user=on,socket=/tmp/s,num_queues=2,id=v0"
            .parse()
            .unwrap();
        assert!(v.vhost_user);
        assert_eq!(v.path, PathBuf::from("/tmp/s"));
        assert_eq!(v.num_queues, Some(2));
        assert_eq!(v.id.as_deref(), Some("v0"));
        for bad in [
            "vhost_user=on",
            "vhost_user=on,socket=/s,path=/x",
            "vhost_user=on,socket=/s,readonly=on",
            "vhost_user=on,socket=/s,num_queues=0",
            "vhost_user=on,socket=/s,num_queues=99",
            "path=/x,socket=/s",
            "path=/x,num_queues=2",
        ] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad}");
        }
        let n: NetConfig = "tap=tap0,mac=02:00:00:00:00:01".parse().unwrap();
        assert_eq!(n.backend, NetBackend::Tap("tap0".into()));
        assert_eq!(n.mac, Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(
            "fd=7".parse::<NetConfig>().unwrap().backend,
            NetBackend::Fd(7)
        );
        for bad in [
            "",
            "tap=",
            "fd=x",
            "fd=1",
            "tap=t,mac=01:00:00:00:00:00",
            "tap=t,mac=+2:00:00:00:00:01",
            "mac=zz",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn serial_option() {
        assert_eq!("stdio".parse(), Ok(SerialConfig::Stdio));
        assert_eq!("null".parse(), Ok(SerialConfig::Null));
        assert_eq!(
            "file=/tmp/x".parse(),
            Ok(SerialConfig::File("/tmp/x".into()))
        );
        assert_eq!(
            "socket=/tmp/s".parse(),
            Ok(SerialConfig::Socket("/tmp/s".into()))
        );
        assert!("file=".parse::<SerialConfig>().is_err());
        assert!("tcp=1".parse::<SerialConfig>().is_err());
    }
}
