//! `vramdisk attach` and `vramdisk detach`: a local `/dev/...` in one command.

use super::DeviceArgs;
use super::size::format_size;
use crate::attach::{self, AttachOptions, Attachment, Method, Via, state, usage};
use crate::nbd::server;
use anyhow::{Context, Result, bail};
use clap::Args;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// Arguments of `vramdisk attach`.
#[derive(Args, Debug)]
pub struct AttachArgs {
    #[command(flatten)]
    device: DeviceArgs,

    /// How to make the block device: FUSE file + loop device, kernel nbd, ublk, or the best
    /// one this kernel offers.
    #[arg(long, value_enum, default_value = "auto")]
    via: Via,

    /// Go to the background once the device is attached (the device path is still printed).
    #[arg(long)]
    daemon: bool,

    /// Write the daemon's pid to this file (removed on detach).
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,

    /// Use the device as swap: implies --preallocate, runs mkswap and swapon, and swapoff on
    /// detach.
    #[arg(long)]
    swap: bool,

    /// Threads serving I/O requests: FUSE threads (default: one per CPU, 2 to 8), or ublk
    /// queues (`--queues`; default: one per CPU).
    #[arg(long, visible_alias = "queues", value_name = "N")]
    threads: Option<usize>,

    /// Microseconds a thread that has just served a request polls for the next one before
    /// it sleeps; 0 never polls. Saves a wakeup per request at queue depth 1, at the cost
    /// of up to this much CPU when I/O pauses (docs/tuning.md has measurements). At most
    /// one FUSE thread polls at a time.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = server::DEFAULT_BUSY_POLL_US)]
    busy_poll: u64,

    /// How FUSE requests reach the daemon (--via fuse): fuser threads reading /dev/fuse
    /// (auto, the default: on GPU memory twice as fast as the ring at 4 KiB with many
    /// requests in flight), or, opted in, FUSE over io_uring (faster at 1 MiB; the fuse
    /// module's enable_uring parameter must be on).
    #[arg(
        long,
        value_enum,
        default_value = "auto",
        env = "VRAMDISK_FUSE_TRANSPORT",
        value_name = "HOW"
    )]
    fuse_transport: attach::fuse_loop::Transport,

    /// Also serve the device over NBD on this TCP address (repeatable).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<std::net::SocketAddr>,

    /// Also serve the device over NBD on this Unix socket (repeatable).
    #[arg(long, value_name = "PATH")]
    socket: Vec<PathBuf>,
}

/// Arguments of `vramdisk detach`.
#[derive(Args, Debug)]
pub struct DetachArgs {
    /// The device to detach: /dev/loopN as `attach` printed it (or loopN).
    device: String,

    /// Detach even if the device is mounted or in use as swap: its users get I/O errors.
    #[arg(long)]
    force: bool,

    /// Seconds to wait for the daemon to finish (swapoff of a full swap device takes a while).
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    timeout: u64,
}

/// Examples shown by `vramdisk attach --help`.
pub const EXAMPLES: &str = "\
Examples:
  A 16 GiB disk in GPU memory, formatted and mounted (the daemon runs in the background):
    dev=$(vramdisk attach --size 16G --daemon)
    mkfs.ext4 -q $dev && mount $dev /mnt/scratch
    ...
    umount /mnt/scratch && vramdisk detach $dev
  Swap in GPU memory:
    vramdisk attach --size 32G --swap --daemon --pid-file /run/vramdisk-swap.pid
  In the foreground (Ctrl-C detaches; the first line on stdout is the device):
    vramdisk attach --backend host --size 1G

`vramdisk status` shows each attached device (ATTACH), its memory in use and its traffic;
SIGUSR1 makes the daemon log its memory use.
detach refuses while the device is mounted or swap (unless --force) and also cleans up after
a daemon that was killed.";

