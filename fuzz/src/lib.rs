//! molt's fuzz targets: each parser of input molt does not control (state records and
//! snapshot manifests read from disk or a peer, transfer messages, HTTP requests on the API
//! socket, virtio rings written by the guest, command-line options) behind one function of
//! bytes. A target panics only when a property fails: a parser panicked, or accepted
//! something it must refuse, or did not give back what was encoded.
//!
//! The AFL harness (`fuzz/afl`, built with cargo-afl) runs these under coverage guidance;
//! `cargo test -p molt-fuzz` runs every saved input in `fuzz/regressions/TARGET/` and a
//! bounded run of random inputs. docs/fuzz/README.md has the long run and its results.

mod http;
mod manifest;
mod options;
mod record;
mod transfer;
mod virtio;

pub use http::http;
pub use manifest::manifest;
pub use options::options;
pub use record::{record, state};
pub use transfer::transfer;
pub use virtio::virtio;

/// A fuzz target: a function of arbitrary bytes that panics only on a broken property.
pub type Target = fn(&[u8]);

/// Every target by name (the name of its AFL binary and of its regression folder).
pub const TARGETS: &[(&str, Target)] = &[
    ("record", record),
    ("state", state),
    ("manifest", manifest),
    ("transfer", transfer),
    ("http", http),
    ("options", options),
    ("virtio", virtio),
];
