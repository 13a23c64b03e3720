//! The NBD server: listening sockets, connection limits, handshake timeout, graceful
//! shutdown. Each accepted connection runs the handshake ([`super::handshake`]) and then the
//! transmission phase (`super::transmission`) in its own task.

use super::admission::{Admission, ClientSlot};
use super::export::{ConnectionLimits, DEFAULT_MAX_REQUEST, Export, Limits};
use super::handshake::{self, Outcome};
use super::proto::Framing;
use super::tls::TlsMode;
use super::transmission;
use anyhow::{Context, Result, bail};
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// How long a shutdown waits for in-flight requests to finish and their replies to go out
/// before the remaining connections are closed regardless.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Default of `--busy-poll`, in microseconds: longer than a client at queue depth 1 takes
/// to send its next request after a reply (a few µs to ~30 µs when the reply has to wake
/// it on another CPU), short enough that a client which stopped costs nearly nothing.
pub const DEFAULT_BUSY_POLL_US: u64 = 50;

/// Largest `--busy-poll` accepted: a client that has not sent its next request within a
/// millisecond is not in a tight loop, and polling longer only burns CPU.
pub const MAX_BUSY_POLL_US: u64 = 1000;

/// Checks `--busy-poll` (microseconds, for `serve` and `attach` alike).
pub fn busy_poll(us: u64) -> anyhow::Result<Duration> {
    if us > MAX_BUSY_POLL_US {
        anyhow::bail!(
            "--busy-poll {us} is too long: polling past {MAX_BUSY_POLL_US} microseconds only \
             burns CPU; choose a smaller value (0 turns polling off)"
        );
    }
    Ok(Duration::from_micros(us))
}

/// A bound listening socket.
pub enum Listener {
    /// TCP.
    Tcp(tokio::net::TcpListener),
    /// A Unix socket, removed again when the server stops.
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Listener {
    /// Binds a Unix socket at `path`. A socket file left by a dead daemon (nobody accepts
    /// on it) is replaced; a live one is an error, as is any other kind of file.
    pub fn bind_unix(path: &Path) -> Result<Listener> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) => {
                if !meta.file_type().is_socket() {
                    bail!(
                        "{} exists and is not a socket: remove it or choose another --socket path",
                        path.display()
                    );
                }
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => bail!(
                        "another daemon is already listening on {}: stop it or choose another \
                         --socket path",
                        path.display()
                    ),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        std::fs::remove_file(path).with_context(|| {
                            format!("cannot remove the stale socket {}", path.display())
                        })?;
                        info!("replaced stale socket {}", path.display());
                    }
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("cannot tell whether {} is in use", path.display())
                        });
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot inspect {}", path.display()));
            }
        }
        // Created owner-only: a wider umask would let others connect before the mode is set.
        // umask is process-wide, but this runs at startup, before any connection.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = UnixListener::bind(path);
        nix::sys::stat::umask(old);
        let l =
            bound.with_context(|| format!("cannot listen on Unix socket {}", path.display()))?;
        Ok(Listener::Unix(l, path.to_path_buf()))
    }
}

/// What every connection task shares.
struct Shared {
    exports: Vec<Export>,
    limits: Limits,
    /// The connection limits, and who makes room when one is reached.
    admission: Arc<Admission>,
    shutdown: CancellationToken,
    workers: Workers,
}

/// The threads connections run on: one single-threaded runtime per core. A connection
/// lives on one of them from accept to close, so its reader, its writer and its operations
/// wake each other on one thread. A work-stealing runtime would instead wake an idle
/// worker on another CPU for every event, and on a small machine those cross-CPU wakeups
/// cost more than serving the request. Connections go to the thread with the fewest.
struct Workers {
    threads: Vec<Worker>,
}

