//! [`Tiering`]: the live watermark, `yield`, and bringing chunks back.
//!
//! A monitor thread reads each backend memory's free bytes every `POLL` (`cuMemGetInfo`
//! costs microseconds). When another program eats into `--keep-free`, the coldest chunks of
//! that memory move out until the reserve is back; when memory is free again for `SETTLE`
//! with a margin to spare ([`margin`]), spilled chunks come back, hottest first, at most
//! `PROMOTE_RATE` so a program that just finished keeps its PCIe link. A yield
//! ([`TierControl::yield_memory`]) moves chunks out until the asked-for bytes are free and
//! then holds the memory (no new chunks there, none brought back) until released.

use super::moves::{MoveError, Moved};
use super::{Home, Tier};
use crate::engine::{Backend, SparseDevice};
use async_trait::async_trait;
use futures::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::tunables::{
    TIER_MOVES_IN_FLIGHT as MOVES_IN_FLIGHT, TIER_POLL as POLL, TIER_PROMOTE_RATE as PROMOTE_RATE,
    TIER_SETTLE as SETTLE,
};

/// Room above `--keep-free` that must be free before chunks come back, so that a program
/// that grows a little does not send them straight out again: 1/32 of the memory, at least
/// four chunks.
pub fn margin(total: u64, chunk: u64) -> u64 {
    (total / 32).max(4 * chunk)
}

/// One backend memory (a GPU) as the tier logic sees it.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct MemoryStatus {
    /// Position in the device's `--gpu` list.
    pub position: usize,
    /// "GPU 0 (NVIDIA H200)".
    pub name: String,
    /// Free bytes as every program sees them.
    pub free: u64,
    /// Total bytes.
    pub total: u64,
    /// The watermark: bytes kept free for other programs (`--keep-free`).
    pub keep_free: u64,
    /// A yield holds this memory: nothing comes back until `yield --release`.
    pub held: bool,
}

/// Counters of the tier logic, for status and metrics.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct TierStats {
    /// Bytes in spill RAM now.
    pub spill_ram_bytes: u64,
    /// Bytes in the spill file now.
    pub spill_file_bytes: u64,
    /// Bytes spill RAM may hold, and how many of them are pinned already.
    pub spill_ram_capacity: u64,
    /// Bytes of spill RAM pinned so far.
    pub spill_ram_reserved: u64,
    /// Bytes the spill file may hold.
    pub spill_file_capacity: u64,
    /// Bytes and chunks moved out of the backend's memory since start.
    pub spilled_bytes: u64,
    /// Chunks moved out since start.
    pub spilled_chunks: u64,
    /// Bytes and chunks brought back since start.
    pub promoted_bytes: u64,
    /// Chunks brought back since start.
    pub promoted_chunks: u64,
    /// Yields answered, and their total duration in seconds.
    pub yields: u64,
    /// Sum of yield durations, seconds.
    pub yield_seconds: f64,
    /// Each backend memory.
    pub memories: Vec<MemoryStatus>,
}

/// Progress of a yield, reported while it runs.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct YieldProgress {
    /// Bytes moved out so far.
    pub moved: u64,
    /// Free bytes of the memory being worked on.
    pub free: u64,
    /// The free bytes asked for.
    pub target: u64,
}

/// What a finished yield did.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct YieldReport {
    /// Bytes moved out.
    pub moved: u64,
    /// Chunks moved out.
    pub chunks: u64,
    /// How long it took, seconds.
    pub seconds: f64,
    /// Free bytes of each held memory afterwards.
    pub free: Vec<u64>,
}

/// The tier logic of one device, as the daemon drives it (object-safe over any backend).
#[async_trait]
pub trait TierControl: Send + Sync {
    /// Counters and the state of each backend memory.
    fn stats(&self) -> TierStats;
    /// Moves chunks out of the memories at `positions` (all when empty) until each has
    /// `bytes` free, then holds them. Fails with a sentence when it cannot.
    async fn yield_memory(
        &self,
        bytes: u64,
        positions: &[usize],
        progress: &(dyn Fn(YieldProgress) + Send + Sync),
    ) -> Result<YieldReport, String>;
    /// Lets go of the memories at `positions` (all when empty): chunks come back in time.
    fn release(&self, positions: &[usize]);
}

