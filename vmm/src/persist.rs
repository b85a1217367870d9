//! The contract every part of the VMM that outlives a handoff follows, in the spirit of
//! Firecracker's `Persist` (state + constructor arguments) and Cloud Hypervisor's
//! `Snapshottable`: [`Persist::save`] returns the part's serializable state *and declares the
//! fds it needs kept*, each under a typed [`FdRole`]; [`Persist::restore`] rebuilds the part
//! from that state, the live resources of the new process and the fds it declared.
//!
//! Fds are borrowed while saving (the part keeps owning them) and handed out as owned
//! duplicates when restoring ([`cpr::Inherited`]), so no part ever holds a raw number that
//! another one owns. The parts are listed once, in [`crate::components`].

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::str::FromStr;

use crate::api::ConnId;

/// What a preserved fd is for. Its text form is the name the record gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FdRole {
    /// Guest RAM region `i`'s memfd.
    Ram(usize),
    /// The sealed memfd holding the record itself (exec transport).
    Record,
    /// The previous molt binary, open, for a rollback.
    PreviousExe,
    /// The handoff's commit page.
    Commit,
    /// The serial output file (`--serial file=`).
    SerialFile,
    /// The serial socket's listener (`--serial socket=`).
    SerialListener,
    /// The client attached to the serial socket.
    SerialClient,
    /// The API socket's listener.
    ApiListener,
    /// An open API connection.
    ApiConn(ConnId),
    /// The backend (disk image, tap, vhost-user socket) of virtio device `i`.
    DeviceBacking(usize),
    /// The call eventfd (its irqfd) of vhost-user device `i`.
    VhostCall(usize),
    /// The kick eventfd (ioeventfd) of queue `q` of vhost-user device `i`.
    VhostKick(usize, usize),
    /// The inflight-tracking memory vhost-user device `i`'s backend shares.
    VhostInflight(usize),
}

impl fmt::Display for FdRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FdRole::Ram(i) => write!(f, "ram{i}"),
            FdRole::Record => f.write_str("record"),
            FdRole::PreviousExe => f.write_str("previous-exe"),
            FdRole::Commit => f.write_str("commit"),
            FdRole::SerialFile => f.write_str("serial-file"),
            FdRole::SerialListener => f.write_str("serial-listener"),
            FdRole::SerialClient => f.write_str("serial-client"),
            FdRole::ApiListener => f.write_str("api-listener"),
            FdRole::ApiConn(id) => write!(f, "api-conn-{id}"),
            FdRole::DeviceBacking(i) => write!(f, "virtio{i}"),
            FdRole::VhostCall(i) => write!(f, "vhost{i}-call"),
            FdRole::VhostKick(i, q) => write!(f, "vhost{i}-kick{q}"),
            FdRole::VhostInflight(i) => write!(f, "vhost{i}-inflight"),
        }
    }
}

/// A name that is no [`FdRole`].
#[derive(Debug, thiserror::Error)]
#[error("unknown fd role {0:?}")]
pub struct UnknownRole(String);

impl FromStr for FdRole {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let index = |prefix: &str| s.strip_prefix(prefix).and_then(|n| n.parse::<usize>().ok());
        let conn = |prefix: &str| s.strip_prefix(prefix).and_then(|n| n.parse::<u64>().ok());
        Ok(match s {
            "record" => FdRole::Record,
            "previous-exe" => FdRole::PreviousExe,
            "commit" => FdRole::Commit,
            "serial-file" => FdRole::SerialFile,
            "serial-listener" => FdRole::SerialListener,
            "serial-client" => FdRole::SerialClient,
            "api-listener" => FdRole::ApiListener,
            _ => {
                if let Some(id) = conn("api-conn-") {
                    FdRole::ApiConn(id)
                } else if let Some(i) = index("ram") {
                    FdRole::Ram(i)
                } else if let Some(i) = index("virtio") {
                    FdRole::DeviceBacking(i)
                } else if let Some(role) = vhost_role(s) {
                    role
                } else {
                    return Err(UnknownRole(s.to_string()));
                }
            }
        })
    }
}

/// `vhost{i}-call`, `vhost{i}-kick{q}`, `vhost{i}-inflight`.
fn vhost_role(s: &str) -> Option<FdRole> {
    let (i, what) = s.strip_prefix("vhost")?.split_once('-')?;
    let i = i.parse().ok()?;
    Some(match what {
        "call" => FdRole::VhostCall(i),
        "inflight" => FdRole::VhostInflight(i),
        _ => FdRole::VhostKick(i, what.strip_prefix("kick")?.parse().ok()?),
    })
}

