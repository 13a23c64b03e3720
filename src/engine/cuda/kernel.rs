//! The gather/scatter copy kernel (source in `kernel/copy.cu`, PTX in `kernel/copy.ptx`).

use super::driver::{CuError, Gpu, check};
use cudarc::driver::sys::{self, CUfunction, CUmodule, CUstream};
use std::ffi::{CString, c_void};

/// Most copies one launch carries (the parameter block must stay under 4 KiB).
pub const MAX_DESCS: usize = 128;

use crate::tunables::CUDA_COPY_THREADS as THREADS;

/// PTX built from `kernel/copy.cu` by nvcc (see the header of that file).
const EMBEDDED_PTX: &str = include_str!("kernel/copy.ptx");

/// One copy: `len` bytes from `src` to `dst`, each a device address (GPU memory, or pinned
/// host memory through its device mapping).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Desc {
    /// Source address.
    pub src: u64,
    /// Destination address.
    pub dst: u64,
    /// Bytes.
    pub len: u64,
}

/// The kernel's parameter block; layout matches `struct Batch` in copy.cu.
#[repr(C)]
pub struct Batch {
    /// Descriptors in use.
    pub count: u64,
    /// The copies.
    pub descs: [Desc; MAX_DESCS],
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            count: 0,
            descs: [Desc::default(); MAX_DESCS],
        }
    }
}

/// The loaded kernel on one GPU.
pub struct CopyKernel {
    _module: CUmodule,
    func: CUfunction,
}

// SAFETY: module and function handles are usable from any thread with the context bound.
unsafe impl Send for CopyKernel {}
// SAFETY: as above; launching does not mutate the handles.
unsafe impl Sync for CopyKernel {}

impl CopyKernel {
    /// Loads the kernel into `gpu`'s context. `VRAMDISK_COPY_PTX` names a PTX file to use
    /// instead of the embedded one (for trying a rebuilt kernel without rebuilding vramdisk).
    pub fn load(gpu: &Gpu) -> Result<CopyKernel, String> {
        let text = match std::env::var_os("VRAMDISK_COPY_PTX") {
            Some(path) => std::fs::read_to_string(&path)
                .map_err(|e| format!("reading {}: {e}", path.to_string_lossy()))?,
            None => EMBEDDED_PTX.to_string(),
        };
        if !text.contains(".entry vramdisk_copy") {
            return Err("no copy kernel PTX is built in".into());
        }
        let ptx = CString::new(text).map_err(|_| "PTX contains a NUL byte".to_string())?;
        gpu.bind().map_err(|e| e.to_string())?;
        let mut module: CUmodule = std::ptr::null_mut();
        let mut func: CUfunction = std::ptr::null_mut();
        // SAFETY: ptx is NUL-terminated text; the context is bound.
        unsafe {
            check(
                sys::cuModuleLoadData(&mut module, ptx.as_ptr() as *const c_void),
                "cuModuleLoadData",
            )
            .map_err(|e| e.to_string())?;
            check(
                sys::cuModuleGetFunction(&mut func, module, c"vramdisk_copy".as_ptr()),
                "cuModuleGetFunction",
            )
            .map_err(|e| e.to_string())?;
        }
        Ok(CopyKernel {
            _module: module,
            func,
        })
    }

    /// Launches one copy per descriptor of `batch` on `stream` (context must be bound).
    ///
    /// # Safety
    /// Every descriptor must name memory that stays valid and unused by others until the
    /// launch completes on the stream.
    pub unsafe fn launch(&self, stream: CUstream, batch: &Batch) -> Result<(), CuError> {
        let mut arg = batch as *const Batch as *mut c_void;
        // SAFETY: the kernel takes one parameter of type Batch; the driver copies it at launch.
        check(
            unsafe {
                sys::cuLaunchKernel(
                    self.func,
                    batch.count as u32,
                    1,
                    1,
                    THREADS,
                    1,
                    1,
                    0,
                    stream,
                    &mut arg,
                    std::ptr::null_mut(),
                )
            },
            "cuLaunchKernel",
        )
    }
}
