//! `molt ctl`: a small client of the API socket.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::http;

/// Largest response `molt ctl` accepts.
const MAX_RESPONSE: usize = 16 << 20;

/// `molt ctl`: send one request to a running molt and print the JSON result.
#[derive(Debug, Clone, clap::Args)]
pub struct CtlArgs {
    /// API socket of the running molt (its --api-socket).
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,

    /// Seconds to wait for the connection and the response. molt answers late while it is
    /// mid live-update; the request waits in the socket's backlog meanwhile.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub timeout: u64,

    /// What to ask.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// The requests `molt ctl` sends.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum CtlCommand {
    /// Check that molt answers (GET vmm.ping).
    Ping,
    /// Describe the VM (GET vm.info).
    Info,
    /// Pause the vCPUs (PUT vm.pause).
    Pause,
    /// Resume the vCPUs (PUT vm.resume).
    Resume,
    /// Stop the VM and molt (PUT vm.shutdown).
    Shutdown,
    /// Live-update molt by re-executing it (PUT vm.cpr-exec).
    CprExec {
        /// Binary to execute (absolute path). Default: the running binary.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// An argument for the new binary, replacing the running ones (repeat for several).
        #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
        args: Vec<String>,
        /// Keep the guest running while the binary is executed (two short pauses: into a
        /// stand-in process and back).
        #[arg(long)]
        stand_in: bool,
    },
    /// Hand the VM to a separately started `molt --incoming PATH` (PUT vm.cpr-transfer).
    CprTransfer {
        /// The receiver's socket (absolute path).
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
    },
    /// Snapshot the VM to a directory (PUT vm.snapshot).
    Snapshot {
        /// The snapshot directory (replaced atomically if it holds a snapshot).
        #[arg(long, value_name = "DIR")]
        path: PathBuf,
        /// paused: leave the VM paused afterwards; stop: end molt once it is durable; live: the
        /// guest runs while RAM is written.
        #[arg(long, value_name = "MODE", default_value = "paused",
              value_parser = ["paused", "stop", "live"])]
        mode: String,
    },
    /// GET any endpoint, e.g. `vm.info` or `/api/v1/vm.info`.
    Get {
        /// Endpoint name or absolute path.
        endpoint: String,
    },
    /// PUT any endpoint, with an optional JSON body.
    Put {
        /// Endpoint name or absolute path.
        endpoint: String,
        /// JSON body.
        #[arg(long, value_name = "JSON")]
        body: Option<String>,
    },
}

