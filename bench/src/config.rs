//! The configurations the benchmark runs: RAM size × page size × idle/touched × vCPUs.

use serde::Serialize;

use crate::error::{Error, Result};

/// Host page size backing guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Pages {
    /// Ordinary 4 KiB pages (shmem memfd).
    #[serde(rename = "4K")]
    Small,
    /// 2 MiB hugetlb pages (`hugepages=on`).
    #[serde(rename = "2M")]
    Huge,
}

impl Pages {
    /// `4K` or `2M`.
    pub fn label(self) -> &'static str {
        match self {
            Pages::Small => "4K",
            Pages::Huge => "2M",
        }
    }
}

/// How the VM is handed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `vm.cpr-exec`: molt re-executes itself (same PID).
    Exec,
    /// `vm.cpr-transfer`: to a separately started `molt --incoming PATH`.
    Transfer,
    /// `vm.cpr-exec` with `"stand_in": true`: through a stand-in process (same PID; two
    /// pauses, the guest running in the stand-in while molt executes its binary).
    #[serde(rename = "stand-in")]
    StandIn,
}

impl Mode {
    /// `exec`, `transfer` or `stand-in`.
    pub fn label(self) -> &'static str {
        match self {
            Mode::Exec => "exec",
            Mode::Transfer => "transfer",
            Mode::StandIn => "stand-in",
        }
    }

    /// Parses `exec`, `transfer` or `stand-in`.
    pub fn parse(s: &str) -> Result<Mode> {
        match s.trim() {
            "exec" => Ok(Mode::Exec),
            "transfer" => Ok(Mode::Transfer),
            "stand-in" => Ok(Mode::StandIn),
            other => Err(Error::Usage(format!(
                "unknown mode {other:?}: expected exec, transfer or stand-in"
            ))),
        }
    }
}

/// One line of the plot and of the goals: a page size, RAM idle or touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Series {
    /// Page size.
    pub pages: Pages,
    /// RAM touched (`prefault=on`).
    pub touched: bool,
}

impl Series {
    /// The four series, in the order of the table and the legend.
    pub const ALL: [Series; 4] = [
        Series {
            pages: Pages::Small,
            touched: false,
        },
        Series {
            pages: Pages::Small,
            touched: true,
        },
        Series {
            pages: Pages::Huge,
            touched: false,
        },
        Series {
            pages: Pages::Huge,
            touched: true,
        },
    ];

    /// `4K idle`, `2M touched`, …
    pub fn label(self) -> String {
        let ram = if self.touched { "touched" } else { "idle" };
        format!("{} {ram}", self.pages.label())
    }
}

/// One benchmark configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Config {
    /// cpr-exec or cpr-transfer.
    pub mode: Mode,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Page size.
    pub pages: Pages,
    /// Whether all guest RAM is faulted in (`prefault=on`): at boot, and again in the
    /// background after each update.
    pub touched: bool,
    /// Number of vCPUs.
    pub vcpus: u8,
}

impl Config {
    /// The series this configuration belongs to.
    pub fn series(&self) -> Series {
        Series {
            pages: self.pages,
            touched: self.touched,
        }
    }

    /// The `--memory` argument of molt.
    pub fn memory_arg(&self) -> String {
        let mut s = format!("size={}M", self.mem_mib);
        if self.pages == Pages::Huge {
            s.push_str(",hugepages=on");
        }
        if self.touched {
            s.push_str(",prefault=on");
        }
        s
    }

    /// 2 MiB pages this configuration needs from the host's pool.
    pub fn huge_pages_needed(&self) -> u64 {
        match self.pages {
            Pages::Small => 0,
            Pages::Huge => self.mem_mib.div_ceil(2),
        }
    }

    /// A short name for progress lines and file names: `exec-1GiB-2M-touched-2cpu`.
    pub fn name(&self) -> String {
        let ram = if self.touched { "touched" } else { "idle" };
        format!(
            "{}-{}-{}-{ram}-{}cpu",
            self.mode.label(),
            size_label(self.mem_mib).replace(' ', ""),
            self.pages.label(),
            self.vcpus
        )
    }
}

/// `256 MiB`, `1 GiB`, `8 GiB`.
pub fn size_label(mib: u64) -> String {
    if mib >= 1024 && mib % 1024 == 0 {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

/// Parses a RAM size such as `256M`, `1G`, `4096` (MiB when no suffix).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'G' | 'g')) => (&t[..i], 1024),
        Some((i, 'M' | 'm')) => (&t[..i], 1),
        _ => (t, 1),
    };
    match num.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n * mult),
        _ => Err(Error::Usage(format!(
            "bad RAM size {s:?}: expected a positive number with an optional M or G suffix"
        ))),
    }
}

/// All configurations: modes outermost, then vCPU counts (so the 1-vCPU rows, which the
/// goals use, come first), then page size, idle before touched, then RAM size ascending.
pub fn matrix(sizes_mib: &[u64], vcpus: &[u8], modes: &[Mode]) -> Vec<Config> {
    let mut out = Vec::new();
    for &mode in modes {
        for &v in vcpus {
            for series in Series::ALL {
                for &mem_mib in sizes_mib {
                    out.push(Config {
                        mode,
                        mem_mib,
                        pages: series.pages,
                        touched: series.touched,
                        vcpus: v,
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("256M").ok(), Some(256));
        assert_eq!(parse_size("4G").ok(), Some(4096));
        assert_eq!(parse_size("512").ok(), Some(512));
        assert!(parse_size("0G").is_err());
        assert!(parse_size("x").is_err());
        assert_eq!(size_label(256), "256 MiB");
        assert_eq!(size_label(4096), "4 GiB");
    }

    #[test]
    fn matrix_and_args() {
        let m = matrix(&[256, 1024], &[1, 2], &[Mode::Exec, Mode::Transfer]);
        assert_eq!(m.len(), 2 * 2 * 4 * 2);
        assert_eq!(m[0].vcpus, 1);
        assert_eq!(m[16].mode, Mode::Transfer);
        assert!(Mode::parse("copy").is_err());
        let c = Config {
            mode: Mode::Exec,
            mem_mib: 1024,
            pages: Pages::Huge,
            touched: true,
            vcpus: 2,
        };
        assert_eq!(c.memory_arg(), "size=1024M,hugepages=on,prefault=on");
        assert_eq!(c.huge_pages_needed(), 512);
        assert_eq!(c.name(), "exec-1GiB-2M-touched-2cpu");
    }
}
