//! The replay detector of the disk driver: a ring of `RING` sectors at the end of the disk,
//! rewritten after every record with increasing sequence numbers (`seq` goes to slot
//! `seq % RING`). Before each write the driver reads the slot back and expects exactly the
//! sequence number written there `RING` writes ago: a write of the VMM's that was applied
//! late (a replayed request) shows as an older number. The test reads the ring from the
//! host as well.
//!
//! ```text
//! ring slot: 0 magic "MOLTBLKQ", 8 seq, 16 sector, 24..504 payload(seq, w), 504 checksum
//! ```

use crate::blk::{checksum, payload, Words, WORDS};
use crate::virtio::Why;

/// Sectors in the ring.
pub const RING: u64 = 8;
const RING_MAGIC: u64 = u64::from_le_bytes(*b"MOLTBLKQ");

/// Fills a ring slot for `seq` at `sector`.
pub fn fill(words: &mut Words, seq: u64, sector: u64) {
    words[0] = RING_MAGIC;
    words[1] = seq;
    words[2] = sector;
    for (w, word) in words.iter_mut().enumerate().take(WORDS - 1).skip(3) {
        *word = payload(seq, w);
    }
    words[WORDS - 1] = checksum(&words[..WORDS - 1]);
}

/// The sequence number a slot read from `sector` holds: `Ok(None)` for a slot never
/// written, an error for anything that is not an intact slot of that sector.
pub fn read(words: &Words, sector: u64) -> Result<Option<u64>, Why> {
    if words[0] != RING_MAGIC {
        return if words.iter().all(|&w| w == 0) {
            Ok(None)
        } else {
            Err("ring magic")
        };
    }
    if words[WORDS - 1] != checksum(&words[..WORDS - 1]) {
        return Err("ring checksum");
    }
    if words[2] != sector {
        return Err("ring sector");
    }
    let seq = words[1];
    for (w, &word) in words.iter().enumerate().take(WORDS - 1).skip(3) {
        if word != payload(seq, w) {
            return Err("ring payload");
        }
    }
    Ok(Some(seq))
}

/// What a slot must hold before `seq` is written to it.
pub fn expected_before(seq: u64) -> Option<u64> {
    seq.checked_sub(RING).filter(|&s| s > 0)
}

/// The boot check of the whole ring, from the seq each slot holds: the largest seq `m`, if
/// every slot holds exactly what the writes up to `m` left there.
pub fn check_all(slots: &[Option<u64>; RING as usize]) -> Result<u64, (u64, Why)> {
    let m = slots.iter().flatten().copied().max().unwrap_or(0);
    for (i, slot) in slots.iter().enumerate() {
        let i = i as u64;
        // The last seq <= m that lands in slot i, if any.
        let want = (m >= i && m > 0)
            .then(|| m - (m - i) % RING)
            .filter(|&s| s > 0);
        if *slot != want {
            return Err((i, if slot.is_some() { "replay" } else { "lost" }));
        }
    }
    Ok(m)
}
