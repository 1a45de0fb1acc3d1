//! The DX cluster relay against a fake cluster node (a telnet-style line server with a login
//! prompt) and a fake Wavelog lookup API, both over real sockets.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpListener;

use crate::cluster::{node, Redis};
use crate::common::*;

/// A DX cluster node: asks for a login, records it, then sends what the test tells it to.
pub struct FakeNode {
    pub port: u16,
    seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

/// What the node's connections share.
#[derive(Default)]
struct Seen {
    logins: Mutex<Vec<String>>,
    open: AtomicUsize,
    /// The most connections ever logged in at once.
    most_open: AtomicUsize,
    writers: tokio::sync::Mutex<Vec<OwnedWriteHalf>>,
}

impl FakeNode {
    pub async fn start(port: u16) -> FakeNode {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Seen::default());
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve_login(conn, shared.clone()));
            }
        });
        FakeNode { port, seen, task }
    }

    pub fn most_open(&self) -> usize {
        self.seen.most_open.load(Ordering::SeqCst)
    }

    pub fn first_login(&self) -> String {
        self.seen.logins.lock().unwrap()[0].clone()
    }

    /// Writes `bytes` to every logged-in connection.
    pub async fn send(&self, bytes: &[u8]) {
        let mut writers = self.seen.writers.lock().await;
        let mut alive = Vec::new();
        for mut w in writers.drain(..) {
            if w.write_all(bytes).await.is_ok() {
                alive.push(w);
            }
        }
        *writers = alive;
    }

    /// Closes every connection (the listener stays).
    pub async fn disconnect(&self) {
        for mut w in self.seen.writers.lock().await.drain(..) {
            let _ = w.shutdown().await;
        }
    }

    /// Stops listening and closes every connection: the node is gone.
    pub async fn stop(self) {
        self.task.abort();
        self.disconnect().await;
    }

    pub fn login_count(&self) -> usize {
        self.seen.logins.lock().unwrap().len()
    }
}

/// One connection: the login prompt, the login recorded, then kept for `FakeNode::send`.
async fn serve_login(conn: tokio::net::TcpStream, seen: Arc<Seen>) {
    let (read, mut write) = conn.into_split();
    if write
        .write_all(b"Welcome to the test node\r\n\r\nlogin: ")
        .await
        .is_err()
    {
        return;
    }
    let mut read = BufReader::new(read);
    let mut call = String::new();
    if read.read_line(&mut call).await.unwrap_or(0) == 0 {
        return;
    }
    seen.logins.lock().unwrap().push(call.trim().to_string());
    let now = seen.open.fetch_add(1, Ordering::SeqCst) + 1;
    seen.most_open.fetch_max(now, Ordering::SeqCst);
    let _ = write
        .write_all(b"Hello N0CALL, this is TEST-1\r\nN0CALL de TEST-1 >\r\n")
        .await;
    seen.writers.lock().await.push(write);
    let mut sink = Vec::new();
    let _ = read.read_to_end(&mut sink).await;
    seen.open.fetch_sub(1, Ordering::SeqCst);
}

/// Wavelog's lookup API for a few callsigns; `FAIL/...` answers 500. Counts requests.
pub async fn fake_lookup() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut conn = BufReader::new(conn);
                let mut length = 0usize;
                let mut first = String::new();
                let _ = conn.read_line(&mut first).await;
                loop {
                    let mut line = String::new();
                    if conn.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if line.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; length];
                let _ = conn.read_exact(&mut body).await;
                counted.fetch_add(1, Ordering::SeqCst);
                let req: Value = serde_json::from_slice(&body).unwrap_or_default();
                let call = req["callsign"].as_str().unwrap_or_default().to_string();
                let (status, answer) = match (req["key"].as_str(), call.as_str()) {
                    (Some("test-key"), "DL1XYZ") => (
                        200,
                        json!({"callsign":"DL1XYZ","dxcc":"FEDERAL REPUBLIC OF GERMANY","dxcc_id":"230","dxcc_lat":"51","dxcc_long":"10","dxcc_cqz":"14","dxcc_flag":"DE","cont":"EU","lotw_member":3,"name":"Private Name","workedBefore":true}),
                    ),
                    (Some("test-key"), "SP9ABC") => (
                        200,
                        json!({"callsign":"SP9ABC","dxcc":"POLAND","dxcc_id":269,"dxcc_lat":"52","dxcc_long":"19","dxcc_cqz":"15","dxcc_flag":"PL","cont":"EU","lotw_member":false}),
                    ),
                    (Some("test-key"), c) if c.starts_with("FAIL") => (500, json!({})),
                    (Some("test-key"), _) => (200, json!({"dxcc":"- NONE -","dxcc_id":0})),
                    _ => (
                        401,
                        json!({"status":"failed","reason":"missing api key or session"}),
                    ),
                };
                let text = answer.to_string();
                let head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    text.len()
                );
                let conn = conn.get_mut();
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(text.as_bytes()).await;
            });
        }
    });
    (port, requests)
}

