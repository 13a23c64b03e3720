//! The CUDA backend: chunks in NVIDIA GPU memory, moved at PCIe speed.
//!
//! A request travels: [`crate::engine::SparseDevice`] finds (or allocates) the chunk, and
//! [`CudaBackend`] turns the piece of the request inside it into an op on that GPU's
//! [`queue::CopyQueue`]. The op is issued by whichever task is combining at the moment
//! (small ones batched into one kernel launch), and a completion thread wakes the task when
//! the GPU has finished. No tokio worker waits on the GPU.
//!
//! - [`driver`]: loading `libcuda.so.1` (checked before `cudarc` could panic on its absence),
//!   errors, and binding each GPU's primary context on whatever thread calls the driver.
//! - [`memory`]: chunks of GPU memory.
//! - [`pinned`]: pinned host memory: the allocator behind the device's I/O buffers and the
//!   staging pool for buffers that are not pinned.
//! - [`queue`]: submission (flat combining, batching, streams) and completion.
//! - [`kernel`]: the gather/scatter kernel that carries a batch of small copies.
//! - [`ceiling`]: the raw copy rate the benchmark compares against.
//!
//! **Memory: virtual memory management rather than `cuMemAlloc`.** A chunk is physical memory
//! created with `cuMemCreate` and mapped into an address range of its own. Reasons: freeing a
//! chunk (TRIM) is an unmap, which the driver documents without the implicit device
//! synchronisation that `cuMemFree` may perform, so a TRIM need not stall copies running on
//! other chunks; the physical memory is exactly the chunk rounded to the 2 MiB granularity,
//! so `cuMemGetInfo` (what `--keep-free` checks) moves by exactly what we take and give back,
//! with no allocator caching in between; and it costs no more (measured on an H200, 2 MiB
//! chunks: reserve + create + map + set access 34 µs, unmap + free 25 µs; `cuMemAlloc` 35 µs,
//! `cuMemFree` 29 µs). The cost is that chunks smaller than the granularity would waste
//! memory, so the backend refuses them.
//!
//! **Data path.** The device's I/O buffers are pinned and mapped (`cuMemHostAlloc`), so a
//! payload read off a socket into one is copied by DMA with no staging. Other buffers are
//! copied through a fixed pinned staging pool. Large copies are `cuMemcpy*Async` spread over
//! several streams; small ones issued together go out as one launch of the gather kernel,
//! which reads and writes the mapped host memory directly.

pub mod backend;
pub mod ceiling;
pub mod driver;
pub mod kernel;
pub mod memory;
pub mod pinned;
pub mod queue;
pub mod queue_driver;

pub use backend::CudaBackend;
pub use driver::{NO_DRIVER, Unavailable, driver_present};
pub use queue::{BatchMode, QueueOptions, QueueStats};

use super::{BlockDevice, SparseDevice, SparseOptions};
use anyhow::{Result, anyhow, bail};
use driver::Gpu;
use std::sync::Arc;

/// One GPU as `vramdisk devices` lists it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GpuInfo {
    /// CUDA device index.
    pub index: usize,
    /// Marketing name, e.g. "NVIDIA H200".
    pub name: String,
    /// Total memory in bytes.
    pub total_memory: u64,
    /// Free memory in bytes right now.
    pub free_memory: u64,
    /// PCI bus id, e.g. "0000:17:00.0".
    pub pci_bus_id: String,
}

/// Lists usable GPUs; fails with one sentence when there is no NVIDIA driver or no GPU.
pub fn probe() -> Result<Vec<GpuInfo>> {
    let count = driver::device_count().map_err(|e| anyhow!(Unavailable(e)))?;
    let mut out = Vec::new();
    for index in 0..count {
        let gpu = Gpu::get(index).map_err(|e| anyhow!(e))?;
        let (free, _) = gpu.mem_info().map_err(|e| anyhow!("GPU {index}: {e}"))?;
        out.push(GpuInfo {
            index,
            name: gpu.name.clone(),
            total_memory: gpu.total_memory,
            free_memory: free,
            pci_bus_id: gpu.pci_bus_id.clone(),
        });
    }
    Ok(out)
}

/// Options of a CUDA device beyond the sparse layout.
#[derive(Clone, Debug, Default)]
pub struct CudaOptions {
    /// GPU indexes; chunks are placed round-robin over them. Empty means GPU 0.
    pub gpus: Vec<usize>,
    /// Bytes to leave free on each GPU for other programs.
    pub keep_free: Option<u64>,
    /// Copy queue tuning.
    pub queue: QueueOptions,
}

