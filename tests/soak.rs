//! Data-integrity soak: many clients over TCP and a Unix socket do random pipelined reads
//! and writes, each checked against an exact model, while connections are killed at random
//! (mid-payload, with writes or reads in flight) and opened again. Ends with a full read
//! back. Fails on any mismatch, on an unexpected error reply, or when the server's RSS keeps
//! growing.
//!
//! The model is exact, not a heuristic. Each client owns a disjoint region of the export
//! and numbers its writes; every 32-byte cell of a written block names its block, the
//! write's version and its place, so any data read back can be told apart. What a killed
//! connection leaves behind is known precisely:
//! - a write the client did not send whole before the kill must never land, in part or
//!   at all (the server never applies a payload it did not receive whole);
//! - a write sent whole may land or not, at any time until the server has finished the
//!   dead connection, and while it lands, a read from another connection may see some bytes
//!   of each version (NBD gives overlapping requests in flight no order or atomicity).
//!
//! Such a block is "pending": it is not written again, and a read must see, byte for byte,
//! its acknowledged version or the killed one. Every second all clients pause between
//! batches, and the soak waits until the server's metrics show that every connection has
//! ended except the clients' live ones (a connection counts until its last write landed):
//! then no killed write can still land, and each
//! client reads its pending blocks, which must now hold one whole version or the other.
//!
//! Environment: `SOAK_SECS` (default 20), `SOAK_CLIENTS` (default 72, half TCP half Unix),
//! `SOAK_PAUSE_MS` (time between pauses, default 1000), `SOAK_SEED`, `SOAK_REPORT` (a file
//! to append the summary line to).

#[allow(unused_macros)]
mod common;

use common::{
    Endpoint, MIB, SIMPLE_REPLY_MAGIC, Server, ServerConfig, Transport, request_header as header,
};
use rand::RngExt;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const BLOCK: usize = 4096;
/// Every cell of a written block: block number, version, cell index, check word.
const CELL: usize = 32;
const EXPORT: u64 = 96 * MIB;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// splitmix64's finaliser: the check words' hash (the generator is rand's, seeded).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn check_word(block: u64, version: u64, cell: u64) -> u64 {
    mix(block ^ version.rotate_left(24) ^ cell.rotate_left(48) ^ 0x736f_616b)
}

/// The content of `block` at `version` (version 0 is the zeroes of a fresh export).
fn fill(block: u64, version: u64, out: &mut [u8]) {
    if version == 0 {
        out.fill(0);
        return;
    }
    for (i, c) in out.chunks_exact_mut(CELL).enumerate() {
        let i = i as u64;
        c[..8].copy_from_slice(&block.to_le_bytes());
        c[8..16].copy_from_slice(&version.to_le_bytes());
        c[16..24].copy_from_slice(&i.to_le_bytes());
        c[24..].copy_from_slice(&check_word(block, version, i).to_le_bytes());
    }
}

/// What one cell of data read back says it is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cell {
    Zero,
    /// Block, version, cell index.
    Written(u64, u64, u64),
    Garbage,
}

fn decode(c: &[u8]) -> Cell {
    let w = |i: usize| u64::from_le_bytes(c[i * 8..i * 8 + 8].try_into().unwrap());
    if c.iter().all(|&b| b == 0) {
        Cell::Zero
    } else if check_word(w(0), w(1), w(2)) == w(3) {
        Cell::Written(w(0), w(1), w(2))
    } else {
        Cell::Garbage
    }
}
#[derive(Clone, Copy, Debug)]
enum State {
    /// Holds this version.
    Known(u64),
    /// Holds `cur`, unless a write of `killed`, sent whole on a connection killed before
    /// its reply, lands: it may, in part while it is landing, until the server has
    /// finished that connection.
    /// `seen_cur`: a read has seen `cur` since the kill.
    Pending {
        cur: u64,
        killed: u64,
        seen_cur: bool,
    },
}

/// A write of a killed connection.
struct Killed {
    at: Instant,
    /// Sent whole before the kill (otherwise it must never land).
    whole: bool,
}

