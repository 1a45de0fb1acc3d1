//! `GET /ws?topic=T`: the WebSocket view of the stream, wire-compatible with the Go worker.
//!
//! One task per socket drives everything (reading, delivering, pinging, deadlines) with one
//! `select!`, so a socket costs one small future and no locks are shared between sockets.
//! After the first auth, `subscribe`/`unsubscribe` frames add and remove more topics.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use tokio_stream::StreamMap;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use warp::reply::Response;
use warp::Filter;

use super::{admit, origin_of, query_pairs, query_raw, with_state, ApiError};
use crate::access::{self, Denied, Grant};
use crate::http1::{self, has_token, Conn, Framing, Head};
use crate::hub::{Delivery, Replay, Subscription};
use crate::limits::Permit;
use crate::metrics::Transport;
use crate::registry::{TopicMeta, STATUS_TOPIC};
use crate::server::{within, PeerAddr};
use crate::status::Status;
use crate::token::TokenError;
use crate::AppState;

/// Largest inbound frame; anything bigger closes the socket (1009).
const MAX_INBOUND: usize = 4 * 1024;
/// Minimum spacing of answered status requests on the status topic, per socket.
const STATUS_THROTTLE: Duration = Duration::from_millis(700);
/// Frames written per flush when several are queued.
const BATCH: usize = 64;

pub fn route(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path("ws")
        .and(warp::path::end())
        .and(warp::method())
        .and(query_raw())
        .and(warp::header::headers_cloned())
        .and(warp::ext::get::<PeerAddr>())
        .and(warp::ext::optional::<OnUpgrade>())
        .and(with_state(state))
        .then(
            |method, query: String, headers, peer: PeerAddr, upgrade, state| async move {
                upgrade_in_hyper(method, &query, &headers, peer, upgrade, state)
                    .await
                    .unwrap_or_else(ApiError::into_response)
            },
        )
}

/// An upgrade request on a connection hyper serves: the socket arrives through hyper's
/// upgrade hand-over, in a task of its own.
async fn upgrade_in_hyper(
    method: Method,
    query: &str,
    headers: &HeaderMap,
    peer: PeerAddr,
    upgrade: Option<OnUpgrade>,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let accepted = handshake(method, query, headers, peer.0, &state).await?;
    let upgrade = upgrade.ok_or(ApiError::UpgradeRequired)?;
    let res = accepted.response();
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => accepted.run(TokioIo::new(upgraded), state).await,
            Err(e) => tracing::debug!("websocket upgrade failed: {e}"),
        }
    });
    Ok(res)
}

/// An upgrade request as a connection's first request: answered here, without hyper (see
/// [`crate::http1`]); the session then runs in a task of its own.
pub async fn take_over(
    state: Arc<AppState>,
    head: Head,
    mut conn: Conn,
    peer: SocketAddr,
) -> Option<Conn> {
    let accepted = match handshake(Method::GET, &head.query, &head.headers, peer, &state).await {
        Ok(accepted) => accepted,
        Err(e) => return http1::answer(conn, e.into_response(), head.keep_alive).await,
    };
    let res = accepted.response();
    let bytes = http1::head_bytes(&res, Framing::Empty, true);
    drop(head);
    if conn.write_all(&bytes).await.is_ok() {
        // A task sized for the session alone: the handshake's state is freed with this one.
        tokio::spawn(accepted.run(conn, state));
    }
    None
}

/// A checked upgrade request: what its session needs.
struct Accepted {
    topic: String,
    meta: TopicMeta,
    client: IpAddr,
    permit: Permit,
    accept_key: HeaderValue,
}

impl Accepted {
    /// The `101 Switching Protocols` answer.
    fn response(&self) -> Response {
        let mut res = Response::default();
        *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = res.headers_mut();
        h.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
        h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(http::header::SEC_WEBSOCKET_ACCEPT, self.accept_key.clone());
        res
    }

    /// The socket's whole life after the `101`.
    async fn run<S>(self, io: S, state: Arc<AppState>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(socket_config())).await;
        Session::new(ws, state, self.topic, self.meta, self.client)
            .run()
            .await;
        drop(self.permit);
    }
}

