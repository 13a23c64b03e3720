//! Running the daemon for real: counters on every export, a control socket for
//! `vramdisk status` and `vramdisk save`, a Prometheus endpoint, persistence at start and
//! stop, and systemd readiness.
//!
//! [`Daemon`] owns the per-export state that all of these read. The frontends (NBD, FUSE)
//! get each export's [`MeteredDevice`] as their `Arc<dyn BlockDevice>` and count clients
//! with [`DeviceMetrics::connection`].

pub mod control;
pub mod metrics;
pub mod notify;
pub mod progress;
pub mod readonly;

use crate::engine::BlockDevice;
use crate::engine::metered::{DeviceMetrics, MeteredDevice, Op};
use crate::engine::persist;
use crate::engine::tier::{TierControl, TierStats};
use anyhow::{Context, Result};
use progress::ConsoleProgress;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Where one export's data is restored from and saved to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PersistPlan {
    /// Restore from this file at start (must exist).
    pub load: Option<PathBuf>,
    /// Restore from this file at start if it exists.
    pub load_if_exists: Option<PathBuf>,
    /// Save to this file at a clean stop.
    pub save: Option<PathBuf>,
}

/// How the requests of an export reached its GPUs: counters of the copy queues (see
/// `engine::cuda::queue`), summed over the GPUs. Copies per batch and per round say how well
/// a frontend's requests are grouped (one launch of the gather kernel for many small copies).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GpuCopies {
    /// Copies (and zeroings) issued.
    pub ops: u64,
    /// Rounds of the submitting combiner: each issues what queued up while the last ran.
    pub rounds: u64,
    /// Batched submissions: launches of the gather kernel or `cuMemcpyBatchAsync` calls.
    pub batches: u64,
    /// Copies carried by those batches.
    pub batched_ops: u64,
}

impl From<crate::engine::cuda::QueueStats> for GpuCopies {
    fn from(s: crate::engine::cuda::QueueStats) -> Self {
        GpuCopies {
            ops: s.ops,
            rounds: s.rounds,
            batches: s.batches,
            batched_ops: s.batched_ops,
        }
    }
}

/// Where an export's [`GpuCopies`] are read, for exports on GPU memory.
pub type CopyCounters = Arc<dyn Fn() -> GpuCopies + Send + Sync>;

/// One export as the daemon tracks it.
pub struct ExportState {
    /// Export name ("" is the default export).
    pub name: String,
    /// The counted device; give this to frontends.
    pub device: Arc<MeteredDevice>,
    /// Which backend was asked for ("host", "cuda").
    pub backend: String,
    /// Persistence of this export.
    pub plan: PersistPlan,
    /// Watermark and yield, where the device can spill.
    pub tiers: Option<Arc<dyn TierControl>>,
    /// Its GPU copy queues' counters, on GPU memory.
    pub copies: Option<CopyCounters>,
    attach: Mutex<Option<String>>,
    attach_via: Mutex<Option<String>>,
    // Saves of one export run one at a time.
    save_lock: tokio::sync::Mutex<()>,
}

impl ExportState {
    /// Records where the export is attached locally (a /dev node or a FUSE file), for status.
    pub fn set_attach_path(&self, path: Option<String>) {
        *self.attach.lock().unwrap() = path;
    }

    /// Records how the export is attached locally ("FUSE + loop (FUSE over io_uring, 2
    /// queues)"), for status.
    pub fn set_attach_via(&self, via: Option<String>) {
        *self.attach_via.lock().unwrap() = via;
    }

    /// The counters of this export.
    pub fn metrics(&self) -> &Arc<DeviceMetrics> {
        self.device.metrics()
    }

    /// Saves the export to `path` now.
    pub async fn save_to(&self, path: &Path) -> Result<persist::Summary> {
        self.save_with_progress(path, None).await
    }

