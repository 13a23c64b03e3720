//! [`SparseDevice`]: a [`BlockDevice`] made of a [`ChunkMap`] over any [`Backend`].

use super::chunk_map::{Allocated, Segment};
use super::tier::{Home, SpillStore, Tier};
use super::{
    Backend, BlockDevice, BufferBudget, BufferPool, Capabilities, ChunkMap, DeviceStats, Extent,
    IoError, IoResult, View, ZeroFlags, check_range,
};
use async_trait::async_trait;
use futures::future::try_join_all;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// One slot's chunk: its home in some tier, with its accounting and move state.
pub(crate) type Slot<C> = Allocated<Home<C>>;

/// How a [`SparseDevice`] is laid out and limited.
#[derive(Clone, Debug)]
pub struct SparseOptions {
    /// Advertised size in bytes.
    pub size: u64,
    /// Allocation unit in bytes (a power of two).
    pub chunk_size: usize,
    /// Most backend memory the device may hold; writes beyond it fail with ENOSPC.
    pub max_memory: Option<u64>,
    /// Refuse writes, trims and zeroes.
    pub read_only: bool,
    /// Allocate every chunk at start and never free one (no allocation on the I/O path,
    /// as swap needs); TRIM then zeroes instead of freeing.
    pub preallocate: bool,
    /// Most bytes of I/O buffers in use at once for this device; ignored when
    /// `buffer_budget` is given.
    pub buffer_limit: usize,
    /// A budget for I/O buffers shared with other devices (the daemon's `--buffer-memory`
    /// covers all its exports together).
    pub buffer_budget: Option<BufferBudget>,
    /// Largest payload of one request.
    pub max_request: u32,
}

impl SparseOptions {
    /// Defaults for a device of `size` bytes: 1 MiB chunks, 1 GiB of buffers, 32 MiB requests.
    pub fn new(size: u64) -> Self {
        SparseOptions {
            size,
            chunk_size: 1 << 20,
            max_memory: None,
            read_only: false,
            preallocate: false,
            buffer_limit: 1 << 30,
            buffer_budget: None,
            max_request: 32 << 20,
        }
    }
}

/// A block device whose memory is taken chunk by chunk from a backend on first write and
/// given back when a TRIM or write-zeroes covers a whole chunk.
///
/// With a spill tier, chunks the backend has no room for (or that were moved out to give a
/// GPU's memory back, see [`super::tier`]) live in spill RAM or a spill file instead.
pub struct SparseDevice<B: Backend> {
    pub(crate) backend: B,
    pub(crate) map: ChunkMap<Home<B::Chunk>>,
    opts: SparseOptions,
    pub(crate) buffers: BufferPool,
    pub(crate) spill: SpillStore,
    /// Per backend memory: set while a yield holds it, so new chunks go to the spill tier.
    holds: Box<[AtomicBool]>,
    /// Woken whenever a move ends, for writes that found their chunk moving.
    pub(crate) moved: tokio::sync::Notify,
}

impl<B: Backend> SparseDevice<B> {
    /// Builds the device; with `preallocate`, takes all its memory now and fails if it can't.
    pub fn new(backend: B, opts: SparseOptions) -> IoResult<Self> {
        Self::with_spill(backend, opts, SpillStore::default())
    }

    /// Like [`SparseDevice::new`], with chunks spilling to `spill` when the backend has no
    /// room; the spill RAM is pinned by this backend's allocator if nobody pinned it yet.
    pub fn with_spill(backend: B, opts: SparseOptions, spill: SpillStore) -> IoResult<Self> {
        Self::with_progress(backend, opts, spill, &super::persist::NoProgress)
    }

    /// Like [`SparseDevice::with_spill`], reporting the bytes taken so far on `progress`
    /// while it preallocates (which can take minutes for a large device).
    pub fn with_progress(
        backend: B,
        opts: SparseOptions,
        spill: SpillStore,
        progress: &dyn super::persist::Progress,
    ) -> IoResult<Self> {
        let budget = opts
            .buffer_budget
            .clone()
            .unwrap_or_else(|| BufferBudget::new(opts.buffer_limit));
        let buffers = BufferPool::with_budget(backend.host_allocator(), budget);
        let map = ChunkMap::new(opts.size, opts.chunk_size, opts.max_memory);
        if let Some(ram) = &spill.ram {
            ram.bind_allocator(backend.host_allocator());
        }
        let holds = (0..backend.memories())
            .map(|_| AtomicBool::new(false))
            .collect();
        let dev = SparseDevice {
            backend,
            map,
            opts,
            buffers,
            spill,
            holds,
            moved: tokio::sync::Notify::new(),
        };
        if dev.opts.preallocate {
            let mut done = 0;
            for index in 0..dev.map.len() {
                let taken = dev.chunk_for_write(index);
                if taken.is_err() {
                    progress.finish();
                }
                taken?;
                done += dev.map.chunk_len(index) as u64;
                progress.update(done);
            }
            progress.finish();
        }
        Ok(dev)
    }

