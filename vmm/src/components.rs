//! The parts of the VMM that outlive a handoff, listed once.
//!
//! Each part implements [`Persist`]: it saves its state and declares the fds it needs kept,
//! and restores from that state plus those fds. [`save`] and [`restore`] are the only places
//! that name the parts: a new fd-backed part adds its state to [`PartsState`], one line to
//! each function, and its field to [`Parts`].

use serde::{Deserialize, Serialize};

use crate::api::{ApiServer, ApiState, ApiTakeover};
use crate::config::VmConfig;
use crate::fault::{self, Step};
use crate::memory::GuestRam;
use crate::memory_persist::MemoryRegionState;
use crate::persist::{Persist, PersistError, RestoreFds, SaveFds};
use crate::serial_backend::{self, SerialBackendState, SerialOut};
use crate::virtio::{BackendsState, Virtio};
use crate::Error;

/// Every part's saved state, as the handoff record carries it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartsState {
    /// Guest RAM layout (one memfd per region).
    pub ram: Vec<MemoryRegionState>,
    /// The serial console's backend.
    pub serial: SerialBackendState,
    /// The virtio devices' backends.
    #[serde(default)]
    pub devices: BackendsState,
    /// The API server, if one runs.
    #[serde(default)]
    pub api: Option<ApiState>,
}

/// The parts a VMM runs with besides its KVM machine.
pub struct Parts {
    /// Serial console output (input derives from it).
    pub serial: SerialOut,
    /// virtio devices and their backends.
    pub virtio: Virtio,
    /// The API server.
    pub api: Option<ApiServer>,
}

impl Parts {
    /// Opens every part `config` names (a boot).
    pub fn open(config: &VmConfig) -> Result<Self, Error> {
        Ok(Self {
            virtio: Virtio::open(config)?,
            api: config
                .api_socket
                .as_deref()
                .map(ApiServer::bind)
                .transpose()?,
            serial: serial_backend::open(&config.serial)?,
        })
    }
}

/// The parts as they run, borrowed for saving.
pub struct Running<'a> {
    /// Guest RAM.
    pub ram: &'a GuestRam,
    /// Serial output.
    pub serial: &'a SerialOut,
    /// virtio devices.
    pub virtio: &'a Virtio,
    /// The API server.
    pub api: Option<&'a ApiServer>,
}

/// Saves every part and declares its fds in `fds`.
pub fn save(parts: &Running<'_>, fds: &mut SaveFds) -> Result<PartsState, PersistError> {
    Ok(PartsState {
        ram: parts.ram.save(fds)?,
        serial: parts.serial.save(fds)?,
        devices: parts.virtio.save(fds)?,
        api: parts.api.map(|a| a.save(fds)).transpose()?,
    })
}

/// Takes guest RAM over from `state` and the inherited `fds` (first: the KVM VM is built
/// over it while [`restore_parts`] takes the rest).
pub fn restore_ram(state: &PartsState, fds: &mut RestoreFds) -> Result<GuestRam, Error> {
    let ram = GuestRam::restore(&state.ram, (), fds)?;
    fault::inject(Step::Memory)?;
    Ok(ram)
}

/// Takes every part but guest RAM over (see [`restore_ram`]; a transfer has taken RAM over
/// before the pause); `config` is the VM's own (from the record), never the new command line. The
/// API server is not needed while the guest is paused: its fds are taken and checked here
/// and the caller rebuilds it ([`ApiTakeover::into_server`]) once the guest runs.
pub fn restore_parts(
    state: &PartsState,
    config: &VmConfig,
    fds: &mut RestoreFds,
) -> Result<(Parts, Option<ApiTakeover>), Error> {
    let mut laps = crate::laps::Laps::start("restore parts");
    let serial = SerialOut::restore(&state.serial, (), fds)?;
    laps.mark("serial");
    let virtio = Virtio::restore(&state.devices, config.clone(), fds)?;
    laps.mark("virtio");
    let api = state
        .api
        .as_ref()
        .map(|a| ApiTakeover::take(a, fds))
        .transpose()?;
    laps.mark("api");
    laps.log();
    let parts = Parts {
        serial,
        virtio,
        api: None,
    };
    fault::inject(Step::Api)?;
    Ok((parts, api))
}
