//! Arguments that describe a device (backend, size, limits), shared by `serve` and `attach`,
//! and the code that turns them into a [`BlockDevice`].

use super::size::{format_size, parse_size};
use crate::engine::fake_gpu::FakeGpuBackend;
use crate::engine::host::HostBackend;
use crate::engine::persist::{NoProgress, Progress};
use crate::engine::tier::{SpillFile, SpillRam, SpillStore, TierControl, control::Tiering};
use crate::engine::{BlockDevice, SparseDevice, SparseOptions};
use crate::ops::progress::ConsoleProgress;
use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use std::sync::Arc;

/// Where a device keeps its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// GPU memory when a usable NVIDIA GPU is found, host RAM otherwise.
    Auto,
    /// NVIDIA GPU memory through CUDA.
    Cuda,
    /// Host RAM.
    Host,
    /// Host RAM posing as a GPU shared with other programs (tests of the tier logic).
    #[value(hide = true)]
    FakeGpu,
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s)
}

/// A chunk size: a power of two from 4K to 1G (a chunk is the unit of allocation and of
/// the map, and must hold whole pages).
fn chunk_size_arg(s: &str) -> Result<u64, String> {
    let size = parse_size(s)?;
    if !size.is_power_of_two() || size < 4096 {
        return Err(format!(
            "'{s}' is not a power of two of at least 4K: use for example 2M"
        ));
    }
    if size > 1 << 30 {
        return Err(format!("'{s}' is more than 1G, the largest chunk"));
    }
    Ok(size)
}

/// One named export given on the command line as `NAME=SIZE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSpec {
    /// Export name clients ask for ("" is the default export).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

fn export_arg(s: &str) -> Result<ExportSpec, String> {
    let (name, size) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not an export: write NAME=SIZE, like scratch=16G"))?;
    if name.len() > 4096 {
        return Err("export names are limited to 4096 bytes".into());
    }
    Ok(ExportSpec {
        name: name.to_string(),
        size: parse_size(size)?,
    })
}

/// Device options shared by every subcommand that creates devices.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Where the data lives.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendKind,

    /// Size of the default export (the one with the empty name), e.g. 16G.
    #[arg(long, value_parser = size_arg)]
    pub size: Option<u64>,

    /// A named export NAME=SIZE; repeatable. Without --size the first one is also the default.
    #[arg(long = "export", value_name = "NAME=SIZE", value_parser = export_arg)]
    pub exports: Vec<ExportSpec>,

    /// Most memory each device may take; writes beyond it fail with ENOSPC.
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    pub max_memory: Option<u64>,

    /// Allocation unit: memory is taken and given back in chunks of this size (a power of two).
    #[arg(long, value_name = "SIZE", value_parser = chunk_size_arg, default_value = "2M")]
    pub chunk_size: u64,

    /// Take all the memory at start (no allocation on the I/O path; needed for swap).
    #[arg(long)]
    pub preallocate: bool,

    /// Refuse writes, trims and zeroes.
    #[arg(long)]
    pub read_only: bool,

    /// GPUs to use, as indexes: "0", or "0,1" to spread one device over several GPUs.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub gpu: Vec<usize>,

    /// Leave at least this much GPU memory free for other programs.
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    pub keep_free: Option<u64>,

    /// Host RAM that chunks move to when the GPU's other programs need its memory (see
    /// `vramdisk yield`); pinned in the background at start so moves run at PCIe speed.
    /// Default: an eighth of the machine's RAM, at most the devices' size; 0 turns it off.
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    pub spill_memory: Option<u64>,

    /// A file for chunks that spill RAM cannot hold, preallocated at start and used with
    /// O_DIRECT.
    #[arg(long, value_name = "PATH")]
    pub spill_file: Option<std::path::PathBuf>,

    /// Size of --spill-file (default: the devices' size).
    #[arg(long, value_name = "SIZE", value_parser = size_arg, requires = "spill_file")]
    pub spill_file_size: Option<u64>,

    /// Total memory of the pretend GPU of `--backend fake-gpu` (tests).
    #[arg(long, value_name = "SIZE", value_parser = size_arg, hide = true)]
    pub fake_gpu_memory: Option<u64>,

    /// File holding the bytes "other programs" use on the pretend GPU (tests).
    #[arg(long, value_name = "FILE", hide = true)]
    pub fake_gpu_others: Option<std::path::PathBuf>,

    /// The pretend GPU's copies complete later, woken from another thread, as a GPU's
    /// do (tests of frontends that keep copies in flight).
    #[arg(long, hide = true)]
    pub fake_gpu_async: bool,

    /// Most memory used for I/O buffers in flight, all exports together.
    #[arg(long, value_name = "SIZE", value_parser = size_arg, default_value = "1G")]
    pub buffer_memory: u64,
}

