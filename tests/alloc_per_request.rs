//! Heap allocations per 4 KiB request on the NBD path, counted in steady state.
//!
//! A host-memory device (metered, as the daemon serves it) is served in this process over
//! a Unix socket pair, through the transmission phase the kernel's driver uses
//! (`serve_transmission_only`: the same reader, outbox and writer as every connection).
//! A counting global allocator counts every allocation made on any thread but the client's:
//! the client is a plain blocking socket client (a measuring instrument, not a test of the
//! protocol; the real clients test that elsewhere), whose own allocations are left out.
//!
//! After a warm-up (chunks allocated, buffers and tables grown), thousands of reads and
//! writes at queue depth 1 and 32 must allocate at most [`MAX_PER_REQUEST`] times each on
//! average: the I/O path is allocation-free apart from rare growth.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokio_util::sync::CancellationToken;
use vramdisk::engine::host::HostBackend;
use vramdisk::engine::metered::{MeteredDevice, Op};
use vramdisk::engine::{BlockDevice, SparseDevice, SparseOptions};
use vramdisk::nbd::export::Export;
use vramdisk::nbd::proto;

/// Counts allocations (and reallocations, which may move) outside excluded threads.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Set on the client's thread: its allocations are not the server's.
    static EXCLUDED: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    // `try_with`: a thread being torn down has no thread-locals left; count it.
    if !EXCLUDED.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Most allocations per request, on average over a measured run, on any path: below one
/// per batch of 32 (0.031), which the reply batch's slice list cost before it was kept.
const MAX_PER_REQUEST: f64 = 0.01;
/// Requests per measured run.
const N: usize = 4096;
const BLOCK: usize = 4096;
/// The device: 16 MiB, so the measured requests cover it several times over.
const SIZE: u64 = 16 << 20;

/// A blocking NBD client over simple replies, sending requests `depth` at a time.
struct Client {
    sock: UnixStream,
    out: Vec<u8>,
    reply: Vec<u8>,
    cookie: u64,
}

impl Client {
    /// Sends `n` requests of `cmd` over consecutive blocks, `depth` in flight at a time,
    /// and checks every reply (and, for reads, the data: each block holds its index).
    fn run(&mut self, cmd: u16, n: usize, depth: usize) {
        let blocks = SIZE / BLOCK as u64;
        let mut sent = 0;
        while sent < n {
            let batch = depth.min(n - sent);
            self.out.clear();
            for k in 0..batch {
                let block = (sent + k) as u64 % blocks;
                self.cookie += 1;
                self.out.extend_from_slice(&header(
                    cmd,
                    self.cookie,
                    block * BLOCK as u64,
                    BLOCK as u32,
                ));
                if cmd == proto::CMD_WRITE {
                    self.out.extend_from_slice(&block_data(block));
                }
            }
            self.sock.write_all(&self.out).expect("sending requests");
            for k in 0..batch {
                let cookie = self.cookie - (batch - k - 1) as u64;
                let block = (sent + k) as u64 % blocks;
                let mut head = [0u8; 16];
                self.sock.read_exact(&mut head).expect("reading a reply");
                assert_eq!(
                    head[..4],
                    0x6744_6698u32.to_be_bytes(),
                    "simple reply magic"
                );
                assert_eq!(head[4..8], [0; 4], "request {cookie} failed");
                assert_eq!(head[8..], cookie.to_be_bytes(), "replies in order here");
                if cmd == proto::CMD_READ {
                    self.reply.resize(BLOCK, 0);
                    self.sock.read_exact(&mut self.reply).expect("reading data");
                    assert_eq!(self.reply, block_data(block), "block {block} read back");
                }
            }
            sent += batch;
        }
    }
}

fn header(cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[..4].copy_from_slice(&0x2560_9513u32.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// A block's contents: its index, repeated.
fn block_data(block: u64) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    for (i, x) in b.iter_mut().enumerate() {
        *x = (block.wrapping_mul(131) as usize + i / 8) as u8;
    }
    b
}

/// Allocations per request while `f` runs.
fn per_request(n: usize, f: impl FnOnce()) -> f64 {
    let before = ALLOCATIONS.load(Relaxed);
    f();
    let after = ALLOCATIONS.load(Relaxed);
    (after - before) as f64 / n as f64
}

#[test]
fn reads_and_writes_of_4k_allocate_nothing_in_steady_state() {
    let mut opts = SparseOptions::new(SIZE);
    opts.chunk_size = 1 << 20;
    let sparse: Arc<dyn BlockDevice> =
        Arc::new(SparseDevice::new(HostBackend::new(), opts).expect("a host device"));
    let metered = MeteredDevice::new(sparse);
    let metrics = metered.metrics().clone();
    let export = Export {
        name: String::new(),
        description: String::new(),
        metrics: Some(metered.metrics().clone()),
        device: Arc::new(metered),
    };
    let (client_sock, server_sock) = UnixStream::pair().expect("a socket pair");
    let shutdown = CancellationToken::new();
    let server = std::thread::spawn({
        let shutdown = shutdown.clone();
        move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async move {
                server_sock.set_nonblocking(true).unwrap();
                let sock = tokio::net::UnixStream::from_std(server_sock).unwrap();
                vramdisk::nbd::server::serve_transmission_only(
                    sock,
                    &export,
                    proto::FLAG_HAS_FLAGS,
                    64 << 20,
                    &shutdown,
                )
                .await
            })
        }
    });

    EXCLUDED.with(|e| e.set(true));
    let mut client = Client {
        sock: client_sock,
        out: Vec::with_capacity(32 * (28 + BLOCK)),
        reply: Vec::with_capacity(BLOCK),
        cookie: 0,
    };
    // Warm-up: every chunk allocated, buffers pooled, queues and tables at their size.
    let blocks = (SIZE / BLOCK as u64) as usize;
    for depth in [1, 32] {
        client.run(proto::CMD_WRITE, blocks, depth);
        client.run(proto::CMD_READ, 1024, depth);
    }
    let mut table = Vec::new();
    for (name, cmd) in [("write", proto::CMD_WRITE), ("read", proto::CMD_READ)] {
        for depth in [1, 32] {
            let n = per_request(N, || client.run(cmd, N, depth));
            table.push((name, depth, n));
        }
    }
    client
        .sock
        .write_all(&header(proto::CMD_DISC, 0, 0, 0))
        .unwrap();
    let served = server.join().expect("the server thread").expect("served");
    shutdown.cancel();
    assert!(served >= (4 * N) as u64);
    // Writes that complete at once are counted like any other.
    let writes = metrics.snapshot().op(Op::Write).ops;
    assert_eq!(writes, (2 * blocks + 2 * N) as u64, "writes counted");

    for (name, depth, n) in &table {
        eprintln!("{name:>5} QD{depth:<2}: {n:.3} allocations per 4 KiB request");
    }
    for (name, depth, n) in &table {
        assert!(
            *n <= MAX_PER_REQUEST,
            "a 4 KiB {name} at queue depth {depth} allocates {n:.3} times per request \
             (at most {MAX_PER_REQUEST} allowed): something on the I/O path allocates again"
        );
    }
}