    /// The backend under this device.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The chunk map (for tests and stats).
    pub fn map(&self) -> &ChunkMap<Home<B::Chunk>> {
        &self.map
    }

    /// The spill tiers of this device (empty without spilling).
    pub fn spill(&self) -> &SpillStore {
        &self.spill
    }

    /// The backend memory chunk `index` lives in when it is in the primary tier.
    pub fn position(&self, index: u64) -> usize {
        (index % self.holds.len().max(1) as u64) as usize
    }

    /// Holds (or lets go of) backend memory `position`: while held, new chunks of it go to
    /// the spill tier and none come back.
    pub fn set_hold(&self, position: usize, held: bool) {
        if let Some(h) = self.holds.get(position) {
            h.store(held, Ordering::Relaxed);
        }
    }

    /// True while a yield holds backend memory `position`.
    pub fn held(&self, position: usize) -> bool {
        self.holds
            .get(position)
            .is_some_and(|h| h.load(Ordering::Relaxed))
    }

    fn chunk_for_write(&self, index: u64) -> IoResult<Arc<Slot<B::Chunk>>> {
        self.map
            .get_or_alloc(index, |i, len| self.alloc_home(i, len))
    }

    /// Memory for a new chunk: the backend's unless it is held or full, else the spill tier.
    fn alloc_home(&self, index: u64, len: usize) -> IoResult<(Home<B::Chunk>, Tier)> {
        let pos = self.position(index);
        if !self.held(pos) || self.spill.is_empty() {
            match self.backend.alloc_chunk(index, len) {
                Ok(c) => return Ok((Home::Primary(c), Tier::Primary)),
                Err(IoError::NoSpace(_)) if !self.spill.is_empty() => {}
                Err(e) => return Err(e),
            }
        }
        if let Some(ram) = &self.spill.ram
            && let Some(c) = ram.alloc()?
        {
            let dst = c.range(0, len)?;
            // SAFETY: the slot is ours alone until it is in the map; len is checked.
            unsafe { std::ptr::write_bytes(dst, 0, len) };
            return Ok((Home::Ram(c), Tier::Ram));
        }
        if let Some(file) = &self.spill.file
            && let Some(c) = file.alloc()
        {
            c.zero(0, len)?;
            return Ok((Home::File(c), Tier::File));
        }
        Err(IoError::NoSpace(format!(
            "chunk {index}: {} has no room and the spill tier ({} bytes) is full",
            self.backend.memory_name(pos),
            self.spill.capacity()
        )))
    }

    /// Waits until chunk `index` is no longer `chunk` in the middle of a move.
    pub(crate) async fn wait_moved(&self, index: u64, chunk: &Arc<Slot<B::Chunk>>) {
        loop {
            let notified = self.moved.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let same = matches!(self.map.get(index), Some(c) if Arc::ptr_eq(&c, chunk));
            if !same || !chunk.state().is_moving() {
                return;
            }
            notified.await;
        }
    }

    fn check_writable(&self, offset: u64, len: u64) -> IoResult<()> {
        if self.opts.read_only {
            return Err(IoError::ReadOnly);
        }
        check_range(offset, len, self.opts.size)
    }

    async fn read_segment(&self, seg: Segment, buf: &mut [u8]) -> IoResult<()> {
        match self.map.get(seg.index) {
            None => {
                buf.fill(0);
                Ok(())
            }
            Some(chunk) => {
                chunk.state().touch();
                chunk.mem().read(&self.backend, seg.chunk_offset, buf).await
            }
        }
    }

    async fn write_segment(&self, seg: Segment, data: &[u8]) -> IoResult<()> {
        loop {
            let chunk = self.chunk_for_write(seg.index)?;
            chunk.state().touch();
            // A chunk on its way to another tier takes no writes: they go to its new home.
            let Some(_pin) = chunk.state().pin_write() else {
                self.wait_moved(seg.index, &chunk).await;
                continue;
            };
            return chunk
                .mem()
                .write(&self.backend, seg.chunk_offset, data)
                .await;
        }
    }

