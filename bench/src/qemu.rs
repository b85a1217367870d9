//! The peer, side by side: QEMU's local migration of a comparable microvm between two QEMU
//! processes over a unix socket, with capability `x-ignore-shared` and RAM in a
//! `memory-backend-file,share=on` on /dev/shm, so RAM is shared, not copied. The pause is
//! the time from the source's QMP `STOP` event to the destination's `RESUME` event (both
//! stamped by QEMU on the same host clock); like molt's `stopped_ms`, it starts once the
//! vCPUs are stopped.
//!
//! The guest is QEMU's own microvm firmware (qboot) with no kernel: what runs in the guest
//! does not enter this pause, which covers the device and vCPU state.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::stats::Summary;

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";
/// How to get it on Debian.
pub const INSTALL_HINT: &str = "apt-get install -y qemu-system-x86";
/// How long a QMP answer or event may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// The peer's pauses for one RAM size and vCPU count.
#[derive(Clone, Debug, Serialize)]
pub struct PeerResult {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// STOP → RESUME of each migration, ms.
    pub samples_ms: Vec<f64>,
    /// QEMU's own `downtime` of each migration, ms.
    pub downtime_ms: Vec<f64>,
    /// What went wrong.
    pub failures: Vec<String>,
}

impl PeerResult {
    /// Summary of STOP → RESUME.
    pub fn pause(&self) -> Option<Summary> {
        Summary::of(&self.samples_ms)
    }
}

/// `QEMU 7.2.22 …` when QEMU is installed, else why not.
pub fn version() -> Result<String, String> {
    match Command::new(QEMU).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()),
        _ => Err(format!(
            "{QEMU} is not installed (Debian: `{INSTALL_HINT}`); the peer rows were not run"
        )),
    }
}

/// One QEMU process with its QMP connection.
struct Qemu {
    child: Child,
    qmp: BufReader<UnixStream>,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Paths and sizes one chain of migrations shares.
struct Setup {
    dir: PathBuf,
    mem_mib: u64,
    vcpus: u8,
    ram: PathBuf,
    disk: PathBuf,
}

impl Setup {
    fn start(&self, name: &str, incoming: Option<&Path>) -> Result<Qemu, String> {
        let qmp_path = self.dir.join(format!("{name}.qmp"));
        let _ = std::fs::remove_file(&qmp_path);
        let size = format!("{}M", self.mem_mib);
        let mut cmd = Command::new(QEMU);
        cmd.args(["-machine", "microvm,memory-backend=mem", "-accel", "kvm"])
            .args([
                "-cpu",
                "qemu64",
                "-m",
                &size,
                "-smp",
                &self.vcpus.to_string(),
            ])
            .arg("-object")
            .arg(format!(
                "memory-backend-file,id=mem,size={size},mem-path={},share=on",
                self.ram.display()
            ))
            .args(["-nodefaults", "-display", "none", "-serial", "null"])
            .arg("-drive")
            .arg(format!(
                "if=none,id=d0,file={},format=raw",
                self.disk.display()
            ))
            .args(["-device", "virtio-blk-device,drive=d0"])
            .args(["-device", "virtio-rng-device"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(sock) = incoming {
            cmd.arg("-incoming").arg(format!("unix:{}", sock.display()));
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {QEMU}: {e}"))?;
        let deadline = Instant::now() + QMP_TIMEOUT;
        let stream = loop {
            match UnixStream::connect(&qmp_path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(format!("QMP of {name}: {e}")),
            }
        };
        stream
            .set_read_timeout(Some(QMP_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut q = Qemu {
            child,
            qmp: BufReader::new(stream),
        };
        q.read()?; // greeting
        q.execute("qmp_capabilities", json!({}))?;
        let caps = json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]});
        q.execute("migrate-set-capabilities", caps)?;
        Ok(q)
    }
}

impl Qemu {
    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.qmp.read_line(&mut line) {
            Ok(0) => Err("QEMU closed its QMP socket".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("QMP: {e}")),
            Err(e) => Err(format!("QMP: {e}")),
        }
    }

    /// Runs `cmd`; events that arrive meanwhile are returned too.
    fn execute(&mut self, cmd: &str, args: Value) -> Result<(Value, Vec<Value>), String> {
        let msg = json!({"execute": cmd, "arguments": args}).to_string() + "\n";
        self.qmp
            .get_mut()
            .write_all(msg.as_bytes())
            .map_err(|e| format!("QMP: {e}"))?;
        let mut events = Vec::new();
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                events.push(v);
            } else if let Some(e) = v.get("error") {
                return Err(format!("{cmd}: {e}"));
            } else {
                return Ok((v["return"].clone(), events));
            }
        }
    }

