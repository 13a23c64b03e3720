//! The transmission phase of one connection.
//!
//! The connection's task is the **reader**. It reads requests through a buffer, so one
//! `read` syscall takes in as many pipelined headers as the client has sent. A write's
//! payload goes straight into an [`IoBuf`] from the device's pool (pinned memory for the
//! GPU backend): whatever already sits in the read buffer is copied, the rest is read from
//! the socket directly into the `IoBuf`.
//!
//! A read of host memory is answered from the chunks in place ([`View`]): the reply's
//! `writev` points at device memory, so the only copy is the kernel's. Other devices (GPU)
//! read into an [`IoBuf`] first.
//!
//! Each request's operation is a future polled once, inline: the host backend completes
//! there and then, with no task spawn and no cross-thread wakeup. Only an operation that has
//! to wait (a GPU copy) is spawned as its own task, so slow requests never hold up the ones
//! behind them and replies go out as they complete, in any order.
//!
//! Replies of operations that completed inline collect in the reader's batch. Before the
//! reader would wait for the socket (or any other resource), it writes the whole batch with
//! one non-blocking vectored write: for pipelined small requests that is one `read` and one
//! `writev` per batch, whatever the queue depth, and no other thread is involved. Whatever
//! the socket does not take at once, and the replies of spawned operations, go to the
//! **writer** task, which waits for the socket to drain. One holder of the socket at a time
//! (the `busy` flag of [`Outbox`]) keeps the byte stream in order.
//!
//! Backpressure: every request holds permits of a per-connection semaphore sized by
//! [`Limits::inflight_bytes`] (the I/O buffer its data takes plus a fixed overhead) until
//! its reply is written, and as many of its client's semaphore, which all connections from
//! one source share ([`Limits::client_inflight_bytes`]); when either budget is spent the
//! reader stops reading, and TCP pushes back on the client. Buffers come from the devices'
//! bounded pool (`--buffer-memory`), which caps memory daemon-wide; the client budget keeps
//! one client, however many connections it opens, from taking all of it.

use super::handshake::{BlockSizes, Negotiated};
use super::proto::{self, Frame, Framing, NbdError, Request, StatusDescriptor};
use super::server::{Export, Limits};
use crate::engine::{
    BlockDevice, BufferPool, Capabilities, Extent, IoBuf, IoError, View, ZeroFlags,
};
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv};
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, trace, warn};

/// The read half of a connection: what the reader reads requests from.
pub(crate) trait Source: AsyncRead + Unpin + Send + Sync + 'static {
    /// Whether the poller steps aside while the client sends ahead, on a machine with few
    /// CPUs (see [`Poller`]).
    const STEPS_ASIDE: bool = false;
    /// The socket, for polling it without the reactor (see [`Poller`]).
    fn fd(&self) -> BorrowedFd<'_>;
}

impl Source for tokio::net::tcp::OwnedReadHalf {
    const STEPS_ASIDE: bool = true;
    fn fd(&self) -> BorrowedFd<'_> {
        AsRef::<tokio::net::TcpStream>::as_ref(self).as_fd()
    }
}

impl Source for tokio::net::unix::OwnedReadHalf {
    fn fd(&self) -> BorrowedFd<'_> {
        AsRef::<tokio::net::UnixStream>::as_ref(self).as_fd()
    }
}

/// Busy polling: the reader waits for a client's next request by polling the socket for
/// up to `budget` before it sleeps in the reactor.
///
/// A sleeping reader hands its CPU back, and the client's next request has to wake it.
/// When that CPU has nothing else to run it goes idle, and waking an idle CPU is the
/// slowest part of a small request: on a VM whose idle vCPUs halt at once (no guest halt
/// polling, as on the development machine) it costs about 35 µs, against a few µs to serve
/// a 4 KiB request from RAM. A client at queue depth 1 answers within a few µs of its
/// reply, so a short poll catches its next request with no wakeup at all. This is what
/// the kernel's `busy_poll` and a guest's halt polling do; it is done here because neither
/// reaches a loopback or Unix socket, and neither is on by default.
///
/// The poll is only worth its CPU while the client keeps the connection busy, so it runs
/// only after a short wait (`warm`): an idle client costs one budget at the end of a burst,
/// then nothing. It never runs while this connection has operations waiting elsewhere (a
/// GPU copy: their completions need this thread), and only on a server connection thread
/// that serves this connection alone (polling would hold the others up).
///
/// Over TCP, nor does it run while the client sends ahead of the replies (queue depth above
/// one): a poll then finds the next request already there, at its first try, and hands it
/// over at once, one request per read and one reply per write, and each TCP read and write
/// on loopback is costly. A wait in the reactor lets a few requests gather, which the
/// server then reads, and answers, with one system call each. So over TCP a poll that finds
/// a request at once turns polling off for the next `AHEAD_WAITS` waits, after which one
/// poll looks again; at queue depth one a first try never finds the next request. Measured
/// on the development machine (2 vCPUs, both sides short of CPU), 4 KiB I/O, one
/// connection: TCP randwrite at queue depth 16 and 64 from 188k and 182k IOPS to 201k and
/// 198k, randread from 180k and 174k to 192k and 183k, queue depth one unchanged. Over a
/// Unix socket, reads and writes are cheap and the reactor's wakeups are not: randwrite
/// at queue depth 16 fell from 217k to 195k, so Unix sockets keep polling. The gain needs
/// client and server short of CPU: on the H100 machine (16 CPUs, qemu-img bench), 4 KiB
/// writes at queue depth 32 over TCP went the other way (81k and 89k IOPS without, 73k and
/// 75k with), so only a machine of at most `FEW_CPUS` CPUs steps aside.
pub(crate) struct Poller {
    budget: Duration,
    /// Whether polling stops while the client sends ahead (TCP).
    steps_aside: bool,
    /// The previous wait was short: the client is in a tight request loop.
    warm: bool,
    /// Waits left to go through the reactor, since a poll found the client ahead.
    ahead: u32,
}

/// Waits through the reactor after a poll found the client's next request already there.
const AHEAD_WAITS: u32 = 32;

/// Most CPUs of a machine on which a TCP connection's poller steps aside (see [`Poller`]).
const FEW_CPUS: usize = 4;

/// Whether this machine has at most [`FEW_CPUS`] CPUs to run on.
fn few_cpus() -> bool {
    static FEW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FEW.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() <= FEW_CPUS))
}

impl Poller {
    fn new(budget: Duration, steps_aside: bool) -> Self {
        Poller {
            budget,
            steps_aside,
            warm: true,
            ahead: 0,
        }
    }

    /// Polls `fd` into `buf` for up to the budget. `None`: nothing came (or polling is
    /// off, or the client is sending ahead), wait in the reactor. `next_request`: the wait
    /// is for the client's next request, not for the rest of one it is sending (which a
    /// client may send in two writes, header and payload, at any queue depth).
    fn poll(
        &mut self,
        fd: BorrowedFd<'_>,
        buf: &mut [u8],
        next_request: bool,
    ) -> Option<io::Result<usize>> {
        if !self.warm {
            return None;
        }
        if !next_request {
            return self.poll_now(fd, buf);
        }
        if self.ahead > 0 {
            self.ahead -= 1;
            return None;
        }
        let (r, first_try) = self.poll_for(fd, buf)?;
        if first_try && self.steps_aside {
            self.ahead = AHEAD_WAITS;
        }
        Some(r)
    }

    /// Like [`Poller::poll`], whether or not the client was quick last time: for the rest
    /// of a payload the client is already sending.
    fn poll_now(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> Option<io::Result<usize>> {
        self.poll_for(fd, buf).map(|(r, _)| r)
    }

    /// The poll itself; with the result, whether the first try found bytes.
    fn poll_for(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> Option<(io::Result<usize>, bool)> {
        if self.budget.is_zero() {
            return None;
        }
        let start = Instant::now();
        let mut first_try = true;
        loop {
            // The reactor is not asked: its readiness flag only changes when this thread
            // goes back to it, which is what polling avoids. Edge-triggered epoll copes
            // with bytes taken behind its back: it sees a spurious wakeup, at worst.
            match recv(fd.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => return Some((Ok(n), first_try)),
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                Err(e) => return Some((Err(e.into()), first_try)),
            }
            first_try = false;
            if start.elapsed() >= self.budget {
                return None;
            }
            // If the client runs on this CPU, let it.
            std::thread::yield_now();
        }
    }
}

thread_local! {
    /// On a server connection thread (`server::Workers`), the count of connections it
    /// serves; elsewhere (tests, the kernel nbd attach) none, and nothing polls.
    static THREAD_LOAD: std::cell::OnceCell<Arc<AtomicUsize>> = const { std::cell::OnceCell::new() };
}

/// Makes `load` the connection count of this thread, which serves connections from start to
/// end on a single-threaded runtime. Called once by each server connection thread.
pub(crate) fn set_thread_load(load: Arc<AtomicUsize>) {
    THREAD_LOAD.with(|l| {
        let _ = l.set(load);
    });
}

/// This thread is a server connection thread serving exactly one connection.
fn alone_on_thread() -> bool {
    THREAD_LOAD.with(|l| l.get().is_some_and(|c| c.load(Ordering::Relaxed) == 1))
}

/// Longest a connection that ends cleanly waits for the client to take its last replies
/// before the socket closes (see `run`).
pub(crate) const CLOSE_LINGER: Duration = Duration::from_secs(2);

const READ_BUF: usize = 128 << 10;
/// When less room than this is left at the end of the read buffer, unread bytes are moved
/// to its start before the next read.
const READ_MIN_ROOM: usize = 16 << 10;
/// Budget charged to every request on top of its data: bounds the number of queued
/// replies even for requests without data.
const REQUEST_OVERHEAD: u64 = 256;
/// Payload remainders up to this size are read through the read buffer.
const SMALL_PAYLOAD: usize = 32 << 10;
/// The reader writes its batch of replies once it holds this many...
const BATCH_REPLIES: usize = 128;
/// ...or this many bytes of data.
const BATCH_BYTES: usize = 256 << 10;
/// Most buffers handed to one `writev` (Linux takes at most 1024).
const MAX_IOV: usize = 1024;
/// Block status looks at most this much of the device per request; clients ask again for
/// the rest, as the spec expects.
const BLOCK_STATUS_SCAN: u64 = 4 << 30;
/// Most descriptors in one block status reply (the spec says at most 2^20).
const MAX_DESCRIPTORS: usize = 1 << 16;
/// Payloads the server refuses are still read and thrown away, to keep the stream in sync,
/// up to this size (or twice the maximum payload, if larger); a larger one means the client
/// is broken or hostile, and the connection is closed.
const MIN_DISCARD_LIMIT: u64 = 64 << 20;

/// Why a connection's transmission phase ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection.
    Eof,
    /// The server is shutting down.
    Shutdown,
    /// Reading from the socket failed.
    ReadFailed(io::Error),
    /// Writing to the socket failed (usually: the client went away).
    WriteFailed,
    /// The client broke the protocol; the connection is dropped at once.
    Protocol(String),
}

impl Ended {
    /// True for endings that mean a broken or hostile client (logged as warnings).
    pub(crate) fn is_violation(&self) -> bool {
        matches!(self, Ended::Protocol(_))
    }
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Disconnect => f.write_str("client sent NBD_CMD_DISC"),
            Ended::Eof => f.write_str("client closed the connection"),
            Ended::Shutdown => f.write_str("server shutting down"),
            Ended::ReadFailed(e) => write!(f, "read failed: {e}"),
            Ended::WriteFailed => f.write_str("sending replies failed"),
            Ended::Protocol(why) => write!(f, "protocol violation: {why}"),
        }
    }
}

