//! virtio-net test driver (`molt.net=<ip>/<prefix>`): answers ARP requests
//! for its address, ICMP echo requests and UDP datagrams to port 7 (echo);
//! ignores everything else.
//!
//! Eight 2 KiB receive buffers stay posted; each `poll` handles at most
//! `FRAMES_PER_POLL` received frames, builds replies in one of four transmit
//! buffers and gives every receive buffer straight back. Every buffer starts
//! with the 12-byte `virtio_net_hdr` (all zero on transmit: no offloads).
//!
//! ```text
//! molt-guest: net mac=<aa:bb:cc:dd:ee:ff> ip=<a.b.c.d>
//! molt-guest: net rx=<n> tx=<n> arp=<n> icmp=<n> udp=<n>   (about every second, if changed)
//! ```
//!
//! rx counts frames received, tx frames sent, arp/icmp/udp the requests
//! answered of each kind.

use crate::serial::Line;
use crate::virtio::{Dma, Mmio, Queue, Ring, Why, DESC_WRITE};
use crate::Deadline;
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::AtomicBool;

const F_MAC: u64 = 1 << 5;
const RX: u16 = 0;
const TX: u16 = 1;
const RX_BUFS: usize = 8;
const TX_BUFS: usize = 4;
const BUF: usize = 2048;
/// `virtio_net_hdr` with `num_buffers` (virtio 1.x).
const HDR: usize = 12;
const FRAMES_PER_POLL: usize = 2;
const REPORT_MS: u64 = 1000;
/// Used when the device offers no MAC address (locally administered).
const FALLBACK_MAC: [u8; 6] = [0x02, 0x6d, 0x6f, 0x6c, 0x74, 0x01];

const ETH_LEN: usize = 14;
const ETH_MIN: usize = 60;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV4: u16 = 0x0800;
const IP_LEN: usize = 20;
const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;
const ECHO_PORT: u16 = 7;

#[repr(C, align(4096))]
struct Mem {
    rx_ring: Ring,
    tx_ring: Ring,
    rx: [[u8; BUF]; RX_BUFS],
    tx: [[u8; BUF]; TX_BUFS],
}

#[link_section = ".dma"]
static MEM: Dma<Mem> = Dma::uninit();
static TAKEN: AtomicBool = AtomicBool::new(false);

#[derive(Clone, Copy, PartialEq, Eq, Default)]
struct Stats {
    rx: u64,
    tx: u64,
    arp: u64,
    icmp: u64,
    udp: u64,
}

/// What a reply answers.
#[derive(Clone, Copy)]
enum Kind {
    Arp,
    Icmp,
    Udp,
}

pub struct Net {
    rx: Queue,
    tx: Queue,
    mem: *mut Mem,
    mac: [u8; 6],
    ip: [u8; 4],
    /// Bit i set: transmit buffer i is the driver's.
    tx_free: u32,
    stats: Stats,
    reported: Stats,
    report: Deadline,
}

impl Net {
    /// Initialises the device and both queues and posts the receive buffers
    /// (the `virtio … ok` part).
    pub fn init(mmio: Mmio, ip: [u8; 4], now: u64, tsc_khz: u64) -> Result<Net, Why> {
        let mem = MEM.take(&TAKEN).ok_or("second net driver")?;
        let features = mmio.negotiate(F_MAC)?;
        // SAFETY: `mem` points to MEM, owned by this driver (Dma::take); only
        // addresses are computed.
        let (rx_ring, tx_ring) =
            unsafe { (addr_of_mut!((*mem).rx_ring), addr_of_mut!((*mem).tx_ring)) };
        let mut rx = mmio.setup_queue(RX, rx_ring)?;
        let tx = mmio.setup_queue(TX, tx_ring)?;
        mmio.driver_ok()?;
        let mac = if features & F_MAC != 0 {
            let (low, high) = (mmio.config(0).to_le_bytes(), mmio.config(4).to_le_bytes());
            [low[0], low[1], low[2], low[3], high[0], high[1]]
        } else {
            FALLBACK_MAC
        };
        for i in 0..RX_BUFS {
            // SAFETY: only computes the address of receive buffer i.
            let addr = unsafe { addr_of_mut!((*mem).rx[i]) } as u64;
            rx.set_desc(i as u16, addr, BUF as u32, DESC_WRITE, 0);
            rx.push(i as u16);
        }
        rx.notify();
        Ok(Net {
            rx,
            tx,
            mem,
            mac,
            ip,
            tx_free: (1 << TX_BUFS) - 1,
            stats: Stats::default(),
            reported: Stats::default(),
            report: Deadline::new(now, REPORT_MS * tsc_khz),
        })
    }

