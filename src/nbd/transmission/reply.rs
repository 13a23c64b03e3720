//! Replies: what one request's answer holds on its way to the socket (a frame, a buffer
//! of data, device memory lent in place, or chunks of a sparse read), the budget it keeps
//! until it is written, and how a request's reply is framed ([`ReplyTo`]).

use crate::engine::error_log::ErrorLog;
use crate::engine::{IoBuf, IoError, View};
use crate::nbd::proto::{self, Frame, Framing, NbdError};
use std::io::IoSlice;
use tokio::sync::OwnedSemaphorePermit;

/// A reply ready to be written, holding its request's budget until it is.
pub(crate) struct Reply {
    body: Body,
    _permit: Option<Permit>,
}

/// The budget a request holds until its reply is written: its connection's, and its
/// client's.
pub(crate) struct Permit {
    pub(super) _conn: OwnedSemaphorePermit,
    pub(super) _client: Option<OwnedSemaphorePermit>,
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
