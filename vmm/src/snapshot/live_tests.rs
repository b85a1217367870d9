//! Tests of live snapshots: the memory file holds RAM as of the freeze while another thread
//! rewrites it, with 4 KiB and 2 MiB pages.

use std::fs::File;

use vm_memory::{Bytes, GuestAddress};

use super::super::ram::open_checked;
use super::super::ram_write::{write_region, WriteCtx};
use super::super::SnapshotMode;
use super::*;
use crate::config::MemoryConfig;

#[test]
fn the_snapshot_is_memory_as_of_the_freeze_while_another_thread_writes() {
    snapshot_while_another_thread_writes(false);
}

#[test]
fn the_snapshot_of_huge_pages_is_memory_as_of_the_freeze_while_another_thread_writes() {
    // 16 MiB of 2 MiB pages: every page the other thread writes is saved whole, and
    // written ahead of the chunks in order.
    let _pool = match molt_tests::hugepages::Reservation::ensure(8) {
        Ok(p) => p,
        Err(why) => return molt_tests::skip("hugetlb RAM", &why),
    };
    snapshot_while_another_thread_writes(true);
}

fn snapshot_while_another_thread_writes(hugepages: bool) {
    let cfg = MemoryConfig {
        size: 16 << 20,
        hugepages,
        prefault: false,
    };
    let ram = crate::memory::create(&cfg).unwrap();
    // Data in the first 8 MiB; the rest is never touched before arming.
    for i in 0..(8u64 << 20) / 4096 {
        ram.mem.write_obj(i, GuestAddress(i * 4096)).unwrap();
    }
    let mut sources = RegionSource::all(&ram).unwrap();
    let progress = Arc::new(Progress::new(SnapshotMode::Live, "/x".into(), 16 << 20));
    let mut armed = match arm(&ram, progress.clone()) {
        Ok(a) => a,
        Err(e) => {
            return molt_tests::skip("live snapshot (userfaultfd write-protect)", &e.to_string())
        }
    };
    // Armed but not frozen: writes go through (tracked), data and holes alike, and are
    // part of the snapshot.
    for i in (0..1024u64).chain(3072..3080) {
        ram.mem.write_obj(i + 1000, GuestAddress(i * 4096)).unwrap();
    }
    armed.freeze().unwrap();
    RegionSource::find_data(&mut sources).unwrap();
    // Another thread rewrites every page, data and holes, from the end, while the region
    // is written from the start; each write waits until the fault thread has saved the
    // page.
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in (0..(16u64 << 20) / 4096).rev() {
                ram.mem.write_obj(!i, GuestAddress(i * 4096)).unwrap();
            }
        });
        let dir = std::env::temp_dir().join(format!(
            "molt-live-{}-{}",
            std::process::id(),
            if hugepages { "2m" } else { "4k" }
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("ram0.mem");
        let ctx = WriteCtx {
            progress: &progress,
            gate: Some(armed.gate()),
        };
        let desc = write_region(&sources[0], &path, &ctx).unwrap();
        let file: File = open_checked(&dir, &desc, 16 << 20).unwrap();
        let mut word = [0u8; 8];
        for i in 0..(16u64 << 20) / 4096 {
            file.read_exact_at(&mut word, i * 4096).unwrap();
            let want = match i {
                0..1024 | 3072..3080 => i + 1000,
                1024..2048 => i,
                _ => 0,
            };
            assert_eq!(u64::from_ne_bytes(word), want, "page {i}");
        }
        // Every chunk is checked as a restore reads it.
        let fresh = crate::memory::create(&MemoryConfig {
            hugepages: false,
            ..cfg
        })
        .unwrap();
        super::super::ram::fill_region(&fresh, 0, &file, &desc, &path).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    });
    let report = armed.finish(0.0);
    // One fault per page written while tracking: 1032 of 4 KiB, or 2 MiB pages 0, 1, 6.
    let tracked = if hugepages { 3 } else { 1032 };
    let page = if hugepages { HUGE_PAGE_SIZE } else { 4096 };
    assert_eq!(report.tracked_faults, tracked, "{report:?}");
    assert_eq!(report.pause_protected_bytes, tracked * page, "{report:?}");
    assert!(report.write_faults > report.tracked_faults, "{report:?}");
    assert!(report.fault_max_us >= report.fault_p50_us);
    // The writes went through: memory holds the new words.
    assert_eq!(ram.mem.read_obj::<u64>(GuestAddress(4096)).unwrap(), !1);
}
