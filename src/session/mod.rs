//! Sessions: the two views of one admitted stream. `ws` and `sse` only write what
//! [`crate::admission`] allowed, frames from [`crate::protocol`], events from [`crate::hub`].

pub mod sse;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::transport::http1::Target;
use crate::transport::StreamHandler;
use crate::AppState;

/// `/ws` and `/sse` when they are a connection's first request (nearly always: browsers open
/// a fresh connection for each), served without hyper; see [`crate::transport::http1`]. The
/// routes in [`crate::routes::public`] serve them on a connection hyper already serves.
pub fn streams(state: Arc<AppState>) -> StreamHandler {
    Arc::new(move |head, conn, peer: SocketAddr| {
        let state = state.clone();
        Box::pin(async move {
            match head.target {
                Target::WebSocket => ws::take_over(state, head, conn, peer).await,
                Target::Sse => sse::take_over(state, head, conn, peer).await,
            }
        })
    })
}

/// The earliest expiry among a session's tokens, as an instant, when expiry is enforced.
pub fn expiry_deadline(
    state: &AppState,
    expiries: impl Iterator<Item = i64>,
) -> Option<tokio::time::Instant> {
    if !state.config.enforce_token_expiry {
        return None;
    }
    expiries.min().map(crate::time::instant_of_unix)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, C, D, F, Fut>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every stream's first request is served in a boxed future of this size, moved into
    /// the heap on every connect: the rare paths (refusals) are boxed on their own so that
    /// this stays small. Without that it was 5.5 KiB.
    #[test]
    fn first_request_futures_are_small() {
        let ws = future_size(ws::take_over);
        let sse = future_size(sse::take_over);
        assert!(ws <= 2048 && sse <= 2048, "ws {ws} bytes, sse {sse} bytes");
    }
}
