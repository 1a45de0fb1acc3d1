//! The small part of HTTP/1.1 that long-lived streams need, without hyper.
//!
//! A connection whose first request opens a stream (`GET /ws`, `GET /sse`) is served from
//! this module: we read and parse the request head ourselves, write the response head, and
//! then own the socket. hyper keeps two 8 KiB buffers per HTTP/1 connection for as long as
//! the connection lives (its read buffer and its buffer for response heads), which for an SSE
//! stream is its whole life and doubled the memory per subscriber; an upgraded WebSocket
//! paid for the buffers, a second task and the upgrade hand-over on every connect. Everything
//! else (other paths, methods, HTTP/1.0, malformed or oversized heads, later requests on a
//! keep-alive connection) goes to hyper, with the bytes already read put back in front.

use std::cell::RefCell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use super::conn::Conn;

/// Largest request head (request line and headers) a client may send; more is answered 431.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most headers in one request.
pub const MAX_HEADERS: usize = 64;

/// The streams this module serves itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    WebSocket,
    Sse,
}

impl Target {
    /// The request-line prefixes that select a target (`GET /ws?...` or `GET /ws HTTP/1.1`).
    const PREFIXES: [(&'static [u8], Target); 4] = [
        (b"GET /ws?", Target::WebSocket),
        (b"GET /ws ", Target::WebSocket),
        (b"GET /sse?", Target::Sse),
        (b"GET /sse ", Target::Sse),
    ];
}

/// A parsed `GET` request head for one of our streams.
pub struct Head {
    pub target: Target,
    /// The raw query string (empty when there is none).
    pub query: String,
    pub headers: HeaderMap,
    /// Whether the connection may carry another request after a plain answer.
    pub keep_alive: bool,
}

/// What the first bytes of a connection turned out to be.
pub enum First {
    /// A complete stream request; any bytes after its head are in the connection's prefix.
    Stream(Head, Conn),
    /// Anything else: for hyper, with what was read put back.
    Other(Conn),
    /// Closed, failed or silent past the header timeout before a head arrived.
    Gone,
}

/// Reads the first request head of a fresh connection, within `timeout`.
pub async fn read_first(mut io: TcpStream, timeout: Duration, stall: Duration) -> First {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(buf.capacity());
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return First::Gone,
            Ok(Ok(_)) => {}
        }
        match parse_first(&buf) {
            Parsed::NeedMore => {}
            Parsed::Other => return First::Other(Conn::new(io, Bytes::from(buf), stall)),
            Parsed::Stream(head, len) => {
                let rest = Bytes::copy_from_slice(&buf[len..]);
                return First::Stream(head, Conn::new(io, rest, stall));
            }
        }
    }
}

/// What the bytes read so far from a fresh connection are.
pub enum Parsed {
    /// Could still become a stream request: read on.
    NeedMore,
    /// A complete stream request whose head is the first `usize` bytes.
    Stream(Head, usize),
    /// Anything else, including heads that are too long, malformed, HTTP/1.0 or carry a body:
    /// hyper gives those their proper answer.
    Other,
}

/// Classifies the first bytes of a connection (pure, so it can be fuzzed).
pub fn parse_first(buf: &[u8]) -> Parsed {
    let Some(target) = target_of(buf) else {
        return Parsed::Other;
    };
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => match head_of(&req, target) {
            Some(head) => Parsed::Stream(head, len),
            None => Parsed::Other,
        },
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => Parsed::NeedMore,
        _ => Parsed::Other,
    }
}

/// `Some` while `buf` starts with (or could still become) one of our request lines; `None`
/// once it is certainly something else.
fn target_of(buf: &[u8]) -> Option<Target> {
    let mut undecided = None;
    for (prefix, target) in Target::PREFIXES {
        let n = buf.len().min(prefix.len());
        if buf[..n] == prefix[..n] {
            if n == prefix.len() {
                return Some(target);
            }
            undecided = Some(target);
        }
    }
    undecided
}

fn head_of(req: &httparse::Request<'_, '_>, target: Target) -> Option<Head> {
    if req.version != Some(1) {
        return None;
    }
    let path = req.path?;
    let query = path.split_once('?').map(|(_, q)| q).unwrap_or("");
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    let mut keep_alive = true;
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        if name == http::header::CONNECTION && has_token(&value, "close") {
            keep_alive = false;
        }
        // A body on a GET is legal but never sent by browsers; hyper knows how to skip one.
        if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
            return None;
        }
        headers.append(name, value);
    }
    Some(Head {
        target,
        query: query.to_string(),
        headers,
        keep_alive,
    })
}

