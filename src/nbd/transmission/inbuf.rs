//! The request read buffer: one `read` takes in as many pipelined requests as the client
//! has sent.

use super::local_ops::Watch;
use super::poll::Poller;
use super::socket::Source;
use std::io;
use std::time::Instant;
use tokio::io::AsyncReadExt;

/// Size of the read buffer.
pub(super) const READ_BUF: usize = 128 << 10;
/// When less room than this is left at the end of the read buffer, unread bytes are moved
/// to its start before the next read.
const READ_MIN_ROOM: usize = 16 << 10;

/// The request read buffer: `buf[start..end]` holds bytes read but not yet parsed.
pub(super) struct InBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl InBuf {
    pub(super) fn new() -> Self {
        InBuf {
            buf: vec![0u8; READ_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    pub(super) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(super) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(super) fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// The whole buffer as scratch space, for bytes read only to be thrown away. Only while
    /// it holds nothing unread.
    pub(super) fn scratch(&mut self, n: usize) -> &mut [u8] {
        debug_assert_eq!(self.len(), 0);
        &mut self.buf[..n]
    }

    /// One read from `rd`; returns the bytes read (0 at EOF). Cancel-safe: if the future
    /// is dropped before it completes, nothing was consumed from the socket.
    ///
    /// With a `poller`, polls the socket first (see [`Poller`]) and notes whether the wait
    /// was short. `next_request`: the bytes awaited start a request (see [`Poller::poll`]).
    /// With `ops`, the connection has operations in flight: the poll also stops when one
    /// completes (see [`Poller::poll_with_ops`]).
    pub(super) async fn fill<R: Source>(
        &mut self,
        rd: &mut R,
        poller: Option<&mut Poller>,
        next_request: bool,
        ops: Option<Watch<'_>>,
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
                let polled = match ops {
                    Some(w) => p.poll_with_ops(rd.fd(), &mut self.buf[self.end..], w),
                    None => p.poll(rd.fd(), &mut self.buf[self.end..], next_request),
                };
                let n = match polled {
                    Some(r) => r?,
                    None => rd.read(&mut self.buf[self.end..]).await?,
                };
                if ops.is_none() {
                    // A wait that watched operations says nothing of the client's pace.
                    p.waited(start.elapsed());
                }
                n
            }
        };
        self.end += n;
        Ok(n)
    }
}
