//! The virtio-mmio register file, driver bring-up rules and virtio-rng.

mod virtio_driver;

use devices::virtio::{MmioTransport, ModelState, Rng, RngState};
use vm_memory::{Bytes, GuestAddress};

use virtio_driver::*;

fn rng() -> Driver {
    Driver::new(Box::new(Rng::new()), memory())
}

#[test]
fn identification_registers() {
    let mut d = rng();
    assert_eq!(d.r32(0x00), 0x7472_6976);
    assert_eq!(d.r32(0x04), 2);
    assert_eq!(d.r32(0x08), 4);
    assert_eq!(d.r32(0x0c), 0x544c_4f4d);
    assert_eq!(d.device_features(), F_VERSION_1);
    assert_eq!(d.r32(0x34), 256);
    d.w32(0x30, 1);
    assert_eq!(d.r32(0x34), 0, "no second queue");
    assert_eq!(d.r32(0xb0), u32::MAX, "no shared memory");
    assert_eq!(d.r32(0xfc), 0);
    assert_eq!(d.t.queue_count(), 1);
    assert_eq!(d.t.backend_fd(), None);
    assert_eq!(MmioTransport::NOTIFY_OFFSET, 0x50);
}

#[test]
fn odd_register_accesses_are_ignored() {
    let mut d = rng();
    let mut b = [0xffu8; 2];
    d.t.read(0x00, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 4];
    d.t.read(0x02, &mut b);
    assert_eq!(b, [0; 4]);
    d.t.write(0x70, &[1]);
    d.t.write(0x72, &[1, 0, 0, 0]);
    assert_eq!(d.status(), 0);
    let mut b = [0xffu8; 8];
    d.t.read(0x5000, &mut b);
    assert_eq!(b, [0; 8]);
}

