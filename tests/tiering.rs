//! Giving GPU memory back without losing a byte, end to end and without a GPU: the daemon
//! runs on `--backend fake-gpu` (host RAM posing as a GPU whose other programs' usage the
//! test sets through a file), libnbd clients verify every read while another "program"
//! squeezes the GPU, lets go, and `vramdisk yield` asks for memory and releases it.

#[macro_use]
mod common;

use common::{Background, MIB, Server, ServerConfig, Transport, nbd_checks, run, run_ok};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn status(srv: &Server) -> Value {
    let out = run_ok(
        Command::new(common::vramdisk_bin())
            .args(["status", "--json", "--control-socket"])
            .arg(srv.dir().join("control.sock")),
    );
    let all: Value = serde_json::from_str(&out.stdout).expect("status --json is JSON");
    all[0]["exports"][0].clone()
}

fn spilled(srv: &Server) -> u64 {
    let e = status(srv);
    e["spilled_ram"].as_u64().unwrap() + e["spilled_file"].as_u64().unwrap()
}

fn free(srv: &Server) -> u64 {
    status(srv)["tiers"]["memories"][0]["free"]
        .as_u64()
        .unwrap()
}

/// Polls `what` until `cond` holds, failing the test with `msg` after `limit`.
fn wait_until(limit: Duration, msg: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "{msg}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn yield_cmd(srv: &Server, args: &[&str]) -> common::Captured {
    run(Command::new(common::vramdisk_bin())
        .arg("yield")
        .args(args)
        .arg("--control-socket")
        .arg(srv.dir().join("control.sock")))
}

fn set_others(file: &Path, bytes: u64) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, bytes.to_string()).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

#[test]
fn chunks_move_both_ways_under_verifying_clients() {
    require_clients!("python3-libnbd");
    if common::standin_skips("the tier logic") {
        return;
    }
    let others = tempfile::NamedTempFile::new().unwrap();
    let others_path = others.path().to_path_buf();
    set_others(&others_path, 0);
    // A 96 MiB GPU with 8 MiB kept free, a 64 MiB device, 64 MiB of spill RAM.
    let mut config = ServerConfig::sized(64 * MIB).chunk_size(2 * MIB);
    config.extra_args = [
        "--backend",
        "fake-gpu",
        "--fake-gpu-memory",
        "96M",
        "--keep-free",
        "8M",
        "--spill-memory",
        "64M",
        "--fake-gpu-others",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([others_path.display().to_string()])
    .collect();
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("control.sock");
    let mut srv = Server::start(
        {
            config.extra_args.push("--control-socket".into());
            config.extra_args.push(control.display().to_string());
            config
        },
        Transport::Unix,
    );
    // The test's status helpers look beside the server; link the socket there.
    std::os::unix::fs::symlink(&control, srv.dir().join("control.sock")).unwrap();

    let stop = dir.path().join("stop");
    let mut load = Background::spawn(nbd_checks(&[
        "verify-load",
        &srv.uri(),
        "--connections",
        "4",
        "--span",
        &(16 * MIB).to_string(),
        "--stop",
        &stop.display().to_string(),
    ]));
    load.wait_for_line("verify-load: started");
    // Let the clients fill their regions first.
    wait_until(Duration::from_secs(60), "the clients wrote nothing", || {
        status(&srv)["allocated"].as_u64().unwrap() >= 48 * MIB
    });

    // Another program takes 48 MiB: the reserve is gone, chunks must move out.
    set_others(&others_path, 48 * MIB);
    wait_until(
        Duration::from_secs(30),
        "the watermark was never restored",
        || free(&srv) >= 8 * MIB,
    );
    assert!(spilled(&srv) > 0);
    // It exits: chunks come back.
    set_others(&others_path, 0);
    wait_until(
        Duration::from_secs(30),
        "spilled chunks never came back",
        || spilled(&srv) == 0,
    );

    // A job prolog asks for 80 MiB of the 96: the device must move most of its data out.
    let out = yield_cmd(&srv, &["80M"]);
    out.assert_success();
    assert!(
        free(&srv) >= 80 * MIB,
        "yield returned before 80 MiB were free"
    );
    assert_eq!(
        status(&srv)["tiers"]["memories"][0]["held"],
        Value::Bool(true)
    );
    assert!(out.stderr.contains("moved"), "{}", out.all());
    // More than can ever be free: one sentence, nothing lost.
    let too_much = yield_cmd(&srv, &["97M"]);
    assert_ne!(too_much.code(), 0);
    assert!(
        too_much.stderr.contains("cannot have"),
        "{}",
        too_much.all()
    );
    // The job ends: memory is released and the chunks come back.
    yield_cmd(&srv, &["--release"]).assert_success();
    wait_until(
        Duration::from_secs(30),
        "chunks never came back after release",
        || spilled(&srv) == 0,
    );

    std::fs::write(&stop, b"").unwrap();
    let line = load.wait_for_line("verify-load:");
    assert!(line.contains("0 mismatches"), "{line}");
    assert_eq!(
        load.wait_timeout(Duration::from_secs(30))
            .and_then(|s| s.code()),
        Some(0)
    );
    let s = status(&srv);
    assert!(
        s["tiers"]["spilled_bytes"].as_u64().unwrap() >= 24 * MIB,
        "{s}"
    );
    assert!(s["tiers"]["promoted_bytes"].as_u64().unwrap() > 0, "{s}");
    srv.assert_running();
}
