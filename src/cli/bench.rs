//! `vramdisk bench`: the engine measured in process, against the machine's copy ceiling.
//!
//! First the ceiling: large copies between pinned host memory and the GPU with plain driver
//! calls (for `--backend host`, a large `memcpy`). Then the engine itself through the
//! [`BlockDevice`] trait, with I/O buffers from `device.buffers()` as a frontend would use
//! them, no network: 1 MiB sequential at queue depth 16, 4 KiB random at depths 1, 32 and
//! 128. Each test runs for `--seconds`; every figure is printed with its ratio to the ceiling
//! of its direction (writes: host to GPU; reads: GPU to host).

use super::device::BackendKind;
use super::size::{format_size, parse_size};
use crate::engine::cuda::{self, BatchMode, CudaOptions, QueueOptions};
use crate::engine::host::HostBackend;
use crate::engine::{BlockDevice, SparseDevice, SparseOptions};
use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How small copies are batched, as the benchmark's option.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BatchArg {
    /// Gather/scatter kernel over mapped pinned memory.
    Kernel,
    /// cuMemcpyBatchAsync.
    MemcpyBatch,
    /// One cuMemcpy*Async per request.
    Off,
    /// Run the 4 KiB tests once per mode.
    All,
}

/// Arguments of `vramdisk bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Where the data lives: auto (CUDA when a GPU is found), cuda or host.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendKind,

    /// GPUs to use, as indexes: "0", or "0,1" to spread the device over several GPUs.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    gpu: Vec<usize>,

    /// Size of the device the tests run over; it is written once before the read tests.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "4G")]
    size: u64,

    /// Seconds each test runs.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,

    /// Allocation unit of the device.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "2M")]
    chunk_size: u64,

    /// How small copies are batched (cuda backend).
    #[arg(long, value_enum, default_value = "kernel")]
    batch: BatchArg,

    /// CUDA streams per GPU.
    #[arg(long, default_value_t = 4)]
    lanes: usize,

    /// Copies up to this size count as small and may be batched.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64K")]
    small_max: u64,

    /// Microseconds a task whose small request went out alone watches for its completion
    /// before yielding (0: never).
    #[arg(long, default_value_t = QueueOptions::default().spin.as_micros() as u64)]
    spin_us: u64,

    /// Fewer small copies than this in one round go out as plain copies, not a kernel
    /// launch or batch call (cuda backend).
    #[arg(long, default_value_t = QueueOptions::default().batch_min)]
    batch_min: usize,

    /// Microseconds a task whose small request went out with others re-polls itself before
    /// it asks to be woken (0: never; see QueueOptions::yield_spin).
    #[arg(long, default_value_t = QueueOptions::default().yield_spin.as_micros() as u64)]
    yield_us: u64,

    /// Completion threads per GPU.
    #[arg(long, default_value_t = QueueOptions::default().completion_threads)]
    completion_threads: usize,

    /// Also time chunk allocation and freeing, step by step (cuda backend).
    #[arg(long)]
    alloc_costs: bool,

    /// Only run tests whose name followed by a space contains this text ("4K", "seq",
    /// "QD1 " for queue depth 1 alone).
    #[arg(long)]
    only: Option<String>,
}

#[derive(Clone, Copy)]
struct Test {
    write: bool,
    block: usize,
    sequential: bool,
    depth: usize,
}

impl Test {
    fn name(&self) -> String {
        format!(
            "{} {} {} QD{}",
            if self.write { "write" } else { "read" },
            if self.block >= 1 << 20 {
                format!("{}M", self.block >> 20)
            } else {
                format!("{}K", self.block >> 10)
            },
            if self.sequential { "seq" } else { "rand" },
            self.depth
        )
    }
}

struct Outcome {
    ops: u64,
    secs: f64,
    median_us: f64,
    p99_us: f64,
}

impl Outcome {
    fn bytes_per_sec(&self, block: usize) -> f64 {
        self.ops as f64 * block as f64 / self.secs
    }
}

