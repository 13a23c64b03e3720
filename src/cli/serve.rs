//! `vramdisk serve`: build the devices, bind the sockets, serve NBD until a signal.

use super::DeviceArgs;
use super::size::format_size;
use crate::engine::BlockDevice as _;
use crate::nbd::server::{self, Export, Limits, Listener};
use anyhow::{Context, Result, bail};
use clap::{Args, FromArgMatches};
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

    #[command(flatten)]
    ops: crate::ops::OpsArgs,

    /// Read settings from a TOML file (see docs/service.md); flags given here override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
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

/// Runs `vramdisk serve` to completion (until SIGINT or SIGTERM). `matches` are the
/// subcommand's, needed to tell flags given on the command line from defaults when a
/// `--config` file is merged in.
pub fn run(args: ServeArgs, matches: &clap::ArgMatches) -> Result<()> {
    let (args, overrides) = match &args.config {
        None => (args, Vec::new()),
        Some(path) => {
            let cmd = super::config::serve_command();
            let (argv, overrides) = super::config::merged_argv(&cmd, matches, path)?;
            let m = cmd
                .no_binary_name(true)
                .try_get_matches_from(super::config::to_os(&argv))
                .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.render()))?;
            (ServeArgs::from_arg_matches(&m)?, overrides)
        }
    };
    let activated = crate::ops::notify::classify(crate::ops::notify::listen_fds())?;
    let mut tcp: Vec<SocketAddr> = args
        .listen
        .iter()
        .map(|a| parse_listen(a))
        .collect::<Result<_>>()?;
    if tcp.is_empty() && args.socket.is_empty() && activated.is_empty() {
        tcp.push("127.0.0.1:10809".parse().unwrap());
    }
    if args.inflight_memory < 32 << 20 {
        bail!("--inflight-memory must be at least 32M, the largest request");
    }
    let devices = super::config::build_devices(&args.device, &args.ops, &overrides)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vramdisk-io")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        // Loading happens here, before any socket listens, so no client sees a partial load.
        let daemon = crate::ops::Daemon::start(devices, shutdown.clone()).await?;
        let mut listeners = Vec::new();
        let mut urls = Vec::new();
        for addr in &tcp {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            urls.push(format!("nbd://{}", l.local_addr()?));
            listeners.push(Listener::Tcp(l));
        }
        for path in &args.socket {
            listeners.push(Listener::bind_unix(path)?);
            urls.push(format!("nbd+unix:///?socket={}", path.display()));
        }
        for a in activated {
            match a {
                crate::ops::notify::Activated::Tcp(l) => {
                    let l = tokio::net::TcpListener::from_std(l)?;
                    urls.push(format!("nbd://{} (socket activation)", l.local_addr()?));
                    listeners.push(Listener::Tcp(l));
                }
                crate::ops::notify::Activated::Unix(l) => {
                    let path = l
                        .local_addr()?
                        .as_pathname()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default();
                    urls.push(format!("nbd+unix:///?socket={path} (socket activation)"));
                    // No path: the socket file is systemd's, not ours to remove at stop.
                    let l = tokio::net::UnixListener::from_std(l)?;
                    listeners.push(Listener::Unix(l, PathBuf::new()));
                }
            }
        }
        let exports: Vec<Export> = daemon
            .exports()
            .iter()
            .map(|e| {
                let stats = e.device.stats();
                info!(
                    "export '{}': {} on {}",
                    e.name,
                    format_size(stats.size),
                    e.device.describe()
                );
                Export {
                    description: format!(
                        "vramdisk {} on {}",
                        format_size(stats.size),
                        e.device.describe()
                    ),
                    name: e.name.clone(),
                    device: e.device.clone(),
                }
            })
            .collect();
        for url in &urls {
            info!("listening on {url}");
        }
        daemon.set_listen(urls);
        daemon.start_control(args.ops.control_socket.clone())?;
        if let Some(addr) = &args.ops.metrics {
            daemon.start_metrics(addr).await?;
        }
        daemon.ready();
        let limits = Limits {
            max_connections: args.max_connections.max(1),
            inflight_bytes: args.inflight_memory as usize,
            handshake_timeout: Duration::from_secs(args.handshake_timeout.max(1)),
        };
        let served = server::serve(exports, listeners, limits, shutdown).await;
        // Save even when the server failed: the data in memory is what the file is for.
        let stopped = daemon.stop().await;
        served.and(stopped)
    })
}

/// Installs the handlers now (a SIGTERM right after READY=1 must still stop cleanly and
/// save) and returns the future that waits for them.
fn stop_on_signal(shutdown: CancellationToken) -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        let (Ok(mut int), Ok(mut term)) = handlers else {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            return;
        };
        tokio::select! {
            _ = int.recv() => info!("SIGINT: shutting down"),
            _ = term.recv() => info!("SIGTERM: shutting down"),
        }
        shutdown.cancel();
    }
}
