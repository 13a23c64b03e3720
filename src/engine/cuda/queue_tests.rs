//! The copy queue over a fake GPU: combining, batching, reaping, errors and cancellation,
//! with no GPU. The fake's "device memory" is host memory (a device address is a host
//! pointer), and its streams run their work only when asked to (`query` while the GPU is
//! let run), so that the tests decide what is in flight.

use super::*;
use cudarc::driver::sys::CUresult;
use std::sync::Condvar;
use std::sync::mpsc;

/// Work put on a fake stream, run when an event after it is queried.
enum Work {
    Copy { src: u64, dst: u64, len: usize },
    Zero { dst: u64, len: usize },
}

#[derive(Default)]
struct FakeState {
    /// Per stream: work not yet run, each with its place in the stream.
    queued: Vec<VecDeque<(u64, Work)>>,
    /// Per stream: items put on it so far.
    put: Vec<u64>,
    /// Per event: the stream and place it was recorded at.
    events: Vec<Option<(usize, u64)>>,
    /// Size of each batch launched or copied as one.
    batches: Vec<usize>,
    /// Single copies and memsets issued.
    singles: usize,
    /// Errors the next copies return, one each.
    fail: VecDeque<CuError>,
    /// While set, a single copy waits in the driver until it is cleared.
    hold: bool,
    /// Copies waiting in `hold` now.
    held: usize,
}

/// A GPU that runs work only while `running` is set.
struct Fake {
    batching: BatchMode,
    state: Mutex<FakeState>,
    changed: Condvar,
    running: AtomicBool,
    queries: AtomicU64,
}

impl Fake {
    fn new(batching: BatchMode) -> Fake {
        Fake {
            batching,
            state: Mutex::default(),
            changed: Condvar::new(),
            running: AtomicBool::new(true),
            queries: AtomicU64::new(0),
        }
    }

    fn put(&self, stream: usize, work: Work) {
        let mut st = self.state.lock().unwrap();
        let at = st.put[stream];
        st.put[stream] += 1;
        st.queued[stream].push_back((at, work));
    }
}

impl QueueDriver for Arc<Fake> {
    type Stream = usize;
    type Event = usize;

    fn bind(&self) -> Result<(), CuError> {
        Ok(())
    }

    fn index(&self) -> usize {
        0
    }

    fn name(&self) -> &str {
        "fake"
    }

    fn batching(&self) -> BatchMode {
        self.batching
    }

    fn create_stream(&self) -> Result<usize, CuError> {
        let mut st = self.state.lock().unwrap();
        st.queued.push(VecDeque::new());
        st.put.push(0);
        Ok(st.put.len() - 1)
    }

    fn destroy_stream(&self, _: usize) {}

    fn create_event(&self) -> Result<usize, CuError> {
        let mut st = self.state.lock().unwrap();
        st.events.push(None);
        Ok(st.events.len() - 1)
    }

    fn destroy_event(&self, _: usize) {}

    fn record(&self, event: usize, stream: usize) -> Result<(), CuError> {
        let mut st = self.state.lock().unwrap();
        let at = st.put[stream];
        st.events[event] = Some((stream, at));
        Ok(())
    }