/// What a finished transmission phase reports.
pub(crate) struct Summary {
    /// Why it ended.
    pub ended: Ended,
    /// Requests received.
    pub requests: u64,
}

// ---- Replies ------------------------------------------------------------------------------

/// A reply ready to be written, holding its request's budget until it is.
pub(crate) struct Reply {
    body: Body,
    _permit: Option<Permit>,
}

/// The budget a request holds until its reply is written: its connection's, and its
/// client's.
pub(crate) struct Permit {
    _conn: OwnedSemaphorePermit,
    _client: Option<OwnedSemaphorePermit>,
}

enum Body {
    /// A reply that fits a frame: simple replies, NONE and hole chunks.
    Frame(Frame),
    /// A header followed by the whole buffer: simple read replies, single data chunks.
    Data(Frame, IoBuf),
    /// A header followed by device memory lent in place (host memory reads).
    View(Frame, View),
    /// Encoded bytes: error chunks with messages, block status.
    Bytes(Vec<u8>),
    /// A read answered in several chunks: headers in `heads`, interleaved with ranges of
    /// `buf` as `parts` says.
    Chunks {
        heads: Vec<u8>,
        parts: Vec<Part>,
        buf: Option<IoBuf>,
    },
}

#[derive(Clone, Copy)]
enum Part {
    Head(usize, usize),
    Data(usize, usize),
}

impl Reply {
    fn new(body: Body, permit: Option<Permit>) -> Self {
        Reply {
            body,
            _permit: permit,
        }
    }

    /// Bytes this reply puts on the wire.
    fn len(&self) -> usize {
        match &self.body {
            Body::Frame(f) => f.len(),
            Body::Data(f, buf) => f.len() + buf.len(),
            Body::View(f, v) => f.len() + v.len(),
            Body::Bytes(v) => v.len(),
            Body::Chunks { parts, .. } => parts
                .iter()
                .map(|p| match *p {
                    Part::Head(a, b) | Part::Data(a, b) => b - a,
                })
                .sum(),
        }
    }

    fn slices<'a>(&'a self, out: &mut Vec<IoSlice<'a>>) {
        match &self.body {
            Body::Frame(f) => out.push(IoSlice::new(f.as_bytes())),
            Body::Data(f, buf) => {
                out.push(IoSlice::new(f.as_bytes()));
                if !buf.is_empty() {
                    out.push(IoSlice::new(buf));
                }
            }
            Body::View(f, v) => {
                out.push(IoSlice::new(f.as_bytes()));
                v.slices(out);
            }
            Body::Bytes(v) => out.push(IoSlice::new(v)),
            Body::Chunks { heads, parts, buf } => {
                for p in parts {
                    match (*p, buf) {
                        (Part::Head(a, b), _) => out.push(IoSlice::new(&heads[a..b])),
                        (Part::Data(a, b), Some(buf)) => out.push(IoSlice::new(&buf[a..b])),
                        (Part::Data(..), None) => unreachable!("data part without a buffer"),
                    }
                }
            }
        }
    }
}

/// How one request's reply is framed; copied into operation futures.
#[derive(Clone, Copy)]
struct ReplyTo {
    framing: Framing,
    cookie: u64,
    offset: u64,
}

impl ReplyTo {
    /// Success without data. Structured connections may use a simple reply for this (it is
    /// shorter); extended ones must use a chunk.
    fn ok(self) -> Body {
        let mut f = Frame::new();
        match self.framing {
            Framing::Extended => f.none(self.framing, self.cookie, self.offset),
            _ => f.simple(0, self.cookie),
        };
        Body::Frame(f)
    }

    /// The header of a successful read reply carrying `len` bytes of data after it.
    fn data_frame(self, len: u64) -> Frame {
        let mut f = Frame::new();
        match self.framing {
            Framing::Simple => f.simple(0, self.cookie),
            fr => f.offset_data(
                fr,
                proto::REPLY_FLAG_DONE,
                self.cookie,
                self.offset,
                self.offset,
                len,
            ),
        };
        f
    }

    fn error(self, err: NbdError, message: &str) -> Body {
        match self.framing {
            Framing::Simple => {
                let mut f = Frame::new();
                f.simple(err.code(), self.cookie);
                Body::Frame(f)
            }
            _ => {
                let mut v = Vec::with_capacity(64 + message.len());
                proto::put_error_reply(
                    &mut v,
                    self.framing,
                    self.cookie,
                    self.offset,
                    err,
                    message,
                );
                Body::Bytes(v)
            }
        }
    }

    fn io_error(self, e: &IoError) -> Body {
        if matches!(e, IoError::Backend(_)) {
            warn!("{e}");
        }
        self.error(NbdError::from_errno(e.errno()), &e.to_string())
    }

    fn status(self, r: Result<(), IoError>) -> Body {
        match r {
            Ok(()) => self.ok(),
            Err(e) => self.io_error(&e),
        }
    }
}

// ---- Writing ------------------------------------------------------------------------------

/// The write half of a connection, shared by the reader (which writes without waiting)
/// and the writer task (which waits for the socket to drain).
pub(crate) trait Sink: Send + Sync + 'static {
    /// Writes what the socket takes now; `WouldBlock` if nothing.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Waits until the socket may take more.
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Bytes written that the peer has not taken yet (TCP: not acknowledged; Unix: not
    /// read), which closing the socket now could throw away.
    fn unacknowledged(&self) -> usize;
    /// Ends the stream: the peer reads EOF after the last reply. Requests it sends from now
    /// on are never read.
    fn end_stream(&self);
    /// Throws away what the peer sent and nobody read, just before the socket closes.
    fn discard_unread(&self) {}
}

fn shutdown(fd: std::os::fd::RawFd, how: nix::sys::socket::Shutdown) {
    // Fails only if the socket is already gone, which is the same end.
    let _ = nix::sys::socket::shutdown(fd, how);
}

/// `SIOCOUTQ` on a socket: TCP, bytes the peer has not acknowledged; Unix stream, bytes the
/// peer has not read. Zero if the kernel will not say.
fn outq(fd: std::os::fd::RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (= SIOCOUTQ) writes one int.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if rc == 0 { n.max(0) as usize } else { 0 }
}

impl Sink for tokio::net::tcp::OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        tokio::net::tcp::OwnedWriteHalf::try_write_vectored(self, bufs)
    }
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tokio::net::tcp::OwnedWriteHalf::writable(self)
    }
    fn unacknowledged(&self) -> usize {
        outq(AsRef::<tokio::net::TcpStream>::as_ref(self).as_raw_fd())
    }
    fn end_stream(&self) {
        // Only the write side: data arriving on a TCP socket whose read side is shut makes
        // Linux answer with a reset, which would throw away replies not yet acknowledged.
        shutdown(
            AsRef::<tokio::net::TcpStream>::as_ref(self).as_raw_fd(),
            nix::sys::socket::Shutdown::Write,
        )
    }
}

impl Sink for tokio::net::unix::OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        tokio::net::unix::OwnedWriteHalf::try_write_vectored(self, bufs)
    }
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tokio::net::unix::OwnedWriteHalf::writable(self)
    }
    fn unacknowledged(&self) -> usize {
        outq(AsRef::<tokio::net::UnixStream>::as_ref(self).as_raw_fd())
    }
    fn end_stream(&self) {
        // Both sides: from here on the peer's writes fail (EPIPE) instead of queueing on
        // this socket, so that `discard_unread` can leave its queue empty for good.
        shutdown(
            AsRef::<tokio::net::UnixStream>::as_ref(self).as_raw_fd(),
            nix::sys::socket::Shutdown::Both,
        )
    }
    fn discard_unread(&self) {
        // Closing a Unix socket with unread data sets ECONNRESET on the peer, which its next
        // read returns in place of the EOF (even after it has read every reply). The read
        // side is shut (`end_stream`), so once empty the queue stays empty.
        let fd = AsRef::<tokio::net::UnixStream>::as_ref(self).as_raw_fd();
        let mut buf = [0u8; 16 << 10];
        while let Ok(1..) = recv(fd, &mut buf, MsgFlags::MSG_DONTWAIT) {}
    }
}

/// Writes as much of `queue` as the socket takes without waiting, starting `skip` bytes
/// into its first reply. Written replies are dropped (returning their buffers and budget).
/// `Ok(true)` when the queue is empty.
fn write_now<S: Sink + ?Sized>(
    sink: &S,
    queue: &mut VecDeque<Reply>,
    skip: &mut usize,
) -> io::Result<bool> {
    while !queue.is_empty() {
        let n = match write_once(sink, queue, *skip) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut done = *skip + n;
        while let Some(r) = queue.front() {
            let len = r.len();
            if done < len {
                break;
            }
            done -= len;
            queue.pop_front();
        }
        *skip = done;
    }
    Ok(true)
}

/// One `writev` of the front of `queue`, `skip` bytes into its first reply.
fn write_once<S: Sink + ?Sized>(
    sink: &S,
    queue: &VecDeque<Reply>,
    skip: usize,
) -> io::Result<usize> {
    let mut slices = Vec::with_capacity((queue.len() * 2).min(MAX_IOV));
    for r in queue.iter() {
        // Most replies take a few slices; a read of many extents (small chunks, holes) can
        // take thousands, more than one writev accepts (the rest goes in the next one).
        if slices.len() >= MAX_IOV {
            break;
        }
        r.slices(&mut slices);
    }
    let mut view = &mut slices[..];
    IoSlice::advance_slices(&mut view, skip);
    let n = view.len().min(MAX_IOV);
    sink.try_write_vectored(&view[..n])
}

/// Replies on their way to the socket, shared by the reader, spawned operations and the
/// writer task.
struct Outbox {
    state: Mutex<OutState>,
    /// Wakes the writer task; it owns the socket (`busy`) when woken.
    wake: Notify,
    /// Told when the last spawned operation ends after the reader is done.
    idle: Notify,
    /// Cancelled when writing fails: the reader stops.
    dead: CancellationToken,
}

