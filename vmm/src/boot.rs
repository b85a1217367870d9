//! Putting the kernel, its command line and initrd into guest RAM.

use std::fs::File;
use std::io::Cursor;
use std::path::PathBuf;

use arch::loader::{self, BootConfig, LoaderError};
use arch::regs::BootEntry;

use crate::config::{KernelSource, VmConfig};
use crate::guest_image::GUEST_KERNEL;
use crate::memory::GuestRam;

/// Errors loading the kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {0}")]
    Kernel(PathBuf, #[source] std::io::Error),
    /// The initrd cannot be read.
    #[error("cannot read initrd {0}")]
    Initrd(PathBuf, #[source] std::io::Error),
    /// The loader refused the image.
    #[error("cannot boot {0}")]
    Load(String, #[source] LoaderError),
}

/// The command-line word that lets the embedded test guest run natively on a PVM host.
const NATIVE_ON: &str = "molt.native=on";

/// The user's command line, plus [`NATIVE_ON`] for the embedded guest when the host can run
/// it natively (`native`) and the user did not say `molt.native=` themselves.
fn guest_cmdline(config: &VmConfig, native: bool) -> String {
    let cmdline = config.cmdline.trim();
    let embedded = config.kernel == KernelSource::Embedded;
    let said = cmdline
        .split_ascii_whitespace()
        .any(|w| w.starts_with("molt.native="));
    match (embedded && native && !said, cmdline) {
        (false, c) => c.to_string(),
        (true, "") => NATIVE_ON.to_string(),
        (true, c) => format!("{c} {NATIVE_ON}"),
    }
}

/// Loads the configured kernel (or the embedded test guest) and writes every boot structure,
/// with `devices` (the virtio-mmio announcements) appended to the command line; returns the
/// boot vCPU's entry. `native` says whether the host can run the embedded guest natively
/// (`arch::pvm`).
pub fn load(
    config: &VmConfig,
    devices: &str,
    native: bool,
    ram: &GuestRam,
) -> Result<BootEntry, BootError> {
    let initrd = config
        .initrd
        .as_ref()
        .map(|p| std::fs::read(p).map_err(|e| BootError::Initrd(p.clone(), e)))
        .transpose()?;
    let ranges = ram.ranges();
    // Devices are announced the way Linux finds virtio-mmio devices without a device tree.
    let cmdline = match (guest_cmdline(config, native).as_str(), devices) {
        (c, "") => c.to_string(),
        ("", d) => d.to_string(),
        (c, d) => format!("{c} {d}"),
    };
    let boot = BootConfig {
        cmdline: &cmdline,
        initrd: initrd.as_deref(),
        cpus: config.cpus,
        ram: &ranges,
    };
    let layout = match &config.kernel {
        KernelSource::Embedded => loader::load(&ram.mem, &mut Cursor::new(GUEST_KERNEL), boot)
            .map_err(|e| BootError::Load("the embedded test guest".into(), e))?,
        KernelSource::File(path) => {
            let mut file = File::open(path).map_err(|e| BootError::Kernel(path.clone(), e))?;
            loader::load(&ram.mem, &mut file, boot)
                .map_err(|e| BootError::Load(path.display().to_string(), e))?
        }
    };
    log::debug!("boot layout: {layout:x?}");
    Ok(layout.entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MemoryConfig;

    fn config(kernel: KernelSource, cmdline: &str) -> VmConfig {
        VmConfig {
            kernel,
            cmdline: cmdline.into(),
            initrd: None,
            cpus: 1,
            memory: MemoryConfig::default(),
            serial: Default::default(),
            api_socket: None,
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            cpu_template: Default::default(),
            seccomp: Default::default(),
            update_binaries: None,
        }
    }

    #[test]
    fn native_is_added_for_the_embedded_guest_on_a_capable_host_only() {
        let embedded = config(KernelSource::Embedded, "console=ttyS0 molt.memtest=8");
        assert_eq!(
            guest_cmdline(&embedded, true),
            "console=ttyS0 molt.memtest=8 molt.native=on"
        );
        assert_eq!(
            guest_cmdline(&embedded, false),
            "console=ttyS0 molt.memtest=8"
        );
        assert_eq!(
            guest_cmdline(&config(KernelSource::Embedded, " "), true),
            "molt.native=on"
        );
        let linux = config(KernelSource::File("vmlinux".into()), "console=ttyS0");
        assert_eq!(guest_cmdline(&linux, true), "console=ttyS0");
    }

    #[test]
    fn the_user_can_turn_native_off() {
        let off = config(KernelSource::Embedded, "molt.native=off molt.ticks=3");
        assert_eq!(guest_cmdline(&off, true), "molt.native=off molt.ticks=3");
    }
}
