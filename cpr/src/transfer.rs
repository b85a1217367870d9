//! The transfer transport's wire protocol: a VM handed to a separately started process over a
//! unix `SOCK_SEQPACKET` socket, its fds passed with `SCM_RIGHTS`.
//!
//! Every message is one packet holding a JSON envelope
//! `{"protocol", "major", "minor", "message": {"type": …}, "fds": [names], "payload": len}`
//! with the named fds attached, followed by `payload` bytes in packets of at most
//! [`CHUNK`] bytes. Unknown fields are ignored; a different major version is refused. The
//! exchange:
//!
//! ```text
//! sender                                   receiver (molt --incoming PATH)
//! Hello ─────────────────────────────────▶
//!       ◀───────────────────────────────── Hello
//! Prepare {layout} + RAM memfds, commit ─▶  maps RAM, builds the KVM VM and vCPUs
//!       ◀───────────────────────────────── Ready           (the guest still runs)
//! [pause] Handoff + record, other fds ───▶  restores, commits, resumes
//!       ◀───────────────────────────────── Committed {pid}
//! exits 0
//! ```
//!
//! A receiver that refused may be replaced on the same connection (minor 1): the new one
//! sends `Again` and the exchange starts over.
//!
//! RAM goes as fds here; a transfer to another host can send it as payload instead.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::{Deserialize, Serialize};

use crate::fdpass;

/// Protocol name in every envelope.
pub const PROTOCOL: &str = "molt-cpr-transfer";
/// Major version: a receiver refuses any other.
pub const MAJOR: u16 = 1;
/// Minor version: additive changes.
pub const MINOR: u16 = 1;
/// Largest payload packet.
pub const CHUNK: usize = 60 << 10;
/// Largest payload accepted.
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// One step of the exchange.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Who speaks.
    Hello {
        /// The writer, e.g. `molt 0.1.0`.
        writer: String,
    },
    /// The machine to build before the pause; the RAM memfds and the commit page attached.
    Prepare {
        /// Whatever the receiver needs to build the machine (opaque here).
        machine: serde_json::Value,
    },
    /// The machine is built.
    Ready,
    /// The paused VM: the record is the payload; every other fd attached.
    Handoff,
    /// The receiver committed and runs the guest.
    Committed {
        /// Its pid.
        pid: u32,
    },
    /// The other side gives up, and why.
    Refused {
        /// Why.
        reason: String,
    },
    /// A new receiver on the same connection, after the one before it refused (a rollback
    /// that executed the previous binary): the sender may start over with a hello.
    Again,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    protocol: String,
    major: u16,
    #[serde(default)]
    minor: u16,
    message: Message,
    #[serde(default)]
    fds: Vec<String>,
    #[serde(default)]
    payload: u64,
}

/// Errors of the exchange.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The socket failed.
    #[error("transfer socket")]
    Io(#[from] io::Error),
    /// The peer closed the connection.
    #[error("the peer closed the connection")]
    Closed,
    /// Nothing arrived in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Not this protocol, or not JSON.
    #[error("not a molt transfer message: {0}")]
    Garbage(String),
    /// Another major version.
    #[error("the peer speaks transfer protocol {0}.x, this molt {MAJOR}.x")]
    Version(u16),
    /// A message that does not fit the exchange at this point.
    #[error("unexpected message: expected {expected}, got {got:?}")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// What came.
        got: Box<Message>,
    },
    /// The peer refused.
    #[error("the peer refused: {0}")]
    Refused(String),
}

/// A message as received.
#[derive(Debug)]
pub struct Received {
    /// The message.
    pub message: Message,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Its fds, by name.
    pub fds: Vec<(String, OwnedFd)>,
}

/// One end of a transfer connection.
#[derive(Debug)]
pub struct Channel {
    sock: OwnedFd,
    /// Where packets are received: allocated and written once, so that receiving inside a
    /// pause does not fault its pages in (several µs each under PVM).
    buf: std::cell::RefCell<Vec<u8>>,
}

