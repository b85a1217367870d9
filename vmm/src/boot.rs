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

/// Loads the configured kernel (or the embedded test guest) and writes every boot structure,
/// with `devices` (the virtio-mmio announcements) appended to the command line; returns the
/// boot vCPU's entry.
pub fn load(config: &VmConfig, devices: &str, ram: &GuestRam) -> Result<BootEntry, BootError> {
    let initrd = config
        .initrd
        .as_ref()
        .map(|p| std::fs::read(p).map_err(|e| BootError::Initrd(p.clone(), e)))
        .transpose()?;
    let ranges = ram.ranges();
    // Devices are announced the way Linux finds virtio-mmio devices without a device tree.
    let cmdline = match (config.cmdline.trim(), devices) {
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
