use super::*;
use crc::{Crc, CRC_64_XZ};

const WRITER: &str = "molt 0.1.0";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Vcpu {
    id: u32,
    rip: u64,
    regs: Vec<u64>,
    name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct VmState {
    mem_size: u64,
    vcpus: Vec<Vcpu>,
    serial_path: Option<String>,
    blob: Vec<u8>,
    note: String,
}

fn sample() -> VmState {
    VmState {
        mem_size: 512 << 20,
        vcpus: vec![
            Vcpu {
                id: 0,
                rip: u64::MAX,
                regs: vec![1, 2, 3, u64::MAX - 1],
                name: Some("boot \"cpu\" ☃".into()),
            },
            Vcpu {
                id: 1,
                rip: 0x1000,
                regs: vec![],
                name: None,
            },
        ],
        serial_path: None,
        blob: (0..4096u32).map(|i| (i * 7 % 251) as u8).collect(),
        note: String::new(),
    }
}

fn encoded() -> Vec<u8> {
    match encode(WRITER, "vm-state", &sample()) {
        Ok(bytes) => bytes,
        Err(e) => panic!("encode failed: {e}"),
    }
}

#[test]
fn round_trip_nested_struct() {
    let bytes = encoded();
    let record: Record<VmState> = decode_kind(&bytes, "vm-state").expect("decode");
    assert_eq!(record.version, (FORMAT_MAJOR, FORMAT_MINOR));
    assert_eq!(record.writer, WRITER);
    assert_eq!(record.kind, "vm-state");
    assert_eq!(record.state, sample());
}

#[test]
fn header_layout_is_as_documented() {
    let bytes = encoded();
    assert_eq!(&bytes[..8], b"MOLTCPR\0");
    assert_eq!(&bytes[8..10], &FORMAT_MAJOR.to_le_bytes());
    assert_eq!(&bytes[10..12], &FORMAT_MINOR.to_le_bytes());
    let header = peek_header(&bytes).expect("peek");
    assert!(header.has_valid_magic());
    assert_eq!(header.payload_len as usize, bytes.len() - HEADER_LEN);
    let crc = Crc::<u64>::new(&CRC_64_XZ);
    let mut digest = crc.digest();
    digest.update(&bytes[..20]);
    digest.update(&bytes[HEADER_LEN..]);
    assert_eq!(header.checksum, digest.finalize());
    // The payload is the documented JSON envelope.
    let json: serde_json::Value = serde_json::from_slice(&bytes[HEADER_LEN..]).expect("json");
    assert_eq!(json["writer"], WRITER);
    assert_eq!(json["kind"], "vm-state");
    assert_eq!(json["state"]["mem_size"], 512u64 << 20);
}

#[test]
fn every_flipped_byte_is_rejected() {
    let bytes = encoded();
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0xff;
        let result = decode::<VmState>(&bad);
        assert!(result.is_err(), "flipping byte {i} went unnoticed");
    }
}

#[test]
fn every_single_bit_flip_in_header_is_rejected() {
    let bytes = encoded();
    for i in 0..HEADER_LEN {
        for bit in 0..8 {
            let mut bad = bytes.clone();
            bad[i] ^= 1 << bit;
            assert!(decode::<VmState>(&bad).is_err(), "byte {i} bit {bit}");
        }
    }
}

#[test]
fn every_truncation_is_rejected() {
    let bytes = encoded();
    for len in 0..bytes.len() {
        let err = decode::<VmState>(&bytes[..len]).expect_err("truncated record decoded");
        if len < HEADER_LEN {
            assert!(matches!(err, RecordError::Truncated { got } if got == len));
        } else {
            assert!(matches!(err, RecordError::LengthMismatch { .. }), "{err}");
        }
    }
}

#[test]
fn empty_input_names_header_size() {
    let err = decode::<VmState>(&[1, 2, 3, 4, 5]).expect_err("decoded garbage");
    assert_eq!(
        err.to_string(),
        "record truncated: header needs 28 bytes, got 5"
    );
    assert!(peek_header(&[]).is_err());
}

#[test]
fn trailing_bytes_are_a_length_mismatch() {
    let mut bytes = encoded();
    bytes.push(0);
    let err = decode::<VmState>(&bytes).expect_err("decoded");
    assert!(
        matches!(err, RecordError::LengthMismatch { actual, declared }
        if actual as u64 == declared + 1)
    );
}

#[test]
fn wrong_magic_is_reported() {
    let mut bytes = encoded();
    bytes[..8].copy_from_slice(b"NOTMOLT!");
    let err = decode::<VmState>(&bytes).expect_err("decoded");
    assert!(matches!(err, RecordError::BadMagic { found } if &found == b"NOTMOLT!"));
    let header = peek_header(&bytes).expect("peek still reports");
    assert!(!header.has_valid_magic());
}

#[test]
fn future_major_is_refused() {
    let bytes = encode_versioned((9, 0), WRITER, "vm-state", &sample()).expect("encode");
    let err = decode::<VmState>(&bytes).expect_err("decoded");
    assert!(matches!(
        err,
        RecordError::UnsupportedVersion { major: 9, minor: 0 }
    ));
    assert_eq!(
        err.to_string(),
        "unsupported record version 9.0 (this molt reads major 1)"
    );
    assert_eq!(peek_header(&bytes).expect("peek").version, (9, 0));
}

