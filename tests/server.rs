//! The server process itself: clean exit on SIGTERM (idle, with clients connected, under
//! load), command-line mistakes, serving TCP and a Unix socket at once.

#[macro_use]
mod common;

use common::{
    Background, MIB, Server, ServerConfig, ServerKind, Transport, nbd_checks, run_ok,
    run_with_timeout, vramdisk_bin,
};
use std::io::Read;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

/// How long a server may take to exit after SIGTERM.
const STOP_WITHIN: Duration = Duration::from_secs(5);

fn assert_clean_exit(srv: &mut Server) {
    let started = Instant::now();
    let status = srv.terminate(STOP_WITHIN);
    let log = srv.log();
    let status =
        status.unwrap_or_else(|| panic!("still running {STOP_WITHIN:?} after SIGTERM:\n{log}"));
    assert!(
        status.success(),
        "exit after SIGTERM was {status}, not 0:\n{log}"
    );
    eprintln!("exited 0 {:?} after SIGTERM", started.elapsed());
    assert!(
        !log.contains("panicked"),
        "the server panicked while stopping:\n{log}"
    );
}

fn sigterm_idle(transport: Transport) {
    let mut srv = Server::start(ServerConfig::sized(64 * MIB), transport);
    let socket = match srv.endpoint() {
        common::Endpoint::Unix(p) => Some(p.clone()),
        common::Endpoint::Tcp(_) => None,
    };
    assert_clean_exit(&mut srv);
    if let Some(path) = socket
        && srv.kind() == ServerKind::Vramdisk
    {
        assert!(
            !path.exists(),
            "the Unix socket {} is left behind",
            path.display()
        );
    }
}

/// SIGTERM with a negotiated, idle client and a connection stuck in the handshake: the
/// server must not wait for clients to leave, and the client must see the connection end.
fn sigterm_with_clients(transport: Transport) {
    require_clients!("python3-libnbd");
    if common::standin_skips("exit on SIGTERM while clients stay connected (nbdkit waits)") {
        return;
    }
    let mut srv = Server::start(ServerConfig::sized(64 * MIB), transport);
    let mut client = Background::spawn(nbd_checks(&["hold", &srv.uri(), "--seconds", "60"]));
    client.wait_for_line("CONNECTED");
    let _half_open = srv.connect_raw();
    assert_clean_exit(&mut srv);
    let line = client.wait_for_line("DISCONNECTED");
    eprintln!("the idle client saw: {line}");
}

/// SIGTERM while a client keeps 32 writes in flight.
fn sigterm_under_load(transport: Transport) {
    require_clients!("python3-libnbd");
    if common::standin_skips("exit on SIGTERM while clients stay connected (nbdkit waits)") {
        return;
    }
    let mut srv = Server::start(ServerConfig::sized(256 * MIB), transport);
    let mut flood = Background::spawn(nbd_checks(&["flood", &srv.uri(), "--depth", "32"]));
    flood.wait_for_line("FLOODING");
    std::thread::sleep(Duration::from_millis(200));
    assert_clean_exit(&mut srv);
    let status = flood.wait_timeout(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| !s.success()),
        "the flooding client did not notice the server going away: {status:?}"
    );
}

/// One sentence on stderr naming the mistake, a non-zero exit, no panic, and quickly.
fn assert_cli_error(args: &[&str], phrase: &str) {
    let mut cmd = Command::new(vramdisk_bin());
    cmd.env("NO_COLOR", "1").arg("serve").args(args);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(20));
    let code = out.code();
    assert_ne!(code, 0, "vramdisk serve {args:?} succeeded:\n{}", out.all());
    assert!(
        !out.stderr.contains("panicked") && !out.stderr.contains("RUST_BACKTRACE"),
        "vramdisk serve {args:?} panicked:\n{}",
        out.stderr
    );
    // Log lines may come first; then exactly one error line (clap may add a line of
    // possible values and a pointer to --help).
    let errors = out.error_lines();
    assert_eq!(
        errors.len(),
        1,
        "vramdisk serve {args:?}: expected one error line:\n{}",
        out.stderr
    );
    let last = errors[0];
    assert!(
        last.contains(phrase),
        "vramdisk serve {args:?}: expected an error line with {phrase:?}, got:\n{}",
        out.stderr
    );
    eprintln!("vramdisk serve {args:?} -> exit {code}: {last}");
}

