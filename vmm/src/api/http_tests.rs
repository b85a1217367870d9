use super::*;

const H: usize = 16 << 10;
const B: usize = 1 << 20;

fn parse(buf: &[u8]) -> Result<Option<(Head, usize)>, HttpError> {
    parse_head(buf, H, B)
}

fn complete(buf: &[u8]) -> (Head, usize) {
    parse(buf).unwrap().expect("complete head")
}

#[test]
fn well_formed_get() {
    let req = b"GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n";
    let (head, len) = complete(req);
    assert_eq!(len, req.len());
    assert_eq!(head.method, "GET");
    assert_eq!(head.target, "/api/v1/vm.info");
    assert_eq!(head.version, Version::Http11);
    assert_eq!(head.content_length, 0);
    assert!(head.keep_alive);
    assert!(!head.expect_continue);
}

#[test]
fn put_with_content_length_body() {
    let req = b"PUT /api/v1/vm.cpr-exec HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
    let (head, len) = complete(req);
    assert_eq!(head.method, "PUT");
    assert_eq!(head.content_length, 2);
    assert_eq!(&req[len..len + head.content_length], b"{}");
}

#[test]
fn pipelined_requests_parse_one_after_the_other() {
    let first = b"PUT /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc".to_vec();
    let second = b"GET /b HTTP/1.1\r\n\r\n";
    let mut buf = first.clone();
    buf.extend_from_slice(second);
    let (head, len) = complete(&buf);
    assert_eq!(head.target, "/a");
    let rest = &buf[len + head.content_length..];
    let (head, len) = complete(rest);
    assert_eq!(head.target, "/b");
    assert_eq!(len, rest.len());
}

#[test]
fn partial_input_needs_more_bytes() {
    let req = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n";
    for cut in 0..req.len() {
        assert_eq!(parse(&req[..cut]), Ok(None), "cut at {cut}");
    }
    assert!(parse(req).unwrap().is_some());
}