    /// Saves the export to `path` now, also publishing (bytes done, bytes total) on `watch`.
    pub async fn save_with_progress(
        &self,
        path: &Path,
        watch: Option<&tokio::sync::watch::Sender<(u64, u64)>>,
    ) -> Result<persist::Summary> {
        let _one_at_a_time = self.save_lock.lock().await;
        let label = format!("saving export '{}' to {}", self.name, path.display());
        let total = progress::save_total(&*self.device);
        let shown = Tee {
            console: ConsoleProgress::new(&label, total),
            watch,
            total,
        };
        let summary = persist::save_with(
            &**self.device.inner(),
            path,
            &shown,
            &progress::persist_options(),
        )
        .await?;
        info!(
            "saved export '{}' to {}: {} MiB of data in {} records, {} ms",
            self.name,
            path.display(),
            summary.data_bytes >> 20,
            summary.records,
            summary.millis
        );
        Ok(summary)
    }

    fn status(&self, pid: u32) -> ExportStatus {
        let stats = self.device.stats();
        let m = self.device.metrics().snapshot();
        ExportStatus {
            pid,
            name: self.name.clone(),
            backend: self.backend.clone(),
            device: self.device.describe(),
            size: stats.size,
            allocated: stats.allocated,
            chunks: stats.chunks,
            max_memory: stats.max_memory,
            read_only: self.device.capabilities().read_only,
            attach: self.attach.lock().unwrap().clone(),
            attach_via: self.attach_via.lock().unwrap().clone(),
            connections: m.connections,
            connections_total: m.connections_total,
            read_ops: m.op(Op::Read).ops,
            read_bytes: m.op(Op::Read).bytes,
            write_ops: m.op(Op::Write).ops,
            write_bytes: m.op(Op::Write).bytes,
            errors: m.errors(),
            save: self.plan.save.clone(),
            spilled_ram: stats.spilled_ram,
            spilled_file: stats.spilled_file,
            tiers: self.tiers.as_ref().map(|t| t.stats()),
            gpu_copies: self.copies.as_ref().map(|c| c()),
            metrics: m,
        }
    }
}

/// Progress to the daemon's log and, for `vramdisk save`, to the client asking.
struct Tee<'a> {
    console: ConsoleProgress,
    watch: Option<&'a tokio::sync::watch::Sender<(u64, u64)>>,
    total: u64,
}

impl persist::Progress for Tee<'_> {
    fn update(&self, done: u64) {
        self.console.update(done);
        if let Some(w) = self.watch {
            w.send_replace((done, self.total));
        }
    }
    fn finish(&self) {
        self.console.finish();
    }
}

/// One export's line of `vramdisk status --json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExportStatus {
    /// Pid of the daemon serving it.
    pub pid: u32,
    /// Export name.
    pub name: String,
    /// Backend kind ("host", "cuda").
    pub backend: String,
    /// The device's own description (GPU name and index for CUDA).
    pub device: String,
    /// Advertised size in bytes.
    pub size: u64,
    /// Memory held for data, in bytes.
    pub allocated: u64,
    /// Chunks allocated.
    pub chunks: u64,
    /// Memory cap, if any.
    pub max_memory: Option<u64>,
    /// Writes are refused.
    pub read_only: bool,
    /// Local attach path, if attached.
    pub attach: Option<String>,
    /// How it is attached: the method and, for FUSE, how requests reach the daemon.
    #[serde(default)]
    pub attach_via: Option<String>,
    /// Clients connected now.
    pub connections: i64,
    /// Clients connected since start.
    pub connections_total: u64,
    /// Read requests.
    pub read_ops: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Write requests.
    pub write_ops: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Failed requests of any kind.
    pub errors: u64,
    /// File saved to at a clean stop.
    pub save: Option<PathBuf>,
    /// Bytes of `allocated` moved out of the GPU into spill RAM.
    #[serde(default)]
    pub spilled_ram: u64,
    /// Bytes of `allocated` in the spill file.
    #[serde(default)]
    pub spilled_file: u64,
    /// Spill tiers, watermark and yields, where the device can spill.
    #[serde(default)]
    pub tiers: Option<TierStats>,
    /// How its requests reached the GPU, on GPU memory.
    #[serde(default)]
    pub gpu_copies: Option<GpuCopies>,
    /// Every counter.
    pub metrics: crate::engine::metered::MetricsSnapshot,
}

