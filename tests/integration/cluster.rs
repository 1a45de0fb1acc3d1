//! Cluster mode against a real `redis-server` of the test's own (started, killed and restarted
//! here) and several workers.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::common::*;

/// A `redis-server` on a free loopback port, killed on drop.
pub struct Redis {
    binary: std::path::PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Redis {
    /// `None` (test skipped, with a message) when redis-server is not installed.
    pub async fn start() -> Option<Redis> {
        let binary = require_tool("redis-server")?;
        let mut redis = Redis {
            binary,
            port: free_port(),
            child: None,
        };
        redis.launch().await;
        Some(redis)
    }

    pub async fn launch(&mut self) {
        let child = Command::new(&self.binary)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        eventually("redis to listen", || async {
            tokio::net::TcpStream::connect(&addr).await.is_ok()
        })
        .await;
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let cli = require_tool("redis-cli").expect("redis-cli comes with redis-server");
        let out = Command::new(cli)
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn node(redis: &Redis, extra: &str) -> TestWorker {
    let t = start(&format!("redis_url = \"{}\"\n{extra}", redis.url())).await;
    wait_ready(&t, true).await;
    t
}

/// The operator's view (internal port): ready means connected to Redis.
async fn ready(t: &TestWorker) -> bool {
    http(t.internal, "GET", "/readyz", &[], b"").await.status == 200
}

/// Waits (up to 20 s: reconnect backoff tops out at 5 s) for readiness to be `want`.
pub async fn wait_ready(t: &TestWorker, want: bool) {
    for _ in 0..400 {
        if ready(t).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("readyz never became {want}");
}

#[tokio::test]
async fn a_publish_on_one_node_reaches_every_node_once_and_in_order() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let (a, b, c) = (
        node(&redis, "").await,
        node(&redis, "").await,
        node(&redis, "").await,
    );
    register(&a, "contest_session.1", true).await;
    let token = token_for("contest_session.1", 1, 60);
    let mut on_a = ws_subscribe(&a, "contest_session.1", &token).await;
    let mut on_b = ws_subscribe(&b, "contest_session.1", &token).await;
    let mut on_c = SseClient::connect(c.public, &sse_path("contest_session.1", &token), &[])
        .await
        .unwrap();
    on_c.next_block().await.unwrap();
    for i in 0..50 {
        assert_eq!(publish(&a, "contest_session.1", &i.to_string()).await, 200);
    }
    for i in 0..50 {
        let va = next_json(&mut on_a).await;
        let vb = next_json(&mut on_b).await;
        let vc = on_c.next_json().await;
        assert_eq!(
            (
                va["payload"].as_i64(),
                vb["payload"].as_i64(),
                vc["payload"].as_i64()
            ),
            (Some(i), Some(i), Some(i))
        );
        assert_eq!(va["id"], vb["id"], "one cluster-wide id per event");
        assert_eq!(va["id"], vc["id"]);
    }
    assert_silent(&mut on_a, Duration::from_millis(300)).await;
    let s = status(&a, "").await;
    assert_eq!(s["cluster_nodes"], 3);
    assert_eq!(s["redis"], "connected");
}

#[tokio::test]
async fn a_go_worker_envelope_is_delivered() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let (a, b) = (node(&redis, "").await, node(&redis, "").await);
    register(&a, "qso.1", false).await;
    let mut on_a = ws_subscribe(&a, "qso.1", "x").await;
    let mut on_b = SseClient::connect(b.public, &sse_path("qso.1", "x"), &[])
        .await
        .unwrap();
    on_b.next_block().await.unwrap();
    let envelope =
        r#"{"origin_id":"go-node-7","topic":"qso.1","payload":{"type":"sync_required","n":1.50}}"#;
    assert_eq!(redis.cli(&["PUBLISH", "wavelog:events", envelope]), "2");
    let va = next_text(&mut on_a).await;
    assert!(
        va.ends_with(r#""payload":{"type":"sync_required","n":1.50}}"#),
        "{va}"
    );
    assert_eq!(on_b.next_json().await["payload"]["type"], "sync_required");
    // Our own envelopes carry what the Go worker reads.
    let a_pub = internal(&a, "publish", r#"{"topic":"qso.1","payload":{"k":1}}"#).await;
    assert_eq!(a_pub.status, 200);
}

#[tokio::test]
async fn the_registry_is_shared_through_redis() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let (a, b) = (node(&redis, "").await, node(&redis, "").await);
    register(&a, "radio.5", true).await;
    let key = redis.cli(&["GET", "wavelog:topic:radio.5"]);
    assert!(key.contains("\"require_token\":true"), "{key}");
    let ttl: i64 = redis
        .cli(&["TTL", "wavelog:topic:radio.5"])
        .parse()
        .unwrap();
    assert!(ttl > 80_000, "topic_ttl applies in Redis: {ttl}");
    ws_subscribe(&b, "radio.5", &token_for("radio.5", 1, 60)).await;
    assert_eq!(
        publish(&b, "radio.5", "1").await,
        200,
        "B knows the topic A registered"
    );
    assert_eq!(
        internal(&a, "unregister", r#"{"topic":"radio.5"}"#)
            .await
            .status,
        200
    );
    // The invalidation reaches B through Redis pub/sub: asynchronously, but long before B's
    // cached entry would expire (registry_cache_ttl, 2 s).
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    loop {
        let refused = ws_refused_status_or_open(&b, "/ws?topic=radio.5").await;
        if refused == Some(404) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "B still accepts radio.5 after 500 ms: {refused:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(publish(&b, "radio.5", "2").await, 404);
    // A topic registered by a Go node (straight into Redis) is found too.
    redis.cli(&[
        "SET",
        "wavelog:topic:qso.9",
        r#"{"require_token":false}"#,
        "EX",
        "60",
    ]);
    ws_subscribe(&b, "qso.9", "x").await;
    let s = status(&a, "?topics=1").await;
    assert_eq!(
        s["topic_list"],
        json!(["qso.9", "worker.status"]),
        "SCAN lists the shared registry"
    );
}

#[tokio::test]
async fn resume_after_moving_to_another_node() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let (a, b) = (node(&redis, "").await, node(&redis, "").await);
    register(&a, "qso.2", false).await;
    let mut sse = SseClient::connect(a.public, &sse_path("qso.2", "x"), &[])
        .await
        .unwrap();
    sse.next_block().await.unwrap();
    publish(&a, "qso.2", "0").await;
    assert_eq!(sse.next_json().await["payload"], 0);
    let last = sse.last_id.clone().unwrap();
    drop(sse);
    for i in 1..4 {
        publish(&a, "qso.2", &i.to_string()).await;
    }
    // The load balancer sends the reconnect to B.
    let mut moved = SseClient::connect(
        b.public,
        &sse_path("qso.2", "x"),
        &[("Last-Event-ID", &last)],
    )
    .await
    .unwrap();
    for i in 1..4 {
        assert_eq!(moved.next_json().await["payload"], i);
    }
    let mut ws = ws_open(&b, "qso.2").await;
    send_json(
        &mut ws,
        json!({"type":"auth","token":"x","last_event_id":last}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["type"], "auth_ok");
    let first = next_json(&mut ws).await;
    assert_eq!(
        first["payload"], 1,
        "WebSocket resumes across nodes too: {first}"
    );
}

#[tokio::test]
async fn a_redis_outage_loses_no_local_event_and_ends_in_resync() {
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    let a = Arc::new(node(&redis, "").await);
    let b = node(&redis, "").await;
    register(&a, "radio.1", false).await;
    let mut on_a = ws_subscribe(&a, "radio.1", "x").await;
    let mut on_b = ws_subscribe(&b, "radio.1", "x").await;
    publish(&a, "radio.1", "\"before\"").await;
    assert_eq!(next_json(&mut on_b).await["payload"], "before");
    assert_eq!(next_json(&mut on_a).await["payload"], "before");

    redis.kill();
    wait_ready(&a, false).await;
    let s = status(&a, "").await;
    assert_eq!(s["redis"], "disconnected");
    for i in 0..20 {
        assert_eq!(
            publish(&a, "radio.1", &i.to_string()).await,
            200,
            "local delivery continues"
        );
        assert_eq!(next_json(&mut on_a).await["payload"], i);
    }
    redis.launch().await;
    wait_ready(&a, true).await;
    wait_ready(&b, true).await;
    // B's subscriber may have missed cross-node events: it is told so, then gets live events.
    // (next_json fails the test if no frame comes within 5 s.)
    while next_json(&mut on_b).await["type"] != "resync" {}
    publish(&a, "radio.1", "\"after\"").await;
    loop {
        let v = next_json(&mut on_b).await;
        if v["payload"] == "after" {
            break;
        }
        assert_eq!(v["type"], "resync", "only resyncs before live events: {v}");
    }
    let m = metrics(&a).await;
    assert!(m.contains("wavelog_worker_redis_connected 1"));
    assert!(
        m.contains("wavelog_worker_cluster_publish_failures_total 20"),
        "{m}"
    );
    assert!(m
        .lines()
        .any(|l| l.starts_with("wavelog_worker_redis_reconnects_total ") && !l.ends_with(" 0")));
}

#[tokio::test]
async fn redis_down_at_start_serves_locally_and_becomes_ready() {
    let Some(binary) = require_tool("redis-server") else {
        return;
    };
    let mut redis = Redis {
        binary,
        port: free_port(),
        child: None,
    };
    let t = start(&format!("redis_url = \"{}\"", redis.url())).await;
    assert!(!ready(&t).await, "not ready without Redis");
    register(&t, "qso.1", false).await;
    let mut ws = ws_subscribe(&t, "qso.1", "x").await;
    assert_eq!(publish(&t, "qso.1", "1").await, 200);
    assert_eq!(next_json(&mut ws).await["payload"], 1);
    redis.launch().await;
    wait_ready(&t, true).await;
    // The registration made while Redis was away reached Redis.
    eventually("the pending registration to be written", || async {
        redis.cli(&["EXISTS", "wavelog:topic:qso.1"]) == "1"
    })
    .await;
}

/// Publishes through two nodes at once: every subscriber on every node sees the same events in
/// the same order, and that order is the order of the ids (so resuming by id is exact).
#[tokio::test]
async fn concurrent_publishes_through_two_nodes_reach_everyone_in_id_order() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let a = Arc::new(node(&redis, "").await);
    let b = Arc::new(node(&redis, "").await);
    register(&a, "contest_session.5", false).await;
    let mut subs = vec![
        ws_subscribe(&a, "contest_session.5", "x").await,
        ws_subscribe(&a, "contest_session.5", "x").await,
        ws_subscribe(&b, "contest_session.5", "x").await,
        ws_subscribe(&b, "contest_session.5", "x").await,
    ];
    let publishers: Vec<_> = [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
        .map(|(p, node)| {
            tokio::spawn(async move {
                for i in 0..30 {
                    assert_eq!(
                        publish(&node, "contest_session.5", &format!("\"{p}.{i}\"")).await,
                        200
                    );
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }
    one_order_everywhere(&mut subs, 120).await;
    for ws in &mut subs {
        assert_silent(ws, Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_largest_allowed_publish_crosses_redis_to_websocket_and_sse() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let t = start(&format!("redis_url = \"{}\"", redis.url())).await;
    eventually("cluster ready", || async { t.worker.state.is_ready() }).await;
    crate::admission::largest_publish_reaches_both_transports(&t, 1 << 20).await;
    let t = start(&format!(
        "redis_url = \"{}\"\nmax_payload_bytes = 4194304",
        redis.url()
    ))
    .await;
    eventually("cluster ready", || async { t.worker.state.is_ready() }).await;
    crate::admission::largest_publish_reaches_both_transports(&t, 3 << 20).await;
}
