//! Both ways a stream is served: as a connection's first request (read and answered by the
//! worker itself, without hyper) and as a later request on a kept-alive connection (through
//! hyper and the warp routes), as a proxy's pooled upstream connection may send it.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::MaybeTlsStream;

use crate::common::*;

/// Sends one keep-alive request and reads exactly its answer (which has a Content-Length),
/// leaving the connection open.
async fn request(stream: &mut TcpStream, path: &str, extra: &str) -> Answer {
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_string();
            let length =
                content_length(&head).unwrap_or_else(|| panic!("no content-length in {head}"));
            if raw.len() >= end + 4 + length {
                assert_eq!(raw.len(), end + 4 + length, "nothing after the answer");
                let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
                let body = String::from_utf8_lossy(&raw[end + 4..]).to_string();
                return Answer { status, head, body };
            }
        }
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(n > 0, "closed before the answer was complete");
        raw.extend_from_slice(&buf[..n]);
    }
}

/// A WebSocket client on an existing connection.
async fn ws_on(stream: TcpStream, t: &TestWorker, topic: &str) -> Ws {
    let url = format!("ws://{}/ws?topic={topic}", t.public);
    let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
        .await
        .expect("upgrade on a used connection");
    ws
}

async fn auth_and_receive(mut ws: Ws, t: &TestWorker, topic: &str, token: &str) {
    send_json(&mut ws, json!({"type": "auth", "token": token})).await;
    assert_eq!(next_json(&mut ws).await["type"], "auth_ok");
    assert_eq!(publish(t, topic, r#"{"n":1}"#).await, 200);
    let push = next_json(&mut ws).await;
    assert_eq!(push["type"], "push");
    assert_eq!(push["payload"], json!({"n":1}));
}

async fn sse_receives(mut sse: SseClient, t: &TestWorker, topic: &str) {
    let position = sse.next_block().await.unwrap();
    assert_eq!(position.event.as_deref(), Some("position"));
    assert_eq!(publish(t, topic, r#"{"n":2}"#).await, 200);
    let push = sse.next_json().await;
    assert_eq!(push["payload"], json!({"n":2}));
}

#[tokio::test]
async fn streams_open_on_a_connection_that_served_other_requests() {
    let t = start("").await;
    register(&t, "qso.1", true).await;
    let token = token_for("qso.1", 1, 60);

    let mut conn = TcpStream::connect(t.public).await.unwrap();
    assert_eq!(request(&mut conn, "/healthz", "").await.status, 200);
    let sse = SseClient::on(conn, &sse_path("qso.1", &token), &[])
        .await
        .unwrap();
    assert_eq!(
        sse.header("content-type").as_deref(),
        Some("text/event-stream")
    );
    sse_receives(sse, &t, "qso.1").await;

    let mut conn = TcpStream::connect(t.public).await.unwrap();
    assert_eq!(request(&mut conn, "/client.js", "").await.status, 200);
    let ws = ws_on(conn, &t, "qso.1").await;
    auth_and_receive(ws, &t, "qso.1", &token).await;
}

#[tokio::test]
async fn a_refused_stream_request_leaves_the_connection_usable() {
    let t = start("").await;
    register(&t, "qso.1", true).await;
    let token = token_for("qso.1", 1, 60);

    // The JS client's fetch probe, then EventSource on the same pooled connection.
    let mut conn = TcpStream::connect(t.public).await.unwrap();
    let refused = request(&mut conn, &sse_path("qso.1", "not-a-token"), "").await;
    assert_eq!(refused.status, 401);
    assert!(
        refused.head.to_ascii_lowercase().contains("date: "),
        "{}",
        refused.head
    );
    let sse = SseClient::on(conn, &sse_path("qso.1", &token), &[])
        .await
        .unwrap();
    sse_receives(sse, &t, "qso.1").await;

    // An upgrade refused (unknown topic), then a good one on the same connection.
    let mut conn = TcpStream::connect(t.public).await.unwrap();
    let refused = request(&mut conn, "/ws?topic=nope", "").await;
    assert_eq!(refused.status, 404);
    let ws = ws_on(conn, &t, "qso.1").await;
    auth_and_receive(ws, &t, "qso.1", &token).await;

    // `Connection: close` is honoured on a refusal.
    let mut conn = TcpStream::connect(t.public).await.unwrap();
    let refused = request(&mut conn, "/sse?topic=nope", "Connection: close\r\n").await;
    assert_eq!(refused.status, 404);
    let mut rest = [0u8; 1];
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), conn.read(&mut rest))
            .await
            .unwrap()
            .unwrap(),
        0,
        "closed after the answer"
    );
}

#[tokio::test]
async fn stream_requests_that_are_not_plain_gets_go_to_the_full_http_stack() {
    let t = start("").await;
    register(&t, "qso.1", false).await;
    // HTTP/1.0, a trailing slash, an oversized head: answered as before, by hyper.
    let mut conn = TcpStream::connect(t.public).await.unwrap();
    conn.write_all(b"GET /sse?topic=nope HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(conn).await;
    assert_eq!(answer.status, 404, "{}", answer.head);
    assert_eq!(answer.body, "topic not registered");

    let big = "x".repeat(20 * 1024);
    let a = http(t.public, "GET", "/sse?topic=qso.1", &[("X-Big", &big)], b"").await;
    assert_eq!(a.status, 431);
    let a = http(t.public, "GET", "/ws?topic=qso.1", &[("X-Big", &big)], b"").await;
    assert_eq!(a.status, 431);
    // A GET with a body (legal, never sent by browsers) still gets its answer.
    let a = http(
        t.public,
        "GET",
        "/ws?topic=nope",
        &[("Content-Length", "2")],
        b"{}",
    )
    .await;
    assert_eq!(a.status, 404);
}

#[tokio::test]
async fn a_trickling_stream_request_is_cut_off_by_the_header_timeout() {
    let t = start("header_timeout = \"300ms\"").await;
    register(&t, "qso.1", false).await;
    for request in [
        &b"GET /sse?topic=qso.1 HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaa"[..],
        &b"GET /ws?topic=qso.1 HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaa"[..],
    ] {
        let mut slow = TcpStream::connect(t.public).await.unwrap();
        let started = tokio::time::Instant::now();
        let mut cut = false;
        for b in request {
            if slow.write_all(&[*b]).await.is_err() {
                cut = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), slow.read_to_end(&mut rest)).await;
        assert!(
            cut || matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "cut off after {:?}: {:?}",
            started.elapsed(),
            String::from_utf8_lossy(&rest)
        );
    }
}

#[tokio::test]
async fn an_sse_client_that_takes_nothing_is_dropped_after_idle_timeout() {
    let t = start("ping_interval = \"500ms\"\nidle_timeout = \"1s\"").await;
    register(&t, "qso.1", true).await;
    let path = sse_path("qso.1", &token_for("qso.1", 1, 60));
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut stuck = stuck_client(&t, request.as_bytes()).await;
    eventually_metric(&t, "wavelog_worker_connections{transport=\"sse\"} 1").await;
    let mut reader = SseClient::connect(t.public, &path, &[]).await.unwrap();
    let reading = tokio::spawn(async move {
        assert_eq!(
            reader.next_block().await.unwrap().event.as_deref(),
            Some("position")
        );
        for i in 0..300 {
            assert_eq!(reader.next_json().await["payload"]["n"], i);
        }
    });
    publish_large(&t, "qso.1", 300).await;
    reading.await.expect("the reading client got every event");
    // The stuck client is dropped; nobody else was held up meanwhile.
    eventually_metric(&t, "wavelog_worker_connections{transport=\"sse\"} 0").await;
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), stuck.read_to_end(&mut rest)).await;
    assert!(end.is_ok(), "the connection was closed by the worker");
}

