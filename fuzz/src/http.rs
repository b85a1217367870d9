//! Requests on the API socket: framing ([`vmm::api::http::parse_head`]) and routing
//! ([`vmm::api::route`]), pipelined as a connection reads them.

use vmm::api::http::{parse_head, HttpError, Version};
use vmm::api::route;

/// The first two bytes set the header and body limits; the rest is what a client sent on
/// one connection. Every request either is framed and routed or refused with an error
/// status (4xx, or 505 for an HTTP version), and parsing always moves forward.
pub fn http(data: &[u8]) {
    let [h, b, rest @ ..] = data else {
        return;
    };
    let max_header = 16 + usize::from(*h) * 64;
    let max_body = usize::from(*b) * 16;
    let mut input = rest;
    loop {
        // Stray line ends between requests are skipped, as the connection does.
        let stray = input
            .iter()
            .take_while(|&&c| c == b'\r' || c == b'\n')
            .count();
        input = &input[stray..];
        let (head, len) = match parse_head(input, max_header, max_body) {
            Ok(Some(framed)) => framed,
            Ok(None) => return,
            Err(e) => {
                let status = e.status();
                assert!(
                    (400..500).contains(&status) || matches!(e, HttpError::Version(_)),
                    "{e:?} answered with {status}"
                );
                return;
            }
        };
        assert!(
            len > 0 && len <= input.len() && len <= max_header,
            "head of {len} bytes"
        );
        assert!(head.target.starts_with('/') && !head.method.is_empty());
        assert!(head.content_length <= max_body);
        assert!(!head.expect_continue || head.version == Version::Http11);
        let Some(body) = input.get(len..len + head.content_length) else {
            return;
        };
        if let Err(e) = route(&head.method, &head.target, body) {
            assert!((400..500).contains(&e.status()), "{e:?}");
        }
        input = &input[len + head.content_length..];
    }
}
