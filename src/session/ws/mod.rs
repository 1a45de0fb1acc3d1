//! `GET /ws?topic=T`: the WebSocket view of the stream, wire-compatible with the Go worker.
//!
//! The request goes through [`crate::admission`] and the handshake check on both HTTP paths;
//! the session then runs in the connection's task. After the first auth, `subscribe`/`unsubscribe`
//! frames add and remove more topics.

mod end;
mod handshake;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use warp::reply::Response;
use warp::Filter;

use crate::admission::{self, Pending, Request};
use crate::hub::{Link, Outlet, Wire};
use crate::metrics::Transport;
use crate::routes::{stream_request, with_state, ApiError};
use crate::transport::http1::{self, Conn, Head};
use crate::transport::{PeerAddr, Taken};
use crate::AppState;
use session::Session;

pub fn route(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    stream_request("ws")
        .and(warp::ext::optional::<OnUpgrade>())
        .and(with_state(state))
        .then(
            |method, query: String, headers, peer: PeerAddr, upgrade, state| async move {
                upgrade_in_hyper(method, &query, &headers, peer, upgrade, state)
                    .await
                    .unwrap_or_else(ApiError::into_response)
            },
        )
}

/// An upgrade request on a connection hyper serves: the socket arrives through hyper's
/// upgrade hand-over, in a task of its own.
async fn upgrade_in_hyper(
    method: Method,
    query: &str,
    headers: &HeaderMap,
    peer: PeerAddr,
    upgrade: Option<OnUpgrade>,
    state: Arc<AppState>,
) -> Result<Response, ApiError> {
    let accepted = accept(method, query, headers, peer.0, &state).await?;
    let upgrade = upgrade.ok_or(ApiError::UpgradeRequired)?;
    let res = handshake::switching(accepted.key.clone());
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => accepted.run(TokioIo::new(upgraded), None, state).await,
            Err(e) => tracing::debug!("websocket upgrade failed: {e}"),
        }
    });
    Ok(res)
}

/// An upgrade request as a connection's first request: answered here, without hyper (see
/// [`crate::transport::http1`]); the session then runs on in the connection's task.
pub async fn take_over(
    state: Arc<AppState>,
    head: Head,
    mut conn: Conn,
    peer: SocketAddr,
) -> Taken {
    let accepted = match accept(Method::GET, &head.query, &head.headers, peer, &state).await {
        Ok(accepted) => accepted,
        Err(e) => {
            // After a refused upgrade the client may already be sending frames: close.
            let keep_alive = head.keep_alive && !handshake::is_upgrade(&head.headers);
            // Boxed, as in `sse::take_over`: the refusal's state is kilobytes.
            return Box::pin(http1::answer(conn, e.into_response(), keep_alive))
                .await
                .into();
        }
    };
    let bytes = handshake::switching_head(&accepted.key);
    drop(head);
    if conn.write_all(&bytes).await.is_err() {
        return Taken::Closed;
    }
    let socket = conn.socket();
    Taken::Stream(Box::pin(accepted.run(conn, Some(socket), state)))
}

/// An upgrade request that admission and the handshake check let through.
struct Accepted {
    pending: Pending,
    key: HeaderValue,
}

/// Admission first (405, 400, 403, 429/503, 404), then the handshake itself (426, 400).
async fn accept(
    method: Method,
    query: &str,
    headers: &HeaderMap,
    peer: SocketAddr,
    state: &AppState,
) -> Result<Accepted, ApiError> {
    if method != Method::GET {
        return Err(ApiError::MethodNotAllowed("GET"));
    }
    let request = Request {
        transport: Transport::WebSocket,
        query,
        headers,
        peer,
    };
    let pending = admission::admit(state, request).await?;
    let key = handshake::accept_key(headers)?;
    Ok(Accepted { pending, key })
}

impl Accepted {
    /// The socket's whole life after the `101`. With `direct` (the socket under `io`),
    /// publishers write events to it themselves.
    async fn run<S>(self, io: S, direct: Option<Arc<TcpStream>>, state: Arc<AppState>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let config = handshake::socket_config(state.config.max_payload_bytes);
        let outlet = Outlet::new(Wire::WebSocket, direct, state.config.subscriber_queue);
        let io = Link::new(io, outlet);
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        Session::run(ws, state, self.pending).await;
    }
}
