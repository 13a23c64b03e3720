//! Prometheus metrics on `GET /metrics`, text exposition format 0.0.4.
//!
//! Each scrape takes the daemon's status and hands it to `prometheus-client`'s text encoder
//! as a collector: the numbers already live in the engine's counters, so there is nothing
//! to register ahead, and the crate does the naming (`_total`), escaping and histograms.
//!
//! The HTTP side is a minimal hand-written responder on tokio rather than hyper: it serves
//! one read-only resource to a scraper, so it needs to read one request head, answer and
//! close. That is ~60 lines with a size limit and a timeout, against a large dependency
//! tree for a feature outside the core.

use super::Daemon;
use crate::engine::metered::LATENCY_BUCKETS_NS;
use crate::engine::metered::OpSnapshot;
use crate::engine::tier::{MemoryStatus, TierStats};
use crate::tunables::METRICS_RESPONSE_TIMEOUT;
use anyhow::{Context, Result};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet, prometheus_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Port of `--metrics ADDR` given without one (Prometheus's registered default for node
/// exporters, 9100, as deployments expect).
pub const DEFAULT_PORT: u16 = 9100;

/// Largest request head read; a scraper sends a few hundred bytes.
const MAX_HEAD: usize = 16 * 1024;

/// Binds the metrics endpoint at `addr`; [`serve`] answers on it once the daemon runs.
pub async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot serve metrics on {addr}"))
}

/// Serves metrics on `listener` until the daemon shuts down.
pub fn serve(listener: TcpListener, daemon: Arc<Daemon>) {
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                _ = daemon.shutdown().cancelled() => return,
            };
            match conn {
                Ok((stream, _)) => {
                    let d = daemon.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(METRICS_RESPONSE_TIMEOUT, respond(stream, &d))
                            .await;
                    });
                }
                Err(e) => {
                    tracing::warn!("metrics accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
}

async fn respond(mut stream: TcpStream, daemon: &Daemon) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return reply(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await;
        }
    }
    let first = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let first = String::from_utf8_lossy(first);
    let mut parts = first.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = render(daemon);
            let body = if method == "HEAD" {
                String::new()
            } else {
                body
            };
            reply(&mut stream, "200 OK", prometheus_text::CONTENT_TYPE, &body).await
        }
        ("GET" | "HEAD", "/") => {
            reply(
                &mut stream,
                "200 OK",
                "text/plain",
                "vramdisk: metrics are at /metrics\n",
            )
            .await
        }
        ("GET" | "HEAD", _) => {
            reply(&mut stream, "404 Not Found", "text/plain", "not found\n").await
        }
        _ => {
            reply(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                "only GET\n",
            )
            .await
        }
    }
}

async fn reply(
    stream: &mut TcpStream,
    status: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// One scrape's numbers: the daemon's status and, with a CUDA export, the GPUs'.
#[derive(Debug)]
struct Scrape {
    status: super::DaemonStatus,
    gpus: Vec<crate::engine::cuda::GpuInfo>,
}

/// Labels of one sample, in the order they are written.
type Labels = Vec<(&'static str, String)>;

/// A sample's value: most are byte or request counts, a few are seconds.
#[derive(Clone, Copy)]
enum Num {
    Int(u64),
    Signed(i64),
    Float(f64),
}

impl From<u64> for Num {
    fn from(v: u64) -> Num {
        Num::Int(v)
    }
}

impl From<f64> for Num {
    fn from(v: f64) -> Num {
        Num::Float(v)
    }
}

/// Writes one family, gauge or counter. A counter's `name` lacks the `_total` that the
/// encoder appends, so the exposed name is `{name}_total`.
fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels, Num)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in samples {
        let mut s = m.encode_family(&labels)?;
        match (kind, v) {
            (MetricType::Counter, Num::Int(v)) => {
                s.encode_counter::<NoLabelSet, _, f64>(&v, None)?
            }
            (MetricType::Counter, Num::Float(v)) => {
                s.encode_counter::<NoLabelSet, _, f64>(&v, None)?
            }
            (MetricType::Counter, Num::Signed(v)) => {
                s.encode_counter::<NoLabelSet, _, f64>(&(v.max(0) as u64), None)?
            }
            (_, Num::Int(v)) => s.encode_gauge(&v)?,
            (_, Num::Signed(v)) => s.encode_gauge(&v)?,
            (_, Num::Float(v)) => s.encode_gauge(&v)?,
        }
    }
    Ok(())
}