    /// Prints the address line.
    pub fn start(&self) {
        Line::new()
            .s(b"net mac=")
            .hex_bytes(&self.mac, b':')
            .s(b" ip=")
            .ipv4(self.ip)
            .print();
    }

    pub fn poll(&mut self, now: u64) {
        while let Some((id, _)) = self.tx.pop_used() {
            if usize::from(id) < TX_BUFS {
                self.tx_free |= 1 << id;
            }
        }
        let mut reposted = false;
        let mut sent = false;
        for _ in 0..FRAMES_PER_POLL {
            // A frame is taken only when its answer can be queued: with every transmit
            // buffer still with the device, it waits in the ring (the device, and then the
            // host's tap queue, hold what comes after it) instead of losing its answer.
            if self.tx_free == 0 {
                break;
            }
            let Some((id, len)) = self.rx.pop_used() else {
                break;
            };
            if usize::from(id) >= RX_BUFS {
                continue; // not ours; nothing to give back
            }
            self.stats.rx += 1;
            sent |= self.handle(usize::from(id), len as usize);
            self.rx.push(id);
            reposted = true;
        }
        if sent {
            self.tx.notify();
        }
        if reposted {
            self.rx.notify();
        }
        if self.report.expired(now) && self.stats != self.reported {
            self.reported = self.stats;
            let s = self.stats;
            Line::new()
                .s(b"net rx=")
                .dec(s.rx)
                .s(b" tx=")
                .dec(s.tx)
                .s(b" arp=")
                .dec(s.arp)
                .s(b" icmp=")
                .dec(s.icmp)
                .s(b" udp=")
                .dec(s.udp)
                .print();
        }
    }

