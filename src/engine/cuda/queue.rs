//! The copy queue of one GPU: how requests reach the GPU and how their completion comes back.
//!
//! Submission is flat-combining. A request pushes its [`Op`] onto a lock-free stack and then
//! tries to become the combiner; the one task that succeeds drains the stack and issues
//! everything in it, its own op and whatever other tasks pushed meanwhile. With one request
//! in flight this is a direct driver call from the requesting task (no thread hop); with
//! many, requests that arrive while a combiner is in the driver are issued together on its
//! next round, which is where small copies get batched: up to [`MAX_DESCS`] of them go into
//! one launch of the gather kernel (or one `cuMemcpyBatchAsync`), large ones each get their
//! own `cuMemcpy*Async`. Work is spread round-robin over several streams (lanes) while
//! other work is in flight (a copy issued with nothing in flight takes the first lane, the
//! cheaper one to start on after an idle spell), and after each submission an event is
//! recorded on its lane.
//!
//! Completion is reaping: query the oldest event of each lane and wake the tasks whose ops it
//! covered. A completion thread per GPU reaps while work is in flight, spinning, and parks
//! when idle. Waking a task from outside the runtime costs about 0.6 µs (tokio's shared
//! injection queue and often a thread wake-up), so one thread saturates near 1.6 M wakes/s;
//! more completion threads (each reaping a share of the lanes) and reaping by the submitting
//! tasks were both measured and were slower (see bench/notes-gpu.md). So a task whose small
//! op went out with others does not ask for a wake at first: it re-polls itself for up to
//! [`QueueOptions::yield_spin`], going to the back of its own worker's run queue between
//! polls, and the completion thread only marks the op done (4 KiB at QD128 on the H200:
//! 1.4-1.5 M IOPS with wakes, 3.2-3.5 M without).
//!
//! A submitter that says more requests follow ([`crate::engine::Plug`]) has its ops held on
//! the pending stack, not issued, until it unplugs: a connection's burst of pipelined 4 KiB
//! requests then goes out as one launch and one event, where it cost one driver call and one
//! event each. A held op polled again, or dropped, issues whatever is pending itself.
//!
//! No tokio worker ever waits in a GPU synchronisation. The
//! one bounded exception: a task whose small op went out alone, with nothing else in flight
//! and no word from its submitter that more follow ([`crate::engine::Plug`]), watches its op
//! for up to [`QueueOptions::spin`] (20 µs) before yielding, since waking a
//! parked worker costs about as much as the copy itself (4 KiB at queue depth 1: 20 µs
//! median without the watch, 10 with).
//!
//! An op lives inside the requesting future (no allocation per request). The future must not
//! go away while the GPU may still touch the op or its buffer, so dropping it before
//! completion (a cancelled request) waits for the GPU: the only blocking wait on this path,
//! and only on cancellation.

use super::driver::{CuError, Gpu};
use super::kernel::{Batch, Desc, MAX_DESCS};
use super::queue_driver::{CudaDriver, QueueDriver};
use cudarc::driver::sys::CUdeviceptr;
use futures::task::AtomicWaker;
use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::future::Future;
use std::marker::PhantomPinned;
use std::pin::Pin;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How small copies are grouped into one submission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchMode {
    /// The gather/scatter kernel reads and writes mapped pinned memory directly.
    Kernel,
    /// `cuMemcpyBatchAsync` (CUDA 12.8+ drivers).
    MemcpyBatch,
    /// One `cuMemcpy*Async` per copy.
    Off,
}

