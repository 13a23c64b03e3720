//! What the in-process frontends (FUSE, ublk, kernel nbd) share on their I/O path: running
//! a device call to completion on a frontend's own thread, and filling the buffer pool
//! before the kernel sees the device, so that serving a request (swap included) never
//! allocates.

use crate::engine::BufferPool;
use anyhow::{Context, Result};

/// Runs a device call to completion on this (frontend) thread.
///
/// Most calls never wait (host memory: a memcpy), so the future is first polled once,
/// inside the runtime's context, with a waker that does nothing; only if it is not ready
/// does the thread park in the runtime's `block_on` until it is (a GPU copy). That skips
/// the park machinery on the common path.
pub fn complete<F: std::future::Future>(runtime: &tokio::runtime::Handle, fut: F) -> F::Output {
    let _context = runtime.enter();
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if let std::task::Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
        return out;
    }
    runtime.block_on(fut)
}

/// Puts `count` buffers of every size class from 4 KiB up to the one that holds `largest`
/// bytes into `pool` (fewer where the buffer budget runs out first).
pub fn prewarm_buffers(pool: &BufferPool, count: usize, largest: usize) -> Result<()> {
    let mut size = 4096;
    loop {
        let mut held = Vec::with_capacity(count);
        for _ in 0..count {
            match pool
                .try_get(size)
                .with_context(|| format!("preparing {size}-byte I/O buffers"))?
            {
                Some(b) => held.push(b),
                None => break,
            }
        }
        drop(held);
        if size >= largest {
            return Ok(());
        }
        size *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::host::HeapAllocator;
    use crate::engine::{HostAllocator, IoResult};
    use std::ptr::NonNull;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    /// Heap memory that counts its allocations.
    #[derive(Default)]
    struct Counting(AtomicUsize);

    impl HostAllocator for Counting {
        fn alloc(&self, len: usize) -> IoResult<NonNull<u8>> {
            self.0.fetch_add(1, Relaxed);
            HeapAllocator.alloc(len)
        }

        unsafe fn free(&self, ptr: NonNull<u8>, len: usize) {
            // SAFETY: the caller's promise, passed on to the allocator that made `ptr`.
            unsafe { HeapAllocator.free(ptr, len) }
        }
    }

    #[test]
    fn prewarmed_buffers_are_reused_not_allocated() {
        let counting = Arc::new(Counting::default());
        let pool = BufferPool::new(counting.clone(), 64 << 20);
        prewarm_buffers(&pool, 2, 1280 << 10).unwrap();
        // Two of each class from 4K to 2M, the class that holds 1280K: ten classes.
        assert_eq!(counting.0.load(Relaxed), 20);
        let mut held = Vec::new();
        for shift in 12..=21 {
            held.push(pool.try_get(1 << shift).unwrap().unwrap());
            held.push(pool.try_get(1 << shift).unwrap().unwrap());
        }
        assert_eq!(counting.0.load(Relaxed), 20, "served from the warmed pool");
        held.push(pool.try_get(4 << 20).unwrap().unwrap());
        assert_eq!(
            counting.0.load(Relaxed),
            21,
            "a class above `largest` is not warmed"
        );
    }

    #[test]
    fn prewarming_stops_at_the_budget() {
        let counting = Arc::new(Counting::default());
        // Room for 768K of buffers at once: two of each class up to 256K, one of 512K.
        let pool = BufferPool::new(counting.clone(), 768 << 10);
        prewarm_buffers(&pool, 2, 512 << 10).unwrap();
        assert_eq!(counting.0.load(Relaxed), 7 * 2 + 1);
    }

    #[test]
    fn complete_returns_ready_and_waiting_futures() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert_eq!(complete(rt.handle(), async { 7 }), 7);
        let waited = complete(rt.handle(), async {
            tokio::task::yield_now().await;
            8
        });
        assert_eq!(waited, 8);
    }
}