#[tokio::test]
async fn bytes_sent_right_after_the_upgrade_request_are_not_lost() {
    use wavelog_tools::{ws_client_frame, ws_upgrade_request, WsFrames};
    let t = start("").await;
    register(&t, "qso.1", true).await;
    // Upgrade request and auth frame in one write (a client should wait for the 101; the
    // worker must cope either way).
    let mut bytes = ws_upgrade_request("/ws?topic=qso.1").into_bytes();
    let auth = json!({"type": "auth", "token": token_for("qso.1", 1, 60)}).to_string();
    bytes.extend(ws_client_frame(1, auth.as_bytes()));
    let mut conn = TcpStream::connect(t.public).await.unwrap();
    conn.write_all(&bytes).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let read = |n: std::io::Result<usize>| match n {
        Ok(n) if n > 0 => n,
        other => panic!("connection ended: {other:?}"),
    };
    let end = loop {
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("a 101 within 5 s");
        raw.extend_from_slice(&buf[..read(n)]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
    };
    assert!(
        raw.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    let mut frames = WsFrames::default();
    frames.feed(&raw[end + 4..]);
    let text = loop {
        if let Some((opcode, payload)) = frames.next_frame() {
            assert_eq!(opcode, 1, "a text frame");
            break String::from_utf8(payload).unwrap();
        }
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("auth_ok within 5 s");
        frames.feed(&buf[..read(n)]);
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["type"], "auth_ok", "{v}");
}
