//! The internal API Wavelog's PHP backend calls: register, unregister, publish, status.
//!
//! Order of checks, as in the Go worker: route, then method (405 even without a secret), then
//! the secret (403), then the body (413, 400), then the registry (404). The body is not read at
//! all before the secret has been checked.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, Method};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use warp::filters::path::Tail;
use warp::reply::Response;
use warp::Filter;

use super::{json, query_pairs, query_raw, with_state, ApiError};
use crate::registry::TopicMeta;
use crate::status::Status;
use crate::AppState;

#[derive(Debug, Clone, Copy)]
enum Endpoint {
    Register,
    Unregister,
    Publish,
    Status,
}

impl Endpoint {
    fn parse(tail: &str) -> Option<(Endpoint, Method)> {
        Some(match tail {
            "register" => (Endpoint::Register, Method::POST),
            "unregister" => (Endpoint::Unregister, Method::POST),
            "publish" | "push" => (Endpoint::Publish, Method::POST),
            "status" => (Endpoint::Status, Method::GET),
            _ => return None,
        })
    }
}

pub fn route(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path("internal")
        .and(warp::path::tail())
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and(query_raw())
        .and(warp::body::stream())
        .and(with_state(state))
        .then(
            |tail: Tail, method, headers, query: String, body, state: Arc<AppState>| async move {
                handle(tail.as_str(), method, &headers, &query, body, &state)
                    .await
                    .unwrap_or_else(ApiError::into_response)
            },
        )
}

async fn handle<S, B>(
    tail: &str,
    method: Method,
    headers: &HeaderMap,
    query: &str,
    body: S,
    state: &AppState,
) -> Result<Response, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    let (endpoint, allowed) = Endpoint::parse(tail).ok_or(ApiError::NotFound("not found"))?;
    if method != allowed && !(allowed == Method::GET && method == Method::HEAD) {
        let allow = if allowed == Method::GET {
            "GET, HEAD"
        } else {
            "POST"
        };
        return Err(ApiError::MethodNotAllowed(allow));
    }
    authorize(headers, state.config.worker_secret.expose())?;
    let result = dispatch(endpoint, headers, query, body, state).await;
    if let Err(ApiError::PayloadTooLarge(_)) = &result {
        state.metrics.limit_refusals.inc("max_payload_bytes");
    }
    result
}

async fn dispatch<S, B>(
    endpoint: Endpoint,
    headers: &HeaderMap,
    query: &str,
    body: S,
    state: &AppState,
) -> Result<Response, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    match endpoint {
        Endpoint::Register => {
            let body = read_body(headers, body, state.config.max_payload_bytes).await?;
            register(&body, state).await
        }
        Endpoint::Unregister => {
            let body = read_body(headers, body, state.config.max_payload_bytes).await?;
            unregister(&body, state).await
        }
        Endpoint::Publish => {
            let result = match read_body(headers, body, state.config.max_payload_bytes).await {
                Ok(body) => publish(&body, state).await,
                Err(e) => Err(e),
            };
            state.metrics.publishes.inc(match &result {
                Ok((_, true)) => "coalesced",
                Ok(_) => "ok",
                Err(ApiError::NotFound(_)) => "not_found",
                Err(ApiError::PayloadTooLarge(_)) => "too_large",
                Err(_) => "bad_request",
            });
            result.map(|(response, _)| response)
        }
        Endpoint::Status => {
            let with_lists = query_pairs(query)
                .iter()
                .any(|(k, v)| k == "topics" && matches!(v.as_str(), "1" | "true" | "yes"));
            Ok(json(&Status::collect(state, with_lists).await))
        }
    }
}

/// `GET /metrics`: Prometheus text format, behind the same secret (Prometheus sends
/// `Authorization: Bearer`).
pub fn metrics_route(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path("metrics")
        .and(warp::path::end())
        .and(warp::method())
        .and(warp::header::headers_cloned())
        .and(with_state(state))
        .then(
            |method: Method, headers: HeaderMap, state: Arc<AppState>| async move {
                if method != Method::GET && method != Method::HEAD {
                    return ApiError::MethodNotAllowed("GET, HEAD").into_response();
                }
                if let Err(e) = authorize(&headers, state.config.worker_secret.expose()) {
                    return e.into_response();
                }
                let registered = state.topic_names().await.len();
                let mut res = Response::new(state.metrics.render(&state, registered).into());
                res.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                res
            },
        )
}

/// `X-Worker-Secret: <secret>` or `Authorization: Bearer <secret>`, compared in constant time
/// (over SHA-256 digests, so not even the secret's length leaks).
fn authorize(headers: &HeaderMap, secret: &[u8]) -> Result<(), ApiError> {
    let given = headers
        .get("x-worker-secret")
        .map(|v| v.as_bytes())
        .or_else(|| {
            headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        })
        .ok_or(ApiError::Forbidden)?;
    if secrets_match(given, secret) {
        Ok(())
    } else {
        Err(ApiError::Forbidden)
    }
}

