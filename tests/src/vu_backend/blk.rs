//! virtio-blk requests (virtio 1.x, 5.2.6) against the image file: a 16-byte header the
//! device reads, data, and a status byte at the end of the last buffer the device writes.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::ring::Desc;
use super::VuBackendError;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_GET_ID,
};
pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH as T_FLUSH, VIRTIO_BLK_T_IN as T_IN, VIRTIO_BLK_T_OUT as T_OUT,
};

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const SECTOR: u64 = 512;
const ID: &[u8] = b"molt-test-vu-blk";

/// A request's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// `T_IN`, `T_OUT`, `T_FLUSH`, ...
    pub kind: u32,
    /// First sector.
    pub sector: u64,
}

/// Bytes of a chain in order, as (address, length) pieces.
fn pieces(chain: &[Desc], write: bool) -> Vec<(GuestAddress, usize)> {
    chain
        .iter()
        .filter(|d| d.write == write && d.len > 0)
        .map(|d| (d.addr, d.len as usize))
        .collect()
}

/// Drops the first `n` bytes of `p`.
fn skip(p: &mut Vec<(GuestAddress, usize)>, mut n: usize) {
    while n > 0 && !p.is_empty() {
        let take = n.min(p[0].1);
        p[0] = (GuestAddress(p[0].0 .0 + take as u64), p[0].1 - take);
        n -= take;
        if p[0].1 == 0 {
            p.remove(0);
        }
    }
}

fn total(p: &[(GuestAddress, usize)]) -> usize {
    p.iter().map(|(_, l)| l).sum()
}

/// Reads the header of the request in `chain`.
pub fn header(mem: &GuestMemoryMmap, chain: &[Desc]) -> Result<Header, VuBackendError> {
    let mut raw = Vec::with_capacity(16);
    for (addr, len) in pieces(chain, false) {
        let mut buf = vec![0u8; len.min(16 - raw.len())];
        mem.read_slice(&mut buf, addr)
            .map_err(VuBackendError::Guest)?;
        raw.extend_from_slice(&buf);
        if raw.len() == 16 {
            return Ok(Header {
                kind: u32::from_le_bytes(raw[..4].try_into().unwrap_or_default()),
                sector: u64::from_le_bytes(raw[8..].try_into().unwrap_or_default()),
            });
        }
    }
    Err(VuBackendError::BadRequest("header shorter than 16 bytes"))
}

/// Executes the request in `chain` on `image`; returns the bytes written to guest memory
/// (data and status) for the used ring.
pub fn execute(
    mem: &GuestMemoryMmap,
    image: &File,
    capacity: u64,
    chain: &[Desc],
) -> Result<u32, VuBackendError> {
    let h = header(mem, chain)?;
    let mut input = pieces(chain, false);
    skip(&mut input, 16);
    let mut output = pieces(chain, true);
    let last = output
        .last_mut()
        .ok_or(VuBackendError::BadRequest("no status byte"))?;
    last.1 -= 1;
    let status_at = GuestAddress(last.0 .0 + last.1 as u64);
    output.retain(|(_, l)| *l > 0);
    let at = h.sector.checked_mul(SECTOR);
    let fits = |len: usize| at.is_some_and(|a| a + len as u64 <= capacity * SECTOR);
    let mut written = 0u32;
    let status = match h.kind {
        T_IN if fits(total(&output)) => {
            let mut pos = at.unwrap_or(0);
            let mut ok = true;
            for (addr, len) in &output {
                let mut buf = vec![0u8; *len];
                ok &= image.read_exact_at(&mut buf, pos).is_ok();
                mem.write_slice(&buf, *addr)
                    .map_err(VuBackendError::Guest)?;
                pos += *len as u64;
                written += *len as u32;
            }
            if ok {
                S_OK
            } else {
                S_IOERR
            }
        }
        T_OUT if fits(total(&input)) => {
            let mut pos = at.unwrap_or(0);
            let mut ok = true;
            for (addr, len) in &input {
                let mut buf = vec![0u8; *len];
                mem.read_slice(&mut buf, *addr)
                    .map_err(VuBackendError::Guest)?;
                ok &= image.write_all_at(&buf, pos).is_ok();
                pos += *len as u64;
            }
            if ok {
                S_OK
            } else {
                S_IOERR
            }
        }
        T_IN | T_OUT => S_IOERR,
        T_FLUSH => {
            if image.sync_data().is_ok() {
                S_OK
            } else {
                S_IOERR
            }
        }
        VIRTIO_BLK_T_GET_ID => {
            let mut id = ID;
            for (addr, len) in &output {
                let n = (*len).min(id.len());
                mem.write_slice(&id[..n], *addr)
                    .map_err(VuBackendError::Guest)?;
                written += n as u32;
                id = &id[n..];
            }
            S_OK
        }
        _ => S_UNSUPP,
    };
    mem.write_obj(status, status_at)
        .map_err(VuBackendError::Guest)?;
    Ok(written + 1)
}