fn export(e: &super::ExportStatus) -> Labels {
    vec![("export", e.name.clone())]
}

fn export_op(e: &super::ExportStatus, op: &str) -> Labels {
    vec![("export", e.name.clone()), ("op", op.to_string())]
}

impl Scrape {
    /// One sample per export.
    fn per_export(&self, f: impl Fn(&super::ExportStatus) -> Num) -> Vec<(Labels, Num)> {
        self.status
            .exports
            .iter()
            .map(|e| (export(e), f(e)))
            .collect()
    }

    /// One sample per export and operation.
    fn per_op(&self, f: impl Fn(&OpSnapshot) -> u64) -> Vec<(Labels, Num)> {
        let mut out = Vec::new();
        for e in &self.status.exports {
            for o in &e.metrics.ops {
                out.push((export_op(e, &o.op), f(o).into()));
            }
        }
        out
    }

    /// One sample per export that has spill tiers.
    fn per_tiered(&self, f: impl Fn(&TierStats) -> Num) -> Vec<(Labels, Num)> {
        let tiered = self.status.exports.iter();
        tiered
            .filter_map(|e| Some((export(e), f(e.tiers.as_ref()?))))
            .collect()
    }

    /// One sample per tier (`ram`, `file`) of each export that has them.
    fn per_tier(
        &self,
        ram: fn(&TierStats) -> u64,
        file: fn(&TierStats) -> u64,
    ) -> Vec<(Labels, Num)> {
        let mut out = Vec::new();
        for e in &self.status.exports {
            if let Some(t) = &e.tiers {
                for (tier, v) in [("ram", ram(t)), ("file", file(t))] {
                    let labels = vec![("export", e.name.clone()), ("tier", tier.to_string())];
                    out.push((labels, v.into()));
                }
            }
        }
        out
    }

    /// One sample per backend memory (GPU) of each export with spill tiers.
    fn per_memory(&self, f: fn(&MemoryStatus) -> u64) -> Vec<(Labels, Num)> {
        let mut out = Vec::new();
        for e in &self.status.exports {
            for m in e.tiers.iter().flat_map(|t| &t.memories) {
                let labels = vec![
                    ("export", e.name.clone()),
                    ("memory", m.position.to_string()),
                    ("name", m.name.clone()),
                ];
                out.push((labels, f(m).into()));
            }
        }
        out
    }

    fn encode_exports(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        use MetricType::{Counter, Gauge};
        let size = |e: &super::ExportStatus| e.size.into();
        family(
            enc,
            "vramdisk_size_bytes",
            "Advertised size of the export.",
            Gauge,
            self.per_export(size),
        )?;
        let used = self.status.exports.iter().map(|e| {
            let labels = vec![("export", e.name.clone()), ("backend", e.backend.clone())];
            (labels, e.allocated.into())
        });
        family(
            enc,
            "vramdisk_memory_used_bytes",
            "Backend memory held for the export's data.",
            Gauge,
            used,
        )?;
        let limit = self
            .status
            .exports
            .iter()
            .filter_map(|e| Some((export(e), e.max_memory?.into())));
        family(
            enc,
            "vramdisk_memory_limit_bytes",
            "Cap on the export's memory (--max-memory).",
            Gauge,
            limit,
        )?;
        family(
            enc,
            "vramdisk_chunks",
            "Chunks allocated.",
            Gauge,
            self.per_export(|e| e.chunks.into()),
        )?;
        let now = |e: &super::ExportStatus| Num::Signed(e.connections);
        family(
            enc,
            "vramdisk_connections",
            "Clients connected now.",
            Gauge,
            self.per_export(now),
        )?;
        let total = |e: &super::ExportStatus| e.connections_total.into();
        family(
            enc,
            "vramdisk_connections",
            "Clients connected since start.",
            Counter,
            self.per_export(total),
        )?;
        family(
            enc,
            "vramdisk_requests",
            "Requests completed, failed ones included.",
            Counter,
            self.per_op(|o| o.ops),
        )?;
        family(
            enc,
            "vramdisk_bytes",
            "Bytes of successful requests: moved, zeroed, trimmed, cached, or described (extents).",
            Counter,
            self.per_op(|o| o.bytes),
        )?;
        family(
            enc,
            "vramdisk_errors",
            "Requests that failed.",
            Counter,
            self.per_op(|o| o.errors),
        )?;
        self.encode_gpu_copies(enc)?;
        self.encode_latency(enc)
    }

