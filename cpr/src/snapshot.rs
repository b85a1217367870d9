//! The on-disk snapshot: the fourth home of the same capture (after exec, a socket and a
//! record memfd). A snapshot is a directory:
//!
//! ```text
//! DIR/state.molt   the state record (same format as the handoff record, its own kind),
//!                  written last: it lists every memory file and its chunk checksums
//! DIR/ram<i>.mem   guest RAM region i, byte for byte at the region's offsets; sparse:
//!                  pages the guest never touched are holes
//! ```
//!
//! Each memory file is cut into [`CHUNK_SIZE`] chunks; [`MemoryFile::chunks`] holds, per
//! chunk, `None` for a chunk that is a hole in the file (all zeros, never written) or the
//! [`chunk_checksum`] of the chunk's bytes. Because the record is written after the memory
//! files, a snapshot whose RAM is streamed while the guest runs (a live snapshot) uses the same
//! layout: the checksums are those of what was written.
//!
//! The directory is written under a temporary name beside `DIR`, synced and renamed into
//! place, so `DIR` always holds a complete snapshot or none.

use serde::{Deserialize, Serialize};

/// Record kind of a snapshot's state record.
pub const SNAPSHOT_KIND: &str = "molt-snapshot";
/// File name of the state record inside a snapshot directory.
pub const STATE_FILE: &str = "state.molt";
/// Size of a checksummed chunk of a memory file: 2 MiB, one huge page.
pub const CHUNK_SIZE: u64 = 2 << 20;

/// File name of RAM region `index`'s memory file.
pub fn memory_file_name(index: usize) -> String {
    format!("ram{index}.mem")
}

/// Whether `name` is one of the files a snapshot directory holds (nothing else is ever
/// removed from a directory that is being replaced).
pub fn is_snapshot_file(name: &str) -> bool {
    name == STATE_FILE
        || name
            .strip_prefix("ram")
            .and_then(|n| n.strip_suffix(".mem"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// CRC-64/XZ of one chunk's bytes (`crc64fast`: 8 GB/s here against 1.5 GB/s table-driven,
/// which bounded the writer of a snapshot).
pub fn chunk_checksum(bytes: &[u8]) -> u64 {
    let mut digest = crc64fast::Digest::new();
    digest.write(bytes);
    digest.sum64()
}

/// One memory file as the state record describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryFile {
    /// File name inside the snapshot directory.
    pub file: String,
    /// Size of the region (and of the file) in bytes.
    pub size: u64,
    /// Chunk size the checksums cover.
    pub chunk_size: u64,
    /// Per chunk: `None` for a hole, else the checksum of its bytes.
    pub chunks: Vec<Option<u64>>,
    /// Bytes of data written (the rest are holes).
    pub data_bytes: u64,
}

impl MemoryFile {
    /// Number of chunks a region of `size` bytes has.
    pub fn chunk_count(size: u64, chunk_size: u64) -> usize {
        size.div_ceil(chunk_size.max(1)) as usize
    }

    /// The byte range of chunk `i` (the last chunk may be short).
    pub fn chunk_range(&self, i: usize) -> (u64, u64) {
        let start = i as u64 * self.chunk_size;
        (start, (start + self.chunk_size).min(self.size))
    }

    /// Whether the description is self-consistent: a chunk size that is a multiple of 4 KiB
    /// and at most [`CHUNK_SIZE`] (readers load a chunk into a buffer of that size), one entry
    /// per chunk, and a snapshot file name.
    pub fn is_consistent(&self) -> bool {
        self.chunk_size != 0
            && self.chunk_size % 4096 == 0
            && self.chunk_size <= CHUNK_SIZE
            && self.chunks.len() == Self::chunk_count(self.size, self.chunk_size)
            && is_snapshot_file(&self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_chunks() {
        assert_eq!(memory_file_name(1), "ram1.mem");
        assert!(is_snapshot_file("ram0.mem") && is_snapshot_file(STATE_FILE));
        for other in ["ram.mem", "ramx.mem", "ram0.mem.bak", "notes.txt", ".."] {
            assert!(!is_snapshot_file(other), "{other}");
        }
        let f = MemoryFile {
            file: "ram0.mem".into(),
            size: 5 << 20,
            chunk_size: CHUNK_SIZE,
            chunks: vec![None, Some(1), None],
            data_bytes: 0,
        };
        assert!(f.is_consistent());
        assert_eq!(f.chunk_range(2), (4 << 20, 5 << 20));
        assert!(!MemoryFile {
            chunks: vec![],
            ..f.clone()
        }
        .is_consistent());
        // A chunk larger than the readers' buffer (it crashed a restore), with one entry for
        // the single chunk it makes.
        assert!(!MemoryFile {
            chunk_size: CHUNK_SIZE * 2,
            chunks: vec![Some(1)],
            size: CHUNK_SIZE * 2,
            ..f
        }
        .is_consistent());
        assert_ne!(chunk_checksum(&[0; 4096]), chunk_checksum(&[1; 4096]));
    }

    #[test]
    fn chunk_checksums_are_crc_64_xz() {
        let reference = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
        let chunk: Vec<u8> = (0..CHUNK_SIZE as u32 + 13)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in [0, 1, 15, 16, 17, 255, 4096, chunk.len()] {
            let bytes = &chunk[..len];
            assert_eq!(
                chunk_checksum(bytes),
                reference.checksum(bytes),
                "{len} bytes"
            );
        }
        assert_eq!(chunk_checksum(b"123456789"), 0x995d_c9bb_df19_39fa);
    }
}