/// Tuning of a copy queue.
#[derive(Clone, Copy, Debug)]
pub struct QueueOptions {
    /// Streams work is spread over.
    pub lanes: usize,
    /// How small copies are batched.
    pub batch: BatchMode,
    /// Copies up to this size count as small.
    pub small_max: usize,
    /// Fewer small copies than this in one round go out as plain copies (a launch costs
    /// more than one DMA setup).
    pub batch_min: usize,
    /// How long a task whose small op went out alone (nothing else in flight) watches for its
    /// completion before yielding to the runtime. Waking a parked tokio worker costs about as
    /// much as a 4 KiB copy, so at queue depth 1 a short watch halves the latency; under load
    /// ops never go out alone and nobody watches.
    pub spin: Duration,
    /// How long a task whose small op went out with others re-polls itself (yielding to its
    /// runtime's other tasks between polls) before it asks the completion thread to wake
    /// it; zero never re-polls. A wake from the completion thread, outside the runtime,
    /// costs about 0.6 µs of that one thread, which bounds 4 KiB I/O near 1.6 M ops/s; a
    /// task that re-polls needs no wake, only its own worker's time (see
    /// `crate::tunables::CUDA_YIELD_SPIN` for what it gave).
    pub yield_spin: Duration,
    /// Completion threads per GPU; each reaps its share of the lanes. One is best: the cost
    /// of waking tasks from outside the runtime grows with more (measured at 4 KiB QD128:
    /// 1.6 M IOPS with one thread, 1.2 M with two, 0.7 M with four).
    pub completion_threads: usize,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            lanes: 4,
            batch: BatchMode::Kernel,
            small_max: 64 << 10,
            batch_min: 2,
            spin: Duration::from_micros(20),
            yield_spin: crate::tunables::CUDA_YIELD_SPIN,
            completion_threads: 1,
        }
    }
}

/// Counters of a copy queue, for the benchmark: how requests were grouped, and how busy the
/// completion thread was. Updated once per round or batch, not per request.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueStats {
    /// Ops issued.
    pub ops: u64,
    /// Combining rounds (drains of the pending stack).
    pub rounds: u64,
    /// Batched submissions (kernel launches or `cuMemcpyBatchAsync` calls).
    pub batches: u64,
    /// Ops carried by those batches.
    pub batched_ops: u64,
    /// Nanoseconds the completion threads spent in rounds that completed something
    /// (querying events, waking tasks), summed over the threads.
    pub complete_ns: u64,
}

#[derive(Default)]
struct Counters {
    ops: AtomicU64,
    rounds: AtomicU64,
    batches: AtomicU64,
    batched_ops: AtomicU64,
    complete_ns: AtomicU64,
}

/// What an op does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Host to GPU.
    Write,
    /// GPU to host.
    Read,
    /// Set GPU bytes to zero.
    Zero,
}

const PENDING: u8 = 0;
const COMPLETING: u8 = 1;
const DONE: u8 = 2;

/// One request to the GPU, living in the requesting future.
pub struct Op {
    next: AtomicPtr<Op>,
    kind: OpKind,
    dev: CUdeviceptr,
    host: *mut u8,
    len: usize,
    /// The host buffer is pinned and mapped, so the gather kernel may touch it.
    mapped: bool,
    state: AtomicU8,
    error: UnsafeCell<Option<CuError>>,
    waker: AtomicWaker,
    _pin: PhantomPinned,
}

// SAFETY: an Op is shared between its owner and the queue by the protocol described on
// `complete`: `error` is written once before a Release store of the state and read only after
// an Acquire load sees DONE; everything else is immutable or atomic.
unsafe impl Send for Op {}
// SAFETY: as above.
unsafe impl Sync for Op {}

impl Op {
    /// An op of `kind` on `len` bytes at device address `dev` and host address `host`
    /// (`mapped`: pinned and mapped into the GPU, so the gather kernel may touch it).
    ///
    /// # Safety
    /// Until the op completes (its `run` future resolves or is dropped), `host` must be valid
    /// for `len` bytes in the op's direction and pinned, and `dev` must be GPU memory of this
    /// queue's context valid for `len` bytes; for `Zero`, `host` is unused.
    pub unsafe fn new(
        kind: OpKind,
        dev: CUdeviceptr,
        host: *mut u8,
        len: usize,
        mapped: bool,
    ) -> Op {
        Op {
            next: AtomicPtr::new(ptr::null_mut()),
            kind,
            dev,
            host,
            len,
            mapped,
            state: AtomicU8::new(PENDING),
            error: UnsafeCell::new(None),
            waker: AtomicWaker::new(),
            _pin: PhantomPinned,
        }
    }

