//! Cluster mode: several workers behind one load balancer behave as one, through Redis.
//!
//! Wire-compatible with the Go worker: events travel on the pub/sub channel `wavelog:events` as
//! `{"origin_id":..,"topic":..,"payload":..}` (we add `"id"`), topics live in
//! `wavelog:topic:<topic>` with a TTL.
//!
//! Order comes first: every node delivers events in the order Redis published them, which is
//! the order of their ids, so a client's last id always says exactly what it has seen (resume
//! can neither skip nor repeat). A node therefore delivers its own publish when the echo of it
//! arrives on its ordered subscription (a loopback round trip later, not a second delivery):
//! events other nodes published just before reach its subscribers first. If the echo does not
//! come in time, the event is delivered locally at once and the late echo is skipped.
//!
//! Event ids are cluster-wide: one Lua script takes the next number of `wavelog:seq` and
//! publishes the envelope atomically, so every node numbers an event alike and Redis's publish
//! order is the id order. Every node receives every envelope and keeps every topic's history, so
//! a client that moves to another node resumes there. Envelopes from Go nodes (no id) are
//! numbered locally between cluster ids (`<seq>.<k>`).
//!
//! Redis faults never stop local delivery, and never cost a silent gap. Every event is also
//! appended to a capped stream (`wavelog:log`, keyed by its cluster number), and each node
//! tracks the last cluster number it applied: an envelope that is not the next one, or a
//! reconnect, fills the gap from the log in order. Only what the log cannot fill (it was
//! trimmed, or Redis lost its data meanwhile) makes subscribers resync, once, spread over a
//! short window. Events published while a node is cut off from Redis get ids that no node
//! resumes from, and their topics are announced when the link is back, so other nodes'
//! subscribers of exactly those topics resync once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Script};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::bounded::BoundedMap;
use crate::hub::{Hub, Published, CLUSTER_SCALE};
use crate::metrics::Metrics;
use crate::registry::{TopicMeta, STATUS_TOPIC};
use crate::sync::lock;

/// Cached negative answers at most (each kept for `registry_cache_ttl`).
const MAX_NEGATIVE_ENTRIES: usize = 10_000;
use crate::token::random_hex;
use crate::transport::Shutdown;

pub const EVENTS_CHANNEL: &str = "wavelog:events";
/// Our own channel for registry invalidation and targeted resyncs (Go nodes ignore it).
pub const CONTROL_CHANNEL: &str = "wavelog:control";
const TOPIC_PREFIX: &str = "wavelog:topic:";
const EPOCH_KEY: &str = "wavelog:epoch";
const SEQ_KEY: &str = "wavelog:seq";
/// The capped stream of recent envelopes, entry id `0-<cluster number>`.
const LOG_KEY: &str = "wavelog:log";
/// Envelopes the log keeps (about; Redis trims whole blocks): a node whose link was down for
/// fewer publishes than this catches up without any resync.
const LOG_LEN: u64 = 10_000;
/// Recent announcements of topics that had events published while their node was cut off
/// (stream entries `origin`, `topics`, `until`), for nodes that were away when they went out.
const ANNOUNCE_KEY: &str = "wavelog:announce";
const ANNOUNCE_LEN: u64 = 1_000;
/// Window over which owed resyncs go out, so browsers don't all reload at once.
const RESYNC_SPREAD: Duration = Duration::from_secs(1);
/// How long a topic count from SCAN is reused (metrics, status).
const TOPIC_NAMES_TTL: Duration = Duration::from_secs(1);

/// Longest wait for one Redis command: the internal API must answer quickly even when Redis
/// is gone without closing the connection (Wavelog's PHP gives up after 1 s).
const COMMAND_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest wait for the echo of our own publish before delivering it locally anyway.
const ECHO_TIMEOUT: Duration = Duration::from_millis(250);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Numbers, logs and publishes one event atomically. KEYS: epoch, seq, log. ARGV: candidate
/// epoch, origin id (JSON), topic (JSON), payload (raw JSON), nonce, coalesce_ms, log length.
/// Returns {epoch, seq}. (`nonce` and `coalesce_ms` are our additions; Go nodes ignore them.)
const PUBLISH_LUA: &str = r#"
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  redis.call('SET', KEYS[1], ARGV[1])
  epoch = ARGV[1]
