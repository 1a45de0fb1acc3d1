//! Glue to hyper: everything that is not a connection's first stream request is served by
//! hyper's HTTP/1 and the warp filter trees.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

use super::conn::Conn;
use super::http1::{MAX_HEADERS, MAX_HEAD_BYTES};
use super::{Routes, Shutdown};

/// The peer address of a request, put into its extensions for the routes.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// Serves one connection with hyper until it ends, or gracefully ends it on shutdown.
pub async fn serve(
    conn: Conn,
    peer: SocketAddr,
    routes: Routes,
    header_timeout: Duration,
    mut shutdown: Shutdown,
) {
    let warp_service = warp::service(routes);
    let service = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(PeerAddr(peer));
        let mut svc = warp_service.clone();
        tower_service::Service::call(&mut svc, req)
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .serve_connection(TokioIo::new(conn), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!("connection from {peer}: {e}");
            }
        }
        _ = shutdown.wait() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
