//! virtio-blk through the MMIO transport, driven like a guest driver would.

mod virtio_driver;

use std::fs::File;
use std::os::unix::fs::FileExt;

use devices::virtio::{Block, ModelState, Rng};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use virtio_driver::*;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const SECTORS: u64 = 64;

fn disk() -> (TempFile, File) {
    let tf = TempFile::new().unwrap();
    let f = tf.as_file().try_clone().unwrap();
    f.set_len(SECTORS * 512).unwrap();
    // Recognizable contents: every byte holds its sector number.
    for s in 0..SECTORS {
        f.write_all_at(&[s as u8; 512], s * 512).unwrap();
    }
    (tf, f)
}

fn driver(file: File, read_only: bool) -> Driver {
    let blk = Block::new(file, read_only, "molt-disk-1".into()).unwrap();
    let mut d = Driver::new(Box::new(blk), memory());
    d.init(u64::MAX);
    d
}

fn header(d: &mut Driver, kind: u32, sector: u64) -> u64 {
    let a = d.alloc(16, 0);
    d.mem.write_obj(kind, GuestAddress(a)).unwrap();
    d.mem.write_obj(sector, GuestAddress(a + 8)).unwrap();
    a
}

/// Submits a request with one data buffer and runs it; returns (status, used len).
fn request(d: &mut Driver, kind: u32, sector: u64, data: Option<Buf>) -> (u8, u32) {
    let h = header(d, kind, sector);
    let st = d.alloc(1, 0xff);
    let mut bufs = vec![rd(h, 16)];
    bufs.extend(data);
    bufs.push(wr(st, 1));
    let head = d.add(0, &bufs);
    d.kick(0);
    let used = d.used(0);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].0, u32::from(head));
    (d.byte(st), used[0].1)
}

fn file_bytes(f: &File, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    f.read_exact_at(&mut v, off).unwrap();
    v
}

#[test]
fn config_and_features() {
    let (_tf, f) = disk();
    let mut d = Driver::new(
        Box::new(Block::new(f.try_clone().unwrap(), false, String::new()).unwrap()),
        memory(),
    );
    assert_eq!(d.r32(0x08), 2);
    let feats = d.device_features();
    assert_ne!(feats & F_VERSION_1, 0);
    assert_ne!(feats & F_FLUSH, 0);
    assert_eq!(feats & F_RO, 0);
    assert_eq!(d.r32(0x100), SECTORS as u32);
    assert_eq!(d.r32(0x104), 0);
    assert_eq!(d.r32(0x100 + 20), 512);
    assert_eq!(d.r32(0x100 + 12), 254);
    let mut b = [0u8; 8];
    d.t.read(0x100, &mut b);
    assert_eq!(u64::from_le_bytes(b), SECTORS);
    let ro = Driver::new(
        Box::new(Block::new(f, true, String::new()).unwrap()),
        memory(),
    )
    .device_features();
    assert_ne!(ro & F_RO, 0);
}

#[test]
fn write_read_flush_get_id() {
    let (_tf, f) = disk();
    let mut d = driver(f.try_clone().unwrap(), false);
    let data = d.alloc(1024, 0xab);
    assert_eq!(request(&mut d, T_OUT, 3, Some(rd(data, 1024))), (S_OK, 1));
    assert_eq!(file_bytes(&f, 3 * 512, 1024), vec![0xab; 1024]);
    assert_eq!(file_bytes(&f, 5 * 512, 512), vec![5; 512]);
    assert_eq!(d.ack_interrupt(), 1);

    let buf = d.alloc(1536, 0);
    assert_eq!(request(&mut d, T_IN, 2, Some(wr(buf, 1536))), (S_OK, 1537));
    let got = d.read(buf, 1536);
    assert_eq!(&got[..512], &[2; 512][..]);
    assert_eq!(&got[512..], &[0xab; 1024][..]);

    assert_eq!(request(&mut d, T_FLUSH, 0, None), (S_OK, 1));
    let id = d.alloc(20, 0xff);
    assert_eq!(request(&mut d, T_GET_ID, 0, Some(wr(id, 20))), (S_OK, 21));
    let mut want = b"molt-disk-1".to_vec();
    want.resize(20, 0);
    assert_eq!(d.read(id, 20), want);
    assert!(d.irq_count() >= 4);
}

