//! Prometheus metrics, kept as plain atomics (no registry, no locks on the hot path) and
//! rendered in the text exposition format at `GET /metrics` on the internal listener.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::AppState;

/// A set of counters with one label whose values are known up front.
pub struct CounterVec<const N: usize> {
    label: &'static str,
    names: [&'static str; N],
    values: [AtomicU64; N],
}

impl<const N: usize> CounterVec<N> {
    const fn new(label: &'static str, names: [&'static str; N]) -> Self {
        CounterVec {
            label,
            names,
            values: [const { AtomicU64::new(0) }; N],
        }
    }

    pub fn inc(&self, name: &str) {
        self.add(name, 1);
    }

    pub fn add(&self, name: &str, n: u64) {
        if let Some(i) = self.names.iter().position(|x| *x == name) {
            self.values[i].fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn get(&self, name: &str) -> u64 {
        self.names
            .iter()
            .position(|x| *x == name)
            .map_or(0, |i| self.values[i].load(Ordering::Relaxed))
    }

    fn render(&self, out: &mut String, metric: &str) {
        for (name, value) in self.names.iter().zip(&self.values) {
            let _ = writeln!(
                out,
                "{metric}{{{}=\"{name}\"}} {}",
                self.label,
                value.load(Ordering::Relaxed)
            );
        }
    }
}

/// Publish-to-send latency, microsecond resolution.
pub struct Histogram {
    bounds_us: [u64; 14],
    buckets: [AtomicU64; 14],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    const fn new() -> Self {
        Histogram {
            bounds_us: [
                100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
                500_000, 1_000_000, 2_500_000,
            ],
            buckets: [const { AtomicU64::new(0) }; 14],
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        self.observe_many(d, 1);
    }

    /// `n` observations of the same duration.
    pub fn observe_many(&self, d: Duration, n: u64) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        if let Some(i) = self.bounds_us.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(n, Ordering::Relaxed);
        }
        self.count.fetch_add(n, Ordering::Relaxed);
        self.sum_us
            .fetch_add(us.saturating_mul(n), Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, metric: &str) {
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds_us.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{metric}_bucket{{le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e6
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{metric}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{metric}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{metric}_count {count}");
    }
}

/// The two transports, as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Sse,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Sse => "sse",
        }
    }
}

pub struct Metrics {
    ws_open: AtomicI64,
    sse_open: AtomicI64,
    pub connections_opened: CounterVec<2>,
    pub connections_closed: CounterVec<2>,
    pub auth_failures: CounterVec<9>,
    pub publishes: CounterVec<5>,
    pub deliveries: AtomicU64,
    pub resyncs: CounterVec<4>,
    pub lagged_events: AtomicU64,
    /// Publishes that reached local subscribers only (Redis away).
    pub cluster_publish_failures: AtomicU64,
    pub limit_refusals: CounterVec<6>,
    /// WebSocket closes, by why.
    pub ws_disconnects: CounterVec<12>,
    pub publish_to_send: Histogram,
    /// The DX cluster relay.
    pub dx: DxMetrics,
}

/// A plain counter.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What the DX cluster relay did.
#[derive(Default)]
pub struct DxMetrics {
    /// 1 while logged in at the cluster node.
    pub connected: AtomicI64,
    pub lines: Counter,
    pub spots: Counter,
    pub ignored: Counter,
    pub duplicates: Counter,
    pub lookup_hits: Counter,
    pub lookup_misses: Counter,
    pub lookup_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            ws_open: AtomicI64::new(0),
            sse_open: AtomicI64::new(0),
            connections_opened: CounterVec::new("transport", ["websocket", "sse"]),
            connections_closed: CounterVec::new("transport", ["websocket", "sse"]),
            auth_failures: CounterVec::new(
                "reason",
                [
                    "auth_required",
                    "malformed",
                    "bad_signature",
                    "bad_claims",
                    "expired",
                    "wrong_topic",
                    "not_found",
                    "auth_timeout",
                    "origin",
                ],
            ),
            publishes: CounterVec::new(
                "result",
                ["ok", "bad_request", "not_found", "too_large", "coalesced"],
            ),
            deliveries: AtomicU64::new(0),
            resyncs: CounterVec::new("cause", ["lagged", "resume", "cluster", "order"]),
            lagged_events: AtomicU64::new(0),
            cluster_publish_failures: AtomicU64::new(0),
            limit_refusals: CounterVec::new(
                "limit",
                [
                    "max_connections",
                    "max_connections_per_ip",
                    "max_topics",
                    "max_payload_bytes",
                    "auth_failures",
                    "topic_probes",
                ],
            ),
            publish_to_send: Histogram::new(),
            ws_disconnects: CounterVec::new(
                "reason",
                [
                    "client_closed",
                    "connection_lost",
                    "refused",
                    "auth_timeout",
                    "idle_timeout",
                    "frame_too_large",
                    "invalid_frame",
                    "client_not_reading",
                    "token_expired",
                    "shutdown",
                    "flooding",
                    "too_many_failures",
                ],
            ),
            dx: DxMetrics::default(),
        }
    }
}

