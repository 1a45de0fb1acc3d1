//! The two filter trees, and the one place where errors become HTTP answers.

pub mod client_js;
pub mod internal;
pub mod sse;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::Filter;

use crate::server::Routes;
use crate::AppState;

/// Every way a request can fail, mapped to its HTTP answer in `into_response`.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Unauthorized(&'static str),
    Forbidden,
    NotFound(&'static str),
    MethodNotAllowed(&'static str),
    PayloadTooLarge(usize),
    UpgradeRequired,
}

impl ApiError {
    pub fn into_response(self) -> Response {
        let (status, body) = match self {
            ApiError::BadRequest(why) => (StatusCode::BAD_REQUEST, why),
            ApiError::Unauthorized(why) => (StatusCode::UNAUTHORIZED, why.to_string()),
            ApiError::Forbidden => (StatusCode::FORBIDDEN, "forbidden".to_string()),
            ApiError::NotFound(what) => (StatusCode::NOT_FOUND, what.to_string()),
            ApiError::MethodNotAllowed(allow) => {
                let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
                r.headers_mut()
                    .insert(http::header::ALLOW, HeaderValue::from_static(allow));
                return r;
            }
            ApiError::PayloadTooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body larger than {limit} bytes"),
            ),
            ApiError::UpgradeRequired => {
                let mut r = text(StatusCode::UPGRADE_REQUIRED, "expected a WebSocket upgrade");
                r.headers_mut()
                    .insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
                return r;
            }
        };
        text(status, body)
    }
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: impl Into<String>) -> Response {
    let mut r = Response::new(body.into().into());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A JSON answer with status 200.
pub fn json(value: &impl serde::Serialize) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(body.into());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The public listener: `/ws`, `/sse`, `/client.js`, `/healthz`.
pub fn public(state: Arc<AppState>) -> Routes {
    health()
        .or(ws::route(state.clone()))
        .unify()
        .or(sse::route(state))
        .unify()
        .or(client_js::route())
        .unify()
        .recover(|_| async {
            Ok::<_, std::convert::Infallible>(ApiError::NotFound("not found").into_response())
        })
        .unify()
        .boxed()
}

/// The internal listener: `/internal/*`, `/healthz`.
pub fn internal(state: Arc<AppState>) -> Routes {
    health()
        .or(internal::route(state))
        .unify()
        .recover(|_| async {
            Ok::<_, std::convert::Infallible>(ApiError::NotFound("not found").into_response())
        })
        .unify()
        .boxed()
}

/// `GET /healthz`: the process is up (for load balancers and Docker health checks).
fn health() -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path("healthz")
        .and(warp::path::end())
        .and(warp::method())
        .map(|method: Method| match method {
            Method::GET | Method::HEAD => text(StatusCode::OK, "ok"),
            _ => ApiError::MethodNotAllowed("GET, HEAD").into_response(),
        })
}

/// The raw query string, empty when there is none. (warp's typed `query()` logs the query
/// string on failure, and ours may carry a token.)
pub fn query_raw() -> impl Filter<Extract = (String,), Error = std::convert::Infallible> + Clone {
    warp::query::raw().or(warp::any().map(String::new)).unify()
}

/// Query parameters in order (repeated keys kept).
pub fn query_pairs(raw: &str) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str(raw)
        .map_err(|_| ApiError::BadRequest("malformed query string".into()))
}

pub fn with_state(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Arc<AppState>,), Error = std::convert::Infallible> + Clone {
    warp::any().map(move || state.clone())
}

/// The client's address for logs: the first `X-Forwarded-For` entry or `X-Real-IP` when a proxy
/// set one, else the peer. Only characters that occur in addresses survive, so a forged header
/// cannot inject log lines.
pub fn client_addr(headers: &HeaderMap, peer: SocketAddr) -> String {
    let forwarded = headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .or_else(|| headers.get("x-real-ip").and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .filter(|v| !v.is_empty());
    match forwarded {
        Some(v) => v
            .chars()
            .take(64)
            .map(|c| {
                if c.is_ascii_alphanumeric() || ".:[]-_".contains(c) {
                    c
                } else {
                    '?'
                }
            })
            .collect(),
        None => peer.ip().to_canonical().to_string(),
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
