//! Who the client is: its address (through trusted proxies) and its browser origin.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderValue};

use crate::cidr::Cidr;
use crate::routes::ApiError;

/// The client's IP, for logs, limits and the throttle. Only a peer in `trusted` (the
/// `trusted_proxies`: loopback by default) may say who the client is: then `X-Real-IP`, or else
/// the rightmost `X-Forwarded-For` entry that is not itself a trusted proxy (entries to its
/// left were written by the client and prove nothing). From anyone else the peer's address,
/// headers ignored. Being a parsed address, it cannot carry a log injection.
pub fn client_ip(headers: &HeaderMap, peer: SocketAddr, trusted: &[Cidr]) -> IpAddr {
    let peer_ip = peer.ip().to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(peer_ip) {
        return peer_ip;
    }
    let parse = |s: &str| s.trim().parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
    if let Some(ip) = headers
        .get("x-real-ip")
        .and_then(|v| v.to_str().ok())
        .and_then(parse)
    {
        return ip;
    }
    // Every X-Forwarded-For line, in order, as one list.
    let chain: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(parse)
        .collect();
    chain
        .iter()
        .rev()
        .find(|ip| !is_trusted(**ip))
        .or(chain.first())
        .copied()
        .unwrap_or(peer_ip)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_trusted_proxies_name_the_client() {
        let trusted = [
            Cidr::parse("127.0.0.0/8").unwrap(),
            Cidr::parse("10.0.0.0/8").unwrap(),
        ];
        let via_proxy: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let direct: SocketAddr = "198.51.100.7:5000".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let forged = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-real-ip", "203.0.113.9"),
        ]);
        assert_eq!(client_ip(&forged, direct, &trusted), ip("198.51.100.7"));
        let nginx = headers(&[
            ("x-forwarded-for", "203.0.113.9, 192.0.2.1"),
            ("x-real-ip", "192.0.2.1"),
        ]);
        assert_eq!(client_ip(&nginx, via_proxy, &trusted), ip("192.0.2.1"));
        // Without X-Real-IP: the rightmost entry that is not a proxy of ours.
        let chain = headers(&[("x-forwarded-for", "203.0.113.9, 192.0.2.1, 10.1.1.1")]);
        assert_eq!(client_ip(&chain, via_proxy, &trusted), ip("192.0.2.1"));
        let split = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "192.0.2.5"),
        ]);
        assert_eq!(client_ip(&split, via_proxy, &trusted), ip("192.0.2.5"));
        assert_eq!(
            client_ip(&HeaderMap::new(), via_proxy, &trusted),
            ip("127.0.0.1")
        );
    }
}
