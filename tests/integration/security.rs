//! Security properties that need the real binary: nothing it logs, at any level, contains the
//! secret, a token, or a query string that carries one.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_wavelog-worker");

/// Runs a worker at log level `trace` through a session touching every route with good and bad
/// secrets and tokens, then greps everything it logged.
async fn logs_of_a_full_session(log_format: &str) -> (String, Vec<String>) {
    let dir = TempDir::new("logs");
    let path = dir.0.join("worker.toml");
    std::fs::write(
        &path,
        format!(
            "worker_secret = \"{SECRET}\"\nws_bind = \"127.0.0.1\"\nws_port = 0\ninternal_port = 0\n\
             shutdown_drain = \"200ms\"\nlog_format = \"{log_format}\""
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["--config", path.to_str().unwrap()])
        .env_remove("WORKER_SECRET")
        .env("RUST_LOG", "trace")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let field = |key: &str| -> std::net::SocketAddr {
        let start = first.find(key).unwrap() + key.len();
        first[start..]
            .trim_start_matches(['=', '"', ':', ' '])
            .split(|c: char| c == '"' || c == ',' || c.is_whitespace())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (public, internal) = (field("public"), field("internal"));
    let t = ProcessAddrs { public, internal };
    let mut tokens = Vec::new();

    let ok = http(
        t.internal,
        "POST",
        "/internal/register",
        &[("X-Worker-Secret", SECRET)],
        br#"{"topic":"qso.1","meta":{"require_token":true}}"#,
    )
    .await;
    assert_eq!(ok.status, 200);
    let wrong_secret = format!("{SECRET}-wrong");
    http(
        t.internal,
        "POST",
        "/internal/publish",
        &[("X-Worker-Secret", &wrong_secret)],
        b"{}",
    )
    .await;
    http(
        t.internal,
        "GET",
        "/metrics",
        &[("Authorization", &format!("Bearer {SECRET}"))],
        b"",
    )
    .await;
    http(
        t.internal,
        "GET",
        "/internal/status?topics=1",
        &[("X-Worker-Secret", SECRET)],
        b"",
    )
    .await;

    let good = token_for("qso.1", 4, 60);
    let other = token_for("qso.2", 4, 60);
    tokens.extend([good.clone(), other.clone()]);
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{public}/ws?topic=qso.1&token={good}"))
            .await
            .unwrap();
    send_json(&mut ws, json!({"type":"auth","token":good})).await;
    assert_eq!(next_json(&mut ws).await["type"], "auth_ok");
    let (mut bad, _) = tokio_tungstenite::connect_async(format!("ws://{public}/ws?topic=qso.1"))
        .await
        .unwrap();
    send_json(&mut bad, json!({"type":"auth","token":other})).await;
    assert_eq!(next_json(&mut bad).await["code"], "unauthorized");
    let mut sse = SseClient::connect(
        public,
        &sse_path("qso.1", &good),
        &[("X-Forwarded-For", "203.0.113.9")],
    )
    .await
    .unwrap();
    sse.next_block().await.unwrap();
    assert_eq!(
        SseClient::connect(public, &sse_path("qso.1", &other), &[])
            .await
            .err()
            .unwrap()
            .status,
        401
    );
    let pub_ok = http(
        t.internal,
        "POST",
        "/internal/publish",
        &[("X-Worker-Secret", SECRET)],
        br#"{"topic":"qso.1","payload":{"n":1}}"#,
    )
    .await;
    assert_eq!(pub_ok.status, 200);
    next_json(&mut ws).await;
    drop((ws, bad, sse));

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let _ = reader.join();
    let lines: Vec<String> = std::iter::once(first).chain(rx.try_iter()).collect();
    (lines.join("\n"), tokens)
}

struct ProcessAddrs {
    #[allow(dead_code)]
    public: std::net::SocketAddr,
    internal: std::net::SocketAddr,
}

#[tokio::test]
async fn no_secret_token_or_query_string_in_any_log_line() {
    for format in ["text", "json"] {
        let (log, tokens) = logs_of_a_full_session(format).await;
        assert!(
            log.lines().count() > 20,
            "trace logging produced too little to mean anything:\n{log}"
        );
        assert!(
            log.contains("ws connected") && log.contains("sse connected"),
            "{log}"
        );
        assert!(
            !log.contains(SECRET),
            "the secret appears in the {format} log"
        );
        for token in &tokens {
            let (claims, signature) = token.split_once('.').unwrap();
            assert!(
                !log.contains(signature),
                "a token signature appears in the {format} log"
            );
            assert!(
                !log.contains(claims),
                "a token's claims appear in the {format} log"
            );
        }
        let leaks: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("&token=") || l.contains("?token="))
            .collect();
        assert!(
            leaks.is_empty(),
            "a query string with a token appears in the {format} log: {leaks:#?}"
        );
    }
}

#[tokio::test]
async fn token_abuse_is_refused_and_refusals_are_rate_limited_per_ip() {
    let t = start("auth_failure_burst = 5\nauth_failures_per_minute = 6").await;
    register(&t, "qso.1", true).await;
    let sign = |secret: &str, topic: &str, expires: i64| {
        wavelog_worker::token::sign(
            secret.as_bytes(),
            &wavelog_worker::token::Claims {
                user_id: 3,
                topic: topic.into(),
                expires,
            },
        )
    };
    let valid = token_for("qso.1", 3, 60);
    // Same signature, claims changed (user 3 -> 4): the hex of `"user_id":3` ends in "33".
    let (claims, signature) = valid.split_once('.').unwrap();
    let tampered = format!("{}.{signature}", claims.replacen("3a33", "3a34", 1));
    assert_ne!(tampered, valid);
    let one_char_off = format!("{}X", &SECRET[..SECRET.len() - 1]);
    let abuse = [
        ("replay after expiry", sign(SECRET, "qso.1", unix_now() - 1)),
        (
            "token for another topic",
            sign(SECRET, "qso.2", unix_now() + 60),
        ),
        ("tampered claims", tampered),
        (
            "a different secret",
            sign(
                "a-completely-different-secret-0123456789",
                "qso.1",
                unix_now() + 60,
            ),
        ),
        (
            "the secret one character off",
            sign(&one_char_off, "qso.1", unix_now() + 60),
        ),
    ];
    let attacker = [("X-Forwarded-For", "198.51.100.7")];
    for (what, token) in &abuse {
        let refused = SseClient::connect(t.public, &sse_path("qso.1", token), &attacker)
            .await
            .err();
        assert_eq!(refused.map(|a| a.status), Some(401), "{what}");
    }
    // The expired and the other-topic token are validly signed: they prove the client once
    // had a real token and count nowhere (a club's stale tabs). The three forgeries counted;
    // two more fill the burst of 5.
    for forged in ["7b7d.00", "not-even-hex"] {
        let refused = SseClient::connect(t.public, &sse_path("qso.1", forged), &attacker)
            .await
            .err();
        assert_eq!(refused.map(|a| a.status), Some(401), "{forged}");
    }
    // The burst is used up: even a valid token from that address waits now, before any check.
    let throttled = SseClient::connect(t.public, &sse_path("qso.1", &valid), &attacker)
        .await
        .err()
        .unwrap();
    assert_eq!(throttled.status, 429, "{}", throttled.body);
    let ws = http(
        t.public,
        "GET",
        "/ws?topic=qso.1",
        &[
            attacker[0],
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        b"",
    )
    .await;
    assert_eq!(ws.status, 429, "WebSocket upgrades too");
    // Others are not affected.
    let mut other = SseClient::connect(
        t.public,
        &sse_path("qso.1", &valid),
        &[("X-Forwarded-For", "198.51.100.8")],
    )
    .await
    .unwrap();
    other.next_block().await.unwrap();
    // One attempt per 10 s comes back (6 per minute).
    tokio::time::sleep(Duration::from_millis(10_200)).await;
    let mut again = SseClient::connect(t.public, &sse_path("qso.1", &valid), &attacker)
        .await
        .unwrap();
    again.next_block().await.unwrap();
}

#[tokio::test]
async fn websocket_auth_failures_count_too() {
    let t = start("auth_failure_burst = 2\nauth_failures_per_minute = 1").await;
    register(&t, "qso.1", true).await;
    for _ in 0..2 {
        let mut ws = ws_open(&t, "qso.1").await;
        send_json(&mut ws, json!({"type":"auth","token":"00.00"})).await;
        assert_eq!(next_json(&mut ws).await["code"], "unauthorized");
    }
    assert_eq!(ws_refused_status(&t, "/ws?topic=qso.1").await, 429);
}

/// The secret check is `subtle`'s constant-time comparison over digests, not `==`: a wrong
/// secret that shares a long prefix with the right one is refused like any other.
#[test]
fn secret_comparison_is_constant_time_by_construction() {
    let source = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/routes/internal.rs"
    ))
    .unwrap();
    let body = source.split("pub fn secrets_match").nth(1).unwrap();
    let body = &body[..body.find("\n}\n").unwrap()];
    assert!(
        body.contains("ct_eq"),
        "secrets_match must use subtle's ct_eq:\n{body}"
    );
    assert!(!body.contains("=="), "no == on secrets:\n{body}");
    use wavelog_worker::routes::internal::secrets_match;
    assert!(secrets_match(SECRET.as_bytes(), SECRET.as_bytes()));
    assert!(!secrets_match(
        format!("{SECRET}x").as_bytes(),
        SECRET.as_bytes()
    ));
    assert!(!secrets_match(
        &SECRET.as_bytes()[..SECRET.len() - 1],
        SECRET.as_bytes()
    ));
    assert!(!secrets_match(b"", SECRET.as_bytes()));
}
