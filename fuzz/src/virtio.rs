//! virtio rings as a guest driver writes them, through the virtio-mmio transport of an
//! entropy device: register writes set the queue up, the rest of the input is guest RAM
//! (descriptor table, rings, buffers), and notifications make the device walk the chains.
//! Also the transport's saved state, as a restore rebuilds it from a record.

use devices::virtio::{GuestMemory, MmioState, MmioTransport, Rng};
use vm_memory::{Bytes, GuestAddress};

/// Two RAM ranges with a hole between them: buffers may lie in RAM, across an edge, or
/// outside.
const RAM: [(u64, usize); 2] = [(0, 0x1_0000), (0x2_0000, 0x1_0000)];

const STATUS_ACK_DRIVER: u32 = 1 | 2;
const FEATURES_OK: u32 = 8;
const DRIVER_OK: u32 = 4;

fn memory() -> GuestMemory {
    let ranges: Vec<_> = RAM.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    GuestMemory::from_ranges(&ranges).expect("fixed RAM layout")
}

fn w(t: &mut MmioTransport, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// Byte 0 chooses the mode: below 0xf0, a driver: queue size `1 << (byte % 9)`, then the
/// descriptor table, available and used ring offsets (u16 each, scaled by 16, 2 and 4), the
/// number of notifications, and guest RAM. From 0xf0, the rest is a saved transport state
/// (JSON) restored over RAM and notified.
pub fn virtio(data: &[u8]) {
    match data.split_first() {
        Some((&mode, rest)) if mode >= 0xf0 => restore(rest),
        Some((&mode, rest)) => drive(mode, rest),
        None => {}
    }
}

fn drive(mode: u8, data: &[u8]) {
    let [d0, d1, a0, a1, u0, u1, rounds, ram @ ..] = data else {
        return;
    };
    let mem = memory();
    let (low, high) = ram.split_at(ram.len().min(RAM[0].1));
    mem.write_slice(low, GuestAddress(0))
        .expect("fits the first range");
    let high = &high[..high.len().min(RAM[1].1)];
    mem.write_slice(high, GuestAddress(RAM[1].0))
        .expect("fits the second range");

    let mut t = MmioTransport::new(Box::new(Rng::new()), mem.clone(), Box::new(|| {}));
    w(&mut t, 0x70, STATUS_ACK_DRIVER);
    w(&mut t, 0x24, 1);
    w(&mut t, 0x20, 1); // VIRTIO_F_VERSION_1 (bit 32)
    w(&mut t, 0x70, STATUS_ACK_DRIVER | FEATURES_OK);
    w(&mut t, 0x30, 0);
    w(&mut t, 0x38, 1 << (mode % 9));
    w(&mut t, 0x80, u32::from(u16::from_le_bytes([*d0, *d1])) * 16);
    w(&mut t, 0x90, u32::from(u16::from_le_bytes([*a0, *a1])) * 2);
    w(&mut t, 0xa0, u32::from(u16::from_le_bytes([*u0, *u1])) * 4);
    w(&mut t, 0x44, 1);
    w(&mut t, 0x70, STATUS_ACK_DRIVER | FEATURES_OK | DRIVER_OK);
    for _ in 0..=rounds % 4 {
        t.notify(0);
        let mut isr = [0u8; 4];
        t.read(0x60, &mut isr);
        t.write(0x64, &isr);
    }
    // The state a live update would carry restores to the same transport.
    let state = t.state();
    let json = serde_json::to_vec(&state).expect("a state serializes");
    let back: MmioState = serde_json::from_slice(&json).expect("a saved state reads back");
    assert_eq!(back, state);
    drop(t);
    if let Ok(mut t) = MmioTransport::from_state(&back, Box::new(Rng::new()), mem, Box::new(|| {}))
    {
        t.resume();
        t.notify(0);
        assert_eq!(t.state().device_type, state.device_type);
    }
}

fn restore(json: &[u8]) {
    let Ok(state) = serde_json::from_slice::<MmioState>(json) else {
        return;
    };
    match MmioTransport::from_state(&state, Box::new(Rng::new()), memory(), Box::new(|| {})) {
        Ok(mut t) => {
            t.resume();
            t.notify(0);
            let mut buf = [0u8; 4];
            for offset in (0..0x100).step_by(4) {
                t.read(offset, &mut buf);
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}