end
local seq = redis.call('INCR', KEYS[2])
local envelope = '{"origin_id":' .. ARGV[2] .. ',"topic":' .. ARGV[3] .. ',"id":"' .. epoch .. '-' .. seq .. '","nonce":' .. ARGV[5] .. ',"coalesce_ms":' .. ARGV[6] .. ',"payload":' .. ARGV[4] .. '}'
redis.pcall('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '0-' .. seq, 'e', envelope)
redis.call('PUBLISH', 'wavelog:events', envelope)
return {epoch, seq}
"#;

/// Takes or renews a lease. KEYS: the lease. ARGV: holder, ttl ms. Returns 1 while we hold it.
const LEASE_LUA: &str = r#"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Gives a lease up if we hold it. KEYS: the lease. ARGV: holder.
const RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// A topic as this node last knew it.
#[derive(Debug, Clone, Copy)]
struct Cached {
    /// `None`: known not to be registered.
    meta: Option<TopicMeta>,
    fetched: Instant,
    /// Registered here while Redis was away: written to Redis when it is back.
    pending_write: bool,
}

pub struct Cluster {
    client: Client,
    node_id: String,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    conn: RwLock<Option<MultiplexedConnection>>,
    up: AtomicBool,
    /// Publishes go through Redis: cleared when a link comes up, set once it has caught up and
    /// announced what we published while cut off, so no event of ours overtakes that
    /// announcement. (While only the subscription is lost, publishes still reach Redis.)
    open: AtomicBool,
    /// Registered topics as last seen (for `registry_cache_ttl`, and while Redis is away for
    /// up to `topic_ttl`). Keys come from Redis or the backend, never from a browser alone.
    cache: Mutex<HashMap<String, Cached>>,
    /// Names found unregistered, each kept for `registry_cache_ttl`: a browser can ask for any
    /// name, so this one is bounded and evicts in O(1).
    negative: Mutex<BoundedMap<String, Instant>>,
    cache_ttl: Duration,
    topic_ttl: Duration,
    /// Topics with events that never reached Redis (published while cut off), with the
    /// time of the last one (unix ms): other nodes are told to resync them.
    missed: Mutex<HashMap<String, u64>>,
    reconnects: AtomicU64,
    script: Script,
    /// Our own publishes, by nonce, as their echoes are handled.
    own: Mutex<HashMap<u64, Own>>,
    next_nonce: AtomicU64,
    /// The last cluster number applied, with every one before it (in this epoch).
    applied: Mutex<u64>,
    /// The cluster's sequence when our link was lost (what existed that we may not have).
    seq_at_loss: Mutex<Option<u64>>,
    /// When our link was lost (unix ms; the start for a node not yet connected): the
    /// announcements made since then are read on reconnect.
    lost_at_ms: AtomicU64,
    /// The highest cluster number applied, for publishes waiting for their echo.
    echoed: tokio::sync::watch::Sender<u64>,
    /// Registered topic names from the last SCAN, reused for `TOPIC_NAMES_TTL`.
    names: Mutex<Option<(Instant, Vec<String>)>>,
}

/// A fresh link to Redis.
struct Link {
    conn: MultiplexedConnection,
    pubsub: redis::aio::PubSub,
    seq_before: u64,
}

/// What became of one of our own publishes.
enum Own {
    /// Its echo arrived and was delivered.
    Delivered(Published),
    /// Delivered locally without waiting; skip the echo if it still comes.
    Abandoned,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(default)]
    origin_id: Option<String>,
    topic: String,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    nonce: Option<u64>,
    /// The topic's coalescing window as the publishing node knew it, so every node coalesces
    /// alike (Go envelopes lack it: the cached registration decides).
    #[serde(default)]
    coalesce_ms: Option<u32>,
}

#[derive(Deserialize)]
struct Control {
    #[serde(default)]
    origin_id: String,
    op: String,
    #[serde(default)]
    topics: Vec<String>,
    /// `resync`: when the last event that could not reach Redis was published (unix ms).
    #[serde(default)]
    until: Option<u64>,
}

#[derive(Deserialize, Default)]
struct StoredMeta {
    #[serde(default)]
    require_token: bool,
    #[serde(default)]
    coalesce_ms: u32,
}