#[derive(Default)]
struct Episode {
    started: Option<Instant>,
    bytes: u64,
    chunks: u64,
}

#[derive(Default)]
struct MemState {
    /// Clock hand of the sweep for cold chunks, as a count of this memory's chunks.
    hand: u64,
    /// When the watermark last moved something out.
    last_demote: Option<Instant>,
    /// Since when free memory has been above the promotion threshold.
    above_since: Option<Instant>,
    spill: Episode,
    promote: Episode,
    /// Said once per episode of a full spill tier.
    warned_full: bool,
}

/// The tier logic of one [`SparseDevice`].
pub struct Tiering<B: Backend> {
    dev: Arc<SparseDevice<B>>,
    mems: Vec<Mutex<MemState>>,
    spilled_bytes: AtomicU64,
    spilled_chunks: AtomicU64,
    promoted_bytes: AtomicU64,
    promoted_chunks: AtomicU64,
    yields: AtomicU64,
    yield_ns: AtomicU64,
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

impl<B: Backend> Tiering<B> {
    /// Tier logic for `dev`, with its monitor running on a thread of its own until the
    /// returned value is dropped.
    pub fn start(dev: Arc<SparseDevice<B>>) -> Arc<Tiering<B>> {
        let n = dev.backend.memories();
        let t = Arc::new(Tiering {
            dev,
            mems: (0..n).map(|_| Mutex::new(MemState::default())).collect(),
            spilled_bytes: AtomicU64::new(0),
            spilled_chunks: AtomicU64::new(0),
            promoted_bytes: AtomicU64::new(0),
            promoted_chunks: AtomicU64::new(0),
            yields: AtomicU64::new(0),
            yield_ns: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&t);
        let _ = std::thread::Builder::new()
            .name("vramdisk-tiers".into())
            .spawn(move || monitor(weak));
        t
    }

    fn free(&self, pos: usize) -> Option<(u64, u64)> {
        match self.dev.backend.shared_memory(pos)? {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::debug!("{e}");
                None
            }
        }
    }

    fn chunks_of(&self, pos: usize) -> u64 {
        let n = self.mems.len() as u64;
        let total = self.dev.map.len();
        if pos as u64 >= total {
            0
        } else {
            (total - pos as u64).div_ceil(n)
        }
    }

    /// Up to `want` cold chunks of memory `pos` in the primary tier, by the clock: a chunk
    /// used since the hand last passed gets a second chance.
    fn pick_cold(&self, pos: usize, want: usize) -> Vec<u64> {
        let n = self.mems.len() as u64;
        let count = self.chunks_of(pos);
        let mut out = Vec::new();
        if count == 0 || self.dev.map.in_tier(Tier::Primary).1 == 0 {
            return out;
        }
        let mut st = self.mems[pos].lock().unwrap();
        for _ in 0..2 * count {
            let k = st.hand % count;
            st.hand = st.hand.wrapping_add(1);
            let index = pos as u64 + k * n;
            if let Some(c) = self.dev.map.get(index)
                && c.tier() == Tier::Primary
                && !c.state().is_moving()
                && !c.state().take_referenced()
            {
                out.push(index);
                if out.len() >= want {
                    break;
                }
            }
        }
        out
    }

    /// Up to `want` spilled chunks of memory `pos`, those used lately first.
    fn pick_hot(&self, pos: usize, want: usize) -> Vec<u64> {
        let spilled = self.dev.map.in_tier(Tier::Ram).1 + self.dev.map.in_tier(Tier::File).1;
        if spilled == 0 {
            return Vec::new();
        }
        let n = self.mems.len() as u64;
        let (mut hot, mut cold) = (Vec::new(), Vec::new());
        for k in 0..self.chunks_of(pos) {
            let index = pos as u64 + k * n;
            if let Some(c) = self.dev.map.get(index)
                && !matches!(c.mem(), Home::Primary(_))
            {
                if c.state().referenced() {
                    hot.push(index);
                    if hot.len() >= want {
                        break;
                    }
                } else if cold.len() < want {
                    cold.push(index);
                }
            }
        }
        hot.extend(cold);
        hot.truncate(want);
        hot
    }

