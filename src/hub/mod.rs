//! The hub: per-topic event ids, history, and fan-out to the subscribers' outlets.
//!
//! A publish serializes its frames once (a WebSocket frame and an SSE chunk); every subscriber
//! gets the same bytes. Each topic has its own small lock under which the event id is assigned,
//! the event is kept in the topic's history and handed to every subscriber's [`Outlet`], so
//! every subscriber sees a topic's events in one order, the order the hub accepted them, and a
//! subscription taken under the same lock sees no gap and no duplicate between replayed history
//! and live events. The global map lock is held only to find or create a topic, never while
//! sending. An outlet never waits: it writes to its socket at once, or queues, so a slow
//! subscriber slows nobody: its backlog grows to `subscriber_queue`, then it is told to resync.
//!
//! Event ids are `<epoch>-<seq>`: the epoch names this worker run (a restart changes it), the
//! sequence is one counter for all topics, so ids are unique and increase within every topic,
//! and a single number ("everything up to seq N") is a position in every topic at once.

mod flush;
mod outlet;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

pub use outlet::{Item, Link, Offer, Offered, Outlet, Wire};

use crate::metrics::Metrics;
use crate::protocol;
use crate::sync::lock;

/// A pushed event as it goes out, serialized once per publish for every wire.
#[derive(Debug)]
pub struct FrameInner {
    pub seq: u64,
    pub published: Instant,
    pub topic: Arc<str>,
    /// The WebSocket frame around `{"type":"push","topic":...,"id":...,"payload":...}`.
    pub ws: Bytes,
    /// Where the text starts in `ws` (after the frame header).
    ws_head: usize,
    /// The SSE event (`id:` line, `data:` lines, blank line) as one HTTP/1.1 chunk.
    pub sse_chunk: Bytes,
    /// Where the event starts in `sse_chunk` (after the chunk's size line).
    sse_head: usize,
    /// Length of the `id: <id>\n` line.
    sse_id_len: usize,
}

impl FrameInner {
    /// Bytes held in memory for this frame, for the history budget.
    fn cost(&self) -> usize {
        self.ws.len() + self.sse_chunk.len() + 96
    }

    /// The push frame's JSON text.
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.ws[self.ws_head..]).unwrap_or_default()
    }

    /// The event's id.
    pub fn id(&self) -> &str {
        let line = &self.sse_chunk[self.sse_head + 4..self.sse_head + self.sse_id_len - 1];
        std::str::from_utf8(line).unwrap_or_default()
    }

    /// The SSE event without chunk framing.
    pub fn sse_event(&self) -> Bytes {
        self.sse_chunk
            .slice(self.sse_head..self.sse_chunk.len() - 2)
    }

    /// The SSE event's `data:` lines and closing blank line.
    pub fn sse_data(&self) -> Bytes {
        self.sse_chunk
            .slice(self.sse_head + self.sse_id_len..self.sse_chunk.len() - 2)
    }
}

pub type Frame = Arc<FrameInner>;

/// Whether an event's id is a resume point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdKind {
    Resumable,
    /// Issued while cut off from the cluster: resuming from it gives `resync` everywhere.
    Isolated,
}

/// History settings (`history_size`, `history_ttl`, `max_history_bytes`).
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    pub size: usize,
    pub ttl: Duration,
    pub max_bytes: usize,
}

/// What a new subscription starts with.
#[derive(Debug)]
pub enum Replay {
    /// Events after the client's id, oldest first (empty when nothing was missed or no id was
    /// given); live events follow without gap or duplicate.
    Events(Vec<Frame>),
    /// The client's id cannot be resumed from (other epoch, too old, unknown).
    Resync,
}

impl Replay {
    /// What the subscription with `key` on `topic` writes first.
    pub fn into_items(self, key: usize, topic: &Arc<str>) -> impl Iterator<Item = Item> {
        let (events, resync) = match self {
            Replay::Events(frames) => (frames, None),
            Replay::Resync => (Vec::new(), Some(Item::Resync(topic.clone()))),
        };
        resync
            .into_iter()
            .chain(events.into_iter().map(move |f| Item::Event(key, f)))
    }
}

pub struct Subscribed {
    pub subscription: Subscription,
    pub replay: Replay,
    /// The subscriber's position: every event of the topic up to this id is either replayed or
    /// was seen by the client before. A client that reconnects with it misses nothing.
    pub position: String,
}

#[derive(Default)]
struct Coalesce {
    window_end: Option<Instant>,
    /// The newest payload published inside the current window (with its seq when assigned
    /// elsewhere).
    pending: Option<(String, Option<u64>, IdKind)>,
    flush_scheduled: bool,
}

