//! State records: any record with any JSON state ([`record`]), and the two molt reads at a
//! restore, the handoff record after exec or transfer and a snapshot's `state.molt`
//! ([`state`]).

use cpr::{decode, decode_kind, encode, FORMAT_MAJOR, MAGIC};
use crc::{Crc, CRC_64_XZ};
use serde_json::Value;
use vmm::snapshot::{Snapshot, SNAPSHOT_KIND};
use vmm::update::handoff::Handoff;
use vmm::update::HANDOFF_KIND;

/// The first byte chooses how the rest is read: even, as a whole record (magic, version,
/// length and checksum included); odd, as the payload of a record whose header is forged to
/// be valid (minor version `byte >> 1`), so that mutations reach the JSON behind the checksum.
fn bytes_of(data: &[u8]) -> Option<Vec<u8>> {
    let (&mode, rest) = data.split_first()?;
    Some(if mode & 1 == 0 {
        rest.to_vec()
    } else {
        forge(u16::from(mode >> 1), rest)
    })
}

/// Any record, its state read as any JSON value (see [`bytes_of`] for the first byte).
pub fn record(data: &[u8]) {
    if let Some(bytes) = bytes_of(data) {
        round_trip::<Value>(&bytes, None);
    }
}

/// A record read as a snapshot's and as a handoff's state (see [`bytes_of`] for the first
/// byte). What a restore checks first must hold up to anything a decoded record holds.
pub fn state(data: &[u8]) {
    let Some(bytes) = bytes_of(data) else {
        return;
    };
    if let Some(snap) = round_trip::<Snapshot>(&bytes, Some(SNAPSHOT_KIND)) {
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
    T: serde::Serialize + serde::de::DeserializeOwned,
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
    let (was, is) = (json(&record.state), json(&back.state));
    assert!(
        same(&was, &is),
        "the state changed on a round trip: {was} became {is}"
    );
    assert_eq!((back.writer, back.kind), (record.writer, record.kind));
    Some(record.state)
}

fn json<T: serde::Serialize>(state: &T) -> Value {
    serde_json::to_value(state).expect("a decoded state converts to JSON")
}

/// Equal, except that floats may differ in their last bits: serde_json (without its
/// `float_roundtrip` feature) may read a decimal as a neighbour of the nearest f64, and
/// the number it then writes reads back as the nearest one.
pub(crate) fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (
                x.as_f64().unwrap_or(f64::NAN),
                y.as_f64().unwrap_or(f64::NAN),
            );
            x == y || (x - y).abs() <= x.abs().max(y.abs()) * 1e-15
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
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