/// Checks the request before the upgrade: 405, 403 (origin), 400 (no topic), 404 (unknown
/// topic), 426 (not an upgrade), then takes a connection slot (503, 429).
async fn handshake(
    method: Method,
    query: &str,
    headers: &HeaderMap,
    peer: SocketAddr,
    state: &AppState,
) -> Result<Accepted, ApiError> {
    if method != Method::GET {
        return Err(ApiError::MethodNotAllowed("GET"));
    }
    origin_of(state, headers)?;
    let topic = query_pairs(query)?
        .into_iter()
        .find(|(k, v)| k == "topic" && !v.is_empty())
        .map(|(_, v)| v)
        .ok_or_else(|| ApiError::BadRequest("missing topic".into()))?;
    let meta = state
        .lookup_topic(&topic)
        .await
        .ok_or(ApiError::NotFound("topic not registered"))?;
    let key = websocket_key(headers).ok_or(ApiError::UpgradeRequired)?;
    let accept_key = HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
        .map_err(|_| ApiError::UpgradeRequired)?;
    let (permit, client) = admit(state, headers, peer)?;
    Ok(Accepted {
        topic,
        meta,
        client,
        permit,
        accept_key,
    })
}

/// The `Sec-WebSocket-Key` of a well-formed upgrade request.
fn websocket_key(headers: &HeaderMap) -> Option<String> {
    let has = |name: &str, token: &str| headers.get_all(name).iter().any(|v| has_token(v, token));
    if !has("connection", "upgrade")
        || !has("upgrade", "websocket")
        || !has("sec-websocket-version", "13")
    {
        return None;
    }
    headers
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Small buffers: most sockets idle for hours and we hold thousands of them.
fn socket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(512)
        .write_buffer_size(8 * 1024)
        .max_write_buffer_size(1024 * 1024)
        .max_message_size(Some(MAX_INBOUND))
        .max_frame_size(Some(MAX_INBOUND))
}

/// Why a socket ends; decides the error frame, close code and log line.
#[derive(Debug)]
enum End {
    PeerClosed,
    PeerGone,
    Refused {
        code: &'static str,
        message: &'static str,
    },
    AuthTimeout,
    Idle,
    TooBig,
    /// A text frame that is not UTF-8, or another protocol violation.
    InvalidData,
    WriteStalled,
    Expired,
    Shutdown,
}

impl End {
    fn from_ws(e: WsError) -> End {
        match e {
            WsError::Capacity(_) => End::TooBig,
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::PeerGone,
            WsError::Utf8(_) | WsError::Protocol(_) => End::InvalidData,
            WsError::ConnectionClosed | WsError::AlreadyClosed => End::PeerClosed,
            _ => End::PeerGone,
        }
    }

    fn denied(d: Denied) -> End {
        End::Refused {
            code: d.code(),
            message: d.message(),
        }
    }

    /// The `{"type":"error"}` frame sent before closing, if any.
    fn error_frame(&self) -> Option<String> {
        let (code, message) = match self {
            End::Refused { code, message } => (*code, *message),
            End::Expired => ("auth_expired", "token expired"),
            _ => return None,
        };
        Some(json!({ "type": "error", "code": code, "message": message }).to_string())
    }

    fn close_frame(&self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            End::PeerClosed | End::PeerGone | End::WriteStalled => return None,
            End::Refused { .. } | End::Expired => (CloseCode::Policy, "unauthorized"),
            End::AuthTimeout => (CloseCode::Policy, "auth timeout"),
            End::Idle => (CloseCode::Normal, "idle timeout"),
            End::TooBig => (CloseCode::Size, "frame too large"),
            End::InvalidData => (CloseCode::Invalid, "invalid frame"),
            End::Shutdown => (CloseCode::Away, "server shutting down"),
        };
        Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        })
    }

    /// The `reason` label of `wavelog_worker_websocket_disconnects_total`.
    fn metric_label(&self) -> &'static str {
        match self {
            End::PeerClosed => "client_closed",
            End::PeerGone => "connection_lost",
            End::Refused { .. } => "refused",
            End::AuthTimeout => "auth_timeout",
            End::Idle => "idle_timeout",
            End::TooBig => "frame_too_large",
            End::InvalidData => "invalid_frame",
            End::WriteStalled => "client_not_reading",
            End::Expired => "token_expired",
            End::Shutdown => "shutdown",
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            End::PeerClosed => "closed by client",
            End::PeerGone => "connection lost",
            End::Refused { code, .. } => code,
            End::AuthTimeout => "auth timeout",
            End::Idle => "idle timeout",
            End::TooBig => "frame too large",
            End::InvalidData => "invalid frame",
            End::WriteStalled => "client not reading",
            End::Expired => "token expired",
            End::Shutdown => "shutdown",
        }
    }
}

