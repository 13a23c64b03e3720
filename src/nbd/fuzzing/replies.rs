//! What the replies of a fuzzed session must be, by the protocol's rules alone (not by the
//! server's own plan of each request, which would only agree with itself): one well-formed
//! reply in the negotiated framing for every request the server read, none for
//! `NBD_CMD_DISC` or after it, the data a successful read must carry, and an error where
//! the protocol leaves no choice (outside the export, a change to a read-only export, an
//! unknown command, block status without a metadata context).

use super::super::proto::{self, Framing, Request};

/// What the client learned in the handshake, which the replies must keep to.
#[derive(Clone, Copy, Debug)]
pub(super) struct Terms {
    pub framing: Framing,
    /// Export size.
    pub size: u64,
    /// `NBD_FLAG_READ_ONLY` was set.
    pub read_only: bool,
    /// The maximum payload advertised: a server may close the connection on a request
    /// whose payload is larger instead of reading it.
    pub max_payload: u64,
    /// The context id of `base:allocation`, if selected.
    pub meta_context: Option<u32>,
}

/// One request as the client sent it.
#[derive(Clone, Copy, Debug)]
pub(super) enum Sent {
    /// A whole request (header and payload); its cookie is its index + 1.
    Whole(Request),
    /// Cut off by the end of the input: the server cannot answer it.
    Truncated,
    /// A header with a wrong magic: the server must close the connection there.
    BadMagic,
}

/// Splits the transmission-phase bytes into requests, and numbers their cookies 1, 2, …
/// in place, so that each reply names one request. Stops at a bad magic or the end.
pub(super) fn number_requests(bytes: &mut [u8], extended: bool) -> Vec<Sent> {
    let header = proto::request_len(extended);
    let mut sent = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let Some(h) = bytes.get_mut(at..at + header) else {
            sent.push(Sent::Truncated);
            break;
        };
        let cookie = sent.len() as u64 + 1;
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        let Ok(req) = proto::parse_request(h, extended) else {
            sent.push(Sent::BadMagic);
            break;
        };
        let end = (at + header) as u64 + req.payload_len(extended);
        if end > bytes.len() as u64 {
            sent.push(Sent::Truncated);
            break;
        }
        sent.push(Sent::Whole(req));
        at = end as usize;
    }
    sent
}

/// Where one request's reply stands.
#[derive(Clone, Debug, Default)]
struct Answer {
    /// The final reply (simple, or the chunk with `NBD_REPLY_FLAG_DONE`) came.
    done: bool,
    /// Chunks seen (structured replies).
    chunks: usize,
    /// The first error the reply carried.
    error: Option<u32>,
    /// Ranges a read's data and hole chunks covered.
    covered: Vec<(u64, u64)>,
    /// Block status chunks seen.
    statuses: usize,
}

/// The error values the protocol defines.
const ERRORS: [u32; 8] = [1, 5, 12, 22, 28, 75, 95, 108];

fn be(b: &[u8]) -> u64 {
    b.iter().fold(0, |v, &x| v << 8 | x as u64)
}

/// Checks the server's transmission-phase output against the requests sent; returns how
/// many were answered.
pub(super) fn check(sent: &[Sent], terms: &Terms, out: &[u8]) -> Result<usize, String> {
    let mut answers = vec![Answer::default(); sent.len()];
    let mut at = 0;
    let mut cut = None;
    while at < out.len() {
        match reply(sent, terms, out, at, &mut answers)? {
            Some(next) => at = next,
            None => {
                cut = Some(at);
                break;
            }
        }
    }
    // Where the session ends: at NBD_CMD_DISC, a request cut off by the client's close, a
    // bad magic, or a payload larger than advertised that the server did not read. Nothing
    // from there on is answered. Before it, every request is, unless the end was a broken
    // request (any but NBD_CMD_DISC), on which the server may drop the connection with
    // replies still to go.
    let extended = terms.framing == Framing::Extended;
    let closes =
        |i: usize, r: &Request| !answers[i].done && r.payload_len(extended) > terms.max_payload;
    let end = sent.iter().enumerate().position(|(i, s)| match s {
        Sent::Truncated | Sent::BadMagic => true,
        Sent::Whole(r) => r.command == proto::CMD_DISC || closes(i, r),
    });
    let hard = end.is_some_and(|e| match &sent[e] {
        Sent::BadMagic | Sent::Truncated => true,
        Sent::Whole(r) => closes(e, r),
    });
    // A hard close may also cut the last reply short; nothing else may.
    if let Some(at) = cut.filter(|_| !hard) {
        return Err(format!("a reply cut short at byte {at} of {}", out.len()));
    }
    for (i, s) in sent.iter().enumerate() {
        let a = &answers[i];
        if !a.done && a.chunks > 0 && !hard {
            return Err(format!("the reply to request {} never finished", i + 1));
        }
        let Sent::Whole(req) = s else {
            continue;
        };
        if let Some(e) = end.filter(|&e| i >= e) {
            if a.done && i > e {
                return Err(format!(
                    "request {} was answered after the session ended at request {}",
                    i + 1,
                    e + 1
                ));
            }
            continue;
        }
        if !a.done {
            if hard {
                continue;
            }
            return Err(format!("request {} ({req:?}) got no reply", i + 1));
        }
        expect(req, terms, a).map_err(|e| format!("request {} ({req:?}): {e}", i + 1))?;
    }
    Ok(answers.iter().filter(|a| a.done).count())
}

