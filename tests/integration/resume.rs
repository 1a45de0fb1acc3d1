//! Event ids, history and resume on both transports; resync wherever resuming is impossible;
//! coalescing; slow SSE consumers.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn sse_resume_gets_exactly_the_missed_events() {
    let t = start("").await;
    register(&t, "qso.1", false).await;
    let mut sse = SseClient::connect(t.public, &sse_path("qso.1", "x"), &[])
        .await
        .unwrap();
    sse.next_block().await.unwrap();
    publish(&t, "qso.1", "0").await;
    publish(&t, "qso.1", "1").await;
    sse.next_json().await;
    assert_eq!(sse.next_json().await["payload"], 1);
    let last = sse.last_id.clone().unwrap();
    drop(sse);
    for i in 2..5 {
        publish(&t, "qso.1", &i.to_string()).await;
    }
    let mut again = SseClient::connect(
        t.public,
        &sse_path("qso.1", "x"),
        &[("Last-Event-ID", &last)],
    )
    .await
    .unwrap();
    let head = again.next_block().await.unwrap();
    assert_eq!(
        head.id.as_deref(),
        Some(last.as_str()),
        "the cursor restarts where the client was"
    );
    for i in 2..5 {
        assert_eq!(again.next_json().await["payload"], i);
    }
    publish(&t, "qso.1", "5").await;
    assert_eq!(
        again.next_json().await["payload"],
        5,
        "then live, no duplicate"
    );
}

#[tokio::test]
async fn a_client_that_saw_no_event_still_resumes_from_its_position() {
    let t = start("").await;
    register(&t, "radio.2", false).await;
    let mut sse = SseClient::connect(t.public, &sse_path("radio.2", "x"), &[])
        .await
        .unwrap();
    sse.next_block().await.unwrap();
    let position = sse.last_id.clone().unwrap();
    drop(sse);
    publish(&t, "radio.2", "7").await;
    let q = query(&[
        ("topic", "radio.2"),
        ("token", "x"),
        ("last_event_id", position.as_str()),
    ]);
    let mut again = SseClient::connect(t.public, &format!("/sse?{q}"), &[])
        .await
        .unwrap();
    assert_eq!(again.next_json().await["payload"], 7);
}

#[tokio::test]
async fn websocket_resume_by_last_event_id() {
    let t = start("").await;
    register(&t, "qso.1", true).await;
    let token = token_for("qso.1", 2, 60);
    let mut ws = ws_open(&t, "qso.1").await;
    send_json(&mut ws, json!({"type":"auth","token":token})).await;
    let ok = next_json(&mut ws).await;
    let position = ok["last_event_id"].as_str().unwrap().to_string();
    publish(&t, "qso.1", "0").await;
    let first = next_json(&mut ws).await;
    drop(ws);
    publish(&t, "qso.1", "1").await;
    publish(&t, "qso.1", "2").await;
    for (from, want) in [
        (first["id"].as_str().unwrap(), vec![1, 2]),
        (position.as_str(), vec![0, 1, 2]),
    ] {
        let mut ws = ws_open(&t, "qso.1").await;
        send_json(
            &mut ws,
            json!({"type":"auth","token":token,"last_event_id":from}),
        )
        .await;
        assert_eq!(next_json(&mut ws).await["type"], "auth_ok");
        for n in want {
            assert_eq!(next_json(&mut ws).await["payload"], n);
        }
        assert_silent(&mut ws, Duration::from_millis(150)).await;
    }
}