/// An inbound text frame; unknown fields are ignored.
#[derive(Debug, Deserialize)]
pub struct Inbound {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub topic: Option<String>,
    #[serde(default)]
    pub last_event_id: Option<String>,
}

impl Inbound {
    /// Parses a client's text frame; `None` for anything that is not such a JSON object.
    pub fn parse(text: &str) -> Option<Inbound> {
        serde_json::from_str(text).ok()
    }
}

struct Session<S> {
    ws: WebSocketStream<S>,
    state: Arc<AppState>,
    /// The topic of the URL, authenticated by the first frame.
    topic: String,
    meta: TopicMeta,
    client: IpAddr,
    conn_id: u64,
    last_status: Option<Instant>,
    subs: StreamMap<Arc<str>, Subscription>,
    /// Token expiry per subscribed topic (unix seconds), for `enforce_token_expiry`.
    expiries: HashMap<Arc<str>, i64>,
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    fn new(
        ws: WebSocketStream<S>,
        state: Arc<AppState>,
        topic: String,
        meta: TopicMeta,
        client: IpAddr,
    ) -> Self {
        Session {
            conn_id: state.next_conn_id(),
            ws,
            state,
            topic,
            meta,
            client,
            last_status: None,
            subs: StreamMap::new(),
            expiries: HashMap::new(),
        }
    }

    async fn run(mut self) {
        let _tracked = self.state.sockets.track();
        let _gauge = self.state.metrics.open(Transport::WebSocket);
        let started = Instant::now();
        // The once-per-socket and rare steps are boxed: a task is allocated for its largest
        // state, and these would make every idle socket pay for them.
        let end = match Box::pin(self.authenticate()).await {
            Ok((grant, resume)) => self.serve(grant, resume).await,
            Err(end) => end,
        };
        Box::pin(self.finish(&end)).await;
        self.state.metrics.ws_disconnects.inc(end.metric_label());
        tracing::info!(
            topic = ?self.topic,
            client = %self.client,
            reason = end.describe(),
            seconds = started.elapsed().as_secs(),
            "ws disconnected"
        );
    }

    /// Waits for the auth frame (within `auth_timeout`) and checks it. Returns the grant and
    /// the id to resume after, if the client sent one.
    async fn authenticate(&mut self) -> Result<(Grant, Option<String>), End> {
        let deadline = Instant::now() + self.state.config.auth_timeout;
        let mut shutdown = self.state.shutdown.clone();
        let auth_required = End::Refused {
            code: "auth_required",
            message: "expected {\"type\":\"auth\",\"token\":...}",
        };
        loop {
            let next = tokio::select! {
                _ = shutdown.wait() => return Err(End::Shutdown),
                next = timeout_at(deadline, self.ws.next()) => next,
            };
            let text = match next {
                Err(_) => {
                    self.state.metrics.auth_failures.inc("auth_timeout");
                    return Err(End::AuthTimeout);
                }
                Ok(None) => return Err(End::PeerGone),
                Ok(Some(Err(e))) => return Err(End::from_ws(e)),
                Ok(Some(Ok(Message::Text(text)))) => text,
                Ok(Some(Ok(Message::Binary(_)))) => {
                    self.state.metrics.auth_failures.inc("auth_required");
                    return Err(auth_required);
                }
                Ok(Some(Ok(Message::Close(_)))) => return Err(End::PeerClosed),
                Ok(Some(Ok(_))) => continue,
            };
            let frame = match Inbound::parse(&text) {
                Some(f) if f.kind == "auth" => f,
                _ => {
                    self.state.metrics.auth_failures.inc("auth_required");
                    self.state.auth_throttle.failed(self.client);
                    return Err(auth_required);
                }
            };
            let token = frame.token.unwrap_or_default();
            return match access::grant(&self.state, &self.topic, self.meta, &token) {
                Ok(grant) => Ok((grant, frame.last_event_id)),
                Err(denied) => {
                    self.log_refusal(&self.topic, denied);
                    Err(End::denied(denied))
                }
            };
        }
    }

