//! The host-memory backend: chunks in ordinary RAM. Used where there is no GPU, and in tests.

use super::{Backend, HostAllocator, IoError, IoResult};
use async_trait::async_trait;
use std::alloc::{Layout, alloc, alloc_zeroed, dealloc};
use std::ptr::NonNull;
use std::sync::Arc;

const ALIGN: usize = 4096;

/// Page-aligned heap memory for I/O buffers.
#[derive(Debug, Default, Clone, Copy)]
pub struct HeapAllocator;

impl HostAllocator for HeapAllocator {
    fn alloc(&self, len: usize) -> IoResult<NonNull<u8>> {
        let layout = Layout::from_size_align(len.max(1), ALIGN)
            .map_err(|e| IoError::Backend(format!("buffer of {len} bytes: {e}")))?;
        // SAFETY: layout has a non-zero size.
        NonNull::new(unsafe { alloc(layout) })
            .ok_or_else(|| IoError::NoSpace(format!("out of host memory for a {len}-byte buffer")))
    }

    unsafe fn free(&self, ptr: NonNull<u8>, len: usize) {
        // SAFETY: the caller passes a pointer from alloc() with the same length.
        unsafe {
            dealloc(
                ptr.as_ptr(),
                Layout::from_size_align_unchecked(len.max(1), ALIGN),
            )
        }
    }
}

/// One chunk of host memory. Requests on disjoint ranges of a chunk copy into it at the same
/// time through its raw pointer, so it hands out no references to its bytes.
pub struct HostChunk {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the chunk owns its memory; concurrent copies touch disjoint ranges (overlapping
// in-flight requests have no defined order in any block protocol, as on a real disk).
unsafe impl Send for HostChunk {}
// SAFETY: as above.
unsafe impl Sync for HostChunk {}

impl Drop for HostChunk {
    fn drop(&mut self) {
        // SAFETY: allocated in HostBackend::alloc_chunk with this length and ALIGN.
        unsafe {
            dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.len, ALIGN),
            )
        }
    }
}

impl HostChunk {
    fn range(&self, offset: usize, len: usize) -> IoResult<*mut u8> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {
                // SAFETY: offset lies inside the allocation.
                Ok(unsafe { self.ptr.as_ptr().add(offset) })
            }
            _ => Err(IoError::Backend(format!(
                "host chunk access {offset}+{len} outside its {} bytes",
                self.len
            ))),
        }
    }
}

/// Chunks in host RAM. Allocation uses `alloc_zeroed`, which for chunk-sized blocks maps
/// fresh zero pages lazily, so a chunk costs physical memory only where it is written.
#[derive(Debug, Default, Clone)]
pub struct HostBackend;

impl HostBackend {
    /// The host backend.
    pub fn new() -> Self {
        HostBackend
    }
}

#[async_trait]
impl Backend for HostBackend {
    type Chunk = HostChunk;

    fn describe(&self) -> String {
        "host RAM".into()
    }

    fn host_allocator(&self) -> Arc<dyn HostAllocator> {
        Arc::new(HeapAllocator)
    }

    fn alloc_chunk(&self, index: u64, len: usize) -> IoResult<HostChunk> {
        let layout = Layout::from_size_align(len.max(1), ALIGN)
            .map_err(|e| IoError::Backend(format!("chunk {index}: {e}")))?;
        // SAFETY: non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) }).ok_or_else(|| {
            IoError::NoSpace(format!(
                "out of host memory allocating chunk {index} ({len} bytes)"
            ))
        })?;
        Ok(HostChunk {
            ptr,
            len: len.max(1),
        })
    }

    fn host_bytes(&self, chunk: &HostChunk, offset: usize, len: usize) -> Option<NonNull<u8>> {
        chunk.range(offset, len).ok().and_then(NonNull::new)
    }

    async fn read(&self, chunk: &HostChunk, offset: usize, buf: &mut [u8]) -> IoResult<()> {
        let src = chunk.range(offset, buf.len())?;
        // SAFETY: src is valid for buf.len() bytes (checked) and cannot overlap buf, which
        // the caller owns.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    async fn write(&self, chunk: &HostChunk, offset: usize, data: &[u8]) -> IoResult<()> {
        let dst = chunk.range(offset, data.len())?;
        // SAFETY: dst is valid for data.len() bytes (checked) and distinct from data.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    async fn zero(&self, chunk: &HostChunk, offset: usize, len: usize) -> IoResult<()> {
        let dst = chunk.range(offset, len)?;
        // SAFETY: dst is valid for len bytes (checked).
        unsafe { std::ptr::write_bytes(dst, 0, len) };
        Ok(())
    }
}
