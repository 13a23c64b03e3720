//! What each kind of request gets back: pipelined replies, errors, read-only, structured and extended replies, lent and copied reads, streamed large requests.

use super::devices::slow_writes;
use super::*;

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
