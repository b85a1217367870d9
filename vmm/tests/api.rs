//! The API server driven by an event loop with a fake VMM, and real unix-socket clients.

#[path = "api/harness.rs"]
mod harness;

use std::net::Shutdown;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use harness::{error_of, serve, temp_dir, Client, Harness, T};
use serde_json::json;
use vmm::api::ctl::{self, CtlCommand, CtlError};
use vmm::api::{ApiError, ApiRequest, ApiResponse, ApiServer, Limits};
use vmm::persist::{Persist, RestoreFds, SaveFds};

#[test]
fn every_endpoint_answers() {
    let h = Harness::start(Limits::default());
    let mut c = h.connect();
    let r = c.request("GET", "/api/v1/vmm.ping", "");
    assert_eq!((r.status, r.body), (200, Some(json!({"version": "test"}))));
    assert!(r.head.contains("Content-Type: application/json\r\n"));
    assert!(r.head.contains("Connection: keep-alive\r\n"));
    assert_eq!(
        c.request("GET", "/api/v1/vm.info", "").body,
        Some(json!({"state": "running"}))
    );
    let r = c.request("PUT", "/api/v1/vm.pause", "{}");
    assert_eq!((r.status, r.body), (204, None));
    assert_eq!(
        c.request("GET", "/api/v1/vm.info", "").body,
        Some(json!({"state": "paused"}))
    );
    let r = c.request("PUT", "/api/v1/vm.pause", "");
    assert_eq!((r.status, error_of(&r)), (409, "already paused"));
    assert_eq!(c.request("PUT", "/api/v1/vm.resume", "").status, 204);
    assert_eq!(c.request("PUT", "/api/v1/vm.shutdown", "").status, 204);
    let r = c.request(
        "PUT",
        "/api/v1/vm.cpr-exec",
        r#"{"binary": "/bin/molt", "args": ["-v"]}"#,
    );
    assert_eq!(
        r.body,
        Some(json!({"binary": "/bin/molt", "args": ["-v"], "stand_in": false}))
    );
}

