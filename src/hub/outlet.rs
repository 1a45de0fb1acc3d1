//! One client socket as publishers see it: an ordered writer shared by the session and every
//! publish that reaches the socket.
//!
//! A publish walks its topic's outlets and hands each the frame it serialized once for all (a
//! WebSocket frame, an SSE chunk). An outlet with nothing waiting writes it at once, with one
//! non-blocking send from the publisher: no task is woken and nothing is allocated. Only when
//! the socket would block, or bytes are already waiting, is the event queued and the session's
//! task woken to write the backlog as the socket drains. The session's own frames (`auth_ok`,
//! pongs, errors, keepalives) go through the same outlet, so no frame is ever split by another
//! and a topic's events leave in the order the hub accepted them.
//!
//! A backlog of more than `capacity` events is dropped and replaced by `resync` for its topics:
//! a slow consumer costs a bounded amount of memory and is told to fetch state anew.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use bytes::{Buf, Bytes};
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::Frame;
use crate::protocol::{self, Outbound};
use crate::sync::lock;

/// Most buffers one vectored write carries.
const MAX_SLICES: usize = 32;

/// How an event looks on this socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    WebSocket,
    /// SSE events, each one chunk of a chunked HTTP/1.1 body we write ourselves.
    SseChunked,
    /// SSE events as body data for hyper, which frames and writes them.
    SseBody,
}

/// Something to write, in the socket's order.
#[derive(Debug)]
pub enum Item {
    /// An event of the subscription with this key (the session's index of the topic).
    Event(usize, Frame),
    /// The subscriber may have missed events of this topic.
    Resync(Arc<str>),
    /// Bytes of the session's own, already framed for the wire.
    Own(Bytes),
}

/// How a publish hands an event to an outlet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Sent at once when nothing waits (a small topic at light load).
    Write,
    /// Queued, the session woken to write it.
    Queue,
    /// Queued; when nothing waited before, the caller flushes the outlet later
    /// ([`Outlet::flush`]) instead of waking its session.
    Defer,
}

/// What became of an offered event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// The socket is gone.
    Refused,
    /// Written, or queued for a writer that is already coming.
    Taken,
    /// Queued, and nobody else will write it: the caller must call [`Outlet::flush`].
    ToFlush,
}

impl Offered {
    pub fn delivered(self) -> bool {
        self != Offered::Refused
    }
}

pub struct Outlet {
    wire: Wire,
    /// The socket's descriptor, when publishers may write to it themselves. A publish sends on
    /// it with one system call, touching no more of the socket than this number.
    fd: Option<RawFd>,
    capacity: usize,
    /// The session's other wake-ups (see [`Outlet::others_waker`]): next to `state`, which
    /// every wake-up of the session touches anyway, instead of one more cold line.
    others_rang: AtomicBool,
    task: AtomicWaker,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Bytes ready for the socket, in order; the first may be the rest of a frame begun.
    out: VecDeque<Bytes>,
    /// What comes after `out`, not yet encoded.
    queue: VecDeque<Item>,
    queued_events: usize,
    waker: Option<Waker>,
    /// A subscription is being set up: publishes queue behind its replay (see `release`).
    held: bool,
    broken: bool,
    /// SSE with several topics: the last id of each, joined into every `id:` line.
    cursor: Vec<String>,
    /// Keeps `fd` open until the session closes the outlet ([`Outlet::close`]), which marks
    /// it broken first: no publish writes to the descriptor after that.
    socket: Option<Arc<TcpStream>>,
}

impl State {
    fn idle(&self) -> bool {
        !self.held && self.nothing_waits()
    }

    /// Nothing is waiting to be written. (When something is, its session was woken for it
    /// and writes until nothing is left: a publish that adds to it wakes nobody.)
    fn nothing_waits(&self) -> bool {
        self.out.is_empty() && self.queue.is_empty()
    }

    /// Something is ready for the session to write.
    fn has_work(&self) -> bool {
        !self.held && !self.nothing_waits()
    }

    /// Wakes the session. The waker stays: the session's next wait finds it in place and
    /// doesn't clone another.
    fn wake(&mut self) {
        if !self.held {
            if let Some(waker) = &self.waker {
                waker.wake_by_ref();
            }
        }
    }
}

