//! [`CudaBackend`]: the [`Backend`] that keeps chunks in GPU memory.

use super::driver::{CuError, Gpu};
use super::memory::{GpuChunk, GpuMemory};
use super::pinned::{PinnedAllocator, PinnedRegistry, StagingPool};
use super::queue::{CopyQueue, Op, OpKind, QueueOptions};
use crate::engine::{Backend, HostAllocator, IoError, IoResult};
use async_trait::async_trait;
use std::sync::Arc;

use crate::tunables::{CUDA_STAGING_SLOT_SIZE, CUDA_STAGING_SLOTS};

/// Chunks in the memory of one or more GPUs; chunk `i` lives on GPU `i % n`.
pub struct CudaBackend {
    memories: Vec<Arc<GpuMemory>>,
    queues: Vec<CopyQueue>,
    registry: Arc<PinnedRegistry>,
    allocator: Arc<PinnedAllocator>,
    staging: StagingPool,
    chunk_size: usize,
    describe: String,
}

impl CudaBackend {
    /// A backend on `gpus` (in `--gpu` order) for a device in chunks of `chunk_size`,
    /// leaving `keep_free` bytes free on each GPU.
    pub fn new(
        gpus: &[Arc<Gpu>],
        chunk_size: usize,
        keep_free: u64,
        queue: QueueOptions,
    ) -> Result<CudaBackend, String> {
        let first = gpus.first().ok_or("no GPU given")?.clone();
        let mut memories = Vec::new();
        let mut queues = Vec::new();
        for (pos, gpu) in gpus.iter().enumerate() {
            let mem = GpuMemory::new(gpu.clone(), pos, keep_free)
                .map_err(|e| format!("GPU {}: {e}", gpu.index))?;
            memories.push(Arc::new(mem));
        }
        let registry = PinnedRegistry::global();
        let allocator = Arc::new(PinnedAllocator::new(first.clone(), registry.clone()));
        let staging = StagingPool::new(
            allocator.clone(),
            CUDA_STAGING_SLOTS,
            CUDA_STAGING_SLOT_SIZE,
        )
        .map_err(|e| format!("allocating the staging buffers: {e}"))?;
        // The gather kernel addresses host buffers by their host pointers, which needs unified
        // addressing (mapped pointer == host pointer); without it, copies go one by one.
        let mut queue = queue;
        let base = staging.base();
        let unified = gpus
            .iter()
            .all(|_| allocator.device_address(base) == Some(base.as_ptr() as u64));
        if !unified && queue.batch == super::queue::BatchMode::Kernel {
            tracing::info!("pinned memory is not mapped at its host address: no gather kernel");
            queue.batch = super::queue::BatchMode::Off;
        }
        for gpu in gpus {
            queues.push(CopyQueue::new(gpu.clone(), queue)?);
        }
        let ids: Vec<String> = gpus.iter().map(|g| g.index.to_string()).collect();
        let mut names: Vec<&str> = gpus.iter().map(|g| g.name.as_str()).collect();
        names.dedup();
        let describe = if gpus.len() == 1 {
            format!("cuda:{} {}", ids[0], names[0])
        } else {
            format!(
                "cuda:{} {} x{}",
                ids.join(","),
                names.join(" + "),
                gpus.len()
            )
        };
        Ok(CudaBackend {
            memories,
            queues,
            registry,
            allocator,
            staging,
            chunk_size,
            describe,
        })
    }

    /// How small copies are actually batched (on the first GPU).
    pub fn effective_batch(&self) -> super::queue::BatchMode {
        self.queues[0].effective_batch()
    }

    /// Counters of every GPU's copy queue, summed.
    pub fn queue_stats(&self) -> super::queue::QueueStats {
        let mut t = super::queue::QueueStats::default();
        for q in &self.queues {
            let s = q.stats();
            t.ops += s.ops;
            t.rounds += s.rounds;
            t.batches += s.batches;
            t.batched_ops += s.batched_ops;
            t.complete_ns += s.complete_ns;
        }
        t
    }

    /// The copy queue of the GPU at `position` in the device's list (for fault tests).
    #[doc(hidden)]
    pub fn queue(&self, position: usize) -> &CopyQueue {
        &self.queues[position]
    }

    /// Issues a copy to device address 0, which the driver refuses at once with a
    /// non-sticky error, formatted as a request error (for fault tests).
    #[doc(hidden)]
    pub async fn bad_copy(&self) -> IoResult<()> {
        let slot = self.staging.get().await?;
        // SAFETY: the slot is pinned and 4096 bytes long; address 0 is refused by the driver
        // before any copy starts.
        let op = unsafe { Op::new(OpKind::Write, 0, slot.ptr(), 4096, false) };
        let gpu = &self.memories[0].gpu;
        self.queues[0].run(op).await.map_err(|e| {
            IoError::Backend(format!(
                "cuda:{} ({}): write of 4096 bytes at device address 0 failed: {e}",
                gpu.index, gpu.name
            ))
        })
    }

