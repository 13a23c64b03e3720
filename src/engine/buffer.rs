//! A bounded pool of reusable I/O buffers.
//!
//! Every payload a frontend moves goes through an [`IoBuf`]. Buffers are taken from size
//! classes (powers of two from 4 KiB) and go back to their class on drop, so the I/O path
//! does not allocate once warm: large `malloc`s would `mmap` and fault on every request, and
//! pinned CUDA allocations cost milliseconds. The pool's byte budget bounds the memory held by
//! buffers in flight; [`BufferPool::get`] waits for budget instead of growing without limit.
//! Several pools (one per device) may share one [`BufferBudget`], which then bounds them all
//! together: the daemon's `--buffer-memory`.

use super::{HostAllocator, IoError, IoResult};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

const MIN_CLASS_SHIFT: u32 = 12;
const MAX_CLASS_SHIFT: u32 = 30;
const CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;

use crate::tunables::MAX_IDLE_BYTES_PER_CLASS;

struct FreeBuf(NonNull<u8>);
// SAFETY: an idle buffer is plain memory owned by the pool; nothing else points into it.
unsafe impl Send for FreeBuf {}

struct PoolInner {
    allocator: Arc<dyn HostAllocator>,
    free: Vec<Mutex<Vec<FreeBuf>>>,
    budget: BufferBudget,
}

/// Bytes of I/O buffers that may be handed out at once, shared by every pool made with it.
/// Buffers are charged their whole size class ([`BufferPool::charge`]). Cheap to clone.
#[derive(Clone)]
pub struct BufferBudget {
    permits: Arc<Semaphore>,
    limit: usize,
}

impl BufferBudget {
    /// A budget of `limit` bytes (at least one 4 KiB buffer).
    pub fn new(limit: usize) -> Self {
        let limit = limit.clamp(1 << MIN_CLASS_SHIFT, Semaphore::MAX_PERMITS);
        BufferBudget {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// The most bytes handed out at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes not handed out now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// Whether `other` is this same budget (shared by several pools).
    pub fn same_as(&self, other: &BufferBudget) -> bool {
        Arc::ptr_eq(&self.permits, &other.permits)
    }
}

impl std::fmt::Debug for BufferBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferBudget")
            .field("limit", &self.limit)
            .field("available", &self.available())
            .finish()
    }
}

/// A bounded pool of I/O buffers backed by a [`HostAllocator`]. Cheap to clone.
#[derive(Clone)]
pub struct BufferPool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferPool")
            .field("budget", &self.inner.budget)
            .finish()
    }
}

fn class_of(len: usize) -> Option<usize> {
    let size = len.max(1 << MIN_CLASS_SHIFT).checked_next_power_of_two()?;
    let shift = size.trailing_zeros();
    (shift <= MAX_CLASS_SHIFT).then(|| (shift - MIN_CLASS_SHIFT) as usize)
}

fn class_size(class: usize) -> usize {
    1usize << (class as u32 + MIN_CLASS_SHIFT)
}

impl BufferPool {
    /// A pool that holds at most `limit` bytes in buffers handed out at once.
    pub fn new(allocator: Arc<dyn HostAllocator>, limit: usize) -> Self {
        Self::with_budget(allocator, BufferBudget::new(limit))
    }

    /// A pool whose buffers count against `budget`, which other pools may share.
    pub fn with_budget(allocator: Arc<dyn HostAllocator>, budget: BufferBudget) -> Self {
        BufferPool {
            inner: Arc::new(PoolInner {
                allocator,
                free: (0..CLASSES).map(|_| Mutex::new(Vec::new())).collect(),
                budget,
            }),
        }
    }

    /// The most bytes this pool (with any sharing its budget) hands out at once.
    pub fn limit(&self) -> usize {
        self.inner.budget.limit
    }

    /// The budget this pool's buffers count against.
    pub fn budget(&self) -> &BufferBudget {
        &self.inner.budget
    }

    /// Bytes of budget a buffer of `len` bytes takes: its size class, a power of two of at
    /// least 4 KiB (`usize::MAX` beyond the largest class).
    pub fn charge(len: usize) -> usize {
        class_of(len).map_or(usize::MAX, class_size)
    }

    /// A buffer of `len` bytes (contents unspecified), waiting while the pool's budget is
    /// spent. Fails only if `len` is larger than the whole budget or the allocator fails.
    pub async fn get(&self, len: usize) -> IoResult<IoBuf> {
        let (class, size) = self.class_for(len)?;
        let permit = self
            .inner
            .budget
            .permits
            .clone()
            .acquire_many_owned(size as u32)
            .await
            .map_err(|_| IoError::Backend("buffer pool closed".into()))?;
        self.take(class, len, permit)
    }

