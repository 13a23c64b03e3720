//! What a user meets on the command line, through the real binary: errors that name the
//! real cause, addresses and sizes taken as people write them, sockets bound before slow
//! work, help without noise, and a control directory nobody else can take over.

#[macro_use]
mod common;

use common::{run_with_timeout, vramdisk_bin};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A small device in host RAM.
const SERVE_HOST: &[&str] = &["serve", "--backend", "host", "--size", "64M"];

/// `vramdisk ARGS` with logs at their default level, run to completion.
fn vramdisk(args: &[&str]) -> common::Captured {
    let mut cmd = Command::new(vramdisk_bin());
    cmd.env("NO_COLOR", "1").env_remove("RUST_LOG").args(args);
    run_with_timeout(&mut cmd, Duration::from_secs(30))
}

/// The error line of a failed run (`vramdisk: ...`); fails the test if it succeeded or
/// printed other than one.
fn error_line(args: &[&str]) -> String {
    the_error(&vramdisk(args))
}

/// The one error line of a run that must have failed.
fn the_error(out: &common::Captured) -> String {
    assert!(
        !out.status.success(),
        "`{}` succeeded:\n{}",
        out.command,
        out.all()
    );
    let errors = out.error_lines();
    assert_eq!(
        errors.len(),
        1,
        "`{}`: not one error line:\n{}",
        out.command,
        out.stderr
    );
    errors[0].to_string()
}

