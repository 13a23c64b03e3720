//! `vramdisk serve`: build the devices, bind the sockets, serve NBD until a signal.

use super::DeviceArgs;
use super::size::format_size;
use crate::engine::BlockDevice as _;
use crate::nbd::export::{ConnectionLimits, Export, Limits};
use crate::nbd::server::{self, Listener};
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

    /// TCP address to listen on, an IP or a host name (every address it has); repeatable.
    /// Without :PORT, port 10809. Default 127.0.0.1:10809 when no --socket is given.
    #[arg(long, value_name = "ADDR[:PORT]")]
    listen: Vec<String>,

    /// Unix socket path to listen on; repeatable.
    #[arg(long, value_name = "PATH")]
    socket: Vec<PathBuf>,

    /// Most client connections at once (more wait in the kernel's accept queue).
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,

    /// Largest read or write accepted from a client. Clients that ask are told 32M, the
    /// size handled in one piece; larger requests (from clients never told, such as those
    /// using NBD_OPT_EXPORT_NAME) are streamed in 32M pieces, so memory stays bounded.
    #[arg(long, value_name = "SIZE", value_parser = super::size::parse_size,
          default_value = "1G")]
    max_request: u64,

    /// Most payload bytes in flight per connection before the server stops reading requests.
    #[arg(long, value_name = "SIZE", value_parser = super::size::parse_size, default_value = "128M")]
    inflight_memory: u64,

    /// Most payload bytes in flight over all connections of one client address (TCP) or
    /// one user (Unix socket), so that one client cannot take every I/O buffer of the
    /// daemon. Default: half of --buffer-memory.
    #[arg(long, value_name = "SIZE", value_parser = super::size::parse_size)]
    client_inflight_memory: Option<u64>,

    /// Seconds a new client has to finish the handshake (TLS included); one that sends
    /// nothing is dropped then.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    handshake_timeout: u64,

    /// Most connections at once from one client address (TCP) or one user (Unix socket),
    /// so that one client cannot take every connection slot.
    #[arg(long, value_name = "N", default_value_t = 128)]
    max_connections_per_client: usize,

    /// Microseconds a connection polls its socket for the client's next request before it
    /// sleeps; 0 never polls. Saves a wakeup per request at queue depth 1, at the cost of
    /// up to this much CPU when a client pauses (docs/tuning.md has measurements). Only a
    /// connection alone on its thread polls.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = server::DEFAULT_BUSY_POLL_US)]
    busy_poll: u64,

    /// TLS through NBD's STARTTLS: off, on (clients choose), or require (nothing but
    /// STARTTLS before TLS is up). Needs --tls-cert and --tls-key.
    #[arg(long, value_enum, default_value_t = TlsArg::Off)]
    tls: TlsArg,

    /// The server's certificate chain (PEM).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,

    /// The server's private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,

    /// Require client certificates issued by this CA (PEM): mutual TLS.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,

    /// Accept listening on a non-loopback address without --tls require, where anyone on
    /// the network can read and overwrite the data.
    #[arg(long)]
    allow_insecure: bool,

    /// Permissions of the Unix sockets, in octal (default: owner only).
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    socket_mode: u32,

    /// Group of the Unix sockets (a name or a number); give it --socket-mode 0660 to let it in.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,

    #[command(flatten)]
    ops: OpsArgs,

    /// Read settings from a TOML file (see docs/service.md); flags given here override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// Options of `serve` that concern running the daemon rather than serving NBD.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct OpsArgs {
    /// Save the default export's data to FILE when the daemon stops cleanly.
    #[arg(long, value_name = "FILE")]
    pub save: Option<PathBuf>,

    /// Restore the default export's data from FILE (made by --save or `vramdisk save`) before
    /// serving; the daemon refuses to start if the file is damaged or of another size.
    #[arg(long, value_name = "FILE")]
    pub load: Option<PathBuf>,

    /// Keep the default export in FILE across restarts: load it at start if it exists, save
    /// it at a clean stop.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["save", "load"])]
    pub persist: Option<PathBuf>,

    /// Serve Prometheus metrics on http://ADDR:PORT/metrics. ADDR is an IP or a host name;
    /// without :PORT, port 9100.
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub metrics: Option<String>,

    /// Control socket for `vramdisk status` and `vramdisk save`; by default
    /// PID.sock in /run/vramdisk (as root) or $XDG_RUNTIME_DIR/vramdisk.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
}

