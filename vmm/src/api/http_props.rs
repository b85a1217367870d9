//! Property tests (fuzzing without coverage guidance) of the request parser and the router:
//! whatever a client sends, the server either gets a request or answers with an error status,
//! and never panics. `PROPTEST_CASES` sets the number of cases (docs/fuzz/README.md).

use proptest::prelude::*;

use super::http::{parse_head, HttpError, Version};
use super::routes::route;

const MAX_HEADER: usize = 16 << 10;
const MAX_BODY: usize = 1 << 20;

/// Pieces of requests, valid and not, glued together in random order: random bytes alone
/// rarely reach past the request line.
fn soup() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"GET".to_vec()),
        Just(b"PUT".to_vec()),
        Just(b" ".to_vec()),
        Just(b"/api/v1/vm.info".to_vec()),
        Just(b"/api/v1/vm.cpr-exec".to_vec()),
        Just(b"/api/v1/vm.snapshot".to_vec()),
        Just(b"/api/v1/vm.cpr-transfer".to_vec()),
        Just(b"?x=1".to_vec()),
        Just(b"HTTP/1.1".to_vec()),
        Just(b"HTTP/1.0".to_vec()),
        Just(b"HTTP/2.0".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"Content-Length: ".to_vec()),
        Just(b"content-length:2".to_vec()),
        Just(b"Transfer-Encoding: chunked".to_vec()),
        Just(b"Expect: 100-continue".to_vec()),
        Just(b"Connection: close, keep-alive".to_vec()),
        Just(b":".to_vec()),
        Just(b"\t".to_vec()),
        Just(b"{}".to_vec()),
        Just(br#"{"path":"/s","mode":"stop"}"#.to_vec()),
        Just(br#"{"binary":"/b","args":["a\u0000"]}"#.to_vec()),
        Just(br#"{"socket":"rel"}"#.to_vec()),
        "[0-9]{1,22}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 1..8),
    ];
    proptest::collection::vec(piece, 0..24).prop_map(|p| p.concat())
}

/// Checks what a client can observe of one buffer: a complete head that fits the limits, a
/// wait for more bytes, or an error status; a complete request then routes or is refused
/// with a 4xx.
fn check(buf: &[u8], max_header: usize, max_body: usize) -> Result<(), TestCaseError> {
    match parse_head(buf, max_header, max_body) {
        Ok(None) => {}
        Ok(Some((head, len))) => {
            prop_assert!(len <= buf.len() && len <= max_header);
            prop_assert!(head.target.starts_with('/'));
            prop_assert!(!head.method.is_empty());
            prop_assert!(head.content_length <= max_body);
            prop_assert!(!head.expect_continue || head.version == Version::Http11);
            if let Some(body) = buf.get(len..len + head.content_length) {
                if let Err(e) = route(&head.method, &head.target, body) {
                    prop_assert!((400..500).contains(&e.status()), "{e:?}");
                }
            }
        }
        // 505 is the one refusal outside 4xx: the client's HTTP version.
        Err(e) => prop_assert!(
            (400..500).contains(&e.status()) || matches!(e, HttpError::Version(_)),
            "{e:?}"
        ),
    }
    Ok(())
}

/// A well-formed request: its head text, what the parser should make of it, and its body.
#[derive(Debug, Clone)]
struct Request {
    bytes: Vec<u8>,
    head_len: usize,
    method: String,
    target: String,
    http10: bool,
    body_len: usize,
    close: bool,
    keep_alive: bool,
    expect: bool,
}

fn request() -> impl Strategy<Value = Request> {
    (
        "[A-Z]{1,7}|[!#$%&'*+.^_`|~0-9a-zA-Z-]{1,10}",
        "/[!-~]{0,40}",
        any::<bool>(),
        proptest::collection::vec(("[A-Za-z-]{1,12}", "[ -~]{0,30}"), 0..6),
        proptest::option::of(0..4096usize),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
    )
        .prop_map(
            |(method, target, http10, extra, len, (close, ka, expect, lf))| {
                let eol = if lf { "\n" } else { "\r\n" };
                let version = if http10 { "HTTP/1.0" } else { "HTTP/1.1" };
                let mut text = format!("{method} {target} {version}{eol}");
                for (name, value) in &extra {
                    let lower = name.to_ascii_lowercase();
                    if [
                        "content-length",
                        "transfer-encoding",
                        "connection",
                        "expect",
                    ]
                    .contains(&lower.as_str())
                    {
                        continue;
                    }
                    text.push_str(&format!("{name}: {value}{eol}"));
                }
                if let Some(len) = len {
                    text.push_str(&format!("Content-Length: {len}{eol}"));
                }
                if close || ka {
                    let tokens: Vec<_> = [(close, "Close"), (ka, "keep-alive")]
                        .iter()
                        .filter(|t| t.0)
                        .map(|t| t.1)
                        .collect();
                    text.push_str(&format!("Connection: {}{eol}", tokens.join(", ")));
                }
                if expect {
                    text.push_str(&format!("Expect: 100-Continue{eol}"));
                }
                text.push_str(eol);
                let head_len = text.len();
                let body_len = len.unwrap_or(0);
                let mut bytes = text.into_bytes();
                bytes.extend(std::iter::repeat_n(b'x', body_len));
                Request {
                    bytes,
                    head_len,
                    method,
                    target,
                    http10,
                    body_len,
                    close,
                    keep_alive: ka,
                    expect,
                }
            },
        )
}

proptest! {
    #[test]
    fn arbitrary_bytes_parse_or_get_an_error_status(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        check(&bytes, MAX_HEADER, MAX_BODY)?;
    }

    #[test]
    fn request_soup_parses_or_gets_an_error_status(
        buf in soup(),
        max_header in 0..2048usize,
        max_body in 0..64usize,
    ) {
        check(&buf, MAX_HEADER, MAX_BODY)?;
        check(&buf, max_header, max_body)?;
    }

    #[test]
    fn well_formed_requests_parse_to_what_was_sent(r in request()) {
        let (head, len) = parse_head(&r.bytes, MAX_HEADER, MAX_BODY)
            .unwrap()
            .expect("a complete head");
        prop_assert_eq!(len, r.head_len);
        prop_assert_eq!(&head.method, &r.method);
        prop_assert_eq!(&head.target, &r.target);
        prop_assert_eq!(head.version == Version::Http10, r.http10);
        prop_assert_eq!(head.content_length, r.body_len);
        prop_assert_eq!(head.keep_alive, !r.close && (!r.http10 || r.keep_alive));
        prop_assert_eq!(head.expect_continue, r.expect && !r.http10);
        check(&r.bytes, MAX_HEADER, MAX_BODY)?;
    }

    #[test]
    fn a_cut_request_waits_for_more_bytes(r in request(), cut in any::<prop::sample::Index>()) {
        let cut = cut.index(r.head_len);
        prop_assert_eq!(parse_head(&r.bytes[..cut], MAX_HEADER, MAX_BODY), Ok(None));
    }

    #[test]
    fn a_changed_byte_never_panics(
        r in request(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut bytes = r.bytes;
        let at = at.index(bytes.len());
        bytes[at] = byte;
        check(&bytes, MAX_HEADER, MAX_BODY)?;
    }
}