impl Channel {
    /// Wraps a connected `SOCK_SEQPACKET` socket.
    pub fn new(sock: OwnedFd) -> Self {
        Self {
            sock,
            buf: std::cell::RefCell::new(touched(fdpass::MAX_TEXT)),
        }
    }

    /// Sends `message` with `payload` and the named `fds`.
    pub fn send(
        &self,
        message: &Message,
        payload: &[u8],
        fds: &[(String, RawFd)],
    ) -> Result<(), TransferError> {
        let names: Vec<String> = fds.iter().map(|(n, _)| n.clone()).collect();
        let head = encode_head(message, &names, payload.len() as u64)?;
        let raw: Vec<RawFd> = fds.iter().map(|(_, fd)| *fd).collect();
        fdpass::send(&self.sock, &head, &raw)?;
        for chunk in payload.chunks(CHUNK) {
            fdpass::send(&self.sock, chunk, &[])?;
        }
        Ok(())
    }

    fn wait(&self, deadline: Instant, limit: Duration) -> Result<(), TransferError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransferError::Timeout(limit));
            }
            let ms = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, ms) {
                Ok(n) if n > 0 => return Ok(()),
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(io::Error::from(e).into()),
            }
        }
    }

    /// Waits for the next packet and hands its bytes and fds to `take`.
    fn packet<T>(
        &self,
        deadline: Instant,
        limit: Duration,
        take: impl FnOnce(&[u8], Vec<OwnedFd>) -> T,
    ) -> Result<T, TransferError> {
        self.wait(deadline, limit)?;
        let mut buf = self.buf.borrow_mut();
        let (n, fds) = fdpass::recv_into(&self.sock, &mut buf)?.ok_or(TransferError::Closed)?;
        Ok(take(&buf[..n], fds))
    }

    /// Receives one message, waiting at most `limit`.
    pub fn recv(&self, limit: Duration) -> Result<Received, TransferError> {
        let deadline = Instant::now() + limit;
        let (head, fds) = self.packet(deadline, limit, |bytes, fds| (decode_head(bytes), fds))?;
        let head = head?;
        if head.fds.len() != fds.len() {
            return Err(TransferError::Garbage(format!(
                "{} fds named, {} attached",
                head.fds.len(),
                fds.len()
            )));
        }
        let mut payload = Vec::with_capacity(head.payload as usize);
        while (payload.len() as u64) < head.payload {
            let ok = self.packet(deadline, limit, |chunk, extra| {
                payload.extend_from_slice(chunk);
                extra.is_empty() && !chunk.is_empty()
            })?;
            if !ok {
                return Err(TransferError::Garbage("a malformed payload packet".into()));
            }
        }
        if payload.len() as u64 != head.payload {
            return Err(TransferError::Garbage(
                "payload longer than announced".into(),
            ));
        }
        if let Message::Refused { reason } = head.message {
            return Err(TransferError::Refused(reason));
        }
        Ok(Received {
            message: head.message,
            payload,
            fds: head.fds.into_iter().zip(fds).collect(),
        })
    }

    /// The socket's fd (to keep it across an exec, or poll it).
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// A buffer of `len` bytes with every page written (its content is irrelevant).
fn touched(len: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(len);
    // Not zeroes: a fresh allocation may already be zero, and writing zeroes over it could
    // be left out.
    buf.resize(len, 0xa5);
    buf
}

/// The first packet of a message, decoded: what [`decode_head`] checked and returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Head {
    /// The message.
    pub message: Message,
    /// Names of the fds attached to the packet, in order.
    pub fds: Vec<String>,
    /// Bytes of payload that follow in further packets (at most [`MAX_PAYLOAD`]).
    pub payload: u64,
}

/// Encodes the first packet of a message: the envelope naming `fds` and announcing
/// `payload` bytes.
pub fn encode_head(
    message: &Message,
    fds: &[String],
    payload: u64,
) -> Result<Vec<u8>, TransferError> {
    let envelope = Envelope {
        protocol: PROTOCOL.into(),
        major: MAJOR,
        minor: MINOR,
        message: message.clone(),
        fds: fds.to_vec(),
        payload,
    };
    serde_json::to_vec(&envelope).map_err(|e| TransferError::Garbage(e.to_string()))
}

