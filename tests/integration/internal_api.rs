//! The internal API, status codes first.

use std::time::Duration;

use crate::common::*;

#[tokio::test]
async fn method_is_checked_before_the_secret() {
    let t = start("").await;
    for (method, route) in [
        ("GET", "publish"),
        ("PUT", "register"),
        ("DELETE", "unregister"),
        ("POST", "status"),
    ] {
        let a = http(t.internal, method, &format!("/internal/{route}"), &[], b"").await;
        assert_eq!(a.status, 405, "{method} {route}");
    }
    let a = http(t.internal, "GET", "/internal/status", &[], b"").await;
    assert_eq!(a.status, 403);
}

#[tokio::test]
async fn secret_by_header_or_bearer_and_wrong_ones_refused() {
    let t = start("").await;
    let body = br#"{"topic":"radio.5"}"#;
    let bearer = format!("Bearer {SECRET}");
    let off_by_one = format!("{}X", &SECRET[..SECRET.len() - 1]);
    let cases: [(&[(&str, &str)], u16); 5] = [
        (&[], 403),
        (&[("X-Worker-Secret", "wrong")], 403),
        (&[("X-Worker-Secret", &off_by_one)], 403),
        (&[("X-Worker-Secret", SECRET)], 200),
        (&[("Authorization", &bearer)], 200),
    ];
    for (headers, want) in cases {
        let a = http(t.internal, "POST", "/internal/register", headers, body).await;
        assert_eq!(a.status, want, "{headers:?}: {a:?}");
    }
}