    /// What the op does.
    pub fn kind(&self) -> OpKind {
        self.kind
    }

    /// Bytes the op covers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty range.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn result(&self) -> Option<Result<(), CuError>> {
        loop {
            match self.state.load(Ordering::Acquire) {
                // SAFETY: DONE is stored after the last write to `error` (Release/Acquire).
                DONE => return Some(unsafe { *self.error.get() }.map_or(Ok(()), Err)),
                // The completer is between its wake and its final store: a few instructions.
                COMPLETING => std::hint::spin_loop(),
                _ => return None,
            }
        }
    }
}

/// Completes `op` with `error`. After the final store the op may be freed by its owner at
/// any moment, so nothing touches it afterwards; the waker is woken before that store, and
/// an owner that sees COMPLETING waits for DONE.
///
/// # Safety
/// `op` must be a submitted op that has not been completed yet.
unsafe fn complete(op: *const Op, error: Option<CuError>) {
    // SAFETY: the owner keeps the op alive until it sees DONE (see WaitOnDrop).
    let op = unsafe { &*op };
    // SAFETY: only the queue writes `error`, once, before publishing DONE.
    unsafe { *op.error.get() = error };
    op.state.store(COMPLETING, Ordering::Release);
    op.waker.wake();
    op.state.store(DONE, Ordering::Release);
}

/// Completes every op of a chain linked through `next`.
///
/// # Safety
/// Every op of the chain must be submitted and not yet completed.
unsafe fn complete_chain(mut op: *const Op, error: Option<CuError>) {
    while !op.is_null() {
        // SAFETY: read the link before completing: after completion the op may be gone.
        let next = unsafe { &*op }.next.load(Ordering::Relaxed);
        // SAFETY: caller's contract.
        unsafe { complete(op, error) };
        op = next;
    }
}

/// Events recorded on a lane, oldest first, each with the chain of ops it completes.
struct Inflight<E> {
    event: E,
    ops: *const Op,
}

struct Lane<D: QueueDriver> {
    stream: D::Stream,
    fifo: Mutex<VecDeque<Inflight<D::Event>>>,
    /// The completion thread that reaps this lane.
    reaper: usize,
}

/// One completion thread's state.
struct Reaper {
    /// Events tracked on this thread's lanes and not yet reaped.
    inflight: AtomicUsize,
    sleeping: AtomicBool,
    thread: OnceLock<Thread>,
}

/// State only the current combiner touches.
struct Scratch {
    small: Vec<*const Op>,
    batch: Box<Batch>,
    dsts: Vec<CUdeviceptr>,
    srcs: Vec<CUdeviceptr>,
    sizes: Vec<usize>,
    next_lane: usize,
}

struct Shared<D: QueueDriver> {
    driver: D,
    opts: QueueOptions,
    pending: AtomicPtr<Op>,
    combining: AtomicBool,
    scratch: UnsafeCell<Scratch>,
    lanes: Vec<Lane<D>>,
    events: Mutex<Vec<D::Event>>,
    /// Events tracked on all lanes and not yet reaped.
    inflight: AtomicUsize,
    reapers: Vec<Reaper>,
    shutdown: AtomicBool,
    broken: OnceLock<CuError>,
    counters: Counters,
}

// SAFETY: raw driver handles are thread-agnostic; `scratch` is touched only by the thread
// holding `combining`; op pointers follow the Op protocol.
unsafe impl<D: QueueDriver> Send for Shared<D> {}
// SAFETY: as above.
unsafe impl<D: QueueDriver> Sync for Shared<D> {}

/// The copy queue of one GPU (see the module doc), over the CUDA driver or, in tests, a
/// fake one.
pub struct CopyQueue<D: QueueDriver = CudaDriver> {
    shared: Arc<Shared<D>>,
    pollers: Vec<JoinHandle<()>>,
}