#[test]
fn cli_mistakes_get_one_plain_sentence() {
    let h = ["--backend", "host"];
    let with =
        |rest: &[&'static str]| -> Vec<&'static str> { h.iter().chain(rest).copied().collect() };
    assert_cli_error(&with(&["--size", "10X"]), "'10X' is not a size");
    assert_cli_error(&with(&[]), "no device size given: add --size");
    assert_cli_error(&with(&["--size", "0"]), "size 0");
    assert_cli_error(
        &with(&["--size", "1G", "--listen", "nonsense"]),
        "is not an address",
    );
    assert_cli_error(
        &with(&["--size", "1G", "--chunk-size", "3M"]),
        "power of two",
    );
    assert_cli_error(&with(&["--export", "scratch"]), "is not an export");
    assert_cli_error(
        &with(&["--export", "a=1G", "--export", "a=2G"]),
        "given twice",
    );
    assert_cli_error(
        &with(&["--size", "1G", "--max-memory", "lots"]),
        "is not a size",
    );
    assert_cli_error(&with(&["--size", "1G", "--gpu", "0"]), "--gpu");
    assert_cli_error(&with(&["--size", "1G", "--busy-poll", "5000"]), "too long");
    assert_cli_error(&["--backend", "floppy", "--size", "1G"], "floppy");
}

#[test]
fn cli_listen_failures_are_reported() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    assert_cli_error(
        &["--backend", "host", "--size", "1G", "--listen", &addr],
        &format!("cannot listen on {addr}"),
    );
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("no-such-dir/nbd.sock");
    assert_cli_error(
        &[
            "--backend",
            "host",
            "--size",
            "1G",
            "--socket",
            sock.to_str().unwrap(),
        ],
        "cannot listen on Unix socket",
    );
}

/// One server on TCP and a Unix socket at once: both serve the same device.
#[test]
fn tcp_and_unix_socket_at_once() {
    require_clients!("qemu-io");
    if common::standin_skips("--listen and --socket together") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("second.sock");
    let mut config = ServerConfig::sized(64 * MIB);
    config.extra_args = vec!["--socket".into(), sock.display().to_string()];
    let mut srv = Server::start(config, Transport::Tcp);
    let unix_uri = format!("nbd+unix:///?socket={}", sock.display());
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never accepted",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &srv.uri(),
        "-c",
        "write -P 0x9c 1000 5000",
    ]));
    assert!(!out.all().contains("failed"), "{}", out.all());
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &unix_uri,
        "-c",
        "read -P 0x9c 1000 5000",
        "-c",
        "write -P 0x9d 0 1000",
    ]));
    assert!(!out.all().contains("failed"), "{}", out.all());
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &srv.uri(),
        "-c",
        "read -P 0x9d 0 1000",
    ]));
    assert!(!out.all().contains("failed"), "{}", out.all());
    srv.assert_running();
    assert_clean_exit(&mut srv);
    assert!(!sock.exists(), "the Unix socket is left behind");
}

/// A client that connects and then says nothing is dropped after --handshake-timeout.
#[test]
fn silent_client_is_dropped_after_handshake_timeout() {
    if common::standin_skips("--handshake-timeout") {
        return;
    }
    let mut config = ServerConfig::sized(64 * MIB);
    config.extra_args = vec!["--handshake-timeout".into(), "1".into()];
    let mut srv = Server::start(config, Transport::Tcp);
    let common::Endpoint::Tcp(port) = *srv.endpoint() else {
        unreachable!()
    };
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    // The greeting arrives, then EOF once the timeout passes.
    let r = s.read_to_end(&mut buf);
    let waited = started.elapsed();
    assert!(
        r.is_ok(),
        "no EOF within 10 s of a 1 s handshake timeout ({r:?}, got {} bytes)",
        buf.len()
    );
    assert!(
        waited >= Duration::from_millis(800),
        "dropped after only {waited:?}"
    );
    assert_eq!(&buf[..8], b"NBDMAGIC", "greeting");
    srv.assert_running();
}

/// The memory cap as qemu-io sees it: ENOSPC past the cap, room again after a discard.
fn max_memory_with_qemu_io(transport: Transport) {
    require_clients!("qemu-io");
    if common::standin_skips("--max-memory") {
        return;
    }
    let config = ServerConfig::sized(64 * MIB)
        .chunk_size(2 * MIB)
        .max_memory(4 * MIB);
    let mut srv = Server::start(config, transport);
    let uri = srv.uri();
    let qemu_io =
        |cmd: &str| common::run(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", cmd])).all();
    let out = qemu_io(&format!("write -P 0x21 0 {}", 4 * MIB));
    assert!(
        out.contains(&format!("wrote {0}/{0} bytes at offset 0", 4 * MIB)),
        "{out}"
    );
    let out = qemu_io(&format!("write -P 0x22 {} 4096", 8 * MIB));
    assert!(
        out.contains("write failed: No space left on device"),
        "{out}"
    );
    srv.assert_running();
    let out = qemu_io(&format!("discard 0 {}", 2 * MIB));
    assert!(!out.contains("failed"), "{out}");
    let out = qemu_io(&format!("write -P 0x22 {} 4096", 8 * MIB));
    assert!(
        out.contains(&format!("wrote 4096/4096 bytes at offset {}", 8 * MIB)),
        "{out}"
    );
    let out = qemu_io(&format!("read -P 0x21 {0} {0}", 2 * MIB));
    assert!(
        !out.contains("failed"),
        "the data kept under the cap is damaged: {out}"
    );
    srv.assert_running();
}

over_both_transports! {
    max_memory_enospc_seen_by_qemu_io => max_memory_with_qemu_io;
    sigterm_idle_server_exits_zero => sigterm_idle;
    sigterm_with_clients_connected_exits_zero => sigterm_with_clients;
    sigterm_under_load_exits_zero => sigterm_under_load;
}
