//! virtio-blk, virtio-net and virtio-rng with the test guest's drivers: data reaches the host,
//! survives reboots and live updates exactly once, and the network answers throughout.

use std::path::{Path, PathBuf};
use std::time::Duration;

use molt_tests::api;
use molt_tests::file_vm::FileVm;
use molt_tests::native::{check_mode, Mode};
use molt_tests::netns::{self, NetNs, GUEST_IP};
use molt_tests::{guest_lines, molt_bin, GuestLine, Molt, Stream, TempDir};

const WAIT: Duration = Duration::from_secs(90);
const SECTOR: usize = 512;

/// FNV-1a over 64-bit words with an extra fold, as the guest's driver computes it.
fn checksum(words: &[u64]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &w in words {
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
        h ^= h >> 32;
    }
    h
}

fn payload(seq: u64, w: usize) -> u64 {
    seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (w as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9)
}

/// The valid records on the disk image, as (sector, seq); panics on a corrupt one.
fn records(image: &Path) -> Vec<(u64, u64)> {
    let data = std::fs::read(image).unwrap();
    let mut found = Vec::new();
    for (sector, chunk) in data.chunks(SECTOR).enumerate().skip(1) {
        let words: Vec<u64> = chunk
            .chunks(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        if words[0] != u64::from_le_bytes(*b"MOLTBLKR") {
            continue;
        }
        let seq = words[1];
        assert_eq!(
            checksum(&words[..63]),
            words[63],
            "sector {sector}: bad checksum"
        );
        assert_eq!(
            words[2], sector as u64,
            "sector {sector}: wrong sector field"
        );
        for (w, word) in words.iter().enumerate().take(63).skip(3) {
            assert_eq!(*word, payload(seq, w), "sector {sector}: bad payload");
        }
        found.push((sector as u64, seq));
    }
    found
}

fn image(dir: &TempDir, mib: u64) -> PathBuf {
    let path = dir.join("disk.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(mib << 20).unwrap();
    path
}

fn blk_ns(molt: &Molt) -> Vec<u64> {
    let lines = guest_lines(molt.lines().iter().map(|l| l.text.as_str()));
    for l in &lines {
        assert!(
            !(l.kind == "blk" && l.raw.contains("FAIL")),
            "disk failure: {}",
            l.raw
        );
    }
    blk_numbers(&lines)
}

/// The `n` of every disk record line, in order.
fn blk_numbers(lines: &[GuestLine]) -> Vec<u64> {
    lines
        .iter()
        .filter(|l| l.kind == "blk" && l.get("n").is_some())
        .map(|l| l.num("n"))
        .collect()
}

fn wait_blk(molt: &mut Molt, n: u64) {
    molt.wait_line(Stream::Stdout, WAIT, |l| {
        GuestLine::parse(l)
            .is_some_and(|g| g.kind == "blk" && g.get("n").is_some() && g.num("n") >= n)
    });
}

fn assert_consecutive(ns: &[u64], what: &str) {
    assert!(!ns.is_empty(), "no {what} lines");
    for (i, n) in ns.iter().enumerate() {
        assert_eq!(*n, i as u64 + 1, "{what} sequence broken: {ns:?}");
    }
}

#[test]
fn disk_records_reach_the_file_and_survive_a_reboot() {
    let dir = TempDir::new("virtio-blk");
    let img = image(&dir, 4);
    let disk = format!("path={}", img.display());
    let mut molt = Molt::spawn(&["--disk", &disk, "--cmdline", "molt.memtest=0 molt.blk=on"]);
    molt.wait_line(Stream::Stdout, WAIT, |l| l.contains("blk boot found=0"));
    wait_blk(&mut molt, 24);
    molt.signal(libc::SIGTERM);
    let out = molt.finish(WAIT);
    out.assert_code(0);
    let written = blk_numbers(&out.guest_lines());
    assert_consecutive(&written, "blk");
    let last = *written.last().unwrap();
    let on_disk = records(&img);
    // Every record the guest verified is on the disk, each exactly once, at its own sector.
    for seq in 1..=last {
        assert_eq!(
            on_disk.iter().filter(|(_, s)| *s == seq).count(),
            1,
            "record {seq} on disk: {on_disk:?}"
        );
    }
    // A second boot on the same disk finds and verifies what the first left.
    let mut again = Molt::spawn(&["--disk", &disk, "--cmdline", "molt.memtest=0 molt.blk=on"]);
    let boot = again.wait_line(Stream::Stdout, WAIT, |l| l.contains("blk boot found="));
    let g = GuestLine::parse(&boot.text).unwrap();
    assert!(boot.text.ends_with(" ok"), "{}", boot.text);
    let found = g.num("found");
    assert!(found >= 8 && found <= last, "{}", boot.text);
    assert_eq!(g.num("verified"), found, "{}", boot.text);
    let next = again.wait_line(Stream::Stdout, WAIT, |l| l.contains("blk n="));
    assert_eq!(GuestLine::parse(&next.text).unwrap().num("n"), found + 1);
}

/// The devices' interrupts (polled by the guest) once reached a second vCPU running natively
/// through the unprogrammed 8259 as "exception vector=5": the guest now masks the PICs.
#[test]
fn a_guest_with_two_vcpus_drives_its_disk() {
    let dir = TempDir::new("virtio-blk-smp");
    let img = image(&dir, 4);
    let disk = format!("path={}", img.display());
    let mut molt = Molt::spawn(&[
        "--cpus",
        "2",
        "--disk",
        &disk,
        "--cmdline",
        "molt.memtest=4 molt.blk=on",
    ]);
    molt.wait_line(Stream::Stdout, WAIT, |l| l.contains("cpu id=1 up"));
    wait_blk(&mut molt, 24);
    molt.signal(libc::SIGTERM);
    let out = molt.finish(WAIT);
    out.assert_code(0);
    let text = out.stdout().join("\n");
    assert!(
        !text.contains("exception") && !text.contains("FAIL"),
        "{text}"
    );
    let written = blk_numbers(&out.guest_lines());
    assert_consecutive(&written, "blk");
}

#[test]
fn read_only_disk_is_not_written() {
    let dir = TempDir::new("virtio-ro");
    let img = image(&dir, 1);
    let before = std::fs::read(&img).unwrap();
    let disk = format!("path={},readonly=on", img.display());
    let mut molt = Molt::spawn(&["--disk", &disk, "--cmdline", "molt.memtest=0 molt.blk=on"]);
    molt.wait_line(Stream::Stdout, WAIT, |l| {
        l.contains("blk capacity=2048 ro=1")
    });
    molt.wait_line(Stream::Stdout, WAIT, |l| {
        l.contains("blk writes skipped ro=1")
    });
    molt.signal(libc::SIGTERM);
    molt.finish(WAIT).assert_code(0);
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a read-only disk changed"
    );
}

#[test]
fn rng_gives_the_guest_entropy() {
    let mut molt = Molt::spawn(&["--rng", "--cmdline", "molt.memtest=0 molt.rng=on"]);
    molt.wait_line(Stream::Stdout, WAIT, |l| l.contains("rng n=2 "));
    let lines = guest_lines(molt.lines().iter().map(|l| l.text.as_str()));
    let rng: Vec<&GuestLine> = lines.iter().filter(|l| l.kind == "rng").collect();
    assert!(rng.iter().all(|l| !l.raw.contains("FAIL")), "{rng:?}");
    let bytes: Vec<&str> = rng.iter().filter_map(|l| l.get("bytes")).collect();
    assert!(
        bytes.len() >= 2 && bytes.iter().all(|b| b.len() == 32),
        "{bytes:?}"
    );
    assert_ne!(bytes[0], bytes[1], "the same 16 random bytes twice");
}

#[test]
fn disk_io_across_ten_live_updates_loses_and_repeats_nothing() {
    for mode in Mode::BOTH {
        let dir = TempDir::new("virtio-update");
        let img = image(&dir, 8);
        let socket = dir.join("api.sock");
        let mut molt = Molt::spawn(&[
            "--api-socket",
            &socket.display().to_string(),
            "--disk",
            &format!("path={}", img.display()),
            "--cmdline",
            &mode.cmdline("molt.memtest=0 molt.blk=on"),
        ]);
        api::wait_ready(&socket, WAIT);
        let boot = molt.wait_stdout("molt-guest: boot ", WAIT);
        check_mode(&GuestLine::parse(&boot.text).expect("a boot line"), mode);
        wait_blk(&mut molt, 4);
        for _ in 0..10 {
            let r = api::put(&socket, "vm.cpr-exec", "{}");
            assert_eq!(r.status, 200, "{r:?}");
            api::assert_phases_add_up(&r.body);
            let n = blk_ns(&molt).last().copied().unwrap_or(0);
            wait_blk(&mut molt, n + 3);
        }
        assert_eq!(api::put(&socket, "vm.shutdown", "").status, 204);
        let out = molt.finish(WAIT);
        out.assert_code(0);
        let reported = blk_numbers(&out.guest_lines());
        assert_consecutive(&reported, "blk");
        let last = *reported.last().unwrap();
        let on_disk = records(&img);
        for seq in 1..=last {
            assert_eq!(
                on_disk.iter().filter(|(_, s)| *s == seq).count(),
                1,
                "record {seq} not on disk exactly once"
            );
        }
        // Only the write in flight at shutdown may be on disk without its report.
        assert!(
            on_disk.iter().all(|(_, s)| *s <= last + 1),
            "records beyond what the guest wrote (last reported {last}): {on_disk:?}"
        );
    }
}

/// A guest that sleeps until its disk's interrupt (`molt.idle=halt`, sleeping at once) takes
/// each completion only after the interrupt line and the device's InterruptStatus said so: a
/// completion an update, a transfer or a pause left without its interrupt would stop the disk.
#[test]
fn a_guest_that_sleeps_until_its_disk_interrupts_keeps_its_disk_across_updates() {
    let dir = TempDir::new("virtio-halt");
    let img = image(&dir, 8);
    let mut vm = FileVm::start(
        dir.path(),
        &[
            "--disk",
            &format!("path={}", img.display()),
            "--cmdline",
            "molt.memtest=0 molt.blk=on molt.idle=halt molt.halt_poll_us=0",
        ],
    );
    let records = |vm: &FileVm, more| vm.wait_for("blk", "n", more, String::new);
    records(&vm, 3);
    for i in 0..4 {
        let r = vm.cpr_exec(&molt_bin());
        assert_eq!(r.status, 200, "update {i}: {r:?}");
        records(&vm, 2);
        let r = vm.transfer_to_this_build();
        assert_eq!(r.status, 200, "transfer {i}: {r:?}");
        records(&vm, 2);
        for endpoint in ["vm.pause", "vm.resume"] {
            assert_eq!(api::put(&vm.api, endpoint, "").status, 204, "{endpoint}");
        }
        records(&vm, 2);
    }
    let ticks_before = vm.last("tick", "n") as usize;
    vm.wait_ticks(2);
    vm.assert_slept_on_interrupts(ticks_before);
    vm.assert_one_boot_no_failure();
    assert!(vm.assert_sequence("blk", "n") > 10, "{}", vm.tail());
    vm.shutdown();
}

#[test]
fn network_answers_before_during_and_after_updates() {
    let ns = match NetNs::create("net") {
        Ok(ns) => ns,
        Err(why) => {
            molt_tests::skip("virtio-net in a network namespace", &why.to_string());
            return;
        }
    };
    let dir = TempDir::new("virtio-net");
    let socket = dir.join("api.sock");
    let molt = spawn_in(&ns, &socket, "02:00:00:00:77:02");
    let before = ns.run(|| {
        netns::ping(
            GUEST_IP,
            10,
            Duration::from_millis(20),
            Duration::from_secs(5),
        )
    });
    assert!(
        before.iter().all(Option::is_some),
        "pings lost before any update: {before:?}"
    );
    let echo = ns.run(|| netns::udp_echo(GUEST_IP, b"molt udp echo", Duration::from_secs(5)));
    assert_eq!(echo.as_deref(), Some(&b"molt udp echo"[..]));
    // Pings at 50/s while three updates run.
    let pinger = pings_in_background(&ns, 150);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(400));
        let r = api::put(&socket, "vm.cpr-exec", "{}");
        assert_eq!(r.status, 200, "{r:?}");
        api::assert_phases_add_up(&r.body);
    }
    let during = pinger.join().unwrap();
    let lost = during.iter().filter(|r| r.is_none()).count();
    assert_eq!(
        lost,
        0,
        "{lost} of {} pings lost across updates",
        during.len()
    );
    let echo = ns.run(|| netns::udp_echo(GUEST_IP, b"after the updates", Duration::from_secs(5)));
    assert_eq!(echo.as_deref(), Some(&b"after the updates"[..]));
    assert_eq!(api::put(&socket, "vm.shutdown", "").status, 204);
    molt.finish(WAIT).assert_code(0);
}

