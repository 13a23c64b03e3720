//! Hand-crafted hostile clients on raw sockets: wrong magic, truncated headers, writes that
//! promise more payload than they send, oversized payloads and options, lengths that overflow
//! the offset, unknown commands, option floods, disconnects with requests in flight, a
//! client that never reads its replies, idle and greedy connections, a greedy client that
//! tries to take every I/O buffer over many connections, SIGTERM under a
//! pipelined load. Each gets the spec's error or a closed connection; after each, the
//! server is alive, a bystander client that stayed connected reads back its own data, and
//! nothing outside the hostile request's range has changed.

#[macro_use]
mod common;

use common::{MIB, SIMPLE_REPLY_MAGIC, Server, ServerConfig, Transport, request_header as header};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const OPT_LIST: u32 = 3;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EXPORT: u64 = 64 * MIB;
/// Where hostile requests aim, and the guard bytes around it.
const TARGET: u64 = 8 * MIB;
const GUARD: u64 = 256 << 10;

struct Conn {
    s: Box<dyn common::RawStream>,
}

impl Conn {
    fn open(srv: &Server) -> Conn {
        Conn {
            s: srv.connect_raw(),
        }
    }

    /// Greeting read and flags sent: ready for options.
    fn start(srv: &Server) -> Conn {
        let mut c = Conn::open(srv);
        let mut g = [0u8; 18];
        if let Err(e) = c.s.read_exact(&mut g) {
            panic!(
                "no greeting ({e}): every connection slot is taken, so an earlier connection \
                 has not ended on the server"
            );
        }
        assert_eq!(&g[..8], b"NBDMAGIC");
        c.send(&3u32.to_be_bytes());
        c
    }

    /// Through NBD_OPT_GO on the default export (simple replies).
    fn ready(srv: &Server) -> Conn {
        let mut c = Conn::start(srv);
        c.option(OPT_GO, &[0; 6]);
        loop {
            let (ty, _) = c.option_reply(OPT_GO);
            match ty {
                REP_ACK => return c,
                REP_INFO => {}
                t => panic!("NBD_OPT_GO failed: {t:#x}"),
            }
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s
            .read_exact(&mut v)
            .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
        v
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("sending");
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = option_bytes(opt, data.len() as u32);
        b.extend_from_slice(data);
        self.send(&b);
    }

    fn option_reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
        let h = self.bytes(20);
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), opt);
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        (ty, self.bytes(len))
    }

    fn request(&mut self, ty: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) {
        let mut b = header(ty, cookie, offset, len).to_vec();
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// A simple reply: (error, cookie).
    fn reply(&mut self) -> (u32, u64) {
        let h = self.bytes(16);
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(CMD_READ, 7, offset, len, &[]);
        let (err, cookie) = self.reply();
        assert_eq!(cookie, 7);
        if err != 0 {
            return Err(err);
        }
        Ok(self.bytes(len as usize))
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), u32> {
        self.request(CMD_WRITE, 9, offset, data.len() as u32, data);
        let (err, cookie) = self.reply();
        assert_eq!(cookie, 9);
        if err != 0 { Err(err) } else { Ok(()) }
    }

    /// Expects the server to close the connection (EOF or reset) within the read timeout.
    fn expect_close(&mut self, what: &str) -> Vec<u8> {
        let mut rest = Vec::new();
        match self.s.read_to_end(&mut rest) {
            Ok(_) => rest,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => rest,
            Err(e) => panic!("{what}: the server kept the connection open ({e})"),
        }
    }
}

fn option_bytes(opt: u32, len: u32) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// A well-behaved client that stays connected through every hostile act, owns the last
/// MiB of the export, and checks it after each; it also lays guard patterns around the
/// hostile target and checks them.
struct Bystander {
    c: Conn,
    mine: Vec<u8>,
    target: Vec<u8>,
}

impl Bystander {
    fn new(srv: &Server) -> Bystander {
        let mut c = Conn::ready(srv);
        let mine = common::random_bytes(MIB as usize);
        c.write(EXPORT - MIB, &mine).unwrap();
        let target = common::random_bytes((2 * GUARD + MIB) as usize);
        c.write(TARGET - GUARD, &target).unwrap();
        Bystander { c, mine, target }
    }

    /// Its own data and the guard bytes are intact; `changed` (absolute offsets) is the
    /// part of the target range a hostile request was allowed to change.
    fn check(&mut self, srv: &mut Server, what: &str, changed: Option<(u64, u64)>) {
        srv.assert_running();
        let got = self.c.read(EXPORT - MIB, MIB as u32).unwrap();
        common::assert_same_bytes(&self.mine, &got, &format!("bystander data after {what}"));
        let got = self
            .c
            .read(TARGET - GUARD, self.target.len() as u32)
            .unwrap();
        for (i, (a, b)) in self.target.iter().zip(&got).enumerate() {
            let off = TARGET - GUARD + i as u64;
            let allowed = changed.is_some_and(|(s, e)| off >= s && off < e);
            assert!(
                a == b || allowed,
                "{what}: byte at {off} changed outside the request's range"
            );
        }
        // A fresh client gets in too.
        let mut fresh = Conn::ready(srv);
        fresh.read(0, 4096).expect("a fresh client reads");
    }
}