    /// How requests reached the GPU, for exports on GPU memory (none otherwise).
    fn encode_gpu_copies(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        type Field = fn(&super::GpuCopies) -> u64;
        let per = |f: Field| -> Vec<(Labels, Num)> {
            let on_gpu = self.status.exports.iter();
            on_gpu
                .filter_map(|e| Some((export(e), f(e.gpu_copies.as_ref()?).into())))
                .collect()
        };
        let families: [(&str, &str, Field); 4] = [
            (
                "vramdisk_gpu_copies",
                "Copies (and zeroings) issued to the GPU.",
                |c| c.ops,
            ),
            (
                "vramdisk_gpu_copy_rounds",
                "Submission rounds, each issuing what queued up while the last one ran.",
                |c| c.rounds,
            ),
            (
                "vramdisk_gpu_copy_batches",
                "Batched submissions: gather-kernel launches or cuMemcpyBatchAsync calls.",
                |c| c.batches,
            ),
            (
                "vramdisk_gpu_copies_batched",
                "Copies carried by batched submissions.",
                |c| c.batched_ops,
            ),
        ];
        for (name, help, f) in families {
            let values = per(f);
            if !values.is_empty() {
                family(enc, name, help, MetricType::Counter, values)?;
            }
        }
        Ok(())
    }

    fn encode_latency(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let mut m = enc.encode_descriptor(
            "vramdisk_request_duration_seconds",
            "Time from request start to completion inside the device.",
            None,
            MetricType::Histogram,
        )?;
        let bounds = LATENCY_BUCKETS_NS
            .iter()
            .map(|&ns| ns as f64 / 1e9)
            .chain([f64::INFINITY]);
        for e in &self.status.exports {
            for o in &e.metrics.ops {
                let buckets: Vec<(f64, u64)> =
                    bounds.clone().zip(o.buckets.iter().copied()).collect();
                let labels = export_op(e, &o.op);
                let sum = o.latency_sum_ns as f64 / 1e9;
                m.encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(sum, o.ops, &buckets, None)?;
            }
        }
        Ok(())
    }

