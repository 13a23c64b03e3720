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
//! (the `busy` flag of the outbox) keeps the byte stream in order.
//!
//! Backpressure: every request holds permits of a per-connection semaphore sized by
//! [`Limits::inflight_bytes`] (the I/O buffer its data takes plus a fixed overhead) until
//! its reply is written, and as many of its client's semaphore, which all connections from
//! one source share ([`Limits::client_inflight_bytes`]); when either budget is spent the
//! reader stops reading, and TCP pushes back on the client. Buffers come from the devices'
//! bounded pool (`--buffer-memory`), which caps memory daemon-wide; the client budget keeps
//!
//! The pieces, one file each: [`socket`] (the two halves of the socket), [`poll`] (busy
//! polling), [`inbuf`] (the read buffer), [`reply`] (what a reply holds), [`outbox`] (the
//! replies' way to the socket and the writer task), [`commands`] (what to do with a
//! request, decided without I/O) and [`execute`] (doing it). This file holds the
//! connection itself: setup, the read loop, budgets, payloads and the orderly close.

mod commands;
mod execute;
mod inbuf;
mod local_ops;
mod outbox;
mod poll;
mod reply;
mod socket;
#[cfg(test)]
mod tests;

pub(crate) use poll::set_thread_load;
pub(crate) use socket::{Sink, Source};

use super::export::{ConnectionLimits, Export};
use super::handshake::Negotiated;
use super::proto::{self, Request};
use crate::engine::{self, BlockDevice, Extent, IoBuf, IoError, Plug};
use commands::Terms;
use inbuf::{InBuf, READ_BUF};
use local_ops::{LocalOps, OpFuture};
use outbox::{AbortOnDrop, Outbox, writer};
use poll::{PollStats, Poller, alone_on_thread};
use reply::{Body, ConnBudget, Permit, Reply, ReplyTo};
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::trace;

/// Longest a connection that ends cleanly waits for the client to take its last replies
/// before the socket closes (see `run`).
pub(crate) const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Budget charged to every request on top of its data: bounds the number of queued
/// replies even for requests without data.
const REQUEST_OVERHEAD: u64 = 256;
/// Payload remainders up to this size are read through the read buffer.
const SMALL_PAYLOAD: usize = 32 << 10;
/// The reader writes its batch of replies once it holds this many...
const BATCH_REPLIES: usize = 128;
/// ...or this many bytes of data.
const BATCH_BYTES: usize = 256 << 10;

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
    /// A streamed read failed after the start of its simple reply was sent, which then
    /// has no way to carry an error: the connection is dropped so that the client sees
    /// a failure rather than wrong data.
    ReadCut(String),
}

impl Ended {
    /// True for endings that mean a broken or hostile client (logged as warnings).
    pub(crate) fn is_violation(&self) -> bool {
        matches!(self, Ended::Protocol(_))
    }

    /// True for endings worth a warning: violations, and reads cut short.
    pub(crate) fn warns(&self) -> bool {
        self.is_violation() || matches!(self, Ended::ReadCut(_))
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
            Ended::ReadCut(why) => write!(
                f,
                "a streamed read failed after its simple reply had started ({why}); \
                 closed so the client does not take the rest for data"
            ),
        }
    }
}

/// What a finished transmission phase reports.
pub(crate) struct Summary {
    /// Why it ended.
    pub ended: Ended,
    /// Requests received.
    pub requests: u64,
    /// What busy polling did.
    pub polls: PollStats,
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
    /// What requests are judged against.
    terms: Terms,
    budget: Arc<ConnBudget>,
    budget_max: u64,
    /// The budget shared by every connection of this client, if any.
    client_budget: Option<ClientBudget>,
    extents: Vec<Extent>,
    requests: u64,
    poller: Poller,
    /// Operations that had to wait, in flight in the reader (see [`local_ops`]).
    local: LocalOps,
    /// The request being served is not the last one the read buffer holds: operations
    /// started for it are told more follow ([`crate::engine::Plug`]).
    more_queued: bool,
}

/// The in-flight budget that all connections from one source share (see
/// [`crate::nbd::export::Limits::client_inflight_bytes`]): made once per source by the
/// listener, held by each of its connections.
#[derive(Clone)]
pub(crate) struct ClientBudget {
    permits: Arc<Semaphore>,
    /// Its size: no request takes more.
    size: u64,
}

impl ClientBudget {
    /// A budget of `bytes` (at least 1 MiB, so that any request fits).
    pub(crate) fn new(bytes: usize) -> Self {
        let bytes = bytes.clamp(1 << 20, Semaphore::MAX_PERMITS);
        ClientBudget {
            permits: Arc::new(Semaphore::new(bytes)),
            size: bytes as u64,
        }
    }
}

