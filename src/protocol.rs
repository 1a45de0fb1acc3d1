//! Every frame the worker sends or accepts, as a typed value, serialized in one place.
//!
//! The same JSON text travels as a WebSocket text frame and as the `data:` of an SSE event, so
//! one parser serves both transports in the browser. The wire contract is in
//! docs/protocol.md; this module is its code.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Longest topic name, in bytes. Longer names are refused (400, or a `bad_request` frame)
/// before any lookup, so a client cannot make us hash, cache or send to Redis kilobytes of
/// name.
pub const MAX_TOPIC_LEN: usize = 256;

/// Room a push frame needs beyond its payload: the frame's own JSON, the topic (escaped, up to
/// six bytes per byte of name) and the id, with margin.
pub const PUSH_FRAME_OVERHEAD: usize = 2 * 1024 + 6 * MAX_TOPIC_LEN;

/// A frame the worker sends, apart from pushes (built by [`push_text`], once per publish).
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outbound<'a> {
    /// The socket's first topic is authenticated (or its token refreshed, without a position).
    AuthOk {
        topic: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        last_event_id: Option<&'a str>,
    },
    /// A further topic is subscribed; `last_event_id` is its starting position.
    Subscribed {
        topic: &'a str,
        last_event_id: &'a str,
    },
    Unsubscribed {
        topic: &'a str,
    },
    /// The client may have missed events of `topic`: it must fetch state anew.
    Resync {
        topic: &'a str,
    },
    /// An SSE stream's starting cursor (the `position` event).
    Position {
        last_event_id: &'a str,
    },
    /// The answer to a `status` request on the status topic.
    Status {
        payload: &'a crate::status::Status,
    },
    Error {
        code: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        topic: Option<&'a str>,
        message: &'a str,
    },
}

impl Outbound<'_> {
    /// The frame's JSON text.
    pub fn to_text(&self) -> String {
        // Serializing these plain structs of strings cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string())
    }

    /// The frame as one SSE event (`data:` lines and the closing blank line).
    pub fn to_sse(&self) -> Bytes {
        sse_data(&self.to_text())
    }
}

/// `{"type":"push","topic":T,"id":I,"payload":P}` with `P` the published JSON text as is.
/// `topic_json` is the topic already serialized as a JSON string.
pub fn push_text(topic_json: &str, id: &str, payload: &str) -> String {
    let mut text = String::with_capacity(48 + topic_json.len() + id.len() + payload.len());
    text.push_str("{\"type\":\"push\",\"topic\":");
    text.push_str(topic_json);
    text.push_str(",\"id\":\"");
    text.push_str(id);
    text.push_str("\",\"payload\":");
    text.push_str(payload);
    text.push('}');
    text
}

