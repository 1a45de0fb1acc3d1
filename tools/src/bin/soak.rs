//! soak: a bounded soak test of wavelog-worker with faults.
//!
//! Starts the release worker, keeps `--stayers` clients connected for the whole run and
//! `--churners` clients connecting and leaving continuously (WebSocket and SSE alternating),
//! publishes steadily, kills the worker with SIGKILL at `--kill-at` and restarts it on the same
//! ports. Every client checks every event by its per-topic sequence number: an event missing
//! without a `resync` before it is a loss, one seen twice is a duplicate. Every reconnect either
//! resumes exactly (the next event is the one after the last seen) or gets `resync`. The worker's
//! RSS and open file descriptors are sampled every `--sample-secs`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use wavelog_tools::{fd_count, fields, free_port, raise_fd_limit, rss_kib, ChunkedSse};
use wavelog_worker::token::{self, Claims};

#[derive(Parser, Clone)]
#[command(
    name = "soak",
    about = "Bounded soak test with faults for wavelog-worker"
)]
struct Args {
    /// Total duration, seconds.
    #[arg(long, default_value_t = 600)]
    secs: u64,
    /// Clients connected for the whole run.
    #[arg(long, default_value_t = 2000)]
    stayers: usize,
    /// Clients that keep connecting and leaving (1-8 s connected, 0.2-2 s away).
    #[arg(long, default_value_t = 1000)]
    churners: usize,
    #[arg(long, default_value_t = 10)]
    topics: usize,
    /// Events per second, over all topics.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Kill -9 the worker after this many seconds, and start it again (0 = never).
    #[arg(long, default_value_t = 300)]
    kill_at: u64,
    #[arg(long, default_value_t = 60)]
    sample_secs: u64,
    /// Worker binary (default: `wavelog-worker` next to this binary).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

/// What all clients found, summed.
#[derive(Default)]
struct Tally {
    received: AtomicU64,
    lost: AtomicU64,
    duplicates: AtomicU64,
    resyncs: AtomicU64,
    reconnects: AtomicU64,
    resumed_exactly: AtomicU64,
    connect_failures: AtomicU64,
}

struct Run {
    args: Args,
    secret: String,
    public: SocketAddr,
    internal: SocketAddr,
    tally: Tally,
    stop: AtomicBool,
    start: Instant,
}

fn main() {
    let args = Args::parse();
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(soak(args.clone())) {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
            if let Some(path) = &args.json {
                let _ = std::fs::write(
                    path,
                    serde_json::to_string_pretty(&report).unwrap_or_default(),
                );
            }
            let ok = report["events"]["lost"] == 0 && report["events"]["duplicates"] == 0;
            std::process::exit(if ok { 0 } else { 1 });
        }
        Err(e) => {
            eprintln!("soak: {e}");
            std::process::exit(1);
        }
    }
}

fn start_worker(bin: &Path, config: &Path) -> Result<Child, String> {
    wavelog_tools::dies_with_us(&mut Command::new(bin))
        .args(["--config", config.to_str().unwrap_or("")])
        .env("RUST_LOG", "warn")
        .env_remove("WORKER_SECRET")
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))
}