    /// Moves cold chunks of memory `pos` out until `target` bytes are free. Returns the bytes
    /// and chunks moved, or a sentence saying why it stopped short.
    async fn spill_until(
        &self,
        pos: usize,
        target: u64,
        progress: &(dyn Fn(YieldProgress) + Send + Sync),
    ) -> (u64, u64, Result<(), String>) {
        let chunk = self.dev.map.chunk_size() as u64;
        let (mut moved, mut chunks) = (0u64, 0u64);
        loop {
            let Some((free, _)) = self.free(pos) else {
                return (moved, chunks, Err("cannot read free memory".into()));
            };
            progress(YieldProgress {
                moved,
                free,
                target,
            });
            if free >= target {
                return (moved, chunks, Ok(()));
            }
            let want = (target - free).div_ceil(chunk) as usize;
            let victims = self.pick_cold(pos, want.clamp(1, 4 * MOVES_IN_FLIGHT));
            if victims.is_empty() {
                let name = self.dev.backend.memory_name(pos);
                return (
                    moved,
                    chunks,
                    Err(format!(
                        "{name} has {} free, short of the {} asked for, with none of this \
                         device's chunks left on it: other programs hold the rest",
                        gib(free),
                        gib(target)
                    )),
                );
            }
            let mut moves = futures::stream::iter(victims)
                .map(|i| self.dev.demote(i))
                .buffer_unordered(MOVES_IN_FLIGHT);
            let mut stop = None;
            while let Some(r) = moves.next().await {
                match r {
                    Ok(Moved::Done(b)) => {
                        moved += b;
                        chunks += 1;
                    }
                    Ok(Moved::Skipped) => {}
                    Err(MoveError::SpillFull) => {
                        stop = Some(format!(
                            "the spill tier is full ({} in spill RAM, {} in the spill file): \
                             give more --spill-memory or a --spill-file",
                            gib(self.dev.spill.ram.as_ref().map_or(0, |r| r.capacity())),
                            gib(self.dev.spill.file.as_ref().map_or(0, |f| f.capacity())),
                        ))
                    }
                    Err(MoveError::NoRoom) => {}
                    Err(MoveError::Io(e)) => stop = Some(format!("moving a chunk failed: {e}")),
                }
            }
            drop(moves);
            if let Some(why) = stop {
                return (moved, chunks, Err(why));
            }
        }
    }

    fn count_spilled(&self, bytes: u64, chunks: u64) {
        self.spilled_bytes.fetch_add(bytes, Relaxed);
        self.spilled_chunks.fetch_add(chunks, Relaxed);
    }