/// Runs the transmission phase on a connection whose handshake chose `export`, within
/// `limits` (polling for requests up to `limits.busy_poll` before each wait, see
/// [`Poller`]) and, if given, the budget of the client's connections together.
pub(crate) async fn run<R, S>(
    rd: R,
    sink: S,
    export: &Export,
    neg: &Negotiated,
    limits: &ConnectionLimits,
    client_budget: Option<ClientBudget>,
    shutdown: &CancellationToken,
) -> Summary
where
    R: Source,
    S: Sink,
{
    let sink = Arc::new(sink);
    let out = Arc::new(Outbox::new());
    let mut writer = AbortOnDrop(tokio::spawn(writer(sink.clone(), out.clone())));
    let budget_max = (limits.inflight_bytes as u64).clamp(1 << 20, Semaphore::MAX_PERMITS as u64);
    let mut conn = Conn {
        rd,
        inbuf: InBuf::new(),
        sink: sink.clone(),
        out: out.clone(),
        batch: VecDeque::with_capacity(BATCH_REPLIES),
        batch_bytes: 0,
        dev: export.device.clone(),
        terms: Terms::new(
            export.device.capabilities(),
            export.device.size(),
            neg,
            limits.max_request,
        ),
        budget: Arc::new(ConnBudget::new(budget_max)),
        budget_max,
        client_budget,
        extents: Vec::new(),
        requests: 0,
        poller: Poller::new(limits.busy_poll, R::STEPS_ASIDE),
        local: LocalOps::new(),
        more_queued: false,
    };
    let ended = conn.serve(shutdown).await;
    // What is still in flight finishes as tasks, as if spawned from the start.
    conn.spawn_local_ops();
    let hard = ended.is_violation()
        || matches!(
            ended,
            Ended::ReadFailed(_) | Ended::WriteFailed | Ended::ReadCut(_)
        );
    if !hard {
        conn.flush_replies();
    }
    let requests = conn.requests;
    let polls = conn.poller.stats();
    drop(conn);
    out.reader_done(hard);
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
        out.ops_done().await;
    }
    Summary {
        ended,
        requests,
        polls,
    }
}

/// What the reader does after a request.
enum Next {
    Continue,
    Stop(Ended),
}

type OpResult = Result<(), Ended>;

impl<R: Source, S: Sink> Conn<R, S> {
    async fn serve(&mut self, shutdown: &CancellationToken) -> Ended {
        let hlen = proto::request_len(self.terms.extended());
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
                let r = tokio::select! {
                    biased;
                    r = self.wait_fill(next_request) => r,
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
            let req = match proto::parse_request(&self.inbuf.data()[..hlen], self.terms.extended())
            {
                Ok(r) => r,
                Err(e) => return Ended::Protocol(format!("{e} in a request header")),
            };
            self.inbuf.consume(hlen);
            self.requests += 1;
            let payload = if req.command == proto::CMD_WRITE {
                req.length
            } else {
                0
            };
            self.more_queued = self.inbuf.len() as u64 >= payload.saturating_add(hlen as u64);
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
            self.collect_local_ops();
            if self.batch.len() >= BATCH_REPLIES || self.batch_bytes >= BATCH_BYTES {
                self.flush_replies();
            }
            if dead.is_cancelled() {
                return Ended::WriteFailed;
            }
        }
    }

    /// One read from the socket into the read buffer. Meanwhile the reader's operations
    /// in flight (see [`local_ops`]) are driven, and the replies of those that complete go
    /// out at once. Cancel-safe, like [`InBuf::fill`].
    async fn wait_fill(&mut self, next_request: bool) -> io::Result<usize> {
        loop {
            if self.collect_local_ops() {
                self.flush_replies();
            }
            let poller = self.may_poll().then_some(&mut self.poller);
            if self.local.is_empty() {
                return self
                    .inbuf
                    .fill(&mut self.rd, poller, next_request, None)
                    .await;
            }
            let watch = self.local.watch();
            tokio::select! {
                biased;
                r = self.inbuf.fill(&mut self.rd, poller, next_request, Some(watch)) => return r,
                () = self.local.woken() => {}
            }
        }
    }

    /// Polls the reader's operations that completed into the batch; whether any did.
    fn collect_local_ops(&mut self) -> bool {
        let before = self.batch.len();
        let (batch, bytes) = (&mut self.batch, &mut self.batch_bytes);
        self.local.drive(|reply| {
            *bytes += reply.len();
            batch.push_back(reply);
        });
        self.batch.len() > before
    }

    /// Before the reader waits for anything but the next request: what plugs held goes out,
    /// operations in flight become tasks, and every reply done so far is written (a reply
    /// left in the batch would keep its share of the budget the reader may be waiting for).
    fn before_wait(&mut self) {
        self.spawn_local_ops();
        self.flush_replies();
    }

    /// Hands the reader's operations in flight to tasks of their own: before the reader
    /// waits for anything but the socket, so that their replies never wait for it.
    fn spawn_local_ops(&mut self) {
        engine::unplug();
        self.collect_local_ops();
        for op in self.local.drain() {
            let guard = self.out.op_started();
            tokio::spawn(async move {
                let reply = op.await;
                guard.deliver(reply);
                drop(guard);
            });
        }
    }

