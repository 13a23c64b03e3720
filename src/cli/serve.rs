//! `vramdisk serve`: build the devices, bind the sockets, serve NBD until a signal.

use super::DeviceArgs;
use super::size::format_size;
use crate::nbd::server::{self, Export, Limits, Listener};
use anyhow::{Context, Result, bail};
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Arguments of `vramdisk serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    device: DeviceArgs,

    /// TCP address to listen on; repeatable. Default 127.0.0.1:10809 when no --socket is given.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<String>,

    /// Unix socket path to listen on; repeatable.
    #[arg(long, value_name = "PATH")]
    socket: Vec<PathBuf>,

    /// Most client connections at once (more wait in the kernel's accept queue).
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,

    /// Most payload bytes in flight per connection before the server stops reading requests.
    #[arg(long, value_name = "SIZE", value_parser = super::size::parse_size, default_value = "128M")]
    inflight_memory: u64,

    /// Seconds a new client has to finish the handshake.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    handshake_timeout: u64,
}

fn parse_listen(addr: &str) -> Result<SocketAddr> {
    let with_port = if addr.parse::<SocketAddr>().is_err() && !addr.contains(':') {
        format!("{addr}:10809")
    } else {
        addr.to_string()
    };
    with_port.parse().with_context(|| {
        format!("--listen {addr} is not an address: write IP:PORT, like 127.0.0.1:10809")
    })
}

/// Runs `vramdisk serve` to completion (until SIGINT or SIGTERM).
pub fn run(args: ServeArgs) -> Result<()> {
    let mut tcp: Vec<SocketAddr> = args
        .listen
        .iter()
        .map(|a| parse_listen(a))
        .collect::<Result<_>>()?;
    if tcp.is_empty() && args.socket.is_empty() {
        tcp.push("127.0.0.1:10809".parse().unwrap());
    }
    if args.inflight_memory < 32 << 20 {
        bail!("--inflight-memory must be at least 32M, the largest request");
    }
    let (backend, why) = args.device.resolve_backend();
    info!("backend: {why}");
    let devices = args.device.build(backend)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vramdisk-io")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let mut listeners = Vec::new();
        for addr in &tcp {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            listeners.push(Listener::Tcp(l));
        }
        for path in &args.socket {
            listeners.push(Listener::bind_unix(path)?);
        }
        let exports: Vec<Export> = devices
            .into_iter()
            .map(|d| {
                let stats = d.device.stats();
                info!(
                    "export '{}': {} on {}",
                    d.name,
                    format_size(stats.size),
                    d.device.describe()
                );
                Export {
                    description: format!(
                        "vramdisk {} on {}",
                        format_size(stats.size),
                        d.device.describe()
                    ),
                    name: d.name,
                    device: d.device,
                }
            })
            .collect();
        for addr in &tcp {
            info!("listening on nbd://{addr}");
        }
        for path in &args.socket {
            info!("listening on nbd+unix:///?socket={}", path.display());
        }
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        let limits = Limits {
            max_connections: args.max_connections.max(1),
            inflight_bytes: args.inflight_memory as usize,
            handshake_timeout: Duration::from_secs(args.handshake_timeout.max(1)),
        };
        server::serve(exports, listeners, limits, shutdown).await
    })
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = int.recv() => info!("SIGINT: shutting down"),
        _ = term.recv() => info!("SIGTERM: shutting down"),
    }
    shutdown.cancel();
}
