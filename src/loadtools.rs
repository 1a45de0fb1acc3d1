//! Helpers shared by the load tools (`fanout-bench`, `soak`): a decoder for a chunked
//! `text/event-stream` body (the worker itself never parses SSE), and process figures from
//! /proc. Not used by the worker.

/// Feed it the bytes after the response head; it yields complete event blocks.
#[derive(Default)]
pub struct ChunkedSse {
    raw: Vec<u8>,
    body: Vec<u8>,
}

impl ChunkedSse {
    pub fn feed(&mut self, bytes: &[u8]) {
        self.raw.extend_from_slice(bytes);
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