fn default_threads() -> usize {
    // Each thread serves one request at a time. Threads that are not needed park (see
    // attach::pacing), so this is the most that serve at once: one per core (fewer leave a
    // core idle at 1 MiB), and GPU copies wait on the device, so more cores get more
    // threads to hide that. Each thread also holds fuser's 16 MiB
    // receive buffer, locked in RAM, so the count is capped.
    std::thread::available_parallelism()
        .map(|n| n.get().clamp(2, 8))
        .unwrap_or(4)
}

/// Where the daemon reports "attached at PATH" or its error: the terminal, or the parent
/// process waiting on a pipe with --daemon.
enum Notify {
    Stdout,
    Parent(std::fs::File),
    Done,
}

impl Notify {
    fn ready(&mut self, device: &Path) -> Result<()> {
        match std::mem::replace(self, Notify::Done) {
            Notify::Stdout => {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{}", device.display())?;
                out.flush()?;
            }
            Notify::Parent(mut pipe) => {
                writeln!(pipe, "ok {}", device.display())?;
            }
            Notify::Done => {}
        }
        Ok(())
    }

    fn failed(&mut self, e: &anyhow::Error) {
        if let Notify::Parent(mut pipe) = std::mem::replace(self, Notify::Done) {
            let _ = writeln!(pipe, "err {}", format!("{e:#}").replace('\n', " "));
        }
    }
}

/// Forks. The parent waits for the child's report, prints it, and exits; the child returns
/// the pipe to report on, in a new session with stdin and stdout on /dev/null (so that
/// `$(vramdisk attach --daemon ...)` returns) and stderr on its log file.
fn daemonize(log: &Path) -> Result<Notify> {
    // The child of a fork has only the forking thread: a lock another thread held stays
    // locked there for ever. Nothing should have started one by now; make sure.
    let threads = thread_count()?;
    if threads != 1 {
        bail!(
            "cannot go to the background: {threads} threads run already and fork copies only \
             one of them (a bug in vramdisk: run without --daemon, and please report it)"
        );
    }
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating a pipe")?;
    // SAFETY: this process has one thread (checked just above), so the child may run
    // arbitrary code.
    match unsafe { nix::unistd::fork() }.context("fork")? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(w);
            let mut msg = String::new();
            let _ = std::fs::File::from(r).read_to_string(&mut msg);
            let line = msg.lines().next().unwrap_or("");
            if let Some(dev) = line.strip_prefix("ok ") {
                println!("{dev}");
                let _ = std::io::stdout().flush();
                std::process::exit(0);
            }
            let why = line
                .strip_prefix("err ")
                .map(str::to_string)
                .unwrap_or_else(|| "the daemon died while starting".into());
            eprintln!("vramdisk: {why}");
            std::process::exit(1);
        }
        nix::unistd::ForkResult::Child => {
            drop(r);
            nix::unistd::setsid().context("setsid")?;
            let null = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")?;
            let logf = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .with_context(|| format!("opening {}", log.display()))?;
            nix::unistd::dup2_stdin(&null).context("putting stdin on /dev/null")?;
            nix::unistd::dup2_stdout(&null).context("putting stdout on /dev/null")?;
            nix::unistd::dup2_stderr(&logf)
                .with_context(|| format!("putting stderr on {}", log.display()))?;
            let _ = std::env::set_current_dir("/");
            Ok(Notify::Parent(std::fs::File::from(w)))
        }
    }
}

/// Threads of this process now.
fn thread_count() -> Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")
        .context("counting this process's threads in /proc/self/task")?
        .count())
}

