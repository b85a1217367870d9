//! Loading a kernel (ELF vmlinux, with or without a PVH note, or bzImage), its command line
//! and initrd, and writing every boot structure the entry protocol needs.

use std::io::{Read, Seek, SeekFrom};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{
    self, elf::PvhBootCapability, BzImage, Elf, KernelLoader, KernelLoaderResult,
};
use vm_memory::{Bytes, GuestAddress, ReadVolatile};

use crate::layout::{RamRange, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, ZERO_PAGE_START};
use crate::regs::BootEntry;
use crate::{mptable, paging, pvh, zeropage, GuestMemory};

/// bzImage `xloadflags` bit: the kernel has a 64-bit entry point at `code32_start + 0x200`.
const XLF_KERNEL_64: u16 = 1;
/// Offset of the 64-bit entry point from the protected-mode kernel start.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Highest initrd address for kernels that do not say (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Errors loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The image is neither ELF nor bzImage.
    #[error("kernel image is neither an ELF vmlinux nor a bzImage")]
    UnknownFormat,
    /// Reading the image failed.
    #[error("cannot read the kernel image")]
    Read(#[source] std::io::Error),
    /// linux-loader refused the image.
    #[error("cannot load the kernel")]
    Load(#[source] loader::Error),
    /// bzImage without a 64-bit entry point.
    #[error("bzImage has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)")]
    No64BitEntry,
    /// Command line too long or invalid.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line failed.
    #[error("cannot write the kernel command line")]
    WriteCmdline(#[source] loader::Error),
    /// The initrd does not fit.
    #[error(
        "initrd of {size} bytes does not fit in guest RAM between {lowest:#x} and {highest:#x}"
    )]
    InitrdTooLarge {
        /// Initrd size.
        size: u64,
        /// Lowest usable address (end of the kernel).
        lowest: u64,
        /// Highest usable address.
        highest: u64,
    },
    /// Copying the initrd failed.
    #[error("cannot copy the initrd into guest memory")]
    Initrd(#[source] vm_memory::GuestMemoryError),
    /// Zero page.
    #[error(transparent)]
    ZeroPage(#[from] zeropage::ZeroPageError),
    /// PVH start info.
    #[error(transparent)]
    Pvh(#[from] pvh::PvhError),
    /// Page tables.
    #[error(transparent)]
    Paging(#[from] paging::PagingError),
    /// MP table.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
}

/// Everything besides the kernel that goes into guest memory at boot.
pub struct BootConfig<'a> {
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Optional initrd contents.
    pub initrd: Option<&'a [u8]>,
    /// Number of vCPUs (for the MP table).
    pub cpus: u8,
    /// Guest RAM regions.
    pub ram: &'a [RamRange],
}

/// Where the boot CPU starts and what was placed where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootLayout {
    /// Entry protocol, entry point and boot-info pointer.
    pub entry: BootEntry,
    /// End of the loaded kernel.
    pub kernel_end: u64,
    /// Initrd guest address and size.
    pub initrd: Option<(u64, u32)>,
    /// Command line guest address and length (without NUL).
    pub cmdline: (u64, u32),
}

enum Format {
    Elf,
    BzImage,
}

fn detect<F: Read + Seek>(image: &mut F) -> Result<Format, LoaderError> {
    let mut magic = [0u8; 4];
    image.seek(SeekFrom::Start(0)).map_err(LoaderError::Read)?;
    image.read_exact(&mut magic).map_err(LoaderError::Read)?;
    if magic == *b"\x7fELF" {
        return Ok(Format::Elf);
    }
    image
        .seek(SeekFrom::Start(0x202))
        .map_err(LoaderError::Read)?;
    if image.read_exact(&mut magic).is_ok() && magic == *b"HdrS" {
        return Ok(Format::BzImage);
    }
    Err(LoaderError::UnknownFormat)
}

fn write_cmdline(mem: &GuestMemory, text: &str) -> Result<(u64, u32), LoaderError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(LoaderError::Cmdline)?;
    if !text.is_empty() {
        cmdline.insert_str(text).map_err(LoaderError::Cmdline)?;
    }
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(LoaderError::WriteCmdline)?;
    let len = cmdline
        .as_cstring()
        .map_err(LoaderError::Cmdline)?
        .as_bytes()
        .len();
    Ok((CMDLINE_START, len as u32))
}

fn load_initrd(
    mem: &GuestMemory,
    initrd: &[u8],
    lowest: u64,
    addr_max: u64,
    ram: &[RamRange],
) -> Result<(u64, u32), LoaderError> {
    let highest = ram
        .first()
        .map(|r| r.end().min(addr_max.saturating_add(1)))
        .unwrap_or(0);
    let size = initrd.len() as u64;
    let too_large = || LoaderError::InitrdTooLarge {
        size,
        lowest,
        highest,
    };
    let size32 = u32::try_from(size).map_err(|_| too_large())?;
    let addr = highest
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= lowest)
        .ok_or_else(too_large)?;
    mem.write_slice(initrd, GuestAddress(addr))
        .map_err(LoaderError::Initrd)?;
    Ok((addr, size32))
}

/// Loads `kernel` and writes every boot structure; returns where the boot CPU starts.
pub fn load<F: ReadVolatile + Read + Seek>(
    mem: &GuestMemory,
    kernel: &mut F,
    config: BootConfig<'_>,
) -> Result<BootLayout, LoaderError> {
    let highmem = Some(GuestAddress(HIMEM_START));
    let format = detect(kernel)?;
    kernel.seek(SeekFrom::Start(0)).map_err(LoaderError::Read)?;
    let result: KernelLoaderResult = match format {
        Format::Elf => Elf::load(mem, None, kernel, highmem),
        Format::BzImage => BzImage::load(mem, None, kernel, highmem),
    }
    .map_err(LoaderError::Load)?;
    let header = result.setup_header;
    if let Some(h) = header {
        if h.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(LoaderError::No64BitEntry);
        }
    }
    let cmdline = write_cmdline(mem, config.cmdline)?;
    let addr_max = match header {
        Some(h) if h.version >= 0x203 => u64::from(h.initrd_addr_max),
        _ => DEFAULT_INITRD_ADDR_MAX,
    };
    let kernel_end = result.kernel_end;
    let initrd = config
        .initrd
        .map(|i| {
            load_initrd(
                mem,
                i,
                kernel_end.next_multiple_of(0x1000),
                addr_max,
                config.ram,
            )
        })
        .transpose()?;
    let e820 = zeropage::e820_map(config.ram)?;
    let entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(pvh_entry) if header.is_none() => BootEntry::Pvh {
            entry: pvh_entry.0,
            start_info: pvh::write_start_info(mem, cmdline.0, &e820, initrd)?,
        },
        _ => {
            let params = zeropage::build(
                &zeropage::ZeroPageConfig {
                    header,
                    cmdline,
                    initrd,
                },
                &e820,
            )?;
            zeropage::write(mem, &params)?;
            let entry = match header {
                Some(_) => result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                None => result.kernel_load.0,
            };
            BootEntry::Linux64 {
                entry,
                zero_page: ZERO_PAGE_START,
            }
        }
    };
    paging::setup_identity_tables(mem)?;
    mptable::write(mem, config.cpus)?;
    Ok(BootLayout {
        entry,
        kernel_end,
        initrd,
        cmdline,
    })
}

#[cfg(test)]
#[path = "loader_tests.rs"]
mod tests;
