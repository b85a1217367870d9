//! The `molt` command line.

use std::path::PathBuf;

use arch::cpu_template::CpuTemplateChoice;
use clap::{Parser, Subcommand};

use crate::api::ctl::CtlArgs;
use crate::config::{
    DiskConfig, KernelSource, MemoryConfig, NetConfig, SerialConfig, VmConfig,
    DEFAULT_LINUX_CMDLINE, EMBEDDED_GUEST_CMDLINE,
};

/// molt: a minimal KVM virtual machine monitor built for live update.
///
/// Without --kernel, molt boots its embedded test guest, whose serial console reports boot,
/// ticks and memory-test results. The process exit code is the guest's exit code (written to
/// the debug port 0x501), 0 when the guest resets or powers off or molt is stopped by
/// SIGINT/SIGTERM or vm.shutdown, and 1 on an error.
///
/// `molt ctl --api-socket PATH <request>` talks to a running molt.
#[derive(Debug, Parser)]
#[command(name = "molt", version = crate::VERSION, about, long_about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// A client command instead of running a VM.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// VM options.
    #[command(flatten)]
    pub vm: VmArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send a request to a running molt's API socket and print the JSON result.
    Ctl(CtlArgs),
}

/// Options of a VM.
#[derive(Debug, clap::Args)]
pub struct VmArgs {
    /// Start without a VM and receive one from a running molt (`vm.cpr-transfer`): listen on
    /// a unix socket at PATH (mode 0600, removed once a sender connects) for one sender. The
    /// VM's options come from the sender; VM options given here are ignored with a warning.
    #[arg(long, value_name = "PATH")]
    pub incoming: Option<PathBuf>,

    /// Kernel to boot: a bzImage or an ELF vmlinux (PVH entry used when present).
    /// Default: the embedded test guest.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Kernel command line. Default: "console=ttyS0 molt.memtest=8" for the embedded guest,
    /// "console=ttyS0 reboot=k panic=1" for --kernel.
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,

    /// Initial ramdisk loaded at the top of low RAM.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Number of vCPUs. vCPU 0 boots; the others wait for INIT/SIPI as on real hardware.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=254))]
    pub cpus: u8,

