//! A client connection as the sessions see it: the socket, the bytes already read from it put
//! back in front, and a write-stall deadline.
//!
//! The socket is shared (`Arc`): a stream session's [`crate::hub::Outlet`] lets publishers write
//! to it directly, in order with the session's own writes.
//!
//! The deadline lives here, in the writer every path shares (the hand-written stream path,
//! hyper's path and the upgraded WebSocket), so a client that stops reading is dropped after
//! `stall` whichever code writes to it. A timer exists only while a write waits: the usual
//! write, which the socket takes at once, costs no timer at all.

use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// How long after its deadline an armed timer still counts as the same wait.
const STALE_GRACE: Duration = Duration::from_secs(1);

pub struct Conn {
    prefix: Bytes,
    io: Arc<TcpStream>,
    stall: Duration,
    /// Boxed and made on the first write that waits, so idle connections don't carry it.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether `timer` is counting for the write that waits now.
    armed: bool,
}

/// The error a write fails with once its client took nothing for the stall limit.
pub fn is_stall(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::TimedOut
}

impl Conn {
    /// `stall`: how long a write may wait for the client to take bytes.
    pub fn new(io: TcpStream, prefix: Bytes, stall: Duration) -> Conn {
        Conn {
            prefix,
            io: Arc::new(io),
            stall,
            timer: None,
            armed: false,
        }
    }

    /// The socket, for a writer that shares it (see [`crate::hub::Outlet`]).
    pub fn socket(&self) -> Arc<TcpStream> {
        self.io.clone()
    }

    /// Ends our side of the connection and reads (and drops) what the client still sends, for
    /// up to `linger`, so that closing does not reset the connection while the client's data
    /// is unread: a reset can destroy an answer the client has not read yet.
    pub async fn close_gracefully(mut self, linger: Duration) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if self.shutdown().await.is_err() {
            return;
        }
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(linger, async {
            while let Ok(n) = self.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }

    /// Passes a write's progress through, and fails a write that has waited `stall`.
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.armed = false;
            return r;
        }
        let now = Instant::now();
        let deadline = now + self.stall;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        // A wait that was given up (its write future dropped, e.g. a pong inside a cancelled
        // read) left the timer armed; a wait really going on is polled when its timer fires,
        // so a deadline long past means a new wait.
        let stale = self.armed && now > timer.deadline() + STALE_GRACE;
        if !self.armed || stale {
            timer.as_mut().reset(deadline);
            self.armed = true;
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client took nothing within the stall limit",
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            loop {
                ready!(self.io.poll_read_ready(cx))?;
                let unfilled = buf.initialize_unfilled();
                match read_draining(&self.io, unfilled) {
                    Ok(n) => {
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        if self.prefix.is_empty() {
            // Let the head's buffer go now rather than with the connection.
            self.prefix = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = retry(cx, &self.io, |io| io.try_write(buf));
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = retry(cx, &self.io, |io| io.try_write_vectored(bufs));
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // SAFETY: the descriptor is open for as long as `self.io` lives.
        let r = unsafe { libc::shutdown(self.io.as_raw_fd(), libc::SHUT_WR) };
        if r == 0 {
            return Poll::Ready(Ok(()));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOTCONN) => Poll::Ready(Ok(())),
            _ => Poll::Ready(Err(e)),
        }
    }
}

/// One non-blocking read. A read that leaves the buffer short has emptied the socket, so its
/// readiness is cleared with it, as tokio's own `poll_read` does for a socket it owns alone:
/// the next read then waits for new data instead of asking the kernel once more only to hear
/// `WouldBlock` (a system call per inbound frame). Clearing inside `try_io` is what keeps it
/// safe: tokio clears only if no new readiness arrived since before this read.
fn read_draining(io: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut read = 0;
    let r = io.try_io(Interest::READABLE, || {
        read = io.try_read(buf)?;
        if read > 0 && read < buf.len() {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && read > 0 => Ok(read),
        r => r.map(|()| read),
    }
}

/// A non-blocking write on a shared socket, waiting for writability when it would block.
fn retry<T>(
    cx: &mut Context<'_>,
    io: &TcpStream,
    mut write: impl FnMut(&TcpStream) -> io::Result<T>,
) -> Poll<io::Result<T>> {
    // The write first: it finds the socket writable nearly always, and a readiness wait
    // registered up front would be work for nothing.
    loop {
        match write(io) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(io.poll_write_ready(cx))?,
            r => return Poll::Ready(r),
        }
    }
}

/// A `Conn` over a socket another test helper already shares.
#[cfg(test)]
pub fn tests_conn(io: Arc<TcpStream>) -> Conn {
    Conn {
        prefix: Bytes::new(),
        io,
        stall: Duration::from_secs(10),
        timer: None,
        armed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A short read clears the socket's readiness; data that comes later must still wake the
    /// reader, however it is spread over writes.
    #[tokio::test]
    async fn reads_after_a_short_read_still_see_new_data() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut conn = Conn::new(server, Bytes::new(), Duration::from_secs(10));
        let mut buf = [0u8; 64];
        for round in 0..200u32 {
            let sent = round.to_be_bytes();
            client.write_all(&sent).await.unwrap();
            let mut got = Vec::new();
            while got.len() < sent.len() {
                let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
                    .await
                    .expect("data written after a short read arrives")
                    .unwrap();
                assert!(n > 0, "not closed");
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, sent);
        }
        drop(client);
        assert_eq!(conn.read(&mut buf).await.unwrap(), 0, "then the end");
    }
}
