//! Loading the NVIDIA driver, its errors, and the per-GPU context every calling thread binds.
//!
//! `cudarc` loads `libcuda.so.1` on first use and panics when it is missing, as it does when
//! a symbol is missing. So before the first driver call, [`init`] checks that the library
//! loads and that every entry point this backend calls is there, and turns either failure
//! into one sentence the CLI can print.

use cudarc::driver::sys::{self, CUcontext, CUdevice, CUresult};
use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{CStr, c_char};
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

/// The sentence printed when there is no driver library at all. Like every driver error it
/// states the fact only: what to do depends on the command, so the CLI adds that.
pub const NO_DRIVER: &str = "no NVIDIA driver found (libcuda.so.1)";

/// The NVIDIA driver cannot be used at all (missing, too old, failed to start, no GPU), as
/// opposed to a mistake in naming GPUs. Callers add advice that fits their command.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// Driver entry points this backend calls; checked at start so a missing one is an error
/// message rather than a panic inside `cudarc`.
const REQUIRED: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetPCIBusId",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuCtxSetCurrent",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuMemGetInfo_v2",
    "cuMemGetAllocationGranularity",
    "cuMemAddressReserve",
    "cuMemAddressFree",
    "cuMemCreate",
    "cuMemMap",
    "cuMemSetAccess",
    "cuMemUnmap",
    "cuMemRelease",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuMemHostGetDevicePointer_v2",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventQuery",
    "cuEventDestroy_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemsetD8Async",
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuLaunchKernel",
];

/// A failed driver call: which call, and the driver's error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CuError {
    /// The driver's result code.
    pub code: CUresult,
    /// The call that failed.
    pub call: &'static str,
}

impl CuError {
    /// True when the error leaves the context unusable: every later call fails the same way
    /// (a kernel fault, an uncorrectable ECC error, a lost device).
    pub fn is_sticky(&self) -> bool {
        use CUresult::*;
        matches!(
            self.code,
            CUDA_ERROR_ILLEGAL_ADDRESS
                | CUDA_ERROR_LAUNCH_FAILED
                | CUDA_ERROR_HARDWARE_STACK_ERROR
                | CUDA_ERROR_ILLEGAL_INSTRUCTION
                | CUDA_ERROR_MISALIGNED_ADDRESS
                | CUDA_ERROR_INVALID_ADDRESS_SPACE
                | CUDA_ERROR_INVALID_PC
                | CUDA_ERROR_ECC_UNCORRECTABLE
                | CUDA_ERROR_DEINITIALIZED
                | CUDA_ERROR_CONTEXT_IS_DESTROYED
                | CUDA_ERROR_SYSTEM_NOT_READY
        )
    }

    /// True when the driver ran out of device memory.
    pub fn is_out_of_memory(&self) -> bool {
        self.code == CUresult::CUDA_ERROR_OUT_OF_MEMORY
    }
}

/// The driver's name for a result code, e.g. "CUDA_ERROR_ILLEGAL_ADDRESS".
pub fn error_name(code: CUresult) -> String {
    let mut name: *const c_char = std::ptr::null();
    // SAFETY: the driver is loaded (init succeeded before any CuError can exist) and writes
    // a pointer to a static string or leaves it null.
    let rc = unsafe { sys::cuGetErrorName(code, &mut name) };
    if rc != CUresult::CUDA_SUCCESS || name.is_null() {
        return format!("CUDA error {}", code as u32);
    }
    // SAFETY: the driver returned a NUL-terminated static string.
    unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned()
}

impl fmt::Display for CuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {}", self.call, error_name(self.code))
    }
}

impl std::error::Error for CuError {}

/// Turns a driver result into a `Result`, naming the call.
pub fn check(code: CUresult, call: &'static str) -> Result<(), CuError> {
    if code == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CuError { code, call })
    }
}

/// True when the driver library can be loaded (says nothing about GPUs).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { sys::is_culib_present() }
}

/// Loads the driver and initialises it once; every later call returns the first outcome.
pub fn init() -> Result<(), String> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        if !driver_present() {
            return Err(NO_DRIVER.to_string());
        }
        // SAFETY: the library loads (checked just above), so culib() does not panic.
        let lib = unsafe { sys::culib() };
        for name in REQUIRED {
            // SAFETY: only looks the symbol up; it is not called through this type.
            if unsafe { lib.get::<*const ()>(name.as_bytes()) }.is_err() {
                return Err(format!(
                    "the NVIDIA driver is too old (it lacks {name}): update it"
                ));
            }
        }
        // SAFETY: plain driver call.
        let rc = unsafe { sys::cuInit(0) };
        match rc {
            CUresult::CUDA_SUCCESS => Ok(()),
            CUresult::CUDA_ERROR_NO_DEVICE => Err(
                "the NVIDIA driver is loaded but finds no GPU (CUDA_ERROR_NO_DEVICE)".to_string(),
            ),
            other => Err(format!(
                "the NVIDIA driver failed to start ({})",
                error_name(other)
            )),
        }
    })
    .clone()
}

