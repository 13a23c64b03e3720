//! Data-integrity soak: many clients over TCP and a Unix socket do random pipelined reads
//! and writes, each checked against a model, while connections are killed at random
//! (mid-payload, with writes or reads in flight) and opened again. Ends with a full read
//! back. Fails on any mismatch, on an unexpected error reply, or when the server's RSS keeps
//! growing.
//!
//! Each client owns a disjoint region of the export, so the model of a region is exact
//! except for writes whose connection was killed before their reply: such a block is
//! "either" (old or new data). It is not written again while the server may still be
//! applying the dead connection's requests (a quarantine); the first read after the
//! quarantine must see one of the two and settles the block to it.
//!
//! Environment: `SOAK_SECS` (default 20), `SOAK_CLIENTS` (default 72, half TCP half Unix),
//! `SOAK_REPORT` (a file to append the summary line to).

#[allow(unused_macros)]
mod common;

use common::{Endpoint, MIB, Server, ServerConfig, Transport};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const BLOCK: usize = 4096;
const EXPORT: u64 = 96 * MIB;
/// Time after a kill before the dead connection's writes are taken as settled.
const QUARANTINE: Duration = Duration::from_secs(3);
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Small, fast, seeded generator (splitmix64): reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The content of `block` at `version` (version 0 is the zeroes of a fresh export).
fn fill(block: u64, version: u64, out: &mut [u8]) {
    if version == 0 {
        out.fill(0);
        return;
    }
    let seed = mix(block.wrapping_mul(0x1000_0000_01b3) ^ version.rotate_left(32));
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&mix(seed.wrapping_add(i as u64)).to_le_bytes());
    }
}

#[derive(Clone, Copy, Debug)]
enum State {
    Known(u64),
    /// Old or new data; written by a connection killed at the given time.
    Either(u64, u64, Instant),
}