    /// One look at memory `pos`: restore the watermark, or bring chunks back.
    async fn tick(&self, pos: usize, dt: Duration) {
        let Some((free, total)) = self.free(pos) else {
            return;
        };
        let chunk = self.dev.map.chunk_size() as u64;
        let keep = self.dev.backend.keep_free(pos);
        let name = self.dev.backend.memory_name(pos);
        let now = Instant::now();
        if free < keep && !self.dev.spill.is_empty() {
            // Restore the reserve, plus a little so the next small step does not start
            // another episode at once.
            let target = keep + (margin(total, chunk) / 4).min(total - keep);
            let (b, c, r) = self.spill_until(pos, target, &|_| {}).await;
            self.count_spilled(b, c);
            let mut st = self.mems[pos].lock().unwrap();
            st.last_demote = Some(now);
            st.above_since = None;
            if st.spill.started.is_none() {
                st.spill.started = Some(now);
            }
            st.spill.bytes += b;
            st.spill.chunks += c;
            if let Err(why) = r
                && !st.warned_full
            {
                st.warned_full = true;
                tracing::warn!(
                    "{name}: other programs left {} free of the {} --keep-free asks for, and \
                     the device cannot move more out: {why}",
                    gib(free),
                    gib(keep)
                );
            }
            return;
        }
        let episode = {
            let mut st = self.mems[pos].lock().unwrap();
            st.warned_full = false;
            st.spill
                .started
                .take()
                .map(|t| (t, std::mem::take(&mut st.spill)))
        };
        if let Some((started, ep)) = episode
            && ep.bytes > 0
        {
            let secs = now.duration_since(started).as_secs_f64().max(1e-6);
            tracing::info!(
                "{name}: moved {} ({} chunks) to the spill tier in {secs:.2} s to keep {} free \
                 for other programs ({} free now)",
                gib(ep.bytes),
                ep.chunks,
                gib(keep),
                gib(free)
            );
        }
        self.promote_some(pos, free, total, keep, dt).await;
    }

    async fn promote_some(&self, pos: usize, free: u64, total: u64, keep: u64, dt: Duration) {
        let chunk = self.dev.map.chunk_size() as u64;
        let threshold = keep + margin(total, chunk);
        let now = Instant::now();
        let ready = {
            let mut st = self.mems[pos].lock().unwrap();
            if self.dev.held(pos) || free < threshold + chunk {
                st.above_since = None;
                false
            } else {
                let since = *st.above_since.get_or_insert(now);
                now.duration_since(since) >= SETTLE
            }
        };
        let budget = (PROMOTE_RATE as f64 * dt.as_secs_f64()) as u64;
        let room = free.saturating_sub(threshold) / chunk;
        let want = (budget / chunk).max(1).min(room) as usize;
        let picks = if ready {
            self.pick_hot(pos, want)
        } else {
            Vec::new()
        };
        let name = self.dev.backend.memory_name(pos);
        if picks.is_empty() {
            let ep = {
                let mut st = self.mems[pos].lock().unwrap();
                st.promote
                    .started
                    .take()
                    .map(|t| (t, std::mem::take(&mut st.promote)))
            };
            if let Some((started, ep)) = ep {
                tracing::info!(
                    "{name}: brought {} ({} chunks) back from the spill tier in {:.2} s",
                    gib(ep.bytes),
                    ep.chunks,
                    now.duration_since(started).as_secs_f64()
                );
            }
            return;
        }
        let results: Vec<_> = futures::stream::iter(picks)
            .map(|i| self.dev.promote(i))
            .buffer_unordered(MOVES_IN_FLIGHT)
            .collect()
            .await;
        let (mut b, mut c) = (0, 0);
        for r in results {
            match r {
                Ok(Moved::Done(n)) => {
                    b += n;
                    c += 1;
                }
                Ok(Moved::Skipped) | Err(MoveError::NoRoom) | Err(MoveError::SpillFull) => {}
                Err(MoveError::Io(e)) => tracing::warn!("{name}: bringing a chunk back: {e}"),
            }
        }
        self.promoted_bytes.fetch_add(b, Relaxed);
        self.promoted_chunks.fetch_add(c, Relaxed);
        let mut st = self.mems[pos].lock().unwrap();
        st.promote.started.get_or_insert(now);
        st.promote.bytes += b;
        st.promote.chunks += c;
    }

    fn positions(&self, positions: &[usize]) -> Result<Vec<usize>, String> {
        if positions.is_empty() {
            return Ok((0..self.mems.len()).collect());
        }
        for &p in positions {
            if p >= self.mems.len() {
                return Err(format!(
                    "this device has {} GPU(s); there is no position {p} in its --gpu list",
                    self.mems.len()
                ));
            }
        }
        Ok(positions.to_vec())
    }
}

fn monitor<B: Backend>(weak: Weak<Tiering<B>>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(
                "cannot start the tier monitor: {e}; GPU memory will not be given back"
            );
            return;
        }
    };
    rt.block_on(async move {
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(POLL).await;
            let Some(t) = weak.upgrade() else { return };
            let now = Instant::now();
            let dt = now.duration_since(last);
            last = now;
            for pos in 0..t.mems.len() {
                t.tick(pos, dt).await;
            }
        }
    });
}