#[test]
fn refusals_are_json_errors() {
    let h = Harness::start(Limits::default());
    let mut c = h.connect();
    let r = c.request("GET", "/api/v1/vm.nothing", "");
    assert_eq!(r.status, 404);
    assert!(error_of(&r).contains("/api/v1/vm.nothing"));
    let r = c.request("DELETE", "/api/v1/vm.info", "");
    assert_eq!(r.status, 405);
    assert!(r.head.contains("\r\nAllow: GET\r\n"), "{}", r.head);
    error_of(&r);
    for (path, body) in [
        ("/api/v1/vm.cpr-exec", "{not json"),
        ("/api/v1/vm.cpr-exec", r#"{"binary": 3}"#),
        ("/api/v1/vm.cpr-exec", r#"{"unknown": true}"#),
        ("/api/v1/vm.pause", r#"{"force": true}"#),
        ("/api/v1/vm.pause?now=1", ""),
    ] {
        let r = c.request("PUT", path, body);
        assert_eq!(r.status, 400, "{path} {body}");
        error_of(&r);
    }
    // The connection survived all of those.
    assert_eq!(c.request("GET", "/api/v1/vmm.ping", "").status, 200);
}

#[test]
fn framing_errors_answer_and_close() {
    let h = Harness::start(Limits::default());
    let cases: [(&[u8], u16); 6] = [
        (
            b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 2097152\r\n\r\n",
            413,
        ),
        (
            b"PUT /api/v1/vm.pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            411,
        ),
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 400),
        (b"GET /api/v1/vmm.ping HTTP/3.0\r\n\r\n", 505),
        (
            b"GET /api/v1/vmm.ping HTTP/1.1\r\nExpect: telepathy\r\n\r\n",
            417,
        ),
        (
            b"GET /api/v1/vmm.ping HTTP/1.1\r\nBroken header\r\n\r\n",
            400,
        ),
    ];
    for (bytes, status) in cases {
        let mut c = h.connect();
        c.send(bytes);
        let r = c.response();
        assert_eq!(r.status, status, "{}", String::from_utf8_lossy(bytes));
        assert!(r.head.contains("Connection: close\r\n"));
        error_of(&r);
        assert!(c.at_eof());
    }
    let mut c = h.connect();
    let mut big = b"GET /api/v1/vmm.ping HTTP/1.1\r\n".to_vec();
    big.extend(std::iter::repeat_n(b"X-Pad: 0123456789abcdef\r\n".iter().copied(), 1000).flatten());
    c.send(&big);
    assert_eq!(c.response().status, 431);
    // A body of exactly the limit is accepted (all whitespace reads as no body).
    let mut c = h.connect();
    let body = " ".repeat(1 << 20);
    assert_eq!(c.request("PUT", "/api/v1/vm.pause", &body).status, 204);
}

#[test]
fn a_stalled_client_does_not_block_others_and_times_out() {
    let limits = Limits {
        request_timeout: Duration::from_millis(800),
        ..Limits::default()
    };
    let h = Harness::start(limits);
    let mut slow = h.connect();
    slow.send(b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Le");
    let started = Instant::now();
    let mut fast = h.connect();
    assert_eq!(fast.request("GET", "/api/v1/vmm.ping", "").status, 200);
    // The slow client has had no answer yet...
    slow.stream.set_nonblocking(true).unwrap();
    let pending = std::io::Read::read(&mut slow.stream, &mut [0u8; 1]);
    assert_eq!(pending.unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
    slow.stream.set_nonblocking(false).unwrap();
    // ...until its request times out.
    let r = slow.response();
    assert_eq!(r.status, 408);
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert!(slow.at_eof());
    // A body that never arrives times out the same way.
    let mut slow = h.connect();
    slow.send(b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 10\r\n\r\n{");
    assert_eq!(slow.response().status, 408);
}

#[test]
fn idle_keep_alive_connections_are_closed() {
    let limits = Limits {
        idle_timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let h = Harness::start(limits);
    let mut c = h.connect();
    assert_eq!(c.request("GET", "/api/v1/vmm.ping", "").status, 200);
    assert!(c.at_eof());
}

#[test]
fn garbage_then_good_clients() {
    let h = Harness::start(Limits::default());
    let mut c = h.connect();
    c.send(&[0xff; 100]);
    assert_eq!(c.response().status, 400);
    let mut c = h.connect();
    c.send(b"hello\r\n\r\n");
    assert_eq!(c.response().status, 400);
    assert_eq!(
        h.connect().request("GET", "/api/v1/vmm.ping", "").status,
        200
    );
}

#[test]
fn keep_alive_and_pipelining() {
    let h = Harness::start(Limits::default());
    let mut c = h.connect();
    for i in 0..100 {
        let r = c.request("GET", "/api/v1/vmm.ping", "");
        assert_eq!(r.status, 200, "request {i}");
    }
    let mut pipelined = Vec::new();
    for path in [
        "/api/v1/vm.pause",
        "/api/v1/vm.info",
        "/api/v1/vm.resume",
        "/api/v1/vm.info",
    ] {
        let method = if path.ends_with("info") { "GET" } else { "PUT" };
        pipelined.extend_from_slice(format!("{method} {path} HTTP/1.1\r\n\r\n").as_bytes());
    }
    pipelined.extend_from_slice(b"GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n");
    c.send(&pipelined);
    assert_eq!(c.response().status, 204);
    assert_eq!(c.response().body, Some(json!({"state": "paused"})));
    assert_eq!(c.response().status, 204);
    assert_eq!(c.response().body, Some(json!({"state": "running"})));
    let last = c.response();
    assert!(last.head.contains("Connection: close\r\n"));
    assert!(c.at_eof());
}

#[test]
fn http_1_0_and_expect_continue() {
    let h = Harness::start(Limits::default());
    let mut c = h.connect();
    c.send(b"GET /api/v1/vmm.ping HTTP/1.0\r\n\r\n");
    assert!(c.response().head.contains("Connection: close\r\n"));
    assert!(c.at_eof());
    let mut c = h.connect();
    c.send(
        b"PUT /api/v1/vm.cpr-exec HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n",
    );
    assert_eq!(c.response().status, 100);
    c.send(b"{}");
    assert_eq!(c.response().status, 200);
}

#[test]
fn connections_are_capped() {
    let h = Harness::start(Limits {
        max_connections: 3,
        ..Limits::default()
    });
    let mut open: Vec<Client> = (0..3).map(|_| h.connect()).collect();
    for c in &mut open {
        assert_eq!(c.request("GET", "/api/v1/vmm.ping", "").status, 200);
    }
    let mut extra = h.connect();
    let r = extra.response();
    assert_eq!((r.status, error_of(&r)), (503, "too many connections"));
    drop(open.pop());
    // The server notices the close and admits a new client.
    let deadline = Instant::now() + T;
    loop {
        let mut c = h.connect();
        c.send(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n");
        if c.response().status == 200 {
            break;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn socket_file_lifecycle() {
    let mut h = Harness::start(Limits::default());
    let meta = std::fs::metadata(&h.path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // A second server on a live socket is refused.
    assert!(matches!(ApiServer::bind(&h.path), Err(ApiError::InUse(_))));
    let path = h.shutdown();
    assert!(!path.exists(), "socket removed on drop");

    // A stale socket (nobody listening) is replaced; a regular file is not.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = ApiServer::bind(&path).unwrap();
    drop(server);
    assert!(!path.exists());
    std::fs::write(&path, b"precious").unwrap();
    assert!(matches!(
        ApiServer::bind(&path),
        Err(ApiError::NotASocket(_))
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    let long = PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
    assert!(matches!(ApiServer::bind(&long), Err(ApiError::BadPath(_))));
}

#[test]
fn ctl_client() {
    let h = Harness::start(Limits::default());
    let run = |cmd: CtlCommand| ctl::run(&h.path, &cmd, T);
    assert_eq!(
        run(CtlCommand::Ping).unwrap(),
        Some(json!({"version": "test"}))
    );
    assert_eq!(run(CtlCommand::Pause).unwrap(), None);
    assert_eq!(
        run(CtlCommand::Info).unwrap(),
        Some(json!({"state": "paused"}))
    );
    match run(CtlCommand::Pause) {
        Err(CtlError::Status {
            status: 409,
            message,
        }) => assert_eq!(message, "already paused"),
        other => panic!("{other:?}"),
    }
    assert_eq!(run(CtlCommand::Resume).unwrap(), None);
    assert_eq!(run(CtlCommand::Shutdown).unwrap(), None);
    let cpr = CtlCommand::CprExec {
        binary: Some("/b".into()),
        args: vec!["--x".into()],
        stand_in: false,
    };
    assert_eq!(
        run(cpr).unwrap(),
        Some(json!({"binary": "/b", "args": ["--x"], "stand_in": false}))
    );
    let cpr = CtlCommand::CprExec {
        binary: None,
        args: Vec::new(),
        stand_in: true,
    };
    assert_eq!(
        run(cpr).unwrap(),
        Some(json!({"binary": null, "args": null, "stand_in": true}))
    );
    let get = CtlCommand::Get {
        endpoint: "vm.bogus".into(),
    };
    assert!(matches!(
        run(get),
        Err(CtlError::Status { status: 404, .. })
    ));
    let put = CtlCommand::Put {
        endpoint: "vm.pause".into(),
        body: Some(r#"{"a": 1}"#.into()),
    };
    assert!(matches!(
        run(put),
        Err(CtlError::Status { status: 400, .. })
    ));

    let missing = h.dir.join("missing.sock");
    assert!(matches!(
        ctl::run(&missing, &CtlCommand::Ping, T),
        Err(CtlError::NoSocket(_))
    ));
    let dead = h.dir.join("dead.sock");
    drop(UnixListener::bind(&dead).unwrap());
    assert!(matches!(
        ctl::run(&dead, &CtlCommand::Ping, T),
        Err(CtlError::Refused(_))
    ));
}

#[test]
fn ctl_waits_for_a_busy_server() {
    let dir = temp_dir();
    let path = dir.join("api.sock");
    let server = Arc::new(Mutex::new(ApiServer::bind(&path).unwrap()));
    let client = {
        let path = path.clone();
        std::thread::spawn(move || ctl::run(&path, &CtlCommand::Ping, T))
    };
    // As during a live update: nobody accepts for a while.
    std::thread::sleep(Duration::from_millis(300));
    let stop = Arc::new(AtomicBool::new(false));
    let serving = serve(server, stop.clone());
    assert_eq!(
        client.join().unwrap().unwrap(),
        Some(json!({"version": "test"}))
    );
    stop.store(true, Ordering::Relaxed);
    serving.join().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

fn dup(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` is open for the duration of this call (the server owning it is alive).
    unsafe { BorrowedFd::borrow_raw(fd) }
        .try_clone_to_owned()
        .unwrap()
}

#[test]
fn handover_to_an_inherited_server() {
    let dir = temp_dir();
    let path = dir.join("api.sock");
    let old = Arc::new(Mutex::new(ApiServer::bind(&path).unwrap()));
    let mut em = EventManager::<Arc<Mutex<ApiServer>>>::new().unwrap();
    em.add_subscriber(old.clone());
    let mut c = Client::new(&path);
    c.send(b"PUT /api/v1/vm.cpr-exec HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}");
    let (conn, req) = loop {
        em.run_with_timeout(100).unwrap();
        if let Some(r) = old.lock().unwrap().take_requests().pop() {
            break r;
        }
    };
    assert!(matches!(req, ApiRequest::CprExec(_)));
    // What a handoff keeps: the server's state, and the fds it declares (the listener and the
    // waiting connection), received by the next keeper.
    let (state, received) = {
        let mut s = old.lock().unwrap();
        s.begin_handoff(conn);
        s.set_remove_on_drop(false);
        let mut fds = SaveFds::new();
        let state = s.save(&mut fds).unwrap();
        let received: Vec<(String, OwnedFd)> = fds
            .describe()
            .into_iter()
            .map(|p| (p.name, dup(p.fd)))
            .collect();
        (state, received)
    };
    assert_eq!(state.waiting, Some(conn));
    assert_eq!(received.len(), 2, "listener and waiting connection");
    drop(em);
    drop(old);
    assert!(path.exists());

    let mut fds = RestoreFds::new(cpr::Inherited::from_owned(received).unwrap());
    let mut new = ApiServer::restore(&state, (), &mut fds).unwrap();
    assert!(fds.unclaimed().is_empty());
    new.respond(conn, ApiResponse::no_content());
    new.end_handoff();
    // A taken-over server keeps the socket path until its keeper commits (a rollback would
    // serve it again); from then on it is the new server's to remove.
    new.set_remove_on_drop(true);
    let new = Arc::new(Mutex::new(new));
    let stop = Arc::new(AtomicBool::new(false));
    let serving = serve(new.clone(), stop.clone());
    let r = c.response();
    assert_eq!(r.status, 204);
    assert!(
        c.at_eof(),
        "the handed-over connection closes after its response"
    );
    assert_eq!(
        Client::new(&path)
            .request("GET", "/api/v1/vmm.ping", "")
            .status,
        200
    );
    stop.store(true, Ordering::Relaxed);
    serving.join().unwrap();
    drop(new);
    assert!(!path.exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn half_closed_and_vanished_clients() {
    let h = Harness::start(Limits::default());
    let mut c = h.connect();
    c.send(b"PUT /api/v1/vm.pause HTTP/1.1\r\n\r\nGET /api/v1/vm.info HTTP/1.1\r\n\r\n");
    c.stream.shutdown(Shutdown::Write).unwrap();
    assert_eq!(c.response().status, 204);
    let r = c.response();
    assert_eq!(r.body, Some(json!({"state": "paused"})));
    assert!(r.head.contains("Connection: close\r\n"), "{}", r.head);
    assert!(c.at_eof());
    // A request whose client leaves at once still reaches the VMM.
    let mut c = h.connect();
    c.send(b"PUT /api/v1/vm.resume HTTP/1.1\r\n\r\n");
    drop(c);
    let deadline = Instant::now() + T;
    while h.connect().request("GET", "/api/v1/vm.info", "").body
        != Some(json!({"state": "running"}))
    {
        assert!(Instant::now() < deadline, "resume never arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
}
