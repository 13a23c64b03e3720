//! GPU memory for chunks through the CUDA virtual memory management API: each chunk is an
//! address range of its own with physical memory mapped into it.
//!
//! Chunk `i` of a device spread over `n` GPUs lives on GPU `i % n` (the backend picks), so
//! consecutive chunks alternate GPUs and sequential I/O keeps every PCIe link busy. Freeing a
//! chunk unmaps and releases exactly its physical memory, which is what `cuMemGetInfo` (and so
//! `--keep-free`) sees.
//!
//! Each chunk reserves its own address range rather than a slot computed from its index in
//! one big reservation: the chunk map lets two writers race to allocate the same chunk and
//! drops the loser, so two live allocations of one index must not share addresses.

use super::driver::{CuError, Gpu, check};
use crate::engine::{IoError, IoResult};
use cudarc::driver::sys::{self, CUdeviceptr, CUstream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tracing::warn;

/// One GPU's share of a device: its address reservation and allocation policy.
pub struct GpuMemory {
    /// The GPU.
    pub gpu: Arc<Gpu>,
    /// Position of this GPU in the device's `--gpu` list.
    pub position: usize,
    granularity: usize,
    keep_free: u64,
    prop: sys::CUmemAllocationProp,
    access: sys::CUmemAccessDesc,
    /// Serialises the free-memory check with the allocation, so two writers cannot both pass
    /// the `--keep-free` check with room for one chunk.
    alloc_lock: Mutex<()>,
    /// Set after the first refused allocation, cleared by the next successful one: one
    /// warning per episode of a full GPU, not one per request.
    warned: AtomicBool,
    /// Stream for zeroing freshly mapped chunks (kept off the I/O streams).
    zero_stream: CUstream,
}

// SAFETY: the raw handles are driver objects usable from any thread with the context bound.
unsafe impl Send for GpuMemory {}
// SAFETY: as above; mutable state is behind the mutex and atomics.
unsafe impl Sync for GpuMemory {}

/// The driver's allocation granularity for plain device memory on `gpu` (2 MiB on Hopper).
pub fn granularity(gpu: &Gpu) -> Result<usize, CuError> {
    gpu.bind()?;
    let prop = device_prop(gpu);
    let mut g = 0usize;
    // SAFETY: prop is fully initialised.
    check(
        unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut g,
                &prop,
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            )
        },
        "cuMemGetAllocationGranularity",
    )?;
    Ok(g.max(1))
}

fn device_prop(gpu: &Gpu) -> sys::CUmemAllocationProp {
    // SAFETY: the struct is plain C data for which all-zero is a valid (empty) value.
    let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.requestedHandleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
    prop.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = gpu.device;
    prop
}

/// Rounds `len` up to a multiple of `gran`.
pub fn round_up(len: usize, gran: usize) -> usize {
    len.div_ceil(gran) * gran
}

impl GpuMemory {
    /// Allocation state for `gpu`, at `position` in the device's GPU list, leaving
    /// `keep_free` bytes free.
    pub fn new(gpu: Arc<Gpu>, position: usize, keep_free: u64) -> Result<GpuMemory, CuError> {
        gpu.bind()?;
        let granularity = granularity(&gpu)?;
        let mut zero_stream: CUstream = std::ptr::null_mut();
        // SAFETY: plain driver call with the context bound.
        check(
            unsafe {
                sys::cuStreamCreate(
                    &mut zero_stream,
                    sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
                )
            },
            "cuStreamCreate",
        )?;
        let prop = device_prop(&gpu);
        // SAFETY: plain C data; zero is a valid start.
        let mut access: sys::CUmemAccessDesc = unsafe { std::mem::zeroed() };
        access.location = prop.location;
        access.flags = sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
        Ok(GpuMemory {
            gpu,
            position,
            granularity,
            keep_free,
            prop,
            access,
            alloc_lock: Mutex::new(()),
            warned: AtomicBool::new(false),
            zero_stream,
        })
    }

    /// Bytes this GPU leaves free for other programs (`--keep-free`).
    pub fn keep_free(&self) -> u64 {
        self.keep_free
    }

    /// Physical bytes a chunk of `len` bytes takes.
    pub fn physical_len(&self, len: usize) -> usize {
        round_up(len.max(1), self.granularity)
    }

    fn refuse(&self, msg: String) -> IoError {
        if !self.warned.swap(true, Ordering::Relaxed) {
            warn!("{msg}; new chunks go to the spill tier if there is one, or fail with ENOSPC");
        }
        IoError::NoSpace(msg)
    }

