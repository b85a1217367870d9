//! HTTP/1.1 message framing for the API, hand-written and deliberately small.
//!
//! Requests: origin-form targets only, `Content-Length` bodies only (any `Transfer-Encoding`
//! is refused), `Connection: close`/`keep-alive`, `Expect: 100-continue`. Header names are
//! case-insensitive; lines may end in CRLF or a bare LF; empty lines before a request line
//! are skipped. Obsolete line folding and control characters are refused. `Host` is not
//! required (the socket is local). Responses always carry an explicit `Connection` header.

/// Interim response sent to a client that asked `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Why a request could not be framed. Each maps to a status code ([`HttpError::status`]);
/// after any of them the connection is closed, as the next request cannot be located.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The request line is not `METHOD /target HTTP/x.y`.
    #[error("malformed request line")]
    BadRequestLine,
    /// A header line is malformed (no colon, bad name, control characters, line folding).
    #[error("malformed header line")]
    BadHeader,
    /// The request line and headers do not fit in the limit.
    #[error("request headers exceed {0} bytes")]
    HeaderTooLarge(usize),
    /// `Content-Length` is above the limit.
    #[error("request body of {len} bytes exceeds the {max}-byte limit")]
    BodyTooLarge {
        /// The announced body length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// `Content-Length` is not a decimal number, or two of them disagree.
    #[error("invalid Content-Length")]
    BadContentLength,
    /// The request uses `Transfer-Encoding` (chunked bodies are not supported).
    #[error("Transfer-Encoding is not supported; send a Content-Length")]
    TransferEncoding,
    /// An HTTP version other than 1.0 and 1.1.
    #[error("HTTP version {0} is not supported")]
    Version(String),
    /// An `Expect` other than `100-continue`.
    #[error("unsupported expectation {0:?}")]
    Expectation(String),
}

impl HttpError {
    /// The status code answering this error.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequestLine | Self::BadHeader | Self::BadContentLength => 400,
            Self::HeaderTooLarge(_) => 431,
            Self::BodyTooLarge { .. } => 413,
            Self::TransferEncoding => 411,
            Self::Version(_) => 505,
            Self::Expectation(_) => 417,
        }
    }
}

/// HTTP version of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0: the connection closes after the response unless the client asks otherwise.
    Http10,
    /// HTTP/1.1: the connection stays open unless the client asks otherwise.
    Http11,
}

/// A parsed request line and the headers that matter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Request method, case-sensitive as in HTTP.
    pub method: String,
    /// Request target (starts with `/`).
    pub target: String,
    /// Protocol version.
    pub version: Version,
    /// Body length (0 without `Content-Length`).
    pub content_length: usize,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// Whether the client waits for `100 Continue` before sending the body.
    pub expect_continue: bool,
}

/// `tchar` of RFC 9110: the characters of methods and header names.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Splits the next line off `buf` at `pos`: returns the line without its terminator and the
/// position after it, or `None` when no line terminator has arrived yet.
fn next_line(buf: &[u8], pos: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(pos..)?;
    let nl = rest.iter().position(|&b| b == b'\n')?;
    let line = &rest[..nl];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Some((line, pos + nl + 1))
}

