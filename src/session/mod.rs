//! Sessions: the two views of one admitted stream. `ws` and `sse` only write what
//! [`crate::admission`] allowed, frames from [`crate::protocol`], events from [`crate::hub`].

pub mod sse;
pub mod ws;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Wake, Waker};

use futures_util::task::AtomicWaker;

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

/// A session's wake-ups other than publishes: its socket's reads, its timers, shutdown. They
/// are polled with this waker, which marks a wake-up as theirs, so that a wake-up only a
/// publish caused (nearly all of them on a busy socket) writes the backlog and polls nothing
/// else. (A waker of its own, not the outlet: the socket holds its read waker, and the outlet
/// holds the socket.)
pub struct Others {
    bell: Arc<Bell>,
    waker: Waker,
}

struct Bell {
    rang: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Bell {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.rang.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Others {
    pub fn new() -> Others {
        let bell = Arc::new(Bell {
            rang: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Others {
            waker: Waker::from(bell.clone()),
            bell,
        }
    }

    /// Whether one of them woke the task since they were last all polled to pending. The task
    /// is registered first, so a wake-up in between is never lost.
    pub fn woke(&self, cx: &Context<'_>) -> bool {
        self.bell.task.register(cx.waker());
        self.bell.rang.swap(false, Ordering::AcqRel)
    }

    /// The context to poll them with.
    pub fn context(&self) -> Context<'_> {
        Context::from_waker(&self.waker)
    }

    /// Not all of them were polled to pending (one had something, or the session did work of
    /// its own meanwhile): poll them all on the next turn.
    pub fn poll_again(&self) {
        self.bell.rang.store(true, Ordering::Release);
    }
}
