//! Protocol checks through libnbd's Python bindings (tests/scripts/nbd_checks.py): option
//! haggling, block status, structured reads, error replies, flags, many connections, and a
//! client killed with requests in flight.

#[macro_use]
mod common;

use common::{Background, MIB, Server, ServerConfig, ServerKind, Transport, nbd_checks, run_ok};
use std::time::Duration;

/// Allocation unit of the test servers: data is written in whole units so that extents are
/// exact on any server whose granularity divides it.
const CHUNK: u64 = 2 * MIB;

fn server(size: u64, transport: Transport) -> Server {
    Server::start(ServerConfig::sized(size).chunk_size(CHUNK), transport)
}

fn options(transport: Transport) {
    require_clients!("python3-libnbd");
    let config = ServerConfig::default()
        .export("alpha", 64 * MIB)
        .export("beta", 32 * MIB);
    let mut srv = Server::start(config, transport);
    let (alpha, beta) = (srv.export_size("alpha"), srv.export_size("beta"));
    let out = run_ok(nbd_checks(&[
        "options",
        &srv.uri(),
        &srv.export_uri("no-such-export"),
        "--names",
        "alpha",
        "beta",
        "--sizes",
        &alpha.to_string(),
        &beta.to_string(),
    ]));
    println!("{}", out.stdout);
    srv.assert_running();
}

fn block_status(transport: Transport) {
    require_clients!("python3-libnbd");
    let mut srv = server(64 * MIB, transport);
    let out = run_ok(nbd_checks(&[
        "block-status",
        &srv.uri(),
        "--align",
        &CHUNK.to_string(),
    ]));
    println!("{}", out.stdout);
    srv.assert_running();
}