/// A device ready to be served, with the name it is exported under.
pub struct NamedDevice {
    /// Export name.
    pub name: String,
    /// The device.
    pub device: Arc<dyn BlockDevice>,
    /// Its tier logic (watermark, yield), where it can spill.
    pub tiers: Option<Arc<dyn TierControl>>,
    /// Its GPU copy queues' counters, on GPU memory.
    pub copies: Option<crate::ops::CopyCounters>,
}

impl DeviceArgs {
    /// The exports these arguments ask for, default first; an error sentence if none or if
    /// names repeat.
    pub fn export_specs(&self) -> Result<Vec<ExportSpec>> {
        let mut specs = Vec::new();
        if let Some(size) = self.size {
            specs.push(ExportSpec {
                name: String::new(),
                size,
            });
        }
        specs.extend(self.exports.iter().cloned());
        if specs.is_empty() {
            bail!("no device size given: add --size SIZE (for example --size 16G)");
        }
        for (i, s) in specs.iter().enumerate() {
            if specs[..i].iter().any(|o| o.name == s.name) {
                if s.name.is_empty() && self.size.is_some() {
                    bail!(
                        "--export ={} names the unnamed export, which --size already makes: \
                         drop --size, or give the --export a name (NAME=SIZE)",
                        format_size(s.size)
                    );
                }
                bail!(
                    "export name '{}' is given twice: give each export its own name",
                    s.name
                );
            }
            if s.size == 0 {
                bail!("export '{}' has size 0: give it a size, like 1G", s.name);
            }
        }
        Ok(specs)
    }

    fn options(&self, size: u64) -> Result<SparseOptions> {
        let mut opts = SparseOptions::new(size);
        opts.chunk_size = self.chunk_size as usize;
        opts.max_memory = self.max_memory;
        opts.read_only = self.read_only;
        opts.preallocate = self.preallocate;
        opts.buffer_limit = usize::try_from(self.buffer_memory).unwrap_or(usize::MAX);
        if (opts.buffer_limit as u64) < 2 * opts.max_request as u64 {
            bail!(
                "--buffer-memory {} is too small: it must hold at least two 32M requests (64M)",
                format_size(self.buffer_memory)
            );
        }
        Ok(opts)
    }

    /// The spill tiers these arguments ask for, for devices of `total` bytes in all.
    fn spill_store(&self, total: u64) -> Result<SpillStore> {
        let ram_bytes = match self.spill_memory {
            Some(m) => m,
            None => {
                let phys = nix::unistd::sysconf(nix::unistd::SysconfVar::_PHYS_PAGES)
                    .ok()
                    .flatten()
                    .unwrap_or(0) as u64
                    * 4096;
                (phys / 8).min(total)
            }
        };
        let chunk = self.chunk_size as usize;
        let ram = (ram_bytes >= chunk as u64).then(|| SpillRam::new(chunk, ram_bytes));
        let file = match &self.spill_file {
            Some(path) => Some(
                SpillFile::create(path, self.spill_file_size.unwrap_or(total), chunk)
                    .map_err(|e| anyhow::anyhow!(e))?,
            ),
            None => None,
        };
        Ok(SpillStore { ram, file })
    }

