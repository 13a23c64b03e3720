//! The fixed newstyle handshake: greeting, client flags, option haggling, until the client
//! picks an export (`NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`), aborts, or goes away.
//!
//! Reads take exactly the bytes of each message, never more, so whatever the client sends
//! after the handshake is still in the socket for the transmission phase (and, later, for a
//! TLS session started by `NBD_OPT_STARTTLS`: `negotiate` runs over any byte stream, so
//! an upgrade can swap the stream and restart option haggling with fresh `Options`).

use super::export::{BlockSizes, Export, transmission_flags};
use super::proto::{self, Framing};
use super::tls::TlsMode;
use anyhow::{Context, Result, bail};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

/// Largest option payload read into memory. The largest legitimate options are
/// `NBD_OPT_GO` (a name of at most 4096 bytes and a few info requests) and the meta context
/// options (a name and a few queries of at most 4096 bytes each).
pub(crate) const MAX_OPTION_DATA: u32 = 64 << 10;

/// Larger option payloads are skipped (and answered with `NBD_REP_ERR_TOO_BIG`) up to this
/// size; beyond it the client is taken to be hostile and dropped.
const MAX_OPTION_SKIP: u32 = 16 << 20;

/// Context id of `base:allocation` in `NBD_OPT_SET_META_CONTEXT` replies.
pub(crate) const ALLOCATION_CONTEXT_ID: u32 = 1;

/// What the handshake settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Negotiated {
    /// Index of the chosen export.
    pub export: usize,
    /// Reply framing for the transmission phase.
    pub framing: Framing,
    /// Context id for `base:allocation`, if the client selected it for this export.
    pub allocation_context: Option<u32>,
    /// Transmission flags sent to the client.
    pub flags: u16,
}

/// How the handshake ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Enter the transmission phase.
    Transmission(Negotiated),
    /// The client ended the session (`NBD_OPT_ABORT` or EOF) without choosing an export.
    Closed(&'static str),
    /// `NBD_OPT_STARTTLS` was acknowledged: run the TLS handshake on the stream, then
    /// [`negotiate_in_tls`].
    StartTls {
        /// The client's NO_ZEROES flag, which survives the upgrade.
        no_zeroes: bool,
    },
}

/// Negotiation state of one connection.
#[derive(Debug)]
struct Options {
    no_zeroes: bool,
    tls: TlsState,
    structured: bool,
    extended: bool,
    /// Export for which `base:allocation` was selected by the last SET_META_CONTEXT.
    allocation_for: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            no_zeroes: false,
            tls: TlsState::Off,
            structured: false,
            extended: false,
            allocation_for: None,
        }
    }
}

impl Options {
    fn framing(&self) -> Framing {
        if self.extended {
            Framing::Extended
        } else if self.structured {
            Framing::Structured
        } else {
            Framing::Simple
        }
    }
}

/// The export a client means by `name`: an exact match, or for "" the first export (the
/// CLI puts the default export, the one with the empty name, first).
pub(crate) fn find_export(exports: &[Export], name: &[u8]) -> Option<usize> {
    exports.iter().position(|e| e.name.as_bytes() == name).or(
        if name.is_empty() && !exports.is_empty() {
            Some(0)
        } else {
            None
        },
    )
}

/// Most options one handshake may send (per TLS phase). Real clients send a handful; a
/// client that keeps haggling is only holding a connection slot.
pub(crate) const MAX_OPTIONS: u32 = 1024;

/// Where a connection stands with TLS, for option handling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TlsState {
    Off,
    Offered,
    Required,
    Active,
}

/// Asked just before the reply that takes a client into the transmission phase is sent:
/// false if the connection was dropped (to make room for another) and must end instead.
pub(crate) type Commit<'a> = &'a (dyn Fn() -> bool + Send + Sync);

