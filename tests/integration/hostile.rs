//! Hostile and broken clients over real sockets: each gets a defined answer, nobody else is
//! harmed, and the worker's memory comes back.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// A client frame (masked, as RFC 6455 requires of clients).
fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len < 65536 {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mask = [0x12, 0x34, 0x56, 0x78];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// A WebSocket upgrade by hand; returns the socket and the answer's head.
async fn raw_upgrade(addr: std::net::SocketAddr, path: &str, extra: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "answer head");
        head.push(b[0]);
    }
    (s, String::from_utf8(head).unwrap())
}

/// The next server frame: (opcode, payload); `None` at EOF.
async fn read_frame(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let read = async {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).await.ok()?;
        let mut len = (h[1] & 0x7f) as usize;
        if len == 126 {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.ok()?;
            len = u16::from_be_bytes(b) as usize;
        } else if len == 127 {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).await.ok()?;
            len = u64::from_be_bytes(b) as usize;
        }
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.ok()?;
        Some((h[0] & 0x0f, payload))
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("a frame or EOF within 5 s")
}

/// Next text frame, skipping pongs/pings.
async fn read_text(s: &mut TcpStream) -> Option<serde_json::Value> {
    loop {
        let (op, payload) = read_frame(s).await?;
        match op {
            0x1 => return Some(serde_json::from_slice(&payload).unwrap()),
            0x8 => return None,
            _ => continue,
        }
    }
}

/// The close code of the next close frame (skipping anything before it).
async fn read_close(s: &mut TcpStream) -> Option<u16> {
    loop {
        let (op, payload) = read_frame(s).await?;
        if op == 0x8 {
            return payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
        }
    }
}

async fn authed(t: &TestWorker, topic: &str) -> TcpStream {
    let (mut s, head) = raw_upgrade(t.public, &format!("/ws?topic={topic}"), "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let auth = json!({"type":"auth","token":"x"}).to_string();
    s.write_all(&frame(0x1, true, auth.as_bytes()))
        .await
        .unwrap();
    assert_eq!(read_text(&mut s).await.unwrap()["type"], "auth_ok");
    s
}

#[tokio::test]
async fn slowloris_is_cut_off_and_others_are_served() {
    let t = start("header_timeout = \"500ms\"").await;
    register(&t, "qso.1", false).await;
    let mut slow = TcpStream::connect(t.public).await.unwrap();
    let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let trickle = async {
        for b in request
            .iter()
            .chain(b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter())
        {
            if slow.write_all(&[*b]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    let normal = async {
        // Meanwhile other clients are served at once.
        for _ in 0..5 {
            assert_eq!(
                http(t.public, "GET", "/healthz", &[], b"").await.status,
                200
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (cut, ()) = tokio::join!(trickle, normal);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), slow.read_to_end(&mut rest)).await;
    let answer = String::from_utf8_lossy(&rest);
    assert!(
        cut || answer.contains("408") || answer.is_empty(),
        "the trickling client was cut off: {answer:?}"
    );
    let mut buf = [0u8; 1];
    assert!(
        matches!(slow.read(&mut buf).await, Ok(0) | Err(_)),
        "connection closed by the header timeout"
    );
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let t = start("").await;
    let big = "x".repeat(20 * 1024);
    let a = http(t.public, "GET", "/healthz", &[("X-Big", &big)], b"").await;
    assert_eq!(a.status, 431);
    let many: Vec<(String, String)> = (0..100)
        .map(|i| (format!("X-H{i}"), "v".to_string()))
        .collect();
    let refs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(
        http(t.public, "GET", "/healthz", &refs, b"").await.status,
        431
    );
    assert_eq!(
        http(t.public, "GET", "/healthz", &[], b"").await.status,
        200,
        "others are fine"
    );
}

#[tokio::test]
async fn odd_frames_get_defined_answers() {
    let t = start("").await;
    register(&t, "qso.1", false).await;

    // Binary frames after auth are ignored; the socket keeps working.
    let mut s = authed(&t, "qso.1").await;
    s.write_all(&frame(0x2, true, b"\x00\x01binary"))
        .await
        .unwrap();
    assert_eq!(publish(&t, "qso.1", "1").await, 200);
    assert_eq!(read_text(&mut s).await.unwrap()["payload"], 1);

    // A ping flood is answered and does not disturb delivery.
    let pings: Vec<u8> = (0..5000).flat_map(|_| frame(0x9, true, b"p")).collect();
    s.write_all(&pings).await.unwrap();
    assert_eq!(publish(&t, "qso.1", "2").await, 200);
    assert_eq!(read_text(&mut s).await.unwrap()["payload"], 2);

    // A fragmented auth frame is reassembled.
    let (mut f, _) = raw_upgrade(t.public, "/ws?topic=qso.1", "").await;
    let auth = json!({"type":"auth","token":"x"}).to_string();
    let (a, b) = auth.as_bytes().split_at(7);
    f.write_all(&frame(0x1, false, a)).await.unwrap();
    f.write_all(&frame(0x0, true, b)).await.unwrap();
    assert_eq!(read_text(&mut f).await.unwrap()["type"], "auth_ok");
    // Fragments adding up to more than 4 KiB close the socket (1009).
    let chunk = vec![b'x'; 3000];
    f.write_all(&frame(0x1, false, &chunk)).await.unwrap();
    let _ = f.write_all(&frame(0x0, true, &chunk)).await;
    assert_eq!(read_close(&mut f).await, Some(1009));

    // Invalid UTF-8 in a text frame: close 1007.
    let mut u = authed(&t, "qso.1").await;
    u.write_all(&frame(0x1, true, b"{\"type\":\"\xff\xfe\"}"))
        .await
        .unwrap();
    assert_eq!(read_close(&mut u).await, Some(1007));

    // An unmasked client frame is a protocol error: close 1007.
    let mut m = authed(&t, "qso.1").await;
    m.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    assert_eq!(read_close(&mut m).await, Some(1007));

    // The first socket is unharmed by all of that.
    assert_eq!(publish(&t, "qso.1", "3").await, 200);
    assert_eq!(read_text(&mut s).await.unwrap()["payload"], 3);
}

/// The next server frame from a blocking socket: (opcode, payload); `None` at its end.
fn read_frame_blocking(r: &mut impl std::io::Read) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h).ok()?;
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).ok()?;
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b).ok()?;
            u64::from_be_bytes(b) as usize
        }
        short => short as usize,
    };
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).ok()?;
    Some((h[0] & 0x0f, payload))
}

