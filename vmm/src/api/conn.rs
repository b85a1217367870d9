//! One client connection: buffered input, the request being received, the response being
//! written, and the timeouts. It knows nothing of epoll; the server turns [`Conn::interest`]
//! into registrations.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use event_manager::EventSet;

use super::http::{self, Head};
use super::{routes, ApiRequest, ApiResponse, Limits};

/// How long a closing connection keeps draining client input after the response, so that
/// the client reads the response rather than a reset.
const LINGER: Duration = Duration::from_secs(1);

/// Route of the live-update request.
const CPR_EXEC_PATH: &str = "/api/v1/vm.cpr-exec";
/// Route of the transfer request.
const CPR_TRANSFER_PATH: &str = "/api/v1/vm.cpr-transfer";

/// Bytes read per read() call.
const READ_CHUNK: usize = 16 << 10;

/// Reads per readiness event, so that a flooding client cannot hold the event loop.
const READ_BUDGET: usize = 128;

/// Where a connection is in its request/response cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Receiving a request (the output may hold a `100 Continue`).
    Reading,
    /// The request went to the VMM; waiting for [`Conn::respond`].
    Awaiting,
    /// Writing the response; then back to `Reading`, or `Lingering` when closing.
    Responding,
    /// The write side is shut down; input is discarded until EOF or the deadline.
    Lingering(Instant),
    /// Finished: the server closes it.
    Done,
}

/// A client connection.
#[derive(Debug)]
pub(super) struct Conn {
    stream: UnixStream,
    phase: Phase,
    input: Vec<u8>,
    /// The parsed head of the request being received, and its length in `input`.
    head: Option<(Head, usize)>,
    continue_sent: bool,
    output: Vec<u8>,
    /// Whether the connection stays open after the current response.
    keep_alive: bool,
    /// The client will send nothing more.
    peer_eof: bool,
    /// When the first byte of the request being received arrived.
    request_started: Option<Instant>,
    /// Last byte read, or the last response byte written.
    last_progress: Instant,
    /// What is registered with epoll, if anything.
    pub(super) registered: Option<EventSet>,
}

impl Conn {
    /// A freshly accepted connection (already non-blocking).
    pub(super) fn new(stream: UnixStream, now: Instant) -> Self {
        Self {
            stream,
            phase: Phase::Reading,
            input: Vec::new(),
            head: None,
            continue_sent: false,
            output: Vec::new(),
            keep_alive: true,
            peer_eof: false,
            request_started: None,
            last_progress: now,
            registered: None,
        }
    }

    /// An inherited connection whose request awaits its response. It closes after the
    /// response, as the request's keep-alive preference did not survive the handover.
    pub(super) fn awaiting(stream: UnixStream, now: Instant) -> Self {
        Self {
            phase: Phase::Awaiting,
            keep_alive: false,
            ..Self::new(stream, now)
        }
    }

    /// A connection carried over a live update with the input it had not processed yet.
    pub(super) fn preloaded(stream: UnixStream, input: Vec<u8>, now: Instant) -> Self {
        Self {
            input,
            ..Self::new(stream, now)
        }
    }

    /// The unprocessed input of a connection between requests (it can be carried over a live
    /// update); `None` for one in the middle of an exchange.
    pub(super) fn carry(&self) -> Option<Vec<u8>> {
        (self.phase == Phase::Reading && self.output.is_empty()).then(|| self.input.clone())
    }

    /// During a live update: reads what the client sent and, if its next request is a
    /// complete `vm.cpr-exec`, answers 409 at once. Anything else stays buffered.
    pub(super) fn refuse_update(&mut self, limits: &Limits, now: Instant) -> bool {
        if self.phase != Phase::Reading {
            return false;
        }
        self.read_input(limits, now);
        let stray = self
            .input
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        let Ok(Some((head, head_len))) = http::parse_head(
            &self.input[stray..],
            limits.max_header_bytes,
            limits.max_body_bytes,
        ) else {
            return false;
        };
        let total = stray + head_len + head.content_length;
        let path = head.target.split('?').next().unwrap_or_default();
        let update = path == CPR_EXEC_PATH || path == CPR_TRANSFER_PATH;
        if head.method != "PUT" || !update || self.input.len() < total {
            return false;
        }
        self.input.drain(..total);
        self.head = None;
        self.request_started = None;
        self.queue(
            &ApiResponse::error(409, "an update is already in progress"),
            head.keep_alive,
            None,
            now,
        );
        self.flush(now);
        true
    }