impl Cluster {
    /// Checks the URL; nothing connects until `run`.
    pub fn new(
        url: &str,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        topic_ttl: Duration,
        cache_ttl: Duration,
    ) -> Result<Arc<Cluster>, String> {
        let client = Client::open(url).map_err(|e| format!("invalid redis_url: {e}"))?;
        // Until the first connect, nothing published elsewhere can be known.
        hub.set_isolated(true);
        Ok(Arc::new(Cluster {
            client,
            node_id: random_hex(8),
            hub,
            metrics,
            conn: RwLock::new(None),
            up: AtomicBool::new(false),
            open: AtomicBool::new(false),
            cache: Mutex::new(HashMap::new()),
            negative: Mutex::new(BoundedMap::new(MAX_NEGATIVE_ENTRIES)),
            cache_ttl,
            topic_ttl,
            missed: Mutex::new(HashMap::new()),
            reconnects: AtomicU64::new(0),
            script: Script::new(PUBLISH_LUA),
            own: Mutex::new(HashMap::new()),
            next_nonce: AtomicU64::new(1),
            applied: Mutex::new(0),
            seq_at_loss: Mutex::new(None),
            lost_at_ms: AtomicU64::new(crate::time::unix_ms()),
            echoed: tokio::sync::watch::Sender::new(0),
            names: Mutex::new(None),
        }))
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// The command connection. It outlives a lost subscription (a `CLIENT KILL` of the pub/sub
    /// connection leaves it working, so lookups go on); with Redis gone its commands fail.
    fn connection(&self) -> Option<MultiplexedConnection> {
        self.conn.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs one Redis command with a time limit; `None` when Redis is away or fails.
    async fn command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        let mut conn = self.connection()?;
        match tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                tracing::debug!("redis command failed: {e}");
                None
            }
            Err(_) => None,
        }
    }

    /// Keeps the link to Redis up for the life of the worker.
    pub async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut backoff = BACKOFF_MIN;
        let mut ever_connected = false;
        let mut said_unavailable = false;
        loop {
            let attempt = tokio::select! {
                _ = shutdown.wait() => return,
                attempt = self.connect() => attempt,
            };
            match attempt {
                Ok(Link {
                    conn,
                    pubsub,
                    seq_before,
                }) => {
                    backoff = BACKOFF_MIN;
                    said_unavailable = false;
                    // Until this reconnect has caught up and announced what we published while
                    // cut off, our publishes stay local.
                    self.open.store(false, Ordering::Release);
                    *self.conn.write().unwrap_or_else(|e| e.into_inner()) = Some(conn);
                    self.up.store(true, Ordering::Release);
                    tracing::info!(node = %self.node_id, "redis connected: cluster mode active");
                    self.catch_up(!ever_connected, seq_before).await;
                    ever_connected = true;
                    self.hub.set_isolated(false);
                    self.write_pending_registrations().await;
                    self.open_and_announce().await;
                    let stopped = self.pump(pubsub, &mut shutdown).await;
                    self.hub.set_isolated(true);
                    let seq_now = self
                        .command::<Option<u64>>(redis::cmd("GET").arg(SEQ_KEY))
                        .await;
                    *lock(&self.seq_at_loss) = seq_now.flatten();
                    self.lost_at_ms
                        .store(crate::time::unix_ms(), Ordering::Release);
                    self.up.store(false, Ordering::Release);
                    if stopped {
                        return;
                    }
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("redis connection lost: local delivery continues, reconnecting");
                }
                Err(e) => {
                    if !said_unavailable {
                        tracing::warn!(
                            "redis unavailable ({e}): serving local traffic, retrying with backoff"
                        );
                        said_unavailable = true;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Both connections, and the cluster sequence read just before subscribing (every event
    /// after it reaches us: on the subscription, or from the log).
    async fn connect(&self) -> Result<Link, String> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(COMMAND_TIMEOUT));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| e.to_string())?;
        let seq_before: Option<u64> = redis::cmd("GET")
            .arg(SEQ_KEY)
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let connect_pubsub = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(EVENTS_CHANNEL).await?;
            pubsub.subscribe(CONTROL_CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::time::timeout(Duration::from_secs(2), connect_pubsub)
            .await
            .map_err(|_| "timed out subscribing".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(Link {
            conn,
            pubsub,
            seq_before: seq_before.unwrap_or(0),
        })
    }

    /// Delivers what arrives on the channels until the link breaks (false) or shutdown (true).
    async fn pump(&self, mut pubsub: redis::aio::PubSub, shutdown: &mut Shutdown) -> bool {
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
                _ = shutdown.wait() => return true,
                msg = messages.next() => match msg {
                    Some(msg) if msg.get_channel_name() == EVENTS_CHANNEL => self.on_event(msg.get_payload_bytes()).await,
                    Some(msg) => self.on_control(msg.get_payload_bytes()),
                    None => return false,
                },
            }
        }
    }

    /// One envelope from the events channel, in cluster order: an envelope that is not the
    /// next number first has the gap before it filled from the log.
    async fn on_event(&self, bytes: &[u8]) {
        let Ok(envelope) = serde_json::from_slice::<Envelope<'_>>(bytes) else {
            tracing::debug!("ignoring a malformed envelope on {EVENTS_CHANNEL}");
            return;
        };
        let Some(id) = envelope.id.as_deref() else {
            // A Go node's event: no cluster number, numbered locally.
            self.apply(&envelope, None);
            return;
        };
        let Some((epoch, n)) = split_id(id) else {
            return;
        };
        if *self.hub.epoch() != *epoch {
            // Redis lost its data while our link stayed up (or we raced a reconnect).
            tracing::info!(epoch, "cluster epoch changed: subscribers resync");
            self.hub.switch_epoch(epoch, 0);
            self.hub.schedule_resync(None, 0, RESYNC_SPREAD);
            self.reset_applied(0);
        }
        let applied = *lock(&self.applied);
        if n <= applied {
            return; // filled from the log already
        }
        if n > applied + 1 {
            self.fill(applied + 1, n - 1).await;
        }
        self.apply(&envelope, Some(n * CLUSTER_SCALE));
        self.mark_applied(n);
    }

    /// Hands one envelope to the hub. Our own publish is delivered when its echo comes,
    /// unless it was delivered locally already (its publish gave up waiting): check and
    /// delivery happen under one lock, so a publish giving up at this very moment cannot
    /// deliver it a second time.
    fn apply(&self, envelope: &Envelope<'_>, seq: Option<u64>) {
        let coalesce = match envelope.coalesce_ms {
            Some(ms) => (ms > 0).then(|| Duration::from_millis(u64::from(ms))),
            None => self.cached_meta(&envelope.topic).and_then(|m| m.coalesce()),
        };
        let payload = envelope.payload.get();
        let nonce = envelope
            .nonce
            .filter(|_| envelope.origin_id.as_deref() == Some(self.node_id.as_str()));
        let Some(nonce) = nonce else {
            self.hub.accept(&envelope.topic, payload, seq, coalesce);
            return;
        };
        let mut own = lock(&self.own);
        if matches!(own.get(&nonce), Some(Own::Abandoned)) {
            own.remove(&nonce);
            return;
        }
        let published = self.hub.accept(&envelope.topic, payload, seq, coalesce);
        if own.len() > 10_000 {
            own.retain(|k, _| *k + 10_000 > nonce);
        }
        own.insert(nonce, Own::Delivered(published));
    }

    fn mark_applied(&self, n: u64) {
        {
            let mut applied = lock(&self.applied);
            *applied = (*applied).max(n);
            self.hub.set_applied(*applied);
        }
        self.echoed.send_if_modified(|v| {
            let newer = n > *v;
            if newer {
                *v = n;
            }
            newer
        });
    }

    fn reset_applied(&self, n: u64) {
        *lock(&self.applied) = n;
        self.hub.set_applied(n);
        self.echoed.send_replace(n);
    }

    /// Applies cluster numbers `from..=to` from the log, in order. What the log no longer
    /// holds (or cannot be read) may have been on any topic: every subscriber is owed a
    /// resync, and no id before here is a resume point.
    async fn fill(&self, from: u64, to: u64) {
        if from > to {
            return;
        }
        let mut next = from;
        if to - from < LOG_LEN {
            let cmd = redis::cmd("XRANGE")
                .arg(LOG_KEY)
                .arg(format!("0-{from}"))
                .arg(format!("0-{to}"))
                .clone();
            let entries: Vec<(String, Vec<String>)> = self.command(&cmd).await.unwrap_or_default();
            for (id, fields) in &entries {
                let n = id.strip_prefix("0-").and_then(|n| n.parse::<u64>().ok());
                let Some(envelope) = fields
                    .chunks(2)
                    .find(|kv| kv.first().map(String::as_str) == Some("e"))
                    .and_then(|kv| kv.get(1))
                    .and_then(|e| serde_json::from_str::<Envelope<'_>>(e).ok())
                else {
                    break;
                };
                if n != Some(next) {
                    break;
                }
                self.apply(&envelope, Some(next * CLUSTER_SCALE));
                self.mark_applied(next);
                next += 1;
            }
        }
        if next <= to {
            tracing::warn!(
                missed = to - next + 1,
                "events beyond the cluster log were missed: subscribers resync"
            );
            // Those numbers exist: no id up to them may be resumed from here.
            self.hub.advance_past(to.saturating_mul(CLUSTER_SCALE));
            self.hub.schedule_resync(None, 0, RESYNC_SPREAD);
            self.mark_applied(to);
        }
    }

    fn on_control(&self, bytes: &[u8]) {
        let Ok(control) = serde_json::from_slice::<Control>(bytes) else {
            return;
        };
        if control.origin_id == self.node_id {
            return;
        }
        match control.op.as_str() {
            "invalidate" => {
                let mut cache = lock(&self.cache);
                let mut negative = lock(&self.negative);
                for topic in &control.topics {
                    cache.remove(topic);
                    negative.remove(topic);
                }
            }
            "resync" => {
                // Events the sender published while cut off from Redis: our subscribers of
                // those topics resync, unless they were told to after the last of them.
                let until = control.until.unwrap_or(u64::MAX);
                self.hub
                    .schedule_resync(Some(&control.topics), until, RESYNC_SPREAD);
            }
            _ => {}
        }
    }

    /// Brings this node up to date after (re)connecting, the subscription to the events
    /// channel already in place: takes the cluster's epoch and sequence, then fills what it
    /// missed from the log. If Redis lost its data meanwhile (a new epoch), only what was
    /// published before the loss and never reached us is unknowable: then every subscriber
    /// resyncs; otherwise nobody does.
    async fn catch_up(&self, first: bool, seq_before: u64) {
        let candidate = random_hex(4);
        let _: Option<()> = self
            .command(redis::cmd("SET").arg(EPOCH_KEY).arg(&candidate).arg("NX"))
            .await;
        let Some(epoch) = self
            .command::<String>(redis::cmd("GET").arg(EPOCH_KEY))
            .await
        else {
            return;
        };
        let Some(seq) = self
            .command::<Option<u64>>(redis::cmd("GET").arg(SEQ_KEY))
            .await
        else {
            return;
        };
        let seq = seq.unwrap_or(0);
        if first {
            // Numbering starts where it stood before we subscribed; what came between is
            // applied from the log (a node may have subscribers from before its first link).
            let start = seq_before.min(seq);
            if *self.hub.epoch() != *epoch {
                self.hub
                    .switch_epoch(&epoch, start.saturating_mul(CLUSTER_SCALE));
            }
            self.reset_applied(start);
            self.fill(start + 1, seq).await;
            self.read_announcements().await;
            return;
        }
        if *self.hub.epoch() != *epoch {
            let applied = *lock(&self.applied);
            let at_loss = lock(&self.seq_at_loss).take().unwrap_or(applied);
            tracing::info!(epoch = %epoch, "redis lost its data: new cluster epoch");
            self.hub.switch_epoch(&epoch, 0);
            self.reset_applied(0);
            if at_loss > applied {
                self.hub.schedule_resync(None, 0, RESYNC_SPREAD);
            }
            self.restore_registrations().await;
        }
        let applied = *lock(&self.applied);
        self.fill(applied + 1, seq).await;
        self.read_announcements().await;
    }

    /// Announcements other nodes made while our link was down (their live copies on the
    /// control channel never reached us): each owes our subscribers of those topics a resync,
    /// as when it comes live.
    async fn read_announcements(&self) {
        let since = self
            .lost_at_ms
            .load(Ordering::Acquire)
            .saturating_sub(2_000);
        let cmd = redis::cmd("XRANGE")
            .arg(ANNOUNCE_KEY)
            .arg(since)
            .arg("+")
            .clone();
        let entries: Vec<(String, Vec<String>)> = self.command(&cmd).await.unwrap_or_default();
        for (_, fields) in entries {
            let field = |name: &str| {
                fields
                    .chunks(2)
                    .find(|kv| kv.first().map(String::as_str) == Some(name))
                    .and_then(|kv| kv.get(1))
            };
            if field("origin").map(String::as_str) == Some(self.node_id.as_str()) {
                continue;
            }
            let topics: Vec<String> = field("topics")
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or_default();
            let until = field("until")
                .and_then(|u| u.parse().ok())
                .unwrap_or(u64::MAX);
            self.hub
                .schedule_resync(Some(&topics), until, RESYNC_SPREAD);
        }
    }

    /// Publishes through Redis (cluster-wide id, delivered here when its echo comes). With
    /// Redis away the event is still delivered locally, with an id no node resumes from, and
    /// its topic is announced to the other nodes when the link is back.
    pub async fn publish(
        &self,
        topic: &str,
        payload: &str,
        coalesce: Option<Duration>,
    ) -> Published {
        let nonce = self.next_nonce.fetch_add(1, Ordering::Relaxed);
        match self.publish_remote(topic, payload, nonce, coalesce).await {
            Some(seq) => self.await_echo(topic, payload, nonce, seq, coalesce).await,
            None => {
                {
                    // The script may have run after we gave up: if its echo was delivered
                    // already, that was the delivery; if it comes later, it is skipped.
                    let mut own = lock(&self.own);
                    if let Some(Own::Delivered(published)) = own.remove(&nonce) {
                        return published;
                    }
                    own.insert(nonce, Own::Abandoned);
                }
                self.metrics
                    .cluster_publish_failures
                    .fetch_add(1, Ordering::Relaxed);
                lock(&self.missed).insert(topic.to_string(), crate::time::unix_ms());
                let published = self.hub.accept_unresumable(topic, payload, None, coalesce);
                if self.open.load(Ordering::Acquire) && self.is_up() {
                    // The link came back while we published: the reconnect's announcement may
                    // have missed this topic.
                    self.announce_missed().await;
                }
                published
            }
        }
    }

    /// Waits until our publish `seq` came back on the ordered subscription (and so was
    /// delivered in order); delivers it locally if it doesn't come in time. (The event is in
    /// Redis and its log: other nodes have it.)
    async fn await_echo(
        &self,
        topic: &str,
        payload: &str,
        nonce: u64,
        seq: u64,
        coalesce: Option<Duration>,
    ) -> Published {
        let n = seq / CLUSTER_SCALE;
        let mut echoed = self.echoed.subscribe();
        if self.is_up() {
            // (Without a subscription no echo can come: deliver at once.)
            let _ = tokio::time::timeout(ECHO_TIMEOUT, echoed.wait_for(|v| *v >= n)).await;
        }
        {
            let mut own = lock(&self.own);
            if let Some(Own::Delivered(published)) = own.remove(&nonce) {
                return published;
            }
            own.insert(nonce, Own::Abandoned);
        }
        self.metrics
            .cluster_publish_failures
            .fetch_add(1, Ordering::Relaxed);
        // Delivered ahead of events before it that may still be on their way to us: its id is
        // no resume point (a client moving on from it must not skip those).
        self.hub
            .accept_unresumable(topic, payload, Some(seq), coalesce)
    }

    async fn publish_remote(
        &self,
        topic: &str,
        payload: &str,
        nonce: u64,
        coalesce: Option<Duration>,
    ) -> Option<u64> {
        if !self.open.load(Ordering::Acquire) {
            return None;
        }
        let mut conn = self.connection()?;
        let origin = serde_json::to_string(&self.node_id).ok()?;
        let topic_json = serde_json::to_string(topic).ok()?;
        let coalesce_ms = coalesce.map_or(0, |d| d.as_millis().min(u128::from(u32::MAX)));
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(EPOCH_KEY)
            .key(SEQ_KEY)
            .key(LOG_KEY)
            .arg(random_hex(4))
            .arg(origin)
            .arg(topic_json)
            .arg(payload)
            .arg(nonce)
            .arg(coalesce_ms.to_string())
            .arg(LOG_LEN);
        let invocation = invocation.invoke_async::<(String, u64)>(&mut conn);
        let (epoch, n) = match tokio::time::timeout(COMMAND_TIMEOUT, invocation).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => {
                tracing::debug!("redis publish failed: {e}");
                return None;
            }
            Err(_) => return None,
        };
        // (A new epoch in the answer, after Redis lost its data, reaches us on the events
        // channel before our echo: the echo is then numbered in it.)
        let _ = epoch;
        n.checked_mul(CLUSTER_SCALE)
    }

    /// Tells other nodes which topics had events that never reached Redis.
    async fn announce_missed(&self) {
        let missed: Vec<(String, u64)> = lock(&self.missed).drain().collect();
        self.announce(missed).await;
    }

    /// Opens publishing through Redis and announces what was published while cut off; under
    /// the `missed` lock, so a publish that finds the link closed either lands in this
    /// announcement or sees it open afterwards and announces itself.
    async fn open_and_announce(&self) {
        let missed: Vec<(String, u64)> = {
            let mut missed = lock(&self.missed);
            self.open.store(true, Ordering::Release);
            missed.drain().collect()
        };
        self.announce(missed).await;
    }

    async fn announce(&self, missed: Vec<(String, u64)>) {
        let Some(until) = missed.iter().map(|(_, t)| *t).max() else {
            return;
        };
        let topics: Vec<String> = missed.iter().map(|(t, _)| t.clone()).collect();
        // Our subscribers saw those events, but an id from another node up to now does not
        // tell whether its client did: resuming from one here gives `resync` too.
        self.hub.forbid_resume_up_to_now(&topics);
        // Kept in a stream too: a node whose link is down now reads it when it is back.
        let topics_json = serde_json::to_string(&topics).unwrap_or_default();
        let logged: Option<String> = self
            .command(
                redis::cmd("XADD")
                    .arg(ANNOUNCE_KEY)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(ANNOUNCE_LEN)
                    .arg("*")
                    .arg("origin")
                    .arg(&self.node_id)
                    .arg("topics")
                    .arg(&topics_json)
                    .arg("until")
                    .arg(until),
            )
            .await;
        if logged.is_none() || !self.send_control("resync", &topics, Some(until)).await {
            // Not announced: kept for the next reconnect.
            let mut pending = lock(&self.missed);
            for (topic, at) in missed {
                let entry = pending.entry(topic).or_insert(at);
                *entry = (*entry).max(at);
            }
        }
    }

    async fn control(&self, op: &str, topics: &[String]) {
        let _ = self.send_control(op, topics, None).await;
    }

    /// Publishes a control message; whether Redis took it.
    async fn send_control(&self, op: &str, topics: &[String], until: Option<u64>) -> bool {
        let msg = serde_json::json!({
            "origin_id": self.node_id,
            "op": op,
            "topics": topics,
            "until": until,
        });
        let sent: Option<i64> = self
            .command(
                redis::cmd("PUBLISH")
                    .arg(CONTROL_CHANNEL)
                    .arg(msg.to_string()),
            )
            .await;
        sent.is_some()
    }

    fn cached_meta(&self, topic: &str) -> Option<TopicMeta> {
        lock(&self.cache).get(topic).and_then(|c| c.meta)
    }

    /// The topic's meta: from the cache while fresh, else from Redis; with Redis away, the
    /// last known answer (for up to `topic_ttl`).
    pub async fn lookup(&self, topic: &str) -> Option<TopicMeta> {
        if topic == STATUS_TOPIC {
            return Some(TopicMeta {
                require_token: true,
                coalesce_ms: 0,
            });
        }
        let cached = lock(&self.cache).get(topic).copied();
        if let Some(c) = cached {
            if c.fetched.elapsed() < self.cache_ttl || c.pending_write {
                return c.meta;
            }
        }
        let known_absent = lock(&self.negative)
            .get(&topic.to_string())
            .is_some_and(|at| at.elapsed() < self.cache_ttl);
        if known_absent {
            return None;
        }
        let key = format!("{TOPIC_PREFIX}{topic}");
        match self
            .command::<Option<String>>(redis::cmd("GET").arg(&key))
            .await
        {
            Some(stored) => {
                let meta = stored.map(|json| {
                    let m: StoredMeta = serde_json::from_str(&json).unwrap_or_default();
                    TopicMeta {
                        require_token: m.require_token,
                        coalesce_ms: m.coalesce_ms,
                    }
                });
                self.cache_put(topic, meta, false);
                meta
            }
            None => cached
                .filter(|c| c.fetched.elapsed() < self.topic_ttl)
                .and_then(|c| c.meta),
        }
    }

    fn cache_put(&self, topic: &str, meta: Option<TopicMeta>, pending_write: bool) {
        if meta.is_none() && !pending_write {
            lock(&self.cache).remove(topic);
            lock(&self.negative).insert(topic.to_string(), Instant::now());
            return;
        }
        lock(&self.negative).remove(&topic.to_string());
        let mut cache = lock(&self.cache);
        cache.insert(
            topic.to_string(),
            Cached {
                meta,
                fetched: Instant::now(),
                pending_write,
            },
        );
    }

    pub async fn register(&self, topic: &str, meta: TopicMeta) {
        if topic == STATUS_TOPIC {
            return;
        }
        let written = self.write_topic(topic, meta).await;
        self.cache_put(topic, Some(meta), !written);
        if written {
            self.control("invalidate", &[topic.to_string()]).await;
        }
    }

    async fn write_topic(&self, topic: &str, meta: TopicMeta) -> bool {
        let value = serde_json::json!({
            "require_token": meta.require_token,
            "coalesce_ms": meta.coalesce_ms,
        });
        let ttl = self.topic_ttl.as_secs().max(1);
        let cmd = redis::cmd("SET")
            .arg(format!("{TOPIC_PREFIX}{topic}"))
            .arg(value.to_string())
            .arg("EX")
            .arg(ttl)
            .clone();
        self.command::<()>(&cmd).await.is_some()
    }

    pub async fn unregister(&self, topic: &str) {
        if topic == STATUS_TOPIC {
            return;
        }
        let _: Option<i64> = self
            .command(redis::cmd("DEL").arg(format!("{TOPIC_PREFIX}{topic}")))
            .await;
        self.cache_put(topic, None, false);
        self.control("invalidate", &[topic.to_string()]).await;
    }

    /// Forgets what is past its use: negative answers after `registry_cache_ttl`, registrations
    /// after `topic_ttl` (unless still to be written to Redis).
    pub fn sweep_cache(&self) {
        let (fresh, ttl) = (self.cache_ttl, self.topic_ttl);
        lock(&self.negative).retain(|_, at| at.elapsed() < fresh);
        lock(&self.cache).retain(|_, c| c.pending_write || c.fetched.elapsed() < ttl);
    }

    /// Takes or renews the lease `key` (one holder across the cluster, expiring after `ttl`
    /// unless renewed). `false` with Redis away: a node that cannot reach Redis holds nothing.
    pub async fn hold_lease(&self, key: &str, ttl: Duration) -> bool {
        if !self.is_up() {
            return false;
        }
        let Some(mut conn) = self.connection() else {
            return false;
        };
        let script = Script::new(LEASE_LUA);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(key)
            .arg(&self.node_id)
            .arg(ttl.as_millis() as u64);
        let call = invocation.invoke_async::<i64>(&mut conn);
        matches!(tokio::time::timeout(COMMAND_TIMEOUT, call).await, Ok(Ok(1)))
    }

    /// Gives the lease `key` up if we hold it (on shutdown, so another node takes over at once).
    pub async fn release_lease(&self, key: &str) {
        let Some(mut conn) = self.connection() else {
            return;
        };
        let script = Script::new(RELEASE_LUA);
        let mut invocation = script.prepare_invoke();
        invocation.key(key).arg(&self.node_id);
        let call = invocation.invoke_async::<i64>(&mut conn);
        let _ = tokio::time::timeout(COMMAND_TIMEOUT, call).await;
    }

    /// Cached negative answers, for the metrics.
    pub fn negative_entries(&self) -> usize {
        lock(&self.negative).len()
    }

    /// Redis lost its data: writes back the registrations this node knows (still within
    /// `topic_ttl`), so browsers reconnecting now don't get 404 until the backend registers
    /// its topics again.
    async fn restore_registrations(&self) {
        let ttl = self.topic_ttl;
        let known: Vec<(String, TopicMeta)> = lock(&self.cache)
            .iter()
            .filter(|(_, c)| c.fetched.elapsed() < ttl)
            .filter_map(|(t, c)| c.meta.map(|m| (t.clone(), m)))
            .collect();
        for (topic, meta) in known {
            let key = format!("{TOPIC_PREFIX}{topic}");
            let exists: Option<bool> = self.command(redis::cmd("EXISTS").arg(&key)).await;
            if exists == Some(false) {
                self.write_topic(&topic, meta).await;
            }
        }
    }

    /// Registrations made while Redis was away, written now that it is back.
    async fn write_pending_registrations(&self) {
        let pending: Vec<(String, TopicMeta)> = lock(&self.cache)
            .iter()
            .filter(|(_, c)| c.pending_write)
            .filter_map(|(t, c)| c.meta.map(|m| (t.clone(), m)))
            .collect();
        for (topic, meta) in pending {
            if self.write_topic(&topic, meta).await {
                self.cache_put(&topic, Some(meta), false);
            }
        }
    }

    /// Registered topic names cluster-wide (SCAN, never KEYS), reused for a second so that
    /// metrics scrapes and status requests don't each walk Redis.
    pub async fn topic_names(&self) -> Vec<String> {
        if let Some((at, names)) = lock(&self.names).as_ref() {
            if at.elapsed() < TOPIC_NAMES_TTL {
                return names.clone();
            }
        }
        let names = self.scan_topic_names().await;
        *lock(&self.names) = Some((Instant::now(), names.clone()));
        names
    }

    /// Registered topic names by SCAN; the cache when Redis is away.
    async fn scan_topic_names(&self) -> Vec<String> {
        let mut names = vec![STATUS_TOPIC.to_string()];
        let mut cursor = 0u64;
        let mut complete = false;
        for _ in 0..10_000 {
            let cmd = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{TOPIC_PREFIX}*"))
                .arg("COUNT")
                .arg(1000)
                .clone();
            let Some((next, keys)) = self.command::<(u64, Vec<String>)>(&cmd).await else {
                break;
            };
            names.extend(
                keys.iter()
                    .filter_map(|k| k.strip_prefix(TOPIC_PREFIX))
                    .map(str::to_string),
            );
            cursor = next;
            if cursor == 0 {
                complete = true;
                break;
            }
        }
        if !complete {
            names.truncate(1);
            let ttl = self.topic_ttl;
            names.extend(
                lock(&self.cache)
                    .iter()
                    .filter(|(_, c)| c.meta.is_some() && c.fetched.elapsed() < ttl)
                    .map(|(t, _)| t.clone()),
            );
        }
        names.sort();
        names.dedup();
        names
    }

    /// Workers subscribed to the events channel (Go and Rust alike); 0 with Redis away.
    pub async fn node_count(&self) -> i64 {
        self.command::<(String, i64)>(redis::cmd("PUBSUB").arg("NUMSUB").arg(EVENTS_CHANNEL))
            .await
            .map_or(0, |(_, n)| n)
    }
}

/// `<epoch>-<n>` of a cluster id.
fn split_id(id: &str) -> Option<(&str, u64)> {
    let (epoch, n) = id.rsplit_once('-')?;
    Some((epoch, n.parse().ok()?))
}