#[async_trait]
impl<B: Backend> TierControl for Tiering<B> {
    fn stats(&self) -> TierStats {
        let spill = &self.dev.spill;
        TierStats {
            spill_ram_bytes: self.dev.map.in_tier(Tier::Ram).0,
            spill_file_bytes: self.dev.map.in_tier(Tier::File).0,
            spill_ram_capacity: spill.ram.as_ref().map_or(0, |r| r.capacity()),
            spill_ram_reserved: spill.ram.as_ref().map_or(0, |r| r.reserved()),
            spill_file_capacity: spill.file.as_ref().map_or(0, |f| f.capacity()),
            spilled_bytes: self.spilled_bytes.load(Relaxed),
            spilled_chunks: self.spilled_chunks.load(Relaxed),
            promoted_bytes: self.promoted_bytes.load(Relaxed),
            promoted_chunks: self.promoted_chunks.load(Relaxed),
            yields: self.yields.load(Relaxed),
            yield_seconds: self.yield_ns.load(Relaxed) as f64 / 1e9,
            memories: (0..self.mems.len())
                .map(|pos| {
                    let (free, total) = self.free(pos).unwrap_or((0, 0));
                    MemoryStatus {
                        position: pos,
                        name: self.dev.backend.memory_name(pos),
                        free,
                        total,
                        keep_free: self.dev.backend.keep_free(pos),
                        held: self.dev.held(pos),
                    }
                })
                .collect(),
        }
    }

    async fn yield_memory(
        &self,
        bytes: u64,
        positions: &[usize],
        progress: &(dyn Fn(YieldProgress) + Send + Sync),
    ) -> Result<YieldReport, String> {
        let positions = self.positions(positions)?;
        if self.dev.spill.is_empty() {
            return Err(
                "this device has no spill tier (--spill-memory 0 and no --spill-file): \
                 there is nowhere to move its chunks"
                    .into(),
            );
        }
        let started = Instant::now();
        let mut report = YieldReport::default();
        let mut failure = None;
        for &pos in &positions {
            let name = self.dev.backend.memory_name(pos);
            let Some((_, total)) = self.free(pos) else {
                return Err(format!("{name}: cannot read its free memory"));
            };
            if bytes > total {
                return Err(format!(
                    "{name} has {} in all: it cannot have {} free",
                    gib(total),
                    gib(bytes)
                ));
            }
            // Hold first: from now on no new chunk lands there and none comes back.
            self.dev.set_hold(pos, true);
            let (b, c, r) = self.spill_until(pos, bytes, progress).await;
            self.count_spilled(b, c);
            report.moved += b;
            report.chunks += c;
            report.free.push(self.free(pos).map_or(0, |f| f.0));
            if let Err(why) = r {
                failure = Some(format!(
                    "{name}: stopped short after moving {}: {why}",
                    gib(report.moved)
                ));
                break;
            }
        }
        report.seconds = started.elapsed().as_secs_f64();
        self.yields.fetch_add(1, Relaxed);
        self.yield_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
        let rate = report.moved as f64 / report.seconds.max(1e-9) / 1e9;
        match failure {
            None => {
                tracing::info!(
                    "yield: moved {} ({} chunks) to the spill tier in {:.2} s ({rate:.1} GB/s); \
                     held until `vramdisk yield --release`",
                    gib(report.moved),
                    report.chunks,
                    report.seconds
                );
                Ok(report)
            }
            Some(why) => {
                tracing::warn!("yield of {}: {why}", gib(bytes));
                Err(why)
            }
        }
    }