/// Runs `vramdisk bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    if !args.chunk_size.is_power_of_two() {
        bail!("--chunk-size must be a power of two, like 2M");
    }
    if args.size < 64 << 20 {
        bail!("--size must be at least 64M");
    }
    let backend = match args.backend {
        BackendKind::Auto => {
            if cuda::probe().map(|g| !g.is_empty()).unwrap_or(false) {
                BackendKind::Cuda
            } else {
                BackendKind::Host
            }
        }
        b => b,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vramdisk-bench")
        .build()
        .context("starting the async runtime")?;
    let duration = Duration::from_secs_f64(args.seconds.max(0.01));

    let (ceiling_w, ceiling_r, what) = ceiling(backend, &args.gpu)?;
    println!("vramdisk bench, {}", what);
    println!(
        "ceiling: write {:.1} GB/s, read {:.1} GB/s",
        ceiling_w / 1e9,
        ceiling_r / 1e9
    );

    if args.alloc_costs && backend == BackendKind::Cuda {
        let gpu = cuda::gpus(&args.gpu)?.remove(0);
        let c = cuda::ceiling::alloc_costs(&gpu, args.chunk_size as usize, 256)
            .map_err(|e| anyhow!("timing allocations: {e}"))?;
        println!(
            "chunk of {}, mean us: reserve {:.1} + create {:.1} + map {:.1} + access {:.1} + \
             zero {:.1}; unmap+free {:.1} | cuMemAlloc {:.1}, cuMemFree {:.1}",
            format_size(args.chunk_size),
            c.reserve,
            c.create,
            c.map,
            c.access,
            c.zero,
            c.unmap,
            c.alloc,
            c.free
        );
    }
    let modes: Vec<Option<BatchMode>> = match (backend, args.batch) {
        (BackendKind::Host, _) => vec![None],
        (_, BatchArg::Kernel) => vec![Some(BatchMode::Kernel)],
        (_, BatchArg::MemcpyBatch) => vec![Some(BatchMode::MemcpyBatch)],
        (_, BatchArg::Off) => vec![Some(BatchMode::Off)],
        (_, BatchArg::All) => vec![
            Some(BatchMode::Kernel),
            Some(BatchMode::MemcpyBatch),
            Some(BatchMode::Off),
        ],
    };
    let mut tests = Vec::new();
    for write in [true, false] {
        tests.push(Test {
            write,
            block: 1 << 20,
            sequential: true,
            depth: 16,
        });
    }
    for write in [false, true] {
        for depth in [1, 32, 128] {
            tests.push(Test {
                write,
                block: 4096,
                sequential: false,
                depth,
            });
        }
    }
    for (i, mode) in modes.iter().enumerate() {
        let mut sparse = SparseOptions::new(args.size);
        sparse.chunk_size = args.chunk_size as usize;
        let mut gpu_dev = None;
        let device: Arc<dyn BlockDevice> = match mode {
            None => Arc::new(SparseDevice::new(HostBackend::new(), sparse)?),
            Some(batch) => {
                let copts = CudaOptions {
                    gpus: args.gpu.clone(),
                    keep_free: None,
                    queue: QueueOptions {
                        lanes: args.lanes,
                        batch: *batch,
                        small_max: args.small_max as usize,
                        spin: Duration::from_micros(args.spin_us),
                        yield_spin: Duration::from_micros(args.yield_us),
                        batch_min: args.batch_min,
                        completion_threads: args.completion_threads,
                    },
                };
                let dev = cuda::open(&copts, sparse)?;
                let actual = dev.backend().effective_batch();
                if actual != *batch {
                    println!("({batch:?} batching is not available here: using {actual:?})");
                }
                gpu_dev = Some(dev.clone());
                dev
            }
        };
        if let Some(m) = mode {
            println!("-- {} ({:?} batching)", device.describe(), m);
        } else {
            println!("-- {}", device.describe());
        }
        println!(
            "{:<22} {:>9} {:>11} {:>10} {:>10} {:>11}",
            "test", "GB/s", "IOPS", "median us", "p99 us", "of ceiling"
        );
        // Fill the device so reads touch memory rather than holes.
        let fill = Test {
            write: true,
            block: 1 << 20,
            sequential: true,
            depth: 16,
        };
        let size = args.size;
        let dev = device.clone();
        let start = Instant::now();
        runtime.block_on(async move { run_test(dev, fill, size, None).await })?;
        println!(
            "{:<22} {:>9.2}   (first write of {}: allocates every chunk)",
            "fill 1M seq QD16",
            size as f64 / start.elapsed().as_secs_f64() / 1e9,
            format_size(size)
        );
        for t in &tests {
            if i > 0 && t.block != 4096 {
                continue;
            }
            let name = t.name();
            if let Some(only) = &args.only
                && !format!("{name} ").contains(only.as_str())
            {
                continue;
            }
            let before = gpu_dev.as_ref().map(|d| d.backend().queue_stats());
            let dev = device.clone();
            let t2 = *t;
            let out =
                runtime.block_on(async move { run_test(dev, t2, size, Some(duration)).await })?;
            let bps = out.bytes_per_sec(t.block);
            let ceil = if t.write { ceiling_w } else { ceiling_r };
            println!(
                "{:<22} {:>9.2} {:>11.0} {:>10.1} {:>10.1} {:>10.3}",
                name,
                bps / 1e9,
                out.ops as f64 / out.secs,
                out.median_us,
                out.p99_us,
                bps / ceil
            );
            if let (Some(d), Some(b)) = (&gpu_dev, before) {
                let a = d.backend().queue_stats();
                let rounds = (a.rounds - b.rounds).max(1);
                let batches = a.batches - b.batches;
                println!(
                    "{:<22} {:.1} ops per round; {} batches of {:.1} ops; completion threads \
                     busy {:.0}% of the time (summed)",
                    "",
                    (a.ops - b.ops) as f64 / rounds as f64,
                    batches,
                    (a.batched_ops - b.batched_ops) as f64 / batches.max(1) as f64,
                    (a.complete_ns - b.complete_ns) as f64 / 1e7 / out.secs
                );
            }
        }
        let stats = device.stats();
        println!(
            "   device holds {} in {} chunks",
            format_size(stats.allocated),
            stats.chunks
        );
    }
    Ok(())
}

