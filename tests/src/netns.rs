//! Network namespaces the tests create themselves: a tap with a link-local address inside,
//! molt started inside, and probes (ICMP echo, UDP) sent from inside. Nothing touches the
//! host's own namespace or any other address.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

/// A network namespace with a tap `tap0` at `HOST_IP`/16, deleted on drop.
pub struct NetNs {
    /// Namespace name.
    pub name: String,
}

/// The tap's address inside the namespace.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 1);
/// The address the guest is given.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 2);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    /// Creates the namespace and its tap, or says why it cannot (the caller skips).
    pub fn create(tag: &str) -> Result<NetNs, String> {
        let name = format!("molt-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        let n = ns.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        ip(&["-n", n, "tuntap", "add", "dev", "tap0", "mode", "tap"])?;
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{HOST_IP}/16"),
            "dev",
            "tap0",
        ])?;
        ip(&["-n", n, "link", "set", "tap0", "up"])?;
        Ok(ns)
    }

    /// Runs `f` on a thread that has entered the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_in(&self.name, f)
    }
}

/// Runs `f` on a thread that has entered the namespace `name`.
pub fn run_in<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).expect("open the namespace");
        // SAFETY: setns on this thread only, with an fd of a network namespace.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread")
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `count` ICMP echo requests to `to`, one every `interval`, from the current
/// namespace; returns the round-trip time of each (None = no reply within `timeout`).
pub fn ping(
    to: Ipv4Addr,
    count: u16,
    interval: Duration,
    timeout: Duration,
) -> Vec<Option<Duration>> {
    // SAFETY: creating a raw ICMP socket (root).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just created and is owned here.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(to).to_be(),
        },
        sin_zero: [0; 8],
    };
    let id = (std::process::id() & 0xffff) as u16;
    let mut sent = vec![None; count as usize];
    let mut rtt: Vec<Option<Duration>> = vec![None; count as usize];
    let mut next = Instant::now();
    let mut seq = 0u16;
    let deadline_after_last = timeout;
    let mut last_sent = Instant::now();
    loop {
        let now = Instant::now();
        if seq < count && now >= next {
            let mut pkt = vec![8u8, 0, 0, 0];
            pkt.extend_from_slice(&id.to_be_bytes());
            pkt.extend_from_slice(&seq.to_be_bytes());
            pkt.extend_from_slice(b"molt-ping-payload-0123456789");
            let c = checksum(&pkt);
            pkt[2..4].copy_from_slice(&c.to_be_bytes());
            // SAFETY: sending a buffer to a valid sockaddr_in.
            unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    pkt.as_ptr().cast(),
                    pkt.len(),
                    0,
                    (&addr as *const libc::sockaddr_in).cast(),
                    size_of::<libc::sockaddr_in>() as u32,
                )
            };
            sent[seq as usize] = Some(now);
            last_sent = now;
            seq += 1;
            next += interval;
        }
        if seq == count
            && (rtt.iter().all(Option::is_some) || now > last_sent + deadline_after_last)
        {
            break;
        }
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 1) };
        if ready <= 0 {
            continue;
        }
        let mut buf = [0u8; 1500];
        // SAFETY: receiving into a local buffer.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 28 {
            continue;
        }
        let ihl = usize::from(buf[0] & 0xf) * 4;
        let icmp = &buf[ihl..n as usize];
        if icmp.len() >= 8 && icmp[0] == 0 && u16::from_be_bytes([icmp[4], icmp[5]]) == id {
            let s = usize::from(u16::from_be_bytes([icmp[6], icmp[7]]));
            if let (Some(Some(t)), Some(slot)) = (sent.get(s), rtt.get_mut(s)) {
                slot.get_or_insert(t.elapsed());
            }
        }
    }
    rtt
}

/// Sends `payload` to UDP port 7 of `to` and waits for the echo.
pub fn udp_echo(to: Ipv4Addr, payload: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("0.0.0.0:0").ok()?;
    sock.set_read_timeout(Some(timeout)).ok()?;
    sock.send_to(payload, SocketAddrV4::new(to, 7)).ok()?;
    let mut buf = [0u8; 2048];
    let (n, _) = sock.recv_from(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}