    fn query(&self, event: usize) -> Result<bool, CuError> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        if !self.running.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let mut st = self.state.lock().unwrap();
        let (stream, upto) = st.events[event].expect("queried an event never recorded");
        while st.queued[stream].front().is_some_and(|w| w.0 < upto) {
            let (_, work) = st.queued[stream].pop_front().unwrap();
            // SAFETY: the queue keeps both ends valid until this event fires (the contract
            // under test); the tests' device addresses are host buffers they own.
            unsafe {
                match work {
                    Work::Copy { src, dst, len } => {
                        ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len)
                    }
                    Work::Zero { dst, len } => ptr::write_bytes(dst as *mut u8, 0, len),
                }
            }
        }
        Ok(true)
    }

    unsafe fn copy(
        &self,
        stream: usize,
        kind: OpKind,
        dev: CUdeviceptr,
        host: *mut u8,
        len: usize,
    ) -> Result<(), CuError> {
        let mut st = self.state.lock().unwrap();
        if st.hold {
            st.held += 1;
            self.changed.notify_all();
            st = self.changed.wait_while(st, |s| s.hold).unwrap();
            st.held -= 1;
        }
        if let Some(e) = st.fail.pop_front() {
            return Err(e);
        }
        st.singles += 1;
        drop(st);
        let host = host as u64;
        self.put(
            stream,
            match kind {
                OpKind::Write => Work::Copy {
                    src: host,
                    dst: dev,
                    len,
                },
                OpKind::Read => Work::Copy {
                    src: dev,
                    dst: host,
                    len,
                },
                OpKind::Zero => Work::Zero { dst: dev, len },
            },
        );
        Ok(())
    }

    unsafe fn launch(&self, stream: usize, batch: &Batch) -> Result<(), CuError> {
        assert_eq!(
            self.batching,
            BatchMode::Kernel,
            "launch without the kernel"
        );
        let n = batch.count as usize;
        self.state.lock().unwrap().batches.push(n);
        for d in &batch.descs[..n] {
            let (src, dst, len) = (d.src, d.dst, d.len as usize);
            self.put(stream, Work::Copy { src, dst, len });
        }
        Ok(())
    }

    unsafe fn copy_batch(
        &self,
        stream: usize,
        dsts: &mut [CUdeviceptr],
        srcs: &mut [CUdeviceptr],
        sizes: &mut [usize],
    ) -> Result<(), CuError> {
        assert_eq!(self.batching, BatchMode::MemcpyBatch);
        self.state.lock().unwrap().batches.push(sizes.len());
        for i in 0..sizes.len() {
            let (src, dst, len) = (srcs[i], dsts[i], sizes[i]);
            self.put(stream, Work::Copy { src, dst, len });
        }
        Ok(())
    }
}

fn queue(fake: &Arc<Fake>) -> CopyQueue<Arc<Fake>> {
    let opts = QueueOptions {
        spin: Duration::ZERO,
        ..QueueOptions::default()
    };
    CopyQueue::with_driver(fake.clone(), opts).unwrap()
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + seed * 13) as u8).collect()
}

/// An op moving `host` to or from `dev` (each at least `len` bytes, alive until it is done).
fn op(kind: OpKind, dev: &mut [u8], host: &mut [u8], mapped: bool) -> Op {
    let len = dev.len().min(host.len());
    // SAFETY: the tests keep both buffers alive until the op's future is gone.
    unsafe {
        Op::new(
            kind,
            dev.as_mut_ptr() as u64,
            host.as_mut_ptr(),
            len,
            mapped,
        )
    }
}

/// Polls `fut` once, with a waker that does nothing: the op is submitted.
fn poll_once<F: Future>(fut: Pin<&mut F>) -> Poll<F::Output> {
    let waker = futures::task::noop_waker();
    fut.poll(&mut Context::from_waker(&waker))
}

#[test]
fn ops_pushed_while_the_combiner_is_in_the_driver_go_out_as_one_batch() {
    let fake = Arc::new(Fake::new(BatchMode::Kernel));
    let q = queue(&fake);
    let n = 16;
    let mut devs: Vec<Vec<u8>> = (0..n + 1).map(|_| vec![0u8; 4096]).collect();
    let mut hosts: Vec<Vec<u8>> = (0..n + 1).map(|i| pattern(i, 4096)).collect();
    let (first_dev, devs_rest) = devs.split_first_mut().unwrap();
    let (first_host, hosts_rest) = hosts.split_first_mut().unwrap();
    fake.state.lock().unwrap().hold = true;
    std::thread::scope(|s| {
        // Not mapped: a single copy, which waits in the driver holding the combiner.
        let first = op(OpKind::Write, first_dev, first_host, false);
        let q = &q;
        let combiner = s.spawn(move || futures::executor::block_on(q.run(first)));
        let st = fake.state.lock().unwrap();
        drop(fake.changed.wait_while(st, |s| s.held == 0).unwrap());
        // Pushed while the combiner is busy: each poll finds the combiner taken.
        let mut waiting: Vec<_> = devs_rest
            .iter_mut()
            .zip(hosts_rest.iter_mut())
            .map(|(d, h)| Box::pin(q.run(op(OpKind::Write, d, h, true))))
            .collect();
        for w in &mut waiting {
            assert!(poll_once(w.as_mut()).is_pending());
        }
        assert_eq!(fake.state.lock().unwrap().batches, Vec::<usize>::new());
        fake.state.lock().unwrap().hold = false;
        fake.changed.notify_all();
        combiner.join().unwrap().unwrap();
        for w in waiting {
            futures::executor::block_on(w).unwrap();
        }
    });
    let st = fake.state.lock().unwrap();
    assert_eq!(st.batches, vec![n], "the waiting ops in one launch");
    assert_eq!(st.singles, 1);
    let stats = q.stats();
    assert_eq!(
        (stats.ops, stats.batches, stats.batched_ops),
        (n as u64 + 1, 1, n as u64)
    );
    assert_eq!(stats.rounds, 2, "the first op, then the waiting ones");
    for (d, h) in devs.iter().zip(&hosts) {
        assert!(d == h, "a copy did not land");
    }
}