    fn log_refusal(&self, topic: &str, denied: Denied) {
        self.state.metrics.auth_failures.inc(denied.metric_reason());
        if denied != Denied::NotRegistered {
            self.state.auth_throttle.failed(self.client);
        }
        tracing::info!(topic = ?topic, client = %self.client, reason = denied.message(), "ws auth refused");
    }

    /// The authenticated life of the socket. Subscriptions exist before `auth_ok` is sent, so
    /// any publish made after the client saw `auth_ok` reaches it.
    async fn serve(&mut self, grant: Grant, resume: Option<String>) -> End {
        let _member = self.state.presence.join(grant.user_id);
        let topic = self.topic.clone();
        let (position, replay) = self.add_subscription(&topic, grant, resume.as_deref());
        let ok = json!({ "type": "auth_ok", "topic": topic, "last_event_id": position });
        if let Err(end) = self.send(Message::text(ok.to_string())).await {
            return end;
        }
        if let Err(end) = self.send_replay(&topic, replay).await {
            return end;
        }
        tracing::info!(topic = ?self.topic, client = %self.client, "ws connected");

        let cfg = &self.state.config;
        let (ping_every, idle_after, drain) =
            (cfg.ping_interval, cfg.idle_timeout, cfg.shutdown_drain);
        let mut clock = Deadlines {
            next_ping: Instant::now() + ping_every,
            last_heard: Instant::now(),
            idle_after,
            close_at: None,
            expiry: self.expiry_deadline(),
        };
        // One timer for all deadlines, re-armed only when it fires or a deadline moves
        // earlier: nothing is registered with the timer wheel per delivered event.
        let timer = sleep_until(clock.earliest());
        tokio::pin!(timer);
        let mut shutdown = self.state.shutdown.clone();
        let shutdown_started = shutdown.wait();
        tokio::pin!(shutdown_started);

        loop {
            tokio::select! {
                _ = &mut shutdown_started, if clock.close_at.is_none() => {
                    clock.close_at = Some(Instant::now() + spread(self.conn_id, drain));
                    timer.as_mut().reset(clock.earliest());
                }
                Some(first) = self.subs.next() => {
                    if let Err(end) = self.deliver(first).await {
                        return end;
                    }
                }
                next = self.ws.next() => {
                    clock.last_heard = Instant::now();
                    match next {
                        None => return End::PeerGone,
                        Some(Err(e)) => return End::from_ws(e),
                        Some(Ok(Message::Close(_))) => return End::PeerClosed,
                        Some(Ok(Message::Text(text))) => {
                            if let Err(end) = Box::pin(self.on_text(&text)).await {
                                return end;
                            }
                            clock.expiry = self.expiry_deadline();
                            timer.as_mut().reset(clock.earliest());
                        }
                        Some(Ok(_)) => {}
                    }
                }
                _ = &mut timer => {
                    let now = Instant::now();
                    if clock.close_at.is_some_and(|t| now >= t) {
                        return End::Shutdown;
                    }
                    if clock.expiry.is_some_and(|t| now >= t) {
                        return End::Expired;
                    }
                    if now >= clock.last_heard + idle_after {
                        return End::Idle;
                    }
                    if now >= clock.next_ping {
                        clock.next_ping = now + ping_every;
                        if let Err(end) = self.send(Message::Ping(Bytes::new())).await {
                            return end;
                        }
                    }
                    timer.as_mut().reset(clock.earliest());
                }
            }
        }
    }

    /// When the earliest token of this socket expires, if expiry is enforced.
    fn expiry_deadline(&self) -> Option<Instant> {
        if !self.state.config.enforce_token_expiry {
            return None;
        }
        self.expiries.values().min().map(|&t| instant_of_unix(t))
    }