struct Worker {
    handle: tokio::runtime::Handle,
    connections: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Workers {
    fn start() -> Result<Workers> {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, MAX_WORKERS);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting a connection thread's runtime")?;
            let handle = rt.handle().clone();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let connections = Arc::new(AtomicUsize::new(0));
            let load = connections.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vramdisk-nbd-{i}"))
                .spawn(move || {
                    transmission::set_thread_load(load);
                    rt.block_on(async {
                        let _ = stopped.await;
                    });
                })
                .context("starting a connection thread")?;
            threads.push(Worker {
                handle,
                connections,
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(Workers { threads })
    }

    /// The least busy thread, and its connection count to hold while a connection lives.
    fn pick(&self) -> (&tokio::runtime::Handle, Load) {
        let w = self
            .threads
            .iter()
            .min_by_key(|w| w.connections.load(Ordering::Relaxed))
            .expect("at least one worker");
        w.connections.fetch_add(1, Ordering::Relaxed);
        (&w.handle, Load(w.connections.clone()))
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.threads {
            drop(w.stop.take());
        }
        let me = std::thread::current().id();
        for w in &mut self.threads {
            if let Some(t) = w.thread.take() {
                // Never wait for ourselves (if the last reference went away on a worker).
                if t.thread().id() != me {
                    let _ = t.join();
                }
            }
        }
    }
}

/// One connection counted against a worker thread.
struct Load(Arc<AtomicUsize>);

impl Drop for Load {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Most connection threads, whatever the core count.
const MAX_WORKERS: usize = 16;

/// Serves `exports` on `listeners` until `shutdown` is cancelled. Then it stops accepting,
/// gives in-flight requests up to [`SHUTDOWN_GRACE`] to finish, closes every connection,
/// and removes its Unix socket files.
pub async fn serve(
    exports: Vec<Export>,
    listeners: Vec<Listener>,
    limits: Limits,
    shutdown: CancellationToken,
) -> Result<()> {
    if exports.is_empty() {
        bail!("there is nothing to serve: give at least one export");
    }
    if listeners.is_empty() {
        bail!("there is nowhere to serve: give at least one --listen or --socket");
    }
    let shared = Arc::new(Shared {
        exports,
        admission: Admission::new(
            limits.max_connections,
            limits.max_per_client.max(1),
            limits.client_inflight_bytes,
        ),
        limits,
        shutdown: shutdown.clone(),
        workers: Workers::start()?,
    });
    let mut accepting = JoinSet::new();
    let mut sockets = Vec::new();
    for l in listeners {
        match l {
            Listener::Tcp(l) => {
                accepting.spawn(accept_loop(l, shared.clone()));
            }
            Listener::Unix(l, path) => {
                // Remembered so that only our own socket file is removed at the end.
                let id = std::fs::metadata(&path).ok().map(|m| (m.dev(), m.ino()));
                sockets.push((path.clone(), id));
                accepting.spawn(accept_loop(UnixAcceptor(l, path), shared.clone()));
            }
        }
    }
    shutdown.cancelled().await;
    while accepting.join_next().await.is_some() {}
    for (path, id) in sockets {
        let same = std::fs::metadata(&path)
            .ok()
            .map(|m| (m.dev(), m.ino()))
            .is_some_and(|now| Some(now) == id);
        if same && let Err(e) = std::fs::remove_file(&path) {
            warn!("cannot remove socket {}: {e}", path.display());
        }
    }
    // The connection threads stop (and are joined) when the last reference goes; the
    // accept loops, which held the others, are done.
    tokio::task::spawn_blocking(move || drop(shared))
        .await
        .context("stopping the connection threads")?;
    Ok(())
}

/// Serves the transmission phase alone on a connected socket whose peer skipped the
/// handshake: the kernel's nbd driver, given sockets over netlink, negotiates nothing and
/// starts sending requests at once. Replies are simple (the kernel knows no other kind) and
/// `flags` are the transmission flags the peer was told; at most `inflight_bytes` of
/// payload are in flight at once (see [`ConnectionLimits::inflight_bytes`]). Returns when the peer sends
/// `NBD_CMD_DISC`, closes the socket, or `shutdown` is cancelled; the error says why a
/// connection was dropped for a protocol violation or a failed socket.
pub async fn serve_transmission_only(
    stream: UnixStream,
    export: &Export,
    flags: u16,
    inflight_bytes: usize,
    shutdown: &CancellationToken,
) -> Result<u64> {
    let neg = handshake::Negotiated {
        export: 0,
        framing: Framing::Simple,
        allocation_context: None,
        flags,
    };
    let _counted = export.metrics.as_ref().map(|m| m.connection());
    let (rd, wr) = stream.into_split();
    // No busy polling: these connections share the caller's runtime threads with the others.
    let limits = ConnectionLimits {
        inflight_bytes,
        busy_poll: Duration::ZERO,
        // The kernel sends at most the 32 MiB it was told; the default costs nothing.
        max_request: DEFAULT_MAX_REQUEST,
    };
    let summary = transmission::run(rd, wr, export, &neg, &limits, None, shutdown).await;
    match summary.ended {
        transmission::Ended::Protocol(_)
        | transmission::Ended::ReadFailed(_)
        | transmission::Ended::WriteFailed
        | transmission::Ended::ReadCut(_) => {
            bail!("{} after {} requests", summary.ended, summary.requests)
        }
        _ => Ok(summary.requests),
    }
}

/// A connected byte stream that splits into independently owned halves, and moves
/// between runtimes through its std form (it belongs to the reactor of the runtime it was
/// made on).
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    type Read: transmission::Source;
    type Write: transmission::Sink;
    type Std: Send + 'static;
    fn into_halves(self) -> (Self::Read, Self::Write);
    fn into_std(self) -> io::Result<Self::Std>;
    /// Registers with the current runtime.
    fn from_std(s: Self::Std) -> io::Result<Self>;
}

impl Stream for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    type Std = std::net::TcpStream;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
    fn into_std(self) -> io::Result<Self::Std> {
        TcpStream::into_std(self)
    }
    fn from_std(s: Self::Std) -> io::Result<Self> {
        TcpStream::from_std(s)
    }
}

impl Stream for UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    type Std = std::os::unix::net::UnixStream;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
    fn into_std(self) -> io::Result<Self::Std> {
        UnixStream::into_std(self)
    }
    fn from_std(s: Self::Std) -> io::Result<Self> {
        UnixStream::from_std(s)
    }
}