/// Runs `vramdisk attach` until the device is detached.
pub fn run(args: AttachArgs) -> Result<()> {
    if !args.device.exports.is_empty() {
        bail!("attach makes one device: give its size with --size, not --export");
    }
    if args.device.size.is_none() {
        bail!("no device size given: add --size SIZE (for example --size 16G)");
    }
    if args.swap && args.device.read_only {
        bail!("--swap needs a writable device: drop --read-only");
    }
    if let Some(addr) = args.listen.iter().find(|a| !a.ip().is_loopback()) {
        bail!(
            "attach serves NBD without TLS, so it listens only on loopback or a Unix socket, \
             not {addr}: to export over the network use `vramdisk serve --tls require`"
        );
    }
    if args.threads.is_some_and(|t| t == 0 || t > 256) {
        bail!("--threads must be between 1 and 256");
    }
    server::busy_poll(args.busy_poll)?;
    if args.pid_file.is_some() && !args.daemon {
        bail!("--pid-file goes with --daemon: add --daemon, or drop --pid-file");
    }
    let (method, why) = attach::choose(args.via)?;
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "attach needs root (it mounts a FUSE filesystem and sets up a block device): \
             run it as root or with sudo"
        );
    }
    let mut device_args = args.device.clone();
    if args.swap {
        device_args.preallocate = true;
    }
    // Checked before forking so that argument mistakes are reported directly.
    device_args.export_specs()?;

    let mut notify = Notify::Stdout;
    let dir = if args.daemon {
        // The state directory is named by pid: create it in the child.
        let tmp_log = state::run_dir().join(format!(".starting-{}.log", std::process::id()));
        std::fs::create_dir_all(state::run_dir())
            .with_context(|| format!("creating {}", state::run_dir().display()))?;
        notify = daemonize(&tmp_log)?;
        let dir = match state::create_dir(std::process::id()) {
            Ok(d) => d,
            Err(e) => {
                notify.failed(&e);
                let _ = std::fs::remove_file(&tmp_log);
                return Err(e);
            }
        };
        let _ = std::fs::rename(&tmp_log, dir.join(state::LOG_FILE));
        dir
    } else {
        state::create_dir(std::process::id())?
    };

    let result = serve_attached(&args, &device_args, method, &why, &dir, &mut notify);
    if let Err(e) = &result {
        notify.failed(e);
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// What woke the daemon's main loop.
enum Event {
    Stop(&'static str),
    Stats,
    Tick,
}

fn serve_attached(
    args: &AttachArgs,
    device_args: &DeviceArgs,
    method: Method,
    why: &str,
    dir: &Path,
    notify: &mut Notify,
) -> Result<()> {
    // Before any thread or buffer exists, so that all of them are locked.
    attach::safety::harden(args.swap)?;
    state::recover_stale();

    let (backend, backend_why) = device_args.resolve_backend();
    info!("backend: {backend_why}");
    info!("attach method: {why}");
    let named = device_args
        .build(backend)?
        .into_iter()
        .next()
        .context("no device was built")?;
    let (built, tiers, copies) = (named.device, named.tiers, named.copies);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("vramdisk-rt")
        .build()
        .context("starting the async runtime")?;
    let signals = Signals::install(&runtime)?;

    // The daemon's shared state: counters on the device, and the control socket that
    // `vramdisk status` asks.
    let stop_daemon = tokio_util::sync::CancellationToken::new();
    let daemon = runtime.block_on(crate::ops::Daemon::start(
        vec![crate::ops::ManagedDevice {
            name: String::new(),
            device: built,
            tiers,
            copies,
            backend: format!("{backend:?}").to_lowercase(),
            plan: Default::default(),
            read_only_view: false,
        }],
        stop_daemon.clone(),
    ))?;
    let export = daemon.exports()[0].clone();
    let device: Arc<dyn crate::engine::BlockDevice> = export.device.clone();
    let size = device.size();

    let opts = AttachOptions {
        mountpoint: dir.join("mnt"),
        threads: args.threads.unwrap_or_else(|| match method {
            // ublk: one queue per CPU, as the block layer maps them.
            Method::Ublk => std::thread::available_parallelism().map_or(1, |n| n.get().min(64)),
            _ => default_threads(),
        }),
        connections: 4,
        busy_poll: Duration::from_micros(args.busy_poll),
        fuse_transport: args.fuse_transport,
        metrics: Some(export.metrics().clone()),
    };
    let mut attachment = match Attachment::attach(method, device.clone(), runtime.handle(), &opts) {
        Ok(a) => a,
        // A method that failed to start may leave threads blocked in the kernel that no
        // teardown could join: say why and end the process now, rather than hang in
        // destructors.
        Err(e) => {
            notify.failed(&e);
            let _ = std::fs::remove_dir_all(dir);
            eprintln!("vramdisk: {e:#}");
            std::process::exit(1);
        }
    };
    let dev_path = attachment.device_path().to_path_buf();

    let (loop_number, mountpoint, image, stats) = match &attachment {
        Attachment::FuseLoop(f) => (
            Some(f.loop_number()),
            Some(f.mountpoint().to_path_buf()),
            Some(f.image().to_path_buf()),
            Some(f.mountpoint().join(attach::fuse_loop::STATS_NAME)),
        ),
        Attachment::KernelNbd(_) | Attachment::Ublk(_) => (None, None, None, None),
    };
    let me = std::process::id();
    let st = state::State {
        pid: me,
        start_time: state::process_start_time(me).unwrap_or(0),
        method: method.name().into(),
        device: dev_path.clone(),
        loop_number,
        mountpoint,
        image,
        stats,
        swap: args.swap,
        size,
        backend: device.describe(),
        pid_file: args.pid_file.clone(),
    };
    let nbd_shutdown = tokio_util::sync::CancellationToken::new();
    let setup = (|| -> Result<()> {
        state::write(dir, &st)?;
        export.set_attach_path(Some(dev_path.display().to_string()));
        export.set_attach_via(Some(attachment.describe()));
        {
            let _in_runtime = runtime.enter();
            daemon.start_control(None)?;
        }
        if args.swap {
            attach::mkswap(&dev_path)?;
            attach::swapon(&dev_path)?;
            info!("swap on {}", dev_path.display());
        }
        if let Some(p) = &args.pid_file {
            std::fs::write(p, format!("{me}\n"))
                .with_context(|| format!("writing pid file {}", p.display()))?;
        }
        if !args.listen.is_empty() || !args.socket.is_empty() {
            let urls = start_nbd(args, &runtime, &export, nbd_shutdown.clone())?;
            daemon.set_listen(urls);
        }
        Ok(())
    })();
    if let Err(e) = setup {
        nbd_shutdown.cancel();
        if args.swap {
            let _ = attach::swapoff(&dev_path);
        }
        let _ = attachment.detach(true, Duration::from_secs(5));
        stop_daemon.cancel();
        let _ = runtime.block_on(daemon.stop());
        return Err(e);
    }

    info!(
        "attached {} ({} on {}, state in {})",
        dev_path.display(),
        format_size(size),
        device.describe(),
        dir.display()
    );
    if let Some(rss) = attach::safety::resident_bytes() {
        info!("daemon memory: {} resident (locked)", format_size(rss));
    }

    notify.ready(&dev_path)?;
    daemon.ready();

    let result = main_loop(args, &runtime, signals, &mut attachment, &device, &st, dir);
    nbd_shutdown.cancel();
    stop_daemon.cancel();
    if let Err(e) = runtime.block_on(daemon.stop()) {
        warn!("{e:#}");
    }
    if let Some(p) = &args.pid_file {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::remove_dir_all(dir);
    // FUSE threads may still be parked on a connection the kernel keeps for a forced
    // detach; the runtime must not wait for anything.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Serves the device over NBD too, through the NBD server's interface, counted on the
/// same export; returns the addresses for status.
fn start_nbd(
    args: &AttachArgs,
    runtime: &tokio::runtime::Runtime,
    export: &crate::ops::ExportState,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<Vec<String>> {
    use crate::nbd::export::{ConnectionLimits, Export, Limits};
    use crate::nbd::server::Listener;
    let mut urls = Vec::new();
    let listeners = runtime.block_on(async {
        let mut ls = Vec::new();
        for addr in &args.listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            urls.push(format!("nbd://{}", l.local_addr()?));
            ls.push(Listener::Tcp(l));
        }
        for path in &args.socket {
            ls.push(Listener::bind_unix(path)?);
            urls.push(format!("nbd+unix:///?socket={}", path.display()));
        }
        Ok::<_, anyhow::Error>(ls)
    })?;
    let device: Arc<dyn crate::engine::BlockDevice> = export.device.clone();
    let export = Export {
        name: String::new(),
        description: format!(
            "vramdisk {} on {}",
            format_size(device.size()),
            device.describe()
        ),
        device,
        metrics: Some(export.metrics().clone()),
    };
    let limits = Limits {
        max_connections: 64,
        handshake_timeout: Duration::from_secs(30),
        max_per_client: 64,
        // One client may hold half the device's buffers, as `serve` allows by default.
        client_inflight_bytes: usize::try_from(args.device.buffer_memory / 2).unwrap_or(usize::MAX),
        tls: None,
        connection: ConnectionLimits {
            inflight_bytes: 128 << 20,
            busy_poll: Duration::from_micros(args.busy_poll),
            max_request: crate::nbd::export::DEFAULT_MAX_REQUEST,
        },
    };
    runtime.spawn(async move {
        if let Err(e) = server::serve(vec![export], listeners, limits, shutdown).await {
            error!("NBD server stopped: {e:#}");
        }
    });
    for u in &urls {
        info!("also serving NBD on {u}");
    }
    Ok(urls)
}

/// The signals the daemon acts on.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers. Done before the device path is printed: a SIGTERM (a
    /// `vramdisk detach`) that arrives right after it must detach, not kill the daemon with
    /// the device still attached. Signals that arrive before the main loop wait for it.
    fn install(runtime: &tokio::runtime::Runtime) -> Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        let _g = runtime.enter();
        // SIGHUP (the terminal went away) is a polite stop too: dying on it would turn
        // every later I/O on the device into an error.
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
            hup: signal(SignalKind::hangup()).context("installing a SIGHUP handler")?,
            usr1: signal(SignalKind::user_defined1()).context("installing a SIGUSR1 handler")?,
        })
    }
}

