//! The SSE transport: answers, framing, CORS, keepalive, and parity with WebSocket.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn headers_and_framing_byte_by_byte() {
    let t = start("").await;
    register(&t, "qso.1", true).await;
    let mut sse = SseClient::connect(
        t.public,
        &sse_path("qso.1", &token_for("qso.1", 3, 60)),
        &[],
    )
    .await
    .unwrap();
    assert_eq!(sse.status, 200);
    assert_eq!(
        sse.header("content-type").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(
        sse.header("cache-control").as_deref(),
        Some("no-cache, no-transform")
    );
    assert_eq!(sse.header("x-accel-buffering").as_deref(), Some("no"));
    assert_eq!(sse.header("connection").as_deref(), Some("keep-alive"));
    let head = sse.next_block().await.unwrap();
    assert_eq!(head.retry, Some(2000));
    let position = head.id.expect("the stream starts with its position");
    assert_eq!(
        head.event.as_deref(),
        Some("position"),
        "a named event: onmessage doesn't see it"
    );
    let data: serde_json::Value = serde_json::from_str(&head.data.unwrap()).unwrap();
    assert_eq!(data, json!({"type":"position","last_event_id":position}));

    assert_eq!(
        publish(&t, "qso.1", r#"{"type":"sync_required","n":1.50}"#).await,
        200
    );
    let epoch = position.rsplit_once('-').unwrap().0;
    let id_line = String::from_utf8(sse.read_exact(4).await).unwrap();
    assert_eq!(id_line, "id: ");
    let mut rest = Vec::new();
    while !rest.ends_with(b"\n\n") {
        rest.extend(sse.read_exact(1).await);
    }
    let rest = String::from_utf8(rest).unwrap();
    let (id, data) = rest.split_once('\n').unwrap();
    assert!(id.starts_with(&format!("{epoch}-")), "{id}");
    assert_eq!(
        data,
        format!("data: {{\"type\":\"push\",\"topic\":\"qso.1\",\"id\":\"{id}\",\"payload\":{{\"type\":\"sync_required\",\"n\":1.50}}}}\n\n")
    );
}

#[tokio::test]
async fn refusals_are_plain_answers() {
    let t = start("").await;
    register(&t, "qso.1", true).await;
    register(&t, "open.1", false).await;
    let expired = wavelog_worker::token::sign(
        SECRET.as_bytes(),
        &wavelog_worker::token::Claims {
            user_id: 1,
            topic: "qso.1".into(),
            expires: unix_now() - 1,
        },
    );
    let cases = [
        ("/sse".to_string(), 400),
        ("/sse?token=x".to_string(), 400),
        (sse_path("nope", "x"), 404),
        ("/sse?topic=qso.1".to_string(), 401),
        (sse_path("qso.1", "garbage"), 401),
        (sse_path("qso.1", &expired), 401),
        (sse_path("qso.1", &token_for("qso.2", 1, 60)), 401),
        ("/sse?topic=open.1".to_string(), 401),
        (sse_path("open.1", "anything"), 200),
    ];
    for (path, want) in cases {
        let got = match SseClient::connect(t.public, &path, &[]).await {
            Ok(c) => c.status,
            Err(a) => a.status,
        };
        assert_eq!(got, want, "{path}");
    }
    assert_eq!(
        http(t.public, "POST", "/sse?topic=open.1&token=x", &[], b"")
            .await
            .status,
        405
    );
}

#[tokio::test]
async fn cors_allowed_and_denied() {
    let t = start("allowed_origins = [\"https://log.example.org\"]").await;
    register(&t, "qso.1", false).await;
    let path = sse_path("qso.1", "x");
    let ok = SseClient::connect(t.public, &path, &[("Origin", "https://log.example.org")])
        .await
        .unwrap();
    assert_eq!(
        ok.header("access-control-allow-origin").as_deref(),
        Some("https://log.example.org")
    );
    assert_eq!(ok.header("vary").as_deref(), Some("Origin"));
    let denied = SseClient::connect(t.public, &path, &[("Origin", "https://evil.example")])
        .await
        .err()
        .unwrap();
    assert_eq!(denied.status, 403);
    // Refusals carry CORS headers too, so the JS client can read the status.
    let refused = SseClient::connect(
        t.public,
        "/sse?topic=nope&token=x",
        &[("Origin", "https://log.example.org")],
    )
    .await
    .err()
    .unwrap();
    assert_eq!(refused.status, 404);
    assert_eq!(
        refused.header("access-control-allow-origin").as_deref(),
        Some("https://log.example.org")
    );
    // WebSocket upgrades check Origin the same way.
    let ws = http(
        t.public,
        "GET",
        "/ws?topic=qso.1",
        &[
            ("Origin", "https://evil.example"),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        b"",
    )
    .await;
    assert_eq!(ws.status, 403);
    // Without an Origin (non-browser clients) the request passes.
    assert!(SseClient::connect(t.public, &path, &[]).await.is_ok());

    let any = start("").await;
    register(&any, "qso.1", false).await;
    let c = SseClient::connect(any.public, &path, &[("Origin", "https://whoever.example")])
        .await
        .unwrap();
    assert_eq!(
        c.header("access-control-allow-origin").as_deref(),
        Some("https://whoever.example")
    );
}

#[tokio::test]
async fn keepalive_comments_on_idle_streams() {
    let t = start("sse_keepalive = \"200ms\"").await;
    register(&t, "qso.1", false).await;
    let mut sse = SseClient::connect(t.public, &sse_path("qso.1", "x"), &[])
        .await
        .unwrap();
    sse.next_block().await.unwrap();
    let block = sse.next_block().await.unwrap();
    assert_eq!(block.comments, vec!["keepalive".to_string()]);
    assert!(block.data.is_none() && block.id.is_none());
}

#[tokio::test]
async fn websocket_and_sse_see_the_same_events_in_the_same_order() {
    let t = std::sync::Arc::new(start("").await);
    register(&t, "contest_session.1", false).await;
    let mut ws = ws_subscribe(&t, "contest_session.1", "x").await;
    let mut sse = SseClient::connect(t.public, &sse_path("contest_session.1", "x"), &[])
        .await
        .unwrap();
    sse.next_block().await.unwrap();
    let tasks: Vec<_> = (0..4)
        .map(|p| {
            let t = t.clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    publish(&t, "contest_session.1", &format!("\"{p}.{i}\"")).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    for _ in 0..100 {
        let a = next_json(&mut ws).await;
        let b = sse.next_json().await;
        assert_eq!(a, b, "identical frames");
        assert_eq!(
            sse.last_id.as_deref(),
            a["id"].as_str(),
            "the SSE id line is the event id"
        );
    }
}

#[tokio::test]
async fn payload_line_breaks_survive_sse() {
    let t = start("").await;
    register(&t, "qso.1", false).await;
    let mut sse = SseClient::connect(t.public, &sse_path("qso.1", "x"), &[])
        .await
        .unwrap();
    sse.next_block().await.unwrap();
    let payload = "{\"a\": 1,\n  \"b\": [2,\n 3]}";
    assert_eq!(publish(&t, "qso.1", payload).await, 200);
    let block = sse.next_block().await.unwrap();
    assert!(block
        .data
        .unwrap()
        .ends_with(&format!("\"payload\":{payload}}}")));
}

#[tokio::test]
async fn several_topics_on_one_sse_connection() {
    let t = start("").await;
    register(&t, "radio.1", true).await;
    register(&t, "qso.1", true).await;
    let path = format!(
        "/sse?topic=radio.1&token={}&topic=qso.1&token={}",
        token_for("radio.1", 4, 60),
        token_for("qso.1", 4, 60)
    );
    let mut sse = SseClient::connect(t.public, &path, &[]).await.unwrap();
    let head = sse.next_block().await.unwrap();
    assert_eq!(
        head.id.unwrap().split(',').count(),
        2,
        "one position per topic"
    );
    publish(&t, "qso.1", "1").await;
    publish(&t, "radio.1", "2").await;
    let a = sse.next_json().await;
    let cursor_a = sse.last_id.clone().unwrap();
    let b = sse.next_json().await;
    let cursor_b = sse.last_id.clone().unwrap();
    assert_eq!(
        (a["topic"].as_str(), a["payload"].as_i64()),
        (Some("qso.1"), Some(1))
    );
    assert_eq!(
        (b["topic"].as_str(), b["payload"].as_i64()),
        (Some("radio.1"), Some(2))
    );
    assert_eq!(cursor_a.split(',').nth(1), a["id"].as_str());
    assert_eq!(cursor_b.split(',').next(), b["id"].as_str());
    assert_eq!(cursor_b.split(',').nth(1), a["id"].as_str());
    let s = status(&t, "").await;
    assert_eq!(
        (
            s["connected_sockets"].as_u64(),
            s["connected_clients"].as_u64()
        ),
        (Some(1), Some(1))
    );
    let bad = format!(
        "/sse?topic=radio.1&token={}&topic=qso.1&token=bad",
        token_for("radio.1", 4, 60)
    );
    assert_eq!(
        SseClient::connect(t.public, &bad, &[])
            .await
            .err()
            .unwrap()
            .status,
        401
    );
    let too_many: String = (0..40)
        .map(|i| format!("topic=radio.1&token=x{i}&"))
        .collect();
    assert_eq!(
        SseClient::connect(t.public, &format!("/sse?{too_many}"), &[])
            .await
            .err()
            .unwrap()
            .status,
        400
    );
}

#[tokio::test]
async fn several_topics_on_one_websocket() {
    let t = start("max_topics_per_connection = 2").await;
    register(&t, "radio.1", true).await;
    register(&t, "qso.1", true).await;
    register(&t, "qso.2", false).await;
    let mut ws = ws_subscribe(&t, "radio.1", &token_for("radio.1", 4, 60)).await;
    send_json(
        &mut ws,
        json!({"type":"subscribe","topic":"nope","token":"x"}),
    )
    .await;
    let e = next_json(&mut ws).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str(), e["topic"].as_str()),
        (Some("error"), Some("not_found"), Some("nope"))
    );
    send_json(
        &mut ws,
        json!({"type":"subscribe","topic":"qso.1","token":token_for("radio.1", 4, 60)}),
    )
    .await;
    let e = next_json(&mut ws).await;
    assert_eq!(
        (e["code"].as_str(), e["topic"].as_str()),
        (Some("unauthorized"), Some("qso.1"))
    );
    send_json(
        &mut ws,
        json!({"type":"subscribe","topic":"qso.1","token":token_for("qso.1", 4, 60)}),
    )
    .await;
    let ok = next_json(&mut ws).await;
    assert_eq!(
        (ok["type"].as_str(), ok["topic"].as_str()),
        (Some("subscribed"), Some("qso.1"))
    );
    send_json(
        &mut ws,
        json!({"type":"subscribe","topic":"qso.2","token":"x"}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["code"], "too_many_topics");

    publish(&t, "qso.1", "1").await;
    publish(&t, "radio.1", "2").await;
    let a = next_json(&mut ws).await;
    let b = next_json(&mut ws).await;
    assert_eq!(
        (a["topic"].as_str(), b["topic"].as_str()),
        (Some("qso.1"), Some("radio.1"))
    );

    send_json(&mut ws, json!({"type":"unsubscribe","topic":"qso.1"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "unsubscribed");
    publish(&t, "qso.1", "3").await;
    publish(&t, "radio.1", "4").await;
    assert_eq!(
        next_json(&mut ws).await["payload"],
        4,
        "nothing from the unsubscribed topic"
    );
    let s = status(&t, "").await;
    assert_eq!(
        (
            s["connected_sockets"].as_u64(),
            s["connected_clients"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_silent(&mut ws, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn shutdown_ends_an_sse_stream_within_the_drain_not_at_its_next_keepalive() {
    // The keepalive (15 s by default) is the stream's only other wake-up: the shutdown must
    // reach the stream without it.
    let t = start("shutdown_drain = \"500ms\"").await;
    register(&t, "qso.1", true).await;
    let path = sse_path("qso.1", &token_for("qso.1", 1, 60));
    let mut sse = SseClient::connect(t.public, &path, &[]).await.unwrap();
    assert_eq!(
        sse.next_block().await.unwrap().event.as_deref(),
        Some("position")
    );
    tokio::time::timeout(Duration::from_secs(10), t.worker.shutdown())
        .await
        .expect("shutdown finishes");
    // Within 5 s (the client's read limit), not at the keepalive 15 s away.
    assert!(sse.next_block().await.is_none(), "the stream ended");
}
