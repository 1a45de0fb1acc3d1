//! Wavelog's callsign lookup API (`POST <wavelog>/index.php/api/lookup`), so `dxcc_id` and
//! `entity` are exactly what the user's logbook uses. Answers are cached per callsign (an hour;
//! a failed lookup for a minute, so a broken API is not hammered), in a bounded map.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::bounded::BoundedMap;
use crate::metrics::Metrics;
use crate::sync::lock;

const CACHE_TTL: Duration = Duration::from_secs(3600);
const ERROR_TTL: Duration = Duration::from_secs(60);
const CACHE_SIZE: usize = 10_000;
const TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed lookup, callsigns not in the cache are not looked up for this long: spots
/// go out without DXCC data rather than wait for an API that is down.
const BACKOFF: Duration = Duration::from_secs(30);
/// Largest answer read (the lookup answers a few hundred bytes).
const MAX_ANSWER: usize = 64 * 1024;

/// DXCC data of one callsign, as the bandmap reads it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dxcc {
    pub dxcc_id: i64,
    pub cont: String,
    pub cqz: Value,
    pub entity: String,
    pub flag: String,
    pub lat: Value,
    pub lng: Value,
    pub lotw_user: Value,
}

/// The fields of Wavelog's answer that are about the callsign (the rest is about the caller's
/// own log and is not forwarded).
#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    dxcc: Value,
    #[serde(default)]
    dxcc_id: Value,
    #[serde(default)]
    dxcc_lat: Value,
    #[serde(default)]
    dxcc_long: Value,
    #[serde(default)]
    dxcc_cqz: Value,
    #[serde(default)]
    dxcc_flag: Value,
    #[serde(default)]
    cont: Value,
    #[serde(default)]
    lotw_member: Value,
}

pub struct Lookup {
    host: String,
    port: u16,
    path: String,
    key: String,
    cache: Mutex<BoundedMap<String, (Instant, Option<Dxcc>)>>,
    /// Until when lookups are skipped after a failure.
    down_until: Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

impl Lookup {
    /// `url`: `http://host[:port]/path` (checked by the config).
    pub fn new(url: &str, key: &str, metrics: Arc<Metrics>) -> Option<Lookup> {
        let rest = url.strip_prefix("http://")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = split_authority(authority)?;
        Some(Lookup {
            host: host.to_string(),
            port,
            path: path.to_string(),
            key: key.to_string(),
            cache: Mutex::new(BoundedMap::new(CACHE_SIZE)),
            down_until: Mutex::new(None),
            metrics,
        })
    }

    /// The DXCC data of `call`; `None` when unknown to Wavelog or the lookup failed.
    pub async fn get(&self, call: &str) -> Option<Dxcc> {
        // Skimmer suffixes (`-#`, `-2`) are not part of the callsign.
        let call = call.split('-').next().unwrap_or(call).to_string();
        if let Some((at, answer)) = lock(&self.cache).get(&call) {
            let ttl = if answer.is_some() {
                CACHE_TTL
            } else {
                ERROR_TTL
            };
            if at.elapsed() < ttl {
                self.metrics.dx.lookup_hits.inc();
                return answer.clone();
            }
        }
        if lock(&self.down_until).is_some_and(|until| Instant::now() < until) {
            return None;
        }
        self.metrics.dx.lookup_misses.inc();
        let failed = |why: String| {
            self.metrics.dx.lookup_errors.inc();
            tracing::debug!(callsign = %call, "lookup failed: {why}");
            *lock(&self.down_until) = Some(Instant::now() + BACKOFF);
            None
        };
        let answer = match tokio::time::timeout(TIMEOUT, self.fetch(&call)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(why)) => failed(why),
            Err(_) => failed("timed out".into()),
        };
        lock(&self.cache).insert(call, (Instant::now(), answer.clone()));
        answer
    }