impl CopyQueue {
    /// Creates the lanes, loads the kernel if batching by kernel, and starts the poller.
    pub fn new(gpu: Arc<Gpu>, opts: QueueOptions) -> Result<CopyQueue, String> {
        gpu.bind().map_err(|e| format!("GPU {}: {e}", gpu.index))?;
        CopyQueue::with_driver(CudaDriver::new(gpu, opts.batch), opts)
    }
}

impl<D: QueueDriver> CopyQueue<D> {
    /// The queue over `driver`: creates the lanes and starts the completion threads.
    pub fn with_driver(driver: D, mut opts: QueueOptions) -> Result<CopyQueue<D>, String> {
        let index = driver.index();
        let ctx = |e: CuError| format!("GPU {index}: {e}");
        driver.bind().map_err(ctx)?;
        opts.lanes = opts.lanes.clamp(1, 64);
        opts.completion_threads = opts.completion_threads.clamp(1, opts.lanes);
        let mut lanes = Vec::new();
        for i in 0..opts.lanes {
            let stream = driver.create_stream().map_err(ctx)?;
            lanes.push(Lane {
                stream,
                fifo: Mutex::new(VecDeque::with_capacity(1024)),
                reaper: i % opts.completion_threads,
            });
        }
        let shared = Arc::new(Shared {
            driver,
            opts,
            pending: AtomicPtr::new(ptr::null_mut()),
            combining: AtomicBool::new(false),
            scratch: UnsafeCell::new(Scratch {
                small: Vec::with_capacity(MAX_DESCS),
                batch: Box::default(),
                dsts: Vec::with_capacity(MAX_DESCS),
                srcs: Vec::with_capacity(MAX_DESCS),
                sizes: Vec::with_capacity(MAX_DESCS),
                next_lane: 0,
            }),
            lanes,
            events: Mutex::new(Vec::new()),
            inflight: AtomicUsize::new(0),
            reapers: (0..opts.completion_threads)
                .map(|_| Reaper {
                    inflight: AtomicUsize::new(0),
                    sleeping: AtomicBool::new(false),
                    thread: OnceLock::new(),
                })
                .collect(),
            shutdown: AtomicBool::new(false),
            broken: OnceLock::new(),
            counters: Counters::default(),
        });
        let mut queue = CopyQueue {
            shared: shared.clone(),
            pollers: Vec::new(),
        };
        for r in 0..opts.completion_threads {
            let poll_shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vramdisk-cuda{index}-{r}"))
                .spawn(move || poll_loop(&poll_shared, r))
                .map_err(|e| format!("starting a completion thread: {e}"))?;
            let _ = shared.reapers[r].thread.set(handle.thread().clone());
            queue.pollers.push(handle);
        }
        Ok(queue)
    }

    /// The sticky error that made this GPU unusable, if one happened.
    pub fn broken(&self) -> Option<CuError> {
        self.shared.broken.get().copied()
    }

    /// The queue's counters so far.
    pub fn stats(&self) -> QueueStats {
        let c = &self.shared.counters;
        QueueStats {
            ops: c.ops.load(Ordering::Relaxed),
            rounds: c.rounds.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            batched_ops: c.batched_ops.load(Ordering::Relaxed),
            complete_ns: c.complete_ns.load(Ordering::Relaxed),
        }
    }

    /// How small copies are actually batched (the kernel or `cuMemcpyBatchAsync` may be
    /// unavailable).
    pub fn effective_batch(&self) -> BatchMode {
        self.shared.driver.batching()
    }

    /// Launches the gather kernel on a bad address, which leaves the context unusable (a
    /// sticky error), to test that requests then fail with EIO instead of hanging.
    #[doc(hidden)]
    pub fn inject_sticky_fault(&self) -> Result<(), String> {
        if self.effective_batch() != BatchMode::Kernel {
            return Err("the gather kernel is not loaded".into());
        }
        let mut batch = Box::<Batch>::default();
        batch.count = 1;
        batch.descs[0] = Desc {
            src: 64,
            dst: 128,
            len: 4096,
        };
        let driver = &self.shared.driver;
        driver.bind().map_err(|e| e.to_string())?;
        let lane = &self.shared.lanes[0];
        // SAFETY: deliberately faulting; the addresses are never valid, so no memory of ours
        // is touched.
        unsafe { driver.launch(lane.stream, &batch) }.map_err(|e| e.to_string())?;
        self.shared.track(lane, ptr::null());
        Ok(())
    }

