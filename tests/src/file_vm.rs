//! A VM under test whose console goes to a file and which answers on an API socket: both
//! travel with the VM across cpr-exec updates and transfers, so a test follows one VM through
//! every process it runs in. The receivers of transfers are started here and checked when
//! the VM is shut down.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::api::{self, Reply};
use crate::{guest_lines, molt_bin, GuestLine, Molt};

/// How long a VM under test gets for anything it is waited for.
pub const WAIT: Duration = Duration::from_secs(60);

/// See the module documentation.
pub struct FileVm {
    first: Option<Molt>,
    receivers: Vec<Molt>,
    shut_down: bool,
    /// The API socket.
    pub api: PathBuf,
    console: PathBuf,
    /// Where its files and the transfer sockets go.
    pub dir: PathBuf,
}

impl FileVm {
    /// Starts molt with its API socket and console file in `dir` and `args`; returns once the
    /// API answers.
    pub fn start<S: AsRef<str>>(dir: &Path, args: &[S]) -> FileVm {
        Self::start_with(&molt_bin(), dir, args, &[])
    }

    /// As [`start`](Self::start), running `bin` with `env` added to its environment.
    pub fn start_with<S: AsRef<str>>(
        bin: &Path,
        dir: &Path,
        args: &[S],
        env: &[(&str, &str)],
    ) -> FileVm {
        let api = dir.join("api.sock");
        let console = dir.join("console.log");
        let mut all = vec![
            "--api-socket".to_string(),
            api.display().to_string(),
            "--serial".into(),
            format!("file={}", console.display()),
        ];
        all.extend(args.iter().map(|a| a.as_ref().to_string()));
        let first = Molt::spawn_env(bin, &all, env);
        api::wait_ready(&api, WAIT);
        FileVm {
            first: Some(first),
            receivers: Vec::new(),
            shut_down: false,
            api,
            console,
            dir: dir.to_path_buf(),
        }
    }

    /// The console's whole lines so far.
    pub fn console(&self) -> String {
        let mut text = std::fs::read_to_string(&self.console).unwrap_or_default();
        text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
        text
    }

    /// The guest's lines so far.
    pub fn lines(&self) -> Vec<GuestLine> {
        guest_lines(self.console().lines())
    }