/// Errors saving or restoring a part.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// Declaring an fd to keep failed (a duplicate role or fd).
    #[error("cannot keep the {0} fd")]
    Keep(FdRole, #[source] cpr::FdError),
    /// An fd the state needs was not inherited, or cannot be taken.
    #[error("the {0} fd was not handed over")]
    Missing(FdRole, #[source] cpr::FdError),
    /// An inherited fd is not what its role needs.
    #[error("the inherited {0} fd is unusable")]
    Unusable(FdRole, #[source] std::io::Error),
    /// The saved state contradicts what was inherited or configured.
    #[error("{0}")]
    Inconsistent(String),
}

/// The fds the parts declare while saving: borrowed, the parts keep owning them.
#[derive(Debug, Default)]
pub struct SaveFds {
    registry: cpr::FdRegistry,
}

impl SaveFds {
    /// An empty declaration.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares `fd` to be kept under `role`. The caller keeps `fd` open until the handoff
    /// completes or is undone.
    pub fn keep(&mut self, role: FdRole, fd: impl AsFd) -> Result<(), PersistError> {
        self.registry
            .register(&role.to_string(), fd)
            .map_err(|e| PersistError::Keep(role, e))
    }

    /// The declared fds as the record lists them.
    pub fn describe(&self) -> Vec<cpr::PreservedFd> {
        self.registry.describe()
    }

    /// The registry a transport carries.
    pub fn into_registry(self) -> cpr::FdRegistry {
        self.registry
    }
}

/// The fds a new keeper inherited, by role.
#[derive(Debug)]
pub struct RestoreFds {
    inherited: cpr::Inherited,
}

impl RestoreFds {
    /// Wraps the inherited set.
    pub fn new(inherited: cpr::Inherited) -> Self {
        Self { inherited }
    }

    /// The fd of `role` (a duplicate; the original stays for a rollback).
    pub fn take(&mut self, role: FdRole) -> Result<OwnedFd, PersistError> {
        self.inherited
            .take(&role.to_string())
            .map_err(|e| PersistError::Missing(role, e))
    }

    /// The fd of `role`, if the sender had one (e.g. no serial client was attached).
    pub fn take_optional(&mut self, role: FdRole) -> Result<Option<OwnedFd>, PersistError> {
        self.inherited
            .take_optional(&role.to_string())
            .map_err(|e| PersistError::Missing(role, e))
    }

    /// Roles no part claimed.
    pub fn unclaimed(&self) -> Vec<String> {
        self.inherited
            .unclaimed()
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    /// Closes the originals once the VM runs on the duplicates.
    pub fn release_originals(self) {
        self.inherited.release_originals();
    }
}

/// A part of the VMM whose state and fds survive a handoff.
pub trait Persist: Sized {
    /// Its serializable state.
    type State;
    /// What the new process supplies besides state and fds.
    type Args;
    /// Why a restore failed.
    type Error: From<PersistError>;

    /// Saves the part (the machine is paused) and declares the fds it needs kept.
    fn save(&self, fds: &mut SaveFds) -> Result<Self::State, PersistError>;

    /// Rebuilds the part from `state`, `args` and the fds it declared.
    fn restore(
        state: &Self::State,
        args: Self::Args,
        fds: &mut RestoreFds,
    ) -> Result<Self, Self::Error>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_through_their_names() {
        let roles = [
            FdRole::Ram(0),
            FdRole::Ram(12),
            FdRole::Record,
            FdRole::PreviousExe,
            FdRole::Commit,
            FdRole::SerialFile,
            FdRole::SerialListener,
            FdRole::SerialClient,
            FdRole::ApiListener,
            FdRole::ApiConn(7),
            FdRole::DeviceBacking(3),
            FdRole::VhostCall(2),
            FdRole::VhostKick(2, 1),
            FdRole::VhostInflight(4),
        ];
        for r in roles {
            assert_eq!(r.to_string().parse::<FdRole>().unwrap(), r);
        }
        assert!("ram".parse::<FdRole>().is_err());
        assert!("disk0".parse::<FdRole>().is_err());
        assert!("vhost1-kick".parse::<FdRole>().is_err());
        assert!("vhost-call".parse::<FdRole>().is_err());
    }
}