    /// Runs one op to completion.
    pub async fn run(&self, op: Op) -> Result<(), CuError> {
        if op.len == 0 {
            return Ok(());
        }
        let op = op;
        let guard = WaitOnDrop(&op, &*self.shared);
        if crate::engine::plugged() {
            // The submitter has the next request in hand: hold this one until it unplugs
            // (see `engine::plug`), and do not watch it.
            self.shared.push(&op);
            crate::engine::held_by(&self.shared);
            let result = OpDone(&op, &*self.shared, false).await;
            drop(guard);
            return result;
        }
        let solo = self.shared.submit(&op);
        let opts = &self.shared.opts;
        if solo && !opts.spin.is_zero() && op.len <= opts.small_max {
            let start = Instant::now();
            while start.elapsed() < opts.spin {
                if let Some(r) = op.result() {
                    drop(guard);
                    return r;
                }
                std::hint::spin_loop();
            }
        } else if !opts.yield_spin.is_zero()
            && op.len <= opts.small_max
            && !crate::engine::watched()
        {
            let start = Instant::now();
            while start.elapsed() < opts.yield_spin {
                if let Some(r) = op.result() {
                    drop(guard);
                    return r;
                }
                YieldOnce(false).await;
            }
        }
        let result = OpDone(&op, &*self.shared, false).await;
        drop(guard);
        result
    }
}

impl<D: QueueDriver> crate::engine::Unplug for Shared<D> {
    fn unplug(&self) {
        if !self.pending.load(Ordering::SeqCst).is_null() {
            self.combine();
        }
    }
}

impl<D: QueueDriver> Drop for CopyQueue<D> {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for h in &self.pollers {
            h.thread().unpark();
        }
        for h in self.pollers.drain(..) {
            let _ = h.join();
        }
        let driver = &self.shared.driver;
        // The poller has exited and no op is in flight (every run() future borrowed self,
        // so all are gone): nothing uses the handles any more.
        if driver.bind().is_ok() {
            for lane in &self.shared.lanes {
                driver.destroy_stream(lane.stream);
            }
            for ev in self.shared.events.lock().unwrap().drain(..) {
                driver.destroy_event(ev);
            }
        }
    }
}

/// Waits for an op's completion when the future holding it is dropped early (issuing it
/// first if a plug still holds it).
struct WaitOnDrop<'a, D: QueueDriver>(&'a Op, &'a Shared<D>);

impl<D: QueueDriver> Drop for WaitOnDrop<'_, D> {
    fn drop(&mut self) {
        if self.0.state.load(Ordering::Acquire) != DONE {
            crate::engine::Unplug::unplug(self.1);
        }
        let start = Instant::now();
        while self.0.state.load(Ordering::Acquire) != DONE {
            if start.elapsed() < Duration::from_micros(50) {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }
}

/// Pending once, having woken its own task: the task goes to the back of its worker's run
/// queue (no other thread is involved), then resolves.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if std::mem::replace(&mut self.0, true) {
            return Poll::Ready(());
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// An op's completion; the flag says it was polled before.
struct OpDone<'a, D: QueueDriver>(&'a Op, &'a Shared<D>, bool);

impl<D: QueueDriver> Future for OpDone<'_, D> {
    type Output = Result<(), CuError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let op = this.0;
        if let Some(r) = op.result() {
            return Poll::Ready(r);
        }
        // A submitter that forgot to unplug before it waited: polled again, a held op
        // issues itself (and whatever else is pending) rather than wait for ever.
        if std::mem::replace(&mut this.2, true) {
            crate::engine::Unplug::unplug(this.1);
        }
        op.waker.register(cx.waker());
        match op.result() {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }
}

impl<D: QueueDriver> Shared<D> {
    /// Pushes `op` and combines; true when this thread issued `op` alone in its round, with
    /// nothing else in flight.
    fn submit(&self, op: &Op) -> bool {
        self.push(op);
        self.combine() == 1 && self.inflight.load(Ordering::Relaxed) <= 1
    }