#[derive(Default)]
struct OutState {
    /// Replies waiting for the writer task, in wire order.
    queue: VecDeque<Reply>,
    /// Bytes of `queue[0]` already written.
    skip: usize,
    /// The reader or the writer task is writing: nobody else may.
    busy: bool,
    /// Spawned operations not yet finished.
    ops: usize,
    /// The reader has stopped producing replies.
    reader_done: bool,
    /// Writing failed or the connection is being dropped: replies are thrown away.
    closed: bool,
}

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, OutState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a reply of a spawned operation, waking the writer task if the socket is free.
    fn deliver(&self, reply: Reply) {
        let mut st = self.lock();
        if st.closed {
            return;
        }
        st.queue.push_back(reply);
        if !st.busy {
            st.busy = true;
            drop(st);
            self.wake.notify_one();
        }
    }

    /// Writing failed: replies are dropped from now on, the reader stops, and the writer
    /// task (wherever it waits) wakes up to end.
    fn fail(&self, st: &mut OutState, e: &io::Error) {
        debug!("writing replies: {e}");
        st.closed = true;
        st.queue.clear();
        self.dead.cancel();
        // When the reader's own write failed, it still holds `busy` and the writer task
        // sleeps; woken, it sees `closed` and ends. Otherwise `run` waits for it forever
        // and the connection (and its slot) leaks.
        self.wake.notify_one();
    }

    /// Wakes the writer if it should look at the state (work queued, or time to exit).
    fn kick(&self, mut st: MutexGuard<'_, OutState>) {
        if !st.busy {
            st.busy = true;
            drop(st);
            self.wake.notify_one();
        }
    }
}

/// Counts a spawned operation; when it ends (delivered, or dropped on a forced shutdown)
/// the writer learns whether it was the last.
struct OpGuard(Arc<Outbox>);

impl Drop for OpGuard {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.ops -= 1;
        if st.ops == 0 && st.reader_done {
            self.0.kick(st);
            self.0.idle.notify_one();
        }
    }
}

/// The writer task: whenever woken it owns the socket, writes everything queued (waiting
/// for the socket to drain as needed), and gives the socket back when the queue is empty.
/// Ends once the reader is done and no spawned operation is left.
async fn writer<S: Sink>(sink: Arc<S>, out: Arc<Outbox>) {
    loop {
        out.wake.notified().await;
        loop {
            let (mut batch, mut skip) = {
                let mut st = out.lock();
                if st.closed {
                    return;
                }
                if st.queue.is_empty() {
                    if st.reader_done && st.ops == 0 {
                        return;
                    }
                    st.busy = false;
                    break;
                }
                (std::mem::take(&mut st.queue), std::mem::take(&mut st.skip))
            };
            loop {
                match write_now(&*sink, &mut batch, &mut skip) {
                    Ok(true) => break,
                    Ok(false) => {
                        if let Err(e) = sink.writable().await {
                            out.fail(&mut out.lock(), &e);
                            return;
                        }
                    }
                    Err(e) => {
                        out.fail(&mut out.lock(), &e);
                        return;
                    }
                }
            }
        }
    }
}

/// Aborts the writer if the connection task is dropped (a forced shutdown), so the socket
/// closes with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---- Reader -------------------------------------------------------------------------------

