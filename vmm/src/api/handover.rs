//! Handing the API server over a live update: refuse concurrent updates, and carry every
//! client connection (with the input not processed yet) to the next image.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::super::conn::Conn;
use super::super::socket::{check_socket, set_cloexec};
use super::super::{ApiError, ConnId};
use super::ApiServer;

/// A client connection carried over a live update.
#[derive(Debug)]
pub struct CarriedConn<F> {
    /// Its id (kept by the next image).
    pub id: ConnId,
    /// Its socket.
    pub fd: F,
    /// Input received but not processed yet (e.g. a request that arrived during the update).
    pub unread: Vec<u8>,
}

impl ApiServer {
    /// While a live update runs: accepts the clients waiting in the backlog, reads what every
    /// client sent, and answers each complete `vm.cpr-exec` request with 409 (one update at
    /// a time). Other requests stay buffered and are answered after the update.
    pub fn refuse_updates(&mut self) {
        let now = Instant::now();
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err()
                        || self.conns.len() >= self.limits.max_connections
                    {
                        continue;
                    }
                    let id = self.next_id;
                    self.next_id += 1;
                    let conn = Conn::new(stream, now);
                    self.by_fd.insert(conn.fd(), id);
                    self.conns.insert(id, conn);
                    self.dirty.insert(id);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        for (id, c) in self.conns.iter_mut() {
            if c.refuse_update(&self.limits, now) {
                log::info!("API: refused a second update on connection {id}");
                self.dirty.insert(*id);
            }
        }
        let _ = self.waker.write(1);
    }

    /// The connections to carry over a live update: every one between requests, except
    /// `waiting` (whose request started the update and which travels separately).
    pub fn carried(&self, waiting: ConnId) -> Vec<CarriedConn<RawFd>> {
        self.conns
            .iter()
            .filter(|(id, _)| **id != waiting)
            .filter_map(|(id, c)| {
                c.carry().map(|unread| CarriedConn {
                    id: *id,
                    fd: c.fd(),
                    unread,
                })
            })
            .collect()
    }

    /// The next connection id.
    pub fn next_id(&self) -> ConnId {
        self.next_id
    }

    /// Adopts connections carried over a live update; their buffered input is processed on
    /// the next event-loop turn. Ids continue after the largest one.
    pub fn adopt(&mut self, conns: Vec<CarriedConn<OwnedFd>>) -> Result<(), ApiError> {
        let now = Instant::now();
        for c in conns {
            check_socket(c.fd.as_raw_fd(), false)?;
            set_cloexec(c.fd.as_raw_fd()).map_err(ApiError::Setup)?;
            let stream = UnixStream::from(c.fd);
            stream.set_nonblocking(true).map_err(ApiError::Setup)?;
            let conn = Conn::preloaded(stream, c.unread, now);
            self.by_fd.insert(conn.fd(), c.id);
            self.conns.insert(c.id, conn);
            self.dirty.insert(c.id);
            self.next_id = self.next_id.max(c.id + 1);
        }
        self.waker.write(1).map_err(ApiError::Setup)?;
        Ok(())
    }
}
