//! [`SpillRam`]: the spill tier in host RAM, pinned so chunks move to and from the GPU by DMA.
//!
//! Memory is taken in slabs from the backend's host allocator (pinned for the CUDA backend)
//! and cut into chunk-sized slots. Slabs are kept once taken: pinning is the slow part
//! (measured on the H200 machine, 2026-12-02: `cudaHostAlloc` 1.5 GB/s in 64 or 256 MiB
//! slabs, against 47.5 GB/s for the copy into pinned memory and 0.9 GB/s into fresh pageable
//! memory), so a yield only runs at PCIe speed into RAM that was pinned before it began.
//! [`SpillRam::reserve_in_background`] pins the whole capacity after start; a swap device
//! pins it before the device exists ([`SpillRam::reserve_all`]), so its spill path never
//! asks the system for memory.

use crate::engine::{HostAllocator, IoError, IoResult};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use crate::tunables::SPILL_RAM_SLAB as SLAB;

struct Inner {
    slabs: Vec<(NonNull<u8>, usize)>,
    free: Vec<NonNull<u8>>,
}

/// Pinned host memory for spilled chunks, `slot` bytes each, at most `capacity` bytes.
pub struct SpillRam {
    /// Set by the first device that uses this tier: its backend's allocator (pinned memory
    /// is usable by every device of the process).
    allocator: OnceLock<Arc<dyn HostAllocator>>,
    slot: usize,
    slab: usize,
    capacity: u64,
    inner: Mutex<Inner>,
    /// Bytes of slots handed out.
    used: AtomicU64,
    /// Bytes of slabs taken (pinned) so far.
    taken: AtomicU64,
}

// SAFETY: the raw pointers are slabs this object owns; slots are handed out to one chunk at
// a time under the mutex.
unsafe impl Send for SpillRam {}
// SAFETY: as above.
unsafe impl Sync for SpillRam {}

impl SpillRam {
    /// Spill RAM of at most `capacity` bytes in slots of `slot` bytes; memory is taken once
    /// a device has named its allocator ([`SpillRam::bind_allocator`]).
    pub fn new(slot: usize, capacity: u64) -> Arc<SpillRam> {
        let slab = SLAB.max(slot) / slot * slot;
        let capacity = capacity / slot as u64 * slot as u64;
        Arc::new(SpillRam {
            allocator: OnceLock::new(),
            slot,
            slab,
            capacity,
            inner: Mutex::new(Inner {
                slabs: Vec::new(),
                free: Vec::new(),
            }),
            used: AtomicU64::new(0),
            taken: AtomicU64::new(0),
        })
    }

    /// Takes memory from `allocator` from now on, unless another one was named first.
    pub fn bind_allocator(&self, allocator: Arc<dyn HostAllocator>) {
        let _ = self.allocator.set(allocator);
    }

    fn allocator(&self) -> IoResult<&Arc<dyn HostAllocator>> {
        self.allocator
            .get()
            .ok_or_else(|| IoError::Backend("spill RAM used before any device bound it".into()))
    }