/// What one daemon answers to `status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DaemonStatus {
    /// Process id.
    pub pid: u32,
    /// vramdisk version.
    pub version: String,
    /// Seconds since start.
    pub uptime_s: u64,
    /// Where it serves NBD ("nbd://127.0.0.1:10809", "nbd+unix:///?socket=...").
    pub listen: Vec<String>,
    /// Metrics endpoint, if any.
    pub metrics: Option<String>,
    /// Its exports.
    pub exports: Vec<ExportStatus>,
    /// Bytes of I/O buffers the daemon may hand out at once (`--buffer-memory`).
    #[serde(default)]
    pub buffer_limit: u64,
    /// Bytes of I/O buffers handed out now (payloads in flight).
    #[serde(default)]
    pub buffer_in_use: u64,
}

/// The running daemon's shared state.
pub struct Daemon {
    exports: Vec<Arc<ExportState>>,
    listen: Mutex<Vec<String>>,
    metrics_addr: Mutex<Option<String>>,
    started: Instant,
    shutdown: CancellationToken,
    control: Mutex<Option<PathBuf>>,
}

/// A device to put under the daemon's management, with its persistence plan.
pub struct ManagedDevice {
    /// Export name.
    pub name: String,
    /// The device as built.
    pub device: Arc<dyn BlockDevice>,
    /// Backend kind name for status.
    pub backend: String,
    /// Load and save files.
    pub plan: PersistPlan,
    /// Serve the device through a [`readonly::ReadOnlyDevice`] once loaded.
    pub read_only_view: bool,
    /// Its tier logic, where it can give GPU memory back.
    pub tiers: Option<Arc<dyn TierControl>>,
    /// Its GPU copy queues' counters, on GPU memory.
    pub copies: Option<CopyCounters>,
}