/// Decodes the first packet of a message, refusing another protocol, another major version
/// and a payload above [`MAX_PAYLOAD`]. Whether the named fds came with it is the caller's
/// to check.
pub fn decode_head(bytes: &[u8]) -> Result<Head, TransferError> {
    let envelope: Envelope = serde_json::from_slice(bytes).map_err(|e| {
        TransferError::Garbage(format!(
            "{e} in {:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(64)])
        ))
    })?;
    if envelope.protocol != PROTOCOL {
        return Err(TransferError::Garbage(format!(
            "protocol {:?}",
            envelope.protocol
        )));
    }
    if envelope.major != MAJOR {
        return Err(TransferError::Version(envelope.major));
    }
    if envelope.payload > MAX_PAYLOAD {
        return Err(TransferError::Garbage(format!(
            "a payload of {} bytes",
            envelope.payload
        )));
    }
    Ok(Head {
        message: envelope.message,
        fds: envelope.fds,
        payload: envelope.payload,
    })
}

/// Expects `got` to be the message `expected` names, or says what came instead.
pub fn expect(
    got: Received,
    expected: &'static str,
    ok: impl Fn(&Message) -> bool,
) -> Result<Received, TransferError> {
    if ok(&got.message) {
        Ok(got)
    } else {
        Err(TransferError::Unexpected {
            expected,
            got: Box::new(got.message),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    fn pair() -> (Channel, Channel) {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        (Channel::new(a), Channel::new(b))
    }

    #[test]
    fn messages_carry_payloads_larger_than_a_packet_and_named_fds() {
        let (a, b) = pair();
        let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let file = std::fs::File::open("/dev/null").unwrap();
        a.send(
            &Message::Handoff,
            &payload,
            &[("ram0".into(), file.as_raw_fd())],
        )
        .unwrap();
        let got = b.recv(Duration::from_secs(5)).unwrap();
        assert_eq!(got.message, Message::Handoff);
        assert_eq!(got.payload, payload);
        assert_eq!(got.fds.len(), 1);
        assert_eq!(got.fds[0].0, "ram0");
    }

    #[test]
    fn garbage_versions_refusals_silence_and_hangups_are_typed_errors() {
        let (a, b) = pair();
        fdpass::send(&a.sock, b"GET / HTTP/1.1\r\n\r\n", &[]).unwrap();
        assert!(matches!(
            b.recv(Duration::from_secs(1)),
            Err(TransferError::Garbage(_))
        ));
        let future = br#"{"protocol":"molt-cpr-transfer","major":9,"message":{"type":"ready"}}"#;
        fdpass::send(&a.sock, future, &[]).unwrap();
        assert!(matches!(
            b.recv(Duration::from_secs(1)),
            Err(TransferError::Version(9))
        ));
        a.send(
            &Message::Refused {
                reason: "no".into(),
            },
            &[],
            &[],
        )
        .unwrap();
        assert!(
            matches!(b.recv(Duration::from_secs(1)), Err(TransferError::Refused(r)) if r == "no")
        );
        assert!(matches!(
            b.recv(Duration::from_millis(50)),
            Err(TransferError::Timeout(_))
        ));
        // A payload announced but never sent, then the sender goes.
        let short = br#"{"protocol":"molt-cpr-transfer","major":1,"message":{"type":"handoff"},"payload":10}"#;
        fdpass::send(&a.sock, short, &[]).unwrap();
        drop(a);
        assert!(matches!(
            b.recv(Duration::from_secs(1)),
            Err(TransferError::Closed)
        ));
        let future_minor = Message::Ready;
        let (c, d) = pair();
        c.send(&future_minor, &[], &[]).unwrap();
        assert!(expect(
            d.recv(Duration::from_secs(1)).unwrap(),
            "hello",
            |m| matches!(m, Message::Hello { .. })
        )
        .is_err());
    }
}
