//! NBD wire format: constants, parsing of what clients send, encoding of what the server
//! sends. Pure functions over byte slices, no I/O, so every message can be tested byte for
//! byte against the layouts in NetworkBlockDevice/nbd doc/proto.md (and its
//! `extension-ext-header` branch for extended headers).
//!
//! All integers on the wire are big-endian.

use std::fmt;

// ---- Magic numbers ------------------------------------------------------------------------

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server magic of the newstyle handshake, and the magic of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact (28-byte) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended (32-byte) request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---- Handshake flags ----------------------------------------------------------------------

/// Server handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the 124 zero bytes after `NBD_OPT_EXPORT_NAME` may be left out.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: leave out the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Handshake flags this server sends.
pub const SERVER_HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

// ---- Transmission flags -------------------------------------------------------------------

/// Always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// The medium is rotational (never set here).
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` (and `NBD_CMD_FLAG_NO_HOLE`) is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` is supported on reads.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Several connections share one consistent device.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_CACHE` is supported.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- Options ------------------------------------------------------------------------------

/// Select an export and enter transmission (cannot report errors).
pub const OPT_EXPORT_NAME: u32 = 1;
/// End the negotiation.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Use extended (64-bit) headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---- Option replies -----------------------------------------------------------------------

/// The option succeeded (or a list is complete).
pub const REP_ACK: u32 = 1;
/// One export of `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// One item of information of `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub const REP_INFO: u32 = 3;
/// One metadata context.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// Unknown option.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// Syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// Not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
/// TLS required first.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
/// The client must request block sizes.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR | 8;
/// Request or reply too large.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;
/// Extended headers are in force (or required).
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR | 10;

// ---- Information types --------------------------------------------------------------------

/// Size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const INFO_NAME: u16 = 1;
/// Human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- Commands and command flags -----------------------------------------------------------

/// Read.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Prefetch hint.
pub const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Query block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Write zeroes: keep the range allocated.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Read: at most one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Block status: one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Write zeroes: fail with ENOTSUP unless fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers: the length field is a payload length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// ---- Structured replies -------------------------------------------------------------------

/// Last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// No payload; ends a reply.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// A range that reads as zeros.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Block status with 32-bit descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Block status with 64-bit descriptors (extended headers).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// An error for the whole request.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// An error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// `base:allocation`: the block is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the block reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context this server offers.
pub const META_BASE_ALLOCATION: &str = "base:allocation";

// ---- Sizes --------------------------------------------------------------------------------

/// Strings (names, descriptions, messages) may be at most this long.
pub const MAX_STRING: usize = 4096;
/// Length of an option header (`IHAVEOPT`, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Length of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Length of an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;

// ---- Errors -------------------------------------------------------------------------------

/// NBD error values. These are fixed protocol numbers (they happen to match Linux errnos,
/// but must never be taken from the host's errno table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdError {
    /// Operation not permitted.
    Perm = 1,
    /// Input/output error.
    Io = 5,
    /// Cannot allocate memory.
    NoMem = 12,
    /// Invalid argument.
    Inval = 22,
    /// No space left on device.
    NoSpc = 28,
    /// Value too large.
    Overflow = 75,
    /// Operation not supported.
    NotSup = 95,
    /// Server is shutting down.
    Shutdown = 108,
}

impl NbdError {
    /// The value sent on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// Maps a host errno to the NBD error a client should see. Unknown errnos become EIO:
    /// the operation failed, and the client should not assume it was its own fault.
    pub fn from_errno(errno: i32) -> NbdError {
        match errno {
            libc::EPERM | libc::EACCES | libc::EROFS => NbdError::Perm,
            libc::EIO => NbdError::Io,
            libc::ENOMEM => NbdError::NoMem,
            libc::EINVAL => NbdError::Inval,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NbdError::NoSpc,
            libc::EOVERFLOW => NbdError::Overflow,
            libc::ENOTSUP => NbdError::NotSup,
            libc::ESHUTDOWN => NbdError::Shutdown,
            _ => NbdError::Io,
        }
    }
}