    pub(super) fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// The socket (kept across a handoff).
    pub(super) fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub(super) fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Most input buffered before reading pauses (only reached with pipelined requests).
    fn input_cap(limits: &Limits) -> usize {
        limits.max_header_bytes + limits.max_body_bytes + READ_CHUNK
    }

    /// Reads what the socket has, up to the input cap and at most `READ_BUDGET` reads (the
    /// event loop calls again while more is there).
    pub(super) fn read_input(&mut self, limits: &Limits, now: Instant) {
        let mut buf = [0u8; READ_CHUNK];
        let mut budget = READ_BUDGET;
        while self.input.len() < Self::input_cap(limits) && !self.peer_eof && budget > 0 {
            budget -= 1;
            match self.stream.read(&mut buf) {
                Ok(0) => self.peer_eof = true,
                Ok(n) => {
                    self.last_progress = now;
                    if !matches!(self.phase, Phase::Lingering(_)) {
                        self.input.extend_from_slice(&buf[..n]);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::debug!("API connection read: {e}");
                    self.phase = Phase::Done;
                    break;
                }
            }
        }
    }

    /// The client is gone (EPOLLHUP/EPOLLERR): nothing more can be delivered to it.
    /// Complete requests already buffered still go to the VMM.
    pub(super) fn hang_up(&mut self, limits: &Limits, now: Instant) -> Option<ApiRequest> {
        self.read_input(limits, now);
        self.peer_eof = true;
        let request = self.pump(limits, now);
        self.phase = Phase::Done;
        request
    }

    /// Writes pending output as far as the socket allows.
    fn flush(&mut self, now: Instant) {
        while !self.output.is_empty() && self.phase != Phase::Done {
            match self.stream.write(&self.output) {
                Ok(0) => self.phase = Phase::Done,
                Ok(n) => {
                    self.output.drain(..n);
                    self.last_progress = now;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::debug!("API connection write: {e}");
                    self.phase = Phase::Done;
                }
            }
        }
    }

    /// Moves the connection as far as it can go: writes output, finishes responses, parses
    /// buffered input. Returns a request for the VMM, after which the connection waits in
    /// `Awaiting` (pipelined requests are taken one at a time).
    pub(super) fn pump(&mut self, limits: &Limits, now: Instant) -> Option<ApiRequest> {
        loop {
            self.flush(now);
            match self.phase {
                Phase::Reading => {
                    if let Some(request) = self.parse(limits, now) {
                        self.phase = Phase::Awaiting;
                        return Some(request);
                    }
                    if self.phase == Phase::Reading {
                        if self.peer_eof {
                            // An incomplete request can never complete.
                            self.phase = Phase::Done;
                        }
                        return None;
                    }
                }
                Phase::Responding if self.output.is_empty() => {
                    if self.keep_alive {
                        self.phase = Phase::Reading;
                        self.last_progress = now;
                    } else {
                        let _ = self.stream.shutdown(Shutdown::Write);
                        self.phase = Phase::Lingering(now + LINGER);
                    }
                }
                Phase::Lingering(_) => {
                    self.input.clear();
                    if self.peer_eof {
                        self.phase = Phase::Done;
                    }
                    return None;
                }
                Phase::Awaiting | Phase::Responding | Phase::Done => return None,
            }
        }
    }

    /// Parses buffered input. Returns a routed request, or queues an error response (phase
    /// becomes `Responding`), or leaves the phase at `Reading` when more input is needed.
    fn parse(&mut self, limits: &Limits, now: Instant) -> Option<ApiRequest> {
        if self.head.is_none() {
            // Stray line ends between requests are ignored (RFC 9112 §2.2).
            let stray = self
                .input
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
            self.input.drain(..stray);
            match http::parse_head(&self.input, limits.max_header_bytes, limits.max_body_bytes) {
                Ok(Some(head)) => self.head = Some(head),
                Ok(None) => {
                    self.note_partial(now);
                    return None;
                }
                Err(e) => {
                    log::debug!("API request refused: {e}");
                    self.queue(
                        &ApiResponse::error(e.status(), e.to_string()),
                        false,
                        None,
                        now,
                    );
                    return None;
                }
            }
        }
        let (head, head_len) = self.head.as_ref()?;
        let total = head_len + head.content_length;
        if self.input.len() < total {
            if head.expect_continue && !self.continue_sent {
                self.output.extend_from_slice(http::CONTINUE);
                self.continue_sent = true;
            }
            self.note_partial(now);
            return None;
        }
        let (head, head_len) = self.head.take()?;
        let body: Vec<u8> = self.input.drain(..total).skip(head_len).collect();
        self.continue_sent = false;
        self.request_started = None;
        self.keep_alive = head.keep_alive;
        match routes::route(&head.method, &head.target, &body) {
            Ok(request) => Some(request),
            Err(e) => {
                log::debug!("API request refused: {e}");
                let resp = ApiResponse::error(e.status(), e.to_string());
                self.queue(&resp, head.keep_alive, e.allow(), now);
                None
            }
        }
    }

    fn note_partial(&mut self, now: Instant) {
        if !self.input.is_empty() && self.request_started.is_none() {
            self.request_started = Some(now);
        }
    }

    fn queue(&mut self, resp: &ApiResponse, keep_alive: bool, allow: Option<&str>, now: Instant) {
        // A client that has finished sending, with nothing more buffered, gets no further
        // responses: say so.
        self.keep_alive = keep_alive && !(self.peer_eof && self.input.is_empty());
        self.output.extend(http::format_response(
            resp.status,
            &resp.body,
            self.keep_alive,
            allow,
        ));
        self.phase = Phase::Responding;
        self.last_progress = now;
    }

    /// Queues the VMM's response and writes what the socket takes now. Returns false when
    /// the connection was not waiting for one.
    pub(super) fn respond(&mut self, resp: &ApiResponse, now: Instant) -> bool {
        if self.phase != Phase::Awaiting {
            return false;
        }
        self.queue(resp, self.keep_alive, None, now);
        self.flush(now);
        true
    }

    /// The epoll events this connection needs now.
    pub(super) fn interest(&self, limits: &Limits) -> EventSet {
        let mut set = EventSet::empty();
        let reading = match self.phase {
            Phase::Done => return set,
            Phase::Lingering(_) => true,
            _ => self.input.len() < Self::input_cap(limits),
        };
        if reading && !self.peer_eof {
            set |= EventSet::IN;
        }
        if !self.output.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// When this connection times out, if it can.
    pub(super) fn deadline(&self, limits: &Limits) -> Option<Instant> {
        match self.phase {
            Phase::Reading => Some(match self.request_started {
                Some(t) => t + limits.request_timeout,
                None => self.last_progress + limits.idle_timeout,
            }),
            Phase::Responding => Some(self.last_progress + limits.request_timeout),
            Phase::Lingering(until) => Some(until),
            Phase::Awaiting | Phase::Done => None,
        }
    }

    /// Handles the deadline passing: a partial request gets 408 and the connection closes;
    /// anything else just closes.
    pub(super) fn expire(&mut self, now: Instant) {
        if self.phase == Phase::Reading && self.request_started.is_some() {
            log::debug!("API request timed out");
            self.output.clear();
            self.queue(
                &ApiResponse::error(408, "request timed out"),
                false,
                None,
                now,
            );
        } else {
            self.phase = Phase::Done;
        }
    }
}