    /// Guest RAM: size=SIZE[,hugepages=on][,prefault=on]. SIZE takes K, M, G suffixes
    /// (binary). RAM is backed by memfds; prefault=on faults it all in at boot (and in the
    /// background after a live update); hugepages=on uses 2 MiB hugetlb pages, which the host must have
    /// free (/proc/sys/vm/nr_hugepages).
    #[arg(
        long,
        value_name = "size=SIZE[,hugepages=on][,prefault=on]",
        default_value = "size=256M"
    )]
    pub memory: MemoryConfig,

    /// Serial console (COM1, IRQ 4): stdio, file=PATH (output appended), socket=PATH (a unix
    /// socket; one client at a time), or null.
    #[arg(long, value_name = "BACKEND", default_value = "stdio")]
    pub serial: SerialConfig,

    /// A virtio-blk disk backed by FILE (repeatable): path=FILE[,readonly=on][,id=ID].
    /// Requests are served with ordinary file I/O; flush is fdatasync. Or
    /// vhost_user=on,socket=PATH[,num_queues=N][,id=ID]: a vhost-user-blk backend listening on
    /// PATH serves the requests (it keeps running across live updates).
    #[arg(long = "disk", value_name = "path=FILE[,readonly=on]")]
    pub disks: Vec<DiskConfig>,

    /// A virtio-net interface (repeatable): tap=NAME (an existing tap interface) or fd=N (an
    /// open tap fd inherited from the parent, opened without IFF_VNET_HDR), with an optional
    /// mac=aa:bb:cc:dd:ee:ff.
    #[arg(long = "net", value_name = "tap=NAME|fd=N[,mac=MAC]")]
    pub nets: Vec<NetConfig>,

    /// A virtio-rng device fed from the host's getrandom().
    #[arg(long)]
    pub rng: bool,

    /// CPUID policy: host (every feature KVM supports), emulated (hides what KVM's
    /// instruction emulator cannot execute: CMPXCHG16B, XSAVE, AVX and other vector
    /// extensions, RDRAND, ...), or auto: emulated on PVM hosts, where a guest that is not
    /// PVM-aware (a stock Linux) runs in that emulator, host elsewhere. A live update keeps
    /// the VM's template.
    #[arg(long, value_name = "auto|host|emulated", default_value = "auto")]
    pub cpu_template: CpuTemplateChoice,

    /// Serve the HTTP/JSON API on this unix socket (mode 0600; a stale socket file is
    /// replaced; removed on exit). See docs/openapi.json and `molt ctl`.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Restore the VM of a snapshot directory (written by vm.snapshot) instead of booting:
    /// path=DIR[,lazy=off][,hugepages=on|off]. The snapshot describes the VM, so the VM-shape
    /// options are refused with it; --api-socket, --serial and --log-level apply. RAM is
    /// loaded on demand while the guest runs (lazy=off reads all of it first); hugepages=
    /// backs it with (or without) 2 MiB huge pages whatever the snapshot's RAM was.
    #[arg(long, value_name = "path=DIR[,lazy=off][,hugepages=on|off]", conflicts_with_all = [
        "kernel", "cmdline", "initrd", "cpus", "memory", "disks", "nets", "rng",
    ])]
    pub restore: Option<crate::snapshot::RestoreConfig>,

    /// Seccomp filters on molt's threads: on (a forbidden syscall kills molt with SIGSYS),
    /// log (allowed, logged to the kernel audit log) or off. vCPU threads and the threads
    /// that handle API clients and device emulation are filtered and can never execve; one
    /// unfiltered thread executes live updates, so filters do not pile up across updates. A
    /// live update keeps the VM's setting.
    #[arg(long, value_name = "on|log|off", default_value = "on")]
    pub seccomp: crate::seccomp::SeccompMode,

    /// Allow vm.cpr-exec to execute only binaries under this directory (resolved to its
    /// canonical path at start; a live update keeps it).
    #[arg(long, value_name = "DIR")]
    pub update_binaries: Option<PathBuf>,

    /// Log level for molt's own messages on stderr: error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    pub log_level: log::LevelFilter,
}

