//! The reply outbox: replies on their way to the socket, and the writer task that sends
//! what the reader could not write at once.
//!
//! One holder of the socket at a time (the `busy` flag of [`OutState`]) keeps the byte
//! stream in order: the reader writes its batch itself when the socket is free (see
//! [`write_now`]); otherwise its replies, and those of spawned operations, queue here for
//! the [`writer`], which waits for the socket to drain.

use super::reply::Reply;
use super::socket::Sink;
use std::cell::Cell;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Most buffers handed to one `writev` (Linux takes at most 1024).
const MAX_IOV: usize = 1024;

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

thread_local! {
    /// The slice list of [`write_once`], kept (empty) between calls: once grown, a `writev`
    /// allocates nothing, which at queue depth 1 was an allocation per request.
    static SLICES: Cell<Vec<IoSlice<'static>>> = const { Cell::new(Vec::new()) };
}

/// An empty list of slices of another lifetime in the same allocation: `collect` reuses a
/// vector's memory in place for an element of the same layout, and there is no element to
/// convert.
fn recycle<'b>(mut v: Vec<IoSlice<'_>>) -> Vec<IoSlice<'b>> {
    v.clear();
    v.into_iter().map(|_| unreachable!("cleared")).collect()
}

/// One `writev` of the front of `queue`, `skip` bytes into its first reply.
fn write_once<S: Sink + ?Sized>(
    sink: &S,
    queue: &VecDeque<Reply>,
    skip: usize,
) -> io::Result<usize> {
    let mut slices = recycle(SLICES.take());
    slices.reserve((queue.len() * 2).min(MAX_IOV));
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
    let written = sink.try_write_vectored(&view[..n]);
    // A reply of thousands of chunks (a sparse read) grows the list far past what one
    // writev takes: not kept, so a thread does not hold that much for good.
    if slices.capacity() <= 4 * MAX_IOV {
        SLICES.set(recycle(slices));
    }
    written
}

/// Replies on their way to the socket, shared by the reader, spawned operations and the
/// writer task.
pub(super) struct Outbox {
    state: Mutex<OutState>,
    /// Wakes the writer task; it owns the socket (`busy`) when woken.
    wake: Notify,
    /// Told when the last spawned operation ends.
    idle: Notify,
    /// Cancelled when writing fails: the reader stops.
    pub(super) dead: CancellationToken,
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
    pub(super) fn new() -> Self {
        Outbox {
            state: Mutex::new(OutState::default()),
            wake: Notify::new(),
            idle: Notify::new(),
            dead: CancellationToken::new(),
        }
    }

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

    /// Whether spawned operations of this connection are still running.
    pub(super) fn has_ops(&self) -> bool {
        self.lock().ops > 0
    }

    /// Counts an operation about to be spawned; the guard uncounts it when it ends.
    pub(super) fn op_started(self: &Arc<Self>) -> OpGuard {
        self.lock().ops += 1;
        OpGuard(self.clone())
    }

    /// Writes the reader's `batch` now, as far as the socket takes it without waiting; the
    /// rest goes to the writer task.
    pub(super) fn send_batch<S: Sink + ?Sized>(&self, sink: &S, batch: &mut VecDeque<Reply>) {
        let mut st = self.lock();
        if st.closed {
            batch.clear();
            return;
        }
        if st.busy {
            // The writer task holds the socket; it takes these before letting go.
            st.queue.extend(batch.drain(..));
            return;
        }
        st.busy = true;
        drop(st);
        let mut skip = 0;
        let r = write_now(sink, batch, &mut skip);
        let mut st = self.lock();
        match r {
            Ok(true) => {
                if st.queue.is_empty() {
                    st.busy = false;
                } else {
                    // Spawned operations delivered while we wrote: the writer sends them.
                    drop(st);
                    self.wake.notify_one();
                }
            }
            Ok(false) => {
                // The socket is full: what is left goes first, then what others queued.
                while let Some(r) = batch.pop_back() {
                    st.queue.push_front(r);
                }
                st.skip = skip;
                drop(st);
                self.wake.notify_one();
            }
            Err(e) => {
                batch.clear();
                self.fail(&mut st, &e);
            }
        }
    }

    /// The reader has stopped: the writer ends once the queue is written and the last
    /// spawned operation is done. `hard`: queued replies are thrown away instead.
    pub(super) fn reader_done(&self, hard: bool) {
        let mut st = self.lock();
        st.reader_done = true;
        if hard {
            st.closed = true;
            st.queue.clear();
        }
        self.kick(st);
    }

    /// Waits until no spawned operation is left.
    pub(super) async fn ops_done(&self) {
        loop {
            let idle = self.idle.notified();
            if self.lock().ops == 0 {
                break;
            }
            idle.await;
        }
    }
}

/// Counts a spawned operation; when it ends (delivered, or dropped on a forced shutdown)
/// the writer learns whether it was the last.
pub(super) struct OpGuard(Arc<Outbox>);

impl OpGuard {
    /// Queues the operation's reply (see [`Outbox::deliver`]).
    pub(super) fn deliver(&self, reply: Reply) {
        self.0.deliver(reply);
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.ops -= 1;
        if st.ops == 0 {
            // The reader may wait for this (a streamed simple read) before it is done.
            self.0.idle.notify_one();
            if st.reader_done {
                self.0.kick(st);
            }
        }
    }
}

/// The writer task: whenever woken it owns the socket, writes everything queued (waiting
/// for the socket to drain as needed), and gives the socket back when the queue is empty.
/// Ends once the reader is done and no spawned operation is left.
pub(super) async fn writer<S: Sink>(sink: Arc<S>, out: Arc<Outbox>) {
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
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
