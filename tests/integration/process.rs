//! The real binary: config errors, CLI helpers, signals.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_wavelog-worker");

fn config_file(text: &str) -> tempfile_path::TempFile {
    tempfile_path::TempFile::new(text)
}

/// A tiny self-deleting temp file (no extra crate for one helper).
mod tempfile_path {
    pub struct TempFile(pub std::path::PathBuf);
    impl TempFile {
        pub fn new(text: &str) -> Self {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("ww-test-{}-{n}.toml", std::process::id()));
            std::fs::write(&path, text).unwrap();
            TempFile(path)
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn run_with(config: &str) -> (i32, String) {
    let f = config_file(config);
    let out = Command::new(BIN)
        .args(["--config", f.0.to_str().unwrap()])
        .env_remove("WORKER_SECRET")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn bad_config_exits_with_one_line_naming_the_key() {
    let s = format!("worker_secret = \"{SECRET}\"\n");
    let cases = [
        (format!("{s}colour = 1"), "colour"),
        ("worker_secret = \"short\"".to_string(), "worker_secret"),
        (format!("{s}topic_ttl = \"forever\""), "topic_ttl"),
        (
            format!("{s}redis_url = \"rediss://127.0.0.1:6379\""),
            "redis_url",
        ),
    ];
    for (text, key) in cases {
        let (code, stderr) = run_with(&text);
        assert_ne!(code, 0, "{text}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(key), "{stderr:?} names {key}");
    }
    let (code, stderr) = run_with("");
    assert_ne!(code, 0);
    assert!(stderr.contains("worker_secret"), "{stderr}");
}

#[tokio::test]
async fn port_in_use_is_a_clear_error() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let (code, stderr) = run_with(&format!(
        "worker_secret = \"{SECRET}\"\nws_bind = \"127.0.0.1\"\nws_port = {port}\ninternal_port = 0"
    ));
    assert_ne!(code, 0);
    assert!(
        stderr.contains("ws_port") && stderr.contains(&port.to_string()),
        "{stderr}"
    );
}

#[test]
fn gen_secret_and_token_commands() {
    let out = Command::new(BIN).arg("gen-secret").output().unwrap();
    let secret = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(secret.len(), 64);
    assert!(secret
        .chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    let again = Command::new(BIN).arg("gen-secret").output().unwrap();
    assert_ne!(String::from_utf8(again.stdout).unwrap().trim(), secret);

    let f = config_file(&format!("worker_secret = \"{SECRET}\""));
    let out = Command::new(BIN)
        .args([
            "--config",
            f.0.to_str().unwrap(),
            "token",
            "--topic",
            "radio.5",
            "--user-id",
            "7",
            "--ttl",
            "1h",
        ])
        .env_remove("WORKER_SECRET")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let claims =
        wavelog_worker::token::verify(SECRET.as_bytes(), &token, "radio.5", unix_now()).unwrap();
    assert_eq!(claims.user_id, 7);
    assert!((claims.expires - unix_now() - 3600).abs() <= 2);
}

#[test]
fn environment_overrides_and_secret_from_env_only() {
    // No config file at all: the secret and ports come from the environment.
    let missing = std::env::temp_dir().join("ww-does-not-exist.toml");
    let mut child = Command::new(BIN)
        .args(["--config", missing.to_str().unwrap()])
        .env("WORKER_SECRET", SECRET)
        .env("WORKER_WS_BIND", "127.0.0.1")
        .env("WORKER_WS_PORT", "0")
        .env("WORKER_INTERNAL_PORT", "0")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let line = lines.next().unwrap().unwrap();
    assert!(line.contains("listening"), "{line}");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn sigterm_closes_sockets_with_1001_and_exits_cleanly() {
    let f = config_file(&format!(
        "worker_secret = \"{SECRET}\"\nws_bind = \"127.0.0.1\"\nws_port = 0\ninternal_port = 0\nshutdown_drain = \"300ms\""
    ));
    let mut child = Command::new(BIN)
        .args(["--config", f.0.to_str().unwrap()])
        .env_remove("WORKER_SECRET")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let listening = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let addr_of = |key: &str| -> std::net::SocketAddr {
        let start = listening.find(&format!("{key}=")).unwrap() + key.len() + 1;
        listening[start..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let t = ProcessWorker {
        public: addr_of("public"),
        internal: addr_of("internal"),
    };
    let a = http(
        t.internal,
        "POST",
        "/internal/register",
        &[("X-Worker-Secret", SECRET)],
        br#"{"topic":"q"}"#,
    )
    .await;
    assert_eq!(a.status, 200);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws?topic=q", t.public))
        .await
        .unwrap();
    send_json(&mut ws, serde_json::json!({"type":"auth","token":"x"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "auth_ok");

    // The Docker HEALTHCHECK command asks the same worker (its config names the public port).
    let hc = config_file(&format!(
        "worker_secret = \"{SECRET}\"\nws_port = {}",
        t.public.port()
    ));
    let ok = Command::new(BIN)
        .args(["--config", hc.0.to_str().unwrap(), "healthcheck"])
        .status()
        .unwrap();
    assert!(ok.success());

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert_eq!(close_code(&mut ws).await, Some(1001));
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    let down = Command::new(BIN)
        .args(["--config", hc.0.to_str().unwrap(), "healthcheck"])
        .status()
        .unwrap();
    assert!(!down.success(), "healthcheck fails once the worker is gone");
}

struct ProcessWorker {
    public: std::net::SocketAddr,
    internal: std::net::SocketAddr,
}
