//! Property tests (fuzzing without coverage guidance) of the descriptor-chain walker: a
//! driver may write anything into its rings and descriptor table; taking chains from them
//! ends (loops included), and a device that checks [`in_ram`] never touches memory outside
//! guest RAM. `PROPTEST_CASES` sets the number of cases (docs/fuzz/README.md).

use proptest::prelude::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::GuestMemory;

/// Two RAM ranges with a hole between them and nothing above: buffers can be inside,
/// straddle an edge, or be outside.
const RAM: [(u64, usize); 2] = [(0, 0x1_0000), (0x2_0000, 0x1_0000)];

/// An address near something interesting.
fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..0x3_0000,
        1 => (0u64..0x40).prop_map(|d| 0x1_0000 - d),
        1 => (0u64..0x40).prop_map(|d| 0x3_0000 - d),
        1 => any::<u64>(),
        1 => (0u64..0x40).prop_map(|d| u64::MAX - d),
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0u32..0x200, 1 => 0u32..0x2_0000, 1 => any::<u32>()]
}

/// One raw descriptor: address, length, flags (mostly NEXT/WRITE/INDIRECT), next.
fn descriptor() -> impl Strategy<Value = (u64, u32, u16, u16)> {
    let flags = prop_oneof![
        4 => proptest::sample::select(vec![
            0u16,
            VRING_DESC_F_NEXT as u16,
            VRING_DESC_F_WRITE as u16,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            VRING_DESC_F_INDIRECT as u16,
        ]),
        1 => any::<u16>(),
    ];
    (
        addr(),
        len(),
        flags,
        prop_oneof![4 => 0u16..32, 1 => any::<u16>()],
    )
}

/// What a driver may have written: queue size and placement, descriptors, available ring.
#[derive(Debug, Clone)]
struct Setup {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    avail_idx: u16,
    ring: Vec<u16>,
    table: Vec<(u64, u32, u16, u16)>,
    /// Extra descriptors written at random places, for indirect tables to find.
    scattered: Vec<(u64, (u64, u32, u16, u16))>,
}

fn setup() -> impl Strategy<Value = Setup> {
    let size = (0u32..=8).prop_map(|s| 1u16 << s);
    size.prop_flat_map(|size| {
        let n = usize::from(size);
        (
            Just(size),
            prop_oneof![4 => Just(0x1000u64), 1 => addr()],
            prop_oneof![4 => Just(0x5000u64), 1 => addr()],
            prop_oneof![4 => Just(0x6000u64), 1 => addr()],
            any::<u16>(),
            prop_oneof![2 => 0u16..=(size * 2), 1 => any::<u16>()],
            proptest::collection::vec(prop_oneof![4 => 0..size, 1 => any::<u16>()], n),
            proptest::collection::vec(descriptor(), n),
            proptest::collection::vec((addr(), descriptor()), 0..8),
        )
    })
    .prop_map(
        |(size, desc, avail, used, next_avail, idx, ring, table, scattered)| Setup {
            size,
            desc,
            avail,
            used,
            // Usually the driver's index is a little ahead of the device's.
            next_avail: idx.wrapping_sub(next_avail % (size * 2).max(1)),
            avail_idx: idx,
            ring,
            table,
            scattered,
        },
    )
}

fn write_descriptor(mem: &GuestMemory, at: u64, d: (u64, u32, u16, u16)) {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&d.0.to_le_bytes());
    raw[8..12].copy_from_slice(&d.1.to_le_bytes());
    raw[12..14].copy_from_slice(&d.2.to_le_bytes());
    raw[14..].copy_from_slice(&d.3.to_le_bytes());
    // Outside RAM the write fails: that descriptor is simply not there.
    let _ = mem.write_slice(&raw, GuestAddress(at));
}