#[test]
fn scattered_buffers_and_status_sharing_a_descriptor() {
    let (_tf, f) = disk();
    let mut d = driver(f.try_clone().unwrap(), false);
    // Header split in two, data in three pieces, the last one also holding the status.
    let h = header(&mut d, T_IN, 7);
    let a = d.alloc(100, 0);
    let b = d.alloc(400, 0);
    let c = d.alloc(13, 0xff);
    let head = d.add(
        0,
        &[rd(h, 10), rd(h + 10, 6), wr(a, 100), wr(b, 400), wr(c, 13)],
    );
    d.kick(0);
    assert_eq!(d.used(0), vec![(u32::from(head), 513)]);
    assert_eq!(d.byte(c + 12), S_OK);
    assert_eq!(d.read(a, 100), vec![7; 100]);
    assert_eq!(d.read(b, 400), vec![7; 400]);
    assert_eq!(d.read(c, 12), vec![7; 12]);
}

#[test]
fn read_only_disk_rejects_writes() {
    let (_tf, f) = disk();
    let mut d = driver(f.try_clone().unwrap(), true);
    let data = d.alloc(512, 0xcc);
    assert_eq!(request(&mut d, T_OUT, 1, Some(rd(data, 512))).0, S_IOERR);
    assert_eq!(file_bytes(&f, 512, 512), vec![1; 512]);
    let buf = d.alloc(512, 0);
    assert_eq!(request(&mut d, T_IN, 1, Some(wr(buf, 512))).0, S_OK);
    assert_eq!(request(&mut d, T_FLUSH, 0, None).0, S_OK);
}

#[test]
fn bad_requests_fail_without_touching_the_file() {
    let (_tf, f) = disk();
    let mut d = driver(f.try_clone().unwrap(), false);
    let data = d.alloc(1024, 0xee);
    let before = file_bytes(&f, 0, (SECTORS * 512) as usize);
    // Out of range, overflowing, odd and empty lengths, unknown type.
    assert_eq!(
        request(&mut d, T_OUT, SECTORS - 1, Some(rd(data, 1024))).0,
        S_IOERR
    );
    assert_eq!(
        request(&mut d, T_OUT, u64::MAX, Some(rd(data, 512))).0,
        S_IOERR
    );
    assert_eq!(
        request(&mut d, T_IN, SECTORS, Some(wr(data, 512))).0,
        S_IOERR
    );
    assert_eq!(request(&mut d, T_OUT, 0, Some(rd(data, 100))).0, S_IOERR);
    assert_eq!(request(&mut d, T_OUT, 0, Some(rd(data, 0))).0, S_IOERR);
    assert_eq!(request(&mut d, T_OUT, 0, None).0, S_IOERR);
    assert_eq!(request(&mut d, 99, 0, None), (S_UNSUPP, 1));
    // Wrong directions: a read into a device-readable buffer, a write from a writable one.
    assert_eq!(request(&mut d, T_IN, 0, Some(rd(data, 512))).0, S_IOERR);
    assert_eq!(request(&mut d, T_OUT, 0, Some(wr(data, 512))).0, S_IOERR);
    // Data outside RAM, and straddling its end.
    let beyond = MEM_SIZE as u64 + 0x1000;
    assert_eq!(request(&mut d, T_OUT, 0, Some(rd(beyond, 512))).0, S_IOERR);
    assert_eq!(
        request(&mut d, T_IN, 0, Some(wr(MEM_SIZE as u64 - 256, 512))).0,
        S_IOERR
    );
    assert_eq!(
        request(&mut d, T_OUT, 0, Some(rd(u64::MAX - 100, 512))).0,
        S_IOERR
    );
    // Short header.
    let st = d.alloc(1, 0xff);
    let h = header(&mut d, T_OUT, 0);
    d.add(0, &[rd(h, 8), rd(data, 512), wr(st, 1)]);
    d.kick(0);
    assert_eq!(d.used(0).len(), 1);
    assert_eq!(d.byte(st), S_IOERR);
    // Readable after writable.
    let st = d.alloc(1, 0xff);
    let h = header(&mut d, T_IN, 0);
    d.add(0, &[rd(h, 16), wr(data, 512), rd(data, 16), wr(st, 1)]);
    d.kick(0);
    d.used(0);
    assert_eq!(d.byte(st), S_IOERR);
    assert_eq!(file_bytes(&f, 0, (SECTORS * 512) as usize), before);
    assert_eq!(d.status() & S_NEEDS_RESET, 0);
}

