//! A soak of consecutive live updates under memtest, disk and network load that can see
//! replays: no tick or memtest pass lost or repeated, no disk record lost, no stale disk write
//! applied late (the guest's replay ring, checked by the guest and again from the host), no
//! UDP echo lost or duplicated, and the fd set and anonymous memory flat.
//!
//! `cargo test` runs 20 updates; the README's 100-update figures come from
//! `MOLT_SOAK_UPDATES=100 cargo test -p molt-tests --test soak -- --nocapture`.

use std::collections::BTreeMap;
use std::net::{SocketAddrV4, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use molt_tests::netns::{self, NetNs, GUEST_IP};
use molt_tests::{api, molt_bin, Molt, Stream, TempDir};

const WAIT: Duration = Duration::from_secs(60);
const SECTOR: usize = 512;
const RING: u64 = 8;

fn updates() -> usize {
    std::env::var("MOLT_SOAK_UPDATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

fn words(chunk: &[u8]) -> Vec<u64> {
    chunk
        .chunks(8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        .collect()
}

/// Sequence numbers of the records on the image and of its replay ring's slots.
fn scan(image: &Path, capacity: u64) -> (Vec<u64>, Vec<Option<u64>>) {
    let data = std::fs::read(image).unwrap();
    let ring_base = capacity - RING;
    let mut records = Vec::new();
    let mut ring = vec![None; RING as usize];
    for (sector, chunk) in data.chunks(SECTOR).enumerate() {
        let w = words(chunk);
        let sector = sector as u64;
        if sector >= ring_base && w[0] == u64::from_le_bytes(*b"MOLTBLKQ") {
            assert_eq!(w[2], sector, "ring slot at {sector} names another sector");
            ring[(sector - ring_base) as usize] = Some(w[1]);
        } else if sector > 0 && w[0] == u64::from_le_bytes(*b"MOLTBLKR") {
            assert_eq!(w[1], sector, "record at {sector} has seq {}", w[1]);
            records.push(w[1]);
        }
    }
    (records, ring)
}

/// The ring holds exactly the last `RING` sequence numbers written, each in its slot: a stale
/// write applied late would leave an older one.
fn assert_ring_current(ring: &[Option<u64>]) {
    let m = ring.iter().flatten().copied().max().unwrap_or(0);
    assert!(m > RING, "the ring was hardly written: {ring:?}");
    for (i, slot) in ring.iter().enumerate() {
        let want = m - (m - i as u64) % RING;
        assert_eq!(
            *slot,
            Some(want),
            "ring slot {i} (replayed write?): {ring:?}"
        );
    }
}

/// Sends numbered datagrams to the guest's UDP echo every 10 ms until `stop`; returns how
/// many were sent and how often each came back.
fn udp_stream(ns: String, stop: Arc<AtomicBool>) -> (u64, BTreeMap<u64, u32>) {
    netns::run_in(&ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(5)))
            .unwrap();
        let to = SocketAddrV4::new(GUEST_IP, 7);
        let (mut sent, mut echoes) = (0u64, BTreeMap::new());
        let mut next = Instant::now();
        let mut drain_until = None;
        loop {
            let now = Instant::now();
            if drain_until.is_none() && stop.load(Ordering::Relaxed) {
                drain_until = Some(now + Duration::from_secs(2));
            }
            if drain_until.is_some_and(|d| now > d) {
                break;
            }
            if drain_until.is_none() && now >= next {
                let _ = sock.send_to(format!("soak-{sent}").as_bytes(), to);
                sent += 1;
                next += Duration::from_millis(10);
            }
            let mut buf = [0u8; 64];
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                if let Some(i) = text.strip_prefix("soak-").and_then(|i| i.parse().ok()) {
                    *echoes.entry(i).or_insert(0) += 1;
                }
            }
        }
        (sent, echoes)
    })
}