    fn error(
        &self,
        chunk: &GpuChunk,
        what: &str,
        offset: usize,
        len: usize,
        e: CuError,
    ) -> IoError {
        let gpu = chunk.gpu();
        IoError::Backend(format!(
            "cuda:{} ({}): {what} of {len} bytes at offset {} failed: {e}",
            gpu.index,
            gpu.name,
            chunk.index() * self.chunk_size as u64 + offset as u64
        ))
    }

    fn check_range(&self, chunk: &GpuChunk, offset: usize, len: usize) -> IoResult<()> {
        match offset.checked_add(len) {
            Some(end) if end <= chunk.len() => Ok(()),
            _ => Err(IoError::Backend(format!(
                "chunk {} access {offset}+{len} outside its {} bytes",
                chunk.index(),
                chunk.len()
            ))),
        }
    }

    /// An op on `chunk`. Every caller passes a pinned host buffer of `len` bytes (its own
    /// borrowed slice, found in the pinned registry, or a staging slot) that stays borrowed
    /// until the op's `run` resolves, and a range already checked against the chunk.
    fn op(&self, chunk: &GpuChunk, kind: OpKind, offset: usize, host: *mut u8, len: usize) -> Op {
        let dev = chunk.ptr() + offset as u64;
        // SAFETY: as above; the chunk stays mapped while the caller holds it.
        unsafe { Op::new(kind, dev, host, len, kind != OpKind::Zero) }
    }

    async fn run(&self, chunk: &GpuChunk, offset: usize, op: Op) -> IoResult<()> {
        let (kind, len) = (op.kind(), op.len());
        self.queues[chunk.position()].run(op).await.map_err(|e| {
            let what = match kind {
                OpKind::Write => "write",
                OpKind::Read => "read",
                OpKind::Zero => "zero",
            };
            self.error(chunk, what, offset, len, e)
        })
    }
}

#[async_trait]
impl Backend for CudaBackend {
    type Chunk = GpuChunk;

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn host_allocator(&self) -> Arc<dyn HostAllocator> {
        self.allocator.clone()
    }

    fn alloc_chunk(&self, index: u64, len: usize) -> IoResult<GpuChunk> {
        let mem = &self.memories[(index % self.memories.len() as u64) as usize];
        mem.alloc(index, len)
    }

    fn memories(&self) -> usize {
        self.memories.len()
    }

    fn shared_memory(&self, position: usize) -> Option<IoResult<(u64, u64)>> {
        let mem = self.memories.get(position)?;
        Some(mem.gpu.mem_info().map_err(|e| {
            IoError::Backend(format!(
                "cuda:{} ({}): reading free memory: {e}",
                mem.gpu.index, mem.gpu.name
            ))
        }))
    }

    fn keep_free(&self, position: usize) -> u64 {
        self.memories.get(position).map_or(0, |m| m.keep_free())
    }

    fn memory_name(&self, position: usize) -> String {
        match self.memories.get(position) {
            Some(m) => format!("GPU {} ({})", m.gpu.index, m.gpu.name),
            None => self.describe.clone(),
        }
    }

    async fn read(&self, chunk: &GpuChunk, offset: usize, buf: &mut [u8]) -> IoResult<()> {
        self.check_range(chunk, offset, buf.len())?;
        if self.registry.contains(buf.as_ptr(), buf.len()) {
            let op = self.op(chunk, OpKind::Read, offset, buf.as_mut_ptr(), buf.len());
            return self.run(chunk, offset, op).await;
        }
        let step = self.staging.slot_size();
        for (i, piece) in buf.chunks_mut(step).enumerate() {
            let slot = self.staging.get().await?;
            let at = offset + i * step;
            let op = self.op(chunk, OpKind::Read, at, slot.ptr(), piece.len());
            self.run(chunk, at, op).await?;
            // SAFETY: the slot holds piece.len() bytes just copied from the GPU.
            piece.copy_from_slice(unsafe { std::slice::from_raw_parts(slot.ptr(), piece.len()) });
        }
        Ok(())
    }

    async fn write(&self, chunk: &GpuChunk, offset: usize, data: &[u8]) -> IoResult<()> {
        self.check_range(chunk, offset, data.len())?;
        if self.registry.contains(data.as_ptr(), data.len()) {
            // The GPU only reads through this pointer.
            let op = self.op(
                chunk,
                OpKind::Write,
                offset,
                data.as_ptr() as *mut u8,
                data.len(),
            );
            return self.run(chunk, offset, op).await;
        }
        let step = self.staging.slot_size();
        for (i, piece) in data.chunks(step).enumerate() {
            let slot = self.staging.get().await?;
            // SAFETY: the slot is ours and holds slot_size >= piece.len() bytes.
            unsafe { std::ptr::copy_nonoverlapping(piece.as_ptr(), slot.ptr(), piece.len()) };
            let at = offset + i * step;
            let op = self.op(chunk, OpKind::Write, at, slot.ptr(), piece.len());
            self.run(chunk, at, op).await?;
        }
        Ok(())
    }

    async fn zero(&self, chunk: &GpuChunk, offset: usize, len: usize) -> IoResult<()> {
        self.check_range(chunk, offset, len)?;
        let op = self.op(chunk, OpKind::Zero, offset, std::ptr::null_mut(), len);
        self.run(chunk, offset, op).await
    }
}