impl OpsArgs {
    /// The persistence plan these flags give the default export.
    pub fn default_plan(&self) -> crate::ops::PersistPlan {
        crate::ops::PersistPlan {
            load: self.load.clone(),
            load_if_exists: self.persist.clone(),
            save: self.save.clone().or_else(|| self.persist.clone()),
        }
    }
}

/// `--tls`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum TlsArg {
    Off,
    On,
    Require,
}

fn parse_mode(s: &str) -> std::result::Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s} is not a permission mode: write it in octal, like 0660"))
}

fn parse_group(g: &str) -> Result<u32> {
    if let Ok(gid) = g.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(g) {
        Ok(Some(gr)) => Ok(gr.gid.as_raw()),
        _ => bail!("--socket-group {g}: no such group; give an existing group name or number"),
    }
}

/// Refuses plain-text NBD on a network: anyone who reaches the port reads and overwrites
/// the device.
fn check_exposure(addr: &SocketAddr, tls: TlsArg, allow_insecure: bool) -> Result<()> {
    if addr.ip().is_loopback() || tls == TlsArg::Require || allow_insecure {
        return Ok(());
    }
    bail!(
        "refusing to listen on {addr} without TLS: NBD has no authentication of its own, so \
         anyone who can reach that address could read and overwrite the device; use \
         --tls require (with --tls-cert/--tls-key, and --tls-ca to admit only clients with \
         certificates), listen on 127.0.0.1 or a --socket, or accept the risk with \
         --allow-insecure"
    )
}

fn tls_setup(args: &ServeArgs) -> Result<Option<crate::nbd::tls::TlsSetup>> {
    use crate::nbd::tls::TlsMode;
    let mode = match args.tls {
        TlsArg::Off => {
            if args.tls_cert.is_some() || args.tls_key.is_some() || args.tls_ca.is_some() {
                bail!(
                    "--tls-cert/--tls-key/--tls-ca given but TLS is off: add --tls on or --tls require"
                );
            }
            return Ok(None);
        }
        TlsArg::On => TlsMode::On,
        TlsArg::Require => TlsMode::Require,
    };
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        bail!(
            "--tls needs the server's certificate and key: give --tls-cert FILE and --tls-key FILE"
        );
    };
    crate::nbd::tls::TlsSetup::load(mode, cert, key, args.tls_ca.as_deref()).map(Some)
}

/// The addresses `addr`, given to `flag`, stands for: IP:PORT, HOST:PORT, or an IP or host
/// name alone, which listens on `default_port`. A host name may give several (IPv4 and IPv6).
fn resolve(flag: &str, addr: &str, default_port: u16) -> Result<Vec<SocketAddr>> {
    use std::net::{IpAddr, ToSocketAddrs};
    let bad = || {
        format!(
            "{flag} {addr} is not an address: write HOST:PORT or IP:PORT, like \
             127.0.0.1:{default_port}, or an address alone for port {default_port}"
        )
    };
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    if let Ok(ip) = addr
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok(vec![SocketAddr::new(ip, default_port)]);
    }
    let (host, port) = match addr.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().ok().with_context(bad)?),
        None => (addr, default_port),
    };
    if host.is_empty() || host.contains(':') {
        bail!(bad());
    }
    let Ok(found) = (host, port).to_socket_addrs() else {
        bail!(
            "{flag} {addr} is not an address: no host called '{host}' is known here; write \
             HOST:PORT or IP:PORT, like 127.0.0.1:{default_port}"
        );
    };
    let mut found: Vec<SocketAddr> = found.collect();
    found.sort();
    found.dedup();
    if found.is_empty() {
        bail!("{} (the name has no address)", bad());
    }
    Ok(found)
}

