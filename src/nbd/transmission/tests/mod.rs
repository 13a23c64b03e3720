//! The transmission phase end to end, in process: a client on one end of a socket pair,
//! [`run`] on the other.
//!
//! One file per concern: `replies.rs` (what each request gets back), `budgets.rs`
//! (backpressure, cut and dropped connections), `polling.rs` (busy polling and operations
//! that complete elsewhere), `devices.rs` (device wrappers the tests slow down or watch);
//! this file holds what they share.

mod budgets;
mod devices;
mod polling;
mod replies;

use super::*;
use crate::engine::host::HostBackend;
use crate::engine::{Capabilities, ZeroFlags};
use crate::engine::{SparseDevice, SparseOptions};
use crate::nbd::export::transmission_flags;
use crate::nbd::handshake::ALLOCATION_CONTEXT_ID;
use crate::nbd::proto::{Framing, NbdError};
use rand::RngExt;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

const SIZE: u64 = 64 << 20;
/// Largest request: above the 32 MiB maximum payload, so that requests are streamed.
const MAX_REQUEST: u64 = 60 << 20;

fn export(read_only: bool) -> Export {
    let mut o = SparseOptions::new(SIZE);
    o.buffer_limit = 256 << 20;
    o.read_only = read_only;
    Export {
        name: String::new(),
        description: String::new(),
        device: Arc::new(SparseDevice::new(HostBackend::new(), o).unwrap()),
        metrics: None,
    }
}

/// Starts the transmission phase on one end of a socket pair; returns the other end.
fn start(framing: Framing, read_only: bool) -> (UnixStream, tokio::task::JoinHandle<Summary>) {
    start_on(export(read_only), framing)
}

/// Like [`start`], on a given export.
fn start_on(export: Export, framing: Framing) -> (UnixStream, tokio::task::JoinHandle<Summary>) {
    let (client, server) = UnixStream::pair().unwrap();
    let neg = Negotiated {
        export: 0,
        framing,
        allocation_context: (framing != Framing::Simple).then_some(ALLOCATION_CONTEXT_ID),
        flags: transmission_flags(&export.device.capabilities(), framing),
    };
    let task = spawn_run(server, export, neg, 64 << 20);
    (client, task)
}

/// Runs the transmission phase of `export` on `server` (a 50 µs poll budget, no per-client
/// budget) with `inflight` bytes of in-flight budget. On the test's own runtime, which the
/// client shares: nothing polls there (see `polling_connection_serves_in_process`).
fn spawn_run(
    server: UnixStream,
    export: Export,
    neg: Negotiated,
    inflight: usize,
) -> tokio::task::JoinHandle<Summary> {
    let limits = ConnectionLimits {
        inflight_bytes: inflight,
        busy_poll: Duration::from_micros(50),
        max_request: MAX_REQUEST,
    };
    tokio::spawn(async move {
        let (rd, wr) = server.into_split();
        let shutdown = CancellationToken::new();
        run(rd, wr, &export, &neg, &limits, None, &shutdown).await
    })
}

/// What a client that negotiated nothing (simple replies) gets on `export`.
fn simple_terms(export: &Export) -> Negotiated {
    Negotiated {
        export: 0,
        framing: Framing::Simple,
        allocation_context: None,
        flags: transmission_flags(&export.device.capabilities(), Framing::Simple),
    }
}

fn request(ext: bool, cmd: u16, flags: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
    proto::encode_request(ext, cmd, flags, cookie, offset, len)
}

async fn simple_reply(c: &mut (impl AsyncReadExt + Unpin)) -> (u32, u64) {
    let mut h = [0u8; 16];
    c.read_exact(&mut h).await.unwrap();
    assert_eq!(&h[0..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
    )
}

/// A structured or extended chunk: (flags, type, cookie, payload).
async fn chunk(c: &mut (impl AsyncReadExt + Unpin), ext: bool) -> (u16, u16, u64, Vec<u8>) {
    let mut h = vec![0u8; if ext { 32 } else { 20 }];
    c.read_exact(&mut h).await.unwrap();
    let magic = u32::from_be_bytes(h[0..4].try_into().unwrap());
    let len = if ext {
        assert_eq!(magic, proto::EXTENDED_REPLY_MAGIC);
        u64::from_be_bytes(h[24..32].try_into().unwrap()) as usize
    } else {
        assert_eq!(magic, proto::STRUCTURED_REPLY_MAGIC);
        u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize
    };
    let mut p = vec![0u8; len];
    c.read_exact(&mut p).await.unwrap();
    (
        u16::from_be_bytes(h[4..6].try_into().unwrap()),
        u16::from_be_bytes(h[6..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
        p,
    )
}

/// Bytes that differ from `pattern(seed ^ 1, ..)` everywhere, made 8 at a time.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    // xorshift, not the seeded generator: this fills megabytes a round, and fast.
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // The low bit of every byte is the seed's: two seeds that differ there differ in
        // every byte.
        let w = (x & !0x0101_0101_0101_0101) | ((seed & 1) * 0x0101_0101_0101_0101);
        v.extend_from_slice(&w.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Waits about `us` µs on a thread of its own, then wakes the caller from there.
async fn completed_elsewhere(us: u64) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_micros(us));
        let _ = tx.send(());
    });
    rx.await.unwrap();
}

/// A simple reply's header from the read half of a connection: (error, cookie).
async fn simple_reply_half(c: &mut tokio::net::unix::OwnedReadHalf) -> (u32, u64) {
    let mut h = [0u8; 16];
    c.read_exact(&mut h).await.unwrap();
    assert_eq!(&h[0..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
    (
        u32::from_be_bytes(h[4..8].try_into().unwrap()),
        u64::from_be_bytes(h[8..16].try_into().unwrap()),
    )
}

/// Runs the transmission phase on `server` on a thread and runtime of its own, counted as
/// its thread's one connection, as `server::Workers` runs connections (so it may poll).
fn serve_on_own_thread(
    server: std::os::unix::net::UnixStream,
    export: Export,
    neg: Negotiated,
    limits: ConnectionLimits,
) -> std::thread::JoinHandle<Summary> {
    std::thread::spawn(move || {
        set_thread_load(Arc::new(std::sync::atomic::AtomicUsize::new(1)));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            server.set_nonblocking(true).unwrap();
            let (rd, wr) = UnixStream::from_std(server).unwrap().into_split();
            let shutdown = CancellationToken::new();
            run(rd, wr, &export, &neg, &limits, None, &shutdown).await
        })
    })
}