    /// Whether the reader's poller may spin at all now: the cheap part of [`Self::may_poll`]
    /// plus the machine's spare CPU, with no lock (it is asked once a request).
    fn may_spin(&self) -> bool {
        self.poller.is_on() && alone_on_thread() && crate::busy_poll::cpu_to_spare()
    }

    /// Whether waiting for the client may start with a poll (see [`Poller`]).
    fn may_poll(&self) -> bool {
        self.poller.is_on() && alone_on_thread() && !self.out.has_ops()
    }

    /// Writes the reader's batch now, as far as the socket takes it without waiting; the
    /// rest goes to the writer task. Called before every wait, so no reply sits in the
    /// batch while the reader is blocked.
    fn flush_replies(&mut self) {
        // Whatever plugs held goes out before the reader waits (see `engine::plug`).
        engine::unplug();
        if self.batch.is_empty() {
            return;
        }
        self.batch_bytes = 0;
        self.out.send_batch(&*self.sink, &mut self.batch);
    }

    fn reply_to(&self, req: &Request) -> ReplyTo {
        ReplyTo {
            framing: self.terms.framing,
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

    /// Runs an operation: polled once here; if it has to wait, it waits in the reader's
    /// table of operations in flight (see [`local_ops`]).
    fn start<F>(&mut self, op: F)
    where
        F: Future<Output = Reply> + Send + 'static,
    {
        let op: OpFuture = Box::pin(op);
        let plug = self.more_queued.then(Plug::new);
        // Where the reader's poller would not spin (off, a thread shared with other
        // connections, no CPU to spare), its operations must not spin for it by re-polling
        // themselves: they wait for their slot's wake (see `engine::Watched`).
        let watched = (!self.may_spin()).then(engine::Watched::new);
        let done = self.local.start(op);
        drop(watched);
        match plug {
            // Held for the last request of the burst, or until the reader waits.
            Some(plug) => plug.hold(),
            None => engine::unplug(),
        }
        if let Some(reply) = done {
            self.push(reply);
        }
    }

    /// Takes the budget of a request with `data` bytes of buffer (see [`REQUEST_OVERHEAD`]),
    /// waiting (after writing what is done) while the connection's or the client's is spent.
    async fn permit(&mut self, data: u64) -> Result<Permit, Ended> {
        let closed = |_| Ended::Protocol("in-flight budget closed".into());
        let want = data + REQUEST_OVERHEAD;
        let n = want.min(self.budget_max);
        let conn = match self.budget.try_take(n) {
            Some(p) => p,
            None => {
                self.before_wait();
                self.budget.take(n).await
            }
        };
        let client = match self.client_budget.as_ref().map(|b| {
            let n = want.min(b.size) as u32;
            (n, b.permits.clone().try_acquire_many_owned(n))
        }) {
            None => None,
            Some((_, Ok(p))) => Some(p),
            Some((n, Err(_))) => {
                // The client's other connections hold its share: wait for their replies
                // to go out, as for this connection's own budget.
                self.before_wait();
                let b = self.client_budget.clone().expect("checked above");
                Some(b.permits.acquire_many_owned(n).await.map_err(closed)?)
            }
        };
        Ok(Permit {
            _conn: conn,
            _client: client,
        })
    }

    /// An I/O buffer of `len` bytes from the device's pool, waiting (after writing what is
    /// done) while the pool is empty.
    async fn buffer(&mut self, len: u64) -> Result<IoBuf, IoError> {
        if let Some(b) = self.dev.buffers().try_get(len as usize)? {
            return Ok(b);
        }
        self.before_wait();
        self.dev.buffers().get(len as usize).await
    }

    /// Reads and throws away a payload the server will not use.
    async fn discard(&mut self, len: u64) -> OpResult {
        if len > self.terms.discard_limit {
            return Err(Ended::Protocol(format!(
                "request payload of {len} bytes (most accepted: {})",
                self.terms.max_request
            )));
        }
        let mut left = len;
        let n = left.min(self.inbuf.len() as u64) as usize;
        self.inbuf.consume(n);
        left -= n as u64;
        if left > 0 {
            self.before_wait();
        }
        while left > 0 {
            // The buffer is empty here: use it as scratch space.
            let n = left.min(READ_BUF as u64) as usize;
            let got = self
                .rd
                .read(self.inbuf.scratch(n))
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
                match self.wait_fill(false).await {
                    Ok(0) => return Err(closed()),
                    Ok(_) => continue,
                    Err(e) => return Err(Ended::ReadFailed(e)),
                }
            }
            // The rest goes straight into `dst`. The client is in the middle of sending it,
            // so a wait is usually short: poll before sleeping, as between requests.
            self.before_wait();
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
}
