//! The DX cluster relay: live DX spots for Wavelog's bandmap.
//!
//! One telnet connection to a DX cluster node (DX Spider, AR-Cluster and CC-Cluster speak the
//! same line protocol): log in, read lines, keep the spots (`parse`), enrich them as Wavelog's
//! own backend does (`enrich`, `lookup`) and publish each once through the hub, on a topic the
//! relay registers itself (Wavelog's bandmap uses the live feed only while the worker has that
//! topic). A node that goes silent is taken for dead; reconnects back off with jitter; after
//! `unregister_after` without the node the topic goes, so Wavelog falls back to polling, and it
//! comes back with the next spot. In cluster mode one node relays, holding a lease in Redis.

pub mod enrich;
pub mod lookup;
pub mod parse;
mod spot;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::bounded::BoundedMap;
use crate::config::DxClusterConfig;
use crate::registry::TopicMeta;
use crate::sync::lock;
use crate::transport::Shutdown;
use crate::AppState;
use lookup::Lookup;
use parse::{parse_line, RawSpot, MAX_LINE};

/// A spot repeated within this window (same spotted call, frequency and spotter, as clusters
/// forward spots from several nodes) is sent once.
const DEDUPE_WINDOW: Duration = Duration::from_secs(60);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Without a login prompt within this long, the callsign is sent anyway.
const PROMPT_WAIT: Duration = Duration::from_secs(3);
/// The lease in Redis that lets one node of a cluster relay.
const LEASE_KEY: &str = "wavelog:dxcluster:lease";
const LEASE_TTL: Duration = Duration::from_secs(10);
const LEASE_RENEW: Duration = Duration::from_secs(3);

const META: TopicMeta = TopicMeta {
    require_token: true,
    coalesce_ms: 0,
};

/// Starts the relay's tasks; they end with the worker.
pub fn start(state: Arc<AppState>, cfg: DxClusterConfig, shutdown: Shutdown) {
    let lookup = cfg
        .lookup_url
        .as_deref()
        .and_then(|url| Lookup::new(url, cfg.lookup_key.expose_str(), state.metrics.clone()));
    let (lease_tx, lease_rx) = watch::channel(state.cluster.is_none());
    let relay = Arc::new(Relay {
        state,
        cfg,
        lookup,
        dedupe: Mutex::new(BoundedMap::new(10_000)),
        link: Mutex::new(Link {
            up: false,
            down_since: Instant::now(),
            registered_at: None,
        }),
        lease: lease_rx,
        lease_tx,
    });
    if relay.state.cluster.is_some() {
        tokio::spawn(relay.clone().keep_lease(shutdown.clone()));
    }
    tokio::spawn(relay.clone().keep_registration(shutdown.clone()));
    tokio::spawn(relay.run(shutdown));
}

struct Relay {
    state: Arc<AppState>,
    cfg: DxClusterConfig,
    lookup: Option<Lookup>,
    /// Recent spots by (spotted, frequency in 100 Hz, spotter).
    dedupe: Mutex<BoundedMap<(String, i64, String), Instant>>,
    link: Mutex<Link>,
    /// Whether this node may relay (always, standalone; while holding the lease in a cluster).
    lease: watch::Receiver<bool>,
    /// Kept here so the channel never closes (standalone, nobody else sends).
    lease_tx: watch::Sender<bool>,
}

/// The upstream as the registration keeper sees it.
struct Link {
    up: bool,
    down_since: Instant,
    /// When the topic was last registered by us; `None` while unregistered.
    registered_at: Option<Instant>,
}

/// Why a session with the node ended.
enum Ended {
    Io(String),
    Silent,
    Closed,
    LeaseLost,
    Shutdown,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Io(why) => write!(f, "{why}"),
            Ended::Silent => write!(f, "no line within silence_timeout"),
            Ended::Closed => write!(f, "closed by the node"),
            Ended::LeaseLost => write!(f, "relay lease lost"),
            Ended::Shutdown => write!(f, "shutdown"),
        }
    }
}