    /// Under `auto`, the GPU-only flags say the user wants the GPU: when auto fell back to
    /// host RAM, that is the real problem, not the flags.
    fn refuse_gpu_flags_without_gpu(&self) -> Result<()> {
        let mut given = Vec::new();
        if !self.gpu.is_empty() {
            given.push("--gpu");
        }
        if self.keep_free.is_some() {
            given.push("--keep-free");
        }
        if self.spill_memory.is_some_and(|m| m > 0) {
            given.push("--spill-memory");
        }
        if self.spill_file.is_some() {
            given.push("--spill-file");
        }
        if given.is_empty() {
            return Ok(());
        }
        let cause = match crate::engine::cuda::probe() {
            Ok(_) => "the NVIDIA driver sees no GPU".to_string(),
            Err(e) => format!("{e:#}"),
        };
        let flags = given.join(" and ");
        bail!(
            "{flags} ask for GPU memory, but {cause}: make the GPU usable (NVIDIA driver, \
             `vramdisk devices` to check), or drop {flags} to use host RAM"
        )
    }

    /// Which backend to use, resolving `auto`; the reason is logged by the caller.
    pub fn resolve_backend(&self) -> (BackendKind, String) {
        match self.backend {
            BackendKind::Host => (BackendKind::Host, "host RAM (--backend host)".into()),
            BackendKind::Cuda => (BackendKind::Cuda, "CUDA (--backend cuda)".into()),
            BackendKind::FakeGpu => (BackendKind::FakeGpu, "a pretend GPU in host RAM".into()),
            BackendKind::Auto => match crate::engine::cuda::probe() {
                Ok(gpus) if !gpus.is_empty() => (
                    BackendKind::Cuda,
                    format!(
                        "CUDA: found {} GPU(s), first is {}",
                        gpus.len(),
                        gpus[0].name
                    ),
                ),
                Ok(_) => (
                    BackendKind::Host,
                    "host RAM: the NVIDIA driver sees no GPU".into(),
                ),
                Err(e) => (BackendKind::Host, format!("host RAM: no usable GPU ({e})")),
            },
        }
    }

    /// Builds every device these arguments ask for, default export first; their I/O
    /// buffers share one budget of --buffer-memory.
    pub fn build(&self, backend: BackendKind) -> Result<Vec<NamedDevice>> {
        self.build_sharing(backend, None)
    }