/// Malformed input from a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtoError {
    /// A header did not start with the expected magic number.
    BadMagic(u64),
    /// The client set flags this server does not know.
    UnknownClientFlags(u32),
    /// Option data does not match the layout of the option.
    BadOption(&'static str),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::BadMagic(m) => write!(f, "bad magic number {m:#x}"),
            ProtoError::UnknownClientFlags(fl) => write!(f, "unknown client flags {fl:#x}"),
            ProtoError::BadOption(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ProtoError {}

// ---- Handshake: parsing -------------------------------------------------------------------

/// Checks the client flags; any bit other than FIXED_NEWSTYLE and NO_ZEROES is an error
/// (the spec requires the server to drop the connection).
pub fn parse_client_flags(buf: [u8; 4]) -> Result<u32, ProtoError> {
    let flags = u32::from_be_bytes(buf);
    let unknown = flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    if unknown != 0 {
        return Err(ProtoError::UnknownClientFlags(unknown));
    }
    Ok(flags)
}

/// The header of one option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number (`OPT_*`).
    pub option: u32,
    /// Length of the option data that follows.
    pub length: u32,
}

/// Parses an option header; the magic must be `IHAVEOPT`.
pub fn parse_option_header(buf: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
    let magic = be_u64(&buf[0..8]);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    Ok(OptionHeader {
        option: be_u32(&buf[8..12]),
        length: be_u32(&buf[12..16]),
    })
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// Export name ("" for the default export).
    pub name: &'a [u8],
    /// `NBD_INFO_NAME` was asked for.
    pub want_name: bool,
    /// `NBD_INFO_DESCRIPTION` was asked for.
    pub want_description: bool,
    /// `NBD_INFO_BLOCK_SIZE` was asked for.
    pub want_block_size: bool,
}

/// Parses the data of `NBD_OPT_INFO`/`NBD_OPT_GO`. Unknown information requests are
/// ignored, as the spec requires.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, ProtoError> {
    let mut r = Reader::new(data);
    let name = r.string().ok_or(ProtoError::BadOption(
        "export name longer than the option data",
    ))?;
    let count = r.u16().ok_or(ProtoError::BadOption(
        "missing count of information requests",
    ))?;
    if r.remaining() != count as usize * 2 {
        return Err(ProtoError::BadOption(
            "information request list does not match the option length",
        ));
    }
    let mut req = InfoRequest {
        name,
        ..Default::default()
    };
    for _ in 0..count {
        match r.u16() {
            Some(INFO_NAME) => req.want_name = true,
            Some(INFO_DESCRIPTION) => req.want_description = true,
            Some(INFO_BLOCK_SIZE) => req.want_block_size = true,
            _ => {}
        }
    }
    Ok(req)
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    /// Export name.
    pub name: &'a [u8],
    /// Query strings.
    pub queries: Vec<&'a [u8]>,
}

/// Parses the data of the two metadata context options.
pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest<'_>, ProtoError> {
    let mut r = Reader::new(data);
    let name = r.string().ok_or(ProtoError::BadOption(
        "export name longer than the option data",
    ))?;
    let count = r
        .u32()
        .ok_or(ProtoError::BadOption("missing count of queries"))? as usize;
    // Each query takes at least 4 bytes: the count cannot make us allocate more than the data.
    if count > r.remaining() / 4 {
        return Err(ProtoError::BadOption(
            "more queries than the option data holds",
        ));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let q = r
            .string()
            .ok_or(ProtoError::BadOption("query longer than the option data"))?;
        queries.push(q);
    }
    if r.remaining() != 0 {
        return Err(ProtoError::BadOption("trailing bytes after the queries"));
    }
    Ok(MetaContextRequest { name, queries })
}

/// Whether a metadata context query selects `base:allocation`. With `list`, the wildcard
/// `base:` also matches (it must be ignored by `NBD_OPT_SET_META_CONTEXT`).
pub fn query_matches_base_allocation(query: &[u8], list: bool) -> bool {
    query == META_BASE_ALLOCATION.as_bytes() || (list && query == b"base:")
}

// ---- Handshake: encoding ------------------------------------------------------------------

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&SERVER_HANDSHAKE_FLAGS.to_be_bytes());
    b
}

/// Appends an option reply with `payload`.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, payload: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Appends an error option reply whose payload is a human-readable message (cut to
/// [`MAX_STRING`] bytes on a character boundary).
pub fn put_option_error(out: &mut Vec<u8>, option: u32, reply: u32, message: &str) {
    put_option_reply(
        out,
        option,
        reply,
        truncate_str(message, MAX_STRING).as_bytes(),
    );
}