#[test]
fn a_dropped_request_waits_for_the_gpu_before_its_memory_goes() {
    let fake = Arc::new(Fake::new(BatchMode::Off));
    let q = queue(&fake);
    let mut dev = pattern(3, 1 << 20);
    let mut host = vec![0u8; 1 << 20];
    fake.running.store(false, Ordering::SeqCst);
    let dropping = AtomicBool::new(false);
    let dropped = AtomicBool::new(false);
    std::thread::scope(|s| {
        let mut fut = Box::pin(q.run(op(OpKind::Read, &mut dev, &mut host, false)));
        assert!(poll_once(fut.as_mut()).is_pending());
        let (dropping, dropped) = (&dropping, &dropped);
        let dropper = s.spawn(move || {
            dropping.store(true, Ordering::SeqCst);
            drop(fut);
            dropped.store(true, Ordering::SeqCst);
        });
        while !dropping.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        // The completion thread keeps asking; the drop must still be waiting.
        let seen = fake.queries.load(Ordering::SeqCst);
        while fake.queries.load(Ordering::SeqCst) < seen + 2000 {
            std::hint::spin_loop();
        }
        let returned_early = dropped.load(Ordering::SeqCst);
        // Let the GPU run before asserting: the queue's completion thread waits for it.
        fake.running.store(true, Ordering::SeqCst);
        dropper.join().unwrap();
        assert!(
            !returned_early,
            "the drop returned with the copy still in flight"
        );
    });
    assert!(dropped.load(Ordering::SeqCst));
    assert!(
        host == dev,
        "the copy ran into the buffer before the drop returned"
    );
    // The queue goes on working.
    let mut back = vec![0u8; 4096];
    futures::executor::block_on(q.run(op(OpKind::Write, &mut back, &mut host, false))).unwrap();
    assert!(back[..] == dev[..4096]);
}

#[test]
fn a_sticky_error_fails_that_request_and_every_later_one() {
    let fake = Arc::new(Fake::new(BatchMode::Off));
    let q = queue(&fake);
    let fault = CuError {
        code: CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
        call: "cuMemcpyHtoDAsync",
    };
    let passing = CuError {
        code: CUresult::CUDA_ERROR_INVALID_VALUE,
        call: "cuMemcpyHtoDAsync",
    };
    let mut dev = vec![0u8; 4096];
    let mut host = pattern(1, 4096);
    let run = |dev: &mut [u8], host: &mut [u8]| {
        futures::executor::block_on(q.run(op(OpKind::Write, dev, host, false)))
    };
    // A passing error fails its request only.
    fake.state.lock().unwrap().fail.push_back(passing);
    assert_eq!(run(&mut dev, &mut host), Err(passing));
    assert_eq!(q.broken(), None);
    run(&mut dev, &mut host).unwrap();
    assert!(dev == host);
    fake.state.lock().unwrap().fail.push_back(fault);
    assert_eq!(run(&mut dev, &mut host), Err(fault));
    assert_eq!(q.broken(), Some(fault));
    let singles = fake.state.lock().unwrap().singles;
    for _ in 0..3 {
        assert_eq!(run(&mut dev, &mut host), Err(fault));
    }
    assert_eq!(
        fake.state.lock().unwrap().singles,
        singles,
        "a broken GPU got work"
    );
}

