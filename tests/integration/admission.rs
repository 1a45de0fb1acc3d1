//! The one admission path: the same rules for `/ws` and `/sse`, on the hand-written first-request
//! path and on hyper's path, and the edge cases where the two copies used to differ.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// A publish body of exactly `size` bytes whose payload is one JSON string.
pub fn body_of_size(topic: &str, size: usize) -> (String, usize) {
    let shell = json!({"topic": topic, "payload": ""}).to_string();
    let fill = size - shell.len();
    let body = format!(
        "{{\"topic\":{},\"payload\":\"{}\"}}",
        json!(topic),
        "x".repeat(fill)
    );
    assert_eq!(body.len(), size);
    (body, fill)
}

/// Publishes a body of exactly `size` bytes and checks that a WebSocket and an SSE subscriber
/// both receive it whole, and stay connected for the next event.
pub async fn largest_publish_reaches_both_transports(t: &TestWorker, size: usize) {
    register(t, "big", true).await;
    let token = token_for("big", 1, 600);
    let mut ws = ws_subscribe(t, "big", &token).await;
    let mut sse = SseClient::connect(t.public, &sse_path("big", &token), &[])
        .await
        .expect("sse opens");
    assert_eq!(
        sse.next_block().await.unwrap().event.as_deref(),
        Some("position")
    );
    let (body, fill) = body_of_size("big", size);
    let a = internal(t, "publish", &body).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let pushed = next_json(&mut ws).await;
    assert_eq!(pushed["type"], "push", "the WebSocket got the push");
    assert_eq!(pushed["payload"].as_str().map(str::len), Some(fill));
    let pushed = sse.next_json().await;
    assert_eq!(pushed["payload"].as_str().map(str::len), Some(fill));
    assert_eq!(publish(t, "big", "{\"after\":1}").await, 200);
    assert_eq!(
        next_json(&mut ws).await["payload"]["after"],
        1,
        "still open"
    );
    assert_eq!(sse.next_json().await["payload"]["after"], 1);
}

#[tokio::test]
async fn a_publish_of_exactly_max_payload_bytes_reaches_websocket_and_sse() {
    let t = start("").await;
    largest_publish_reaches_both_transports(&t, 1 << 20).await;
}

#[tokio::test]
async fn a_3_mib_publish_reaches_websocket_and_sse_when_the_limit_is_4_mib() {
    let t = start("max_payload_bytes = 4194304").await;
    largest_publish_reaches_both_transports(&t, 3 << 20).await;
}

#[tokio::test]
async fn an_sse_stream_ends_with_auth_expired_when_its_token_expires() {
    let t = start("enforce_token_expiry = true").await;
    register(&t, "qso.1", true).await;
    let mut sse = SseClient::connect(t.public, &sse_path("qso.1", &token_for("qso.1", 1, 2)), &[])
        .await
        .expect("sse opens");
    assert_eq!(
        sse.next_block().await.unwrap().event.as_deref(),
        Some("position")
    );
    let error = tokio::time::timeout(Duration::from_secs(6), sse.next_json())
        .await
        .expect("the stream says why it ends within 6 s");
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "auth_expired");
    let end = tokio::time::timeout(Duration::from_secs(3), sse.next_block()).await;
    assert!(matches!(end, Ok(None)), "then the stream ends: {end:?}");
}

#[tokio::test]
async fn the_same_topic_twice_on_one_sse_url_is_refused() {
    let t = start("").await;
    register(&t, "qso.1", true).await;
    let token = token_for("qso.1", 1, 60);
    let path = format!("/sse?topic=qso.1&token={token}&topic=qso.1&token={token}");
    let refused = SseClient::connect(t.public, &path, &[])
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.status, 400, "{}", refused.body);
}

#[tokio::test]
async fn a_json_array_as_the_first_frame_is_not_an_auth_frame() {
    let t = start("").await;
    register(&t, "qso.1", true).await;
    let mut ws = ws_open(&t, "qso.1").await;
    let frame = json!(["auth", token_for("qso.1", 1, 60)]);
    send_json(&mut ws, frame).await;
    let answer = next_json(&mut ws).await;
    assert_eq!(answer["type"], "error");
    assert_eq!(answer["code"], "auth_required", "{answer}");
    assert_eq!(close_code(&mut ws).await, Some(1008));
}

