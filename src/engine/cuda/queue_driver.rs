//! What the copy queue needs of a GPU: streams, events, copies and batched copies. The
//! queue is generic over it so that its combining, batching, reaping and cancellation run
//! in tests against a fake GPU; [`CudaDriver`] is the real one.

use super::driver::{CuError, Gpu, check};
use super::kernel::{Batch, CopyKernel};
use super::queue::{BatchMode, OpKind};
use cudarc::driver::sys::{self, CUdeviceptr, CUevent, CUresult, CUstream};
use std::sync::Arc;

/// The driver calls of one GPU's copy queue. The queue binds the context (`bind`) before
/// the others on every thread that makes them.
pub trait QueueDriver: Send + Sync + 'static {
    /// A stream: work on it runs in order.
    type Stream: Copy;
    /// An event recorded on a stream: fires once the work before it is done.
    type Event: Copy;

    /// Makes this GPU's context current on the calling thread.
    fn bind(&self) -> Result<(), CuError>;
    /// Which GPU, for log lines and thread names.
    fn index(&self) -> usize;
    /// The GPU's name, for log lines.
    fn name(&self) -> &str;
    /// How small copies can be batched (the kernel or `cuMemcpyBatchAsync` may be missing).
    fn batching(&self) -> BatchMode;
    /// A new stream.
    fn create_stream(&self) -> Result<Self::Stream, CuError>;
    /// Frees a stream nothing runs on any more.
    fn destroy_stream(&self, stream: Self::Stream);
    /// A new event.
    fn create_event(&self) -> Result<Self::Event, CuError>;
    /// Frees an event nobody waits on.
    fn destroy_event(&self, event: Self::Event);
    /// Records `event` after the work now on `stream`.
    fn record(&self, event: Self::Event, stream: Self::Stream) -> Result<(), CuError>;
    /// True once `event` has fired, false while the work before it runs.
    fn query(&self, event: Self::Event) -> Result<bool, CuError>;
    /// Puts one copy (or, for `Zero`, one memset) of `len` bytes on `stream`.
    ///
    /// # Safety
    /// `dev` and `host` must stay valid for `len` bytes until the work completes.
    unsafe fn copy(
        &self,
        stream: Self::Stream,
        kind: OpKind,
        dev: CUdeviceptr,
        host: *mut u8,
        len: usize,
    ) -> Result<(), CuError>;
    /// Puts the copies of `batch` on `stream` as one launch of the gather kernel.
    ///
    /// # Safety
    /// Every descriptor must name memory valid until the work completes.
    unsafe fn launch(&self, stream: Self::Stream, batch: &Batch) -> Result<(), CuError>;
    /// Puts `srcs[i] -> dsts[i]` (`sizes[i]` bytes) on `stream` as one batched copy.
    ///
    /// # Safety
    /// Every address must name memory valid until the work completes.
    unsafe fn copy_batch(
        &self,
        stream: Self::Stream,
        dsts: &mut [CUdeviceptr],
        srcs: &mut [CUdeviceptr],
        sizes: &mut [usize],
    ) -> Result<(), CuError>;
}

/// A CUDA stream handle, opaque outside the driver.
#[derive(Clone, Copy)]
pub struct Stream(CUstream);

/// A CUDA event handle, opaque outside the driver.
#[derive(Clone, Copy)]
pub struct Event(CUevent);

/// The CUDA driver, with the gather kernel where it loads.
pub struct CudaDriver {
    gpu: Arc<Gpu>,
    kernel: Option<CopyKernel>,
    memcpy_batch: bool,
}

impl CudaDriver {
    /// The driver of `gpu`, batching small copies by `batch` where the driver can (the
    /// kernel, else `cuMemcpyBatchAsync`, else not at all); says why in the log when not.
    pub fn new(gpu: Arc<Gpu>, batch: BatchMode) -> CudaDriver {
        let kernel = match batch {
            BatchMode::Kernel => match CopyKernel::load(&gpu) {
                Ok(k) => Some(k),
                Err(e) => {
                    tracing::info!("GPU {}: gather kernel unavailable ({e})", gpu.index);
                    None
                }
            },
            _ => None,
        };
        // Without the kernel (an older driver cannot load PTX this new), batch by
        // cuMemcpyBatchAsync where the driver has it.
        let want_memcpy_batch =
            batch == BatchMode::MemcpyBatch || (batch == BatchMode::Kernel && kernel.is_none());
        let memcpy_batch = want_memcpy_batch && super::driver::has_symbol("cuMemcpyBatchAsync");
        if want_memcpy_batch && !memcpy_batch {
            tracing::info!(
                "GPU {}: the driver has no cuMemcpyBatchAsync; small copies go one by one",
                gpu.index
            );
        }
        CudaDriver {
            gpu,
            kernel,
            memcpy_batch,
        }
    }
}

