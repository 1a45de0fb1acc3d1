//! `GET /client.js`: the bundled browser client (classic-script build), so a Wavelog page can
//! use `<script src="https://worker.example/client.js?v=0.1.0">`.
//!
//! With `?v=` matching this build's version the answer is cacheable for a year (`immutable`):
//! a new release changes the URL. Without it, browsers revalidate every few minutes by ETag.

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::Filter;

use super::{query_pairs, query_raw, ApiError};

/// The classic-script build, compiled into the binary.
pub const CLIENT_JS: &str = include_str!("../../js-client/dist/wavelog-worker.js");

pub fn route() -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path("client.js")
        .and(warp::path::end())
        .and(warp::method())
        .and(query_raw())
        .and(warp::header::headers_cloned())
        .map(|method: Method, query: String, headers: HeaderMap| {
            serve(method, &query, &headers).unwrap_or_else(ApiError::into_response)
        })
}

fn etag() -> String {
    // FNV-1a over the file: stable across runs, changes with the content.
    let hash = CLIENT_JS.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("\"{}-{hash:016x}\"", crate::VERSION)
}

fn serve(method: Method, query: &str, headers: &HeaderMap) -> Result<Response, ApiError> {
    if method != Method::GET && method != Method::HEAD {
        return Err(ApiError::MethodNotAllowed("GET, HEAD"));
    }
    let versioned = query_pairs(query)
        .iter()
        .any(|(k, v)| k == "v" && v == crate::VERSION);
    let etag = etag();
    let cache = if versioned {
        "public, max-age=31536000, immutable"
    } else {
        "public, max-age=300"
    };
    let not_modified = headers
        .get(http::header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut res = if not_modified {
        let mut r = Response::default();
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        Response::new(CLIENT_JS.into())
    };
    let h = res.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/javascript; charset=utf-8"),
    );
    h.insert(http::header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(http::header::ETAG, v);
    }
    h.insert(
        http::header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    Ok(res)
}