fn start(extra: &[&str], transport: Transport) -> Server {
    let mut c = ServerConfig::sized(EXPORT).with_metrics();
    c.extra_args = extra.iter().map(|s| s.to_string()).collect();
    Server::start(c, transport)
}

/// Two connection slots and a handshake timeout longer than a client's read timeout.
const ONE_AT_A_TIME: &[&str] = &["--max-connections", "2", "--handshake-timeout", "60"];

fn bad_magic_and_truncation(transport: Transport) {
    if common::standin_skips("vramdisk's own limits and logs") {
        return;
    }
    // Two slots, the bystander's and one more: each connection below gets in only once the
    // one before has ended on the server, handshake-phase ones included (which the metrics
    // do not count); one that lingered would hold the slot for the 60 s handshake timeout.
    let mut srv = start(ONE_AT_A_TIME, transport);
    let mut by = Bystander::new(&srv);

    // Wrong option magic.
    let mut c = Conn::start(&srv);
    c.send(b"IHAVEOPXxxxxxxxxxxxxxxxx");
    c.expect_close("bad option magic");
    by.check(&mut srv, "bad option magic", None);

    // Wrong request magic.
    let mut c = Conn::ready(&srv);
    let mut h = header(CMD_WRITE, 1, TARGET, 4096).to_vec();
    h[0] ^= 0xff;
    h.extend_from_slice(&[0xee; 4096]);
    c.send(&h);
    c.expect_close("bad request magic");
    by.check(&mut srv, "bad request magic", None);

    // Truncated option header, truncated request header, then gone.
    let mut c = Conn::start(&srv);
    c.send(&option_bytes(OPT_GO, 6)[..10]);
    drop(c);
    let mut c = Conn::ready(&srv);
    c.send(&header(CMD_WRITE, 1, TARGET, 4096)[..20]);
    drop(c);
    by.check(&mut srv, "truncated headers", None);
    // The hostile connections are all gone: none lingers holding a slot.
    assert_connections_all_closed(&mut srv, 1);
}

fn short_and_oversized_payloads(transport: Transport) {
    if common::standin_skips("vramdisk's own limits") {
        return;
    }
    // Requests above the maximum payload are streamed up to --max-request: at its least
    // (the advertised 32 MiB), a 33 MiB write is refused.
    let mut srv = start(&["--max-request", "32M"], transport);
    let mut by = Bystander::new(&srv);

    // A write that promises 1 MiB, sends 1000 bytes, and disconnects: nothing is written.
    let mut c = Conn::ready(&srv);
    c.request(CMD_WRITE, 1, TARGET, MIB as u32, &[0xaa; 1000]);
    drop(c);
    assert_connections_all_closed(&mut srv, 1);
    by.check(&mut srv, "a write cut short", None);

    // Larger than --max-request but small enough to skip: EINVAL, and the connection goes
    // on.
    let mut c = Conn::ready(&srv);
    let len = 33 * MIB as u32;
    c.request(CMD_WRITE, 2, TARGET, len, &vec![0xbb; len as usize]);
    let (err, cookie) = c.reply();
    assert_eq!((err, cookie), (EINVAL, 2), "oversized write");
    c.read(0, 512).expect("the connection goes on");
    by.check(&mut srv, "an oversized write", None);

    // Far larger (4 GiB - 1): the server must not allocate or read it all; it closes.
    let mut c = Conn::ready(&srv);
    c.request(CMD_WRITE, 3, 0, u32::MAX, &[0xcc; 4096]);
    let rest = c.expect_close("a 4 GiB write");
    assert!(rest.is_empty(), "a reply to a 4 GiB write: {rest:?}");
    by.check(&mut srv, "a 4 GiB write", None);
    // The hostile connections are all gone (the bystander and the EINVAL one stay).
    assert_connections_all_closed(&mut srv, 2);
    wait_for_log(&srv, "request payload of 4294967295 bytes");
}

