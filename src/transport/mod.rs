//! Transport: listeners, the accept loop, and what a connection is made of.
//!
//! A connection's first request is read by [`http1`]: a stream request (`GET /ws`, `GET /sse`)
//! goes to the sessions without hyper, anything else to hyper and the warp filter trees
//! ([`hyper`]). Both write through one [`conn::Conn`], which carries the write-stall deadline.
//! We drive hyper ourselves instead of `warp::serve` so that we control what a public port
//! needs: a header read timeout (slow clients), the listen backlog, the peer address, and
//! shutdown of upgraded WebSockets (which hyper's graceful shutdown does not track).

pub mod conn;
pub mod http1;
mod hyper;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Notify};

pub use self::hyper::PeerAddr;
use conn::Conn;
use http1::{First, Head};

/// A listener's whole filter tree, boxed so both listeners share one serving loop.
pub type Routes = warp::filters::BoxedFilter<(warp::reply::Response,)>;

/// Serves a connection whose first request opens a stream (see [`crate::http1`]): answers it,
/// and says what becomes of the connection.
pub type StreamHandler =
    Arc<dyn Fn(Head, Conn, SocketAddr) -> BoxFuture<'static, Taken> + Send + Sync>;

/// What becomes of a connection after its first request.
pub enum Taken {
    /// Answered (a refusal), and the client may send another request: for hyper.
    Hyper(Conn),
    /// Closed.
    Closed,
    /// Admitted: the stream's whole life, run on in the connection's own task (no second
    /// task to spawn per connection). Boxed, so the task stays small, and what the first
    /// request needed is freed before it starts.
    Stream(BoxFuture<'static, ()>),
}

impl From<Option<Conn>> for Taken {
    fn from(conn: Option<Conn>) -> Taken {
        conn.map_or(Taken::Closed, Taken::Hyper)
    }
}

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
    // Pushes are small and must leave at once. Linux hands this on to accepted sockets, which
    // saves a system call per connection (see `serve`).
    socket.set_nodelay(true)?;
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

/// `setsockopt` with an integer value.
#[cfg(target_os = "linux")]
fn set_int_option(
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

/// What a listener serves.
#[derive(Clone)]
pub struct Service {
    /// The warp filter tree, served through hyper.
    pub routes: Routes,
    /// Connections whose first request opens a stream (public listener only).
    pub streams: Option<StreamHandler>,
    /// How long a client has to send its request head (slow-loris clients are cut off).
    pub header_timeout: Duration,
    /// How long a write may wait for a client that takes nothing.
    pub stall: Duration,
}

/// Accepts connections on `listener` and serves them until shutdown: a connection that opens
/// a stream with its first request goes to `streams`, everything else to the routes through
/// hyper.
pub async fn serve(listener: TcpListener, service: Service, mut shutdown: Shutdown) {
    let mut accept_error_logged = false;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                accept_error_logged = false;
                if cfg!(not(target_os = "linux")) {
                    let _ = stream.set_nodelay(true);
                }
                let opening = open(stream, peer, service.clone(), shutdown.clone());
                tokio::spawn(Connection::Opening(Box::pin(opening)));
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

/// A connection's first request, and hyper after it when it was not a stream. Returns the
/// rest of the connection's life: hyper serving on, or the stream a first request opened.
async fn open(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    service: Service,
    shutdown: Shutdown,
) -> Option<BoxFuture<'static, ()>> {
    let conn = match &service.streams {
        Some(streams) => {
            match http1::read_first(stream, service.header_timeout, service.stall).await {
                First::Gone => return None,
                First::Other(conn) => conn,
                First::Stream(head, conn) => match streams(head, conn, peer).await {
                    Taken::Hyper(conn) => conn,
                    Taken::Closed => return None,
                    Taken::Stream(session) => return Some(session),
                },
            }
        }
        None => Conn::new(stream, Bytes::new(), service.stall),
    };
    let serve = hyper::serve(conn, peer, service.routes, service.header_timeout, shutdown);
    Some(Box::pin(serve))
}

/// A connection's task. Both phases are boxed, so the task is as small as tokio's tasks get
/// (it lives as long as the connection), and what opening took is freed before the rest
/// begins: a stream needs no second task.
enum Connection {
    Opening(BoxFuture<'static, Option<BoxFuture<'static, ()>>>),
    Open(BoxFuture<'static, ()>),
}

impl Future for Connection {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match &mut *self {
                Connection::Opening(opening) => {
                    match std::task::ready!(opening.as_mut().poll(cx)) {
                        Some(rest) => *self = Connection::Open(rest),
                        None => return Poll::Ready(()),
                    }
                }
                Connection::Open(rest) => return rest.as_mut().poll(cx),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection's task holds this for the connection's life; tokio rounds a task up
    /// to whole 128-byte lines, and a future over about two dozen bytes costs every socket
    /// another line (or two, as an unboxed opening did).
    #[test]
    fn a_connection_task_holds_two_boxes_at_most() {
        assert!(std::mem::size_of::<Connection>() <= 24);
    }

    #[tokio::test]
    async fn accepted_sockets_send_small_writes_at_once() {
        let listener = listen("127.0.0.1", 0).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        if cfg!(not(target_os = "linux")) {
            accepted.set_nodelay(true).unwrap();
        }
        assert!(accepted.nodelay().unwrap(), "Nagle's delay is off");
    }
}