trait Io: Read + Write + Send {
    fn kill(&mut self);
}
impl Io for TcpStream {
    fn kill(&mut self) {
        // Unread replies make close() send a reset: an abrupt end, as from a crash.
        use std::os::fd::AsRawFd;
        let l = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket and a correctly sized option value.
        unsafe {
            libc::setsockopt(
                self.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&l as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }
}
impl Io for UnixStream {
    fn kill(&mut self) {}
}

struct Totals {
    ops: AtomicU64,
    bytes: AtomicU64,
    kills: AtomicU64,
    connects: AtomicU64,
    mismatches: AtomicU64,
    settled: AtomicU64,
    failures: AtomicU64,
}

fn connect(ep: &Endpoint) -> std::io::Result<(Box<dyn Io>, u64)> {
    let mut s: Box<dyn Io> = match ep {
        Endpoint::Tcp(port) => {
            let s = TcpStream::connect(("127.0.0.1", *port))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            Box::new(s)
        }
        Endpoint::Unix(p) => {
            let s = UnixStream::connect(p)?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            Box::new(s)
        }
    };
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet)?;
    assert_eq!(&greet[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes())?; // fixed newstyle, no zeroes
    let mut opt = IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    opt.extend_from_slice(&6u32.to_be_bytes());
    opt.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // empty name, no info requests
    s.write_all(&opt)?;
    let mut size = 0;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        s.read_exact(&mut d)?;
        match ty {
            1 => break,
            3 if d[..2] == [0, 0] => size = u64::from_be_bytes(d[2..10].try_into().unwrap()),
            3 => {}
            _ => panic!("NBD_OPT_GO failed with reply type {ty:#x}"),
        }
    }
    Ok((s, size))
}

fn header(ty: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[6..8].copy_from_slice(&ty.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

struct Client {
    id: usize,
    first: u64,
    blocks: u64,
    model: Vec<State>,
    rng: Rng,
    version: u64,
    eps: Vec<Endpoint>,
    conn: Option<Box<dyn Io>>,
    totals: Arc<Totals>,
    /// Versions written by killed connections, and when.
    killed: std::collections::HashMap<u64, Instant>,
}

/// One planned request of a batch.
struct Op {
    write: bool,
    start: u64,
    count: u64,
    version: u64,
}

impl Client {
    fn conn(&mut self) -> &mut Box<dyn Io> {
        if self.conn.is_none() {
            let ep = &self.eps[self.rng.below(self.eps.len() as u64) as usize];
            let (s, size) = connect(ep).unwrap_or_else(|e| panic!("client {}: {e}", self.id));
            assert_eq!(size, EXPORT);
            self.totals.connects.fetch_add(1, Ordering::Relaxed);
            self.conn = Some(s);
        }
        self.conn.as_mut().unwrap()
    }

    /// Blocks in the "either" state are only read (which settles them once the quarantine
    /// has passed), never written: a killed write on top would leave three candidates.
    fn unsettled(&self, b: u64) -> bool {
        matches!(self.model[b as usize], State::Either(..))
    }

    /// Checks block `b` against the model; settles a quarantined "either".
    fn check(&mut self, b: u64, data: &[u8]) {
        let mut want = vec![0u8; BLOCK];
        let global = self.first + b;
        let matches = |v: u64, want: &mut Vec<u8>| {
            fill(global, v, want);
            data == &want[..]
        };
        match self.model[b as usize] {
            State::Known(v) => {
                if !matches(v, &mut want) {
                    self.mismatch(b, &format!("expected version {v}"), data);
                }
            }
            State::Either(old, new, t) => {
                let seen = if matches(new, &mut want) {
                    new
                } else if matches(old, &mut want) {
                    old
                } else {
                    self.mismatch(b, &format!("expected version {old} or {new}"), data);
                    return;
                };
                if t.elapsed() >= QUARANTINE {
                    self.model[b as usize] = State::Known(seen);
                    self.totals.settled.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn mismatch(&self, b: u64, what: &str, data: &[u8]) {
        let n = self.totals.mismatches.fetch_add(1, Ordering::Relaxed);
        if n < 10 {
            eprintln!(
                "MISMATCH client {} block {} (offset {}): {what}; {}",
                self.id,
                self.first + b,
                (self.first + b) * BLOCK as u64,
                self.identify(b, data)
            );
        }
    }

    /// Which of this client's versions `data` is, to tell a late write of a killed
    /// connection (a quarantine too short for the machine's load) from corruption.
    fn identify(&self, b: u64, data: &[u8]) -> String {
        let mut want = vec![0u8; BLOCK];
        for v in (0..=self.version).rev() {
            fill(self.first + b, v, &mut want);
            if data == &want[..] {
                return match self.killed.get(&v) {
                    Some(t) => format!(
                        "the data is version {v}, a write killed {:.1} s ago",
                        t.elapsed().as_secs_f64()
                    ),
                    None => format!("the data is version {v}, an older acknowledged write"),
                };
            }
        }
        "the data is no version this client wrote to this block".to_string()
    }

    /// Plans a batch of requests on disjoint block ranges of the region.
    fn plan(&mut self) -> Vec<Op> {
        let n = 1 + self.rng.below(8);
        let mut ops: Vec<Op> = Vec::new();
        for _ in 0..n {
            let count = 1 + self.rng.below(16).min(self.blocks - 1);
            let start = self.rng.below(self.blocks - count + 1);
            if ops
                .iter()
                .any(|o| start < o.start + o.count && o.start < start + count)
            {
                continue;
            }
            let mut write = self.rng.below(2) == 0;
            if write && (start..start + count).any(|b| self.unsettled(b)) {
                write = false;
            }
            let version = if write {
                self.version += 1;
                self.version
            } else {
                0
            };
            ops.push(Op {
                write,
                start,
                count,
                version,
            });
        }
        ops
    }

    fn run_batch(&mut self, ops: &[Op], kill: bool) -> std::io::Result<()> {
        let first = self.first;
        // Sent as one buffer, so a kill can cut it anywhere.
        let mut out = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let off = (first + op.start) * BLOCK as u64;
            let len = (op.count as usize * BLOCK) as u32;
            out.extend_from_slice(&header(u16::from(op.write), i as u64, off, len));
            if op.write {
                let at = out.len();
                out.resize(at + len as usize, 0);
                for k in 0..op.count {
                    let s = at + k as usize * BLOCK;
                    fill(first + op.start + k, op.version, &mut out[s..s + BLOCK]);
                }
            }
        }
        if kill {
            let cut = 1 + self.rng.below(out.len() as u64) as usize;
            self.conn();
            let mut s = self.conn.take().expect("connected");
            let _ = s.write_all(&out[..cut]);
            s.kill();
            drop(s);
            let now = Instant::now();
            for op in ops.iter().filter(|o| o.write) {
                for b in op.start..op.start + op.count {
                    let State::Known(old) = self.model[b as usize] else {
                        unreachable!("unsettled blocks are not written");
                    };
                    self.model[b as usize] = State::Either(old, op.version, now);
                    self.killed.insert(op.version, now);
                }
            }
            self.totals.kills.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.conn().write_all(&out)?;
        let mut seen = vec![false; ops.len()];
        for _ in 0..ops.len() {
            let mut h = [0u8; 16];
            self.conn().read_exact(&mut h)?;
            let magic = u32::from_be_bytes(h[..4].try_into().unwrap());
            let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap()) as usize;
            assert_eq!(magic, SIMPLE_REPLY_MAGIC, "client {}: torn reply", self.id);
            assert!(cookie < ops.len() && !seen[cookie], "bad cookie {cookie}");
            seen[cookie] = true;
            let op = &ops[cookie];
            if err != 0 {
                self.totals.failures.fetch_add(1, Ordering::Relaxed);
                eprintln!("client {}: request failed with errno {err}", self.id);
                continue;
            }
            let bytes = op.count * BLOCK as u64;
            self.totals.bytes.fetch_add(bytes, Ordering::Relaxed);
            if op.write {
                for b in op.start..op.start + op.count {
                    self.model[b as usize] = State::Known(op.version);
                }
            } else {
                let mut data = vec![0u8; bytes as usize];
                self.conn().read_exact(&mut data)?;
                for (k, blk) in data.chunks_exact(BLOCK).enumerate() {
                    self.check(op.start + k as u64, blk);
                }
            }
        }
        self.totals
            .ops
            .fetch_add(ops.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Reads the whole region back (after the quarantine), in 64-block requests.
    fn verify_all(&mut self) {
        let mut start = 0;
        while start < self.blocks {
            let count = (self.blocks - start).min(64);
            let op = Op {
                write: false,
                start,
                count,
                version: 0,
            };
            self.run_batch(&[op], false)
                .unwrap_or_else(|e| panic!("client {}: final read: {e}", self.id));
            start += count;
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn soak_many_clients_with_random_kills() {
    if common::server_kind() != common::ServerKind::Vramdisk {
        common::loud("SKIPPED: the soak samples vramdisk's own memory use");
        return;
    }
    let secs = env_u64("SOAK_SECS", 20);
    let clients = env_u64("SOAK_CLIENTS", 72).max(2) as usize;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let seed = env_u64("SOAK_SEED", mix(now));
    let mut config = ServerConfig::sized(EXPORT);
    // A second listener: half the clients come over a Unix socket.
    let sock = tempfile::tempdir().unwrap();
    let sock_path: PathBuf = sock.path().join("soak.sock");
    config
        .extra_args
        .extend(["--socket".to_string(), sock_path.display().to_string()]);
    let mut srv = Server::start(config, Transport::Tcp);
    let eps = vec![srv.endpoint().clone(), Endpoint::Unix(sock_path)];
    let totals = Arc::new(Totals {
        ops: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        kills: AtomicU64::new(0),
        connects: AtomicU64::new(0),
        mismatches: AtomicU64::new(0),
        settled: AtomicU64::new(0),
        failures: AtomicU64::new(0),
    });
    let region = EXPORT / BLOCK as u64 / clients as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    eprintln!("soak: {clients} clients, {secs} s, seed {seed}");
    let handles: Vec<_> = (0..clients)
        .map(|id| {
            let eps = eps.clone();
            let totals = totals.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut c = Client {
                    id,
                    first: id as u64 * region,
                    blocks: region,
                    model: vec![State::Known(0); region as usize],
                    rng: Rng(seed ^ mix(id as u64 + 1)),
                    version: 0,
                    // Half the clients start on each transport; reconnects pick at random.
                    eps: if id % 2 == 0 {
                        eps.clone()
                    } else {
                        eps.iter().rev().cloned().collect()
                    },
                    conn: None,
                    totals,
                    killed: Default::default(),
                };
                let first = c.eps[0].clone();
                c.eps = vec![first];
                c.conn();
                c.eps = eps;
                // Fill the region first: the device's memory is then all allocated, and
                // RSS afterwards should stay flat.
                let mut b = 0;
                while b < c.blocks {
                    let count = (c.blocks - b).min(64);
                    c.version += 1;
                    let op = Op {
                        write: true,
                        start: b,
                        count,
                        version: c.version,
                    };
                    c.run_batch(&[op], false).expect("filling the region");
                    b += count;
                }
                while !stop.load(Ordering::Relaxed) {
                    let ops = c.plan();
                    let kill = c.rng.below(50) == 0;
                    if let Err(e) = c.run_batch(&ops, kill) {
                        panic!("client {}: {e}", c.id);
                    }
                }
                std::thread::sleep(QUARANTINE);
                c.verify_all();
                c.totals.ops.load(Ordering::Relaxed)
            })
        })
        .collect();
    let pid = srv.pid();
    let mut samples = Vec::new();
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(1));
        samples.push(rss_kib(pid));
        srv.assert_running();
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("a soak client failed");
    }
    srv.assert_running();
    // Every connection the server opened has ended: none leaked its slot.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (opened, closed) = loop {
        let log = srv.log();
        let opened = log.lines().filter(|l| l.ends_with(" connected")).count();
        let closed = log
            .lines()
            .filter(|l| l.contains(" closed") || l.contains(" dropped from"))
            .count();
        if opened == closed || Instant::now() > deadline {
            break (opened, closed);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let t = &totals;
    let ops = t.ops.load(Ordering::Relaxed);
    // RSS trend: after the first fifth (filling, pools warming up), the mean of the last
    // fifth must not exceed the mean of the second fifth by more than 10% + 32 MiB.
    let n = samples.len();
    let fifth = (n / 5).max(1);
    let mean = |s: &[u64]| s.iter().sum::<u64>() / s.len().max(1) as u64;
    let early = mean(&samples[fifth.min(n - 1)..(2 * fifth).min(n)]);
    let late = mean(&samples[n - fifth..]);
    let max = samples.iter().copied().max().unwrap_or(0);
    let summary = format!(
        "soak: {clients} clients, {:.0} s, {ops} requests, {} MiB moved, {} kills, {} \
         connections, {} blocks settled after kills, {} mismatches, {} error replies; \
         server RSS early {} MiB, late {} MiB, max {} MiB; {opened} connections opened, \
         {closed} closed; seed {seed}",
        started.elapsed().as_secs_f64(),
        t.bytes.load(Ordering::Relaxed) >> 20,
        t.kills.load(Ordering::Relaxed),
        t.connects.load(Ordering::Relaxed),
        t.settled.load(Ordering::Relaxed),
        t.mismatches.load(Ordering::Relaxed),
        t.failures.load(Ordering::Relaxed),
        early >> 10,
        late >> 10,
        max >> 10,
    );
    eprintln!("{summary}");
    if let Ok(path) = std::env::var("SOAK_REPORT") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        writeln!(f, "{summary}").unwrap();
        writeln!(f, "rss_kib samples (1/s): {samples:?}").unwrap();
    }
    assert_eq!(t.mismatches.load(Ordering::Relaxed), 0, "{summary}");
    assert_eq!(t.failures.load(Ordering::Relaxed), 0, "{summary}");
    assert!(ops > 1000, "too few requests for a soak: {summary}");
    assert_eq!(opened, closed, "connections leaked: {summary}");
    assert!(t.kills.load(Ordering::Relaxed) > 0, "{summary}");
    assert!(
        late <= early + early / 10 + (32 << 10),
        "server RSS grows: {summary}"
    );
}