fn ranges_and_commands(transport: Transport) {
    if common::standin_skips("vramdisk's own messages") {
        return;
    }
    let mut srv = start(&[], transport);
    let mut by = Bystander::new(&srv);
    let mut c = Conn::ready(&srv);
    // offset + length overflows u64.
    let huge = u64::MAX - 100;
    assert_eq!(c.read(huge, 4096), Err(EINVAL));
    // Writes past the end get ENOSPC (the spec's choice) and their payload is consumed.
    c.request(CMD_WRITE, 4, huge, 4096, &[0xdd; 4096]);
    assert_eq!(c.reply(), (ENOSPC, 4));
    c.request(CMD_WRITE, 5, EXPORT - 100, 4096, &[0xdd; 4096]);
    assert_eq!(c.reply(), (ENOSPC, 5));
    // The spec: EINVAL for trims past the end, ENOSPC for zeroes (a write).
    for (cmd, err) in [(CMD_TRIM, EINVAL), (CMD_WRITE_ZEROES, ENOSPC)] {
        c.request(cmd, 6, huge, 4096, &[]);
        assert_eq!(c.reply(), (err, 6), "command {cmd} past the end");
    }
    // Unknown commands: EINVAL, connection goes on.
    for cmd in [12u16, 99, 0xffff] {
        c.request(cmd, 7, TARGET, 4096, &[]);
        assert_eq!(c.reply(), (EINVAL, 7), "unknown command {cmd}");
    }
    // A valid write inside the target still lands exactly where asked.
    let data = vec![0x11u8; 8192];
    c.write(TARGET + 4096, &data).unwrap();
    by.check(
        &mut srv,
        "range and command errors",
        Some((TARGET + 4096, TARGET + 4096 + 8192)),
    );
    let got = c.read(TARGET + 4096, 8192).unwrap();
    assert_eq!(got, data);
}

fn option_abuse(transport: Transport) {
    if common::standin_skips("vramdisk's own limits") {
        return;
    }
    // One connection at a time beside the bystander's (see bad_magic_and_truncation).
    let mut srv = start(ONE_AT_A_TIME, transport);
    let mut by = Bystander::new(&srv);

    // Oversized option data: skipped and refused; haggling goes on.
    let mut c = Conn::start(&srv);
    c.option(OPT_LIST, &vec![0u8; 1 << 20]);
    assert_eq!(c.option_reply(OPT_LIST).0, REP_ERR_TOO_BIG);
    c.option(OPT_LIST, &[]);
    assert_eq!(c.option_reply(OPT_LIST).0, 2, "NBD_REP_SERVER");
    // Absurd option data: closed without reading it.
    c.send(&option_bytes(OPT_LIST, u32::MAX));
    c.expect_close("4 GiB of option data");
    by.check(&mut srv, "oversized options", None);

    // A flood of options: answered up to the server's cap, then closed.
    let mut c = Conn::start(&srv);
    let flood: Vec<u8> = (0..5000).flat_map(|_| option_bytes(OPT_LIST, 0)).collect();
    let mut s = std::mem::replace(
        &mut c.s,
        Box::new(std::fs::File::open("/dev/null").unwrap()),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        // The server may close before taking it all.
        let _ = s.write_all(&flood);
        let mut all = Vec::new();
        let closed = match s.read_to_end(&mut all) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        tx.send((closed, all.len())).unwrap();
    });
    let (closed, got) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server did not close a connection flooding options");
    t.join().unwrap();
    assert!(closed, "the flooding connection was not closed");
    // Each LIST is answered by one NBD_REP_SERVER and one ACK: at least 40 bytes.
    assert!(
        got < 5000 * 40,
        "all 5000 options were answered ({got} bytes)"
    );
    by.check(&mut srv, "an option flood", None);
    // The hostile connections are all gone: none lingers holding a slot.
    assert_connections_all_closed(&mut srv, 1);
}

fn disconnect_with_requests_in_flight(transport: Transport) {
    let mut srv = start(&[], transport);
    let mut by = Bystander::new(&srv);
    let old = by.c.read(TARGET, MIB as u32).unwrap();
    let new = common::random_bytes(MIB as usize);
    // 128 writes of 4 KiB and 128 reads pipelined, then gone without reading a reply.
    let mut c = Conn::ready(&srv);
    let mut b = Vec::new();
    for i in 0..128u64 {
        let off = (i * 8192) as usize;
        b.extend_from_slice(&header(CMD_WRITE, i, TARGET + off as u64, 4096));
        b.extend_from_slice(&new[off..off + 4096]);
        b.extend_from_slice(&header(CMD_READ, 1000 + i, TARGET, 65536));
    }
    c.send(&b);
    drop(c);
    // The hostile connection is gone (and with it every write it started, see
    // a_dropped_connection_ends_after_its_writes_land): none lingers holding a slot.
    assert_connections_all_closed(&mut srv, 1);
    by.check(
        &mut srv,
        "128 requests in flight",
        Some((TARGET, TARGET + MIB)),
    );
    // Each 4 KiB block of the target is the old or the new data, never a mix.
    let got = by.c.read(TARGET, MIB as u32).unwrap();
    for (i, blk) in got.chunks(4096).enumerate() {
        let r = i * 4096..(i + 1) * 4096;
        assert!(
            blk == &old[r.clone()] || blk == &new[r],
            "block {i} of the target is neither old nor new data"
        );
    }
}

