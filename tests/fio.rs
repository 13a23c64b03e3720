//! fio's nbd engine against the server: random and sequential writes verified by checksum,
//! verification in a separate run (which must catch a corrupted block), and 64 jobs, each
//! with its own connection and range.

#[macro_use]
mod common;

use common::{MIB, Server, ServerConfig, Transport, run, run_ok};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn server(size: u64, transport: Transport) -> Server {
    Server::start(ServerConfig::sized(size).chunk_size(2 * MIB), transport)
}

/// Runs fio with the nbd engine on `uri`; returns its exit code, its JSON report (when it
/// printed one) and everything it printed.
fn fio(dir: &Path, uri: &str, args: &[&str]) -> (i32, Option<Value>, String) {
    // fio leaves verify state files in its working directory: keep them in the test's.
    let out = run(Command::new("fio")
        .current_dir(dir)
        .args([
            "--name=vramdisk-test",
            "--ioengine=nbd",
            "--output-format=json",
            // Bounded even if the server crawls: the test then fails on the byte counts.
            "--runtime=120",
        ])
        .arg(format!("--uri={uri}"))
        .args(args));
    // The nbd engine prints "fio: connected to NBD server" before the report.
    let json = out
        .stdout
        .find('{')
        .and_then(|i| serde_json::from_str(&out.stdout[i..]).ok());
    (out.code(), json, out.all())
}

fn fio_ok(dir: &Path, uri: &str, args: &[&str]) -> Value {
    let (code, json, all) = fio(dir, uri, args);
    assert_eq!(code, 0, "fio failed:\n{all}");
    let json = json.unwrap_or_else(|| panic!("fio printed no JSON report:\n{all}"));
    for job in json["jobs"].as_array().expect("jobs") {
        assert_eq!(job["error"], 0, "fio job error:\n{all}");
    }
    json
}

fn bytes(json: &Value, dir: &str) -> u64 {
    json["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j[dir]["io_bytes"].as_u64().unwrap())
        .sum()
}

fn random_write_verify(transport: Transport) {
    require_clients!("fio-nbd");
    let mut srv = server(256 * MIB, transport);
    let size = 128 * MIB;
    let json = fio_ok(
        srv.dir(),
        &srv.uri(),
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            &format!("--size={size}"),
            "--verify=crc32c",
            "--verify_fatal=1",
        ],
    );
    // Every block written once, then read back and checked in the same job.
    assert_eq!(bytes(&json, "write"), size, "bytes written");
    assert_eq!(bytes(&json, "read"), size, "bytes verified");
    srv.assert_running();
}

fn sequential_large_verify(transport: Transport) {
    require_clients!("fio-nbd");
    let mut srv = server(320 * MIB, transport);
    let size = 256 * MIB;
    // 1 MiB blocks starting 512 KiB into the device: every request spans two chunks.
    let json = fio_ok(
        srv.dir(),
        &srv.uri(),
        &[
            "--rw=write",
            "--bs=1M",
            "--iodepth=16",
            "--offset=512k",
            &format!("--size={size}"),
            "--verify=crc32c",
            "--verify_fatal=1",
        ],
    );
    assert_eq!(bytes(&json, "write"), size);
    assert_eq!(bytes(&json, "read"), size);
    srv.assert_running();
}

/// Writes with verification headers but no verify pass, checks them in a second fio run
/// (`--verify_only`), then corrupts one block and checks that the next verify run fails.
fn verify_in_separate_run(transport: Transport) {
    require_clients!("fio-nbd", "qemu-io");
    let mut srv = server(256 * MIB, transport);
    let size = format!("--size={}", 192 * MIB);
    let common_args = [
        "--rw=randwrite",
        "--bs=64k",
        "--iodepth=16",
        "--randseed=4242",
        "--verify=crc32c",
        size.as_str(),
    ];
    let mut write = common_args.to_vec();
    write.push("--do_verify=0");
    let json = fio_ok(srv.dir(), &srv.uri(), &write);
    assert_eq!(bytes(&json, "write"), 192 * MIB);
    assert_eq!(bytes(&json, "read"), 0, "do_verify=0 still read");

    let mut verify = common_args.to_vec();
    verify.extend(["--verify_only", "--do_verify=1", "--verify_fatal=1"]);
    let json = fio_ok(srv.dir(), &srv.uri(), &verify);
    assert_eq!(bytes(&json, "read"), 192 * MIB, "verify_only read");

    // Zero one 64 KiB block inside the written range: verification must now fail.
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &srv.uri(),
        "-c",
        &format!("write -z {} 65536", 100 * MIB),
    ]));
    assert!(!out.all().contains("failed"), "{}", out.all());
    let (code, _, all) = fio(srv.dir(), &srv.uri(), &verify);
    assert_ne!(code, 0, "fio verified a corrupted device:\n{all}");
    // e.g. "verify: bad magic header 0, wanted acca at file ... offset 104857600, ..."
    assert!(
        all.contains("verify: ") && all.contains(&format!("offset {}", 100 * MIB)),
        "fio failed, but not on verifying the corrupted block:\n{all}"
    );
    srv.assert_running();
}

/// 64 fio jobs, each with its own NBD connection, writing and verifying disjoint ranges.
fn sixty_four_jobs(transport: Transport) {
    require_clients!("fio-nbd");
    let mut srv = server(256 * MIB, transport);
    let json = fio_ok(
        srv.dir(),
        &srv.uri(),
        &[
            "--numjobs=64",
            "--rw=randwrite",
            "--bs=16k",
            "--iodepth=4",
            "--size=3M",
            "--offset_increment=4M",
            "--verify=crc32c",
            "--verify_fatal=1",
        ],
    );
    assert_eq!(json["jobs"].as_array().unwrap().len(), 64);
    assert_eq!(bytes(&json, "write"), 64 * 3 * MIB);
    assert_eq!(bytes(&json, "read"), 64 * 3 * MIB);
    srv.assert_running();
}

over_both_transports! {
    fio_random_4k_write_verify_qd32 => random_write_verify;
    fio_sequential_1m_write_verify_across_chunks => sequential_large_verify;
    fio_verify_in_a_separate_run_catches_corruption => verify_in_separate_run;
    fio_sixty_four_jobs_disjoint_ranges => sixty_four_jobs;
}
