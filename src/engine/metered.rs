//! [`MeteredDevice`]: counts what passes through a [`BlockDevice`], for `vramdisk status` and
//! the Prometheus endpoint.
//!
//! Every counter is a relaxed atomic in a fixed array, one array per thread (summed when
//! read), so the I/O path takes no lock, allocates nothing and shares no cache line with
//! other threads: three uncontended read-modify-writes per request (bytes, latency sum,
//! bucket; the bucket counts the request too). Readers get a [`MetricsSnapshot`] that may
//! be a few requests apart between fields, which is all monitoring needs.

use super::{
    BlockDevice, BufferPool, Capabilities, DeviceStats, Extent, IoResult, View, ZeroFlags,
};
use crate::tunables::METRICS_SHARDS;
use async_trait::async_trait;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

/// The operations that are counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `read`.
    Read = 0,
    /// `write`.
    Write = 1,
    /// `write_zeroes`.
    WriteZeroes = 2,
    /// `trim`.
    Trim = 3,
    /// `flush`.
    Flush = 4,
    /// `cache`.
    Cache = 5,
    /// `extents` (NBD block status).
    Extents = 6,
}

impl Op {
    /// Every operation, in index order.
    pub const ALL: [Op; 7] = [
        Op::Read,
        Op::Write,
        Op::WriteZeroes,
        Op::Trim,
        Op::Flush,
        Op::Cache,
        Op::Extents,
    ];

    /// Lower-case name used in JSON and as the Prometheus `op` label.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::WriteZeroes => "write_zeroes",
            Op::Trim => "trim",
            Op::Flush => "flush",
            Op::Cache => "cache",
            Op::Extents => "extents",
        }
    }
}

/// Upper bounds of the latency histogram buckets, in nanoseconds; one more bucket (+Inf)
/// follows. Chosen to span a 2 µs host-RAM hit to a multi-second stall.
pub const LATENCY_BUCKETS_NS: [u64; 16] = [
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
];
const BUCKETS: usize = LATENCY_BUCKETS_NS.len() + 1;

#[derive(Default)]
struct OpCounters {
    bytes: AtomicU64,
    errors: AtomicU64,
    latency_sum_ns: AtomicU64,
    /// Also the count of operations: each one lands in exactly one bucket.
    buckets: [AtomicU64; BUCKETS],
}

impl OpCounters {
    fn record(&self, bytes: u64, ok: bool, elapsed_ns: u64) {
        if ok {
            self.bytes.fetch_add(bytes, Relaxed);
        } else {
            self.errors.fetch_add(1, Relaxed);
        }
        self.latency_sum_ns.fetch_add(elapsed_ns, Relaxed);
        let bucket = LATENCY_BUCKETS_NS
            .iter()
            .position(|&b| elapsed_ns <= b)
            .unwrap_or(BUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Relaxed);
    }

    /// Adds these counters to `into`.
    fn add_to(&self, into: &mut OpSnapshot) {
        into.bytes += self.bytes.load(Relaxed);
        into.errors += self.errors.load(Relaxed);
        into.latency_sum_ns += self.latency_sum_ns.load(Relaxed);
        for (sum, b) in into.buckets.iter_mut().zip(&self.buckets) {
            let n = b.load(Relaxed);
            *sum += n;
            into.ops += n;
        }
    }
}

impl OpSnapshot {
    fn zero(op: Op) -> Self {
        OpSnapshot {
            op: op.name().to_string(),
            ops: 0,
            bytes: 0,
            errors: 0,
            latency_sum_ns: 0,
            buckets: vec![0; BUCKETS],
        }
    }
}

/// One thread's counters (see [`DeviceMetrics`]), a cache line apart from the next.
#[derive(Default)]
#[repr(align(128))]
struct Shard {
    ops: [OpCounters; Op::ALL.len()],
}

/// The shard of the calling thread: threads take them in turn as they first count, the
/// ones past [`METRICS_SHARDS`] sharing.
fn my_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static MINE: usize = NEXT.fetch_add(1, Relaxed) % METRICS_SHARDS;
    }
    MINE.with(|s| *s)
}

/// Counters of one device, shared between the [`MeteredDevice`] and whoever reports them.
///
/// Every thread counts in a shard of its own, so that requests served on different threads
/// (connections on different worker threads) never contend for one cache line; snapshots
/// add the shards up.
#[derive(Default)]
pub struct DeviceMetrics {
    shards: [Shard; METRICS_SHARDS],
    connections: AtomicI64,
    connections_total: AtomicU64,
}

