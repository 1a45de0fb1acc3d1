//! `GET /sse?topic=T&token=K[&topic=T2&token=K2...]`: the same stream as `/ws`, as Server-Sent
//! Events, for proxies and networks that break WebSocket upgrades.
//!
//! Every refusal is a plain HTTP answer before the stream starts (400, 401, 403, 404), with CORS
//! headers so the JS client's `fetch` probe can read the status EventSource hides. As a
//! connection's first request (the usual case) publishers write each event to the socket
//! themselves, one chunk serialized once per publish, and `pump`, in the connection's task, writes
//! the stream's own chunks and whatever waited while the socket was full; on a connection
//! hyper already serves, hyper polls the stream for everything.

mod stream;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::admission::{self, check_origin, Request};
use crate::hub::{Link, Outlet};
use crate::metrics::Transport;
use crate::routes::{stream_request, with_state, ApiError};
use crate::transport::http1::{self, Conn, Framing, Head};
use crate::transport::{PeerAddr, Taken};
use crate::AppState;
use stream::EventStream;

pub fn route(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    stream_request("sse").and(with_state(state)).then(
        |method: Method,
         query: String,
         headers: HeaderMap,
         peer: PeerAddr,
         state: Arc<AppState>| async move {
            match respond(method, &query, &headers, peer.0, &state, None).await {
                Answer::Plain(res) => res,
                // On a connection hyper already serves: hyper polls the stream.
                Answer::Stream(head, stream) => {
                    let mut res = warp::reply::stream(stream).into_response();
                    res.headers_mut().extend(head);
                    res
                }
            }
        },
    )
}

/// A `/sse` request as a connection's first request: answered here, without hyper's buffers
/// (see [`crate::http1`]); the stream then runs on in the connection's task.
pub async fn take_over(
    state: Arc<AppState>,
    head: Head,
    mut conn: Conn,
    peer: SocketAddr,
) -> Taken {
    let socket = conn.socket();
    match respond(
        Method::GET,
        &head.query,
        &head.headers,
        peer,
        &state,
        Some(socket),
    )
    .await
    {
        // Boxed: a refusal is rare, and its answer's state would make every stream's first
        // task kilobytes larger (see `session::tests::first_request_futures_are_small`).
        Answer::Plain(res) => Box::pin(http1::answer(conn, res, head.keep_alive))
            .await
            .into(),
        Answer::Stream(headers, stream) => {
            let mut res = http::Response::new(());
            *res.headers_mut() = headers;
            let mut bytes = http1::head_bytes(&res, Framing::Chunked, true);
            drop((head, res));
            // The stream's first block (and any replay) goes out with the head: one send.
            stream.outlet().take_waiting(&mut bytes);
            let written = conn.write_all(&bytes).await.is_ok();
            stream.outlet().release(Vec::new());
            if !written {
                return Taken::Closed;
            }
            Taken::Stream(Box::pin(pump(conn, stream)))
        }
    }
}

/// Writes the stream's own chunks (keepalives, the end) and whatever publishes left waiting in
/// the outlet when the socket was full, until the stream ends (shutdown, token expiry) or the
/// client goes away. A client that takes nothing for `idle_timeout` (a full socket buffer) fails
/// the write, as on `/ws`: the connection's writer carries that deadline. One that merely reads
/// slowly falls behind and gets `resync`.
async fn pump(conn: Conn, mut stream: EventStream) {
    let outlet = stream.outlet().clone();
    let others = outlet.others_waker();
    let mut link = Link::new(conn, outlet.clone());
    loop {
        let turn =
            std::future::poll_fn(|cx| poll_turn(cx, &mut link, &mut stream, &outlet, &others))
                .await;
        let (bytes, last) = match turn {
            Turn::Gone => return,
            Turn::Chunk(Some(chunk)) => (outlet.frame(&chunk), false),
            Turn::Chunk(None) => (Bytes::from_static(http1::LAST_CHUNK), true),
        };
        if link.write_all(&bytes).await.is_err() || link.flush().await.is_err() || last {
            return;
        }
    }
}

/// What woke the pump, besides publishes.
enum Turn {
    /// The client left, or the socket broke.
    Gone,
    /// A chunk of the stream's own (`None`: the stream ended).
    Chunk(Option<Bytes>),
}

