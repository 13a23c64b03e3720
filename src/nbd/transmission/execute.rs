//! Command handling, second step: carrying out a [`Plan`] on the connection. Each request
//! first takes its budget; then its payload is read (or thrown away), a buffer taken and
//! the device operation started (see [`Conn::start`]), and its reply queued.

use super::commands::Plan;
use super::reply::{Body, Part, Permit, Reply};
use super::socket::{Sink, Source};
use super::{Conn, Ended, Next, OpResult};
use crate::engine::{Extent, IoError, ZeroFlags};
use crate::nbd::proto::{self, Frame, Framing, NbdError, Request, StatusDescriptor};

/// Most descriptors in one block status reply (the spec says at most 2^20).
const MAX_DESCRIPTORS: usize = 1 << 16;

impl<R: Source, S: Sink> Conn<R, S> {
    /// Plans `req` and carries the plan out.
    pub(super) async fn dispatch(&mut self, req: Request) -> Next {
        let plan = self.terms.plan(&req);
        if plan == Plan::Disconnect {
            return Next::Stop(Ended::Disconnect);
        }
        // Every request, refused ones included, holds budget until its reply is written,
        // so a client that sends without reading cannot grow the reply queue unbounded.
        let permit = match self.permit(self.terms.data_charge(&req)).await {
            Ok(p) => p,
            Err(e) => return Next::Stop(e),
        };
        let r = self.execute(plan, req, permit).await;
        match r {
            Ok(()) => Next::Continue,
            Err(e) => Next::Stop(e),
        }
    }

    async fn execute(&mut self, plan: Plan, req: Request, permit: Permit) -> OpResult {
        match plan {
            Plan::Disconnect => unreachable!("handled by dispatch"),
            Plan::Refuse {
                err,
                message,
                discard,
            } => {
                if discard > 0 {
                    self.discard(discard).await?;
                }
                self.refuse(&req, permit, err, &message);
                Ok(())
            }
            Plan::Ack => {
                let body = self.reply_to(&req).ok();
                self.send(body, Some(permit));
                Ok(())
            }
            Plan::EmptyRead => {
                let mut f = Frame::new();
                match self.terms.framing {
                    Framing::Simple => f.simple(0, req.cookie),
                    fr => f.none(fr, req.cookie, req.offset),
                };
                self.send(Body::Frame(f), Some(permit));
                Ok(())
            }
            Plan::Write { fua } => self.write(req, permit, fua).await,
            Plan::StreamWrite { fua } => self.stream_write(req, permit, fua).await,
            Plan::Read { sparse } => self.read(req, permit, sparse).await,
            Plan::StreamRead => self.stream_read(req, permit).await,
            Plan::Flush => {
                let to = self.reply_to(&req);
                let dev = self.dev.clone();
                self.start(async move { Reply::new(to.status(dev.flush().await), Some(permit)) });
                Ok(())
            }
            Plan::Trim { fua } => {
                let to = self.reply_to(&req);
                let dev = self.dev.clone();
                self.start(async move {
                    let mut r = dev.trim(req.offset, req.length).await;
                    if r.is_ok() && fua {
                        r = dev.flush().await;
                    }
                    Reply::new(to.status(r), Some(permit))
                });
                Ok(())
            }
            Plan::WriteZeroes(flags) => {
                self.write_zeroes(req, permit, flags);
                Ok(())
            }
            Plan::Cache => {
                let to = self.reply_to(&req);
                let dev = self.dev.clone();
                self.start(async move {
                    let r = dev.cache(req.offset, req.length).await;
                    Reply::new(to.status(r), Some(permit))
                });
                Ok(())
            }
            Plan::BlockStatus { context, scan, one } => {
                self.block_status(req, permit, context, scan, one);
                Ok(())
            }
        }
    }

    async fn write(&mut self, req: Request, permit: Permit, fua: bool) -> OpResult {
        let len = req.length;
        let to = self.reply_to(&req);
        let mut buf = match self.buffer(len).await {
            Ok(b) => b,
            Err(e) => {
                self.discard(len).await?;
                self.send(to.io_error(&e), Some(permit));
                return Ok(());
            }
        };
        self.payload(&mut buf).await?;
        // Host memory: written there and then, with no operation future to allocate.
        if let Some(r) = self.dev.write_now(req.offset, &buf, fua) {
            drop(buf);
            self.send(to.status(r), Some(permit));
            return Ok(());
        }
        let dev = self.dev.clone();
        self.start(async move {
            let r = dev.write(req.offset, &buf, fua).await;
            drop(buf);
            Reply::new(to.status(r), Some(permit))
        });
        Ok(())
    }

