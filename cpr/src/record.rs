//! The versioned state record: a fixed binary header followed by a JSON
//! envelope carrying the caller's state.
//!
//! # Layout
//!
//! All integers are little-endian. The header is [`HEADER_LEN`] (28) bytes:
//!
//! | offset | size | field                                              |
//! |-------:|-----:|----------------------------------------------------|
//! | 0      | 8    | magic, [`MAGIC`] = `b"MOLTCPR\0"`                  |
//! | 8      | 2    | format major version ([`FORMAT_MAJOR`])            |
//! | 10     | 2    | format minor version ([`FORMAT_MINOR`])            |
//! | 12     | 8    | payload length in bytes                            |
//! | 20     | 8    | CRC-64/XZ of header bytes `0..20` then the payload |
//!
//! The checksum covers the first 20 header bytes as well as the payload, so
//! that a corrupted version or length field is caught too (a flipped minor
//! version would otherwise decode silently).
//!
//! The payload is a JSON object `{"writer": .., "kind": .., "state": ..}`.
//! Unknown fields are ignored and callers mark added fields
//! `#[serde(default)]`, so additive changes are readable in both directions.
//! Such changes bump the *minor* version, which readers accept; a different
//! *major* version is refused.

use std::marker::PhantomData;

use serde::de::{self, DeserializeOwned, DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

/// Magic bytes opening every record. Never changes; versions live in the
/// fields after it.
pub const MAGIC: [u8; 8] = *b"MOLTCPR\0";
/// Major format version written by this build; the only one it reads.
pub const FORMAT_MAJOR: u16 = 1;
/// Minor format version written by this build; any minor is readable.
pub const FORMAT_MINOR: u16 = 0;
/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 28;
/// Largest whole record (header and payload) written or read, 64 MiB.
pub const MAX_RECORD_LEN: usize = 64 << 20;

/// Header bytes covered by the checksum (everything before it).
const CHECKSUMMED_HEADER: usize = 20;

/// Why a record could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Fewer bytes than a header.
    #[error("record truncated: header needs {HEADER_LEN} bytes, got {got}")]
    Truncated {
        /// Bytes available.
        got: usize,
    },
    /// The first eight bytes are not [`MAGIC`].
    #[error("not a molt state record: magic is {found:02x?}, expected {MAGIC:02x?}")]
    BadMagic {
        /// The magic found.
        found: [u8; 8],
    },
    /// The major version is not [`FORMAT_MAJOR`].
    #[error("unsupported record version {major}.{minor} (this molt reads major {FORMAT_MAJOR})")]
    UnsupportedVersion {
        /// Major version found.
        major: u16,
        /// Minor version found.
        minor: u16,
    },
    /// The header's payload length disagrees with the bytes present.
    #[error(
        "record length mismatch: header declares {declared} payload bytes, record has {actual}"
    )]
    LengthMismatch {
        /// Payload length the header declares.
        declared: u64,
        /// Payload bytes actually present.
        actual: usize,
    },
    /// The record would exceed [`MAX_RECORD_LEN`].
    #[error("record too large: {len} bytes, limit is {MAX_RECORD_LEN}")]
    TooLarge {
        /// Size of the whole record.
        len: usize,
    },
    /// The checksum does not match the header and payload.
    #[error("checksum mismatch: header says {expected:#018x}, record has {actual:#018x}")]
    ChecksumMismatch {
        /// Checksum stored in the header.
        expected: u64,
        /// Checksum computed over the record.
        actual: u64,
    },
    /// The payload is not a JSON envelope with `writer`, `kind` and `state`.
    #[error("record payload is not a valid envelope")]
    Envelope(#[source] serde_json::Error),
    /// The record is of another kind than the caller expects.
    #[error("record kind mismatch: expected {expected:?}, found {found:?}")]
    KindMismatch {
        /// Kind the caller asked for.
        expected: String,
        /// Kind the record carries.
        found: String,
    },
    /// The envelope is fine but `state` does not have the expected shape.
    #[error("state of {kind:?} record written by {writer:?} does not fit the expected type")]
    State {
        /// Kind the record carries.
        kind: String,
        /// Writer the record names.
        writer: String,
        /// What serde rejected.
        #[source]
        source: serde_json::Error,
    },
    /// The state could not be serialized.
    #[error("cannot serialize state of {kind:?} record")]
    Encode {
        /// Kind being written.
        kind: String,
        /// What serde rejected.
        #[source]
        source: serde_json::Error,
    },
}