/// A listening socket: accepts a stream and names the peer for logs.
trait Acceptor: Send + 'static {
    type Conn: Stream;
    /// The stream, a description of the peer, and the source it counts against.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Conn, String, String)>> + Send;
    fn describe(&self) -> String;
}

impl Acceptor for TcpListener {
    type Conn = TcpStream;
    async fn accept(&self) -> io::Result<(TcpStream, String, String)> {
        let (s, addr) = TcpListener::accept(self).await?;
        // Replies are batched by the server itself; Nagle would only add latency.
        s.set_nodelay(true)?;
        Ok((s, addr.to_string(), addr.ip().to_string()))
    }
    fn describe(&self) -> String {
        match self.local_addr() {
            Ok(a) => format!("nbd://{a}"),
            Err(_) => "a TCP socket".into(),
        }
    }
}

struct UnixAcceptor(UnixListener, PathBuf);

impl Acceptor for UnixAcceptor {
    type Conn = UnixStream;
    async fn accept(&self) -> io::Result<(UnixStream, String, String)> {
        let (s, _) = self.0.accept().await?;
        let cred = s.peer_cred().ok();
        let who = match cred.and_then(|c| c.pid()) {
            Some(pid) => format!("{} (pid {pid})", self.1.display()),
            None => self.1.display().to_string(),
        };
        let key = match cred {
            Some(c) => format!("uid {}", c.uid()),
            None => "unix".to_string(),
        };
        Ok((s, who, key))
    }
    fn describe(&self) -> String {
        format!("nbd+unix:///?socket={}", self.1.display())
    }
}

