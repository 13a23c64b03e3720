//! Prometheus metrics on `GET /metrics`, text exposition format 0.0.4.
//!
//! The HTTP side is a minimal hand-written responder on tokio rather than hyper: it serves
//! one read-only resource to a scraper, so it needs to read one request head, answer and
//! close. That is ~60 lines with a size limit and a timeout, against a large dependency
//! tree for a feature outside the core.

use super::Daemon;
use crate::engine::metered::LATENCY_BUCKETS_NS;
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head read; a scraper sends a few hundred bytes.
const MAX_HEAD: usize = 16 * 1024;

/// Binds `addr` and serves metrics until the daemon shuts down; returns the bound address.
pub async fn start(addr: &str, daemon: Arc<Daemon>) -> Result<std::net::SocketAddr> {
    let sockaddr: std::net::SocketAddr = addr.parse().with_context(|| {
        format!("--metrics {addr} is not an address: write IP:PORT, like 127.0.0.1:9100")
    })?;
    let listener = TcpListener::bind(sockaddr)
        .await
        .with_context(|| format!("cannot serve metrics on {sockaddr}"))?;
    let bound = listener.local_addr()?;
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
                        let _ = tokio::time::timeout(Duration::from_secs(10), respond(stream, &d))
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
    Ok(bound)
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
            reply(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
            )
            .await
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

/// Escapes a label value as the exposition format requires.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The whole exposition for `daemon`.
pub fn render(daemon: &Daemon) -> String {
    let status = daemon.status();
    let mut out = String::with_capacity(16 * 1024);
    let snaps: Vec<(String, &super::ExportStatus)> =
        status.exports.iter().map(|e| (label(&e.name), e)).collect();

    family(
        &mut out,
        "vramdisk_size_bytes",
        "gauge",
        "Advertised size of the export.",
    );
    for (n, e) in &snaps {
        let _ = writeln!(out, "vramdisk_size_bytes{{export=\"{n}\"}} {}", e.size);
    }
    family(
        &mut out,
        "vramdisk_memory_used_bytes",
        "gauge",
        "Backend memory held for the export's data.",
    );
    for (n, e) in &snaps {
        let _ = writeln!(
            out,
            "vramdisk_memory_used_bytes{{export=\"{n}\",backend=\"{}\"}} {}",
            label(&e.backend),
            e.allocated
        );
    }
    family(
        &mut out,
        "vramdisk_memory_limit_bytes",
        "gauge",
        "Cap on the export's memory (--max-memory).",
    );
    for (n, e) in &snaps {
        if let Some(m) = e.max_memory {
            let _ = writeln!(out, "vramdisk_memory_limit_bytes{{export=\"{n}\"}} {m}");
        }
    }
    family(&mut out, "vramdisk_chunks", "gauge", "Chunks allocated.");
    for (n, e) in &snaps {
        let _ = writeln!(out, "vramdisk_chunks{{export=\"{n}\"}} {}", e.chunks);
    }
    family(
        &mut out,
        "vramdisk_connections",
        "gauge",
        "Clients connected now.",
    );
    for (n, e) in &snaps {
        let _ = writeln!(
            out,
            "vramdisk_connections{{export=\"{n}\"}} {}",
            e.connections
        );
    }
    family(
        &mut out,
        "vramdisk_connections_total",
        "counter",
        "Clients connected since start.",
    );
    for (n, e) in &snaps {
        let _ = writeln!(
            out,
            "vramdisk_connections_total{{export=\"{n}\"}} {}",
            e.connections_total
        );
    }
    family(
        &mut out,
        "vramdisk_requests_total",
        "counter",
        "Requests completed, failed ones included.",
    );
    for (n, e) in &snaps {
        for o in &e.metrics.ops {
            let _ = writeln!(
                out,
                "vramdisk_requests_total{{export=\"{n}\",op=\"{}\"}} {}",
                o.op, o.ops
            );
        }
    }
    family(
        &mut out,
        "vramdisk_bytes_total",
        "counter",
        "Bytes of successful requests: moved, zeroed, trimmed, cached, or described (extents).",
    );
    for (n, e) in &snaps {
        for o in &e.metrics.ops {
            let _ = writeln!(
                out,
                "vramdisk_bytes_total{{export=\"{n}\",op=\"{}\"}} {}",
                o.op, o.bytes
            );
        }
    }
    family(
        &mut out,
        "vramdisk_errors_total",
        "counter",
        "Requests that failed.",
    );
    for (n, e) in &snaps {
        for o in &e.metrics.ops {
            let _ = writeln!(
                out,
                "vramdisk_errors_total{{export=\"{n}\",op=\"{}\"}} {}",
                o.op, o.errors
            );
        }
    }
    family(
        &mut out,
        "vramdisk_request_duration_seconds",
        "histogram",
        "Time from request start to completion inside the device.",
    );
    for (n, e) in &snaps {
        for o in &e.metrics.ops {
            let mut cumulative = 0u64;
            for (i, count) in o.buckets.iter().enumerate() {
                cumulative += count;
                let le = match LATENCY_BUCKETS_NS.get(i) {
                    Some(ns) => format!("{}", *ns as f64 / 1e9),
                    None => "+Inf".to_string(),
                };
                let _ = writeln!(
                    out,
                    "vramdisk_request_duration_seconds_bucket{{export=\"{n}\",op=\"{}\",le=\"{le}\"}} {cumulative}",
                    o.op
                );
            }
            let _ = writeln!(
                out,
                "vramdisk_request_duration_seconds_sum{{export=\"{n}\",op=\"{}\"}} {}",
                o.op,
                o.latency_sum_ns as f64 / 1e9
            );
            let _ = writeln!(
                out,
                "vramdisk_request_duration_seconds_count{{export=\"{n}\",op=\"{}\"}} {}",
                o.op, o.ops
            );
        }
    }
    // GPU-wide memory is only asked of the driver when a CUDA export exists.
    if status.exports.iter().any(|e| e.backend == "cuda")
        && let Ok(gpus) = crate::engine::cuda::probe()
    {
        family(
            &mut out,
            "vramdisk_gpu_memory_total_bytes",
            "gauge",
            "Total memory of the GPU.",
        );
        for g in &gpus {
            let _ = writeln!(
                out,
                "vramdisk_gpu_memory_total_bytes{{gpu=\"{}\",name=\"{}\"}} {}",
                g.index,
                label(&g.name),
                g.total_memory
            );
        }
        family(
            &mut out,
            "vramdisk_gpu_memory_used_bytes",
            "gauge",
            "Memory in use on the GPU by every process.",
        );
        for g in &gpus {
            let _ = writeln!(
                out,
                "vramdisk_gpu_memory_used_bytes{{gpu=\"{}\",name=\"{}\"}} {}",
                g.index,
                label(&g.name),
                g.total_memory.saturating_sub(g.free_memory)
            );
        }
    }
    family(
        &mut out,
        "vramdisk_buffer_limit_bytes",
        "gauge",
        "I/O buffer memory the daemon may hand out at once (--buffer-memory).",
    );
    let _ = writeln!(out, "vramdisk_buffer_limit_bytes {}", status.buffer_limit);
    family(
        &mut out,
        "vramdisk_buffer_in_use_bytes",
        "gauge",
        "I/O buffer memory handed out now, to payloads in flight.",
    );
    let _ = writeln!(out, "vramdisk_buffer_in_use_bytes {}", status.buffer_in_use);
    family(
        &mut out,
        "vramdisk_handshake_evictions_total",
        "counter",
        "Connections dropped during the handshake to make room for a newer one at a connection \
         limit.",
    );
    let _ = writeln!(
        out,
        "vramdisk_handshake_evictions_total {}",
        crate::nbd::admission::evictions()
    );
    family(
        &mut out,
        "vramdisk_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
    );
    let _ = writeln!(out, "vramdisk_uptime_seconds {}", status.uptime_s);
    out
}