impl Relay {
    /// Connects, relays until the session ends, and again after a jittered backoff.
    async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        let mut backoff = BACKOFF_MIN;
        let mut lease = self.lease.clone();
        loop {
            // In a cluster, only the lease holder connects.
            tokio::select! {
                _ = shutdown.wait() => return,
                held = lease.wait_for(|held| *held) => if held.is_err() { return },
            }
            let started = Instant::now();
            let ended = self.session(&mut shutdown).await;
            self.set_up(false);
            match &ended {
                Ended::Shutdown => return,
                Ended::LeaseLost => {
                    tracing::info!("dx cluster: another node holds the relay lease now");
                    continue;
                }
                other => tracing::warn!(
                    host = %self.cfg.host,
                    port = self.cfg.port,
                    "dx cluster disconnected ({other}), reconnecting"
                ),
            }
            if started.elapsed() > BACKOFF_MAX {
                backoff = BACKOFF_MIN;
            }
            let wait = backoff.mul_f64(0.5 + crate::time::jitter());
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection to the node: login, then lines until it fails, goes silent, or the
    /// lease moves.
    async fn session(&self, shutdown: &mut Shutdown) -> Ended {
        let addr = (self.cfg.host.as_str(), self.cfg.port);
        let mut conn = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Ended::Io(e.to_string()),
            Err(_) => return Ended::Io("connect timed out".into()),
        };
        tracing::info!(host = %self.cfg.host, port = self.cfg.port, callsign = %self.cfg.callsign, "dx cluster connected");
        let mut lease = self.lease.clone();
        let mut lines = LineReader::default();
        let mut logged_in = false;
        let mut password_sent = false;
        let mut buf = [0u8; 4096];
        let prompt_deadline = tokio::time::Instant::now() + PROMPT_WAIT;
        loop {
            let silence = if logged_in {
                self.cfg.silence_timeout
            } else {
                prompt_deadline
                    .saturating_duration_since(tokio::time::Instant::now())
                    .max(Duration::from_millis(1))
            };
            let read = tokio::select! {
                _ = shutdown.wait() => return Ended::Shutdown,
                _ = lease.wait_for(|held| !*held) => return Ended::LeaseLost,
                read = tokio::time::timeout(silence, conn.read(&mut buf)) => read,
            };
            let n = match read {
                Err(_) if !logged_in => {
                    // No prompt: some nodes take the callsign without asking.
                    if let Err(e) = self.send_login(&mut conn).await {
                        return Ended::Io(e);
                    }
                    logged_in = true;
                    continue;
                }
                Err(_) => return Ended::Silent,
                Ok(Err(e)) => return Ended::Io(e.to_string()),
                Ok(Ok(0)) => return Ended::Closed,
                Ok(Ok(n)) => n,
            };
            lines.feed(&buf[..n]);
            match lines.prompt() {
                Some(Prompt::Login) if !logged_in => {
                    if let Err(e) = self.send_login(&mut conn).await {
                        return Ended::Io(e);
                    }
                    logged_in = true;
                }
                // The password is asked for after the callsign.
                Some(Prompt::Password) if !password_sent => {
                    password_sent = true;
                    let pass = format!("{}\r\n", self.cfg.password.expose_str());
                    if let Err(e) = conn.write_all(pass.as_bytes()).await {
                        return Ended::Io(e.to_string());
                    }
                }
                _ => {}
            }
            while let Some(line) = lines.next_line() {
                self.on_line(line).await;
            }
        }
    }

