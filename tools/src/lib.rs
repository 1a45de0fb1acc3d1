//! Helpers shared by the load tools (`fanout-bench`, `soak`): a decoder for a chunked
//! `text/event-stream` body (the worker itself never parses SSE), a minimal WebSocket client
//! codec, and process figures from /proc. Not used by the worker.

/// Feed it the bytes after the response head; it yields complete event blocks.
#[derive(Default)]
pub struct ChunkedSse {
    raw: Vec<u8>,
    body: Vec<u8>,
    /// The body is not chunked (a stream that ends with the connection, as nchan sends it).
    plain: bool,
}

impl ChunkedSse {
    /// A decoder for an SSE body sent without chunked framing.
    pub fn plain() -> ChunkedSse {
        ChunkedSse {
            plain: true,
            ..ChunkedSse::default()
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if self.plain {
            self.body.extend_from_slice(bytes);
        } else {
            self.raw.extend_from_slice(bytes);
        }
    }

    /// Blocks (the text up to a blank line) completed so far.
    pub fn blocks(&mut self) -> Vec<String> {
        while let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") {
            let size = std::str::from_utf8(&self.raw[..line_end])
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .unwrap_or(0);
            let need = line_end + 2 + size + 2;
            if size == 0 || self.raw.len() < need {
                break;
            }
            self.body
                .extend_from_slice(&self.raw[line_end + 2..line_end + 2 + size]);
            self.raw.drain(..need);
        }
        let mut out = Vec::new();
        while let Some(end) = self.body.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = self.body.drain(..end + 2).collect();
            out.push(String::from_utf8_lossy(&block[..end]).to_string());
        }
        out
    }
}

/// The `id:` and `data:` of a block (`event:` blocks other than messages give no data).
pub fn fields(block: &str) -> (Option<&str>, Option<&str>, Option<&str>) {
    let (mut id, mut data, mut event) = (None, None, None);
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("id: ") {
            id = Some(v);
        } else if let Some(v) = line.strip_prefix("data: ") {
            data = Some(v);
        } else if let Some(v) = line.strip_prefix("event: ") {
            event = Some(v);
        }
    }
    (id, data, event)
}

/// Raises this process's open-file soft limit to its hard limit (inherited by the workers the
/// tools start). The hard limit on our machines is 20,000 and cannot be raised.
/// The upgrade request of a load-tool WebSocket client, with the RFC 6455 sample key (the
/// tools need no fresh key per socket; the server must still answer [`WS_SAMPLE_ACCEPT`]).
pub fn ws_upgrade_request(path_and_query: &str) -> String {
    format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

/// `Sec-WebSocket-Accept` for the key of [`ws_upgrade_request`] (RFC 6455, section 1.3).
pub const WS_SAMPLE_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A masked client frame (opcode 1 text, 9 ping, 10 pong, 8 close) carrying `payload`.
pub fn ws_client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Decodes the server's (unmasked, unfragmented) frames from the bytes after the 101 head.
#[derive(Default)]
pub struct WsFrames {
    raw: Vec<u8>,
}

impl WsFrames {
    pub fn feed(&mut self, bytes: &[u8]) {
        self.raw.extend_from_slice(bytes);
    }

    /// The next complete frame as (opcode, payload), if one has arrived.
    pub fn next_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let raw = &self.raw;
        if raw.len() < 2 {
            return None;
        }
        let opcode = raw[0] & 0x0f;
        let (len, start) = match raw[1] & 0x7f {
            126 if raw.len() >= 4 => (u16::from_be_bytes([raw[2], raw[3]]) as usize, 4),
            127 if raw.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&raw[2..10]);
                (u64::from_be_bytes(n) as usize, 10)
            }
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        if raw.len() < start + len {
            return None;
        }
        let payload = raw[start..start + len].to_vec();
        self.raw.drain(..start + len);
        Some((opcode, payload))
    }
}

/// Has the process `cmd` starts get SIGTERM when this one dies, however it dies: a tool
/// stopped by `timeout` or a signal cannot stop its worker, nginx or helpers itself, and one of
/// them left running would skew every later measurement on the machine. (The kernel sends it
/// when the thread that spawned the child ends: spawn from the main thread or a runtime worker,
/// not from a blocking-pool thread, which ends when idle.)
pub fn dies_with_us(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec, and calls only prctl,
    // getppid and raise, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died before the prctl took: nobody will send the signal.
            if libc::getppid() as u32 != parent {
                libc::raise(libc::SIGTERM);
            }
            Ok(())
        })
    }
}

pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Resident memory of a process, KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time of all a process's threads, ns (`/proc/<pid>/task/*/schedstat`).
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// User and kernel CPU time of a process (all threads), ns, from `/proc/<pid>/stat` (`utime`,
/// `stime`; clock ticks, usually 10 ms each: enough over a phase of a second or more).
pub fn user_kernel_ns(pid: u32) -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0, 0);
    };
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return (0, 0);
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ns = |ticks: u64| ticks * 1_000_000_000 / hz;
    (ns(tick(11)), ns(tick(12)))
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ws_frames_round_trip_through_the_codec() {
        let mut frames = super::WsFrames::default();
        // Server frames: a short text, a 16-bit length text, a ping; fed in pieces.
        let mut bytes = vec![0x81, 5];
        bytes.extend_from_slice(b"hello");
        let long = vec![b'x'; 300];
        bytes.extend_from_slice(&[0x81, 126, 1, 44]);
        bytes.extend_from_slice(&long);
        bytes.extend_from_slice(&[0x89, 0]);
        for piece in bytes.chunks(7) {
            frames.feed(piece);
        }
        assert_eq!(frames.next_frame(), Some((1, b"hello".to_vec())));
        assert_eq!(frames.next_frame(), Some((1, long)));
        assert_eq!(frames.next_frame(), Some((9, vec![])));
        assert_eq!(frames.next_frame(), None);
        // A client frame is masked: unmasking gives the payload back.
        let frame = super::ws_client_frame(1, b"{\"type\":\"auth\"}");
        assert_eq!(frame[1], 0x80 | 15);
        let mask = &frame[2..6];
        let text: Vec<u8> = frame[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert_eq!(text, b"{\"type\":\"auth\"}");
    }

    use super::*;

    #[test]
    fn decodes_chunks_split_anywhere() {
        let mut body = Vec::new();
        for chunk in ["retry: 2000\nid: a-1\n\nid: a-2\n", "data: {\"x\":1}\n\n"] {
            body.extend(format!("{:x}\r\n{chunk}\r\n", chunk.len()).into_bytes());
        }
        for split in 0..body.len() {
            let mut d = ChunkedSse::default();
            d.feed(&body[..split]);
            let mut blocks = d.blocks();
            d.feed(&body[split..]);
            blocks.extend(d.blocks());
            assert_eq!(
                blocks,
                vec!["retry: 2000\nid: a-1", "id: a-2\ndata: {\"x\":1}"],
                "split at {split}"
            );
        }
        assert_eq!(fields("id: a-2\ndata: {}"), (Some("a-2"), Some("{}"), None));
    }
}