/// Runs the handshake on `io` for a client described by `peer` (for logs): greeting,
/// client flags, then option haggling (see [`haggle`]), asking `commit` before going to
/// the transmission phase.
pub(crate) async fn negotiate<S>(
    io: &mut S,
    exports: &[Export],
    peer: &str,
    tls: TlsMode,
    commit: Commit<'_>,
) -> Result<Outcome>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    io.write_all(&proto::greeting())
        .await
        .context("sending the greeting")?;
    let mut flags = [0u8; 4];
    match io.read_exact(&mut flags).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Ok(Outcome::Closed("closed before sending client flags"));
        }
        Err(e) => return Err(e).context("reading client flags"),
    }
    let client_flags = proto::parse_client_flags(flags)?;
    let state = match tls {
        TlsMode::Off => TlsState::Off,
        TlsMode::On => TlsState::Offered,
        TlsMode::Require => TlsState::Required,
    };
    haggle(
        io,
        exports,
        peer,
        client_flags & proto::FLAG_C_NO_ZEROES != 0,
        state,
        commit,
    )
    .await
}

/// Restarts option haggling inside a TLS session that `NBD_OPT_STARTTLS` set up. The spec
/// has all earlier negotiation forgotten except the client flags.
pub(crate) async fn negotiate_in_tls<S>(
    io: &mut S,
    exports: &[Export],
    peer: &str,
    no_zeroes: bool,
    commit: Commit<'_>,
) -> Result<Outcome>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    haggle(io, exports, peer, no_zeroes, TlsState::Active, commit).await
}

/// Option haggling until the client picks an export, aborts, upgrades to TLS, or goes away.
async fn haggle<S>(
    io: &mut S,
    exports: &[Export],
    peer: &str,
    no_zeroes: bool,
    tls: TlsState,
    commit: Commit<'_>,
) -> Result<Outcome>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut opts = Options {
        no_zeroes,
        tls,
        ..Default::default()
    };
    let mut data = Vec::new();
    let mut out = Vec::with_capacity(512);
    let mut count = 0u32;
    loop {
        let mut hdr = [0u8; proto::OPTION_HEADER_LEN];
        match io.read_exact(&mut hdr).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(Outcome::Closed("closed during option haggling"));
            }
            Err(e) => return Err(e).context("reading an option header"),
        }
        let hdr = proto::parse_option_header(&hdr)?;
        let option = hdr.option;
        out.clear();
        count += 1;
        if count > MAX_OPTIONS {
            bail!("more than {MAX_OPTIONS} options in one handshake");
        }

        if hdr.length > MAX_OPTION_DATA {
            if option == proto::OPT_EXPORT_NAME {
                bail!(
                    "NBD_OPT_EXPORT_NAME with {} bytes of data (names are at most {})",
                    hdr.length,
                    proto::MAX_STRING
                );
            }
            if hdr.length > MAX_OPTION_SKIP {
                bail!("option {option} with {} bytes of data", hdr.length);
            }
            skip(io, hdr.length as u64).await?;
            if is_known(option) {
                proto::put_option_error(
                    &mut out,
                    option,
                    proto::REP_ERR_TOO_BIG,
                    "option data too large",
                );
            } else {
                unsupported(&mut out, option);
            }
            io.write_all(&out)
                .await
                .context("sending an option reply")?;
            continue;
        }
        data.resize(hdr.length as usize, 0);
        io.read_exact(&mut data)
            .await
            .context("reading option data")?;
        debug!("client {peer}: option {option} with {} bytes", hdr.length);

        let step = handle_option(option, &data, exports, &mut opts, &mut out);
        if matches!(step, Step::Go(_)) && !commit() {
            return Ok(Outcome::Closed(
                "dropped to make room for a newer connection",
            ));
        }
        io.write_all(&out)
            .await
            .context("sending an option reply")?;
        match step {
            Step::Continue => {}
            Step::Abort => return Ok(Outcome::Closed("client aborted the handshake")),
            Step::Go(n) => return Ok(Outcome::Transmission(n)),
            Step::StartTls => {
                io.flush().await.context("sending the STARTTLS reply")?;
                return Ok(Outcome::StartTls {
                    no_zeroes: opts.no_zeroes,
                });
            }
            Step::Drop(why) => bail!(why),
        }
    }
}

/// What to do after an option.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Continue,
    Abort,
    Go(Negotiated),
    /// STARTTLS was acknowledged: the TLS handshake comes next.
    StartTls,
    /// A protocol violation that cannot be answered: hard disconnect.
    Drop(String),
}