#[test]
fn features_ok_needs_version_1_and_offered_bits_only() {
    let mut d = rng();
    assert!(!d.negotiate(0), "legacy driver must be refused");
    // Negotiate masks with the offer; write an unoffered bit by hand.
    d.w32(0x70, 0);
    d.w32(0x70, S_ACK | S_DRIVER);
    d.w32(0x24, 0);
    d.w32(0x20, 1 << 3);
    d.w32(0x24, 1);
    d.w32(0x20, 1);
    d.w32(0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
    assert_eq!(d.status() & S_FEATURES_OK, 0);
    assert!(d.negotiate(F_VERSION_1));
}

#[test]
fn driver_ok_without_features_ok_is_refused() {
    let mut d = rng();
    d.w32(0x70, S_ACK | S_DRIVER);
    d.w32(0x70, S_ACK | S_DRIVER | S_DRIVER_OK);
    assert_eq!(d.status() & (S_DRIVER_OK | S_NEEDS_RESET), S_NEEDS_RESET);
}

fn refused_setup(f: impl FnOnce(&mut Driver)) {
    let mut d = rng();
    let mut other = Driver::with_region(Box::new(Rng::new()), d.mem.clone(), 1);
    other.init(u64::MAX);
    assert!(d.negotiate(u64::MAX));
    d.setup_queue(0, 16);
    f(&mut d);
    d.driver_ok();
    assert_eq!(d.status() & (S_DRIVER_OK | S_NEEDS_RESET), S_NEEDS_RESET);
    assert_ne!(d.ack_interrupt() & 2, 0);
    // Notifications are ignored, the other device works.
    let b = d.alloc(8, 0);
    d.add(0, &[wr(b, 8)]);
    d.kick(0);
    assert!(d.used(0).is_empty());
    let b = other.alloc(8, 0);
    other.add(0, &[wr(b, 8)]);
    other.kick(0);
    assert_eq!(other.used(0).len(), 1);
    // After a reset, a correct bring-up works.
    d.init(u64::MAX);
    let b = d.alloc(8, 0);
    d.add(0, &[wr(b, 8)]);
    d.kick(0);
    assert_eq!(d.used(0).len(), 1);
}

#[test]
fn queue_size_not_a_power_of_two_refuses_driver_ok() {
    refused_setup(|d| {
        d.w32(0x30, 0);
        d.w32(0x38, 100);
    });
}

#[test]
fn queue_size_above_max_or_zero_refuses_driver_ok() {
    refused_setup(|d| d.w32(0x38, 512));
    refused_setup(|d| d.w32(0x38, 0));
    refused_setup(|d| d.w32(0x38, 0x1_0000));
}

#[test]
fn misaligned_ring_refuses_driver_ok() {
    refused_setup(|d| {
        let desc = d.vqs[0].desc;
        d.w32(0x80, desc as u32 + 8);
        // Writing the high half afterwards must not hide the error.
        d.w32(0x84, 0);
    });
}

#[test]
fn ring_outside_ram_refuses_driver_ok() {
    refused_setup(|d| {
        d.w32(0xa0, MEM_SIZE as u32 - 64);
    });
    refused_setup(|d| {
        d.w32(0x94, 1);
    });
}

#[test]
fn unready_queues_and_unknown_queues_are_ignored() {
    let mut d = rng();
    assert!(d.negotiate(u64::MAX));
    d.driver_ok();
    assert_eq!(d.status() & S_DRIVER_OK, S_DRIVER_OK);
    d.kick(0);
    d.kick(7);
    d.t.notify(1000);
    assert_eq!(d.irq_count(), 0);
    assert_eq!(d.status() & S_NEEDS_RESET, 0);
}

#[test]
fn notify_before_driver_ok_does_nothing() {
    let mut d = rng();
    assert!(d.negotiate(u64::MAX));
    d.setup_queue(0, 16);
    let b = d.alloc(8, 0);
    d.add(0, &[wr(b, 8)]);
    d.kick(0);
    assert!(d.used(0).is_empty());
    d.driver_ok();
    d.kick(0);
    assert_eq!(d.used(0).len(), 1);
}

#[test]
fn rng_fills_buffers() {
    let mut d = rng();
    d.init(u64::MAX);
    let a = d.alloc(256, 0);
    let b = d.alloc(100, 0);
    let c = d.alloc(300, 0);
    let h1 = d.add(0, &[wr(a, 256)]);
    let h2 = d.add(0, &[wr(b, 100), wr(c, 300)]);
    d.kick(0);
    assert_eq!(d.used(0), vec![(h1.into(), 256), (h2.into(), 400)]);
    let (ra, rb, rc) = (d.read(a, 256), d.read(b, 100), d.read(c, 300));
    assert!(ra.iter().filter(|&&x| x == 0).count() < 16);
    assert!(rc.iter().filter(|&&x| x == 0).count() < 16);
    assert_ne!(&ra[..100], &rb[..]);
    assert_eq!(d.ack_interrupt(), 1);
    assert_eq!(d.r32(0x60), 0);
    assert_eq!(d.irq_count(), 1);
    // A buffer outside RAM is returned empty.
    let h = d.add(0, &[wr(MEM_SIZE as u64 - 8, 64)]);
    d.kick(0);
    assert_eq!(d.used(0), vec![(h.into(), 0)]);
}

#[test]
fn rng_state_round_trip() {
    let mut d = rng();
    d.init(u64::MAX);
    let a = d.alloc(32, 0);
    d.add(0, &[wr(a, 32)]);
    d.kick(0);
    assert_eq!(d.used(0).len(), 1);
    d.ack_interrupt();
    let b = d.alloc(32, 0);
    d.add(0, &[wr(b, 32)]);
    let state = d.t.state();
    assert_eq!(state.device, ModelState::Rng(RngState {}));
    assert_eq!(state.queues[0].next_avail, 1);
    let json = serde_json::to_value(&state).unwrap();
    assert_eq!(json["device"]["type"], "Rng");
    let mem = d.mem.clone();
    d.rebuild(mem, |_| Box::new(Rng::new()));
    assert_eq!(d.status() & S_DRIVER_OK, S_DRIVER_OK);
    d.t.resume();
    assert_eq!(d.used(0).len(), 1);
    assert_eq!(d.irq_count(), 1);
    assert_eq!(d.t.state().queues[0].next_used, 2);
}

#[test]
fn restore_rejects_mismatched_state() {
    let mut d = rng();
    d.init(u64::MAX);
    let state = d.t.state();
    let mut bad = state.clone();
    bad.device_type = 2;
    let (_, irq) = irq_counter();
    assert!(MmioTransport::from_state(&bad, Box::new(Rng::new()), d.mem.clone(), irq).is_err());
    let mut bad = state.clone();
    bad.queues.push(bad.queues[0]);
    let (_, irq) = irq_counter();
    assert!(MmioTransport::from_state(&bad, Box::new(Rng::new()), d.mem.clone(), irq).is_err());
    let mut bad = state.clone();
    bad.queues[0].size = 3;
    let (_, irq) = irq_counter();
    assert!(MmioTransport::from_state(&bad, Box::new(Rng::new()), d.mem.clone(), irq).is_err());
    let mut bad = state;
    bad.queues[0].used_ring = MEM_SIZE as u64;
    let (_, irq) = irq_counter();
    assert!(MmioTransport::from_state(&bad, Box::new(Rng::new()), d.mem.clone(), irq).is_err());
}

#[test]
fn resume_reraises_a_pending_interrupt() {
    let mut d = rng();
    d.init(u64::MAX);
    let a = d.alloc(32, 0);
    d.add(0, &[wr(a, 32)]);
    d.kick(0);
    assert_eq!(d.r32(0x60), 1);
    let mem = d.mem.clone();
    d.rebuild(mem, |_| Box::new(Rng::new()));
    assert_eq!(d.irq_count(), 0);
    d.t.resume();
    assert_eq!(d.irq_count(), 1);
    assert_eq!(d.ack_interrupt(), 1);
    let used_idx: u16 = d.mem.read_obj(GuestAddress(d.vqs[0].used + 2)).unwrap();
    assert_eq!(used_idx, 1);
}
