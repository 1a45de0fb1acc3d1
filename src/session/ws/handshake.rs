//! The WebSocket opening handshake (RFC 6455 section 4.2), checked the same on both HTTP
//! paths.

use base64::Engine;
use http::header::{CONNECTION, HOST, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use warp::reply::Response;

use crate::protocol::PUSH_FRAME_OVERHEAD;
use crate::routes::ApiError;
use crate::transport::http1::{self, has_token};

/// Largest inbound frame; anything bigger closes the socket (1009).
pub const MAX_INBOUND: usize = 4 * 1024;
/// What the write buffer holds before it is flushed to the socket.
const WRITE_BUFFER: usize = 8 * 1024;

/// Whether the request asks for a WebSocket at all (a refused one then closes the
/// connection: the client may already have sent frames after it).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    has(headers, &UPGRADE, "websocket")
}

/// The `Sec-WebSocket-Accept` value for a well-formed upgrade request: 426 when it is not an
/// upgrade or asks for another version (naming ours), 400 without `Host` or for a key that is
/// not base64 of 16 bytes.
pub fn accept_key(headers: &HeaderMap) -> Result<HeaderValue, ApiError> {
    if !headers.contains_key(HOST) {
        return Err(ApiError::BadRequest("missing Host header".into()));
    }
    if !has(headers, &CONNECTION, "upgrade") || !is_upgrade(headers) {
        return Err(ApiError::UpgradeRequired);
    }
    if !has(headers, &SEC_WEBSOCKET_VERSION, "13") {
        return Err(ApiError::UpgradeRequired);
    }
    let key = headers
        .get(SEC_WEBSOCKET_KEY)
        .map(|v| v.as_bytes().trim_ascii())
        .filter(|k| is_key(k))
        .ok_or_else(|| {
            ApiError::BadRequest("Sec-WebSocket-Key must be base64 of 16 bytes".into())
        })?;
    HeaderValue::from_str(&derive_accept_key(key))
        .map_err(|_| ApiError::BadRequest("bad Sec-WebSocket-Key".into()))
}

/// Whether `key` is base64 of exactly 16 bytes (24 characters; decoded on the stack).
fn is_key(key: &[u8]) -> bool {
    let mut raw = [0u8; 18];
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode_slice(key, &mut raw)
            .is_ok_and(|n| n == 16)
}

/// Static names: a `&str` name would be parsed into a `HeaderName` on every lookup.
fn has(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| has_token(v, token))
}

/// The `101 Switching Protocols` answer.
pub fn switching(accept_key: HeaderValue) -> Response {
    let mut res = Response::default();
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(http::header::SEC_WEBSOCKET_ACCEPT, accept_key);
    res
}

/// The same `101` as [`switching`], written straight into bytes for the hand-written path
/// (no response value, no header map: this is every WebSocket's connect).
pub fn switching_head(accept_key: &HeaderValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-accept: ",
    );
    out.extend_from_slice(accept_key.as_bytes());
    out.extend_from_slice(b"\r\ndate: ");
    http1::put_date(&mut out);
    out.extend_from_slice(b"\r\n\r\n");
    out
}

/// Small buffers (most sockets idle for hours and we hold thousands), but room for the largest
/// frame a publish can make: `max_payload_bytes` plus the push frame around it, with a full
/// write buffer already queued.
pub fn socket_config(max_payload_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(512)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + max_payload_bytes + PUSH_FRAME_OVERHEAD)
        .max_message_size(Some(MAX_INBOUND))
        .max_frame_size(Some(MAX_INBOUND))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade(key: &str, version: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("x"));
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert(
            "sec-websocket-version",
            HeaderValue::from_str(version).unwrap(),
        );
        h.insert("sec-websocket-key", HeaderValue::from_str(key).unwrap());
        h
    }

    #[test]
    fn the_rfc_example_key_is_accepted() {
        let accept = accept_key(&upgrade("dGhlIHNhbXBsZSBub25jZQ==", "13")).unwrap();
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn keys_with_spaces_around_and_tokens_in_any_case_are_accepted() {
        let mut h = upgrade(" dGhlIHNhbXBsZSBub25jZQ== ", "13");
        h.insert(
            "connection",
            HeaderValue::from_static("Keep-Alive ,UPGRADE"),
        );
        h.insert("upgrade", HeaderValue::from_static("WebSocket"));
        assert_eq!(accept_key(&h).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, upgrades"),
        );
        assert!(matches!(accept_key(&h), Err(ApiError::UpgradeRequired)));
    }

    #[test]
    fn the_written_101_is_the_101_hyper_would_get() {
        let key = HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let without_date = |head: Vec<u8>| {
            let text = String::from_utf8(head).unwrap();
            let lines: Vec<String> = text
                .split("\r\n")
                .filter(|l| !l.starts_with("date: "))
                .map(str::to_string)
                .collect();
            assert_eq!(lines.len() + 1, text.split("\r\n").count(), "one date line");
            lines
        };
        let framed = http1::head_bytes(&switching(key.clone()), http1::Framing::Empty, true);
        assert_eq!(without_date(switching_head(&key)), without_date(framed));
    }

    #[test]
    fn bad_keys_and_versions_are_refused() {
        // Empty, short, 17 bytes, 16 bytes without padding, 16 bytes with a bad character.
        let bad = [
            "",
            "abc",
            "dGhlIHNhbXBsZSBub25jZSE=",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZQ=!",
        ];
        for key in bad {
            assert!(matches!(
                accept_key(&upgrade(key, "13")),
                Err(ApiError::BadRequest(_))
            ));
        }
        assert!(matches!(
            accept_key(&upgrade("dGhlIHNhbXBsZSBub25jZQ==", "8")),
            Err(ApiError::UpgradeRequired)
        ));
    }
}