    fn encode_tiers(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        use MetricType::{Counter, Gauge};
        if self.status.exports.iter().all(|e| e.tiers.is_none()) {
            return Ok(());
        }
        let now = self.per_tier(|t| t.spill_ram_bytes, |t| t.spill_file_bytes);
        family(
            enc,
            "vramdisk_spill_bytes",
            "Bytes of the export's data in a spill tier now.",
            Gauge,
            now,
        )?;
        let cap = self.per_tier(|t| t.spill_ram_capacity, |t| t.spill_file_capacity);
        family(
            enc,
            "vramdisk_spill_capacity_bytes",
            "Bytes a spill tier may hold (--spill-memory, --spill-file-size).",
            Gauge,
            cap,
        )?;
        let pinned = self.per_tiered(|t| t.spill_ram_reserved.into());
        family(
            enc,
            "vramdisk_spill_ram_reserved_bytes",
            "Bytes of spill RAM pinned so far.",
            Gauge,
            pinned,
        )?;
        let spilled = self.per_tiered(|t| t.spilled_bytes.into());
        family(
            enc,
            "vramdisk_spilled_bytes",
            "Bytes moved out of the backend's memory since start.",
            Counter,
            spilled,
        )?;
        let spilled = self.per_tiered(|t| t.spilled_chunks.into());
        family(
            enc,
            "vramdisk_spilled_chunks",
            "Chunks moved out of the backend's memory since start.",
            Counter,
            spilled,
        )?;
        let promoted = self.per_tiered(|t| t.promoted_bytes.into());
        family(
            enc,
            "vramdisk_promoted_bytes",
            "Bytes brought back into the backend's memory since start.",
            Counter,
            promoted,
        )?;
        let promoted = self.per_tiered(|t| t.promoted_chunks.into());
        family(
            enc,
            "vramdisk_promoted_chunks",
            "Chunks brought back into the backend's memory since start.",
            Counter,
            promoted,
        )?;
        family(
            enc,
            "vramdisk_yields",
            "Yields answered (vramdisk yield).",
            Counter,
            self.per_tiered(|t| t.yields.into()),
        )?;
        let secs = self.per_tiered(|t| t.yield_seconds.into());
        family(
            enc,
            "vramdisk_yield_seconds",
            "Time spent answering yields.",
            Counter,
            secs,
        )?;
        let free = self.per_memory(|m| m.free);
        family(
            enc,
            "vramdisk_backend_memory_free_bytes",
            "Free bytes of a backend memory as every program sees them.",
            Gauge,
            free,
        )?;
        let total = self.per_memory(|m| m.total);
        family(
            enc,
            "vramdisk_backend_memory_total_bytes",
            "Total bytes of a backend memory.",
            Gauge,
            total,
        )?;
        let keep = self.per_memory(|m| m.keep_free);
        family(
            enc,
            "vramdisk_keep_free_bytes",
            "Bytes of a backend memory kept free for other programs (--keep-free).",
            Gauge,
            keep,
        )?;
        let held = self.per_memory(|m| u64::from(m.held));
        family(
            enc,
            "vramdisk_yield_held",
            "1 while a yield holds the memory (until yield --release).",
            Gauge,
            held,
        )
    }

    fn encode_daemon(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        use MetricType::Gauge;
        if !self.gpus.is_empty() {
            let gpu = |g: &crate::engine::cuda::GpuInfo| {
                vec![("gpu", g.index.to_string()), ("name", g.name.clone())]
            };
            let total = self.gpus.iter().map(|g| (gpu(g), g.total_memory.into()));
            family(
                enc,
                "vramdisk_gpu_memory_total_bytes",
                "Total memory of the GPU.",
                Gauge,
                total,
            )?;
            let used = self
                .gpus
                .iter()
                .map(|g| (gpu(g), g.total_memory.saturating_sub(g.free_memory).into()));
            family(
                enc,
                "vramdisk_gpu_memory_used_bytes",
                "Memory in use on the GPU by every process.",
                Gauge,
                used,
            )?;
        }
        let s = &self.status;
        let none = |v: u64| [(Labels::new(), Num::Int(v))];
        family(
            enc,
            "vramdisk_buffer_limit_bytes",
            "I/O buffer memory the daemon may hand out at once (--buffer-memory).",
            Gauge,
            none(s.buffer_limit),
        )?;
        family(
            enc,
            "vramdisk_buffer_in_use_bytes",
            "I/O buffer memory handed out now, to payloads in flight.",
            Gauge,
            none(s.buffer_in_use),
        )?;
        family(
            enc,
            "vramdisk_handshake_evictions",
            "Connections dropped during the handshake to make room for a newer one at a \
             connection limit.",
            MetricType::Counter,
            none(crate::nbd::admission::evictions()),
        )?;
        family(
            enc,
            "vramdisk_uptime_seconds",
            "Seconds since the daemon started.",
            Gauge,
            none(s.uptime_s),
        )
    }
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        self.encode_exports(&mut enc)?;
        self.encode_tiers(&mut enc)?;
        self.encode_daemon(&mut enc)
    }
}

