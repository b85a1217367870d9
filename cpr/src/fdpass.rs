//! Passing fds with a short text over a unix `SOCK_SEQPACKET` socket (SCM_RIGHTS): how the
//! update guardian receives its copies today, and how a transfer to a separately started
//! molt carries the VM's fds.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// Most fds one message carries (the kernel's SCM_MAX_FD).
pub const MAX_FDS: usize = 253;
/// Largest text one message carries.
pub const MAX_TEXT: usize = 64 << 10;

/// Sends `text` and `fds` in one message.
pub fn send(sock: impl AsFd, text: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS || text.len() > MAX_TEXT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "message too large",
        ));
    }
    let iov = [IoSlice::new(text)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        sock.as_fd().as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// Receives one message; `Ok(None)` at end of stream. Received fds are close-on-exec.
pub fn recv(sock: impl AsFd) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut text = vec![0u8; MAX_TEXT];
    Ok(recv_into(sock, &mut text)?.map(|(n, fds)| {
        text.truncate(n);
        (text, fds)
    }))
}

/// As [`recv`], into `buf` (which must hold the largest message expected): the number of
/// bytes received and the fds. A message longer than `buf` is an error, not cut short.
pub fn recv_into(sock: impl AsFd, buf: &mut [u8]) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, fds, truncated) = loop {
        let mut iov = [IoSliceMut::new(buf)];
        match recvmsg::<()>(
            sock.as_fd().as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: the kernel just installed these fds in this process for
                        // us alone.
                        fds.extend(
                            raw.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
                break (msg.bytes, fds, truncated);
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    if truncated {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a message longer than {} bytes", buf.len()),
        ));
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some((n, fds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::unix::net::UnixDatagram;

    fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    #[test]
    fn text_and_fds_arrive_together() {
        let (a, b) = seqpacket_pair();
        let mut file = tempfile();
        file.write_all(b"passed").unwrap();
        send(&a, b"one\ntwo", &[file.as_raw_fd(), file.as_raw_fd()]).unwrap();
        let (text, fds) = recv(&b).unwrap().unwrap();
        assert_eq!(text, b"one\ntwo");
        assert_eq!(fds.len(), 2);
        assert!(crate::is_cloexec(fds[0].as_raw_fd()).unwrap());
        let mut got = std::fs::File::from(fds.into_iter().next().unwrap());
        got.rewind().unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "passed");
        drop(a);
        assert!(recv(&b).unwrap().is_none());
    }

    #[test]
    fn oversized_messages_are_refused() {
        let (a, _b) = UnixDatagram::pair().unwrap();
        let too_many = vec![0; MAX_FDS + 1];
        assert!(send(&a, b"x", &too_many).is_err());
        assert!(send(&a, &vec![0; MAX_TEXT + 1], &[]).is_err());
    }

    #[test]
    fn a_message_longer_than_the_buffer_is_an_error_not_cut_short() {
        let (a, b) = seqpacket_pair();
        send(&a, b"twelve bytes", &[]).unwrap();
        let mut small = [0u8; 5];
        let err = recv_into(&b, &mut small).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        send(&a, b"fits", &[]).unwrap();
        let (n, fds) = recv_into(&b, &mut small).unwrap().unwrap();
        assert_eq!((&small[..n], fds.len()), (&b"fits"[..], 0));
    }

    fn tempfile() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("molt-fdpass-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }
}