    /// Like [`BufferPool::get`] but returns `None` instead of waiting when the budget is spent.
    pub fn try_get(&self, len: usize) -> IoResult<Option<IoBuf>> {
        let (class, size) = self.class_for(len)?;
        match self
            .inner
            .budget
            .permits
            .clone()
            .try_acquire_many_owned(size as u32)
        {
            Ok(permit) => self.take(class, len, permit).map(Some),
            Err(_) => Ok(None),
        }
    }

    fn class_for(&self, len: usize) -> IoResult<(usize, usize)> {
        let class = class_of(len)
            .ok_or_else(|| IoError::Backend(format!("I/O buffer of {len} bytes is too large")))?;
        let size = class_size(class);
        if size > self.inner.budget.limit || size > u32::MAX as usize {
            return Err(IoError::Backend(format!(
                "I/O buffer of {len} bytes exceeds the buffer pool limit of {} bytes",
                self.inner.budget.limit
            )));
        }
        Ok((class, size))
    }

    fn take(&self, class: usize, len: usize, permit: OwnedSemaphorePermit) -> IoResult<IoBuf> {
        let idle = self.inner.free[class].lock().unwrap().pop();
        let ptr = match idle {
            Some(FreeBuf(ptr)) => ptr,
            None => self.inner.allocator.alloc(class_size(class))?,
        };
        Ok(IoBuf {
            ptr,
            len,
            class,
            pool: self.inner.clone(),
            _permit: permit,
        })
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        for (class, list) in self.free.iter_mut().enumerate() {
            for FreeBuf(ptr) in list.get_mut().unwrap().drain(..) {
                // SAFETY: every idle buffer came from this allocator with its class size.
                unsafe { self.allocator.free(ptr, class_size(class)) };
            }
        }
    }
}

/// A buffer from a [`BufferPool`]: `len` usable bytes, returned to the pool on drop.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    class: usize,
    pool: Arc<PoolInner>,
    _permit: OwnedSemaphorePermit,
}

// SAFETY: an IoBuf owns its memory exclusively, like a Vec<u8>.
unsafe impl Send for IoBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// Usable length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the buffer can hold without reallocating.
    pub fn capacity(&self) -> usize {
        class_size(self.class)
    }

    /// Shrinks or grows the usable length within [`IoBuf::capacity`].
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "IoBuf::set_len beyond capacity");
        self.len = len;
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points at capacity() >= len bytes owned by this buffer, initialised
        // (HostAllocator::alloc returns zeroed memory; later only bytes are written).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        let size = class_size(self.class);
        let mut list = self.pool.free[self.class].lock().unwrap();
        if (list.len() + 1) * size <= MAX_IDLE_BYTES_PER_CLASS.max(size) {
            list.push(FreeBuf(self.ptr));
        } else {
            drop(list);
            // SAFETY: the buffer came from this allocator with this class size.
            unsafe { self.pool.allocator.free(self.ptr, size) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::host::HeapAllocator;

    #[test]
    fn classes_round_up_to_powers_of_two() {
        assert_eq!(class_of(0), Some(0));
        assert_eq!(class_of(4096), Some(0));
        assert_eq!(class_of(4097), Some(1));
        assert_eq!(class_size(class_of(1 << 20).unwrap()), 1 << 20);
        assert_eq!(class_of((1 << 30) + 1), None);
    }

    #[tokio::test]
    async fn buffers_are_reused_and_bounded() {
        let pool = BufferPool::new(Arc::new(HeapAllocator), 64 << 10);
        let mut a = pool.get(40 << 10).await.unwrap();
        a.fill(7);
        let p = a.as_ptr();
        assert_eq!(a.len(), 40 << 10);
        // 64 KiB class taken: the budget is spent.
        assert!(pool.try_get(1).unwrap().is_none());
        drop(a);
        let b = pool.get(33 << 10).await.unwrap();
        assert_eq!(b.as_ptr(), p, "freed buffer is reused");
        assert!(pool.get(128 << 10).await.is_err(), "larger than the budget");
    }

    #[tokio::test]
    async fn pools_sharing_a_budget_are_bounded_together() {
        let budget = BufferBudget::new(256 << 10);
        let a = BufferPool::with_budget(Arc::new(HeapAllocator), budget.clone());
        let b = BufferPool::with_budget(Arc::new(HeapAllocator), budget.clone());
        assert_eq!(BufferPool::charge(100 << 10), 128 << 10);
        assert_eq!(BufferPool::charge(1), 4096);
        let x = a.get(100 << 10).await.unwrap();
        let y = b.get(128 << 10).await.unwrap();
        assert_eq!(budget.available(), 0);
        assert!(
            a.try_get(1).unwrap().is_none(),
            "the other pool spent the budget"
        );
        drop(y);
        assert!(a.try_get(128 << 10).unwrap().is_some());
        drop(x);
        assert_eq!(budget.available(), 256 << 10);
    }
}
