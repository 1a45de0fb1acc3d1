//! Operations: metrics, readiness, limits, config check, JSON logs.

use std::process::{Command, Stdio};

use serde_json::json;

use crate::common::*;

async fn metrics(t: &TestWorker) -> String {
    let bearer = format!("Bearer {}", t.secret);
    let a = http(
        t.internal,
        "GET",
        "/metrics",
        &[("Authorization", &bearer)],
        b"",
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    a.body
}

/// The value of one sample line, e.g. `wavelog_worker_publishes_total{result="ok"}`.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn metrics_follow_what_happens() {
    let t = start("max_payload_bytes = 200").await;
    assert_eq!(
        http(t.internal, "GET", "/metrics", &[], b"").await.status,
        403,
        "secret required"
    );
    register(&t, "qso.1", true).await;
    let mut ws = ws_subscribe(&t, "qso.1", &token_for("qso.1", 1, 60)).await;
    let mut sse = SseClient::connect(
        t.public,
        &sse_path("qso.1", &token_for("qso.1", 2, 60)),
        &[],
    )
    .await
    .unwrap();
    sse.next_block().await.unwrap();
    assert_eq!(publish(&t, "qso.1", "1").await, 200);
    next_json(&mut ws).await;
    sse.next_json().await;
    assert_eq!(publish(&t, "nope", "1").await, 404);
    assert_eq!(internal(&t, "publish", "{").await.status, 400);
    assert_eq!(
        publish(&t, "qso.1", &format!("\"{}\"", "x".repeat(300))).await,
        413
    );
    let mut bad = ws_open(&t, "qso.1").await;
    send_json(
        &mut bad,
        json!({"type":"auth","token":token_for("qso.2", 1, 60)}),
    )
    .await;
    assert_eq!(next_json(&mut bad).await["code"], "unauthorized");
    assert_eq!(close_code(&mut bad).await, Some(1008));
    drop(bad);
    let mut resume = SseClient::connect(
        t.public,
        &sse_path("qso.1", &token_for("qso.1", 2, 60)),
        &[("Last-Event-ID", "x-1")],
    )
    .await
    .unwrap();
    assert_eq!(resume.next_json().await["type"], "resync");

    eventually("the refused socket to close", || async {
        sample(
            &metrics(&t).await,
            "wavelog_worker_connections{transport=\"websocket\"}",
        ) == 1.0
    })
    .await;
    let m = metrics(&t).await;
    assert_eq!(
        sample(&m, "wavelog_worker_connections{transport=\"sse\"}"),
        2.0
    );
    assert_eq!(
        sample(&m, "wavelog_worker_publishes_total{result=\"ok\"}"),
        1.0
    );
    assert_eq!(
        sample(&m, "wavelog_worker_publishes_total{result=\"not_found\"}"),
        1.0
    );
    assert_eq!(
        sample(&m, "wavelog_worker_publishes_total{result=\"bad_request\"}"),
        1.0
    );
    assert_eq!(
        sample(&m, "wavelog_worker_publishes_total{result=\"too_large\"}"),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "wavelog_worker_limit_refusals_total{limit=\"max_payload_bytes\"}"
        ),
        1.0
    );
    assert_eq!(sample(&m, "wavelog_worker_deliveries_total"), 2.0);
    assert_eq!(
        sample(
            &m,
            "wavelog_worker_auth_failures_total{reason=\"wrong_topic\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&m, "wavelog_worker_resyncs_total{cause=\"resume\"}"),
        1.0
    );
    assert_eq!(sample(&m, "wavelog_worker_registered_topics"), 2.0);
    assert_eq!(sample(&m, "wavelog_worker_active_topics"), 1.0);
    assert!(sample(&m, "wavelog_worker_history_bytes") > 0.0);
    assert!(sample(&m, "wavelog_worker_publish_to_send_seconds_count") >= 2.0);
    assert!(m.contains(&format!(
        "wavelog_worker_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    for line in m.lines().filter(|l| l.starts_with("# TYPE")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(name.starts_with("wavelog_worker_"), "{name}");
        if line.ends_with("counter") {
            assert!(name.ends_with("_total"), "{name}");
        }
    }
    drop((ws, sse, resume));
    eventually("gauges to drop", || async {
        let m = metrics(&t).await;
        sample(&m, "wavelog_worker_connections{transport=\"websocket\"}") == 0.0
            && sample(&m, "wavelog_worker_connections{transport=\"sse\"}") == 0.0
            && sample(
                &m,
                "wavelog_worker_connections_closed_total{transport=\"sse\"}",
            ) == 2.0
    })
    .await;
}

#[tokio::test]
async fn readyz_on_both_listeners() {
    let t = start("").await;
    for addr in [t.public, t.internal] {
        let a = http(addr, "GET", "/readyz", &[], b"").await;
        assert_eq!((a.status, a.body.as_str()), (200, "ready"));
    }
}

#[tokio::test]
async fn max_connections_refuses_with_503() {
    let t = start("max_connections = 2").await;
    register(&t, "qso.1", false).await;
    let _a = ws_subscribe(&t, "qso.1", "x").await;
    let mut b = SseClient::connect(t.public, &sse_path("qso.1", "x"), &[])
        .await
        .unwrap();
    b.next_block().await.unwrap();
    assert_eq!(ws_refused_status(&t, "/ws?topic=qso.1").await, 503);
    assert_eq!(
        SseClient::connect(t.public, &sse_path("qso.1", "x"), &[])
            .await
            .err()
            .unwrap()
            .status,
        503
    );
    assert_eq!(
        sample(
            &metrics(&t).await,
            "wavelog_worker_limit_refusals_total{limit=\"max_connections\"}"
        ),
        2.0
    );
    drop(b);
    eventually("a slot to free up", || async {
        SseClient::connect(t.public, &sse_path("qso.1", "x"), &[])
            .await
            .is_ok()
    })
    .await;
}

#[tokio::test]
async fn max_connections_per_ip_refuses_with_429() {
    let t = start("max_connections_per_ip = 1").await;
    register(&t, "qso.1", false).await;
    // Behind a local proxy, the forwarded address is the client.
    let via = |ip: &'static str| [("X-Forwarded-For", ip)];
    let mut a = SseClient::connect(t.public, &sse_path("qso.1", "x"), &via("203.0.113.7"))
        .await
        .unwrap();
    a.next_block().await.unwrap();
    let refused = SseClient::connect(t.public, &sse_path("qso.1", "x"), &via("203.0.113.7"))
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 429);
    let mut other = SseClient::connect(t.public, &sse_path("qso.1", "x"), &via("203.0.113.8"))
        .await
        .unwrap();
    other.next_block().await.unwrap();
    assert_eq!(
        sample(
            &metrics(&t).await,
            "wavelog_worker_limit_refusals_total{limit=\"max_connections_per_ip\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn max_topics_refuses_registrations_with_503() {
    let t = start("max_topics = 2").await;
    register(&t, "a", false).await;
    register(&t, "b", false).await;
    assert_eq!(
        internal(&t, "register", r#"{"topic":"c"}"#).await.status,
        503
    );
    register(&t, "a", false).await;
    assert_eq!(
        sample(
            &metrics(&t).await,
            "wavelog_worker_limit_refusals_total{limit=\"max_topics\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn auth_timeouts_are_counted() {
    let t = start("auth_timeout = \"200ms\"").await;
    register(&t, "qso.1", true).await;
    let mut ws = ws_open(&t, "qso.1").await;
    assert_eq!(close_code(&mut ws).await, Some(1008));
    assert_eq!(
        sample(
            &metrics(&t).await,
            "wavelog_worker_auth_failures_total{reason=\"auth_timeout\"}"
        ),
        1.0
    );
}

const BIN: &str = env!("CARGO_BIN_EXE_wavelog-worker");

#[test]
fn check_config_prints_the_effective_config_without_the_secret() {
    let dir = TempDir::new("check");
    let path = dir.0.join("worker.toml");
    std::fs::write(
        &path,
        format!("worker_secret = \"{SECRET}\"\nhistory_size = 7"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["--config", path.to_str().unwrap(), "--check-config"])
        .env_remove("WORKER_SECRET")
        .env("WORKER_TOPIC_TTL", "90m")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("history_size = 7") && text.contains("topic_ttl = \"1h30m0s\""),
        "{text}"
    );
    assert!(
        text.contains("worker_secret = \"[redacted]\"") && !text.contains(SECRET),
        "{text}"
    );
    // What it prints is itself a valid config (with a secret put back).
    let again = dir.0.join("again.toml");
    std::fs::write(&again, text.replace("[redacted]", SECRET)).unwrap();
    let ok = Command::new(BIN)
        .args(["--config", again.to_str().unwrap(), "--check-config"])
        .env_remove("WORKER_SECRET")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn json_log_lines() {
    let mut child = Command::new(BIN)
        .args(["--config", "/nonexistent/worker.toml"])
        .env("WORKER_SECRET", SECRET)
        .env("WORKER_LOG_FORMAT", "json")
        .env("WORKER_WS_BIND", "127.0.0.1")
        .env("WORKER_WS_PORT", "0")
        .env("WORKER_INTERNAL_PORT", "0")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let line = lines.next().unwrap().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["message"], "wavelog-worker listening");
    assert_eq!(v["level"], "INFO");
}

#[tokio::test]
async fn client_js_is_served_with_version_keyed_caching() {
    let t = start("").await;
    let v = env!("CARGO_PKG_VERSION");
    let a = http(t.public, "GET", &format!("/client.js?v={v}"), &[], b"").await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.header("content-type").as_deref(),
        Some("application/javascript; charset=utf-8")
    );
    assert_eq!(
        a.header("cache-control").as_deref(),
        Some("public, max-age=31536000, immutable")
    );
    assert!(
        a.body.contains("WavelogWorker") && a.body.contains("subscribe"),
        "the real classic-script build"
    );
    let plain = http(t.public, "GET", "/client.js", &[], b"").await;
    assert_eq!(
        plain.header("cache-control").as_deref(),
        Some("public, max-age=300")
    );
    let etag = plain.header("etag").unwrap();
    let again = http(
        t.public,
        "GET",
        "/client.js",
        &[("If-None-Match", &etag)],
        b"",
    )
    .await;
    assert_eq!((again.status, again.body.as_str()), (304, ""));
    assert_eq!(
        http(t.public, "POST", "/client.js", &[], b"").await.status,
        405
    );
}