impl Outlet {
    /// `direct`: the socket itself, for a session that writes raw bytes to a `TcpStream`
    /// (publishers then write to it too); `None` when the session writes through another
    /// layer (hyper), which then takes everything from the queue.
    pub fn new(wire: Wire, direct: Option<Arc<TcpStream>>, capacity: usize) -> Arc<Outlet> {
        Arc::new(Outlet {
            wire,
            fd: direct.as_ref().map(|s| s.as_raw_fd()),
            capacity: capacity.max(1),
            others_rang: AtomicBool::new(true),
            task: AtomicWaker::new(),
            state: Mutex::new(State {
                socket: direct,
                ..State::default()
            }),
        })
    }

    pub fn wire(&self) -> Wire {
        self.wire
    }

    /// Publisher side: hands over one event, as `how` says.
    pub fn offer_event(&self, key: usize, frame: &Frame, how: Offer) -> Offered {
        let mut st = lock(&self.state);
        if st.broken {
            return Offered::Refused;
        }
        if let Some(fd) = self.fd.filter(|_| how == Offer::Write && st.idle()) {
            match self.shared_bytes(&st, frame) {
                Some(bytes) => write_now(&mut st, fd, bytes),
                None => {
                    let bytes = self.encode_event(&mut st, key, frame);
                    write_now(&mut st, fd, &bytes);
                }
            }
            return Offered::Taken;
        }
        let was_idle = st.idle();
        st.queue.push_back(Item::Event(key, frame.clone()));
        st.queued_events += 1;
        if st.queued_events > self.capacity {
            drop_backlog(&mut st);
        }
        if !was_idle {
            // Whoever made it busy writes this too: its session, woken for it, a flush to
            // come, or the release of a subscription being set up.
            return Offered::Taken;
        }
        if how == Offer::Defer && self.fd.is_some() {
            return Offered::ToFlush;
        }
        st.wake();
        Offered::Taken
    }

    /// Flusher side, for an outlet a deferred offer left waiting ([`Offered::ToFlush`]):
    /// writes what waits straight to the socket, as a publish to an idle socket does, without
    /// waking the session. A socket that would block (or broke) is left to its session, woken
    /// for it.
    pub fn flush(&self) {
        let Some(fd) = self.fd else {
            return;
        };
        let mut st = lock(&self.state);
        if st.broken || !st.has_work() {
            return;
        }
        let mut cx = Context::from_waker(Waker::noop());
        if !matches!(
            self.drain(&mut cx, &mut st, &mut Descriptor(fd)),
            Poll::Ready(Ok(()))
        ) {
            st.wake();
        }
    }

    /// Publisher side: the subscriber may have missed events of `topic`.
    pub fn offer_resync(&self, topic: &Arc<str>) {
        let mut st = lock(&self.state);
        if st.broken {
            return;
        }
        let was_empty = st.nothing_waits();
        st.queue.push_back(Item::Resync(topic.clone()));
        if was_empty {
            st.wake();
        }
    }

    /// Publishes queue (unwritten, unannounced) until `release`: a subscription taken now has
    /// its acknowledgement and replay written before any live event.
    pub fn hold(&self) {
        lock(&self.state).held = true;
    }

    /// Puts `preface` in front of whatever was published while held, and lets it all go.
    pub fn release(&self, preface: Vec<Item>) {
        let mut st = lock(&self.state);
        for item in preface.into_iter().rev() {
            if matches!(item, Item::Event(..)) {
                st.queued_events += 1;
            }
            st.queue.push_front(item);
        }
        st.held = false;
        st.wake();
    }

    /// Takes what waits (a subscription's preface, and whatever was published since) into
    /// `buf`, so that it leaves with the response head in one send instead of a send of its
    /// own. Publishes queue from here on, written by nobody until [`Outlet::release`]: the
    /// head must reach the socket first. Nothing is taken from a broken or held outlet.
    pub fn take_waiting(&self, buf: &mut Vec<u8>) {
        let mut st = lock(&self.state);
        if st.broken || st.held {
            return;
        }
        let mut cx = Context::from_waker(Waker::noop());
        // A `Vec` takes every write whole and at once.
        let _ = self.drain(&mut cx, &mut st, buf);
        st.held = true;
    }