    fn release(&self, positions: &[usize]) {
        let positions = self.positions(positions).unwrap_or_default();
        for pos in positions {
            if self.dev.held(pos) {
                tracing::info!(
                    "{}: released; chunks come back as memory allows",
                    self.dev.backend.memory_name(pos)
                );
            }
            self.dev.set_hold(pos, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fake_gpu::FakeGpuBackend;
    use crate::engine::tier::{SpillRam, SpillStore};
    use crate::engine::{BlockDevice, SparseOptions};

    const CHUNK: u64 = 64 << 10;

    /// Another program squeezes the fake GPU into --keep-free: the monitor moves chunks out
    /// until the reserve is back; it lets go, and they come back. A yield frees what it
    /// asks for and holds it until released. Every byte reads back throughout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watermark_and_yield_move_chunks_both_ways() {
        let total = 64 * CHUNK;
        let mut opts = SparseOptions::new(48 * CHUNK);
        opts.chunk_size = CHUNK as usize;
        let backend = FakeGpuBackend::new(total, 8 * CHUNK, None);
        let others = backend.others();
        let spill = SpillStore {
            ram: Some(SpillRam::new(CHUNK as usize, 48 * CHUNK)),
            file: None,
        };
        let dev = Arc::new(SparseDevice::with_spill(backend, opts, spill).unwrap());
        let data: Vec<u8> = (0..48 * CHUNK).map(|i| (i % 253) as u8).collect();
        dev.write(0, &data, false).await.unwrap();
        let t = Tiering::start(dev.clone());
        let check = || async {
            let mut back = vec![0u8; data.len()];
            dev.read(0, &mut back).await.unwrap();
            assert!(back == data, "data changed");
        };
        let free = |t: &Tiering<FakeGpuBackend>| t.stats().memories[0].free;
        // Squeeze: others take 24 chunks, leaving 64 - 48 - 24 < 0 + 8 reserve.
        others.store(24 * CHUNK, Relaxed);
        let deadline = Instant::now() + Duration::from_secs(20);
        while free(&t) < 8 * CHUNK {
            assert!(Instant::now() < deadline, "the reserve was never restored");
            tokio::time::sleep(POLL).await;
        }
        assert!(dev.stats().spilled_ram >= 16 * CHUNK);
        check().await;
        // Release: chunks come back once memory has been free for SETTLE.
        others.store(0, Relaxed);
        let deadline = Instant::now() + Duration::from_secs(20);
        while dev.stats().spilled_ram > 0 {
            assert!(Instant::now() < deadline, "chunks never came back");
            tokio::time::sleep(POLL).await;
        }
        check().await;
        // Yield 40 chunks: 16 are free, so at least 24 move out, and stay out while held.
        let r = t.yield_memory(40 * CHUNK, &[], &|_| {}).await.unwrap();
        assert!(r.moved >= 24 * CHUNK && free(&t) >= 40 * CHUNK, "{r:?}");
        assert!(t.stats().memories[0].held);
        tokio::time::sleep(SETTLE + 10 * POLL).await;
        assert!(free(&t) >= 40 * CHUNK, "chunks came back while held");
        // New writes while held go to spill RAM, not the GPU.
        dev.trim(0, CHUNK).await.unwrap();
        dev.write(0, &data[..CHUNK as usize], false).await.unwrap();
        assert!(free(&t) >= 40 * CHUNK);
        check().await;
        // Asking for more than can be freed fails with a sentence and loses nothing: with
        // others holding 10 chunks, at most 54 can be free.
        others.store(10 * CHUNK, Relaxed);
        let e = t.yield_memory(60 * CHUNK, &[], &|_| {}).await.unwrap_err();
        assert!(e.contains("short"), "{e}");
        check().await;
        others.store(0, Relaxed);
        t.release(&[]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while dev.stats().spilled_ram > 0 {
            assert!(
                Instant::now() < deadline,
                "chunks never came back after release"
            );
            tokio::time::sleep(POLL).await;
        }
        check().await;
        let s = t.stats();
        assert!(
            s.spilled_bytes > 0 && s.promoted_bytes > 0 && s.yields == 2,
            "{s:?}"
        );
    }
}