    /// Answers the frame in receive buffer `id` (`len` bytes with the
    /// header) if it asks for an answer; returns whether a reply was queued.
    fn handle(&mut self, id: usize, len: usize) -> bool {
        if len < HDR + ETH_LEN || self.tx_free == 0 {
            return false;
        }
        let slot = self.tx_free.trailing_zeros() as usize;
        let mem = self.mem;
        // SAFETY: receive buffer `id` came back in the used ring and
        // transmit buffer `slot` is free, so the device accesses neither
        // until they are queued again; they do not overlap, and MEM is owned
        // by this driver.
        let (rx, out) = unsafe {
            (
                &*addr_of!((*mem).rx[id]),
                &mut *addr_of_mut!((*mem).tx[slot]),
            )
        };
        let frame = &rx[HDR..len.min(BUF)];
        let Some((frame_len, kind)) = answer(frame, &mut out[HDR..], self.mac, self.ip) else {
            return false;
        };
        out[..HDR].fill(0);
        if frame_len < ETH_MIN {
            out[HDR + frame_len..HDR + ETH_MIN].fill(0);
        }
        let frame_len = frame_len.max(ETH_MIN);
        let addr = out.as_ptr() as u64;
        self.tx_free &= !(1 << slot);
        self.tx
            .set_desc(slot as u16, addr, (HDR + frame_len) as u32, 0, 0);
        self.tx.push(slot as u16);
        self.stats.tx += 1;
        match kind {
            Kind::Arp => self.stats.arp += 1,
            Kind::Icmp => self.stats.icmp += 1,
            Kind::Udp => self.stats.udp += 1,
        }
        true
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// One's-complement sum of `b` as big-endian 16-bit words (RFC 1071),
/// folded to 16 bits.
fn ones_sum(b: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut pairs = b.chunks_exact(2);
    for pair in &mut pairs {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = pairs.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn ones_add(a: u16, b: u16) -> u16 {
    let s = u32::from(a) + u32::from(b);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// Writes the reply to `frame` (an Ethernet frame without the virtio
/// header) into `out`, if it gets one; returns its length (before padding)
/// and kind.
fn answer(frame: &[u8], out: &mut [u8], mac: [u8; 6], ip: [u8; 4]) -> Option<(usize, Kind)> {
    if frame.len() < ETH_LEN {
        return None;
    }
    let dst = &frame[0..6];
    if dst != mac && dst != [0xff; 6] {
        return None;
    }
    let body = &frame[ETH_LEN..];
    out[0..6].copy_from_slice(&frame[6..12]);
    out[6..12].copy_from_slice(&mac);
    match be16(frame, 12) {
        ETHERTYPE_ARP => {
            put16(out, 12, ETHERTYPE_ARP);
            arp(body, &mut out[ETH_LEN..], mac, ip).map(|n| (ETH_LEN + n, Kind::Arp))
        }
        ETHERTYPE_IPV4 if dst == mac => {
            put16(out, 12, ETHERTYPE_IPV4);
            ipv4(body, &mut out[ETH_LEN..], ip).map(|(n, kind)| (ETH_LEN + n, kind))
        }
        _ => None,
    }
}

/// ARP request for `ip` → ARP reply (RFC 826); returns the ARP length.
fn arp(a: &[u8], out: &mut [u8], mac: [u8; 6], ip: [u8; 4]) -> Option<usize> {
    // htype 1 (Ethernet), ptype IPv4, hlen 6, plen 4, oper 1 (request).
    if a.len() < 28 || a[..8] != [0, 1, 8, 0, 6, 4, 0, 1] || a[24..28] != ip {
        return None;
    }
    // `out` starts at the ARP part; the Ethernet header sits before it.
    out[..8].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    out[8..14].copy_from_slice(&mac);
    out[14..18].copy_from_slice(&ip);
    out[18..28].copy_from_slice(&a[8..18]); // requester's MAC and IP
    Some(28)
}

/// Writes the IPv4 header of a reply to `peer` carrying `payload_len`
/// bytes of `proto`.
fn ip_header(out: &mut [u8], proto: u8, payload_len: usize, id: u16, ip: [u8; 4], peer: &[u8]) {
    out[0] = 0x45;
    out[1] = 0;
    put16(out, 2, (IP_LEN + payload_len) as u16);
    put16(out, 4, id);
    put16(out, 6, 0); // no fragments
    out[8] = 64; // TTL
    out[9] = proto;
    put16(out, 10, 0);
    out[12..16].copy_from_slice(&ip);
    out[16..20].copy_from_slice(peer);
    let sum = !ones_sum(&out[..IP_LEN]);
    put16(out, 10, sum);
}

/// IPv4 to `ip`: ICMP echo request → echo reply, UDP to port 7 → the same
/// payload back. Returns the IP length of the reply and its kind.
fn ipv4(p: &[u8], out: &mut [u8], ip: [u8; 4]) -> Option<(usize, Kind)> {
    if p.len() < IP_LEN || p[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(p[0] & 0xf) * 4;
    let total = usize::from(be16(p, 2));
    if ihl < IP_LEN
        || total < ihl
        || total > p.len()
        || be16(p, 6) & 0x3fff != 0 // a fragment
        || p[16..20] != ip
        || ones_sum(&p[..ihl]) != 0xffff
    {
        return None;
    }
    let (peer, id, data) = (&p[12..16], be16(p, 4), &p[ihl..total]);
    match p[9] {
        PROTO_ICMP if data.len() >= 8 && data[0] == 8 && data[1] == 0 => {
            let reply = &mut out[IP_LEN..IP_LEN + data.len()];
            reply.copy_from_slice(data);
            // Type 8 → 0: update the checksum incrementally (RFC 1624,
            // eqn. 3) instead of summing the whole payload again; a
            // request with a wrong checksum gets a wrong one back.
            reply[0] = 0;
            let old = be16(data, 2);
            put16(reply, 2, !ones_add(ones_add(!old, !0x0800), 0));
            ip_header(out, PROTO_ICMP, data.len(), id, ip, peer);
            Some((IP_LEN + data.len(), Kind::Icmp))
        }
        PROTO_UDP if data.len() >= 8 && be16(data, 2) == ECHO_PORT => {
            let len = usize::from(be16(data, 4));
            if len < 8 || len > data.len() {
                return None;
            }
            let reply = &mut out[IP_LEN..IP_LEN + len];
            reply[8..].copy_from_slice(&data[8..len]);
            put16(reply, 0, ECHO_PORT);
            reply[2..4].copy_from_slice(&data[0..2]);
            put16(reply, 4, len as u16);
            put16(reply, 6, 0); // no checksum
            ip_header(out, PROTO_UDP, len, id, ip, peer);
            Some((IP_LEN + len, Kind::Udp))
        }
        _ => None,
    }
}
