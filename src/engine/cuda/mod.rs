//! The CUDA backend: chunks in NVIDIA GPU memory. (To be written: this file holds the
//! interface the CLI uses.)

use super::{BlockDevice, SparseOptions};
use anyhow::{Result, bail};
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

/// Lists usable GPUs; fails with one sentence when there is no NVIDIA driver.
pub fn probe() -> Result<Vec<GpuInfo>> {
    bail!("no NVIDIA driver found (libcuda.so.1): use --backend host")
}

/// Opens a CUDA-backed device on `gpus` (empty: GPU 0).
pub fn open_device(
    _gpus: &[usize],
    _keep_free: Option<u64>,
    _opts: SparseOptions,
) -> Result<Arc<dyn BlockDevice>> {
    bail!("no NVIDIA driver found (libcuda.so.1): use --backend host")
}
