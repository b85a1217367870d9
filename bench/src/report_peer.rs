//! The peer's section of the report: QEMU's local migration next to molt's cpr-transfer.

use std::fmt::Write as _;

use crate::config::{size_label, Mode, Pages, Series};
use crate::goals::stopped_at;
use crate::report::ms;
use crate::results::Report;
use crate::stats::median;

/// The side-by-side table, or why the peer did not run.
pub fn section(r: &Report) -> String {
    let mut s = String::from("\n## Side by side: QEMU local migration (x-ignore-shared)\n\n");
    if let Some(why) = &r.peer_skipped {
        let _ = writeln!(s, "Not run: {why}.");
        return s;
    }
    s.push_str(
        "QEMU's pause is from the source's QMP `STOP` event to the destination's `RESUME` \
         event (`-machine microvm -accel kvm -cpu qemu64`, virtio-blk-device, \
         virtio-rng-device, RAM in `memory-backend-file,share=on` on /dev/shm, migration over \
         a unix socket between two QEMU processes, no kernel: the microvm firmware runs); \
         molt's is the transfer rows' `stopped_ms` (4K, RAM idle).\n\n\
         | RAM | vCPUs | QEMU migrations ok | QEMU STOP→RESUME p50 | p99 | QEMU downtime p50 | \
         molt transfer stopped p50 | molt / QEMU |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let series = Series {
        pages: Pages::Small,
        touched: false,
    };
    for p in &r.peer {
        let q = p.pause();
        let molt = stopped_at(&r.configs, Mode::Transfer, p.vcpus, series, p.mem_mib);
        let ratio = match (molt, q) {
            (Some(m), Some(q)) if q.p50 > 0.0 => format!("{:.2}", m / q.p50),
            _ => "—".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {ratio} |",
            size_label(p.mem_mib),
            p.vcpus,
            p.samples_ms.len(),
            ms(q.map(|q| q.p50)),
            ms(q.map(|q| q.p99)),
            ms(median(&p.downtime_ms)),
            ms(molt),
        );
    }
    for p in r.peer.iter().filter(|p| !p.failures.is_empty()) {
        let _ = writeln!(
            s,
            "\n- QEMU {} {} vCPU: {}",
            size_label(p.mem_mib),
            p.vcpus,
            p.failures.join("; ")
        );
    }
    s
}