/// Errors of `molt ctl`.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Nothing exists at the socket path.
    #[error("no API socket at {0:?}; is molt running with --api-socket?")]
    NoSocket(PathBuf),
    /// The socket exists but nobody listens on it.
    #[error("nothing is listening on {0:?}; molt is not running")]
    Refused(PathBuf),
    /// Connecting failed otherwise.
    #[error("cannot connect to {path:?}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// No complete response within the timeout.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// Sending or receiving failed.
    #[error("API connection")]
    Io(#[source] io::Error),
    /// The response is not valid HTTP.
    #[error("malformed response: {0}")]
    BadResponse(&'static str),
    /// The `--body` given is not JSON.
    #[error("--body is not valid JSON")]
    BadBody(#[source] serde_json::Error),
    /// molt answered with an error status.
    #[error("{message} (HTTP {status})")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The error message of the response.
        message: String,
    },
}

/// A response from the API.
#[derive(Debug, Clone, PartialEq)]
pub struct CtlResponse {
    /// HTTP status.
    pub status: u16,
    /// The JSON body; `None` when the body is empty (e.g. 204).
    pub body: Option<serde_json::Value>,
}

impl CtlCommand {
    /// The method, path and body this command sends.
    pub fn request(&self) -> Result<(&'static str, String, Option<String>), CtlError> {
        let api = |name: &str| {
            if name.starts_with('/') {
                name.to_string()
            } else {
                format!("{}{name}", super::API_PREFIX)
            }
        };
        Ok(match self {
            Self::Ping => ("GET", api("vmm.ping"), None),
            Self::Info => ("GET", api("vm.info"), None),
            Self::Pause => ("PUT", api("vm.pause"), None),
            Self::Resume => ("PUT", api("vm.resume"), None),
            Self::Shutdown => ("PUT", api("vm.shutdown"), None),
            Self::Snapshot { path, mode } => {
                let path = std::path::absolute(path).map_err(CtlError::Io)?;
                let body = serde_json::json!({ "path": path, "mode": mode }).to_string();
                ("PUT", api("vm.snapshot"), Some(body))
            }
            Self::CprExec {
                binary,
                args,
                stand_in,
            } => {
                let mut body = serde_json::Map::new();
                if *stand_in {
                    body.insert("stand_in".into(), serde_json::json!(true));
                }
                if let Some(b) = binary {
                    body.insert("binary".into(), serde_json::json!(b));
                }
                if !args.is_empty() {
                    body.insert("args".into(), serde_json::json!(args));
                }
                let body = serde_json::Value::Object(body).to_string();
                ("PUT", api("vm.cpr-exec"), Some(body))
            }
            Self::CprTransfer { socket } => {
                let body = serde_json::json!({ "socket": socket }).to_string();
                ("PUT", api("vm.cpr-transfer"), Some(body))
            }
            Self::Get { endpoint } => ("GET", api(endpoint), None),
            Self::Put { endpoint, body } => {
                if let Some(b) = body {
                    serde_json::from_str::<serde_json::Value>(b).map_err(CtlError::BadBody)?;
                }
                ("PUT", api(endpoint), body.clone())
            }
        })
    }
}

/// Sends one request on a new connection to `socket` and reads the response, waiting up to
/// `timeout` for each of connecting and the response.
pub fn send(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<CtlResponse, CtlError> {
    let mut stream = super::socket::connect(socket, timeout).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => CtlError::NoSocket(socket.to_path_buf()),
        io::ErrorKind::ConnectionRefused => CtlError::Refused(socket.to_path_buf()),
        io::ErrorKind::TimedOut => CtlError::Timeout(timeout),
        _ => CtlError::Connect {
            path: socket.to_path_buf(),
            source: e,
        },
    })?;
    let deadline = Instant::now() + timeout;
    let io_err = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => CtlError::Timeout(timeout),
        _ => CtlError::Io(e),
    };
    stream
        .set_write_timeout(Some(timeout))
        .map_err(CtlError::Io)?;
    let body = body.unwrap_or("");
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if !body.is_empty() || method == "PUT" {
        request.push_str("Content-Type: application/json\r\n");
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).map_err(io_err)?;

    let mut response = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(CtlError::Timeout(timeout));
        }
        stream.set_read_timeout(Some(left)).map_err(CtlError::Io)?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // The server may reset after a complete response (e.g. a refusal).
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !response.is_empty() => break,
            Err(e) => return Err(io_err(e)),
        }
        if response.len() > MAX_RESPONSE {
            return Err(CtlError::BadResponse("response too large"));
        }
        if let Some(r) = parse_response(&response)? {
            return Ok(r);
        }
    }
    parse_response(&response)?.ok_or(CtlError::BadResponse("truncated response"))
}

/// Parses a complete response (skipping interim 1xx ones), or `None` if more is needed.
fn parse_response(buf: &[u8]) -> Result<Option<CtlResponse>, CtlError> {
    let mut rest = buf;
    loop {
        let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Ok(None);
        };
        let head = std::str::from_utf8(&rest[..end])
            .map_err(|_| CtlError::BadResponse("non-UTF-8 header"))?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let mut parts = status_line.splitn(3, ' ');
        let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
            return Err(CtlError::BadResponse("bad status line"));
        };
        let status: u16 = match code.parse() {
            Ok(s) if version.starts_with("HTTP/1.") && (100..600).contains(&s) => s,
            _ => return Err(CtlError::BadResponse("bad status line")),
        };
        let body_start = end + 4;
        if status < 200 {
            rest = &rest[body_start..];
            continue;
        }
        let mut length = 0usize;
        for line in lines {
            let (name, value) = line
                .split_once(':')
                .ok_or(CtlError::BadResponse("bad header"))?;
            if name.eq_ignore_ascii_case("content-length") {
                length = value
                    .trim()
                    .parse()
                    .map_err(|_| CtlError::BadResponse("bad Content-Length"))?;
            }
        }
        if length > MAX_RESPONSE {
            return Err(CtlError::BadResponse("response too large"));
        }
        let Some(body) = rest.get(body_start..body_start + length) else {
            return Ok(None);
        };
        let body = if body.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            Some(
                serde_json::from_slice(body)
                    .map_err(|_| CtlError::BadResponse("body is not JSON"))?,
            )
        };
        return Ok(Some(CtlResponse { status, body }));
    }
}