    async fn fetch(&self, call: &str) -> Result<Option<Dxcc>, String> {
        let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let body = serde_json::json!({ "key": self.key, "callsign": call }).to_string();
        let host = if self.port == 80 {
            self.host.clone()
        } else if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let req = http::Request::post(&self.path)
            .header(http::header::HOST, host)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
        if !res.status().is_success() {
            return Err(format!("answered {}", res.status()));
        }
        let bytes = Limited::new(res.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let answer: Answer = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        Ok(dxcc_of(answer))
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_authority(authority: &str) -> Option<(&str, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => 80,
            None => return None,
        };
        return Some((host, port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host, port.parse().ok()?)),
        None => Some((authority, 80)),
    }
}

/// Wavelog's answer as the bandmap's `dxcc_*` object, as DXClusterAPI maps it; `None` for a
/// callsign Wavelog cannot place.
fn dxcc_of(a: Answer) -> Option<Dxcc> {
    let id = match &a.dxcc_id {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }?;
    let entity = a.dxcc.as_str().map(str::trim).filter(|e| !e.is_empty())?;
    if id <= 0 || entity == "- NONE -" {
        return None;
    }
    let text = |v: &Value| {
        v.as_str()
            .map(crate::dxcluster::parse::clean)
            .unwrap_or_default()
    };
    let or_null = |v: Value| match v {
        Value::String(s) if s.trim().is_empty() => Value::Null,
        Value::String(s) => Value::String(crate::dxcluster::parse::clean(&s)),
        Value::Number(n) => Value::Number(n),
        _ => Value::Null,
    };
    Some(Dxcc {
        dxcc_id: id,
        cont: text(&a.cont),
        cqz: or_null(a.dxcc_cqz),
        entity: title_case(&crate::dxcluster::parse::clean(entity)),
        flag: text(&a.dxcc_flag),
        lat: or_null(a.dxcc_lat),
        lng: or_null(a.dxcc_long),
        lotw_user: match a.lotw_member {
            Value::Number(n) => Value::Number(n),
            Value::String(s) => s
                .trim()
                .parse::<i64>()
                .map_or(Value::Bool(false), Value::from),
            _ => Value::Bool(false),
        },
    })
}

/// `FEDERAL REPUBLIC OF GERMANY` -> `Federal Republic Of Germany` (as DXClusterAPI shows it).
fn title_case(s: &str) -> String {
    s.split(' ')
        .map(|w| {
            let mut chars = w.chars();
            match chars.next() {
                Some(first) => first
                    .to_uppercase()
                    .chain(chars.flat_map(char::to_lowercase))
                    .collect(),
                None => String::new(),
            }
        })
        .collect::<Vec<String>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_urls_with_ports_and_ipv6() {
        assert_eq!(
            split_authority("log.example.org"),
            Some(("log.example.org", 80))
        );
        assert_eq!(split_authority("127.0.0.1:8080"), Some(("127.0.0.1", 8080)));
        assert_eq!(split_authority("[::1]"), Some(("::1", 80)));
        assert_eq!(split_authority("[::1]:81"), Some(("::1", 81)));
        assert_eq!(split_authority("[::1]x"), None);
    }

    #[test]
    fn wavelogs_answer_becomes_the_bandmaps_object() {
        let a: Answer = serde_json::from_str(
            r#"{"callsign":"DL1XYZ","dxcc":"FEDERAL REPUBLIC OF GERMANY","dxcc_id":"230",
                "dxcc_lat":"51","dxcc_long":"10","dxcc_cqz":"14","dxcc_flag":"x","cont":"EU",
                "lotw_member":12,"name":"private","workedBefore":true}"#,
        )
        .unwrap();
        let d = dxcc_of(a).unwrap();
        assert_eq!(d.dxcc_id, 230);
        assert_eq!(d.entity, "Federal Republic Of Germany");
        assert_eq!(d.cqz, Value::from("14"));
        assert_eq!(d.lotw_user, Value::from(12));
        let unknown: Answer = serde_json::from_str(r#"{"dxcc":"- NONE -","dxcc_id":0}"#).unwrap();
        assert_eq!(dxcc_of(unknown), None);
        let old: Answer = serde_json::from_str(r#"{"dxcc":false,"dxcc_id":-1}"#).unwrap();
        assert_eq!(dxcc_of(old), None);
    }
}