/// A server-to-client WebSocket text frame (RFC 6455 section 5.2: final, unmasked) around
/// `text`, ready for the socket. Pushes are framed once per publish and the same bytes go to
/// every subscriber; the session's own frames use it too, so both write whole frames in order.
pub fn ws_text_frame(text: &[u8]) -> Bytes {
    let len = text.len();
    let mut out = Vec::with_capacity(len + 10);
    out.push(0x81);
    if len < 126 {
        out.push(len as u8);
    } else if len <= u16::MAX as usize {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(text);
    Bytes::from(out)
}

/// `parts` as one chunk of a `transfer-encoding: chunked` body (size line, data, CRLF).
pub fn http_chunk(parts: &[&[u8]]) -> Bytes {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(len + 20);
    out.extend_from_slice(format!("{len:x}\r\n").as_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
    out.extend_from_slice(b"\r\n");
    Bytes::from(out)
}

/// `id: <id>\n`: the id line of an SSE event.
pub fn sse_id(id: &str) -> Bytes {
    Bytes::from(format!("id: {id}\n"))
}

/// `data: <text>\n\n`. JSON can only hold raw line breaks as whitespace between tokens; each
/// line becomes its own `data:` line, which EventSource joins back with `\n`.
pub fn sse_data(text: &str) -> Bytes {
    let mut out = String::with_capacity(text.len() + 10);
    for line in text.split(['\n', '\r']).filter(|l| !l.is_empty()) {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

/// The first block of an SSE stream: the reconnect delay and the starting cursor, as a named
/// `position` event that also sets EventSource's `lastEventId`.
pub fn sse_position(retry_ms: u128, cursor: &str) -> Bytes {
    let data = Outbound::Position {
        last_event_id: cursor,
    }
    .to_text();
    Bytes::from(format!(
        "retry: {retry_ms}\nevent: position\nid: {cursor}\ndata: {data}\n\n"
    ))
}

/// The SSE comment that keeps proxies from timing an idle stream out.
pub const SSE_KEEPALIVE: &[u8] = b": keepalive\n\n";

/// A frame a client sends on a WebSocket; unknown frame types and fields are ignored.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// The first frame (authentication), or later a token refresh for `topic`.
    Auth {
        token: String,
        topic: Option<String>,
        last_event_id: Option<String>,
    },
    Subscribe {
        topic: String,
        token: String,
        last_event_id: Option<String>,
    },
    Unsubscribe {
        topic: String,
    },
    Status,
    /// Valid JSON object of a type we don't know: ignored after auth.
    Other,
}

/// The fields of an inbound object, before its type decides which of them count.
#[derive(Deserialize)]
struct Fields {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    last_event_id: Option<String>,
}

impl Inbound {
    /// Parses a client's text frame: `None` for anything that is not a JSON object with a
    /// string `type` (serde would read a struct from an array too, and Go refuses those).
    pub fn parse(text: &str) -> Option<Inbound> {
        if !text.trim_start().starts_with('{') {
            return None;
        }
        let f: Fields = serde_json::from_str(text).ok()?;
        let token = f.token.unwrap_or_default();
        Some(match f.kind.as_str() {
            "auth" => Inbound::Auth {
                token,
                topic: f.topic,
                last_event_id: f.last_event_id,
            },
            "subscribe" => Inbound::Subscribe {
                topic: f.topic.unwrap_or_default(),
                token,
                last_event_id: f.last_event_id,
            },
            "unsubscribe" => Inbound::Unsubscribe {
                topic: f.topic.unwrap_or_default(),
            },
            "status" => Inbound::Status,
            _ => Inbound::Other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_frames_must_be_objects() {
        assert_eq!(Inbound::parse(r#"["auth","t"]"#), None);
        assert_eq!(Inbound::parse(r#""auth""#), None);
        assert_eq!(Inbound::parse(r#"{"token":"t"}"#), None, "type is required");
        assert_eq!(
            Inbound::parse(r#" {"type":"auth","token":"t","x":1}"#),
            Some(Inbound::Auth {
                token: "t".into(),
                topic: None,
                last_event_id: None
            })
        );
        assert_eq!(Inbound::parse(r#"{"type":"ping"}"#), Some(Inbound::Other));
    }

    #[test]
    fn ws_frames_carry_their_length_in_the_shortest_form() {
        assert_eq!(&ws_text_frame(b"hi")[..], b"\x81\x02hi");
        let mid = ws_text_frame(&[b'a'; 300]);
        assert_eq!(&mid[..4], &[0x81, 126, 1, 44]);
        assert_eq!(mid.len(), 304);
        let big = ws_text_frame(&vec![b'a'; 70_000]);
        assert_eq!(&big[..2], &[0x81, 127]);
        assert_eq!(u64::from_be_bytes(big[2..10].try_into().unwrap()), 70_000);
    }

    #[test]
    fn chunks_are_framed_in_hex() {
        assert_eq!(&http_chunk(&[b"id: 1\n", &[b'x'; 20]])[..5], b"1a\r\ni");
        assert!(http_chunk(&[b"a"]).ends_with(b"a\r\n"));
        assert_eq!(&http_chunk(&[&[b'x'; 0x1_0000]])[..7], b"10000\r\n");
    }

    #[test]
    fn outbound_frames_are_the_documented_json() {
        let text = Outbound::Error {
            code: "unauthorized",
            topic: Some("a"),
            message: "bad",
        }
        .to_text();
        assert_eq!(
            text,
            r#"{"type":"error","code":"unauthorized","topic":"a","message":"bad"}"#
        );
        let ok = Outbound::AuthOk {
            topic: "a",
            last_event_id: None,
        }
        .to_text();
        assert_eq!(ok, r#"{"type":"auth_ok","topic":"a"}"#);
        assert_eq!(
            push_text("\"a\"", "e-1", "{\"x\":1}"),
            r#"{"type":"push","topic":"a","id":"e-1","payload":{"x":1}}"#
        );
        assert_eq!(&sse_data("{\n\"a\":1}")[..], b"data: {\ndata: \"a\":1}\n\n");
    }
}