fn structured_read(transport: Transport) {
    require_clients!("python3-libnbd");
    let mut srv = server(64 * MIB, transport);
    let mut args = vec![
        "structured-read".to_string(),
        srv.uri(),
        "--align".into(),
        CHUNK.to_string(),
    ];
    // nbdkit 1.32 never sends hole chunks; vramdisk knows its unallocated chunks and must.
    if srv.kind() == ServerKind::Vramdisk {
        args.push("--expect-holes".into());
    } else {
        eprintln!("note: nbdkit stand-in: not requiring hole chunks in structured reads");
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    println!("{}", run_ok(nbd_checks(&args)).stdout);
    srv.assert_running();
}

fn errors(transport: Transport) {
    require_clients!("python3-libnbd");
    let mut srv = server(64 * MIB, transport);
    println!("{}", run_ok(nbd_checks(&["errors", &srv.uri()])).stdout);
    srv.assert_running();
}

fn read_only(transport: Transport) {
    require_clients!("python3-libnbd");
    let mut srv = Server::start(ServerConfig::sized(64 * MIB).read_only(), transport);
    println!("{}", run_ok(nbd_checks(&["read-only", &srv.uri()])).stdout);
    srv.assert_running();
}

fn flags(transport: Transport) {
    require_clients!("python3-libnbd");
    let mut srv = server(64 * MIB, transport);
    println!("{}", run_ok(nbd_checks(&["flags", &srv.uri()])).stdout);
    srv.assert_running();
}

fn sixty_four_connections(transport: Transport) {
    require_clients!("python3-libnbd");
    let mut srv = server(128 * MIB, transport);
    let out = run_ok(nbd_checks(&[
        "concurrent",
        &srv.uri(),
        "--connections",
        "64",
        "--span",
        &(2 * MIB).to_string(),
    ]));
    println!("{}", out.stdout);
    srv.assert_running();
}

/// Kills a client with many 1 MiB writes in flight, three times over; the server must carry
/// on, and a client connected all along as well as a new one must read and write correctly.
fn client_killed_mid_flight(transport: Transport) {
    require_clients!("python3-libnbd");
    let mut srv = server(256 * MIB, transport);
    let mut bystander = Background::spawn(nbd_checks(&["hold", &srv.uri(), "--seconds", "120"]));
    bystander.wait_for_line("CONNECTED");
    let span = (128 * MIB).to_string();
    for round in 0..3u64 {
        let mut flood = Background::spawn(nbd_checks(&[
            "flood",
            &srv.uri(),
            "--depth",
            "64",
            "--span",
            &span,
        ]));
        flood.wait_for_line("FLOODING");
        // Let it run on so that the kill lands with payloads half received.
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(
            flood.try_wait(),
            None,
            "round {round}: flood ended by itself"
        );
        flood.kill();
        eprintln!("round {round}: killed a client with 64 x 1 MiB writes in flight");
        srv.assert_running();
        // Above the flood's range: writes it had sent may still land after the kill.
        let offset = (128 + round * 40 + 3) * MIB + 777;
        let out = run_ok(nbd_checks(&[
            "write-verify",
            &srv.uri(),
            "--offset",
            &offset.to_string(),
            "--length",
            &(16 * MIB).to_string(),
            "--seed",
            &(round + 11).to_string(),
        ]));
        println!("{}", out.stdout);
    }
    // The bystander exits as soon as one of its reads fails.
    if let Some(status) = bystander.try_wait() {
        panic!(
            "the bystander client lost its connection ({status}): {:?}",
            bystander.output()
        );
    }
    srv.assert_running();
}

fn memory_cap(transport: Transport) {
    require_clients!("python3-libnbd");
    if common::standin_skips("--max-memory") {
        return;
    }
    let cap = 8 * MIB;
    let config = ServerConfig::sized(64 * MIB)
        .chunk_size(CHUNK)
        .max_memory(cap);
    let mut srv = Server::start(config, transport);
    let out = run_ok(nbd_checks(&[
        "memory-cap",
        &srv.uri(),
        "--cap",
        &cap.to_string(),
        "--chunk",
        &CHUNK.to_string(),
    ]));
    println!("{}", out.stdout);
    srv.assert_running();
}

/// A kibibyte field of the server's /proc status ("VmRSS", "VmHWM"), in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

/// Reads and writes of 48 MB (above the 32 MiB advertised; nbd's own tester sends up to
/// 47.6 MB) from a client that used NBD_OPT_EXPORT_NAME and was never told a limit, and
/// from clients that were (simple and structured replies): all land and read back. They
/// are streamed in 32 MiB pieces, so the server's peak memory grows by the data it keeps
/// and one piece, never by a buffer of the request's size.
fn large_requests(transport: Transport) {
    require_clients!("python3-libnbd");
    let length: u64 = 48_000_000;
    let mut srv = server(64 * MIB, transport);
    let vramdisk = srv.kind() == ServerKind::Vramdisk;
    let before = vramdisk.then(|| proc_status_bytes(srv.pid(), "VmRSS"));
    for (seed, mode) in ["export-name", "simple", "structured"].iter().enumerate() {
        let out = run_ok(nbd_checks(&[
            "large-requests",
            &srv.uri(),
            "--mode",
            mode,
            "--length",
            &length.to_string(),
            "--seed",
            &seed.to_string(),
        ]));
        println!("{}", out.stdout);
    }
    if let Some(before) = before {
        let grown = proc_status_bytes(srv.pid(), "VmHWM").saturating_sub(before);
        // The chunks the data takes (it starts inside one), one piece, and some slack; a
        // buffer of the request's size (64 MiB: buffers come in powers of two) is more.
        let bound = length.div_ceil(CHUNK) * CHUNK + CHUNK + 32 * MIB + 8 * MIB;
        println!("server peak memory grew by {} MiB", grown / MIB);
        assert!(
            grown < bound,
            "the server's peak memory grew by {grown} bytes for {length} bytes of data: more \
             than its chunks and one 32 MiB piece ({bound})"
        );
    }
    srv.assert_running();
}

over_both_transports! {
    requests_above_the_advertised_maximum => large_requests;
    option_haggling => options;
    block_status_holes_and_data => block_status;
    structured_reads => structured_read;
    error_replies_keep_the_connection => errors;
    read_only_export_refuses_writes => read_only;
    multi_conn_fua_fast_zero => flags;
    sixty_four_concurrent_connections => sixty_four_connections;
    client_killed_with_requests_in_flight => client_killed_mid_flight;
    max_memory_gives_enospc_and_trim_frees => memory_cap;
}