    /// Subscribes under the hub's topic lock; returns the position and what to replay.
    fn add_subscription(
        &mut self,
        topic: &str,
        grant: Grant,
        resume: Option<&str>,
    ) -> (String, Replay) {
        let subscribed = self.state.hub.subscribe(topic, resume);
        let key = subscribed.subscription.topic().clone();
        if let Some(expires) = grant.expires {
            self.expiries.insert(key.clone(), expires);
        }
        self.subs.insert(key, subscribed.subscription);
        (subscribed.position, subscribed.replay)
    }

    async fn send_replay(&mut self, topic: &str, replay: Replay) -> Result<(), End> {
        match replay {
            Replay::Resync => self.send(resync_message(topic)).await,
            Replay::Events(frames) => {
                for frame in frames {
                    self.feed(Message::Text(frame.text.clone())).await?;
                }
                self.flush().await
            }
        }
    }

    /// Handles a text frame after auth: subscribe/unsubscribe, token refresh, status requests.
    async fn on_text(&mut self, text: &str) -> Result<(), End> {
        let Some(frame) = Inbound::parse(text) else {
            return Ok(());
        };
        match frame.kind.as_str() {
            "status" if self.topic == STATUS_TOPIC => self.answer_status().await,
            "auth" => self.refresh(frame).await,
            "subscribe" => self.subscribe(frame).await,
            "unsubscribe" => {
                let topic = frame.topic.unwrap_or_default();
                self.subs.remove(topic.as_str());
                self.expiries.remove(topic.as_str());
                self.send(Message::text(
                    json!({ "type": "unsubscribed", "topic": topic }).to_string(),
                ))
                .await
            }
            _ => Ok(()),
        }
    }

    async fn answer_status(&mut self) -> Result<(), End> {
        let now = Instant::now();
        if self.last_status.is_some_and(|t| now < t + STATUS_THROTTLE) {
            return Ok(());
        }
        self.last_status = Some(now);
        let status = Status::collect(&self.state, false).await;
        let frame = json!({ "type": "status", "payload": status }).to_string();
        self.send(Message::text(frame)).await
    }

    /// A fresh token on the open socket: answered with `auth_ok`; a bad one, or one for a topic
    /// this socket doesn't hold, closes the socket.
    async fn refresh(&mut self, frame: Inbound) -> Result<(), End> {
        let topic = frame.topic.unwrap_or_else(|| self.topic.clone());
        let token = frame.token.unwrap_or_default();
        let Some(key) = self.subs.keys().find(|k| ***k == *topic).cloned() else {
            return Err(End::denied(Denied::Unauthorized(TokenError::WrongTopic)));
        };
        // A topic unregistered meanwhile is checked as token-protected.
        let meta = self.state.lookup_topic(&topic).await.unwrap_or(TopicMeta {
            require_token: true,
            coalesce_ms: 0,
        });
        let grant = access::grant(&self.state, &topic, meta, &token).map_err(|denied| {
            self.log_refusal(&topic, denied);
            End::Refused {
                code: "unauthorized",
                message: denied.message(),
            }
        })?;
        if let Some(expires) = grant.expires {
            self.expiries.insert(key, expires);
        }
        self.send(Message::text(
            json!({ "type": "auth_ok", "topic": topic }).to_string(),
        ))
        .await
    }

    /// `{"type":"subscribe","topic":T,"token":K[,"last_event_id":I]}`: adds a topic, or
    /// answers an error frame naming it (the socket stays open).
    async fn subscribe(&mut self, frame: Inbound) -> Result<(), End> {
        let topic = frame.topic.unwrap_or_default();
        let error = |code: &str, message: &str| {
            Message::text(
                json!({ "type": "error", "code": code, "topic": topic, "message": message })
                    .to_string(),
            )
        };
        if topic.is_empty() {
            return self.send(error("bad_request", "missing topic")).await;
        }
        if self.subs.contains_key(topic.as_str()) {
            return self
                .send(error("already_subscribed", "already subscribed"))
                .await;
        }
        if self.subs.len() >= self.state.config.max_topics_per_connection {
            return self
                .send(error(
                    "too_many_topics",
                    "topic limit per connection reached",
                ))
                .await;
        }
        let token = frame.token.unwrap_or_default();
        let grant = match access::lookup_and_grant(&self.state, &topic, &token).await {
            Ok((_, grant)) => grant,
            Err(denied) => {
                self.log_refusal(&topic, denied);
                return self.send(error(denied.code(), denied.message())).await;
            }
        };
        let (position, replay) =
            self.add_subscription(&topic, grant, frame.last_event_id.as_deref());
        let ok = json!({ "type": "subscribed", "topic": topic, "last_event_id": position });
        self.send(Message::text(ok.to_string())).await?;
        self.send_replay(&topic, replay).await
    }

