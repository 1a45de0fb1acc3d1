//! A small decoder for a chunked `text/event-stream` response body, as the load tools read it
//! (`fanout-bench`, `soak`). The worker itself never parses SSE.

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
        loop {
            let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                break;
            };
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
