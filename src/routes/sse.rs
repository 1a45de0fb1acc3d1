//! `GET /sse?topic=T&token=K[&topic=T2&token=K2...]`: the same stream as `/ws`, as Server-Sent
//! Events, for proxies and networks that break WebSocket upgrades.
//!
//! Every refusal is a plain HTTP answer before the stream starts (400, 401, 403, 404), with CORS
//! headers so the JS client's `fetch` probe can read the status EventSource hides. The stream
//! itself is a hand-written `Stream`: a push costs two shared `Bytes` chunks (`id:` line and
//! `data:` lines, both serialized once per publish). As a connection's first request (the usual
//! case) it is written by `pump`, in a task of its own, several queued chunks per `writev`; on
//! a connection hyper already serves, hyper polls it.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Future, FutureExt, Stream, StreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, Interval, Sleep};
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamMap;
use warp::reply::Response;
use warp::{Filter, Reply};

use super::ws::spread;
use super::{admit, origin_of, query_pairs, query_raw, with_state, ApiError};
use crate::access::{self, Denied};
use crate::http1::{self, Conn, Framing, Head};
use crate::hub::{sse_data, Delivery, Replay, Subscription};
use crate::limits::Permit;
use crate::metrics::{ConnectionGauge, Metrics, Transport};
use crate::presence::Member;
use crate::server::{within, PeerAddr, Tracked};
use crate::AppState;

