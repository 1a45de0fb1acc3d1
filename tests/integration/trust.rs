//! Who the client is and what counts against it: trusted proxies, /64 keying, a throttle that
//! stops guessing but never locks out a club, per-socket budgets, bounded caches.

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// The status of an SSE request sent straight to the worker with extra headers.
async fn sse_status(
    t: &TestWorker,
    path: &str,
    headers: &[(&str, &str)],
    held: &mut Vec<SseClient>,
) -> u16 {
    match SseClient::connect(t.public, path, headers).await {
        Ok(sse) => {
            held.push(sse);
            200
        }
        Err(answer) => answer.status,
    }
}

fn expired_token(topic: &str, user_id: i64) -> String {
    wavelog_worker::token::sign(
        SECRET.as_bytes(),
        &wavelog_worker::token::Claims {
            user_id,
            topic: topic.to_string(),
            expires: unix_now() - 3600,
        },
    )
}

#[tokio::test]
async fn a_club_behind_one_address_is_not_locked_out_by_its_stale_tabs() {
    let t = start("").await;
    register(&t, "qso.1", true).await;
    let mut held = Vec::new();
    // 25 tabs open since yesterday reconnect after a restart with validly signed, expired
    // tokens: refused, but they prove the club once had real tokens.
    for user in 0..25 {
        let path = sse_path("qso.1", &expired_token("qso.1", user));
        assert_eq!(sse_status(&t, &path, &[], &mut held).await, 401);
    }
    // The same for tokens of another topic (a tab that was on another page).
    for user in 0..5 {
        let path = sse_path("qso.1", &token_for("qso.2", user, 60));
        assert_eq!(sse_status(&t, &path, &[], &mut held).await, 401);
    }
    let fresh = sse_path("qso.1", &token_for("qso.1", 1, 86400));
    assert_eq!(
        sse_status(&t, &fresh, &[], &mut held).await,
        200,
        "first attempt"
    );
}

#[tokio::test]
async fn forged_signatures_are_refused_with_429_after_the_burst() {
    let t = start("").await;
    register(&t, "qso.1", true).await;
    let mut held = Vec::new();
    let good = token_for("qso.1", 1, 60);
    // The right claims with another signature, and tokens that do not even decode.
    let (claims, _) = good.split_once('.').unwrap();
    let mut statuses = Vec::new();
    for i in 0..40 {
        let forged = if i % 2 == 0 {
            format!("{claims}.{}", "ab".repeat(32))
        } else {
            format!("garbage-{i}")
        };
        statuses.push(sse_status(&t, &sse_path("qso.1", &forged), &[], &mut held).await);
    }
    assert_eq!(
        &statuses[..20],
        [401; 20],
        "the burst (auth_failure_burst = 20)"
    );
    assert!(statuses[20..].iter().all(|&s| s == 429), "{statuses:?}");
    // Now even a good token from this address waits.
    assert_eq!(
        sse_status(&t, &sse_path("qso.1", &good), &[], &mut held).await,
        429
    );
}

#[tokio::test]
async fn forged_tokens_in_subscribe_frames_count_and_close_the_socket() {
    let t = start("auth_failure_burst = 7\nauth_failures_per_minute = 1").await;
    register(&t, "qso.1", true).await;
    register(&t, "qso.2", true).await;
    let good = token_for("qso.1", 1, 60);
    let (claims, _) = token_for("qso.2", 1, 60)
        .split_once('.')
        .map(|(c, s)| (c.to_string(), s.to_string()))
        .unwrap();
    let forged = format!("{claims}.{}", "cd".repeat(32));
    let mut ws = ws_subscribe(&t, "qso.1", &good).await;
    for _ in 0..5 {
        send_json(
            &mut ws,
            json!({"type":"subscribe","topic":"qso.2","token":forged}),
        )
        .await;
        let answer = next_json(&mut ws).await;
        assert_eq!(answer["code"], "unauthorized", "{answer}");
    }
    let why = next_json(&mut ws).await;
    assert_eq!(why["code"], "rate_limited", "{why}");
    assert_eq!(
        close_code(&mut ws).await,
        Some(1008),
        "five failures close the socket"
    );
    // Those five counted against the address: two more guesses, then it is throttled.
    let mut ws = ws_subscribe(&t, "qso.1", &good).await;
    for _ in 0..2 {
        send_json(
            &mut ws,
            json!({"type":"subscribe","topic":"qso.2","token":forged}),
        )
        .await;
        assert_eq!(next_json(&mut ws).await["code"], "unauthorized");
    }
    let good2 = token_for("qso.2", 1, 60);
    send_json(
        &mut ws,
        json!({"type":"subscribe","topic":"qso.2","token":good2}),
    )
    .await;
    assert_eq!(next_json(&mut ws).await["code"], "rate_limited");
    assert_eq!(ws_refused_status(&t, "/ws?topic=qso.1").await, 429);
}