    /// Maps chunk `index` (of logical length `len`), zeroed.
    pub fn alloc(self: &Arc<Self>, index: u64, len: usize) -> IoResult<GpuChunk> {
        let size = self.physical_len(len);
        let fail = |e: CuError| {
            IoError::Backend(format!(
                "cuda:{} ({}): allocating chunk {index} ({size} bytes): {e}",
                self.gpu.index, self.gpu.name
            ))
        };
        let ptr = {
            let _guard = self.alloc_lock.lock().unwrap();
            self.gpu.bind().map_err(fail)?;
            if self.keep_free > 0 {
                let (free, _) = self.gpu.mem_info().map_err(fail)?;
                if free < size as u64 + self.keep_free {
                    return Err(self.refuse(format!(
                        "GPU {} has {} bytes free and --keep-free asks to leave {} bytes",
                        self.gpu.index, free, self.keep_free
                    )));
                }
            }
            let mut ptr: CUdeviceptr = 0;
            // SAFETY: plain driver call with the context bound.
            let rc = unsafe { sys::cuMemAddressReserve(&mut ptr, size, 0, 0, 0) };
            check(rc, "cuMemAddressReserve").map_err(fail)?;
            let mut handle: sys::CUmemGenericAllocationHandle = 0;
            // SAFETY: prop is initialised; handle receives the allocation.
            let rc = unsafe { sys::cuMemCreate(&mut handle, size, &self.prop, 0) };
            if let Err(e) = check(rc, "cuMemCreate") {
                // SAFETY: ptr was reserved above with this size and holds no mapping.
                unsafe { sys::cuMemAddressFree(ptr, size) };
                if e.is_out_of_memory() {
                    return Err(self.refuse(format!(
                        "GPU {} ({}) is out of memory",
                        self.gpu.index, self.gpu.name
                    )));
                }
                return Err(fail(e));
            }
            // SAFETY: ptr..ptr+size is our fresh reservation; handle is fresh.
            let mapped = unsafe {
                check(sys::cuMemMap(ptr, size, 0, handle, 0), "cuMemMap").and_then(|_| {
                    check(
                        sys::cuMemSetAccess(ptr, size, &self.access, 1),
                        "cuMemSetAccess",
                    )
                })
            };
            // The mapping holds the memory from here on; the handle is no longer needed.
            // SAFETY: handle came from cuMemCreate above.
            unsafe { sys::cuMemRelease(handle) };
            if let Err(e) = mapped {
                // SAFETY: our own reservation; unmapping is harmless if the map failed.
                unsafe {
                    sys::cuMemUnmap(ptr, size);
                    sys::cuMemAddressFree(ptr, size);
                }
                return Err(fail(e));
            }
            ptr
        };
        self.warned.store(false, Ordering::Relaxed);
        let chunk = GpuChunk {
            mem: self.clone(),
            ptr,
            size,
            len,
            index,
        };
        // Fresh physical memory holds whatever was there before; a chunk must read as zeros.
        // Synchronous, but only once per chunk allocation, which already costs driver calls.
        // SAFETY: the range was just mapped read-write; zero_stream belongs to this context.
        unsafe {
            check(
                sys::cuMemsetD8Async(ptr, 0, size, self.zero_stream),
                "cuMemsetD8Async",
            )
            .and_then(|_| {
                check(
                    sys::cuStreamSynchronize(self.zero_stream),
                    "cuStreamSynchronize",
                )
            })
        }
        .map_err(fail)?;
        Ok(chunk)
    }
}

impl Drop for GpuMemory {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: the stream is ours; every chunk holds an Arc to this, so none is left.
            unsafe { sys::cuStreamDestroy_v2(self.zero_stream) };
        }
    }
}

/// One chunk of GPU memory: mapped at `ptr`, unmapped (and its memory given back to the
/// GPU) when dropped. The chunk map drops a chunk only after the last request using it
/// has completed, so no copy can still be running on it.
pub struct GpuChunk {
    mem: Arc<GpuMemory>,
    ptr: CUdeviceptr,
    size: usize,
    len: usize,
    index: u64,
}

impl GpuChunk {
    /// Device address of the chunk's first byte.
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }
    /// Logical length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True for an empty range.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Chunk number within the device.
    pub fn index(&self) -> u64 {
        self.index
    }
    /// Position of this chunk's GPU in the device's GPU list.
    pub fn position(&self) -> usize {
        self.mem.position
    }
    /// The GPU holding the chunk.
    pub fn gpu(&self) -> &Gpu {
        &self.mem.gpu
    }
}

impl Drop for GpuChunk {
    fn drop(&mut self) {
        if self.mem.gpu.bind().is_ok() {
            // SAFETY: ptr..ptr+size was reserved and mapped by alloc and nothing uses it any
            // more.
            let rc = unsafe { sys::cuMemUnmap(self.ptr, self.size) };
            // SAFETY: as above; the range is unmapped now.
            unsafe { sys::cuMemAddressFree(self.ptr, self.size) };
            if let Err(e) = check(rc, "cuMemUnmap") {
                tracing::debug!(
                    "freeing chunk {} on GPU {}: {e}",
                    self.index,
                    self.mem.gpu.index
                );
            }
        }
    }
}
