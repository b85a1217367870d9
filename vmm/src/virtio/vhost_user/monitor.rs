//! The thread that watches a vhost-user device's socket: it notices a backend that hangs up
//! or talks out of turn, fails or keeps the requests it had taken, and reconnects when a
//! backend listens on the socket again.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::{error_chain, lock, open_session, Connection, Inner, VhostUserError};

/// How long one look at the socket waits.
const POLL: Duration = Duration::from_millis(100);
/// Pause between reconnection attempts.
const RETRY: Duration = Duration::from_millis(200);

/// Starts the monitor of `conn`; it ends when the connection is dropped.
pub(super) fn spawn(conn: &Arc<Connection>) {
    let weak = Arc::downgrade(conn);
    let spawned = std::thread::Builder::new()
        .name("vhost-user".into())
        .spawn(move || run(&weak));
    if let Err(e) = spawned {
        log::error!(
            "vhost-user {}: cannot start the monitor thread ({e}); a dead backend will not be noticed",
            conn.path.display()
        );
    }
}

fn run(weak: &Weak<Connection>) {
    loop {
        let Some(conn) = weak.upgrade() else { return };
        if conn.quiesced() {
            drop(conn);
            std::thread::sleep(POLL);
            continue;
        }
        let socket = lock(&conn.inner).socket.clone();
        match socket {
            Some(s) => {
                drop(conn);
                if readable(s.as_raw_fd()) {
                    if let Some(conn) = weak.upgrade() {
                        check(&conn, &s);
                    }
                }
            }
            None => {
                reconnect(&conn);
                drop(conn);
                std::thread::sleep(RETRY);
            }
        }
    }
}

/// Waits up to [`POLL`] for the socket to become readable or hang up.
fn readable(fd: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd; the caller holds the socket open across the call.
    let n = unsafe { libc::poll(&mut pfd, 1, POLL.as_millis() as i32) };
    n > 0 && pfd.revents != 0
}

/// The socket is readable with no request outstanding (requests and their replies run under
/// the lock): the backend hung up or sent garbage.
fn check(conn: &Connection, socket: &Arc<std::os::unix::net::UnixStream>) {
    let mut inner = lock(&conn.inner);
    if !inner
        .socket
        .as_ref()
        .is_some_and(|s| Arc::ptr_eq(s, socket))
    {
        return;
    }
    let mut buf = [0u8; 256];
    // SAFETY: peeking into a stack buffer of the given length from the open socket.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    let why = match n {
        0 => VhostUserError::HungUp,
        n if n > 0 => VhostUserError::Unsolicited(n as usize),
        _ => {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return;
            }
            VhostUserError::Socket(e)
        }
    };
    conn.drop_session(&mut inner, &why);
}

/// One reconnection attempt.
fn reconnect(conn: &Connection) {
    let (fe, socket, negotiated) = match open_session(&conn.path, conn.queues) {
        Ok(s) => s,
        Err(e) => {
            let text = error_chain(&e);
            let mut inner = lock(&conn.inner);
            if inner.last_error.as_deref() != Some(text.as_str()) {
                // Log each new reason once, not every attempt.
                if !matches!(e, VhostUserError::Connect(..)) {
                    log::warn!("vhost-user {}: {text}", conn.path.display());
                }
                inner.last_error = Some(text);
            }
            return;
        }
    };
    let mut inner = lock(&conn.inner);
    if inner.negotiated.config.get(..8) != negotiated.config.get(..8) {
        log::warn!(
            "vhost-user {}: the new backend reports another capacity; the guest keeps the old one",
            conn.path.display()
        );
    }
    let config = std::mem::take(&mut inner.negotiated.config);
    inner.negotiated = super::Negotiated {
        config,
        ..negotiated
    };
    inner.frontend = Some(fe);
    inner.socket = Some(Arc::new(socket));
    inner.adopted = false;
    let inflight_ok = inner.negotiated.protocol_features
        & vhost::vhost_user::message::VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits()
        != 0;
    if inner.rings.is_some() {
        // Rings restart from the used index: the new backend resubmits what the inflight
        // area lists, or the requests the dead one took have been failed.
        if !inflight_ok && inner.inflight.take().is_some() {
            // The area is useless to a backend that does not track inflight requests.
            fail_taken(conn, &mut inner);
        }
    }
    match conn.start(&mut inner) {
        Ok(()) => {
            // Counted once the session serves the rings (a backend that drops an attempt
            // half-way is not a reconnection).
            inner.reconnects += 1;
            log::info!(
                "vhost-user {}: reconnected (reconnect {})",
                conn.path.display(),
                inner.reconnects
            );
            inner.last_error = None;
            drop(inner);
            // Completions the failure path wrote, and whatever the new backend finished.
            let _ = conn.call.write(1);
        }
        Err(e) => conn.drop_session(&mut inner, &e),
    }
}

/// Where each ring's backend starts: the used index in guest memory (all before it is
/// complete; what follows is resubmitted from the inflight area, was failed, or is new).
pub(super) fn used_indices(mem: &devices::virtio::GuestMemory, queues: &[Queue]) -> Vec<u16> {
    queues
        .iter()
        .map(|q| q.used_idx(mem, Ordering::Acquire).map_or(0, |w| w.0))
        .collect()
}

/// After a session ended: without an inflight area nobody will finish what the dead backend
/// took, so those requests are completed with an error now.
pub(super) fn after_loss(conn: &Connection, inner: &mut Inner) {
    if inner.inflight.is_none() {
        fail_taken(conn, inner);
    }
}

/// Completes every request between the used and the available index with
/// `VIRTIO_BLK_S_IOERR` (the dead backend took them in order), and makes the next backend
/// start after them.
fn fail_taken(conn: &Connection, inner: &mut Inner) {
    let Some(rings) = &inner.rings else { return };
    let mut failed = 0;
    for q in &rings.queues {
        let mut q = super::copy_queue(q);
        if !q.ready() {
            continue;
        }
        let (Ok(used), Ok(avail)) = (
            q.used_idx(&rings.mem, Ordering::Acquire),
            q.avail_idx(&rings.mem, Ordering::Acquire),
        ) else {
            continue;
        };
        q.set_next_avail(used.0);
        q.set_next_used(used.0);
        while q.next_avail() != avail.0 {
            let Some(chain) = q.pop_descriptor_chain(&rings.mem) else {
                break;
            };
            let head = chain.head_index();
            let status = chain
                .clone()
                .filter(|d| d.is_write_only() && d.len() > 0)
                .last()
                .map(|d| GuestAddress(d.addr().0 + u64::from(d.len()) - 1));
            if let Some(at) = status {
                let _ = rings.mem.write_obj(VIRTIO_BLK_S_IOERR as u8, at);
            }
            if q.add_used(&rings.mem, head, 1).is_ok() {
                failed += 1u64;
            }
        }
    }
    if failed > 0 {
        inner.failed_requests += failed;
        log::warn!(
            "vhost-user {}: {failed} requests the backend had taken failed with an I/O error",
            conn.path.display()
        );
        let _ = conn.call.write(1);
    }
}
