//! Transfer mode: each update starts a `molt --incoming PATH` beside the running molt and
//! hands the VM to it with `PUT /api/v1/vm.cpr-transfer`; the receiver is the molt measured
//! from then on, and the sender must exit 0.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::api::{self, Reply};
use crate::error::{Error, Result};
use crate::process::Molt;

/// How long the receiver may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A receiver, listening.
pub struct Receiver {
    /// Its process.
    pub molt: Molt,
    /// Its socket.
    pub socket: PathBuf,
}

/// Starts the receiver of update `update` in `dir` and waits until it listens.
pub fn start_receiver(bin: &Path, dir: &Path, update: usize) -> Result<Receiver> {
    let socket = dir.join("incoming.sock");
    let _ = std::fs::remove_file(&socket);
    let args = vec!["--incoming".to_string(), socket.display().to_string()];
    let mut molt = Molt::spawn_named(bin, &args, dir, &format!("receiver{update}"))?;
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    while !socket.exists() {
        molt.check_alive()?;
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("the receiver to listen on {}", socket.display()),
                secs: LISTEN_TIMEOUT.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(Receiver { molt, socket })
}

/// Asks the molt at `api_sock` to hand its VM to `receiver`.
pub fn request(api_sock: &Path, receiver: &Receiver, timeout: Duration) -> Result<Reply> {
    let body = serde_json::json!({ "socket": receiver.socket }).to_string();
    api::request(
        api_sock,
        "PUT",
        "/api/v1/vm.cpr-transfer",
        Some(&body),
        timeout,
    )
}
