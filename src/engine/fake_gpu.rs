//! [`FakeGpuBackend`]: host RAM that behaves like a GPU shared with other programs, so the
//! tier logic (watermark, yield, spill and promotion) runs in CI, where there is no GPU.
//!
//! It has a total size; "other programs" take part of it, set by a test through
//! [`FakeGpuBackend::others`] or a file holding a byte count (re-read each time free memory
//! is asked for, as `cuMemGetInfo` would see another process grow). Allocation honours
//! `--keep-free` as the CUDA backend does, and the CPU cannot read chunks in place, so
//! frontends take the same copy path as for GPU memory.

use super::host::{HeapAllocator, HostBackend, HostChunk};
use super::{Backend, HostAllocator, IoError, IoResult};
use async_trait::async_trait;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A pretend GPU of `total` bytes in host RAM.
pub struct FakeGpuBackend {
    host: HostBackend,
    total: u64,
    keep_free: u64,
    ours: Arc<AtomicU64>,
    others: Arc<AtomicU64>,
    others_file: Option<PathBuf>,
}

/// One chunk of the pretend GPU.
pub struct FakeChunk {
    inner: HostChunk,
    len: u64,
    ours: Arc<AtomicU64>,
}

impl Drop for FakeChunk {
    fn drop(&mut self) {
        self.ours.fetch_sub(self.len, Ordering::Relaxed);
    }
}

impl FakeGpuBackend {
    /// A pretend GPU of `total` bytes leaving `keep_free` free; with `others_file`, the
    /// bytes other programs use are read from that file (a decimal count; missing: 0).
    pub fn new(total: u64, keep_free: u64, others_file: Option<PathBuf>) -> Self {
        FakeGpuBackend {
            host: HostBackend::new(),
            total,
            keep_free,
            ours: Arc::new(AtomicU64::new(0)),
            others: Arc::new(AtomicU64::new(0)),
            others_file,
        }
    }

    /// The bytes "other programs" use; a test stores into it to squeeze or release.
    pub fn others(&self) -> Arc<AtomicU64> {
        self.others.clone()
    }

    fn refresh(&self) {
        if let Some(path) = &self.others_file {
            let n = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            self.others.store(n, Ordering::Relaxed);
        }
    }

    fn free(&self) -> u64 {
        self.total
            .saturating_sub(self.ours.load(Ordering::Relaxed))
            .saturating_sub(self.others.load(Ordering::Relaxed))
    }
}

#[async_trait]
impl Backend for FakeGpuBackend {
    type Chunk = FakeChunk;

    fn describe(&self) -> String {
        format!("fake GPU ({} bytes of host RAM)", self.total)
    }

    fn host_allocator(&self) -> Arc<dyn HostAllocator> {
        Arc::new(HeapAllocator)
    }

    fn alloc_chunk(&self, index: u64, len: usize) -> IoResult<FakeChunk> {
        // Like cuMemCreate: a program that frees memory shows at once, so look again.
        self.refresh();
        let free = self.free();
        if free < len as u64 + self.keep_free {
            return Err(IoError::NoSpace(format!(
                "the fake GPU has {free} bytes free and --keep-free asks to leave {}",
                self.keep_free
            )));
        }
        self.ours.fetch_add(len as u64, Ordering::Relaxed);
        match self.host.alloc_chunk(index, len) {
            Ok(inner) => Ok(FakeChunk {
                inner,
                len: len as u64,
                ours: self.ours.clone(),
            }),
            Err(e) => {
                self.ours.fetch_sub(len as u64, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    fn shared_memory(&self, position: usize) -> Option<IoResult<(u64, u64)>> {
        (position == 0).then(|| {
            self.refresh();
            Ok((self.free(), self.total))
        })
    }

    fn keep_free(&self, _position: usize) -> u64 {
        self.keep_free
    }

    fn memory_name(&self, _position: usize) -> String {
        "the fake GPU".into()
    }

    async fn read(&self, chunk: &FakeChunk, offset: usize, buf: &mut [u8]) -> IoResult<()> {
        self.host.read(&chunk.inner, offset, buf).await
    }

    async fn write(&self, chunk: &FakeChunk, offset: usize, data: &[u8]) -> IoResult<()> {
        self.host.write(&chunk.inner, offset, data).await
    }

    async fn zero(&self, chunk: &FakeChunk, offset: usize, len: usize) -> IoResult<()> {
        self.host.zero(&chunk.inner, offset, len).await
    }
}