#[test]
fn older_major_is_refused() {
    let bytes = encode_versioned((0, 7), WRITER, "vm-state", &sample()).expect("encode");
    let err = decode::<VmState>(&bytes).expect_err("decoded");
    assert!(matches!(
        err,
        RecordError::UnsupportedVersion { major: 0, minor: 7 }
    ));
}

#[test]
fn future_minor_decodes() {
    let version = (FORMAT_MAJOR, FORMAT_MINOR + 3);
    let bytes = encode_versioned(version, "molt 0.2.0", "vm-state", &sample()).expect("encode");
    let record: Record<VmState> = decode(&bytes).expect("decode");
    assert_eq!(record.version, version);
    assert_eq!(record.writer, "molt 0.2.0");
    assert_eq!(record.state, sample());
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct OldState {
    id: u32,
    name: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct NewState {
    id: u32,
    name: String,
    #[serde(default)]
    extra: Vec<u64>,
}

#[test]
fn newer_writer_with_extra_field_decodes_into_older_struct() {
    let new = NewState {
        id: 4,
        name: "x".into(),
        extra: vec![1, 2],
    };
    let version = (FORMAT_MAJOR, FORMAT_MINOR + 1);
    let bytes = encode_versioned(version, "molt 0.2.0", "vm-state", &new).expect("encode");
    let old: Record<OldState> = decode(&bytes).expect("decode");
    assert_eq!(
        old.state,
        OldState {
            id: 4,
            name: "x".into()
        }
    );
}

#[test]
fn older_writer_missing_defaulted_field_decodes() {
    let old = OldState {
        id: 9,
        name: "y".into(),
    };
    let bytes = encode("molt 0.0.9", "vm-state", &old).expect("encode");
    let new: Record<NewState> = decode(&bytes).expect("decode");
    assert_eq!(new.state.id, 9);
    assert!(new.state.extra.is_empty());
}

#[test]
fn unknown_envelope_fields_are_ignored() {
    let payload = br#"{"writer":"molt 9","kind":"k","added":{"a":1},"state":{"id":1,"name":"n"}}"#;
    let bytes = forge(payload);
    let record: Record<OldState> = decode(&bytes).expect("decode");
    assert_eq!(record.state.id, 1);
}

/// Builds a record around an arbitrary payload with a correct header.
fn forge(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_MAJOR.to_le_bytes());
    out.extend_from_slice(&FORMAT_MINOR.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let crc = checksum(&out, payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

#[test]
fn garbage_json_with_valid_header_is_a_payload_error() {
    for payload in [
        &b"not json at all"[..],
        b"",
        b"{\"writer\":\"w\",\"kind\":",
        b"[1,2,3]",
        b"{\"writer\":\"w\",\"kind\":\"k\"}",
        b"{\"writer\":\"w\",\"kind\":\"k\",\"state\":{}} trailing",
        b"\xff\xfe",
    ] {
        let err = decode::<OldState>(&forge(payload)).expect_err("decoded garbage");
        assert!(
            matches!(err, RecordError::Envelope(_)),
            "{payload:?}: {err}"
        );
    }
}

#[test]
fn wrong_state_shape_is_a_state_error() {
    let bytes = encode(WRITER, "vm-state", &sample()).expect("encode");
    let err = decode::<OldState>(&bytes).expect_err("decoded");
    assert!(
        matches!(&err, RecordError::State { kind, writer, .. } if kind == "vm-state" && writer == WRITER)
    );
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn kind_is_checked_before_state() {
    let bytes = encode(WRITER, "device-state", &sample()).expect("encode");
    let err = decode_kind::<OldState>(&bytes, "vm-state").expect_err("decoded");
    assert!(
        matches!(&err, RecordError::KindMismatch { expected, found } if expected == "vm-state" && found == "device-state")
    );
}

#[test]
fn unserializable_state_is_an_encode_error() {
    let mut map = std::collections::HashMap::new();
    map.insert(vec![1u8], 1u8);
    let err = encode(WRITER, "bad", &map).expect_err("encoded");
    assert!(matches!(err, RecordError::Encode { .. }));
}

#[test]
fn envelope_fields_in_any_order_decode_alike() {
    let written = br#"{"writer":"molt 9","kind":"k","state":{"id":1,"name":"n"}}"#;
    let reordered = br#"{"state":{"id":1,"name":"n"},"kind":"k","writer":"molt 9"}"#;
    let a: Record<OldState> = decode_kind(&forge(written), "k").expect("decode");
    let b: Record<OldState> = decode_kind(&forge(reordered), "k").expect("decode");
    assert_eq!(a, b);
    let err = decode_kind::<OldState>(&forge(reordered), "other").expect_err("decoded");
    assert!(matches!(err, RecordError::KindMismatch { .. }), "{err}");
    let dup =
        br#"{"writer":"w","kind":"k","state":{"id":1,"name":"n"},"state":{"id":2,"name":"n"}}"#;
    assert!(matches!(
        decode::<OldState>(&forge(dup)).expect_err("decoded"),
        RecordError::Envelope(_)
    ));
}