/// Accepts connections until shutdown, each once a connection slot is free (see
/// [`Admission::slot`]); then waits for this listener's connections to finish.
async fn accept_loop<A: Acceptor>(listener: A, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted.and_then(|(s, peer, key)| Ok((s.into_std()?, peer, key))) {
            Ok((stream, peer, key)) => {
                // While this waits, later clients wait in the kernel's accept queue.
                let slot = tokio::select! {
                    biased;
                    _ = shared.shutdown.cancelled() => break,
                    s = shared.admission.slot(&peer) => match s {
                        Some(s) => s,
                        None => break,
                    },
                };
                let Some(client) = shared.admission.admit(key, &peer) else {
                    warn!(
                        "client {peer} refused: it already has {} connections past the \
                         handshake (--max-connections-per-client)",
                        shared.limits.max_per_client
                    );
                    drop(stream);
                    continue;
                };
                let (rt, load) = shared.workers.pick();
                let shared = shared.clone();
                conns.spawn_on(
                    async move {
                        let _load = load;
                        match A::Conn::from_std(stream) {
                            Ok(s) => connection(s, peer, shared, slot, client).await,
                            Err(e) => error!("client {peer}: cannot set up its socket: {e}"),
                        }
                    },
                    rt,
                );
            }
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                error!("accepting on {}: {e}", listener.describe());
                tokio::select! {
                    _ = shared.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
    drop(listener);
    if conns.is_empty() {
        return;
    }
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            "{} connection(s) still busy {}s after shutdown; closing them",
            conns.len(),
            SHUTDOWN_GRACE.as_secs()
        );
        conns.shutdown().await;
    }
}

/// A connection after the handshake: as accepted, or inside TLS.
enum Conn<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
}

/// The handshake, with the TLS upgrade when the client asks for one.
async fn handshake_phase<S: Stream>(
    mut stream: S,
    shared: &Shared,
    peer: &str,
    client: &ClientSlot,
) -> Result<(Conn<S>, Outcome)> {
    let tls = shared.limits.tls.as_ref();
    let mode = tls.map_or(TlsMode::Off, |t| t.mode);
    let commit = || client.established();
    let outcome = handshake::negotiate(&mut stream, &shared.exports, peer, mode, &commit).await?;
    let Outcome::StartTls { no_zeroes } = outcome else {
        return Ok((Conn::Plain(stream), outcome));
    };
    let tls = tls.context("STARTTLS accepted without TLS set up")?;
    let mut stream = Box::new(
        tls.acceptor
            .accept(stream)
            .await
            .context("TLS handshake failed")?,
    );
    info!(
        "client {peer}: TLS established{}",
        if tls.verifies_clients {
            " (client certificate verified)"
        } else {
            ""
        }
    );
    let outcome =
        handshake::negotiate_in_tls(&mut *stream, &shared.exports, peer, no_zeroes, &commit)
            .await?;
    Ok((Conn::Tls(stream), outcome))
}

/// Copies between a TLS stream and the socket the transmission phase runs on. The two
/// directions end on their own: replies flow until the transmission phase ends its stream
/// (and the TLS stream then ends with close_notify); requests sent after the server stopped
/// reading are thrown away, where a failed write of them would otherwise end the relay with
/// replies still to forward. As on a plain socket, the connection stays open a little after
/// the last reply so that the client takes it before the socket closes.
async fn relay<S: Stream>(tls: Box<tokio_rustls::server::TlsStream<S>>, plain: UnixStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut tls_rd, mut tls_wr) = tokio::io::split(*tls);
    let (mut plain_rd, mut plain_wr) = plain.into_split();
    let replies = async move {
        let _ = tokio::io::copy(&mut plain_rd, &mut tls_wr).await;
        let _ = tls_wr.shutdown().await;
    };
    let requests = async move {
        let mut buf = vec![0u8; 64 << 10];
        let mut forward = true;
        while let Ok(n @ 1..) = tls_rd.read(&mut buf).await {
            if forward && plain_wr.write_all(&buf[..n]).await.is_err() {
                forward = false;
            }
        }
        // Dropping `plain_wr` here is the client's EOF, for the transmission phase.
    };
    tokio::pin!(replies, requests);
    tokio::select! {
        _ = &mut replies => {
            let _ = tokio::time::timeout(transmission::CLOSE_LINGER, &mut requests).await;
        }
        _ = &mut requests => replies.await,
    }
}