async fn request(addr: SocketAddr, path: &str, secret: &str, body: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\nX-Worker-Secret: {secret}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut raw))
        .await
        .ok()?
        .ok()?;
    String::from_utf8_lossy(&raw)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn soak(args: Args) -> Result<Value, String> {
    let bin = match &args.worker_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("wavelog-worker"),
    };
    let secret = format!("soak-secret-{:032x}", std::process::id() as u128 * 7919);
    let (public_port, internal_port) = (
        free_port().map_err(|e| e.to_string())?,
        free_port().map_err(|e| e.to_string())?,
    );
    let config = std::env::temp_dir().join(format!("soak-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "worker_secret = \"{secret}\"\nws_bind = \"127.0.0.1\"\nws_port = {public_port}\n\
             internal_port = {internal_port}\nmax_connections = 100000\nmax_connections_per_ip = 100000\n\
             history_size = 256\nhistory_ttl = \"10m\"\nshutdown_drain = \"500ms\"\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let run = Arc::new(Run {
        args: args.clone(),
        secret,
        public: SocketAddr::from(([127, 0, 0, 1], public_port)),
        internal: SocketAddr::from(([127, 0, 0, 1], internal_port)),
        tally: Tally::default(),
        stop: AtomicBool::new(false),
        start: Instant::now(),
    });
    let child = Arc::new(Mutex::new(start_worker(&bin, &config)?));
    register_all(&run).await?;

    let samples = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..args.stayers + args.churners {
        let run = run.clone();
        let stayer = i < args.stayers;
        tasks.push(tokio::spawn(async move { client(run, i, stayer).await }));
    }
    let publisher = tokio::spawn(publish_loop(run.clone()));

    // Faults and samples.
    let mut killed = false;
    let mut next_sample = Instant::now();
    let deadline = run.start + Duration::from_secs(args.secs);
    while Instant::now() < deadline {
        if Instant::now() >= next_sample {
            let pid = child.lock().map(|c| c.id()).unwrap_or(0);
            let (rss, fds) = (rss_kib(pid), fd_count(pid));
            let t = run.start.elapsed().as_secs();
            eprintln!(
                "t={t}s rss={rss}KiB fds={fds} received={}",
                run.tally.received.load(Ordering::Relaxed)
            );
            if let Ok(mut s) = samples.lock() {
                s.push(json!({"t": t, "rss_kib": rss, "fds": fds, "pid": pid}));
            }
            next_sample += Duration::from_secs(args.sample_secs.max(1));
        }
        if !killed && args.kill_at > 0 && run.start.elapsed() >= Duration::from_secs(args.kill_at) {
            killed = true;
            eprintln!("t={}s kill -9 and restart", run.start.elapsed().as_secs());
            if let Ok(mut c) = child.lock() {
                let _ = c.kill();
                let _ = c.wait();
                *c = start_worker(&bin, &config)?;
            }
            register_all(&run).await?;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    run.stop.store(true, Ordering::Release);
    let published = publisher.await.map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for t in tasks {
        t.abort();
    }
    if let Ok(mut c) = child.lock() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = std::fs::remove_file(&config);
    let t = &run.tally;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Ok(json!({
        "load": {
            "seconds": args.secs, "stayers": args.stayers, "churners": args.churners,
            "topics": args.topics, "rate": args.rate, "published": published,
        },
        "faults": { "kill9_restart_at_s": if args.kill_at > 0 { json!(args.kill_at) } else { json!(null) } },
        "events": {
            "received": load(&t.received), "lost": load(&t.lost), "duplicates": load(&t.duplicates),
            "resyncs": load(&t.resyncs),
        },
        "reconnects": {
            "total": load(&t.reconnects), "resumed_exactly": load(&t.resumed_exactly),
            "connect_failures": load(&t.connect_failures),
        },
        "samples": samples.lock().map(|s| s.clone()).unwrap_or_default(),
    }))
}

async fn register_all(run: &Run) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    for t in 0..run.args.topics {
        let body =
            json!({"topic": format!("soak.{t}"), "meta": {"require_token": true}}).to_string();
        loop {
            if request(run.internal, "/internal/register", &run.secret, &body).await == Some(200) {
                break;
            }
            if Instant::now() > deadline {
                return Err("the worker does not answer".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Publishes `{"seq":n}` per topic at a steady rate; a failed publish (worker down) is retried
/// with the same number, so per-topic numbers have no holes.
async fn publish_loop(run: Arc<Run>) -> u64 {
    let topics = run.args.topics.max(1);
    let mut seq = vec![0u64; topics];
    let mut published = 0u64;
    let every = Duration::from_secs_f64(1.0 / run.args.rate.max(0.1));
    let mut tick = tokio::time::interval(every);
    let mut i = 0usize;
    while !run.stop.load(Ordering::Acquire) {
        tick.tick().await;
        let t = i % topics;
        let body = json!({"topic": format!("soak.{t}"), "payload": {"seq": seq[t]}}).to_string();
        if request(run.internal, "/internal/publish", &run.secret, &body).await == Some(200) {
            seq[t] += 1;
            published += 1;
            i += 1;
        }
    }
    published
}

/// One client: connects (WebSocket for even numbers, SSE for odd), checks what arrives,
/// reconnects with its last id. Churners leave and come back on purpose.
async fn client(run: Arc<Run>, n: usize, stayer: bool) {
    let topic = format!("soak.{}", n % run.args.topics.max(1));
    let mut check = Continuity::default();
    let mut last_id: Option<String> = None;
    let mut rng = n as u64 * 0x9E37_79B9 + 1;
    let mut rand = move |lo: u64, hi: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        lo + rng % (hi - lo).max(1)
    };
    let mut first = true;
    while !run.stop.load(Ordering::Acquire) {
        let token = token::sign(
            run.secret.as_bytes(),
            &Claims {
                user_id: n as i64 + 1,
                topic: topic.clone(),
                expires: unix_now() + 7200,
            },
        );
        let stay_for = if stayer {
            Duration::from_secs(run.args.secs + 60)
        } else {
            Duration::from_millis(rand(1000, 8000))
        };
        if !first {
            run.tally.reconnects.fetch_add(1, Ordering::Relaxed);
            check.reconnected();
        }
        first = false;
        let session = if n.is_multiple_of(2) {
            ws_session(&run, &topic, &token, &mut last_id, &mut check, stay_for).await
        } else {
            sse_session(&run, &topic, &token, &mut last_id, &mut check, stay_for).await
        };
        if session.is_err() {
            run.tally.connect_failures.fetch_add(1, Ordering::Relaxed);
        }
        let pause = if stayer { 200 } else { rand(200, 2000) };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// Checks one client's per-topic sequence numbers.
#[derive(Default)]
struct Continuity {
    next: Option<u64>,
    /// Set on reconnect: the next event tells whether the resume was exact.
    judging_resume: bool,
}

impl Continuity {
    fn reconnected(&mut self) {
        self.judging_resume = self.next.is_some();
    }

    fn resync(&mut self, tally: &Tally) {
        tally.resyncs.fetch_add(1, Ordering::Relaxed);
        self.next = None;
        self.judging_resume = false;
    }

    fn event(&mut self, seq: u64, tally: &Tally) {
        tally.received.fetch_add(1, Ordering::Relaxed);
        match self.next {
            Some(want) if seq < want => {
                tally.duplicates.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Some(want) if seq > want => {
                tally.lost.fetch_add(seq - want, Ordering::Relaxed);
            }
            Some(_) if self.judging_resume => {
                tally.resumed_exactly.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        self.judging_resume = false;
        self.next = Some(seq + 1);
    }
}

fn seq_of(frame: &Value) -> Option<u64> {
    frame["payload"]["seq"].as_u64()
}

fn handle(frame: &Value, check: &mut Continuity, last_id: &mut Option<String>, tally: &Tally) {
    match frame["type"].as_str() {
        Some("push") => {
            if let Some(seq) = seq_of(frame) {
                check.event(seq, tally);
            }
            if let Some(id) = frame["id"].as_str() {
                *last_id = Some(id.to_string());
            }
        }
        Some("resync") => check.resync(tally),
        _ => {}
    }
}

async fn ws_session(
    run: &Run,
    topic: &str,
    token: &str,
    last_id: &mut Option<String>,
    check: &mut Continuity,
    stay_for: Duration,
) -> Result<(), String> {
    let url = format!("ws://{}/ws?topic={topic}", run.public);
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .map_err(|_| "connect timeout".to_string())?
    .map_err(|e| e.to_string())?;
    let auth = json!({"type": "auth", "token": token, "last_event_id": last_id});
    ws.send(Message::text(auth.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    let until = tokio::time::Instant::now() + stay_for;
    loop {
        if run.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        let next = tokio::time::timeout_at(
            until.min(tokio::time::Instant::now() + Duration::from_secs(1)),
            ws.next(),
        )
        .await;
        let msg = match next {
            Err(_) if tokio::time::Instant::now() >= until => return Ok(()),
            Err(_) => continue,
            Ok(None) | Ok(Some(Err(_))) => return Ok(()),
            Ok(Some(Ok(m))) => m,
        };
        if let Message::Text(text) = msg {
            let frame: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            if frame["type"] == "auth_ok" && last_id.is_none() {
                *last_id = frame["last_event_id"].as_str().map(str::to_string);
            }
            handle(&frame, check, last_id, &run.tally);
        }
    }
}

async fn sse_session(
    run: &Run,
    topic: &str,
    token: &str,
    last_id: &mut Option<String>,
    check: &mut Continuity,
    stay_for: Duration,
) -> Result<(), String> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(run.public))
        .await
        .map_err(|_| "connect timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let resume = last_id
        .as_ref()
        .map(|id| format!("Last-Event-ID: {id}\r\n"))
        .unwrap_or_default();
    let req =
        format!("GET /sse?topic={topic}&token={token} HTTP/1.1\r\nHost: soak\r\n{resume}\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut decoder = ChunkedSse::default();
    let mut buf = vec![0u8; 8192];
    let until = tokio::time::Instant::now() + stay_for;
    loop {
        if run.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        let read = tokio::time::timeout_at(
            until.min(tokio::time::Instant::now() + Duration::from_secs(1)),
            s.read(&mut buf),
        )
        .await;
        let n = match read {
            Err(_) if tokio::time::Instant::now() >= until => return Ok(()),
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(()),
            Ok(Ok(n)) => n,
        };
        if head.is_empty() || !head.ends_with(b"\r\n\r\n") {
            head.extend_from_slice(&buf[..n]);
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            if !head.starts_with(b"HTTP/1.1 200") {
                return Err("refused".into());
            }
            decoder.feed(&head[end + 4..]);
            head.truncate(end + 4);
        } else {
            decoder.feed(&buf[..n]);
        }
        for block in decoder.blocks() {
            let (id, data, event) = fields(&block);
            if event == Some("position") {
                if last_id.is_none() {
                    *last_id = id.map(str::to_string);
                }
                continue;
            }
            if let Some(data) = data {
                let frame: Value = serde_json::from_str(data).unwrap_or(Value::Null);
                handle(&frame, check, last_id, &run.tally);
            }
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