fn dx_config(node_port: u16, lookup_port: u16, extra: &str) -> String {
    format!(
        "[dxcluster]\nhost = \"127.0.0.1\"\nport = {node_port}\ncallsign = \"n0call\"\n\
         lookup_url = \"http://127.0.0.1:{lookup_port}/index.php/api/lookup\"\n\
         lookup_key = \"test-key\"\n{extra}"
    )
}

async fn has_topic(t: &TestWorker, topic: &str) -> bool {
    let s = status(t, "?topics=1").await;
    s["topic_list"]
        .as_array()
        .is_some_and(|l| l.iter().any(|x| x == topic))
}

/// Sends a first spot until the relay has registered its topic.
async fn warm_up(t: &TestWorker, node: &FakeNode) {
    eventually("the relay to log in", || async { node.login_count() > 0 }).await;
    node.send(b"DX de K1AA:      7010.0  W1AW         warm up                  0000Z\r\n")
        .await;
    eventually("dxspots to be registered", || async {
        has_topic(t, "dxspots").await
    })
    .await;
}

/// The next spot pushed to `sse`, past the warm-up spot (which may or may not have been
/// published after the subscriber joined).
async fn next_spot(sse: &mut SseClient) -> Value {
    loop {
        let spot = spots(sse, 1).await.remove(0);
        if spot["spot"]["spotted"] != "W1AW" {
            return spot;
        }
    }
}

/// The spot payloads an SSE subscriber receives, until `n` arrived.
async fn spots(sse: &mut SseClient, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let v = tokio::time::timeout(Duration::from_secs(10), sse.next_json())
            .await
            .expect("a spot within 10 s");
        if v["type"] == "push" {
            out.push(v["payload"].clone());
        }
    }
    out
}

