//! connect-floor: the least a server can do for one `fanout-bench` subscriber, to measure
//! what accepting a connection costs the kernel on this machine.
//!
//! It answers the same bytes the worker sends for a subscription (a `101` and an `auth_ok`
//! frame for a WebSocket after one read each; an SSE head and first block for `/sse`) with no
//! parsing, token check, hub or timers, on the same tokio runtime the worker uses. Started by
//! `fanout-bench run --events 0 --worker-bin target/release/connect-floor`, its server CPU
//! per connection is the floor under the worker's figure: what is left is socket calls and
//! the kernel's TCP work, which no server of this protocol can skip. Not a server for anything
//! else: it knows the bench's sample key only.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wavelog_tools::WS_SAMPLE_ACCEPT;
use wavelog_worker::transport;

/// The worker's `auth_ok` for a bench topic, as one unmasked text frame.
const AUTH_OK: &[u8] = br#"{"type":"auth_ok","topic":"bench.0"}"#;

/// The SSE head as the worker sends it.
const SSE_HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
cache-control: no-cache\r\nx-accel-buffering: no\r\ntransfer-encoding: chunked\r\n\
date: Tue, 01 Dec 2026 00:00:00 GMT\r\n\r\n";

const READY: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

fn main() -> Result<(), String> {
    let config = config_path()?;
    let text = std::fs::read_to_string(&config).map_err(|e| format!("{config}: {e}"))?;
    let public = port(&text, "ws_port")?;
    let internal = port(&text, "internal_port")?;
    wavelog_tools::raise_fd_limit();
    let sse_open = sse_open();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        // The worker's own listeners: no-delay handed on to accepted sockets, deferred accept.
        let public = transport::listen("127.0.0.1", public)
            .await
            .map_err(|e| e.to_string())?;
        transport::defer_accept(&public, Duration::from_secs(10));
        let internal = transport::listen("127.0.0.1", internal)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(serve(internal, sse_open));
        serve(public, sse_open).await;
        Ok(())
    })
}

fn config_path() -> Result<String, String> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (Some("--config"), Some(path)) => Ok(path),
        _ => Err("usage: connect-floor --config <worker.toml>".into()),
    }
}

/// `key = N` from the bench's generated worker config.
fn port(config: &str, key: &str) -> Result<u16, String> {
    config
        .lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .ok_or_else(|| format!("no {key} in the config"))
}

/// The SSE head and the worker's own first block (retry and position), in one chunk.
fn sse_open() -> &'static [u8] {
    let block = wavelog_worker::protocol::sse_position(2000, "bench.0:0");
    let mut out = format!("{SSE_HEAD}{:x}\r\n", block.len()).into_bytes();
    out.extend_from_slice(&block);
    out.extend_from_slice(b"\r\n");
    Box::leak(out.into_boxed_slice())
}

async fn serve(listener: TcpListener, sse_open: &'static [u8]) {
    loop {
        if let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = connection(stream, sse_open).await;
            });
        }
    }
}

async fn connection(mut stream: TcpStream, sse_open: &[u8]) -> io::Result<()> {
    let mut buf = [0u8; 1024];
    let n = read_head(&mut stream, &mut buf).await?;
    let request = &buf[..n];
    if request.starts_with(b"GET /ws") {
        let head = format!(
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
             sec-websocket-accept: {WS_SAMPLE_ACCEPT}\r\ndate: Tue, 01 Dec 2026 00:00:00 GMT\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await?;
        // The auth frame.
        if stream.read(&mut buf).await? == 0 {
            return Ok(());
        }
        let mut frame = vec![0x81, AUTH_OK.len() as u8];
        frame.extend_from_slice(AUTH_OK);
        stream.write_all(&frame).await?;
    } else if request.starts_with(b"GET /sse") {
        stream.write_all(sse_open).await?;
    } else {
        return stream.write_all(READY).await;
    }
    // Held until the subscriber leaves.
    while stream.read(&mut buf).await? > 0 {}
    Ok(())
}

/// Reads until the end of the request head (or a full buffer, or the peer's close).
async fn read_head(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let got = stream.read(&mut buf[n..]).await?;
        if got == 0 {
            break;
        }
        n += got;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    Ok(n)
}