    /// Pushes `op` onto the pending stack, for the next combiner.
    fn push(&self, op: &Op) {
        let p = op as *const Op as *mut Op;
        let mut head = self.pending.load(Ordering::Relaxed);
        loop {
            op.next.store(head, Ordering::Relaxed);
            match self
                .pending
                .compare_exchange_weak(head, p, Ordering::SeqCst, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(h) => head = h,
            }
        }
    }

    /// Issues everything pending unless another thread is already doing so. The combiner
    /// re-checks the stack after letting go, so an op pushed just as it finished is never
    /// left behind (SeqCst on both sides: push-then-try versus release-then-check).
    /// Returns how many ops this thread issued.
    fn combine(&self) -> usize {
        let mut issued = 0;
        loop {
            if self.combining.swap(true, Ordering::SeqCst) {
                return issued;
            }
            loop {
                let list = self.pending.swap(ptr::null_mut(), Ordering::SeqCst);
                if list.is_null() {
                    break;
                }
                // SAFETY: we hold `combining`, and the drained ops are ours to issue.
                issued += unsafe { self.issue(list) };
            }
            self.combining.store(false, Ordering::SeqCst);
            if self.pending.load(Ordering::SeqCst).is_null() {
                return issued;
            }
        }
    }

    fn fail_all(&self, mut list: *const Op, e: CuError) -> usize {
        let mut count = 0;
        while !list.is_null() {
            count += 1;
            // SAFETY: drained ops are alive until completed.
            let next = unsafe { &*list }.next.load(Ordering::Relaxed);
            // SAFETY: each op is completed once, here.
            unsafe { complete(list, Some(e)) };
            list = next;
        }
        count
    }

    /// Issues a drained stack of ops (newest first); returns how many.
    ///
    /// # Safety
    /// The caller holds `combining`; every op in `list` is submitted and not yet issued.
    unsafe fn issue(&self, list: *mut Op) -> usize {
        if let Some(e) = self.broken.get() {
            return self.fail_all(list, *e);
        }
        if let Err(e) = self.driver.bind() {
            return self.fail_all(list, e);
        }
        let mut count = 0;
        // SAFETY: only the combiner touches scratch.
        let scratch = unsafe { &mut *self.scratch.get() };
        let batching = self.driver.batching() != BatchMode::Off;
        let mut op = list as *const Op;
        while !op.is_null() {
            // SAFETY: drained ops are alive until completed.
            let o = unsafe { &*op };
            let next = o.next.load(Ordering::Relaxed);
            count += 1;
            if batching && o.kind != OpKind::Zero && o.len <= self.opts.small_max && o.mapped {
                scratch.small.push(op);
                if scratch.small.len() == MAX_DESCS {
                    self.flush_small(scratch);
                }
            } else {
                self.issue_one(scratch, op);
            }
            op = next;
        }
        self.flush_small(scratch);
        self.counters.ops.fetch_add(count as u64, Ordering::Relaxed);
        self.counters.rounds.fetch_add(1, Ordering::Relaxed);
        count
    }

    /// The lane for the next submission: lanes in turn while work is in flight (copies on
    /// different streams overlap), the first lane when nothing is. A copy that follows an
    /// idle spell on the stream the last one used costs less: one 4 KiB copy with an event,
    /// waited for by spinning, took 7.91 / 7.91 µs (write / read) on one stream and 8.22 /
    /// 8.53 µs on four in turn (H200, bench/cuda-qd1-floor.cu); the engine's 4 KiB QD1 median
    /// went from 9.5-9.9 / 8.8-9.7 µs to 9.0-9.8 / 8.5-9.1 (three alternating rounds).
    fn next_lane(&self, scratch: &mut Scratch) -> &Lane<D> {
        if self.inflight.load(Ordering::SeqCst) == 0 {
            scratch.next_lane = 1 % self.lanes.len();
            return &self.lanes[0];
        }
        let i = scratch.next_lane;
        scratch.next_lane = (i + 1) % self.lanes.len();
        &self.lanes[i]
    }

