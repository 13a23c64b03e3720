//! Harness shared by the end-to-end tests: starts a real `vramdisk serve` (or, to validate the
//! tests themselves, `nbdkit memory`), finds free ports, runs real NBD clients with timeouts,
//! and skips loudly when a client program is not installed.
//!
//! Environment:
//! - `VRAMDISK_BIN`: the binary under test (default: the one cargo built).
//! - `VRAMDISK_REQUIRE_CLIENTS=1`: a missing client program fails the test instead of
//!   skipping it (CI sets this).
//! - `VRAMDISK_TEST_SERVER=nbdkit`: serve with `nbdkit memory` instead of vramdisk. This only
//!   checks that the tests are right about the protocol; checks of vramdisk-only behaviour
//!   (memory cap, CLI, per-export sizes) are skipped or narrowed, and say so.
//! - `VRAMDISK_TEST_PYTHON`: a python3 that can `import nbd` (default: the first of `python3`
//!   on PATH and `/usr/bin/python3` that can).

#![allow(dead_code)]

use std::borrow::BorrowMut;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// NBD request magic (proto.md, "Request message").
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// NBD simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// A compact (not extended) NBD request header without flags, for raw-socket clients.
pub fn request_header(ty: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[6..8].copy_from_slice(&ty.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// How long any one client command may run before the test fails as hung: 180 s, or
/// `VRAMDISK_TEST_TIMEOUT` seconds.
pub fn client_timeout() -> Duration {
    let secs = std::env::var("VRAMDISK_TEST_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(180);
    Duration::from_secs(secs)
}

/// How a client reaches the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP on 127.0.0.1.
    Tcp,
    /// A Unix socket in the test's temporary directory.
    Unix,
}

/// Which program serves the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    /// The binary under test.
    Vramdisk,
    /// `nbdkit memory`, a stand-in used only to check the tests themselves.
    Nbdkit,
}

/// The server the tests run against, from `VRAMDISK_TEST_SERVER`.
pub fn server_kind() -> ServerKind {
    match std::env::var("VRAMDISK_TEST_SERVER").as_deref() {
        Ok("nbdkit") => ServerKind::Nbdkit,
        Ok("") | Ok("vramdisk") | Err(_) => ServerKind::Vramdisk,
        Ok(other) => panic!("VRAMDISK_TEST_SERVER={other}: use vramdisk or nbdkit"),
    }
}

/// True when the stand-in serves: the caller skips a vramdisk-only check and says so.
pub fn standin_skips(what: &str) -> bool {
    if server_kind() == ServerKind::Nbdkit {
        skip_loudly(&format!(
            "under VRAMDISK_TEST_SERVER=nbdkit: {what} (vramdisk-only behaviour)"
        ));
        true
    } else {
        false
    }
}

#[path = "../../src/test_support.rs"]
mod test_support;
pub use test_support::*;

/// The vramdisk binary under test.
pub fn vramdisk_bin() -> PathBuf {
    match std::env::var_os("VRAMDISK_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_vramdisk")),
    }
}

/// Whether `VRAMDISK_REQUIRE_CLIENTS=1` makes a missing client a failure rather than a skip.
pub fn clients_required() -> bool {
    std::env::var("VRAMDISK_REQUIRE_CLIENTS").is_ok_and(|v| v == "1")
}

/// Whether every named client is installed. A missing one is reported loudly on stderr and
/// the caller returns (skip), unless `VRAMDISK_REQUIRE_CLIENTS=1`, where it fails the test.
///
/// Names are programs on PATH, plus `python3-libnbd` (a python3 with the `nbd` module) and
/// `fio-nbd` (fio built with its nbd engine).
pub fn clients_available(tools: &[&str]) -> bool {
    let mut tools: Vec<&str> = tools.to_vec();
    if server_kind() == ServerKind::Nbdkit {
        tools.push("nbdkit");
    }
    for tool in tools {
        let present = match tool {
            "python3-libnbd" => python().is_some(),
            "fio-nbd" => {
                on_path("fio")
                    && Command::new("fio")
                        .arg("--enghelp=nbd")
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success())
            }
            name => on_path(name),
        };
        if !present {
            if clients_required() {
                panic!("{tool} is not installed, and VRAMDISK_REQUIRE_CLIENTS=1 requires it");
            }
            skip_loudly(&format!(
                "{tool} not installed (set VRAMDISK_REQUIRE_CLIENTS=1 to fail instead)"
            ));
            return false;
        }
    }
    true
}

