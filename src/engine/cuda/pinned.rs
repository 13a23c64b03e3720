//! Pinned host memory: the allocator behind the device's I/O buffers, and the staging pool
//! for callers whose buffers are not pinned.
//!
//! Pinned (page-locked) memory is what the GPU's copy engines reach by DMA; from pageable
//! memory the driver copies through its own bounce buffer at a quarter of the speed (see
//! FACTS.md). Every pinned allocation is also mapped into the GPUs' address space
//! (`DEVICEMAP`, `PORTABLE`: every context), so the gather kernel can read and write it
//! directly. A registry of those allocations answers, per request, "is this buffer pinned?"
//! without a driver call or a lock.

use super::driver::{Gpu, check};
use crate::engine::{HostAllocator, IoError, IoResult};
use arc_swap::ArcSwap;
use cudarc::driver::sys;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// The address ranges of every live pinned allocation, sorted by start.
#[derive(Default)]
pub struct PinnedRegistry {
    ranges: ArcSwap<Vec<(usize, usize)>>,
    writer: Mutex<()>,
}

impl PinnedRegistry {
    /// The process's one registry: pinned memory is `PORTABLE`, usable by every device's
    /// copies, so spill RAM pinned for one export is reached by DMA from every export.
    pub fn global() -> Arc<PinnedRegistry> {
        static GLOBAL: std::sync::OnceLock<Arc<PinnedRegistry>> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(Default::default).clone()
    }

    /// True when `[ptr, ptr + len)` lies inside one pinned allocation.
    pub fn contains(&self, ptr: *const u8, len: usize) -> bool {
        let start = ptr as usize;
        let ranges = self.ranges.load();
        let i = ranges.partition_point(|&(s, _)| s <= start);
        i > 0 && {
            let (_, end) = ranges[i - 1];
            start.checked_add(len).is_some_and(|e| e <= end)
        }
    }

    fn insert(&self, start: usize, len: usize) {
        let _g = self.writer.lock().unwrap();
        let mut v = Vec::clone(&self.ranges.load());
        let i = v.partition_point(|&(s, _)| s < start);
        v.insert(i, (start, start + len));
        self.ranges.store(Arc::new(v));
    }

    fn remove(&self, start: usize) {
        let _g = self.writer.lock().unwrap();
        let mut v = Vec::clone(&self.ranges.load());
        v.retain(|&(s, _)| s != start);
        self.ranges.store(Arc::new(v));
    }
}

/// Allocates pinned, device-mapped host memory with `cuMemHostAlloc`. Slow (it locks pages
/// and maps them into every GPU), which is why the buffer pool keeps and reuses buffers.
pub struct PinnedAllocator {
    gpu: Arc<Gpu>,
    registry: Arc<PinnedRegistry>,
}

impl PinnedAllocator {
    /// An allocator whose calls run in `gpu`'s context (the memory is usable from all).
    pub fn new(gpu: Arc<Gpu>, registry: Arc<PinnedRegistry>) -> Self {
        PinnedAllocator { gpu, registry }
    }

    /// Allocates `len` pinned bytes and returns the pointer, which with unified addressing is
    /// also the device address of the mapping.
    pub fn alloc_raw(&self, len: usize) -> IoResult<NonNull<u8>> {
        let fail = |e| IoError::Backend(format!("pinning {len} bytes of host memory: {e}"));
        self.gpu.bind().map_err(fail)?;
        let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
        let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
        // SAFETY: plain driver call with the context bound.
        let rc = unsafe { sys::cuMemHostAlloc(&mut p, len.max(1), flags) };
        if let Err(e) = check(rc, "cuMemHostAlloc") {
            return Err(if e.is_out_of_memory() {
                IoError::NoSpace(format!("cannot pin {len} more bytes of host memory"))
            } else {
                fail(e)
            });
        }
        let ptr = NonNull::new(p as *mut u8).ok_or_else(|| fail_null(len))?;
        self.registry.insert(ptr.as_ptr() as usize, len.max(1));
        Ok(ptr)
    }