pub fn route(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path("sse")
        .and(warp::path::end())
        .and(warp::method())
        .and(query_raw())
        .and(warp::header::headers_cloned())
        .and(warp::ext::get::<PeerAddr>())
        .and(with_state(state))
        .then(
            |method: Method,
             query: String,
             headers: HeaderMap,
             peer: PeerAddr,
             state: Arc<AppState>| async move {
                match respond(method, &query, &headers, peer.0, &state).await {
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
/// (see [`crate::http1`]); the stream then runs in a task of its own.
pub async fn take_over(
    state: Arc<AppState>,
    head: Head,
    mut conn: Conn,
    peer: SocketAddr,
) -> Option<Conn> {
    match respond(Method::GET, &head.query, &head.headers, peer, &state).await {
        Answer::Plain(res) => http1::answer(conn, res, head.keep_alive).await,
        Answer::Stream(headers, stream) => {
            let mut res = http::Response::new(());
            *res.headers_mut() = headers;
            let bytes = http1::head_bytes(&res, Framing::Chunked, true);
            drop((head, res));
            if conn.write_all(&bytes).await.is_ok() {
                // A task sized for the stream alone: the request's state is freed with this one.
                tokio::spawn(pump(conn, stream, state.config.idle_timeout));
            }
            None
        }
    }
}

/// Writes the stream's chunks as they come (several in one `writev` when they queue up) until
/// the stream ends (shutdown) or the client goes away. A client that takes nothing for `stall`
/// (a full socket buffer) is dropped, as on `/ws`; one that merely reads slowly falls behind
/// and gets `resync`.
async fn pump(mut conn: Conn, mut stream: EventStream, stall: std::time::Duration) {
    let mut batch: Vec<Bytes> = Vec::new();
    // An SSE client has nothing to say; reading only notices when it leaves.
    let mut discard = [0u8; 32];
    loop {
        tokio::select! {
            biased;
            chunk = stream.next() => {
                let Some(Ok(chunk)) = chunk else {
                    let _ = conn.write_all(http1::LAST_CHUNK).await;
                    return;
                };
                batch.push(chunk);
                while batch.len() < http1::MAX_PARTS {
                    match stream.next().now_or_never() {
                        Some(Some(Ok(chunk))) => batch.push(chunk),
                        _ => break,
                    }
                }
                if !matches!(within(stall, http1::write_chunk(&mut conn, &batch)).await, Some(Ok(()))) {
                    return;
                }
                batch.clear();
                // Keep room for one event (id and data) between bursts, no more.
                batch.shrink_to(4);
            }
            read = conn.read(&mut discard) => {
                if !matches!(read, Ok(n) if n > 0) {
                    return;
                }
            }
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

async fn respond(
    method: Method,
    query: &str,
    headers: &HeaderMap,
    peer: SocketAddr,
    state: &Arc<AppState>,
) -> Answer {
    let origin = match origin_of(state, headers) {
        Ok(origin) => origin,
        Err(e) => return Answer::Plain(e.into_response()),
    };
    let mut answer = match method {
        Method::GET => match open(query, headers, peer, state).await {
            Ok(stream) => Answer::Stream(stream_headers(), stream),
            Err(e) => Answer::Plain(e.into_response()),
        },
        Method::OPTIONS => Answer::Plain(preflight()),
        _ => Answer::Plain(ApiError::MethodNotAllowed("GET, OPTIONS").into_response()),
    };
    if let Some(origin) = origin {
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

/// `topic`/`token` pairs in order, and the resume cursor.
struct Request {
    topics: Vec<(String, String)>,
    last_event_id: Option<String>,
}

fn parse_request(query: &str, headers: &HeaderMap) -> Result<Request, ApiError> {
    let mut topics: Vec<(String, Option<String>)> = Vec::new();
    let mut query_id = None;
    for (k, v) in query_pairs(query)? {
        match k.as_str() {
            "topic" => topics.push((v, None)),
            "token" => match topics.iter_mut().rev().find(|(_, t)| t.is_none()) {
                Some(entry) => entry.1 = Some(v),
                None => return Err(ApiError::BadRequest("token before its topic".into())),
            },
            "last_event_id" => query_id = Some(v),
            _ => {}
        }
    }
    if topics.is_empty() || topics.iter().any(|(t, _)| t.is_empty()) {
        return Err(ApiError::BadRequest("missing topic".into()));
    }
    // The browser's own reconnect header is newer than the id in the original URL.
    let header_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok(Request {
        topics: topics
            .into_iter()
            .map(|(t, k)| (t, k.unwrap_or_default()))
            .collect(),
        last_event_id: header_id.or(query_id).filter(|s| !s.trim().is_empty()),
    })
}

async fn open(
    query: &str,
    headers: &HeaderMap,
    peer: SocketAddr,
    state: &Arc<AppState>,
) -> Result<EventStream, ApiError> {
    let req = parse_request(query, headers)?;
    let limit = state.config.max_topics_per_connection;
    if req.topics.len() > limit {
        return Err(ApiError::BadRequest(format!(
            "at most {limit} topics per connection"
        )));
    }
    // The slot (and the failed-authentication throttle) before any token is looked at.
    let (permit, client) = admit(state, headers, peer)?;
    let mut user_id = 0;
    for (topic, token) in &req.topics {
        match access::lookup_and_grant(state, topic, token).await {
            Ok((_, grant)) => {
                if user_id == 0 {
                    user_id = grant.user_id;
                }
            }
            Err(denied) => {
                state.metrics.auth_failures.inc(denied.metric_reason());
                if denied == Denied::NotRegistered {
                    return Err(ApiError::NotFound("topic not registered"));
                }
                state.auth_throttle.failed(client);
                tracing::info!(topic = ?topic, client = %client, reason = denied.message(), "sse auth refused");
                return Err(ApiError::Unauthorized(denied.message()));
            }
        }
    }
    let resume = cursor_ids(req.last_event_id.as_deref(), req.topics.len());
    Ok(EventStream::open(
        state,
        &req.topics,
        resume,
        user_id,
        client,
        permit,
    ))
}

/// The per-topic ids to resume after. A cursor holds one id per topic, comma-separated in the
/// order of the URL; a single id applies to every topic; anything else resumes nothing
/// (every topic gets `resync`).
pub fn cursor_ids(cursor: Option<&str>, topics: usize) -> Vec<Option<String>> {
    let Some(cursor) = cursor else {
        return vec![None; topics];
    };
    let parts: Vec<&str> = cursor.split(',').map(str::trim).collect();
    if parts.len() == topics {
        parts.into_iter().map(|p| Some(p.to_string())).collect()
    } else if parts.len() == 1 {
        vec![Some(parts[0].to_string()); topics]
    } else {
        vec![Some(String::new()); topics]
    }
}

/// One SSE client: its subscriptions, and the chunks waiting to be written.
struct EventStream {
    subs: StreamMap<usize, Subscription>,
    /// Last id per topic (URL order); the `id:` line of a multi-topic stream joins them.
    cursor: Vec<String>,
    topics: Vec<Arc<str>>,
    queue: VecDeque<Bytes>,
    keepalive: Interval,
    shutdown: WatchStream<bool>,
    close_at: Option<Pin<Box<Sleep>>>,
    drain_delay: std::time::Duration,
    client: IpAddr,
    started: Instant,
    metrics: Arc<Metrics>,
    _member: Member,
    _tracked: Tracked,
    _gauge: ConnectionGauge,
    _permit: Permit,
}

impl EventStream {
    fn open(
        state: &Arc<AppState>,
        topics: &[(String, String)],
        resume: Vec<Option<String>>,
        user_id: i64,
        client: IpAddr,
        permit: Permit,
    ) -> EventStream {
        let cfg = &state.config;
        let mut stream = EventStream {
            subs: StreamMap::with_capacity(topics.len()),
            cursor: Vec::with_capacity(topics.len()),
            topics: Vec::with_capacity(topics.len()),
            queue: VecDeque::new(),
            keepalive: tokio::time::interval_at(
                Instant::now() + cfg.sse_keepalive,
                cfg.sse_keepalive,
            ),
            shutdown: WatchStream::new(state.shutdown.receiver()),
            close_at: None,
            drain_delay: spread(state.next_conn_id(), cfg.shutdown_drain),
            client,
            started: Instant::now(),
            metrics: state.metrics.clone(),
            _member: state.presence.join(user_id),
            _tracked: state.sockets.track(),
            _gauge: state.metrics.open(Transport::Sse),
            _permit: permit,
        };
        let mut replays = Vec::new();
        for (i, ((topic, _), resume)) in topics.iter().zip(resume).enumerate() {
            let subscribed = state.hub.subscribe(topic, resume.as_deref());
            stream.topics.push(subscribed.subscription.topic().clone());
            stream.cursor.push(subscribed.position);
            stream.subs.insert(i, subscribed.subscription);
            replays.push(subscribed.replay);
        }
        // First the reconnect delay and the starting cursor, as a `position` event (page code
        // can read it; `onmessage` handlers don't see it): a client that drops before any
        // event still resumes from here and misses nothing.
        let cursor = stream.cursor.join(",");
        let position = json!({ "type": "position", "last_event_id": cursor });
        let head = format!(
            "retry: {}\nevent: position\nid: {cursor}\ndata: {position}\n\n",
            cfg.sse_retry.as_millis()
        );
        stream.queue.push_back(Bytes::from(head));
        for (i, replay) in replays.into_iter().enumerate() {
            match replay {
                Replay::Resync => stream.push_resync(i),
                Replay::Events(frames) => {
                    for frame in frames {
                        stream.push(i, Delivery::Event(frame));
                    }
                }
            }
        }
        tracing::info!(topics = ?stream.topics, client = %stream.client, "sse connected");
        stream
    }

    fn push(&mut self, i: usize, delivery: Delivery) {
        let frame = match delivery {
            Delivery::Event(frame) => frame,
            Delivery::Resync => return self.push_resync(i),
        };

        if self.cursor.len() == 1 {
            self.queue.push_back(frame.sse_id.clone());
        } else {
            // `id: ` + "a-1" + "\n" sliced out of the frame's own id line.
            let id = &frame.sse_id[4..frame.sse_id.len() - 1];
            self.cursor[i] = String::from_utf8_lossy(id).into_owned();
            self.queue
                .push_back(Bytes::from(format!("id: {}\n", self.cursor.join(","))));
        }
        self.queue.push_back(frame.sse_data.clone());
    }

    fn push_resync(&mut self, i: usize) {
        let text = json!({ "type": "resync", "topic": &*self.topics[i] }).to_string();
        self.queue.push_back(sse_data(&text));
    }
}

impl Stream for EventStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(close_at) = this.close_at.as_mut() {
            if close_at.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
        } else if let Poll::Ready(Some(true) | None) = Pin::new(&mut this.shutdown).poll_next(cx) {
            let mut sleep = Box::pin(tokio::time::sleep(this.drain_delay));
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            this.close_at = Some(sleep);
        }
        if let Some(chunk) = this.queue.pop_front() {
            return Poll::Ready(Some(Ok(chunk)));
        }
        if let Poll::Ready(Some((i, delivery))) = Pin::new(&mut this.subs).poll_next(cx) {
            if let Delivery::Event(frame) = &delivery {
                this.metrics
                    .publish_to_send
                    .observe(frame.published.elapsed());
            }
            this.push(i, delivery);
            if let Some(chunk) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(chunk)));
            }
        }
        if this.keepalive.poll_tick(cx).is_ready() {
            return Poll::Ready(Some(Ok(Bytes::from_static(b": keepalive\n\n"))));
        }
        Poll::Pending
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        tracing::info!(
            topics = ?self.topics,
            client = %self.client,
            seconds = self.started.elapsed().as_secs(),
            "sse disconnected"
        );
    }
}