impl QueueDriver for CudaDriver {
    type Stream = Stream;
    type Event = Event;

    fn bind(&self) -> Result<(), CuError> {
        self.gpu.bind()
    }

    fn index(&self) -> usize {
        self.gpu.index
    }

    fn name(&self) -> &str {
        &self.gpu.name
    }

    fn batching(&self) -> BatchMode {
        if self.kernel.is_some() {
            BatchMode::Kernel
        } else if self.memcpy_batch {
            BatchMode::MemcpyBatch
        } else {
            BatchMode::Off
        }
    }

    fn create_stream(&self) -> Result<Stream, CuError> {
        let mut stream: CUstream = std::ptr::null_mut();
        // SAFETY: plain driver call with the context bound.
        check(
            unsafe {
                sys::cuStreamCreate(
                    &mut stream,
                    sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
                )
            },
            "cuStreamCreate",
        )?;
        Ok(Stream(stream))
    }

    fn destroy_stream(&self, stream: Stream) {
        // SAFETY: the stream is ours and idle.
        unsafe { sys::cuStreamDestroy_v2(stream.0) };
    }

    fn create_event(&self) -> Result<Event, CuError> {
        let mut ev: CUevent = std::ptr::null_mut();
        // SAFETY: plain driver call with the context bound.
        check(
            unsafe {
                sys::cuEventCreate(&mut ev, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
            },
            "cuEventCreate",
        )?;
        Ok(Event(ev))
    }

    fn destroy_event(&self, event: Event) {
        // SAFETY: the event is ours; a failing context may refuse, harmlessly.
        unsafe { sys::cuEventDestroy_v2(event.0) };
    }

    fn record(&self, event: Event, stream: Stream) -> Result<(), CuError> {
        // SAFETY: the event and the stream belong to this context.
        check(
            unsafe { sys::cuEventRecord(event.0, stream.0) },
            "cuEventRecord",
        )
    }

    fn query(&self, event: Event) -> Result<bool, CuError> {
        // SAFETY: the event belongs to this context.
        match unsafe { sys::cuEventQuery(event.0) } {
            CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            rc => check(rc, "cuEventQuery").map(|_| true),
        }
    }

    unsafe fn copy(
        &self,
        stream: Stream,
        kind: OpKind,
        dev: CUdeviceptr,
        host: *mut u8,
        len: usize,
    ) -> Result<(), CuError> {
        // SAFETY: the caller keeps host and device memory valid until the work completes.
        unsafe {
            match kind {
                OpKind::Write => check(
                    sys::cuMemcpyHtoDAsync_v2(dev, host as *const _, len, stream.0),
                    "cuMemcpyHtoDAsync",
                ),
                OpKind::Read => check(
                    sys::cuMemcpyDtoHAsync_v2(host as *mut _, dev, len, stream.0),
                    "cuMemcpyDtoHAsync",
                ),
                OpKind::Zero => check(
                    sys::cuMemsetD8Async(dev, 0, len, stream.0),
                    "cuMemsetD8Async",
                ),
            }
        }
    }

    unsafe fn launch(&self, stream: Stream, batch: &Batch) -> Result<(), CuError> {
        let kernel = self.kernel.as_ref().ok_or(CuError {
            code: CUresult::CUDA_ERROR_NOT_SUPPORTED,
            call: "cuLaunchKernel",
        })?;
        // SAFETY: the caller's contract.
        unsafe { kernel.launch(stream.0, batch) }
    }

    unsafe fn copy_batch(
        &self,
        stream: Stream,
        dsts: &mut [CUdeviceptr],
        srcs: &mut [CUdeviceptr],
        sizes: &mut [usize],
    ) -> Result<(), CuError> {
        // SAFETY: plain C struct; zero means "no location hint".
        let mut attr: sys::CUmemcpyAttributes = unsafe { std::mem::zeroed() };
        attr.srcAccessOrder = sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM;
        let mut attr_idx = 0usize;
        let mut fail_idx = 0usize;
        // SAFETY: arrays of the same length each; memory valid until completion (the
        // caller's contract).
        check(
            unsafe {
                sys::cuMemcpyBatchAsync(
                    dsts.as_mut_ptr(),
                    srcs.as_mut_ptr(),
                    sizes.as_mut_ptr(),
                    sizes.len(),
                    &mut attr,
                    &mut attr_idx,
                    1,
                    &mut fail_idx,
                    stream.0,
                )
            },
            "cuMemcpyBatchAsync",
        )
    }
}
