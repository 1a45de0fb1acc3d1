//! One WebSocket's life after the `101`: authentication, then delivery.
//!
//! Publishers write events to the socket themselves, through the socket's
//! [`Outlet`]; the session's one task reads, pings, keeps deadlines, and writes only what
//! waits in the outlet when the socket was full. Its own frames go through the same outlet.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{sleep_until, timeout, timeout_at, Instant, Sleep};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::end::End;
use crate::admission::{self, Admitted, Denied, Granted, Pending};
use crate::hub::{Item, Link, Outlet, Subscription};
use crate::metrics::Transport;
use crate::protocol::{Inbound, Outbound};
use crate::registry::STATUS_TOPIC;
use crate::status::Status;
use crate::token::TokenError;
use crate::AppState;

/// Minimum spacing of answered status requests on the status topic, per socket.
const STATUS_THROTTLE: Duration = Duration::from_millis(700);
/// Refused subscriptions that look like guessing (bad tokens, unregistered topics, throttled)
/// after which the socket is closed.
const MAX_SOCKET_FAILURES: u8 = 5;

pub struct Session<S> {
    ws: WebSocketStream<Link<S>>,
    /// The outlet under `ws`, kept apart so the session can wait on it while `ws` reads.
    outlet: Arc<Outlet>,
    state: Arc<AppState>,
    /// The topic of the URL, authenticated by the first frame.
    topic: String,
    client: IpAddr,
    conn_id: u64,
    last_status: Option<Instant>,
    topics: Topics,
    budget: FrameBudget,
    failures: u8,
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// The socket's whole life; `pending` holds its slot until the first frame is checked.
    pub async fn run(ws: WebSocketStream<Link<S>>, state: Arc<AppState>, pending: Pending) {
        let mut session = Session {
            outlet: ws.get_ref().outlet().clone(),
            conn_id: state.next_conn_id(),
            topic: pending.topic().to_string(),
            client: pending.client,
            ws,
            last_status: None,
            topics: Topics::default(),
            budget: FrameBudget::new(
                state.config.inbound_frame_burst,
                state.config.inbound_frames_per_second,
            ),
            failures: 0,
            state,
        };
        let _tracked = session.state.sockets.track();
        let _gauge = session.state.metrics.open(Transport::WebSocket);
        let started = Instant::now();
        // The once-per-socket and rare steps are boxed: a task is allocated for its largest
        // state, and these would make every idle socket pay for them.
        let end = match Box::pin(session.authenticate(pending)).await {
            Ok(admitted) => session.serve(admitted).await,
            Err(end) => end,
        };
        Box::pin(session.finish(&end)).await;
        session.state.metrics.ws_disconnects.inc(end.metric_label());
        tracing::info!(
            topic = ?session.topic,
            client = %session.client,
            reason = end.describe(),
            seconds = started.elapsed().as_secs(),
            "ws disconnected"
        );
    }