/// Floods `s` with empty pings from a thread of its own, as a client on another core would,
/// while another thread reads what comes back. Returns whether the server ended the socket
/// within `window` (the flood's write failed) and the code of the close frame it sent.
async fn flood_pings(s: TcpStream, window: Duration) -> (bool, Option<u16>) {
    let s = s.into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    let from_server = std::io::BufReader::new(s.try_clone().unwrap());
    let stop = s.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut from_server = from_server;
        let mut close = None;
        while let Some((op, payload)) = read_frame_blocking(&mut from_server) {
            if op == 0x8 {
                close = payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
            }
        }
        close
    });
    // 60 KiB of pings per write: the server always finds a frame waiting.
    let pings: Vec<u8> = (0..10_000).flat_map(|_| frame(0x9, true, b"")).collect();
    let flood = tokio::task::spawn_blocking(move || {
        let mut to_server = s;
        while std::io::Write::write_all(&mut to_server, &pings).is_ok() {}
    });
    let ended = tokio::time::timeout(window, flood).await.is_ok();
    // Ends the flood and the reader if the server did not.
    let _ = stop.shutdown(std::net::Shutdown::Both);
    (ended, reader.join().unwrap())
}

/// Pings are answered without counting against the inbound budget, but they must not hold
/// off the socket's deadlines: a client that floods pings is still closed at `auth_timeout`
/// before auth, and at its token's expiry after it.
#[tokio::test]
async fn a_ping_flood_does_not_hold_off_deadlines() {
    let t = start("auth_timeout = \"1s\"\nenforce_token_expiry = true").await;
    register(&t, "qso.1", true).await;
    let closed = |reason: &str| {
        format!("wavelog_worker_websocket_disconnects_total{{reason=\"{reason}\"}} 1")
    };

    let (s, head) = raw_upgrade(t.public, "/ws?topic=qso.1", "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let end = flood_pings(s, Duration::from_secs(6)).await;
    assert_eq!(
        end,
        (true, Some(1008)),
        "closed within 6 s of pings before auth"
    );
    eventually_metric(&t, &closed("auth_timeout")).await;

    let (mut s, _) = raw_upgrade(t.public, "/ws?topic=qso.1", "").await;
    let auth = json!({"type":"auth","token": token_for("qso.1", 1, 2)}).to_string();
    s.write_all(&frame(0x1, true, auth.as_bytes()))
        .await
        .unwrap();
    assert_eq!(read_text(&mut s).await.unwrap()["type"], "auth_ok");
    let end = flood_pings(s, Duration::from_secs(8)).await;
    assert_eq!(
        end,
        (true, Some(1008)),
        "closed within 8 s of pings, token valid for 2 s"
    );
    eventually_metric(&t, &closed("token_expired")).await;

    // The worker serves others meanwhile and after.
    assert_eq!(
        http(t.public, "GET", "/healthz", &[], b"").await.status,
        200
    );
}

#[tokio::test]
async fn compression_offers_are_declined() {
    let t = start("").await;
    register(&t, "qso.1", false).await;
    let (mut s, head) = raw_upgrade(
        t.public,
        "/ws?topic=qso.1",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions"),
        "no extension accepted: {head}"
    );
    let auth = json!({"type":"auth","token":"x"}).to_string();
    s.write_all(&frame(0x1, true, auth.as_bytes()))
        .await
        .unwrap();
    assert_eq!(
        read_text(&mut s).await.unwrap()["type"],
        "auth_ok",
        "plain frames work"
    );
}

#[tokio::test]
async fn the_internal_port_answers_403_without_reading_the_body() {
    let t = start("").await;
    let mut s = TcpStream::connect(t.internal).await.unwrap();
    let head = "POST /internal/publish HTTP/1.1\r\nHost: x\r\nX-Worker-Secret: wrong\r\nContent-Length: 100000000\r\n\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    // No body is sent at all: the answer must not wait for it.
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("answered at once")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 403"));
}

/// A child process killed when the test ends, also when it fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// 10,000 sockets upgrade and never authenticate: the auth deadline closes every one, and the
/// worker's memory comes back to its baseline. (The worker runs as its own process: the test
/// and the worker each hold 10,000 sockets, and one process may hold at most 20,000.)
#[tokio::test]
async fn ten_thousand_silent_sockets_are_closed_and_memory_returns() {
    const N: usize = 10_000;
    let dir = TempDir::new("silent");
    let (public_port, internal_port) = (free_port(), free_port());
    let path = dir.0.join("worker.toml");
    std::fs::write(
        &path,
        format!(
            "worker_secret = \"{SECRET}\"\nws_bind = \"127.0.0.1\"\nws_port = {public_port}\ninternal_port = {internal_port}\n\
             auth_timeout = \"3s\"\nhistory_ttl = \"1s\"\nmax_connections_per_ip = 100000\nmax_connections = 100000"
        ),
    )
    .unwrap();
    let child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_wavelog-worker"))
            .args(["--config", path.to_str().unwrap()])
            .env_remove("WORKER_SECRET")
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let public: std::net::SocketAddr = format!("127.0.0.1:{public_port}").parse().unwrap();
    let internal: std::net::SocketAddr = format!("127.0.0.1:{internal_port}").parse().unwrap();
    eventually("the worker to listen", || async {
        TcpStream::connect(internal).await.is_ok()
    })
    .await;
    let a = http(
        internal,
        "POST",
        "/internal/register",
        &[("X-Worker-Secret", SECRET)],
        br#"{"topic":"q"}"#,
    )
    .await;
    assert_eq!(a.status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let baseline = rss_kib(child.0.id());

    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let gate = gate.clone();
            tokio::spawn(async move {
                let permit = gate.acquire_owned().await.unwrap();
                let local = std::net::IpAddr::from([127, 0, 0, 1 + (i % 8) as u8]);
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind((local, 0).into()).unwrap();
                let mut s = socket.connect(public).await.unwrap();
                s.write_all(b"GET /ws?topic=q HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut b = [0u8; 1];
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        panic!("closed before the 101");
                    }
                    head.push(b[0]);
                }
                assert!(head.starts_with(b"HTTP/1.1 101"));
                drop(permit);
                // Say nothing; wait for the worker to give up on us.
                let mut rest = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut rest)).await;
                rest.get(2..4).map(|c| u16::from_be_bytes([c[0], c[1]]))
            })
        })
        .collect();
    let mut peak = 0;
    let mut codes = std::collections::HashMap::new();
    for t in tasks {
        peak = peak.max(rss_kib(child.0.id()));
        let code = t.await.unwrap();
        *codes.entry(code).or_insert(0) += 1;
    }
    assert_eq!(
        codes.get(&Some(1008)),
        Some(&N),
        "every socket closed with 1008 by the auth deadline: {codes:?}"
    );
    let mut after = rss_kib(child.0.id());
    for _ in 0..50 {
        if after <= baseline + 8 * 1024 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = rss_kib(child.0.id());
    }
    drop(child);
    eprintln!("RSS baseline {baseline} KiB, peak {peak} KiB, after {after} KiB");
    assert!(
        after <= baseline + 8 * 1024,
        "memory returns to baseline: {baseline} KiB before, {after} KiB after"
    );
}

