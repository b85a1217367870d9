//! The routing table: request method and path → [`ApiRequest`], with body validation.

use serde::de::DeserializeOwned;

use super::{ApiRequest, CprExecRequest, CprTransferRequest};

/// Prefix of every API path.
pub const API_PREFIX: &str = "/api/v1/";

/// One route of the API.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// Full path, e.g. `/api/v1/vm.info`.
    pub path: &'static str,
    /// The one method it accepts.
    pub method: &'static str,
    /// Status of a successful response.
    pub success: u16,
    parse: fn(&[u8]) -> Result<ApiRequest, RouteError>,
}

/// Every route the server answers.
pub const ROUTES: &[Route] = &[
    Route {
        path: "/api/v1/vmm.ping",
        method: "GET",
        success: 200,
        parse: |b| empty_body(b).map(|()| ApiRequest::Ping),
    },
    Route {
        path: "/api/v1/vm.info",
        method: "GET",
        success: 200,
        parse: |b| empty_body(b).map(|()| ApiRequest::Info),
    },
    Route {
        path: "/api/v1/vm.pause",
        method: "PUT",
        success: 204,
        parse: |b| empty_body(b).map(|()| ApiRequest::Pause),
    },
    Route {
        path: "/api/v1/vm.resume",
        method: "PUT",
        success: 204,
        parse: |b| empty_body(b).map(|()| ApiRequest::Resume),
    },
    Route {
        path: "/api/v1/vm.shutdown",
        method: "PUT",
        success: 204,
        parse: |b| empty_body(b).map(|()| ApiRequest::Shutdown),
    },
    Route {
        path: "/api/v1/vm.cpr-exec",
        method: "PUT",
        success: 200,
        parse: cpr_exec,
    },
    Route {
        path: "/api/v1/vm.cpr-transfer",
        method: "PUT",
        success: 200,
        parse: cpr_transfer,
    },
    Route {
        path: "/api/v1/vm.snapshot",
        method: "PUT",
        success: 200,
        parse: snapshot,
    },
];

/// Why a well-framed request was refused. The connection stays usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No route has this path.
    #[error("no such endpoint: {0}")]
    NotFound(String),
    /// The path exists with another method.
    #[error("{method} is not allowed on {path}; use {allow}")]
    MethodNotAllowed {
        /// The method used.
        method: String,
        /// The path.
        path: String,
        /// The method the path accepts.
        allow: &'static str,
    },
    /// The target has a query string; no endpoint takes parameters.
    #[error("query strings are not supported")]
    Query,
    /// The body is not what the endpoint accepts.
    #[error("invalid body: {0}")]
    Body(String),
}

impl RouteError {
    /// The status code answering this error.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotFound(_) => 404,
            Self::MethodNotAllowed { .. } => 405,
            Self::Query | Self::Body(_) => 400,
        }
    }

    /// The `Allow` header value for a 405.
    pub fn allow(&self) -> Option<&'static str> {
        match self {
            Self::MethodNotAllowed { allow, .. } => Some(allow),
            _ => None,
        }
    }
}

/// Routes a well-framed request.
pub fn route(method: &str, target: &str, body: &[u8]) -> Result<ApiRequest, RouteError> {
    if target.contains('?') {
        return Err(RouteError::Query);
    }
    let route = ROUTES
        .iter()
        .find(|r| r.path == target)
        .ok_or_else(|| RouteError::NotFound(target.to_string()))?;
    if route.method != method {
        return Err(RouteError::MethodNotAllowed {
            method: method.to_string(),
            path: target.to_string(),
            allow: route.method,
        });
    }
    (route.parse)(body)
}

/// Parses a JSON body; an empty body reads as `{}`.
fn json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, RouteError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| RouteError::Body(e.to_string()))
}

/// Accepts an empty body or an empty JSON object.
fn empty_body(body: &[u8]) -> Result<(), RouteError> {
    match json_body::<serde_json::Value>(body)? {
        serde_json::Value::Object(map) if map.is_empty() => Ok(()),
        _ => Err(RouteError::Body(
            "this endpoint takes no parameters; send {} or nothing".into(),
        )),
    }
}

fn cpr_transfer(body: &[u8]) -> Result<ApiRequest, RouteError> {
    let req: CprTransferRequest = json_body(body)?;
    if !req.socket.is_absolute() || req.socket.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(RouteError::Body(
            "\"socket\" must be an absolute path without NUL bytes".into(),
        ));
    }
    Ok(ApiRequest::CprTransfer(req))
}

fn cpr_exec(body: &[u8]) -> Result<ApiRequest, RouteError> {
    let req: CprExecRequest = json_body(body)?;
    if let Some(binary) = &req.binary {
        if !binary.is_absolute() {
            return Err(RouteError::Body(
                "\"binary\" must be an absolute path".into(),
            ));
        }
    }
    let has_nul = |s: &[u8]| s.contains(&0);
    let binary_nul = req
        .binary
        .as_ref()
        .is_some_and(|b| has_nul(b.as_os_str().as_encoded_bytes()));
    let args_nul = req.args.iter().flatten().any(|a| has_nul(a.as_bytes()));
    if binary_nul || args_nul {
        return Err(RouteError::Body("NUL bytes are not allowed".into()));
    }
    Ok(ApiRequest::CprExec(req))
}

