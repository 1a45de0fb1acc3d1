//! The two filter trees, and the one place where errors become HTTP answers.

pub mod client_js;
pub mod internal;
pub mod sse;
pub mod ws;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::Filter;

use crate::http1::Target;
use crate::limits::{LimitHit, Permit};
use crate::server::{Routes, StreamHandler};
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
    TooManyRequests(&'static str),
    Unavailable(&'static str),
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
            ApiError::TooManyRequests(why) => (StatusCode::TOO_MANY_REQUESTS, why.to_string()),
            ApiError::Unavailable(why) => (StatusCode::SERVICE_UNAVAILABLE, why.to_string()),
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

/// The public listener: `/ws`, `/sse`, `/client.js`, `/healthz`, `/readyz`.
pub fn public(state: Arc<AppState>) -> Routes {
    health()
        .or(ready(state.clone()))
        .unify()
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

/// `/ws` and `/sse` when they are a connection's first request (nearly always: browsers open
/// a fresh connection for each), served without hyper; see [`crate::http1`]. The same routes
/// in `public` serve them on a connection hyper already serves.
pub fn streams(state: Arc<AppState>) -> StreamHandler {
    Arc::new(move |head, conn, peer| {
        let state = state.clone();
        Box::pin(async move {
            match head.target {
                Target::WebSocket => ws::take_over(state, head, conn, peer).await,
                Target::Sse => sse::take_over(state, head, conn, peer).await,
            }
        })
    })
}

/// The internal listener: `/internal/*`, `/metrics`, `/healthz`, `/readyz`.
pub fn internal(state: Arc<AppState>) -> Routes {
    health()
        .or(ready(state.clone()))
        .unify()
        .or(internal::metrics_route(state.clone()))
        .unify()
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

/// `GET /readyz`: 200 while serving; 503 once shutdown has begun (so a load balancer stops
/// sending new clients before the sockets close) and, in cluster mode, while Redis is away.
fn ready(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path("readyz")
        .and(warp::path::end())
        .and(warp::method())
        .map(move |method: Method| match method {
            Method::GET | Method::HEAD if state.shutdown.is_down() => {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
            }
            Method::GET | Method::HEAD if !state.is_ready() => {
                text(StatusCode::SERVICE_UNAVAILABLE, "redis unavailable")
            }
            Method::GET | Method::HEAD => text(StatusCode::OK, "ready"),
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

/// Takes a connection slot for the client (503 when the worker is full, 429 when this client
/// holds too many or failed to authenticate too often) and names the client.
pub fn admit(
    state: &AppState,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<(Permit, IpAddr), ApiError> {
    let ip = client_ip(headers, peer);
    if !state.auth_throttle.allows(ip) {
        state.metrics.limit_refusals.inc("auth_failures");
        return Err(ApiError::TooManyRequests(
            "too many failed authentications from this address; try again later",
        ));
    }
    let permit = state.limits.acquire(ip).map_err(|hit| {
        state.metrics.limit_refusals.inc(hit.metric_label());
        match hit {
            LimitHit::Total => ApiError::Unavailable("too many connections"),
            LimitHit::PerIp => ApiError::TooManyRequests("too many connections from this address"),
        }
    })?;
    Ok((permit, ip))
}

/// `check_origin`, counted as an auth failure when refused.
pub fn origin_of(state: &AppState, headers: &HeaderMap) -> Result<Option<HeaderValue>, ApiError> {
    check_origin(&state.config.allowed_origins, headers)
        .inspect_err(|_| state.metrics.auth_failures.inc("origin"))
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