/// The copy ceiling for writes and reads in bytes per second, and a description.
fn ceiling(backend: BackendKind, gpus: &[usize]) -> Result<(f64, f64, String)> {
    const BYTES: usize = 256 << 20;
    const REPS: usize = 8;
    if backend == BackendKind::Host {
        let src = vec![0xa5u8; BYTES];
        let mut dst = vec![0u8; BYTES];
        dst.copy_from_slice(&src);
        let start = Instant::now();
        for _ in 0..REPS {
            dst.copy_from_slice(std::hint::black_box(&src));
        }
        std::hint::black_box(&dst);
        let rate = (BYTES * REPS) as f64 / start.elapsed().as_secs_f64();
        return Ok((
            rate,
            rate,
            "host RAM; ceiling = one-thread memcpy of 256 MiB".into(),
        ));
    }
    let list = cuda::gpus(gpus).map_err(super::device::with_backend_advice)?;
    let c = cuda::ceiling::copy_ceiling(&list, BYTES, REPS).map_err(|e| anyhow!(e))?;
    let names: Vec<String> = list
        .iter()
        .map(|g| format!("GPU {} {} ({})", g.index, g.name, g.pci_bus_id))
        .collect();
    Ok((
        c.h2d,
        c.d2h,
        format!(
            "{}; ceiling = 256 MiB pinned cuMemcpy*Async + sync, {REPS} each way",
            names.join(", ")
        ),
    ))
}

/// Runs one test: `depth` tasks issuing requests back to back until `duration` has passed,
/// or, with no duration, one sequential pass over the device.
async fn run_test(
    dev: Arc<dyn BlockDevice>,
    t: Test,
    size: u64,
    duration: Option<Duration>,
) -> Result<Outcome> {
    let blocks = size / t.block as u64;
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = duration.map(|d| start + d);
    let mut tasks = Vec::new();
    for task in 0..t.depth {
        let dev = dev.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = dev.buffers().get(t.block).await?;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (i as u8) ^ (task as u8);
            }
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ ((task as u64 + 1) << 32);
            loop {
                let block = if t.sequential {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if deadline.is_none() && n >= blocks {
                        break;
                    }
                    n % blocks
                } else {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % blocks
                };
                if let Some(d) = deadline
                    && Instant::now() >= d
                {
                    break;
                }
                let offset = block * t.block as u64;
                let t0 = Instant::now();
                if t.write {
                    dev.write(offset, &buf, false).await?;
                } else {
                    dev.read(offset, &mut buf).await?;
                }
                lat.push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
            }
            Ok::<_, crate::engine::IoError>(lat)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(
            task.await
                .map_err(|e| anyhow!("benchmark task failed: {e}"))??,
        );
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((all.len() as f64 * p) as usize).min(all.len() - 1);
        all[i] as f64 / 1000.0
    };
    Ok(Outcome {
        ops: all.len() as u64,
        secs,
        median_us: pct(0.5),
        p99_us: pct(0.99),
    })
}