/// Parses the request line and headers at the start of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, or the head and the number of bytes it
/// occupies (the body follows). Garbage is refused as soon as it is seen, not when the header
/// limit is reached.
pub fn parse_head(
    buf: &[u8],
    max_header: usize,
    max_body: usize,
) -> Result<Option<(Head, usize)>, HttpError> {
    // Skip empty lines before the request line (RFC 9112 §2.2).
    let mut start = 0;
    while let Some((b"", next)) = next_line(buf, start) {
        start = next;
        if start > max_header {
            return Err(HttpError::HeaderTooLarge(max_header));
        }
    }
    let Some((line, mut pos)) = next_line(buf, start) else {
        // Incomplete request line: refuse early what can never become one.
        let partial = &buf[start..];
        let partial = partial.strip_suffix(b"\r").unwrap_or(partial);
        if partial.iter().any(|&b| !(0x20..0x7f).contains(&b)) {
            return Err(HttpError::BadRequestLine);
        }
        if buf.len() > max_header {
            return Err(HttpError::HeaderTooLarge(max_header));
        }
        return Ok(None);
    };
    let (method, target, version) = parse_request_line(line)?;
    let mut content_length: Option<u64> = None;
    let (mut close, mut keep_alive, mut expect_continue) = (false, false, false);
    loop {
        let Some((line, next)) = next_line(buf, pos) else {
            if buf.len() > max_header {
                return Err(HttpError::HeaderTooLarge(max_header));
            }
            return Ok(None);
        };
        if next > max_header {
            return Err(HttpError::HeaderTooLarge(max_header));
        }
        pos = next;
        if line.is_empty() {
            break;
        }
        let (name, value) = parse_header(line)?;
        if name.eq_ignore_ascii_case("content-length") {
            let len = parse_content_length(value)?;
            if content_length.is_some_and(|l| l != len) {
                return Err(HttpError::BadContentLength);
            }
            content_length = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::TransferEncoding);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                close |= token.eq_ignore_ascii_case("close");
                keep_alive |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if name.eq_ignore_ascii_case("expect") && version == Version::Http11 {
            if !value.eq_ignore_ascii_case("100-continue") {
                return Err(HttpError::Expectation(value.to_string()));
            }
            expect_continue = true;
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > max_body as u64 {
        return Err(HttpError::BodyTooLarge {
            len: content_length,
            max: max_body,
        });
    }
    let head = Head {
        method,
        target,
        version,
        content_length: content_length as usize,
        // "close" wins over "keep-alive"; HTTP/1.0 closes unless asked to keep alive.
        keep_alive: !close && (version == Version::Http11 || keep_alive),
        expect_continue,
    };
    Ok(Some((head, pos)))
}

fn parse_request_line(line: &[u8]) -> Result<(String, String, Version), HttpError> {
    let text = std::str::from_utf8(line).map_err(|_| HttpError::BadRequestLine)?;
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::BadRequestLine);
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(HttpError::BadRequestLine);
    }
    if !target.starts_with('/') || !target.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(HttpError::BadRequestLine);
    }
    let version = match version {
        "HTTP/1.1" => Version::Http11,
        "HTTP/1.0" => Version::Http10,
        v if v.len() == 8
            && v.starts_with("HTTP/")
            && v.as_bytes()[5].is_ascii_digit()
            && v.as_bytes()[6] == b'.'
            && v.as_bytes()[7].is_ascii_digit() =>
        {
            return Err(HttpError::Version(v.to_string()))
        }
        _ => return Err(HttpError::BadRequestLine),
    };
    Ok((method.to_string(), target.to_string(), version))
}

fn parse_header(line: &[u8]) -> Result<(&str, &str), HttpError> {
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(HttpError::BadHeader)?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    // An empty or non-token name also refuses obsolete line folding (leading whitespace).
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(HttpError::BadHeader);
    }
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(HttpError::BadHeader);
    }
    // Names are ASCII tokens; values the API looks at are ASCII, others are ignored.
    let name = std::str::from_utf8(name).map_err(|_| HttpError::BadHeader)?;
    let value = std::str::from_utf8(value).unwrap_or("");
    Ok((name, value.trim_matches([' ', '\t'])))
}

fn parse_content_length(value: &str) -> Result<u64, HttpError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::BadContentLength);
    }
    value.parse().map_err(|_| HttpError::BadContentLength)
}

/// The reason phrase of the status codes the API uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Formats a complete response. `Value::Null` sends no body; 1xx, 204 and 304 never carry
/// one. `allow` adds an `Allow` header (for 405).
pub fn format_response(
    status: u16,
    body: &serde_json::Value,
    keep_alive: bool,
    allow: Option<&str>,
) -> Vec<u8> {
    let bodiless = status < 200 || status == 204 || status == 304;
    let payload = if bodiless || body.is_null() {
        Vec::new()
    } else {
        // Serialising a Value cannot fail; fall back to an empty body regardless.
        let mut p = serde_json::to_vec(body).unwrap_or_default();
        p.push(b'\n');
        p
    };
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    if !payload.is_empty() {
        out.push_str("Content-Type: application/json\r\n");
    }
    if !bodiless {
        out.push_str(&format!("Content-Length: {}\r\n", payload.len()));
    }
    if let Some(allow) = allow {
        out.push_str(&format!("Allow: {allow}\r\n"));
    }
    let connection = if keep_alive { "keep-alive" } else { "close" };
    out.push_str(&format!("Connection: {connection}\r\n\r\n"));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&payload);
    bytes
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
