//! Who the client is: its address (through trusted proxies) and its browser origin.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderValue};

use crate::routes::ApiError;

/// The client's IP, for logs and per-IP limits. `X-Forwarded-For` (first entry) or `X-Real-IP`
/// count only when the peer is a proxy on this host or a private network (loopback, RFC 1918,
/// IPv6 unique-local); anyone else could forge them. Being a parsed address, it cannot carry a
/// log injection.
pub fn client_ip(headers: &HeaderMap, peer: SocketAddr) -> IpAddr {
    let peer_ip = peer.ip().to_canonical();
    if !is_proxy(peer_ip) {
        return peer_ip;
    }
    headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .or_else(|| headers.get("x-real-ip").and_then(|v| v.to_str().ok()))
        .and_then(|v| v.trim().parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .unwrap_or(peer_ip)
}

fn is_proxy(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private(),
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// The browser origin of a request, checked against `allowed_origins` (empty = any). Returns
/// the value to echo in `Access-Control-Allow-Origin` (`None` when the request has no Origin,
/// as non-browser clients and same-origin GETs may not).
pub fn check_origin(
    allowed: &[String],
    headers: &HeaderMap,
) -> Result<Option<HeaderValue>, ApiError> {
    let Some(origin) = headers.get(http::header::ORIGIN) else {
        return Ok(None);
    };
    let text = origin.to_str().map_err(|_| ApiError::Forbidden)?;
    let text = text.trim_end_matches('/');
    if allowed.is_empty() || allowed.iter().any(|a| a.eq_ignore_ascii_case(text)) {
        Ok(Some(origin.clone()))
    } else {
        Err(ApiError::Forbidden)
    }
}