#[tokio::test]
async fn resync_when_resuming_is_impossible() {
    let t = start("history_size = 4").await;
    register(&t, "qso.1", false).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let a = internal(
            &t,
            "publish",
            &format!("{{\"topic\":\"qso.1\",\"payload\":{i}}}"),
        )
        .await;
        ids.push(a.json()["id"].as_str().unwrap().to_string());
    }
    // Within the history, resuming works: the last 4 events are kept.
    let mut sse = SseClient::connect(
        t.public,
        &sse_path("qso.1", "x"),
        &[("Last-Event-ID", &ids[6])],
    )
    .await
    .unwrap();
    for want in [7, 8, 9] {
        assert_eq!(sse.next_json().await["payload"], want);
    }
    drop(sse);
    let epoch = ids[0].rsplit_once('-').unwrap().0.to_string();
    let other_epoch = if epoch == "00000000" {
        "11111111-3"
    } else {
        "00000000-3"
    };
    let unknown = format!("{epoch}-999999");
    for id in [ids[0].as_str(), other_epoch, unknown.as_str(), "garbage"] {
        let mut sse =
            SseClient::connect(t.public, &sse_path("qso.1", "x"), &[("Last-Event-ID", id)])
                .await
                .unwrap();
        let v = sse.next_json().await;
        assert_eq!(v, json!({"type":"resync","topic":"qso.1"}), "id {id}");
        publish(&t, "qso.1", "\"live\"").await;
        assert_eq!(
            sse.next_json().await["payload"],
            "live",
            "live events follow the resync"
        );

        let mut ws = ws_open(&t, "qso.1").await;
        send_json(
            &mut ws,
            json!({"type":"auth","token":"x","last_event_id":id}),
        )
        .await;
        assert_eq!(next_json(&mut ws).await["type"], "auth_ok");
        assert_eq!(next_json(&mut ws).await["type"], "resync");
    }
}