/// The fixed header of a record, as read by [`peek_header`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The first eight bytes; [`MAGIC`] for a molt record.
    pub magic: [u8; 8],
    /// Format version as `(major, minor)`.
    pub version: (u16, u16),
    /// Declared payload length in bytes.
    pub payload_len: u64,
    /// Stored CRC-64/XZ of header bytes `0..20` and the payload.
    pub checksum: u64,
}

impl Header {
    /// Whether the magic is [`MAGIC`].
    pub fn has_valid_magic(&self) -> bool {
        self.magic == MAGIC
    }
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<T> {
    /// Format version the record was written with, `(major, minor)`.
    pub version: (u16, u16),
    /// Writer version string, e.g. `"molt 0.1.0"`.
    pub writer: String,
    /// What the state is, e.g. `"vm-state"`.
    pub kind: String,
    /// The caller's state.
    pub state: T,
}

#[derive(Serialize)]
struct EnvelopeOut<'a, T: ?Sized> {
    writer: &'a str,
    kind: &'a str,
    state: &'a T,
}

#[derive(Deserialize)]
struct EnvelopeIn<'a> {
    writer: String,
    kind: String,
    #[serde(borrow)]
    state: &'a RawValue,
}

/// Encodes `state` as a record of `kind` written by `writer` (e.g.
/// `"molt 0.1.0"`), at the current format version.
pub fn encode<T: Serialize + ?Sized>(
    writer: &str,
    kind: &str,
    state: &T,
) -> Result<Vec<u8>, RecordError> {
    encode_versioned((FORMAT_MAJOR, FORMAT_MINOR), writer, kind, state)
}

/// Encodes with an explicit format version; lets tests forge records from
/// other versions.
pub(crate) fn encode_versioned<T: Serialize + ?Sized>(
    version: (u16, u16),
    writer: &str,
    kind: &str,
    state: &T,
) -> Result<Vec<u8>, RecordError> {
    let envelope = EnvelopeOut {
        writer,
        kind,
        state,
    };
    let payload = serde_json::to_vec(&envelope).map_err(|source| RecordError::Encode {
        kind: kind.to_owned(),
        source,
    })?;
    let len = HEADER_LEN.saturating_add(payload.len());
    if len > MAX_RECORD_LEN {
        return Err(RecordError::TooLarge { len });
    }
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.0.to_le_bytes());
    out.extend_from_slice(&version.1.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let crc = checksum(&out, &payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&payload);
    log::debug!(
        "encoded {kind:?} record: {} payload bytes, version {}.{}",
        payload.len(),
        version.0,
        version.1
    );
    Ok(out)
}

/// Reads the header without checking anything but its presence: the magic,
/// version and length are reported as found.
pub fn peek_header(bytes: &[u8]) -> Result<Header, RecordError> {
    let Some(header) = bytes.first_chunk::<HEADER_LEN>() else {
        return Err(RecordError::Truncated { got: bytes.len() });
    };
    Ok(Header {
        magic: field(header, 0),
        version: (
            u16::from_le_bytes(field(header, 8)),
            u16::from_le_bytes(field(header, 10)),
        ),
        payload_len: u64::from_le_bytes(field(header, 12)),
        checksum: u64::from_le_bytes(field(header, 20)),
    })
}

/// Decodes a record of any kind.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<Record<T>, RecordError> {
    decode_inner(bytes, None)
}

/// Decodes a record, refusing it unless its kind is `expected_kind`. The
/// kind is checked before the state is parsed.
pub fn decode_kind<T: DeserializeOwned>(
    bytes: &[u8],
    expected_kind: &str,
) -> Result<Record<T>, RecordError> {
    decode_inner(bytes, Some(expected_kind))
}

fn decode_inner<T: DeserializeOwned>(
    bytes: &[u8],
    expected_kind: Option<&str>,
) -> Result<Record<T>, RecordError> {
    let (header, payload) = verify(bytes)?;
    // One pass over the payload when it is as this module writes it (the state after the
    // kind, which matches); anything else takes the two-pass path, whose errors say what is
    // wrong.
    let mut de = serde_json::Deserializer::from_slice(payload);
    let fast = OnePass::<T> {
        expected_kind,
        state: PhantomData,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v));
    match fast {
        Ok((writer, kind, state)) => Ok(record(header, writer, kind, state)),
        Err(_) => decode_two_pass(header, payload, expected_kind),
    }
}

