//! The transmission phase end to end, in process: a client on one end of a socket pair,
//! [`run`] on the other.

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

#[tokio::test]
async fn pipelined_requests_all_answered() {
    let (mut c, task) = start(Framing::Simple, false);
    // 300 writes sent before reading any reply, then 300 reads.
    let n = 300u64;
    let mut out = Vec::new();
    for i in 0..n {
        out.extend(request(false, proto::CMD_WRITE, 0, i, i * 4096, 4096));
        out.extend(std::iter::repeat_n(i as u8, 4096));
    }
    c.write_all(&out).await.unwrap();
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let (err, cookie) = simple_reply(&mut c).await;
        assert_eq!(err, 0);
        assert!(!std::mem::replace(&mut seen[cookie as usize], true));
    }
    out.clear();
    for i in 0..n {
        out.extend(request(false, proto::CMD_READ, 0, 1000 + i, i * 4096, 4096));
    }
    c.write_all(&out).await.unwrap();
    for _ in 0..n {
        let (err, cookie) = simple_reply(&mut c).await;
        assert_eq!(err, 0);
        let mut data = vec![0u8; 4096];
        c.read_exact(&mut data).await.unwrap();
        let i = cookie - 1000;
        assert!(data.iter().all(|&b| b == i as u8), "data of read {i}");
    }
    c.write_all(&request(false, proto::CMD_DISC, 0, 0, 0, 0))
        .await
        .unwrap();
    let s = task.await.unwrap();
    assert!(matches!(s.ended, Ended::Disconnect), "{}", s.ended);
    assert_eq!(s.requests, 2 * n + 1);
}

#[tokio::test]
async fn errors_are_replies_and_the_connection_goes_on() {
    let (mut c, task) = start(Framing::Simple, false);
    let inval = NbdError::Inval.code();
    // Read past the end.
    c.write_all(&request(false, proto::CMD_READ, 0, 1, SIZE - 512, 4096))
        .await
        .unwrap();
    assert_eq!(simple_reply(&mut c).await, (inval, 1));
    // Write past the end: ENOSPC, and its payload is skipped.
    let mut w = request(false, proto::CMD_WRITE, 0, 2, SIZE - 512, 4096);
    w.extend(vec![0xee; 4096]);
    c.write_all(&w).await.unwrap();
    assert_eq!(simple_reply(&mut c).await, (NbdError::NoSpc.code(), 2));
    // A write larger than the largest request: EINVAL, payload skipped.
    let big = MAX_REQUEST + 1;
    c.write_all(&request(false, proto::CMD_WRITE, 0, 3, 0, big))
        .await
        .unwrap();
    c.write_all(&vec![0u8; big as usize]).await.unwrap();
    assert_eq!(simple_reply(&mut c).await, (inval, 3));
    // Unknown command and unknown flag.
    c.write_all(&request(false, 42, 0, 4, 0, 0)).await.unwrap();
    assert_eq!(simple_reply(&mut c).await, (inval, 4));
    c.write_all(&request(false, proto::CMD_READ, 0x100, 5, 0, 512))
        .await
        .unwrap();
    assert_eq!(simple_reply(&mut c).await, (inval, 5));
    // Write zeroes past the end: ENOSPC as the spec asks; trim past the end: EINVAL.
    c.write_all(&request(false, proto::CMD_WRITE_ZEROES, 0, 6, SIZE, 1))
        .await
        .unwrap();
    assert_eq!(simple_reply(&mut c).await, (NbdError::NoSpc.code(), 6));
    c.write_all(&request(false, proto::CMD_TRIM, 0, 7, SIZE, 1))
        .await
        .unwrap();
    assert_eq!(simple_reply(&mut c).await, (inval, 7));
    // Block status without a context: EINVAL.
    c.write_all(&request(false, proto::CMD_BLOCK_STATUS, 0, 8, 0, 4096))
        .await
        .unwrap();
    assert_eq!(simple_reply(&mut c).await, (inval, 8));
    // Still usable.
    let mut w = request(false, proto::CMD_WRITE, proto::CMD_FLAG_FUA, 9, 512, 3);
    w.extend(b"abc");
    w.extend(request(false, proto::CMD_READ, 0, 10, 512, 3));
    c.write_all(&w).await.unwrap();
    assert_eq!(simple_reply(&mut c).await, (0, 9));
    assert_eq!(simple_reply(&mut c).await, (0, 10));
    let mut d = [0u8; 3];
    c.read_exact(&mut d).await.unwrap();
    assert_eq!(&d, b"abc");
    drop(c);
    assert!(matches!(task.await.unwrap().ended, Ended::Eof));
}