/// Serves one client from handshake to close.
async fn connection<S: Stream>(
    stream: S,
    peer: String,
    shared: Arc<Shared>,
    _slot: OwnedSemaphorePermit,
    client: ClientSlot,
) {
    info!("client {peer} connected");
    let limits = &shared.limits;
    let negotiated = tokio::select! {
        biased;
        _ = shared.shutdown.cancelled() => {
            info!("client {peer} closed: server shutting down during the handshake");
            return;
        }
        // Logged where it was decided (see `Admission`).
        _ = client.evicted.cancelled() => return,
        r = tokio::time::timeout(limits.handshake_timeout, handshake_phase(stream, &shared, &peer, &client)) => r,
    };
    let (conn, neg) = match negotiated {
        Err(_) => {
            info!(
                "client {peer} closed: no handshake within {}s",
                limits.handshake_timeout.as_secs_f32()
            );
            return;
        }
        Ok(Err(e)) => {
            warn!("client {peer} closed: handshake failed: {e:#}");
            return;
        }
        Ok(Ok((_, Outcome::Closed(why)))) => {
            info!("client {peer} closed: {why}");
            return;
        }
        Ok(Ok((_, Outcome::StartTls { .. }))) => {
            // handshake_phase upgrades once; inside TLS, STARTTLS is refused.
            warn!("client {peer} closed: STARTTLS inside TLS");
            return;
        }
        Ok(Ok((conn, Outcome::Transmission(n)))) => (conn, n),
    };
    let client_budget = client.budget.clone();
    let export = &shared.exports[neg.export];
    info!(
        "client {peer} uses export '{}' ({} replies{})",
        export.name,
        match neg.framing {
            Framing::Simple => "simple",
            Framing::Structured => "structured",
            Framing::Extended => "extended-header",
        },
        if neg.allocation_context.is_some() {
            ", base:allocation"
        } else {
            ""
        }
    );
    // Counts the client on its export for as long as the transmission phase lasts.
    let _counted = export.metrics.as_ref().map(|m| m.connection());
    let summary = match conn {
        Conn::Plain(stream) => {
            let (rd, wr) = stream.into_halves();
            transmission::run(
                rd,
                wr,
                export,
                &neg,
                &limits.connection,
                Some(client_budget),
                &shared.shutdown,
            )
            .await
        }
        Conn::Tls(tls) => {
            // The transmission phase writes to a socket without waiting (see
            // `transmission::Sink`), which a TLS stream cannot do; a socket pair relays
            // between them. TLS is not the fast path: the copy is the price of not having a
            // second implementation of the transmission phase.
            let (near, far) = match UnixStream::pair() {
                Ok(p) => p,
                Err(e) => {
                    error!("client {peer}: cannot set up the TLS relay: {e}");
                    return;
                }
            };
            let relay = tokio::spawn(relay(tls, far));
            let (rd, wr) = near.into_split();
            // No busy polling: the relay task that feeds the reader runs on the same
            // thread, so polling for its bytes would only hold it up.
            let summary = transmission::run(
                rd,
                wr,
                export,
                &neg,
                &ConnectionLimits {
                    busy_poll: Duration::ZERO,
                    ..limits.connection
                },
                Some(client_budget),
                &shared.shutdown,
            )
            .await;
            // Replies still in the relay go out; a stuck client does not hold shutdown up.
            if tokio::time::timeout(SHUTDOWN_GRACE, relay).await.is_err() {
                debug!("client {peer}: TLS relay did not finish");
            }
            summary
        }
    };
    if summary.ended.warns() {
        warn!(
            "client {peer} dropped from export '{}': {} ({} requests)",
            export.name, summary.ended, summary.requests
        );
    } else {
        info!(
            "client {peer} closed on export '{}': {} ({} requests)",
            export.name, summary.ended, summary.requests
        );
    }
    let p = summary.polls;
    debug!(
        "client {peer}: {} polls: {} found the request at once, {} caught it spinning, {} \
         came back empty, {} did not spin (no CPU to spare)",
        p.polls, p.first_try, p.caught, p.empty, p.no_spare
    );
}
