//! `--memory size=…,hugepages=on`: guest RAM in 2 MiB hugetlb memfds.
//!
//! Huge pages are a host-wide pool (`/proc/sys/vm/nr_hugepages`), so everything that touches
//! it is one test, in its own test binary (cargo runs test binaries one after another). The
//! test raises the pool when it is too small (as root) and puts it back afterwards.

use molt_tests::hugepages::{nr_hugepages, Reservation};
use molt_tests::{assert_mem_mib, assert_memtest, assert_ticks, boot_line, meminfo, run};

/// Guest RAM of the boot with huge pages.
const GUEST_MIB: u64 = 128;
const PAGE_MIB: u64 = 2;

#[derive(Debug, PartialEq, Eq)]
struct Pool {
    total: Option<u64>,
    free: Option<u64>,
    reserved: Option<u64>,
}

fn pool() -> Pool {
    Pool {
        total: meminfo("HugePages_Total"),
        free: meminfo("HugePages_Free"),
        reserved: meminfo("HugePages_Rsvd"),
    }
}

/// Asking for more huge pages than the host has free fails with one line that says so, and
/// leaves the pool as it was.
fn too_many_huge_pages_fail_cleanly() {
    let before = pool();
    let free = before.free.unwrap_or(0);
    let mib = (free + 1024) * PAGE_MIB;
    let out = run(&[
        "--memory",
        &format!("size={mib}M,hugepages=on"),
        "--cmdline",
        "molt.ticks=1",
    ]);
    let line = out.assert_error(&["molt: error:", "huge"]);
    assert_eq!(out.stderr().len(), 1, "one line\n{}", out.describe());
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stdout().is_empty(),
        "the guest never ran\n{}",
        out.describe()
    );
    assert_eq!(
        pool(),
        before,
        "huge page pool changed by a failed start: {line}"
    );
}

fn boots_with_huge_pages() {
    let needed = GUEST_MIB / PAGE_MIB;
    let reservation = match Reservation::ensure(needed) {
        Ok(r) => r,
        Err(why) => {
            molt_tests::skip("boot with hugepages=on", &why);
            return;
        }
    };
    let before = pool();
    let out = run(&[
        "--memory",
        &format!("size={GUEST_MIB}M,hugepages=on"),
        "--cmdline",
        "molt.memtest=8 molt.ticks=8 molt.exit=0",
    ]);
    out.assert_code(0);
    let lines = out.guest_lines();
    assert_mem_mib(&boot_line(&lines), GUEST_MIB);
    assert_ticks(&lines, 3);
    assert_memtest(&lines, 1);
    assert_eq!(pool(), before, "molt gave its huge pages back on exit");
    drop(reservation);
}

#[test]
fn hugepages() {
    if meminfo("HugePages_Total").is_none() {
        molt_tests::skip("huge pages", "the host kernel has no hugetlb support");
        return;
    }
    let pool_size = nr_hugepages().ok();
    too_many_huge_pages_fail_cleanly();
    boots_with_huge_pages();
    assert_eq!(nr_hugepages().ok(), pool_size, "nr_hugepages restored");
}