/// The exposition of `status`, with `gpus` as the CUDA driver describes them.
fn exposition(status: super::DaemonStatus, gpus: Vec<crate::engine::cuda::GpuInfo>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape { status, gpus }));
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail, and the collector's only errors are the writer's.
    prometheus_text::encode(&mut out, &registry).expect("encoding into a String");
    out
}

/// The whole exposition for `daemon`.
pub fn render(daemon: &Daemon) -> String {
    let status = daemon.status();
    // GPU-wide memory is only asked of the driver when a CUDA export exists.
    let gpus = if status.exports.iter().any(|e| e.backend == "cuda") {
        crate::engine::cuda::probe().unwrap_or_default()
    } else {
        Vec::new()
    };
    exposition(status, gpus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::metered::{MetricsSnapshot, Op};
    use crate::ops::{DaemonStatus, ExportStatus};

    fn export(name: &str, tiers: Option<TierStats>) -> ExportStatus {
        let ops = Op::ALL
            .iter()
            .map(|op| OpSnapshot {
                op: op.name().to_string(),
                ops: 3,
                bytes: 4096,
                errors: 1,
                latency_sum_ns: 1_500_000,
                buckets: (0..=LATENCY_BUCKETS_NS.len() as u64)
                    .map(|i| u64::from(i < 3))
                    .collect(),
            })
            .collect();
        ExportStatus {
            pid: 1,
            name: name.to_string(),
            backend: "fake-gpu".to_string(),
            device: String::new(),
            size: 1 << 30,
            allocated: 6 << 20,
            chunks: 3,
            max_memory: None,
            read_only: false,
            attach: None,
            attach_via: None,
            connections: 2,
            connections_total: 5,
            read_ops: 0,
            read_bytes: 0,
            write_ops: 0,
            write_bytes: 0,
            errors: 0,
            save: None,
            spilled_ram: 0,
            spilled_file: 0,
            tiers,
            gpu_copies: None,
            metrics: MetricsSnapshot {
                ops,
                connections: 2,
                connections_total: 5,
            },
        }
    }

    fn status(exports: Vec<ExportStatus>) -> DaemonStatus {
        DaemonStatus {
            pid: 1,
            version: String::new(),
            uptime_s: 9,
            listen: Vec::new(),
            metrics: None,
            exports,
            buffer_limit: 1 << 30,
            buffer_in_use: 0,
        }
    }

    fn tiers() -> TierStats {
        TierStats {
            spill_ram_bytes: 7,
            spill_file_bytes: 8,
            spill_ram_capacity: 64 << 20,
            spill_ram_reserved: 2 << 20,
            spill_file_capacity: 0,
            spilled_bytes: 10,
            spilled_chunks: 1,
            promoted_bytes: 11,
            promoted_chunks: 2,
            yields: 2,
            yield_seconds: 0.25,
            memories: vec![MemoryStatus {
                position: 0,
                name: "GPU 0 (fake)".to_string(),
                free: 100,
                total: 200,
                keep_free: 50,
                held: true,
            }],
        }
    }

    #[test]
    fn tier_counters_are_exported_for_exports_that_spill() {
        let body = exposition(
            status(vec![export("t", Some(tiers())), export("plain", None)]),
            Vec::new(),
        );
        for line in [
            "# TYPE vramdisk_spill_bytes gauge",
            "vramdisk_spill_bytes{export=\"t\",tier=\"ram\"} 7",
            "vramdisk_spill_bytes{export=\"t\",tier=\"file\"} 8",
            "vramdisk_spill_capacity_bytes{export=\"t\",tier=\"ram\"} 67108864",
            "vramdisk_spill_ram_reserved_bytes{export=\"t\"} 2097152",
            "# TYPE vramdisk_spilled_bytes_total counter",
            "vramdisk_spilled_bytes_total{export=\"t\"} 10",
            "vramdisk_spilled_chunks_total{export=\"t\"} 1",
            "vramdisk_promoted_bytes_total{export=\"t\"} 11",
            "vramdisk_promoted_chunks_total{export=\"t\"} 2",
            "vramdisk_yields_total{export=\"t\"} 2",
            "vramdisk_yield_seconds_total{export=\"t\"} 0.25",
            "vramdisk_backend_memory_free_bytes{export=\"t\",memory=\"0\",name=\"GPU 0 (fake)\"} 100",
            "vramdisk_backend_memory_total_bytes{export=\"t\",memory=\"0\",name=\"GPU 0 (fake)\"} 200",
            "vramdisk_keep_free_bytes{export=\"t\",memory=\"0\",name=\"GPU 0 (fake)\"} 50",
            "vramdisk_yield_held{export=\"t\",memory=\"0\",name=\"GPU 0 (fake)\"} 1",
        ] {
            assert!(body.lines().any(|l| l == line), "no `{line}` in\n{body}");
        }
        assert!(!body.contains("export=\"plain\",tier"), "{body}");
        // Without a spilling export the families are left out entirely.
        let body = exposition(status(vec![export("plain", None)]), Vec::new());
        assert!(!body.contains("spill"), "{body}");
    }

    #[test]
    fn gpu_copy_counters_are_exported_for_exports_on_gpu_memory_only() {
        let mut gpu = export("g", None);
        gpu.gpu_copies = Some(crate::ops::GpuCopies {
            ops: 100,
            rounds: 40,
            batches: 10,
            batched_ops: 70,
        });
        let body = exposition(status(vec![gpu, export("plain", None)]), Vec::new());
        for line in [
            "# TYPE vramdisk_gpu_copies_total counter",
            "vramdisk_gpu_copies_total{export=\"g\"} 100",
            "vramdisk_gpu_copy_rounds_total{export=\"g\"} 40",
            "vramdisk_gpu_copy_batches_total{export=\"g\"} 10",
            "vramdisk_gpu_copies_batched_total{export=\"g\"} 70",
        ] {
            assert!(body.lines().any(|l| l == line), "no `{line}` in\n{body}");
        }
        assert!(
            !body.contains("gpu_copies_total{export=\"plain\""),
            "{body}"
        );
        let body = exposition(status(vec![export("plain", None)]), Vec::new());
        assert!(!body.contains("vramdisk_gpu_cop"), "{body}");
    }

    #[test]
    fn names_types_and_escaping_stay_as_scrapers_know_them() {
        let body = exposition(status(vec![export("a\"b\\c\nd", None)]), Vec::new());
        let n = r#"export="a\"b\\c\nd""#;
        for line in [
            "# HELP vramdisk_connections Clients connected now.".to_string(),
            "# TYPE vramdisk_connections gauge".to_string(),
            format!("vramdisk_connections{{{n}}} 2"),
            "# TYPE vramdisk_connections_total counter".to_string(),
            format!("vramdisk_connections_total{{{n}}} 5"),
            "# TYPE vramdisk_requests_total counter".to_string(),
            format!("vramdisk_requests_total{{{n},op=\"read\"}} 3"),
            format!("vramdisk_bytes_total{{{n},op=\"write\"}} 4096"),
            format!("vramdisk_errors_total{{{n},op=\"trim\"}} 1"),
            format!("vramdisk_memory_used_bytes{{{n},backend=\"fake-gpu\"}} 6291456"),
            "# TYPE vramdisk_request_duration_seconds histogram".to_string(),
            format!("vramdisk_request_duration_seconds_bucket{{{n},op=\"read\",le=\"2.5e-05\"}} 3"),
            format!("vramdisk_request_duration_seconds_bucket{{{n},op=\"read\",le=\"+Inf\"}} 3"),
            format!("vramdisk_request_duration_seconds_sum{{{n},op=\"read\"}} 0.0015"),
            format!("vramdisk_request_duration_seconds_count{{{n},op=\"read\"}} 3"),
            "vramdisk_buffer_limit_bytes 1073741824".to_string(),
            "vramdisk_uptime_seconds 9".to_string(),
        ] {
            assert!(body.lines().any(|l| l == line), "no `{line}` in\n{body}");
        }
    }
}
