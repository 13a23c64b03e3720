//! Command handling, first step: what to do with one request, decided from its header and
//! the connection's [`Terms`] alone, before any payload is read, any buffer taken or any
//! device operation run.
//!
//! [`Terms::plan`] is pure, like the handshake's `handle_option`: every check of the spec
//! (flags valid for the command, range, read-only, payload size, negotiated features)
//! lives here and is testable without a socket. The connection then carries the [`Plan`]
//! out (`execute.rs`): it reads or throws away the payload, takes buffers and runs the
//! operation.
//!
//! Reads and writes larger than the maximum payload advertised with `NBD_INFO_BLOCK_SIZE`
//! are accepted from every client, up to the connection's `max_request`, and streamed in
//! pieces of the advertised size. A client that connected with `NBD_OPT_EXPORT_NAME`, or
//! never asked for block sizes, was never told any limit (nbd's own tester sends 47.6 MB);
//! one that asked and goes beyond it breaks a MUST of the spec, which then lets the server
//! refuse, but the data is just as safe streamed, so it is served too: the advertised
//! maximum says what is efficient here, `max_request` what is refused.

use crate::engine::{BufferPool, Capabilities, ZeroFlags};
use crate::nbd::export::BlockSizes;
use crate::nbd::handshake::Negotiated;
use crate::nbd::proto::{self, Framing, NbdError, Request};

/// Block status looks at most this much of the device per request; clients ask again for
/// the rest, as the spec expects.
const BLOCK_STATUS_SCAN: u64 = 4 << 30;
/// Payloads the server refuses are still read and thrown away, to keep the stream in sync,
/// up to this size (or twice the maximum payload, if larger); a larger one means the client
/// is broken or hostile, and the connection is closed.
const MIN_DISCARD_LIMIT: u64 = 64 << 20;

/// What a connection's requests are judged against: the export's size and capabilities
/// and what the handshake settled. Fixed for the life of the connection.
pub(super) struct Terms {
    pub(super) size: u64,
    pub(super) caps: Capabilities,
    pub(super) framing: Framing,
    /// Transmission flags the client was sent.
    pub(super) flags: u16,
    /// Context id of `base:allocation`, if the client selected it.
    pub(super) allocation_context: Option<u32>,
    /// Largest payload handled in one piece: the maximum advertised to clients.
    pub(super) max_payload: u64,
    /// Largest read or write accepted; those above `max_payload` are streamed in pieces.
    pub(super) max_request: u64,
    /// Largest refused payload read and thrown away rather than closing the connection.
    pub(super) discard_limit: u64,
}

/// What to do with one request.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Plan {
    /// `NBD_CMD_DISC`: end the connection.
    Disconnect,
    /// Answer with an error, after reading and throwing away `discard` bytes of payload
    /// (the client sends them whatever the answer).
    Refuse {
        err: NbdError,
        message: String,
        discard: u64,
    },
    /// Succeed at once: a write of zero bytes.
    Ack,
    /// Succeed at once with no data: a read of zero bytes.
    EmptyRead,
    /// Read the payload into a buffer and write it.
    Write {
        fua: bool,
    },
    /// A write above the maximum payload: read and written piece by piece.
    StreamWrite {
        fua: bool,
    },
    /// Read the range; `sparse`: holes may go out as hole chunks (structured replies,
    /// no `NBD_CMD_FLAG_DF`, a device that knows its extents).
    Read {
        sparse: bool,
    },
    /// A read above the maximum payload: read and sent piece by piece.
    StreamRead,
    Flush,
    Trim {
        fua: bool,
    },
    WriteZeroes(ZeroFlags),
    Cache,
    /// Describe up to `scan` bytes for metadata context `context`; `one`: only the first
    /// extent (`NBD_CMD_FLAG_REQ_ONE`).
    BlockStatus {
        context: u32,
        scan: u64,
        one: bool,
    },
}