/// Appends an `NBD_REP_SERVER` reply for `NBD_OPT_LIST`: the name, then the description
/// (the spec leaves the rest of the reply to a string for humans).
pub fn put_rep_server(out: &mut Vec<u8>, name: &str, description: &str) {
    let name = truncate_str(name, MAX_STRING);
    let description = truncate_str(description, MAX_STRING);
    let mut payload = Vec::with_capacity(4 + name.len() + description.len());
    payload.extend_from_slice(&(name.len() as u32).to_be_bytes());
    payload.extend_from_slice(name.as_bytes());
    payload.extend_from_slice(description.as_bytes());
    put_option_reply(out, OPT_LIST, REP_SERVER, &payload);
}

/// Appends an `NBD_REP_INFO` reply carrying `NBD_INFO_EXPORT`.
pub fn put_info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut p = [0u8; 12];
    p[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    p[2..10].copy_from_slice(&size.to_be_bytes());
    p[10..12].copy_from_slice(&flags.to_be_bytes());
    put_option_reply(out, option, REP_INFO, &p);
}

/// Appends an `NBD_REP_INFO` reply carrying `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn put_info_string(out: &mut Vec<u8>, option: u32, info: u16, s: &str) {
    let s = truncate_str(s, MAX_STRING);
    let mut p = Vec::with_capacity(2 + s.len());
    p.extend_from_slice(&info.to_be_bytes());
    p.extend_from_slice(s.as_bytes());
    put_option_reply(out, option, REP_INFO, &p);
}

/// Appends an `NBD_REP_INFO` reply carrying `NBD_INFO_BLOCK_SIZE`.
pub fn put_info_block_size(out: &mut Vec<u8>, option: u32, min: u32, preferred: u32, max: u32) {
    let mut p = [0u8; 14];
    p[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    p[2..6].copy_from_slice(&min.to_be_bytes());
    p[6..10].copy_from_slice(&preferred.to_be_bytes());
    p[10..14].copy_from_slice(&max.to_be_bytes());
    put_option_reply(out, option, REP_INFO, &p);
}

/// Appends an `NBD_REP_META_CONTEXT` reply.
pub fn put_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let mut p = Vec::with_capacity(4 + name.len());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(name.as_bytes());
    put_option_reply(out, option, REP_META_CONTEXT, &p);
}

/// Appends the reply to `NBD_OPT_EXPORT_NAME`: size, flags and, unless the client set
/// `NBD_FLAG_C_NO_ZEROES`, 124 zero bytes.
pub fn put_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

// ---- Transmission: requests ---------------------------------------------------------------

/// One request header, compact or extended. For compact requests `length` is the 32-bit
/// length widened; it is a payload length for `NBD_CMD_WRITE` and an effect length
/// otherwise. For extended requests it is a payload length when `flags` has
/// [`CMD_FLAG_PAYLOAD_LEN`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command (`CMD_*`).
    pub command: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length (see above).
    pub length: u64,
}

impl Request {
    /// The number of payload bytes following this header on the wire. A write always
    /// carries its length in payload: the extended-header spec asks writers to set
    /// [`CMD_FLAG_PAYLOAD_LEN`], but qemu 10 does not, and there is no other reading of a
    /// write's length. Other commands carry a payload only with that flag, and only with
    /// extended headers.
    pub fn payload_len(&self, extended: bool) -> u64 {
        if self.command == CMD_WRITE || (extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0) {
            self.length
        } else {
            0
        }
    }
}

/// Length of a request header in the negotiated style.
pub fn request_len(extended: bool) -> usize {
    if extended {
        EXTENDED_REQUEST_LEN
    } else {
        REQUEST_LEN
    }
}

/// Parses a request header of [`request_len`] bytes. A magic of the other style is an error
/// too: once negotiated, the style never changes.
pub fn parse_request(buf: &[u8], extended: bool) -> Result<Request, ProtoError> {
    debug_assert!(buf.len() >= request_len(extended));
    let magic = be_u32(&buf[0..4]);
    let want = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != want {
        return Err(ProtoError::BadMagic(magic as u64));
    }
    Ok(Request {
        flags: be_u16(&buf[4..6]),
        command: be_u16(&buf[6..8]),
        cookie: be_u64(&buf[8..16]),
        offset: be_u64(&buf[16..24]),
        length: if extended {
            be_u64(&buf[24..32])
        } else {
            be_u32(&buf[24..28]) as u64
        },
    })
}

// ---- Transmission: replies ----------------------------------------------------------------

/// How replies are framed on a connection, fixed by the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Simple replies only (no structured replies negotiated): Linux kernel, fio's defaults.
    Simple,
    /// Structured reply chunks with 20-byte headers.
    Structured,
    /// Extended reply chunks with 32-byte headers.
    Extended,
}