struct TopicState {
    /// Every subscriber's outlet, with the key its session knows the topic by.
    subscribers: Slots,
    history: VecDeque<Frame>,
    /// The seq of the last event of this topic that is no longer in history (or the global
    /// seq when this state was created): ids below it cannot be resumed from.
    floor: u64,
    /// When the last subscriber left (or the state was made without one).
    idle_since: Option<Instant>,
    coalesce: Coalesce,
    /// The seq of the newest event accepted on this topic: an event that is not newer is
    /// never delivered after it (subscribers get `resync` instead).
    last_seq: u64,
    /// A `resync` is owed to the subscribers (sent within a short spread, or before the next
    /// event, whichever comes first); meanwhile resuming gives `resync`.
    resync_pending: bool,
    /// Removed from the map by `sweep`: a publish or subscribe that finds it must look again.
    removed: bool,
    /// When a cluster resync was last owed to this topic's subscribers (unix ms).
    resynced_ms: u64,
}

impl TopicState {
    /// No id up to `seq` (nor this topic's last event) is a resume point any more.
    fn forbid_resume_through(&mut self, seq: u64) {
        self.floor = self.floor.max(self.last_seq.max(seq) + 1);
    }
}

struct Topic {
    name: Arc<str>,
    topic_json: String,
    state: Mutex<TopicState>,
}

/// Largest topic whose publishes write to the subscribers' sockets from the publishing thread.
/// A bigger fan-out is queued in every outlet and written by flush tasks ([`flush`]), a chunk
/// of sockets each, so that every core writes: one thread's walk is paced by the kernel's
/// per-send work, and on a machine whose receivers are local it was measured slower than
/// writes spread over the threads (docs/benchmarks.md).
const DIRECT_WALK_MAX: usize = 4096;

/// Deliveries per second above which publishes hand every event to the sessions. Under
/// sustained load a socket often has several events waiting, and its session writes them in
/// one `writev`; one send per event from the publisher was measured to cost twice the CPU
/// there (docs/benchmarks.md). Sparse events gain from the direct send.
const DIRECT_RATE_MAX: u64 = 100_000;

/// The window over which the delivery rate is measured.
const LOAD_WINDOW: Duration = Duration::from_millis(100);

/// Deliveries per second over the last complete window: light load or sustained load.
struct LoadMeter {
    /// (window start, deliveries in it, rate of the last complete window)
    state: Mutex<(Instant, u64, u64)>,
}

