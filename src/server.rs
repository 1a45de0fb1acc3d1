//! Listeners: the accept loop, HTTP/1.1 per connection, and graceful shutdown.
//!
//! We drive hyper ourselves instead of `warp::serve` so that we control what a public port
//! needs: a header read timeout (slow clients), the listen backlog, the peer address, and
//! shutdown of upgraded WebSockets (which hyper's graceful shutdown does not track).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Notify};

use crate::http1::{Conn, First, Head, MAX_HEADERS, MAX_HEAD_BYTES};

/// A listener's whole filter tree, boxed so both listeners share one serving loop.
pub type Routes = warp::filters::BoxedFilter<(warp::reply::Response,)>;

/// The peer address of a request, put into its extensions for the routes.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// Serves a connection whose first request opens a stream (see [`crate::http1`]). Returns the
/// connection when the client may send another request (after a refusal), for hyper to serve.
pub type StreamHandler =
    Arc<dyn Fn(Head, Conn, SocketAddr) -> BoxFuture<'static, Option<Conn>> + Send + Sync>;

/// Resolves `bind` + `port` and listens. An empty bind means all interfaces (IPv6 and IPv4
/// where the host has IPv6, IPv4 only otherwise).
pub async fn listen(bind: &str, port: u16) -> std::io::Result<TcpListener> {
    let bind = bind.trim();
    if bind.is_empty() {
        return match listen_on(SocketAddr::from(([0u16; 8], port))) {
            Ok(l) => Ok(l),
            Err(_) => listen_on(SocketAddr::from(([0u8; 4], port))),
        };
    }
    let host = if bind.contains(':') && !bind.starts_with('[') {
        format!("[{bind}]:{port}")
    } else {
        format!("{bind}:{port}")
    };
    let mut last_err = None;
    for addr in tokio::net::lookup_host(host).await? {
        match listen_on(addr) {
            Ok(l) => return Ok(l),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| std::io::Error::other("address resolves to nothing")))
}

fn listen_on(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv6() {
        TcpSocket::new_v6()?
    } else {
        TcpSocket::new_v4()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // A large backlog absorbs reconnect storms (thousands of browsers after a restart).
    socket.listen(4096)
}

/// Asks the kernel to hand us a connection only once its first bytes have arrived (Linux
/// `TCP_DEFER_ACCEPT`, nginx's `deferred`): the first read then finds the request head instead
/// of an empty socket, which saves a system call and a wake-up per connection, and a client
/// that connects and sends nothing for `wait` never costs a task. Best effort: other systems
/// simply accept as usual.
pub fn defer_accept(listener: &TcpListener, wait: Duration) {
    #[cfg(target_os = "linux")]
    {
        let secs = wait.as_secs().clamp(1, 60) as libc::c_int;
        if let Err(e) = set_int_option(listener, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, secs) {
            tracing::debug!("TCP_DEFER_ACCEPT: {e}");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (listener, wait);
}

/// `setsockopt` with an integer value (the load tools use it too).
#[cfg(unix)]
pub fn set_int_option(
    socket: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: setsockopt on a socket the caller owns, with a pointer to a c_int of the given
    // size that lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `fut`'s output, or `None` if it is still pending after `limit`. It is polled once first, so
/// the usual case (a write the socket takes at once) sets up no timer: a timer per delivered
/// frame would cost more than the frame's own bookkeeping. The timer of the rare case is boxed,
/// so the tasks of idle connections don't carry room for it.
pub async fn within<F: std::future::Future>(limit: Duration, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    if let Some(out) = futures_util::FutureExt::now_or_never(fut.as_mut()) {
        return Some(out);
    }
    Box::pin(tokio::time::timeout(limit, fut)).await.ok()
}

/// Tells tasks that the worker is shutting down.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub fn new() -> (watch::Sender<bool>, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }

    /// Resolves once shutdown has begun.
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|down| *down).await;
    }

    pub fn is_down(&self) -> bool {
        *self.0.borrow()
    }

    pub fn receiver(&self) -> watch::Receiver<bool> {
        self.0.clone()
    }
}

/// Counts long-lived tasks (sockets, streams) so shutdown can wait for them.
#[derive(Default)]
pub struct Tracker {
    live: AtomicUsize,
    idle: Notify,
}

/// Held by a tracked task; dropping it marks the task finished.
pub struct Tracked(Arc<Tracker>);

impl Tracker {
    pub fn track(self: &Arc<Self>) -> Tracked {
        self.live.fetch_add(1, Ordering::AcqRel);
        Tracked(self.clone())
    }

    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Resolves when no tracked task is left.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.live() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Accepts connections on `listener` and serves them until shutdown: a connection that opens
/// a stream with its first request goes to `streams`, everything else to `filter` through
/// hyper. A client gets `header_timeout` to send its request head (slow-loris clients are cut
/// off).
pub async fn serve(
    listener: TcpListener,
    filter: Routes,
    streams: Option<StreamHandler>,
    header_timeout: Duration,
    mut shutdown: Shutdown,
) {
    let mut accept_error_logged = false;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                accept_error_logged = false;
                let _ = stream.set_nodelay(true);
                let filter = filter.clone();
                let streams = streams.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    let conn = match streams {
                        Some(streams) => {
                            let first = first_request(stream, peer, streams, header_timeout);
                            match Box::pin(first).await {
                                Some(conn) => conn,
                                None => return,
                            }
                        }
                        None => Conn::new(stream),
                    };
                    Box::pin(serve_http(conn, peer, filter, header_timeout, shutdown)).await
                });
            }
            Err(e) => {
                // Typically EMFILE: back off instead of spinning, and say it once.
                if !accept_error_logged {
                    tracing::warn!("accept failed: {e}");
                    accept_error_logged = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads the first request head and hands a stream request to `streams`. Returns the
/// connection when hyper is to serve it (or serve on).
async fn first_request(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    streams: StreamHandler,
    header_timeout: Duration,
) -> Option<Conn> {
    match crate::http1::read_first(stream, header_timeout).await {
        First::Gone => None,
        First::Other(conn) => Some(conn),
        First::Stream(head, conn) => streams(head, conn, peer).await,
    }
}

async fn serve_http(
    stream: Conn,
    peer: SocketAddr,
    filter: Routes,
    header_timeout: Duration,
    mut shutdown: Shutdown,
) {
    let warp_service = warp::service(filter);
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
        .serve_connection(TokioIo::new(stream), service)
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