/// Opens a CUDA-backed device on `gpus` (empty: GPU 0).
pub fn open_device(
    gpus: &[usize],
    keep_free: Option<u64>,
    opts: SparseOptions,
) -> Result<Arc<dyn BlockDevice>> {
    let copts = CudaOptions {
        gpus: gpus.to_vec(),
        keep_free,
        queue: QueueOptions::default(),
    };
    Ok(open(&copts, opts)?)
}

/// The GPUs named by `indexes` (GPU 0 when empty), checked for repeats.
pub fn gpus(indexes: &[usize]) -> Result<Vec<Arc<Gpu>>> {
    if driver::device_count().map_err(|e| anyhow!(Unavailable(e)))? == 0 {
        bail!(Unavailable("the NVIDIA driver finds no GPU".into()));
    }
    let list: Vec<usize> = if indexes.is_empty() {
        vec![0]
    } else {
        indexes.to_vec()
    };
    for (i, g) in list.iter().enumerate() {
        if list[..i].contains(g) {
            bail!("--gpu names GPU {g} twice: list each GPU once, like --gpu 0,1");
        }
    }
    list.iter()
        .map(|&i| Gpu::get(i).map_err(|e| anyhow!(e)))
        .collect()
}

/// Opens a CUDA-backed device with every option, returning the concrete type (for the
/// benchmark and tests).
pub fn open(copts: &CudaOptions, opts: SparseOptions) -> Result<Arc<SparseDevice<CudaBackend>>> {
    open_with_spill(copts, opts, crate::engine::tier::SpillStore::default())
}

/// Like [`open`], with chunks spilling to `spill` when a GPU is full or gives memory back.
pub fn open_with_spill(
    copts: &CudaOptions,
    opts: SparseOptions,
    spill: crate::engine::tier::SpillStore,
) -> Result<Arc<SparseDevice<CudaBackend>>> {
    let gpus = gpus(&copts.gpus)?;
    let keep_free = copts.keep_free.unwrap_or(0);
    let gran = memory::granularity(&gpus[0]).map_err(|e| anyhow!("GPU {}: {e}", gpus[0].index))?;
    if opts.chunk_size < gran {
        bail!(
            "--chunk-size {} is below the GPU's allocation unit of {} KiB: use --chunk-size {}M \
             or larger with the cuda backend",
            opts.chunk_size,
            gran >> 10,
            (gran >> 20).max(1)
        );
    }
    if opts.preallocate {
        check_preallocate(&gpus, &opts, keep_free, gran)?;
    }
    let backend =
        CudaBackend::new(&gpus, opts.chunk_size, keep_free, copts.queue).map_err(|e| anyhow!(e))?;
    let preallocate = opts.preallocate;
    let device = SparseDevice::with_spill(backend, opts, spill).map_err(|e| {
        if preallocate {
            anyhow!("--preallocate could not take the whole device: {e}")
        } else {
            anyhow!(e)
        }
    })?;
    Ok(Arc::new(device))
}

/// Fails with a sentence when some GPU lacks the free memory `--preallocate` needs.
fn check_preallocate(
    gpus: &[Arc<Gpu>],
    opts: &SparseOptions,
    keep_free: u64,
    gran: usize,
) -> Result<()> {
    let n = gpus.len() as u64;
    let chunks = opts.size.div_ceil(opts.chunk_size as u64);
    for (pos, gpu) in gpus.iter().enumerate() {
        let mut need = 0u64;
        let mut i = pos as u64;
        while i < chunks {
            let len = (opts.size - i * opts.chunk_size as u64).min(opts.chunk_size as u64);
            need += memory::round_up(len as usize, gran) as u64;
            i += n;
        }
        let (free, _) = gpu
            .mem_info()
            .map_err(|e| anyhow!("GPU {}: {e}", gpu.index))?;
        if need + keep_free > free {
            let keep = if keep_free > 0 {
                format!(" plus --keep-free {}", format_size(keep_free))
            } else {
                String::new()
            };
            bail!(
                "--preallocate needs {}{keep} on GPU {} ({}) but only {} is free: use a smaller \
                 --size or leave out --preallocate",
                format_size(need),
                gpu.index,
                gpu.name,
                format_size(free)
            );
        }
    }
    Ok(())
}

/// Bytes as "1.5 GiB" (or MiB) for messages.
fn format_size(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}