#[test]
fn many_threads_lose_no_op_and_every_byte_lands() {
    for batching in [BatchMode::Kernel, BatchMode::MemcpyBatch, BatchMode::Off] {
        let fake = Arc::new(Fake::new(batching));
        let q = queue(&fake);
        let threads = 4;
        let rounds = 500;
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::scope(|s| {
            for t in 0..threads {
                let (q, done_tx) = (&q, done_tx.clone());
                s.spawn(move || {
                    let mut dev = vec![0u8; 256 << 10];
                    for r in 0..rounds {
                        // Small mapped, small unmapped and large copies, and zeroing.
                        let len = [512, 4096, 64 << 10, 256 << 10][(r + t) % 4];
                        let mut host = pattern(t * rounds + r, len);
                        let d = &mut dev[..len];
                        let w = op(OpKind::Write, d, &mut host, r % 3 != 0);
                        futures::executor::block_on(q.run(w)).unwrap();
                        let mut back = vec![0u8; len];
                        let rd = op(OpKind::Read, d, &mut back, r % 2 == 0);
                        futures::executor::block_on(q.run(rd)).unwrap();
                        assert!(back == host, "thread {t} round {r}: data differs");
                        if r % 50 == 0 {
                            let z = op(OpKind::Zero, d, &mut back, false);
                            futures::executor::block_on(q.run(z)).unwrap();
                            assert!(d.iter().all(|&b| b == 0), "not zeroed");
                        }
                    }
                    done_tx.send(t).unwrap();
                });
            }
            // A lost op leaves its thread waiting for ever: fail instead of hanging.
            for _ in 0..threads {
                done_rx
                    .recv_timeout(Duration::from_secs(120))
                    .unwrap_or_else(|_| panic!("{batching:?}: a request never completed"));
            }
        });
        let zeros = threads * rounds.div_ceil(50);
        assert_eq!(
            q.stats().ops as usize,
            threads * rounds * 2 + zeros,
            "{batching:?}"
        );
    }
}

#[test]
fn plugged_requests_wait_for_the_unplug_and_go_out_as_one_launch() {
    let fake = Arc::new(Fake::new(BatchMode::Kernel));
    let q = queue(&fake);
    let n = 8;
    let mut devs: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; 4096]).collect();
    let mut hosts: Vec<Vec<u8>> = (0..n).map(|i| pattern(i, 4096)).collect();
    let mut futs: Vec<_> = devs
        .iter_mut()
        .zip(hosts.iter_mut())
        .map(|(d, h)| Box::pin(q.run(op(OpKind::Write, d, h, true))))
        .collect();
    let plug = crate::engine::Plug::new();
    for f in &mut futs {
        assert!(poll_once(f.as_mut()).is_pending());
    }
    {
        let st = fake.state.lock().unwrap();
        assert_eq!(
            (st.batches.len(), st.singles),
            (0, 0),
            "issued under the plug"
        );
    }
    drop(plug);
    assert_eq!(fake.state.lock().unwrap().batches, vec![n], "one launch");
    for f in futs {
        futures::executor::block_on(f).unwrap();
    }
    assert_eq!(q.stats().rounds, 1);
    for (d, h) in devs.iter().zip(&hosts) {
        assert!(d == h, "a copy did not land");
    }
}

#[test]
fn a_held_request_goes_out_when_polled_again_or_dropped_without_an_unplug() {
    let fake = Arc::new(Fake::new(BatchMode::Kernel));
    let q = queue(&fake);
    let mut dev = vec![0u8; 4096];
    let mut host = pattern(5, 4096);
    let mut fut = Box::pin(q.run(op(OpKind::Write, &mut dev, &mut host, true)));
    let plug = crate::engine::Plug::new();
    assert!(poll_once(fut.as_mut()).is_pending());
    plug.hold();
    assert_eq!(q.stats().ops, 0, "held");
    // Polled again (a submitter that waited without unplugging): it issues itself.
    futures::executor::block_on(fut).unwrap();
    assert!(dev == host);

    let mut dev = vec![0u8; 4096];
    let mut fut = Box::pin(q.run(op(OpKind::Write, &mut dev, &mut host, true)));
    let plug = crate::engine::Plug::new();
    assert!(poll_once(fut.as_mut()).is_pending());
    plug.hold();
    assert_eq!(q.stats().ops, 1, "held");
    // Dropped (a cancelled request): it is issued and waited for, not left on the stack
    // pointing into freed memory.
    drop(fut);
    assert_eq!(q.stats().ops, 2);
    assert!(
        dev == host,
        "the dropped request's copy ran before the drop returned"
    );
    crate::engine::unplug();
}

