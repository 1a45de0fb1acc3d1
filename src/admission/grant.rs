//! The token rule: which token entitles a client to a topic.

use crate::registry::TopicMeta;
use crate::token::TokenError;
use crate::AppState;

/// A subscription the client is entitled to.
#[derive(Debug, Clone)]
pub struct Grant {
    /// 0 = anonymous (open topics are always anonymous).
    pub user_id: i64,
    /// Unix seconds; `None` on open topics.
    pub expires: Option<i64>,
}

/// Why a subscription is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    NotRegistered,
    /// No token at all.
    TokenMissing,
    Unauthorized(TokenError),
}

impl Denied {
    /// The `code` of the WebSocket error frame.
    pub fn code(self) -> &'static str {
        match self {
            Denied::NotRegistered => "not_found",
            Denied::TokenMissing => "auth_required",
            Denied::Unauthorized(_) => "unauthorized",
        }
    }

    /// The `reason` label of `wavelog_worker_auth_failures_total`.
    pub fn metric_reason(self) -> &'static str {
        match self {
            Denied::NotRegistered => "not_found",
            Denied::TokenMissing => "auth_required",
            Denied::Unauthorized(TokenError::Malformed) => "malformed",
            Denied::Unauthorized(TokenError::BadSignature) => "bad_signature",
            Denied::Unauthorized(TokenError::BadClaims) => "bad_claims",
            Denied::Unauthorized(TokenError::Expired) => "expired",
            Denied::Unauthorized(TokenError::WrongTopic) => "wrong_topic",
        }
    }

    /// What guessing at tokens looks like: a bad signature or a token that cannot even be
    /// decoded. (A validly signed token that expired or names another topic is not a guess.)
    pub fn is_guess(self) -> bool {
        matches!(
            self,
            Denied::Unauthorized(TokenError::BadSignature | TokenError::Malformed)
        )
    }

    pub fn message(self) -> &'static str {
        match self {
            Denied::NotRegistered => "topic not registered",
            Denied::TokenMissing => "token required",
            Denied::Unauthorized(e) => e.reason(),
        }
    }
}

/// Checks `token` for a topic already looked up. Open topics take any non-empty token.
pub fn check(state: &AppState, topic: &str, meta: TopicMeta, token: &str) -> Result<Grant, Denied> {
    if token.is_empty() {
        return Err(Denied::TokenMissing);
    }
    if !meta.require_token {
        return Ok(Grant {
            user_id: 0,
            expires: None,
        });
    }
    state
        .token_key
        .verify(token, topic, crate::time::unix_now())
        .map(|claims| Grant {
            user_id: claims.user_id,
            expires: Some(claims.expires),
        })
        .map_err(Denied::Unauthorized)
}
