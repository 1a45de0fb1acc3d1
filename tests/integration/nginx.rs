//! `deploy/nginx.conf`, exactly as shipped (ports and paths substituted), in front of the
//! worker: a WebSocket and an SSE round-trip through it, and no token in its access log.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

/// Replaces each `from` (which must occur) in the shipped config.
fn substitute(mut conf: String, pairs: &[(&str, String)]) -> String {
    for (from, to) in pairs {
        assert!(
            conf.contains(from),
            "deploy/nginx.conf no longer contains {from:?}; update this test"
        );
        conf = conf.replace(from, to);
    }
    conf
}

/// A real nginx running `deploy/nginx.conf` (ports and paths substituted) in front of `t`.
pub struct Nginx {
    child: tokio::process::Child,
    pub addr: std::net::SocketAddr,
    pub dir: TempDir,
}

impl Nginx {
    /// `None` (test skipped, with a message) when nginx is not installed.
    pub async fn start(t: &TestWorker) -> Option<Nginx> {
        let nginx = require_tool("nginx")?;
        let dir = TempDir::new("nginx");
        let d = dir.0.display().to_string();
        let port = free_port();
        let shipped =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf"))
                .unwrap();
        let conf = substitute(
            shipped,
            &[
                ("user www-data;", "user root;".to_string()),
                ("pid /run/nginx.pid;", format!("pid {d}/nginx.pid;")),
                ("/var/log/nginx/error.log", format!("{d}/error.log")),
                ("/var/log/nginx/access.log", format!("{d}/access.log")),
                ("listen 80;", format!("listen 127.0.0.1:{port};")),
                ("server 127.0.0.1:9000;", format!("server {};", t.public)),
                ("root /var/www/wavelog;", format!("root {d};")),
                (
                    "http {",
                    format!(
                        "http {{\n    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;"
                    ),
                ),
            ],
        );
        let conf_path = dir.0.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = tokio::process::Command::new(nginx)
            .args([
                "-p",
                &d,
                "-c",
                conf_path.to_str().unwrap(),
                "-g",
                "daemon off;",
            ])
            .kill_on_drop(true)
            .spawn()
            .expect("nginx starts");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        eventually("nginx to listen", || async {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
        Some(Nginx { child, addr, dir })
    }

    /// Stops nginx with SIGTERM (not SIGKILL, so the master takes its workers down with it)
    /// and returns its access log.
    pub async fn stop(mut self) -> String {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        std::fs::read_to_string(self.dir.0.join("access.log")).unwrap_or_default()
    }
}

#[tokio::test]
async fn websocket_and_sse_round_trips_through_the_shipped_nginx_conf() {
    let t = start("").await;
    register(&t, "qso.1", true).await;
    let Some(nginx) = Nginx::start(&t).await else {
        return;
    };
    let addr = nginx.addr;

    // WebSocket through /worker/ws.
    let token = token_for("qso.1", 5, 60);
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/worker/ws?topic=qso.1"))
            .await
            .expect("upgrade through nginx");
    send_json(&mut ws, json!({"type":"auth","token":token})).await;
    assert_eq!(next_json(&mut ws).await["type"], "auth_ok");

    // SSE through /worker/sse; the first event must arrive at once (not buffered).
    let mut sse = SseClient::connect(addr, &format!("/worker{}", sse_path("qso.1", &token)), &[])
        .await
        .expect("SSE through nginx");
    sse.next_block().await.unwrap();
    assert_eq!(
        publish(&t, "qso.1", r#"{"type":"sync_required"}"#).await,
        200
    );
    assert_eq!(next_json(&mut ws).await["payload"]["type"], "sync_required");
    let v = tokio::time::timeout(Duration::from_secs(3), sse.next_json())
        .await
        .expect("SSE is not buffered by nginx");
    assert_eq!(v["payload"]["type"], "sync_required");

    // The worker sees the browser's address from nginx's X-Forwarded-For / X-Real-IP.
    let s = status(&t, "").await;
    assert_eq!(s["connected_sockets"], 2);

    drop(ws);
    drop(sse);
    let log = nginx.stop().await;
    assert!(log.contains("/worker/sse"), "requests are logged: {log}");
    assert!(!log.contains(&token), "no token in nginx's access log");
}

/// An SSE request through nginx from a chosen loopback address, with extra headers; the
/// status of the answer (the stream, when 200, is kept open in `held`).
async fn sse_from(
    from: &str,
    nginx: &Nginx,
    path: &str,
    headers: &[(&str, &str)],
    held: &mut Vec<SseClient>,
) -> u16 {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(nginx.addr).await.unwrap();
    match SseClient::on(stream, &format!("/worker{path}"), headers).await {
        Ok(sse) => {
            held.push(sse);
            200
        }
        Err(answer) => answer.status,
    }
}

#[tokio::test]
async fn a_forged_x_forwarded_for_through_nginx_does_not_bypass_the_per_ip_limit() {
    let t = start("max_connections_per_ip = 3").await;
    register(&t, "qso.1", true).await;
    let Some(nginx) = Nginx::start(&t).await else {
        return;
    };
    let path = sse_path("qso.1", &token_for("qso.1", 1, 60));
    let mut held = Vec::new();
    let mut statuses = Vec::new();
    for i in 1..=5 {
        let forged = format!("198.51.100.{i}");
        let headers = [
            ("X-Forwarded-For", forged.as_str()),
            ("X-Real-IP", forged.as_str()),
        ];
        statuses.push(sse_from("127.0.0.2", &nginx, &path, &headers, &mut held).await);
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 429, 429],
        "one client, whatever it claims"
    );
    // Another browser (another address nginx sees) is counted on its own: the worker uses
    // the X-Real-IP nginx sets, not nginx's own address.
    assert_eq!(
        sse_from("127.0.0.3", &nginx, &path, &[], &mut held).await,
        200
    );
    drop(held);
    nginx.stop().await;
}

#[tokio::test]
async fn a_forged_x_forwarded_for_through_nginx_cannot_get_another_address_throttled() {
    let t = start("auth_failure_burst = 5\nauth_failures_per_minute = 1").await;
    register(&t, "qso.1", true).await;
    let Some(nginx) = Nginx::start(&t).await else {
        return;
    };
    let mut held = Vec::new();
    let bad = sse_path("qso.1", "7b7d.00");
    let victim = [("X-Forwarded-For", "127.0.0.9")];
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(sse_from("127.0.0.2", &nginx, &bad, &victim, &mut held).await);
    }
    assert_eq!(&statuses[..5], [401; 5]);
    assert_eq!(&statuses[5..], [429; 3], "the guesser is throttled");
    let good = sse_path("qso.1", &token_for("qso.1", 9, 60));
    assert_eq!(
        sse_from("127.0.0.9", &nginx, &good, &[], &mut held).await,
        200,
        "the address named in the forged header is not"
    );
    drop(held);
    nginx.stop().await;
}
