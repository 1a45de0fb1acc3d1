//! Admission: who may subscribe to what, decided in exactly one place.
//!
//! Both transports, on both HTTP paths (the hand-written first request and hyper), go
//! through the same steps in the same order:
//!
//! 1. the request: `Origin` (403), topics, tokens and resume ids from the URL (400 for
//!    a missing, over-long or repeated topic, or too many);
//! 2. the failed-authentication throttle (429), then a connection slot (503 in total, 429 per
//!    client);
//! 3. each topic looked up (404; Redis in cluster mode);
//! 4. each token checked against its topic (401), when the tokens are known: in the URL on
//!    `/sse`, in the first frame on `/ws` (so [`Pending`] waits for it).
//!
//! The result is one [`Admitted`] value: the slot, the client, and a grant per topic with its
//! token's expiry and the id to resume after. The sessions only write what it allows.
//! Later `subscribe` frames and token refreshes on a WebSocket use [`admit_more`] and
//! [`regrant`], the same rules for one more topic.

mod client;
mod grant;
mod limits;

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;

pub use client::{check_origin, client_ip};
pub use grant::{Denied, Grant};
pub use limits::{AuthThrottle, ConnectionLimits, LimitHit, Permit};

use crate::metrics::Transport;
use crate::protocol::MAX_TOPIC_LEN;
use crate::registry::TopicMeta;
use crate::routes::{query_pairs, ApiError};
use crate::AppState;

/// A stream request as both HTTP paths see it.
pub struct Request<'a> {
    pub transport: Transport,
    pub query: &'a str,
    pub headers: &'a HeaderMap,
    pub peer: SocketAddr,
}

/// One topic a client asks for.
#[derive(Debug)]
struct Wanted {
    topic: String,
    /// On `/sse` from the URL; on `/ws` from the first frame.
    token: String,
    resume: Option<String>,
    meta: TopicMeta,
}

/// A client that holds a slot and whose topics exist, waiting for its tokens to be checked.
pub struct Pending {
    pub client: IpAddr,
    permit: Permit,
    wanted: Vec<Wanted>,
}

/// An admitted client: what its session may serve.
pub struct Admitted {
    pub client: IpAddr,
    /// The user of the first token (0 on open topics), for presence.
    pub user_id: i64,
    pub grants: Vec<Granted>,
    /// The connection slot: dropping it frees it, so the session holds it to its end.
    pub permit: Permit,
}

/// One topic a client may subscribe to.
#[derive(Debug)]
pub struct Granted {
    pub topic: String,
    /// Unix seconds; `None` on open topics.
    pub expires: Option<i64>,
    /// The id to resume after (`None`: start now).
    pub resume: Option<String>,
}

/// Steps 1 to 3: the request, the throttle, a slot and the topics' lookup.
pub async fn admit(state: &AppState, req: Request<'_>) -> Result<Pending, ApiError> {
    check_origin(&state.config.allowed_origins, req.headers)
        .inspect_err(|_| state.metrics.auth_failures.inc("origin"))?;
    let asked = match req.transport {
        Transport::WebSocket => ws_topics(req.query)?,
        Transport::Sse => sse_topics(req.query, req.headers)?,
    };
    let limit = state.config.max_topics_per_connection;
    if asked.len() > limit {
        return Err(ApiError::BadRequest(format!(
            "at most {limit} topics per connection"
        )));
    }
    let client = client_ip(req.headers, req.peer, &state.config.trusted_proxies);
    throttled(state, client)?;
    let permit = take_slot(state, client)?;
    let mut wanted = Vec::with_capacity(asked.len());
    for (topic, token, resume) in asked {
        let Some(meta) = state.lookup_topic(&topic).await else {
            refused(state, client, &topic, Denied::NotRegistered);
            return Err(ApiError::NotFound("topic not registered"));
        };
        wanted.push(Wanted {
            topic,
            token,
            resume,
            meta,
        });
    }
    Ok(Pending {
        client,
        permit,
        wanted,
    })
}

impl Pending {
    /// Step 4 with the tokens from the URL.
    pub fn grant(self, state: &AppState) -> Result<Admitted, Denied> {
        let Pending {
            client,
            permit,
            wanted,
            ..
        } = self;
        let mut grants = Vec::with_capacity(wanted.len());
        let mut user_id = 0;
        for w in wanted {
            let grant = grant::check(state, &w.topic, w.meta, &w.token)
                .inspect_err(|&denied| refused(state, client, &w.topic, denied))?;
            if user_id == 0 {
                user_id = grant.user_id;
            }
            grants.push(Granted {
                topic: w.topic,
                expires: grant.expires,
                resume: w.resume,
            });
        }
        Ok(Admitted {
            client,
            user_id,
            grants,
            permit,
        })
    }