/// Room for any fixed reply header plus the fixed part of its payload (an extended header
/// and the 12 bytes of a hole chunk, or the 14 of an error-offset chunk).
pub const FRAME_CAP: usize = 64;

/// A small reply header built in place, without allocation.
#[derive(Clone, Copy)]
pub struct Frame {
    buf: [u8; FRAME_CAP],
    len: u8,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Frame").field(&self.as_bytes()).finish()
    }
}

impl Default for Frame {
    fn default() -> Self {
        Frame::new()
    }
}

impl Frame {
    /// An empty frame.
    pub const fn new() -> Self {
        Frame {
            buf: [0; FRAME_CAP],
            len: 0,
        }
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }

    /// Number of encoded bytes.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// True when nothing is encoded.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn put(&mut self, b: &[u8]) {
        let at = self.len as usize;
        self.buf[at..at + b.len()].copy_from_slice(b);
        self.len += b.len() as u8;
    }

    fn put_u16(&mut self, v: u16) {
        self.put(&v.to_be_bytes());
    }

    fn put_u32(&mut self, v: u32) {
        self.put(&v.to_be_bytes());
    }

    fn put_u64(&mut self, v: u64) {
        self.put(&v.to_be_bytes());
    }

    /// Appends a simple reply header.
    pub fn simple(&mut self, error: u32, cookie: u64) -> &mut Self {
        self.put_u32(SIMPLE_REPLY_MAGIC);
        self.put_u32(error);
        self.put_u64(cookie);
        self
    }

    /// Appends a chunk header: structured (`offset` unused, `length` must fit 32 bits) or
    /// extended (`offset` is the request's offset). Panics on [`Framing::Simple`].
    pub fn chunk(
        &mut self,
        framing: Framing,
        flags: u16,
        kind: u16,
        cookie: u64,
        offset: u64,
        length: u64,
    ) -> &mut Self {
        match framing {
            Framing::Structured => {
                debug_assert!(length <= u32::MAX as u64);
                self.put_u32(STRUCTURED_REPLY_MAGIC);
                self.put_u16(flags);
                self.put_u16(kind);
                self.put_u64(cookie);
                self.put_u32(length as u32);
            }
            Framing::Extended => {
                self.put_u32(EXTENDED_REPLY_MAGIC);
                self.put_u16(flags);
                self.put_u16(kind);
                self.put_u64(cookie);
                self.put_u64(offset);
                self.put_u64(length);
            }
            Framing::Simple => panic!("chunk header on a connection without structured replies"),
        }
        self
    }

    /// Appends the header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk and its 8-byte offset;
    /// `data_len` bytes of data must follow.
    pub fn offset_data(
        &mut self,
        framing: Framing,
        flags: u16,
        cookie: u64,
        req_offset: u64,
        data_offset: u64,
        data_len: u64,
    ) -> &mut Self {
        self.chunk(
            framing,
            flags,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            req_offset,
            8 + data_len,
        );
        self.put_u64(data_offset);
        self
    }

    /// Appends a complete `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
    pub fn offset_hole(
        &mut self,
        framing: Framing,
        flags: u16,
        cookie: u64,
        req_offset: u64,
        hole_offset: u64,
        hole_len: u32,
    ) -> &mut Self {
        self.chunk(
            framing,
            flags,
            REPLY_TYPE_OFFSET_HOLE,
            cookie,
            req_offset,
            12,
        );
        self.put_u64(hole_offset);
        self.put_u32(hole_len);
        self
    }

    /// Appends a complete `NBD_REPLY_TYPE_NONE` chunk with the DONE flag.
    pub fn none(&mut self, framing: Framing, cookie: u64, req_offset: u64) -> &mut Self {
        self.chunk(
            framing,
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            cookie,
            req_offset,
            0,
        )
    }

    /// Appends the header of an `NBD_REPLY_TYPE_ERROR` chunk (DONE) and the fixed part of
    /// its payload; `message_len` bytes of message must follow.
    pub fn error_chunk(
        &mut self,
        framing: Framing,
        cookie: u64,
        req_offset: u64,
        error: u32,
        message_len: u16,
    ) -> &mut Self {
        self.chunk(
            framing,
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            cookie,
            req_offset,
            6 + message_len as u64,
        );
        self.put_u32(error);
        self.put_u16(message_len);
        self
    }
}

