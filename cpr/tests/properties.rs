//! Property tests (fuzzing without coverage guidance) of what cpr decodes from bytes it did
//! not write: state records, transfer message heads and snapshot memory-file descriptions.
//!
//! Each property runs `PROPTEST_CASES` cases (256 by default, a bounded smoke run in
//! `cargo test`); the long run is documented in docs/fuzz/README.md.

use std::collections::BTreeMap;

use cpr::snapshot::{MemoryFile, CHUNK_SIZE};
use cpr::transfer::{decode_head, encode_head, Head, Message, TransferError, MAX_PAYLOAD};
use cpr::{decode, decode_kind, encode, RecordError, FORMAT_MAJOR, HEADER_LEN, MAGIC};
use crc::{Crc, CRC_64_XZ};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

/// A state with the shapes molt's records carry: numbers, strings, bytes, options, maps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct State {
    counter: u64,
    signed: i64,
    name: String,
    bytes: Vec<u8>,
    maybe: Option<u32>,
    regs: BTreeMap<String, u64>,
    nested: Vec<(u16, bool)>,
}

fn state() -> impl Strategy<Value = State> {
    (
        any::<u64>(),
        any::<i64>(),
        ".{0,24}",
        proptest::collection::vec(any::<u8>(), 0..64),
        any::<Option<u32>>(),
        proptest::collection::btree_map("[a-z_]{1,8}", any::<u64>(), 0..6),
        proptest::collection::vec(any::<(u16, bool)>(), 0..8),
    )
        .prop_map(
            |(counter, signed, name, bytes, maybe, regs, nested)| State {
                counter,
                signed,
                name,
                bytes,
                maybe,
                regs,
                nested,
            },
        )
}

/// Any JSON value, a few levels deep.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        ".{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(".{0,6}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A record whose header is valid for `payload` (magic, version, length, checksum): what an
/// attacker who knows the format can forge; only the payload is left to be refused.
fn forge(minor: u16, payload: &[u8]) -> Vec<u8> {
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

fn has_float(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Number(n) => n.is_f64(),
        serde_json::Value::Array(a) => a.iter().any(has_float),
        serde_json::Value::Object(o) => o.values().any(has_float),
        _ => false,
    }
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        ".{0,20}".prop_map(|writer| Message::Hello { writer }),
        json().prop_map(|machine| Message::Prepare { machine }),
        Just(Message::Ready),
        Just(Message::Handoff),
        any::<u32>().prop_map(|pid| Message::Committed { pid }),
        ".{0,40}".prop_map(|reason| Message::Refused { reason }),
    ]
}