/// Runs `command` against `socket`: the JSON body of a 2xx response, or the error.
pub fn run(
    socket: &Path,
    command: &CtlCommand,
    timeout: Duration,
) -> Result<Option<serde_json::Value>, CtlError> {
    let (method, path, body) = command.request()?;
    let resp = send(socket, method, &path, body.as_deref(), timeout)?;
    if (200..300).contains(&resp.status) {
        return Ok(resp.body);
    }
    let message = match &resp.body {
        Some(serde_json::Value::Object(o)) => match o.get("error") {
            Some(serde_json::Value::String(s)) => s.clone(),
            _ => resp
                .body
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        },
        Some(other) => other.to_string(),
        None => http::reason(resp.status).to_string(),
    };
    Err(CtlError::Status {
        status: resp.status,
        message,
    })
}

/// Entry point of `molt ctl`: prints the response body (pretty JSON) to stdout and returns
/// 0, or prints the error to stderr and returns 1.
pub fn ctl_main(args: CtlArgs) -> i32 {
    let timeout = Duration::from_secs(args.timeout.max(1));
    let progress = matches!(args.command, CtlCommand::Snapshot { .. })
        .then(|| super::progress::show(&args.api_socket));
    let result = run(&args.api_socket, &args.command, timeout);
    drop(progress);
    match result {
        Ok(body) => {
            if let Some(body) = body {
                let text = serde_json::to_string_pretty(&body).unwrap_or_else(|_| body.to_string());
                println!("{text}");
            }
            0
        }
        Err(e) => {
            eprintln!("molt ctl: {}", crate::error_chain(&e));
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    fn parse(args: &[&str]) -> CtlArgs {
        Cli::try_parse_from(std::iter::once("ctl").chain(args.iter().copied()))
            .unwrap()
            .ctl
    }

    #[test]
    fn commands_parse() {
        let a = parse(&["--api-socket", "/s", "info"]);
        assert_eq!(a.api_socket, PathBuf::from("/s"));
        assert_eq!(a.timeout, 60);
        assert_eq!(a.command, CtlCommand::Info);
        let a = parse(&[
            "--api-socket",
            "/s",
            "cpr-exec",
            "--binary",
            "/b",
            "--arg",
            "--cpus",
            "--arg",
            "2",
        ]);
        assert_eq!(
            a.command.request().unwrap(),
            (
                "PUT",
                "/api/v1/vm.cpr-exec".into(),
                Some(r#"{"args":["--cpus","2"],"binary":"/b"}"#.into())
            )
        );
        let a = parse(&["--api-socket", "/s", "put", "vm.pause", "--body", "{}"]);
        assert_eq!(
            a.command.request().unwrap(),
            ("PUT", "/api/v1/vm.pause".into(), Some("{}".into()))
        );
        let a = parse(&["--api-socket", "/s", "get", "/api/v1/vm.info"]);
        assert_eq!(
            a.command.request().unwrap(),
            ("GET", "/api/v1/vm.info".into(), None)
        );
        let a = parse(&["--api-socket", "/s", "put", "x", "--body", "{"]);
        assert!(matches!(a.command.request(), Err(CtlError::BadBody(_))));
        assert!(Cli::try_parse_from(["ctl", "info"]).is_err());
    }

    #[test]
    fn responses_parse() {
        let r =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n{\"a\":1}\n";
        let resp = parse_response(r).unwrap().unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, Some(serde_json::json!({"a": 1})));
        assert_eq!(parse_response(&r[..r.len() - 1]).unwrap(), None);
        let r = b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n";
        assert_eq!(parse_response(r).unwrap().unwrap().body, None);
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
    }
}