    /// Like [`DeviceArgs::build`], with the buffers counted against `budget` when given.
    pub fn build_sharing(
        &self,
        backend: BackendKind,
        budget: Option<crate::engine::BufferBudget>,
    ) -> Result<Vec<NamedDevice>> {
        let specs = self.export_specs()?;
        if self.backend == BackendKind::Auto && backend == BackendKind::Host {
            self.refuse_gpu_flags_without_gpu()?;
        }
        if backend == BackendKind::Host
            && (!self.gpu.is_empty()
                || self.keep_free.is_some()
                || self.spill_memory.is_some_and(|m| m > 0)
                || self.spill_file.is_some())
        {
            bail!(
                "--gpu, --keep-free, --spill-memory and --spill-file apply to GPU memory: drop \
                 them or use --backend cuda"
            );
        }
        if backend == BackendKind::Host && self.preallocate {
            check_host_memory(specs.iter().map(|s| s.size).sum())?;
        }
        if backend == BackendKind::Cuda {
            // Driver and GPU problems are one sentence, not one per export.
            crate::engine::cuda::gpus(&self.gpu).map_err(with_backend_advice)?;
        }
        let mut devices = Vec::new();
        // One budget for every export's buffers: --buffer-memory bounds the daemon.
        let budget = budget.unwrap_or_else(|| {
            crate::engine::BufferBudget::new(
                usize::try_from(self.buffer_memory).unwrap_or(usize::MAX),
            )
        });
        let spill = match backend {
            BackendKind::Host => SpillStore::default(),
            _ => self.spill_store(specs.iter().map(|s| s.size).sum())?,
        };
        for spec in specs {
            let mut opts = self.options(spec.size)?;
            opts.buffer_budget = Some(budget.clone());
            let ctx = || format!("creating export '{}'", spec.name);
            let console = self.preallocate.then(|| {
                ConsoleProgress::new(&format!("preallocating export '{}'", spec.name), spec.size)
            });
            let progress: &dyn Progress = match &console {
                Some(c) => c,
                None => &NoProgress,
            };
            let mut copies = None;
            let (device, tiers): (Arc<dyn BlockDevice>, Option<Arc<dyn TierControl>>) =
                match backend {
                    BackendKind::Host => (
                        Arc::new(
                            SparseDevice::with_progress(
                                HostBackend::new(),
                                opts,
                                SpillStore::default(),
                                progress,
                            )
                            .with_context(ctx)?,
                        ),
                        None,
                    ),
                    BackendKind::FakeGpu => {
                        let total = self
                            .fake_gpu_memory
                            .context("--backend fake-gpu needs --fake-gpu-memory SIZE")?;
                        let fake = FakeGpuBackend::new(
                            total,
                            self.keep_free.unwrap_or(0),
                            self.fake_gpu_others.clone(),
                        )
                        .async_copies(self.fake_gpu_async);
                        let dev = Arc::new(
                            SparseDevice::with_progress(fake, opts, spill.clone(), progress)
                                .with_context(ctx)?,
                        );
                        (dev.clone(), Some(Tiering::start(dev)))
                    }
                    BackendKind::Cuda | BackendKind::Auto => {
                        let copts = crate::engine::cuda::CudaOptions {
                            gpus: self.gpu.clone(),
                            keep_free: self.keep_free,
                            ..Default::default()
                        };
                        let dev = crate::engine::cuda::open_with_spill(&copts, opts, spill.clone())
                            .with_context(ctx)?;
                        let tiers: Option<Arc<dyn TierControl>> =
                            (!spill.is_empty()).then(|| Tiering::start(dev.clone()) as _);
                        let queues = dev.clone();
                        let counters: crate::ops::CopyCounters =
                            Arc::new(move || queues.backend().queue_stats().into());
                        copies = Some(counters);
                        (dev, tiers)
                    }
                };
            devices.push(NamedDevice {
                name: spec.name,
                device,
                tiers,
                copies,
            });
        }
        if let Some(ram) = &spill.ram {
            if self.preallocate {
                // Swap: every byte of the spill path is taken before the device exists.
                ram.reserve_all()
                    .map_err(|e| anyhow::anyhow!("--spill-memory: cannot pin it all: {e}"))?;
            } else {
                ram.reserve_in_background();
            }
        }
        Ok(devices)
    }
}

/// Fails with a sentence when preallocating `bytes` of host RAM would take more than the
/// kernel says is available: past that, the OOM killer ends the daemon (or another program)
/// after a long silence instead.
fn check_host_memory(bytes: u64) -> Result<()> {
    let Some(available) = mem_available() else {
        return Ok(());
    };
    if bytes > available {
        bail!(
            "--preallocate needs {} of host RAM but only {} is available (MemAvailable in \
             /proc/meminfo): give a smaller --size, free memory, or drop --preallocate (and \
             --swap, which implies it)",
            format_size(bytes),
            gib(available)
        );
    }
    Ok(())
}

/// `bytes` in GiB with one decimal, for amounts that are not round.
fn gib(bytes: u64) -> String {
    format!("{:.1}G", bytes as f64 / (1u64 << 30) as f64)
}

/// RAM that can be taken without swapping, as the kernel estimates it.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim();
    kib.parse::<u64>().ok().map(|k| k * 1024)
}

/// Adds what to do to the engine's "the driver cannot be used" error, for the commands that
/// take --backend; other errors pass unchanged.
pub fn with_backend_advice(e: anyhow::Error) -> anyhow::Error {
    if e.downcast_ref::<crate::engine::cuda::Unavailable>()
        .is_some()
    {
        anyhow::anyhow!("{e:#}: use --backend host to keep the data in host RAM instead")
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_specs_parse() {
        assert_eq!(
            export_arg("scratch=16G"),
            Ok(ExportSpec {
                name: "scratch".into(),
                size: 16 << 30
            })
        );
        assert!(export_arg("scratch").is_err());
        assert!(export_arg("a=lots").is_err());
    }
}