    /// Step 4 for a WebSocket: the URL's topic with the token (and resume id) of the first
    /// frame.
    pub fn authenticate(
        mut self,
        state: &AppState,
        token: String,
        resume: Option<String>,
    ) -> Result<Admitted, Denied> {
        if let Some(w) = self.wanted.first_mut() {
            w.token = token;
            w.resume = resume.filter(|id| !id.trim().is_empty());
        }
        self.grant(state)
    }

    /// The URL's (first) topic.
    pub fn topic(&self) -> &str {
        self.wanted.first().map_or("", |w| w.topic.as_str())
    }

    /// A first frame that is no auth frame at all: counted like a missing token.
    pub fn unauthenticated(&self, state: &AppState) {
        refused(state, self.client, self.topic(), Denied::TokenMissing);
    }
}

/// Why a further topic on an open WebSocket is refused: the `code` of its error frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadRequest(&'static str),
    AlreadySubscribed,
    TooManyTopics,
    /// The client failed too often (the same throttle as new connections).
    Throttled,
    Denied(Denied),
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Refusal::BadRequest(_) => "bad_request",
            Refusal::AlreadySubscribed => "already_subscribed",
            Refusal::TooManyTopics => "too_many_topics",
            Refusal::Throttled => "rate_limited",
            Refusal::Denied(d) => d.code(),
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refusal::BadRequest(why) => why,
            Refusal::AlreadySubscribed => "already subscribed",
            Refusal::TooManyTopics => "topic limit per connection reached",
            Refusal::Throttled => "too many failed attempts from this address; try again later",
            Refusal::Denied(d) => d.message(),
        }
    }

    /// Whether this refusal counts towards closing the socket: what guessing looks like.
    pub fn is_failure(self) -> bool {
        match self {
            Refusal::Throttled => true,
            Refusal::Denied(d) => d.is_guess() || d == Denied::NotRegistered,
            _ => false,
        }
    }
}

/// One more topic for a client that already holds `held` topics (a `subscribe` frame): the
/// same checks as the first one, in the same order.
pub async fn admit_more(
    state: &AppState,
    client: IpAddr,
    held: usize,
    holds: impl Fn(&str) -> bool,
    topic: &str,
    token: &str,
) -> Result<Granted, Refusal> {
    check_topic(topic).map_err(Refusal::BadRequest)?;
    if holds(topic) {
        return Err(Refusal::AlreadySubscribed);
    }
    if held >= state.config.max_topics_per_connection {
        return Err(Refusal::TooManyTopics);
    }
    throttled(state, client).map_err(|_| Refusal::Throttled)?;
    let Some(meta) = state.lookup_topic(topic).await else {
        refused(state, client, topic, Denied::NotRegistered);
        return Err(Refusal::Denied(Denied::NotRegistered));
    };
    let grant = grant::check(state, topic, meta, token).map_err(|denied| {
        refused(state, client, topic, denied);
        Refusal::Denied(denied)
    })?;
    Ok(Granted {
        topic: topic.to_string(),
        expires: grant.expires,
        resume: None,
    })
}

/// A fresh token for a topic the client holds (a token refresh). A topic unregistered
/// meanwhile is checked as token-protected.
pub async fn regrant(
    state: &AppState,
    client: IpAddr,
    topic: &str,
    token: &str,
) -> Result<Grant, Denied> {
    let meta = state.lookup_topic(topic).await.unwrap_or(TopicMeta {
        require_token: true,
        coalesce_ms: 0,
    });
    grant::check(state, topic, meta, token)
        .inspect_err(|&denied| refused(state, client, topic, denied))
}

/// Counts and logs a refusal: in the metrics, in the log (without the token), and in the
/// throttle that fits. A guess (a bad signature, an undecodable token) counts towards the
/// token throttle; a probe of an unregistered topic towards the more generous probe throttle.
/// A validly signed token that expired or names another topic counts nowhere: it proves the
/// client once had a real token, and is what a club's stale tabs send after a restart.
fn refused(state: &AppState, client: IpAddr, topic: &str, denied: Denied) {
    state.metrics.auth_failures.inc(denied.metric_reason());
    if denied.is_guess() {
        state.auth_throttle.failed(client);
    } else if denied == Denied::NotRegistered {
        state.probe_throttle.failed(client);
    }
    tracing::info!(topic = ?topic, client = %client, reason = denied.message(), "auth refused");
}