#[tokio::test]
async fn read_only_refuses_writes_with_eperm() {
    let (mut c, _task) = start(Framing::Simple, true);
    let mut w = request(false, proto::CMD_WRITE, 0, 1, 0, 512);
    w.extend(vec![1u8; 512]);
    w.extend(request(false, proto::CMD_TRIM, 0, 2, 0, 512));
    w.extend(request(false, proto::CMD_WRITE_ZEROES, 0, 3, 0, 512));
    w.extend(request(false, proto::CMD_READ, 0, 4, 0, 512));
    c.write_all(&w).await.unwrap();
    let perm = NbdError::Perm.code();
    assert_eq!(simple_reply(&mut c).await, (perm, 1));
    assert_eq!(simple_reply(&mut c).await, (perm, 2));
    assert_eq!(simple_reply(&mut c).await, (perm, 3));
    assert_eq!(simple_reply(&mut c).await, (0, 4));
}

#[tokio::test]
async fn structured_reads_send_holes_and_data() {
    let (mut c, _task) = start(Framing::Structured, false);
    // Chunks are 1 MiB: data only in the second one.
    let mut w = request(false, proto::CMD_WRITE, 0, 1, (1 << 20) + 100, 4);
    w.extend(b"data");
    c.write_all(&w).await.unwrap();
    assert_eq!(simple_reply(&mut c).await, (0, 1));
    c.write_all(&request(false, proto::CMD_READ, 0, 2, 512, 3 << 20))
        .await
        .unwrap();
    let mut covered = 512u64;
    loop {
        let (flags, kind, cookie, p) = chunk(&mut c, false).await;
        assert_eq!(cookie, 2);
        let off = u64::from_be_bytes(p[0..8].try_into().unwrap());
        assert_eq!(off, covered, "chunks arrive in order and cover the range");
        match kind {
            proto::REPLY_TYPE_OFFSET_HOLE => {
                covered += u32::from_be_bytes(p[8..12].try_into().unwrap()) as u64;
            }
            proto::REPLY_TYPE_OFFSET_DATA => {
                assert_eq!(off, 1 << 20);
                assert_eq!(&p[8 + 100..8 + 104], b"data");
                covered += p.len() as u64 - 8;
            }
            k => panic!("chunk type {k}"),
        }
        if flags & proto::REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(covered, 512 + (3 << 20));
    // DF: one data chunk with the zeros spelled out.
    c.write_all(&request(
        false,
        proto::CMD_READ,
        proto::CMD_FLAG_DF,
        3,
        0,
        2 << 20,
    ))
    .await
    .unwrap();
    let (flags, kind, _, p) = chunk(&mut c, false).await;
    assert_eq!(
        (flags, kind),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA)
    );
    assert_eq!(p.len(), 8 + (2 << 20));
    // Errors are error chunks with a message.
    c.write_all(&request(false, proto::CMD_READ, 0, 4, SIZE, 1))
        .await
        .unwrap();
    let (flags, kind, _, p) = chunk(&mut c, false).await;
    assert_eq!(
        (flags, kind),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR)
    );
    assert_eq!(u32::from_be_bytes(p[0..4].try_into().unwrap()), 22);
    let msg_len = u16::from_be_bytes(p[4..6].try_into().unwrap()) as usize;
    assert!(String::from_utf8_lossy(&p[6..6 + msg_len]).contains("past the end"));
}