/// Under `--backend auto` (the default), --gpu and --keep-free say the user wants the GPU:
/// without one, the error is the driver's, once, not advice to use --backend cuda.
#[test]
fn gpu_flags_under_auto_without_a_gpu_name_the_real_cause() {
    if vramdisk::engine::cuda::driver_present() {
        common::loud("SKIPPED: this machine has an NVIDIA driver; the test needs none");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let sock = sock.to_str().unwrap();
    for flag in [["--gpu", "0"], ["--keep-free", "1G"]] {
        let mut args = vec!["serve", "--size", "64M", "--socket", sock];
        args.extend(flag);
        let line = error_line(&args);
        assert!(
            line.contains(vramdisk::engine::cuda::NO_DRIVER),
            "{args:?}: the cause is not named: {line}"
        );
        assert!(
            line.contains(flag[0]) && !line.contains("--backend cuda"),
            "{args:?}: {line}"
        );
        assert!(!dir.path().join("s").exists(), "the socket is left behind");
    }
}

/// `vramdisk serve ARGS` in the background, in its own runtime directory; waits for its
/// READY=1 (every socket listens). Killed on drop.
struct Serving {
    child: std::process::Child,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Serving {
    fn start(args: &[&str]) -> Serving {
        let notify_dir = tempfile::tempdir().unwrap();
        let runtime = tempfile::tempdir().unwrap();
        let notify = notify_dir.path().join("notify");
        let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
        sock.set_read_timeout(Some(common::client_timeout()))
            .unwrap();
        let mut child = Command::new(vramdisk_bin())
            .arg("serve")
            .args(args)
            .env("VRAMDISK_RUNTIME_DIR", runtime.path())
            .env("NOTIFY_SOCKET", &notify)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 4096];
        let ready = sock
            .recv(&mut buf)
            .map(|n| String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
        if ready.as_ref().ok() != Some(&true) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "serve {args:?} did not get ready ({ready:?}):\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Serving {
            child,
            _dirs: (notify_dir, runtime),
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A taken address fails at once, before the devices are built or loaded (here a --load
/// that would fail if it ran first).
#[test]
fn sockets_are_bound_before_devices_are_built_and_loaded() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let mut args = SERVE_HOST.to_vec();
    args.extend(["--listen", &addr, "--load", missing.to_str().unwrap()]);
    let line = error_line(&args);
    assert!(line.contains(&format!("cannot listen on {addr}")), "{line}");
}

/// A bad --metrics is refused before any socket is bound: no socket file is left behind.
#[test]
fn a_bad_metrics_address_leaves_no_socket_behind() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let runtime = dir.path().join("run");
    std::fs::create_dir(&runtime).unwrap();
    let mut cmd = Command::new(vramdisk_bin());
    cmd.env("VRAMDISK_RUNTIME_DIR", &runtime)
        .args(SERVE_HOST)
        .args(["--socket", sock.to_str().unwrap()])
        .args(["--metrics", "127.0.0.1:ninety"]);
    let line = the_error(&run_with_timeout(&mut cmd, Duration::from_secs(30)));
    assert!(
        line.contains("--metrics 127.0.0.1:ninety is not an address"),
        "{line}"
    );
    assert!(!sock.exists(), "{} is left behind", sock.display());
    let left: Vec<_> = std::fs::read_dir(&runtime).unwrap().collect();
    assert!(left.is_empty(), "the runtime directory holds {left:?}");
}

/// Host names work in --listen, and --metrics without a port gets the one --help names.
#[test]
fn host_names_and_default_ports_are_accepted() {
    require_clients!("nbdinfo");
    let port = common::free_port().to_string();
    let listen = format!("localhost:{port}");
    let metrics_free = std::net::TcpListener::bind("127.0.0.1:9100").is_ok();
    let mut args = SERVE_HOST[1..].to_vec();
    args.extend(["--listen", &listen]);
    if metrics_free {
        args.extend(["--metrics", "127.0.0.1"]);
    } else {
        common::loud("127.0.0.1:9100 is taken here: --metrics's default port is not tried");
    }
    let mut srv = Serving::start(&args);
    let out = vramdisk_client_nbdinfo(&format!("nbd://localhost:{port}"));
    assert!(
        out.contains(&(64u64 << 20).to_string()),
        "nbdinfo said:\n{out}"
    );
    if metrics_free {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9100").unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        assert!(
            body.contains("vramdisk_"),
            "not our metrics on 9100:\n{body}"
        );
    }
    let help = vramdisk(&["serve", "--help"]).stdout;
    assert!(
        help.contains("port 9100"),
        "--help does not say the port:\n{help}"
    );
    assert!(srv.child.try_wait().unwrap().is_none(), "the server died");
}

fn vramdisk_client_nbdinfo(uri: &str) -> String {
    let out = run_with_timeout(
        Command::new("nbdinfo").args(["--size", uri]),
        common::client_timeout(),
    );
    out.assert_success();
    out.stdout
}

/// `--size` makes the unnamed export: `--export =SIZE` beside it says so, rather than that
/// the user gave a name twice; sizes in errors read as the user wrote them.
#[test]
fn size_mistakes_are_told_in_the_users_terms() {
    let mistake = |extra: &[&'static str]| error_line(&[SERVE_HOST, extra].concat());
    let line = mistake(&["--export", "=1G"]);
    assert!(line.contains("--size already makes"), "{line}");
    assert!(!line.contains("given twice"), "{line}");
    // Sizes are told back as they were written, not in bytes.
    let line = mistake(&["--chunk-size", "3M"]);
    assert!(
        line.contains("'3M' is not a power of two") && !line.contains("3145728"),
        "{line}"
    );
}

/// `serve --help` does not repeat the top-level examples, says how sizes are read, and no
/// help text carries benchmark claims (they live in docs/tuning.md).
#[test]
fn help_is_about_the_command() {
    let top = vramdisk(&["--help"]).stdout;
    let serve = vramdisk(&["serve", "--help"]).stdout;
    let example = "Serve two named exports from one daemon";
    assert!(
        top.contains(example),
        "the examples left the top-level help:\n{top}"
    );
    assert!(
        !serve.contains(example),
        "serve --help repeats the examples:\n{serve}"
    );
    for help in [&top, &serve] {
        assert!(
            help.contains("1G, 1GB and 1GiB"),
            "sizes are not explained:\n{help}"
        );
    }
    for cmd in [
        "serve", "attach", "bench", "status", "yield", "devices", "save",
    ] {
        let help = vramdisk(&[cmd, "--help"]).stdout;
        for claim in ["x faster", "times faster", "GB/s"] {
            assert!(
                !help.contains(claim),
                "`{cmd} --help` carries a benchmark claim ({claim:?}):\n{help}"
            );
        }
    }
}

/// On a terminal (a pty from `script`), log lines are the level and the message: no
/// timestamps or module paths before the error that matters.
#[test]
fn a_terminal_gets_plain_log_lines() {
    if !common::clients_available(&["script"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let line = format!(
        "'{}' serve --backend host --size 64M --socket '{}' --load '{}'",
        vramdisk_bin().display(),
        dir.path().join("s").display(),
        missing.display()
    );
    let mut cmd = Command::new("script");
    cmd.env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .args(["-qec", &line, "/dev/null"]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30));
    let text = out.all();
    assert!(
        text.contains("vramdisk: export ''"),
        "no error line:\n{text}"
    );
    let logs: Vec<&str> = text.lines().filter(|l| l.contains("INFO")).collect();
    assert!(!logs.is_empty(), "no log line to look at:\n{text}");
    for l in logs {
        let first = l.trim_start_matches(|c: char| !c.is_alphanumeric());
        assert!(
            !first.starts_with(|c: char| c.is_ascii_digit()),
            "timestamp on a terminal: {l:?}"
        );
        assert!(
            !l.contains("vramdisk::"),
            "module path on a terminal: {l:?}"
        );
    }
}

/// An unprivileged uid of this test run alone, for commands run through `setpriv`, and
/// its /tmp fallback runtime directory (removed on drop). None (skip, said loudly) where
/// the test cannot change uid.
struct OtherUser {
    uid: u32,
    dir: std::path::PathBuf,
}

impl OtherUser {
    fn new() -> Option<OtherUser> {
        if !nix::unistd::geteuid().is_root() {
            common::loud("SKIPPED: not root, so the test cannot run commands as another uid");
            return None;
        }
        if !common::clients_available(&["setpriv"]) {
            return None;
        }
        // A uid (so a runtime directory) of its own per test: the tests of this file run in
        // parallel, and one's drop would remove the directory another is checking.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 8;
        let uid = 40000 + (std::process::id() % 2500) * 8 + n;
        let dir = std::path::PathBuf::from(format!("/tmp/vramdisk-{uid}"));
        let _ = std::fs::remove_dir_all(&dir);
        Some(OtherUser { uid, dir })
    }

    /// `vramdisk ARGS` as this user, with no runtime directory in its environment (so the
    /// /tmp fallback is used).
    fn vramdisk(&self, args: &[&str]) -> common::Captured {
        let id = self.uid.to_string();
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid", &id, "--regid", &id, "--clear-groups"])
            .arg(vramdisk_bin())
            .args(args)
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("VRAMDISK_RUNTIME_DIR")
            .env("NO_COLOR", "1")
            .current_dir("/");
        run_with_timeout(&mut cmd, Duration::from_secs(30))
    }
}

impl Drop for OtherUser {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An ordinary user's `status` that finds nothing says where it looked and that root's
/// daemons live elsewhere.
#[test]
fn status_without_daemons_says_where_it_looked() {
    let Some(user) = OtherUser::new() else { return };
    let out = user.vramdisk(&["status"]);
    out.assert_success();
    let dir = user.dir.display().to_string();
    assert!(
        out.stderr.contains(&format!("looked in {dir}")),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("/run/vramdisk") && out.stderr.contains("sudo"),
        "nothing on root's daemons:\n{}",
        out.stderr
    );
}

/// The /tmp fallback runtime directory is made 0700, and one that someone else made, or
/// that others may write to, is refused with the reason.
#[test]
fn the_tmp_runtime_directory_must_be_private() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Some(user) = OtherUser::new() else { return };
    // Fails at --load (a file that is not there), after the sockets (the control socket's
    // directory too) are made.
    let mut serve = SERVE_HOST.to_vec();
    serve.extend(["--listen", "127.0.0.1:0"]);
    let out = user.vramdisk(&[&serve[..], &["--load", "/nonexistent/vramdisk.img"]].concat());
    assert!(
        out.stderr.contains("cannot open /nonexistent"),
        "{}",
        out.stderr
    );
    let meta = std::fs::symlink_metadata(&user.dir).expect("the runtime directory was not made");
    assert_eq!(meta.uid(), user.uid);
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o700,
        "mode of {:?}",
        user.dir
    );

    std::fs::set_permissions(&user.dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = user.vramdisk(&["status"]);
    assert!(
        !out.status.success(),
        "status used a world-writable directory:\n{}",
        out.all()
    );
    assert!(out.stderr.contains("chmod 700"), "{}", out.stderr);

    // Made by someone else (root here), as an attacker would, before the user's first run.
    std::fs::set_permissions(&user.dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    nix::unistd::chown(&user.dir, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
    for args in [&["status"][..], &serve[..]] {
        let line = the_error(&user.vramdisk(args));
        assert!(line.contains("belongs to uid 0"), "{args:?}: {line}");
    }
}

/// The kernel's MemAvailable in bytes.
fn mem_available() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("MemAvailable in /proc/meminfo");
    kib * 1024
}

/// `--preallocate --backend host` beyond the available RAM fails at once with a sentence
/// (instead of meeting the OOM killer later), and a preallocation that fits reports its
/// progress.
#[test]
fn host_preallocation_checks_memory_and_reports_progress() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let too_much = format!("{}G", (mem_available() >> 30) * 2 + 2);
    let mut cmd = Command::new(vramdisk_bin());
    cmd.env("VRAMDISK_RUNTIME_DIR", dir.path()).args([
        "serve",
        "--backend",
        "host",
        "--preallocate",
        "--size",
        &too_much,
        "--socket",
        sock.to_str().unwrap(),
    ]);
    let started = std::time::Instant::now();
    let line = the_error(&run_with_timeout(&mut cmd, Duration::from_secs(60)));
    assert!(
        line.contains("MemAvailable") && line.contains(&too_much),
        "{line}"
    );
    eprintln!("refused in {:?}: {line}", started.elapsed());

    let mut args = SERVE_HOST[1..].to_vec();
    args.extend(["--preallocate", "--socket", sock.to_str().unwrap()]);
    let mut srv = Serving::start(&args);
    let _ = srv.child.kill();
    let mut log = String::new();
    use std::io::Read;
    srv.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.contains("preallocating export '': 64 MiB in"),
        "no progress of the preallocation:\n{log}"
    );
}