#[tokio::test]
async fn spots_from_the_cluster_reach_subscribers_once_enriched_and_in_order() {
    let node = FakeNode::start(0).await;
    let (lookup_port, lookups) = fake_lookup().await;
    let t = start(&dx_config(node.port, lookup_port, "")).await;
    warm_up(&t, &node).await;
    assert_eq!(node.first_login(), "N0CALL");
    let token = token_for("dxspots", 7, 600);
    let mut sse = SseClient::connect(t.public, &sse_path("dxspots", &token), &[])
        .await
        .expect("dxspots needs a token and has one");
    sse.next_block().await.unwrap();
    let mut stream = Vec::new();
    stream.extend_from_slice(b"WWV de W0MU <18>:   SFI=70, A=5, K=1, No Storms -> No Storms\r\n");
    stream.extend_from_slice(b"To ALL de SP9ABC: anyone on 20m?\r\n");
    stream.extend_from_slice(
        b"DX de SP9ABC:     14025.0  DL1XYZ       CW 599 <b>big</b> sig   1234Z\r\n",
    );
    // The same spot again (another node forwarded it): sent once.
    stream.extend_from_slice(
        b"DX de SP9ABC:     14025.0  DL1XYZ       CW 599                  1234Z\r\n",
    );
    stream.extend_from_slice(
        b"DX de SP9ABC:     14025.0  <script>     CW                      1234Z\r\n",
    );
    stream.extend_from_slice(b"DX de SP9ABC: not-a-frequency DL1XYZ x 1234Z\r\n");
    let mut long = b"DX de SP9ABC:     14030.0  DL1XYZ       ".to_vec();
    long.resize(600, b'x');
    long.extend_from_slice(b" 1234Z\r\n");
    stream.extend_from_slice(&long);
    stream.extend_from_slice(
        b"DX de DK9IP-#:    7074.0  ea8/on4abc   FT8 -12 dB POTA EA-1234 0915Z JN48\n",
    );
    stream.extend_from_slice(
        b"DX de FAIL1AA:   21295.0  DL1XYZ       CQ WW DX contest         1001Z\r\n",
    );
    stream.extend_from_slice(
        b"DX de SP9ABC:    12000.0  DL1XYZ       out of band              1002Z\r\n",
    );
    // The last spot arrives split over two writes.
    stream.extend_from_slice(b"DX de SP9ABC:    144300.0 DL1XYZ       ssb 59 JO");
    node.send(&stream).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.send(b"30                     1003Z\r\n").await;

    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(next_spot(&mut sse).await);
    }
    let s: Vec<&Value> = got.iter().map(|p| &p["spot"]).collect();
    assert!(got.iter().all(|p| p["type"] == "spot"));
    assert_eq!(s[0]["spotted"], "DL1XYZ");
    assert_eq!(s[0]["spotter"], "SP9ABC");
    assert_eq!(s[0]["frequency"], json!(14025.0));
    assert_eq!(s[0]["band"], "20m");
    assert_eq!(s[0]["mode"], "cw");
    assert_eq!(s[0]["submode"], "CW");
    assert_eq!(s[0]["source"], "cluster");
    assert_eq!(
        s[0]["message"], "CW 599 bbig/b sig",
        "no markup reaches Wavelog's HTML"
    );
    assert!(s[0]["when"].as_str().unwrap().ends_with('Z'));
    assert_eq!(s[0]["dxcc_spotted"]["dxcc_id"], 230);
    assert_eq!(
        s[0]["dxcc_spotted"]["entity"],
        "Federal Republic Of Germany"
    );
    assert_eq!(s[0]["dxcc_spotted"]["cont"], "EU");
    assert_eq!(s[0]["dxcc_spotted"]["lotw_user"], 3);
    assert!(
        s[0]["dxcc_spotted"].get("name").is_none(),
        "nothing of the caller's own log"
    );
    assert_eq!(s[0]["dxcc_spotter"]["entity"], "Poland");
    assert_eq!(s[0]["dxcc_spotter"]["lotw_user"], false);

    assert_eq!(s[1]["spotted"], "EA8/ON4ABC");
    assert_eq!(s[1]["spotter"], "DK9IP-#");
    assert_eq!(s[1]["band"], "40m");
    assert_eq!(
        (s[1]["mode"].as_str(), s[1]["submode"].as_str()),
        (Some("digi"), Some("FT8"))
    );
    assert_eq!(s[1]["dxcc_spotted"]["pota_ref"], "EA-1234");
    assert!(
        s[1]["dxcc_spotted"].get("dxcc_id").is_none(),
        "unknown to Wavelog: no DXCC data"
    );

    assert_eq!(s[2]["band"], "15m");
    assert_eq!(s[2]["dxcc_spotted"]["isContest"], true);
    assert_eq!(s[2]["dxcc_spotted"]["contestName"], "CQ WW");
    assert!(
        s[2].get("dxcc_spotter").is_none(),
        "its lookup failed; the spot still came"
    );

    assert_eq!(s[3]["band"], "2m");
    assert_eq!(
        (s[3]["mode"].as_str(), s[3]["submode"].as_str()),
        (Some("phone"), Some("USB"))
    );

    let m = metrics(&t).await;
    for line in [
        "wavelog_worker_dx_upstream_connected 1",
        "wavelog_worker_dx_spots_published_total 5",
        "wavelog_worker_dx_spots_duplicate_total 1",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} in\n{m}");
    }
    assert!(
        lookups.load(Ordering::SeqCst) <= 8,
        "answers are cached per callsign"
    );
}

