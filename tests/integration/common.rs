//! Test harness: a real worker started in-process on port 0, a raw HTTP client, and real
//! WebSocket clients.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wavelog_worker::token::{self, Claims};
use wavelog_worker::{Config, Worker};

pub const SECRET: &str = "test-secret-0123456789abcdef0123456789abcdef";

pub struct TestWorker {
    pub worker: Worker,
    pub public: SocketAddr,
    pub internal: SocketAddr,
    pub secret: String,
}

/// Starts a worker on loopback ports chosen by the OS; `extra` is appended to the config.
pub async fn start(extra: &str) -> TestWorker {
    start_with_secret(SECRET, extra).await
}

pub async fn start_with_secret(secret: &str, extra: &str) -> TestWorker {
    // Loopback unless the test binds elsewhere.
    let bind = if extra.contains("ws_bind") {
        ""
    } else {
        "ws_bind = \"127.0.0.1\"\n"
    };
    let text =
        format!("{bind}ws_port = 0\ninternal_port = 0\nworker_secret = \"{secret}\"\n{extra}");
    let config = Config::from_toml(&text, &|_| None).expect("test config is valid");
    let worker = wavelog_worker::start(config).await.expect("worker starts");
    TestWorker {
        public: worker.public_addr,
        internal: worker.internal_addr,
        secret: secret.to_string(),
        worker,
    }
}

/// A whole HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<String> {
        header_value(&self.head, name)
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends one raw HTTP/1.1 request (`Connection: close`) and reads the whole answer.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(req.as_bytes()).await.expect("write head");
    stream.write_all(body).await.expect("write body");
    read_answer(stream).await
}