    /// Waits for event `name` (maybe among `seen`); returns its timestamp in µs.
    fn event_us(&mut self, name: &str, seen: &[Value]) -> Result<u64, String> {
        let stamp = |v: &Value| {
            let t = &v["timestamp"];
            Some(t["seconds"].as_u64()? * 1_000_000 + t["microseconds"].as_u64()?)
        };
        if let Some(v) = seen.iter().find(|v| v["event"] == name) {
            return stamp(v).ok_or_else(|| format!("{name} without a timestamp"));
        }
        loop {
            let v = self.read()?;
            if v["event"] == name {
                return stamp(&v).ok_or_else(|| format!("{name} without a timestamp"));
            }
        }
    }
}

/// Migrates `src` to a new destination; returns it with STOP → RESUME and QEMU's downtime.
fn migrate(setup: &Setup, src: &mut Qemu, n: usize) -> Result<(Qemu, f64, f64), String> {
    let sock = setup.dir.join(format!("mig{n}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut dst = setup.start(&format!("dst{n}"), Some(&sock))?;
    let uri = format!("unix:{}", sock.display());
    let (_, mut src_events) = src.execute("migrate", json!({ "uri": uri }))?;
    let stop = src.event_us("STOP", &src_events)?;
    let resume = dst.event_us("RESUME", &[])?;
    // Completed on the source: its statistics carry QEMU's own downtime.
    let deadline = Instant::now() + QMP_TIMEOUT;
    let downtime = loop {
        let (r, ev) = src.execute("query-migrate", json!({}))?;
        src_events.extend(ev);
        match r["status"].as_str() {
            Some("completed") => break r["downtime"].as_f64().unwrap_or(f64::NAN),
            Some("failed") | Some("cancelled") => return Err(format!("migration {r}")),
            _ if Instant::now() > deadline => return Err("migration did not complete".into()),
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let _ = std::fs::remove_file(&sock);
    Ok((dst, resume.saturating_sub(stop) as f64 / 1e3, downtime))
}

/// Runs `runs` migrations in a chain for `mem_mib` and `vcpus` (RAM on /dev/shm, removed
/// after).
pub fn run(tmp: &Path, mem_mib: u64, vcpus: u8, runs: usize) -> PeerResult {
    let mut res = PeerResult {
        mem_mib,
        vcpus,
        samples_ms: Vec::new(),
        downtime_ms: Vec::new(),
        failures: Vec::new(),
    };
    let dir = tmp.join(format!("qemu-{mem_mib}M-{vcpus}cpu"));
    let setup = Setup {
        ram: PathBuf::from(format!(
            "/dev/shm/molt-bench-qemu-{}-{mem_mib}",
            std::process::id()
        )),
        disk: dir.join("disk.img"),
        dir,
        mem_mib,
        vcpus,
    };
    let prepared = std::fs::create_dir_all(&setup.dir)
        .and_then(|()| std::fs::File::create(&setup.disk)?.set_len(16 << 20));
    if let Err(e) = prepared {
        res.failures
            .push(format!("cannot prepare {}: {e}", setup.dir.display()));
        return res;
    }
    let chain = (|| -> Result<(), String> {
        let mut src = setup.start("src0", None)?;
        // Let the firmware start.
        std::thread::sleep(Duration::from_millis(300));
        for n in 1..=runs {
            if crate::signals::check().is_err() {
                return Err("interrupted".into());
            }
            let (dst, pause, downtime) = migrate(&setup, &mut src, n)?;
            res.samples_ms.push(pause);
            res.downtime_ms.push(downtime);
            src = dst;
            std::thread::sleep(Duration::from_millis(100));
            eprint!(".");
        }
        Ok(())
    })();
    if let Err(e) = chain {
        res.failures.push(e);
    }
    let _ = std::fs::remove_file(&setup.ram);
    res
}