    fn take_event(&self) -> Result<D::Event, CuError> {
        if let Some(ev) = self.events.lock().unwrap().pop() {
            return Ok(ev);
        }
        // The combiner bound the context.
        self.driver.create_event()
    }

    /// Records an event after the work just put on `lane` and hands the chain `ops` to the
    /// poller; on failure completes the chain with the error.
    fn track(&self, lane: &Lane<D>, ops: *const Op) {
        let recorded = self.take_event().and_then(|ev| {
            self.driver
                .record(ev, lane.stream)
                .map(|_| ev)
                .inspect_err(|_| self.events.lock().unwrap().push(ev))
        });
        match recorded {
            Ok(event) => {
                lane.fifo.lock().unwrap().push_back(Inflight { event, ops });
                self.inflight.fetch_add(1, Ordering::SeqCst);
                let reaper = &self.reapers[lane.reaper];
                reaper.inflight.fetch_add(1, Ordering::SeqCst);
                if reaper.sleeping.load(Ordering::SeqCst)
                    && let Some(t) = reaper.thread.get()
                {
                    t.unpark();
                }
            }
            Err(e) => {
                self.note_error(e);
                // SAFETY: the chain is issued but not tracked, so nobody else completes it.
                unsafe { complete_chain(ops, Some(e)) };
            }
        }
    }

    fn note_error(&self, e: CuError) {
        if e.is_sticky() && self.broken.set(e).is_ok() {
            tracing::error!(
                "GPU {} ({}) is unusable after {e}: every request to it now fails with EIO",
                self.driver.index(),
                self.driver.name()
            );
        }
    }

    /// Completes every op whose event has fired on the lanes of completion thread `r`,
    /// oldest first on each lane; true if any. Only that thread calls it.
    fn reap(&self, r: usize) -> bool {
        let bound = self.driver.bind();
        let mut completed = false;
        let t = Instant::now();
        for lane in self.lanes.iter().filter(|l| l.reaper == r) {
            loop {
                let front = lane.fifo.lock().unwrap().front().map(|i| i.event);
                let Some(event) = front else { break };
                let fired = match bound {
                    Ok(()) => self.driver.query(event),
                    Err(e) => Err(CuError {
                        code: e.code,
                        call: "cuEventQuery",
                    }),
                };
                let error = match fired {
                    Ok(false) => break,
                    Ok(true) => None,
                    Err(e) => Some(e),
                };
                let inflight = lane.fifo.lock().unwrap().pop_front().expect("front exists");
                match error {
                    None => self.events.lock().unwrap().push(event),
                    Some(e) => {
                        self.note_error(e);
                        self.driver.destroy_event(event);
                    }
                }
                // SAFETY: the chain was tracked by this event and is completed only here
                // (each lane has one reaper).
                unsafe { complete_chain(inflight.ops, error) };
                self.reapers[r].inflight.fetch_sub(1, Ordering::SeqCst);
                self.inflight.fetch_sub(1, Ordering::SeqCst);
                completed = true;
            }
        }
        if completed {
            let ns = t.elapsed().as_nanos() as u64;
            self.counters.complete_ns.fetch_add(ns, Ordering::Relaxed);
        }
        completed
    }

    /// Puts one op on the next lane as a plain copy or memset.
    fn issue_one(&self, scratch: &mut Scratch, op: *const Op) {
        // SAFETY: op is alive until completed.
        let o = unsafe { &*op };
        o.next.store(ptr::null_mut(), Ordering::Relaxed);
        let lane = self.next_lane(scratch);
        // SAFETY: the owner keeps host and device memory valid until the op completes; the
        // host memory is pinned (the backend stages anything else).
        let rc = unsafe { self.driver.copy(lane.stream, o.kind, o.dev, o.host, o.len) };
        match rc {
            Ok(()) => self.track(lane, op),
            Err(e) => {
                self.note_error(e);
                // SAFETY: not tracked, completed once here.
                unsafe { complete(op, Some(e)) };
            }
        }
    }