/// Appends a complete error reply for `framing`: a simple reply, or an
/// `NBD_REPLY_TYPE_ERROR` chunk with the DONE flag carrying `message` (cut to
/// [`MAX_STRING`] bytes).
pub fn put_error_reply(
    out: &mut Vec<u8>,
    framing: Framing,
    cookie: u64,
    req_offset: u64,
    error: NbdError,
    message: &str,
) {
    let mut f = Frame::new();
    match framing {
        Framing::Simple => {
            f.simple(error.code(), cookie);
            out.extend_from_slice(f.as_bytes());
        }
        _ => {
            let msg = truncate_str(message, MAX_STRING);
            f.error_chunk(framing, cookie, req_offset, error.code(), msg.len() as u16);
            out.extend_from_slice(f.as_bytes());
            out.extend_from_slice(msg.as_bytes());
        }
    }
}

/// One block status descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusDescriptor {
    /// Length of the run in bytes (nonzero).
    pub length: u64,
    /// Status flags (`STATE_*`).
    pub flags: u32,
}

/// Appends a complete block status chunk (with the DONE flag when `done`):
/// `NBD_REPLY_TYPE_BLOCK_STATUS` for structured framing (descriptor lengths must fit 32
/// bits), `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` for extended framing.
pub fn put_block_status(
    out: &mut Vec<u8>,
    framing: Framing,
    done: bool,
    cookie: u64,
    req_offset: u64,
    context_id: u32,
    descriptors: &[StatusDescriptor],
) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut f = Frame::new();
    match framing {
        Framing::Extended => {
            let len = 8 + 16 * descriptors.len() as u64;
            f.chunk(
                framing,
                flags,
                REPLY_TYPE_BLOCK_STATUS_EXT,
                cookie,
                req_offset,
                len,
            );
            out.reserve(f.len() + len as usize);
            out.extend_from_slice(f.as_bytes());
            out.extend_from_slice(&context_id.to_be_bytes());
            out.extend_from_slice(&(descriptors.len() as u32).to_be_bytes());
            for d in descriptors {
                out.extend_from_slice(&d.length.to_be_bytes());
                out.extend_from_slice(&(d.flags as u64).to_be_bytes());
            }
        }
        _ => {
            let len = 4 + 8 * descriptors.len() as u64;
            f.chunk(
                framing,
                flags,
                REPLY_TYPE_BLOCK_STATUS,
                cookie,
                req_offset,
                len,
            );
            out.reserve(f.len() + len as usize);
            out.extend_from_slice(f.as_bytes());
            out.extend_from_slice(&context_id.to_be_bytes());
            for d in descriptors {
                debug_assert!(d.length <= u32::MAX as u64);
                out.extend_from_slice(&(d.length as u32).to_be_bytes());
                out.extend_from_slice(&d.flags.to_be_bytes());
            }
        }
    }
}

// ---- Helpers ------------------------------------------------------------------------------

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A bounds-checked cursor over option data.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    fn remaining(&self) -> usize {
        self.data.len()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.data.len() {
            return None;
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(be_u16)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(be_u32)
    }

    /// A 32-bit length followed by that many bytes.
    fn string(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }
}