/// Whether a comma-separated header value holds `token` (case-insensitive).
pub fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .any(|p| p.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// How a response body is delimited.
pub enum Framing {
    /// No body at all (101, 204, 304).
    Empty,
    Length(usize),
    Chunked,
}

/// The status line and headers of `res`, plus `Date` and the framing header.
pub fn head_bytes<B>(res: &Response<B>, framing: Framing, keep_alive: bool) -> Vec<u8> {
    let status = res.status();
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in res.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Empty => {}
        Framing::Length(n) => out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes()),
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    if !keep_alive && status != StatusCode::SWITCHING_PROTOCOLS {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"date: ");
    put_date(&mut out);
    out.extend_from_slice(b"\r\n\r\n");
    out
}

/// Appends the `Date` value for now. Formatted once a second per thread (as hyper does): a
/// reconnect storm writes thousands of heads in the same second.
pub fn put_date(out: &mut Vec<u8>) {
    const LEN: usize = "Sun, 06 Nov 1994 08:49:37 GMT".len();
    thread_local!(static CACHE: RefCell<(u64, [u8; LEN])> = const { RefCell::new((0, [0; LEN])) });
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with_borrow_mut(|(at, text)| {
        if *at != secs {
            let fresh = httpdate::fmt_http_date(now);
            if fresh.len() != LEN {
                // Not a four-digit year: not worth a cache.
                out.extend_from_slice(fresh.as_bytes());
                return;
            }
            text.copy_from_slice(fresh.as_bytes());
            *at = secs;
        }
        out.extend_from_slice(text);
    });
}

/// How long a closing connection keeps reading what its client still sends (see
/// [`Conn::close_gracefully`]).
const LINGER: Duration = Duration::from_secs(2);

/// Writes a whole plain answer. Returns the connection for hyper to serve the client's next
/// request, or `None` once it is closed (gracefully: the client reads the whole answer).
pub async fn answer<B>(mut conn: Conn, res: Response<B>, keep_alive: bool) -> Option<Conn>
where
    B: http_body::Body,
{
    let (parts, body) = res.into_parts();
    let body = body.collect().await.ok()?.to_bytes();
    let head = Response::from_parts(parts, ());
    let mut out = head_bytes(&head, Framing::Length(body.len()), keep_alive);
    out.extend_from_slice(&body);
    conn.write_all(&out).await.ok()?;
    if keep_alive {
        return Some(conn);
    }
    conn.close_gracefully(LINGER).await;
    None
}

/// The end of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_decided_by_the_request_line() {
        assert_eq!(target_of(b"GET /ws?topic=a"), Some(Target::WebSocket));
        assert_eq!(target_of(b"GET /sse HTTP/1.1"), Some(Target::Sse));
        assert_eq!(target_of(b"GET /s"), Some(Target::Sse));
        assert_eq!(target_of(b"GE"), Some(Target::Sse));
        assert_eq!(target_of(b"GET /wsx"), None);
        assert_eq!(target_of(b"GET /client.js"), None);
        assert_eq!(target_of(b"POST /sse"), None);
        assert_eq!(target_of(b"HEAD /sse"), None);
    }

    #[test]
    fn the_cached_date_is_the_date_of_now() {
        let mut cached = Vec::new();
        put_date(&mut cached);
        put_date(&mut cached);
        let text = String::from_utf8(cached).unwrap();
        let (first, second) = text.split_at(text.len() / 2);
        let parsed = httpdate::parse_http_date(first).unwrap();
        let age = SystemTime::now().duration_since(parsed).unwrap_or_default();
        assert!(age < Duration::from_secs(5), "{first}");
        assert!(httpdate::parse_http_date(second).is_ok(), "{second}");
    }

    #[test]
    fn first_requests_are_classified() {
        let ws = b"GET /ws?topic=a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nrest";
        match parse_first(ws) {
            Parsed::Stream(head, len) => {
                assert_eq!(head.target, Target::WebSocket);
                assert_eq!(head.query, "topic=a");
                assert!(!head.keep_alive);
                assert_eq!(&ws[len..], b"rest");
            }
            _ => panic!("a stream request"),
        }
        assert!(matches!(
            parse_first(b"GET /sse?topic=a HTTP/1.1\r\nHo"),
            Parsed::NeedMore
        ));
        for other in [
            &b"GET /sse?topic=a HTTP/1.0\r\n\r\n"[..],
            b"GET /ws HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            b"GET /ws HTTP/1.1\r\nBad Header\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\n\r\n",
        ] {
            assert!(matches!(parse_first(other), Parsed::Other), "{other:?}");
        }
        let mut long = b"GET /sse HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD_BYTES + 1, b'a');
        assert!(
            matches!(parse_first(&long), Parsed::Other),
            "too long for us"
        );
    }
}