/// The request read buffer: `buf[start..end]` holds bytes read but not yet parsed.
struct InBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl InBuf {
    fn new() -> Self {
        InBuf {
            buf: vec![0u8; READ_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// One read from `rd`; returns the bytes read (0 at EOF). Cancel-safe: if the future
    /// is dropped before it completes, nothing was consumed from the socket.
    ///
    /// With a `poller`, polls the socket first (see [`Poller`]) and notes whether the wait
    /// was short. `next_request`: the bytes awaited start a request (see [`Poller::poll`]).
    async fn fill<R: Source>(
        &mut self,
        rd: &mut R,
        poller: Option<&mut Poller>,
        next_request: bool,
    ) -> io::Result<usize> {
        if self.buf.len() - self.end < READ_MIN_ROOM && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = match poller {
            None => rd.read(&mut self.buf[self.end..]).await?,
            Some(p) => {
                let start = Instant::now();
                let n = match p.poll(rd.fd(), &mut self.buf[self.end..], next_request) {
                    Some(r) => r?,
                    None => rd.read(&mut self.buf[self.end..]).await?,
                };
                p.warm = start.elapsed() <= 2 * p.budget;
                n
            }
        };
        self.end += n;
        Ok(n)
    }
}

/// Per-connection state of the reader.
struct Conn<R, S> {
    rd: R,
    inbuf: InBuf,
    sink: Arc<S>,
    out: Arc<Outbox>,
    /// Replies of operations completed inline, not yet written.
    batch: VecDeque<Reply>,
    batch_bytes: usize,
    dev: Arc<dyn BlockDevice>,
    size: u64,
    caps: Capabilities,
    framing: Framing,
    flags: u16,
    allocation_context: Option<u32>,
    max_payload: u64,
    discard_limit: u64,
    budget: Arc<Semaphore>,
    budget_max: u64,
    /// The budget shared by every connection of this client, if any.
    client_budget: Option<Arc<Semaphore>>,
    client_max: u64,
    extents: Vec<Extent>,
    requests: u64,
    poller: Poller,
}

/// Runs the transmission phase on a connection whose handshake chose `export`, polling
/// for requests up to `busy_poll` before each wait (see [`Poller`]; zero turns it off).
// Each argument is a different thing the caller decides; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run<R, S>(
    rd: R,
    sink: S,
    export: &Export,
    neg: &Negotiated,
    limits: &Limits,
    busy_poll: Duration,
    client_budget: Option<Arc<Semaphore>>,
    shutdown: &CancellationToken,
) -> Summary
where
    R: Source,
    S: Sink,
{
    let sink = Arc::new(sink);
    let out = Arc::new(Outbox {
        state: Mutex::new(OutState::default()),
        wake: Notify::new(),
        idle: Notify::new(),
        dead: CancellationToken::new(),
    });
    let mut writer = AbortOnDrop(tokio::spawn(writer(sink.clone(), out.clone())));
    let caps = export.device.capabilities();
    let max_payload = BlockSizes::of(&caps).max as u64;
    let budget_max = (limits.inflight_bytes as u64).clamp(1 << 20, Semaphore::MAX_PERMITS as u64);
    let mut conn = Conn {
        rd,
        inbuf: InBuf::new(),
        sink: sink.clone(),
        out: out.clone(),
        batch: VecDeque::with_capacity(BATCH_REPLIES),
        batch_bytes: 0,
        dev: export.device.clone(),
        size: export.device.size(),
        caps,
        framing: neg.framing,
        flags: neg.flags,
        allocation_context: neg.allocation_context,
        max_payload,
        discard_limit: (2 * max_payload).max(MIN_DISCARD_LIMIT),
        budget: Arc::new(Semaphore::new(budget_max as usize)),
        budget_max,
        client_max: client_budget.as_ref().map_or(0, |_| {
            (limits.client_inflight_bytes as u64).clamp(1 << 20, Semaphore::MAX_PERMITS as u64)
        }),
        client_budget,
        extents: Vec::new(),
        requests: 0,
        poller: Poller::new(busy_poll, R::STEPS_ASIDE && few_cpus()),
    };
    let ended = conn.serve(shutdown).await;
    let hard = ended.is_violation() || matches!(ended, Ended::ReadFailed(_) | Ended::WriteFailed);
    if !hard {
        conn.flush_replies();
    }
    let requests = conn.requests;
    drop(conn);
    {
        let mut st = out.lock();
        st.reader_done = true;
        if hard {
            st.closed = true;
            st.queue.clear();
        }
        out.kick(st);
    }
    if !hard {
        // Let operations still running finish and their replies go out; the writer ends
        // after the last one. A forced shutdown aborts it (on drop).
        let _ = (&mut writer.0).await;
        // Closing a socket while requests the client sent are still unread resets the
        // connection: TCP throws away replies not yet acknowledged, and a Unix socket's
        // reader gets ECONNRESET in place of the EOF after the last reply. A client that is
        // slow to read (or sent more requests as the server stopped) would lose replies, or
        // see the stream fail. So the stream ends with an EOF after the last reply, the
        // socket stays open until the client has taken everything, and a Unix socket's
        // unread requests are thrown away before it closes.
        sink.end_stream();
        let deadline = Instant::now() + CLOSE_LINGER;
        while sink.unacknowledged() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        sink.discard_unread();
    } else {
        // Their replies are thrown away, but operations already started still run: wait
        // for them too, so that once a connection is reported closed none of its writes
        // can land any more, on top of what the client writes after reconnecting.
        loop {
            let idle = out.idle.notified();
            if out.lock().ops == 0 {
                break;
            }
            idle.await;
        }
    }
    Summary { ended, requests }
}

/// What the reader does after a request.
enum Next {
    Continue,
    Stop(Ended),
}

type OpResult = Result<(), Ended>;

impl<R: Source, S: Sink> Conn<R, S> {
    fn extended(&self) -> bool {
        self.framing == Framing::Extended
    }

    async fn serve(&mut self, shutdown: &CancellationToken) -> Ended {
        let hlen = proto::request_len(self.extended());
        let dead = self.out.dead.clone();
        let mut shutting = pin!(shutdown.cancelled());
        let mut dying = pin!(dead.cancelled());
        loop {
            while self.inbuf.len() < hlen {
                // About to wait for the client: first send what is done.
                self.flush_replies();
                if shutdown.is_cancelled() {
                    return Ended::Shutdown;
                }
                // `fill` first: when bytes are waiting, the other branches are never polled.
                let next_request = self.inbuf.len() == 0;
                let poller = self.may_poll().then_some(&mut self.poller);
                let r = tokio::select! {
                    biased;
                    r = self.inbuf.fill(&mut self.rd, poller, next_request) => r,
                    _ = &mut shutting => return Ended::Shutdown,
                    _ = &mut dying => return Ended::WriteFailed,
                };
                match r {
                    Ok(0) if self.inbuf.len() == 0 => return Ended::Eof,
                    Ok(0) => {
                        return Ended::Protocol("connection closed inside a request header".into());
                    }
                    Ok(_) => {}
                    Err(e) => return Ended::ReadFailed(e),
                }
            }
            let req = match proto::parse_request(&self.inbuf.data()[..hlen], self.extended()) {
                Ok(r) => r,
                Err(e) => return Ended::Protocol(format!("{e} in a request header")),
            };
            self.inbuf.consume(hlen);
            self.requests += 1;
            trace!(
                cmd = req.command,
                flags = req.flags,
                offset = req.offset,
                length = req.length,
                cookie = req.cookie,
                "request"
            );
            match self.dispatch(req).await {
                Next::Continue => {}
                Next::Stop(e) => return e,
            }
            if self.batch.len() >= BATCH_REPLIES || self.batch_bytes >= BATCH_BYTES {
                self.flush_replies();
            }
            if dead.is_cancelled() {
                return Ended::WriteFailed;
            }
        }
    }

    /// Whether waiting for the client may start with a poll (see [`Poller`]).
    fn may_poll(&self) -> bool {
        !self.poller.budget.is_zero() && alone_on_thread() && self.out.lock().ops == 0
    }

    /// Writes the reader's batch now, as far as the socket takes it without waiting; the
    /// rest goes to the writer task. Called before every wait, so no reply sits in the
    /// batch while the reader is blocked.
    fn flush_replies(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        self.batch_bytes = 0;
        let mut st = self.out.lock();
        if st.closed {
            self.batch.clear();
            return;
        }
        if st.busy {
            // The writer task holds the socket; it takes these before letting go.
            st.queue.extend(self.batch.drain(..));
            return;
        }
        st.busy = true;
        drop(st);
        let mut skip = 0;
        let r = write_now(&*self.sink, &mut self.batch, &mut skip);
        let mut st = self.out.lock();
        match r {
            Ok(true) => {
                if st.queue.is_empty() {
                    st.busy = false;
                } else {
                    // Spawned operations delivered while we wrote: the writer sends them.
                    drop(st);
                    self.out.wake.notify_one();
                }
            }
            Ok(false) => {
                // The socket is full: what is left goes first, then what others queued.
                while let Some(r) = self.batch.pop_back() {
                    st.queue.push_front(r);
                }
                st.skip = skip;
                drop(st);
                self.out.wake.notify_one();
            }
            Err(e) => {
                self.batch.clear();
                self.out.fail(&mut st, &e);
            }
        }
    }

    fn reply_to(&self, req: &Request) -> ReplyTo {
        ReplyTo {
            framing: self.framing,
            cookie: req.cookie,
            offset: req.offset,
        }
    }

    fn push(&mut self, reply: Reply) {
        self.batch_bytes += reply.len();
        self.batch.push_back(reply);
    }

    fn send(&mut self, body: Body, permit: Option<Permit>) {
        self.push(Reply::new(body, permit));
    }

    fn refuse(&mut self, req: &Request, permit: Permit, err: NbdError, message: &str) {
        debug!(
            "refusing command {} at {}+{}: {message}",
            req.command, req.offset, req.length
        );
        let body = self.reply_to(req).error(err, message);
        self.send(body, Some(permit));
    }

    /// Runs an operation: polled once here, spawned only if it has to wait.
    fn start<F>(&mut self, op: F)
    where
        F: Future<Output = Reply> + Send + 'static,
    {
        let mut op = Box::pin(op);
        // A noop waker is enough for the first poll: if the operation is pending, the task
        // it is moved into polls it again with its own waker before it can complete.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match op.as_mut().poll(&mut cx) {
            Poll::Ready(reply) => self.push(reply),
            Poll::Pending => {
                self.out.lock().ops += 1;
                let guard = OpGuard(self.out.clone());
                tokio::spawn(async move {
                    let reply = op.await;
                    guard.0.deliver(reply);
                    drop(guard);
                });
            }
        }
    }

    async fn permit(&mut self, data: u64) -> Result<Permit, Ended> {
        let closed = |_| Ended::Protocol("in-flight budget closed".into());
        let want = data + REQUEST_OVERHEAD;
        let n = want.min(self.budget_max) as u32;
        let conn = match self.budget.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(_) => {
                self.flush_replies();
                self.budget
                    .clone()
                    .acquire_many_owned(n)
                    .await
                    .map_err(closed)?
            }
        };
        let n = want.min(self.client_max) as u32;
        let client = match self
            .client_budget
            .as_ref()
            .map(|b| b.clone().try_acquire_many_owned(n))
        {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(_)) => {
                // The client's other connections hold its share: wait for their replies
                // to go out, as for this connection's own budget.
                self.flush_replies();
                let b = self.client_budget.clone().expect("checked above");
                Some(b.acquire_many_owned(n).await.map_err(closed)?)
            }
        };
        Ok(Permit {
            _conn: conn,
            _client: client,
        })
    }

    async fn buffer(&mut self, len: u64) -> Result<IoBuf, IoError> {
        if let Some(b) = self.dev.buffers().try_get(len as usize)? {
            return Ok(b);
        }
        self.flush_replies();
        self.dev.buffers().get(len as usize).await
    }

    /// Reads and throws away a payload the server will not use.
    async fn discard(&mut self, len: u64) -> OpResult {
        if len > self.discard_limit {
            return Err(Ended::Protocol(format!(
                "request payload of {len} bytes (most accepted: {})",
                self.max_payload
            )));
        }
        let mut left = len;
        let n = left.min(self.inbuf.len() as u64) as usize;
        self.inbuf.consume(n);
        left -= n as u64;
        if left > 0 {
            self.flush_replies();
        }
        while left > 0 {
            // The buffer is empty here: use it as scratch space.
            let n = left.min(READ_BUF as u64) as usize;
            let got = self
                .rd
                .read(&mut self.inbuf.buf[..n])
                .await
                .map_err(Ended::ReadFailed)?;
            if got == 0 {
                return Err(Ended::Protocol("connection closed inside a payload".into()));
            }
            left -= got as u64;
        }
        Ok(())
    }

    /// Fills `dst` with payload: first what the read buffer holds, then from the socket. A
    /// small remainder is read through the read buffer, which also takes in the requests
    /// behind it in the same syscall; a large one goes straight into `dst`, with no copy.
    async fn payload(&mut self, dst: &mut [u8]) -> OpResult {
        let mut at = 0;
        loop {
            let n = (dst.len() - at).min(self.inbuf.len());
            dst[at..at + n].copy_from_slice(&self.inbuf.data()[..n]);
            self.inbuf.consume(n);
            at += n;
            if at == dst.len() {
                return Ok(());
            }
            self.flush_replies();
            let closed = || Ended::Protocol("connection closed inside a payload".into());
            if dst.len() - at <= SMALL_PAYLOAD {
                let poller = self.may_poll().then_some(&mut self.poller);
                match self.inbuf.fill(&mut self.rd, poller, false).await {
                    Ok(0) => return Err(closed()),
                    Ok(_) => continue,
                    Err(e) => return Err(Ended::ReadFailed(e)),
                }
            }
            // The rest goes straight into `dst`. The client is in the middle of sending it,
            // so a wait is usually short: poll before sleeping, as between requests.
            let poll = self.may_poll();
            while at < dst.len() {
                let polled = if poll {
                    self.poller.poll_now(self.rd.fd(), &mut dst[at..])
                } else {
                    None
                };
                let n = match polled {
                    Some(r) => r,
                    None => self.rd.read(&mut dst[at..]).await,
                };
                match n {
                    Ok(0) => return Err(closed()),
                    Ok(n) => at += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Ended::ReadFailed(e)),
                }
            }
            return Ok(());
        }
    }

    /// Checks `flags` against those valid for the command; `Err` carries the message.
    fn check_flags(&self, req: &Request, allowed: u16) -> Result<(), String> {
        let mut allowed = allowed;
        if self.flags & proto::FLAG_SEND_FUA != 0 {
            allowed |= proto::CMD_FLAG_FUA;
        }
        let bad = req.flags & !allowed;
        if bad != 0 {
            return Err(format!(
                "command flags {bad:#x} are not valid for command {}",
                req.command
            ));
        }
        Ok(())
    }

    fn in_range(&self, req: &Request) -> bool {
        req.offset
            .checked_add(req.length)
            .is_some_and(|end| end <= self.size)
    }

    fn past_end(&self, req: &Request, what: &str) -> String {
        format!(
            "{what} of {} bytes at offset {} lies past the end of the {}-byte export",
            req.length, req.offset, self.size
        )
    }

    /// Bytes of I/O buffer a request will hold while in flight, as far as the header tells
    /// (buffers come in power-of-two sizes, so a budget counted in buffers bounds memory);
    /// refused requests count for nothing beyond the fixed overhead.
    fn data_charge(&self, req: &Request) -> u64 {
        match req.command {
            proto::CMD_READ | proto::CMD_WRITE if req.length <= self.max_payload => {
                if req.length == 0 {
                    0
                } else {
                    BufferPool::charge(req.length as usize) as u64
                }
            }
            _ => 0,
        }
    }

    async fn dispatch(&mut self, req: Request) -> Next {
        if req.command == proto::CMD_DISC {
            return Next::Stop(Ended::Disconnect);
        }
        // Every request, refused ones included, holds budget until its reply is written,
        // so a client that sends without reading cannot grow the reply queue unbounded.
        let permit = match self.permit(self.data_charge(&req)).await {
            Ok(p) => p,
            Err(e) => return Next::Stop(e),
        };
        let r = match req.command {
            proto::CMD_WRITE => self.write(req, permit).await,
            _ if req.payload_len(self.extended()) > 0 => {
                // Extended headers: a payload on a command that takes none.
                let r = self.discard(req.length).await;
                if r.is_ok() {
                    self.refuse(
                        &req,
                        permit,
                        NbdError::Inval,
                        "this command takes no payload (NBD_CMD_FLAG_PAYLOAD_LEN)",
                    );
                }
                r
            }
            proto::CMD_READ => self.read(req, permit).await,
            proto::CMD_FLUSH => self.flush(req, permit),
            proto::CMD_TRIM => self.trim(req, permit),
            proto::CMD_CACHE => self.cache(req, permit),
            proto::CMD_WRITE_ZEROES => self.write_zeroes(req, permit),
            proto::CMD_BLOCK_STATUS => self.block_status(req, permit),
            other => {
                self.refuse(
                    &req,
                    permit,
                    NbdError::Inval,
                    &format!("unknown command {other}"),
                );
                Ok(())
            }
        };
        match r {
            Ok(()) => Next::Continue,
            Err(e) => Next::Stop(e),
        }
    }

    async fn write(&mut self, req: Request, permit: Permit) -> OpResult {
        let ext = self.extended();
        let len = req.length;
        let allowed = if ext { proto::CMD_FLAG_PAYLOAD_LEN } else { 0 };
        let refusal = if let Err(m) = self.check_flags(&req, allowed) {
            Some((NbdError::Inval, m))
        } else if self.caps.read_only {
            Some((NbdError::Perm, "the export is read-only".to_string()))
        } else if !self.in_range(&req) {
            Some((NbdError::NoSpc, self.past_end(&req, "write")))
        } else if len > self.max_payload {
            Some((
                NbdError::Inval,
                format!(
                    "write of {len} bytes exceeds the maximum payload of {} bytes",
                    self.max_payload
                ),
            ))
        } else {
            None
        };
        if let Some((err, msg)) = refusal {
            self.discard(len).await?;
            self.refuse(&req, permit, err, &msg);
            return Ok(());
        }
        let to = self.reply_to(&req);
        if len == 0 {
            self.send(to.ok(), Some(permit));
            return Ok(());
        }
        let mut buf = match self.buffer(len).await {
            Ok(b) => b,
            Err(e) => {
                self.discard(len).await?;
                self.send(to.io_error(&e), Some(permit));
                return Ok(());
            }
        };
        self.payload(&mut buf).await?;
        let dev = self.dev.clone();
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        self.start(async move {
            let r = dev.write(req.offset, &buf, fua).await;
            drop(buf);
            Reply::new(to.status(r), Some(permit))
        });
        Ok(())
    }

    async fn read(&mut self, req: Request, permit: Permit) -> OpResult {
        let structured = self.framing != Framing::Simple;
        let allowed = if structured { proto::CMD_FLAG_DF } else { 0 };
        if let Err(m) = self.check_flags(&req, allowed) {
            self.refuse(&req, permit, NbdError::Inval, &m);
            return Ok(());
        }
        if !self.in_range(&req) {
            let msg = self.past_end(&req, "read");
            self.refuse(&req, permit, NbdError::Inval, &msg);
            return Ok(());
        }
        let len = req.length;
        if len > self.max_payload {
            // With structured replies the spec lets a server refuse large reads with
            // EOVERFLOW; simple replies can only say EINVAL.
            let err = if structured {
                NbdError::Overflow
            } else {
                NbdError::Inval
            };
            let msg = format!(
                "read of {len} bytes exceeds the maximum payload of {} bytes",
                self.max_payload
            );
            self.refuse(&req, permit, err, &msg);
            return Ok(());
        }
        let to = self.reply_to(&req);
        if len == 0 {
            let mut f = Frame::new();
            match self.framing {
                Framing::Simple => f.simple(0, req.cookie),
                fr => f.none(fr, req.cookie, req.offset),
            };
            self.send(Body::Frame(f), Some(permit));
            return Ok(());
        }
        let df = req.flags & proto::CMD_FLAG_DF != 0;
        if structured && !df && self.caps.can_extents && self.has_holes(&req) {
            return self.read_sparse(req, permit).await;
        }
        if let Some(r) = self.dev.view(req.offset, len) {
            // Host memory: the reply points at the chunks, no copy and no buffer.
            let body = match r {
                Ok(view) => Body::View(to.data_frame(view.len() as u64), view),
                Err(e) => to.io_error(&e),
            };
            self.send(body, Some(permit));
            return Ok(());
        }
        let mut buf = match self.buffer(len).await {
            Ok(b) => b,
            Err(e) => {
                self.send(to.io_error(&e), Some(permit));
                return Ok(());
            }
        };
        let dev = self.dev.clone();
        self.start(async move {
            let body = match dev.read(req.offset, &mut buf).await {
                Ok(()) => Body::Data(to.data_frame(buf.len() as u64), buf),
                Err(e) => to.io_error(&e),
            };
            Reply::new(body, Some(permit))
        });
        Ok(())
    }

    /// Looks up the extents of a read into `self.extents`; true when the range has a hole
    /// that reads as zeros and the extents cover it exactly (anything else is read whole).
    fn has_holes(&mut self, req: &Request) -> bool {
        self.extents.clear();
        if self
            .dev
            .extents(req.offset, req.length, &mut self.extents)
            .is_err()
        {
            return false;
        }
        let mut at = req.offset;
        let mut holes = false;
        for e in &self.extents {
            if e.offset != at || e.length == 0 {
                return false;
            }
            at += e.length;
            holes |= is_zero_hole(e);
        }
        holes && at == req.offset + req.length
    }

    /// A structured read over a range with holes (`self.extents`): holes are sent as
    /// `NBD_REPLY_TYPE_OFFSET_HOLE` chunks, only the data runs are read.
    async fn read_sparse(&mut self, req: Request, permit: Permit) -> OpResult {
        let to = self.reply_to(&req);
        if self.extents.len() == 1 {
            // All hole: no buffer, no copy.
            let mut f = Frame::new();
            f.offset_hole(
                self.framing,
                proto::REPLY_FLAG_DONE,
                req.cookie,
                req.offset,
                req.offset,
                req.length as u32,
            );
            self.send(Body::Frame(f), Some(permit));
            return Ok(());
        }
        let data: u64 = self
            .extents
            .iter()
            .filter(|e| !is_zero_hole(e))
            .map(|e| e.length)
            .sum();
        let mut buf = if data > 0 {
            match self.buffer(data).await {
                Ok(b) => Some(b),
                Err(e) => {
                    self.send(to.io_error(&e), Some(permit));
                    return Ok(());
                }
            }
        } else {
            None
        };
        let extents = self.extents.clone();
        let dev = self.dev.clone();
        self.start(async move {
            let mut heads = Vec::with_capacity(extents.len() * 40);
            let mut parts = Vec::with_capacity(extents.len() * 2);
            let mut at = 0usize;
            let last = extents.len() - 1;
            for (i, e) in extents.iter().enumerate() {
                let flags = if i == last { proto::REPLY_FLAG_DONE } else { 0 };
                let mut f = Frame::new();
                let start = heads.len();
                if is_zero_hole(e) {
                    f.offset_hole(
                        to.framing,
                        flags,
                        to.cookie,
                        to.offset,
                        e.offset,
                        e.length as u32,
                    );
                    heads.extend_from_slice(f.as_bytes());
                    parts.push(Part::Head(start, heads.len()));
                } else {
                    let b = buf.as_mut().expect("data extents have a buffer");
                    let piece = &mut b[at..at + e.length as usize];
                    if let Err(err) = dev.read(e.offset, piece).await {
                        return Reply::new(to.io_error(&err), Some(permit));
                    }
                    f.offset_data(to.framing, flags, to.cookie, to.offset, e.offset, e.length);
                    heads.extend_from_slice(f.as_bytes());
                    parts.push(Part::Head(start, heads.len()));
                    parts.push(Part::Data(at, at + e.length as usize));
                    at += e.length as usize;
                }
            }
            Reply::new(Body::Chunks { heads, parts, buf }, Some(permit))
        });
        Ok(())
    }

    fn flush(&mut self, req: Request, permit: Permit) -> OpResult {
        if self.flags & proto::FLAG_SEND_FLUSH == 0 {
            self.refuse(&req, permit, NbdError::Inval, "flush is not supported");
            return Ok(());
        }
        if let Err(m) = self.check_flags(&req, 0) {
            self.refuse(&req, permit, NbdError::Inval, &m);
            return Ok(());
        }
        if req.offset != 0 || req.length != 0 {
            self.refuse(
                &req,
                permit,
                NbdError::Inval,
                "flush requests must have offset and length 0",
            );
            return Ok(());
        }
        let to = self.reply_to(&req);
        let dev = self.dev.clone();
        self.start(async move { Reply::new(to.status(dev.flush().await), Some(permit)) });
        Ok(())
    }

    fn trim(&mut self, req: Request, permit: Permit) -> OpResult {
        if self.caps.read_only {
            self.refuse(&req, permit, NbdError::Perm, "the export is read-only");
            return Ok(());
        }
        if self.flags & proto::FLAG_SEND_TRIM == 0 {
            self.refuse(&req, permit, NbdError::Inval, "trim is not supported");
            return Ok(());
        }
        if let Err(m) = self.check_flags(&req, 0) {
            self.refuse(&req, permit, NbdError::Inval, &m);
            return Ok(());
        }
        if !self.in_range(&req) {
            let msg = self.past_end(&req, "trim");
            self.refuse(&req, permit, NbdError::Inval, &msg);
            return Ok(());
        }
        let to = self.reply_to(&req);
        let dev = self.dev.clone();
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        self.start(async move {
            let mut r = dev.trim(req.offset, req.length).await;
            if r.is_ok() && fua {
                r = dev.flush().await;
            }
            Reply::new(to.status(r), Some(permit))
        });
        Ok(())
    }

    fn write_zeroes(&mut self, req: Request, permit: Permit) -> OpResult {
        if self.caps.read_only {
            self.refuse(&req, permit, NbdError::Perm, "the export is read-only");
            return Ok(());
        }
        if self.flags & proto::FLAG_SEND_WRITE_ZEROES == 0 {
            self.refuse(
                &req,
                permit,
                NbdError::Inval,
                "write zeroes is not supported",
            );
            return Ok(());
        }
        let mut allowed = proto::CMD_FLAG_NO_HOLE;
        if self.flags & proto::FLAG_SEND_FAST_ZERO != 0 {
            allowed |= proto::CMD_FLAG_FAST_ZERO;
        }
        if let Err(m) = self.check_flags(&req, allowed) {
            self.refuse(&req, permit, NbdError::Inval, &m);
            return Ok(());
        }
        if !self.in_range(&req) {
            // The spec asks for ENOSPC here, as for writes.
            let msg = self.past_end(&req, "write zeroes");
            self.refuse(&req, permit, NbdError::NoSpc, &msg);
            return Ok(());
        }
        let to = self.reply_to(&req);
        let dev = self.dev.clone();
        let flags = ZeroFlags {
            may_trim: req.flags & proto::CMD_FLAG_NO_HOLE == 0,
            fast: req.flags & proto::CMD_FLAG_FAST_ZERO != 0,
            fua: req.flags & proto::CMD_FLAG_FUA != 0,
        };
        self.start(async move {
            let r = dev.write_zeroes(req.offset, req.length, flags).await;
            Reply::new(to.status(r), Some(permit))
        });
        Ok(())
    }

    fn cache(&mut self, req: Request, permit: Permit) -> OpResult {
        // Some clients send CACHE without the flag being advertised; it is only a hint, so
        // it is served either way.
        if let Err(m) = self.check_flags(&req, 0) {
            self.refuse(&req, permit, NbdError::Inval, &m);
            return Ok(());
        }
        if !self.in_range(&req) {
            let msg = self.past_end(&req, "cache");
            self.refuse(&req, permit, NbdError::Inval, &msg);
            return Ok(());
        }
        let to = self.reply_to(&req);
        let dev = self.dev.clone();
        self.start(async move {
            let r = dev.cache(req.offset, req.length).await;
            Reply::new(to.status(r), Some(permit))
        });
        Ok(())
    }

    fn block_status(&mut self, req: Request, permit: Permit) -> OpResult {
        let Some(context) = self.allocation_context else {
            self.refuse(
                &req,
                permit,
                NbdError::Inval,
                "no metadata context was selected (NBD_OPT_SET_META_CONTEXT)",
            );
            return Ok(());
        };
        if let Err(m) = self.check_flags(&req, proto::CMD_FLAG_REQ_ONE) {
            self.refuse(&req, permit, NbdError::Inval, &m);
            return Ok(());
        }
        if req.length == 0 {
            self.refuse(&req, permit, NbdError::Inval, "block status of 0 bytes");
            return Ok(());
        }
        if !self.in_range(&req) {
            let msg = self.past_end(&req, "block status");
            self.refuse(&req, permit, NbdError::Inval, &msg);
            return Ok(());
        }
        let to = self.reply_to(&req);
        let scan = req.length.min(BLOCK_STATUS_SCAN);
        self.extents.clear();
        if let Err(e) = self.dev.extents(req.offset, scan, &mut self.extents) {
            self.send(to.io_error(&e), Some(permit));
            return Ok(());
        }
        let one = req.flags & proto::CMD_FLAG_REQ_ONE != 0;
        let mut descs: Vec<StatusDescriptor> = Vec::with_capacity(self.extents.len().min(64));
        for e in &self.extents {
            if e.length == 0 {
                continue;
            }
            let flags = state_flags(e);
            match descs.last_mut() {
                Some(d) if d.flags == flags => d.length += e.length,
                _ => {
                    if descs.len() == MAX_DESCRIPTORS {
                        break;
                    }
                    descs.push(StatusDescriptor {
                        length: e.length,
                        flags,
                    });
                }
            }
        }
        if descs.is_empty() {
            // The status 0 ("allocated, contents unknown") is always a safe answer.
            descs.push(StatusDescriptor {
                length: scan,
                flags: 0,
            });
        }
        if one {
            descs.truncate(1);
        }
        let mut v = Vec::with_capacity(40 + descs.len() * 16);
        proto::put_block_status(
            &mut v,
            self.framing,
            true,
            req.cookie,
            req.offset,
            context,
            &descs,
        );
        self.send(Body::Bytes(v), Some(permit));
        Ok(())
    }
}