#[test]
fn oversize_headers_are_refused() {
    let mut req = b"GET / HTTP/1.1\r\n".to_vec();
    while req.len() <= H {
        req.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    assert_eq!(parse(&req), Err(HttpError::HeaderTooLarge(H)));
    req.extend_from_slice(b"\r\n");
    assert_eq!(parse(&req), Err(HttpError::HeaderTooLarge(H)));
    // A request line that never ends.
    let long = vec![b'a'; H + 1];
    assert_eq!(parse(&long), Err(HttpError::HeaderTooLarge(H)));
    assert_eq!(HttpError::HeaderTooLarge(H).status(), 431);
}

#[test]
fn oversize_body_is_refused_from_the_header() {
    let req = format!("PUT /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n", B + 1);
    let err = parse(req.as_bytes()).unwrap_err();
    assert_eq!(
        err,
        HttpError::BodyTooLarge {
            len: B as u64 + 1,
            max: B
        }
    );
    assert_eq!(err.status(), 413);
    let req = format!("PUT /x HTTP/1.1\r\nContent-Length: {B}\r\n\r\n");
    assert_eq!(complete(req.as_bytes()).0.content_length, B);
    let huge = b"PUT /x HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
    assert_eq!(parse(huge), Err(HttpError::BadContentLength));
}

#[test]
fn garbage_is_refused_early() {
    assert_eq!(parse(b"\x00\x01\x02\xff"), Err(HttpError::BadRequestLine));
    assert_eq!(
        parse(b"\x16\x03\x01\x02\x00"),
        Err(HttpError::BadRequestLine)
    );
    assert_eq!(parse(b"hello\r\n"), Err(HttpError::BadRequestLine));
    assert_eq!(
        parse(b"GET /\xc3\xa9 HTTP/1.1\r\n"),
        Err(HttpError::BadRequestLine)
    );
}

#[test]
fn bad_request_lines() {
    for line in [
        &b"GET  /x HTTP/1.1\r\n\r\n"[..],
        b"GET /x HTTP/1.1 extra\r\n\r\n",
        b"GET x HTTP/1.1\r\n\r\n",
        b"GET http://host/x HTTP/1.1\r\n\r\n",
        b"G(T /x HTTP/1.1\r\n\r\n",
        b"GET /x HTTQ/1.1\r\n\r\n",
        b"GET /x\r\n\r\n",
        b" GET /x HTTP/1.1\r\n\r\n",
    ] {
        assert_eq!(
            parse(line),
            Err(HttpError::BadRequestLine),
            "{}",
            String::from_utf8_lossy(line)
        );
    }
    assert_eq!(
        parse(b"GET /x HTTP/2.0\r\n\r\n"),
        Err(HttpError::Version("HTTP/2.0".into()))
    );
    assert_eq!(HttpError::Version(String::new()).status(), 505);
}

#[test]
fn bad_headers() {
    for req in [
        &b"GET /x HTTP/1.1\r\nNoColon\r\n\r\n"[..],
        b"GET /x HTTP/1.1\r\n: empty\r\n\r\n",
        b"GET /x HTTP/1.1\r\nBad Name: v\r\n\r\n",
        b"GET /x HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
        b"GET /x HTTP/1.1\r\nA: b\x00c\r\n\r\n",
    ] {
        assert_eq!(
            parse(req),
            Err(HttpError::BadHeader),
            "{}",
            String::from_utf8_lossy(req)
        );
    }
    for req in [
        &b"PUT /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n"[..],
        b"PUT /x HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n",
        b"PUT /x HTTP/1.1\r\nContent-Length: \r\n\r\n",
        b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ] {
        assert_eq!(parse(req), Err(HttpError::BadContentLength));
    }
    // Repeated identical lengths are allowed.
    let req = b"PUT /x HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n";
    assert_eq!(complete(req).0.content_length, 2);
}

#[test]
fn http_1_0_closes_unless_asked() {
    let (head, _) = complete(b"GET /x HTTP/1.0\r\n\r\n");
    assert_eq!(head.version, Version::Http10);
    assert!(!head.keep_alive);
    let (head, _) = complete(b"GET /x HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
    assert!(head.keep_alive);
    // Expect is an HTTP/1.1 feature.
    let (head, _) = complete(b"PUT /x HTTP/1.0\r\nExpect: 100-continue\r\n\r\n");
    assert!(!head.expect_continue);
}

#[test]
fn connection_close_wins() {
    let (head, _) = complete(b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(!head.keep_alive);
    let (head, _) = complete(b"GET /x HTTP/1.0\r\nConnection: close, keep-alive\r\n\r\n");
    assert!(!head.keep_alive);
    let (head, _) = complete(b"GET /x HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n");
    assert!(!head.keep_alive);
}

#[test]
fn chunked_transfer_encoding_is_refused() {
    let req = b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
    let err = parse(req).unwrap_err();
    assert_eq!(err, HttpError::TransferEncoding);
    assert_eq!(err.status(), 411);
}

#[test]
fn lowercase_and_mixed_case_headers() {
    let req = b"put /x HTTP/1.1\r\ncontent-length: 2\r\nCONNECTION: CLOSE\r\nexpect: 100-Continue\r\n\r\n{}";
    let (head, len) = complete(req);
    // Methods are case-sensitive: routing refuses "put"; the framing accepts it.
    assert_eq!(head.method, "put");
    assert_eq!(head.content_length, 2);
    assert!(!head.keep_alive);
    assert!(head.expect_continue);
    assert_eq!(&req[len..], b"{}");
}

#[test]
fn expectations_other_than_continue_are_refused() {
    let err = parse(b"PUT /x HTTP/1.1\r\nExpect: magic\r\n\r\n").unwrap_err();
    assert_eq!(err.status(), 417);
}

#[test]
fn bare_lf_and_leading_empty_lines() {
    let req = b"\r\n\nGET /x HTTP/1.1\nHost: a\n\n";
    let (head, len) = complete(req);
    assert_eq!(head.target, "/x");
    assert_eq!(len, req.len());
}

#[test]
fn header_values_are_trimmed_and_may_hold_obs_text() {
    let req = b"PUT /x HTTP/1.1\r\nContent-Length: \t 4 \t\r\nX-Name: caf\xc3\xa9\r\n\r\n";
    assert_eq!(complete(req).0.content_length, 4);
}

#[test]
fn responses_are_formatted() {
    let ok = format_response(200, &serde_json::json!({"a": 1}), true, None);
    assert_eq!(
        String::from_utf8(ok).unwrap(),
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\
         Connection: keep-alive\r\n\r\n{\"a\":1}\n"
    );
    let none = format_response(204, &serde_json::json!({"ignored": true}), false, None);
    assert_eq!(
        String::from_utf8(none).unwrap(),
        "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
    );
    let err = format_response(405, &serde_json::json!({"error": "x"}), true, Some("GET"));
    let err = String::from_utf8(err).unwrap();
    assert!(err.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
    assert!(err.contains("\r\nAllow: GET\r\n"));
    let empty = format_response(200, &serde_json::Value::Null, true, None);
    assert!(String::from_utf8(empty)
        .unwrap()
        .contains("Content-Length: 0\r\n"));
}

#[test]
fn arbitrary_input_never_panics() {
    let valid =
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..20_000 {
        let mut buf = valid.to_vec();
        for _ in 0..(next() % 6) {
            let i = (next() as usize) % buf.len();
            match next() % 3 {
                0 => buf[i] = next() as u8,
                1 => {
                    buf.remove(i);
                }
                _ => buf.insert(i, b"\r\n: /0123456789 "[(next() % 16) as usize]),
            }
        }
        let cut = (next() as usize) % (buf.len() + 1);
        let _ = parse_head(&buf[..cut], 64, 8);
        let _ = parse_head(&buf, H, B);
    }
}
