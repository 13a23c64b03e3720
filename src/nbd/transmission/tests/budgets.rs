//! Backpressure and endings: a client that stops reading, vanishes, cuts a write anywhere, or is dropped while its writes wait.

use super::devices::{ReadLag, Wrapped, slow_writes};
use super::*;

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
            holder: None,
            watched: None,
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