/// Decodes the envelope with the state kept raw, checks the kind, then decodes the state.
fn decode_two_pass<T: DeserializeOwned>(
    header: Header,
    payload: &[u8],
    expected_kind: Option<&str>,
) -> Result<Record<T>, RecordError> {
    let envelope: EnvelopeIn<'_> =
        serde_json::from_slice(payload).map_err(RecordError::Envelope)?;
    if let Some(expected) = expected_kind {
        if envelope.kind != expected {
            return Err(RecordError::KindMismatch {
                expected: expected.to_owned(),
                found: envelope.kind,
            });
        }
    }
    let state = match serde_json::from_str(envelope.state.get()) {
        Ok(state) => state,
        Err(source) => {
            return Err(RecordError::State {
                kind: envelope.kind,
                writer: envelope.writer,
                source,
            })
        }
    };
    Ok(record(header, envelope.writer, envelope.kind, state))
}

fn record<T>(header: Header, writer: String, kind: String, state: T) -> Record<T> {
    if header.version.1 != FORMAT_MINOR {
        log::info!(
            "reading record version {}.{} written by {:?} (this molt writes {FORMAT_MAJOR}.{FORMAT_MINOR})",
            header.version.0,
            header.version.1,
            writer
        );
    }
    Record {
        version: header.version,
        writer,
        kind,
        state,
    }
}

/// The envelope in one pass: `writer`, `kind`, then `state` parsed straight into `T` once
/// the kind is known to match. Fails (for the two-pass path to explain) on anything else.
struct OnePass<'k, T> {
    expected_kind: Option<&'k str>,
    state: PhantomData<T>,
}

impl<'de, T: DeserializeOwned> DeserializeSeed<'de> for OnePass<'_, T> {
    type Value = (String, String, T);

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: DeserializeOwned> Visitor<'de> for OnePass<'_, T> {
    type Value = (String, String, T);

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a record envelope")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut writer, mut kind, mut state) = (None, None, None);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "writer" if writer.is_none() => writer = Some(map.next_value::<String>()?),
                "kind" if kind.is_none() => kind = Some(map.next_value::<String>()?),
                "state" if state.is_none() => {
                    let found = kind.as_deref();
                    if found.is_none() || self.expected_kind.is_some_and(|k| Some(k) != found) {
                        return Err(de::Error::custom("kind unknown or unexpected"));
                    }
                    state = Some(map.next_value::<T>()?);
                }
                "writer" | "kind" | "state" => return Err(de::Error::custom("duplicate field")),
                _ => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        match (writer, kind, state) {
            (Some(w), Some(k), Some(s)) => Ok((w, k, s)),
            _ => Err(de::Error::custom("missing field")),
        }
    }
}

/// Checks magic, version, length and checksum; returns the header and the
/// payload bytes.
fn verify(bytes: &[u8]) -> Result<(Header, &[u8]), RecordError> {
    let header = peek_header(bytes)?;
    if !header.has_valid_magic() {
        return Err(RecordError::BadMagic {
            found: header.magic,
        });
    }
    let (major, minor) = header.version;
    if major != FORMAT_MAJOR {
        return Err(RecordError::UnsupportedVersion { major, minor });
    }
    let (head, payload) = bytes.split_at(HEADER_LEN);
    if u64::try_from(payload.len()).ok() != Some(header.payload_len) {
        return Err(RecordError::LengthMismatch {
            declared: header.payload_len,
            actual: payload.len(),
        });
    }
    let actual = checksum(&head[..CHECKSUMMED_HEADER], payload);
    if actual != header.checksum {
        return Err(RecordError::ChecksumMismatch {
            expected: header.checksum,
            actual,
        });
    }
    Ok((header, payload))
}

/// CRC-64/XZ of the checksummed header and the payload (`crc64fast`: SIMD where the CPU has
/// carry-less multiplication, ~5× the table-driven speed).
fn checksum(header: &[u8], payload: &[u8]) -> u64 {
    let mut digest = crc64fast::Digest::new();
    digest.write(header);
    digest.write(payload);
    digest.sum64()
}

/// Copies `N` bytes at `at` out of the header; the offsets are constants
/// inside [`HEADER_LEN`], so the zero fallback is never taken.
fn field<const N: usize>(header: &[u8; HEADER_LEN], at: usize) -> [u8; N] {
    let mut out = [0; N];
    if let Some(src) = header.get(at..at + N) {
        out.copy_from_slice(src);
    }
    out
}

#[cfg(test)]
#[path = "record_tests.rs"]
mod tests;
