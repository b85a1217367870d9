//! Benchmark (not a test): the network and the disk across live updates. In a network
//! namespace it creates itself (a tap and link-local addresses inside it), it runs the test
//! guest with virtio-net, virtio-blk and disk I/O, pings the guest at 200 packets/s while it
//! performs live updates, and prints packets lost, round-trip times (overall and worst) and
//! the virtio requests carried over each update.
//!
//! `cargo bench -p molt-vmm --bench net [-- --updates N]` (root; MOLT_BIN picks the binary).

use std::path::Path;
use std::time::Duration;

use molt_tests::netns::{self, NetNs, GUEST_IP};
use molt_tests::{api, molt_bin, Molt, Stream, TempDir};

const RATE_HZ: u64 = 200;
const WAIT: Duration = Duration::from_secs(90);

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let updates: usize = std::env::args()
        .skip_while(|a| a != "--updates")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let ns = match NetNs::create("bench") {
        Ok(ns) => ns,
        Err(why) => {
            println!("SKIPPED: cannot create a network namespace: {why}");
            return;
        }
    };
    let dir = TempDir::new("bench-net");
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(64 << 20))
        .expect("disk image");
    let socket = dir.join("api.sock");
    let (bin, sock, disk) = (
        molt_bin().display().to_string(),
        socket.display().to_string(),
        format!("path={}", img.display()),
    );
    let cmdline = format!("molt.memtest=0 molt.blk=on molt.net={GUEST_IP}/16");
    let mut molt = Molt::spawn_bin(
        Path::new("ip"),
        &[
            "netns",
            "exec",
            &ns.name,
            &bin,
            "--api-socket",
            &sock,
            "--serial",
            "stdio",
            "--net",
            "tap=tap0",
            "--disk",
            &disk,
            "--cmdline",
            &cmdline,
        ],
    );
    api::wait_ready(&socket, WAIT);
    molt.wait_line(Stream::Stdout, WAIT, |l| l.contains("net mac="));
    molt.wait_line(Stream::Stdout, WAIT, |l| l.contains("blk n=5 "));
    let interval = Duration::from_micros(1_000_000 / RATE_HZ);
    let gap = Duration::from_millis(500);
    let count = ((updates as u64 + 2) * gap.as_millis() as u64 * RATE_HZ / 1000) as u16;
    let name = ns.name.clone();
    let pinger = std::thread::spawn(move || {
        netns::run_in(&name, move || {
            netns::ping(GUEST_IP, count, interval, Duration::from_secs(5))
        })
    });
    let mut pauses = Vec::new();
    let mut carried = Vec::new();
    std::thread::sleep(gap);
    for _ in 0..updates {
        let r = api::put(&socket, "vm.cpr-exec", "{}");
        assert_eq!(r.status, 200, "update failed: {r:?}");
        pauses.push(r.body["pause_ms"].as_f64().unwrap_or(f64::NAN));
        carried.push(r.body["carried_requests"].as_u64().unwrap_or(0));
        std::thread::sleep(gap);
    }
    let rtts = pinger.join().expect("pinger");
    assert_eq!(api::put(&socket, "vm.shutdown", "").status, 204);
    let out = molt.finish(WAIT);
    let failures = out.stdout().iter().filter(|l| l.contains("FAIL")).count();
    let lost = rtts.iter().filter(|r| r.is_none()).count();
    let mut ms: Vec<f64> = rtts
        .iter()
        .flatten()
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    let worst = ms.iter().cloned().fold(0.0, f64::max);
    println!("| metric | value |");
    println!("|---|---|");
    println!("| live updates | {updates} |");
    println!("| pings sent ({RATE_HZ}/s) | {} |", rtts.len());
    println!("| pings lost | {lost} |");
    println!(
        "| RTT p50 / p99 / worst (ms) | {:.2} / {:.2} / {:.2} |",
        pct(&mut ms, 0.5),
        pct(&mut ms, 0.99),
        worst
    );
    println!(
        "| update pause p50 / max (ms) | {:.2} / {:.2} |",
        pct(&mut pauses.clone(), 0.5),
        pauses.iter().cloned().fold(0.0, f64::max)
    );
    println!(
        "| virtio requests carried per update (min / max / total) | {} / {} / {} |",
        carried.iter().min().unwrap_or(&0),
        carried.iter().max().unwrap_or(&0),
        carried.iter().sum::<u64>()
    );
    println!("| guest FAIL lines (disk or network) | {failures} |");
    println!();
    println!("Goal: 0 packets lost.");
}
