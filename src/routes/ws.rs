//! `GET /ws?topic=T`: the WebSocket view of a topic's stream, wire-compatible with the Go worker.
//!
//! One task per socket drives everything (reading, delivering, pinging, deadlines) with one
//! `select!`, so a socket costs one small future and no locks are shared between sockets.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use warp::reply::Response;
use warp::Filter;

use super::{client_addr, query_pairs, query_raw, with_state, ApiError};
use crate::hub::{Delivery, Subscription};
use crate::registry::{TopicMeta, STATUS_TOPIC};
use crate::server::PeerAddr;
use crate::status::Status;
use crate::token::{self, TokenError};
use crate::AppState;

type Socket = WebSocketStream<TokioIo<Upgraded>>;

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
        .map(
            |method, query: String, headers, peer: PeerAddr, upgrade, state| {
                handshake(method, &query, &headers, peer, upgrade, state)
                    .unwrap_or_else(ApiError::into_response)
            },
        )
}

/// Checks the request before the upgrade: 405, 400 (no topic), 404 (unknown topic), 426.
fn handshake(
    method: Method,
    query: &str,
    headers: &HeaderMap,
    peer: PeerAddr,
    upgrade: Option<OnUpgrade>,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    if method != Method::GET {
        return Err(ApiError::MethodNotAllowed("GET"));
    }
    let topic = query_pairs(query)?
        .into_iter()
        .find(|(k, v)| k == "topic" && !v.is_empty())
        .map(|(_, v)| v)
        .ok_or_else(|| ApiError::BadRequest("missing topic".into()))?;
    let meta = state
        .registry
        .lookup(&topic)
        .ok_or(ApiError::NotFound("topic not registered"))?;
    let key = websocket_key(headers).ok_or(ApiError::UpgradeRequired)?;
    let upgrade = upgrade.ok_or(ApiError::UpgradeRequired)?;
    let client = client_addr(headers, peer.0);

    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(socket_config()),
                )
                .await;
                Session::new(ws, state, topic, meta, client).run().await;
            }
            Err(e) => tracing::debug!(client = %client, "websocket upgrade failed: {e}"),
        }
    });

    let mut res = Response::default();
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
        .map_err(|_| ApiError::UpgradeRequired)?;
    h.insert(http::header::SEC_WEBSOCKET_ACCEPT, accept);
    Ok(res)
}

/// The `Sec-WebSocket-Key` of a well-formed upgrade request.
fn websocket_key(headers: &HeaderMap) -> Option<String> {
    let has = |name: &str, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|p| p.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
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
        .read_buffer_size(4 * 1024)
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
    Refused { code: &'static str, message: String },
    AuthTimeout,
    Idle,
    TooBig,
    WriteStalled,
    Expired,
    Shutdown,
}

impl End {
    fn refused(code: &'static str, message: impl Into<String>) -> End {
        End::Refused {
            code,
            message: message.into(),
        }
    }

    fn from_ws(e: WsError) -> End {
        match e {
            WsError::Capacity(_) => End::TooBig,
            WsError::ConnectionClosed | WsError::AlreadyClosed => End::PeerClosed,
            _ => End::PeerGone,
        }
    }

    /// The `{"type":"error"}` frame sent before closing, if any.
    fn error_frame(&self) -> Option<String> {
        let (code, message) = match self {
            End::Refused { code, message } => (*code, message.as_str()),
            End::Expired => ("auth_expired", "token expired"),
            _ => return None,
        };
        Some(serde_json::json!({ "type": "error", "code": code, "message": message }).to_string())
    }

    fn close_frame(&self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            End::PeerClosed | End::PeerGone | End::WriteStalled => return None,
            End::Refused { .. } | End::Expired => (CloseCode::Policy, "unauthorized"),
            End::AuthTimeout => (CloseCode::Policy, "auth timeout"),
            End::Idle => (CloseCode::Normal, "idle timeout"),
            End::TooBig => (CloseCode::Size, "frame too large"),
            End::Shutdown => (CloseCode::Away, "server shutting down"),
        };
        Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        })
    }

    fn describe(&self) -> &'static str {
        match self {
            End::PeerClosed => "closed by client",
            End::PeerGone => "connection lost",
            End::Refused { code, .. } => code,
            End::AuthTimeout => "auth timeout",
            End::Idle => "idle timeout",
            End::TooBig => "frame too large",
            End::WriteStalled => "client not reading",
            End::Expired => "token expired",
            End::Shutdown => "shutdown",
        }
    }
}