/// Counters of one operation at one moment.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OpSnapshot {
    /// Operation name ([`Op::name`]).
    pub op: String,
    /// Requests completed, failed ones included.
    pub ops: u64,
    /// Bytes moved (or zeroed/trimmed/cached) by requests that succeeded.
    pub bytes: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Sum of request latencies.
    pub latency_sum_ns: u64,
    /// Request counts per bucket of [`LATENCY_BUCKETS_NS`] (not cumulative), then +Inf.
    pub buckets: Vec<u64>,
}

/// Every counter of one device at one moment.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MetricsSnapshot {
    /// One entry per [`Op`], in [`Op::ALL`] order.
    pub ops: Vec<OpSnapshot>,
    /// Clients connected now.
    pub connections: i64,
    /// Clients connected since start.
    pub connections_total: u64,
}

impl MetricsSnapshot {
    /// The counters of `op`.
    pub fn op(&self, op: Op) -> &OpSnapshot {
        &self.ops[op as usize]
    }

    /// Failed requests of every kind.
    pub fn errors(&self) -> u64 {
        self.ops.iter().map(|o| o.errors).sum()
    }
}

impl DeviceMetrics {
    /// Records one finished request.
    pub fn record(&self, op: Op, bytes: u64, ok: bool, started: Instant) {
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.shards[my_shard()].ops[op as usize].record(bytes, ok, ns);
    }

    /// A frontend calls this when a client connects to this device; the connection counts
    /// until the returned guard is dropped.
    pub fn connection(self: &Arc<Self>) -> ConnectionGuard {
        self.connection_opened();
        ConnectionGuard {
            metrics: self.clone(),
        }
    }

    /// Counts a client in; pair with [`DeviceMetrics::connection_closed`] (or use
    /// [`DeviceMetrics::connection`]).
    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Relaxed);
        self.connections_total.fetch_add(1, Relaxed);
    }

    /// Counts a client out.
    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let mut ops: Vec<OpSnapshot> = Op::ALL.iter().map(|&op| OpSnapshot::zero(op)).collect();
        for shard in &self.shards {
            for (sum, c) in ops.iter_mut().zip(&shard.ops) {
                c.add_to(sum);
            }
        }
        MetricsSnapshot {
            ops,
            connections: self.connections.load(Relaxed),
            connections_total: self.connections_total.load(Relaxed),
        }
    }
}

/// Keeps one connection counted in a [`DeviceMetrics`] while alive.
pub struct ConnectionGuard {
    metrics: Arc<DeviceMetrics>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.metrics.connection_closed();
    }
}

/// A [`BlockDevice`] that forwards every call to another and counts it in a
/// [`DeviceMetrics`].
pub struct MeteredDevice {
    inner: Arc<dyn BlockDevice>,
    metrics: Arc<DeviceMetrics>,
}

impl MeteredDevice {
    /// Wraps `inner` with fresh counters.
    pub fn new(inner: Arc<dyn BlockDevice>) -> Self {
        MeteredDevice {
            inner,
            metrics: Arc::new(DeviceMetrics::default()),
        }
    }

    /// The counters, to report them or to count connections.
    pub fn metrics(&self) -> &Arc<DeviceMetrics> {
        &self.metrics
    }

    /// The device being counted.
    pub fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }
}