/// Handles one option, appending the reply bytes to `out`. Pure: no I/O, so every branch
/// is testable.
fn handle_option(
    option: u32,
    data: &[u8],
    exports: &[Export],
    opts: &mut Options,
    out: &mut Vec<u8>,
) -> Step {
    use proto::*;
    if opts.tls == TlsState::Required && option != OPT_STARTTLS && option != OPT_ABORT {
        if option == OPT_EXPORT_NAME {
            // This option has no error reply: the spec has the server close instead.
            return Step::Drop("NBD_OPT_EXPORT_NAME before TLS, which is required".into());
        }
        put_option_error(
            out,
            option,
            REP_ERR_TLS_REQD,
            "this server requires TLS: send NBD_OPT_STARTTLS first",
        );
        return Step::Continue;
    }
    match option {
        OPT_EXPORT_NAME => {
            let Some(idx) = find_export(exports, data) else {
                return Step::Drop(format!(
                    "NBD_OPT_EXPORT_NAME for unknown export '{}'",
                    String::from_utf8_lossy(data)
                ));
            };
            let n = negotiated(idx, exports, opts);
            put_export_name_reply(out, exports[idx].device.size(), n.flags, opts.no_zeroes);
            Step::Go(n)
        }
        OPT_ABORT => {
            // Data, if any, is ignored as the spec asks.
            put_option_reply(out, option, REP_ACK, &[]);
            Step::Abort
        }
        OPT_LIST => {
            if !data.is_empty() {
                put_option_error(out, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                return Step::Continue;
            }
            for e in exports {
                put_rep_server(out, &e.name, &e.description);
            }
            put_option_reply(out, option, REP_ACK, &[]);
            Step::Continue
        }
        OPT_STARTTLS => match opts.tls {
            TlsState::Off => {
                put_option_error(
                    out,
                    option,
                    REP_ERR_UNSUP,
                    "this server does not support TLS",
                );
                Step::Continue
            }
            TlsState::Active => {
                put_option_error(out, option, REP_ERR_INVALID, "TLS is already active");
                Step::Continue
            }
            TlsState::Offered | TlsState::Required => {
                if !data.is_empty() {
                    put_option_error(out, option, REP_ERR_INVALID, "STARTTLS takes no data");
                    return Step::Continue;
                }
                put_option_reply(out, option, REP_ACK, &[]);
                Step::StartTls
            }
        },
        OPT_INFO | OPT_GO => {
            let req = match parse_info_request(data) {
                Ok(r) => r,
                Err(e) => {
                    put_option_error(out, option, REP_ERR_INVALID, &e.to_string());
                    return Step::Continue;
                }
            };
            if req.name.len() > MAX_STRING {
                put_option_error(out, option, REP_ERR_INVALID, "export name too long");
                return Step::Continue;
            }
            let Some(idx) = find_export(exports, req.name) else {
                put_option_error(
                    out,
                    option,
                    REP_ERR_UNKNOWN,
                    &format!("no export named '{}'", String::from_utf8_lossy(req.name)),
                );
                return Step::Continue;
            };
            let export = &exports[idx];
            let n = negotiated(idx, exports, opts);
            put_info_export(out, option, export.device.size(), n.flags);
            if req.want_name {
                put_info_string(out, option, INFO_NAME, &export.name);
            }
            if req.want_description {
                put_info_string(out, option, INFO_DESCRIPTION, &export.description);
            }
            // Sent whether asked or not: the values are the defaults a client assumes
            // anyway (min 1, preferred 4096), and we never require the client to ask.
            let bs = BlockSizes::of(&export.device.capabilities());
            put_info_block_size(out, option, bs.min, bs.preferred, bs.max);
            put_option_reply(out, option, REP_ACK, &[]);
            if option == OPT_GO {
                Step::Go(n)
            } else {
                Step::Continue
            }
        }
        OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                put_option_error(out, option, REP_ERR_INVALID, "option takes no data");
            } else if opts.extended {
                put_option_error(
                    out,
                    option,
                    REP_ERR_EXT_HEADER_REQD,
                    "extended headers are already in use",
                );
            } else {
                opts.structured = true;
                put_option_reply(out, option, REP_ACK, &[]);
            }
            Step::Continue
        }
        OPT_EXTENDED_HEADERS => {
            if !data.is_empty() {
                put_option_error(out, option, REP_ERR_INVALID, "option takes no data");
            } else {
                opts.extended = true;
                put_option_reply(out, option, REP_ACK, &[]);
            }
            Step::Continue
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let set = option == OPT_SET_META_CONTEXT;
            if set {
                // The previous selection is replaced even if this request fails.
                opts.allocation_for = None;
            }
            if opts.framing() == Framing::Simple {
                put_option_error(
                    out,
                    option,
                    REP_ERR_INVALID,
                    "negotiate structured replies first",
                );
                return Step::Continue;
            }
            let req = match parse_meta_context_request(data) {
                Ok(r) => r,
                Err(e) => {
                    put_option_error(out, option, REP_ERR_INVALID, &e.to_string());
                    return Step::Continue;
                }
            };
            let Some(idx) = find_export(exports, req.name) else {
                put_option_error(
                    out,
                    option,
                    REP_ERR_UNKNOWN,
                    &format!("no export named '{}'", String::from_utf8_lossy(req.name)),
                );
                return Step::Continue;
            };
            let offered = exports[idx].device.capabilities().can_extents;
            let selected = offered
                && if set {
                    req.queries
                        .iter()
                        .any(|q| query_matches_base_allocation(q, false))
                } else {
                    req.queries.is_empty()
                        || req
                            .queries
                            .iter()
                            .any(|q| query_matches_base_allocation(q, true))
                };
            if selected {
                // Ids in LIST replies are reserved and must be zero.
                let id = if set { ALLOCATION_CONTEXT_ID } else { 0 };
                put_meta_context(out, option, id, META_BASE_ALLOCATION);
                if set {
                    opts.allocation_for = Some(idx);
                }
            }
            put_option_reply(out, option, REP_ACK, &[]);
            Step::Continue
        }
        _ => {
            unsupported(out, option);
            Step::Continue
        }
    }
}

