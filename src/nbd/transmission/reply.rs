//! Replies: what one request's answer holds on its way to the socket (a frame, a buffer
//! of data, device memory lent in place, or chunks of a sparse read), the budget it keeps
//! until it is written, and how a request's reply is framed ([`ReplyTo`]).

use crate::engine::error_log::ErrorLog;
use crate::engine::{IoBuf, IoError, View};
use crate::nbd::proto::{self, Frame, Framing, NbdError};
use std::io::IoSlice;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::{Notify, OwnedSemaphorePermit};

/// A reply ready to be written, holding its request's budget until it is.
pub(crate) struct Reply {
    body: Body,
    _permit: Option<Permit>,
}

/// The budget a request holds until its reply is written: its connection's, and its
/// client's.
pub(crate) struct Permit {
    pub(super) _conn: ConnPermit,
    pub(super) _client: Option<OwnedSemaphorePermit>,
}

/// A connection's in-flight budget, in bytes. Only the connection's reader takes from it,
/// so a semaphore's compare-and-swap loop and waiter list (locked on every release) are not
/// needed: taking is an add, giving back (wherever a reply is dropped) a subtract, and a
/// wake of the reader only while it waits.
pub(super) struct ConnBudget {
    used: AtomicU64,
    max: u64,
    /// The reader waits in [`ConnBudget::take`].
    waiting: AtomicBool,
    freed: Notify,
}

impl ConnBudget {
    /// A budget of `max` bytes; no request takes more.
    pub(super) fn new(max: u64) -> Self {
        ConnBudget {
            used: AtomicU64::new(0),
            max,
            waiting: AtomicBool::new(false),
            freed: Notify::new(),
        }
    }

    /// `n` bytes (at most the budget's size) if they are free now. The reader's alone to
    /// call: with no other taker, what it sees free can only grow before its add.
    pub(super) fn try_take(self: &Arc<Self>, n: u64) -> Option<ConnPermit> {
        debug_assert!(n <= self.max, "{n} bytes of a budget of {}", self.max);
        if self.used.load(Ordering::SeqCst) + n > self.max {
            return None;
        }
        self.used.fetch_add(n, Ordering::SeqCst);
        Some(ConnPermit {
            budget: self.clone(),
            n,
        })
    }

    /// `n` bytes, waiting until replies give them back.
    pub(super) async fn take(self: &Arc<Self>, n: u64) -> ConnPermit {
        loop {
            let freed = self.freed.notified();
            let mut freed = pin!(freed);
            freed.as_mut().enable();
            // SeqCst pairs with the permit's drop: it gives back and then reads `waiting`,
            // so either this sees the bytes back, or the drop sees it waiting and wakes it.
            self.waiting.store(true, Ordering::SeqCst);
            if let Some(p) = self.try_take(n) {
                self.waiting.store(false, Ordering::SeqCst);
                return p;
            }
            freed.await;
        }
    }
}

/// Bytes of a [`ConnBudget`], given back on drop.
pub(super) struct ConnPermit {
    budget: Arc<ConnBudget>,
    n: u64,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let b = &self.budget;
        b.used.fetch_sub(self.n, Ordering::SeqCst);
        if b.waiting.load(Ordering::SeqCst) {
            b.freed.notify_one();
        }
    }
}

pub(super) enum Body {
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
pub(super) enum Part {
    Head(usize, usize),
    Data(usize, usize),
}

impl Reply {
    pub(super) fn new(body: Body, permit: Option<Permit>) -> Self {
        Reply {
            body,
            _permit: permit,
        }
    }

    /// Bytes this reply puts on the wire.
    pub(super) fn len(&self) -> usize {
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

    pub(super) fn slices<'a>(&'a self, out: &mut Vec<IoSlice<'a>>) {
        match &self.body {
            Body::Frame(f) => out.push(IoSlice::new(f.as_bytes())),
            Body::Data(f, buf) => {
                // Pieces of a streamed simple reply after the first have no header.
                if !f.is_empty() {
                    out.push(IoSlice::new(f.as_bytes()));
                }
                if !buf.is_empty() {
                    out.push(IoSlice::new(buf));
                }
            }
            Body::View(f, v) => {
                if !f.is_empty() {
                    out.push(IoSlice::new(f.as_bytes()));
                }
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
pub(super) struct ReplyTo {
    pub(super) framing: Framing,
    pub(super) cookie: u64,
    pub(super) offset: u64,
}

impl ReplyTo {
    /// Success without data. Structured connections may use a simple reply for this (it is
    /// shorter); extended ones must use a chunk.
    pub(super) fn ok(self) -> Body {
        let mut f = Frame::new();
        match self.framing {
            Framing::Extended => f.none(self.framing, self.cookie, self.offset),
            _ => f.simple(0, self.cookie),
        };
        Body::Frame(f)
    }

    /// The header of a successful read reply carrying `len` bytes of data after it.
    pub(super) fn data_frame(self, len: u64) -> Frame {
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

    /// The header of one piece of a streamed read, `at` bytes into the request and `len`
    /// long: a data chunk of its own with structured replies (`last` says it is done); the
    /// simple reply's header before the first piece, nothing before the others.
    pub(super) fn piece_frame(self, at: u64, len: u64, last: bool) -> Frame {
        let mut f = Frame::new();
        match self.framing {
            Framing::Simple if at == 0 => {
                f.simple(0, self.cookie);
            }
            Framing::Simple => {}
            fr => {
                let flags = if last { proto::REPLY_FLAG_DONE } else { 0 };
                f.offset_data(fr, flags, self.cookie, self.offset, self.offset + at, len);
            }
        }
        f
    }

    pub(super) fn error(self, err: NbdError, message: &str) -> Body {
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

    pub(super) fn io_error(self, e: &IoError) -> Body {
        // One log for every connection: a failing device fails them all alike.
        static LOG: ErrorLog = ErrorLog::new();
        if matches!(e, IoError::Backend(_)) {
            LOG.record(self.offset, &e.to_string());
        }
        self.error(NbdError::from_errno(e.errno()), &e.to_string())
    }

    pub(super) fn status(self, r: Result<(), IoError>) -> Body {
        match r {
            Ok(()) => self.ok(),
            Err(e) => self.io_error(&e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The budget refuses what does not fit, and a reader waiting for it wakes when a
    /// permit is dropped on another thread.
    #[tokio::test]
    async fn a_waiting_reader_gets_the_budget_a_dropped_reply_gives_back() {
        let b = Arc::new(ConnBudget::new(1000));
        let first = b.try_take(600).expect("fits");
        assert!(b.try_take(500).is_none(), "over the budget");
        let second = b.try_take(400).expect("fits exactly");
        let mut third = pin!(b.take(500));
        assert!(futures::poll!(third.as_mut()).is_pending(), "waits");
        std::thread::spawn(move || drop(first)).join().unwrap();
        let third = tokio::time::timeout(std::time::Duration::from_secs(60), third)
            .await
            .expect("woken when the budget came back");
        assert_eq!(b.used.load(Ordering::SeqCst), 900);
        drop((second, third));
        assert_eq!(b.used.load(Ordering::SeqCst), 0);
    }
}
