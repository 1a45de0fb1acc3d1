//! fanout-bench: measures a running wavelog-worker the way a contest weekend loads it.
//!
//! It starts the worker (or several, in cluster mode), opens N subscribers (WebSocket or SSE)
//! over K topics from several loopback addresses, publishes M events at rate R through the
//! internal API (keep-alive HTTP, F requests in flight), and measures every delivery's latency
//! from publish to receipt (a monotonic timestamp in the payload), plus loss, duplicates,
//! reordering and resyncs. From /proc it reads the worker's CPU time and RSS around each phase
//! and reports the figures that do not depend on how fast this tool is: server CPU per delivery,
//! server CPU per accepted connection, RSS per connection; and its own CPU, so a reader sees when
//! the tool is the limit.
//!
//! `fanout-bench run ...` measures one scenario; `fanout-bench report` turns result files into
//! the table and chart of docs/benchmarks.md.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use wavelog_tools::{
    cpu_ns, dies_with_us, free_port, raise_fd_limit, rss_kib, user_kernel_ns, ws_client_frame,
    ws_upgrade_request, ChunkedSse, WsFrames, WS_SAMPLE_ACCEPT,
};
use wavelog_worker::token::{self, Claims};

#[derive(Parser)]
#[command(name = "fanout-bench", about = "Fan-out benchmark for wavelog-worker")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Measure one scenario.
    Run(RunArgs),
    /// (Internal) One tool process of a `run --processes N`: reads its plan on stdin.
    #[command(hide = true)]
    Subscribe,
    /// Build the markdown table and SVG chart from result files.
    Report {
        /// Result JSON files (from `run --json`).
        inputs: Vec<PathBuf>,
        #[arg(long)]
        markdown: PathBuf,
        #[arg(long)]
        svg: PathBuf,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug, Serialize, Deserialize)]
enum Transport {
    Ws,
    Sse,
}

#[derive(Parser, Clone)]
struct RunArgs {
    /// Subscribers to open.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Topics the subscribers are spread over (round-robin).
    #[arg(long, default_value_t = 1)]
    topics: usize,
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    transport: Transport,
    /// Events to publish.
    #[arg(long, default_value_t = 100)]
    events: usize,
    /// Publish rate, events per second.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Publish requests in flight (keep-alive connections to the internal API).
    #[arg(long, default_value_t = 4)]
    in_flight: usize,
    /// Padding added to each payload, bytes.
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// Handshakes in progress at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Loopback addresses to spread client sockets over (127.0.0.1, 127.0.0.2, ...).
    #[arg(long, default_value_t = 4)]
    bind_ips: u8,
    /// Seconds of idleness measured after connecting.
    #[arg(long, default_value_t = 2.0)]
    idle_secs: f64,
    /// Worker binary to start (default: `wavelog-worker` next to this binary).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// Measure nchan (nginx with its pub/sub module) instead of the worker, as a reference:
    /// the same subscribers on its `/sub` endpoint, publishes to its `/pub` endpoint.
    #[arg(long)]
    nchan: bool,
    /// nginx for `--nchan` (with `libnginx-mod-nchan` installed).
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx_bin: PathBuf,
    /// Worker nodes to start; more than one means cluster mode (needs --redis-url).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Redis for cluster mode; subscribers are spread over the nodes, publishes go to node 1.
    #[arg(long)]
    redis_url: Option<String>,
    /// Extra `key = value` lines for the worker's config.
    #[arg(long)]
    worker_config: Vec<String>,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Scenario name in reports.
    #[arg(long)]
    label: Option<String>,
    /// Exit non-zero unless every delivery arrived exactly once and in order.
    #[arg(long)]
    require_no_loss: bool,
    /// Tool processes the subscribers are split over (one process holds at most ~19,000
    /// sockets: the per-process open-file limit).
    #[arg(long, default_value_t = 1)]
    processes: usize,
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Run(args) => {
            raise_fd_limit();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            let result = runtime.block_on(run(args.clone()));
            match result {
                Ok(report) => {
                    print_summary(&report);
                    if let Some(path) = &args.json {
                        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
                        if let Err(e) = std::fs::write(path, text) {
                            eprintln!("cannot write {}: {e}", path.display());
                            std::process::exit(1);
                        }
                    }
                    let clean = report["delivery"]["lost"] == 0
                        && report["delivery"]["duplicates"] == 0
                        && report["delivery"]["reordered"] == 0
                        && report["delivery"]["resyncs"] == 0;
                    if args.require_no_loss && !clean {
                        eprintln!(
                            "FAILED: deliveries were lost, duplicated, reordered or resynced"
                        );
                        std::process::exit(1);
                    }
                }
                Err(e) => {
                    eprintln!("fanout-bench: {e}");
                    std::process::exit(1);
                }
            }
        }
        Cmd::Subscribe => {
            raise_fd_limit();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            if let Err(e) = runtime.block_on(subscribe_process()) {
                eprintln!("fanout-bench subscribe: {e}");
                std::process::exit(1);
            }
        }
        Cmd::Report {
            inputs,
            markdown,
            svg,
        } => {
            if let Err(e) = report(&inputs, &markdown, &svg) {
                eprintln!("fanout-bench report: {e}");
                std::process::exit(1);
            }
        }
    }
}

/// CPU time (all threads, ns; and split into user and kernel time) and RSS (KiB) of a
/// process, from /proc.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    cpu_ns: u64,
    user_ns: u64,
    kernel_ns: u64,
    rss_kib: u64,
}

fn usage(pid: u32) -> Usage {
    let (user_ns, kernel_ns) = user_kernel_ns(pid);
    Usage {
        cpu_ns: cpu_ns(pid),
        user_ns,
        kernel_ns,
        rss_kib: rss_kib(pid),
    }
}

fn usages(pids: &[u32]) -> Usage {
    pids.iter()
        .map(|p| usage(*p))
        .fold(Usage::default(), |a, b| Usage {
            cpu_ns: a.cpu_ns + b.cpu_ns,
            user_ns: a.user_ns + b.user_ns,
            kernel_ns: a.kernel_ns + b.kernel_ns,
            rss_kib: a.rss_kib + b.rss_kib,
        })
}