/// A request header as a client encodes it: the other side of [`parse_request`], for tests
/// that speak NBD by hand. `length` is cut to 32 bits without extended headers.
#[cfg(test)]
pub(crate) fn encode_request(
    extended: bool,
    command: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    length: u64,
) -> Vec<u8> {
    let magic = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    let mut b = Vec::with_capacity(request_len(extended));
    b.extend_from_slice(&magic.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&command.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    if extended {
        b.extend_from_slice(&length.to_be_bytes());
    } else {
        b.extend_from_slice(&(length as u32).to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_flags() {
        assert_eq!(
            greeting(),
            [
                b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', b'I', b'H', b'A', b'V', b'E', b'O',
                b'P', b'T', 0x00, 0x03
            ]
        );
    }

    #[test]
    fn client_flags() {
        assert_eq!(parse_client_flags([0, 0, 0, 3]), Ok(3));
        assert_eq!(parse_client_flags([0, 0, 0, 1]), Ok(1));
        assert_eq!(parse_client_flags([0, 0, 0, 0]), Ok(0));
        assert_eq!(
            parse_client_flags([0, 0, 0, 4]),
            Err(ProtoError::UnknownClientFlags(4))
        );
        assert_eq!(
            parse_client_flags([0x80, 0, 0, 1]),
            Err(ProtoError::UnknownClientFlags(0x8000_0000))
        );
    }

    #[test]
    fn option_header() {
        let mut b = *b"IHAVEOPT\x00\x00\x00\x07\x00\x00\x00\x0a";
        assert_eq!(
            parse_option_header(&b),
            Ok(OptionHeader {
                option: OPT_GO,
                length: 10
            })
        );
        b[0] = b'X';
        assert!(matches!(
            parse_option_header(&b),
            Err(ProtoError::BadMagic(_))
        ));
    }

    #[test]
    fn info_request_parses_name_and_requests() {
        // name "ab", 3 requests: NAME, BLOCK_SIZE, an unknown 0x1234.
        let data = [0, 0, 0, 2, b'a', b'b', 0, 3, 0, 1, 0, 3, 0x12, 0x34];
        let r = parse_info_request(&data).unwrap();
        assert_eq!(r.name, b"ab");
        assert!(r.want_name && r.want_block_size && !r.want_description);

        // Empty name, no requests.
        let r = parse_info_request(&[0, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!(r, InfoRequest::default());
    }

    #[test]
    fn info_request_rejects_malformed() {
        assert!(parse_info_request(&[]).is_err());
        assert!(parse_info_request(&[0, 0, 0, 0, 0]).is_err());
        // Name length larger than the data.
        assert!(parse_info_request(&[0xff, 0xff, 0xff, 0xff, 0, 0]).is_err());
        // Count says 2 requests, data holds 1.
        assert!(parse_info_request(&[0, 0, 0, 0, 0, 2, 0, 1]).is_err());
        // Trailing byte.
        assert!(parse_info_request(&[0, 0, 0, 0, 0, 1, 0, 1, 9]).is_err());
    }

    #[test]
    fn meta_context_request() {
        let mut data = vec![0, 0, 0, 1, b'x', 0, 0, 0, 2];
        data.extend_from_slice(&[0, 0, 0, 15]);
        data.extend_from_slice(b"base:allocation");
        data.extend_from_slice(&[0, 0, 0, 5]);
        data.extend_from_slice(b"base:");
        let r = parse_meta_context_request(&data).unwrap();
        assert_eq!(r.name, b"x");
        assert_eq!(r.queries, vec![&b"base:allocation"[..], &b"base:"[..]]);
        assert!(query_matches_base_allocation(r.queries[0], false));
        assert!(!query_matches_base_allocation(r.queries[1], false));
        assert!(query_matches_base_allocation(r.queries[1], true));
        assert!(!query_matches_base_allocation(b"qemu:dirty-bitmap:x", true));

        // Count far larger than the data: rejected without allocating.
        assert!(parse_meta_context_request(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_err());
        // Query length past the end.
        assert!(parse_meta_context_request(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, b'a']).is_err());
        // Trailing bytes.
        assert!(parse_meta_context_request(&[0, 0, 0, 0, 0, 0, 0, 0, 1]).is_err());
        // Zero queries is fine.
        let r = parse_meta_context_request(&[0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert!(r.queries.is_empty() && r.name.is_empty());
    }

    #[test]
    fn option_replies() {
        let mut out = Vec::new();
        put_option_reply(&mut out, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        assert_eq!(
            out,
            [
                0, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, // magic
                0, 0, 0, 8, // option
                0, 0, 0, 1, // NBD_REP_ACK
                0, 0, 0, 0, // length
            ]
        );

        out.clear();
        put_option_error(&mut out, OPT_STARTTLS, REP_ERR_UNSUP, "no");
        assert_eq!(
            &out[8..],
            [0, 0, 0, 5, 0x80, 0, 0, 1, 0, 0, 0, 2, b'n', b'o']
        );

        out.clear();
        put_rep_server(&mut out, "ab", "");
        assert_eq!(
            &out[8..],
            [0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 6, 0, 0, 0, 2, b'a', b'b']
        );
        out.clear();
        put_rep_server(&mut out, "a", "d");
        assert_eq!(
            &out[8..],
            [0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 6, 0, 0, 0, 1, b'a', b'd']
        );

        out.clear();
        put_info_export(&mut out, OPT_GO, 0x1_0000_0000, 0x0d6d);
        assert_eq!(
            &out[8..],
            [
                0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 12, // GO, REP_INFO, len 12
                0, 0, // NBD_INFO_EXPORT
                0, 0, 0, 1, 0, 0, 0, 0, // size 4 GiB
                0x0d, 0x6d // flags
            ]
        );

        out.clear();
        put_info_block_size(&mut out, OPT_INFO, 1, 4096, 32 << 20);
        assert_eq!(
            &out[8..],
            [
                0, 0, 0, 6, 0, 0, 0, 3, 0, 0, 0, 14, 0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0
            ]
        );

        out.clear();
        put_info_string(&mut out, OPT_GO, INFO_DESCRIPTION, "d");
        assert_eq!(&out[8..], [0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 3, 0, 2, b'd']);

        out.clear();
        put_meta_context(&mut out, OPT_SET_META_CONTEXT, 1, "base:allocation");
        let mut want = vec![0, 0, 0, 10, 0, 0, 0, 4, 0, 0, 0, 19, 0, 0, 0, 1];
        want.extend_from_slice(b"base:allocation");
        assert_eq!(&out[8..], &want[..]);
    }

    #[test]
    fn export_name_reply() {
        let mut out = Vec::new();
        put_export_name_reply(&mut out, 1 << 30, 0x0103, true);
        assert_eq!(out, [0, 0, 0, 0, 0x40, 0, 0, 0, 0x01, 0x03]);
        out.clear();
        put_export_name_reply(&mut out, 1 << 30, 0x0103, false);
        assert_eq!(out.len(), 10 + 124);
        assert!(out[10..].iter().all(|&b| b == 0));
    }

    #[test]
    fn compact_request() {
        let b = [
            0x25, 0x60, 0x95, 0x13, // magic
            0, 1, // flags: FUA
            0, 1, // WRITE
            1, 2, 3, 4, 5, 6, 7, 8, // cookie
            0, 0, 0, 0, 0, 0, 0x10, 0, // offset 4096
            0, 0, 0x02, 0, // length 512
        ];
        let r = parse_request(&b, false).unwrap();
        assert_eq!(
            r,
            Request {
                flags: CMD_FLAG_FUA,
                command: CMD_WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                length: 512
            }
        );
        assert_eq!(r.payload_len(false), 512);
        // A compact request on an extended connection is garbage.
        let mut ext = [0u8; 32];
        ext[..28].copy_from_slice(&b);
        assert_eq!(
            parse_request(&ext, true),
            Err(ProtoError::BadMagic(REQUEST_MAGIC as u64))
        );
        let mut bad = b;
        bad[3] = 0x14;
        assert!(parse_request(&bad, false).is_err());
        // Reads carry no payload.
        let read = Request {
            command: CMD_READ,
            ..r
        };
        assert_eq!(read.payload_len(false), 0);
    }

    #[test]
    fn extended_request() {
        let b = [
            0x21, 0xe4, 0x1c, 0x71, // magic
            0, 0x20, // flags: PAYLOAD_LEN
            0, 1, // WRITE
            0, 0, 0, 0, 0, 0, 0, 9, // cookie
            0, 0, 0, 1, 0, 0, 0, 0, // offset 4 GiB
            0, 0, 0, 0, 0, 0, 0x10, 0, // length 4096
        ];
        let r = parse_request(&b, true).unwrap();
        assert_eq!(r.command, CMD_WRITE);
        assert_eq!(r.cookie, 9);
        assert_eq!(r.offset, 1 << 32);
        assert_eq!(r.length, 4096);
        assert_eq!(r.payload_len(true), 4096);
        // qemu 10 leaves PAYLOAD_LEN off its writes: still a payload.
        let qemu_write = Request { flags: 0, ..r };
        assert_eq!(qemu_write.payload_len(true), 4096);
        // Without PAYLOAD_LEN the length is an effect length: no payload follows.
        let trim = Request {
            flags: 0,
            command: CMD_TRIM,
            length: 1 << 40,
            ..r
        };
        assert_eq!(trim.payload_len(true), 0);
        assert!(parse_request(&b[..28], false).is_err());
    }

    #[test]
    fn simple_reply_bytes() {
        let mut f = Frame::new();
        f.simple(NbdError::Inval.code(), 0xaabb);
        assert_eq!(
            f.as_bytes(),
            [
                0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0xaa, 0xbb
            ]
        );
    }

    #[test]
    fn structured_chunks_bytes() {
        let mut f = Frame::new();
        f.offset_data(Framing::Structured, REPLY_FLAG_DONE, 7, 0, 512, 4096);
        assert_eq!(
            f.as_bytes(),
            [
                0x66, 0x8e, 0x33, 0xef, // magic
                0, 1, // DONE
                0, 1, // OFFSET_DATA
                0, 0, 0, 0, 0, 0, 0, 7, // cookie
                0, 0, 0x10, 8, // length 8 + 4096
                0, 0, 0, 0, 0, 0, 2, 0, // offset 512
            ]
        );

        let mut f = Frame::new();
        f.offset_hole(Framing::Structured, 0, 7, 0, 1 << 20, 1 << 20);
        assert_eq!(
            f.as_bytes(),
            [
                0x66, 0x8e, 0x33, 0xef, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 12, //
                0, 0, 0, 0, 0, 0x10, 0, 0, // offset
                0, 0x10, 0, 0 // size
            ]
        );

        let mut f = Frame::new();
        f.none(Framing::Structured, 3, 0);
        assert_eq!(
            f.as_bytes(),
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0
            ]
        );

        let mut out = Vec::new();
        put_error_reply(&mut out, Framing::Structured, 3, 0, NbdError::NoSpc, "x");
        assert_eq!(
            out,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 7, //
                0, 0, 0, 28, 0, 1, b'x'
            ]
        );
        out.clear();
        put_error_reply(&mut out, Framing::Simple, 3, 0, NbdError::Perm, "ignored");
        assert_eq!(
            out,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 3]
        );
    }

    #[test]
    fn extended_chunks_bytes() {
        let mut f = Frame::new();
        f.offset_data(Framing::Extended, REPLY_FLAG_DONE, 7, 4096, 4096, 512);
        assert_eq!(
            f.as_bytes(),
            [
                0x6e, 0x8a, 0x27, 0x8c, // magic
                0, 1, 0, 1, // DONE, OFFSET_DATA
                0, 0, 0, 0, 0, 0, 0, 7, // cookie
                0, 0, 0, 0, 0, 0, 0x10, 0, // request offset
                0, 0, 0, 0, 0, 0, 2, 8, // length 8 + 512
                0, 0, 0, 0, 0, 0, 0x10, 0, // data offset
            ]
        );
        let mut f = Frame::new();
        f.none(Framing::Extended, 1, 2);
        assert_eq!(f.len(), 32);
        assert_eq!(&f.as_bytes()[4..8], [0, 1, 0, 0]);
        assert_eq!(&f.as_bytes()[16..24], [0, 0, 0, 0, 0, 0, 0, 2]);
    }

    #[test]
    fn block_status_bytes() {
        let d = [
            StatusDescriptor {
                length: 4096,
                flags: 0,
            },
            StatusDescriptor {
                length: 1 << 20,
                flags: STATE_HOLE | STATE_ZERO,
            },
        ];
        let mut out = Vec::new();
        put_block_status(&mut out, Framing::Structured, true, 5, 0, 1, &d);
        assert_eq!(
            out,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 20, //
                0, 0, 0, 1, // context id
                0, 0, 0x10, 0, 0, 0, 0, 0, // 4096 data
                0, 0x10, 0, 0, 0, 0, 0, 3, // 1 MiB hole|zero
            ]
        );
        out.clear();
        put_block_status(&mut out, Framing::Extended, true, 5, 8, 1, &d[1..]);
        assert_eq!(
            out,
            [
                0x6e, 0x8a, 0x27, 0x8c, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0, 0, 5, //
                0, 0, 0, 0, 0, 0, 0, 8, // request offset
                0, 0, 0, 0, 0, 0, 0, 24, // length 8 + 16
                0, 0, 0, 1, 0, 0, 0, 1, // id, count
                0, 0, 0, 0, 0, 0x10, 0, 0, // length
                0, 0, 0, 0, 0, 0, 0, 3, // flags
            ]
        );
    }

    #[test]
    fn errno_mapping_is_explicit() {
        assert_eq!(NbdError::from_errno(libc::EPERM).code(), 1);
        assert_eq!(NbdError::from_errno(libc::EIO).code(), 5);
        assert_eq!(NbdError::from_errno(libc::ENOMEM).code(), 12);
        assert_eq!(NbdError::from_errno(libc::EINVAL).code(), 22);
        assert_eq!(NbdError::from_errno(libc::ENOSPC).code(), 28);
        assert_eq!(NbdError::from_errno(libc::EDQUOT).code(), 28);
        assert_eq!(NbdError::from_errno(libc::EOVERFLOW).code(), 75);
        assert_eq!(NbdError::from_errno(libc::ENOTSUP).code(), 95);
        assert_eq!(NbdError::from_errno(libc::ESHUTDOWN).code(), 108);
        assert_eq!(NbdError::from_errno(libc::EBUSY).code(), 5);
    }

    #[test]
    fn truncation_keeps_utf8() {
        assert_eq!(truncate_str("héllo", 2), "h");
        assert_eq!(truncate_str("abc", 10), "abc");
    }
}
