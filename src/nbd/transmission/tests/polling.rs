//! Busy polling in process, operations that complete on other threads (the GPU's way), and
//! requests held under a plug until the reader unplugs.

use super::devices::{Holder, Wrapped};
use super::*;

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
        let watched = Arc::new([0, 0].map(std::sync::atomic::AtomicU64::new));
        let device = Wrapped {
            inner: export(false).device,
            slow_writes: false,
            lag: None,
            elsewhere: true,
            holder: None,
            watched: Some(watched.clone()),
        };
        let (mut rd, mut wr, server) = connect_wrapped(device, 2 << 20, polling);
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
            // Reply headers until every request of the phase is answered; the count is known
            // once the sender is done, and it never sends more than this.
            let most = N + N.div_ceil(17);
            take_replies(&mut rd, most, N, len, phase).await;
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
            // Nor may its operations spin for it by re-polling themselves.
            let [begun, watched] = watched
                .each_ref()
                .map(|c| c.load(std::sync::atomic::Ordering::SeqCst));
            assert_eq!(begun, 2 * N, "every read and write reached the device");
            assert_eq!(watched, begun, "operations not watched with polling off");
        }
    }
}

/// Requests read from one buffer full of them are started under a plug: a device holding
/// such requests until the reader unplugs (as the GPU copy queue does) gets them released
/// together, and every one of them before the reader waits, whatever it waits for (the
/// client, its budget, a payload). A reader that waited without unplugging would hang here.
#[tokio::test]
async fn plugged_requests_go_out_together_before_the_reader_waits() {
    const N: u64 = 64;
    let len = |i: u64| 4096usize << (i % 5);
    let at = |i: u64| i * (64 << 10);
    for polling in [true, false] {
        let holder = Arc::new(Holder::default());
        let device = Wrapped {
            inner: export(false).device,
            slow_writes: false,
            lag: None,
            elsewhere: false,
            holder: Some(holder.clone()),
            watched: None,
        };
        // A budget below the writes' payloads together: the reader waits for it.
        let (mut rd, mut wr, server) = connect_wrapped(device, 1 << 20, polling);
        let session = async {
            for phase in ["write", "read"] {
                // One write of every request: the reader finds many in its buffer at once.
                let mut all = Vec::new();
                for i in 0..N {
                    if phase == "write" {
                        all.extend(request(false, proto::CMD_WRITE, 0, i, at(i), len(i) as u64));
                        all.extend_from_slice(&pattern(i, len(i)));
                    } else {
                        all.extend(request(
                            false,
                            proto::CMD_READ,
                            0,
                            N + i,
                            at(i),
                            len(i) as u64,
                        ));
                    }
                }
                all.extend(request(false, proto::CMD_FLUSH, 0, 3 * N, 0, 0));
                let sender = tokio::spawn(async move {
                    wr.write_all(&all).await.unwrap();
                    wr
                });
                take_replies(&mut rd, N + 1, N, len, phase).await;
                wr = sender.await.unwrap();
            }
            wr.write_all(&request(false, proto::CMD_DISC, 0, 0, 0, 0))
                .await
                .unwrap();
        };
        tokio::time::timeout(Duration::from_secs(60), session)
            .await
            .expect("a request held under a plug was never let go");
        let summary = server.join().unwrap();
        assert!(
            matches!(summary.ended, Ended::Disconnect),
            "{}",
            summary.ended
        );
        use std::sync::atomic::Ordering::SeqCst;
        let (bursts, most) = (holder.bursts.load(SeqCst), holder.most.load(SeqCst));
        assert!(
            most > 1,
            "requests in the read buffer were never held together (bursts {bursts}, most {most})"
        );
    }
}

/// A client's halves of a connection to `device`, served alone on a thread of its own with
/// an in-flight budget of `inflight` bytes, polling or not.
fn connect_wrapped(
    device: Wrapped,
    inflight: usize,
    polling: bool,
) -> (
    tokio::net::unix::OwnedReadHalf,
    tokio::net::unix::OwnedWriteHalf,
    std::thread::JoinHandle<Summary>,
) {
    let export = Export {
        name: String::new(),
        description: String::new(),
        device: Arc::new(device),
        metrics: None,
    };
    let neg = simple_terms(&export);
    let (client, server) = std::os::unix::net::UnixStream::pair().unwrap();
    client.set_nonblocking(true).unwrap();
    let limits = ConnectionLimits {
        inflight_bytes: inflight,
        busy_poll: Duration::from_micros(if polling { 500 } else { 0 }),
        max_request: MAX_REQUEST,
    };
    let server = serve_on_own_thread(server, export, neg, limits);
    let (rd, wr) = UnixStream::from_std(client).unwrap().into_split();
    (rd, wr, server)
}

/// Takes `count` successful simple replies, one per cookie; a read of block `k` has cookie
/// `n + k` and must bring back `pattern(k, len(k))`.
async fn take_replies(
    rd: &mut tokio::net::unix::OwnedReadHalf,
    count: u64,
    n: u64,
    len: impl Fn(u64) -> usize,
    phase: &str,
) {
    let mut answered = std::collections::HashSet::new();
    while (answered.len() as u64) < count {
        let (err, cookie) = simple_reply_half(rd).await;
        assert_eq!(err, 0, "{phase} request {cookie} failed");
        if (n..2 * n).contains(&cookie) {
            let k = cookie - n;
            let mut back = vec![0u8; len(k)];
            rd.read_exact(&mut back).await.unwrap();
            assert!(back == pattern(k, len(k)), "block {k} read back wrong");
        }
        assert!(answered.insert(cookie), "two replies for request {cookie}");
    }
}