/// Returns from the calling test (skipping it loudly) unless every named client is installed.
#[allow(unused_macros)]
macro_rules! require_clients {
    ($($tool:expr),+ $(,)?) => {
        if !$crate::common::clients_available(&[$($tool),+]) {
            return;
        }
    };
}

/// Generates one `#[test]` per transport calling `body(Transport)`.
#[allow(unused_macros)]
macro_rules! over_both_transports {
    ($($name:ident => $body:ident;)+) => {
        $(
            mod $name {
                #[test]
                fn tcp() {
                    super::$body($crate::common::Transport::Tcp)
                }
                #[test]
                fn unix() {
                    super::$body($crate::common::Transport::Unix)
                }
            }
        )+
    };
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            let p = dir.join(name);
            std::fs::metadata(&p).is_ok_and(|m| m.is_file())
        })
    })
}

/// A python3 interpreter that can `import nbd` (python3-libnbd), if there is one.
///
/// `python3` on PATH is tried first, then the system one, because a version manager's python
/// (pyenv) shadows the distribution's and does not see its packages.
pub fn python() -> Option<&'static Path> {
    static PYTHON: OnceLock<Option<PathBuf>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let mut candidates: Vec<PathBuf> = Vec::new();
            if let Some(p) = std::env::var_os("VRAMDISK_TEST_PYTHON") {
                candidates.push(p.into());
            }
            candidates.push("python3".into());
            candidates.push("/usr/bin/python3".into());
            candidates.into_iter().find(|p| {
                Command::new(p)
                    .args(["-c", "import nbd"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
        })
        .as_deref()
}

/// Path of a helper script in tests/scripts.
pub fn script(name: &str) -> PathBuf {
    source_dir().join("tests/scripts").join(name)
}

/// A `python3 -u tests/scripts/nbd_checks.py SUBCOMMAND ARGS...` command.
pub fn nbd_checks(args: &[&str]) -> Command {
    let python = python().expect("python3-libnbd: call require_clients! first");
    let mut cmd = Command::new(python);
    cmd.arg("-u").arg(script("nbd_checks.py")).args(args);
    cmd
}

/// What a finished client printed.
#[derive(Debug)]
pub struct Captured {
    /// The command line, for messages.
    pub command: String,
    /// How it exited.
    pub status: ExitStatus,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl Captured {
    /// Fails the test with everything the client printed unless it exited with status 0.
    pub fn assert_success(&self) -> &Self {
        assert!(
            self.status.success(),
            "`{}` failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            self.command,
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// The exit code; fails the test if the client died by a signal.
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or_else(|| {
            panic!(
                "`{}` died by {:?}:\n{}\n{}",
                self.command,
                self.status.signal(),
                self.stdout,
                self.stderr
            )
        })
    }

    /// Stdout and stderr together, for searching.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// The error lines on stderr: vramdisk's own (`vramdisk: ...`) and clap's (`error: ...`),
    /// leaving out log lines and clap's hints.
    pub fn error_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("vramdisk: ") || l.starts_with("error: "))
            .collect()
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a client to completion, capturing its output; fails the test if it runs longer
/// than `timeout` (it is killed then) or cannot be started.
pub fn run_with_timeout(mut cmd: impl BorrowMut<Command>, timeout: Duration) -> Captured {
    let cmd = cmd.borrow_mut();
    let command = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a client") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = String::from_utf8_lossy(&out_reader.join().unwrap()).into_owned();
            let stderr = String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned();
            panic!(
                "`{command}` did not finish within {timeout:?} (killed):\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned();
    Captured {
        command,
        status,
        stdout,
        stderr,
    }
}

/// Runs a client with the default timeout.
pub fn run(cmd: impl BorrowMut<Command>) -> Captured {
    run_with_timeout(cmd, client_timeout())
}

/// Runs a client and fails the test unless it exits with status 0.
pub fn run_ok(cmd: impl BorrowMut<Command>) -> Captured {
    let c = run(cmd);
    c.assert_success();
    c
}

/// A client left running while the test does other things; killed when dropped.
pub struct Background {
    child: Child,
    command: String,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Background {
    /// Starts `cmd` with its stdout read line by line (stderr goes to the test's).
    pub fn spawn(mut cmd: impl BorrowMut<Command>) -> Background {
        let cmd = cmd.borrow_mut();
        let command = describe(cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Background {
            child,
            command,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits until the client prints a line starting with `prefix`; fails the test if it
    /// exits or stays silent for the client timeout first. Returns the line.
    pub fn wait_for_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + client_timeout();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.starts_with(prefix);
                    self.seen.push(line.clone());
                    if found {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "`{}` did not print '{prefix}' (exit: {:?}); it printed: {:?}",
                    self.command,
                    self.child.try_wait().ok().flatten(),
                    self.seen
                ),
            }
        }
    }

    /// How it exited, if it has.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("checking on a client")
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every line printed so far, after waiting briefly for the rest.
    pub fn output(&mut self) -> Vec<String> {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(line);
        }
        self.seen.clone()
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        let _ = self.child.kill();
        self.child.wait().expect("reaping a client")
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a test server is started with; mirrors `vramdisk serve`'s options.
#[derive(Clone, Debug, Default)]
pub struct ServerConfig {
    /// `--size`: the default export's size.
    pub size: Option<u64>,
    /// `--export NAME=SIZE`, in order.
    pub exports: Vec<(String, u64)>,
    /// `--max-memory`.
    pub max_memory: Option<u64>,
    /// `--chunk-size`.
    pub chunk_size: Option<u64>,
    /// `--read-only`.
    pub read_only: bool,
    /// Further vramdisk arguments, verbatim.
    pub extra_args: Vec<String>,
    /// `--metrics` on a free port of 127.0.0.1, read through [`Server::metric`] (vramdisk
    /// only: the nbdkit stand-in has no metrics).
    pub metrics: bool,
}

impl ServerConfig {
    /// A server with one default export of `size` bytes.
    pub fn sized(size: u64) -> Self {
        ServerConfig {
            size: Some(size),
            ..Default::default()
        }
    }

    /// Adds a named export.
    pub fn export(mut self, name: &str, size: u64) -> Self {
        self.exports.push((name.to_string(), size));
        self
    }

    /// Caps the memory the device may take.
    pub fn max_memory(mut self, bytes: u64) -> Self {
        self.max_memory = Some(bytes);
        self
    }

    /// Sets the allocation unit.
    pub fn chunk_size(mut self, bytes: u64) -> Self {
        self.chunk_size = Some(bytes);
        self
    }

    /// Serves read-only.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Serves Prometheus metrics, for tests that wait on the server's counters.
    pub fn with_metrics(mut self) -> Self {
        self.metrics = true;
        self
    }

    /// The size a client sees for `name` ("" is the default export).
    fn size_of(&self, name: &str) -> Option<u64> {
        if name.is_empty() {
            return self.size.or_else(|| self.exports.first().map(|e| e.1));
        }
        self.exports.iter().find(|e| e.0 == name).map(|e| e.1)
    }
}

/// Where a running server listens.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// 127.0.0.1:port.
    Tcp(u16),
    /// A Unix socket path.
    Unix(PathBuf),
}

/// A connected socket of either kind.
pub trait RawStream: Read + std::io::Write + Send + std::os::fd::AsRawFd {
    /// Bytes the kernel holds for this end to read now (`FIONREAD`).
    fn unread(&self) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        let rc = unsafe { libc::ioctl(self.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
        n.max(0) as usize
    }
}
impl<T: Read + std::io::Write + Send + std::os::fd::AsRawFd> RawStream for T {}

/// A running NBD server, killed (and checked not to have crashed) when dropped.
pub struct Server {
    child: Option<Child>,
    kind: ServerKind,
    endpoint: Endpoint,
    metrics: Option<SocketAddr>,
    config: ServerConfig,
    log: PathBuf,
    dir: tempfile::TempDir,
}

/// A port nobody listens on right now. Another process may take it before the server binds
/// it; [`Server::start`] retries with a new port when that happens.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 to find a free port")
}

fn server_command(
    kind: ServerKind,
    c: &ServerConfig,
    endpoint: &Endpoint,
    metrics: Option<SocketAddr>,
) -> Command {
    match kind {
        ServerKind::Vramdisk => {
            let mut cmd = Command::new(vramdisk_bin());
            // Plain log lines, readable in a failed test's output.
            cmd.env("NO_COLOR", "1");
            // Where the GPU tests are switched on (the GPU machine's runner), every
            // end-to-end test also runs against GPU memory.
            let gpu = std::env::var("VRAMDISK_TEST_GPU").as_deref() == Ok("1");
            cmd.arg("serve");
            // A test that names its own backend (the fake GPU of the tier tests) keeps it.
            if !c.extra_args.iter().any(|a| a == "--backend") {
                cmd.args(["--backend", if gpu { "cuda" } else { "host" }]);
            }
            if let Some(s) = c.size {
                cmd.args(["--size", &s.to_string()]);
            }
            for (name, size) in &c.exports {
                cmd.arg("--export").arg(format!("{name}={size}"));
            }
            if let Some(m) = c.max_memory {
                cmd.args(["--max-memory", &m.to_string()]);
            }
            if let Some(s) = c.chunk_size {
                cmd.args(["--chunk-size", &s.to_string()]);
            }
            if c.read_only {
                cmd.arg("--read-only");
            }
            match endpoint {
                Endpoint::Tcp(port) => cmd.arg("--listen").arg(format!("127.0.0.1:{port}")),
                Endpoint::Unix(path) => cmd.arg("--socket").arg(path),
            };
            if let Some(addr) = metrics {
                cmd.arg("--metrics").arg(addr.to_string());
            }
            cmd.args(&c.extra_args);
            cmd
        }
        ServerKind::Nbdkit => {
            // nbdkit serves one memory disk under every name, so named exports all get the
            // default export's size; tests read sizes through Server::export_size.
            assert!(
                c.max_memory.is_none() && c.extra_args.is_empty(),
                "nbdkit has no equivalent of these options: skip this test under the stand-in"
            );
            let mut cmd = Command::new("nbdkit");
            cmd.args(["-f", "--exit-with-parent"]);
            if c.read_only {
                cmd.arg("-r");
            }
            match endpoint {
                Endpoint::Tcp(port) => cmd.args(["-i", "127.0.0.1", "-p"]).arg(port.to_string()),
                Endpoint::Unix(path) => cmd.arg("-U").arg(path),
            };
            if !c.exports.is_empty() {
                cmd.arg("--filter=exportname");
            }
            // vramdisk advertises its block sizes; make the stand-in do the same.
            cmd.arg("--filter=blocksize-policy");
            let size = c.size_of("").expect("the test server needs a size");
            cmd.arg("memory").arg(format!("size={size}"));
            if !c.exports.is_empty() {
                cmd.args([
                    "exportname-strict=true",
                    "exportname-list=explicit",
                    "exportname=",
                ]);
                for (name, _) in &c.exports {
                    cmd.arg(format!("exportname={name}"));
                }
            }
            cmd.args([
                "blocksize-minimum=1",
                "blocksize-preferred=4096",
                "blocksize-maximum=33554432",
            ]);
            cmd
        }
    }
}

fn accepts_connections(kind: ServerKind, endpoint: &Endpoint, log: &Path) -> bool {
    match endpoint {
        Endpoint::Tcp(port) => {
            // vramdisk logs this line once every listener is bound; waiting for it rules out
            // connecting to another process that took the port first.
            if kind == ServerKind::Vramdisk
                && !std::fs::read_to_string(log)
                    .unwrap_or_default()
                    .contains(&format!("listening on nbd://127.0.0.1:{port}"))
            {
                return false;
            }
            let addr = SocketAddr::from(([127, 0, 0, 1], *port));
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        }
        Endpoint::Unix(path) => UnixStream::connect(path).is_ok(),
    }
}

/// Starts the server process and waits until it listens; on failure, kills it and returns
/// a message with its log.
fn spawn_and_wait(
    mut cmd: Command,
    kind: ServerKind,
    endpoint: &Endpoint,
    log: &Path,
) -> Result<Child, String> {
    let command = describe(&cmd);
    let log_file = std::fs::File::create(log).expect("creating the server log");
    cmd.stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("duplicating the log file"))
        .stderr(log_file);
    // The server must not outlive a test process that dies without running Drop.
    // SAFETY: prctl is async-signal-safe and changes only the child's own state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
    let read_log = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("checking on the server") {
            return Err(format!(
                "`{command}` exited with {status} before listening:\n{}",
                read_log()
            ));
        }
        if accepts_connections(kind, endpoint, log) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "`{command}` did not listen within 30 s:\n{}",
                read_log()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Server {
    /// Starts a server with `config` on `transport` and waits until it accepts connections.
    pub fn start(config: ServerConfig, transport: Transport) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("vramdisk-test")
            .tempdir()
            .expect("creating a temporary directory");
        let log = dir.path().join("server.log");
        let kind = server_kind();
        let mut failure = String::new();
        for _attempt in 0..5 {
            let endpoint = match transport {
                Transport::Tcp => Endpoint::Tcp(free_port()),
                Transport::Unix => Endpoint::Unix(dir.path().join("nbd.sock")),
            };
            let metrics = (config.metrics && kind == ServerKind::Vramdisk)
                .then(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
            let cmd = server_command(kind, &config, &endpoint, metrics);
            match spawn_and_wait(cmd, kind, &endpoint, &log) {
                Ok(child) => {
                    return Server {
                        child: Some(child),
                        kind,
                        endpoint,
                        metrics,
                        config,
                        log,
                        dir,
                    };
                }
                Err(message) => {
                    // Only a port taken between free_port() and the bind is worth a retry.
                    let retry = matches!(endpoint, Endpoint::Tcp(_)) && message.contains("in use");
                    failure = message;
                    if !retry {
                        break;
                    }
                }
            }
        }
        panic!("the server did not start: {failure}");
    }

    /// A plain byte stream to the server, for tests that speak NBD by hand; reads and writes
    /// time out after 10 s.
    pub fn connect_raw(&self) -> Box<dyn RawStream> {
        let timeout = Some(Duration::from_secs(10));
        match &self.endpoint {
            Endpoint::Tcp(port) => {
                let s = TcpStream::connect(("127.0.0.1", *port)).expect("connecting over TCP");
                s.set_read_timeout(timeout).unwrap();
                s.set_write_timeout(timeout).unwrap();
                Box::new(s)
            }
            Endpoint::Unix(path) => {
                let s = UnixStream::connect(path).expect("connecting to the Unix socket");
                s.set_read_timeout(timeout).unwrap();
                s.set_write_timeout(timeout).unwrap();
                Box::new(s)
            }
        }
    }

    /// What the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Which program serves.
    pub fn kind(&self) -> ServerKind {
        self.kind
    }

    /// Where it listens.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The metrics endpoint's whole text (`GET /metrics`). The endpoint starts just after
    /// the NBD listeners, so a refused connection is retried for a while.
    pub fn metrics_text(&self) -> String {
        let addr = self
            .metrics
            .expect("metric(): start the server with ServerConfig::with_metrics (vramdisk only)");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("the metrics endpoint {addr} refused for 10 s: {e}"),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        use std::io::Write;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .expect("asking for metrics");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("reading the metrics");
        text
    }

    /// The sum of every series of the metric `name` (each export's, each label's), e.g.
    /// `vramdisk_connections`: clients in the transmission phase now.
    pub fn metric(&self, name: &str) -> u64 {
        let text = self.metrics_text();
        let mut found = false;
        let mut sum = 0u64;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            if !(rest.starts_with(' ') || rest.starts_with('{')) {
                continue;
            }
            let value = rest.rsplit(' ').next().unwrap_or_default();
            let v: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("metric line '{line}' has no number"));
            sum += v as u64;
            found = true;
        }
        assert!(found, "no {name} among the metrics:\n{text}");
        sum
    }

    /// Waits (up to the client timeout) until the metric `name` satisfies `ok`; returns its
    /// value then, or fails the test saying `what` did not happen.
    pub fn wait_for_metric(&self, name: &str, what: &str, ok: impl Fn(u64) -> bool) -> u64 {
        let deadline = Instant::now() + client_timeout();
        loop {
            let v = self.metric(name);
            if ok(v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what} within {:?} ({name} is {v}); server log:\n{}",
                client_timeout(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A directory for the test's own files, removed with the server.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    /// NBD URI of the default export.
    pub fn uri(&self) -> String {
        self.export_uri("")
    }

    /// NBD URI of the export `name`.
    pub fn export_uri(&self, name: &str) -> String {
        match &self.endpoint {
            Endpoint::Tcp(port) => format!("nbd://127.0.0.1:{port}/{name}"),
            Endpoint::Unix(path) => format!("nbd+unix:///{name}?socket={}", path.display()),
        }
    }

    /// The size the server was told to give export `name` ("" for the default). Under the
    /// nbdkit stand-in every export has the default export's size.
    pub fn export_size(&self, name: &str) -> u64 {
        let size = match self.kind {
            ServerKind::Vramdisk => self.config.size_of(name),
            ServerKind::Nbdkit => self.config.size_of(""),
        };
        size.unwrap_or_else(|| panic!("the test server has no export '{name}'"))
    }

    /// Size of the default export.
    pub fn size(&self) -> u64 {
        self.export_size("")
    }

    /// Fails the test (with the server's log) if the server has exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("server was stopped already");
        if let Some(status) = child.try_wait().expect("checking on the server") {
            self.child = None;
            panic!(
                "the server exited unexpectedly with {status}:\n{}",
                self.log()
            );
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit; returns the exit status, or
    /// None if it was still running (it is then killed).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.assert_running();
        let mut child = self.child.take().unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("sending SIGTERM");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let early_exit = child.try_wait().ok().flatten();
        let _ = child.kill();
        let status = child.wait().ok();
        if std::thread::panicking() {
            eprintln!("--- server log\n{}", self.log());
            return;
        }
        if let Some(status) = early_exit {
            panic!(
                "the server crashed or exited during the test ({status}):\n{}",
                self.log()
            );
        }
        assert_eq!(
            status.and_then(|s| s.signal()),
            Some(libc::SIGKILL),
            "the server did not die by the SIGKILL sent at the end of the test:\n{}",
            self.log()
        );
        // A panic in one connection's task leaves the process running; its log shows it.
        let log = self.log();
        assert!(
            !log.contains("panicked at"),
            "the server panicked during the test:\n{log}"
        );
    }
}

/// `len` random bytes.
pub fn random_bytes(len: usize) -> Vec<u8> {
    use rand::Rng;
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    v
}

/// Fails the test at the first differing byte of `a` and `b`.
pub fn assert_same_bytes(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!(
            "{what}: first difference at byte {i}: {:#04x} vs {:#04x}",
            a[i], b[i]
        );
    }
}