/// 429 while the client is throttled for guessing tokens or probing topics.
fn throttled(state: &AppState, client: IpAddr) -> Result<(), ApiError> {
    if !state.auth_throttle.allows(client) {
        state.metrics.limit_refusals.inc("auth_failures");
        return Err(ApiError::TooManyRequests(
            "too many failed authentications from this address; try again later",
        ));
    }
    if !state.probe_throttle.allows(client) {
        state.metrics.limit_refusals.inc("topic_probes");
        return Err(ApiError::TooManyRequests(
            "too many requests for unregistered topics from this address; try again later",
        ));
    }
    Ok(())
}

/// A connection slot: 503 when the worker is full, 429 when this client holds too many.
fn take_slot(state: &AppState, client: IpAddr) -> Result<Permit, ApiError> {
    state.limits.acquire(client).map_err(|hit| {
        state.metrics.limit_refusals.inc(hit.metric_label());
        match hit {
            LimitHit::Total => ApiError::Unavailable("too many connections"),
            LimitHit::PerIp => ApiError::TooManyRequests("too many connections from this address"),
        }
    })
}

/// A topic name a client may ask for: not empty, at most [`MAX_TOPIC_LEN`] bytes.
fn check_topic(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        Err("missing topic")
    } else if topic.len() > MAX_TOPIC_LEN {
        Err("topic longer than 256 bytes")
    } else {
        Ok(())
    }
}

type Asked = (String, String, Option<String>);

/// `/ws?topic=T`: the first non-empty `topic`; the token comes later, in the first frame.
fn ws_topics(query: &str) -> Result<Vec<Asked>, ApiError> {
    let topic = query_pairs(query)
        .into_iter()
        .find(|(k, v)| k == "topic" && !v.is_empty())
        .map(|(_, v)| v)
        .ok_or_else(|| ApiError::BadRequest("missing topic".into()))?;
    check_topic(&topic).map_err(|why| ApiError::BadRequest(why.into()))?;
    Ok(vec![(topic, String::new(), None)])
}

/// `/sse?topic=T&token=K[&topic=T2&token=K2...][&last_event_id=C]`, and `Last-Event-ID`.
fn sse_topics(query: &str, headers: &HeaderMap) -> Result<Vec<Asked>, ApiError> {
    let mut topics: Vec<(String, Option<String>)> = Vec::new();
    let mut query_id = None;
    for (k, v) in query_pairs(query) {
        match k.as_str() {
            "topic" => {
                check_topic(&v).map_err(|why| ApiError::BadRequest(why.into()))?;
                if topics.iter().any(|(t, _)| *t == v) {
                    return Err(ApiError::BadRequest("the same topic twice".into()));
                }
                topics.push((v, None));
            }
            "token" => match topics.iter_mut().rev().find(|(_, t)| t.is_none()) {
                Some(entry) => entry.1 = Some(v),
                None => return Err(ApiError::BadRequest("token before its topic".into())),
            },
            "last_event_id" => query_id = Some(v),
            _ => {}
        }
    }
    if topics.is_empty() {
        return Err(ApiError::BadRequest("missing topic".into()));
    }
    // The browser's own reconnect header is newer than the id in the original URL.
    let header_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let cursor = header_id.or(query_id).filter(|s| !s.trim().is_empty());
    let resume = cursor_ids(cursor.as_deref(), topics.len());
    Ok(topics
        .into_iter()
        .zip(resume)
        .map(|((topic, token), resume)| (topic, token.unwrap_or_default(), resume))
        .collect())
}

/// The per-topic ids to resume after. A cursor holds one id per topic, comma-separated in the
/// order of the URL; a single id applies to every topic; anything else resumes nothing
/// (every topic gets `resync`).
pub fn cursor_ids(cursor: Option<&str>, topics: usize) -> Vec<Option<String>> {
    let Some(cursor) = cursor else {
        return vec![None; topics];
    };
    let parts: Vec<&str> = cursor.split(',').map(str::trim).collect();
    if parts.len() == topics {
        parts.into_iter().map(|p| Some(p.to_string())).collect()
    } else if parts.len() == 1 {
        vec![Some(parts[0].to_string()); topics]
    } else {
        vec![Some(String::new()); topics]
    }
}

impl From<Denied> for ApiError {
    fn from(denied: Denied) -> ApiError {
        match denied {
            Denied::NotRegistered => ApiError::NotFound("topic not registered"),
            other => ApiError::Unauthorized(other.message()),
        }
    }
}
