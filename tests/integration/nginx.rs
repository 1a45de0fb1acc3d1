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

#[tokio::test]
async fn websocket_and_sse_round_trips_through_the_shipped_nginx_conf() {
    let Some(nginx) = require_tool("nginx") else {
        return;
    };
    let t = start("").await;
    register(&t, "qso.1", true).await;
    let dir = TempDir::new("nginx");
    let d = dir.0.display().to_string();
    let port = free_port();
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf")).unwrap();
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
    let mut child = tokio::process::Command::new(nginx)
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
    // SIGTERM (not SIGKILL) so the master takes its worker processes down with it.
    let pid = child.id().unwrap().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    let log = std::fs::read_to_string(dir.0.join("access.log")).unwrap_or_default();
    assert!(log.contains("/worker/sse"), "requests are logged: {log}");
    assert!(!log.contains(&token), "no token in nginx's access log");
}