    /// The last 40 lines of the console.
    pub fn tail(&self) -> String {
        let text = self.console();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The highest `key` of the `kind` lines that did not fail.
    pub fn last(&self, kind: &str, key: &str) -> u64 {
        self.lines()
            .iter()
            .filter(|l| l.kind == kind && l.get(key).is_some() && !l.has("FAIL"))
            .map(|l| l.num(key))
            .max()
            .unwrap_or(0)
    }

    /// Waits until the guest has printed `more` further `kind` lines (by `key`); `context`
    /// adds to the failure message.
    pub fn wait_for(&self, kind: &str, key: &str, more: u64, context: impl Fn() -> String) {
        let target = self.last(kind, key) + more;
        let deadline = Instant::now() + WAIT;
        while self.last(kind, key) < target {
            assert!(
                Instant::now() < deadline,
                "no {kind} {key}={target}; {}:\n{}",
                context(),
                self.tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for `more` ticks.
    pub fn wait_ticks(&self, more: u64) {
        self.wait_for("tick", "n", more, String::new);
    }

    /// The `key` of every `kind` line, in console order, numbered 1, 2, 3, … with none
    /// missing or repeated; returns how many.
    pub fn assert_sequence(&self, kind: &str, key: &str) -> usize {
        let text = self.console();
        let ns: Vec<u64> = guest_lines(text.lines())
            .iter()
            .filter(|l| l.kind == kind && l.get(key).is_some())
            .map(|l| l.num(key))
            .collect();
        for (i, n) in ns.iter().enumerate() {
            assert_eq!(
                *n,
                i as u64 + 1,
                "{kind} {key} out of sequence: {ns:?}\n{text}"
            );
        }
        ns.len()
    }

    /// With `molt.idle=halt`: the guest slept and took device interrupts during the ticks
    /// after the `skip` first ones (the ticks' `sleeps=` and `irqs=`); returns their sums.
    pub fn assert_slept_on_interrupts(&self, skip: usize) -> (u64, u64) {
        let ticks: Vec<GuestLine> = self
            .lines()
            .into_iter()
            .filter(|l| l.kind == "tick")
            .skip(skip)
            .collect();
        let sum = |key| ticks.iter().map(|t| t.num(key)).sum::<u64>();
        let (sleeps, irqs) = (sum("sleeps"), sum("irqs"));
        assert!(
            sleeps > 0 && irqs > 0,
            "the guest never slept on its disk's interrupts ({sleeps} sleeps, {irqs} interrupts in {} ticks):\n{}",
            ticks.len(),
            self.tail()
        );
        (sleeps, irqs)
    }

    /// The guest booted once and no line says FAIL.
    pub fn assert_one_boot_no_failure(&self) {
        let text = self.console();
        let boots = guest_lines(text.lines())
            .iter()
            .filter(|l| l.kind == "boot")
            .count();
        assert_eq!(boots, 1, "{text}");
        assert!(!text.contains("FAIL"), "{text}");
    }

    /// `vm.info`, which must answer 200.
    pub fn info(&self) -> Value {
        let r = api::get(&self.api, "vm.info");
        assert_eq!(r.status, 200, "{r:?}");
        r.body
    }

    /// The pid of the process that runs the VM now.
    pub fn pid(&self) -> u64 {
        self.info()["pid"].as_u64().unwrap_or(0)
    }

    /// A cpr-exec to `binary`.
    pub fn cpr_exec(&self, binary: &Path) -> Reply {
        let body = format!(r#"{{"binary": "{}"}}"#, binary.display());
        api::put(&self.api, "vm.cpr-exec", &body)
    }

    /// A cpr-exec to `binary` through a stand-in (the guest runs while the binary starts).
    pub fn cpr_exec_stand_in(&self, binary: &Path) -> Reply {
        let body = format!(r#"{{"binary": "{}", "stand_in": true}}"#, binary.display());
        api::put(&self.api, "vm.cpr-exec", &body)
    }

    /// Starts a receiver (`bin --incoming`, with `extra` arguments and `env`) and transfers
    /// the VM to it.
    pub fn transfer_to(&mut self, bin: &Path, extra: &[&str], env: &[(&str, &str)]) -> Reply {
        let socket = self.dir.join(format!("in{}.sock", self.receivers.len()));
        self.receivers
            .push(Molt::spawn_incoming(bin, &socket, extra, env));
        self.transfer(&socket)
    }

    /// Transfers the VM to this build's `molt --incoming`.
    pub fn transfer_to_this_build(&mut self) -> Reply {
        self.transfer_to(&molt_bin(), &[], &[])
    }

    /// Asks for a transfer to whatever listens at `socket`.
    pub fn transfer(&self, socket: &Path) -> Reply {
        let body = format!(r#"{{"socket": "{}"}}"#, socket.display());
        api::put(&self.api, "vm.cpr-transfer", &body)
    }

    /// Shuts the VM down: the process running it exits 0, every process it ran in ended
    /// without a panic.
    pub fn shutdown(self) {
        self.shutdown_first_exiting(0);
    }

    /// As [`shutdown`](Self::shutdown), the first process (its PID kept by every cpr-exec)
    /// having exited with `code` by then.
    pub fn shutdown_first_exiting(mut self, code: i32) {
        assert_eq!(api::put(&self.api, "vm.shutdown", "{}").status, 204);
        self.shut_down = true;
        let first = self.first.take().expect("the first process");
        let out = first.finish(WAIT);
        assert_eq!(out.code(), Some(code), "{}", out.describe());
        out.assert_no_panic();
        for r in std::mem::take(&mut self.receivers) {
            let out = r.finish(WAIT);
            assert!(out.code().is_some(), "{}", out.describe());
            out.assert_no_panic();
        }
    }
}

/// A test that failed half-way: the VM ends too, whichever process runs it by now (a
/// receiver or a stand-in this test did not start directly is not killed with its children).
impl Drop for FileVm {
    fn drop(&mut self) {
        if !self.shut_down {
            let _ = api::request(
                &self.api,
                "PUT",
                "/api/v1/vm.shutdown",
                Some("{}"),
                Duration::from_secs(2),
            );
        }
    }
}