fn main_loop(
    args: &AttachArgs,
    runtime: &tokio::runtime::Runtime,
    signals: Signals,
    attachment: &mut Attachment,
    device: &Arc<dyn crate::engine::BlockDevice>,
    st: &state::State,
    dir: &Path,
) -> Result<()> {
    let Signals {
        mut int,
        mut term,
        mut hup,
        mut usr1,
    } = signals;
    loop {
        let event = runtime.block_on(async {
            tokio::select! {
                _ = int.recv() => Event::Stop("SIGINT"),
                _ = term.recv() => Event::Stop("SIGTERM"),
                _ = hup.recv() => Event::Stop("SIGHUP"),
                _ = usr1.recv() => Event::Stats,
                _ = tokio::time::sleep(Duration::from_secs(1)) => Event::Tick,
            }
        });
        match event {
            Event::Stats => {
                let s = device.stats();
                info!(
                    "stats: {} allocated in {} chunks of {} device",
                    format_size(s.allocated),
                    s.chunks,
                    format_size(s.size)
                );
            }
            Event::Tick => {
                if !attachment.is_intact() {
                    warn!(
                        "{} was detached by someone else: shutting down",
                        st.device.display()
                    );
                    if args.swap {
                        let _ = attach::swapoff(&st.device);
                    }
                    attachment.detach(true, Duration::from_secs(2))?;
                    return Ok(());
                }
            }
            Event::Stop(sig) => {
                let force = dir.join(state::FORCE_FILE).exists();
                match teardown(args, attachment, st, force) {
                    Ok(()) => {
                        info!("{sig}: detached {}", st.device.display());
                        return Ok(());
                    }
                    Err(e) => {
                        let why = format!("{e:#}");
                        warn!("{sig}: not detaching: {why}");
                        let _ = std::fs::write(dir.join(state::REFUSED_FILE), why + "\n");
                    }
                }
            }
        }
    }
}

