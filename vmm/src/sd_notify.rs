//! The systemd notification protocol, without libsystemd: one datagram to the unix socket
//! named by `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket). molt sends
//!
//! - `READY=1` and `MAINPID=<pid>` once the guest runs in this process (after a boot, a
//!   snapshot restore, a live update; after a transfer or a guardian takeover the PID is a
//!   new one, which is how systemd learns who runs the VM now);
//! - `STOPPING=1` when the VM ends and molt shuts down (not when a transfer hands the VM to
//!   another process).
//!
//! `NOTIFY_SOCKET` stays in the environment, so every later image and the update guardian
//! can notify too. Without it nothing is sent; a failed send is logged and otherwise ignored.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Errors sending a notification.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` is not a usable address.
    #[error("NOTIFY_SOCKET {0:?} is not a unix socket path or @abstract name")]
    BadAddress(String),
    /// The datagram could not be sent.
    #[error("cannot send to NOTIFY_SOCKET {0:?}")]
    Send(String, #[source] io::Error),
}

/// Sends `state` (newline-separated `KEY=value` assignments) to `$NOTIFY_SOCKET`. `Ok(false)`
/// when the variable is not set.
pub fn notify(state: &str) -> Result<bool, NotifyError> {
    let Some(addr) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let addr = addr.to_string_lossy().into_owned();
    send(&addr, state)?;
    Ok(true)
}

fn send(addr: &str, state: &str) -> Result<(), NotifyError> {
    let err = |e| NotifyError::Send(addr.to_string(), e);
    let sock = UnixDatagram::unbound().map_err(err)?;
    if let Some(name) = addr.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let sa = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .map_err(|_| NotifyError::BadAddress(addr.to_string()))?;
        sock.send_to_addr(state.as_bytes(), &sa).map_err(err)?;
    } else if addr.starts_with('/') {
        sock.send_to(state.as_bytes(), addr).map_err(err)?;
    } else {
        return Err(NotifyError::BadAddress(addr.to_string()));
    }
    Ok(())
}

fn notify_logged(state: &str) {
    match notify(state) {
        Ok(true) => log::debug!("sd_notify: {}", state.replace('\n', " ")),
        Ok(false) => {}
        Err(e) => log::warn!("sd_notify: {}", crate::error_chain(&e)),
    }
}

/// The guest runs in this process: `READY=1` and `MAINPID=` this process (once per
/// process).
pub fn ready() {
    static SENT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if SENT.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    notify_logged(&format!("READY=1\nMAINPID={}", std::process::id()));
}

/// molt is shutting the VM down: `STOPPING=1`.
pub fn stopping() {
    notify_logged("STOPPING=1");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_and_abstract_addresses() {
        let dir = std::env::temp_dir().join(format!("molt-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        send(path.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("molt-notify-test-{}", std::process::id());
        let sa = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let arx = UnixDatagram::bind_addr(&sa).unwrap();
        send(&format!("@{name}"), "STOPPING=1").unwrap();
        let n = arx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");

        assert!(matches!(
            send("relative", "X=1"),
            Err(NotifyError::BadAddress(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
