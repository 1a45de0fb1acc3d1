//! wavelog-worker: a real-time push gateway for Wavelog.
//!
//! `start` binds both listeners and returns a handle; `main.rs` only parses the command line and
//! calls `run`, so tests start exactly the same server in-process on port 0.

pub mod admission;
mod bounded;
pub mod cidr;
pub mod cluster;
pub mod config;
pub mod duration;
pub mod dxcluster;
pub mod hub;
pub mod metrics;
pub mod presence;
pub mod protocol;
pub mod registry;
pub mod routes;
pub mod session;
pub mod status;
mod sync;
pub mod time;
pub mod token;
pub mod transport;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use cluster::Cluster;
pub use config::Config;
use hub::{HistoryLimits, Hub, Published, CLUSTER_SCALE};
use metrics::Metrics;
use presence::Presence;
use registry::Registry;
use registry::{RegistryFull, TopicMeta};
use transport::{Service, Shutdown, Tracker};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Everything the routes share.
pub struct AppState {
    pub config: Config,
    pub registry: Registry,
    pub hub: Arc<Hub>,
    pub presence: Arc<Presence>,
    /// Present in cluster mode (`redis_url` set).
    pub cluster: Option<Arc<Cluster>>,
    pub metrics: Arc<Metrics>,
    /// Browser tokens are checked with this key (the worker secret, keyed once).
    pub token_key: token::Key,
    pub limits: admission::ConnectionLimits,
    /// Token guesses (bad signatures, undecodable tokens) per client.
    pub auth_throttle: admission::AuthThrottle,
    /// Probes of unregistered topics per client.
    pub probe_throttle: admission::AuthThrottle,
    pub started: Instant,
    pub shutdown: Shutdown,
    /// Open WebSockets (and later streams), so shutdown can wait for them to close.
    pub sockets: Arc<Tracker>,
    next_conn_id: AtomicU64,
}

impl AppState {
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A registered topic's meta: the local registry standalone, Redis (cached) in a cluster.
    pub async fn lookup_topic(&self, topic: &str) -> Option<TopicMeta> {
        match &self.cluster {
            Some(cluster) => cluster.lookup(topic).await,
            None => self.registry.lookup(topic),
        }
    }

    pub async fn register_topic(&self, topic: &str, meta: TopicMeta) -> Result<(), RegistryFull> {
        match &self.cluster {
            Some(cluster) => {
                cluster.register(topic, meta).await;
                Ok(())
            }
            None => self.registry.register(topic, meta),
        }
    }

    pub async fn unregister_topic(&self, topic: &str) {
        match &self.cluster {
            Some(cluster) => cluster.unregister(topic).await,
            None => self.registry.unregister(topic),
        }
    }

    pub async fn publish(&self, topic: &str, payload: &str, meta: TopicMeta) -> Published {
        match &self.cluster {
            Some(cluster) => cluster.publish(topic, payload, meta.coalesce()).await,
            None => self.hub.publish(topic, payload, meta.coalesce()),
        }
    }

    /// Registered topics (cluster-wide in cluster mode), sorted.
    pub async fn topic_names(&self) -> Vec<String> {
        match &self.cluster {
            Some(cluster) => cluster.topic_names().await,
            None => self.registry.names(),
        }
    }

    /// Nodes on the events channel; -1 standalone.
    pub async fn cluster_nodes(&self) -> i64 {
        match &self.cluster {
            Some(cluster) => cluster.node_count().await,
            None => -1,
        }
    }

    /// Serving and, in cluster mode, connected to Redis.
    pub fn is_ready(&self) -> bool {
        !self.shutdown.is_down() && self.cluster.as_ref().is_none_or(|c| c.is_up())
    }
}

/// Why the worker could not start.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

