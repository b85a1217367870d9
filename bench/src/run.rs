//! Runs one configuration: boot molt with the embedded test guest, perform N live updates,
//! record each, shut molt down.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::api::{self, Reply};
use crate::config::{Config, Mode, Pages};
use crate::error::{Error, Result};
use crate::guest_log::GuestLog;
use crate::hugepages::Reservation;
use crate::process::Molt;
use crate::results::{ConfigResult, Phases, Sample};
use crate::{settle, signals};

/// How long molt may take to boot the guest (8 GiB prefaulted included).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long one API request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for the first tick after an update.
const TICK_TIMEOUT: Duration = Duration::from_secs(10);

/// What every configuration shares.
pub struct Options {
    /// The molt binary.
    pub molt: PathBuf,
    /// Updates per configuration.
    pub runs: usize,
    /// Minimum time from one update's response to the next request.
    pub min_gap: Duration,
    /// The guest's command line.
    pub guest_cmdline: String,
    /// Directory for sockets and logs (a subdirectory per configuration).
    pub tmp: PathBuf,
}

/// Runs `cfg`. Failures are recorded in the result; only an interrupt is returned as an error.
pub fn run_config(cfg: &Config, opts: &Options) -> Result<ConfigResult> {
    let mut res = ConfigResult::new(*cfg);
    let _pool = if cfg.pages == Pages::Huge {
        match Reservation::ensure(cfg.huge_pages_needed()) {
            Ok(r) => Some(r),
            Err(e) => {
                res.skipped = Some(e.to_string());
                return Ok(res);
            }
        }
    } else {
        None
    };
    match drive(cfg, opts, &mut res) {
        Err(Error::Interrupted) => Err(Error::Interrupted),
        Err(e) => {
            res.failures.push(e.to_string());
            Ok(res)
        }
        Ok(()) => Ok(res),
    }
}

fn drive(cfg: &Config, opts: &Options, res: &mut ConfigResult) -> Result<()> {
    let dir = opts.tmp.join(cfg.name());
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    let sock = dir.join("api.sock");
    let log_path = dir.join("serial.log");
    let args = vec![
        "--api-socket".to_string(),
        sock.display().to_string(),
        "--serial".into(),
        format!("file={}", log_path.display()),
        "--memory".into(),
        cfg.memory_arg(),
        "--cpus".into(),
        cfg.vcpus.to_string(),
        "--cmdline".into(),
        opts.guest_cmdline.clone(),
    ];
    let started = Instant::now();
    let mut molt = Molt::spawn(&opts.molt, &args, &dir)?;
    let mut log = GuestLog::new(&log_path);
    wait_ready(&mut molt, &sock)?;
    wait_for(&mut molt, BOOT_TIMEOUT, "the guest's first tick", || {
        log.poll()?;
        Ok(!log.ticks.is_empty())
    })?;
    res.boot_ms = Some(started.elapsed().as_secs_f64() * 1e3);
    settle::settle(&mut molt, cfg.touched, Instant::now(), opts.min_gap)?;

    let mut quiet_from: Option<usize> = None;
    for update in 1..=opts.runs {
        signals::check()?;
        log.poll()?;
        let mark = log.ticks.len();
        if let Some(q) = quiet_from {
            let gaps = log.ticks[q.min(mark)..mark].iter();
            res.idle_gaps_ms
                .extend(gaps.map(|t| t.gap_max_us as f64 / 1e3));
        }
        res.attempted += 1;
        let receiver = match cfg.mode {
            Mode::Exec | Mode::StandIn => None,
            Mode::Transfer => Some(crate::transfer::start_receiver(&opts.molt, &dir, update)?),
        };
        let t0 = Instant::now();
        let reply = match &receiver {
            None => api::request(
                &sock,
                "PUT",
                "/api/v1/vm.cpr-exec",
                Some(match cfg.mode {
                    Mode::StandIn => r#"{"stand_in": true}"#,
                    _ => "{}",
                }),
                REQUEST_TIMEOUT,
            ),
            Some(r) => crate::transfer::request(&sock, r, REQUEST_TIMEOUT),
        };
        let request_ms = t0.elapsed().as_secs_f64() * 1e3;
        let replied = Instant::now();
        let log_size = log.size();
        let expected_pid = receiver.as_ref().map_or(molt.pid(), |r| r.molt.pid());
        let sample = match reply {
            Ok(r) => check_reply(&r, update, expected_pid, &mut res.failures),
            Err(e) => {
                res.failures.push(format!("update {update}: {e}"));
                None
            }
        };
        if let (Some(r), Some(_)) = (receiver, &sample) {
            // The receiver runs the guest now; the sender must have exited 0.
            let mut old = std::mem::replace(&mut molt, r.molt);
            match old.wait_exit(Duration::from_secs(10)) {
                Ok(Some(0)) => {}
                other => res.failures.push(format!(
                    "update {update}: the sender ended with {other:?} after the transfer"
                )),
            }
        }
        molt.check_alive()?;
        // The first tick that starts after the response was surely printed after the resume;
        // the largest gap from `mark` up to it includes the tick whose interval spans the
        // pause.
        let mut span = None;
        let tick_wait = wait_for(&mut molt, TICK_TIMEOUT, "a tick after the update", || {
            log.poll()?;
            span = log.ticks[mark..]
                .iter()
                .position(|t| t.offset >= log_size)
                .map(|i| mark + i);
            Ok(span.is_some())
        });
        if let Err(e) = tick_wait {
            res.failures.push(format!("update {update}: {e}"));
        }
        let guest_gap_ms = span.map(|s| {
            let max = log.ticks[mark..=s].iter().map(|t| t.gap_max_us).max();
            max.unwrap_or(0) as f64 / 1e3
        });
        quiet_from = span.map(|s| s + 1);
        let background_ms = settle::settle(&mut molt, cfg.touched, replied, opts.min_gap)?;
        if let Some(mut s) = sample {
            s.guest_gap_ms = guest_gap_ms;
            s.request_ms = request_ms;
            s.background_ms = background_ms;
            res.samples.push(s);
        }
        eprint!(".");
    }
    eprintln!();
    finish(&mut molt, &sock, res)?;
    log.poll()?;
    res.failures.append(&mut log.problems);
    Ok(())
}