    /// A write above the maximum payload, in pieces of that size through one buffer: each
    /// piece is read and written before the next is read, so memory stays at one piece
    /// however large the request. After a failed piece the rest of the payload is thrown
    /// away and the reply carries the error.
    async fn stream_write(&mut self, req: Request, permit: Permit, fua: bool) -> OpResult {
        let to = self.reply_to(&req);
        // Its pieces are written in the reader: what it has in flight runs as tasks meanwhile.
        self.before_wait();
        let piece = self.terms.max_payload;
        let mut buf = match self.buffer(piece).await {
            Ok(b) => b,
            Err(e) => {
                self.discard(req.length).await?;
                self.send(to.io_error(&e), Some(permit));
                return Ok(());
            }
        };
        let mut at = 0;
        let mut result = Ok(());
        while at < req.length {
            let n = (req.length - at).min(piece);
            buf.set_len(n as usize);
            self.payload(&mut buf).await?;
            at += n;
            // Replies done so far go out before the device may make the reader wait.
            self.flush_replies();
            result = self.dev.write(req.offset + at - n, &buf, fua).await;
            if result.is_err() {
                self.discard(req.length - at).await?;
                break;
            }
        }
        drop(buf);
        self.send(to.status(result), Some(permit));
        Ok(())
    }

    /// A read above the maximum payload, sent in pieces of that size, each taking its own
    /// budget and buffer (none with host memory) as it goes, so a reply of any size holds
    /// no more memory than the connection's budget. With structured replies every piece
    /// is a data chunk of its own; a simple reply is one header and then the data, which
    /// nothing may come between: replies of operations still running go out first.
    async fn stream_read(&mut self, req: Request, permit: Permit) -> OpResult {
        let to = self.reply_to(&req);
        let simple = self.terms.framing == Framing::Simple;
        // The pieces are waited for here, in the reader: what it has in flight runs as tasks
        // meanwhile (and is counted by the outbox, which the wait below needs).
        self.before_wait();
        if simple {
            self.out.ops_done().await;
        }
        let piece = self.terms.max_payload;
        let mut permit = Some(permit);
        let mut at = 0;
        while at < req.length {
            let n = (req.length - at).min(piece);
            let p = match permit.take() {
                Some(p) => p,
                None => self.permit(self.terms.piece_charge(n)).await?,
            };
            let frame = to.piece_frame(at, n, at + n == req.length);
            match self.read_piece(req.offset + at, n, frame).await {
                Ok(body) => self.send(body, Some(p)),
                // The header went out saying success: only closing can tell the client.
                Err(e) if simple && at > 0 => return Err(Ended::ReadCut(e.to_string())),
                Err(e) => {
                    self.send(to.io_error(&e), Some(p));
                    return Ok(());
                }
            }
            at += n;
        }
        Ok(())
    }

    /// One piece of a streamed read behind `frame`: device memory in place where it can
    /// be lent, else read into a buffer (waited for here, so pieces stay in order).
    async fn read_piece(&mut self, offset: u64, len: u64, frame: Frame) -> Result<Body, IoError> {
        if let Some(r) = self.dev.view(offset, len) {
            return r.map(|view| Body::View(frame, view));
        }
        let mut buf = self.buffer(len).await?;
        self.flush_replies();
        self.dev.read(offset, &mut buf).await?;
        Ok(Body::Data(frame, buf))
    }

    async fn read(&mut self, req: Request, permit: Permit, sparse: bool) -> OpResult {
        let len = req.length;
        let to = self.reply_to(&req);
        if sparse && self.has_holes(&req) {
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
                self.terms.framing,
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

    fn write_zeroes(&mut self, req: Request, permit: Permit, flags: ZeroFlags) {
        let to = self.reply_to(&req);
        let dev = self.dev.clone();
        self.start(async move {
            let r = dev.write_zeroes(req.offset, req.length, flags).await;
            Reply::new(to.status(r), Some(permit))
        });
    }

    fn block_status(&mut self, req: Request, permit: Permit, context: u32, scan: u64, one: bool) {
        let to = self.reply_to(&req);
        self.extents.clear();
        if let Err(e) = self.dev.extents(req.offset, scan, &mut self.extents) {
            self.send(to.io_error(&e), Some(permit));
            return;
        }
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
            self.terms.framing,
            true,
            req.cookie,
            req.offset,
            context,
            &descs,
        );
        self.send(Body::Bytes(v), Some(permit));
    }

    /// Refuses `req` with `err`: the reply says `message` (structured replies carry it).
    fn refuse(&mut self, req: &Request, permit: Permit, err: NbdError, message: &str) {
        tracing::debug!(
            "refusing command {} at {}+{}: {message}",
            req.command,
            req.offset,
            req.length
        );
        let body = self.reply_to(req).error(err, message);
        self.send(body, Some(permit));
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
