//! A snapshot's memory-file descriptions (the manifest part of its state record), read as
//! JSON: whatever a description says, a restore reads only inside its file and its buffer.

use cpr::snapshot::{is_snapshot_file, MemoryFile, CHUNK_SIZE};

/// `data` as a list of memory-file descriptions, or as one.
pub fn manifest(data: &[u8]) {
    if let Ok(files) = serde_json::from_slice::<Vec<MemoryFile>>(data) {
        files.iter().for_each(check_memory_file);
    } else if let Ok(file) = serde_json::from_slice::<MemoryFile>(data) {
        check_memory_file(&file);
    }
}

/// A description a restore accepts names a file inside the snapshot directory and has
/// chunks that tile the region, none larger than the readers' [`CHUNK_SIZE`] buffer.
pub(crate) fn check_memory_file(file: &MemoryFile) {
    if !file.is_consistent() {
        return;
    }
    assert!(
        is_snapshot_file(&file.file) && !file.file.contains('/'),
        "{:?} accepted as a memory file name",
        file.file
    );
    let mut next = 0;
    for i in 0..file.chunks.len() {
        let (start, end) = file.chunk_range(i);
        assert_eq!(start, next, "chunk {i} does not follow the one before");
        assert!(
            start < end && end <= file.size,
            "chunk {i} is {start}..{end}"
        );
        assert!(
            end - start <= CHUNK_SIZE,
            "chunk {i} is larger than a chunk buffer"
        );
        next = end;
    }
    assert_eq!(next, file.size, "the chunks do not cover the region");
}