/// An inbound text frame; unknown fields are ignored.
#[derive(Deserialize)]
struct Inbound {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    token: Option<String>,
}

/// What authentication established.
struct Auth {
    user_id: i64,
    /// Unix seconds; `None` on open topics.
    expires: Option<i64>,
}

struct Session {
    ws: Socket,
    state: Arc<AppState>,
    topic: String,
    meta: TopicMeta,
    client: String,
    conn_id: u64,
    /// Whether the next frame must be flushed before more are fed.
    last_status: Option<Instant>,
}

impl Session {
    fn new(
        ws: Socket,
        state: Arc<AppState>,
        topic: String,
        meta: TopicMeta,
        client: String,
    ) -> Self {
        Session {
            conn_id: state.next_conn_id(),
            ws,
            state,
            topic,
            meta,
            client,
            last_status: None,
        }
    }

    async fn run(mut self) {
        let _tracked = self.state.sockets.track();
        let started = Instant::now();
        let end = match self.authenticate().await {
            Ok(auth) => self.serve(auth).await,
            Err(end) => end,
        };
        self.finish(&end).await;
        tracing::info!(
            topic = ?self.topic,
            client = %self.client,
            reason = end.describe(),
            seconds = started.elapsed().as_secs(),
            "ws disconnected"
        );
    }