/// A refusal of a request that carries no payload.
fn refuse(err: NbdError, message: impl Into<String>) -> Plan {
    Plan::Refuse {
        err,
        message: message.into(),
        discard: 0,
    }
}

impl Terms {
    /// The terms of a connection to a device with `caps` and `size`, as `neg` settled,
    /// taking reads and writes of up to `max_request` bytes.
    pub(super) fn new(caps: Capabilities, size: u64, neg: &Negotiated, max_request: u64) -> Self {
        let max_payload = BlockSizes::of(&caps).max as u64;
        let max_request = max_request.max(max_payload);
        Terms {
            size,
            caps,
            framing: neg.framing,
            flags: neg.flags,
            allocation_context: neg.allocation_context,
            max_payload,
            max_request,
            // A refused write of any size it would have taken is read in full.
            discard_limit: (2 * max_payload).max(MIN_DISCARD_LIMIT).max(max_request),
        }
    }

    pub(super) fn extended(&self) -> bool {
        self.framing == Framing::Extended
    }

    /// What to do with `req`.
    pub(super) fn plan(&self, req: &Request) -> Plan {
        match req.command {
            proto::CMD_DISC => Plan::Disconnect,
            proto::CMD_WRITE => self.write(req),
            // Extended headers: a payload on a command that takes none.
            _ if req.payload_len(self.extended()) > 0 => Plan::Refuse {
                err: NbdError::Inval,
                message: "this command takes no payload (NBD_CMD_FLAG_PAYLOAD_LEN)".into(),
                discard: req.length,
            },
            proto::CMD_READ => self.read(req),
            proto::CMD_FLUSH => self.flush(req),
            proto::CMD_TRIM => self.trim(req),
            proto::CMD_CACHE => self.cache(req),
            proto::CMD_WRITE_ZEROES => self.write_zeroes(req),
            proto::CMD_BLOCK_STATUS => self.block_status(req),
            other => refuse(NbdError::Inval, format!("unknown command {other}")),
        }
    }

    /// Bytes of I/O buffer a request will hold while in flight, as far as the header tells
    /// (buffers come in power-of-two sizes, so a budget counted in buffers bounds memory);
    /// refused requests count for nothing beyond the fixed overhead. A streamed request
    /// is charged one piece here; a streamed read takes the budget of each further piece
    /// as it goes.
    pub(super) fn data_charge(&self, req: &Request) -> u64 {
        match req.command {
            proto::CMD_READ | proto::CMD_WRITE if req.length <= self.max_request => {
                if req.length == 0 {
                    0
                } else {
                    self.piece_charge(req.length)
                }
            }
            _ => 0,
        }
    }

    /// The budget of the buffer for the first piece of `len` bytes.
    pub(super) fn piece_charge(&self, len: u64) -> u64 {
        BufferPool::charge(len.min(self.max_payload) as usize) as u64
    }

    fn write(&self, req: &Request) -> Plan {
        let len = req.length;
        let allowed = if self.extended() {
            proto::CMD_FLAG_PAYLOAD_LEN
        } else {
            0
        };
        let refusal = if let Err(m) = self.check_flags(req, allowed) {
            Some((NbdError::Inval, m))
        } else if self.caps.read_only {
            Some((NbdError::Perm, "the export is read-only".to_string()))
        } else if !self.in_range(req) {
            Some((NbdError::NoSpc, self.past_end(req, "write")))
        } else if len > self.max_request {
            Some((
                NbdError::Inval,
                format!(
                    "write of {len} bytes exceeds the largest request accepted, {} bytes \
                     (serve --max-request)",
                    self.max_request
                ),
            ))
        } else {
            None
        };
        if let Some((err, message)) = refusal {
            return Plan::Refuse {
                err,
                message,
                discard: len,
            };
        }
        if len == 0 {
            return Plan::Ack;
        }
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        if len > self.max_payload {
            return Plan::StreamWrite { fua };
        }
        Plan::Write { fua }
    }

