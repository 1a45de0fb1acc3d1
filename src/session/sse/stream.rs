//! One SSE client: its subscriptions, timers and the chunks of its own. Publishers write its
//! events to the socket themselves through its [`Outlet`] (SSE chunks serialized once per
//! publish); on a connection hyper serves, the events come out of this `Stream` instead.

use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Future, Stream};
use tokio::net::TcpStream;
use tokio::time::{Instant, Interval, Sleep};
use tokio_stream::wrappers::WatchStream;

use crate::admission::{Admitted, Permit};
use crate::hub::{Item, Outlet, Subscription, Wire};
use crate::metrics::{ConnectionGauge, Transport};
use crate::presence::Member;
use crate::protocol::{self, Outbound};
use crate::time::spread;
use crate::transport::Tracked;
use crate::AppState;

/// One SSE client: its subscriptions, and what it writes of its own.
pub struct EventStream {
    outlet: Arc<Outlet>,
    _subs: Vec<Subscription>,
    topics: Vec<Arc<str>>,
    /// When the earliest token expires, with `enforce_token_expiry`.
    expiry: Option<Pin<Box<Sleep>>>,
    /// The expiry was announced: the stream ends.
    expired: bool,
    keepalive: Interval,
    shutdown: WatchStream<bool>,
    close_at: Option<Pin<Box<Sleep>>>,
    drain_delay: std::time::Duration,
    client: IpAddr,
    started: Instant,
    _member: Member,
    _tracked: Tracked,
    _gauge: ConnectionGauge,
    _permit: Permit,
}

impl EventStream {
    /// Subscribes the admitted topics. With `direct` (the socket, on our own HTTP/1 path)
    /// publishers write chunks of a chunked body to it; without, hyper takes everything from
    /// `poll_next`.
    pub fn open(
        state: &Arc<AppState>,
        admitted: Admitted,
        direct: Option<Arc<TcpStream>>,
    ) -> EventStream {
        let cfg = &state.config;
        let n = admitted.grants.len();
        let wire = match direct {
            Some(_) => Wire::SseChunked,
            None => Wire::SseBody,
        };
        let outlet = Outlet::new(wire, direct, cfg.subscriber_queue);
        let expiry = crate::session::expiry_deadline(
            state,
            admitted.grants.iter().filter_map(|g| g.expires),
        );
        let mut stream = EventStream {
            outlet: outlet.clone(),
            _subs: Vec::with_capacity(n),
            topics: Vec::with_capacity(n),
            expiry: expiry.map(|at| Box::pin(tokio::time::sleep_until(at))),
            expired: false,
            keepalive: tokio::time::interval_at(
                Instant::now() + cfg.sse_keepalive,
                cfg.sse_keepalive,
            ),
            // Changes only: a stream that yields the current value first (`false`) would have
            // nothing registered for the change until something else woke the stream.
            shutdown: WatchStream::from_changes(state.shutdown.receiver()),
            close_at: None,
            drain_delay: spread(state.next_conn_id(), cfg.shutdown_drain),
            client: admitted.client,
            started: Instant::now(),
            _member: state.presence.join(admitted.user_id),
            _tracked: state.sockets.track(),
            _gauge: state.metrics.open(Transport::Sse),
            _permit: admitted.permit,
        };
        if state.shutdown.is_down() {
            stream.close_at = Some(Box::pin(tokio::time::sleep(stream.drain_delay)));
        }
        // Held while subscribing: events published meanwhile go out after the replay.
        outlet.hold();
        let mut cursor = Vec::with_capacity(n);
        let mut replays = Vec::with_capacity(n);
        for (i, granted) in admitted.grants.iter().enumerate() {
            let subscribed =
                state
                    .hub
                    .subscribe(&granted.topic, granted.resume.as_deref(), &outlet, i);
            stream.topics.push(subscribed.subscription.topic().clone());
            stream._subs.push(subscribed.subscription);
            cursor.push(subscribed.position);
            replays.push(subscribed.replay);
        }
        // First the reconnect delay and the starting cursor, as a `position` event (page code
        // can read it; `onmessage` handlers don't see it): a client that drops before any
        // event still resumes from here and misses nothing.
        let joined = cursor.join(",");
        let head = protocol::sse_position(cfg.sse_retry.as_millis(), &joined);
        let mut preface = vec![Item::Own(outlet.frame(&head))];
        for (i, replay) in replays.into_iter().enumerate() {
            preface.extend(replay.into_items(i, &stream.topics[i]));
        }
        if n > 1 {
            outlet.set_cursor(cursor);
        }
        outlet.release(preface);
        tracing::info!(topics = ?stream.topics, client = %stream.client, "sse connected");
        stream
    }

    pub fn outlet(&self) -> &Arc<Outlet> {
        &self.outlet
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
        // Hyper writes this stream: the events come out of it too.
        if this.outlet.wire() == Wire::SseBody {
            if let Poll::Ready(chunk) = this.outlet.poll_take(cx) {
                return Poll::Ready(Some(Ok(chunk)));
            }
        }
        if this.expired {
            return Poll::Ready(None);
        }
        if let Some(expiry) = this.expiry.as_mut() {
            if expiry.as_mut().poll(cx).is_ready() {
                // Says why, then ends: the reconnect with the same token is refused (401).
                this.expired = true;
                let frame = Outbound::Error {
                    code: "auth_expired",
                    topic: None,
                    message: "token expired",
                };
                return Poll::Ready(Some(Ok(frame.to_sse())));
            }
        }
        if this.keepalive.poll_tick(cx).is_ready() {
            return Poll::Ready(Some(Ok(Bytes::from_static(protocol::SSE_KEEPALIVE))));
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