/// Binds every TCP address; of a host name's several addresses, those this machine does
/// not have (IPv6 switched off) are skipped while one binds.
async fn bind_tcp(addrs: &[SocketAddr], ok_to_skip: bool) -> Result<Vec<tokio::net::TcpListener>> {
    let mut out = Vec::new();
    for addr in addrs {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => out.push(l),
            Err(e) if ok_to_skip && e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                info!("not listening on {addr}: {e}");
            }
            Err(e) => return Err(e).with_context(|| format!("cannot listen on {addr}")),
        }
    }
    if out.is_empty() {
        bail!("cannot listen on any of {addrs:?}: this machine has none of these addresses");
    }
    Ok(out)
}

/// Socket files bound at start, removed if the daemon stops before it serves them (after
/// that, the server and the daemon remove their own).
struct BoundFiles(Vec<PathBuf>);

impl Drop for BoundFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Runs `vramdisk serve` to completion (until SIGINT or SIGTERM). `matches` are the
/// subcommand's, needed to tell flags given on the command line from defaults when a
/// `--config` file is merged in.
pub fn run(args: ServeArgs, matches: &clap::ArgMatches) -> Result<()> {
    let (args, overrides, argv) = match &args.config {
        None => (args, Vec::new(), Vec::new()),
        Some(path) => {
            let cmd = super::config::serve_command();
            let (argv, overrides) = super::config::merged_argv(&cmd, matches, path)?;
            let m = cmd
                .no_binary_name(true)
                .try_get_matches_from(super::config::to_os(&argv))
                .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.render()))?;
            (ServeArgs::from_arg_matches(&m)?, overrides, argv)
        }
    };
    let activated = crate::ops::notify::classify(crate::ops::notify::listen_fds())?;
    // Every address is checked before anything is bound, so that a mistake leaves nothing
    // behind; (addresses, whether they came from a host name).
    let mut tcp: Vec<(Vec<SocketAddr>, bool)> = Vec::new();
    for a in &args.listen {
        let addrs = resolve("--listen", a, 10809)?;
        tcp.push((addrs, a.parse::<SocketAddr>().is_err()));
    }
    if tcp.is_empty() && args.socket.is_empty() && activated.is_empty() {
        tcp.push((vec!["127.0.0.1:10809".parse().unwrap()], false));
    }
    for addr in tcp.iter().flat_map(|(a, _)| a) {
        check_exposure(addr, args.tls, args.allow_insecure)?;
    }
    let metrics = args
        .ops
        .metrics
        .as_deref()
        .map(|m| resolve("--metrics", m, crate::ops::metrics::DEFAULT_PORT))
        .transpose()?;
    let tls = tls_setup(&args)?;
    let socket_group = args.socket_group.as_deref().map(parse_group).transpose()?;
    let busy_poll = server::busy_poll(args.busy_poll)?;
    if args.max_request < 32 << 20 {
        bail!(
            "--max-request {} is below 32M, the maximum payload clients are told (the NBD \
             spec asks servers to take that much): give at least 32M",
            format_size(args.max_request)
        );
    }
    if args.inflight_memory < 32 << 20 {
        bail!("--inflight-memory must be at least 32M, the largest request");
    }
    if args.inflight_memory > args.device.buffer_memory / 2 {
        bail!(
            "--inflight-memory {} is more than half of --buffer-memory {}: one connection could \
             take every I/O buffer and stall the others; lower --inflight-memory or raise \
             --buffer-memory",
            format_size(args.inflight_memory),
            format_size(args.device.buffer_memory)
        );
    }
    let client_inflight = args
        .client_inflight_memory
        .unwrap_or(args.device.buffer_memory / 2);
    if client_inflight > args.device.buffer_memory / 2 {
        bail!(
            "--client-inflight-memory {} is more than half of --buffer-memory {}: one client \
             could take every I/O buffer and stall the others; lower --client-inflight-memory \
             or raise --buffer-memory",
            format_size(client_inflight),
            format_size(args.device.buffer_memory)
        );
    }
    if args.inflight_memory > client_inflight {
        bail!(
            "--inflight-memory {} is more than --client-inflight-memory {}: a connection could \
             never use its budget; lower --inflight-memory or raise --client-inflight-memory",
            format_size(args.inflight_memory),
            format_size(client_inflight)
        );
    }
    args.device.export_specs()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vramdisk-io")
        .build()
        .context("starting the async runtime")?;
    // The signal handlers come first: from the moment a socket exists, whoever waits for it
    // may send SIGTERM, which must end the daemon cleanly (once its devices are built), not
    // kill it.
    let shutdown = CancellationToken::new();
    let stop = {
        let _in_runtime = runtime.enter();
        stop_on_signal(shutdown.clone())
    };
    // Sockets are bound before the devices are built and loaded, which can take minutes: a
    // taken address fails at once. Nothing accepts before the load is done, so no client
    // sees a partial load (connections wait in the kernel's queue).
    let mut files = BoundFiles(Vec::new());
    let mut listeners = Vec::new();
    let mut urls = Vec::new();
    let (metrics_listeners, control) = runtime.block_on(async {
        for (addrs, from_name) in &tcp {
            for l in bind_tcp(addrs, *from_name).await? {
                urls.push(format!("nbd://{}", l.local_addr()?));
                listeners.push(Listener::Tcp(l));
            }
        }
        let mut metrics_listeners = Vec::new();
        for addr in metrics.iter().flatten() {
            metrics_listeners.push(crate::ops::metrics::bind(*addr).await?);
        }
        for path in &args.socket {
            listeners.push(Listener::bind_unix(path)?);
            files.0.push(path.clone());
            set_socket_access(path, args.socket_mode, socket_group)?;
            urls.push(format!("nbd+unix:///?socket={}", path.display()));
        }
        let control = crate::ops::control::bind_default(args.ops.control_socket.clone())?;
        files.0.push(control.1.clone());
        Ok::<_, anyhow::Error>((metrics_listeners, control))
    })?;

    let devices = super::config::build_devices(&args.device, &args.ops, &overrides, &argv)?;
    runtime.block_on(async move {
        tokio::spawn(stop);
        let daemon = crate::ops::Daemon::start(devices, shutdown.clone()).await?;
        // From here the daemon removes the control socket and the server its sockets.
        files.0.clear();
        let (control_listener, control_path) = control;
        daemon.serve_control(control_listener, control_path);
        daemon.serve_metrics(metrics_listeners)?;
        for a in activated {
            match a {
                crate::ops::notify::Activated::Tcp(l) => {
                    let l = tokio::net::TcpListener::from_std(l)?;
                    check_exposure(&l.local_addr()?, args.tls, args.allow_insecure)?;
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
                    metrics: Some(e.metrics().clone()),
                }
            })
            .collect();
        for url in &urls {
            info!("listening on {url}");
        }
        daemon.set_listen(urls);
        daemon.ready();
        let limits = Limits {
            max_connections: args.max_connections.max(1),
            client_inflight_bytes: usize::try_from(client_inflight).unwrap_or(usize::MAX),
            handshake_timeout: Duration::from_secs(args.handshake_timeout.max(1)),
            max_per_client: args.max_connections_per_client.max(1),
            tls,
            connection: ConnectionLimits {
                inflight_bytes: args.inflight_memory as usize,
                busy_poll,
                max_request: args.max_request,
            },
        };
        let served = server::serve(exports, listeners, limits, shutdown).await;
        // Save even when the server failed: the data in memory is what the file is for.
        let stopped = daemon.stop().await;
        served.and(stopped)
    })
}

/// Gives a Unix socket its mode and group. It is created owner-only (see
/// `Listener::bind_unix`), so this can only widen access.
fn set_socket_access(path: &std::path::Path, mode: u32, group: Option<u32>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid))).with_context(
            || {
                format!(
                    "cannot give {} to group {gid} (--socket-group)",
                    path.display()
                )
            },
        )?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
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