impl Daemon {
    /// Wraps every device in a [`MeteredDevice`] and restores those that have a file to load
    /// (before anything is served). `shutdown` is what the daemon stops on.
    pub async fn start(
        devices: Vec<ManagedDevice>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>> {
        let mut exports = Vec::new();
        for d in devices {
            let load = match (&d.plan.load, &d.plan.load_if_exists) {
                (Some(p), _) => Some(p.clone()),
                (None, Some(p)) if p.exists() => Some(p.clone()),
                (None, Some(p)) => {
                    info!(
                        "export '{}': {} does not exist yet; starting empty",
                        d.name,
                        p.display()
                    );
                    None
                }
                (None, None) => None,
            };
            if let Some(path) = load {
                let label = format!("loading export '{}' from {}", d.name, path.display());
                let shown = ConsoleProgress::new(&label, progress::load_total(&path));
                let opts = progress::persist_options();
                let s = persist::load_with(&*d.device, &path, &shown, &opts)
                    .await
                    .with_context(|| format!("export '{}'", d.name))?;
                info!(
                    "export '{}': loaded {} MiB from {} in {} ms",
                    d.name,
                    s.data_bytes >> 20,
                    path.display(),
                    s.millis
                );
            }
            let device: Arc<dyn BlockDevice> = if d.read_only_view {
                Arc::new(readonly::ReadOnlyDevice::new(d.device))
            } else {
                d.device
            };
            let state = ExportState {
                tiers: d.tiers,
                copies: d.copies,
                device: Arc::new(MeteredDevice::new(device)),
                name: d.name,
                backend: d.backend,
                plan: d.plan,
                attach: Mutex::new(None),
                attach_via: Mutex::new(None),
                save_lock: tokio::sync::Mutex::new(()),
            };
            exports.push(Arc::new(state));
        }
        Ok(Arc::new(Daemon {
            exports,
            listen: Mutex::new(Vec::new()),
            metrics_addr: Mutex::new(None),
            started: Instant::now(),
            shutdown,
            control: Mutex::new(None),
        }))
    }

    /// The exports, in the order they were given.
    pub fn exports(&self) -> &[Arc<ExportState>] {
        &self.exports
    }

    /// The export called `name`.
    pub fn export(&self, name: &str) -> Option<&Arc<ExportState>> {
        self.exports.iter().find(|e| e.name == name)
    }

    /// Records where NBD is served, for status.
    pub fn set_listen(&self, listen: Vec<String>) {
        *self.listen.lock().unwrap() = listen;
    }

    /// The token the daemon stops on.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Everything `vramdisk status` shows of this daemon.
    pub fn status(&self) -> DaemonStatus {
        let pid = std::process::id();
        // Exports normally share one budget; count each budget once.
        let mut budgets: Vec<&crate::engine::BufferBudget> = Vec::new();
        for e in &self.exports {
            let b = e.device.buffers().budget();
            if !budgets.iter().any(|seen| seen.same_as(b)) {
                budgets.push(b);
            }
        }
        DaemonStatus {
            pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_s: self.started.elapsed().as_secs(),
            listen: self.listen.lock().unwrap().clone(),
            metrics: self.metrics_addr.lock().unwrap().clone(),
            exports: self.exports.iter().map(|e| e.status(pid)).collect(),
            buffer_limit: budgets.iter().map(|b| b.limit() as u64).sum(),
            buffer_in_use: budgets
                .iter()
                .map(|b| (b.limit() - b.available()) as u64)
                .sum(),
        }
    }

    /// Binds the control socket (at `path`, or PID.sock in the runtime directory) and serves
    /// it until shutdown.
    pub fn start_control(self: &Arc<Self>, path: Option<PathBuf>) -> Result<PathBuf> {
        let (listener, path) = control::bind_default(path)?;
        self.serve_control(listener, path.clone());
        Ok(path)
    }

    /// Serves control clients on `listener` (bound at `path`, removed at stop) until
    /// shutdown.
    pub fn serve_control(self: &Arc<Self>, listener: tokio::net::UnixListener, path: PathBuf) {
        info!("control socket {}", path.display());
        *self.control.lock().unwrap() = Some(path);
        tokio::spawn(control::serve(listener, self.clone()));
    }

    /// Serves Prometheus metrics on `listeners` (from [`metrics::bind`]) until shutdown.
    pub fn serve_metrics(self: &Arc<Self>, listeners: Vec<tokio::net::TcpListener>) -> Result<()> {
        for l in listeners {
            let bound = l.local_addr().context("the metrics socket's address")?;
            self.metrics_addr
                .lock()
                .unwrap()
                .get_or_insert_with(|| format!("http://{bound}/metrics"));
            info!("metrics on http://{bound}/metrics");
            metrics::serve(l, self.clone());
        }
        Ok(())
    }

    /// Tells systemd the daemon is ready (call once every socket listens).
    pub fn ready(&self) {
        let names: Vec<String> = self
            .exports
            .iter()
            .map(|e| format!("'{}'", e.name))
            .collect();
        notify::notify(&format!(
            "READY=1\nSTATUS=serving {} export(s): {}",
            self.exports.len(),
            names.join(", ")
        ));
    }

    /// The clean-stop work: saves every export that has a save file, then removes the
    /// control socket. Returns the first save error (after trying every export).
    pub async fn stop(&self) -> Result<()> {
        notify::notify("STOPPING=1");
        let mut first_err = None;
        for e in &self.exports {
            if let Some(path) = &e.plan.save
                && let Err(err) = e.save_to(path).await
            {
                tracing::error!("export '{}': {err:#}", e.name);
                first_err.get_or_insert(err);
            }
        }
        if let Some(p) = self.control.lock().unwrap().take() {
            let _ = std::fs::remove_file(p);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(p) = self.control.lock().unwrap().take() {
            let _ = std::fs::remove_file(p);
        }
    }
}