#[tokio::test]
async fn the_relay_reconnects_notices_silence_and_unregisters_while_the_cluster_is_gone() {
    let node = FakeNode::start(0).await;
    let port = node.port;
    let (lookup_port, _) = fake_lookup().await;
    let t = start(&dx_config(
        port,
        lookup_port,
        "unregister_after = \"4s\"\nsilence_timeout = \"2s\"",
    ))
    .await;
    warm_up(&t, &node).await;
    // The node drops us: the relay logs in again.
    node.disconnect().await;
    eventually("a second login", || async { node.login_count() >= 2 }).await;
    // The node says nothing for longer than silence_timeout: taken for dead, reconnected.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    eventually("a login after the silence", || async {
        node.login_count() >= 3
    })
    .await;
    assert!(
        has_topic(&t, "dxspots").await,
        "short outages keep the topic"
    );
    // The node goes away for good: after unregister_after Wavelog is told (no topic).
    node.stop().await;
    let stopped = std::time::Instant::now();
    while has_topic(&t, "dxspots").await {
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "still registered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        stopped.elapsed() >= Duration::from_secs(4),
        "not before unregister_after"
    );
    // It comes back and spots flow: registered again.
    let node = FakeNode::start(port).await;
    // (Reconnects back off, up to a minute: allow for a few doublings.)
    let back = std::time::Instant::now();
    while node.login_count() == 0 {
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "no login to the new node"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.send(b"DX de K1AA:      7010.0  W1AW         back                     0001Z\r\n")
        .await;
    eventually("dxspots to be registered again", || async {
        has_topic(&t, "dxspots").await
    })
    .await;
}

#[tokio::test]
async fn in_a_cluster_one_node_relays_and_another_takes_over_when_it_dies() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let node_cfg = FakeNode::start(0).await;
    let (lookup_port, _) = fake_lookup().await;
    let config = dx_config(node_cfg.port, lookup_port, "");
    // Node A as a process of its own, so it can die with SIGKILL.
    let dir = TempDir::new("dx-cluster");
    let path = dir.0.join("a.toml");
    let (a_public, a_internal) = (free_port(), free_port());
    std::fs::write(
        &path,
        format!(
            "ws_bind = \"127.0.0.1\"\nws_port = {a_public}\ninternal_port = {a_internal}\n\
             worker_secret = \"{SECRET}\"\nredis_url = \"{}\"\n{config}",
            redis.url()
        ),
    )
    .unwrap();
    let mut a = tokio::process::Command::new(env!("CARGO_BIN_EXE_wavelog-worker"))
        .args(["--config", path.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually("A to relay", || async { node_cfg.login_count() == 1 }).await;
    let b = node(&redis, &config).await;
    node_cfg
        .send(b"DX de K1AA:      7010.0  W1AW         warm up                  0000Z\r\n")
        .await;
    eventually("dxspots registered", || async {
        has_topic(&b, "dxspots").await
    })
    .await;
    let a_addr: std::net::SocketAddr = format!("127.0.0.1:{a_public}").parse().unwrap();
    let token = token_for("dxspots", 1, 600);
    let mut on_a = SseClient::connect(a_addr, &sse_path("dxspots", &token), &[])
        .await
        .unwrap();
    let mut on_b = SseClient::connect(b.public, &sse_path("dxspots", &token), &[])
        .await
        .unwrap();
    on_a.next_block().await.unwrap();
    on_b.next_block().await.unwrap();
    node_cfg
        .send(b"DX de SP9ABC:     14025.0  DL1XYZ       CW                      1234Z\r\n")
        .await;
    for sse in [&mut on_a, &mut on_b] {
        assert_eq!(next_spot(sse).await["spot"]["spotted"], "DL1XYZ");
    }
    node_cfg
        .send(b"DX de SP9ABC:     14026.0  DL2XYZ       CW                      1235Z\r\n")
        .await;
    for sse in [&mut on_a, &mut on_b] {
        let next = spots(sse, 1).await;
        assert_eq!(
            next[0]["spot"]["spotted"], "DL2XYZ",
            "each spot once on each node"
        );
    }
    assert_eq!(
        node_cfg.login_count(),
        1,
        "one upstream login across the cluster"
    );
    assert_eq!(node_cfg.most_open(), 1);
    // The relaying node dies without a word: B takes over within 15 s.
    let killed = std::time::Instant::now();
    let pid = a.id().unwrap().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status();
    let _ = a.wait().await;
    for _ in 0..300 {
        if node_cfg.login_count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(node_cfg.login_count() >= 2, "B logged in");
    assert!(
        killed.elapsed() < Duration::from_secs(15),
        "took over in {:?}",
        killed.elapsed()
    );
    node_cfg
        .send(b"DX de SP9ABC:     14027.0  DL3XYZ       CW                      1236Z\r\n")
        .await;
    assert_eq!(next_spot(&mut on_b).await["spot"]["spotted"], "DL3XYZ");
}