#[tokio::test]
async fn register_validation() {
    let t = start("").await;
    assert_eq!(
        internal(&t, "register", r#"{"topic":""}"#).await.status,
        400
    );
    assert_eq!(internal(&t, "register", r#"{"meta":{}}"#).await.status, 400);
    assert_eq!(internal(&t, "register", r#"{"topic":"#).await.status, 400);
    assert_eq!(internal(&t, "unregister", r#"{}"#).await.status, 400);
    // Without meta the topic is open: any non-empty token is accepted.
    assert_eq!(
        internal(&t, "register", r#"{"topic":"open.1"}"#)
            .await
            .status,
        200
    );
    ws_subscribe(&t, "open.1", "anything").await;
}

#[tokio::test]
async fn publish_validation_comes_before_lookup() {
    let t = start("").await;
    assert_eq!(
        internal(&t, "publish", r#"{"topic":"nope"}"#).await.status,
        400,
        "missing payload"
    );
    assert_eq!(
        internal(&t, "publish", r#"{"payload":1}"#).await.status,
        400,
        "missing topic"
    );
    assert_eq!(
        internal(&t, "publish", r#"{"topic":"nope","payload":"#)
            .await
            .status,
        400,
        "bad JSON"
    );
    let a = internal(&t, "publish", r#"{"topic":"nope","payload":null}"#).await;
    assert_eq!((a.status, a.body.as_str()), (404, "topic not registered"));
    let a = internal(&t, "push", r#"{"topic":"nope","payload":{}}"#).await;
    assert_eq!(a.status, 404, "push is an alias of publish");
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let t = start("").await;
    let big = format!(
        "{{\"topic\":\"a\",\"payload\":\"{}\"}}",
        "x".repeat(1024 * 1024)
    );
    assert_eq!(internal(&t, "publish", &big).await.status, 413);
    // Chunked, with no Content-Length to trust.
    let stream = tokio::net::TcpStream::connect(t.internal).await.unwrap();
    let mut stream = stream;
    use tokio::io::AsyncWriteExt;
    let head = format!(
        "POST /internal/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Worker-Secret: {SECRET}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b' '; 256 * 1024];
    for _ in 0..5 {
        let _ = stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await;
        let _ = stream.write_all(&chunk).await;
        let _ = stream.write_all(b"\r\n").await;
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    assert_eq!(read_answer(stream).await.status, 413);
}

#[tokio::test]
async fn payload_is_forwarded_byte_for_byte() {
    let t = start("").await;
    register(&t, "qso.1", false).await;
    let mut ws = ws_subscribe(&t, "qso.1", "x").await;
    let payloads = [
        r#"{"z":1,"a":2,"big":12345678901234567890123456789,"inf":1e400,"neg":-0,"dec":1.50}"#,
        "null",
        r#""Öster \/ \u00d6""#,
        r#"[1, 2,  3]"#,
    ];
    for p in payloads {
        assert_eq!(publish(&t, "qso.1", p).await, 200);
        let text = next_text(&mut ws).await;
        assert!(text.ends_with(&format!(",\"payload\":{p}}}")), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|_| {
            // 1e400 is valid JSON that serde_json refuses as a number; compare text only.
            serde_json::json!({"type":"push"})
        });
        assert_eq!(v["type"], "push");
    }
}

#[tokio::test]
async fn unregister_keeps_open_sockets_and_refuses_new_ones() {
    let t = start("").await;
    register(&t, "radio.5", false).await;
    let mut ws = ws_subscribe(&t, "radio.5", "x").await;
    assert_eq!(
        internal(&t, "unregister", r#"{"topic":"radio.5"}"#)
            .await
            .status,
        200
    );
    assert_eq!(ws_refused_status(&t, "/ws?topic=radio.5").await, 404);
    assert_eq!(publish(&t, "radio.5", "1").await, 404);
    register(&t, "radio.5", false).await;
    assert_eq!(publish(&t, "radio.5", "2").await, 200);
    let v = next_json(&mut ws).await;
    assert_eq!(v["payload"], 2, "the old socket is still subscribed");
}

#[tokio::test]
async fn topics_expire_after_their_ttl() {
    let t = start("topic_ttl = \"400ms\"").await;
    register(&t, "contest_session.1", false).await;
    assert_eq!(publish(&t, "contest_session.1", "1").await, 200);
    tokio::time::sleep(Duration::from_millis(250)).await;
    register(&t, "contest_session.1", false).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        publish(&t, "contest_session.1", "2").await,
        200,
        "refreshed by re-registering"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(publish(&t, "contest_session.1", "3").await, 404);
    assert_eq!(
        ws_refused_status(&t, "/ws?topic=contest_session.1").await,
        404
    );
    // The sweep removes expired topics even when nobody looks them up.
    register(&t, "never.looked.up", false).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    eventually("sweep", || async {
        status(&t, "").await["registered_topics"] == 1
    })
    .await;
}

#[tokio::test]
async fn status_fields_and_lists() {
    let t = start("").await;
    let s = status(&t, "?topics=1").await;
    assert_eq!(s["status"], "ok");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["cluster_nodes"], -1);
    assert_eq!(
        s["registered_topics"], 1,
        "worker.status is registered at start"
    );
    assert_eq!(s["topic_list"], serde_json::json!(["worker.status"]));
    assert!(
        s.get("active_topic_list").is_none(),
        "empty lists are omitted: {s}"
    );
    let uptime = s["uptime"].as_str().unwrap();
    assert!(
        uptime.ends_with('s') && uptime.chars().next().unwrap().is_ascii_digit(),
        "{uptime}"
    );
    assert!(s["uptime_seconds"].is_u64());

    register(&t, "qso.7", false).await;
    let _ws = ws_subscribe(&t, "qso.7", "x").await;
    let s = status(&t, "?topics=1").await;
    assert_eq!(s["active_topic_list"], serde_json::json!(["qso.7"]));
    assert_eq!(s["active_topics"], 1);
    let s = status(&t, "").await;
    assert!(
        s.get("topic_list").is_none() && s.get("active_topic_list").is_none(),
        "{s}"
    );
}

#[tokio::test]
async fn health_on_both_listeners_and_unknown_paths() {
    let t = start("").await;
    for addr in [t.public, t.internal] {
        let a = http(addr, "GET", "/healthz", &[], b"").await;
        assert_eq!((a.status, a.body.as_str()), (200, "ok"));
        assert_eq!(http(addr, "GET", "/nope", &[], b"").await.status, 404);
    }
    assert_eq!(
        http(
            t.internal,
            "GET",
            "/internal/nope",
            &[("X-Worker-Secret", SECRET)],
            b""
        )
        .await
        .status,
        404
    );
}

#[tokio::test]
async fn bodies_that_are_not_utf8_are_refused() {
    // Found by fuzzing: invalid bytes inside a field the parser skips used to pass.
    let t = start("").await;
    register(&t, "qso.1", false).await;
    let mut body = br#"{"topic":"qso.1","meta":"x"#.to_vec();
    body.push(0xc7);
    body.extend_from_slice(br#"y","payload":1}"#);
    let a = http(
        t.internal,
        "POST",
        "/internal/publish",
        &[("X-Worker-Secret", SECRET)],
        &body,
    )
    .await;
    assert_eq!((a.status, a.body.as_str()), (400, "body is not UTF-8"));
}