/// Pings the guest `count` times at 50/s from `ns` on another thread; each answer's RTT or
/// `None` for a lost one.
fn pings_in_background(ns: &NetNs, count: u16) -> std::thread::JoinHandle<Vec<Option<Duration>>> {
    let name = ns.name.clone();
    std::thread::spawn(move || {
        netns::run_in(&name, move || {
            netns::ping(
                GUEST_IP,
                count,
                Duration::from_millis(20),
                Duration::from_secs(5),
            )
        })
    })
}

/// Starts molt with a tap in `ns` (the guest at [`GUEST_IP`]) and waits until its network
/// driver is up.
fn spawn_in(ns: &NetNs, socket: &Path, mac: &str) -> Molt {
    let cmdline = format!("molt.memtest=0 molt.net={GUEST_IP}/16");
    let molt_path = molt_bin().display().to_string();
    let net = format!("tap=tap0,mac={mac}");
    let mut molt = Molt::spawn_bin(
        Path::new("ip"),
        &[
            "netns",
            "exec",
            &ns.name,
            &molt_path,
            "--api-socket",
            &socket.display().to_string(),
            "--net",
            &net,
            "--cmdline",
            &cmdline,
        ],
    );
    api::wait_ready(socket, WAIT);
    molt.wait_line(Stream::Stdout, WAIT, |l| {
        l.contains(&format!("net mac={mac}"))
    });
    molt
}

