//! A [`Connection`] driven by hand (a driver's split ring written into guest RAM) against the
//! inflight-tracking test backend of `molt_tests::vu_backend`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use molt_tests::vu_backend::{VuBlkBackend, T_IN, T_OUT};
use molt_tests::TempDir;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Connection, EventFds};
use crate::config::MemoryConfig;
use devices::virtio::{GuestMemory, F_VERSION_1};

const WAIT: Duration = Duration::from_secs(20);
const SIZE: u16 = 16;
const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x11000;
const USED: u64 = 0x12000;
/// Per request slot `i`: header, one sector of data, status byte.
const BUFS: u64 = 0x20000;

/// The driver's side of one queue in guest RAM.
struct Driver {
    mem: GuestMemory,
    avail_idx: u16,
}

impl Driver {
    /// Fresh rings (all zero) and the queue as the transport hands them to the device.
    fn set_up(mem: &GuestMemory) -> (Driver, Queue) {
        mem.write_slice(&[0u8; 0x3000], GuestAddress(DESC)).unwrap();
        let mut q = Queue::new(SIZE).unwrap();
        q.set_size(SIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        let d = Driver {
            mem: mem.clone(),
            avail_idx: 0,
        };
        (d, q)
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .load(GuestAddress(USED + 2), Ordering::Acquire)
            .unwrap()
    }

    fn bufs(slot: u16) -> (GuestAddress, GuestAddress, GuestAddress) {
        let base = BUFS + u64::from(slot) * 0x1000;
        (
            GuestAddress(base),
            GuestAddress(base + 0x200),
            GuestAddress(base + 0x400),
        )
    }

    fn desc(&self, i: u16, addr: GuestAddress, len: u32, flags: u16) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.0.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&(i + 1).to_le_bytes());
        let at = GuestAddress(DESC + 16 * u64::from(i));
        self.mem.write_slice(&raw, at).unwrap();
    }

    /// Makes a one-sector request available on the chain at head `3 * slot`; writes carry
    /// `fill` in every byte.
    fn submit(&mut self, slot: u16, kind: u32, sector: u64, fill: u8) {
        let (header, data, status) = Self::bufs(slot);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, header).unwrap();
        self.mem.write_slice(&[fill; 512], data).unwrap();
        self.mem.write_obj(0xffu8, status).unwrap();
        let head = 3 * slot;
        let data_flags = if kind == T_IN { 2 } else { 0 };
        self.desc(head, header, 16, 1);
        self.desc(head + 1, data, 512, 1 | data_flags);
        self.desc(head + 2, status, 1, 2);
        let at = GuestAddress(AVAIL + 4 + 2 * u64::from(self.avail_idx % SIZE));
        self.mem.write_obj(head, at).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .store(self.avail_idx, GuestAddress(AVAIL + 2), Ordering::Release)
            .unwrap();
    }

    /// Waits until the used index reaches `idx`; returns the status and data of `slot`.
    fn wait_used(&self, idx: u16, slot: u16, backend: &VuBlkBackend) -> (u8, [u8; 512]) {
        let deadline = Instant::now() + WAIT;
        while self.used_idx() != idx {
            assert!(
                Instant::now() < deadline,
                "used index {} never became {idx}; backend: {:?}",
                self.used_idx(),
                backend.stats()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let (_, data, status) = Self::bufs(slot);
        let mut buf = [0u8; 512];
        self.mem.read_slice(&mut buf, data).unwrap();
        (self.mem.read_obj(status).unwrap(), buf)
    }
}

fn wait_until(what: &str, conn: &Connection, f: impl Fn(&super::ConnectionInfo) -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f(&conn.info()) {
        assert!(Instant::now() < deadline, "{what}: {:?}", conn.info().state);
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn connect(socket: &std::path::Path) -> Arc<Connection> {
    let fds = EventFds {
        call: EventFd::new(EFD_NONBLOCK).unwrap(),
        kicks: vec![EventFd::new(EFD_NONBLOCK).unwrap()],
    };
    Connection::connect(socket, fds).unwrap()
}

#[test]
fn requests_of_rings_the_driver_reset_are_not_resubmitted_into_its_new_rings() {
    let dir = TempDir::new("vhost-reset");
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    let socket = dir.join("vhost.sock");
    let ram = crate::memory::create(&MemoryConfig {
        size: 16 << 20,
        hugepages: false,
        prefault: false,
    })
    .unwrap();
    let mut first = VuBlkBackend::serve(&image, &socket).unwrap();
    let conn = connect(&socket);
    let (mut driver, queue) = Driver::set_up(&ram.mem);
    conn.activate(ram.mem.clone(), vec![queue], F_VERSION_1);
    driver.submit(0, T_OUT, 1, 0x5a);
    conn.kick(0);
    assert_eq!(
        driver.wait_used(1, 0, &first).0,
        0,
        "the first write failed"
    );
    // The backend dies holding the driver's next request, and the driver resets the device
    // before another backend comes.
    first.arm_crash();
    driver.submit(1, T_OUT, 2, 0xa5);
    conn.kick(0);
    first.wait_crash(WAIT).unwrap();
    wait_until("disconnected", &conn, |i| i.state == "disconnected");
    conn.deactivate();
    let second = VuBlkBackend::serve(&image, &socket).unwrap();
    wait_until("reconnected", &conn, |i| i.reconnects == 1);

    // New rings: the request the dead backend held belongs to the old ones.
    let (mut driver, queue) = Driver::set_up(&ram.mem);
    conn.activate(ram.mem.clone(), vec![queue], F_VERSION_1);
    driver.submit(2, T_IN, 1, 0);
    conn.kick(0);
    let (status, data) = driver.wait_used(1, 2, &second);
    assert_eq!(status, 0, "{:?}", second.stats());
    assert!(
        data.iter().all(|b| *b == 0x5a),
        "read back {:x?}",
        &data[..8]
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        driver.used_idx(),
        1,
        "completions the driver never asked for"
    );
    let stats = second.stats();
    assert!(stats.resubmitted.is_empty(), "{stats:?}");
    assert!(stats.errors.is_empty(), "{stats:?}");
    assert_eq!(conn.info().reconnects, 1);
}