#[tokio::test]
async fn ipv6_clients_behind_a_trusted_proxy_are_counted_by_their_64() {
    let t = start("max_connections_per_ip = 2").await;
    register(&t, "qso.1", true).await;
    let path = sse_path("qso.1", &token_for("qso.1", 1, 60));
    let mut held = Vec::new();
    let mut statuses = Vec::new();
    for addr in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::3"] {
        statuses.push(sse_status(&t, &path, &[("X-Real-IP", addr)], &mut held).await);
    }
    assert_eq!(statuses, [200, 200, 429], "one /64 is one client");
    let other = [("X-Real-IP", "2001:db8:1:3::1")];
    assert_eq!(sse_status(&t, &path, &other, &mut held).await, 200);
}

#[tokio::test]
async fn headers_from_an_untrusted_peer_are_ignored() {
    // Loopback is not trusted here, so the test client is an ordinary browser.
    let t = start("max_connections_per_ip = 2\ntrusted_proxies = [\"10.9.9.9\"]").await;
    register(&t, "qso.1", true).await;
    let path = sse_path("qso.1", &token_for("qso.1", 1, 60));
    let mut held = Vec::new();
    let mut statuses = Vec::new();
    for i in 1..=3 {
        let forged = format!("198.51.100.{i}");
        let headers = [
            ("X-Real-IP", forged.as_str()),
            ("X-Forwarded-For", forged.as_str()),
        ];
        statuses.push(sse_status(&t, &path, &headers, &mut held).await);
    }
    assert_eq!(statuses, [200, 200, 429]);
}

#[tokio::test]
async fn a_socket_that_floods_frames_is_closed() {
    let t = start("inbound_frame_burst = 5\ninbound_frames_per_second = 1").await;
    register(&t, "qso.1", true).await;
    let mut ws = ws_subscribe(&t, "qso.1", &token_for("qso.1", 1, 60)).await;
    for _ in 0..20 {
        if ws
            .send(tokio_tungstenite::tungstenite::Message::text(
                r#"{"type":"noop"}"#,
            ))
            .await
            .is_err()
        {
            break;
        }
    }
    let why = next_json(&mut ws).await;
    assert_eq!(why["code"], "rate_limited", "{why}");
    assert_eq!(close_code(&mut ws).await, Some(1008));
    // A socket that stays within its budget is left alone.
    let mut calm = ws_subscribe(&t, "qso.1", &token_for("qso.1", 2, 60)).await;
    for _ in 0..4 {
        send_json(&mut calm, json!({"type":"noop"})).await;
    }
    assert_eq!(publish(&t, "qso.1", "{\"still\":1}").await, 200);
    assert_eq!(next_json(&mut calm).await["payload"]["still"], 1);
}

#[tokio::test]
async fn probing_unregistered_topics_is_counted_and_throttled() {
    let t = start("topic_probe_burst = 10\ntopic_probes_per_minute = 1").await;
    register(&t, "qso.1", true).await;
    for i in 0..10 {
        assert_eq!(
            ws_refused_status(&t, &format!("/ws?topic=qso.{}", 1000 + i)).await,
            404
        );
    }
    assert_eq!(ws_refused_status(&t, "/ws?topic=qso.2000").await, 429);
    // The token throttle is another bucket: a probe burst is not a guessed token.
    assert_eq!(t.worker.state.auth_throttle.tracked(), 0);
    eventually_metric(
        &t,
        "wavelog_worker_limit_refusals_total{limit=\"topic_probes\"} 1",
    )
    .await;
}

/// Sends `GET /sse?topic=<random>` requests on one keep-alive connection; each gets 404.
async fn probe_random_topics(t: &TestWorker, n: usize) {
    let mut conn = TcpStream::connect(t.public).await.unwrap();
    let mut buf = vec![0u8; 4096];
    for i in 0..n {
        let req = format!(
            "GET /sse?topic=rnd-{i}-{} HTTP/1.1\r\nHost: x\r\n\r\n",
            unix_now()
        );
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        loop {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "kept alive");
            got.extend_from_slice(&buf[..n]);
            if got.ends_with(b"topic not registered") {
                break;
            }
        }
        assert!(
            got.starts_with(b"HTTP/1.1 404"),
            "{}",
            String::from_utf8_lossy(&got)
        );
    }
}

#[tokio::test]
async fn random_topic_floods_leave_no_lasting_cache_in_cluster_mode() {
    let Some(redis) = crate::cluster::Redis::start().await else {
        return;
    };
    let t = start(&format!(
        "redis_url = \"{}\"\nregistry_cache_ttl = \"300ms\"\nhistory_ttl = \"1s\"\n\
         topic_probe_burst = 100000",
        redis.url()
    ))
    .await;
    eventually("cluster ready", || async { t.worker.state.is_ready() }).await;
    probe_random_topics(&t, 2000).await;
    let negative = t.worker.state.cluster.as_ref().unwrap().negative_entries();
    assert!(negative > 0 && negative <= 2000, "{negative}");
    // Negative answers live for registry_cache_ttl, not topic_ttl (24 h): they are swept.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    eventually_metric(&t, "wavelog_worker_registry_cache_negative_entries 0").await;
}