#[test]
fn network_answers_through_transfers_to_new_processes() {
    let ns = match NetNs::create("net-xfer") {
        Ok(ns) => ns,
        Err(why) => {
            molt_tests::skip("virtio-net in a network namespace", &why.to_string());
            return;
        }
    };
    let dir = TempDir::new("virtio-net-transfer");
    let socket = dir.join("api.sock");
    let first = spawn_in(&ns, &socket, "02:00:00:00:77:03");
    let echo = ns.run(|| netns::udp_echo(GUEST_IP, b"before", Duration::from_secs(5)));
    assert_eq!(echo.as_deref(), Some(&b"before"[..]));
    // Pings at 50/s while the VM moves to two new processes and is updated in place once.
    let pinger = pings_in_background(&ns, 150);
    let mut receivers = Vec::new();
    let mut pids = vec![api::get(&socket, "vm.info").body["pid"].clone()];
    for n in 0..2 {
        std::thread::sleep(Duration::from_millis(400));
        let path = dir.join(&format!("in{n}.sock"));
        let rx = Molt::spawn_incoming(&molt_bin(), &path, &[], &[]);
        let body = format!(r#"{{"socket": "{}"}}"#, path.display());
        let r = api::put(&socket, "vm.cpr-transfer", &body);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["mode"], "transfer", "{r:?}");
        api::assert_phases_add_up(&r.body);
        pids.push(r.body["pid"].clone());
        receivers.push(rx);
    }
    std::thread::sleep(Duration::from_millis(400));
    let r = api::put(&socket, "vm.cpr-exec", "{}");
    assert_eq!(r.status, 200, "{r:?}");
    let during = pinger.join().unwrap();
    let lost = during.iter().filter(|r| r.is_none()).count();
    assert_eq!(
        lost,
        0,
        "{lost} of {} pings lost across transfers",
        during.len()
    );
    let echo = ns.run(|| netns::udp_echo(GUEST_IP, b"after", Duration::from_secs(5)));
    assert_eq!(echo.as_deref(), Some(&b"after"[..]));
    // The API path is answered by the last receiver; each sender exited 0.
    assert_eq!(api::get(&socket, "vm.info").body["pid"], pids[2]);
    first.finish(WAIT).assert_code(0);
    let mut receivers = receivers.into_iter();
    let middle = receivers.next().unwrap();
    middle.finish(WAIT).assert_code(0);
    assert_eq!(api::put(&socket, "vm.shutdown", "").status, 204);
    receivers.next().unwrap().finish(WAIT).assert_code(0);
}