#[tokio::test]
async fn a_topic_longer_than_256_bytes_is_a_bad_request_on_both_transports() {
    let t = start("").await;
    let long = "t".repeat(257);
    assert_eq!(
        ws_refused_status(&t, &format!("/ws?topic={long}")).await,
        400
    );
    let refused = SseClient::connect(t.public, &format!("/sse?topic={long}&token=x"), &[])
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.status, 400);
    // 256 is still a topic name (unregistered here).
    let ok_len = "t".repeat(256);
    assert_eq!(
        ws_refused_status(&t, &format!("/ws?topic={ok_len}")).await,
        404
    );
}

/// A raw upgrade request with the given extra header lines; the whole answer (or what arrived).
async fn raw_upgrade(t: &TestWorker, lines: &str) -> String {
    let mut conn = TcpStream::connect(t.public).await.unwrap();
    let req = format!("GET /ws?topic=qso.1 HTTP/1.1\r\n{lines}\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(3), conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
        if out.windows(4).any(|w| w == b"\r\n\r\n") && out.starts_with(b"HTTP/1.1 101") {
            break;
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test]
async fn websocket_handshakes_are_checked_as_rfc_6455_says() {
    let t = start("").await;
    register(&t, "qso.1", true).await;
    let base = "Host: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n";
    let good_key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let v13 = "Sec-WebSocket-Version: 13\r\n";
    let ok = raw_upgrade(&t, &format!("{base}{good_key}{v13}")).await;
    assert!(ok.starts_with("HTTP/1.1 101"), "{ok}");
    for bad_key in [
        "",
        "abc",
        "dGhlIHNhbXBsZSBub25jZQ",
        "dGhlIHNhbXBsZSBub25jZSE=",
    ] {
        let a = raw_upgrade(&t, &format!("{base}Sec-WebSocket-Key: {bad_key}\r\n{v13}")).await;
        assert!(a.starts_with("HTTP/1.1 400"), "key {bad_key:?}: {a}");
    }
    let a = raw_upgrade(&t, &format!("{base}{v13}")).await;
    assert!(a.starts_with("HTTP/1.1 400"), "no key: {a}");
    let a = raw_upgrade(&t, &format!("{base}{good_key}Sec-WebSocket-Version: 8\r\n")).await;
    assert!(a.starts_with("HTTP/1.1 426"), "version 8: {a}");
    assert!(
        a.to_ascii_lowercase().contains("sec-websocket-version: 13"),
        "426 names the version we speak: {a}"
    );
    let a = raw_upgrade(
        &t,
        &format!("Connection: Upgrade\r\nUpgrade: websocket\r\n{good_key}{v13}"),
    )
    .await;
    assert!(a.starts_with("HTTP/1.1 400"), "no Host: {a}");
}

#[tokio::test]
async fn a_refusal_reaches_the_client_even_when_it_sent_more_than_its_request() {
    let t = start("").await;
    // An upgrade for an unknown topic with a stream of frames already behind it: the worker
    // must not reset the connection before the client has read the 404.
    for head in [
        &b"GET /ws?topic=unknown HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n\
        Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n"[..],
        b"GET /sse?topic=unknown HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /ws?topic=unknown HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ] {
        refusal_is_read_in_full(&t, head).await;
    }
}

async fn refusal_is_read_in_full(t: &TestWorker, head: &[u8]) {
    let mut req = head.to_vec();
    req.extend(std::iter::repeat_n(0x81u8, 200_000));
    let mut conn = TcpStream::connect(t.public).await.unwrap();
    let _ = conn.write_all(&req).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            Ok(Ok(_)) => break,
            Ok(Err(e)) => panic!(
                "read failed ({e}) after {:?}",
                String::from_utf8_lossy(&out)
            ),
            Err(_) => panic!("no end within 5 s"),
        }
    }
    assert!(
        out.starts_with(b"HTTP/1.1 404"),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

#[tokio::test]
async fn an_sse_stream_served_by_hyper_is_dropped_when_its_client_stops_reading() {
    let t = start("ping_interval = \"500ms\"\nidle_timeout = \"1s\"").await;
    register(&t, "qso.1", true).await;
    let path = sse_path("qso.1", &token_for("qso.1", 1, 60));
    // A first request on the connection, so hyper serves the stream that follows.
    let mut stuck = stuck_client(&t, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut buf = [0u8; 512];
    let n = stuck.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    stuck.write_all(request.as_bytes()).await.unwrap();
    eventually_metric(&t, "wavelog_worker_connections{transport=\"sse\"} 1").await;
    publish_large(&t, "qso.1", 300).await;
    eventually_metric(&t, "wavelog_worker_connections{transport=\"sse\"} 0").await;
}