    /// Waits for the auth frame (within `auth_timeout`) and checks it.
    async fn authenticate(&mut self) -> Result<Auth, End> {
        let deadline = Instant::now() + self.state.config.auth_timeout;
        let mut shutdown = self.state.shutdown.clone();
        loop {
            let next = tokio::select! {
                _ = shutdown.wait() => return Err(End::Shutdown),
                next = timeout_at(deadline, self.ws.next()) => next,
            };
            match next {
                Err(_) => return Err(End::AuthTimeout),
                Ok(None) => return Err(End::PeerGone),
                Ok(Some(Err(e))) => return Err(End::from_ws(e)),
                Ok(Some(Ok(Message::Text(text)))) => return self.check_auth(&text),
                Ok(Some(Ok(Message::Binary(_)))) => {
                    return Err(End::refused("auth_required", "expected an auth frame"))
                }
                Ok(Some(Ok(Message::Close(_)))) => return Err(End::PeerClosed),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    fn check_auth(&self, text: &str) -> Result<Auth, End> {
        let token = match serde_json::from_str::<Inbound>(text) {
            Ok(f) if f.kind == "auth" => f.token.unwrap_or_default(),
            _ => {
                return Err(End::refused(
                    "auth_required",
                    "expected {\"type\":\"auth\",\"token\":...}",
                ))
            }
        };
        if token.is_empty() {
            return Err(End::refused("auth_required", "empty token"));
        }
        self.verify(&token)
    }

    /// Checks a token for this socket's topic. Open topics take any non-empty token and count
    /// the socket as anonymous.
    fn verify(&self, token: &str) -> Result<Auth, End> {
        if !self.meta.require_token {
            return Ok(Auth {
                user_id: 0,
                expires: None,
            });
        }
        let secret = self.state.config.worker_secret.expose();
        match token::verify(secret, token, &self.topic, unix_now()) {
            Ok(claims) => Ok(Auth {
                user_id: claims.user_id,
                expires: Some(claims.expires),
            }),
            Err(e) => {
                tracing::info!(topic = ?self.topic, client = %self.client, reason = e.reason(), "ws auth refused");
                Err(End::refused("unauthorized", e.reason()))
            }
        }
    }

    /// The authenticated life of the socket. The subscription exists before `auth_ok` is sent,
    /// so any publish made after the client saw `auth_ok` reaches it.
    async fn serve(&mut self, mut auth: Auth) -> End {
        let mut sub = self.state.hub.subscribe(&self.topic);
        let _member = self.state.presence.join(auth.user_id);
        if let Err(end) = self.send(Message::text(r#"{"type":"auth_ok"}"#)).await {
            return end;
        }
        tracing::info!(topic = ?self.topic, client = %self.client, user = auth.user_id, "ws connected");

        let cfg = &self.state.config;
        let (ping_every, idle_after, drain) =
            (cfg.ping_interval, cfg.idle_timeout, cfg.shutdown_drain);
        let enforce_expiry = cfg.enforce_token_expiry;
        let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
        let mut last_heard = Instant::now();
        let mut shutdown = self.state.shutdown.clone();
        let mut close_at: Option<Instant> = None;
        let far = Instant::now() + Duration::from_secs(86400 * 365);

        loop {
            let expiry_at = match auth.expires {
                Some(exp) if enforce_expiry => instant_of_unix(exp),
                _ => far,
            };
            tokio::select! {
                _ = shutdown.wait(), if close_at.is_none() => {
                    close_at = Some(Instant::now() + spread(self.conn_id, drain));
                }
                _ = sleep_until(close_at.unwrap_or(far)), if close_at.is_some() => return End::Shutdown,
                delivery = sub.recv() => {
                    if let Err(end) = self.deliver(delivery, &mut sub).await {
                        return end;
                    }
                }
                next = self.ws.next() => {
                    last_heard = Instant::now();
                    match next {
                        None => return End::PeerGone,
                        Some(Err(e)) => return End::from_ws(e),
                        Some(Ok(Message::Close(_))) => return End::PeerClosed,
                        Some(Ok(Message::Text(text))) => {
                            if let Err(end) = self.on_text(&text, &mut auth).await {
                                return end;
                            }
                        }
                        Some(Ok(_)) => {}
                    }
                }
                _ = ping.tick() => {
                    if let Err(end) = self.send(Message::Ping(Bytes::new())).await {
                        return end;
                    }
                }
                _ = sleep_until(last_heard + idle_after) => return End::Idle,
                _ = sleep_until(expiry_at), if enforce_expiry && auth.expires.is_some() => return End::Expired,
            }
        }
    }

    /// Handles a text frame after auth: status requests on the status topic, and token refresh.
    async fn on_text(&mut self, text: &str, auth: &mut Auth) -> Result<(), End> {
        let Ok(frame) = serde_json::from_str::<Inbound>(text) else {
            return Ok(());
        };
        match frame.kind.as_str() {
            "status" if self.topic == STATUS_TOPIC => {
                let now = Instant::now();
                if self.last_status.is_some_and(|t| now < t + STATUS_THROTTLE) {
                    return Ok(());
                }
                self.last_status = Some(now);
                let status = Status::collect(&self.state, false);
                let frame = serde_json::json!({ "type": "status", "payload": status }).to_string();
                self.send(Message::text(frame)).await
            }
            "auth" => {
                let token = frame.token.unwrap_or_default();
                if token.is_empty() {
                    return Err(End::refused("unauthorized", TokenError::Malformed.reason()));
                }
                *auth = self.verify(&token)?;
                self.send(Message::text(r#"{"type":"auth_ok"}"#)).await
            }
            _ => Ok(()),
        }
    }

    /// Writes one delivery and whatever else is already queued, then flushes once.
    async fn deliver(&mut self, first: Delivery, sub: &mut Subscription) -> Result<(), End> {
        let topic = sub.topic().clone();
        let to_message = |d: Delivery| match d {
            Delivery::Event(frame) => Message::Text(frame.text.clone()),
            Delivery::Resync => {
                Message::text(serde_json::json!({ "type": "resync", "topic": &*topic }).to_string())
            }
        };
        let stall = self.state.config.idle_timeout;
        let ws = &mut self.ws;
        let write = async {
            ws.feed(to_message(first)).await?;
            for _ in 1..BATCH {
                match sub.try_recv() {
                    Some(d) => ws.feed(to_message(d)).await?,
                    None => break,
                }
            }
            ws.flush().await
        };
        match timeout(stall, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(End::from_ws(e)),
            Err(_) => Err(End::WriteStalled),
        }
    }

    /// Sends one frame; a client that doesn't take it within `idle_timeout` is dropped.
    async fn send(&mut self, msg: Message) -> Result<(), End> {
        match timeout(self.state.config.idle_timeout, self.ws.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(End::from_ws(e)),
            Err(_) => Err(End::WriteStalled),
        }
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

/// Spreads closes over the drain window so browsers don't all reconnect in the same instant.
fn spread(conn_id: u64, drain: Duration) -> Duration {
    let fraction = (conn_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
    drain.mul_f64(fraction)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The monotonic instant at which unix time `t` (seconds) is reached.
fn instant_of_unix(t: i64) -> Instant {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let wait_ms = (t * 1000 - now_ms).clamp(0, 86400 * 365 * 1000);
    Instant::now() + Duration::from_millis(wait_ms as u64)
}