#[test]
fn ops_that_re_poll_themselves_complete_with_or_without_a_wake() {
    let fake = Arc::new(Fake::new(BatchMode::Kernel));
    let opts = QueueOptions {
        spin: Duration::ZERO,
        yield_spin: Duration::from_micros(200),
        ..QueueOptions::default()
    };
    let q = CopyQueue::with_driver(fake.clone(), opts).unwrap();
    let threads = 4;
    std::thread::scope(|s| {
        for t in 0..threads {
            let q = &q;
            s.spawn(move || {
                let mut dev = vec![0u8; 64 << 10];
                for r in 0..300 {
                    let len = [512, 4096, 64 << 10][(r + t) % 3];
                    let mut host = pattern(t * 1000 + r, len);
                    let d = &mut dev[..len];
                    futures::executor::block_on(q.run(op(OpKind::Write, d, &mut host, true)))
                        .unwrap();
                    let mut back = vec![0u8; len];
                    futures::executor::block_on(q.run(op(OpKind::Read, d, &mut back, true)))
                        .unwrap();
                    assert!(back == host, "thread {t} round {r}: data differs");
                }
            });
        }
        // Past its re-polling time an op waits for its wake: a GPU that holds back keeps
        // every submitter waiting until it runs, then all complete.
        fake.running.store(false, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(5));
        fake.running.store(true, Ordering::SeqCst);
    });
    assert_eq!(q.stats().ops, threads as u64 * 600);
}

#[test]
fn a_watched_op_waits_for_its_wake_instead_of_re_polling_itself() {
    use std::task::Wake;
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let fake = Arc::new(Fake::new(BatchMode::Kernel));
    let opts = QueueOptions {
        spin: Duration::ZERO,
        yield_spin: Duration::from_secs(60),
        ..QueueOptions::default()
    };
    let q = CopyQueue::with_driver(fake.clone(), opts).unwrap();
    fake.running.store(false, Ordering::SeqCst);
    for watched in [false, true] {
        let mut dev = vec![0u8; 4096];
        let mut host = pattern(9, 4096);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(count.clone());
        let mut fut = Box::pin(q.run(op(OpKind::Write, &mut dev, &mut host, true)));
        let guard = watched.then(crate::engine::Watched::new);
        assert!(
            fut.as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
        );
        drop(guard);
        let woken = count.0.load(Ordering::SeqCst);
        if watched {
            assert_eq!(woken, 0, "a watched op re-polled itself");
        } else {
            assert_eq!(
                woken, 1,
                "an op on its own re-polls itself (woke {woken} times)"
            );
        }
        fake.running.store(true, Ordering::SeqCst);
        futures::executor::block_on(fut).unwrap();
        fake.running.store(false, Ordering::SeqCst);
        assert!(dev == host);
    }
    fake.running.store(true, Ordering::SeqCst);
}

#[test]
fn ops_issued_with_nothing_in_flight_use_the_first_lane_and_busy_ones_spread() {
    let fake = Arc::new(Fake::new(BatchMode::Off));
    let q = queue(&fake);
    let mut dev = vec![0u8; 4096];
    for i in 0..8 {
        let mut host = pattern(i, 4096);
        futures::executor::block_on(q.run(op(OpKind::Write, &mut dev, &mut host, true))).unwrap();
    }
    assert_eq!(
        fake.state.lock().unwrap().put,
        vec![8, 0, 0, 0],
        "one at a time: lane 0"
    );
    // With the GPU held, each op finds the earlier ones in flight: the lanes take turns.
    fake.running.store(false, Ordering::SeqCst);
    let mut devs: Vec<Vec<u8>> = (0..4).map(|_| vec![0u8; 4096]).collect();
    let mut hosts: Vec<Vec<u8>> = (0..4).map(|i| pattern(i, 4096)).collect();
    let mut futs: Vec<_> = devs
        .iter_mut()
        .zip(hosts.iter_mut())
        .map(|(d, h)| Box::pin(q.run(op(OpKind::Write, d, h, true))))
        .collect();
    for f in &mut futs {
        assert!(poll_once(f.as_mut()).is_pending());
    }
    let put = fake.state.lock().unwrap().put.clone();
    // Let the GPU run before asserting: a failing assertion drops the futures, and each waits
    // for its op.
    fake.running.store(true, Ordering::SeqCst);
    for f in futs {
        futures::executor::block_on(f).unwrap();
    }
    assert_eq!(put.iter().sum::<u64>(), 12);
    assert!(
        put.iter().all(|&n| n > 0),
        "busy lanes were not spread: {put:?}"
    );
}
