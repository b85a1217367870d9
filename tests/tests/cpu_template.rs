//! `--cpu-template`: the resolved template shows in `vm.info`, `auto` picks `emulated` exactly
//! on PVM hosts, and a live update keeps the VM's template (it travels in the record).

use std::time::Duration;

use molt_tests::{api, guest_lines, is_pvm_host, Molt, Stream, TempDir};

const WAIT: Duration = Duration::from_secs(60);

fn template(socket: &std::path::Path) -> String {
    let r = api::get(socket, "vm.info");
    assert_eq!(r.status, 200, "{r:?}");
    r.body["cpu_template"]
        .as_str()
        .unwrap_or_else(|| panic!("no cpu_template in {}", r.body))
        .to_string()
}

fn ticks(molt: &Molt) -> usize {
    guest_lines(
        molt.lines()
            .iter()
            .filter(|l| l.stream == Stream::Stdout)
            .map(|l| l.text.as_str()),
    )
    .iter()
    .filter(|l| l.kind == "tick")
    .count()
}

#[test]
fn the_template_is_resolved_shown_and_kept_across_a_live_update() {
    let auto = if is_pvm_host() { "emulated" } else { "host" };
    for (choice, expected) in [("auto", auto), ("host", "host"), ("emulated", "emulated")] {
        let dir = TempDir::new("cpu-template");
        let socket = dir.join("api.sock");
        let mut molt = Molt::spawn(&[
            "--api-socket",
            &socket.display().to_string(),
            "--cpu-template",
            choice,
            "--cmdline",
            "molt.memtest=0",
        ]);
        api::wait_ready(&socket, WAIT);
        molt.wait_stdout("tick n=1", WAIT);
        assert_eq!(template(&socket), expected, "--cpu-template {choice}");
        let r = api::put(&socket, "vm.cpr-exec", "{}");
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(template(&socket), expected, "after the update ({choice})");
        let before = ticks(&molt);
        molt.wait_line(Stream::Stdout, WAIT, |l| l.contains("tick n="));
        assert!(ticks(&molt) > before);
    }
}

#[test]
fn an_unknown_template_is_refused() {
    let out = molt_tests::run(&["--cpu-template", "t2"]);
    out.assert_error(&["cpu-template", "t2"]);
}