/// Constant-time comparison of a presented secret with ours.
pub fn secrets_match(given: &[u8], secret: &[u8]) -> bool {
    let a = Sha256::digest(given);
    let b = Sha256::digest(secret);
    bool::from(a.as_slice().ct_eq(b.as_slice()))
}

/// Reads at most `limit` bytes of body; more is 413, whatever Content-Length claimed.
async fn read_body<S, B>(headers: &HeaderMap, body: S, limit: usize) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|_| ApiError::BadRequest("could not read body".into()))?;
        if buf.len() + chunk.remaining() > limit {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            buf.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(buf.freeze())
}

/// JSON is UTF-8 (RFC 8259); a body that is not is refused whole (serde_json alone would let
/// invalid bytes through inside fields it skips; found by fuzzing).
fn utf8(body: &[u8]) -> Result<&str, ApiError> {
    std::str::from_utf8(body).map_err(|_| ApiError::BadRequest("body is not UTF-8".into()))
}

fn bad_json(e: serde_json::Error) -> ApiError {
    ApiError::BadRequest(format!("invalid JSON body: {e}"))
}

fn required_topic(topic: Option<String>) -> Result<String, ApiError> {
    topic
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::BadRequest("missing topic".into()))
}

#[derive(Deserialize)]
struct RegisterBody {
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    meta: Option<MetaBody>,
}

#[derive(Deserialize, Default)]
struct MetaBody {
    #[serde(default)]
    require_token: bool,
    #[serde(default)]
    coalesce_ms: u32,
}

/// Longest coalescing window accepted.
const MAX_COALESCE_MS: u32 = 60_000;

/// A `register` body: the topic and its meta (no `meta` = an open topic).
pub fn parse_register(body: &[u8]) -> Result<(String, TopicMeta), ApiError> {
    let req: RegisterBody = serde_json::from_str(utf8(body)?).map_err(bad_json)?;
    let topic = required_topic(req.topic)?;
    let meta = req.meta.unwrap_or_default();
    if meta.coalesce_ms > MAX_COALESCE_MS {
        return Err(ApiError::BadRequest(format!(
            "meta.coalesce_ms: at most {MAX_COALESCE_MS}"
        )));
    }
    let meta = TopicMeta {
        require_token: meta.require_token,
        coalesce_ms: meta.coalesce_ms,
    };
    Ok((topic, meta))
}

async fn register(body: &[u8], state: &AppState) -> Result<Response, ApiError> {
    let (topic, meta_value) = parse_register(body)?;
    if state.register_topic(&topic, meta_value).await.is_err() {
        state.metrics.limit_refusals.inc("max_topics");
        return Err(ApiError::Unavailable("too many topics (max_topics)"));
    }
    tracing::debug!(topic = ?topic, require_token = meta_value.require_token, "topic registered");
    Ok(json(&serde_json::json!({ "status": "ok" })))
}

#[derive(Deserialize)]
struct TopicBody {
    #[serde(default)]
    topic: Option<String>,
}

/// An `unregister` body: the topic.
pub fn parse_unregister(body: &[u8]) -> Result<String, ApiError> {
    let req: TopicBody = serde_json::from_str(utf8(body)?).map_err(bad_json)?;
    required_topic(req.topic)
}

async fn unregister(body: &[u8], state: &AppState) -> Result<Response, ApiError> {
    let topic = parse_unregister(body)?;
    state.unregister_topic(&topic).await;
    tracing::debug!(topic = ?topic, "topic unregistered");
    Ok(json(&serde_json::json!({ "status": "ok" })))
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    #[serde(default)]
    topic: Option<String>,
    /// Kept as the exact JSON text that arrived; `null` is a payload, a missing key is not.
    #[serde(default, borrow, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// A `publish` body: the topic and the payload as the exact JSON text that arrived.
pub fn parse_publish(body: &[u8]) -> Result<(String, &RawValue), ApiError> {
    let req: PublishBody<'_> = serde_json::from_str(utf8(body)?).map_err(bad_json)?;
    let topic = required_topic(req.topic)?;
    let payload = req
        .payload
        .ok_or_else(|| ApiError::BadRequest("missing payload".into()))?;
    Ok((topic, payload))
}

/// Publishes; the flag says whether coalescing held the event back.
async fn publish(body: &[u8], state: &AppState) -> Result<(Response, bool), ApiError> {
    let (topic, payload) = parse_publish(body)?;
    let meta = state
        .lookup_topic(&topic)
        .await
        .ok_or(ApiError::NotFound("topic not registered"))?;
    let published = state.publish(&topic, payload.get(), meta).await;
    let coalesced = published.id.is_none();
    let response = json(&serde_json::json!({
        "status": "ok",
        "id": published.id,
        "coalesced": coalesced,
        "receivers": published.receivers,
    }));
    Ok((response, coalesced))
}