    /// Issues the collected small copies as one batch (or one by one when too few).
    fn flush_small(&self, scratch: &mut Scratch) {
        let n = scratch.small.len();
        if n == 0 {
            return;
        }
        if n < self.opts.batch_min.max(1) {
            for i in 0..n {
                let op = scratch.small[i];
                self.issue_one(scratch, op);
            }
            scratch.small.clear();
            return;
        }
        // Chain the batch through `next` so one event completes all of it.
        for i in 0..n {
            let next = if i + 1 < n {
                scratch.small[i + 1]
            } else {
                ptr::null()
            };
            // SAFETY: ops are alive until completed.
            unsafe { &*scratch.small[i] }
                .next
                .store(next as *mut Op, Ordering::Relaxed);
        }
        let head = scratch.small[0];
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        self.counters
            .batched_ops
            .fetch_add(n as u64, Ordering::Relaxed);
        let rc = if self.driver.batching() == BatchMode::Kernel {
            let batch = &mut *scratch.batch;
            batch.count = n as u64;
            for (i, &op) in scratch.small.iter().enumerate() {
                // SAFETY: ops are alive until completed.
                let o = unsafe { &*op };
                let host = o.host as u64;
                batch.descs[i] = match o.kind {
                    OpKind::Write => Desc {
                        src: host,
                        dst: o.dev,
                        len: o.len as u64,
                    },
                    _ => Desc {
                        src: o.dev,
                        dst: host,
                        len: o.len as u64,
                    },
                };
            }
            let lane = self.next_lane(scratch);
            // SAFETY: the descriptors name pinned mapped host memory and mapped chunk memory
            // that their owners keep valid until completion.
            let rc = unsafe { self.driver.launch(lane.stream, &scratch.batch) };
            rc.map(|_| lane as *const Lane<D>)
        } else {
            scratch.dsts.clear();
            scratch.srcs.clear();
            scratch.sizes.clear();
            for &op in &scratch.small {
                // SAFETY: ops are alive until completed.
                let o = unsafe { &*op };
                let host = o.host as u64;
                let (src, dst) = match o.kind {
                    OpKind::Write => (host, o.dev),
                    _ => (o.dev, host),
                };
                scratch.srcs.push(src);
                scratch.dsts.push(dst);
                scratch.sizes.push(o.len);
            }
            let lane = self.next_lane(scratch) as *const Lane<D>;
            // SAFETY: n entries each; memory valid until completion as above; lanes live as
            // long as self.
            unsafe {
                self.driver.copy_batch(
                    (*lane).stream,
                    &mut scratch.dsts,
                    &mut scratch.srcs,
                    &mut scratch.sizes,
                )
            }
            .map(|_| lane)
        };
        scratch.small.clear();
        match rc {
            // SAFETY: lanes live as long as self.
            Ok(lane) => self.track(unsafe { &*lane }, head),
            Err(e) => {
                self.note_error(e);
                // SAFETY: not tracked, completed once here.
                unsafe { complete_chain(head, Some(e)) };
            }
        }
    }
}

/// Completion thread `r`: reaps its lanes while anything is in flight on them (spinning),
/// parks after a short idle spell.
fn poll_loop<D: QueueDriver>(shared: &Shared<D>, r: usize) {
    use crate::tunables::CUDA_REAPER_IDLE_SPIN as IDLE_SPIN;
    let me = &shared.reapers[r];
    let mut idle_since: Option<Instant> = None;
    loop {
        if shared.reap(r) {
            idle_since = None;
            continue;
        }
        if me.inflight.load(Ordering::SeqCst) > 0 {
            std::hint::spin_loop();
            continue;
        }
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < IDLE_SPIN {
            std::hint::spin_loop();
            continue;
        }
        me.sleeping.store(true, Ordering::SeqCst);
        if me.inflight.load(Ordering::SeqCst) == 0 && !shared.shutdown.load(Ordering::SeqCst) {
            std::thread::park_timeout(Duration::from_secs(1));
        }
        me.sleeping.store(false, Ordering::SeqCst);
        idle_since = None;
    }
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