    /// The device address of pinned host memory at `ptr` (equal to `ptr` with unified
    /// addressing, which every 64-bit Linux driver has).
    pub fn device_address(&self, ptr: NonNull<u8>) -> Option<u64> {
        self.gpu.bind().ok()?;
        let mut d = 0u64;
        // SAFETY: ptr is pinned mapped memory from alloc_raw.
        let rc = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut d, ptr.as_ptr() as *mut _, 0) };
        check(rc, "cuMemHostGetDevicePointer").ok().map(|_| d)
    }
}

fn fail_null(len: usize) -> IoError {
    IoError::Backend(format!("cuMemHostAlloc returned null for {len} bytes"))
}

impl HostAllocator for PinnedAllocator {
    fn alloc(&self, len: usize) -> IoResult<NonNull<u8>> {
        let ptr = self.alloc_raw(len)?;
        // cuMemHostAlloc does not zero; the trait promises initialised memory. Once per
        // buffer: the pool keeps buffers for reuse.
        // SAFETY: ptr points at `len` bytes just allocated and not yet shared.
        unsafe { ptr.as_ptr().write_bytes(0, len) };
        Ok(ptr)
    }

    unsafe fn free(&self, ptr: NonNull<u8>, _len: usize) {
        self.registry.remove(ptr.as_ptr() as usize);
        if self.gpu.bind().is_ok() {
            // SAFETY: ptr came from cuMemHostAlloc in alloc and is freed once (caller's
            // contract); nothing is copying from it (its IoBuf was dropped).
            unsafe { sys::cuMemFreeHost(ptr.as_ptr() as *mut _) };
        }
    }
}

/// A fixed set of pinned slots, allocated once, through which buffers that are not pinned
/// (FUSE's, plain `Vec`s) are copied on their way to and from the GPU.
pub struct StagingPool {
    base: NonNull<u8>,
    bytes: usize,
    slot_size: usize,
    free: Mutex<Vec<usize>>,
    available: Semaphore,
    allocator: Arc<PinnedAllocator>,
}

// SAFETY: the pool owns its pinned memory; each slot is handed to one user at a time.
unsafe impl Send for StagingPool {}
// SAFETY: as above; the free list is behind a mutex.
unsafe impl Sync for StagingPool {}

impl StagingPool {
    /// `slots` slots of `slot_size` bytes each, pinned now.
    pub fn new(allocator: Arc<PinnedAllocator>, slots: usize, slot_size: usize) -> IoResult<Self> {
        let bytes = slots * slot_size;
        let base = allocator.alloc_raw(bytes)?;
        Ok(StagingPool {
            base,
            bytes,
            slot_size,
            free: Mutex::new((0..slots).rev().collect()),
            available: Semaphore::new(slots),
            allocator,
        })
    }

    /// Bytes in one slot.
    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// The pool's first byte (to check that mapped pointers equal host pointers).
    pub fn base(&self) -> NonNull<u8> {
        self.base
    }

    /// Waits for a free slot.
    pub async fn get(&self) -> IoResult<StagingSlot<'_>> {
        let permit = self
            .available
            .acquire()
            .await
            .map_err(|_| IoError::Backend("staging pool closed".into()))?;
        permit.forget();
        let i = self
            .free
            .lock()
            .unwrap()
            .pop()
            .expect("a permit implies a free slot");
        Ok(StagingSlot {
            pool: self,
            index: i,
        })
    }
}

impl Drop for StagingPool {
    fn drop(&mut self) {
        // SAFETY: base came from alloc_raw with this size; no slot is out (they borrow self).
        unsafe { self.allocator.free(self.base, self.bytes) };
    }
}

/// One staging slot, returned to its pool on drop.
pub struct StagingSlot<'a> {
    pool: &'a StagingPool,
    index: usize,
}

impl StagingSlot<'_> {
    /// Pointer to the slot's first byte.
    pub fn ptr(&self) -> *mut u8 {
        // SAFETY: index < slots, so the offset stays inside the pool's allocation.
        unsafe {
            self.pool
                .base
                .as_ptr()
                .add(self.index * self.pool.slot_size)
        }
    }
}

impl Drop for StagingSlot<'_> {
    fn drop(&mut self) {
        self.pool.free.lock().unwrap().push(self.index);
        self.pool.available.add_permits(1);
    }
}