    fn read(&self, req: &Request) -> Plan {
        let structured = self.framing != Framing::Simple;
        let allowed = if structured { proto::CMD_FLAG_DF } else { 0 };
        if let Err(m) = self.check_flags(req, allowed) {
            return refuse(NbdError::Inval, m);
        }
        if !self.in_range(req) {
            return refuse(NbdError::Inval, self.past_end(req, "read"));
        }
        let len = req.length;
        if len > self.max_request {
            // With structured replies the spec lets a server refuse large reads with
            // EOVERFLOW; simple replies can only say EINVAL.
            let err = if structured {
                NbdError::Overflow
            } else {
                NbdError::Inval
            };
            let msg = format!(
                "read of {len} bytes exceeds the largest request accepted, {} bytes \
                 (serve --max-request)",
                self.max_request
            );
            return refuse(err, msg);
        }
        if len == 0 {
            return Plan::EmptyRead;
        }
        if len > self.max_payload {
            return Plan::StreamRead;
        }
        let df = req.flags & proto::CMD_FLAG_DF != 0;
        Plan::Read {
            sparse: structured && !df && self.caps.can_extents,
        }
    }

    fn flush(&self, req: &Request) -> Plan {
        if self.flags & proto::FLAG_SEND_FLUSH == 0 {
            return refuse(NbdError::Inval, "flush is not supported");
        }
        if let Err(m) = self.check_flags(req, 0) {
            return refuse(NbdError::Inval, m);
        }
        if req.offset != 0 || req.length != 0 {
            return refuse(
                NbdError::Inval,
                "flush requests must have offset and length 0",
            );
        }
        Plan::Flush
    }

    fn trim(&self, req: &Request) -> Plan {
        if self.caps.read_only {
            return refuse(NbdError::Perm, "the export is read-only");
        }
        if self.flags & proto::FLAG_SEND_TRIM == 0 {
            return refuse(NbdError::Inval, "trim is not supported");
        }
        if let Err(m) = self.check_flags(req, 0) {
            return refuse(NbdError::Inval, m);
        }
        if !self.in_range(req) {
            return refuse(NbdError::Inval, self.past_end(req, "trim"));
        }
        Plan::Trim {
            fua: req.flags & proto::CMD_FLAG_FUA != 0,
        }
    }

    fn write_zeroes(&self, req: &Request) -> Plan {
        if self.caps.read_only {
            return refuse(NbdError::Perm, "the export is read-only");
        }
        if self.flags & proto::FLAG_SEND_WRITE_ZEROES == 0 {
            return refuse(NbdError::Inval, "write zeroes is not supported");
        }
        let mut allowed = proto::CMD_FLAG_NO_HOLE;
        if self.flags & proto::FLAG_SEND_FAST_ZERO != 0 {
            allowed |= proto::CMD_FLAG_FAST_ZERO;
        }
        if let Err(m) = self.check_flags(req, allowed) {
            return refuse(NbdError::Inval, m);
        }
        if !self.in_range(req) {
            // The spec asks for ENOSPC here, as for writes.
            return refuse(NbdError::NoSpc, self.past_end(req, "write zeroes"));
        }
        Plan::WriteZeroes(ZeroFlags {
            may_trim: req.flags & proto::CMD_FLAG_NO_HOLE == 0,
            fast: req.flags & proto::CMD_FLAG_FAST_ZERO != 0,
            fua: req.flags & proto::CMD_FLAG_FUA != 0,
        })
    }

    fn cache(&self, req: &Request) -> Plan {
        // Some clients send CACHE without the flag being advertised; it is only a hint, so
        // it is served either way.
        if let Err(m) = self.check_flags(req, 0) {
            return refuse(NbdError::Inval, m);
        }
        if !self.in_range(req) {
            return refuse(NbdError::Inval, self.past_end(req, "cache"));
        }
        Plan::Cache
    }