    async fn send_login(&self, conn: &mut TcpStream) -> Result<(), String> {
        let login = format!("{}\r\n", self.cfg.callsign);
        conn.write_all(login.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        self.set_up(true);
        tracing::info!(callsign = %self.cfg.callsign, "dx cluster: logged in");
        Ok(())
    }

    fn set_up(&self, up: bool) {
        let mut link = lock(&self.link);
        if link.up && !up {
            link.down_since = Instant::now();
        }
        link.up = up;
        self.state
            .metrics
            .dx
            .connected
            .store(i64::from(up), Ordering::Relaxed);
    }

    /// A line, `None` when it was too long (dropped whole).
    async fn on_line(&self, line: Option<Vec<u8>>) {
        let metrics = &self.state.metrics.dx;
        metrics.lines.inc();
        let Some(raw) = line.as_deref().and_then(parse_line) else {
            metrics.ignored.inc();
            return;
        };
        let Some(band) = enrich::band(raw.frequency) else {
            metrics.ignored.inc();
            return;
        };
        // Spots flow: the topic is (again) registered, repeats included.
        self.ensure_registered().await;
        if self.repeated(&raw) {
            metrics.duplicates.inc();
            return;
        }
        self.publish(raw, band).await;
    }

    fn repeated(&self, raw: &RawSpot) -> bool {
        let key = (
            raw.spotted.clone(),
            (raw.frequency * 10.0).round() as i64,
            raw.spotter.clone(),
        );
        let mut dedupe = lock(&self.dedupe);
        let now = Instant::now();
        if dedupe
            .get(&key)
            .is_some_and(|seen| now.duration_since(*seen) < DEDUPE_WINDOW)
        {
            return true;
        }
        dedupe.insert(key, now);
        false
    }

    async fn publish(&self, raw: RawSpot, band: &'static str) {
        let (spotted, spotter) = match &self.lookup {
            Some(lookup) => tokio::join!(lookup.get(&raw.spotted), lookup.get(&raw.spotter)),
            None => (None, None),
        };
        let payload = spot::payload(&raw, band, spotted, spotter, crate::time::unix_ms());
        let published = self.state.publish(&self.cfg.topic, &payload, META).await;
        if published.id.is_some() {
            self.state.metrics.dx.spots.inc();
        }
    }

    /// Registers the topic when spots flow and it is not registered (or the registration is
    /// due for renewal, so it never expires while the relay runs).
    async fn ensure_registered(&self) {
        let due = {
            let link = lock(&self.link);
            let renew = (self.state.config.topic_ttl / 2).min(Duration::from_secs(3600));
            link.registered_at.is_none_or(|at| at.elapsed() >= renew)
        };
        if due {
            if let Err(e) = self.state.register_topic(&self.cfg.topic, META).await {
                tracing::warn!("dx cluster: cannot register {}: {e:?}", self.cfg.topic);
                return;
            }
            let first = lock(&self.link)
                .registered_at
                .replace(Instant::now())
                .is_none();
            if first {
                tracing::info!(topic = %self.cfg.topic, "dx cluster: topic registered, live spots on");
            }
        }
    }

    /// Renews the registration while the node is up; unregisters once it has been down for
    /// `unregister_after`.
    async fn keep_registration(self: Arc<Self>, mut shutdown: Shutdown) {
        let every = (self.cfg.unregister_after / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tick.tick() => {}
            }
            let (up, down_for, registered) = {
                let link = lock(&self.link);
                (
                    link.up,
                    link.down_since.elapsed(),
                    link.registered_at.is_some(),
                )
            };
            if up && registered && *self.lease.borrow() {
                self.ensure_registered().await;
            } else if !up && registered && down_for >= self.cfg.unregister_after {
                lock(&self.link).registered_at = None;
                if *self.lease.borrow() {
                    self.state.unregister_topic(&self.cfg.topic).await;
                    tracing::warn!(topic = %self.cfg.topic, "dx cluster unreachable: topic unregistered, Wavelog polls again");
                }
            }
        }
    }

    /// Cluster mode: takes and renews the relay lease; another node takes over within
    /// `LEASE_TTL` plus `LEASE_RENEW` after the holder dies.
    async fn keep_lease(self: Arc<Self>, mut shutdown: Shutdown) {
        let held = &self.lease_tx;
        let Some(cluster) = self.state.cluster.clone() else {
            return;
        };
        let mut tick = tokio::time::interval(LEASE_RENEW);
        loop {
            tokio::select! {
                _ = shutdown.wait() => {
                    if *held.borrow() {
                        cluster.release_lease(LEASE_KEY).await;
                    }
                    return;
                }
                _ = tick.tick() => {}
            }
            let holds = cluster.hold_lease(LEASE_KEY, LEASE_TTL).await;
            held.send_if_modified(|h| std::mem::replace(h, holds) != holds);
        }
    }
}

/// What a node's unfinished line asks for.
enum Prompt {
    Login,
    Password,
}

/// Splits what the node sends into lines (CR, LF or both), dropping over-long lines whole.
#[derive(Default)]
struct LineReader {
    pending: Vec<u8>,
    /// The current line grew past `MAX_LINE`: skip to its end.
    skipping: bool,
    ready: std::collections::VecDeque<Option<Vec<u8>>>,
}

impl LineReader {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' || b == b'\r' {
                if self.skipping {
                    self.ready.push_back(None);
                } else if !self.pending.is_empty() {
                    self.ready
                        .push_back(Some(std::mem::take(&mut self.pending)));
                }
                self.pending.clear();
                self.skipping = false;
            } else if !self.skipping {
                self.pending.push(b);
                if self.pending.len() > MAX_LINE {
                    self.pending.clear();
                    self.skipping = true;
                }
            }
        }
    }

    /// The next complete line (`None` inside: a line that was too long).
    fn next_line(&mut self) -> Option<Option<Vec<u8>>> {
        self.ready.pop_front()
    }

    /// A login or password prompt at the end of what arrived (prompts end without a newline).
    fn prompt(&self) -> Option<Prompt> {
        let tail = String::from_utf8_lossy(&self.pending)
            .trim()
            .to_ascii_lowercase();
        if tail.ends_with("login:") || tail.ends_with("call:") || tail.ends_with("callsign:") {
            Some(Prompt::Login)
        } else if tail.ends_with("password:") {
            Some(Prompt::Password)
        } else {
            None
        }
    }
}
