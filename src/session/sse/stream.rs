//! One SSE client as a `Stream` of chunks: a push costs two shared `Bytes` chunks (`id:` line
//! and `data:` lines, both serialized once per publish).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Future, Stream};
use tokio::time::{Instant, Interval, Sleep};
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamMap;

use crate::admission::{Admitted, Permit};
use crate::hub::{Delivery, Replay, Subscription};
use crate::metrics::{ConnectionGauge, Metrics, Transport};
use crate::presence::Member;
use crate::protocol::{self, Outbound};
use crate::time::spread;
use crate::transport::Tracked;
use crate::AppState;

/// One SSE client: its subscriptions, and the chunks waiting to be written.
pub struct EventStream {
    subs: StreamMap<usize, Subscription>,
    /// Last id per topic (URL order); the `id:` line of a multi-topic stream joins them.
    cursor: Vec<String>,
    topics: Vec<Arc<str>>,
    queue: VecDeque<Bytes>,
    /// When the earliest token expires, with `enforce_token_expiry`.
    expiry: Option<Pin<Box<Sleep>>>,
    /// The expiry was announced: the stream ends once its queue is written.
    expired: bool,
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
    pub fn open(state: &Arc<AppState>, admitted: Admitted) -> EventStream {
        let cfg = &state.config;
        let n = admitted.grants.len();
        let expiry = crate::session::expiry_deadline(
            state,
            admitted.grants.iter().filter_map(|g| g.expires),
        );
        let mut stream = EventStream {
            subs: StreamMap::with_capacity(n),
            cursor: Vec::with_capacity(n),
            topics: Vec::with_capacity(n),
            expiry: expiry.map(|at| Box::pin(tokio::time::sleep_until(at))),
            queue: VecDeque::new(),
            expired: false,
            keepalive: tokio::time::interval_at(
                Instant::now() + cfg.sse_keepalive,
                cfg.sse_keepalive,
            ),
            shutdown: WatchStream::new(state.shutdown.receiver()),
            close_at: None,
            drain_delay: spread(state.next_conn_id(), cfg.shutdown_drain),
            client: admitted.client,
            started: Instant::now(),
            metrics: state.metrics.clone(),
            _member: state.presence.join(admitted.user_id),
            _tracked: state.sockets.track(),
            _gauge: state.metrics.open(Transport::Sse),
            _permit: admitted.permit,
        };
        let mut replays = Vec::new();
        for (i, granted) in admitted.grants.iter().enumerate() {
            let subscribed = state
                .hub
                .subscribe(&granted.topic, granted.resume.as_deref());
            stream.topics.push(subscribed.subscription.topic().clone());
            stream.cursor.push(subscribed.position);
            stream.subs.insert(i, subscribed.subscription);
            replays.push(subscribed.replay);
        }
        // First the reconnect delay and the starting cursor, as a `position` event (page code
        // can read it; `onmessage` handlers don't see it): a client that drops before any
        // event still resumes from here and misses nothing.
        let cursor = stream.cursor.join(",");
        let head = protocol::sse_position(cfg.sse_retry.as_millis(), &cursor);
        stream.queue.push_back(head);
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
        let topic = &self.topics[i];
        self.queue.push_back(Outbound::Resync { topic }.to_sse());
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