#[test]
fn unusable_status_byte_drops_the_request() {
    let (_tf, f) = disk();
    let mut d = driver(f.try_clone().unwrap(), false);
    let data = d.alloc(512, 0x11);
    let h = header(&mut d, T_OUT, 0);
    // No writable descriptor at all, a zero-length one, and one outside RAM.
    let h1 = d.add(0, &[rd(h, 16), rd(data, 512)]);
    let h2 = d.add(0, &[rd(h, 16), rd(data, 512), wr(data, 0)]);
    let h3 = d.add(0, &[rd(h, 16), rd(data, 512), wr(MEM_SIZE as u64, 1)]);
    d.kick(0);
    let used = d.used(0);
    assert_eq!(used, vec![(h1.into(), 0), (h2.into(), 0), (h3.into(), 0)]);
    assert_eq!(file_bytes(&f, 0, 512), vec![0; 512]);
    // And the device goes on.
    let buf = d.alloc(512, 0);
    assert_eq!(request(&mut d, T_IN, 9, Some(wr(buf, 512))).0, S_OK);
}

/// A second device on the same RAM, to show it keeps working when the disk breaks.
fn rng_neighbour(mem: &vm_memory::GuestMemoryMmap) -> Driver {
    let mut r = Driver::with_region(Box::new(Rng::new()), mem.clone(), 1);
    r.init(u64::MAX);
    r
}

fn rng_works(r: &mut Driver) {
    let b = r.alloc(64, 0);
    r.add(0, &[wr(b, 64)]);
    r.kick(0);
    assert_eq!(r.used(0).last().map(|u| u.1), Some(64));
}

#[test]
fn descriptor_loop_needs_reset_and_recovers() {
    let (_tf, f) = disk();
    let mut d = driver(f.try_clone().unwrap(), false);
    let mut r = rng_neighbour(&d.mem);
    let h = header(&mut d, T_IN, 0);
    let data = d.alloc(512, 0);
    // 0 -> 1 -> 0 -> ...
    d.write_desc(0, 0, h, 16, DESC_F_NEXT, 1);
    d.write_desc(0, 1, data, 512, DESC_F_NEXT | DESC_F_WRITE, 0);
    d.publish(0, 0);
    d.kick(0);
    assert_ne!(d.status() & S_NEEDS_RESET, 0);
    assert_ne!(d.ack_interrupt() & 2, 0, "configuration interrupt expected");
    assert!(d.used(0).is_empty());
    // Further notifications are ignored, the neighbour is unaffected.
    d.kick(0);
    rng_works(&mut r);
    // A reset and a new bring-up make the disk usable again.
    d.init(u64::MAX);
    let buf = d.alloc(512, 0);
    assert_eq!(request(&mut d, T_IN, 4, Some(wr(buf, 512))).0, S_OK);
    assert_eq!(d.read(buf, 512), vec![4; 512]);
}