/// Swapoff (if ours), then detach; refuses, leaving everything working, while the device is
/// in use, unless forced.
fn teardown(
    args: &AttachArgs,
    attachment: &mut Attachment,
    st: &state::State,
    force: bool,
) -> Result<()> {
    let users = usage::users(&st.device);
    if !force && !users.is_idle(args.swap) {
        bail!(
            "{} is {}: stop using it first, or run 'vramdisk detach --force {}'",
            st.device.display(),
            users.describe(args.swap),
            st.device.display()
        );
    }
    let mut swapped_off = false;
    if users.swap && (args.swap || force) {
        match attach::swapoff(&st.device) {
            Ok(()) => swapped_off = true,
            Err(e) if force => warn!("{e:#}; detaching anyway (--force)"),
            Err(e) => return Err(e),
        }
    }
    if let Err(e) = attachment.detach(force, Duration::from_secs(5)) {
        if swapped_off {
            // Put things back as they were: the device is still attached.
            let _ = attach::swapon(&st.device);
        }
        return Err(e);
    }
    Ok(())
}

/// Runs `vramdisk detach`.
pub fn detach(args: DetachArgs) -> Result<()> {
    let (dir, st) = state::find(&args.device)?;
    let timeout = Duration::from_secs(args.timeout.max(1));
    if st.daemon_alive() {
        if !args.force {
            let users = usage::users(&st.device);
            if !users.is_idle(st.swap) {
                bail!(
                    "{} is {}: stop using it first (umount, swapoff), or use --force \
                     (its users then get I/O errors)",
                    st.device.display(),
                    users.describe(st.swap)
                );
            }
        }
        let refused = dir.join(state::REFUSED_FILE);
        let _ = std::fs::remove_file(&refused);
        if args.force {
            std::fs::write(dir.join(state::FORCE_FILE), b"")
                .with_context(|| format!("writing {}", dir.join(state::FORCE_FILE).display()))?;
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(st.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .with_context(|| format!("signalling the daemon (pid {})", st.pid))?;
        let start = Instant::now();
        while st.daemon_alive() {
            if let Ok(why) = std::fs::read_to_string(&refused) {
                bail!("the daemon (pid {}) did not detach: {}", st.pid, why.trim());
            }
            if start.elapsed() > timeout {
                bail!(
                    "the daemon (pid {}) did not finish within {}s; its log is {}",
                    st.pid,
                    timeout.as_secs(),
                    dir.join(state::LOG_FILE).display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // A daemon killed halfway through its teardown leaves the rest to us.
        if dir.exists() {
            state::recover(&dir, &st, args.force)?;
        }
    } else {
        info!(
            "the daemon of {} (pid {}) is gone: cleaning up after it",
            st.device.display(),
            st.pid
        );
        state::recover(&dir, &st, args.force)?;
    }
    if let (Some(n), Some(image)) = (st.loop_number, &st.image)
        && attach::loop_dev::backing_file(n).as_deref() == Some(image.as_path())
    {
        warn!(
            "{} is still open by someone: it detaches itself when they close it",
            st.device.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// daemonize's check sees a second thread while it runs.
    #[test]
    fn thread_count_sees_other_threads() {
        let (started, wait_started) = std::sync::mpsc::channel();
        let (stop, wait_stop) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            started.send(()).unwrap();
            let _ = wait_stop.recv();
        });
        wait_started.recv().unwrap();
        assert!(super::thread_count().unwrap() >= 2);
        drop(stop);
        t.join().unwrap();
    }
}