    fn block_status(&self, req: &Request) -> Plan {
        let Some(context) = self.allocation_context else {
            return refuse(
                NbdError::Inval,
                "no metadata context was selected (NBD_OPT_SET_META_CONTEXT)",
            );
        };
        if let Err(m) = self.check_flags(req, proto::CMD_FLAG_REQ_ONE) {
            return refuse(NbdError::Inval, m);
        }
        if req.length == 0 {
            return refuse(NbdError::Inval, "block status of 0 bytes");
        }
        if !self.in_range(req) {
            return refuse(NbdError::Inval, self.past_end(req, "block status"));
        }
        Plan::BlockStatus {
            context,
            scan: req.length.min(BLOCK_STATUS_SCAN),
            one: req.flags & proto::CMD_FLAG_REQ_ONE != 0,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::host::HostBackend;
    use crate::engine::{BlockDevice, SparseDevice, SparseOptions};
    use crate::nbd::export::transmission_flags;

    const SIZE: u64 = 1 << 30;
    const MAX_REQUEST: u64 = 256 << 20;

    /// What a host-memory device offers.
    fn caps(read_only: bool) -> Capabilities {
        let mut o = SparseOptions::new(SIZE);
        o.read_only = read_only;
        SparseDevice::new(HostBackend::new(), o)
            .unwrap()
            .capabilities()
    }

    fn terms(framing: Framing, read_only: bool) -> Terms {
        let caps = caps(read_only);
        let neg = Negotiated {
            export: 0,
            framing,
            allocation_context: (framing != Framing::Simple).then_some(1),
            flags: transmission_flags(&caps, framing),
        };
        Terms::new(caps, SIZE, &neg, MAX_REQUEST)
    }

    fn req(command: u16, flags: u16, offset: u64, length: u64) -> Request {
        Request {
            flags,
            command,
            cookie: 7,
            offset,
            length,
        }
    }

    fn refused(p: Plan) -> (NbdError, u64) {
        match p {
            Plan::Refuse { err, discard, .. } => (err, discard),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn writes_are_planned_or_refused_with_their_payload_thrown_away() {
        let t = terms(Framing::Simple, false);
        let fua = proto::CMD_FLAG_FUA;
        assert_eq!(
            t.plan(&req(proto::CMD_WRITE, fua, 0, 4096)),
            Plan::Write { fua: true }
        );
        assert_eq!(t.plan(&req(proto::CMD_WRITE, 0, 0, 0)), Plan::Ack);
        let past = t.plan(&req(proto::CMD_WRITE, 0, SIZE - 512, 4096));
        assert_eq!(refused(past), (NbdError::NoSpc, 4096));
        let streamed = t.max_payload + 1;
        assert_eq!(
            t.plan(&req(proto::CMD_WRITE, 0, 0, streamed)),
            Plan::StreamWrite { fua: false }
        );
        assert_eq!(
            t.data_charge(&req(proto::CMD_WRITE, 0, 0, streamed)),
            32 << 20
        );
        let big = MAX_REQUEST + 1;
        assert_eq!(
            refused(t.plan(&req(proto::CMD_WRITE, 0, 0, big))),
            (NbdError::Inval, big)
        );
        assert_eq!(t.data_charge(&req(proto::CMD_WRITE, 0, 0, big)), 0);
        let bad = t.plan(&req(proto::CMD_WRITE, proto::CMD_FLAG_DF, 0, 512));
        assert_eq!(refused(bad), (NbdError::Inval, 512));
        let ro = terms(Framing::Simple, true);
        assert_eq!(
            refused(ro.plan(&req(proto::CMD_WRITE, 0, 0, 512))),
            (NbdError::Perm, 512)
        );
    }

    #[test]
    fn reads_refuse_without_discarding_and_go_sparse_only_when_allowed() {
        let simple = terms(Framing::Simple, false);
        let structured = terms(Framing::Structured, false);
        let read = |flags, len| req(proto::CMD_READ, flags, 0, len);
        assert_eq!(simple.plan(&read(0, 4096)), Plan::Read { sparse: false });
        assert_eq!(structured.plan(&read(0, 4096)), Plan::Read { sparse: true });
        let df = proto::CMD_FLAG_DF;
        assert_eq!(
            structured.plan(&read(df, 4096)),
            Plan::Read { sparse: false }
        );
        assert_eq!(refused(simple.plan(&read(df, 4096))), (NbdError::Inval, 0));
        assert_eq!(simple.plan(&read(0, 0)), Plan::EmptyRead);
        let streamed = simple.max_payload + 1;
        assert_eq!(simple.plan(&read(0, streamed)), Plan::StreamRead);
        assert_eq!(structured.plan(&read(0, MAX_REQUEST)), Plan::StreamRead);
        let big = MAX_REQUEST + 1;
        assert_eq!(refused(simple.plan(&read(0, big))), (NbdError::Inval, 0));
        assert_eq!(
            refused(structured.plan(&read(0, big))),
            (NbdError::Overflow, 0)
        );
        let past = req(proto::CMD_READ, 0, SIZE, 1);
        assert_eq!(refused(simple.plan(&past)), (NbdError::Inval, 0));
    }

    #[test]
    fn other_commands_follow_the_negotiated_flags() {
        let t = terms(Framing::Extended, false);
        assert_eq!(t.plan(&req(proto::CMD_DISC, 0, 0, 0)), Plan::Disconnect);
        assert_eq!(t.plan(&req(proto::CMD_FLUSH, 0, 0, 0)), Plan::Flush);
        assert_eq!(
            refused(t.plan(&req(proto::CMD_FLUSH, 0, 0, 1))),
            (NbdError::Inval, 0)
        );
        assert_eq!(
            t.plan(&req(proto::CMD_TRIM, 0, 0, 1)),
            Plan::Trim { fua: false }
        );
        assert_eq!(t.plan(&req(proto::CMD_CACHE, 0, 0, 1)), Plan::Cache);
        let zero = t.plan(&req(proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_NO_HOLE, 0, 1));
        assert_eq!(
            zero,
            Plan::WriteZeroes(ZeroFlags {
                may_trim: false,
                fast: false,
                fua: false
            })
        );
        let past = req(proto::CMD_WRITE_ZEROES, 0, SIZE, 1);
        assert_eq!(refused(t.plan(&past)), (NbdError::NoSpc, 0));
        let status = req(proto::CMD_BLOCK_STATUS, proto::CMD_FLAG_REQ_ONE, 0, 8 << 30);
        assert_eq!(
            refused(t.plan(&status)),
            (NbdError::Inval, 0),
            "past the end"
        );
        let status = req(proto::CMD_BLOCK_STATUS, proto::CMD_FLAG_REQ_ONE, 0, SIZE);
        assert_eq!(
            t.plan(&status),
            Plan::BlockStatus {
                context: 1,
                scan: SIZE,
                one: true
            }
        );
        // Extended headers: a payload on a command that takes none is read and refused.
        let payload = req(proto::CMD_TRIM, proto::CMD_FLAG_PAYLOAD_LEN, 0, 100);
        assert_eq!(refused(t.plan(&payload)), (NbdError::Inval, 100));
        assert_eq!(refused(t.plan(&req(99, 0, 0, 0))), (NbdError::Inval, 0));
        let ro = terms(Framing::Simple, true);
        assert_eq!(
            refused(ro.plan(&req(proto::CMD_TRIM, 0, 0, 1))),
            (NbdError::Perm, 0)
        );
        let simple = terms(Framing::Simple, false);
        let status = req(proto::CMD_BLOCK_STATUS, 0, 0, 1);
        assert_eq!(
            refused(simple.plan(&status)),
            (NbdError::Inval, 0),
            "no context"
        );
    }
}