    async fn zero_segment(&self, seg: Segment, may_trim: bool) -> IoResult<()> {
        if seg.whole && may_trim && !self.opts.preallocate {
            self.map.free(seg.index);
            return Ok(());
        }
        loop {
            let chunk = if may_trim {
                // A hole already reads as zeros; don't allocate just to zero.
                match self.map.get(seg.index) {
                    Some(chunk) => chunk,
                    None => return Ok(()),
                }
            } else {
                // NO_HOLE: the range must stay allocated, so that later writes cannot fail.
                self.chunk_for_write(seg.index)?
            };
            let Some(_pin) = chunk.state().pin_write() else {
                self.wait_moved(seg.index, &chunk).await;
                continue;
            };
            return chunk
                .mem()
                .zero(&self.backend, seg.chunk_offset, seg.len)
                .await;
        }
    }
}

#[async_trait]
impl<B: Backend> BlockDevice for SparseDevice<B> {
    fn size(&self) -> u64 {
        self.opts.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.opts.read_only,
            can_flush: true,
            can_fua: true,
            can_trim: !self.opts.read_only,
            can_zero: !self.opts.read_only,
            can_fast_zero: !self.opts.read_only,
            can_multi_conn: true,
            can_cache: true,
            can_extents: true,
            min_block: 1,
            preferred_block: 4096,
            max_block: self.opts.max_request,
        }
    }

    fn describe(&self) -> String {
        self.backend.describe()
    }

    fn buffers(&self) -> &BufferPool {
        &self.buffers
    }

    fn stats(&self) -> DeviceStats {
        DeviceStats {
            size: self.opts.size,
            allocated: self.map.allocated(),
            max_memory: self.map.max_memory(),
            chunks: self.map.allocated_chunks(),
            spilled_ram: self.map.in_tier(Tier::Ram).0,
            spilled_file: self.map.in_tier(Tier::File).0,
        }
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> IoResult<()> {
        check_range(offset, buf.len() as u64, self.opts.size)?;
        let mut segs = self.map.segments(offset, buf.len() as u64);
        let first = match segs.next() {
            Some(seg) => seg,
            None => return Ok(()),
        };
        if first.len == buf.len() {
            return self.read_segment(first, buf).await;
        }
        let mut rest = buf;
        let mut futs = Vec::new();
        for seg in std::iter::once(first).chain(segs) {
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(seg.len);
            rest = tail;
            futs.push(self.read_segment(seg, piece));
        }
        try_join_all(futs).await.map(drop)
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> IoResult<()> {
        self.check_writable(offset, data.len() as u64)?;
        let mut segs = self.map.segments(offset, data.len() as u64);
        match segs.next() {
            None => {}
            // Most writes lie in one chunk: no list of futures to allocate.
            Some(seg) if seg.len == data.len() => self.write_segment(seg, data).await?,
            Some(first) => {
                try_join_all(
                    std::iter::once(first)
                        .chain(segs)
                        .map(|seg| self.write_segment(seg, &data[seg.range_offset..][..seg.len])),
                )
                .await?;
            }
        }
        if fua {
            self.backend.flush().await?;
        }
        Ok(())
    }

    fn write_now(&self, offset: u64, data: &[u8], fua: bool) -> Option<IoResult<()>> {
        // The backend's flush is async, and a write over two chunks may meet one of them
        // moving after the other is written: both take the async path, all or nothing.
        if fua {
            return None;
        }
        if let Err(e) = self.check_writable(offset, data.len() as u64) {
            return Some(Err(e));
        }
        let Some(seg) = self.map.segments(offset, data.len() as u64).next() else {
            return Some(Ok(()));
        };
        if seg.len != data.len() {
            return None;
        }
        let chunk = match self.chunk_for_write(seg.index) {
            Ok(c) => c,
            Err(e) => return Some(Err(e)),
        };
        chunk.state().touch();
        // A chunk on its way to another tier: `write` waits for its new home.
        let _pin = chunk.state().pin_write()?;
        chunk.mem().write_now(&self.backend, seg.chunk_offset, data)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoResult<()> {
        self.check_writable(offset, len)?;
        try_join_all(
            self.map
                .segments(offset, len)
                .map(|seg| self.zero_segment(seg, flags.may_trim)),
        )
        .await?;
        if flags.fua {
            self.backend.flush().await?;
        }
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> IoResult<()> {
        self.check_writable(offset, len)?;
        try_join_all(
            self.map
                .segments(offset, len)
                .map(|seg| self.zero_segment(seg, true)),
        )
        .await
        .map(drop)
    }

    async fn flush(&self) -> IoResult<()> {
        self.backend.flush().await
    }

    async fn cache(&self, offset: u64, len: u64) -> IoResult<()> {
        check_range(offset, len, self.opts.size)
    }

    fn view(&self, offset: u64, len: u64) -> Option<IoResult<View>> {
        if let Err(e) = check_range(offset, len, self.opts.size) {
            return Some(Err(e));
        }
        let mut view = View::new();
        for seg in self.map.segments(offset, len) {
            match self.map.get(seg.index) {
                None => view.push_zeros(seg.len),
                Some(chunk) => {
                    chunk.state().touch();
                    let ptr = chunk
                        .mem()
                        .host_bytes(&self.backend, seg.chunk_offset, seg.len)?;
                    // SAFETY: the backend vouches for `len` bytes at `ptr` inside the
                    // chunk, which the view holds.
                    unsafe { view.push_mem(chunk, ptr, seg.len) };
                }
            }
        }
        Some(Ok(view))
    }

    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> IoResult<()> {
        check_range(offset, len, self.opts.size)?;
        self.map.extents(offset, len, out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::host::HostBackend;

    fn device(size: u64, chunk: usize) -> Arc<SparseDevice<HostBackend>> {
        let mut opts = SparseOptions::new(size);
        opts.chunk_size = chunk;
        Arc::new(SparseDevice::new(HostBackend::new(), opts).unwrap())
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
            .collect()
    }

    /// Host memory takes writes within one chunk at once; a write over two chunks, or with
    /// FUA, is left to `write` untouched; refusals come back at once, as from `write`.
    #[tokio::test]
    async fn writes_within_a_chunk_complete_at_once() {
        let dev = device(64 * 1024, 4096);
        let data = pattern(3, 4096);
        assert!(matches!(dev.write_now(8192, &data, false), Some(Ok(()))));
        let mut back = vec![0u8; 4096];
        dev.read(8192, &mut back).await.unwrap();
        assert_eq!(back, data);
        assert!(
            dev.write_now(8192 + 1, &data, false).is_none(),
            "two chunks"
        );
        assert!(dev.write_now(0, &data, true).is_none(), "fua");
        dev.read(8192 + 1, &mut back).await.unwrap();
        assert_eq!(
            back[..4095],
            data[1..],
            "nothing written by the refused calls"
        );
        assert_eq!(dev.stats().chunks, 1, "nor any chunk taken");
        assert!(matches!(
            dev.write_now(64 * 1024 - 10, &data, false),
            Some(Err(IoError::OutOfRange { .. }))
        ));
        let mut o = SparseOptions::new(64 * 1024);
        o.read_only = true;
        let ro = SparseDevice::new(HostBackend::new(), o).unwrap();
        assert!(matches!(
            ro.write_now(0, &data, false),
            Some(Err(IoError::ReadOnly))
        ));
    }

    #[tokio::test]
    async fn views_match_reads_and_hold_trimmed_chunks() {
        let dev = device(64 * 1024, 4096);
        dev.write(4096 + 10, &pattern(1, 3 * 4096), false)
            .await
            .unwrap();
        // Unaligned, across chunks and holes on both sides.
        for (off, len) in [
            (0u64, 64 * 1024u64),
            (100, 4096 * 5),
            (4096 + 10, 1),
            (8000, 0),
        ] {
            let v = dev.view(off, len).unwrap().unwrap();
            let mut lent = vec![0xaau8; len as usize];
            v.copy_to(&mut lent);
            let mut read = vec![0x55u8; len as usize];
            dev.read(off, &mut read).await.unwrap();
            assert_eq!(lent, read, "{off}+{len}");
        }
        assert!(matches!(
            dev.view(60 * 1024, 8192),
            Some(Err(IoError::OutOfRange { .. }))
        ));
        // A trim while a view is out empties the map at once, but the view still reads
        // what it lent and the memory goes back only when the view does.
        let v = dev.view(4096, 4096).unwrap().unwrap();
        let before = dev.stats().allocated;
        dev.trim(0, 64 * 1024).await.unwrap();
        let mut now = vec![1u8; 4096];
        dev.read(4096, &mut now).await.unwrap();
        assert!(now.iter().all(|&b| b == 0), "trimmed range reads zeros");
        assert_eq!(dev.stats().chunks, 1, "the lent chunk is still held");
        assert_eq!(dev.stats().allocated, 4096);
        let mut lent = vec![0u8; 4096];
        v.copy_to(&mut lent);
        assert_eq!(lent[10..], pattern(1, 4096)[..4096 - 10]);
        drop(v);
        assert!(before > 4096);
        assert_eq!((dev.stats().chunks, dev.stats().allocated), (0, 0));
    }

    #[tokio::test]
    async fn unwritten_reads_zero_and_allocates_nothing() {
        let dev = device(1 << 20, 4096);
        let mut buf = vec![0xffu8; 10_000];
        dev.read(1234, &mut buf).await.unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(dev.stats().allocated, 0);
    }

    #[tokio::test]
    async fn unaligned_writes_cross_chunks_and_read_back() {
        let dev = device(1 << 20, 4096);
        let data = pattern(1, 9000);
        dev.write(4000, &data, false).await.unwrap();
        // 4000..13000 touches chunks 0 to 3.
        assert_eq!(dev.stats().chunks, 4);
        let mut buf = vec![0u8; 9000];
        dev.read(4000, &mut buf).await.unwrap();
        assert_eq!(buf, data);
        // The bytes around the write stay zero.
        let mut edge = vec![1u8; 4000];
        dev.read(0, &mut edge).await.unwrap();
        assert!(edge.iter().all(|&b| b == 0));
    }

    #[tokio::test]
    async fn out_of_range_and_read_only_are_refused() {
        let dev = device(8192, 4096);
        let mut buf = vec![0u8; 2];
        assert!(matches!(
            dev.read(8191, &mut buf).await,
            Err(IoError::OutOfRange { .. })
        ));
        assert!(dev.write(u64::MAX, &buf, false).await.is_err());
        assert!(dev.trim(4096, 4097).await.is_err());
        let mut opts = SparseOptions::new(8192);
        opts.chunk_size = 4096;
        opts.read_only = true;
        let ro = SparseDevice::new(HostBackend::new(), opts).unwrap();
        assert!(matches!(
            ro.write(0, &buf, false).await,
            Err(IoError::ReadOnly)
        ));
        assert!(ro.capabilities().read_only);
    }

    #[tokio::test]
    async fn trim_and_zero_free_whole_chunks_and_zero_partial_ones() {
        let dev = device(4 * 4096, 4096);
        dev.write(0, &pattern(2, 4 * 4096), false).await.unwrap();
        assert_eq!(dev.stats().allocated, 4 * 4096);
        // Covers chunk 1 whole and the first 100 bytes of chunk 2.
        dev.trim(4096, 4096 + 100).await.unwrap();
        assert_eq!(dev.stats().chunks, 3);
        let mut buf = vec![1u8; 4096 + 100];
        dev.read(4096, &mut buf).await.unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        let mut rest = vec![0u8; 4096 - 100];
        dev.read(2 * 4096 + 100, &mut rest).await.unwrap();
        assert_eq!(rest, pattern(2, 4 * 4096)[2 * 4096 + 100..3 * 4096]);

        // NO_HOLE keeps (and even creates) the allocation; may_trim frees it.
        let no_hole = ZeroFlags::default();
        dev.write_zeroes(4096, 4096, no_hole).await.unwrap();
        assert_eq!(dev.stats().chunks, 4);
        let trim = ZeroFlags {
            may_trim: true,
            ..ZeroFlags::default()
        };
        dev.write_zeroes(0, 2 * 4096, trim).await.unwrap();
        assert_eq!(dev.stats().chunks, 2);
        let mut ext = Vec::new();
        dev.extents(0, 4 * 4096, &mut ext).unwrap();
        assert_eq!(ext.len(), 2);
        assert!(ext[0].hole && ext[0].zero && ext[0].length == 2 * 4096);
        assert!(!ext[1].hole);
    }

    #[tokio::test]
    async fn max_memory_gives_enospc_until_trimmed() {
        let mut opts = SparseOptions::new(1 << 20);
        opts.chunk_size = 4096;
        opts.max_memory = Some(2 * 4096);
        let dev = SparseDevice::new(HostBackend::new(), opts).unwrap();
        let data = vec![9u8; 4096];
        dev.write(0, &data, false).await.unwrap();
        dev.write(4096, &data, false).await.unwrap();
        let err = dev.write(8192, &data, false).await.unwrap_err();
        assert_eq!(err.errno(), libc::ENOSPC);
        dev.trim(0, 4096).await.unwrap();
        dev.write(8192, &data, true).await.unwrap();
    }

    #[tokio::test]
    async fn preallocate_takes_everything_and_trim_keeps_it() {
        let mut opts = SparseOptions::new(3 * 4096 + 10);
        opts.chunk_size = 4096;
        opts.preallocate = true;
        let dev = SparseDevice::new(HostBackend::new(), opts.clone()).unwrap();
        assert_eq!(dev.stats().allocated, 3 * 4096 + 10);
        dev.write(0, &[5u8; 100], false).await.unwrap();
        dev.trim(0, 4096).await.unwrap();
        assert_eq!(dev.stats().chunks, 4);
        let mut buf = [1u8; 100];
        dev.read(0, &mut buf).await.unwrap();
        assert_eq!(buf, [0u8; 100]);
        opts.max_memory = Some(4096);
        assert!(SparseDevice::new(HostBackend::new(), opts).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_on_disjoint_ranges() {
        let dev = device(64 << 20, 1 << 20);
        let tasks: Vec<_> = (0..64u64)
            .map(|t| {
                let dev = dev.clone();
                tokio::spawn(async move {
                    // Each task owns a 1 MiB range split into uneven pieces, some of them
                    // sharing chunks with neighbours' ranges.
                    let base = t * (1 << 20) + 333;
                    let len = (1 << 20) - 666;
                    let data = pattern(t, len);
                    for piece in data.chunks(4099).enumerate() {
                        let off = base + (piece.0 * 4099) as u64;
                        dev.write(off, piece.1, false).await.unwrap();
                    }
                    let mut back = vec![0u8; len];
                    dev.read(base, &mut back).await.unwrap();
                    assert_eq!(back, data, "task {t} read back other data");
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        for t in 0..64u64 {
            let mut back = vec![0u8; (1 << 20) - 666];
            dev.read(t * (1 << 20) + 333, &mut back).await.unwrap();
            assert_eq!(back, pattern(t, (1 << 20) - 666));
        }
    }

    /// Many threads on the same chunks at once: each owns one slice of every chunk and
    /// writes, zeroes (with and without NO_HOLE) and trims it, so first writes to a fresh
    /// chunk race each other and partial zeroes race writes beside them; a reaper frees
    /// whole chunks (TRIM or write-zeroes) between those, and the chunks are allocated
    /// again by the next racing writes. The memory cap is tight, so allocations also race
    /// for the last bytes of it. Every read must see exactly what its owner's model says,
    /// and once everything is trimmed, no memory may be left charged.
    #[test]
    fn racing_writes_zeroes_and_trims_on_shared_chunks() {
        use futures::executor::block_on;
        use std::sync::RwLock;
        const CHUNK: usize = 16 << 10;
        const CHUNKS: usize = 24;
        const OWNERS: usize = 4;
        const SLICE: usize = CHUNK / OWNERS;
        let mut opts = SparseOptions::new((CHUNK * CHUNKS) as u64);
        opts.chunk_size = CHUNK;
        // Two thirds of the chunks: writes beyond get ENOSPC and change nothing.
        opts.max_memory = Some((CHUNK * CHUNKS * 2 / 3) as u64);
        let dev = Arc::new(SparseDevice::new(HostBackend::new(), opts).unwrap());
        // Per chunk: how many times the reaper has freed it. Owners hold the read lock
        // while they work on their slice, the reaper the write lock while it frees.
        let gens: Arc<Vec<RwLock<u64>>> = Arc::new((0..CHUNKS).map(|_| RwLock::new(0)).collect());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Each owner runs for 2 s, and on past that (up to a minute, on a loaded machine)
        // until it has done 300 operations and the reaper has freed 100 chunks.
        let start = std::time::Instant::now();
        let (least, most) = (
            start + std::time::Duration::from_secs(2),
            start + std::time::Duration::from_secs(60),
        );
        let reaped = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let owners: Vec<_> = (0..OWNERS)
            .map(|t| {
                let (dev, gens, reaped) = (dev.clone(), gens.clone(), reaped.clone());
                std::thread::spawn(move || {
                    // Per chunk: the version in my slice (0: zeroes) and the reaper
                    // generation it was written under.
                    let mut model = vec![(0u64, 0u64); CHUNKS];
                    let mut rng = 0x1234_5678_u64 ^ (t as u64) << 40;
                    let mut next = |n: u64| {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng % n
                    };
                    let (mut ops, mut nospace, mut version) = (0u64, 0u64, 0u64);
                    let mut buf = vec![0u8; SLICE];
                    loop {
                        let now = std::time::Instant::now();
                        let enough =
                            ops >= 300 && reaped.load(std::sync::atomic::Ordering::Relaxed) >= 100;
                        if now >= most || (now >= least && enough) {
                            break;
                        }
                        let c = next(CHUNKS as u64) as usize;
                        let off = (c * CHUNK + t * SLICE) as u64;
                        let g = gens[c].read().unwrap();
                        if model[c].1 != *g {
                            model[c] = (0, *g);
                        }
                        match next(6) {
                            0 | 1 => {
                                version += 1;
                                let data = pattern(version << 8 | t as u64, SLICE);
                                match block_on(dev.write(off, &data, false)) {
                                    Ok(()) => model[c] = (version, *g),
                                    Err(IoError::NoSpace(_)) => nospace += 1,
                                    Err(e) => panic!("write: {e}"),
                                }
                            }
                            2 => {
                                let flags = ZeroFlags {
                                    may_trim: next(2) == 0,
                                    ..ZeroFlags::default()
                                };
                                match block_on(dev.write_zeroes(off, SLICE as u64, flags)) {
                                    Ok(()) => model[c] = (0, *g),
                                    // NO_HOLE on a hole must allocate; the cap may say no,
                                    // and a hole reads as zeroes anyway.
                                    Err(IoError::NoSpace(_)) => nospace += 1,
                                    Err(e) => panic!("write zeroes: {e}"),
                                }
                            }
                            3 => {
                                block_on(dev.trim(off, SLICE as u64)).unwrap();
                                model[c] = (0, *g);
                            }
                            _ => {}
                        }
                        block_on(dev.read(off, &mut buf)).unwrap();
                        let want = match model[c].0 {
                            0 => vec![0u8; SLICE],
                            v => pattern(v << 8 | t as u64, SLICE),
                        };
                        assert!(
                            buf == want,
                            "owner {t}, chunk {c}: read back other data than version {}",
                            model[c].0
                        );
                        drop(g);
                        ops += 1;
                    }
                    (ops, nospace)
                })
            })
            .collect();
        let reaper = {
            let (dev, gens, stop) = (dev.clone(), gens.clone(), stop.clone());
            let reaped = reaped.clone();
            std::thread::spawn(move || {
                let mut frees = 0u64;
                let mut i = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let c = (i * 7) % CHUNKS;
                    let mut g = gens[c].write().unwrap();
                    let off = (c * CHUNK) as u64;
                    if i.is_multiple_of(2) {
                        block_on(dev.trim(off, CHUNK as u64)).unwrap();
                    } else {
                        let flags = ZeroFlags {
                            may_trim: true,
                            ..ZeroFlags::default()
                        };
                        block_on(dev.write_zeroes(off, CHUNK as u64, flags)).unwrap();
                    }
                    assert!(dev.map().get(c as u64).is_none(), "chunk {c} not freed");
                    *g += 1;
                    frees += 1;
                    reaped.store(frees, std::sync::atomic::Ordering::Relaxed);
                    drop(g);
                    std::thread::yield_now();
                }
                frees
            })
        };
        let mut total = 0;
        let mut nospace = 0;
        for o in owners {
            let (n, f) = o.join().expect("an owner saw wrong data");
            total += n;
            nospace += f;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let frees = reaper.join().unwrap();
        assert!(
            total >= 300 * OWNERS as u64 && frees >= 100,
            "{total} ops, {frees} frees in a minute"
        );
        let cap = dev.stats().max_memory.unwrap();
        assert!(dev.stats().allocated <= cap, "over the cap");
        assert!(nospace > 0, "the cap was never reached: {total} ops");
        block_on(dev.trim(0, (CHUNK * CHUNKS) as u64)).unwrap();
        assert_eq!(dev.stats().allocated, 0, "memory left charged");
        assert_eq!(dev.stats().chunks, 0, "chunks left counted");
    }
}
