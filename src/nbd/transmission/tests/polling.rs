//! Busy polling in process, and operations that complete on other threads (the GPU's way).

use super::devices::Wrapped;
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