/// Counts one open connection; dropping it counts the close.
pub struct ConnectionGauge {
    metrics: Arc<Metrics>,
    transport: Transport,
}

impl Metrics {
    pub fn open(self: &Arc<Self>, transport: Transport) -> ConnectionGauge {
        self.gauge(transport).fetch_add(1, Ordering::Relaxed);
        self.connections_opened.inc(transport.label());
        ConnectionGauge {
            metrics: self.clone(),
            transport,
        }
    }

    fn gauge(&self, transport: Transport) -> &AtomicI64 {
        match transport {
            Transport::WebSocket => &self.ws_open,
            Transport::Sse => &self.sse_open,
        }
    }

    /// The whole exposition, with the gauges read from `state` now. `registered_topics` comes
    /// from the caller because in cluster mode counting it asks Redis.
    pub fn render(&self, state: &AppState, registered_topics: usize) -> String {
        let mut out = String::with_capacity(8192);
        let o = &mut out;
        let (clients, _) = state.presence.counts();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);

        family(o, "build_info", "gauge", "Build information.");
        let _ = writeln!(
            o,
            "wavelog_worker_build_info{{version=\"{}\"}} 1",
            crate::VERSION
        );
        sample(
            o,
            "uptime_seconds",
            "gauge",
            "Seconds since start.",
            state.started.elapsed().as_secs(),
        );
        family(o, "connections", "gauge", "Open connections by transport.");
        for t in [Transport::WebSocket, Transport::Sse] {
            let n = self.gauge(t).load(Ordering::Relaxed);
            let _ = writeln!(
                o,
                "wavelog_worker_connections{{transport=\"{}\"}} {n}",
                t.label()
            );
        }
        sample(
            o,
            "connected_clients",
            "gauge",
            "Distinct authenticated users plus anonymous connections.",
            clients,
        );
        let dx = &self.dx;
        sample(
            o,
            "dx_upstream_connected",
            "gauge",
            "1 while the DX cluster relay is logged in at its node.",
            dx.connected.load(Ordering::Relaxed),
        );
        for (name, help, counter) in [
            ("dx_lines_total", "Lines read from the DX cluster node.", &dx.lines),
            ("dx_spots_published_total", "Spots published.", &dx.spots),
            ("dx_lines_ignored_total", "Lines that were no valid spot (announcements, prompts, malformed, too long, no band).", &dx.ignored),
            ("dx_spots_duplicate_total", "Spots dropped as repeats of one seen shortly before.", &dx.duplicates),
            ("dx_lookup_cache_hits_total", "Callsign lookups answered from the cache.", &dx.lookup_hits),
            ("dx_lookup_cache_misses_total", "Callsign lookups sent to Wavelog.", &dx.lookup_misses),
            ("dx_lookup_errors_total", "Callsign lookups that failed.", &dx.lookup_errors),
        ] {
            sample(o, name, "counter", help, counter.get());
        }
        sample(
            o,
            "throttle_tracked_clients",
            "gauge",
            "Clients with failures on record (token guesses and topic probes; bounded).",
            (state.auth_throttle.tracked() + state.probe_throttle.tracked()) as u64,
        );
        sample(
            o,
            "registry_cache_negative_entries",
            "gauge",
            "Cluster mode: cached answers that a topic is not registered (bounded, kept for registry_cache_ttl).",
            state.cluster.as_ref().map_or(0, |c| c.negative_entries()) as u64,
        );
        labelled(
            o,
            "connections_opened_total",
            "Connections opened, by transport.",
            &self.connections_opened,
        );
        labelled(
            o,
            "connections_closed_total",
            "Connections closed, by transport.",
            &self.connections_closed,
        );
        labelled(
            o,
            "auth_failures_total",
            "Refused connections and subscriptions, by reason.",
            &self.auth_failures,
        );
        labelled(
            o,
            "publishes_total",
            "Internal publish requests, by result.",
            &self.publishes,
        );
        sample(
            o,
            "deliveries_total",
            "counter",
            "Events handed to subscribers.",
            load(&self.deliveries),
        );
        labelled(
            o,
            "resyncs_total",
            "resync frames sent, by cause.",
            &self.resyncs,
        );
        sample(
            o,
            "lagged_events_total",
            "counter",
            "Events skipped for subscribers that fell behind (each told to resync).",
            load(&self.lagged_events),
        );
        labelled(
            o,
            "limit_refusals_total",
            "Requests refused by a configured limit.",
            &self.limit_refusals,
        );
        labelled(
            o,
            "websocket_disconnects_total",
            "WebSocket closes, by reason (idle_timeout, auth_timeout, frame_too_large, ...).",
            &self.ws_disconnects,
        );
        sample(
            o,
            "registered_topics",
            "gauge",
            "Registered topics.",
            registered_topics,
        );
        sample(
            o,
            "active_topics",
            "gauge",
            "Topics with at least one subscriber.",
            state.hub.active_topics().len(),
        );
        sample(
            o,
            "history_bytes",
            "gauge",
            "Memory held by event history.",
            state.hub.history_bytes(),
        );
        if let Some(cluster) = &state.cluster {
            sample(
                o,
                "redis_connected",
                "gauge",
                "1 while the link to Redis is up (cluster mode).",
                u8::from(cluster.is_up()),
            );
            sample(
                o,
                "redis_reconnects_total",
                "counter",
                "Times the link to Redis was lost and retried.",
                cluster.reconnects(),
            );
            sample(o, "cluster_publish_failures_total", "counter", "Publishes that reached local subscribers only because Redis was away (other nodes' subscribers get resync).", load(&self.cluster_publish_failures));
        }
        family(
            o,
            "publish_to_send_seconds",
            "histogram",
            "Time from a publish until its fan-out handed the frame to every subscriber's socket \
             (or, for a full socket, its queue); counted once per delivery.",
        );
        self.publish_to_send
            .render(o, "wavelog_worker_publish_to_send_seconds");
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(
        out,
        "# HELP wavelog_worker_{name} {help}\n# TYPE wavelog_worker_{name} {kind}"
    );
}

fn sample(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "wavelog_worker_{name} {value}");
}

fn labelled<const N: usize>(out: &mut String, name: &str, help: &str, counters: &CounterVec<N>) {
    family(out, name, "counter", help);
    counters.render(out, &format!("wavelog_worker_{name}"));
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.metrics
            .gauge(self.transport)
            .fetch_sub(1, Ordering::Relaxed);
        self.metrics.connections_closed.inc(self.transport.label());
    }
}
