//! State records: the handoff record a new molt reads after exec or transfer, a snapshot's
//! `state.molt`, any record as JSON.

use std::fmt::Debug;

use cpr::{decode, decode_kind, encode, FORMAT_MAJOR, MAGIC};
use crc::{Crc, CRC_64_XZ};
use serde_json::Value;
use vmm::snapshot::{Snapshot, SNAPSHOT_KIND};
use vmm::update::handoff::Handoff;
use vmm::update::HANDOFF_KIND;

/// The first byte chooses how the rest is read: even, as a whole record (magic, version,
/// length and checksum included); odd, as the payload of a record whose header is forged to
/// be valid (minor version `byte >> 1`), so that mutations reach the JSON behind the checksum.
pub fn record(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        forge(u16::from(mode >> 1), rest)
    };
    round_trip::<Value>(&bytes, None);
    if let Some(snap) = round_trip::<Snapshot>(&bytes, Some(SNAPSHOT_KIND)) {
        // What a restore checks first must hold up to anything a decoded record holds.
        let _ = vmm::memory_persist::validate_layout(&snap.parts.ram);
        for file in &snap.memory {
            crate::manifest::check_memory_file(file);
        }
    }
    round_trip::<Handoff>(&bytes, Some(HANDOFF_KIND));
}

/// Decodes `bytes`; a record that decodes must encode again and decode to the same state.
fn round_trip<T>(bytes: &[u8], kind: Option<&str>) -> Option<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + Debug,
{
    let decoded = match kind {
        Some(kind) => decode_kind::<T>(bytes, kind),
        None => decode::<T>(bytes),
    };
    let record = match decoded {
        Ok(record) => record,
        Err(e) => {
            // Error messages are shown to users: building one must not fail either.
            let _ = e.to_string();
            return None;
        }
    };
    let again =
        encode(&record.writer, &record.kind, &record.state).expect("a decoded state encodes again");
    let back = decode::<T>(&again).expect("a re-encoded record decodes");
    assert_eq!(
        back.state, record.state,
        "the state changed on a round trip"
    );
    assert_eq!((back.writer, back.kind), (record.writer, record.kind));
    Some(record.state)
}

/// A record of `payload` with a valid header.
pub(crate) fn forge(minor: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&FORMAT_MAJOR.to_le_bytes());
    out.extend_from_slice(&minor.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let crc = Crc::<u64>::new(&CRC_64_XZ);
    let mut digest = crc.digest();
    digest.update(&out);
    digest.update(payload);
    out.extend_from_slice(&digest.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}