struct Totals {
    ops: AtomicU64,
    bytes: AtomicU64,
    kills: AtomicU64,
    connects: AtomicU64,
    mismatches: AtomicU64,
    failures: AtomicU64,
    /// Killed writes sent whole; of these, blocks seen to land, and blocks found not
    /// landed once their connection had ended.
    killed_whole: AtomicU64,
    landed: AtomicU64,
    not_landed: AtomicU64,
    /// Killed writes not sent whole: checked never to land.
    killed_cut: AtomicU64,
    /// Reads that caught a killed write landing: some bytes old, some new.
    torn: AtomicU64,
    /// Blocks read as `cur` while pending, then seen landed: the killed write landed
    /// after a read on the new connection.
    landed_late: AtomicU64,
    pauses: AtomicU64,
}

/// Live connections: counted by clients, compared with the server's log at pauses.
static LIVE: AtomicUsize = AtomicUsize::new(0);
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

struct Client {
    id: usize,
    first: u64,
    blocks: u64,
    model: Vec<State>,
    rng: rand::rngs::StdRng,
    version: u64,
    eps: Vec<Endpoint>,
    conn: Option<Box<dyn Io>>,
    totals: Arc<Totals>,
    killed: HashMap<u64, Killed>,
    /// Set while reading pending blocks after a pause: nothing can land any more.
    settling: bool,
    /// Ranges of the last kill's writes sent whole: often read at once, while the server
    /// may still be applying them.
    chase: Vec<(u64, u64)>,
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
            let ep = &self.eps[self.rng.random_range(0..self.eps.len() as u64) as usize];
            let (s, size) = connect(ep).unwrap_or_else(|e| panic!("client {}: {e}", self.id));
            assert_eq!(size, EXPORT);
            self.totals.connects.fetch_add(1, Ordering::Relaxed);
            LIVE.fetch_add(1, Ordering::SeqCst);
            self.conn = Some(s);
        }
        self.conn.as_mut().unwrap()
    }

    /// Pending blocks are only read, never written: a second killed write on top would
    /// leave three candidates, and an acknowledged one could be overwritten by the
    /// killed write landing late.
    fn pending(&self, b: u64) -> bool {
        matches!(self.model[b as usize], State::Pending { .. })
    }

    /// Checks block `b` against the model.
    fn check(&mut self, b: u64, data: &[u8]) {
        let global = self.first + b;
        let mut want = vec![0u8; BLOCK];
        match self.model[b as usize] {
            State::Known(v) => {
                fill(global, v, &mut want);
                if data != &want[..] {
                    self.mismatch(b, &format!("expected version {v}"), data);
                }
            }
            State::Pending {
                cur,
                killed,
                seen_cur,
            } => {
                let mut new = vec![0u8; BLOCK];
                fill(global, killed, &mut new);
                fill(global, cur, &mut want);
                let t = &self.totals;
                if data == &new[..] {
                    // Landed whole: a write lands once, and nothing else writes here.
                    self.model[b as usize] = State::Known(killed);
                    t.landed.fetch_add(1, Ordering::Relaxed);
                    if seen_cur {
                        t.landed_late.fetch_add(1, Ordering::Relaxed);
                    }
                } else if data == &want[..] {
                    self.model[b as usize] = if self.settling {
                        t.not_landed.fetch_add(1, Ordering::Relaxed);
                        State::Known(cur)
                    } else {
                        State::Pending {
                            cur,
                            killed,
                            seen_cur: true,
                        }
                    };
                } else if !self.settling
                    && (0..BLOCK).all(|i| data[i] == want[i] || data[i] == new[i])
                {
                    // Legal, and rare: worth seeing what it looked like.
                    if t.torn.fetch_add(1, Ordering::Relaxed) < 10 {
                        eprintln!(
                            "torn read (legal) client {} block {global}, version {cur} with the \
                             killed {killed} landing: {}",
                            self.id,
                            self.describe(global, data)
                        );
                    }
                } else {
                    let when = if self.settling {
                        "after its connection ended"
                    } else {
                        "byte for byte"
                    };
                    self.mismatch(
                        b,
                        &format!("expected version {cur} or the killed {killed}, {when}"),
                        data,
                    );
                }
            }
        }
    }

    fn mismatch(&self, b: u64, what: &str, data: &[u8]) {
        let n = self.totals.mismatches.fetch_add(1, Ordering::Relaxed);
        if n < 10 {
            eprintln!(
                "MISMATCH client {} block {} (offset {}): {what}; found {}",
                self.id,
                self.first + b,
                (self.first + b) * BLOCK as u64,
                self.describe(self.first + b, data)
            );
        }
    }

    /// What `data`, read from `block`, holds: runs of cells by block and version, each
    /// version named as this client's acknowledged write, or a killed one.
    fn describe(&self, block: u64, data: &[u8]) -> String {
        let cells: Vec<Cell> = data.chunks_exact(CELL).map(decode).collect();
        let mut runs: Vec<(usize, usize, Cell)> = Vec::new();
        for (i, c) in cells.iter().enumerate() {
            // A run goes on while the cell is the next one of the same block and version.
            let same = |p: &Cell| match (p, c) {
                (Cell::Written(b1, v1, _), Cell::Written(b2, v2, _)) => b1 == b2 && v1 == v2,
                (p, c) => p == c,
            };
            match runs.last_mut() {
                Some((_, end, p)) if *end == i && same(p) => *end = i + 1,
                _ => runs.push((i, i + 1, *c)),
            }
        }
        let parts: Vec<String> = runs
            .iter()
            .map(|&(s, e, c)| {
                let what = match c {
                    Cell::Zero => "zeroes".to_string(),
                    Cell::Garbage => "no cell the soak writes".to_string(),
                    Cell::Written(b, v, i) => {
                        let whose = match self.killed.get(&v) {
                            Some(k) => format!(
                                "a write killed {:.1} s ago{}",
                                k.at.elapsed().as_secs_f64(),
                                if k.whole {
                                    ""
                                } else {
                                    " before it was sent whole"
                                }
                            ),
                            None if v <= self.version => "an acknowledged write".to_string(),
                            None => "a version this client never wrote".to_string(),
                        };
                        let place = if b != block || i != s as u64 {
                            format!(" (cells of block {b} from cell {i})")
                        } else {
                            String::new()
                        };
                        format!("version {v}, {whose}{place}")
                    }
                };
                format!("bytes {}..{}: {what}", s * CELL, e * CELL)
            })
            .collect();
        parts.join("; ")
    }

    /// Plans a batch of requests on disjoint block ranges of the region.
    fn plan(&mut self) -> Vec<Op> {
        let chase = std::mem::take(&mut self.chase);
        if !chase.is_empty() && self.rng.random_range(0..2) == 0 {
            return chase
                .into_iter()
                .map(|(start, count)| Op {
                    write: false,
                    start,
                    count,
                    version: 0,
                })
                .collect();
        }
        let n = 1 + self.rng.random_range(0..8);
        let mut ops: Vec<Op> = Vec::new();
        for _ in 0..n {
            let count = 1 + self.rng.random_range(0..16).min(self.blocks - 1);
            let start = self.rng.random_range(0..self.blocks - count + 1);
            if ops
                .iter()
                .any(|o| start < o.start + o.count && o.start < start + count)
            {
                continue;
            }
            let mut write = self.rng.random_range(0..2) == 0;
            if write && (start..start + count).any(|b| self.pending(b)) {
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
        // Sent as one buffer, so a kill can cut it anywhere; `ends` is where each request
        // ends in it.
        let mut out = Vec::new();
        let mut ends = Vec::with_capacity(ops.len());
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
            ends.push(out.len());
        }
        if kill {
            let cut = 1 + self.rng.random_range(0..out.len() as u64) as usize;
            self.conn();
            let mut s = self.conn.take().expect("connected");
            let _ = s.write_all(&out[..cut]);
            s.kill();
            drop(s);
            LIVE.fetch_sub(1, Ordering::SeqCst);
            let now = Instant::now();
            for (op, &end) in ops.iter().zip(&ends).filter(|(o, _)| o.write) {
                let whole = end <= cut;
                self.killed.insert(op.version, Killed { at: now, whole });
                if !whole {
                    // Must never land: the blocks stay as they are.
                    self.totals.killed_cut.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                self.totals.killed_whole.fetch_add(1, Ordering::Relaxed);
                self.chase.push((op.start, op.count));
                for b in op.start..op.start + op.count {
                    let State::Known(cur) = self.model[b as usize] else {
                        unreachable!("pending blocks are not written");
                    };
                    self.model[b as usize] = State::Pending {
                        cur,
                        killed: op.version,
                        seen_cur: false,
                    };
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

    /// Reads every pending block once the server has finished every killed connection:
    /// each must hold one whole version, and is known again.
    fn settle(&mut self) {
        self.settling = true;
        let mut ops = Vec::new();
        let mut b = 0;
        while b < self.blocks {
            if !self.pending(b) {
                b += 1;
                continue;
            }
            let start = b;
            while b < self.blocks && b - start < 64 && self.pending(b) {
                b += 1;
            }
            ops.push(Op {
                write: false,
                start,
                count: b - start,
                version: 0,
            });
            if ops.len() == 8 {
                self.run_batch(&ops, false)
                    .unwrap_or_else(|e| panic!("client {}: settling: {e}", self.id));
                ops.clear();
            }
        }
        if !ops.is_empty() {
            self.run_batch(&ops, false)
                .unwrap_or_else(|e| panic!("client {}: settling: {e}", self.id));
        }
        self.settling = false;
        assert!(
            (0..self.blocks).all(|b| !self.pending(b)),
            "client {}: pending blocks left after settling",
            self.id
        );
    }

    /// Reads the whole region back, in 64-block requests.
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

/// Pauses of all clients between batches.
struct Pause {
    requested: AtomicBool,
    state: Mutex<PauseState>,
    cv: Condvar,
}

#[derive(Default)]
struct PauseState {
    parked: usize,
    epoch: u64,
    /// The pause that ends the run.
    last: bool,
}

impl Pause {
    /// A client parks until the pause ends; true if it was the last.
    fn park(&self) -> bool {
        let mut st = self.state.lock().unwrap();
        st.parked += 1;
        self.cv.notify_all();
        let epoch = st.epoch;
        while st.epoch == epoch {
            st = self.cv.wait(st).unwrap();
        }
        st.last
    }

    /// Pauses `clients` clients, waits for `quiet` (true once the server has finished
    /// every connection but the live ones), and lets them go on.
    fn run(
        &self,
        clients: usize,
        last: bool,
        failed: &dyn Fn() -> bool,
        mut quiet: impl FnMut() -> Result<(), String>,
    ) {
        self.requested.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut st = self.state.lock().unwrap();
        while st.parked < clients {
            assert!(!failed(), "a soak client failed");
            assert!(
                Instant::now() < deadline,
                "only {} of {clients} clients paused within 120 s",
                st.parked
            );
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap()
                .0;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match quiet() {
                Ok(()) => break,
                Err(why) if Instant::now() > deadline => {
                    panic!("the server did not finish the killed connections in 30 s: {why}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        self.requested.store(false, Ordering::SeqCst);
        st.parked = 0;
        st.last = last;
        st.epoch += 1;
        self.cv.notify_all();
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
        common::skip_loudly("the soak samples vramdisk's own memory use and metrics");
        return;
    }
    let secs = env_u64("SOAK_SECS", 20);
    let clients = env_u64("SOAK_CLIENTS", 72).max(2) as usize;
    let pause_every = Duration::from_millis(env_u64("SOAK_PAUSE_MS", 1000).max(10));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let seed = env_u64("SOAK_SEED", mix(now));
    let mut config = ServerConfig::sized(EXPORT).with_metrics();
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
        failures: AtomicU64::new(0),
        killed_whole: AtomicU64::new(0),
        landed: AtomicU64::new(0),
        not_landed: AtomicU64::new(0),
        killed_cut: AtomicU64::new(0),
        torn: AtomicU64::new(0),
        landed_late: AtomicU64::new(0),
        pauses: AtomicU64::new(0),
    });
    let pause = Arc::new(Pause {
        requested: AtomicBool::new(false),
        state: Mutex::new(PauseState::default()),
        cv: Condvar::new(),
    });
    let region = EXPORT / BLOCK as u64 / clients as u64;
    let started = Instant::now();
    eprintln!("soak: {clients} clients, {secs} s, seed {seed}");
    let handles: Vec<_> = (0..clients)
        .map(|id| {
            let eps = eps.clone();
            let totals = totals.clone();
            let pause = pause.clone();
            std::thread::spawn(move || {
                let mut c = Client {
                    id,
                    first: id as u64 * region,
                    blocks: region,
                    model: vec![State::Known(0); region as usize],
                    rng: common::seeded_rng(seed ^ mix(id as u64 + 1)),
                    version: 0,
                    // Half the clients start on each transport; reconnects pick at random.
                    eps: if id % 2 == 0 {
                        eps.clone()
                    } else {
                        eps.iter().rev().cloned().collect()
                    },
                    conn: None,
                    totals,
                    killed: HashMap::new(),
                    settling: false,
                    chase: Vec::new(),
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
                loop {
                    if pause.requested.load(Ordering::SeqCst) {
                        let last = pause.park();
                        c.settle();
                        if last {
                            break;
                        }
                        continue;
                    }
                    let ops = c.plan();
                    let kill = c.rng.random_range(0..50) == 0;
                    if let Err(e) = c.run_batch(&ops, kill) {
                        panic!("client {}: {e}", c.id);
                    }
                }
                c.verify_all();
            })
        })
        .collect();
    let pid = srv.pid();
    let failed = || handles.iter().any(|h| h.is_finished());
    let mut samples = Vec::new();
    let mut next_sample = started + Duration::from_secs(1);
    let mut next_pause = started + pause_every;
    // Every connection but the clients' live ones has ended on the server: its count of
    // clients connected now is down to theirs.
    let quiet = |srv: &Server| {
        let live = LIVE.load(Ordering::SeqCst) as u64;
        let open = srv.metric("vramdisk_connections");
        if open == live {
            Ok(())
        } else {
            Err(format!(
                "{open} connections open on the server, {live} live"
            ))
        }
    };
    loop {
        let last = started.elapsed() >= Duration::from_secs(secs);
        let now = Instant::now();
        if now >= next_sample {
            samples.push(rss_kib(pid));
            srv.assert_running();
            next_sample += Duration::from_secs(1);
        }
        if last || now >= next_pause {
            pause.run(clients, last, &failed, || quiet(&srv));
            totals.pauses.fetch_add(1, Ordering::Relaxed);
            next_pause = Instant::now() + pause_every;
        }
        if last {
            break;
        }
        std::thread::sleep(
            next_sample
                .min(next_pause)
                .saturating_duration_since(Instant::now()),
        );
    }
    for h in handles {
        h.join().expect("a soak client failed");
    }
    srv.assert_running();
    // Every connection the server opened has ended: none leaked its slot.
    let deadline = Instant::now() + Duration::from_secs(10);
    let still_open = loop {
        let open = srv.metric("vramdisk_connections");
        if open == 0 || Instant::now() > deadline {
            break open;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let opened = srv.metric("vramdisk_connections_total");
    let t = &totals;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let ops = get(&t.ops);
    // RSS trend: after the first fifth (filling, pools warming up), the mean of the last
    // fifth must not exceed the mean of the second fifth by more than 10% + 32 MiB.
    let n = samples.len().max(1);
    samples.resize(n, 0);
    let fifth = (n / 5).max(1);
    let mean = |s: &[u64]| s.iter().sum::<u64>() / s.len().max(1) as u64;
    let early = mean(&samples[fifth.min(n - 1)..(2 * fifth).min(n)]);
    let late = mean(&samples[n - fifth..]);
    let max = samples.iter().copied().max().unwrap_or(0);
    let summary = format!(
        "soak: {clients} clients, {:.0} s, {ops} requests, {} MiB moved, {} kills, {} \
         connections, {} pauses; killed writes: {} sent whole ({} blocks seen landed, {} \
         found not landed, {} landed after a read had seen the old data), {} cut short (must \
         never land); {} reads caught a killed write landing; {} mismatches, {} error replies; server RSS early {} MiB, late {} MiB, \
         max {} MiB; {opened} connections opened, {still_open} still open; seed {seed}",
        started.elapsed().as_secs_f64(),
        get(&t.bytes) >> 20,
        get(&t.kills),
        get(&t.connects),
        get(&t.pauses),
        get(&t.killed_whole),
        get(&t.landed),
        get(&t.not_landed),
        get(&t.landed_late),
        get(&t.killed_cut),
        get(&t.torn),
        get(&t.mismatches),
        get(&t.failures),
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
    assert_eq!(get(&t.mismatches), 0, "{summary}");
    assert_eq!(get(&t.failures), 0, "{summary}");
    assert!(ops > 1000, "too few requests for a soak: {summary}");
    assert_eq!(still_open, 0, "connections leaked: {summary}");
    assert!(get(&t.kills) > 0, "{summary}");
    // Unless the machine starved the run, kills hit both kinds of write.
    assert!(
        get(&t.kills) < 50 || (get(&t.landed) > 0 && get(&t.killed_cut) > 0),
        "the kills tested nothing: {summary}"
    );
    assert!(
        late <= early + early / 10 + (32 << 10),
        "server RSS grows: {summary}"
    );
}
