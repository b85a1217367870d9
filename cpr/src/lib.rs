//! Checkpoint/restore across `execve` for molt's live update.
//!
//! Guest RAM stays in memfds that the new binary inherits; everything else
//! (vCPU and device state, which fd is which) travels in a small versioned
//! *state record*:
//!
//! ```text
//! offset  size  field
//!      0     8  magic b"MOLTCPR\0"
//!      8     2  format major version, u16 LE  (a different major is refused)
//!     10     2  format minor version, u16 LE  (any minor is accepted)
//!     12     8  payload length, u64 LE
//!     20     8  CRC-64/XZ over bytes 0..20 and the payload, u64 LE
//!     28     …  payload: JSON {"writer": "molt 0.1.0", "kind": "vm-state", "state": {…}}
//! ```
//!
//! The JSON state ignores unknown fields and callers give added fields
//! `#[serde(default)]`, so additive changes (minor bumps) read both ways.
//!
//! - [`record`]: [`encode`] / [`decode`] / [`decode_kind`] / [`peek_header`].
//! - [`memfd`]: [`write_sealed`] puts a record in a sealed memfd,
//!   [`read_record`] reads it back from an inherited fd.
//! - [`fds`]: [`FdRegistry`] names the fds to keep across `execve` and
//!   clears and restores their close-on-exec flags; [`inherit`]: the other
//!   side, [`Inherited`], hands them out by name.
//! - [`transport`]: the seam between a capture and how it travels; [`exec`]
//!   is the exec transport's environment contract and exec calls,
//!   [`fdpass`] passes fds over a unix socket; [`commit`] is the crash-safe
//!   commit point every fallback checks; [`snapshot`] is the on-disk layout
//!   of a snapshot (state record plus sparse, checksummed memory files).

pub mod commit;
pub mod exec;
pub mod fdpass;
pub mod fds;
pub mod inherit;
pub mod memfd;
pub mod record;
pub mod snapshot;
pub mod transfer;
pub mod transport;

pub use commit::CommitPage;
pub use exec::{ExecEnv, ExecError, GuardianEnv, StandInEnv};
pub use fds::{is_cloexec, open_fds, FdError, FdRegistry, PreservedFd};
pub use inherit::Inherited;
pub use memfd::{is_sealed, read_record, seals, write_sealed, MemfdError};
pub use record::{
    decode, decode_kind, encode, peek_header, Header, Record, RecordError, FORMAT_MAJOR,
    FORMAT_MINOR, HEADER_LEN, MAGIC, MAX_RECORD_LEN,
};
pub use transport::{Received, ReceivedFds, Transport};
