//! The copy ceiling: how fast large copies between pinned host memory and GPU memory go on
//! this machine, measured with plain driver calls. The benchmark holds the engine against it.

use super::driver::{CuError, Gpu, check};
use cudarc::driver::sys::{self, CUdeviceptr, CUstream};
use std::sync::{Arc, Barrier};
use std::time::Instant;

/// Measured copy rates in bytes per second, summed over the GPUs measured together.
#[derive(Clone, Copy, Debug)]
pub struct Ceiling {
    /// Host to GPU.
    pub h2d: f64,
    /// GPU to host.
    pub d2h: f64,
}

struct Buffers {
    host: *mut std::ffi::c_void,
    dev: CUdeviceptr,
    stream: CUstream,
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: allocated in measure() in the context still bound on this thread.
        unsafe {
            if !self.host.is_null() {
                sys::cuMemFreeHost(self.host);
            }
            if self.dev != 0 {
                sys::cuMemFree_v2(self.dev);
            }
            if !self.stream.is_null() {
                sys::cuStreamDestroy_v2(self.stream);
            }
        }
    }
}

fn timed(reps: usize, mut f: impl FnMut() -> Result<(), CuError>) -> Result<f64, CuError> {
    let start = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Copies `bytes` from pinned memory to each GPU and back, `reps` times each way, on all
/// `gpus` at once; returns the aggregate rates.
pub fn copy_ceiling(gpus: &[Arc<Gpu>], bytes: usize, reps: usize) -> Result<Ceiling, String> {
    let barrier = Arc::new(Barrier::new(gpus.len()));
    let threads: Vec<_> = gpus
        .iter()
        .map(|gpu| {
            let gpu = gpu.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || -> Result<(f64, f64), CuError> {
                let mut passed = 0;
                let r = measure(&gpu, bytes, reps, &mut || {
                    barrier.wait();
                    passed += 1;
                });
                // A failed thread still meets the others at the barriers it skipped.
                for _ in passed..2 {
                    barrier.wait();
                }
                r
            })
        })
        .collect();
    let mut h2d_time: f64 = 0.0;
    let mut d2h_time: f64 = 0.0;
    for (t, gpu) in threads.into_iter().zip(gpus) {
        let (h, d) = t
            .join()
            .map_err(|_| "ceiling thread panicked".to_string())?
            .map_err(|e| format!("GPU {}: {e}", gpu.index))?;
        h2d_time = h2d_time.max(h);
        d2h_time = d2h_time.max(d);
    }
    let total = (bytes * reps * gpus.len()) as f64;
    Ok(Ceiling {
        h2d: total / h2d_time,
        d2h: total / d2h_time,
    })
}

fn measure(
    gpu: &Gpu,
    bytes: usize,
    reps: usize,
    sync: &mut dyn FnMut(),
) -> Result<(f64, f64), CuError> {
    gpu.bind()?;
    let mut b = Buffers {
        host: std::ptr::null_mut(),
        dev: 0,
        stream: std::ptr::null_mut(),
    };
    // SAFETY: plain driver calls with the context bound; the buffers are freed by Buffers.
    unsafe {
        check(
            sys::cuMemHostAlloc(&mut b.host, bytes, sys::CU_MEMHOSTALLOC_PORTABLE),
            "cuMemHostAlloc",
        )?;
        std::ptr::write_bytes(b.host as *mut u8, 0xa5, bytes);
        check(sys::cuMemAlloc_v2(&mut b.dev, bytes), "cuMemAlloc")?;
        check(
            sys::cuStreamCreate(
                &mut b.stream,
                sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
            ),
            "cuStreamCreate",
        )?;
    }
    let h2d = || -> Result<(), CuError> {
        // SAFETY: both buffers hold `bytes` bytes.
        unsafe {
            check(
                sys::cuMemcpyHtoDAsync_v2(b.dev, b.host, bytes, b.stream),
                "cuMemcpyHtoDAsync",
            )?;
            check(sys::cuStreamSynchronize(b.stream), "cuStreamSynchronize")
        }
    };
    let d2h = || -> Result<(), CuError> {
        // SAFETY: both buffers hold `bytes` bytes.
        unsafe {
            check(
                sys::cuMemcpyDtoHAsync_v2(b.host, b.dev, bytes, b.stream),
                "cuMemcpyDtoHAsync",
            )?;
            check(sys::cuStreamSynchronize(b.stream), "cuStreamSynchronize")
        }
    };
    h2d()?;
    d2h()?;
    sync();
    let th = timed(reps, h2d)?;
    sync();
    let td = timed(reps, d2h)?;
    Ok((th, td))
}