/// Guest memory and a ready queue as `s` describes them.
fn build(s: &Setup) -> (GuestMemory, Queue) {
    let ranges: Vec<_> = RAM.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem = GuestMemory::from_ranges(&ranges).unwrap();
    for (i, d) in s.table.iter().enumerate() {
        write_descriptor(&mem, s.desc.wrapping_add(16 * i as u64), *d);
    }
    for (at, d) in &s.scattered {
        write_descriptor(&mem, *at, *d);
    }
    let _ = mem.write_obj(s.avail_idx, GuestAddress(s.avail.wrapping_add(2)));
    for (i, e) in s.ring.iter().enumerate() {
        let _ = mem.write_obj(*e, GuestAddress(s.avail.wrapping_add(4 + 2 * i as u64)));
    }
    let mut q = Queue::new(256).unwrap();
    q.try_set_size(s.size).unwrap();
    // A misaligned or unreachable address is refused by the transport; keep the default.
    let _ = q.try_set_desc_table_address(GuestAddress(s.desc));
    let _ = q.try_set_avail_ring_address(GuestAddress(s.avail));
    let _ = q.try_set_used_ring_address(GuestAddress(s.used));
    q.set_next_avail(s.next_avail);
    q.set_ready(true);
    (mem, q)
}

/// What a device does with a chain: checks its buffers are RAM and only then touches them.
fn serve(mem: &GuestMemory, chain: &Chain) -> Result<u32, TestCaseError> {
    for (segments, total) in [
        (&chain.readable, chain.readable_len()),
        (&chain.writable, chain.writable_len()),
    ] {
        let mut buf = vec![0u8; total.min(0x4000) as usize];
        if in_ram(mem, segments) {
            let n = Cursor::new(segments).read(mem, &mut buf);
            prop_assert_eq!(n.ok(), Some(buf.len()), "buffers in RAM must be readable");
            let n = Cursor::new(segments).write(mem, &buf);
            prop_assert_eq!(n.ok(), Some(buf.len()), "buffers in RAM must be writable");
        }
    }
    Ok(chain.writable_len().min(u64::from(u32::MAX)) as u32)
}

proptest! {
    #[test]
    fn chains_from_any_driver_end_and_stay_in_ram(s in setup()) {
        let (mem, mut q) = build(&s);
        // At most the ring's worth of chains per call, plus one answer that ends the loop.
        for _ in 0..=usize::from(s.size) + 1 {
            match pop(&mut q, &mem) {
                Ok(Some(chain)) => {
                    prop_assert!(chain.head < s.size, "head {} of a size-{} queue", chain.head, s.size);
                    // A direct chain visits each descriptor at most once, and an indirect
                    // table must lie in one 64 KiB RAM range: at most 4096 more.
                    let n = chain.readable.len() + chain.writable.len();
                    prop_assert!(n <= usize::from(s.size) + 4096, "{n} segments");
                    let len = serve(&mem, &chain)?;
                    if complete(&mut q, &mem, chain.head, len).is_err() {
                        return Ok(());
                    }
                }
                Ok(None) | Err(_) => return Ok(()),
            }
        }
        let ahead = s.avail_idx.wrapping_sub(s.next_avail);
        prop_assert!(false, "more chains than the ring holds ({ahead} announced)");
    }

    #[test]
    fn descriptor_loops_are_broken_chains(
        size in (1u32..=8).prop_map(|s| 1u16 << s),
        start in any::<prop::sample::Index>(),
        back in any::<prop::sample::Index>(),
        write in any::<bool>(),
    ) {
        // Descriptors 0..=end chained in order, the last pointing back to `to`.
        let end = start.index(usize::from(size)) as u16;
        let to = back.index(usize::from(end) + 1) as u16;
        let flags = VRING_DESC_F_NEXT as u16 | if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        let table = (0..size)
            .map(|i| (0x8000, 16, flags, if i == end { to } else { i + 1 }))
            .collect();
        let s = Setup {
            size,
            desc: 0x1000,
            avail: 0x5000,
            used: 0x6000,
            next_avail: 0,
            avail_idx: 1,
            ring: vec![0; usize::from(size)],
            table,
            scattered: vec![],
        };
        let (mem, mut q) = build(&s);
        prop_assert!(matches!(pop(&mut q, &mem), Err(QueueFault::BrokenChain(0))));
    }
}