    /// SSE with several topics: the starting id of each, in key order.
    pub fn set_cursor(&self, cursor: Vec<String>) {
        lock(&self.state).cursor = cursor;
    }

    /// `body` (a JSON text for WebSocket, an SSE event for SSE) framed for this socket.
    pub fn frame(&self, body: &[u8]) -> Bytes {
        match self.wire {
            Wire::WebSocket => protocol::ws_text_frame(body),
            Wire::SseChunked => protocol::http_chunk(&[body]),
            Wire::SseBody => Bytes::copy_from_slice(body),
        }
    }

    /// Ready when there is something for the session to write (or the socket broke).
    #[cfg(test)]
    pub fn poll_pending(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = lock(&self.state);
        if st.broken || st.has_work() {
            return Poll::Ready(());
        }
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// The waker a session gives everything but publishes: its socket's reads, its timers,
    /// shutdown. Waking it marks the wake-up as theirs, so that a wake-up only a publish
    /// caused (nearly all of them on a busy socket) writes the backlog and polls nothing else.
    /// It holds the outlet, and the socket holds it (as its read waker): the session breaks
    /// that cycle with [`Outlet::close`] ([`Link`] does on drop).
    pub fn others_waker(self: &Arc<Self>) -> Waker {
        Waker::from(self.clone())
    }

    /// Session side: polls its reads, timers and shutdown (`poll`, given a context with
    /// `others`, the outlet's [`Outlet::others_waker`]) only when one of them woke the task
    /// since they were last all polled to pending. The task is registered before the flag is
    /// read, so a wake-up in between is never lost; when `poll` yields, they are all polled
    /// again on the next turn (another may have something too, and the session then does work
    /// of its own).
    pub fn poll_others<T>(
        &self,
        cx: &Context<'_>,
        others: &Waker,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.task.register(cx.waker());
        if !self.others_rang.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let polled = poll(&mut Context::from_waker(others));
        if polled.is_ready() {
            self.others_rang.store(true, Ordering::Release);
        }
        polled
    }

    /// Session side, at its end: publishes find the outlet broken from now on, and the socket
    /// is let go.
    pub fn close(&self) {
        let socket = {
            let mut st = lock(&self.state);
            st.broken = true;
            st.socket.take()
        };
        drop(socket);
    }

    /// Session side: writes everything waiting to `io`, in order, several buffers per call.
    pub fn poll_drain<W>(&self, cx: &mut Context<'_>, io: &mut W) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let mut guard = lock(&self.state);
        self.drain(cx, &mut guard, io)
    }

    /// Session side: writes what publishes left waiting, as far as the socket takes it, under
    /// one lock. Pending once nothing waits (the task is woken when a publish queues something)
    /// or the socket is full (woken when it drains); ready only with the error that broke it.
    pub fn poll_backlog<W>(&self, cx: &mut Context<'_>, io: &mut W) -> Poll<io::Error>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if st.broken || st.has_work() {
            // Drained to the end, nothing is left to do until the next publish.
            match self.drain(cx, st, io) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(e),
                Poll::Pending => return Poll::Pending,
            }
        }
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    fn drain<W>(&self, cx: &mut Context<'_>, st: &mut State, io: &mut W) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if st.broken {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            if let Some(done) = self.write_front_events(cx, st, io) {
                match done {
                    Poll::Ready(Ok(())) => continue,
                    other => return other,
                }
            }
            while st.out.len() < MAX_SLICES && !st.held {
                let Some(item) = st.queue.pop_front() else {
                    break;
                };
                let bytes = self.encode(st, item);
                st.out.push_back(bytes);
            }
            if st.out.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let n = st.out.len().min(MAX_SLICES);
            for (slice, bytes) in slices.iter_mut().zip(st.out.iter()) {
                *slice = IoSlice::new(bytes);
            }
            match Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n]) {
                Poll::Ready(Ok(0)) => {
                    st.broken = true;
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(written)) => advance(&mut st.out, written),
                Poll::Ready(Err(e)) => {
                    st.broken = true;
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// The usual backlog, events and nothing begun: written straight from the frames' shared
    /// bytes, several per vectored write (no handle copied, nothing encoded). `None` when the
    /// front is something else.
    fn write_front_events<W>(
        &self,
        cx: &mut Context<'_>,
        st: &mut State,
        io: &mut W,
    ) -> Option<Poll<io::Result<()>>>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        if !st.out.is_empty() || st.held {
            return None;
        }
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut n = 0;
        for item in st.queue.iter().take(MAX_SLICES) {
            let Item::Event(_, frame) = item else {
                break;
            };
            let Some(bytes) = self.shared_bytes(st, frame) else {
                break;
            };
            slices[n] = IoSlice::new(bytes);
            n += 1;
        }
        if n == 0 {
            return None;
        }
        let written = match Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n]) {
            Poll::Ready(Ok(0)) => Err(io::Error::from(io::ErrorKind::WriteZero)),
            Poll::Ready(Ok(written)) => Ok(written),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => return Some(Poll::Pending),
        };
        let mut written = match written {
            Ok(written) => written,
            Err(e) => {
                st.broken = true;
                return Some(Poll::Ready(Err(e)));
            }
        };
        // Whole frames leave the queue; a frame begun continues from `out`.
        while written > 0 {
            let Some(Item::Event(_, frame)) = st.queue.pop_front() else {
                break;
            };
            st.queued_events = st.queued_events.saturating_sub(1);
            // Looked at, not cloned: every subscriber's session shares these bytes, and a
            // reference count touched from every thread would bounce between the cores.
            let Some(bytes) = self.shared_bytes(st, &frame) else {
                break;
            };
            if written < bytes.len() {
                st.out.push_back(bytes.slice(written..));
                break;
            }
            written -= bytes.len();
        }
        Some(Poll::Ready(Ok(())))
    }

    /// Session side: writes bytes of the session's own after everything waiting. They are
    /// always taken whole (what the socket doesn't take now waits in the outlet), so a frame of
    /// the session's is never split by a publish.
    pub fn poll_write_own<W>(
        &self,
        cx: &mut Context<'_>,
        io: &mut W,
        buf: &[u8],
    ) -> Poll<io::Result<usize>>
    where
        W: AsyncWrite + Unpin + ?Sized,
    {
        let mut st = lock(&self.state);
        if st.broken {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if !st.idle() {
            st.queue.push_back(Item::Own(Bytes::copy_from_slice(buf)));
            return Poll::Ready(Ok(buf.len()));
        }
        match Pin::new(io).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) if n >= buf.len() => {}
            Poll::Ready(Ok(n)) => st.out.push_back(Bytes::copy_from_slice(&buf[n..])),
            Poll::Ready(Err(e)) => {
                st.broken = true;
                return Poll::Ready(Err(e));
            }
            Poll::Pending => st.out.push_back(Bytes::copy_from_slice(buf)),
        }
        Poll::Ready(Ok(buf.len()))
    }

    /// Session side, when hyper writes: the next bytes to hand it.
    pub fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Bytes> {
        let mut st = lock(&self.state);
        if let Some(bytes) = st.out.pop_front() {
            return Poll::Ready(bytes);
        }
        if !st.held {
            if let Some(item) = st.queue.pop_front() {
                return Poll::Ready(self.encode(&mut st, item));
            }
        }
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// The bytes every subscriber of the frame's topic gets on this wire, when they are the
    /// same for all.
    fn shared_bytes<'a>(&self, st: &State, frame: &'a Frame) -> Option<&'a Bytes> {
        match self.wire {
            Wire::WebSocket => Some(&frame.ws),
            Wire::SseChunked if st.cursor.len() <= 1 => Some(&frame.sse_chunk),
            _ => None,
        }
    }

    fn encode(&self, st: &mut State, item: Item) -> Bytes {
        match item {
            Item::Own(bytes) => bytes,
            Item::Resync(topic) => {
                let resync = Outbound::Resync { topic: &topic };
                match self.wire {
                    Wire::WebSocket => self.frame(resync.to_text().as_bytes()),
                    _ => self.frame(&resync.to_sse()),
                }
            }
            Item::Event(key, frame) => {
                st.queued_events = st.queued_events.saturating_sub(1);
                self.encode_event(st, key, &frame)
            }
        }
    }

    fn encode_event(&self, st: &mut State, key: usize, frame: &Frame) -> Bytes {
        if let Some(bytes) = self.shared_bytes(st, frame) {
            return bytes.clone();
        }
        if st.cursor.len() <= 1 {
            return frame.sse_event();
        }
        // Several topics on one SSE stream: the `id:` line names the position in each.
        if let Some(slot) = st.cursor.get_mut(key) {
            *slot = frame.id().to_string();
        }
        let id = format!("id: {}\n", st.cursor.join(","));
        let data = frame.sse_data();
        match self.wire {
            Wire::SseChunked => protocol::http_chunk(&[id.as_bytes(), &data]),
            _ => Bytes::from([id.as_bytes(), &data].concat()),
        }
    }

    #[cfg(test)]
    pub fn take_item(&self) -> Option<Item> {
        let mut st = lock(&self.state);
        let item = st.queue.pop_front();
        if matches!(item, Some(Item::Event(..))) {
            st.queued_events -= 1;
        }
        item
    }
}

