//! [`SparseDevice`]: a [`BlockDevice`] made of a [`ChunkMap`] over any [`Backend`].

use super::chunk_map::{Allocated, Segment};
use super::{
    Backend, BlockDevice, BufferPool, Capabilities, ChunkMap, DeviceStats, Extent, IoError,
    IoResult, ZeroFlags, check_range,
};
use async_trait::async_trait;
use futures::future::try_join_all;
use std::sync::Arc;

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
    /// Most bytes of I/O buffers in use at once, process-wide for this device.
    pub buffer_limit: usize,
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
            max_request: 32 << 20,
        }
    }
}

/// A block device whose memory is taken chunk by chunk from a backend on first write and
/// given back when a TRIM or write-zeroes covers a whole chunk.
pub struct SparseDevice<B: Backend> {
    backend: B,
    map: ChunkMap<B::Chunk>,
    opts: SparseOptions,
    buffers: BufferPool,
}

impl<B: Backend> SparseDevice<B> {
    /// Builds the device; with `preallocate`, takes all its memory now and fails if it can't.
    pub fn new(backend: B, opts: SparseOptions) -> IoResult<Self> {
        let buffers = BufferPool::new(backend.host_allocator(), opts.buffer_limit);
        let map = ChunkMap::new(opts.size, opts.chunk_size, opts.max_memory);
        let dev = SparseDevice {
            backend,
            map,
            opts,
            buffers,
        };
        if dev.opts.preallocate {
            for index in 0..dev.map.len() {
                dev.chunk_for_write(index)?;
            }
        }
        Ok(dev)
    }

    /// The backend under this device.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The chunk map (for tests and stats).
    pub fn map(&self) -> &ChunkMap<B::Chunk> {
        &self.map
    }

    fn chunk_for_write(&self, index: u64) -> IoResult<Arc<Allocated<B::Chunk>>> {
        self.map
            .get_or_alloc(index, |i, len| self.backend.alloc_chunk(i, len))
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
            Some(chunk) => self.backend.read(chunk.mem(), seg.chunk_offset, buf).await,
        }
    }

    async fn write_segment(&self, seg: Segment, data: &[u8]) -> IoResult<()> {
        let chunk = self.chunk_for_write(seg.index)?;
        self.backend
            .write(chunk.mem(), seg.chunk_offset, data)
            .await
    }

    async fn zero_segment(&self, seg: Segment, may_trim: bool) -> IoResult<()> {
        if seg.whole && may_trim && !self.opts.preallocate {
            self.map.free(seg.index);
            return Ok(());
        }
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
        self.backend
            .zero(chunk.mem(), seg.chunk_offset, seg.len)
            .await
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
        let segs: Vec<Segment> = self.map.segments(offset, data.len() as u64).collect();
        match segs.as_slice() {
            [] => {}
            [seg] => self.write_segment(*seg, data).await?,
            _ => {
                try_join_all(
                    segs.iter()
                        .map(|seg| self.write_segment(*seg, &data[seg.range_offset..][..seg.len])),
                )
                .await?;
            }
        }
        if fua {
            self.backend.flush().await?;
        }
        Ok(())
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

    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> IoResult<()> {
        check_range(offset, len, self.opts.size)?;
        self.map.extents(offset, len, out);
        Ok(())
    }
}