/// Checks a cpr-exec response; returns its sample, or records why it failed.
fn check_reply(r: &Reply, update: usize, pid: u32, failures: &mut Vec<String>) -> Option<Sample> {
    if r.status != 200 {
        failures.push(format!("update {update}: HTTP {}: {}", r.status, r.body));
        return None;
    }
    let b = &r.body;
    if !b["rolled_back"].is_null() {
        failures.push(format!(
            "update {update}: rolled back: {}",
            b["rolled_back"]
        ));
        return None;
    }
    if b["pid"].as_u64() != Some(u64::from(pid)) {
        failures.push(format!(
            "update {update}: pid {} instead of {pid}",
            b["pid"]
        ));
    }
    let num = |v: &Value| v.as_f64();
    let p = &b["phases_ms"];
    let parsed = (|| {
        Some(Sample {
            update,
            pause_ms: num(&b["pause_ms"])?,
            stopped_ms: num(&b["stopped_ms"])
                .or_else(|| Some(num(&b["pause_ms"])? - num(&p["pause"])?))?,
            phases_ms: Phases {
                pause: num(&p["pause"])?,
                save: num(&p["save"])?,
                exec: num(&p["exec"])?,
                restore: num(&p["restore"])?,
                resume: num(&p["resume"])?,
            },
            guest_gap_ms: None,
            request_ms: 0.0,
            background_ms: 0.0,
            from_version: b["from_version"].as_str()?.to_string(),
            to_version: b["to_version"].as_str()?.to_string(),
        })
    })();
    if parsed.is_none() {
        failures.push(format!(
            "update {update}: response lacks pause_ms, phases_ms or versions: {b}"
        ));
    }
    parsed
}

/// Reads the update count from `vm.info`, shuts molt down and checks how it ended.
fn finish(molt: &mut Molt, sock: &Path, res: &mut ConfigResult) -> Result<()> {
    let info = api::request(sock, "GET", "/api/v1/vm.info", None, REQUEST_TIMEOUT)?;
    res.updates_reported = info.body["updates"]["count"].as_u64();
    let huge = res.config.pages == Pages::Huge;
    if info.body["memory"]["hugepages"].as_bool() != Some(huge) {
        res.failures.push(format!(
            "vm.info memory.hugepages is {}, expected {huge}",
            info.body["memory"]["hugepages"]
        ));
    }
    let ok = res.samples.len() as u64;
    if res.updates_reported.is_some_and(|n| n < ok) {
        res.failures.push(format!(
            "vm.info counts {:?} updates, {ok} succeeded",
            res.updates_reported
        ));
    }
    let r = api::request(
        sock,
        "PUT",
        "/api/v1/vm.shutdown",
        Some("{}"),
        REQUEST_TIMEOUT,
    )?;
    if !(200..300).contains(&r.status) {
        res.failures
            .push(format!("vm.shutdown: HTTP {}: {}", r.status, r.body));
    }
    let code = molt.wait_exit(Duration::from_secs(30))?;
    if code != Some(0) {
        res.failures.push(format!(
            "molt exited with {code:?} after vm.shutdown; stderr: {}",
            molt.stderr_tail()
        ));
    }
    res.molt_stderr = molt.stderr_lines();
    if res.molt_stderr.iter().any(|l| l.contains("panicked")) {
        res.failures
            .push(format!("molt panicked: {}", molt.stderr_tail()));
    }
    Ok(())
}

/// Waits until molt answers `vmm.ping` with 200.
fn wait_ready(molt: &mut Molt, sock: &Path) -> Result<()> {
    wait_for(molt, BOOT_TIMEOUT, "molt's API to answer", || {
        let r = api::request(
            sock,
            "GET",
            "/api/v1/vmm.ping",
            None,
            Duration::from_secs(5),
        );
        Ok(r.is_ok_and(|r| r.status == 200))
    })
}

/// Polls `cond` every 10 ms until it holds, molt dies, a signal arrives or `timeout` passes.
fn wait_for(
    molt: &mut Molt,
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        signals::check()?;
        if cond()? {
            return Ok(());
        }
        molt.check_alive()?;
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_string(),
                secs: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
