//! Test harness: an `ApiServer` driven by an event loop with a fake VMM, and a raw client.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, SubscriberOps};
use serde_json::{json, Value};
use vmm::api::{ApiRequest, ApiResponse, ApiServer, Limits};

pub const T: Duration = Duration::from_secs(10);

pub fn temp_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("molt-api-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The fake VMM: answers each request from its own state.
fn handle(req: ApiRequest, paused: &mut bool) -> ApiResponse {
    match req {
        ApiRequest::Ping => ApiResponse::json(200, &json!({ "version": "test" })),
        ApiRequest::Info => ApiResponse::json(
            200,
            &json!({ "state": if *paused { "paused" } else { "running" } }),
        ),
        ApiRequest::Pause if *paused => ApiResponse::error(409, "already paused"),
        ApiRequest::Pause | ApiRequest::Resume => {
            *paused = matches!(req, ApiRequest::Pause);
            ApiResponse::no_content()
        }
        ApiRequest::Shutdown => ApiResponse::no_content(),
        ApiRequest::CprExec(r) => {
            let echo = json!({ "binary": r.binary, "args": r.args, "stand_in": r.stand_in });
            ApiResponse::json(200, &echo)
        }
        ApiRequest::CprTransfer(r) => ApiResponse::json(200, &json!({ "socket": r.socket })),
        ApiRequest::Snapshot(r) => ApiResponse::json(200, &json!({ "path": r.path })),
    }
}

/// Runs the event loop and the fake VMM on a thread, as molt's main thread does.
pub fn serve(server: Arc<Mutex<ApiServer>>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut em = EventManager::<Arc<Mutex<ApiServer>>>::new().unwrap();
        em.add_subscriber(server.clone());
        let mut paused = false;
        while !stop.load(Ordering::Relaxed) {
            em.run_with_timeout(20).unwrap();
            let requests = server.lock().unwrap().take_requests();
            for (conn, req) in requests {
                let resp = handle(req, &mut paused);
                server.lock().unwrap().respond(conn, resp);
            }
        }
    })
}

pub struct Harness {
    pub dir: PathBuf,
    pub path: PathBuf,
    server: Option<Arc<Mutex<ApiServer>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Harness {
    pub fn start(limits: Limits) -> Self {
        let dir = temp_dir();
        let path = dir.join("api.sock");
        let server = Arc::new(Mutex::new(
            ApiServer::bind(&path).unwrap().with_limits(limits),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = Some(serve(server.clone(), stop.clone()));
        Self {
            dir,
            path,
            server: Some(server),
            stop,
            thread,
        }
    }

    pub fn connect(&self) -> Client {
        Client::new(&self.path)
    }

    /// Stops the loop and drops the server; returns the socket path.
    pub fn shutdown(&mut self) -> PathBuf {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.server.take();
        self.path.clone()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct Client {
    pub stream: UnixStream,
    buf: Vec<u8>,
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub head: String,
    pub body: Option<Value>,
}

impl Client {
    pub fn new(path: &Path) -> Self {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(T)).unwrap();
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).unwrap();
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Reads one response.
    pub fn response(&mut self) -> Resp {
        let end = loop {
            if let Some(p) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            assert!(self.fill() > 0, "EOF before a response: {:?}", self.buf);
        };
        let head = String::from_utf8(self.buf[..end].to_vec()).unwrap();
        let status = head[9..12].parse().unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        while self.buf.len() < end + len {
            assert!(self.fill() > 0, "EOF in a body");
        }
        let body: Vec<u8> = self.buf.drain(..end + len).skip(end).collect();
        let body = (!body.is_empty()).then(|| serde_json::from_slice(&body).unwrap());
        Resp { status, head, body }
    }

    /// True when the server closed the connection (after any unread bytes).
    pub fn at_eof(&mut self) -> bool {
        self.buf.is_empty() && self.fill() == 0
    }

    pub fn request(&mut self, method: &str, path: &str, body: &str) -> Resp {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.send(req.as_bytes());
        self.response()
    }
}

pub fn error_of(resp: &Resp) -> &str {
    resp.body
        .as_ref()
        .and_then(|b| b["error"].as_str())
        .unwrap_or_else(|| panic!("{resp:?}"))
}