/// One turn of the pump: the backlog first, as on `/ws` (nearly every wake-up is a publish
/// that found the socket full, and then nothing else is polled); the stream's timers and the
/// socket's reads only when one of them woke the task (see [`Outlet::others_waker`]).
fn poll_turn(
    cx: &mut Context<'_>,
    link: &mut Link<Conn>,
    stream: &mut EventStream,
    outlet: &Outlet,
    others: &Waker,
) -> Poll<Turn> {
    if link.poll_backlog(cx).is_ready() {
        return Poll::Ready(Turn::Gone);
    }
    outlet.poll_others(cx, others, |cx| {
        if let Poll::Ready(chunk) = stream.poll_next_unpin(cx) {
            Poll::Ready(Turn::Chunk(chunk.map(|Ok(chunk)| chunk)))
        } else if client_left(cx, link).is_ready() {
            Poll::Ready(Turn::Gone)
        } else {
            Poll::Pending
        }
    })
}

/// An SSE client has nothing to say: reading only notices when it leaves (what it sends is
/// dropped).
fn client_left(cx: &mut Context<'_>, link: &mut Link<Conn>) -> Poll<()> {
    let mut discard = [0u8; 32];
    loop {
        let mut buf = ReadBuf::new(&mut discard);
        match std::task::ready!(Pin::new(&mut *link).poll_read(cx, &mut buf)) {
            Ok(()) if !buf.filled().is_empty() => continue,
            _ => return Poll::Ready(()),
        }
    }
}

/// What a `/sse` request gets: a plain answer, or the stream with its response headers.
/// (Short-lived, and the stream is moved into its task whole: no point boxing it.)
#[allow(clippy::large_enum_variant)]
enum Answer {
    Plain(Response),
    Stream(HeaderMap, EventStream),
}

impl Answer {
    fn headers_mut(&mut self) -> &mut HeaderMap {
        match self {
            Answer::Plain(res) => res.headers_mut(),
            Answer::Stream(headers, _) => headers,
        }
    }
}

/// `direct`: the socket, when the stream is written by our own HTTP/1 code.
async fn respond(
    method: Method,
    query: &str,
    headers: &HeaderMap,
    peer: SocketAddr,
    state: &Arc<AppState>,
    direct: Option<Arc<TcpStream>>,
) -> Answer {
    // Only the CORS echo: admission decides (403 for a disallowed origin). Refusals carry
    // CORS headers too, so the JS client's fetch probe can read their status.
    let allowed = check_origin(&state.config.allowed_origins, headers);
    let mut answer = match method {
        Method::GET => match open(query, headers, peer, state, direct).await {
            Ok(stream) => Answer::Stream(stream_headers(), stream),
            Err(e) => Answer::Plain(e.into_response()),
        },
        Method::OPTIONS => match &allowed {
            Ok(_) => Answer::Plain(preflight()),
            Err(_) => Answer::Plain(ApiError::Forbidden.into_response()),
        },
        _ => Answer::Plain(ApiError::MethodNotAllowed("GET, OPTIONS").into_response()),
    };
    if let Ok(Some(origin)) = allowed {
        let h = answer.headers_mut();
        h.insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(http::header::VARY, HeaderValue::from_static("Origin"));
    }
    answer
}

fn stream_headers() -> HeaderMap {
    let mut h = HeaderMap::with_capacity(4);
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    h.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("keep-alive"),
    );
    h
}

/// EventSource itself never preflights, but a reconnect carrying `Last-Event-ID` through some
/// fetch polyfills does.
fn preflight() -> Response {
    let mut res = Response::default();
    *res.status_mut() = StatusCode::NO_CONTENT;
    let h = res.headers_mut();
    h.insert(
        http::header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET"),
    );
    h.insert(
        http::header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Last-Event-ID, Cache-Control"),
    );
    h.insert(
        http::header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    res
}

/// Admits the request and opens its stream.
async fn open(
    query: &str,
    headers: &HeaderMap,
    peer: SocketAddr,
    state: &Arc<AppState>,
    direct: Option<Arc<TcpStream>>,
) -> Result<EventStream, ApiError> {
    let request = Request {
        transport: Transport::Sse,
        query,
        headers,
        peer,
    };
    let admitted = admission::admit(state, request).await?.grant(state)?;
    Ok(EventStream::open(state, admitted, direct))
}