/// Reads a structured reply to `cookie` into a buffer of `len` bytes at `offset`:
/// holes as zeros, data where the chunks say, every byte covered once.
async fn structured_read(
    c: &mut (impl AsyncReadExt + Unpin),
    cookie: u64,
    offset: u64,
    len: usize,
) -> Vec<u8> {
    let mut out = vec![0xeeu8; len];
    let mut covered = 0usize;
    loop {
        let (flags, kind, got, p) = chunk(c, false).await;
        assert_eq!(got, cookie);
        let at = (u64::from_be_bytes(p[0..8].try_into().unwrap()) - offset) as usize;
        match kind {
            proto::REPLY_TYPE_OFFSET_HOLE => {
                let n = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                out[at..at + n].fill(0);
                covered += n;
            }
            proto::REPLY_TYPE_OFFSET_DATA => {
                out[at..at + p.len() - 8].copy_from_slice(&p[8..]);
                covered += p.len() - 8;
            }
            k => panic!("chunk type {k}"),
        }
        if flags & proto::REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(covered, len);
    out
}

/// Reads are sent from the chunks in place on host memory and through a buffer where
/// the device cannot lend its memory (GPU); both must send the same bytes, also when
/// a reply needs more pieces than one writev takes (4 KiB chunks, every other one a
/// hole: 4096 pieces in 16 MiB).
#[tokio::test]
async fn reads_lent_in_place_and_copied_agree_across_thousands_of_pieces() {
    let mut o = SparseOptions::new(SIZE);
    o.buffer_limit = 256 << 20;
    o.chunk_size = 4096;
    let dev: Arc<dyn BlockDevice> = Arc::new(SparseDevice::new(HostBackend::new(), o).unwrap());
    let len = 16usize << 20;
    for i in (0..len / 4096).step_by(2) {
        let block: Vec<u8> = (0..4096).map(|j| (i * 7 + j / 16) as u8 | 1).collect();
        dev.write((i * 4096) as u64, &block, false).await.unwrap();
    }
    let mut want = vec![0u8; len];
    dev.read(0, &mut want).await.unwrap();
    assert!(
        dev.view(0, len as u64).is_some(),
        "host memory lends itself"
    );
    let copied: Arc<dyn BlockDevice> = Arc::new(slow_writes(dev.clone()));
    assert!(copied.view(0, len as u64).is_none());
    for device in [dev, copied] {
        let export = || Export {
            name: String::new(),
            description: String::new(),
            device: device.clone(),
            metrics: None,
        };
        // Simple reply: the whole range as one payload.
        let (mut c, _task) = start_on(export(), Framing::Simple);
        c.write_all(&request(false, proto::CMD_READ, 0, 1, 0, len as u64))
            .await
            .unwrap();
        assert_eq!(simple_reply(&mut c).await, (0, 1));
        let mut got = vec![0u8; len];
        c.read_exact(&mut got).await.unwrap();
        assert!(got == want, "simple read differs");
        // Structured: holes as hole chunks (thousands of chunks), then with DF as one
        // data chunk.
        let (mut c, _task) = start_on(export(), Framing::Structured);
        c.write_all(&request(false, proto::CMD_READ, 0, 2, 0, len as u64))
            .await
            .unwrap();
        assert!(
            structured_read(&mut c, 2, 0, len).await == want,
            "sparse read differs"
        );
        let df = proto::CMD_FLAG_DF;
        c.write_all(&request(
            false,
            proto::CMD_READ,
            df,
            3,
            4096,
            len as u64 - 8192,
        ))
        .await
        .unwrap();
        let got = structured_read(&mut c, 3, 4096, len - 8192).await;
        assert!(got == want[4096..len - 4096], "DF read differs");
    }
}

/// Reads and writes above the maximum payload (32 MiB) are streamed in pieces and land
/// whole, with simple and structured replies, in place and through buffers. On the device
/// whose writes wait (so their replies come late), a small write pipelined before a
/// streamed simple read must answer before the read's header, not inside its data.
#[tokio::test]
async fn requests_above_the_maximum_payload_are_streamed() {
    let (offset, len) = (12_345u64, 48_000_000usize);
    let data = pattern(3, len);
    for slow in [false, true] {
        for framing in [Framing::Simple, Framing::Structured] {
            let mut dev: Arc<dyn BlockDevice> = export(false).device;
            if slow {
                dev = Arc::new(slow_writes(dev));
            }
            let export = Export {
                name: String::new(),
                description: String::new(),
                device: dev,
                metrics: None,
            };
            let what = format!("{framing:?}, slow writes: {slow}");
            let (mut c, task) = start_on(export, framing);
            let mut out = request(false, proto::CMD_WRITE, 0, 1, offset, len as u64);
            out.extend_from_slice(&data);
            // With structured replies the small write's may come between the read's
            // chunks, as the spec allows: it goes with simple replies only.
            let small = framing == Framing::Simple;
            if small {
                out.extend(request(false, proto::CMD_WRITE, 0, 2, 0, 512));
                out.extend_from_slice(&[7; 512]);
            }
            out.extend(request(false, proto::CMD_READ, 0, 3, offset, len as u64));
            let (mut crd, mut cwr) = c.split();
            let (sent, got) = tokio::join!(cwr.write_all(&out), async {
                // Structured connections answer writes with simple replies too.
                let mut replies = vec![simple_reply(&mut crd).await];
                if small {
                    replies.push(simple_reply(&mut crd).await);
                }
                replies.sort();
                assert_eq!(replies[0], (0, 1), "{what}: the streamed write's reply");
                assert!(replies[1..] == [(0, 2)][..small as usize], "{what}");
                match framing {
                    Framing::Simple => {
                        assert_eq!(simple_reply(&mut crd).await, (0, 3), "{what}");
                        let mut back = vec![0u8; len];
                        crd.read_exact(&mut back).await.unwrap();
                        back
                    }
                    _ => structured_read(&mut crd, 3, offset, len).await,
                }
            });
            sent.unwrap();
            assert!(got == data, "{what}: the streamed read differs");
            drop(c);
            task.await.unwrap();
        }
    }
}

#[tokio::test]
async fn extended_headers_and_block_status() {
    let (mut c, _task) = start(Framing::Extended, false);
    // qemu 10 writes without NBD_CMD_FLAG_PAYLOAD_LEN; libnbd sets it. Both carry data.
    let mut w = request(true, proto::CMD_WRITE, 0, 1, 2 << 20, 512);
    w.extend(vec![7u8; 512]);
    w.extend(request(
        true,
        proto::CMD_WRITE,
        proto::CMD_FLAG_PAYLOAD_LEN,
        2,
        (2 << 20) + 512,
        512,
    ));
    w.extend(vec![8u8; 512]);
    c.write_all(&w).await.unwrap();
    for want in [1, 2] {
        let (flags, kind, cookie, p) = chunk(&mut c, true).await;
        assert_eq!(
            (flags, kind, cookie),
            (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, want)
        );
        assert!(p.is_empty());
    }
    c.write_all(&request(true, proto::CMD_BLOCK_STATUS, 0, 3, 0, SIZE))
        .await
        .unwrap();
    let (flags, kind, _, p) = chunk(&mut c, true).await;
    assert_eq!(
        (flags, kind),
        (proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_BLOCK_STATUS_EXT)
    );
    assert_eq!(
        u32::from_be_bytes(p[0..4].try_into().unwrap()),
        ALLOCATION_CONTEXT_ID
    );
    let count = u32::from_be_bytes(p[4..8].try_into().unwrap()) as usize;
    assert_eq!(p.len(), 8 + 16 * count);
    let d: Vec<(u64, u64)> = p[8..]
        .chunks(16)
        .map(|e| {
            (
                u64::from_be_bytes(e[0..8].try_into().unwrap()),
                u64::from_be_bytes(e[8..16].try_into().unwrap()),
            )
        })
        .collect();
    let hz = (proto::STATE_HOLE | proto::STATE_ZERO) as u64;
    assert_eq!(d, vec![(2 << 20, hz), (1 << 20, 0), (SIZE - (3 << 20), hz)]);
    // REQ_ONE: a single descriptor no longer than asked.
    c.write_all(&request(
        true,
        proto::CMD_BLOCK_STATUS,
        proto::CMD_FLAG_REQ_ONE,
        4,
        4096,
        8192,
    ))
    .await
    .unwrap();
    let (_, _, _, p) = chunk(&mut c, true).await;
    assert_eq!(p.len(), 8 + 16);
    assert_eq!(u64::from_be_bytes(p[8..16].try_into().unwrap()), 8192);
    // A payload on a command that takes none is skipped, then refused.
    let mut w = request(
        true,
        proto::CMD_FLUSH,
        proto::CMD_FLAG_PAYLOAD_LEN,
        5,
        0,
        100,
    );
    w.extend(vec![0u8; 100]);
    w.extend(request(true, proto::CMD_FLUSH, 0, 6, 0, 0));
    c.write_all(&w).await.unwrap();
    let (_, kind, cookie, _) = chunk(&mut c, true).await;
    assert_eq!((kind, cookie), (proto::REPLY_TYPE_ERROR, 5));
    let (_, kind, cookie, _) = chunk(&mut c, true).await;
    assert_eq!((kind, cookie), (proto::REPLY_TYPE_NONE, 6));
}

#[tokio::test]
async fn garbage_closes_the_connection() {
    let (mut c, task) = start(Framing::Simple, false);
    c.write_all(&[0xde; 28]).await.unwrap();
    let s = task.await.unwrap();
    assert!(s.ended.is_violation(), "{}", s.ended);
    let mut b = [0u8; 1];
    assert_eq!(c.read(&mut b).await.unwrap(), 0, "socket closed");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_held_back_not_buffered() {
    // With a 1 MiB budget the server runs at most 16 reads of 64 KiB ahead of the replies
    // its client has taken (and those the socket holds), instead of queueing a reply for
    // every request. Counted on the device, where each read begins: host memory is sent in
    // place, so no buffer pool shows it.
    let (c, server) = UnixStream::pair().unwrap();
    let lag = Arc::new(ReadLag::default());
    let export = Export {
        device: Arc::new(Wrapped {
            inner: export(false).device,
            slow_writes: false,
            lag: Some(lag.clone()),
            elsewhere: false,
        }),
        ..export(false)
    };
    let neg = simple_terms(&export);
    let task = spawn_run(server, export, neg, 1 << 20);
    let (mut crd, mut cwr) = c.into_split();
    let sender = tokio::spawn(async move {
        for i in 0..4096u64 {
            if cwr
                .write_all(&request(false, proto::CMD_READ, 0, i, 0, 64 << 10))
                .await
                .is_err()
            {
                break;
            }
        }
        cwr
    });
    // The client reads nothing until the server has used its budget.
    let begun = || lag.begun.load(std::sync::atomic::Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while begun() < 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} reads began",
            begun()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Reading the replies lets everything complete.
    let mut hdr = [0u8; 16];
    let mut data = vec![0u8; 64 << 10];
    for _ in 0..4096 {
        crd.read_exact(&mut hdr).await.unwrap();
        crd.read_exact(&mut data).await.unwrap();
        lag.taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    let cwr = sender.await.unwrap();
    drop(cwr);
    drop(crd);
    let _ = task.await;
    // 16 in the budget, a few more in the socket's buffers.
    let worst = lag.worst.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (8..=24).contains(&worst),
        "the server ran {worst} reads ahead of a client that stopped reading"
    );
}

#[tokio::test]
async fn a_client_that_vanishes_costs_nothing() {
    let (c, server) = UnixStream::pair().unwrap();
    let export = export(false);
    let pool = export.device.buffers().clone();
    let neg = Negotiated {
        export: 0,
        framing: Framing::Structured,
        allocation_context: None,
        flags: transmission_flags(&export.device.capabilities(), Framing::Structured),
    };
    let task = spawn_run(server, export, neg, 64 << 20);
    let mut c = c;
    let mut w = Vec::new();
    // Within the budget, so that the server reads it all without the client reading
    // a reply (a client that never reads would block its own writes otherwise).
    for i in 0..40u64 {
        w.extend(request(false, proto::CMD_WRITE, 0, i, i * 4096, 4096));
        w.extend(vec![1u8; 4096]);
        w.extend(request(false, proto::CMD_READ, 0, i, 0, 1 << 20));
    }
    c.write_all(&w).await.unwrap();
    drop(c);
    let s = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("connection ends promptly")
        .unwrap();
    assert!(!s.ended.is_violation(), "{}", s.ended);
    // Every buffer is back: the whole budget can be taken at once.
    assert!(pool.try_get(pool.limit()).unwrap().is_some());
}

#[tokio::test]
async fn pipelined_writes_of_mixed_sizes_land_intact() {
    let (c, task) = start(Framing::Structured, false);
    let (mut crd, mut cwr) = c.into_split();
    let sizes = [1usize, 511, 4096, 33_000, 70_000, 1 << 20, 7, 200_000];
    let mut layout = Vec::new();
    let mut at = 0u64;
    for round in 0..3 {
        for (k, &len) in sizes.iter().enumerate() {
            layout.push((at, len, (round * 16 + k) as u8 + 1));
            at += len as u64 + 13;
        }
    }
    let expected = layout.clone();
    let sender = tokio::spawn(async move {
        for (i, &(off, len, fill)) in expected.iter().enumerate() {
            let mut w = request(false, proto::CMD_WRITE, 0, i as u64, off, len as u64);
            w.extend(std::iter::repeat_n(fill, len));
            cwr.write_all(&w).await.unwrap();
        }
        for (i, &(off, len, _)) in expected.iter().enumerate() {
            let r = request(
                false,
                proto::CMD_READ,
                proto::CMD_FLAG_DF,
                1000 + i as u64,
                off,
                len as u64,
            );
            cwr.write_all(&r).await.unwrap();
        }
        cwr
    });
    for _ in 0..layout.len() {
        let mut h = [0u8; 16];
        crd.read_exact(&mut h).await.unwrap();
        assert_eq!(&h[4..8], &[0, 0, 0, 0], "write succeeded");
    }
    for _ in 0..layout.len() {
        let mut h = [0u8; 20];
        crd.read_exact(&mut h).await.unwrap();
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut p = vec![0u8; len];
        crd.read_exact(&mut p).await.unwrap();
        let (off, want_len, fill) = layout[(cookie - 1000) as usize];
        assert_eq!(u64::from_be_bytes(p[0..8].try_into().unwrap()), off);
        assert_eq!(p.len() - 8, want_len);
        assert!(p[8..].iter().all(|&b| b == fill), "data at {off}");
    }
    drop(sender.await.unwrap());
    drop(crd);
    assert!(matches!(task.await.unwrap().ended, Ended::Eof));
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

/// A connection cut at any byte of a batch of pipelined writes (inside a header, inside
/// a payload held in the read buffer, inside one read straight into the I/O buffer, on
/// the boundaries): once the server has finished the connection, a write it did not
/// receive whole has changed nothing, and one sent whole has landed whole or not at all.
#[tokio::test]
async fn a_write_cut_anywhere_never_lands_in_part() {
    let dev = export(false).device;
    let sizes = [
        1usize,
        511,
        4096,
        20_000,
        33_000,
        131_000,
        150_000,
        200_000,
        1 << 20,
    ];
    let mut rng = crate::test_support::seeded_rng(0x5eed);
    let mut next = move |n: usize| rng.random_range(0..n);
    let (mut whole, mut landed, mut cut_short) = (0, 0, 0);
    for round in 0..240u64 {
        let ext = round % 2 == 1;
        let framing = if ext {
            Framing::Extended
        } else {
            Framing::Simple
        };
        // Up to 6 writes at increasing offsets, each over old data of its own.
        let mut writes = Vec::new();
        let mut at = next(1 << 20) as u64;
        let mut batch = Vec::new();
        for k in 0..1 + next(6) {
            let len = if next(8) == 0 {
                sizes[8]
            } else {
                sizes[next(8)]
            };
            let seed = (round << 8 | k as u64) << 1;
            let old = pattern(seed, len);
            dev.write(at, &old, false).await.unwrap();
            batch.extend(request(ext, proto::CMD_WRITE, 0, k as u64, at, len as u64));
            batch.extend(pattern(seed | 1, len));
            writes.push((at, len, seed, batch.len()));
            at += len as u64 + next(5000) as u64;
        }
        // Half the cuts anywhere, half on or next to the end of a header or payload.
        let cut = if next(2) == 0 {
            1 + next(batch.len())
        } else {
            let hlen = proto::request_len(ext);
            let (_, _, _, end) = writes[next(writes.len())];
            let at = if next(2) == 0 { end } else { end - hlen };
            (at + next(3)).saturating_sub(1).clamp(1, batch.len())
        };
        let export = Export {
            name: String::new(),
            description: String::new(),
            device: dev.clone(),
            metrics: None,
        };
        let (mut c, task) = start_on(export, framing);
        // Sent in uneven pieces, so the server's reads end at varied places.
        let mut sent = 0;
        while sent < cut {
            let n = (1 + next(96 << 10)).min(cut - sent);
            if c.write_all(&batch[sent..sent + n]).await.is_err() {
                break;
            }
            sent += n;
            tokio::task::yield_now().await;
        }
        drop(c);
        let s = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the connection ends")
            .unwrap();
        assert!(
            !matches!(s.ended, Ended::Shutdown),
            "round {round}: {}",
            s.ended
        );
        for (k, &(off, len, seed, end)) in writes.iter().enumerate() {
            let mut got = vec![0u8; len];
            dev.read(off, &mut got).await.unwrap();
            let old = pattern(seed, len);
            if end <= cut {
                whole += 1;
                if got != old {
                    assert!(
                        got == pattern(seed | 1, len),
                        "round {round}: write {k} ({len} bytes, sent whole) landed in part"
                    );
                    landed += 1;
                }
            } else {
                cut_short += 1;
                let changed = got.iter().zip(&old).filter(|(a, b)| a != b).count();
                assert_eq!(
                    changed,
                    0,
                    "round {round}: write {k} of {len} bytes, cut {} bytes before its end, \
                     changed {changed} bytes",
                    end - cut
                );
            }
        }
    }
    // Both kinds were tested, and writes sent whole did land.
    assert!(
        cut_short > 100 && whole > 100 && landed > 50,
        "{cut_short} {whole} {landed}"
    );
}

/// A device that forwards to another but for what a test changes: with `slow_writes`,
/// writes wait before they land, as GPU copies do, and no memory is lent in place, as GPU
/// memory cannot be; with `lag`, reads begun are counted against the replies taken.
struct Wrapped {
    inner: Arc<dyn BlockDevice>,
    slow_writes: bool,
    lag: Option<Arc<ReadLag>>,
    /// Reads, writes and flushes complete on another thread some µs later, as the GPU's
    /// completion thread wakes them.
    elsewhere: bool,
}

/// A device whose writes wait before they land and that lends no memory, as a GPU's.
fn slow_writes(inner: Arc<dyn BlockDevice>) -> Wrapped {
    Wrapped {
        inner,
        slow_writes: true,
        lag: None,
        elsewhere: false,
    }
}

/// How far a server runs ahead of its client: reads begun (on the device) against replies
/// the client has taken, and the most the first ever led the second by.
#[derive(Default)]
struct ReadLag {
    begun: std::sync::atomic::AtomicU64,
    taken: std::sync::atomic::AtomicU64,
    worst: std::sync::atomic::AtomicU64,
}

impl ReadLag {
    fn begin(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        let begun = self.begun.fetch_add(1, SeqCst) + 1;
        let ahead = begun.saturating_sub(self.taken.load(SeqCst));
        self.worst.fetch_max(ahead, SeqCst);
    }
}

#[async_trait::async_trait]
impl BlockDevice for Wrapped {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn buffers(&self) -> &crate::engine::BufferPool {
        self.inner.buffers()
    }
    fn stats(&self) -> crate::engine::DeviceStats {
        self.inner.stats()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> crate::engine::IoResult<()> {
        if let Some(lag) = &self.lag {
            lag.begin();
        }
        if self.elsewhere {
            completed_elsewhere(20).await;
        }
        self.inner.read(offset, buf).await
    }
    fn view(&self, offset: u64, len: u64) -> Option<crate::engine::IoResult<crate::engine::View>> {
        if self.slow_writes || self.elsewhere {
            return None;
        }
        let view = self.inner.view(offset, len);
        if let (Some(lag), Some(_)) = (&self.lag, &view) {
            lag.begin();
        }
        view
    }
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> crate::engine::IoResult<()> {
        if self.slow_writes {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        if self.elsewhere {
            completed_elsewhere(20).await;
        }
        self.inner.write(offset, data, fua).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> crate::engine::IoResult<()> {
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn trim(&self, offset: u64, len: u64) -> crate::engine::IoResult<()> {
        self.inner.trim(offset, len).await
    }
    async fn flush(&self) -> crate::engine::IoResult<()> {
        if self.elsewhere {
            completed_elsewhere(20).await;
        }
        self.inner.flush().await
    }
    async fn cache(&self, offset: u64, len: u64) -> crate::engine::IoResult<()> {
        self.inner.cache(offset, len).await
    }
    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> crate::engine::IoResult<()> {
        self.inner.extents(offset, len, out)
    }
}

/// However a connection ends (here: dropped for a protocol violation while a write
/// still waits for its device), the transmission phase returns only once every write
/// it started has landed: when the server says a connection is closed, nothing of it can
/// overwrite what the client writes next on a new one.
#[tokio::test]
async fn a_dropped_connection_ends_after_its_writes_land() {
    let inner = export(false).device;
    let export = Export {
        name: String::new(),
        description: String::new(),
        device: Arc::new(slow_writes(inner.clone())),
        metrics: None,
    };
    for garbage in [true, false] {
        let (mut c, task) = start_on(
            Export {
                name: String::new(),
                description: String::new(),
                device: export.device.clone(),
                metrics: None,
            },
            Framing::Simple,
        );
        let fill = if garbage { 0x11 } else { 0x22 };
        let mut w = request(false, proto::CMD_WRITE, 0, 1, 8192, 4096);
        w.extend(vec![fill; 4096]);
        if garbage {
            w.extend(vec![0xffu8; 28]);
        }
        c.write_all(&w).await.unwrap();
        let t0 = std::time::Instant::now();
        drop(c);
        let s = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the connection ends")
            .unwrap();
        assert_eq!(s.ended.is_violation(), garbage, "{}", s.ended);
        let mut got = vec![0u8; 4096];
        inner.read(8192, &mut got).await.unwrap();
        assert!(
            got.iter().all(|&b| b == fill),
            "the connection ended ({}) {:?} after the client left, before its write landed",
            s.ended,
            t0.elapsed()
        );
    }
}

/// A connection alone on a server connection thread polls: at queue depth 1 its polls find
/// the client's next requests (or turn themselves off when the machine has no CPU to spare),
/// and every write reads back intact.
#[tokio::test]
async fn polling_connection_serves_in_process() {
    let (client, server) = std::os::unix::net::UnixStream::pair().unwrap();
    let export = export(false);
    let neg = simple_terms(&export);
    let limits = ConnectionLimits {
        inflight_bytes: 64 << 20,
        busy_poll: Duration::from_micros(500),
        max_request: MAX_REQUEST,
    };
    let thread = serve_on_own_thread(server, export, neg, limits);
    client.set_nonblocking(true).unwrap();
    let mut c = UnixStream::from_std(client).unwrap();
    const N: u64 = 300;
    for i in 0..N {
        let data = pattern(i, 4096);
        let mut r = request(false, proto::CMD_WRITE, 0, i, i * 4096, 4096);
        r.extend_from_slice(&data);
        c.write_all(&r).await.unwrap();
        assert_eq!(simple_reply(&mut c).await, (0, i));
        c.write_all(&request(false, proto::CMD_READ, 0, N + i, i * 4096, 4096))
            .await
            .unwrap();
        assert_eq!(simple_reply(&mut c).await, (0, N + i));
        let mut back = vec![0u8; 4096];
        c.read_exact(&mut back).await.unwrap();
        assert!(back == data, "block {i} read back wrong");
    }
    c.write_all(&request(false, proto::CMD_DISC, 0, 0, 0, 0))
        .await
        .unwrap();
    let summary = thread.join().unwrap();
    assert_eq!(summary.requests, 2 * N + 1);
    let p = summary.polls;
    assert!(
        p.polls > 0,
        "a connection alone on its thread never polled: {p:?}"
    );
    assert_eq!(
        p.polls,
        p.first_try + p.caught + p.empty + p.no_spare,
        "every poll has one outcome: {p:?}"
    );
    assert!(
        p.first_try + p.caught > 0 || p.no_spare > 0,
        "polls neither found a request nor stood down for want of CPU: {p:?}"
    );
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

/// Requests whose device operations complete on other threads (the GPU's way), pipelined
/// with sizes from 4 KiB to 256 KiB and a budget that runs out: every request gets its reply
/// and every block reads back as written, on a connection that polls (alone on a server
/// thread, its operations waiting in the reader) and on one that does not.
#[tokio::test]
async fn operations_completed_elsewhere_answer_every_request() {
    const N: u64 = 240;
    let len = |i: u64| 4096usize << (i % 7);
    let at = |i: u64| i * (256 << 10);
    for polling in [true, false] {
        let export = Export {
            name: String::new(),
            description: String::new(),
            device: Arc::new(Wrapped {
                inner: export(false).device,
                slow_writes: false,
                lag: None,
                elsewhere: true,
            }),
            metrics: None,
        };
        let neg = simple_terms(&export);
        let (client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        client.set_nonblocking(true).unwrap();
        let limits = ConnectionLimits {
            inflight_bytes: 2 << 20,
            busy_poll: Duration::from_micros(if polling { 500 } else { 0 }),
            max_request: MAX_REQUEST,
        };
        let server = serve_on_own_thread(server, export, neg, limits);
        let (mut rd, mut wr) = UnixStream::from_std(client).unwrap().into_split();
        // Writes (and a flush now and then), all sent at once; then, once all are answered
        // (NBD orders nothing), reads of every block.
        for phase in ["write", "read"] {
            let sender = tokio::spawn(async move {
                let mut sent = 0u64;
                for i in 0..N {
                    let r = if phase == "write" {
                        let mut r = request(false, proto::CMD_WRITE, 0, i, at(i), len(i) as u64);
                        r.extend_from_slice(&pattern(i, len(i)));
                        r
                    } else {
                        request(false, proto::CMD_READ, 0, N + i, at(i), len(i) as u64)
                    };
                    wr.write_all(&r).await.unwrap();
                    sent += 1;
                    if i % 17 == 0 {
                        let r = request(false, proto::CMD_FLUSH, 0, 10_000 + i, 0, 0);
                        wr.write_all(&r).await.unwrap();
                        sent += 1;
                    }
                }
                (wr, sent)
            });
            let mut answered = std::collections::HashSet::new();
            // Reply headers until every request of the phase is answered; the count is known
            // once the sender is done, and it never sends more than this.
            let most = N + N.div_ceil(17);
            while (answered.len() as u64) < most {
                let (err, cookie) = simple_reply_half(&mut rd).await;
                assert_eq!(err, 0, "{phase} request {cookie} failed");
                if (N..2 * N).contains(&cookie) {
                    let k = cookie - N;
                    let mut back = vec![0u8; len(k)];
                    rd.read_exact(&mut back).await.unwrap();
                    assert!(back == pattern(k, len(k)), "block {k} read back wrong");
                }
                assert!(answered.insert(cookie), "two replies for request {cookie}");
            }
            let (w, sent) = sender.await.unwrap();
            assert_eq!(sent, most);
            wr = w;
        }
        wr.write_all(&request(false, proto::CMD_DISC, 0, 0, 0, 0))
            .await
            .unwrap();
        let summary = server.join().unwrap();
        assert!(
            matches!(summary.ended, Ended::Disconnect),
            "{}",
            summary.ended
        );
        assert_eq!(summary.requests, 2 * (N + N.div_ceil(17)) + 1);
        if polling {
            assert!(
                summary.polls.with_ops > 0,
                "the reader never watched its operations: {:?}",
                summary.polls
            );
        } else {
            assert_eq!(summary.polls, PollStats::default(), "polling is off");
        }
    }
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