fn snapshot(body: &[u8]) -> Result<ApiRequest, RouteError> {
    let req: crate::snapshot::SnapshotRequest = json_body(body)?;
    if !req.path.is_absolute() {
        return Err(RouteError::Body("\"path\" must be an absolute path".into()));
    }
    if req.path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(RouteError::Body("NUL bytes are not allowed".into()));
    }
    Ok(ApiRequest::Snapshot(req))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn every_route_routes() {
        assert_eq!(route("GET", "/api/v1/vmm.ping", b""), Ok(ApiRequest::Ping));
        assert_eq!(route("GET", "/api/v1/vm.info", b"{}"), Ok(ApiRequest::Info));
        assert_eq!(
            route("PUT", "/api/v1/vm.pause", b" {} \n"),
            Ok(ApiRequest::Pause)
        );
        assert_eq!(
            route("PUT", "/api/v1/vm.resume", b""),
            Ok(ApiRequest::Resume)
        );
        assert_eq!(
            route("PUT", "/api/v1/vm.shutdown", b""),
            Ok(ApiRequest::Shutdown)
        );
        assert_eq!(
            route("PUT", "/api/v1/vm.cpr-exec", b""),
            Ok(ApiRequest::CprExec(CprExecRequest::default()))
        );
        let body = br#"{"binary": "/usr/bin/molt", "args": ["--cpus", "2"]}"#;
        assert_eq!(
            route("PUT", "/api/v1/vm.cpr-exec", body),
            Ok(ApiRequest::CprExec(CprExecRequest {
                binary: Some("/usr/bin/molt".into()),
                args: Some(vec!["--cpus".into(), "2".into()]),
                stand_in: false,
            }))
        );
    }

    #[test]
    fn refusals() {
        let status = |m, p, b| route(m, p, b).unwrap_err().status();
        assert_eq!(status("GET", "/api/v1/nope", b""), 404);
        assert_eq!(status("GET", "/api/v1/vm.info/", b""), 404);
        assert_eq!(status("GET", "/", b""), 404);
        assert_eq!(status("PUT", "/api/v1/vm.info", b""), 405);
        assert_eq!(status("get", "/api/v1/vm.info", b""), 405);
        assert_eq!(status("GET", "/api/v1/vm.info?x=1", b""), 400);
        assert_eq!(status("PUT", "/api/v1/vm.pause", b"{"), 400);
        assert_eq!(status("PUT", "/api/v1/vm.pause", b"[]"), 400);
        assert_eq!(status("PUT", "/api/v1/vm.pause", br#"{"now": true}"#), 400);
        assert_eq!(
            status("PUT", "/api/v1/vm.cpr-exec", br#"{"bogus": 1}"#),
            400
        );
        assert_eq!(
            status("PUT", "/api/v1/vm.cpr-exec", br#"{"binary": "rel"}"#),
            400
        );
        assert_eq!(
            status("PUT", "/api/v1/vm.cpr-exec", br#"{"args": "x"}"#),
            400
        );
        assert_eq!(
            status("PUT", "/api/v1/vm.cpr-exec", br#"{"args": ["a\u0000"]}"#),
            400
        );
        assert_eq!(status("PUT", "/api/v1/vm.snapshot", b""), 400);
        assert_eq!(
            status("PUT", "/api/v1/vm.snapshot", br#"{"path": "rel"}"#),
            400
        );
        assert_eq!(
            status(
                "PUT",
                "/api/v1/vm.snapshot",
                br#"{"path": "/s", "mode": "x"}"#
            ),
            400
        );
        assert!(matches!(
            route(
                "PUT",
                "/api/v1/vm.snapshot",
                br#"{"path": "/s", "mode": "stop"}"#
            ),
            Ok(ApiRequest::Snapshot(_))
        ));
        let e = route("PUT", "/api/v1/vm.info", b"").unwrap_err();
        assert_eq!(e.allow(), Some("GET"));
    }

    /// Path and method pairs of docs/openapi.json, with the success status it documents.
    fn documented() -> BTreeSet<(String, String, u16)> {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let text = std::fs::read_to_string(file).expect("docs/openapi.json");
        let doc: serde_json::Value = serde_json::from_str(&text).expect("openapi.json is JSON");
        assert!(doc["openapi"].as_str().unwrap_or("").starts_with("3."));
        let mut out = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                const METHODS: &[&str] = &[
                    "get", "put", "post", "delete", "patch", "head", "options", "trace",
                ];
                if !METHODS.contains(&method.as_str()) {
                    continue;
                }
                let success: Vec<u16> = op["responses"]
                    .as_object()
                    .expect("responses")
                    .keys()
                    .filter_map(|k| k.parse().ok())
                    .filter(|s| (200..300).contains(s))
                    .collect();
                assert_eq!(success.len(), 1, "{method} {path}: one 2xx response");
                out.insert((path.clone(), method.to_uppercase(), success[0]));
            }
        }
        out
    }

    #[test]
    fn openapi_document_matches_the_routes() {
        let routed: BTreeSet<_> = ROUTES
            .iter()
            .map(|r| (r.path.to_string(), r.method.to_string(), r.success))
            .collect();
        let documented = documented();
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        let unrouted: Vec<_> = documented.difference(&routed).collect();
        assert!(
            undocumented.is_empty(),
            "routed but not documented: {undocumented:?}"
        );
        assert!(
            unrouted.is_empty(),
            "documented but not routed: {unrouted:?}"
        );
        for r in ROUTES {
            assert!(r.path.starts_with(API_PREFIX), "{}", r.path);
        }
    }
}