/// What a finished reply to `req` must hold.
fn expect(req: &Request, terms: &Terms, a: &Answer) -> Result<(), String> {
    if let Some(err) = a.error {
        if !ERRORS.contains(&err) {
            return Err(format!("error {err} is not one the protocol defines"));
        }
        return Ok(());
    }
    let in_range = req
        .offset
        .checked_add(req.length)
        .is_some_and(|end| end <= terms.size);
    let must_fail = match req.command {
        proto::CMD_READ | proto::CMD_CACHE => !in_range,
        proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_WRITE_ZEROES => {
            !in_range || terms.read_only
        }
        proto::CMD_BLOCK_STATUS => !in_range || terms.meta_context.is_none(),
        proto::CMD_FLUSH => false,
        _ => true,
    };
    if must_fail {
        return Err("succeeded where it must fail".into());
    }
    if terms.framing == Framing::Simple {
        return Ok(());
    }
    if req.command == proto::CMD_READ {
        let mut c = a.covered.clone();
        c.sort_unstable();
        let mut next = req.offset;
        for (s, e) in c {
            if s != next {
                return Err(format!("read chunks leave {next}..{s} out or overlap"));
            }
            next = e;
        }
        if next != req.offset + req.length {
            return Err(format!("read chunks end at {next}"));
        }
    }
    if req.command == proto::CMD_BLOCK_STATUS && a.statuses != 1 {
        return Err(format!(
            "{} block status chunks for one context",
            a.statuses
        ));
    }
    Ok(())
}