/// True when the loaded driver exports `name` (for optional entry points).
pub fn has_symbol(name: &str) -> bool {
    if init().is_err() {
        return false;
    }
    // SAFETY: init succeeded, so the library is loaded; the symbol is only looked up.
    unsafe { sys::culib().get::<*const ()>(name.as_bytes()) }.is_ok()
}

/// Number of GPUs the driver sees.
pub fn device_count() -> Result<usize, String> {
    init()?;
    let mut n = 0;
    // SAFETY: plain driver call after init.
    check(unsafe { sys::cuDeviceGetCount(&mut n) }, "cuDeviceGetCount")
        .map_err(|e| e.to_string())?;
    Ok(n.max(0) as usize)
}

/// One GPU with its primary context retained for the life of the process.
pub struct Gpu {
    /// CUDA device index.
    pub index: usize,
    /// The driver's device handle.
    pub device: CUdevice,
    /// The device's primary context.
    ctx: CUcontext,
    /// Marketing name.
    pub name: String,
    /// PCI bus id.
    pub pci_bus_id: String,
    /// Total memory in bytes.
    pub total_memory: u64,
}

// SAFETY: a CUcontext is a handle the driver lets any thread make current.
unsafe impl Send for Gpu {}
// SAFETY: as above; Gpu is immutable after creation.
unsafe impl Sync for Gpu {}

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

impl Gpu {
    /// The GPU at `index`, retaining its primary context the first time it is asked for.
    pub fn get(index: usize) -> Result<Arc<Gpu>, String> {
        static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
        let count = device_count()?;
        if index >= count {
            return Err(match count {
                0 => "the NVIDIA driver finds no GPU".to_string(),
                1 => format!("there is no GPU {index}: this machine has one GPU, GPU 0"),
                n => format!(
                    "there is no GPU {index}: this machine has {n} GPUs, 0 to {}",
                    n - 1
                ),
            });
        }
        let mut gpus = GPUS.get_or_init(Default::default).lock().unwrap();
        if let Some(gpu) = gpus.get(&index) {
            return Ok(gpu.clone());
        }
        let gpu = Arc::new(Self::open(index).map_err(|e| format!("GPU {index}: {e}"))?);
        gpus.insert(index, gpu.clone());
        Ok(gpu)
    }

    fn open(index: usize) -> Result<Gpu, CuError> {
        let mut device: CUdevice = 0;
        let mut name = [0 as c_char; 256];
        let mut bus = [0 as c_char; 64];
        let mut total = 0usize;
        let mut ctx: CUcontext = std::ptr::null_mut();
        // SAFETY: plain driver calls after init, with buffers of the sizes passed.
        unsafe {
            check(sys::cuDeviceGet(&mut device, index as i32), "cuDeviceGet")?;
            check(
                sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, device),
                "cuDeviceGetName",
            )?;
            check(
                sys::cuDeviceGetPCIBusId(bus.as_mut_ptr(), bus.len() as i32, device),
                "cuDeviceGetPCIBusId",
            )?;
            check(
                sys::cuDeviceTotalMem_v2(&mut total, device),
                "cuDeviceTotalMem",
            )?;
            check(
                sys::cuDevicePrimaryCtxRetain(&mut ctx, device),
                "cuDevicePrimaryCtxRetain",
            )?;
        }
        // SAFETY: the driver wrote NUL-terminated strings into the buffers.
        let cstr = |b: &[c_char]| {
            unsafe { CStr::from_ptr(b.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        };
        Ok(Gpu {
            index,
            device,
            ctx,
            name: cstr(&name),
            pci_bus_id: cstr(&bus).to_lowercase(),
            total_memory: total as u64,
        })
    }

    /// Makes this GPU's context current on the calling thread. A context is per thread in
    /// the driver API, and tokio moves tasks between threads, so every entry point that calls
    /// the driver binds first; a thread-local cache makes the common case one comparison.
    pub fn bind(&self) -> Result<(), CuError> {
        let want = self.ctx as usize;
        if CURRENT.with(|c| c.get()) == want {
            return Ok(());
        }
        // SAFETY: ctx is a retained primary context.
        check(unsafe { sys::cuCtxSetCurrent(self.ctx) }, "cuCtxSetCurrent")?;
        CURRENT.with(|c| c.set(want));
        Ok(())
    }

    /// Free and total device memory right now (cuMemGetInfo).
    pub fn mem_info(&self) -> Result<(u64, u64), CuError> {
        self.bind()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: context bound; plain driver call.
        check(
            unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) },
            "cuMemGetInfo",
        )?;
        Ok((free as u64, total as u64))
    }
}
