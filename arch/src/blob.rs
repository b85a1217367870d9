//! Kernel ABI structs in state records: stored as hex strings of their raw bytes.
//!
//! KVM's state structs (`kvm_regs`, `kvm_xsave`, …) are plain integer arrays fixed by the
//! kernel ABI, so their bytes are their meaning. A hex string keeps records compact and
//! quick to encode; decoding accepts a shorter or longer string (zero-filling or ignoring the
//! tail) so a struct that grows in a later kernel still reads.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Visitor};
use serde::{ser, Deserialize, Deserializer, Serialize, Serializer};

/// Plain-old-data: every bit pattern is a valid value and the type has no padding whose
/// contents matter.
///
/// # Safety
/// Implement only for `repr(C)` structs made of integers and arrays of integers.
pub unsafe trait Pod: Sized + 'static {}

macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        // SAFETY: bindgen-generated repr(C) integer structs from the KVM ABI.
        $(unsafe impl Pod for $t {})*
    };
}

pod!(
    kvm_bindings::kvm_regs,
    kvm_bindings::kvm_sregs,
    kvm_bindings::kvm_fpu,
    kvm_bindings::kvm_xsave,
    kvm_bindings::kvm_xcrs,
    kvm_bindings::kvm_lapic_state,
    kvm_bindings::kvm_vcpu_events,
    kvm_bindings::kvm_mp_state,
    kvm_bindings::kvm_debugregs,
    kvm_bindings::kvm_cpuid_entry2,
    kvm_bindings::kvm_irqchip,
    kvm_bindings::kvm_pit_state2,
    kvm_bindings::kvm_clock_data,
);

/// A [`Pod`] value that (de)serializes as a hex string.
pub struct Blob<T: Pod>(pub T);

impl<T: Pod> Clone for Blob<T> {
    fn clone(&self) -> Self {
        Self::from_bytes(self.bytes())
    }
}

impl<T: Pod> Blob<T> {
    fn bytes(&self) -> &[u8] {
        // SAFETY: `T: Pod` has no invalid bit patterns or meaningful padding; the slice covers
        // exactly the value and lives as long as `self`.
        unsafe { std::slice::from_raw_parts((&self.0 as *const T).cast::<u8>(), size_of::<T>()) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; any bit pattern written through the slice is a valid `T`.
        unsafe {
            std::slice::from_raw_parts_mut((&mut self.0 as *mut T).cast::<u8>(), size_of::<T>())
        }
    }

    fn from_bytes(bytes: &[u8]) -> Self {
        // SAFETY: an all-zero `T: Pod` is valid; we then overwrite a prefix of its bytes,
        // which is valid for the same reason.
        unsafe {
            let mut v: T = std::mem::zeroed();
            let n = bytes.len().min(size_of::<T>());
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut v as *mut T).cast::<u8>(), n);
            Blob(v)
        }
    }
}

impl<T: Pod> Default for Blob<T> {
    /// All zeroes.
    fn default() -> Self {
        Self::from_bytes(&[])
    }
}

impl<T: Pod> std::ops::Deref for Blob<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Pod> PartialEq for Blob<T> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

impl<T: Pod> fmt::Debug for Blob<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Blob<{}>({} bytes)",
            std::any::type_name::<T>(),
            size_of::<T>()
        )
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl<T: Pod> Serialize for Blob<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Bytes, then text: hex digits are ASCII (this runs inside a live update's pause).
        // Trailing zero bytes are left out (a reader zero-fills a short string): most of an
        // XSAVE area or a CPUID entry's padding is zeros, and the record stays small.
        let bytes = self.bytes();
        let used = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        let mut out = Vec::with_capacity(used * 2);
        for &b in &bytes[..used] {
            out.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        }
        let text = String::from_utf8(out).map_err(ser::Error::custom)?;
        s.serialize_str(&text)
    }
}

struct HexVisitor<T>(PhantomData<T>);

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl<T: Pod> Visitor<'_> for HexVisitor<T> {
    type Value = Blob<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a hex string of {} bytes", size_of::<T>())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Blob<T>, E> {
        let s = v.as_bytes();
        if s.len() % 2 != 0 {
            return Err(E::custom("odd-length hex string"));
        }
        // Straight into the value: a shorter string zero-fills, a longer one is truncated
        // (after its digits are checked).
        let mut blob = Blob::<T>::default();
        let n = size_of::<T>();
        let bytes = blob.bytes_mut();
        for (i, p) in s.chunks_exact(2).enumerate() {
            let b = nibble(p[0])
                .zip(nibble(p[1]))
                .map(|(hi, lo)| hi << 4 | lo)
                .ok_or_else(|| E::custom("invalid hex digit"))?;
            if i < n {
                bytes[i] = b;
            }
        }
        Ok(blob)
    }
}

impl<'de, T: Pod> Deserialize<'de> for Blob<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(HexVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_regs;

    #[test]
    fn round_trip_and_tolerant_lengths() {
        let regs = kvm_regs {
            rax: 0x1122_3344_5566_7788,
            rip: 0xffff_ffff_8100_0000,
            rflags: 2,
            ..Default::default()
        };
        let json = serde_json::to_string(&Blob(regs)).unwrap();
        assert!(json.starts_with("\"8877665544332211"));
        let back: Blob<kvm_regs> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Blob(regs));
        // Trailing zero bytes are not written: rflags (2) is the last non-zero byte.
        let rflags_end = 2 * (std::mem::offset_of!(kvm_regs, rflags) + 1);
        assert_eq!(json.len(), rflags_end + 2);
        assert_eq!(
            serde_json::to_string(&Blob::<kvm_regs>::default()).unwrap(),
            "\"\""
        );
        let zero: Blob<kvm_regs> = serde_json::from_str("\"\"").unwrap();
        assert_eq!(zero, Blob::default());
        // A shorter record (older, smaller struct) zero-fills; a longer one is truncated.
        let short: Blob<kvm_regs> = serde_json::from_str("\"0100\"").unwrap();
        assert_eq!((short.rax, short.rip), (1, 0));
        let full = format!(
            "{:0<w$}",
            &json[1..json.len() - 1],
            w = 2 * size_of::<kvm_regs>()
        );
        let long = format!("\"{full}00ff");
        let back: Blob<kvm_regs> = serde_json::from_str(&format!("{long}\"")).unwrap();
        assert_eq!(back, Blob(regs));
        assert!(serde_json::from_str::<Blob<kvm_regs>>("\"0g\"").is_err());
        assert!(serde_json::from_str::<Blob<kvm_regs>>("\"012\"").is_err());
    }
}