impl LoadMeter {
    fn new() -> LoadMeter {
        LoadMeter {
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// The rate of the last complete window (0 once a window passed with nothing).
    fn per_second(&self, now: Instant) -> u64 {
        let (start, _, rate) = *lock(&self.state);
        if now.duration_since(start) > 2 * LOAD_WINDOW {
            return 0;
        }
        rate
    }

    fn add(&self, n: u64, now: Instant) {
        let mut st = lock(&self.state);
        let elapsed = now.duration_since(st.0);
        if elapsed >= LOAD_WINDOW {
            let per_second = st.1 as f64 / elapsed.as_secs_f64();
            *st = (now, n, per_second as u64);
        } else {
            st.1 += n;
        }
    }
}

/// How many subscribers ahead of the one being written a walk prefetches. One: each send in
/// between is kernel work that pushes older lines out of the nearest caches.
const PREFETCH_AHEAD: usize = 1;

/// Ids in cluster mode: the cluster-wide sequence from Redis times this, so that events from
/// nodes that assign no id (the Go worker) can be numbered locally in between (`S.k`).
pub const CLUSTER_SCALE: u64 = 1 << 16;

pub struct Hub {
    metrics: Arc<Metrics>,
    epoch: RwLock<Arc<str>>,
    /// 1 standalone; `CLUSTER_SCALE` in cluster mode.
    scale: u64,
    next_seq: AtomicU64,
    limits: HistoryLimits,
    history_bytes: AtomicUsize,
    topics: Mutex<HashMap<Arc<str>, Arc<Topic>>>,
    /// Cluster mode: cut off from Redis. Events may be published elsewhere meanwhile, so no
    /// resume can be trusted.
    isolated: AtomicBool,
    /// Cluster mode: the highest seq up to which this node has applied every cluster event in
    /// order; ids above it (a local delivery that ran ahead of a gap still being filled) are
    /// no resume points. Unlimited standalone.
    watermark: AtomicU64,
    load: LoadMeter,
}

/// Result of a publish.
#[derive(Debug, Clone)]
pub struct Published {
    /// `None` when the event was held back by coalescing (it goes out at the window's end,
    /// with the newest id then).
    pub id: Option<String>,
    /// Subscribers the event was handed to.
    pub receivers: usize,
}

impl Hub {
    pub fn new(limits: HistoryLimits, metrics: Arc<Metrics>, scale: u64) -> Arc<Self> {
        Arc::new(Hub {
            metrics,
            // A short random name for this run, so ids from an earlier run are recognised as foreign.
            epoch: RwLock::new(Arc::from(crate::token::random_hex(4))),
            scale: scale.max(1),
            next_seq: AtomicU64::new(1),
            limits,
            history_bytes: AtomicUsize::new(0),
            topics: Mutex::new(HashMap::new()),
            isolated: AtomicBool::new(false),
            watermark: AtomicU64::new(u64::MAX),
            load: LoadMeter::new(),
        })
    }

    pub fn epoch(&self) -> Arc<str> {
        self.epoch.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `EPOCH-MAJOR` or `EPOCH-MAJOR.MINOR`, written by hand: every publish and every new
    /// subscription names a position, and `format!` costs several times as much.
    pub fn format_id(&self, seq: u64) -> String {
        let (major, minor) = (seq / self.scale, seq % self.scale);
        let epoch = self.epoch();
        let mut id = String::with_capacity(epoch.len() + 24);
        id.push_str(&epoch);
        id.push('-');
        push_decimal(&mut id, major);
        if minor != 0 {
            id.push('.');
            push_decimal(&mut id, minor);
        }
        id
    }

    /// The seq of an id of the current epoch, `None` for anything else.
    fn parse_id(&self, id: &str) -> Option<u64> {
        let (epoch, seq) = id.trim().rsplit_once('-')?;
        if *epoch != *self.epoch() {
            return None;
        }
        let (major, minor) = match seq.split_once('.') {
            Some((major, minor)) if self.scale > 1 => {
                (major.parse::<u64>().ok()?, minor.parse::<u64>().ok()?)
            }
            Some(_) => return None,
            None => (seq.parse::<u64>().ok()?, 0),
        };
        if minor >= self.scale {
            return None;
        }
        major.checked_mul(self.scale)?.checked_add(minor)
    }

    /// Starts a new epoch (cluster mode: Redis lost its data and named a new one): every id
    /// handed out so far becomes unresumable and history is dropped. Live subscribers are not
    /// told to resync here: the cluster decides whether they may have missed anything.
    pub fn switch_epoch(&self, epoch: &str, seq: u64) {
        *self.epoch.write().unwrap_or_else(|e| e.into_inner()) = Arc::from(epoch);
        self.next_seq.store(seq + 1, Ordering::Release);
        for topic in self.topics_named(None) {
            let mut state = lock(&topic.state);
            while !state.history.is_empty() {
                self.forget_oldest(&mut state);
            }
            state.floor = seq;
            state.last_seq = seq;
            state.coalesce.pending = None;
        }
    }

    /// Cluster mode: every cluster number up to `n` has been applied in order.
    pub fn set_applied(&self, n: u64) {
        let upto = n
            .saturating_add(1)
            .saturating_mul(self.scale)
            .saturating_sub(1);
        self.watermark.store(upto, Ordering::Release);
    }

    /// Moves the local numbering past `seq` (events up to it exist, even if not seen here).
    pub fn advance_past(&self, seq: u64) {
        self.next_seq.fetch_max(seq + 1, Ordering::AcqRel);
    }

    /// Marks this node as cut off from (or back in touch with) the rest of the cluster.
    pub fn set_isolated(&self, isolated: bool) {
        self.isolated.store(isolated, Ordering::Release);
    }

    /// The topics of `names` that exist here; every topic for `None`.
    fn topics_named(&self, names: Option<&[String]>) -> Vec<Arc<Topic>> {
        let map = lock(&self.topics);
        match names {
            None => map.values().cloned().collect(),
            Some(names) => names
                .iter()
                .filter_map(|n| map.get(n.as_str()).cloned())
                .collect(),
        }
    }

    /// Owes a `resync` to the subscribers of `names` (every topic for `None`): at once for
    /// resumes, and on the wire spread over `window`, so a thousand browsers don't reload from
    /// the backend in the same instant. A topic whose next event comes first gets its `resync`
    /// just before that event, so nothing is ever delivered across the gap unannounced. Topics
    /// already owed one after `unless_since` (unix ms; 0 = never skip) are skipped: their
    /// subscribers reload after that moment anyway.
    pub fn schedule_resync(
        self: &Arc<Self>,
        names: Option<&[String]>,
        unless_since: u64,
        window: Duration,
    ) {
        let now_ms = crate::time::unix_ms();
        let now = self.current_seq();
        let mut owed = Vec::new();
        for topic in self.topics_named(names) {
            let mut state = lock(&topic.state);
            if unless_since > 0 && state.resynced_ms > unless_since {
                continue;
            }
            state.resynced_ms = now_ms;
            // Ids up to now may have missed something: resuming from them gives `resync`.
            state.forbid_resume_through(now);
            if !state.subscribers.is_empty() && !state.resync_pending {
                state.resync_pending = true;
                owed.push(topic.clone());
            }
        }
        if owed.is_empty() {
            return;
        }
        let hub = self.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let step = window / (owed.len() as u32).max(1);
            let offset = step.mul_f64(crate::time::jitter());
            for (i, topic) in owed.iter().enumerate() {
                tokio::time::sleep_until(start + offset + step * i as u32).await;
                let mut state = lock(&topic.state);
                hub.pay_resync(topic, &mut state, "cluster");
            }
        });
    }

    /// Makes every id up to now unresumable on `names` (live subscribers are not disturbed).
    pub fn forbid_resume_up_to_now(&self, names: &[String]) {
        let now = self.current_seq();
        for topic in self.topics_named(Some(names)) {
            lock(&topic.state).forbid_resume_through(now);
        }
    }

    /// Sends an owed `resync`, if any.
    fn pay_resync(&self, topic: &Topic, state: &mut TopicState, cause: &str) {
        if !std::mem::take(&mut state.resync_pending) {
            return;
        }
        for (outlet, _) in state.subscribers.iter() {
            outlet.offer_resync(&topic.name);
        }
        self.metrics
            .resyncs
            .add(cause, state.subscribers.len() as u64);
    }

    /// The last seq handed out so far.
    fn current_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Acquire) - 1
    }

    /// Publishes `payload` (raw JSON text, forwarded byte for byte) to `topic`, with an id
    /// assigned here. With `coalesce`, at most one event per window goes out: the first after
    /// a quiet period at once, later ones as the newest of their window when it ends.
    pub fn publish(
        self: &Arc<Self>,
        topic: &str,
        payload: &str,
        coalesce: Option<Duration>,
    ) -> Published {
        self.accept(topic, payload, None, coalesce)
    }

    /// Like `publish`, with the seq already assigned (cluster mode: by Redis) when `seq` is
    /// given.
    pub fn accept(
        self: &Arc<Self>,
        topic: &str,
        payload: &str,
        seq: Option<u64>,
        coalesce: Option<Duration>,
    ) -> Published {
        self.accept_as(topic, payload, seq, coalesce, IdKind::Resumable)
    }

    /// Like `accept`, with an id no node resumes from: published while cut off from Redis
    /// (`seq` `None`: other nodes never see it, and may publish events this node never sees),
    /// or delivered here ahead of events before it that may still come (`seq` given).
    pub fn accept_unresumable(
        self: &Arc<Self>,
        topic: &str,
        payload: &str,
        seq: Option<u64>,
        coalesce: Option<Duration>,
    ) -> Published {
        self.accept_as(topic, payload, seq, coalesce, IdKind::Isolated)
    }

    fn accept_as(
        self: &Arc<Self>,
        topic: &str,
        payload: &str,
        seq: Option<u64>,
        coalesce: Option<Duration>,
        kind: IdKind,
    ) -> Published {
        // A topic made by this publish starts just before it.
        let before = self
            .current_seq()
            .min(seq.map_or(u64::MAX, |s| s.saturating_sub(1)));
        if let Some(seq) = seq {
            self.next_seq.fetch_max(seq + 1, Ordering::AcqRel);
        }
        let name = topic;
        let Some(topic) = self.topic_for_publish(name, before) else {
            // Nobody listens and no history is kept: the event only takes an id.
            let seq = seq.unwrap_or_else(|| self.local_seq(kind));
            return Published {
                id: Some(self.format_kind(seq, kind)),
                receivers: 0,
            };
        };
        let mut state = lock(&topic.state);
        if state.removed {
            // Swept between the lookup and the lock: look again (a fresh topic this time).
            drop(state);
            return self.accept_as(name, payload, seq, coalesce, kind);
        }
        if let Some(window) = coalesce.filter(|w| !w.is_zero()) {
            let now = Instant::now();
            if state.coalesce.window_end.is_some_and(|end| now < end) {
                state.coalesce.pending = Some((payload.to_string(), seq, kind));
                if !state.coalesce.flush_scheduled {
                    state.coalesce.flush_scheduled = true;
                    let at = state.coalesce.window_end.unwrap_or(now);
                    tokio::spawn(flush_coalesced(self.clone(), topic.clone(), at, window));
                }
                return Published {
                    id: None,
                    receivers: 0,
                };
            }
            state.coalesce.window_end = Some(now + window);
        }
        // An event held back by coalescing is older than this one: it must never follow it.
        state.coalesce.pending = None;
        self.deliver(&topic, &mut state, payload, seq, kind)
    }

    /// The topic a publish goes to, created when history is kept; `None` when the event has
    /// nowhere to go.
    fn topic_for_publish(&self, name: &str, start: u64) -> Option<Arc<Topic>> {
        let mut topics = lock(&self.topics);
        if let Some(t) = topics.get(name) {
            if !lock(&t.state).removed {
                return Some(t.clone());
            }
            topics.remove(name);
        }
        if self.limits.size == 0 {
            return None;
        }
        Some(self.create_topic(&mut topics, name, start))
    }

    /// A new topic whose history starts after seq `start`.
    fn create_topic(
        &self,
        topics: &mut HashMap<Arc<str>, Arc<Topic>>,
        name: &str,
        start: u64,
    ) -> Arc<Topic> {
        let name: Arc<str> = Arc::from(name);
        let topic = Arc::new(Topic {
            topic_json: serde_json::to_string(&*name).unwrap_or_else(|_| "\"\"".into()),
            name: name.clone(),
            state: Mutex::new(TopicState {
                subscribers: Slots::default(),
                history: VecDeque::new(),
                floor: start,
                idle_since: Some(Instant::now()),
                coalesce: Coalesce::default(),
                last_seq: start,
                resync_pending: false,
                removed: false,
                resynced_ms: 0,
            }),
        });
        topics.insert(name, topic.clone());
        topic
    }

    /// Assigns the id, keeps the event in history and hands it to subscribers, all under the
    /// topic lock. The id is formatted once, for the frame and the publish answer alike. An
    /// event that is not newer than the topic's last one (an echo that came too late, local
    /// numbering that ran out) is not delivered after it: subscribers get `resync`, and ids up
    /// to here stop being resumable.
    fn deliver(
        &self,
        topic: &Topic,
        state: &mut TopicState,
        payload: &str,
        seq: Option<u64>,
        kind: IdKind,
    ) -> Published {
        let seq = seq.unwrap_or_else(|| self.local_seq(kind));
        let id = self.format_kind(seq, kind);
        if seq <= state.last_seq {
            let last = state.last_seq;
            state.forbid_resume_through(last);
            state.resync_pending = true;
            self.pay_resync(topic, state, "order");
            return Published {
                id: Some(id),
                receivers: 0,
            };
        }
        state.last_seq = seq;
        self.pay_resync(topic, state, "cluster");
        let frame = Arc::new(build_frame(topic, &id, seq, payload));
        self.remember(state, &frame);
        let now = Instant::now();
        let how = if state.subscribers.len() > DIRECT_WALK_MAX {
            Offer::Defer
        } else if self.load.per_second(now) <= DIRECT_RATE_MAX {
            Offer::Write
        } else {
            Offer::Queue
        };
        let mut receivers = 0;
        let mut to_flush = Vec::new();
        let slots = &state.subscribers.slots;
        for (i, slot) in slots.iter().enumerate() {
            if let Some(Some((ahead, _))) = slots.get(i + PREFETCH_AHEAD) {
                outlet::prefetch(ahead);
            }
            if let Some((outlet, key)) = slot {
                let offered = outlet.offer_event(*key, &frame, how);
                receivers += usize::from(offered.delivered());
                if offered == Offered::ToFlush {
                    to_flush.push(outlet.clone());
                }
            }
        }
        flush::spawn(to_flush);
        self.load.add(receivers as u64, now);
        if receivers > 0 {
            // Once per walk, for every delivery of it: no clock read per subscriber.
            self.metrics
                .publish_to_send
                .observe_many(frame.published.elapsed(), receivers as u64);
        }
        self.metrics
            .deliveries
            .fetch_add(receivers as u64, Ordering::Relaxed);
        Published {
            id: Some(id),
            receivers,
        }
    }

    /// The next local seq. In cluster mode local numbers sit between two cluster numbers
    /// (`S.1`, `S.2`, ...); they stop at the last one rather than run into the next cluster
    /// number (an event that gets a used number is then refused with `resync`).
    fn local_seq(&self, kind: IdKind) -> u64 {
        if kind == IdKind::Isolated {
            // Ids issued while cut off resume nowhere: they may run on past the next cluster
            // number (a long outage must not stop local delivery); a cluster event that then
            // comes in below them is answered with `resync`.
            return self.next_seq.fetch_add(1, Ordering::AcqRel);
        }
        let scale = self.scale;
        match self
            .next_seq
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (scale == 1 || s % scale != 0).then_some(s + 1)
            }) {
            Ok(s) => s,
            Err(s) => s - 1,
        }
    }

    fn format_kind(&self, seq: u64, kind: IdKind) -> String {
        let mut id = self.format_id(seq);
        if kind == IdKind::Isolated {
            // Not an id any node parses: resuming from it gives `resync`.
            id.push('~');
        }
        id
    }

    /// Adds `frame` to the topic's history within the limits, moving the floor past whatever
    /// is forgotten.
    fn remember(&self, state: &mut TopicState, frame: &Frame) {
        self.trim(state, Instant::now());
        let cost = frame.cost();
        if self.limits.size == 0 || cost > self.limits.max_bytes {
            state.floor = frame.seq;
            return;
        }
        while state.history.len() >= self.limits.size
            || (self.history_bytes.load(Ordering::Acquire) + cost > self.limits.max_bytes
                && !state.history.is_empty())
        {
            self.forget_oldest(state);
        }
        if self.history_bytes.load(Ordering::Acquire) + cost > self.limits.max_bytes {
            // Other topics hold the budget until their history expires.
            state.floor = frame.seq;
            return;
        }
        self.history_bytes.fetch_add(cost, Ordering::AcqRel);
        state.history.push_back(frame.clone());
    }

    fn forget_oldest(&self, state: &mut TopicState) {
        if let Some(old) = state.history.pop_front() {
            state.floor = state.floor.max(old.seq);
            self.history_bytes.fetch_sub(old.cost(), Ordering::AcqRel);
        }
    }

    /// Drops history older than `history_ttl`.
    fn trim(&self, state: &mut TopicState, now: Instant) {
        while state
            .history
            .front()
            .is_some_and(|f| now.duration_since(f.published) > self.limits.ttl)
        {
            self.forget_oldest(state);
        }
    }

    /// Subscribes `outlet` to `topic` (the session knows it as `key`), resuming after
    /// `last_event_id` when history allows. Events from now on go to the outlet; the session
    /// writes the replay before them (see [`Outlet::hold`]).
    pub fn subscribe(
        self: &Arc<Self>,
        name: &str,
        last_event_id: Option<&str>,
        outlet: &Arc<Outlet>,
        key: usize,
    ) -> Subscribed {
        let mut topics = lock(&self.topics);
        let mut topic = match topics.get(name) {
            Some(t) => t.clone(),
            None => self.create_topic(&mut topics, name, self.current_seq()),
        };
        // `sweep` marks a topic removed under the topic's lock alone; the map lock we hold
        // keeps it from leaving the map meanwhile, so checking after locking is enough.
        if lock(&topic.state).removed {
            topic = self.create_topic(&mut topics, name, self.current_seq());
        }
        let mut state = lock(&topic.state);
        drop(topics);
        self.trim(&mut state, Instant::now());
        let now_seq = self.current_seq();
        // Cluster mode: only ids of events this node has applied in order are resume points.
        let resumable = now_seq.min(self.watermark.load(Ordering::Acquire));
        let trusted = !self.isolated.load(Ordering::Acquire) && !state.resync_pending;
        let resume_from = last_event_id.map(|id| {
            self.parse_id(id)
                .filter(|seq| trusted && *seq >= state.floor && *seq <= resumable)
        });
        let (replay, position) = match resume_from {
            None => (Replay::Events(Vec::new()), now_seq),
            Some(None) => {
                self.metrics.resyncs.inc("resume");
                (Replay::Resync, now_seq)
            }
            Some(Some(from)) => {
                let missed = state
                    .history
                    .iter()
                    .filter(|f| f.seq > from)
                    .cloned()
                    .collect();
                (Replay::Events(missed), from)
            }
        };
        let slot = state.subscribers.insert(outlet.clone(), key);
        state.idle_since = None;
        drop(state);
        Subscribed {
            subscription: Subscription {
                hub: self.clone(),
                topic,
                slot,
            },
            replay,
            position: self.format_id(position),
        }
    }

    /// Called when a subscription ends.
    fn release(&self, topic: &Topic, slot: usize) {
        let mut state = lock(&topic.state);
        state.subscribers.remove(slot);
        if state.subscribers.is_empty() {
            state.idle_since = Some(Instant::now());
        }
    }

    /// Forgets expired history and topics idle for longer than `history_ttl` (with no history
    /// left), so memory stays bounded. Called periodically; the topic map is locked only to
    /// list and to remove, never while every topic is visited.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut dead = Vec::new();
        for topic in self.topics_named(None) {
            let mut state = lock(&topic.state);
            self.trim(&mut state, now);
            let idle_long = state
                .idle_since
                .is_some_and(|t| now.duration_since(t) > self.limits.ttl);
            if idle_long && state.history.is_empty() && state.coalesce.pending.is_none() {
                // Marked under its own lock: a publish or subscribe that already holds this
                // topic sees the mark and looks the topic up again.
                state.removed = true;
                dead.push(topic.clone());
            }
        }
        let mut topics = lock(&self.topics);
        for topic in dead {
            if topics
                .get(&topic.name)
                .is_some_and(|t| Arc::ptr_eq(t, &topic))
            {
                topics.remove(&topic.name);
            }
        }
    }

    /// Topics with at least one subscriber, sorted.
    pub fn active_topics(&self) -> Vec<String> {
        let topics: Vec<Arc<Topic>> = lock(&self.topics).values().cloned().collect();
        let mut names: Vec<String> = topics
            .iter()
            .filter(|t| !lock(&t.state).subscribers.is_empty())
            .map(|t| t.name.to_string())
            .collect();
        names.sort();
        names
    }

    /// Bytes held by history across all topics.
    pub fn history_bytes(&self) -> usize {
        self.history_bytes.load(Ordering::Acquire)
    }
}