/// Mean microseconds per step of allocating and freeing one chunk, both ways the driver
/// offers (for choosing between them; printed by `vramdisk bench --alloc-costs`).
#[derive(Clone, Copy, Debug, Default)]
pub struct AllocCosts {
    /// `cuMemAddressReserve`.
    pub reserve: f64,
    /// `cuMemCreate`.
    pub create: f64,
    /// `cuMemMap`.
    pub map: f64,
    /// `cuMemSetAccess`.
    pub access: f64,
    /// `cuMemsetD8Async` + `cuStreamSynchronize` of the chunk.
    pub zero: f64,
    /// `cuMemUnmap` + `cuMemAddressFree`.
    pub unmap: f64,
    /// `cuMemAlloc`.
    pub alloc: f64,
    /// `cuMemFree`.
    pub free: f64,
}

/// Times `n` allocations of `size` bytes on `gpu` each way.
pub fn alloc_costs(gpu: &Gpu, size: usize, n: usize) -> Result<AllocCosts, CuError> {
    gpu.bind()?;
    let mut c = AllocCosts::default();
    // SAFETY: plain C struct; zero is a valid start.
    let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = gpu.device;
    // SAFETY: plain C struct; zero is a valid start.
    let mut access: sys::CUmemAccessDesc = unsafe { std::mem::zeroed() };
    access.location = prop.location;
    access.flags = sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    let mut stream: CUstream = std::ptr::null_mut();
    let us = |t: Instant| t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let mut ptrs = vec![0u64; n];
    // SAFETY: driver calls on memory this function allocates and frees itself.
    unsafe {
        check(
            sys::cuStreamCreate(
                &mut stream,
                sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
            ),
            "cuStreamCreate",
        )?;
        let mut handles = vec![0u64; n];
        let t = Instant::now();
        for p in ptrs.iter_mut() {
            check(
                sys::cuMemAddressReserve(p, size, 0, 0, 0),
                "cuMemAddressReserve",
            )?;
        }
        c.reserve = us(t);
        let t = Instant::now();
        for h in handles.iter_mut() {
            check(sys::cuMemCreate(h, size, &prop, 0), "cuMemCreate")?;
        }
        c.create = us(t);
        let t = Instant::now();
        for (p, h) in ptrs.iter().zip(&handles) {
            check(sys::cuMemMap(*p, size, 0, *h, 0), "cuMemMap")?;
        }
        c.map = us(t);
        let t = Instant::now();
        for p in &ptrs {
            check(sys::cuMemSetAccess(*p, size, &access, 1), "cuMemSetAccess")?;
        }
        c.access = us(t);
        for h in &handles {
            sys::cuMemRelease(*h);
        }
        let t = Instant::now();
        for p in &ptrs {
            check(sys::cuMemsetD8Async(*p, 0, size, stream), "cuMemsetD8Async")?;
            check(sys::cuStreamSynchronize(stream), "cuStreamSynchronize")?;
        }
        c.zero = us(t);
        let t = Instant::now();
        for p in &ptrs {
            check(sys::cuMemUnmap(*p, size), "cuMemUnmap")?;
            check(sys::cuMemAddressFree(*p, size), "cuMemAddressFree")?;
        }
        c.unmap = us(t);
        let t = Instant::now();
        for p in ptrs.iter_mut() {
            check(sys::cuMemAlloc_v2(p, size), "cuMemAlloc")?;
        }
        c.alloc = us(t);
        let t = Instant::now();
        for p in &ptrs {
            check(sys::cuMemFree_v2(*p), "cuMemFree")?;
        }
        c.free = us(t);
        sys::cuStreamDestroy_v2(stream);
    }
    Ok(c)
}