/// Parses the reply at `out[at..]`, records it, and returns where the next one starts, or
/// None if the output ends inside it.
fn reply(
    sent: &[Sent],
    terms: &Terms,
    out: &[u8],
    at: usize,
    answers: &mut [Answer],
) -> Result<Option<usize>, String> {
    let take = |from: usize, n: u64| -> Option<&[u8]> {
        usize::try_from(n)
            .ok()
            .and_then(|n| out.get(from..from.checked_add(n)?))
    };
    let request = |cookie: u64| -> Result<(usize, Request), String> {
        let i = cookie.wrapping_sub(1) as usize;
        match sent.get(i) {
            Some(Sent::Whole(r)) if r.command != proto::CMD_DISC => Ok((i, *r)),
            Some(Sent::Whole(_)) => Err(format!("a reply to NBD_CMD_DISC (cookie {cookie})")),
            _ => Err(format!(
                "a reply with cookie {cookie}, which no request had"
            )),
        }
    };
    // Structured replies still allow simple ones, but not to a read; extended headers
    // allow none.
    let simple = match terms.framing {
        Framing::Simple => true,
        Framing::Structured => {
            take(at, 4).is_some_and(|m| be(m) == proto::SIMPLE_REPLY_MAGIC as u64)
        }
        Framing::Extended => false,
    };
    if simple {
        let Some(h) = take(at, 16) else {
            return Ok(None);
        };
        if be(&h[..4]) != proto::SIMPLE_REPLY_MAGIC as u64 {
            return Err(format!("bad simple reply magic at byte {at}"));
        }
        let err = be(&h[4..8]) as u32;
        let (i, req) = request(be(&h[8..16]))?;
        if terms.framing != Framing::Simple && req.command == proto::CMD_READ {
            return Err(format!("a simple reply to read request {}", i + 1));
        }
        let a = &mut answers[i];
        if a.done {
            return Err(format!("a second reply to request {}", i + 1));
        }
        let data = if err == 0 && req.command == proto::CMD_READ {
            req.length
        } else {
            0
        };
        if take(at + 16, data).is_none() {
            return Ok(None);
        }
        a.done = true;
        a.error = (err != 0).then_some(err);
        return Ok(Some(at + 16 + data as usize));
    }
    let extended = terms.framing == Framing::Extended;
    let (hlen, magic) = if extended {
        (32, proto::EXTENDED_REPLY_MAGIC)
    } else {
        (20, proto::STRUCTURED_REPLY_MAGIC)
    };
    let Some(h) = take(at, hlen) else {
        return Ok(None);
    };
    if be(&h[..4]) != magic as u64 {
        return Err(format!("bad chunk magic at byte {at}"));
    }
    let flags = be(&h[4..6]) as u16;
    let kind = be(&h[6..8]) as u16;
    let (i, req) = request(be(&h[8..16]))?;
    let len = if extended {
        if be(&h[16..24]) != req.offset {
            return Err(format!(
                "chunk offset field is not request {}'s offset",
                i + 1
            ));
        }
        be(&h[24..32])
    } else {
        be(&h[16..20])
    };
    let Some(p) = take(at + hlen as usize, len) else {
        return Ok(None);
    };
    let a = &mut answers[i];
    if a.done {
        return Err(format!("a chunk for request {} after its last one", i + 1));
    }
    a.chunks += 1;
    let is_read = req.command == proto::CMD_READ;
    let within = |s: u64, n: u64| {
        s >= req.offset
            && s.checked_add(n)
                .is_some_and(|e| e <= req.offset.saturating_add(req.length))
    };
    match kind {
        proto::REPLY_TYPE_NONE if p.is_empty() && flags & proto::REPLY_FLAG_DONE != 0 => {}
        proto::REPLY_TYPE_OFFSET_DATA if is_read && p.len() > 8 => {
            let s = be(&p[..8]);
            let n = p.len() as u64 - 8;
            if !within(s, n) {
                return Err(format!("data chunk {s}+{n} outside request {}", i + 1));
            }
            a.covered.push((s, s + n));
        }
        proto::REPLY_TYPE_OFFSET_HOLE if is_read && p.len() == 12 => {
            let (s, n) = (be(&p[..8]), be(&p[8..12]));
            if n == 0 || !within(s, n) {
                return Err(format!("hole chunk {s}+{n} outside request {}", i + 1));
            }
            a.covered.push((s, s + n));
        }
        proto::REPLY_TYPE_BLOCK_STATUS | proto::REPLY_TYPE_BLOCK_STATUS_EXT
            if req.command == proto::CMD_BLOCK_STATUS =>
        {
            block_status(kind, extended, p, req, terms)
                .map_err(|e| format!("request {}: {e}", i + 1))?;
            a.statuses += 1;
        }
        proto::REPLY_TYPE_ERROR | proto::REPLY_TYPE_ERROR_OFFSET if p.len() >= 6 => {
            let err = be(&p[..4]) as u32;
            let msg = be(&p[4..6]);
            let tail = if kind == proto::REPLY_TYPE_ERROR {
                0
            } else {
                8
            };
            if err == 0 || 6 + msg + tail != p.len() as u64 {
                return Err(format!("a malformed error chunk for request {}", i + 1));
            }
            a.error.get_or_insert(err);
        }
        _ => {
            return Err(format!(
                "chunk type {kind:#x} (flags {flags:#x}, {} bytes) for request {}",
                p.len(),
                i + 1
            ));
        }
    }
    a.done = flags & proto::REPLY_FLAG_DONE != 0;
    Ok(Some(at + hlen as usize + len as usize))
}