fn is_zero_hole(e: &Extent) -> bool {
    e.hole && e.zero
}

fn state_flags(e: &Extent) -> u32 {
    let mut f = 0;
    if e.hole {
        f |= proto::STATE_HOLE;
    }
    if e.zero {
        f |= proto::STATE_ZERO;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::host::HostBackend;
    use crate::engine::{SparseDevice, SparseOptions};
    use crate::nbd::handshake::{ALLOCATION_CONTEXT_ID, transmission_flags};
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixStream;

    /// A poll that finds the client's bytes at its first try leaves the next
    /// `AHEAD_WAITS` waits to the reactor (over TCP); one that had to wait for them keeps
    /// polling.
    #[test]
    fn poller_steps_aside_for_a_client_that_sends_ahead() {
        use std::io::Write;
        use std::os::fd::AsFd;
        let (mut client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut p = Poller::new(Duration::from_millis(50), true);
        let mut buf = [0u8; 64];

        // Queue depth one: the request comes while the server polls.
        let mut c = client.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            c.write_all(b"late").unwrap();
        });
        assert_eq!(p.poll(server.as_fd(), &mut buf, true).unwrap().unwrap(), 4);
        sender.join().unwrap();
        assert_eq!(p.ahead, 0, "a poll that waited keeps polling");

        // Ahead: the request is there before the poll.
        client.write_all(b"early").unwrap();
        assert_eq!(p.poll(server.as_fd(), &mut buf, true).unwrap().unwrap(), 5);
        assert_eq!(p.ahead, AHEAD_WAITS);
        client.write_all(b"more").unwrap();
        for _ in 0..AHEAD_WAITS {
            assert!(
                p.poll(server.as_fd(), &mut buf, true).is_none(),
                "the reactor's turn"
            );
        }
        assert_eq!(p.poll(server.as_fd(), &mut buf, true).unwrap().unwrap(), 4);
        assert_eq!(p.ahead, AHEAD_WAITS, "still ahead");

        // Nothing comes: the poll gives up after its budget.
        for _ in 0..AHEAD_WAITS {
            assert!(p.poll(server.as_fd(), &mut buf, true).is_none());
        }
        let t = Instant::now();
        assert!(p.poll(server.as_fd(), &mut buf, true).is_none());
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert_eq!(p.ahead, 0);

        // A poller that does not step aside (Unix sockets) keeps polling.
        let mut p = Poller::new(Duration::from_millis(50), false);
        client.write_all(b"early").unwrap();
        assert_eq!(p.poll(server.as_fd(), &mut buf, true).unwrap().unwrap(), 5);
        client.write_all(b"more").unwrap();
        assert_eq!(p.poll(server.as_fd(), &mut buf, true).unwrap().unwrap(), 4);
        // Nor does the rest of a request count, over TCP either.
        let mut p = Poller::new(Duration::from_millis(50), true);
        client.write_all(b"payload").unwrap();
        assert_eq!(p.poll(server.as_fd(), &mut buf, false).unwrap().unwrap(), 7);
        assert_eq!(p.ahead, 0);
    }

    const SIZE: u64 = 64 << 20;

    fn export(read_only: bool) -> Export {
        let mut o = SparseOptions::new(SIZE);
        o.buffer_limit = 256 << 20;
        o.read_only = read_only;
        Export {
            name: String::new(),
            description: String::new(),
            device: Arc::new(SparseDevice::new(HostBackend::new(), o).unwrap()),
            metrics: None,
        }
    }

    /// Starts the transmission phase on one end of a socket pair; returns the other end.
    fn start(framing: Framing, read_only: bool) -> (UnixStream, tokio::task::JoinHandle<Summary>) {
        start_on(export(read_only), framing)
    }

    /// Like [`start`], on a given export.
    fn start_on(
        export: Export,
        framing: Framing,
    ) -> (UnixStream, tokio::task::JoinHandle<Summary>) {
        let (client, server) = UnixStream::pair().unwrap();
        let neg = Negotiated {
            export: 0,
            framing,
            allocation_context: (framing != Framing::Simple).then_some(ALLOCATION_CONTEXT_ID),
            flags: transmission_flags(&export.device.capabilities(), framing),
        };
        let task = spawn_run(server, export, neg, 64 << 20);
        (client, task)
    }

    /// Runs the transmission phase of `export` on `server` (busy polling on, no per-client
    /// budget) with `inflight` bytes of in-flight budget.
    fn spawn_run(
        server: UnixStream,
        export: Export,
        neg: Negotiated,
        inflight: usize,
    ) -> tokio::task::JoinHandle<Summary> {
        let limits = Limits {
            max_connections: 1,
            inflight_bytes: inflight,
            handshake_timeout: Duration::from_secs(5),
            max_per_client: 1,
            client_inflight_bytes: 64 << 20,
            tls: None,
            busy_poll: Duration::from_micros(50),
        };
        tokio::spawn(async move {
            let (rd, wr) = server.into_split();
            let shutdown = CancellationToken::new();
            run(
                rd,
                wr,
                &export,
                &neg,
                &limits,
                limits.busy_poll,
                None,
                &shutdown,
            )
            .await
        })
    }

    fn request(ext: bool, cmd: u16, flags: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
        let mut b = Vec::with_capacity(32);
        if ext {
            b.extend_from_slice(&proto::EXTENDED_REQUEST_MAGIC.to_be_bytes());
        } else {
            b.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        }
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        if ext {
            b.extend_from_slice(&len.to_be_bytes());
        } else {
            b.extend_from_slice(&(len as u32).to_be_bytes());
        }
        b
    }

    async fn simple_reply(c: &mut UnixStream) -> (u32, u64) {
        let mut h = [0u8; 16];
        c.read_exact(&mut h).await.unwrap();
        assert_eq!(&h[0..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// A structured or extended chunk: (flags, type, cookie, payload).
    async fn chunk(c: &mut UnixStream, ext: bool) -> (u16, u16, u64, Vec<u8>) {
        let mut h = vec![0u8; if ext { 32 } else { 20 }];
        c.read_exact(&mut h).await.unwrap();
        let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
        let len = if ext {
            assert_eq!(magic, proto::EXTENDED_REPLY_MAGIC);
            u64::from_be_bytes(h[24..32].try_into().unwrap()) as usize
        } else {
            assert_eq!(magic, proto::STRUCTURED_REPLY_MAGIC);
            u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize
        };
        let mut p = vec![0u8; len];
        c.read_exact(&mut p).await.unwrap();
        (
            u16::from_be_bytes(h[4..6].try_into().unwrap()),
            u16::from_be_bytes(h[6..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            p,
        )
    }

    #[tokio::test]
    async fn pipelined_requests_all_answered() {
        let (mut c, task) = start(Framing::Simple, false);
        // 300 writes sent before reading any reply, then 300 reads.
        let n = 300u64;
        let mut out = Vec::new();
        for i in 0..n {
            out.extend(request(false, proto::CMD_WRITE, 0, i, i * 4096, 4096));
            out.extend(std::iter::repeat_n(i as u8, 4096));
        }
        c.write_all(&out).await.unwrap();
        let mut seen = vec![false; n as usize];
        for _ in 0..n {
            let (err, cookie) = simple_reply(&mut c).await;
            assert_eq!(err, 0);
            assert!(!std::mem::replace(&mut seen[cookie as usize], true));
        }
        out.clear();
        for i in 0..n {
            out.extend(request(false, proto::CMD_READ, 0, 1000 + i, i * 4096, 4096));
        }
        c.write_all(&out).await.unwrap();
        for _ in 0..n {
            let (err, cookie) = simple_reply(&mut c).await;
            assert_eq!(err, 0);
            let mut data = vec![0u8; 4096];
            c.read_exact(&mut data).await.unwrap();
            let i = cookie - 1000;
            assert!(data.iter().all(|&b| b == i as u8), "data of read {i}");
        }
        c.write_all(&request(false, proto::CMD_DISC, 0, 0, 0, 0))
            .await
            .unwrap();
        let s = task.await.unwrap();
        assert!(matches!(s.ended, Ended::Disconnect), "{}", s.ended);
        assert_eq!(s.requests, 2 * n + 1);
    }

    #[tokio::test]
    async fn errors_are_replies_and_the_connection_goes_on() {
        let (mut c, task) = start(Framing::Simple, false);
        let inval = NbdError::Inval.code();
        // Read past the end.
        c.write_all(&request(false, proto::CMD_READ, 0, 1, SIZE - 512, 4096))
            .await
            .unwrap();
        assert_eq!(simple_reply(&mut c).await, (inval, 1));
        // Write past the end: ENOSPC, and its payload is skipped.
        let mut w = request(false, proto::CMD_WRITE, 0, 2, SIZE - 512, 4096);
        w.extend(vec![0xee; 4096]);
        c.write_all(&w).await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (NbdError::NoSpc.code(), 2));
        // A write larger than the maximum payload: EINVAL, payload skipped.
        let big = (33 << 20) as u64;
        c.write_all(&request(false, proto::CMD_WRITE, 0, 3, 0, big))
            .await
            .unwrap();
        c.write_all(&vec![0u8; big as usize]).await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (inval, 3));
        // Unknown command and unknown flag.
        c.write_all(&request(false, 42, 0, 4, 0, 0)).await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (inval, 4));
        c.write_all(&request(false, proto::CMD_READ, 0x100, 5, 0, 512))
            .await
            .unwrap();
        assert_eq!(simple_reply(&mut c).await, (inval, 5));
        // Write zeroes past the end: ENOSPC as the spec asks; trim past the end: EINVAL.
        c.write_all(&request(false, proto::CMD_WRITE_ZEROES, 0, 6, SIZE, 1))
            .await
            .unwrap();
        assert_eq!(simple_reply(&mut c).await, (NbdError::NoSpc.code(), 6));
        c.write_all(&request(false, proto::CMD_TRIM, 0, 7, SIZE, 1))
            .await
            .unwrap();
        assert_eq!(simple_reply(&mut c).await, (inval, 7));
        // Block status without a context: EINVAL.
        c.write_all(&request(false, proto::CMD_BLOCK_STATUS, 0, 8, 0, 4096))
            .await
            .unwrap();
        assert_eq!(simple_reply(&mut c).await, (inval, 8));
        // Still usable.
        let mut w = request(false, proto::CMD_WRITE, proto::CMD_FLAG_FUA, 9, 512, 3);
        w.extend(b"abc");
        w.extend(request(false, proto::CMD_READ, 0, 10, 512, 3));
        c.write_all(&w).await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (0, 9));
        assert_eq!(simple_reply(&mut c).await, (0, 10));
        let mut d = [0u8; 3];
        c.read_exact(&mut d).await.unwrap();
        assert_eq!(&d, b"abc");
        drop(c);
        assert!(matches!(task.await.unwrap().ended, Ended::Eof));
    }

    #[tokio::test]
    async fn read_only_refuses_writes_with_eperm() {
        let (mut c, _task) = start(Framing::Simple, true);
        let mut w = request(false, proto::CMD_WRITE, 0, 1, 0, 512);
        w.extend(vec![1u8; 512]);
        w.extend(request(false, proto::CMD_TRIM, 0, 2, 0, 512));
        w.extend(request(false, proto::CMD_WRITE_ZEROES, 0, 3, 0, 512));
        w.extend(request(false, proto::CMD_READ, 0, 4, 0, 512));
        c.write_all(&w).await.unwrap();
        let perm = NbdError::Perm.code();
        assert_eq!(simple_reply(&mut c).await, (perm, 1));
        assert_eq!(simple_reply(&mut c).await, (perm, 2));
        assert_eq!(simple_reply(&mut c).await, (perm, 3));
        assert_eq!(simple_reply(&mut c).await, (0, 4));
    }

    #[tokio::test]
    async fn structured_reads_send_holes_and_data() {
        let (mut c, _task) = start(Framing::Structured, false);
        // Chunks are 1 MiB: data only in the second one.
        let mut w = request(false, proto::CMD_WRITE, 0, 1, (1 << 20) + 100, 4);
        w.extend(b"data");
        c.write_all(&w).await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (0, 1));
        c.write_all(&request(false, proto::CMD_READ, 0, 2, 512, 3 << 20))
            .await
            .unwrap();
        let mut covered = 512u64;
        loop {
            let (flags, kind, cookie, p) = chunk(&mut c, false).await;
            assert_eq!(cookie, 2);
            let off = u64::from_be_bytes(p[0..8].try_into().unwrap());
            assert_eq!(off, covered, "chunks arrive in order and cover the range");
            match kind {
                proto::REPLY_TYPE_OFFSET_HOLE => {
                    covered += u32::from_be_bytes(p[8..12].try_into().unwrap()) as u64;
                }
                proto::REPLY_TYPE_OFFSET_DATA => {
                    assert_eq!(off, 1 << 20);
                    assert_eq!(&p[8 + 100..8 + 104], b"data");
                    covered += p.len() as u64 - 8;
                }
                k => panic!("chunk type {k}"),
            }
            if flags & proto::REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        assert_eq!(covered, 512 + (3 << 20));
        // DF: one data chunk with the zeros spelled out.
        c.write_all(&request(
            false,
            proto::CMD_READ,
            proto::CMD_FLAG_DF,
            3,
            0,
            2 << 20,
        ))
        .await
        .unwrap();
        let (flags, kind, _, p) = chunk(&mut c, false).await;
        assert_eq!(
            (flags, kind),
            (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA)
        );
        assert_eq!(p.len(), 8 + (2 << 20));
        // Errors are error chunks with a message.
        c.write_all(&request(false, proto::CMD_READ, 0, 4, SIZE, 1))
            .await
            .unwrap();
        let (flags, kind, _, p) = chunk(&mut c, false).await;
        assert_eq!(
            (flags, kind),
            (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR)
        );
        assert_eq!(u32::from_be_bytes(p[0..4].try_into().unwrap()), 22);
        let msg_len = u16::from_be_bytes(p[4..6].try_into().unwrap()) as usize;
        assert!(String::from_utf8_lossy(&p[6..6 + msg_len]).contains("past the end"));
    }

    /// Reads a structured reply to `cookie` into a buffer of `len` bytes at `offset`:
    /// holes as zeros, data where the chunks say, every byte covered once.
    async fn structured_read(c: &mut UnixStream, cookie: u64, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0xeeu8; len];
        let mut covered = 0usize;
        loop {
            let (flags, kind, got, p) = chunk(c, false).await;
            assert_eq!(got, cookie);
            let at = (u64::from_be_bytes(p[0..8].try_into().unwrap()) - offset) as usize;
            match kind {
                proto::REPLY_TYPE_OFFSET_HOLE => {
                    let n = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                    out[at..at + n].fill(0);
                    covered += n;
                }
                proto::REPLY_TYPE_OFFSET_DATA => {
                    out[at..at + p.len() - 8].copy_from_slice(&p[8..]);
                    covered += p.len() - 8;
                }
                k => panic!("chunk type {k}"),
            }
            if flags & proto::REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        assert_eq!(covered, len);
        out
    }

    /// Reads are sent from the chunks in place on host memory and through a buffer where
    /// the device cannot lend its memory (GPU); both must send the same bytes, also when
    /// a reply needs more pieces than one writev takes (4 KiB chunks, every other one a
    /// hole: 4096 pieces in 16 MiB).
    #[tokio::test]
    async fn reads_lent_in_place_and_copied_agree_across_thousands_of_pieces() {
        let mut o = SparseOptions::new(SIZE);
        o.buffer_limit = 256 << 20;
        o.chunk_size = 4096;
        let dev: Arc<dyn BlockDevice> = Arc::new(SparseDevice::new(HostBackend::new(), o).unwrap());
        let len = 16usize << 20;
        for i in (0..len / 4096).step_by(2) {
            let block: Vec<u8> = (0..4096).map(|j| (i * 7 + j / 16) as u8 | 1).collect();
            dev.write((i * 4096) as u64, &block, false).await.unwrap();
        }
        let mut want = vec![0u8; len];
        dev.read(0, &mut want).await.unwrap();
        assert!(
            dev.view(0, len as u64).is_some(),
            "host memory lends itself"
        );
        let copied: Arc<dyn BlockDevice> = Arc::new(SlowWrites(dev.clone()));
        assert!(copied.view(0, len as u64).is_none());
        for device in [dev, copied] {
            let export = || Export {
                name: String::new(),
                description: String::new(),
                device: device.clone(),
                metrics: None,
            };
            // Simple reply: the whole range as one payload.
            let (mut c, _task) = start_on(export(), Framing::Simple);
            c.write_all(&request(false, proto::CMD_READ, 0, 1, 0, len as u64))
                .await
                .unwrap();
            assert_eq!(simple_reply(&mut c).await, (0, 1));
            let mut got = vec![0u8; len];
            c.read_exact(&mut got).await.unwrap();
            assert!(got == want, "simple read differs");
            // Structured: holes as hole chunks (thousands of chunks), then with DF as one
            // data chunk.
            let (mut c, _task) = start_on(export(), Framing::Structured);
            c.write_all(&request(false, proto::CMD_READ, 0, 2, 0, len as u64))
                .await
                .unwrap();
            assert!(
                structured_read(&mut c, 2, 0, len).await == want,
                "sparse read differs"
            );
            let df = proto::CMD_FLAG_DF;
            c.write_all(&request(
                false,
                proto::CMD_READ,
                df,
                3,
                4096,
                len as u64 - 8192,
            ))
            .await
            .unwrap();
            let got = structured_read(&mut c, 3, 4096, len - 8192).await;
            assert!(got == want[4096..len - 4096], "DF read differs");
        }
    }

    #[tokio::test]
    async fn extended_headers_and_block_status() {
        let (mut c, _task) = start(Framing::Extended, false);
        // qemu 10 writes without NBD_CMD_FLAG_PAYLOAD_LEN; libnbd sets it. Both carry data.
        let mut w = request(true, proto::CMD_WRITE, 0, 1, 2 << 20, 512);
        w.extend(vec![7u8; 512]);
        w.extend(request(
            true,
            proto::CMD_WRITE,
            proto::CMD_FLAG_PAYLOAD_LEN,
            2,
            (2 << 20) + 512,
            512,
        ));
        w.extend(vec![8u8; 512]);
        c.write_all(&w).await.unwrap();
        for want in [1, 2] {
            let (flags, kind, cookie, p) = chunk(&mut c, true).await;
            assert_eq!(
                (flags, kind, cookie),
                (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, want)
            );
            assert!(p.is_empty());
        }
        c.write_all(&request(true, proto::CMD_BLOCK_STATUS, 0, 3, 0, SIZE))
            .await
            .unwrap();
        let (flags, kind, _, p) = chunk(&mut c, true).await;
        assert_eq!(
            (flags, kind),
            (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_BLOCK_STATUS_EXT)
        );
        assert_eq!(
            u32::from_be_bytes(p[0..4].try_into().unwrap()),
            ALLOCATION_CONTEXT_ID
        );
        let count = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
        assert_eq!(p.len(), 8 + 16 * count);
        let d: Vec<(u64, u64)> = p[8..]
            .chunks(16)
            .map(|e| {
                (
                    u64::from_be_bytes(e[0..8].try_into().unwrap()),
                    u64::from_be_bytes(e[8..16].try_into().unwrap()),
                )
            })
            .collect();
        let hz = (proto::STATE_HOLE | proto::STATE_ZERO) as u64;
        assert_eq!(d, vec![(2 << 20, hz), (1 << 20, 0), (SIZE - (3 << 20), hz)]);
        // REQ_ONE: a single descriptor no longer than asked.
        c.write_all(&request(
            true,
            proto::CMD_BLOCK_STATUS,
            proto::CMD_FLAG_REQ_ONE,
            4,
            4096,
            8192,
        ))
        .await
        .unwrap();
        let (_, _, _, p) = chunk(&mut c, true).await;
        assert_eq!(p.len(), 8 + 16);
        assert_eq!(u64::from_be_bytes(p[8..16].try_into().unwrap()), 8192);
        // A payload on a command that takes none is skipped, then refused.
        let mut w = request(
            true,
            proto::CMD_FLUSH,
            proto::CMD_FLAG_PAYLOAD_LEN,
            5,
            0,
            100,
        );
        w.extend(vec![0u8; 100]);
        w.extend(request(true, proto::CMD_FLUSH, 0, 6, 0, 0));
        c.write_all(&w).await.unwrap();
        let (_, kind, cookie, _) = chunk(&mut c, true).await;
        assert_eq!((kind, cookie), (proto::REPLY_TYPE_ERROR, 5));
        let (_, kind, cookie, _) = chunk(&mut c, true).await;
        assert_eq!((kind, cookie), (proto::REPLY_TYPE_NONE, 6));
    }

    #[tokio::test]
    async fn garbage_closes_the_connection() {
        let (mut c, task) = start(Framing::Simple, false);
        c.write_all(&[0xde; 28]).await.unwrap();
        let s = task.await.unwrap();
        assert!(s.ended.is_violation(), "{}", s.ended);
        let mut b = [0u8; 1];
        assert_eq!(c.read(&mut b).await.unwrap(), 0, "socket closed");
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_is_held_back_not_buffered() {
        // With a 1 MiB budget the server stops reading after about 1 MiB of read data in
        // flight instead of queueing every reply.
        let (c, server) = UnixStream::pair().unwrap();
        let export = export(false);
        let neg = Negotiated {
            export: 0,
            framing: Framing::Simple,
            allocation_context: None,
            flags: transmission_flags(&export.device.capabilities(), Framing::Simple),
        };
        let pool = export.device.buffers().clone();
        let task = spawn_run(server, export, neg, 1 << 20);
        let (mut crd, mut cwr) = c.into_split();
        let sender = tokio::spawn(async move {
            for i in 0..4096u64 {
                if cwr
                    .write_all(&request(false, proto::CMD_READ, 0, i, 0, 64 << 10))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            cwr
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        // 4096 reads of 64 KiB would be 256 MiB; the pool shows what is held.
        let free_before = pool.limit();
        let mut probe = Vec::new();
        while let Ok(Some(b)) = pool.try_get(1 << 20) {
            probe.push(b);
        }
        let held = free_before - probe.len() * (1 << 20);
        assert!(
            held <= 8 << 20,
            "{held} bytes of buffers held for a stalled client"
        );
        drop(probe);
        // Reading the replies lets everything complete.
        let mut got = 0;
        let mut hdr = [0u8; 16];
        let mut data = vec![0u8; 64 << 10];
        while got < 4096 {
            crd.read_exact(&mut hdr).await.unwrap();
            crd.read_exact(&mut data).await.unwrap();
            got += 1;
        }
        let cwr = sender.await.unwrap();
        drop(cwr);
        drop(crd);
        let _ = task.await;
    }

    #[tokio::test]
    async fn a_client_that_vanishes_costs_nothing() {
        let (c, server) = UnixStream::pair().unwrap();
        let export = export(false);
        let pool = export.device.buffers().clone();
        let neg = Negotiated {
            export: 0,
            framing: Framing::Structured,
            allocation_context: None,
            flags: transmission_flags(&export.device.capabilities(), Framing::Structured),
        };
        let task = spawn_run(server, export, neg, 64 << 20);
        let mut c = c;
        let mut w = Vec::new();
        // Within the budget, so that the server reads it all without the client reading
        // a reply (a client that never reads would block its own writes otherwise).
        for i in 0..40u64 {
            w.extend(request(false, proto::CMD_WRITE, 0, i, i * 4096, 4096));
            w.extend(vec![1u8; 4096]);
            w.extend(request(false, proto::CMD_READ, 0, i, 0, 1 << 20));
        }
        c.write_all(&w).await.unwrap();
        drop(c);
        let s = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("connection ends promptly")
            .unwrap();
        assert!(!s.ended.is_violation(), "{}", s.ended);
        // Every buffer is back: the whole budget can be taken at once.
        assert!(pool.try_get(pool.limit()).unwrap().is_some());
    }

    #[tokio::test]
    async fn pipelined_writes_of_mixed_sizes_land_intact() {
        let (c, task) = start(Framing::Structured, false);
        let (mut crd, mut cwr) = c.into_split();
        let sizes = [1usize, 511, 4096, 33_000, 70_000, 1 << 20, 7, 200_000];
        let mut layout = Vec::new();
        let mut at = 0u64;
        for round in 0..3 {
            for (k, &len) in sizes.iter().enumerate() {
                layout.push((at, len, (round * 16 + k) as u8 + 1));
                at += len as u64 + 13;
            }
        }
        let expected = layout.clone();
        let sender = tokio::spawn(async move {
            for (i, &(off, len, fill)) in expected.iter().enumerate() {
                let mut w = request(false, proto::CMD_WRITE, 0, i as u64, off, len as u64);
                w.extend(std::iter::repeat_n(fill, len));
                cwr.write_all(&w).await.unwrap();
            }
            for (i, &(off, len, _)) in expected.iter().enumerate() {
                let r = request(
                    false,
                    proto::CMD_READ,
                    proto::CMD_FLAG_DF,
                    1000 + i as u64,
                    off,
                    len as u64,
                );
                cwr.write_all(&r).await.unwrap();
            }
            cwr
        });
        for _ in 0..layout.len() {
            let mut h = [0u8; 16];
            crd.read_exact(&mut h).await.unwrap();
            assert_eq!(&h[4..8], &[0, 0, 0, 0], "write succeeded");
        }
        for _ in 0..layout.len() {
            let mut h = [0u8; 20];
            crd.read_exact(&mut h).await.unwrap();
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut p = vec![0u8; len];
            crd.read_exact(&mut p).await.unwrap();
            let (off, want_len, fill) = layout[(cookie - 1000) as usize];
            assert_eq!(u64::from_be_bytes(p[0..8].try_into().unwrap()), off);
            assert_eq!(p.len() - 8, want_len);
            assert!(p[8..].iter().all(|&b| b == fill), "data at {off}");
        }
        drop(sender.await.unwrap());
        drop(crd);
        assert!(matches!(task.await.unwrap().ended, Ended::Eof));
    }

    /// Bytes that differ from `pattern(seed ^ 1, ..)` everywhere, made 8 at a time.
    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        while v.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // The low bit of every byte is the seed's: two seeds that differ there differ in
            // every byte.
            let w = (x & !0x0101_0101_0101_0101) | ((seed & 1) * 0x0101_0101_0101_0101);
            v.extend_from_slice(&w.to_le_bytes());
        }
        v.truncate(len);
        v
    }

    /// A connection cut at any byte of a batch of pipelined writes (inside a header, inside
    /// a payload held in the read buffer, inside one read straight into the I/O buffer, on
    /// the boundaries): once the server has finished the connection, a write it did not
    /// receive whole has changed nothing, and one sent whole has landed whole or not at all.
    #[tokio::test]
    async fn a_write_cut_anywhere_never_lands_in_part() {
        let dev = export(false).device;
        let sizes = [
            1usize,
            511,
            4096,
            20_000,
            33_000,
            131_000,
            150_000,
            200_000,
            1 << 20,
        ];
        let mut rng = 0x5eed_u64;
        let mut next = move |n: usize| {
            rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) % n.max(1) as u64) as usize
        };
        let (mut whole, mut landed, mut cut_short) = (0, 0, 0);
        for round in 0..240u64 {
            let ext = round % 2 == 1;
            let framing = if ext {
                Framing::Extended
            } else {
                Framing::Simple
            };
            // Up to 6 writes at increasing offsets, each over old data of its own.
            let mut writes = Vec::new();
            let mut at = next(1 << 20) as u64;
            let mut batch = Vec::new();
            for k in 0..1 + next(6) {
                let len = if next(8) == 0 {
                    sizes[8]
                } else {
                    sizes[next(8)]
                };
                let seed = (round << 8 | k as u64) << 1;
                let old = pattern(seed, len);
                dev.write(at, &old, false).await.unwrap();
                batch.extend(request(ext, proto::CMD_WRITE, 0, k as u64, at, len as u64));
                batch.extend(pattern(seed | 1, len));
                writes.push((at, len, seed, batch.len()));
                at += len as u64 + next(5000) as u64;
            }
            // Half the cuts anywhere, half on or next to the end of a header or payload.
            let cut = if next(2) == 0 {
                1 + next(batch.len())
            } else {
                let hlen = proto::request_len(ext);
                let (_, _, _, end) = writes[next(writes.len())];
                let at = if next(2) == 0 { end } else { end - hlen };
                (at + next(3)).saturating_sub(1).clamp(1, batch.len())
            };
            let export = Export {
                name: String::new(),
                description: String::new(),
                device: dev.clone(),
                metrics: None,
            };
            let (mut c, task) = start_on(export, framing);
            // Sent in uneven pieces, so the server's reads end at varied places.
            let mut sent = 0;
            while sent < cut {
                let n = (1 + next(96 << 10)).min(cut - sent);
                if c.write_all(&batch[sent..sent + n]).await.is_err() {
                    break;
                }
                sent += n;
                tokio::task::yield_now().await;
            }
            drop(c);
            let s = tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the connection ends")
                .unwrap();
            assert!(
                !matches!(s.ended, Ended::Shutdown),
                "round {round}: {}",
                s.ended
            );
            for (k, &(off, len, seed, end)) in writes.iter().enumerate() {
                let mut got = vec![0u8; len];
                dev.read(off, &mut got).await.unwrap();
                let old = pattern(seed, len);
                if end <= cut {
                    whole += 1;
                    if got != old {
                        assert!(
                            got == pattern(seed | 1, len),
                            "round {round}: write {k} ({len} bytes, sent whole) landed in part"
                        );
                        landed += 1;
                    }
                } else {
                    cut_short += 1;
                    let changed = got.iter().zip(&old).filter(|(a, b)| a != b).count();
                    assert_eq!(
                        changed,
                        0,
                        "round {round}: write {k} of {len} bytes, cut {} bytes before its end, \
                         changed {changed} bytes",
                        end - cut
                    );
                }
            }
        }
        // Both kinds were tested, and writes sent whole did land.
        assert!(
            cut_short > 100 && whole > 100 && landed > 50,
            "{cut_short} {whole} {landed}"
        );
    }

    /// A device whose writes wait before they land, as GPU copies do.
    struct SlowWrites(Arc<dyn BlockDevice>);

    #[async_trait::async_trait]
    impl BlockDevice for SlowWrites {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn capabilities(&self) -> Capabilities {
            self.0.capabilities()
        }
        fn describe(&self) -> String {
            self.0.describe()
        }
        fn buffers(&self) -> &crate::engine::BufferPool {
            self.0.buffers()
        }
        fn stats(&self) -> crate::engine::DeviceStats {
            self.0.stats()
        }
        async fn read(&self, offset: u64, buf: &mut [u8]) -> crate::engine::IoResult<()> {
            self.0.read(offset, buf).await
        }
        async fn write(&self, offset: u64, data: &[u8], fua: bool) -> crate::engine::IoResult<()> {
            tokio::time::sleep(Duration::from_millis(300)).await;
            self.0.write(offset, data, fua).await
        }
        async fn write_zeroes(
            &self,
            offset: u64,
            len: u64,
            flags: ZeroFlags,
        ) -> crate::engine::IoResult<()> {
            self.0.write_zeroes(offset, len, flags).await
        }
        async fn trim(&self, offset: u64, len: u64) -> crate::engine::IoResult<()> {
            self.0.trim(offset, len).await
        }
        async fn flush(&self) -> crate::engine::IoResult<()> {
            self.0.flush().await
        }
        async fn cache(&self, offset: u64, len: u64) -> crate::engine::IoResult<()> {
            self.0.cache(offset, len).await
        }
        fn extents(
            &self,
            offset: u64,
            len: u64,
            out: &mut Vec<Extent>,
        ) -> crate::engine::IoResult<()> {
            self.0.extents(offset, len, out)
        }
    }

    /// However a connection ends (here: dropped for a protocol violation while a write
    /// still waits for its device), the transmission phase returns only once every write
    /// it started has landed: when the server says a connection is closed, nothing of it can
    /// overwrite what the client writes next on a new one.
    #[tokio::test]
    async fn a_dropped_connection_ends_after_its_writes_land() {
        let inner = export(false).device;
        let export = Export {
            name: String::new(),
            description: String::new(),
            device: Arc::new(SlowWrites(inner.clone())),
            metrics: None,
        };
        for garbage in [true, false] {
            let (mut c, task) = start_on(
                Export {
                    name: String::new(),
                    description: String::new(),
                    device: export.device.clone(),
                    metrics: None,
                },
                Framing::Simple,
            );
            let fill = if garbage { 0x11 } else { 0x22 };
            let mut w = request(false, proto::CMD_WRITE, 0, 1, 8192, 4096);
            w.extend(vec![fill; 4096]);
            if garbage {
                w.extend(vec![0xffu8; 28]);
            }
            c.write_all(&w).await.unwrap();
            let t0 = std::time::Instant::now();
            drop(c);
            let s = tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the connection ends")
                .unwrap();
            assert_eq!(s.ended.is_violation(), garbage, "{}", s.ended);
            let mut got = vec![0u8; 4096];
            inner.read(8192, &mut got).await.unwrap();
            assert!(
                got.iter().all(|&b| b == fill),
                "the connection ended ({}) {:?} after the client left, before its write landed",
                s.ended,
                t0.elapsed()
            );
        }
    }
}