    /// Writes one delivery and whatever else is already queued, then flushes once.
    async fn deliver(&mut self, first: (Arc<str>, Delivery)) -> Result<(), End> {
        let published = match &first.1 {
            Delivery::Event(frame) => Some(frame.published),
            Delivery::Resync => None,
        };
        self.feed(delivery_message(first)).await?;
        for _ in 1..BATCH {
            match self.subs.next().now_or_never() {
                Some(Some(next)) => self.feed(delivery_message(next)).await?,
                _ => break,
            }
        }
        self.flush().await?;
        if let Some(published) = published {
            self.state
                .metrics
                .publish_to_send
                .observe(published.elapsed());
        }
        Ok(())
    }

    /// Queues a frame; a client that doesn't take it within `idle_timeout` is dropped.
    async fn feed(&mut self, msg: Message) -> Result<(), End> {
        let stall = self.state.config.idle_timeout;
        settle(within(stall, self.ws.feed(msg)).await)
    }

    async fn flush(&mut self) -> Result<(), End> {
        let stall = self.state.config.idle_timeout;
        settle(within(stall, self.ws.flush()).await)
    }

    async fn send(&mut self, msg: Message) -> Result<(), End> {
        self.feed(msg).await?;
        self.flush().await
    }

    /// Says why (error frame), closes with a code, and waits briefly for the client's close.
    async fn finish(&mut self, end: &End) {
        let grace = Duration::from_secs(1);
        if let Some(frame) = end.error_frame() {
            let _ = timeout(grace, self.ws.send(Message::text(frame))).await;
        }
        if let Some(close) = end.close_frame() {
            let _ = timeout(grace, self.ws.close(Some(close))).await;
        }
        if !matches!(end, End::PeerGone | End::WriteStalled) {
            let _ = timeout(grace, async {
                while let Some(Ok(_)) = self.ws.next().await {}
            })
            .await;
        }
    }
}

fn settle(r: Option<Result<(), WsError>>) -> Result<(), End> {
    match r {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(End::from_ws(e)),
        None => Err(End::WriteStalled),
    }
}

fn delivery_message((topic, delivery): (Arc<str>, Delivery)) -> Message {
    match delivery {
        Delivery::Event(frame) => Message::Text(frame.text.clone()),
        Delivery::Resync => resync_message(&topic),
    }
}

fn resync_message(topic: &str) -> Message {
    Message::text(json!({ "type": "resync", "topic": topic }).to_string())
}

/// The moments a socket must act on without any traffic.
struct Deadlines {
    next_ping: Instant,
    last_heard: Instant,
    idle_after: Duration,
    close_at: Option<Instant>,
    expiry: Option<Instant>,
}

impl Deadlines {
    fn earliest(&self) -> Instant {
        let mut t = self.next_ping.min(self.last_heard + self.idle_after);
        for d in [self.close_at, self.expiry].into_iter().flatten() {
            t = t.min(d);
        }
        t
    }
}

/// Spreads closes over the drain window so browsers don't all reconnect in the same instant.
pub fn spread(conn_id: u64, drain: Duration) -> Duration {
    let fraction = (conn_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
    drain.mul_f64(fraction)
}

/// The monotonic instant at which unix time `t` (seconds) is reached.
fn instant_of_unix(t: i64) -> Instant {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let wait_ms = (t.saturating_mul(1000) - now_ms).clamp(0, 86400 * 365 * 1000);
    Instant::now() + Duration::from_millis(wait_ms as u64)
}
