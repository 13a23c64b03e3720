//! What a storage backend provides: chunks of memory, and copies in and out of them.

use super::IoResult;
use async_trait::async_trait;
use std::ptr::NonNull;

/// Host memory for I/O buffers. GPU backends hand out pinned (page-locked) memory so the
/// GPU's copy engines can reach it by DMA; the host backend hands out ordinary memory.
pub trait HostAllocator: Send + Sync + 'static {
    /// Allocates `len` bytes, aligned to at least 4096 bytes and zeroed: buffers hand their
    /// memory out as `&mut [u8]`, which must never cover uninitialised bytes.
    fn alloc(&self, len: usize) -> IoResult<NonNull<u8>>;
    /// Frees memory from [`HostAllocator::alloc`].
    ///
    /// # Safety
    /// `ptr` and `len` must come from one earlier `alloc` on this allocator, freed once.
    unsafe fn free(&self, ptr: NonNull<u8>, len: usize);
}

/// A store of fixed-size chunks: host RAM, one GPU, several GPUs.
///
/// The engine ([`super::SparseDevice`]) decides when chunks exist; a backend only allocates
/// them, copies bytes in and out, and frees them when a [`Backend::Chunk`] is dropped. A
/// backend knows nothing of NBD, FUSE or ublk.
///
/// Copies into one chunk may run concurrently from many tasks on disjoint ranges; a backend
/// must not serialise them behind one lock.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// One allocated chunk. Dropping it gives its memory back.
    type Chunk: Send + Sync + 'static;

    /// A short human description for logs: "host RAM", "cuda:0 NVIDIA H200".
    fn describe(&self) -> String;

    /// The allocator for I/O buffers that this backend copies from and to fastest.
    fn host_allocator(&self) -> std::sync::Arc<dyn HostAllocator>;

    /// Allocates chunk number `index` of `len` bytes, reading as zeros.
    /// Fails with [`super::IoError::NoSpace`] when the memory is not there.
    fn alloc_chunk(&self, index: u64, len: usize) -> IoResult<Self::Chunk>;

    /// Where `len` bytes of `chunk` at `offset` lie in host memory, if the CPU can read and
    /// write the chunk in place (for [`super::View`], and writes that complete at once: the
    /// same copy as [`Backend::write`]); `None`, the default, for device memory.
    fn host_bytes(&self, _chunk: &Self::Chunk, _offset: usize, _len: usize) -> Option<NonNull<u8>> {
        None
    }

    /// Copies `buf.len()` bytes from `chunk` at `offset` into `buf`.
    async fn read(&self, chunk: &Self::Chunk, offset: usize, buf: &mut [u8]) -> IoResult<()>;

    /// Copies `data` into `chunk` at `offset`.
    async fn write(&self, chunk: &Self::Chunk, offset: usize, data: &[u8]) -> IoResult<()>;

    /// Sets `len` bytes of `chunk` at `offset` to zero.
    async fn zero(&self, chunk: &Self::Chunk, offset: usize, len: usize) -> IoResult<()>;

    /// How many separate memories the chunks are spread over (GPUs); chunk `i` lives in
    /// memory `i % memories()`.
    fn memories(&self) -> usize {
        1
    }

    /// Free and total bytes of memory `position` as every program on the machine sees them,
    /// where other programs share that memory (a GPU): what the tier monitor watches.
    /// `None` for memory nobody else competes for in a way we can see (host RAM).
    fn shared_memory(&self, _position: usize) -> Option<IoResult<(u64, u64)>> {
        None
    }

    /// Bytes of memory `position` to leave free for other programs (`--keep-free`).
    fn keep_free(&self, _position: usize) -> u64 {
        0
    }

    /// Memory `position` named for messages: "GPU 0 (NVIDIA H200)".
    fn memory_name(&self, _position: usize) -> String {
        self.describe()
    }

    /// Waits until every completed write is as durable as this medium allows.
    async fn flush(&self) -> IoResult<()> {
        Ok(())
    }
}
