//! The handoff record: what the old keeper of a VM tells the new one. The same record travels
//! by every transport.

use std::path::PathBuf;

use cpr::PreservedFd;
use serde::{Deserialize, Serialize};

use super::UpdateHistory;
use crate::components::PartsState;
use crate::config::VmConfig;
use crate::runtime::Counters;
use crate::state::VmState;

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
    /// The process that ran the guest.
    pub from_pid: u32,
    /// `exec` or `transfer`.
    pub mode: String,
    /// The reports of this update's earlier legs: a cpr-exec through a stand-in hands the VM
    /// to the stand-in, then from it to the new image.
    pub earlier: Vec<super::UpdateReport>,
}

impl InFlight {
    /// The phases of this update, once the new keeper got the record at `handed_over_ns`
    /// and restored and resumed the guest in `restore_ms` and `resume_ms`.
    pub fn phases(&self, handed_over_ns: u64, restore_ms: f64, resume_ms: f64) -> super::Phases {
        super::Phases {
            pause: self.pause_ms,
            save: self.save_ms,
            exec: handed_over_ns.saturating_sub(self.saved_at_ns) as f64 / 1e6,
            restore: restore_ms,
            resume: resume_ms,
        }
    }
}

/// What the VMM keeps about itself, as the record carries it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BookkeepingState {
    /// The argv the VM was started with (the default for later updates, and what a rollback
    /// starts the previous binary with).
    pub argv: Vec<String>,
    /// Wall-clock ns when the VM booted (for uptime).
    pub booted_at_ns: u64,
    /// Counters for `vm.info`.
    pub counters: Counters,
    /// Earlier updates.
    pub history: UpdateHistory,
}

impl BookkeepingState {
    /// The bookkeeping of the process that takes the VM over: this binary, the VM's argv,
    /// boot time, counters and history.
    pub fn taken_over(&self) -> crate::runtime::Bookkeeping {
        self.taken_over_by(crate::runtime::Identity::current())
    }

    /// As [`Self::taken_over`], with this process's identity found beforehand (`me`).
    pub fn taken_over_by(&self, me: crate::runtime::Identity) -> crate::runtime::Bookkeeping {
        crate::runtime::Bookkeeping {
            counters: self.counters.clone(),
            identity: crate::runtime::Identity {
                argv: self.argv.clone(),
                booted_at_ns: self.booted_at_ns,
                ..me
            },
            history: self.history.clone(),
        }
    }
}

/// Everything the new keeper needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Handoff {
    /// The KVM machine: vCPUs, VM-wide state, device models.
    pub vm: VmState,
    /// How the VM was configured (the record describes the VM, never the new command line).
    pub config: VmConfig,
    /// Every other part's state.
    pub parts: PartsState,
    /// The fds the parts declared, by role.
    pub fds: Vec<PreservedFd>,
    /// Counters, history, identity.
    #[serde(default)]
    pub book: BookkeepingState,
    /// The update in flight.
    pub update: InFlight,
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

/// The argv the VM was started with, read from an encoded record (to start the previous
/// binary with the same command line on a rollback).
pub fn record_argv(bytes: &[u8]) -> Option<Vec<String>> {
    let argv = cpr::decode_kind::<Handoff>(bytes, super::HANDOFF_KIND)
        .ok()?
        .state
        .book
        .argv;
    (!argv.is_empty()).then_some(argv)
}