impl VmArgs {
    /// The VM configuration these options describe.
    pub fn vm_config(&self) -> VmConfig {
        let (kernel, default_cmdline) = match &self.kernel {
            Some(p) => (KernelSource::File(p.clone()), DEFAULT_LINUX_CMDLINE),
            None => (KernelSource::Embedded, EMBEDDED_GUEST_CMDLINE),
        };
        VmConfig {
            kernel,
            cmdline: self
                .cmdline
                .clone()
                .unwrap_or_else(|| default_cmdline.to_string()),
            initrd: self.initrd.clone(),
            cpus: self.cpus,
            memory: self.memory,
            serial: self.serial.clone(),
            api_socket: self.api_socket.clone(),
            disks: self.disks.clone(),
            nets: self.nets.clone(),
            rng: self.rng,
            cpu_template: self.cpu_template.resolve(),
            seccomp: self.seccomp,
            update_binaries: self.update_binaries.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_boot_the_embedded_guest() {
        let cli = Cli::try_parse_from(["molt"]).unwrap();
        assert!(cli.command.is_none());
        let cfg = cli.vm.vm_config();
        assert_eq!(cfg.kernel, KernelSource::Embedded);
        assert_eq!(cfg.cmdline, EMBEDDED_GUEST_CMDLINE);
        assert_eq!(cfg.cpus, 1);
        assert_eq!(cfg.memory, MemoryConfig::default());
        assert_eq!(cfg.serial, SerialConfig::Stdio);
        assert_eq!(cfg.api_socket, None);
    }

    #[test]
    fn options_parse() {
        let cli = Cli::try_parse_from([
            "molt",
            "--kernel",
            "/k",
            "--cpus",
            "2",
            "--memory",
            "size=1G,hugepages=on",
            "--serial",
            "null",
            "--api-socket",
            "/tmp/a.sock",
        ])
        .unwrap();
        let cfg = cli.vm.vm_config();
        assert_eq!(cfg.kernel, KernelSource::File("/k".into()));
        assert_eq!(cfg.cmdline, DEFAULT_LINUX_CMDLINE);
        assert_eq!(cfg.cpus, 2);
        assert!(cfg.memory.hugepages);
        assert_eq!(cfg.api_socket, Some("/tmp/a.sock".into()));
    }

    #[test]
    fn ctl_subcommand_parses() {
        let cli = Cli::try_parse_from(["molt", "ctl", "--api-socket", "/s", "info"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Ctl(_))));
    }

    #[test]
    fn cpu_template_resolves() {
        use arch::cpu_template::{CpuTemplate, CpuTemplateChoice};
        for (arg, want) in [
            ("host", CpuTemplate::Host),
            ("emulated", CpuTemplate::Emulated),
            ("auto", CpuTemplateChoice::Auto.resolve()),
        ] {
            let cli = Cli::try_parse_from(["molt", "--cpu-template", arg]).unwrap();
            assert_eq!(cli.vm.vm_config().cpu_template, want, "{arg}");
        }
        let cli = Cli::try_parse_from(["molt"]).unwrap();
        assert_eq!(
            cli.vm.vm_config().cpu_template,
            CpuTemplate::for_this_host()
        );
    }

    #[test]
    fn restore_refuses_vm_shape_options_but_takes_host_side_ones() {
        let cli = Cli::try_parse_from([
            "molt",
            "--restore",
            "path=/s",
            "--api-socket",
            "/a",
            "--serial",
            "null",
        ])
        .unwrap();
        assert_eq!(cli.vm.restore.map(|r| r.path), Some("/s".into()));
        for shape in [
            &["--memory", "size=1G"][..],
            &["--cpus", "2"],
            &["--kernel", "/k"],
            &["--disk", "path=/d"],
            &["--rng"],
        ] {
            let args = ["molt", "--restore", "path=/s"].iter().chain(shape);
            assert!(Cli::try_parse_from(args).is_err(), "{shape:?}");
        }
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            &["molt", "--cpus", "0"][..],
            &["molt", "--memory", "size=lots"],
            &["molt", "--serial", "tcp"],
            &["molt", "--cpu-template", "t2"],
            &["molt", "--bogus"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}

/// The `--log-level` of command line `args` (`--log-level LEVEL` or `--log-level=LEVEL`; the
/// last one wins), found without parsing the rest: a live update's new image needs it first
/// thing, inside the guest's pause. `None` if absent or not a level.
pub fn log_level_arg(args: impl IntoIterator<Item = String>) -> Option<log::LevelFilter> {
    let mut level = None;
    let mut args = args.into_iter().skip(1);
    while let Some(arg) = args.next() {
        let value = match arg.strip_prefix("--log-level") {
            Some("") => args.next(),
            Some(v) => v.strip_prefix('=').map(str::to_string),
            None => continue,
        };
        level = value.and_then(|v| v.parse().ok()).or(level);
    }
    level
}

#[cfg(test)]
mod log_level_tests {
    use super::log_level_arg;
    use log::LevelFilter;

    fn args(a: &[&str]) -> Vec<String> {
        std::iter::once("molt")
            .chain(a.iter().copied())
            .map(String::from)
            .collect()
    }

    #[test]
    fn the_log_level_is_found_in_both_spellings() {
        assert_eq!(
            log_level_arg(args(&["--memory", "size=1G", "--log-level", "debug"])),
            Some(LevelFilter::Debug)
        );
        assert_eq!(
            log_level_arg(args(&["--log-level=info"])),
            Some(LevelFilter::Info)
        );
        assert_eq!(log_level_arg(args(&["--memory", "size=1G"])), None);
        assert_eq!(log_level_arg(args(&["--log-level", "loud"])), None);
        assert_eq!(log_level_arg(args(&["--log-levelx=info"])), None);
    }
}