/// Options this server implements (STARTTLS is answered, but as unsupported).
fn is_known(option: u32) -> bool {
    use proto::*;
    matches!(
        option,
        OPT_EXPORT_NAME
            | OPT_ABORT
            | OPT_LIST
            | OPT_INFO
            | OPT_GO
            | OPT_STRUCTURED_REPLY
            | OPT_LIST_META_CONTEXT
            | OPT_SET_META_CONTEXT
            | OPT_EXTENDED_HEADERS
    )
}

fn unsupported(out: &mut Vec<u8>, option: u32) {
    proto::put_option_error(
        out,
        option,
        proto::REP_ERR_UNSUP,
        &format!("option {option} is not supported"),
    );
}

fn negotiated(idx: usize, exports: &[Export], opts: &Options) -> Negotiated {
    let framing = opts.framing();
    Negotiated {
        export: idx,
        framing,
        allocation_context: (opts.allocation_for == Some(idx)).then_some(ALLOCATION_CONTEXT_ID),
        flags: transmission_flags(&exports[idx].device.capabilities(), framing),
    }
}

/// Fuzzing entry: runs options from `data` (each a big-endian u32 option, a u16 length,
/// then the data) through [`handle_option`], as one connection would, checking that every
/// reply is well formed. The TLS state comes from the first byte.
pub(crate) fn fuzz_options(data: &[u8], exports: &[Export]) {
    let Some((&first, mut data)) = data.split_first() else {
        return;
    };
    let mut opts = Options {
        no_zeroes: first & 1 != 0,
        tls: match (first >> 1) % 4 {
            0 => TlsState::Off,
            1 => TlsState::Offered,
            2 => TlsState::Required,
            _ => TlsState::Active,
        },
        ..Default::default()
    };
    let mut out = Vec::new();
    while data.len() >= 6 {
        let option = u32::from_be_bytes(data[..4].try_into().unwrap());
        let len = (u16::from_be_bytes(data[4..6].try_into().unwrap()) as usize).min(data.len() - 6);
        let body = &data[6..6 + len];
        data = &data[6 + len..];
        out.clear();
        let step = handle_option(option, body, exports, &mut opts, &mut out);
        if option == proto::OPT_EXPORT_NAME && matches!(step, Step::Go(_)) {
            continue;
        }
        // Every other reply is a sequence of well-formed option replies for this option.
        let mut b = &out[..];
        while !b.is_empty() {
            assert!(b.len() >= 20, "truncated option reply");
            assert_eq!(
                u64::from_be_bytes(b[0..8].try_into().unwrap()),
                proto::OPTION_REPLY_MAGIC
            );
            assert_eq!(u32::from_be_bytes(b[8..12].try_into().unwrap()), option);
            let n = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
            assert!(b.len() >= 20 + n, "option reply shorter than its length");
            b = &b[20 + n..];
        }
        match step {
            Step::Continue => {}
            Step::Go(n) => assert!(n.export < exports.len()),
            Step::Abort | Step::Drop(_) => return,
            Step::StartTls => {
                opts = Options {
                    no_zeroes: opts.no_zeroes,
                    tls: TlsState::Active,
                    ..Default::default()
                }
            }
        }
    }
}