/// A block status chunk's payload: the selected context, then at least one extent (exactly
/// one with `NBD_CMD_FLAG_REQ_ONE`), each of a non-zero length.
fn block_status(
    kind: u16,
    extended: bool,
    p: &[u8],
    req: Request,
    terms: &Terms,
) -> Result<(), String> {
    let (wide, head, each) = if kind == proto::REPLY_TYPE_BLOCK_STATUS_EXT {
        (true, 8, 16)
    } else {
        (false, 4, 8)
    };
    if wide != extended {
        return Err(format!(
            "block status chunk type {kind} in the other framing"
        ));
    }
    if p.len() < head + each || !(p.len() - head).is_multiple_of(each) {
        return Err(format!("a block status payload of {} bytes", p.len()));
    }
    if Some(be(&p[..4]) as u32) != terms.meta_context {
        return Err("block status for a context not selected".into());
    }
    let extents = p[head..].chunks(each);
    if wide && be(&p[4..8]) != extents.len() as u64 {
        return Err("the extent count does not match the payload".into());
    }
    if req.flags & proto::CMD_FLAG_REQ_ONE != 0 && extents.len() != 1 {
        return Err(format!(
            "{} extents with NBD_CMD_FLAG_REQ_ONE",
            extents.len()
        ));
    }
    for e in extents {
        if be(&e[..each / 2]) == 0 {
            return Err("an extent of length 0".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TERMS: Terms = Terms {
        framing: Framing::Simple,
        size: 1 << 20,
        read_only: false,
        max_payload: 1 << 20,
        meta_context: None,
    };

    fn req(cmd: u16, off: u64, len: u32) -> Vec<u8> {
        let mut v = proto::encode_request(false, cmd, 0, 99, off, len.into());
        if cmd == proto::CMD_WRITE {
            v.resize(v.len() + len as usize, 1);
        }
        v
    }

    fn simple(err: u32, cookie: u64, data: usize) -> Vec<u8> {
        let mut v = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&err.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.resize(v.len() + data, 0);
        v
    }

    fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// A read, a write and a disconnect, numbered 1, 2, 3.
    fn session(read_off: u64) -> Vec<Sent> {
        let mut b = req(proto::CMD_READ, read_off, 512);
        b.extend(req(proto::CMD_WRITE, 0, 512));
        b.extend(req(proto::CMD_DISC, 0, 0));
        number_requests(&mut b, false)
    }

    #[test]
    fn well_formed_simple_replies_pass() {
        let out = [simple(0, 2, 0), simple(0, 1, 512)].concat();
        assert_eq!(check(&session(0), &TERMS, &out), Ok(2));
    }

    #[test]
    fn broken_simple_replies_are_caught() {
        let cases: [(Vec<Sent>, Vec<u8>, &str); 6] = [
            (session(0), simple(0, 1, 512), "got no reply"),
            (
                session(0),
                [simple(0, 1, 512), simple(0, 2, 0), simple(0, 3, 0)].concat(),
                "NBD_CMD_DISC",
            ),
            (
                session(0),
                [simple(0, 2, 0), simple(0, 1, 100)].concat(),
                "cut short",
            ),
            (
                session(0),
                [simple(0, 1, 512), simple(0, 1, 512)].concat(),
                "second reply",
            ),
            (
                session(1 << 20),
                [simple(0, 1, 512), simple(0, 2, 0)].concat(),
                "must fail",
            ),
            (
                session(0),
                [simple(0, 2, 0), simple(4, 1, 0)].concat(),
                "not one the protocol defines",
            ),
        ];
        for (sent, out, want) in cases {
            let got = check(&sent, &TERMS, &out);
            assert!(
                got.as_ref().is_err_and(|e| e.contains(want)),
                "{want}: {got:?}"
            );
        }
    }

    #[test]
    fn structured_reads_must_cover_their_range() {
        let terms = Terms {
            framing: Framing::Structured,
            ..TERMS
        };
        let data = |off: u64, n: usize| {
            let mut p = off.to_be_bytes().to_vec();
            p.resize(8 + n, 0);
            p
        };
        let mut hole = 256u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&256u32.to_be_bytes());
        let whole = [
            chunk(0, proto::REPLY_TYPE_OFFSET_DATA, 1, &data(0, 256)),
            chunk(0, proto::REPLY_TYPE_OFFSET_HOLE, 1, &hole),
            chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, 1, &[]),
            simple(0, 2, 0),
        ]
        .concat();
        assert_eq!(check(&session(0), &terms, &whole), Ok(2));
        let half = [
            chunk(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_OFFSET_DATA,
                1,
                &data(0, 256),
            ),
            simple(0, 2, 0),
        ]
        .concat();
        let got = check(&session(0), &terms, &half);
        assert!(
            got.as_ref().is_err_and(|e| e.contains("end at 256")),
            "{got:?}"
        );
        let got = check(
            &session(0),
            &terms,
            &[simple(0, 1, 0), simple(0, 2, 0)].concat(),
        );
        assert!(
            got.as_ref()
                .is_err_and(|e| e.contains("simple reply to read")),
            "{got:?}"
        );
    }
}