/// A running worker.
pub struct Worker {
    pub public_addr: SocketAddr,
    pub internal_addr: SocketAddr,
    pub state: Arc<AppState>,
    trigger: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Binds both listeners and starts serving.
pub async fn start(config: Config) -> Result<Worker, StartError> {
    let bind_error = |key: &str, bind: &str, port: u16, e: std::io::Error| {
        let shown = if bind.is_empty() { "*" } else { bind };
        StartError(format!(
            "config error: key \"{key}\": cannot listen on {shown}:{port}: {e}"
        ))
    };
    let public = transport::listen(&config.ws_bind, config.ws_port)
        .await
        .map_err(|e| bind_error("ws_port", &config.ws_bind, config.ws_port, e))?;
    let internal = transport::listen(&config.internal_bind, config.internal_port)
        .await
        .map_err(|e| {
            bind_error(
                "internal_port",
                &config.internal_bind,
                config.internal_port,
                e,
            )
        })?;
    transport::defer_accept(&public, config.header_timeout);
    let public_addr = public.local_addr().map_err(|e| StartError(e.to_string()))?;
    let internal_addr = internal
        .local_addr()
        .map_err(|e| StartError(e.to_string()))?;

    if config.worker_secret.expose() == config::SAMPLE_SECRET.as_bytes() {
        tracing::warn!(
            "worker_secret is the SAMPLE secret from the repository's worker.toml: \
             generate your own with `wavelog-worker gen-secret` before going live"
        );
    }

    let (trigger, shutdown) = Shutdown::new();
    let metrics = Arc::new(Metrics::default());
    let scale = if config.redis_url.is_some() {
        CLUSTER_SCALE
    } else {
        1
    };
    let hub = Hub::new(
        HistoryLimits {
            size: config.history_size,
            ttl: config.history_ttl,
            max_bytes: config.max_history_bytes,
        },
        metrics.clone(),
        scale,
    );
    let cluster = match &config.redis_url {
        Some(url) => Some(
            Cluster::new(
                url,
                hub.clone(),
                metrics.clone(),
                config.topic_ttl,
                config.registry_cache_ttl,
            )
            .map_err(|e| StartError(format!("config error: key \"redis_url\": {e}")))?,
        ),
        None => None,
    };
    let state = Arc::new(AppState {
        metrics: metrics.clone(),
        auth_throttle: admission::AuthThrottle::new(
            config.auth_failure_burst,
            config.auth_failures_per_minute,
        ),
        probe_throttle: admission::AuthThrottle::new(
            config.topic_probe_burst,
            config.topic_probes_per_minute,
        ),
        limits: admission::ConnectionLimits::new(
            config.max_connections,
            config.max_connections_per_ip,
        ),
        registry: Registry::new(config.topic_ttl, config.max_topics),
        hub,
        presence: Presence::new(),
        cluster: cluster.clone(),
        started: Instant::now(),
        shutdown: shutdown.clone(),
        sockets: Arc::new(Tracker::default()),
        next_conn_id: AtomicU64::new(1),
        token_key: token::Key::new(config.worker_secret.expose()),
        config,
    });

    let (header_timeout, stall) = (state.config.header_timeout, state.config.idle_timeout);
    let public_service = Service {
        routes: routes::public(state.clone()),
        streams: Some(session::streams(state.clone())),
        header_timeout,
        stall,
    };
    let internal_service = Service {
        routes: routes::internal(state.clone()),
        streams: None,
        header_timeout,
        stall,
    };
    let mut tasks = vec![
        tokio::spawn(transport::serve(public, public_service, shutdown.clone())),
        tokio::spawn(transport::serve(
            internal,
            internal_service,
            shutdown.clone(),
        )),
        tokio::spawn(sweep(state.clone())),
    ];
    if let Some(cluster) = cluster {
        tasks.push(tokio::spawn(cluster.run(shutdown.clone())));
    }
    if let Some(dx) = state.config.dxcluster.clone() {
        dxcluster::start(state.clone(), dx, shutdown.clone());
    }
    tracing::info!(
        version = VERSION,
        public = %public_addr,
        internal = %internal_addr,
        "wavelog-worker listening"
    );
    Ok(Worker {
        public_addr,
        internal_addr,
        state,
        trigger,
        tasks,
    })
}

impl Worker {
    /// Stops accepting, closes every socket (spread over `shutdown_drain`), and returns once
    /// they are closed or the drain window plus one second has passed.
    pub async fn shutdown(self) {
        let _ = self.trigger.send(true);
        let limit = self.state.config.shutdown_drain + Duration::from_millis(900);
        let _ = tokio::time::timeout(limit, self.state.sockets.wait_idle()).await;
        for task in self.tasks {
            task.abort();
        }
        tracing::info!("wavelog-worker stopped");
    }
}

/// Runs until SIGINT or SIGTERM, then shuts down gracefully.
pub async fn run(config: Config) -> Result<(), StartError> {
    let worker = start(config).await?;
    wait_for_signal().await;
    tracing::info!("shutting down");
    worker.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Drops expired topics and history now and then, so a backend that never unregisters can't
/// grow us.
async fn sweep(state: Arc<AppState>) {
    let shortest = state.config.topic_ttl.min(state.config.history_ttl);
    let every = shortest.clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        state.hub.sweep();
        state.auth_throttle.sweep();
        state.probe_throttle.sweep();
        if let Some(cluster) = &state.cluster {
            cluster.sweep_cache();
        }
        // malloc_trim walks the heap: off the runtime's threads.
        let _ = tokio::task::spawn_blocking(trim_heap).await;
        let dropped = state.registry.sweep();
        if dropped > 0 {
            tracing::debug!(dropped, "expired topics swept");
        }
    }
}

/// Gives freed heap memory back to the OS (glibc keeps it otherwise), so RSS falls again after
/// thousands of clients left at once.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory at the top of the heaps and in free pages.
    unsafe {
        libc::malloc_trim(0);
    }
}