#[tokio::test]
async fn resync_for_an_id_of_a_previous_run() {
    let first = start("").await;
    register(&first, "qso.1", false).await;
    let id = internal(&first, "publish", r#"{"topic":"qso.1","payload":1}"#)
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    first.worker.shutdown().await;
    let second = start("").await;
    register(&second, "qso.1", false).await;
    let mut sse = SseClient::connect(
        second.public,
        &sse_path("qso.1", "x"),
        &[("Last-Event-ID", &id)],
    )
    .await
    .unwrap();
    assert_eq!(sse.next_json().await["type"], "resync");
}

#[tokio::test]
async fn history_expires_and_stays_within_its_byte_budget() {
    let t = start("history_ttl = \"300ms\"\nmax_history_bytes = 20000").await;
    register(&t, "qso.1", false).await;
    let id = internal(&t, "publish", r#"{"topic":"qso.1","payload":0}"#)
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    publish(&t, "qso.1", "1").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut sse = SseClient::connect(t.public, &sse_path("qso.1", "x"), &[("Last-Event-ID", &id)])
        .await
        .unwrap();
    assert_eq!(
        sse.next_json().await["type"],
        "resync",
        "history older than history_ttl is gone"
    );
    let big = format!("\"{}\"", "x".repeat(3000));
    for topic in ["a", "b", "c"] {
        register(&t, topic, false).await;
        for _ in 0..10 {
            publish(&t, topic, &big).await;
        }
    }
    let s = status(&t, "").await;
    let bytes = s["history_bytes"].as_u64().unwrap();
    assert!(bytes > 0 && bytes <= 20000, "history_bytes {bytes}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    eventually("history to expire", || async {
        status(&t, "").await["history_bytes"] == 0
    })
    .await;
}

/// Clients drop and resume again and again while a publisher runs: every client ends with
/// exactly the published sequence, no gap and no duplicate at any seam.
#[tokio::test]
async fn no_gap_and_no_duplicate_at_the_seam_under_concurrent_publishing() {
    const N: i64 = 300;
    let t = Arc::new(start("").await);
    register(&t, "contest_session.9", false).await;
    let ready = Arc::new(tokio::sync::Barrier::new(3));

    let sse_client = {
        let (t, ready) = (t.clone(), ready.clone());
        tokio::spawn(async move {
            let path = sse_path("contest_session.9", "x");
            let mut sse = SseClient::connect(t.public, &path, &[]).await.unwrap();
            sse.next_block().await.unwrap();
            ready.wait().await;
            let mut seen = Vec::new();
            loop {
                for _ in 0..(seen.len() % 13 + 5) {
                    let v = sse.next_json().await;
                    assert_eq!(v["type"], "push");
                    seen.push(v["payload"].as_i64().unwrap());
                    if seen.last() == Some(&(N - 1)) {
                        return seen;
                    }
                }
                let last = sse.last_id.clone().unwrap();
                sse = SseClient::connect(t.public, &path, &[("Last-Event-ID", &last)])
                    .await
                    .unwrap();
            }
        })
    };
    let ws_client = {
        let (t, ready) = (t.clone(), ready.clone());
        tokio::spawn(async move {
            let mut ws = ws_open(&t, "contest_session.9").await;
            send_json(&mut ws, json!({"type":"auth","token":"x"})).await;
            let mut last = next_json(&mut ws).await["last_event_id"]
                .as_str()
                .unwrap()
                .to_string();
            ready.wait().await;
            let mut seen = Vec::new();
            loop {
                for _ in 0..(seen.len() % 11 + 4) {
                    let v = next_json(&mut ws).await;
                    assert_eq!(v["type"], "push");
                    seen.push(v["payload"].as_i64().unwrap());
                    last = v["id"].as_str().unwrap().to_string();
                    if seen.last() == Some(&(N - 1)) {
                        return seen;
                    }
                }
                ws = ws_open(&t, "contest_session.9").await;
                send_json(
                    &mut ws,
                    json!({"type":"auth","token":"x","last_event_id":last}),
                )
                .await;
                assert_eq!(next_json(&mut ws).await["type"], "auth_ok");
            }
        })
    };
    ready.wait().await;
    for i in 0..N {
        assert_eq!(publish(&t, "contest_session.9", &i.to_string()).await, 200);
    }
    let want: Vec<i64> = (0..N).collect();
    assert_eq!(sse_client.await.unwrap(), want);
    assert_eq!(ws_client.await.unwrap(), want);
}

#[tokio::test]
async fn coalescing_delivers_the_newest_event_per_window() {
    let t = start("").await;
    internal(
        &t,
        "register",
        r#"{"topic":"radio.3","meta":{"require_token":false,"coalesce_ms":400}}"#,
    )
    .await;
    register(&t, "radio.4", false).await;
    let mut ws = ws_subscribe(&t, "radio.3", "x").await;
    let mut plain = ws_subscribe(&t, "radio.4", "x").await;
    for i in 0..10 {
        publish(&t, "radio.3", &i.to_string()).await;
        publish(&t, "radio.4", &i.to_string()).await;
    }
    let first = next_json(&mut ws).await;
    assert_eq!(
        first["payload"], 0,
        "the first event after a quiet period goes out at once"
    );
    let second = next_json(&mut ws).await;
    assert_eq!(second["payload"], 9, "then only the newest of the window");
    let seq = |v: &serde_json::Value| {
        v["id"]
            .as_str()
            .unwrap()
            .rsplit('-')
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert!(seq(&second) > seq(&first));
    assert_silent(&mut ws, Duration::from_millis(600)).await;
    for i in 0..10 {
        assert_eq!(
            next_json(&mut plain).await["payload"],
            i,
            "without coalescing every event arrives"
        );
    }
    // After a quiet period the next event is not delayed: it arrives long before a window
    // of 5 s could end.
    internal(
        &t,
        "register",
        r#"{"topic":"radio.3","meta":{"require_token":false,"coalesce_ms":5000}}"#,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    publish(&t, "radio.3", "\"now\"").await;
    let v = tokio::time::timeout(Duration::from_secs(3), next_json(&mut ws))
        .await
        .expect("not held back");
    assert_eq!(v["payload"], "now");
}

#[tokio::test]
async fn a_slow_sse_consumer_gets_resync_and_blocks_nobody() {
    let t = Arc::new(start("subscriber_queue = 16\nmax_history_bytes = 1048576").await);
    register(&t, "radio.1", false).await;
    let mut slow = SseClient::connect(t.public, &sse_path("radio.1", "x"), &[])
        .await
        .unwrap();
    let mut fast = SseClient::connect(t.public, &sse_path("radio.1", "x"), &[])
        .await
        .unwrap();
    let filler = "x".repeat(60_000);
    let reader = tokio::spawn(async move {
        for i in 0..400 {
            assert_eq!(fast.next_json().await["payload"]["n"], i);
        }
    });
    for i in 0..400 {
        assert_eq!(
            publish(&t, "radio.1", &format!("{{\"n\":{i},\"f\":\"{filler}\"}}")).await,
            200
        );
    }
    reader
        .await
        .expect("the fast subscriber gets every event in order");
    let mut saw_resync = false;
    loop {
        let v = slow.next_json().await;
        if v["type"] == "resync" {
            saw_resync = true;
        } else if v["payload"]["n"] == 399 {
            break;
        }
    }
    assert!(saw_resync);
    // What the worker holds for the topic stays bounded: 24 MB went through, history kept at
    // most its budget, and the slow client's queue at most `subscriber_queue` frames.
    let s = status(&t, "").await;
    assert!(s["history_bytes"].as_u64().unwrap() <= 1_048_576, "{s}");
}
