//! The handoff record: what the old image tells the new one.

use std::path::PathBuf;

use cpr::PreservedFd;
use serde::{Deserialize, Serialize};

use super::UpdateHistory;
use crate::config::VmConfig;
use crate::runtime::Counters;
use crate::state::VmState;

/// Fd names in the handoff's registry.
pub mod fd_names {
    /// The previous molt binary (for rollback).
    pub const PREVIOUS_EXE: &str = "previous-exe";
    /// Serial output file (`--serial file=`).
    pub const SERIAL_FILE: &str = "serial-file";
    /// Serial socket listener (`--serial socket=`).
    pub const SERIAL_LISTENER: &str = "serial-listener";
    /// Serial socket client, when one is attached.
    pub const SERIAL_CLIENT: &str = "serial-client";
    /// API listening socket.
    pub const API_LISTENER: &str = "api-listener";
    /// Prefix of API client connections (`api-conn-<id>`).
    pub const API_CONN_PREFIX: &str = "api-conn-";
    /// Backing file (disk image or tap) of virtio device `i`.
    pub fn virtio(i: usize) -> String {
        format!("virtio{i}")
    }
    /// Guest RAM memfd `i` is `ram<i>`.
    pub fn ram(i: usize) -> String {
        format!("ram{i}")
    }
}

/// An API connection carried across the update.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiConnHandoff {
    /// Connection id (continues in the new image).
    pub id: u64,
    /// Fd name in the registry.
    pub fd: String,
    /// Bytes received but not yet processed.
    #[serde(default)]
    pub unread: Vec<u8>,
}

/// The API server's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiHandoff {
    /// Socket path (kept in place throughout).
    pub path: PathBuf,
    /// The connection whose `vm.cpr-exec` request the new image answers.
    pub waiting: Option<ApiConnHandoff>,
    /// Other open connections.
    #[serde(default)]
    pub others: Vec<ApiConnHandoff>,
    /// Next connection id.
    #[serde(default)]
    pub next_id: u64,
}

/// The update in flight.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InFlight {
    /// Version of the old image.
    pub from_version: String,
    /// Binary being executed.
    pub target: PathBuf,
    /// The old image's binary (for the report on rollback).
    pub previous: PathBuf,
    /// Wall-clock ns when the pause began.
    pub paused_at_ns: u64,
    /// Pause phase, ms.
    pub pause_ms: f64,
    /// Save phase, ms.
    pub save_ms: f64,
    /// Wall-clock ns at the end of the save phase (the exec phase runs from there to the new
    /// image's `main`).
    pub saved_at_ns: u64,
    /// The guest was paused by a user before the update (stay paused after it).
    pub was_paused: bool,
    /// virtio requests queued but not yet taken at the pause.
    pub carried_requests: u64,
}

/// Everything the new image needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Handoff {
    /// The VM.
    pub vm: VmState,
    /// How the VM was configured (the record describes the VM, never the new command line).
    pub config: VmConfig,
    /// The argv the VM was started with (default for later updates).
    pub argv: Vec<String>,
    /// Preserved fds by name.
    pub fds: Vec<PreservedFd>,
    /// API server, if one runs.
    pub api: Option<ApiHandoff>,
    /// The update in flight.
    pub update: InFlight,
    /// Earlier updates.
    #[serde(default)]
    pub history: UpdateHistory,
    /// Counters for `vm.info`.
    #[serde(default)]
    pub counters: Counters,
    /// Wall-clock ns when the VM booted (for uptime).
    #[serde(default)]
    pub booted_at_ns: u64,
    /// A field only the tests' "next version" build knows: older images ignore it, and it
    /// takes its default when that build reads an older image's record.
    #[cfg(feature = "test-next")]
    #[serde(default)]
    pub next_only: NextOnly,
}

/// The "next version" build's extra state.
#[cfg(feature = "test-next")]
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NextOnly {
    /// Who wrote the record, as that build sees it.
    pub writer: String,
}

impl Handoff {
    /// The fd number registered under `name`.
    pub fn fd(&self, name: &str) -> Option<i32> {
        self.fds.iter().find(|f| f.name == name).map(|f| f.fd)
    }
}