#[test]
fn next_index_past_the_queue_needs_reset() {
    let (_tf, f) = disk();
    let mut d = driver(f, false);
    let h = header(&mut d, T_IN, 0);
    d.write_desc(0, 0, h, 16, DESC_F_NEXT, 5000);
    d.publish(0, 0);
    d.kick(0);
    assert_ne!(d.status() & S_NEEDS_RESET, 0);
}

#[test]
fn head_index_past_the_queue_needs_reset() {
    let (_tf, f) = disk();
    let mut d = driver(f, false);
    d.publish(0, 999);
    d.kick(0);
    assert_ne!(d.status() & S_NEEDS_RESET, 0);
}

#[test]
fn avail_index_running_ahead_needs_reset() {
    let (_tf, f) = disk();
    let mut d = driver(f, false);
    let avail = d.vqs[0].avail;
    d.mem.write_obj(500u16, GuestAddress(avail + 2)).unwrap();
    d.kick(0);
    assert_ne!(d.status() & S_NEEDS_RESET, 0);
}

/// Half the requests run before the state is taken, half after it is restored in a "new
/// process" (another mapping of the same RAM): each completes exactly once.
#[test]
fn state_round_trip_completes_every_request_once() {
    let (_tf, f) = disk();
    let ram = TempFile::new().unwrap();
    let mem = file_memory(ram.as_file());
    let blk = Block::new(f.try_clone().unwrap(), false, "rt".into()).unwrap();
    let mut d = Driver::new(Box::new(blk), mem);
    d.init(u64::MAX);

    let mut statuses = Vec::new();
    let mut submit = |d: &mut Driver, i: u64| {
        let data = d.alloc(512, 0x40 + i as u8);
        let h = header(d, T_OUT, 10 + i);
        let st = d.alloc(1, 0xff);
        d.add(0, &[rd(h, 16), rd(data, 512), wr(st, 1)]);
        statuses.push(st);
    };
    for i in 0..4 {
        submit(&mut d, i);
    }
    d.kick(0);
    assert_eq!(d.used(0).len(), 4);
    // Four more are queued; their notification is "lost" in the update.
    for i in 4..8 {
        submit(&mut d, i);
    }

    let mem2 = file_memory(ram.as_file());
    let file = f.try_clone().unwrap();
    d.rebuild(mem2, |s| match s {
        ModelState::Block(b) => Box::new(Block::from_state(b, file).unwrap()),
        other => panic!("unexpected {other:?}"),
    });
    d.t.resume();
    let used = d.used(0);
    assert_eq!(used.len(), 4);
    assert!(d.irq_count() >= 1);
    d.kick(0);
    assert!(d.used(0).is_empty(), "nothing may run twice");
    for (i, st) in statuses.iter().enumerate() {
        assert_eq!(d.byte(*st), S_OK, "request {i}");
        assert_eq!(
            file_bytes(&f, (10 + i as u64) * 512, 512),
            vec![0x40 + i as u8; 512]
        );
    }
    let st = d.t.state();
    assert_eq!((st.queues[0].next_avail, st.queues[0].next_used), (8, 8));
}

#[test]
fn state_before_driver_ok_restores_setup() {
    let (_tf, f) = disk();
    let mem = memory();
    let mut d = Driver::new(
        Box::new(Block::new(f.try_clone().unwrap(), false, "x".into()).unwrap()),
        mem.clone(),
    );
    assert!(d.negotiate(u64::MAX));
    d.setup_queue(0, 32);
    d.rebuild(mem, |s| match s {
        ModelState::Block(b) => Box::new(Block::from_state(b, f.try_clone().unwrap()).unwrap()),
        other => panic!("unexpected {other:?}"),
    });
    d.w32(0x30, 0);
    assert_eq!(d.r32(0x44), 1);
    d.driver_ok();
    assert_eq!(d.status() & S_DRIVER_OK, S_DRIVER_OK);
    let buf = d.alloc(512, 0);
    assert_eq!(request(&mut d, T_IN, 6, Some(wr(buf, 512))).0, S_OK);
    assert_eq!(d.read(buf, 512), vec![6; 512]);
}