/// Runs `ip` with `args`, failing the test on error.
fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("ip runs");
    assert!(status.success(), "ip {args:?}");
}

/// A test host: a network namespace of our own, joined to this one by a veth pair.
struct TestHost {
    ns: String,
    veth: String,
    host_addr: String,
    child: Option<std::process::Child>,
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// A peer that vanishes without FIN or RST (its link goes down): found by the ping/idle
/// timeout. The client lives in a network namespace of the test's own, so cutting its link
/// drops packets instead of closing the connection.
#[tokio::test]
async fn a_half_open_peer_is_detected_by_the_idle_timeout() {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if !root || require_tool("ip").is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root with iproute2"
        );
        eprintln!("SKIPPED: needs root and `ip` to make a network namespace");
        return;
    }
    let id = std::process::id() % 250 + 1;
    let mut host = TestHost {
        ns: format!("wwho{}", std::process::id()),
        veth: format!("wwa{}", std::process::id()),
        host_addr: format!("10.231.{id}.1"),
        child: None,
    };
    let peer = format!("wwb{}", std::process::id());
    let client_addr = format!("10.231.{id}.2");
    ip(&["netns", "add", &host.ns]);
    ip(&[
        "link", "add", &host.veth, "type", "veth", "peer", "name", &peer,
    ]);
    ip(&["link", "set", &peer, "netns", &host.ns]);
    ip(&[
        "addr",
        "add",
        &format!("{}/30", host.host_addr),
        "dev",
        &host.veth,
    ]);
    ip(&["link", "set", &host.veth, "up"]);
    ip(&[
        "netns",
        "exec",
        &host.ns,
        "ip",
        "addr",
        "add",
        &format!("{client_addr}/30"),
        "dev",
        &peer,
    ]);
    ip(&["netns", "exec", &host.ns, "ip", "link", "set", &peer, "up"]);

    let t = start(&format!(
        "ws_bind = \"{}\"\nping_interval = \"300ms\"\nidle_timeout = \"1s\"",
        host.host_addr
    ))
    .await;
    register(&t, "qso.1", false).await;
    // The client: a small Python WebSocket client that authenticates and answers every ping.
    let script = r#"
