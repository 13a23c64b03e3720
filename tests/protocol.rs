//! Raw NBD bytes against the server, for what real clients never send: bad handshake flags,
//! garbage magic, unknown options, commands and flags, writes past the end whose payload the
//! server must still consume, many requests pipelined, and a disconnect. After each, the
//! server must be alive and serving.

#[macro_use]
mod common;

use common::{MIB, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, Server, ServerConfig, Transport};
use std::io::{Read, Write};

const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// A hand-driven NBD connection.
struct Conn {
    s: Box<dyn common::RawStream>,
}

impl Conn {
    fn open(srv: &Server) -> Conn {
        Conn {
            s: srv.connect_raw(),
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s
            .read_exact(&mut v)
            .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
        v
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).try_into().unwrap())
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("sending");
    }

    /// Reads the greeting and returns the handshake flags.
    fn greeting(&mut self) -> u16 {
        assert_eq!(&self.bytes(8)[..], NBDMAGIC, "greeting magic");
        assert_eq!(self.u64(), IHAVEOPT, "greeting IHAVEOPT");
        let flags = self.u16();
        assert!(
            flags & FLAG_FIXED_NEWSTYLE != 0,
            "no fixed newstyle: {flags:#x}"
        );
        flags
    }

    /// Greeting plus our flags: ready for options.
    fn start(srv: &Server) -> Conn {
        let mut c = Conn::open(srv);
        c.greeting();
        c.send(&u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        c
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// One option reply: (reply type, payload).
    fn option_reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
        assert_eq!(self.u64(), OPT_REPLY_MAGIC, "option reply magic");
        assert_eq!(self.u32(), opt, "option reply echoes the option");
        let ty = self.u32();
        let len = self.u32() as usize;
        assert!(len <= 64 << 10, "option reply of {len} bytes");
        (ty, self.bytes(len))
    }

    /// NBD_OPT_GO on the default export, no structured replies: returns (size, flags).
    fn go(&mut self) -> (u64, u16) {
        let mut data = Vec::new();
        data.extend_from_slice(&0u32.to_be_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &data);
        let mut export = None;
        loop {
            let (ty, payload) = self.option_reply(OPT_GO);
            match ty {
                REP_ACK => break,
                REP_INFO => {
                    let info = u16::from_be_bytes([payload[0], payload[1]]);
                    if info == INFO_EXPORT {
                        let size = u64::from_be_bytes(payload[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes([payload[10], payload[11]]);
                        export = Some((size, flags));
                    }
                }
                other => panic!("NBD_OPT_GO got reply type {other:#x}"),
            }
        }
        export.expect("NBD_OPT_GO without NBD_INFO_EXPORT")
    }

    fn request(&mut self, flags: u16, ty: u16, handle: u64, offset: u64, len: u32, data: &[u8]) {
        let mut b = Vec::with_capacity(28 + data.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&ty.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// A simple reply header: (error, handle).
    fn reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC, "simple reply magic");
        let err = self.u32();
        (err, self.u64())
    }

    fn read(&mut self, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(0, CMD_READ, handle, offset, len, &[]);
        let (err, h) = self.reply();
        assert_eq!(h, handle, "reply handle");
        if err != 0 {
            return Err(err);
        }
        Ok(self.bytes(len as usize))
    }

    fn write(&mut self, handle: u64, offset: u64, data: &[u8]) -> Result<(), u32> {
        self.request(0, CMD_WRITE, handle, offset, data.len() as u32, data);
        let (err, h) = self.reply();
        assert_eq!(h, handle, "reply handle");
        if err != 0 { Err(err) } else { Ok(()) }
    }

    /// Waits for the server to close the connection; fails the test if it does not within
    /// the read timeout. Whatever the server sent first is returned.
    fn expect_close(&mut self, what: &str) -> Vec<u8> {
        let mut rest = Vec::new();
        match self.s.read_to_end(&mut rest) {
            Ok(_) => rest,
            // A reset is a close too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => rest,
            Err(e) => panic!("{what}: the server kept the connection open ({e})"),
        }
    }
}

fn server(transport: Transport) -> Server {
    Server::start(ServerConfig::sized(64 * MIB), transport)
}

/// The server is alive and a new client can go through the whole handshake and read.
fn assert_serving(srv: &mut Server) {
    srv.assert_running();
    let mut c = Conn::start(srv);
    let (size, _) = c.go();
    assert_eq!(size, srv.size());
    c.read(1, 0, 512).expect("read after misbehaving client");
}

fn bad_client_flags(transport: Transport) {
    let mut srv = server(transport);
    let mut c = Conn::open(&srv);
    c.greeting();
    c.send(&0xffff_fff0u32.to_be_bytes());
    c.expect_close("unknown client flags");
    assert_serving(&mut srv);
}

fn garbage_instead_of_option(transport: Transport) {
    let mut srv = server(transport);
    let mut c = Conn::start(&srv);
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    c.expect_close("garbage option magic");
    // Hanging up in the middle of the greeting and of an option is fine too.
    drop(Conn::open(&srv));
    let mut c = Conn::start(&srv);
    c.send(&IHAVEOPT.to_be_bytes()[..5]);
    drop(c);
    assert_serving(&mut srv);
}

fn unknown_option(transport: Transport) {
    let mut srv = server(transport);
    let mut c = Conn::start(&srv);
    c.option(0x0bad_cafe, b"hello");
    let (ty, _) = c.option_reply(0x0bad_cafe);
    assert_eq!(ty, REP_ERR_UNSUP, "unknown option: reply type {ty:#x}");
    // The connection carries on: GO works, then I/O.
    let (size, _) = c.go();
    assert_eq!(size, srv.size());
    c.read(7, 0, 4096).unwrap();
    // And NBD_OPT_ABORT is acknowledged (or the connection simply closed).
    let mut c = Conn::start(&srv);
    c.option(OPT_ABORT, &[]);
    let rest = c.expect_close("NBD_OPT_ABORT");
    if !rest.is_empty() {
        assert_eq!(&rest[..8], &OPT_REPLY_MAGIC.to_be_bytes(), "reply to ABORT");
        assert_eq!(&rest[12..16], &REP_ACK.to_be_bytes(), "reply to ABORT");
    }
    assert_serving(&mut srv);
}

fn bad_requests(transport: Transport) {
    let mut srv = server(transport);
    let mut c = Conn::start(&srv);
    let (size, _) = c.go();
    let data: Vec<u8> = (0..MIB as usize).map(|i| (i * 13 % 251) as u8).collect();
    c.write(1, 4096, &data).unwrap();
    assert_eq!(c.read(2, 4096, MIB as u32).unwrap(), data);

    // Writes past the end fail with ENOSPC, and their payload is consumed: the next request
    // is read as a request, not as leftover data.
    assert_eq!(c.write(3, size, &data[..65536]), Err(ENOSPC));
    assert_eq!(c.write(4, size - 512, &data[..4096]), Err(ENOSPC));
    assert_eq!(c.read(5, 4096, MIB as u32).unwrap(), data);
    assert_eq!(c.read(6, size, 512), Err(EINVAL));
    assert_eq!(c.read(7, u64::MAX - 100, 4096), Err(EINVAL));

    // Unknown command and unknown flag: EINVAL, nothing else.
    c.request(0, 42, 8, 0, 0, &[]);
    assert_eq!(c.reply(), (EINVAL, 8), "unknown command");
    c.request(1 << 12, CMD_READ, 9, 0, 512, &[]);
    assert_eq!(c.reply(), (EINVAL, 9), "read with an unknown flag");
    c.request(0, CMD_FLUSH, 10, 0, 0, &[]);
    assert_eq!(c.reply(), (0, 10), "flush");
    assert_eq!(c.read(11, 4096, 4096).unwrap(), data[..4096]);

    // Many requests in flight: every handle answered once, in whatever order.
    let n = 256u64;
    for h in 0..n {
        c.request(0, CMD_READ, 1000 + h, 4096 + h * 4096, 4096, &[]);
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        let (err, h) = c.reply();
        assert_eq!(err, 0, "pipelined read {h}");
        assert!(
            (1000..1000 + n).contains(&h) && seen.insert(h),
            "handle {h}"
        );
        let off = ((h - 1000) * 4096) as usize;
        assert_eq!(c.bytes(4096), data[off..off + 4096], "pipelined read {h}");
    }

    // A request with a bad magic ends the connection.
    c.send(&[0u8; 28]);
    c.expect_close("bad request magic");
    assert_serving(&mut srv);

    // NBD_CMD_DISC: the server closes after answering what came before.
    let mut c = Conn::start(&srv);
    c.go();
    c.request(0, CMD_READ, 1, 0, 512, &[]);
    c.request(0, CMD_DISC, 2, 0, 0, &[]);
    let rest = c.expect_close("NBD_CMD_DISC");
    assert_eq!(rest.len(), 16 + 512, "the read before DISC is answered");
    assert_serving(&mut srv);
}

/// A client that stops in the middle of a write payload, or of a request header.
fn truncated_requests(transport: Transport) {
    let mut srv = server(transport);
    for cut in [10usize, 28 + 1000] {
        let mut c = Conn::start(&srv);
        c.go();
        let mut b = Vec::new();
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&CMD_WRITE.to_be_bytes());
        b.extend_from_slice(&1u64.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes());
        b.extend_from_slice(&(65536u32).to_be_bytes());
        b.extend_from_slice(&[0x77; 65536]);
        c.send(&b[..cut]);
        drop(c);
    }
    assert_serving(&mut srv);
    let mut c = Conn::start(&srv);
    c.go();
    assert_eq!(
        c.read(1, 0, 4096).unwrap(),
        vec![0; 4096],
        "a cut-off write landed"
    );
}

over_both_transports! {
    raw_unknown_client_flags_close => bad_client_flags;
    raw_garbage_during_options_closes => garbage_instead_of_option;
    raw_unknown_option_is_unsupported => unknown_option;
    raw_bad_requests_get_errors => bad_requests;
    raw_truncated_requests => truncated_requests;
}