/// Bytes `fd` has sent that its peer has not read yet (for TCP: not yet acknowledged).
fn unsent(fd: std::os::fd::RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    assert_eq!(rc, 0, "TIOCOUTQ: {}", std::io::Error::last_os_error());
    n.max(0) as usize
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn client_that_never_reads(transport: Transport) {
    if common::standin_skips("vramdisk's in-flight limit") {
        return;
    }
    let mut srv = start(&["--inflight-memory", "32M"], transport);
    let mut by = Bystander::new(&srv);
    let base = rss_kib(srv.pid());
    // Asks for 1 TiB of reads (a million 1 MiB reads), never reads a byte of the replies.
    let mut hog = Conn::ready(&srv);
    let mut s = std::mem::replace(
        &mut hog.s,
        Box::new(std::fs::File::open("/dev/null").unwrap()),
    );
    let hog_fd = s.as_raw_fd();
    let t = std::thread::spawn(move || {
        let all: Vec<u8> = (0..1_000_000u64)
            .flat_map(|i| header(CMD_READ, i, 0, MIB as u32))
            .collect();
        // Blocks once the server stops reading; the 10 s write timeout ends it.
        let done = s.write_all(&all).is_ok();
        (done, s)
    });
    // The server has stopped reading the hog: its requests back up in the hog's socket.
    // (The socket stays open until the thread's stream is dropped, after the join.)
    let deadline = Instant::now() + common::client_timeout();
    while unsent(hog_fd) < 64 << 10 {
        assert!(
            Instant::now() < deadline,
            "the server went on reading requests of a client that never reads"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Others carry on meanwhile.
    by.check(&mut srv, "a client that never reads", None);
    let data = common::random_bytes(MIB as usize);
    by.c.write(TARGET, &data).unwrap();
    assert_eq!(by.c.read(TARGET, MIB as u32).unwrap(), data);
    by.target[GUARD as usize..(GUARD + MIB) as usize].copy_from_slice(&data);
    let (done, s) = t.join().unwrap();
    assert!(
        !done,
        "the server took 28 MB of requests without reading replies"
    );
    // The hog's write timed out: the server has not read from it for 10 s, so it holds all
    // it ever will for the hog. In flight: at most the 32 MiB budget of replies plus socket
    // buffers.
    let grown = rss_kib(srv.pid()).saturating_sub(base);
    assert!(
        grown < 96 << 10,
        "server RSS grew by {} MiB for a client that never reads",
        grown >> 10
    );
    drop(s);
    by.check(&mut srv, "the hog leaving", None);
    // The hostile connections are all gone: none lingers holding a slot.
    assert_connections_all_closed(&mut srv, 1);
}

fn idle_and_greedy_connections(transport: Transport) {
    if common::standin_skips("vramdisk's connection limits") {
        return;
    }
    let mut srv = start(
        &[
            "--handshake-timeout",
            "1",
            "--max-connections",
            "6",
            "--max-connections-per-client",
            "4",
        ],
        transport,
    );
    let mut by = Bystander::new(&srv);
    // Silent clients are dropped after the handshake timeout.
    let t0 = Instant::now();
    let mut silent = Conn::open(&srv);
    silent.bytes(18);
    silent.expect_close("a silent client");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "dropped after {waited:?}"
    );
    // One source holds at most 4 connections (the bystander is one): more are closed.
    let held: Vec<Conn> = (0..3).map(|_| Conn::ready(&srv)).collect();
    let mut extra = Conn::open(&srv);
    let got = extra.expect_close("a connection over the per-client cap");
    assert!(got.is_empty(), "greeted past the per-client cap");
    assert!(srv.log().contains("--max-connections-per-client"));
    drop(held);
    assert_connections_all_closed(&mut srv, 1);
    by.check(&mut srv, "connection limits", None);
}

/// A flood of connections that never send a byte, over both limits (server-wide, and per
/// source: over TCP from two addresses), must not lock real clients out until the
/// handshake timeout (30 s): the connection longest in the handshake makes room for each
/// new one, so nbdinfo, from a flooded source, gets in at once.
fn handshake_flood(transport: Transport) {
    require_clients!("nbdinfo");
    if common::standin_skips("vramdisk's connection limits") {
        return;
    }
    let mut srv = start(
        &[
            "--max-connections",
            "16",
            "--max-connections-per-client",
            "12",
        ],
        transport,
    );
    let mut flood: Vec<Box<dyn common::RawStream>> = (0..30).map(|_| srv.connect_raw()).collect();
    let tcp = matches!(srv.endpoint(), common::Endpoint::Tcp(_));
    if let common::Endpoint::Tcp(port) = *srv.endpoint() {
        flood.extend((0..30).map(|_| tcp_from(port, "127.0.0.2", Duration::from_secs(10))));
    }
    // The server is full of them: 12 from a source, (TCP) from two, more than 16 slots.
    let full = if tcp { 16 } else { 12 };
    let deadline = Instant::now() + Duration::from_secs(10);
    while srv
        .log()
        .lines()
        .filter(|l| l.ends_with(" connected"))
        .count()
        < full
    {
        assert!(
            Instant::now() < deadline,
            "the flood never got in:\n{}",
            srv.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let t0 = Instant::now();
    let out = common::run_with_timeout(
        std::process::Command::new("nbdinfo").arg(srv.uri()),
        Duration::from_secs(10),
    );
    let took = t0.elapsed();
    out.assert_success();
    assert!(
        took < Duration::from_secs(3),
        "nbdinfo took {took:?} to get in during a handshake flood"
    );
    wait_for_log(&srv, "--max-connections-per-client was reached");
    if tcp {
        wait_for_log(&srv, "--max-connections was reached");
    }
    // At least one per flooding connection beyond 12 from one source.
    let evicted = srv.metric("vramdisk_handshake_evictions_total");
    assert!(evicted >= 18, "{evicted} evictions counted");
    drop(flood);
    srv.assert_running();
}

fn read_only_refuses_changes(transport: Transport) {
    let mut c = ServerConfig::sized(EXPORT);
    c.read_only = true;
    let srv = Server::start(c, transport);
    let mut c = Conn::ready(&srv);
    let before = c.read(0, 65536).unwrap();
    assert_eq!(c.write(0, &[1; 4096]), Err(EPERM));
    // Trim and zeroes are not advertised; sent anyway, they are refused too.
    for cmd in [CMD_TRIM, CMD_WRITE_ZEROES] {
        c.request(cmd, 5, 0, 4096, &[]);
        let (err, _) = c.reply();
        assert!(
            err == EPERM || err == EINVAL,
            "command {cmd} on a read-only export: {err}"
        );
    }
    if common::server_kind() == common::ServerKind::Vramdisk {
        for cmd in [CMD_TRIM, CMD_WRITE_ZEROES] {
            c.request(cmd, 5, 0, 4096, &[]);
            assert_eq!(c.reply(), (EPERM, 5), "command {cmd} on a read-only export");
        }
    }
    assert_eq!(c.read(0, 65536).unwrap(), before);
}

/// Connections whose client vanished with replies pending must end and give their slot
/// back: with 4 slots, 400 such clients in a row must all get in.
fn vanished_clients_free_their_slots(transport: Transport) {
    if common::standin_skips("vramdisk's connection limit") {
        return;
    }
    let mut srv = start(&["--max-connections", "4"], transport);
    let reads: Vec<u8> = (0..16u64)
        .flat_map(|i| header(CMD_READ, i, i * 65536, 65536))
        .collect();
    for _ in 0..400 {
        // Conn::ready fails on its 10 s read timeout if no slot frees up.
        let mut c = Conn::ready(&srv);
        c.send(&reads);
        drop(c);
    }
    assert_connections_all_closed(&mut srv, 0);
}

/// Waits (up to 5 s) for the server log to contain `text`: lines about a closed connection
/// are written just after the close.
fn wait_for_log(srv: &Server, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !srv.log().contains(text) {
        assert!(
            Instant::now() < deadline,
            "no '{text}' in the log:\n{}",
            srv.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every connection past the handshake has ended on the server but `open`
/// (those the test still holds): the daemon's `vramdisk_connections` comes down to it.
fn assert_connections_all_closed(srv: &mut Server, open: u64) {
    srv.assert_running();
    if srv.kind() != common::ServerKind::Vramdisk {
        return;
    }
    srv.wait_for_metric(
        "vramdisk_connections",
        &format!("the hostile connections did not all end ({open} held by the test)"),
        |n| n == open,
    );
}

/// SIGTERM while a raw client keeps 128 requests in flight: every reply it gets is whole,
/// and the server exits within a few seconds.
fn sigterm_with_pipelined_requests(transport: Transport) {
    if common::standin_skips("exit on SIGTERM with clients connected") {
        return;
    }
    let mut srv = start(&[], transport);
    // Sending and receiving need two threads (a client that stops reading while it sends
    // would stall the server's replies until the shutdown grace runs out).
    let (mut rd, mut wr) = split_transmission(&srv);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut batch = Vec::new();
    for i in 0..128u64 {
        if i % 2 == 0 {
            batch.extend_from_slice(&header(CMD_WRITE, i, (i * 65536) % EXPORT, 65536));
            batch.extend_from_slice(&vec![i as u8; 65536]);
        } else {
            batch.extend_from_slice(&header(CMD_READ, i, (i * 65536) % EXPORT, 65536));
        }
    }
    let stop2 = stop.clone();
    let outstanding = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let out2 = outstanding.clone();
    let replied = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let replied2 = replied.clone();
    let sender = std::thread::spawn(move || {
        use std::sync::atomic::Ordering::Relaxed;
        while !stop2.load(Relaxed) {
            if out2.load(Relaxed) >= 128 {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            out2.fetch_add(128, Relaxed);
            if wr.write_all(&batch).is_err() {
                break;
            }
        }
    });
    let t = std::thread::spawn(move || {
        let mut replies = 0u64;
        loop {
            // One whole reply, or the connection ends at a reply boundary.
            let mut h = [0u8; 16];
            match read_full(&mut rd, &mut h) {
                Ok(true) => {}
                Ok(false) => return replies,
                Err(partial) => panic!("a torn reply header ({partial} of 16 bytes)"),
            }
            assert_eq!(
                u32::from_be_bytes(h[..4].try_into().unwrap()),
                SIMPLE_REPLY_MAGIC,
                "reply magic"
            );
            let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
            if cookie % 2 == 1 && err == 0 {
                let mut d = vec![0u8; 65536];
                match read_full(&mut rd, &mut d) {
                    Ok(true) => {}
                    _ => panic!("a torn read reply (cookie {cookie})"),
                }
            }
            replies += 1;
            replied2.store(replies, std::sync::atomic::Ordering::Relaxed);
            outstanding.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    // SIGTERM once the pipeline runs: two batches answered, a third in flight.
    wait_for_replies(&replied, 256, &t);
    let t0 = Instant::now();
    let status = srv.terminate(Duration::from_secs(10));
    let took = t0.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let replies = match t.join() {
        Ok(n) => n,
        Err(_) => panic!(
            "the client saw a torn reply ({took:?} after SIGTERM, exit {status:?}); server log:\n{}",
            srv.log()
        ),
    };
    let _ = sender.join();
    assert!(replies > 128, "only {replies} replies before SIGTERM");
    let status = status.expect("the server did not exit within 10 s of SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(7), "exit took {took:?}");
}

/// SIGTERM while a client has far more requests queued than the server has read, and reads
/// its replies slowly: every reply the server sent arrives whole and the stream then ends
/// cleanly. Over TCP, closing a socket with unread requests resets the connection and throws
/// away replies not yet delivered, so the server has to wait for the client to take them.
fn sigterm_with_a_slow_reader(transport: Transport) {
    slow_reader_at_sigterm(transport, false);
}

/// As `sigterm_with_a_slow_reader`, but the client stops sending at SIGTERM and, once it has
/// read all there is, pauses before it reads on: so it is still to read the stream's end
/// when the server closes the socket, with requests of the client's unread. Closed like
/// that, a Unix socket hands its peer ECONNRESET, which the peer's next call takes: here the
/// read that should see the EOF after the last reply. (With the sender of the test above
/// blocked in a write, the write took it most of the time, and CI saw the read fail at
/// random.) The server has to throw the unread requests away before it closes.
fn sigterm_with_a_pausing_reader(transport: Transport) {
    slow_reader_at_sigterm(transport, true);
}

/// SIGTERM while one client sends 64 KiB reads without pause (until the server is gone,
/// or with `pause` until SIGTERM) and reads replies with a sleep of 300 µs after each.
fn slow_reader_at_sigterm(transport: Transport, pause: bool) {
    if common::standin_skips("exit on SIGTERM with clients connected") {
        return;
    }
    let mut srv = start(&[], transport);
    let (mut rd, mut wr) = split_transmission(&srv);
    // 64 KiB reads: far more than the socket buffers hold in replies, and always some the
    // server has not read when it stops.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let terminating = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let terminating2 = terminating.clone();
    let terminating3 = terminating.clone();
    let replied = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let replied2 = replied.clone();
    let sender = std::thread::spawn(move || {
        let mut i = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let h = header(CMD_READ, i, (i * 65536) % EXPORT, 65536);
            if pause {
                // Never blocked in a write when the server closes (see above).
                if terminating3.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                match send_now(&*wr, &h) {
                    Ok(true) => {}
                    Ok(false) => {
                        std::thread::sleep(Duration::from_micros(100));
                        continue;
                    }
                    Err(_) => break,
                }
            } else if wr.write_all(&h).is_err() {
                break;
            }
            i += 1;
        }
        wr
    });
    // Reads whole replies, slowly, until the stream ends: Ok(replies) at a clean end.
    let reader = std::thread::spawn(move || -> Result<u64, String> {
        let mut replies = 0u64;
        loop {
            let mut h = [0u8; 16];
            let mut got = 0;
            while got < 16 {
                match rd.read(&mut h[got..]) {
                    Ok(0) if got == 0 => return Ok(replies),
                    Ok(0) => return Err(format!("a torn reply header after {replies} replies")),
                    Ok(k) => got += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        return Err(format!(
                            "{e} after {replies} replies and {got} bytes of a header \
                             (replies sent were thrown away)"
                        ));
                    }
                }
            }
            if u32::from_be_bytes(h[..4].try_into().unwrap()) != SIMPLE_REPLY_MAGIC {
                return Err(format!("bad reply magic after {replies} replies"));
            }
            if u32::from_be_bytes(h[4..8].try_into().unwrap()) == 0 {
                let mut d = vec![0u8; 65536];
                if !matches!(read_full(&mut rd, &mut d), Ok(true)) {
                    return Err(format!("a torn read reply after {replies} replies"));
                }
            }
            replies += 1;
            replied2.store(replies, std::sync::atomic::Ordering::Relaxed);
            // A slow reader: the server's replies back up in the socket.
            std::thread::sleep(Duration::from_micros(300));
            if pause && terminating2.load(std::sync::atomic::Ordering::Relaxed) && rd.unread() == 0
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    // SIGTERM once replies flow (and back up: the reader is slower than the server).
    wait_for_replies(&replied, 64, &reader);
    terminating.store(true, std::sync::atomic::Ordering::Relaxed);
    let status = srv.terminate(Duration::from_secs(10));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = reader.join().expect("the reader thread");
    drop(sender.join());
    match seen {
        Ok(n) => assert!(n > 0, "no reply before the stream ended"),
        Err(e) => panic!("{e}; server log:\n{}", srv.log()),
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
}

/// Waits until a reader thread has counted `n` replies in `replied`; fails the test if it
/// ends first or the replies stop coming.
fn wait_for_replies<T>(
    replied: &std::sync::atomic::AtomicU64,
    n: u64,
    reader: &std::thread::JoinHandle<T>,
) {
    let deadline = Instant::now() + common::client_timeout();
    loop {
        let got = replied.load(std::sync::atomic::Ordering::Relaxed);
        if got >= n {
            return;
        }
        assert!(
            !reader.is_finished(),
            "the reader ended after {got} of {n} replies"
        );
        assert!(
            Instant::now() < deadline,
            "only {got} of {n} replies within {:?}",
            common::client_timeout()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends all of `buf` (a request header) without blocking: Ok(false), with nothing sent, if
/// the socket has no room for it now.
fn send_now(s: &dyn common::RawStream, buf: &[u8]) -> std::io::Result<bool> {
    use nix::errno::Errno;
    use nix::sys::socket::{MsgFlags, send};
    let mut sent = 0;
    while sent < buf.len() {
        match send(
            s.as_raw_fd(),
            &buf[sent..],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        ) {
            Ok(n) => sent += n,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) if sent == 0 => return Ok(false),
            // Part of the header went: the rest has to follow.
            Err(Errno::EAGAIN) => std::thread::sleep(Duration::from_micros(100)),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// A new connection taken through the handshake (NBD_OPT_GO on the default export, simple
/// replies) and split into a read handle and a write handle, for clients that send and
/// receive on two threads.
fn split_transmission(srv: &Server) -> (Box<dyn common::RawStream>, Box<dyn common::RawStream>) {
    let (rd, mut wr) = split_connection(srv);
    let mut c = Conn { s: rd };
    c.bytes(18);
    wr.write_all(&3u32.to_be_bytes()).unwrap();
    let mut go = option_bytes(OPT_GO, 6);
    go.extend_from_slice(&[0; 6]);
    wr.write_all(&go).unwrap();
    while c.option_reply(OPT_GO).0 != REP_ACK {}
    (c.s, wr)
}

/// Two handles on one new connection: one to read, one to write.
fn split_connection(srv: &Server) -> (Box<dyn common::RawStream>, Box<dyn common::RawStream>) {
    let t = Some(Duration::from_secs(10));
    match srv.endpoint() {
        common::Endpoint::Tcp(port) => {
            let s = std::net::TcpStream::connect(("127.0.0.1", *port)).unwrap();
            s.set_read_timeout(t).unwrap();
            s.set_write_timeout(t).unwrap();
            (Box::new(s.try_clone().unwrap()), Box::new(s))
        }
        common::Endpoint::Unix(p) => {
            let s = std::os::unix::net::UnixStream::connect(p).unwrap();
            s.set_read_timeout(t).unwrap();
            s.set_write_timeout(t).unwrap();
            (Box::new(s.try_clone().unwrap()), Box::new(s))
        }
    }
}

/// Fills `buf`; Ok(false) at a clean EOF before the first byte, Err(n) on EOF after n.
fn read_full(s: &mut Box<dyn common::RawStream>, buf: &mut [u8]) -> Result<bool, usize> {
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]) {
            Ok(0) => return if n == 0 { Ok(false) } else { Err(n) },
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) if n == 0 => return Ok(false),
            Err(_) => return Err(n),
        }
    }
    Ok(true)
}

/// A TCP connection to `srv`'s TCP listener from the local address `from` (127.0.0.x), so
/// that the server counts it as another client than 127.0.0.1.
fn tcp_from(port: u16, from: &str, write_timeout: Duration) -> Box<dyn common::RawStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{from}:0").parse().unwrap())
            .expect("binding a second loopback address");
        sock.connect(([127, 0, 0, 1], port).into())
            .await
            .expect("connecting from a second loopback address")
    });
    let s = s.into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(write_timeout)).unwrap();
    Box::new(s)
}

/// One greedy client on many connections tries to take every I/O buffer of the daemon:
/// half its connections ask for 32 MiB reads and never read the replies, the other half
/// send 32 MiB write headers and never finish the payload. Another client (another
/// source: a TCP address, or a Unix socket user) still gets buffers for its own 32 MiB
/// requests at once, because one client may hold at most its share
/// (`--client-inflight-memory`, by default half of `--buffer-memory`).
fn greedy_client_does_not_starve_others(transport: Transport) {
    if common::standin_skips("vramdisk's buffer memory shares") {
        return;
    }
    // The greedy client comes over `transport`; the bystander over TCP from 127.0.0.1,
    // so the two are different sources on either transport. Over TCP, the greedy client
    // connects from 127.0.0.2.
    let sock = tempfile::tempdir().unwrap();
    let sock_path = sock.path().join("greedy.sock");
    let mut c = ServerConfig::sized(EXPORT).with_metrics();
    c.extra_args = [
        "--buffer-memory",
        "256M",
        "--inflight-memory",
        "32M",
        "--socket",
        sock_path.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut srv = Server::start(c, Transport::Tcp);
    let common::Endpoint::Tcp(port) = *srv.endpoint() else {
        unreachable!("started on TCP")
    };
    let mut by = Bystander::new(&srv);
    let greedy_stream = || -> Box<dyn common::RawStream> {
        match transport {
            Transport::Tcp => tcp_from(port, "127.0.0.2", Duration::from_secs(1)),
            Transport::Unix => {
                let s = std::os::unix::net::UnixStream::connect(&sock_path).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
                Box::new(s)
            }
        }
    };
    // 16 connections each writing 32 MiB would take 512 MiB of buffers, twice the daemon's.
    // (Reads of host memory take no buffer: they are sent from the device in place.)
    let mut greedy = Vec::new();
    for _ in 0..16u64 {
        let mut g = Conn { s: greedy_stream() };
        assert_eq!(&g.bytes(18)[..8], b"NBDMAGIC");
        g.send(&3u32.to_be_bytes());
        g.option(OPT_GO, &[0; 6]);
        while g.option_reply(OPT_GO).0 != REP_ACK {}
        g.send(&header(CMD_WRITE, 1, 0, 32 << 20));
        // Only part of it fits in the socket unless the server reads, and it may not
        // (that is the point): a short wait, and on.
        let _ = g.s.write_all(&vec![0x66; MIB as usize]);
        greedy.push(g);
    }
    // The greedy client takes buffers (so the test tests something): at least half its
    // share of 128 MiB.
    let taken = srv.wait_for_metric(
        "vramdisk_buffer_in_use_bytes",
        "the greedy client did not take 64 MiB of buffers",
        |b| b >= 64 * MIB,
    ) >> 10;
    // The bystander's big requests get their buffers at once.
    for round in 0..3u64 {
        let data = common::random_bytes(32 << 20);
        let t0 = Instant::now();
        by.c.write(TARGET - GUARD, &data[..(MIB + 2 * GUARD) as usize])
            .unwrap();
        by.c.write(16 * MIB, &data).unwrap();
        assert_eq!(by.c.read(16 * MIB, 32 << 20).unwrap(), data);
        let took = t0.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "round {round}: the bystander's 32 MiB requests took {took:?} beside a greedy client"
        );
        by.target
            .copy_from_slice(&data[..(MIB + 2 * GUARD) as usize]);
    }
    // A third source gets in and is served too.
    let mut third = Conn {
        s: tcp_from(port, "127.0.0.3", Duration::from_secs(10)),
    };
    assert_eq!(&third.bytes(18)[..8], b"NBDMAGIC");
    third.send(&3u32.to_be_bytes());
    third.option(OPT_GO, &[0; 6]);
    while third.option_reply(OPT_GO).0 != REP_ACK {}
    third
        .read(0, 32 << 20)
        .expect("a third client reads 32 MiB");
    // The greedy client, which has had the whole test to take buffers and still waits for
    // them, took no more than its share of 128 MiB (the bystander's and the third client's
    // requests are done and hold none): without the share, its writes alone would take all
    // 256 MiB.
    let late = srv.metric("vramdisk_buffer_in_use_bytes") >> 10;
    for taken in [taken, late] {
        assert!(
            taken <= 128 << 10,
            "the greedy client took {} MiB of the 256 MiB",
            taken >> 10
        );
    }
    by.check(&mut srv, "a greedy client", None);
    drop(greedy);
    drop(third);
    by.check(&mut srv, "the greedy client leaving", None);
    assert_connections_all_closed(&mut srv, 1);
}

over_both_transports! {
    bad_magic_and_truncated_headers => bad_magic_and_truncation;
    payloads_cut_short_or_too_large => short_and_oversized_payloads;
    overflowing_ranges_and_unknown_commands => ranges_and_commands;
    oversized_and_flooding_options => option_abuse;
    disconnect_with_128_requests_in_flight => disconnect_with_requests_in_flight;
    a_client_that_never_reads_replies => client_that_never_reads;
    idle_and_greedy_connections_are_bounded => idle_and_greedy_connections;
    a_handshake_flood_does_not_lock_clients_out => handshake_flood;
    read_only_exports_refuse_every_change => read_only_refuses_changes;
    sigterm_with_128_pipelined_requests => sigterm_with_pipelined_requests;
    sigterm_with_a_slow_reader_gets_every_reply => sigterm_with_a_slow_reader;
    sigterm_with_a_pausing_reader_ends_with_eof => sigterm_with_a_pausing_reader;
    vanished_clients_give_their_connection_slot_back => vanished_clients_free_their_slots;
    a_greedy_client_does_not_starve_others => greedy_client_does_not_starve_others;
}
