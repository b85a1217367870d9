//! Benchmark (not a test): pause, capture, rebuild and resume of a running VM, for 1 and 4
//! vCPUs, and the size of the state record. Prints a markdown table.
//!
//! `cargo bench -p molt-vmm --bench state`

use std::time::{Duration, Instant};

use vmm::config::{KernelSource, MemoryConfig, SerialConfig, VmConfig};
use vmm::runtime::Vmm;
use vmm::state::VM_STATE_KIND;

const RUNS: usize = 20;

fn boot(cpus: u8) -> Vmm {
    let config = VmConfig {
        kernel: KernelSource::Embedded,
        cmdline: "molt.memtest=8".into(),
        initrd: None,
        cpus,
        memory: MemoryConfig {
            size: 256 << 20,
            hugepages: false,
            prefault: false,
        },
        serial: SerialConfig::Null,
        api_socket: None,
        disks: Vec::new(),
        nets: Vec::new(),
        rng: false,
        cpu_template: Default::default(),
        seccomp: Default::default(),
        update_binaries: None,
    };
    vmm::boot(&config, Instant::now()).expect("boot").vmm
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    println!("| vCPUs | phase | p50 ms | p99 ms |");
    println!("|---|---|---|---|");
    let mut sizes = Vec::new();
    for cpus in [1u8, 4] {
        let mut vmm = boot(cpus);
        std::thread::sleep(Duration::from_millis(300));
        let mut rows: Vec<(&str, Vec<f64>)> = ["pause", "capture", "encode", "resume"]
            .iter()
            .map(|n| (*n, Vec::new()))
            .collect();
        let mut rebuild: Vec<(&str, Vec<f64>)> = [
            "rebuild: pause",
            "rebuild: capture",
            "rebuild: teardown",
            "rebuild: restore",
            "rebuild: resume",
            "rebuild: total",
        ]
        .iter()
        .map(|n| (*n, Vec::new()))
        .collect();
        let mut record_len = 0;
        for _ in 0..RUNS {
            let t0 = Instant::now();
            vmm.pause().expect("pause");
            let t1 = Instant::now();
            let state = vmm.capture().expect("capture");
            let t2 = Instant::now();
            let record = cpr::encode(vmm::VERSION, VM_STATE_KIND, &state).expect("encode");
            let t3 = Instant::now();
            vmm.resume().expect("resume");
            let t4 = Instant::now();
            record_len = record.len();
            for (row, d) in rows.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2, t4 - t3]) {
                row.1.push(ms(d));
            }
            std::thread::sleep(Duration::from_millis(20));
            let r = vmm.rebuild().expect("rebuild");
            for (row, v) in rebuild.iter_mut().zip([
                r.pause_ms,
                r.capture_ms,
                r.teardown_ms,
                r.restore_ms,
                r.resume_ms,
                r.total_ms,
            ]) {
                row.1.push(v);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(vmm.ended().is_none(), "guest ended: {:?}", vmm.ended());
        for (name, mut v) in rows.into_iter().chain(rebuild) {
            println!(
                "| {cpus} | {name} | {:.3} | {:.3} |",
                pct(&mut v, 0.5),
                pct(&mut v, 0.99)
            );
        }
        sizes.push((cpus, record_len));
        vmm.shutdown();
    }
    println!();
    println!("| vCPUs | state record bytes |");
    println!("|---|---|");
    for (cpus, len) in sizes {
        println!("| {cpus} | {len} |");
    }
}