    /// Waits for the auth frame (within `auth_timeout`) and has admission check it.
    async fn authenticate(&mut self, pending: Pending) -> Result<Admitted, End> {
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
                    pending.unauthenticated(&self.state);
                    return Err(auth_required);
                }
                Ok(Some(Ok(Message::Close(_)))) => return Err(End::PeerClosed),
                Ok(Some(Ok(_))) => continue,
            };
            let Some(Inbound::Auth {
                token,
                last_event_id,
                ..
            }) = Inbound::parse(&text)
            else {
                pending.unauthenticated(&self.state);
                return Err(auth_required);
            };
            return pending
                .authenticate(&self.state, token, last_event_id)
                .map_err(End::denied);
        }
    }

    /// The authenticated life of the socket. Subscriptions exist before `auth_ok` is sent, so
    /// any publish made after the client saw `auth_ok` reaches it.
    async fn serve(&mut self, admitted: Admitted) -> End {
        let _member = self.state.presence.join(admitted.user_id);
        let _permit = admitted.permit;
        let Some(first) = admitted.grants.into_iter().next() else {
            return End::denied(Denied::TokenMissing);
        };
        self.add_subscription(first, |topic, position| Outbound::AuthOk {
            topic,
            last_event_id: Some(position),
        });
        if let Err(end) = self.flush().await {
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

        let others = self.outlet.others_waker();
        loop {
            let watch_shutdown = clock.close_at.is_none();
            let turn = std::future::poll_fn(|cx| {
                self.poll_turn(
                    cx,
                    &others,
                    timer.as_mut(),
                    shutdown_started.as_mut(),
                    watch_shutdown,
                )
            })
            .await;
            match turn {
                Turn::Broken(e) => return End::from_ws(e.into()),
                Turn::Shutdown => {
                    let offset = crate::time::spread(self.conn_id, drain);
                    clock.close_at = Some(Instant::now() + offset);
                    timer.as_mut().reset(clock.earliest());
                }
                Turn::Frame(next) => {
                    clock.last_heard = Instant::now();
                    if matches!(next, Some(Ok(Message::Text(_) | Message::Binary(_))))
                        && !self.budget.take(clock.last_heard)
                    {
                        return End::Flooding;
                    }
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
                Turn::Timer => {
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

    /// One turn of the socket's life. The backlog first: nearly every wake-up of a busy socket
    /// is a publish that found it full, and then nothing else is polled. Shutdown, reads and
    /// the timer (in that order) are polled when one of them woke the task: they are polled with
    /// the outlet's other waker, which tells their wake-ups apart.
    fn poll_turn(
        &mut self,
        cx: &mut Context<'_>,
        others: &Waker,
        timer: Pin<&mut Sleep>,
        shutdown: Pin<&mut impl Future<Output = ()>>,
        watch_shutdown: bool,
    ) -> Poll<Turn> {
        if let Poll::Ready(e) = self.ws.get_mut().poll_backlog(cx) {
            return Poll::Ready(Turn::Broken(e));
        }
        let ws = &mut self.ws;
        self.outlet.poll_others(cx, others, |cx| {
            if watch_shutdown && shutdown.poll(cx).is_ready() {
                Poll::Ready(Turn::Shutdown)
            } else if let Poll::Ready(next) = ws.poll_next_unpin(cx) {
                Poll::Ready(Turn::Frame(next))
            } else if timer.poll(cx).is_ready() {
                Poll::Ready(Turn::Timer)
            } else {
                Poll::Pending
            }
        })
    }

    fn expiry_deadline(&self) -> Option<Instant> {
        crate::session::expiry_deadline(&self.state, self.topics.expiries())
    }

    /// Subscribes under the hub's topic lock, with the outlet held meanwhile, so the
    /// acknowledgement (`ack`, with the position) and the replay go out before any live event.
    fn add_subscription(
        &mut self,
        granted: Granted,
        ack: impl for<'b> FnOnce(&'b str, &'b str) -> Outbound<'b>,
    ) {
        self.outlet.hold();
        let subscribed =
            self.state
                .hub
                .subscribe(&granted.topic, granted.resume.as_deref(), &self.outlet, 0);
        let key = subscribed.subscription.topic();
        let ack = ack(&granted.topic, &subscribed.position).to_text();
        let preface = std::iter::once(Item::Own(self.outlet.frame(ack.as_bytes())))
            .chain(subscribed.replay.into_items(0, key))
            .collect();
        self.outlet.release(preface);
        self.topics.add(subscribed.subscription, granted.expires);
    }

    /// Handles a text frame after auth: subscribe/unsubscribe, token refresh, status requests.
    async fn on_text(&mut self, text: &str) -> Result<(), End> {
        match Inbound::parse(text) {
            Some(Inbound::Status) if self.topic == STATUS_TOPIC => self.answer_status().await,
            Some(Inbound::Auth { token, topic, .. }) => self.refresh(topic, token).await,
            Some(Inbound::Subscribe {
                topic,
                token,
                last_event_id,
            }) => self.subscribe(topic, token, last_event_id).await,
            Some(Inbound::Unsubscribe { topic }) => {
                self.topics.remove(&topic);
                let frame = Outbound::Unsubscribed { topic: &topic };
                self.send(Message::text(frame.to_text())).await
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
        let frame = Outbound::Status { payload: &status }.to_text();
        self.send(Message::text(frame)).await
    }

    /// A fresh token on the open socket: answered with `auth_ok`; a bad one, or one for a topic
    /// this socket doesn't hold, closes the socket.
    async fn refresh(&mut self, topic: Option<String>, token: String) -> Result<(), End> {
        let topic = topic.unwrap_or_else(|| self.topic.clone());
        if !self.topics.holds(&topic) {
            return Err(End::denied(Denied::Unauthorized(TokenError::WrongTopic)));
        }
        let grant = admission::regrant(&self.state, self.client, &topic, &token)
            .await
            .map_err(|denied| End::Refused {
                code: "unauthorized",
                message: denied.message(),
            })?;
        if let (Some(expires), Some(held)) = (grant.expires, self.topics.get_mut(&topic)) {
            held.expires = Some(expires);
        }
        let ok = Outbound::AuthOk {
            topic: &topic,
            last_event_id: None,
        };
        self.send(Message::text(ok.to_text())).await
    }

    /// `{"type":"subscribe","topic":T,"token":K[,"last_event_id":I]}`: adds a topic, or
    /// answers an error frame naming it (the socket stays open).
    async fn subscribe(
        &mut self,
        topic: String,
        token: String,
        resume: Option<String>,
    ) -> Result<(), End> {
        let topics = &self.topics;
        let admitted = admission::admit_more(
            &self.state,
            self.client,
            topics.len(),
            |t| topics.holds(t),
            &topic,
            &token,
        )
        .await;
        let mut granted = match admitted {
            Ok(granted) => granted,
            Err(refusal) => {
                let error = Outbound::Error {
                    code: refusal.code(),
                    topic: Some(&topic),
                    message: refusal.message(),
                };
                self.send(Message::text(error.to_text())).await?;
                if refusal.is_failure() {
                    self.failures += 1;
                    if self.failures >= MAX_SOCKET_FAILURES {
                        return Err(End::TooManyFailures);
                    }
                }
                return Ok(());
            }
        };
        granted.resume = resume;
        self.add_subscription(granted, |topic, position| Outbound::Subscribed {
            topic,
            last_event_id: position,
        });
        self.flush().await
    }

    /// Queues a frame. (A client that takes nothing for `idle_timeout` fails the write: the
    /// connection's writer carries that deadline.)
    async fn feed(&mut self, msg: Message) -> Result<(), End> {
        self.ws.feed(msg).await.map_err(End::from_ws)
    }

    async fn flush(&mut self) -> Result<(), End> {
        self.ws.flush().await.map_err(End::from_ws)
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

/// The socket's subscriptions. A page holds one topic or a handful
/// (`max_topics_per_connection`): one short list, not two hash maps with a table each.
#[derive(Default)]
struct Topics(Vec<Held>);

struct Held {
    subscription: Subscription,
    /// Token expiry (unix seconds), for `enforce_token_expiry`.
    expires: Option<i64>,
}

impl Topics {
    /// Adds a topic the socket doesn't hold (admission refuses one it holds).
    fn add(&mut self, subscription: Subscription, expires: Option<i64>) {
        // Room for the one topic nearly every socket holds, not the four a `Vec` starts with.
        self.0.reserve_exact(1);
        self.0.push(Held {
            subscription,
            expires,
        });
    }

    fn get_mut(&mut self, topic: &str) -> Option<&mut Held> {
        self.0
            .iter_mut()
            .find(|held| **held.subscription.topic() == *topic)
    }

    fn holds(&self, topic: &str) -> bool {
        self.0
            .iter()
            .any(|held| **held.subscription.topic() == *topic)
    }

    /// Unsubscribes (dropping the subscription leaves the topic).
    fn remove(&mut self, topic: &str) {
        self.0.retain(|held| **held.subscription.topic() != *topic);
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn expiries(&self) -> impl Iterator<Item = i64> + '_ {
        self.0.iter().filter_map(|held| held.expires)
    }
}

/// A token bucket for inbound data frames: `burst` at once, then `per_second`. (Pings are
/// not counted: tungstenite keeps only the latest pong to send, so a ping flood costs little
/// and reaches neither the hub nor Redis.)
struct FrameBudget {
    allowance: f32,
    burst: f32,
    per_second: f32,
    updated: Instant,
}

impl FrameBudget {
    fn new(burst: u32, per_second: u32) -> Self {
        FrameBudget {
            allowance: burst as f32,
            burst: burst as f32,
            per_second: per_second as f32,
            updated: Instant::now(),
        }
    }

    /// Takes one frame's worth; `false` when the socket has spent its budget.
    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f32();
        self.allowance = (self.allowance + elapsed * self.per_second).min(self.burst);
        self.updated = now;
        if self.allowance < 1.0 {
            return false;
        }
        self.allowance -= 1.0;
        true
    }
}

/// What woke the session, besides publishes.
enum Turn {
    /// Writing the backlog failed: the socket is gone.
    Broken(std::io::Error),
    Shutdown,
    Frame(Option<Result<Message, WsError>>),
    Timer,
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