impl Wake for Outlet {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.others_rang.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Writes `bytes` with one non-blocking send; whatever the socket doesn't take waits in `out`
/// and the session is woken to write it. (tokio's cached readiness is left alone: a send that
/// would block here makes the session's own write find out, and wait for the socket.)
fn write_now(st: &mut State, fd: RawFd, bytes: &Bytes) {
    match Descriptor(fd).send(&[IoSlice::new(bytes)]) {
        Poll::Ready(Ok(n)) if n == bytes.len() => return,
        Poll::Ready(Ok(n)) => st.out.push_back(bytes.slice(n..)),
        Poll::Pending => st.out.push_back(bytes.clone()),
        Poll::Ready(Err(_)) => st.broken = true,
    }
    st.wake();
}

/// A socket's descriptor as a non-blocking writer, for publishes and [`Outlet::flush`]: a
/// write that would block is pending, with nothing registered (the session, woken, waits for
/// the socket).
struct Descriptor(RawFd);

impl Descriptor {
    /// One non-blocking send of `bufs`. The system call itself, not libc's `send`: that one is
    /// a thread cancellation point and pays for it on every call.
    fn send(&self, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
        // SAFETY: the descriptor is open while the outlet is not broken (the caller holds the
        // lock and checked; `close` marks it broken under that lock before letting the socket
        // go); the buffers are the caller's slices (`IoSlice` is ABI-compatible with `iovec`),
        // valid for their lengths, named by a `msghdr` that lives across the call.
        let sent = unsafe {
            if let [one] = bufs {
                libc::syscall(
                    libc::SYS_sendto,
                    self.0,
                    one.as_ptr(),
                    one.len(),
                    flags,
                    std::ptr::null::<libc::sockaddr>(),
                    0,
                )
            } else {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
                msg.msg_iovlen = bufs.len() as _;
                libc::syscall(
                    libc::SYS_sendmsg,
                    self.0,
                    &msg as *const libc::msghdr,
                    flags,
                )
            }
        };
        match usize::try_from(sent) {
            Ok(n) => Poll::Ready(Ok(n)),
            Err(_) => match io::Error::last_os_error() {
                // The session, woken, writes it (and waits for the socket if need be).
                e if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
                {
                    Poll::Pending
                }
                e => Poll::Ready(Err(e)),
            },
        }
    }
}

impl AsyncWrite for Descriptor {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.send(&[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.send(bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Asks the CPU to fetch the outlet a publish reaches next: the walk then finds it in cache
/// after the send in between, instead of waiting for memory.
#[inline]
pub fn prefetch(outlet: &Arc<Outlet>) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let at = Arc::as_ptr(outlet).cast::<i8>();
        // SAFETY: a prefetch is a hint; it reads nothing and faults on nothing.
        #[allow(unused_unsafe)]
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(at);
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64));
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(128));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = outlet;
}

/// The slow-consumer rule: the queued events go, a `resync` for each of their topics comes.
fn drop_backlog(st: &mut State) {
    let mut topics: Vec<Arc<str>> = Vec::new();
    st.queue.retain(|item| match item {
        Item::Event(_, frame) => {
            if !topics.iter().any(|t| **t == *frame.topic) {
                topics.push(frame.topic.clone());
            }
            false
        }
        _ => true,
    });
    st.queued_events = 0;
    for topic in topics {
        let owed = st
            .queue
            .iter()
            .any(|item| matches!(item, Item::Resync(t) if **t == *topic));
        if !owed {
            st.queue.push_back(Item::Resync(topic));
        }
    }
}

/// Drops `n` written bytes from the front of `out`.
fn advance(out: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let Some(front) = out.front_mut() else {
            return;
        };
        if n < front.len() {
            front.advance(n);
            return;
        }
        n -= front.len();
        out.pop_front();
    }
}