#[async_trait]
impl BlockDevice for MeteredDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn buffers(&self) -> &BufferPool {
        self.inner.buffers()
    }
    fn stats(&self) -> DeviceStats {
        self.inner.stats()
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> IoResult<()> {
        let t = Instant::now();
        let len = buf.len() as u64;
        let r = self.inner.read(offset, buf).await;
        self.metrics.record(Op::Read, len, r.is_ok(), t);
        r
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> IoResult<()> {
        let t = Instant::now();
        let r = self.inner.write(offset, data, fua).await;
        self.metrics
            .record(Op::Write, data.len() as u64, r.is_ok(), t);
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoResult<()> {
        let t = Instant::now();
        let r = self.inner.write_zeroes(offset, len, flags).await;
        self.metrics.record(Op::WriteZeroes, len, r.is_ok(), t);
        r
    }

    async fn trim(&self, offset: u64, len: u64) -> IoResult<()> {
        let t = Instant::now();
        let r = self.inner.trim(offset, len).await;
        self.metrics.record(Op::Trim, len, r.is_ok(), t);
        r
    }

    async fn flush(&self) -> IoResult<()> {
        let t = Instant::now();
        let r = self.inner.flush().await;
        self.metrics.record(Op::Flush, 0, r.is_ok(), t);
        r
    }

    async fn cache(&self, offset: u64, len: u64) -> IoResult<()> {
        let t = Instant::now();
        let r = self.inner.cache(offset, len).await;
        self.metrics.record(Op::Cache, len, r.is_ok(), t);
        r
    }

    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> IoResult<()> {
        let t = Instant::now();
        let r = self.inner.extents(offset, len, out);
        self.metrics.record(Op::Extents, len, r.is_ok(), t);
        r
    }

    fn write_now(&self, offset: u64, data: &[u8], fua: bool) -> Option<IoResult<()>> {
        let t = Instant::now();
        let r = self.inner.write_now(offset, data, fua)?;
        self.metrics
            .record(Op::Write, data.len() as u64, r.is_ok(), t);
        Some(r)
    }

    fn view(&self, offset: u64, len: u64) -> Option<IoResult<View>> {
        let t = Instant::now();
        let r = self.inner.view(offset, len)?;
        self.metrics.record(Op::Read, len, r.is_ok(), t);
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::host::HostBackend;
    use crate::engine::{SparseDevice, SparseOptions};

    fn device() -> MeteredDevice {
        let mut opts = SparseOptions::new(1 << 20);
        opts.chunk_size = 4096;
        MeteredDevice::new(Arc::new(
            SparseDevice::new(HostBackend::new(), opts).unwrap(),
        ))
    }

    #[tokio::test]
    async fn counts_ops_bytes_errors_and_latency() {
        let dev = device();
        dev.write(0, &[7u8; 5000], false).await.unwrap();
        let mut buf = vec![0u8; 3000];
        dev.read(100, &mut buf).await.unwrap();
        dev.read(1 << 20, &mut buf).await.unwrap_err();
        // A read lent in place counts as a read.
        assert_eq!(dev.view(0, 1000).unwrap().unwrap().len(), 1000);
        dev.trim(0, 4096).await.unwrap();
        dev.flush().await.unwrap();
        let s = dev.metrics().snapshot();
        assert_eq!(s.op(Op::Write).ops, 1);
        assert_eq!(s.op(Op::Write).bytes, 5000);
        assert_eq!(s.op(Op::Read).ops, 3);
        assert_eq!(s.op(Op::Read).bytes, 4000);
        assert_eq!(s.op(Op::Read).errors, 1);
        assert_eq!(s.op(Op::Trim).bytes, 4096);
        assert_eq!(s.op(Op::Flush).ops, 1);
        assert_eq!(s.errors(), 1);
        for o in &s.ops {
            assert_eq!(o.buckets.iter().sum::<u64>(), o.ops, "{}", o.op);
        }
        // The device underneath sees the same data.
        assert_eq!(dev.stats().chunks, 1);
    }

    #[test]
    fn connection_guard_counts_in_and_out() {
        let dev = device();
        let a = dev.metrics().connection();
        let b = dev.metrics().connection();
        assert_eq!(dev.metrics().snapshot().connections, 2);
        drop(a);
        let s = dev.metrics().snapshot();
        assert_eq!((s.connections, s.connections_total), (1, 2));
        drop(b);
        assert_eq!(dev.metrics().snapshot().connections, 0);
    }

    /// Threads count in shards of their own, and a snapshot adds every shard up.
    #[test]
    fn threads_count_apart_and_snapshots_add_them_up() {
        let m = Arc::new(DeviceMetrics::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        m.record(Op::Write, 4096, true, Instant::now());
                    }
                    my_shard()
                })
            })
            .collect();
        let mine: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        // Threads of other tests take shards meanwhile, so two of these may share one.
        for (i, shard) in m.shards.iter().enumerate() {
            let threads = mine.iter().filter(|&&s| s == i).count() as u64;
            let bytes = shard.ops[Op::Write as usize].bytes.load(Relaxed);
            assert_eq!(
                bytes,
                threads * 1000 * 4096,
                "shard {i} holds its threads' counts"
            );
        }
        let mut distinct = mine.clone();
        distinct.sort();
        distinct.dedup();
        assert!(distinct.len() > 1, "four threads in one shard: {mine:?}");
        let s = m.snapshot();
        assert_eq!(s.op(Op::Write).ops, 4000);
        assert_eq!(s.op(Op::Write).bytes, 4000 * 4096);
        assert_eq!(s.op(Op::Write).buckets.iter().sum::<u64>(), 4000);
    }

    #[test]
    fn latency_lands_in_the_right_bucket() {
        let c = OpCounters::default();
        c.record(0, true, 1);
        c.record(0, true, 5_000);
        c.record(0, true, 5_001);
        c.record(0, true, u64::MAX);
        let mut s = OpSnapshot::zero(Op::Read);
        c.add_to(&mut s);
        assert_eq!(s.ops, 4);
        assert_eq!(s.buckets[0], 2);
        assert_eq!(s.buckets[1], 1);
        assert_eq!(s.buckets[BUCKETS - 1], 1);
    }
}