    /// Bytes of one slot (the chunk size).
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// The most bytes this tier may hold.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes held by spilled chunks now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes pinned so far (at most the capacity).
    pub fn reserved(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    /// Bytes that more chunks may still take.
    pub fn free_bytes(&self) -> u64 {
        self.capacity.saturating_sub(self.used())
    }

    /// Takes one more slab, if the capacity allows; false when it is all taken.
    fn grow(&self) -> IoResult<bool> {
        let taken = self.taken.load(Ordering::Relaxed);
        if taken >= self.capacity {
            return Ok(false);
        }
        let len = (self.capacity - taken).min(self.slab as u64) as usize;
        // Pinning is slow: do it without the lock, then add the slab.
        let allocator = self.allocator()?;
        let ptr = allocator.alloc(len)?;
        let mut inner = self.inner.lock().unwrap();
        let now = self.taken.load(Ordering::Relaxed);
        if now + len as u64 > self.capacity {
            drop(inner);
            // SAFETY: allocated just above with this length, never handed out.
            unsafe { allocator.free(ptr, len) };
            return Ok(now < self.capacity);
        }
        self.taken.store(now + len as u64, Ordering::Relaxed);
        inner.slabs.push((ptr, len));
        inner.free.reserve(len / self.slot);
        for i in (0..len / self.slot).rev() {
            // SAFETY: inside the slab just allocated.
            inner
                .free
                .push(unsafe { NonNull::new_unchecked(ptr.as_ptr().add(i * self.slot)) });
        }
        Ok(true)
    }

    /// Pins the whole capacity now (for swap: no allocation on the spill path later).
    pub fn reserve_all(&self) -> IoResult<()> {
        while self.grow()? {}
        Ok(())
    }

    /// Pins the whole capacity on a thread of its own, so the first yield moves at PCIe
    /// speed; stops early if the tier is dropped or pinning fails (then slots are taken on
    /// demand, more slowly).
    pub fn reserve_in_background(self: &Arc<Self>) {
        let weak: Weak<SpillRam> = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("vramdisk-pin".into())
            .spawn(move || {
                while let Some(ram) = weak.upgrade() {
                    match ram.grow() {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(e) => {
                            tracing::warn!(
                                "pinning spill RAM stopped at {} of {} bytes: {e}",
                                ram.reserved(),
                                ram.capacity
                            );
                            return;
                        }
                    }
                }
            });
    }

    /// A free slot, taking a new slab if none is free and the capacity allows; `None` when
    /// the tier is full.
    pub fn alloc(self: &Arc<Self>) -> IoResult<Option<RamChunk>> {
        loop {
            if let Some(ptr) = self.inner.lock().unwrap().free.pop() {
                self.used.fetch_add(self.slot as u64, Ordering::Relaxed);
                return Ok(Some(RamChunk {
                    ptr,
                    ram: self.clone(),
                }));
            }
            if !self.grow()? {
                // Another thread may have added a slab between our pop and our grow.
                if self.inner.lock().unwrap().free.is_empty() {
                    return Ok(None);
                }
            }
        }
    }
}

impl Drop for SpillRam {
    fn drop(&mut self) {
        let Some(allocator) = self.allocator.get() else {
            return;
        };
        let inner = self.inner.get_mut().unwrap();
        for (ptr, len) in inner.slabs.drain(..) {
            // SAFETY: each slab came from this allocator with this length; every chunk
            // holds an Arc to this tier, so no slot is in use any more.
            unsafe { allocator.free(ptr, len) };
        }
    }
}

/// One chunk's slot in spill RAM; goes back to the free list when dropped.
pub struct RamChunk {
    ptr: NonNull<u8>,
    ram: Arc<SpillRam>,
}

// SAFETY: the slot is this chunk's alone; concurrent copies touch disjoint ranges, as for
// host chunks.
unsafe impl Send for RamChunk {}
// SAFETY: as above.
unsafe impl Sync for RamChunk {}

impl RamChunk {
    /// The slot's bytes, for copies to and from it.
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Bytes in the slot.
    pub fn capacity(&self) -> usize {
        self.ram.slot
    }

    /// `len` bytes at `offset`, checked against the slot.
    pub fn range(&self, offset: usize, len: usize) -> IoResult<*mut u8> {
        match offset.checked_add(len) {
            Some(end) if end <= self.ram.slot => {
                // SAFETY: inside the slot.
                Ok(unsafe { self.ptr.as_ptr().add(offset) })
            }
            _ => Err(IoError::Backend(format!(
                "spill RAM access {offset}+{len} outside its {}-byte slot",
                self.ram.slot
            ))),
        }
    }
}

impl Drop for RamChunk {
    fn drop(&mut self) {
        self.ram.inner.lock().unwrap().free.push(self.ptr);
        self.ram
            .used
            .fetch_sub(self.ram.slot as u64, Ordering::Relaxed);
    }
}