/// Reads and throws away `len` bytes without buffering more than a small scratch area.
async fn skip<S: AsyncRead + Unpin>(io: &mut S, mut len: u64) -> Result<()> {
    let mut scratch = [0u8; 8192];
    while len > 0 {
        let n = len.min(scratch.len() as u64) as usize;
        io.read_exact(&mut scratch[..n])
            .await
            .context("skipping option data")?;
        len -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::host::HostBackend;
    use crate::engine::{BlockDevice, SparseDevice, SparseOptions};
    use proto::*;
    use std::sync::Arc;

    fn export(name: &str, size: u64, read_only: bool) -> Export {
        let mut o = SparseOptions::new(size);
        o.read_only = read_only;
        o.buffer_limit = 64 << 20;
        let dev: Arc<dyn BlockDevice> = Arc::new(SparseDevice::new(HostBackend::new(), o).unwrap());
        Export {
            name: name.into(),
            description: format!("desc of {name}"),
            device: dev,
            metrics: None,
        }
    }

    /// Splits a stream of option replies into (option, type, payload).
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            assert_eq!(
                u64::from_be_bytes(b[0..8].try_into().unwrap()),
                OPTION_REPLY_MAGIC
            );
            let opt = u32::from_be_bytes(b[8..12].try_into().unwrap());
            let ty = u32::from_be_bytes(b[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
            v.push((opt, ty, b[20..20 + len].to_vec()));
            b = &b[20 + len..];
        }
        v
    }

    fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[test]
    fn default_export_is_empty_name_or_first() {
        let ex = vec![export("a", 4096, false), export("", 8192, false)];
        assert_eq!(find_export(&ex, b""), Some(1));
        assert_eq!(find_export(&ex, b"a"), Some(0));
        assert_eq!(find_export(&ex, b"zz"), None);
        let ex = vec![export("a", 4096, false), export("b", 8192, false)];
        assert_eq!(find_export(&ex, b""), Some(0));
    }

    #[test]
    fn go_replies_info_and_enters_transmission() {
        let ex = vec![export("", 1 << 20, false), export("two", 1 << 21, true)];
        let mut opts = Options::default();
        let mut out = Vec::new();
        let step = handle_option(
            OPT_GO,
            &info_data("two", &[INFO_NAME, INFO_DESCRIPTION]),
            &ex,
            &mut opts,
            &mut out,
        );
        let Step::Go(n) = step else {
            panic!("{step:?}")
        };
        assert_eq!(n.export, 1);
        assert_eq!(n.framing, Framing::Simple);
        assert_eq!(n.allocation_context, None);
        assert!(n.flags & FLAG_READ_ONLY != 0);
        assert!(n.flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_DF) == 0);
        let r = replies(&out);
        assert_eq!(r.len(), 5);
        assert_eq!(r[0].1, REP_INFO);
        assert_eq!(&r[0].2[0..2], &INFO_EXPORT.to_be_bytes());
        assert_eq!(&r[0].2[2..10], &(1u64 << 21).to_be_bytes());
        assert_eq!(&r[0].2[10..12], &n.flags.to_be_bytes());
        assert_eq!(&r[1].2[..], b"\x00\x01two");
        assert_eq!(&r[2].2[..], b"\x00\x02desc of two");
        assert_eq!(
            r[3].2,
            [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0],
            "block size sent unasked"
        );
        assert_eq!((r[4].0, r[4].1), (OPT_GO, REP_ACK));
    }

    #[test]
    fn info_for_unknown_export_continues() {
        let ex = vec![export("a", 4096, false)];
        let mut out = Vec::new();
        let step = handle_option(
            OPT_INFO,
            &info_data("nope", &[]),
            &ex,
            &mut Options::default(),
            &mut out,
        );
        assert_eq!(step, Step::Continue);
        let r = replies(&out);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].1, REP_ERR_UNKNOWN);
        // Malformed data: INVALID.
        out.clear();
        handle_option(
            OPT_INFO,
            &[0, 0, 0, 9],
            &ex,
            &mut Options::default(),
            &mut out,
        );
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    }

    #[test]
    fn unknown_options_and_starttls_are_unsupported() {
        let ex = vec![export("", 4096, false)];
        for opt in [OPT_STARTTLS, 4, 12, 0xdead] {
            let mut out = Vec::new();
            let step = handle_option(opt, b"xyz", &ex, &mut Options::default(), &mut out);
            assert_eq!(step, Step::Continue);
            let r = replies(&out);
            assert_eq!((r[0].0, r[0].1), (opt, REP_ERR_UNSUP));
        }
    }

    #[test]
    fn list_and_abort() {
        let ex = vec![export("", 4096, false), export("b", 4096, false)];
        let mut out = Vec::new();
        handle_option(OPT_LIST, &[], &ex, &mut Options::default(), &mut out);
        let r = replies(&out);
        assert_eq!(r.len(), 3);
        assert_eq!(&r[0].2[..], b"\0\0\0\0desc of ");
        assert_eq!(&r[1].2[..], b"\0\0\0\x01bdesc of b");
        assert_eq!((r[1].0, r[1].1), (OPT_LIST, REP_SERVER));
        assert_eq!(r[2].1, REP_ACK);
        out.clear();
        handle_option(OPT_LIST, &[1], &ex, &mut Options::default(), &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        out.clear();
        let step = handle_option(OPT_ABORT, &[], &ex, &mut Options::default(), &mut out);
        assert_eq!(step, Step::Abort);
        assert_eq!(replies(&out)[0].1, REP_ACK);
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        let ex = vec![export("", 1 << 20, false)];
        let mut out = Vec::new();
        let mut opts = Options {
            no_zeroes: true,
            ..Default::default()
        };
        let Step::Go(n) = handle_option(OPT_EXPORT_NAME, b"", &ex, &mut opts, &mut out) else {
            panic!()
        };
        assert_eq!(out.len(), 10);
        assert_eq!(&out[8..10], &n.flags.to_be_bytes());
        out.clear();
        let mut opts = Options::default();
        handle_option(OPT_EXPORT_NAME, b"", &ex, &mut opts, &mut out);
        assert_eq!(out.len(), 134);
        let step = handle_option(OPT_EXPORT_NAME, b"x", &ex, &mut opts, &mut out);
        assert!(matches!(step, Step::Drop(_)));
    }

    #[test]
    fn structured_and_extended_negotiation() {
        let ex = vec![export("", 1 << 20, false)];
        let mut opts = Options::default();
        let mut out = Vec::new();
        handle_option(OPT_STRUCTURED_REPLY, &[], &ex, &mut opts, &mut out);
        assert_eq!(replies(&out)[0].1, REP_ACK);
        assert_eq!(opts.framing(), Framing::Structured);
        out.clear();
        handle_option(OPT_EXTENDED_HEADERS, &[1], &ex, &mut opts, &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        out.clear();
        handle_option(OPT_EXTENDED_HEADERS, &[], &ex, &mut opts, &mut out);
        assert_eq!(replies(&out)[0].1, REP_ACK);
        assert_eq!(opts.framing(), Framing::Extended);
        out.clear();
        handle_option(OPT_STRUCTURED_REPLY, &[], &ex, &mut opts, &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_EXT_HEADER_REQD);
        assert_eq!(opts.framing(), Framing::Extended);
        let Step::Go(n) = handle_option(OPT_GO, &info_data("", &[]), &ex, &mut opts, &mut out)
        else {
            panic!()
        };
        assert!(n.flags & FLAG_SEND_DF != 0);
        assert!(n.flags & FLAG_CAN_MULTI_CONN != 0);
    }

    #[test]
    fn meta_contexts() {
        let ex = vec![export("", 1 << 20, false), export("b", 1 << 20, false)];
        let mut opts = Options::default();
        let mut out = Vec::new();
        // Before structured replies: refused.
        handle_option(
            OPT_SET_META_CONTEXT,
            &meta_data("", &["base:allocation"]),
            &ex,
            &mut opts,
            &mut out,
        );
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        opts.structured = true;

        out.clear();
        handle_option(
            OPT_LIST_META_CONTEXT,
            &meta_data("", &[]),
            &ex,
            &mut opts,
            &mut out,
        );
        let r = replies(&out);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1, REP_META_CONTEXT);
        assert_eq!(&r[0].2[..4], &[0, 0, 0, 0]);
        assert_eq!(&r[0].2[4..], b"base:allocation");

        out.clear();
        handle_option(
            OPT_LIST_META_CONTEXT,
            &meta_data("", &["qemu:dirty-bitmap:x"]),
            &ex,
            &mut opts,
            &mut out,
        );
        assert_eq!(
            replies(&out).len(),
            1,
            "unknown namespace ignored: just ACK"
        );

        out.clear();
        handle_option(
            OPT_SET_META_CONTEXT,
            &meta_data("b", &["base:", "base:allocation", "base:allocation"]),
            &ex,
            &mut opts,
            &mut out,
        );
        let r = replies(&out);
        assert_eq!(r.len(), 2);
        assert_eq!(&r[0].2[..4], &ALLOCATION_CONTEXT_ID.to_be_bytes());
        assert_eq!(opts.allocation_for, Some(1));

        // GO on another export: the context does not apply.
        let Step::Go(n) = handle_option(OPT_GO, &info_data("", &[]), &ex, &mut opts, &mut out)
        else {
            panic!()
        };
        assert_eq!(n.allocation_context, None);
        let Step::Go(n) = handle_option(OPT_GO, &info_data("b", &[]), &ex, &mut opts, &mut out)
        else {
            panic!()
        };
        assert_eq!(n.allocation_context, Some(ALLOCATION_CONTEXT_ID));

        // A failing SET clears the selection.
        out.clear();
        handle_option(OPT_SET_META_CONTEXT, &[0, 0], &ex, &mut opts, &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        assert_eq!(opts.allocation_for, None);
    }

    #[test]
    fn tls_required_refuses_all_but_starttls_and_abort() {
        let ex = vec![export("", 1 << 20, false)];
        let mut opts = Options {
            tls: TlsState::Required,
            ..Default::default()
        };
        for opt in [OPT_LIST, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY, 99] {
            let mut out = Vec::new();
            let step = handle_option(opt, &info_data("", &[]), &ex, &mut opts, &mut out);
            assert_eq!(step, Step::Continue);
            assert_eq!(replies(&out)[0].1, REP_ERR_TLS_REQD, "option {opt}");
        }
        assert!(!opts.structured, "refused options change nothing");
        let mut out = Vec::new();
        let step = handle_option(OPT_EXPORT_NAME, b"", &ex, &mut opts, &mut out);
        assert!(matches!(step, Step::Drop(_)) && out.is_empty());
        let step = handle_option(OPT_STARTTLS, b"x", &ex, &mut opts, &mut out);
        assert_eq!(
            (step, replies(&out)[0].1),
            (Step::Continue, REP_ERR_INVALID)
        );
        out.clear();
        let step = handle_option(OPT_STARTTLS, b"", &ex, &mut opts, &mut out);
        assert_eq!((step, replies(&out)[0].1), (Step::StartTls, REP_ACK));
        out.clear();
        let step = handle_option(OPT_ABORT, b"", &ex, &mut opts, &mut out);
        assert_eq!(step, Step::Abort);
    }

    #[test]
    fn starttls_when_active_or_offered() {
        let ex = vec![export("", 1 << 20, false)];
        let mut out = Vec::new();
        let mut active = Options {
            tls: TlsState::Active,
            ..Default::default()
        };
        let step = handle_option(OPT_STARTTLS, b"", &ex, &mut active, &mut out);
        assert_eq!(
            (step, replies(&out)[0].1),
            (Step::Continue, REP_ERR_INVALID)
        );
        out.clear();
        let mut offered = Options {
            tls: TlsState::Offered,
            ..Default::default()
        };
        // With TLS merely offered, plain options work.
        let step = handle_option(OPT_GO, &info_data("", &[]), &ex, &mut offered, &mut out);
        assert!(matches!(step, Step::Go(_)));
    }

    #[tokio::test]
    async fn option_flood_is_cut_off() {
        let ex = vec![export("", 1 << 20, false)];
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(async move {
            negotiate(&mut server, &ex, "test", TlsMode::Off, &|| true).await
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = rd.read_to_end(&mut sink).await;
        });
        wr.write_all(&[0, 0, 0, 1]).await.unwrap();
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&99u32.to_be_bytes());
        opt.extend_from_slice(&0u32.to_be_bytes());
        let mut sent = 0;
        for _ in 0..MAX_OPTIONS + 10 {
            if wr.write_all(&opt).await.is_err() {
                break;
            }
            sent += 1;
        }
        let err = srv.await.unwrap().expect_err("the flood was not cut off");
        assert!(
            err.to_string().contains("options in one handshake"),
            "{err}"
        );
        assert!(sent > MAX_OPTIONS);
        drop(wr);
        drain.await.unwrap();
    }

    #[tokio::test]
    async fn full_handshake_over_a_pipe() {
        let ex = vec![export("", 1 << 20, false)];
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(async move {
            negotiate(&mut server, &ex, "test", TlsMode::Off, &|| true).await
        });
        let mut greet = [0u8; 18];
        client.read_exact(&mut greet).await.unwrap();
        assert_eq!(greet, greeting());
        client.write_all(&[0, 0, 0, 3]).await.unwrap();
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        let d = info_data("", &[INFO_BLOCK_SIZE]);
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(d.len() as u32).to_be_bytes());
        opt.extend_from_slice(&d);
        client.write_all(&opt).await.unwrap();
        let Outcome::Transmission(n) = srv.await.unwrap().unwrap() else {
            panic!()
        };
        assert_eq!(n.export, 0);
    }

    #[tokio::test]
    async fn oversized_option_is_skipped_then_haggling_goes_on() {
        let ex = vec![export("", 1 << 20, false)];
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(async move {
            negotiate(&mut server, &ex, "test", TlsMode::Off, &|| true).await
        });
        let mut greet = [0u8; 18];
        client.read_exact(&mut greet).await.unwrap();
        client.write_all(&[0, 0, 0, 1]).await.unwrap();
        let len = MAX_OPTION_DATA + 10;
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&OPT_INFO.to_be_bytes());
        opt.extend_from_slice(&len.to_be_bytes());
        opt.resize(opt.len() + len as usize, 0);
        client.write_all(&opt).await.unwrap();
        let mut rep = [0u8; 20];
        client.read_exact(&mut rep).await.unwrap();
        assert_eq!(&rep[12..16], &REP_ERR_TOO_BIG.to_be_bytes());
        let mut msg = vec![0u8; u32::from_be_bytes(rep[16..20].try_into().unwrap()) as usize];
        client.read_exact(&mut msg).await.unwrap();
        // An unknown option, oversized too: UNSUP, not TOO_BIG.
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&77u32.to_be_bytes());
        opt.extend_from_slice(&len.to_be_bytes());
        opt.resize(opt.len() + len as usize, 0);
        client.write_all(&opt).await.unwrap();
        client.read_exact(&mut rep).await.unwrap();
        assert_eq!(&rep[12..16], &REP_ERR_UNSUP.to_be_bytes());
        let mut msg = vec![0u8; u32::from_be_bytes(rep[16..20].try_into().unwrap()) as usize];
        client.read_exact(&mut msg).await.unwrap();
        // ABORT still works.
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&OPT_ABORT.to_be_bytes());
        opt.extend_from_slice(&0u32.to_be_bytes());
        client.write_all(&opt).await.unwrap();
        assert!(matches!(srv.await.unwrap().unwrap(), Outcome::Closed(_)));
    }

    #[tokio::test]
    async fn unknown_client_flags_drop_the_connection() {
        let ex = vec![export("", 1 << 20, false)];
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(async move {
            negotiate(&mut server, &ex, "test", TlsMode::Off, &|| true).await
        });
        let mut greet = [0u8; 18];
        client.read_exact(&mut greet).await.unwrap();
        client.write_all(&[0, 0, 0, 0x10]).await.unwrap();
        assert!(srv.await.unwrap().is_err());
    }
}