import os, socket, struct, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(b"GET /ws?topic=qso.1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
head = b""
while not head.endswith(b"\r\n\r\n"):
    head += s.recv(1)
def send(op, payload):
    mask = os.urandom(4)
    s.sendall(bytes([0x80 | op, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
def recv_exact(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            sys.exit(0)
        b += c
    return b
send(1, b'{"type":"auth","token":"x"}')
while True:
    op, ln = recv_exact(2)
    ln &= 0x7f
    if ln == 126:
        ln = struct.unpack(">H", recv_exact(2))[0]
    payload = recv_exact(ln)
    if op & 0x0f == 9:
        send(10, payload)
"#;
    let python = require_tool("python3").expect("python3 is on the machine image");
    host.child = Some(
        Command::new("ip")
            .args(["netns", "exec", &host.ns])
            .arg(python)
            .args(["-c", script, &host.host_addr, &t.public.port().to_string()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually("the client to be authenticated", || async {
        status(&t, "").await["connected_sockets"] == 1
    })
    .await;
    // While the client answers pings it stays, well past the idle timeout.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        status(&t, "").await["connected_sockets"],
        1,
        "a live peer stays"
    );

    // The peer vanishes: no FIN, no RST, just silence.
    ip(&["link", "set", &host.veth, "down"]);
    eventually("the half-open socket to be dropped", || async {
        status(&t, "").await["connected_sockets"] == 0
    })
    .await;
    eventually_metric(
        &t,
        "wavelog_worker_websocket_disconnects_total{reason=\"idle_timeout\"} 1",
    )
    .await;
}