/// A session's socket with every write going through its outlet: what the session writes
/// (through tungstenite or by hand) and what publishers write stay in one order.
pub struct Link<S> {
    io: S,
    outlet: Arc<Outlet>,
}

impl<S> Link<S> {
    pub fn new(io: S, outlet: Arc<Outlet>) -> Link<S> {
        Link { io, outlet }
    }

    pub fn outlet(&self) -> &Arc<Outlet> {
        &self.outlet
    }
}

impl<S> Drop for Link<S> {
    fn drop(&mut self) {
        self.outlet.close();
    }
}

impl<S: AsyncWrite + Unpin> Link<S> {
    /// See [`Outlet::poll_backlog`].
    pub fn poll_backlog(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        self.outlet.poll_backlog(cx, &mut self.io)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Link<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Link<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        this.outlet.poll_write_own(cx, &mut this.io, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.outlet.poll_drain(cx, &mut this.io))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.outlet.poll_drain(cx, &mut this.io))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::hub::{HistoryLimits, Hub};
    use crate::metrics::Metrics;

    /// A connected pair: our end (shared, as a session has it) and the client's.
    async fn pair() -> (Arc<TcpStream>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        // Let the reactor see the socket writable, as it has by a session's first write.
        ours.writable().await.unwrap();
        (Arc::new(ours), client)
    }