/// Sends the newest payload held back in a coalescing window when the window ends.
async fn flush_coalesced(hub: Arc<Hub>, topic: Arc<Topic>, at: Instant, window: Duration) {
    tokio::time::sleep_until(at.into()).await;
    let mut state = lock(&topic.state);
    state.coalesce.flush_scheduled = false;
    if let Some((payload, seq, kind)) = state.coalesce.pending.take() {
        state.coalesce.window_end = Some(Instant::now() + window);
        hub.deliver(&topic, &mut state, &payload, seq, kind);
    }
}

/// One subscription of a session's outlet to a topic; dropping it unsubscribes.
pub struct Subscription {
    hub: Arc<Hub>,
    topic: Arc<Topic>,
    slot: usize,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic.name)
            .finish()
    }
}

impl Subscription {
    pub fn topic(&self) -> &Arc<str> {
        &self.topic.name
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.release(&self.topic, self.slot);
    }
}

/// A topic's subscribers: stable slots (a subscription keeps its index), reused when freed.
#[derive(Default)]
struct Slots {
    slots: Vec<Option<(Arc<Outlet>, usize)>>,
    free: Vec<usize>,
    len: usize,
}

impl Slots {
    fn insert(&mut self, outlet: Arc<Outlet>, key: usize) -> usize {
        self.len += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some((outlet, key));
                i
            }
            None => {
                self.slots.push(Some((outlet, key)));
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, i: usize) {
        if self.slots.get_mut(i).and_then(Option::take).is_some() {
            self.len -= 1;
            self.free.push(i);
        }
        if self.len == 0 {
            self.slots = Vec::new();
            self.free = Vec::new();
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&Arc<Outlet>, usize)> {
        self.slots.iter().flatten().map(|(o, k)| (o, *k))
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Builds the frames every subscriber of a publish receives.
fn build_frame(topic: &Topic, id: &str, seq: u64, payload: &str) -> FrameInner {
    let text = protocol::push_text(&topic.topic_json, id, payload);
    let ws = protocol::ws_text_frame(text.as_bytes());
    let sse_id = protocol::sse_id(id);
    let sse_data = protocol::sse_data(&text);
    let sse_chunk = protocol::http_chunk(&[&sse_id, &sse_data]);
    FrameInner {
        seq,
        published: Instant::now(),
        topic: topic.name.clone(),
        ws_head: ws.len() - text.len(),
        ws,
        sse_head: sse_chunk.len() - sse_id.len() - sse_data.len() - 2,
        sse_id_len: sse_id.len(),
        sse_chunk,
    }
}

/// `n` in decimal, appended to `out`.
fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[start..].iter().map(|&d| char::from(d)));
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: usize = 8;

    fn hub(limits: HistoryLimits) -> Arc<Hub> {
        Hub::new(limits, Arc::new(Metrics::default()), 1)
    }

    /// Ids are `EPOCH-MAJOR[.MINOR]` as they were with `format!`, and read back to their seq.
    #[test]
    fn ids_are_written_and_read_back_alike_standalone_and_clustered() {
        let limits = HistoryLimits {
            size: 0,
            ttl: Duration::from_secs(1),
            max_bytes: 0,
        };
        for scale in [1, CLUSTER_SCALE] {
            let h = Hub::new(limits, Arc::new(Metrics::default()), scale);
            for seq in [
                0,
                1,
                9,
                10,
                99,
                100,
                12_345,
                scale - 1,
                scale + 1,
                7 * scale + 3,
            ] {
                let (major, minor) = (seq / scale, seq % scale);
                let expected = if minor == 0 {
                    format!("{}-{major}", h.epoch())
                } else {
                    format!("{}-{major}.{minor}", h.epoch())
                };
                assert_eq!(h.format_id(seq), expected);
                assert_eq!(h.parse_id(&expected), Some(seq), "{expected}");
            }
            let last = format!("{}-{}", h.epoch(), u64::MAX / scale);
            assert_eq!(h.format_id(u64::MAX / scale * scale), last);
        }
    }

    /// A subscriber whose outlet only queues (no socket), so the test reads what it got.
    struct Sub {
        outlet: Arc<Outlet>,
        _subscription: Subscription,
    }

    impl Sub {
        fn new(h: &Arc<Hub>, topic: &str, capacity: usize) -> Sub {
            let outlet = Outlet::new(Wire::SseBody, None, capacity);
            let subscribed = h.subscribe(topic, None, &outlet, 0);
            Sub {
                outlet,
                _subscription: subscribed.subscription,
            }
        }

        fn item(&self) -> Option<Item> {
            self.outlet.take_item()
        }

        fn event(&self) -> Frame {
            match self.item() {
                Some(Item::Event(_, f)) => f,
                other => panic!("expected an event, got {other:?}"),
            }
        }
    }

    /// Subscribes a throwaway outlet (for what `subscribe` answers).
    fn resume(h: &Arc<Hub>, topic: &str, id: &str) -> Subscribed {
        h.subscribe(topic, Some(id), &Outlet::new(Wire::SseBody, None, 8), 0)
    }

    fn limits(size: usize) -> HistoryLimits {
        HistoryLimits {
            size,
            ttl: Duration::from_secs(60),
            max_bytes: 1 << 20,
        }
    }

    #[test]
    fn a_topic_swept_between_lookup_and_lock_is_looked_up_again() {
        let h = hub(limits(8));
        h.publish("a", "0", None);
        // What `sweep` does to a topic a publish has already found: marked, then removed.
        let found = h.topic_for_publish("a", 0).unwrap();
        lock(&found.state).removed = true;
        let sub = Sub::new(&h, "a", CAP);
        h.publish("a", "1", None);
        assert_eq!(sub.event().seq, 2, "the new subscriber gets it");
        assert!(
            lock(&found.state).history.len() <= 1,
            "nothing went to the removed one"
        );
    }

    #[test]
    fn local_numbers_never_run_into_the_next_cluster_number() {
        let h = Hub::new(limits(8), Arc::new(Metrics::default()), 4);
        let sub = Sub::new(&h, "a", CAP);
        h.accept("a", "0", Some(4), None); // cluster number 1
        for i in 1..=3 {
            h.publish("a", &i.to_string(), None); // Go events: 1.1, 1.2, 1.3
        }
        for want in [4, 5, 6, 7] {
            assert_eq!(sub.event().seq, want);
        }
        // A fourth would be 2.0, the next cluster number: refused with resync instead.
        h.publish("a", "4", None);
        assert!(matches!(sub.item(), Some(Item::Resync(_))));
        h.accept("a", "5", Some(8), None);
        assert_eq!(sub.event().seq, 8);
    }

    #[test]
    fn an_event_older_than_the_last_one_is_a_resync_not_a_delivery() {
        let h = hub(limits(8));
        let sub = Sub::new(&h, "a", CAP);
        h.accept("a", "\"new\"", Some(5), None);
        assert_eq!(sub.event().seq, 5);
        h.accept("a", "\"late\"", Some(4), None);
        assert!(matches!(sub.item(), Some(Item::Resync(_))));
        let id = h.format_id(5);
        let resumed = resume(&h, "a", &id);
        assert!(
            matches!(resumed.replay, Replay::Resync),
            "a resume from before is not exact"
        );
    }

    #[test]
    fn frames_are_shared_and_ordered() {
        let hub = hub(limits(0));
        let a = Sub::new(&hub, "t", CAP);
        let b = Sub::new(&hub, "t", CAP);
        let _other = Sub::new(&hub, "u", CAP);
        assert_eq!(hub.publish("t", r#"{"n":1e400}"#, None).receivers, 2);
        hub.publish("t", "null", None);
        for sub in [&a, &b] {
            let first = sub.event();
            assert!(first.text().ends_with(r#""payload":{"n":1e400}}"#));
            assert!(sub.event().seq > first.seq);
        }
        drop((a, b));
        assert_eq!(hub.active_topics(), vec!["u".to_string()]);
    }

    #[test]
    fn a_lagging_subscriber_gets_resync() {
        let hub = hub(limits(0));
        let slow = Sub::new(&hub, "t", 4);
        for i in 0..98 {
            hub.publish("t", &i.to_string(), None);
        }
        // 98 events into a backlog of 4: dropped at every fifth, one `resync` owed, then the
        // three published since the last drop.
        assert!(matches!(slow.item(), Some(Item::Resync(_))));
        for want in 95..98 {
            let next = slow.event();
            assert!(next.text().ends_with(&format!(r#""payload":{want}}}"#)));
        }
        assert!(slow.item().is_none(), "one resync, not one per drop");
    }

    #[test]
    fn resume_replays_exactly_the_missed_events() {
        let hub = hub(limits(4));
        let first = Sub::new(&hub, "t", CAP);
        let position = hub.format_id(hub.current_seq());
        drop(first);
        let ids: Vec<String> = (0..3)
            .map(|i| hub.publish("t", &i.to_string(), None).id.unwrap())
            .collect();
        let again = resume(&hub, "t", &position);
        let Replay::Events(missed) = again.replay else {
            panic!("resync")
        };
        assert_eq!(missed.len(), 3);
        let again = resume(&hub, "t", &ids[1]);
        let Replay::Events(missed) = again.replay else {
            panic!("resync")
        };
        assert_eq!(missed.len(), 1, "only the event after ids[1]");
        // Too old: two more events push ids[0] out of a 4-event history.
        for i in 3..6 {
            hub.publish("t", &i.to_string(), None);
        }
        assert!(matches!(resume(&hub, "t", &ids[0]).replay, Replay::Resync));
        assert!(matches!(
            resume(&hub, "t", "deadbeef-1").replay,
            Replay::Resync
        ));
        assert!(matches!(
            resume(&hub, "t", "garbage").replay,
            Replay::Resync
        ));
        let future = hub.format_id(1_000_000);
        assert!(matches!(resume(&hub, "t", &future).replay, Replay::Resync));
    }

    #[test]
    fn the_load_meter_tells_sustained_load_from_sparse_events() {
        let meter = LoadMeter::new();
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // 5 publishes of 1,000 deliveries in 100 ms: 50,000/s.
        for i in 0..6 {
            meter.add(1000, at(120 + 20 * i));
        }
        meter.add(1000, at(240));
        assert!((40_000..=60_000).contains(&meter.per_second(at(240))));
        // 40 publishes in the next 100 ms: 400,000/s.
        for i in 0..40 {
            meter.add(1000, at(241 + 2 * i));
        }
        meter.add(0, at(345));
        assert!(meter.per_second(at(345)) > DIRECT_RATE_MAX);
        // Quiet for a while: light again.
        assert_eq!(meter.per_second(at(600)), 0);
    }

    #[test]
    fn history_respects_the_byte_budget() {
        let hub = hub(HistoryLimits {
            size: 1000,
            ttl: Duration::from_secs(60),
            max_bytes: 4096,
        });
        let payload = format!("\"{}\"", "x".repeat(500));
        for _ in 0..100 {
            hub.publish("a", &payload, None);
            hub.publish("b", &payload, None);
        }
        assert!(hub.history_bytes() <= 4096, "{}", hub.history_bytes());
        assert!(hub.history_bytes() > 0);
    }
}
