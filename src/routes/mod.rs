//! The HTTP surface served through hyper: the two filter trees, and the one place where errors
//! become HTTP answers. (`/ws` and `/sse` as a connection's first request bypass these trees;
//! see [`crate::session`].)

pub mod client_js;
pub mod internal;

use std::sync::Arc;

use http::{HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::Filter;

use crate::session::{sse, ws};
use crate::transport::{PeerAddr, Routes};
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
                let h = r.headers_mut();
                h.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
                h.insert(
                    http::header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
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
        .or(ready(state.clone(), Audience::LoadBalancer))
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

/// The internal listener: `/internal/*`, `/metrics`, `/healthz`, `/readyz`.
pub fn internal(state: Arc<AppState>) -> Routes {
    health()
        .or(ready(state.clone(), Audience::Operator))
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

/// Who asks `/readyz`, and so what "ready" means.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Audience {
    /// The public port's load balancer: can this node serve browsers? Yes while it runs,
    /// Redis or not: a node cut off from Redis still delivers every local publish, and taking
    /// the whole fleet out during a Redis outage would serve nobody.
    LoadBalancer,
    /// The internal port's operator and monitoring: is this node whole, Redis included?
    Operator,
}

/// `GET /readyz`: 503 once shutdown has begun (so a load balancer stops sending new clients
/// before the sockets close); on the internal port also while Redis is away (cluster mode).
fn ready(
    state: Arc<AppState>,
    audience: Audience,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path("readyz")
        .and(warp::path::end())
        .and(warp::method())
        .map(move |method: Method| match method {
            Method::GET | Method::HEAD if state.shutdown.is_down() => {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
            }
            Method::GET | Method::HEAD if audience == Audience::Operator && !state.is_ready() => {
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

/// What a stream route (`/ws`, `/sse`) reads of its request: method, raw query, headers and
/// the peer's address.
pub fn stream_request(
    path: &'static str,
) -> impl Filter<Extract = (Method, String, http::HeaderMap, PeerAddr), Error = warp::Rejection> + Clone
{
    warp::path(path)
        .and(warp::path::end())
        .and(warp::method())
        .and(query_raw())
        .and(warp::header::headers_cloned())
        .and(warp::ext::get::<PeerAddr>())
}

/// Query parameters in order (repeated keys kept), percent- and `+`-decoded as browsers
/// encode them. Nothing is refused: invalid UTF-8 after decoding is replaced, as
/// `serde_urlencoded` (warp's query parser) does.
pub fn query_pairs(raw: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(raw.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

pub fn with_state(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Arc<AppState>,), Error = std::convert::Infallible> + Clone {
    warp::any().map(move || state.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_pairs_decode_as_browsers_encode_and_keep_every_pair() {
        let pairs = query_pairs("topic=a%2Eb&token=x+y%2B&topic=&z&=v&%FF=%C3%A9");
        let expected = [
            ("topic", "a.b"),
            ("token", "x y+"),
            ("topic", ""),
            ("z", ""),
            ("", "v"),
            ("\u{FFFD}", "é"),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(pairs, expected);
        assert!(query_pairs("").is_empty());
    }
}