pub async fn read_answer(mut stream: TcpStream) -> Answer {
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("answer within 10 s");
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    Answer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// The Content-Length of a response head, if it has one.
pub fn content_length(head: &str) -> Option<usize> {
    header_value(head, "content-length").and_then(|v| v.trim().parse().ok())
}

/// A header's value from a response head (status line first).
fn header_value(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// POST to the internal API with the secret.
pub async fn internal(t: &TestWorker, route: &str, body: &str) -> Answer {
    http(
        t.internal,
        "POST",
        &format!("/internal/{route}"),
        &[
            ("X-Worker-Secret", &t.secret),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await
}

pub async fn register(t: &TestWorker, topic: &str, require_token: bool) {
    let body = serde_json::json!({ "topic": topic, "meta": { "require_token": require_token } });
    let a = internal(t, "register", &body.to_string()).await;
    assert_eq!(a.status, 200, "register {topic}: {a:?}");
}

/// Publishes raw JSON `payload` text; returns the HTTP status.
pub async fn publish(t: &TestWorker, topic: &str, payload: &str) -> u16 {
    let topic = serde_json::to_string(topic).unwrap();
    internal(
        t,
        "publish",
        &format!("{{\"topic\":{topic},\"payload\":{payload}}}"),
    )
    .await
    .status
}

pub async fn status(t: &TestWorker, query: &str) -> Value {
    let a = http(
        t.internal,
        "GET",
        &format!("/internal/status{query}"),
        &[("X-Worker-Secret", SECRET)],
        b"",
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    a.json()
}

pub fn token_for(topic: &str, user_id: i64, ttl_secs: i64) -> String {
    token::sign(
        SECRET.as_bytes(),
        &Claims {
            user_id,
            topic: topic.to_string(),
            expires: unix_now() + ttl_secs,
        },
    )
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// `pairs` as a URL-encoded query string, as browsers encode forms.
pub fn query(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// Opens `/ws?topic=...` (the topic is URL-encoded here).
pub async fn ws_open(t: &TestWorker, topic: &str) -> Ws {
    let q = query(&[("topic", topic)]);
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws?{q}", t.public))
        .await
        .expect("upgrade");
    ws
}

/// The HTTP status a refused upgrade got.
pub async fn ws_refused_status(t: &TestWorker, path_and_query: &str) -> u16 {
    ws_refused_status_or_open(t, path_and_query)
        .await
        .expect("upgrade unexpectedly accepted")
}

/// The HTTP status of a refused upgrade, or `None` when the upgrade was accepted.
pub async fn ws_refused_status_or_open(t: &TestWorker, path_and_query: &str) -> Option<u16> {
    match tokio_tungstenite::connect_async(format!("ws://{}{path_and_query}", t.public)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Some(resp.status().as_u16()),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => None,
    }
}

pub async fn send_json(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Opens a socket, authenticates, and checks for `auth_ok`.
pub async fn ws_subscribe(t: &TestWorker, topic: &str, token: &str) -> Ws {
    let mut ws = ws_open(t, topic).await;
    send_json(
        &mut ws,
        serde_json::json!({ "type": "auth", "token": token }),
    )
    .await;
    let ok = next_json(&mut ws).await;
    assert_eq!(ok["type"], "auth_ok", "{ok}");
    ws
}

/// The next frame of any kind, skipping pings (5 s limit).
pub async fn next_msg(ws: &mut Ws) -> Option<Message> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5 s");
        match m {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(m)) => return Some(m),
            Some(Err(_)) | None => return None,
        }
    }
}

/// The next text frame as raw text.
pub async fn next_text(ws: &mut Ws) -> String {
    match next_msg(ws).await {
        Some(Message::Text(t)) => t.to_string(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

pub async fn next_json(ws: &mut Ws) -> Value {
    let text = next_text(ws).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Asserts that no text frame arrives within `wait`.
pub async fn assert_silent(ws: &mut Ws, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(other) => panic!("expected silence, got {other:?}"),
        }
    }
}

/// Reads until the server's close frame; returns its code (`None` if the TCP connection just
/// ended).
pub async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match next_msg(ws).await {
            Some(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
            Some(_) => continue,
            None => return None,
        }
    }
}

/// Polls `check` until it holds (5 s limit), for counters that settle asynchronously.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One SSE block (up to a blank line).
#[derive(Debug, Default, Clone)]
pub struct SseBlock {
    /// The `event:` field; `None` for plain messages (what `onmessage` gets).
    pub event: Option<String>,
    pub id: Option<String>,
    pub data: Option<String>,
    pub retry: Option<u64>,
    pub comments: Vec<String>,
}

/// A real SSE client over a raw socket: it decodes chunked transfer encoding itself, so tests
/// see the bytes exactly as a browser would.
pub struct SseClient {
    stream: TcpStream,
    pub status: u16,
    pub head: String,
    /// Decoded body bytes not consumed yet.
    body: Vec<u8>,
    raw: Vec<u8>,
    pub last_id: Option<String>,
}

#[allow(dead_code)]
impl SseClient {
    /// `GET path_and_query`; returns the whole answer instead when the status is not 200.
    pub async fn connect(
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<SseClient, Answer> {
        let stream = TcpStream::connect(addr).await.expect("connect");
        SseClient::on(stream, path_and_query, headers).await
    }

    /// `connect` on a connection that may have served other requests already.
    pub async fn on(
        mut stream: TcpStream,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<SseClient, Answer> {
        let addr = stream.peer_addr().expect("peer");
        let mut req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        let head_end = loop {
            if let Some(pos) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos;
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("head within 5 s")
                .expect("read");
            assert!(
                n > 0,
                "connection closed before the head: {:?}",
                String::from_utf8_lossy(&raw)
            );
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
        let rest = raw[head_end + 4..].to_vec();
        let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        if status != 200 {
            let mut body = rest;
            let length = content_length(&head).expect("refusals have a Content-Length");
            while body.len() < length {
                let mut buf = [0u8; 4096];
                let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(n > 0);
                body.extend_from_slice(&buf[..n]);
            }
            return Err(Answer {
                status,
                head,
                body: String::from_utf8_lossy(&body).to_string(),
            });
        }
        Ok(SseClient {
            stream,
            status,
            head,
            body: Vec::new(),
            raw: rest,
            last_id: None,
        })
    }

    pub fn header(&self, name: &str) -> Option<String> {
        header_value(&self.head, name)
    }

    async fn read_more(&mut self) -> bool {
        let mut buf = [0u8; 16384];
        match tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                self.raw.extend_from_slice(&buf[..n]);
                true
            }
            Ok(_) => false,
            Err(_) => panic!("no SSE bytes within 5 s"),
        }
    }

    /// Moves complete chunks from `raw` to `body`; false once the stream has ended.
    async fn fill(&mut self) -> bool {
        loop {
            if let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") {
                let size_text = String::from_utf8_lossy(&self.raw[..line_end]).to_string();
                let size = usize::from_str_radix(size_text.trim(), 16).expect("chunk size");
                if size == 0 {
                    return false;
                }
                let need = line_end + 2 + size + 2;
                if self.raw.len() >= need {
                    self.body
                        .extend_from_slice(&self.raw[line_end + 2..line_end + 2 + size]);
                    self.raw.drain(..need);
                    return true;
                }
            }
            if !self.read_more().await {
                return false;
            }
        }
    }

    /// Exactly `n` body bytes.
    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        while self.body.len() < n {
            assert!(self.fill().await, "stream ended");
        }
        self.body.drain(..n).collect()
    }

    /// The next block, or `None` when the server ended the stream.
    pub async fn next_block(&mut self) -> Option<SseBlock> {
        loop {
            if let Some(end) = self.body.windows(2).position(|w| w == b"\n\n") {
                let text = String::from_utf8(self.body.drain(..end + 2).collect()).expect("UTF-8");
                let mut block = SseBlock::default();
                for line in text.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        block.comments.push(c.trim().to_string());
                        continue;
                    }
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "id" => block.id = Some(value.to_string()),
                        "event" => block.event = Some(value.to_string()),
                        "retry" => block.retry = value.parse().ok(),
                        "data" => match &mut block.data {
                            Some(d) => {
                                d.push('\n');
                                d.push_str(value);
                            }
                            None => block.data = Some(value.to_string()),
                        },
                        _ => {}
                    }
                }
                if let Some(id) = &block.id {
                    self.last_id = Some(id.clone());
                }
                return Some(block);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next message an `onmessage` handler would get, parsed as JSON (keepalives and
    /// named events such as `position` skipped).
    pub async fn next_json(&mut self) -> Value {
        loop {
            let block = self.next_block().await.expect("stream still open");
            if block.event.is_some() {
                continue;
            }
            if let Some(data) = block.data {
                return serde_json::from_str(&data)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {data}"));
            }
        }
    }
}

/// `/sse?topic=..&token=..` for one topic.
pub fn sse_path(topic: &str, token: &str) -> String {
    format!("/sse?{}", query(&[("topic", topic), ("token", token)]))
}

/// Finds a system program a test needs. Missing: the test is skipped with a clear message,
/// except under CI (`CI` set), where it fails, since CI installs everything.
pub fn require_tool(name: &str) -> Option<std::path::PathBuf> {
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/bin", "/sbin", "/usr/local/bin"].map(std::path::PathBuf::from));
    if let Some(found) = dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) {
        return Some(found);
    }
    if std::env::var_os("CI").is_some() {
        panic!("{name} is required under CI (.ci/run installs it) but was not found");
    }
    eprintln!("SKIPPED: this test needs `{name}`, which is not installed (apt-get install {name}); .ci/run installs it");
    None
}

/// A fresh private directory under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ww-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The worker's `/metrics` text.
pub async fn metrics(t: &TestWorker) -> String {
    let bearer = format!("Bearer {}", t.secret);
    http(
        t.internal,
        "GET",
        "/metrics",
        &[("Authorization", &bearer)],
        b"",
    )
    .await
    .body
}

/// Waits until one line of the worker's `/metrics` is `sample` (e.g. `name{label="x"} 1`).
pub async fn eventually_metric(t: &TestWorker, sample: &str) {
    eventually(sample, || async {
        metrics(t).await.lines().any(|l| l == sample)
    })
    .await;
}

/// Reads `n` pushes from every socket and checks that all saw the same events in the same
/// order, and that this order is the order of the event ids. Returns (id, payload) pairs.
pub async fn one_order_everywhere(subs: &mut [Ws], n: usize) -> Vec<(String, String)> {
    let mut orders = Vec::new();
    for ws in subs.iter_mut() {
        let mut seen = Vec::new();
        for _ in 0..n {
            let v = next_json(ws).await;
            seen.push((
                v["id"].as_str().unwrap().to_string(),
                v["payload"].as_str().unwrap().to_string(),
            ));
        }
        orders.push(seen);
    }
    for o in &orders[1..] {
        assert_eq!(o, &orders[0], "every subscriber sees the same order");
    }
    let seqs: Vec<u64> = orders[0]
        .iter()
        .map(|(id, _)| id.rsplit('-').next().unwrap().parse().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "delivery order is id order: {seqs:?}"
    );
    orders.swap_remove(0)
}

/// A client with a tiny receive window that sends `first` and then reads nothing, so the
/// worker's writes to it back up quickly.
pub async fn stuck_client(t: &TestWorker, first: &[u8]) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stuck = socket.connect(t.public).await.unwrap();
    stuck.write_all(first).await.unwrap();
    stuck
}

/// Publishes `n` events of about 30 KB (`{"n":i,"f":"xxx..."}`) to `topic`.
pub async fn publish_large(t: &TestWorker, topic: &str, n: usize) {
    let filler = "x".repeat(30_000);
    for i in 0..n {
        let payload = format!("{{\"n\":{i},\"f\":\"{filler}\"}}");
        assert_eq!(publish(t, topic, &payload).await, 200);
    }
}