proptest! {
    #[test]
    fn records_round_trip(
        s in state(),
        writer in ".{0,16}",
        kind in "[a-z-]{1,12}",
    ) {
        let bytes = encode(&writer, &kind, &s).unwrap();
        let back = decode_kind::<State>(&bytes, &kind).unwrap();
        prop_assert_eq!(back.state, s);
        prop_assert_eq!(back.writer, writer);
        prop_assert_eq!(back.kind, kind);
        prop_assert_eq!(back.version, (FORMAT_MAJOR, cpr::FORMAT_MINOR));
    }

    #[test]
    fn truncated_records_are_refused(s in state(), cut in any::<prop::sample::Index>()) {
        let bytes = encode("w", "k", &s).unwrap();
        let cut = cut.index(bytes.len());
        let err = decode::<State>(&bytes[..cut]).unwrap_err();
        if cut < HEADER_LEN {
            let truncated = matches!(err, RecordError::Truncated { got } if got == cut);
            prop_assert!(truncated, "{:?}", err);
        } else {
            prop_assert!(matches!(err, RecordError::LengthMismatch { .. }), "{err:?}");
        }
    }

    #[test]
    fn any_corrupted_byte_is_refused(
        s in state(),
        at in any::<prop::sample::Index>(),
        xor in 1..=255u8,
    ) {
        let mut bytes = encode("w", "k", &s).unwrap();
        let at = at.index(bytes.len());
        bytes[at] ^= xor;
        prop_assert!(decode::<State>(&bytes).is_err(), "byte {} ^ {:#x} went unnoticed", at, xor);
    }

    #[test]
    fn arbitrary_bytes_are_refused_without_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        magic in any::<bool>(),
    ) {
        let mut bytes = bytes;
        if magic && bytes.len() >= MAGIC.len() {
            bytes[..MAGIC.len()].copy_from_slice(&MAGIC);
        }
        prop_assert!(decode::<serde_json::Value>(&bytes).is_err());
    }

    #[test]
    fn forged_headers_over_arbitrary_payloads_never_panic(
        payload in proptest::collection::vec(any::<u8>(), 0..256),
        minor in any::<u16>(),
    ) {
        let bytes = forge(minor, &payload);
        // Random bytes are not a JSON envelope; whatever they are, the answer is an error.
        prop_assert!(matches!(
            decode::<State>(&bytes),
            Err(RecordError::Envelope(_))
        ));
    }

    #[test]
    fn forged_envelopes_decode_only_matching_states(
        state in json(),
        writer in json(),
        kind in json(),
        minor in any::<u16>(),
    ) {
        let payload = serde_json::json!({"writer": writer, "kind": kind, "state": state});
        let bytes = forge(minor, payload.to_string().as_bytes());
        match decode::<State>(&bytes) {
            Ok(r) => prop_assert_eq!(r.version, (FORMAT_MAJOR, minor)),
            Err(RecordError::Envelope(_)) => {
                prop_assert!(!(writer.is_string() && kind.is_string()))
            }
            Err(RecordError::State { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected error {e:?}"),
        }
        // Any JSON value is a valid `serde_json::Value` state.
        let r = decode::<serde_json::Value>(&bytes);
        prop_assert_eq!(r.is_ok(), writer.is_string() && kind.is_string());
        if let Ok(r) = r {
            prop_assert_eq!(r.state, state);
        }
    }

    #[test]
    fn transfer_heads_round_trip(
        m in message(),
        fds in proptest::collection::vec("[a-z0-9:]{1,12}", 0..6),
        payload in 0..=MAX_PAYLOAD,
    ) {
        let bytes = encode_head(&m, &fds, payload).unwrap();
        let head = decode_head(&bytes).unwrap();
        prop_assert_eq!(head, Head { message: m, fds, payload });
    }

    #[test]
    fn transfer_heads_from_garbage_are_errors(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        prop_assert!(matches!(decode_head(&bytes), Err(TransferError::Garbage(_))));
    }

    #[test]
    fn corrupted_transfer_heads_never_panic(
        m in message(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        payload in any::<u64>(),
    ) {
        // The head is JSON without a checksum: a changed byte may still decode, but only to
        // a head that passes the same checks.
        let mut bytes = encode_head(&m, &[], payload.min(MAX_PAYLOAD)).unwrap();
        let at = at.index(bytes.len());
        bytes[at] = byte;
        if let Ok(head) = decode_head(&bytes) {
            prop_assert!(head.payload <= MAX_PAYLOAD);
            let again = encode_head(&head.message, &head.fds, head.payload).unwrap();
            let back = decode_head(&again).unwrap();
            // serde_json may read a decimal of more than 17 digits as a neighbour of the
            // nearest f64 (which it then writes and reads back exactly): floats aside, the
            // head is the same.
            if !has_float(&serde_json::to_value(&head.message).unwrap()) {
                prop_assert_eq!(back, head);
            }
        }
        let oversize = encode_head(&m, &[], MAX_PAYLOAD + 1 + payload / 2).unwrap();
        prop_assert!(matches!(decode_head(&oversize), Err(TransferError::Garbage(_))));
    }

    #[test]
    fn consistent_memory_files_have_chunks_a_reader_can_load(
        size in prop_oneof![0..(64u64 << 20), 0..(1u64 << 40)],
        pages in 0..1024u64,
        extra in -1..=1i64,
        file in prop_oneof![Just("ram0.mem".to_string()), "[a-z0-9./]{0,10}"],
    ) {
        let chunk_size = pages * 4096;
        let count = MemoryFile::chunk_count(size, chunk_size);
        // Only build the entry list when it is small; a huge one is never consistent anyway.
        let len = (count as i64 + extra).clamp(0, 4096) as usize;
        let desc = MemoryFile {
            file,
            size,
            chunk_size,
            chunks: vec![Some(0); len],
            data_bytes: 0,
        };
        if desc.is_consistent() {
            prop_assert!(cpr::snapshot::is_snapshot_file(&desc.file));
            let mut next = 0;
            for i in 0..desc.chunks.len() {
                let (start, end) = desc.chunk_range(i);
                prop_assert_eq!(start, next);
                prop_assert!(start < end && end <= size);
                prop_assert!(end - start <= CHUNK_SIZE);
                next = end;
            }
            prop_assert_eq!(next, size);
        }
    }

    #[test]
    fn memory_file_descriptions_from_any_json_never_panic(v in json()) {
        if let Ok(desc) = serde_json::from_value::<MemoryFile>(v) {
            if desc.is_consistent() {
                let last = desc.chunks.len().saturating_sub(1);
                let (start, end) = desc.chunk_range(last);
                prop_assert!(start <= end && end <= desc.size);
            }
        }
    }
}