    fn frames(n: usize, payload: &str) -> Vec<Frame> {
        let hub = Hub::new(
            HistoryLimits {
                size: 0,
                ttl: std::time::Duration::from_secs(1),
                max_bytes: 0,
            },
            Arc::new(Metrics::default()),
            1,
        );
        let outlet = Outlet::new(Wire::SseBody, None, n + 1);
        let _sub = hub.subscribe("t", None, &outlet, 0);
        for i in 0..n {
            hub.publish("t", &format!("{{\"i\":{i},\"pad\":\"{payload}\"}}"), None);
        }
        (0..n)
            .map(|_| match outlet.take_item() {
                Some(Item::Event(_, f)) => f,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    /// Reads WebSocket frames (server frames: unmasked) until `n` came; returns their texts.
    async fn read_texts(client: &mut TcpStream, n: usize) -> Vec<String> {
        let mut buf = Vec::new();
        let mut texts = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        while texts.len() < n {
            let got = client.read(&mut chunk).await.unwrap();
            assert!(got > 0, "closed after {} frames", texts.len());
            buf.extend_from_slice(&chunk[..got]);
            loop {
                if buf.len() < 2 {
                    break;
                }
                assert_eq!(buf[0], 0x81, "a frame starts where the last one ended");
                let (len, head) = match buf[1] {
                    126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                    127 if buf.len() >= 10 => (
                        u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => break,
                    n => (n as usize, 2),
                };
                if buf.len() < head + len {
                    break;
                }
                texts.push(String::from_utf8(buf[head..head + len].to_vec()).unwrap());
                buf.drain(..head + len);
            }
        }
        texts
    }

    #[tokio::test]
    async fn an_idle_socket_is_written_by_the_publisher_without_waking_anyone() {
        let (ours, mut client) = pair().await;
        let outlet = Outlet::new(Wire::WebSocket, Some(ours), 8);
        let frame = &frames(1, "x")[0];
        assert!(outlet.offer_event(0, frame, Offer::Write).delivered());
        let pending = poll_fn(|cx| Poll::Ready(outlet.poll_pending(cx))).await;
        assert!(
            pending.is_pending(),
            "nothing left for the session to write"
        );
        let texts = read_texts(&mut client, 1).await;
        assert_eq!(texts[0], frame.text());
    }

    #[tokio::test]
    async fn a_full_socket_queues_in_order_and_own_frames_come_after() {
        let (ours, mut client) = pair().await;
        let outlet = Outlet::new(Wire::WebSocket, Some(ours.clone()), 10_000);
        // Large frames until the socket takes no more: the rest must wait in the outlet.
        let all = frames(400, &"p".repeat(60 * 1024));
        for f in &all {
            assert!(outlet.offer_event(0, f, Offer::Write).delivered());
        }
        assert!(
            !lock(&outlet.state).out.is_empty(),
            "the socket filled up (24 MiB offered)"
        );
        let mut link = Link::new(crate::transport::conn::tests_conn(ours), outlet.clone());
        let own = protocol::ws_text_frame(b"{\"type\":\"own\"}");
        poll_fn(|cx| Pin::new(&mut link).poll_write(cx, &own))
            .await
            .unwrap();
        let reader = tokio::spawn(async move { read_texts(&mut client, 401).await });
        poll_fn(|cx| Pin::new(&mut link).poll_flush(cx))
            .await
            .unwrap();
        let texts = reader.await.unwrap();
        for (i, text) in texts[..400].iter().enumerate() {
            assert!(text.contains(&format!("\"i\":{i},")), "event {i} in place");
        }
        assert_eq!(texts[400], "{\"type\":\"own\"}");
    }

    /// A session's waker that counts its wake-ups.
    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// An outlet on a connected pair whose session waits for work: its waker (counting its
    /// wake-ups) registered as the session's turn registers it when nothing waits.
    async fn sleeping_session(
        capacity: usize,
    ) -> (Arc<TcpStream>, TcpStream, Arc<Outlet>, Arc<Wakes>) {
        let (ours, client) = pair().await;
        let outlet = Outlet::new(Wire::WebSocket, Some(ours.clone()), capacity);
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let mut conn = crate::transport::conn::tests_conn(ours.clone());
        let polled = outlet.poll_backlog(&mut Context::from_waker(&waker), &mut conn);
        assert!(polled.is_pending());
        (ours, client, outlet, wakes)
    }

    #[tokio::test]
    async fn deferred_events_are_written_by_their_flush_without_waking_the_session() {
        let (_ours, mut client, outlet, wakes) = sleeping_session(8).await;
        let all = frames(2, "x");
        assert_eq!(
            outlet.offer_event(0, &all[0], Offer::Defer),
            Offered::ToFlush
        );
        assert_eq!(
            outlet.offer_event(0, &all[1], Offer::Defer),
            Offered::Taken,
            "the flush to come writes it too"
        );
        outlet.flush();
        let texts = read_texts(&mut client, 2).await;
        assert_eq!(texts, [all[0].text(), all[1].text()]);
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            0,
            "the session slept through"
        );
        assert_eq!(
            outlet.offer_event(0, &all[0], Offer::Defer),
            Offered::ToFlush
        );
    }

    #[tokio::test]
    async fn a_flush_that_fills_the_socket_hands_the_rest_to_the_session_in_order() {
        let (ours, mut client, outlet, wakes) = sleeping_session(10_000).await;
        let all = frames(400, &"p".repeat(60 * 1024));
        assert_eq!(
            outlet.offer_event(0, &all[0], Offer::Defer),
            Offered::ToFlush
        );
        for f in &all[1..] {
            assert_eq!(outlet.offer_event(0, f, Offer::Defer), Offered::Taken);
        }
        outlet.flush();
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            1,
            "woken once, for the rest"
        );
        assert!(!lock(&outlet.state).nothing_waits(), "24 MiB did not fit");
        let reader = tokio::spawn(async move { read_texts(&mut client, 400).await });
        let mut conn = crate::transport::conn::tests_conn(ours);
        poll_fn(|cx| outlet.poll_drain(cx, &mut conn))
            .await
            .unwrap();
        let texts = reader.await.unwrap();
        for (i, text) in texts.iter().enumerate() {
            assert!(text.contains(&format!("\"i\":{i},")), "event {i} in place");
        }
    }

    #[tokio::test]
    async fn a_backlog_over_capacity_becomes_one_resync() {
        let outlet = Outlet::new(Wire::WebSocket, None, 3);
        for f in &frames(7, "x") {
            outlet.offer_event(0, f, Offer::Write).delivered();
        }
        // Dropped at the fourth, then three more fit.
        assert!(matches!(outlet.take_item(), Some(Item::Resync(t)) if &*t == "t"));
        for _ in 0..3 {
            assert!(matches!(outlet.take_item(), Some(Item::Event(..))));
        }
        assert!(outlet.take_item().is_none());
    }

    #[tokio::test]
    async fn what_is_published_while_held_follows_the_preface() {
        let (ours, mut client) = pair().await;
        let outlet = Outlet::new(Wire::WebSocket, Some(ours.clone()), 8);
        let all = frames(2, "x");
        outlet.hold();
        outlet.offer_event(0, &all[1], Offer::Write);
        release_preface(&outlet, &all[0]);
        drain_expecting_preface_then(&outlet, ours, &mut client, &all).await;
    }

    /// A subscription's preface as sessions make it: an acknowledgement, then a replayed event.
    fn release_preface(outlet: &Outlet, replayed: &Frame) {
        let ack = Item::Own(outlet.frame(ACK.as_bytes()));
        outlet.release(vec![ack, Item::Event(0, replayed.clone())]);
    }

    const ACK: &str = "{\"type\":\"auth_ok\"}";

    /// Drains the outlet to the socket; the client must read the preface (with `all[0]`
    /// replayed), then `all[1]`.
    async fn drain_expecting_preface_then(
        outlet: &Outlet,
        ours: Arc<TcpStream>,
        client: &mut TcpStream,
        all: &[Frame],
    ) {
        let mut conn = crate::transport::conn::tests_conn(ours);
        poll_fn(|cx| outlet.poll_drain(cx, &mut conn))
            .await
            .unwrap();
        let texts = read_texts(client, 3).await;
        assert_eq!(texts[0], ACK);
        assert_eq!(texts[1], all[0].text());
        assert_eq!(texts[2], all[1].text());
    }

    /// What waits when a response head goes out joins the head's buffer; a publish made while
    /// the head is on its way is not written ahead of it, and follows once released.
    #[tokio::test]
    async fn waiting_frames_leave_with_the_head_and_later_ones_after_it() {
        let (ours, mut client) = pair().await;
        let outlet = Outlet::new(Wire::WebSocket, Some(ours.clone()), 8);
        let all = frames(2, "x");
        outlet.hold();
        release_preface(&outlet, &all[0]);
        let mut head = Vec::new();
        outlet.take_waiting(&mut head);
        assert!(!head.is_empty(), "the preface was taken");
        assert!(outlet.offer_event(0, &all[1], Offer::Write).delivered());
        let mut probe = [0u8; 1];
        let early = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            client.read(&mut probe),
        )
        .await;
        assert!(
            early.is_err(),
            "nothing may reach the socket before the head"
        );
        assert_eq!(ours.try_write(&head).unwrap(), head.len());
        outlet.release(Vec::new());
        drain_expecting_preface_then(&outlet, ours, &mut client, &all).await;
    }

    /// The socket holds the session's other waker (as its read waker), and that waker holds
    /// the outlet: closing must let the socket go all the same, or it would never close.
    #[tokio::test]
    async fn a_dropped_link_lets_the_socket_go_though_its_waker_lives_on() {
        let (ours, mut client) = pair().await;
        let outlet = Outlet::new(Wire::WebSocket, Some(ours.clone()), 8);
        let waker = outlet.others_waker();
        let link = Link::new(crate::transport::conn::tests_conn(ours), outlet.clone());
        drop(link);
        let frame = &frames(1, "x")[0];
        assert!(
            !outlet.offer_event(0, frame, Offer::Write).delivered(),
            "a closed outlet takes no events"
        );
        let mut rest = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.read_to_end(&mut rest),
        )
        .await;
        assert!(matches!(read, Ok(Ok(0))), "the socket was closed: {read:?}");
        drop(waker);
    }
}