/// Microseconds per item of the user and kernel CPU spent between `a` and `b`.
fn split_us(a: &Usage, b: &Usage, items: u64) -> (f64, f64) {
    let per = |x: u64, y: u64| y.saturating_sub(x) as f64 / 1e3 / items.max(1) as f64;
    (per(a.user_ns, b.user_ns), per(a.kernel_ns, b.kernel_ns))
}

/// A worker process started for the run; killed on drop.
struct Node {
    child: Child,
    public: SocketAddr,
    internal: SocketAddr,
    _config: TempConfig,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempConfig(PathBuf);

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Starts one worker on free ports; retries with other ports if it could not bind (another
/// process may take a port between our probe and the worker's bind).
async fn start_node(args: &RunArgs, secret: &str, index: usize) -> Result<Node, String> {
    let mut last_error = String::new();
    for _ in 0..5 {
        match try_start_node(args, secret, index).await {
            Ok(node) => return Ok(node),
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

async fn try_start_node(args: &RunArgs, secret: &str, index: usize) -> Result<Node, String> {
    let bin = match &args.worker_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("wavelog-worker"),
    };
    let (public_port, internal_port) = (
        free_port().map_err(|e| e.to_string())?,
        free_port().map_err(|e| e.to_string())?,
    );
    let mut config = format!(
        "worker_secret = \"{secret}\"\nws_bind = \"127.0.0.1\"\nws_port = {public_port}\n\
         internal_port = {internal_port}\nmax_connections = 1000000\nmax_connections_per_ip = 1000000\n\
         idle_timeout = \"10m\"\nping_interval = \"5m\"\n"
    );
    if let Some(url) = &args.redis_url {
        config.push_str(&format!("redis_url = \"{url}\"\n"));
    }
    for line in &args.worker_config {
        config.push_str(line);
        config.push('\n');
    }
    let path = std::env::temp_dir().join(format!(
        "fanout-bench-{}-{index}-{public_port}.toml",
        std::process::id()
    ));
    std::fs::write(&path, config).map_err(|e| e.to_string())?;
    let child = dies_with_us(&mut Command::new(&bin))
        .args(["--config", path.to_str().unwrap_or("")])
        .env("RUST_LOG", "warn")
        .env_remove("WORKER_SECRET")
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let mut node = Node {
        child,
        public: SocketAddr::from(([127, 0, 0, 1], public_port)),
        internal: SocketAddr::from(([127, 0, 0, 1], internal_port)),
        _config: TempConfig(path),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = node.child.try_wait() {
            return Err(format!("worker {index} exited: {status}"));
        }
        let ready = http_once(node.public, "GET", "/readyz", "", "").await;
        if matches!(ready, Ok((200, _))) {
            return Ok(node);
        }
        if Instant::now() > deadline {
            return Err(format!("worker {index} did not become ready: {ready:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// nginx with the nchan module, started for a reference run; stopped on drop.
struct Nchan {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Nchan {
    /// Two worker processes (one per core, as nginx's `auto` would pick here), each allowed
    /// what one process may hold; subscribers on `/sub?topic=T`, publishes to `/pub?topic=T`.
    async fn start(nginx: &Path) -> Result<Nchan, String> {
        let port = free_port().map_err(|e| e.to_string())?;
        let dir = std::env::temp_dir().join(format!("fanout-bench-nchan-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("logs")).map_err(|e| e.to_string())?;
        let module = "/usr/lib/nginx/modules/ngx_nchan_module.so";
        if !Path::new(module).exists() {
            return Err(format!(
                "{module} is missing: apt-get install libnginx-mod-nchan"
            ));
        }
        let conf = format!(
            "load_module {module};\nworker_processes 2;\nworker_rlimit_nofile 19000;\n\
             error_log {dir}/logs/error.log warn;\npid {dir}/nginx.pid;\n\
             events {{ worker_connections 18000; }}\n\
             http {{\n  access_log off;\n  server {{\n    listen 127.0.0.1:{port} backlog=4096;\n\
             location = /sub {{ nchan_subscriber websocket eventsource; nchan_channel_id $arg_topic; }}\n\
             location = /pub {{ nchan_publisher; nchan_channel_id $arg_topic; }}\n  }}\n}}\n",
            dir = dir.display()
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).map_err(|e| e.to_string())?;
        let child = dies_with_us(&mut Command::new(nginx))
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(&dir)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", nginx.display()))?;
        let nchan = Nchan {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while nchan.pids().len() < 3 || TcpStream::connect(nchan.addr).await.is_err() {
            if Instant::now() > deadline {
                return Err("nginx with nchan did not start".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(nchan)
    }

    /// The master and its workers.
    fn pids(&self) -> Vec<u32> {
        let master = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .unwrap_or_default();
        std::iter::once(master)
            .chain(children.split_whitespace().filter_map(|p| p.parse().ok()))
            .collect()
    }
}

impl Drop for Nchan {
    fn drop(&mut self) {
        let workers: Vec<u32> = self.pids().into_iter().skip(1).collect();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in workers {
            // SAFETY: signals a worker of ours, read from /proc a moment ago.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One HTTP/1.1 request on a fresh connection (setup only, not the measured path).
async fn http_once(
    addr: SocketAddr,
    method: &str,
    path: &str,
    secret: &str,
    body: &str,
) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nX-Worker-Secret: {secret}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .await
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Shared between subscribers and the run.
struct Shared {
    connected: AtomicUsize,
    failed: AtomicUsize,
    /// Subscribers that have seen their topic's last event.
    finished: AtomicUsize,
    deliveries: AtomicU64,
    /// Tells subscribers to hand in their figures and stop.
    stop: tokio::sync::watch::Receiver<bool>,
}

impl Shared {
    /// Fresh counters, and the sender that tells subscribers to stop.
    fn new() -> (Arc<Shared>, tokio::sync::watch::Sender<bool>) {
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared {
            stop,
            connected: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            deliveries: AtomicU64::new(0),
        });
        (shared, stop_tx)
    }
}

async fn run(args: RunArgs) -> Result<Value, String> {
    if args.nodes > 1 && args.redis_url.is_none() {
        return Err("--nodes > 1 needs --redis-url".into());
    }
    if args.nchan && (args.nodes > 1 || args.processes > 1) {
        return Err("--nchan runs one nginx and one tool process".into());
    }
    let secret = format!(
        "bench-secret-{:016x}-{:016x}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    );
    let mut nodes = Vec::new();
    let mut nchan = None;
    if args.nchan {
        nchan = Some(Nchan::start(&args.nginx_bin).await?);
    } else {
        for i in 0..args.nodes.max(1) {
            nodes.push(start_node(&args, &secret, i).await?);
        }
    }
    let pids: Vec<u32> = match &nchan {
        Some(n) => n.pids(),
        None => nodes.iter().map(|n| n.child.id()).collect(),
    };
    let topics: Vec<String> = (0..args.topics.max(1))
        .map(|i| format!("bench.{i}"))
        .collect();
    for t in topics.iter().filter(|_| nchan.is_none()) {
        let body = json!({"topic": t, "meta": {"require_token": true}}).to_string();
        let (status, _) = http_once(
            nodes[0].internal,
            "POST",
            "/internal/register",
            &secret,
            &body,
        )
        .await?;
        if status != 200 {
            return Err(format!("register {t}: HTTP {status}"));
        }
    }
    let (publish_node, publics) = match &nchan {
        Some(n) => (n.addr, vec![n.addr]),
        None => (nodes[0].internal, nodes.iter().map(|n| n.public).collect()),
    };
    let self_pid = std::process::id();

    // Expected per topic: events i with i % K == topic.
    let k = topics.len();
    let expected: Vec<u64> = (0..k)
        .map(|t| ((args.events + k - 1 - t) / k) as u64)
        .collect();

    let (shared, stop_tx) = Shared::new();

    // Phase 1: connect.
    let before_connect = usages(&pids);
    let tool_before = usage(self_pid);
    let started = Instant::now();
    let plan = Plan {
        secret: secret.clone(),
        topics: topics.clone(),
        publics: publics.clone(),
        transport: args.transport,
        bind_ips: args.bind_ips,
        events: args.events,
        expected: expected.clone(),
        connect_concurrency: args.connect_concurrency,
        range: (0, args.connections),
        nchan: args.nchan,
    };
    let mut handles = Vec::new();
    let mut helpers = Vec::new();
    if args.processes > 1 {
        helpers = spawn_helpers(&plan, args.processes, &shared)?;
    } else {
        handles = spawn_subscribers(&plan, shared.clone());
    }
    while shared.connected.load(Ordering::Acquire) + shared.failed.load(Ordering::Acquire)
        < args.connections
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let connect_secs = started.elapsed().as_secs_f64();
    let after_connect = usages(&pids);
    let failed = shared.failed.load(Ordering::Acquire);
    let connected = args.connections - failed;

    // Phase 2: idle.
    tokio::time::sleep(Duration::from_secs_f64(args.idle_secs)).await;
    let after_idle = usages(&pids);

    // Phase 3: publish and wait for every delivery.
    let publish_start = Instant::now();
    let sent = publish_all(&args, publish_node, &secret, &topics).await?;
    let want_finished = if args.events == 0 { 0 } else { connected };
    let deadline = Instant::now() + Duration::from_secs(60);
    while shared.finished.load(Ordering::Acquire) < want_finished && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let publish_secs = publish_start.elapsed().as_secs_f64();
    let after_publish = usages(&pids);
    let helper_pids: Vec<u32> = helpers.iter().map(|h| h.child.id()).collect();
    let tool_after = usage(self_pid);
    let helpers_cpu_ns = usages(&helper_pids).cpu_ns;

    // Collect: every subscriber hands in its figures.
    let _ = stop_tx.send(true);
    for h in handles {
        let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
    }
    for helper in helpers {
        helper.finish()?;
    }
    drop(nodes);
    drop(nchan);
    let received = shared.deliveries.load(Ordering::Acquire);
    let expected_deliveries: u64 = (0..connected).map(|i| expected[i % k]).sum();
    let lost = expected_deliveries.saturating_sub(received);
    let lat = percentiles(&mut LATENCIES.lock().unwrap_or_else(|e| e.into_inner()));
    let dup = DUPLICATES.load(Ordering::Acquire);
    let reorder = REORDERED.load(Ordering::Acquire);
    let resyncs = RESYNCS.load(Ordering::Acquire);

    let conn_cpu_us = (after_connect.cpu_ns.saturating_sub(before_connect.cpu_ns)) as f64 / 1e3;
    let (conn_user_us, conn_kernel_us) =
        split_us(&before_connect, &after_connect, connected as u64);
    let idle_cpu_ns = after_idle.cpu_ns.saturating_sub(after_connect.cpu_ns) as f64;
    let publish_cpu_us = (after_publish.cpu_ns.saturating_sub(after_idle.cpu_ns)) as f64 / 1e3;
    let (publish_user_us, publish_kernel_us) = split_us(&after_idle, &after_publish, received);
    // Helper processes started with the connect phase: all their CPU counts.
    let tool_cpu_s =
        (tool_after.cpu_ns.saturating_sub(tool_before.cpu_ns) + helpers_cpu_ns) as f64 / 1e9;
    let label = args.label.clone().unwrap_or_else(|| {
        format!(
            "{}{} {}x{}t{}",
            if args.nchan { "nchan " } else { "" },
            match args.transport {
                Transport::Ws => "ws",
                Transport::Sse => "sse",
            },
            args.connections,
            k,
            if args.nodes > 1 {
                format!(" {}n", args.nodes)
            } else {
                String::new()
            }
        )
    });
    Ok(json!({
        "label": label,
        "scenario": {
            "transport": format!("{:?}", args.transport).to_lowercase(),
            "connections": args.connections,
            "topics": k,
            "events": args.events,
            "rate": args.rate,
            "in_flight": args.in_flight,
            "payload_bytes": args.payload_bytes,
            "nodes": args.nodes.max(1),
            "tool_processes": args.processes.max(1),
            "cluster": args.redis_url.is_some(),
        },
        "connect": {
            "connected": connected,
            "failed": failed,
            "seconds": connect_secs,
            "per_second": connected as f64 / connect_secs.max(1e-9),
            "server_cpu_us_per_connection": conn_cpu_us / connected.max(1) as f64,
            "server_user_us_per_connection": conn_user_us,
            "server_kernel_us_per_connection": conn_kernel_us,
            "rss_kib_before": before_connect.rss_kib,
            "rss_kib_after": after_connect.rss_kib,
            "rss_kib_per_connection": (after_connect.rss_kib.saturating_sub(before_connect.rss_kib)) as f64 / connected.max(1) as f64,
        },
        "idle": {
            "seconds": args.idle_secs,
            "server_core_percent": idle_cpu_ns / (args.idle_secs * 1e9) * 100.0,
        },
        "publish": {
            "sent": sent,
            "seconds": publish_secs,
            "server_cpu_us_per_delivery": publish_cpu_us / received.max(1) as f64,
            "server_user_us_per_delivery": publish_user_us,
            "server_kernel_us_per_delivery": publish_kernel_us,
            "deliveries_per_second": received as f64 / publish_secs.max(1e-9),
        },
        "delivery": {
            "expected": expected_deliveries,
            "received": received,
            "lost": lost,
            "duplicates": dup,
            "reordered": reorder,
            "resyncs": resyncs,
            "latency_us": lat,
        },
        "tool": {
            "cpu_seconds": tool_cpu_s,
            "wall_seconds": connect_secs + args.idle_secs + publish_secs,
        },
    }))
}

/// Everything needed to open a range of the run's subscribers, in this process or in a
/// helper process (which gets it as JSON on stdin).
#[derive(Serialize, Deserialize, Clone)]
struct Plan {
    secret: String,
    topics: Vec<String>,
    publics: Vec<SocketAddr>,
    transport: Transport,
    bind_ips: u8,
    events: usize,
    /// Events per topic.
    expected: Vec<u64>,
    connect_concurrency: usize,
    /// Subscriber indices `[start, end)` to open.
    range: (usize, usize),
    /// The server is nchan: its endpoints, no tokens.
    #[serde(default)]
    nchan: bool,
}

/// Spawns the plan's subscribers; subscriber `i` always gets the same topic, token, server
/// and local address, whichever process opens it.
fn spawn_subscribers(plan: &Plan, shared: Arc<Shared>) -> Vec<tokio::task::JoinHandle<()>> {
    let gate = Arc::new(Semaphore::new(plan.connect_concurrency.max(1)));
    let k = plan.topics.len();
    (plan.range.0..plan.range.1)
        .map(|i| {
            let topic = plan.topics[i % k].clone();
            let token = token::sign(
                plan.secret.as_bytes(),
                &Claims {
                    user_id: (i + 1) as i64,
                    topic: topic.clone(),
                    expires: unix_now() + 3600,
                },
            );
            let local = IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                0,
                1 + (i % plan.bind_ips.max(1) as usize) as u8,
            ));
            let sub = Subscriber {
                shared: shared.clone(),
                gate: gate.clone(),
                transport: plan.transport,
                server: plan.publics[i % plan.publics.len()],
                local,
                topic,
                token,
                expect: plan.expected[i % k],
                events: plan.events,
                nchan: plan.nchan,
            };
            tokio::spawn(sub.run())
        })
        .collect()
}

/// A helper tool process holding part of the subscribers. It reports on stdout, one line
/// each: `connected <ok> <failed>` once, `progress <finished> <deliveries>` as they change,
/// and `done <json>` after it is told `stop` on stdin.
struct Helper {
    child: Child,
    stdin: std::process::ChildStdin,
    done: std::sync::mpsc::Receiver<Value>,
}

fn spawn_helpers(
    plan: &Plan,
    processes: usize,
    shared: &Arc<Shared>,
) -> Result<Vec<Helper>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let total = plan.range.1 - plan.range.0;
    let mut helpers = Vec::new();
    for p in 0..processes {
        let range = (
            plan.range.0 + total * p / processes,
            plan.range.0 + total * (p + 1) / processes,
        );
        let mut child = dies_with_us(&mut Command::new(&exe))
            .arg("subscribe")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start a helper: {e}"))?;
        let mut stdin = child.stdin.take().ok_or("no helper stdin")?;
        let stdout = child.stdout.take().ok_or("no helper stdout")?;
        let part = Plan {
            range,
            ..plan.clone()
        };
        use std::io::Write;
        let line = serde_json::to_string(&part).map_err(|e| e.to_string())?;
        writeln!(stdin, "{line}").map_err(|e| e.to_string())?;
        let (tx, done) = std::sync::mpsc::channel();
        let shared = shared.clone();
        std::thread::spawn(move || follow_helper(stdout, &shared, tx));
        helpers.push(Helper { child, stdin, done });
    }
    Ok(helpers)
}

/// Adds a helper's reports to this process's counters.
fn follow_helper(
    stdout: std::process::ChildStdout,
    shared: &Shared,
    done: std::sync::mpsc::Sender<Value>,
) {
    use std::io::BufRead;
    let (mut finished, mut deliveries) = (0usize, 0u64);
    for line in std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
    {
        let mut words = line.splitn(3, ' ');
        let kind = words.next().unwrap_or("");
        let a = words.next().unwrap_or("");
        let b = words.next().unwrap_or("");
        match kind {
            "connected" => {
                shared
                    .connected
                    .fetch_add(a.parse().unwrap_or(0), Ordering::AcqRel);
                shared
                    .failed
                    .fetch_add(b.parse().unwrap_or(0), Ordering::AcqRel);
            }
            "progress" => {
                let (f, d): (usize, u64) = (a.parse().unwrap_or(0), b.parse().unwrap_or(0));
                shared
                    .finished
                    .fetch_add(f.saturating_sub(finished), Ordering::AcqRel);
                shared
                    .deliveries
                    .fetch_add(d.saturating_sub(deliveries), Ordering::AcqRel);
                (finished, deliveries) = (f.max(finished), d.max(deliveries));
            }
            "done" => {
                let rest = line.strip_prefix("done ").unwrap_or("");
                let _ = done.send(serde_json::from_str(rest).unwrap_or(Value::Null));
            }
            _ => {}
        }
    }
}

impl Helper {
    /// Stops the helper and merges its figures into this process's.
    fn finish(mut self) -> Result<(), String> {
        use std::io::Write;
        let _ = writeln!(self.stdin, "stop");
        let report = self
            .done
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| "a helper process did not report".to_string())?;
        let _ = self.child.wait();
        let count = |key: &str| report[key].as_u64().unwrap_or(0);
        DUPLICATES.fetch_add(count("duplicates"), Ordering::AcqRel);
        REORDERED.fetch_add(count("reordered"), Ordering::AcqRel);
        RESYNCS.fetch_add(count("resyncs"), Ordering::AcqRel);
        let path = report["latencies"].as_str().unwrap_or("");
        let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        let _ = std::fs::remove_file(path);
        LATENCIES.lock().unwrap_or_else(|e| e.into_inner()).extend(
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        Ok(())
    }
}

/// The helper side of `run --processes N` (see [`Helper`]).
async fn subscribe_process() -> Result<(), String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let plan: Plan = serde_json::from_str(&line).map_err(|e| format!("bad plan: {e}"))?;
    let (shared, stop_tx) = Shared::new();
    let count = plan.range.1 - plan.range.0;
    let handles = spawn_subscribers(&plan, shared.clone());
    while shared.connected.load(Ordering::Acquire) + shared.failed.load(Ordering::Acquire) < count {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "connected {} {}",
        shared.connected.load(Ordering::Acquire),
        shared.failed.load(Ordering::Acquire)
    );
    std::thread::spawn(move || {
        let mut line = String::new();
        while std::io::stdin()
            .read_line(&mut line)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            if line.trim() == "stop" {
                break;
            }
            line.clear();
        }
        let _ = stop_tx.send(true);
    });
    let mut stop = shared.stop.clone();
    let mut reported = (0, 0);
    loop {
        let now = (
            shared.finished.load(Ordering::Acquire),
            shared.deliveries.load(Ordering::Acquire),
        );
        if now != reported {
            println!("progress {} {}", now.0, now.1);
            reported = now;
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    for h in handles {
        let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
    }
    let latencies = std::mem::take(&mut *LATENCIES.lock().unwrap_or_else(|e| e.into_inner()));
    let path = std::env::temp_dir().join(format!("fanout-bench-{}.lat", std::process::id()));
    let bytes: Vec<u8> = latencies.iter().flat_map(|l| l.to_le_bytes()).collect();
    std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
    let report = json!({
        "duplicates": DUPLICATES.load(Ordering::Acquire),
        "reordered": REORDERED.load(Ordering::Acquire),
        "resyncs": RESYNCS.load(Ordering::Acquire),
        "latencies": path,
    });
    println!("done {report}");
    Ok(())
}

static LATENCIES: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());
static DUPLICATES: AtomicU64 = AtomicU64::new(0);
static REORDERED: AtomicU64 = AtomicU64::new(0);
static RESYNCS: AtomicU64 = AtomicU64::new(0);

fn percentiles(v: &mut [u32]) -> Value {
    if v.is_empty() {
        return json!({});
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    json!({
        "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "p999": at(0.999), "max": v[v.len() - 1],
    })
}

/// Read buffer per subscriber: frames are small, and a larger buffer is memory the tool zeroes
/// and faults in for every socket.
const READ_BUF: usize = 4096;

/// Linux `IP_BIND_ADDRESS_NO_PORT`: binding to a local address picks the port at `connect`,
/// from the full 4-tuple, instead of searching for a port free for every destination at `bind`
/// (what load generators such as haproxy do). Best effort.
fn bind_address_no_port(socket: &TcpSocket) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with a pointer to a c_int that lives across
        // the call and its size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for the publisher and every tool process.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Publishes `events` events at `rate` over `in_flight` keep-alive connections.
async fn publish_all(
    args: &RunArgs,
    internal: SocketAddr,
    secret: &str,
    topics: &[String],
) -> Result<u64, String> {
    let next = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let pad = "x".repeat(args.payload_bytes);
    let mut tasks = Vec::new();
    for _ in 0..args.in_flight.max(1) {
        let (next, sent) = (next.clone(), sent.clone());
        let (secret, pad, topics) = (secret.to_string(), pad.clone(), topics.to_vec());
        let (events, rate, nchan) = (args.events, args.rate, args.nchan);
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(internal).await.map_err(|e| e.to_string())?;
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            let mut conn = BufReader::new(stream);
            loop {
                let i = next.fetch_add(1, Ordering::AcqRel);
                if i >= events {
                    return Ok::<_, String>(());
                }
                let due = start + Duration::from_secs_f64(i as f64 / rate.max(0.001));
                tokio::time::sleep_until(due.into()).await;
                let t = mono_ns();
                let body = format!(
                    "{{\"topic\":\"{}\",\"payload\":{{\"seq\":{i},\"t\":{t},\"pad\":\"{pad}\"}}}}",
                    topics[i % topics.len()]
                );
                let req = if nchan {
                    // nchan takes the payload itself, the channel in the URL.
                    let payload = format!("{{\"seq\":{i},\"t\":{t},\"pad\":\"{pad}\"}}");
                    format!(
                        "POST /pub?topic={} HTTP/1.1\r\nHost: bench\r\n\
                         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
                        topics[i % topics.len()],
                        payload.len()
                    )
                } else {
                    format!(
                        "POST /internal/publish HTTP/1.1\r\nHost: bench\r\nX-Worker-Secret: {secret}\r\n\
                         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                };
                conn.get_mut().write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
                let status = read_response(&mut conn).await?;
                if !(200..=202).contains(&status) {
                    return Err(format!("publish {i}: HTTP {status}"));
                }
                sent.fetch_add(1, Ordering::AcqRel);
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(sent.load(Ordering::Acquire))
}

/// Reads one HTTP/1.1 response with a Content-Length body; returns the status.
async fn read_response(conn: &mut BufReader<TcpStream>) -> Result<u16, String> {
    let mut line = String::new();
    conn.read_line(&mut line).await.map_err(|e| e.to_string())?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut length = 0usize;
    loop {
        line.clear();
        conn.read_line(&mut line).await.map_err(|e| e.to_string())?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Ok(status)
}

struct Subscriber {
    shared: Arc<Shared>,
    gate: Arc<Semaphore>,
    transport: Transport,
    server: SocketAddr,
    local: IpAddr,
    topic: String,
    token: String,
    /// Events this subscriber's topic gets.
    expect: u64,
    events: usize,
    /// The server is nchan: `/sub`, no auth frame, a plain SSE body.
    nchan: bool,
}

/// Per-subscriber bookkeeping of what arrived.
struct Seen {
    bits: Vec<u64>,
    /// Sequence part of the last event id: the server's order, which must only increase.
    /// (Payload `seq`s may legitimately arrive out of order when publishes are concurrent.)
    last_id: Option<u64>,
    latencies: Vec<u32>,
    received: u64,
    duplicates: u64,
    reordered: u64,
    resyncs: u64,
}

impl Seen {
    fn new(events: usize) -> Seen {
        Seen {
            bits: vec![0; events / 64 + 1],
            last_id: None,
            latencies: Vec::new(),
            received: 0,
            duplicates: 0,
            reordered: 0,
            resyncs: 0,
        }
    }

    /// Records one frame's text; true when it completes the topic's expected events.
    fn frame(&mut self, text: &str, shared: &Shared, expect: u64) -> bool {
        if text.contains("\"type\":\"resync\"") {
            self.resyncs += 1;
            return false;
        }
        let (Some(seq), Some(t)) = (number_after(text, "\"seq\":"), number_after(text, "\"t\":"))
        else {
            return false;
        };
        let now = mono_ns();
        self.latencies
            .push((now.saturating_sub(t) / 1000).min(u32::MAX as u64) as u32);
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        let duplicate = word < self.bits.len() && self.bits[word] & (1 << bit) != 0;
        if duplicate {
            self.duplicates += 1;
        } else {
            if word < self.bits.len() {
                self.bits[word] |= 1 << bit;
            }
            self.received += 1;
            shared.deliveries.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(id) = event_seq(text) {
            if self.last_id.is_some_and(|l| id <= l) {
                self.reordered += 1;
            }
            self.last_id = Some(id);
        }
        !duplicate && self.received == expect
    }

    fn publish(&mut self) {
        LATENCIES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(&self.latencies);
        self.latencies.clear();
        DUPLICATES.fetch_add(self.duplicates, Ordering::AcqRel);
        REORDERED.fetch_add(self.reordered, Ordering::AcqRel);
        RESYNCS.fetch_add(self.resyncs, Ordering::AcqRel);
        self.duplicates = 0;
        self.reordered = 0;
        self.resyncs = 0;
    }
}

/// The number after the epoch in the frame's `"id":"<epoch>-<n>"`.
fn event_seq(text: &str) -> Option<u64> {
    let start = text.find("\"id\":\"")? + 6;
    let id = &text[start..];
    let dash = id.find('-')?;
    number_after(&id[dash..], "-")
}

fn number_after(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let digits: &str = &text[start..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

impl Subscriber {
    async fn run(self) {
        let Ok(permit) = self.gate.clone().acquire_owned().await else {
            return;
        };
        let stream = match self.connect().await {
            Ok(s) => s,
            Err(e) => {
                if self.shared.failed.fetch_add(1, Ordering::AcqRel) < 3 {
                    eprintln!("subscriber failed: {e}");
                }
                return;
            }
        };
        let mut seen = Seen::new(self.events);
        let result = match self.transport {
            Transport::Ws => self.ws(stream, permit, &mut seen).await,
            Transport::Sse => self.sse(stream, permit, &mut seen).await,
        };
        if let Err(e) = result {
            eprintln!("subscriber lost its connection: {e}");
        }
        seen.publish();
    }

    async fn connect(&self) -> Result<TcpStream, String> {
        let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
        bind_address_no_port(&socket);
        socket
            .bind(SocketAddr::new(self.local, 0))
            .map_err(|e| e.to_string())?;
        let stream = socket
            .connect(self.server)
            .await
            .map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(stream)
    }

    fn done(&self, seen: &mut Seen) {
        seen.publish();
        self.shared.finished.fetch_add(1, Ordering::AcqRel);
    }

    /// A WebSocket subscriber with the minimal client codec of `loadtools` (no per-socket
    /// key, buffers or HTTP parsing beyond the status line): the tool is the slower side of
    /// this benchmark, so it does as little as a client can.
    async fn ws(
        &self,
        mut stream: TcpStream,
        permit: tokio::sync::OwnedSemaphorePermit,
        seen: &mut Seen,
    ) -> Result<(), String> {
        let io = |e: std::io::Error| e.to_string();
        let path = if self.nchan { "sub" } else { "ws" };
        let req = ws_upgrade_request(&format!("/{path}?topic={}", self.topic));
        stream.write_all(req.as_bytes()).await.map_err(io)?;
        let mut buf = vec![0u8; READ_BUF];
        let mut head = Vec::new();
        let rest = loop {
            let n = stream.read(&mut buf).await.map_err(io)?;
            if n == 0 {
                return Err("closed during the upgrade".into());
            }
            head.extend_from_slice(&buf[..n]);
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&head[..end]);
                if !text.starts_with("HTTP/1.1 101") || !text.contains(WS_SAMPLE_ACCEPT) {
                    return Err(format!("upgrade refused: {text}"));
                }
                break head[end + 4..].to_vec();
            }
        };
        let mut permit = Some(permit);
        if self.nchan {
            // No auth: subscribed with the upgrade.
            drop(permit.take());
            self.shared.connected.fetch_add(1, Ordering::AcqRel);
        } else {
            let auth = json!({"type": "auth", "token": self.token}).to_string();
            stream
                .write_all(&ws_client_frame(1, auth.as_bytes()))
                .await
                .map_err(io)?;
        }
        let mut frames = WsFrames::default();
        frames.feed(&rest);
        let mut stop = self.shared.stop.clone();
        loop {
            while let Some((opcode, payload)) = frames.next_frame() {
                match opcode {
                    1 => {
                        let text = String::from_utf8_lossy(&payload);
                        if permit.is_some() {
                            if !text.contains("auth_ok") {
                                return Err(format!("no auth_ok: {text}"));
                            }
                            drop(permit.take());
                            self.shared.connected.fetch_add(1, Ordering::AcqRel);
                            if self.expect == 0 {
                                self.done(seen);
                            }
                        } else if seen.frame(&text, &self.shared, self.expect) {
                            self.done(seen);
                        }
                    }
                    9 => stream
                        .write_all(&ws_client_frame(10, &payload))
                        .await
                        .map_err(io)?,
                    8 => return Ok(()),
                    _ => {}
                }
            }
            let n = tokio::select! {
                _ = stop.wait_for(|s| *s) => return Ok(()),
                n = stream.read(&mut buf) => n.map_err(io)?,
            };
            if n == 0 {
                return Ok(());
            }
            frames.feed(&buf[..n]);
        }
    }

    async fn sse(
        &self,
        mut stream: TcpStream,
        permit: tokio::sync::OwnedSemaphorePermit,
        seen: &mut Seen,
    ) -> Result<(), String> {
        let req = if self.nchan {
            format!(
                "GET /sub?topic={} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n",
                self.topic
            )
        } else {
            format!(
                "GET /sse?topic={}&token={} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n",
                self.topic, self.token
            )
        };
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut decoder = if self.nchan {
            ChunkedSse::plain()
        } else {
            ChunkedSse::default()
        };
        let mut head = Vec::new();
        let mut buf = vec![0u8; READ_BUF];
        let mut head_done = false;
        let mut connected = false;
        let mut permit = Some(permit);
        let mut stop = self.shared.stop.clone();
        loop {
            let n = tokio::select! {
                _ = stop.wait_for(|s| *s) => return Ok(()),
                n = stream.read(&mut buf) => n.map_err(|e| e.to_string())?,
            };
            if n == 0 {
                return Ok(());
            }
            let mut data = &buf[..n];
            if !head_done {
                head.extend_from_slice(data);
                let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                if !head.starts_with(b"HTTP/1.1 200") {
                    return Err(format!(
                        "SSE refused: {}",
                        String::from_utf8_lossy(&head[..end])
                    ));
                }
                decoder.feed(&head[end + 4..]);
                head_done = true;
                data = &[];
            }
            decoder.feed(data);
            for block in decoder.blocks() {
                if !connected {
                    // The first block (retry + position) means we are subscribed.
                    connected = true;
                    drop(permit.take());
                    self.shared.connected.fetch_add(1, Ordering::AcqRel);
                    if self.expect == 0 {
                        self.done(seen);
                    }
                    continue;
                }
                if let Some(data) = block
                    .strip_prefix("id: ")
                    .and_then(|b| b.split_once("\ndata: "))
                    .map(|(_, d)| d)
                {
                    if seen.frame(data, &self.shared, self.expect) {
                        self.done(seen);
                    }
                } else if let Some(data) = block.strip_prefix("data: ") {
                    seen.frame(data, &self.shared, self.expect);
                }
            }
        }
    }
}

fn print_summary(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    println!("scenario          {}", r["label"].as_str().unwrap_or(""));
    println!(
        "connect           {} ok, {} failed, {:.0}/s, server {:.1} µs CPU/conn, {:.2} KiB RSS/conn",
        r["connect"]["connected"],
        r["connect"]["failed"],
        f(&r["connect"]["per_second"]),
        f(&r["connect"]["server_cpu_us_per_connection"]),
        f(&r["connect"]["rss_kib_per_connection"]),
    );
    println!(
        "idle              server {:.2}% of a core",
        f(&r["idle"]["server_core_percent"])
    );
    println!(
        "publish           {} events, {:.0} deliveries/s, server {:.2} µs CPU/delivery",
        r["publish"]["sent"],
        f(&r["publish"]["deliveries_per_second"]),
        f(&r["publish"]["server_cpu_us_per_delivery"]),
    );
    let d = &r["delivery"];
    println!(
        "delivery          {}/{} received, lost {}, dup {}, reordered {}, resyncs {}",
        d["received"], d["expected"], d["lost"], d["duplicates"], d["reordered"], d["resyncs"]
    );
    let l = &d["latency_us"];
    println!(
        "latency µs        p50 {} p90 {} p99 {} p999 {} max {}",
        l["p50"], l["p90"], l["p99"], l["p999"], l["max"]
    );
    println!(
        "tool              {:.2} s CPU",
        f(&r["tool"]["cpu_seconds"])
    );
}

/// Writes the markdown table and the SVG chart for docs/benchmarks.md.
fn report(inputs: &[PathBuf], markdown: &Path, svg: &Path) -> Result<(), String> {
    let mut results = Vec::new();
    for path in inputs {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        results.push(v);
    }
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let results = median_runs(results);
    let mut md = String::from(
        "| scenario | conns | topics | user µs/delivery | kernel µs/delivery | user µs/conn | kernel µs/conn | RSS KiB/conn | connects/s | idle % core | deliveries/s | p50 µs | p99 µs | p999 µs | max µs | lost | tool CPU s |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &results {
        let l = &r["delivery"]["latency_us"];
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.0} | {:.2} | {:.0} | {} | {} | {} | {} | {} | {:.1} |\n",
            r["label"].as_str().unwrap_or(""),
            r["connect"]["connected"],
            r["scenario"]["topics"],
            r["spread"]["user_delivery"].as_str().unwrap_or(""),
            r["spread"]["kernel_delivery"].as_str().unwrap_or(""),
            r["spread"]["user_connection"].as_str().unwrap_or(""),
            r["spread"]["kernel_connection"].as_str().unwrap_or(""),
            f(&r["connect"]["rss_kib_per_connection"]),
            f(&r["connect"]["per_second"]),
            f(&r["idle"]["server_core_percent"]),
            f(&r["publish"]["deliveries_per_second"]),
            l["p50"],
            l["p99"],
            l["p999"],
            l["max"],
            r["delivery"]["lost"],
            f(&r["tool"]["cpu_seconds"]),
        ));
    }
    std::fs::write(markdown, md).map_err(|e| e.to_string())?;
    std::fs::write(svg, chart(&results)).map_err(|e| e.to_string())?;
    Ok(())
}

/// Results with the same label are repeated runs of one scenario: each becomes its median run
/// (by user CPU per delivery), with the user and kernel figures of all runs as `min-max` in
/// `spread` (a single run gives its own figure).
fn median_runs(results: Vec<Value>) -> Vec<Value> {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let mut groups: Vec<(String, Vec<Value>)> = Vec::new();
    for r in results {
        let label = r["label"].as_str().unwrap_or("").to_string();
        match groups.iter_mut().find(|(l, _)| *l == label) {
            Some((_, runs)) => runs.push(r),
            None => groups.push((label, vec![r])),
        }
    }
    groups
        .into_iter()
        .map(|(_, mut runs)| {
            runs.sort_by(|a, b| {
                f(&a["publish"]["server_user_us_per_delivery"])
                    .total_cmp(&f(&b["publish"]["server_user_us_per_delivery"]))
            });
            let range = |section: &str, key: &str, digits: usize| {
                let values: Vec<f64> = runs.iter().map(|r| f(&r[section][key])).collect();
                let (lo, hi) = values
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
                if values.len() < 2 || (hi - lo).abs() < 1e-9 {
                    format!("{lo:.digits$}")
                } else {
                    format!("{lo:.digits$}-{hi:.digits$}")
                }
            };
            let spread = json!({
                "user_delivery": range("publish", "server_user_us_per_delivery", 2),
                "kernel_delivery": range("publish", "server_kernel_us_per_delivery", 2),
                "user_connection": range("connect", "server_user_us_per_connection", 1),
                "kernel_connection": range("connect", "server_kernel_us_per_connection", 1),
            });
            let mut median = runs.swap_remove(runs.len() / 2);
            median["spread"] = spread;
            median
        })
        .collect()
}

/// Two panels: latency percentiles (log scale) and server CPU per delivery, per scenario.
fn chart(results: &[Value]) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let n = results.len().max(1);
    let (w, row) = (980.0, 26.0);
    let top = 60.0;
    let h = top + row * n as f64 + 60.0;
    let label_w = 170.0;
    let panel_w = (w - label_w - 40.0) / 2.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{label_w}\" y=\"20\" font-size=\"14\" font-weight=\"bold\">Publish-to-receive latency (µs, log scale): p50 / p99 / p999</text>\n\
         <text x=\"{}\" y=\"20\" font-size=\"14\" font-weight=\"bold\">Server CPU µs per delivery: user / kernel</text>\n",
        label_w + panel_w + 30.0
    );
    let max_lat = results
        .iter()
        .map(|r| f(&r["delivery"]["latency_us"]["p999"]))
        .fold(10.0, f64::max);
    let log_max = max_lat.log10().ceil().max(1.0);
    let x_lat = |v: f64| label_w + panel_w * (v.max(1.0).log10() / log_max);
    let max_cpu = results
        .iter()
        .map(|r| {
            f(&r["publish"]["server_user_us_per_delivery"])
                + f(&r["publish"]["server_kernel_us_per_delivery"])
        })
        .fold(1.0, f64::max);
    let cpu_left = label_w + panel_w + 30.0;
    let x_cpu = |v: f64| cpu_left + panel_w * 0.85 * (v / max_cpu);
    for d in 0..=(log_max as i32) {
        let x = x_lat(10f64.powi(d));
        s.push_str(&format!(
            "<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            top - 10.0,
            top + row * n as f64,
            top + row * n as f64 + 16.0,
            10u64.pow(d as u32)
        ));
    }
    for (i, r) in results.iter().enumerate() {
        let y = top + row * i as f64;
        let l = &r["delivery"]["latency_us"];
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
            label_w - 8.0,
            y + 15.0,
            r["label"].as_str().unwrap_or("")
        ));
        for (key, color, hgt) in [
            ("p999", "#f4a582", 18.0),
            ("p99", "#d6604d", 12.0),
            ("p50", "#4393c3", 6.0),
        ] {
            let x2 = x_lat(f(&l[key]));
            s.push_str(&format!(
                "<rect x=\"{label_w}\" y=\"{}\" width=\"{}\" height=\"{hgt}\" fill=\"{color}\"><title>{key} {} µs</title></rect>\n",
                y + (20.0 - hgt) / 2.0,
                (x2 - label_w).max(1.0),
                l[key]
            ));
        }
        // User time first (dark), kernel time after it (light): the part that is ours, then
        // the system calls' share.
        let user = f(&r["publish"]["server_user_us_per_delivery"]);
        let kernel = f(&r["publish"]["server_kernel_us_per_delivery"]);
        let (x_user, x_total) = (x_cpu(user), x_cpu(user + kernel));
        s.push_str(&format!(
            "<rect x=\"{cpu_left}\" y=\"{}\" width=\"{}\" height=\"14\" fill=\"#1b7837\"><title>user {user:.2} µs</title></rect>\n\
             <rect x=\"{x_user}\" y=\"{}\" width=\"{}\" height=\"14\" fill=\"#a6dba0\"><title>kernel {kernel:.2} µs</title></rect>\n\
             <text x=\"{}\" y=\"{}\">{user:.2} / {kernel:.2}</text>\n",
            y + 3.0,
            (x_user - cpu_left).max(1.0),
            y + 3.0,
            (x_total - x_user).max(1.0),
            x_total + 4.0,
            y + 15.0
        ));
    }
    s.push_str(&format!(
        "<text x=\"{label_w}\" y=\"{}\" fill=\"#555\">blue p50, red p99, light p999; CPU: dark user, light kernel</text>\n</svg>\n",
        h - 12.0
    ));
    s
}