#[test]
fn consecutive_live_updates_lose_and_replay_nothing() {
    let ns = match NetNs::create("soak") {
        Ok(ns) => ns,
        Err(why) => {
            molt_tests::skip("the update soak (needs a network namespace)", &why);
            return;
        }
    };
    let dir = TempDir::new("soak");
    let img = dir.join("disk.img");
    let capacity = (16u64 << 20) / SECTOR as u64;
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(16 << 20))
        .unwrap();
    let socket = dir.join("api.sock");
    let cmdline = format!("molt.memtest=8 molt.blk=on molt.net={GUEST_IP}/16");
    let args = [
        "netns".to_string(),
        "exec".into(),
        ns.name.clone(),
        molt_bin().display().to_string(),
        "--api-socket".into(),
        socket.display().to_string(),
        "--disk".into(),
        format!("path={}", img.display()),
        "--net".into(),
        "tap=tap0,mac=02:00:00:00:77:02".into(),
        "--cmdline".into(),
        cmdline,
    ];
    let mut molt = Molt::spawn_bin(Path::new("ip"), &args);
    api::wait_ready(&socket, WAIT);
    molt.wait_line(Stream::Stdout, WAIT, |l| l.contains("blk ring found=0 ok"));
    let pid = api::get(&socket, "vm.info").body["pid"].as_u64().unwrap() as u32;

    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (ns, stop) = (ns.name.clone(), stop.clone());
        std::thread::spawn(move || udp_stream(ns, stop))
    };
    let n = updates();
    let (mut fds_after_first, mut rss_after_first) = (Vec::new(), 0);
    let mut pauses = Vec::new();
    for i in 1..=n {
        std::thread::sleep(Duration::from_millis(250));
        let r = api::put(&socket, "vm.cpr-exec", "{}");
        assert_eq!(r.status, 200, "update {i}: {r:?}");
        pauses.push(r.body["pause_ms"].as_f64().unwrap_or(f64::NAN));
        if i == 1 {
            std::thread::sleep(Duration::from_millis(300));
            fds_after_first = molt_tests::host::fd_kinds(pid.into());
            rss_after_first = molt_tests::host::rss_anon_kib(pid.into());
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let fds_after_last = molt_tests::host::fd_kinds(pid.into());
    let rss_after_last = molt_tests::host::rss_anon_kib(pid.into());
    stop.store(true, Ordering::Relaxed);
    let (sent, echoes) = sender.join().unwrap();
    assert_eq!(api::put(&socket, "vm.shutdown", "").status, 204);
    let out = molt.finish(WAIT);
    out.assert_code(0);

    // The guest's own view: every line intact and in sequence, no failure.
    let lines = out.guest_lines();
    for l in &lines {
        assert!(!l.raw.contains("FAIL"), "guest failure: {}", l.raw);
    }
    for (kind, key) in [("tick", "n"), ("memtest", "pass")] {
        let ns: Vec<u64> = lines
            .iter()
            .filter(|l| l.kind == kind && l.get(key).is_some())
            .map(|l| l.num(key))
            .collect();
        assert!(ns.len() > 2, "too few {kind} lines");
        for (i, v) in ns.iter().enumerate() {
            assert_eq!(*v, ns[0] + i as u64, "{kind} sequence broken: {ns:?}");
        }
    }
    let written: Vec<u64> = lines
        .iter()
        .filter(|l| l.kind == "blk" && l.get("n").is_some())
        .map(|l| l.num("n"))
        .collect();
    assert!(written.len() > n, "too few disk records: {}", written.len());
    for (i, v) in written.iter().enumerate() {
        assert_eq!(*v, i as u64 + 1, "disk records out of sequence");
    }
    // The host's view of the disk: every record once, the ring current.
    let (records, ring) = scan(&img, capacity);
    let last = *written.last().unwrap();
    for seq in 1..=last {
        assert_eq!(
            records.iter().filter(|&&s| s == seq).count(),
            1,
            "record {seq} not on disk exactly once"
        );
    }
    assert_ring_current(&ring);
    // The network's view.
    let lost: Vec<u64> = (0..sent).filter(|i| !echoes.contains_key(i)).collect();
    let doubled: Vec<u64> = echoes
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(i, _)| *i)
        .collect();
    assert!(sent > 50, "only {sent} datagrams sent");
    assert!(
        lost.is_empty(),
        "{} of {sent} UDP echoes lost: {lost:?}",
        lost.len()
    );
    assert!(doubled.is_empty(), "UDP echoes duplicated: {doubled:?}");
    // The host's view of molt: nothing accumulates.
    assert_eq!(
        fds_after_first, fds_after_last,
        "fd set changed over {n} updates"
    );
    assert!(
        rss_after_last <= rss_after_first + 4096,
        "anonymous RSS grew from {rss_after_first} KiB to {rss_after_last} KiB over {n} updates"
    );
    pauses.sort_by(f64::total_cmp);
    println!(
        "soak: {n} updates, pause p50 {:.2} ms max {:.2} ms; {} disk records, ring at {}; \
         {sent} UDP echoes, 0 lost, 0 duplicated; fds {} flat, RssAnon {rss_after_first} → \
         {rss_after_last} KiB",
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1],
        written.len(),
        ring.iter().flatten().max().unwrap_or(&0),
        fds_after_last.len()
    );
}
