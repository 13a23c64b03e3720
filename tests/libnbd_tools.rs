//! libnbd's command-line clients against the server: nbdinfo (capabilities, map, list, size,
//! block sizes), nbdcopy round trips, and nbdfuse (the export as a file, through FUSE).

#[macro_use]
mod common;

use common::{
    Background, MIB, Server, ServerConfig, Transport, assert_same_bytes, loud, run, run_ok,
};
use nix::fcntl::{FallocateFlags, fallocate};
use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const CHUNK: u64 = 2 * MIB;

fn server(size: u64, transport: Transport) -> Server {
    Server::start(ServerConfig::sized(size).chunk_size(CHUNK), transport)
}

fn nbdinfo(args: &[&str], uri: &str) -> common::Captured {
    run(Command::new("nbdinfo").args(args).arg(uri))
}

fn nbdinfo_json(args: &[&str], uri: &str) -> Value {
    let out = nbdinfo(args, uri);
    out.assert_success();
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo printed bad JSON ({e}):\n{}", out.stdout))
}

/// Asserts `nbdinfo --can/--is WHAT` answers yes (exit 0) or no (exit 2); 1 would mean error.
fn assert_answer(uri: &str, flag: &str, what: &str, yes: bool) {
    let out = nbdinfo(&[flag, what], uri);
    let want = if yes { 0 } else { 2 };
    assert_eq!(
        out.code(),
        want,
        "nbdinfo {flag} {what}: expected exit {want}:\n{}",
        out.all()
    );
}

fn capabilities(transport: Transport) {
    require_clients!("nbdinfo");
    let mut srv = server(64 * MIB, transport);
    let uri = srv.uri();
    for what in [
        "connect",
        "read",
        "write",
        "trim",
        "zero",
        "fast-zero",
        "multi-conn",
        "flush",
        "fua",
        "cache",
        "df",
        "structured-reply",
    ] {
        assert_answer(&uri, "--can", what, true);
    }
    assert_answer(&uri, "--is", "read-only", false);
    assert_answer(&uri, "--is", "rotational", false);
    assert_answer(&uri, "--is", "tls", false);

    // The advertised block sizes (vramdisk: SparseDevice::capabilities).
    let info = nbdinfo_json(&["--json"], &uri);
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], srv.size(), "{info}");
    assert_eq!(export["block_size_minimum"], 1, "{info}");
    assert_eq!(export["block_size_preferred"], 4096, "{info}");
    assert_eq!(export["block_size_maximum"], 32 * MIB, "{info}");
    assert_eq!(info["structured"], true, "{info}");
    assert!(
        export["contexts"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c == "base:allocation")),
        "base:allocation not offered: {info}"
    );

    let out = nbdinfo(&["--size"], &uri);
    out.assert_success();
    assert_eq!(out.stdout.trim(), srv.size().to_string());
    srv.assert_running();
}

fn read_only_capabilities(transport: Transport) {
    require_clients!("nbdinfo");
    let mut srv = Server::start(ServerConfig::sized(64 * MIB).read_only(), transport);
    let uri = srv.uri();
    assert_answer(&uri, "--is", "read-only", true);
    assert_answer(&uri, "--can", "write", false);
    for what in ["trim", "zero", "fast-zero"] {
        assert_answer(&uri, "--can", what, false);
    }
    assert_answer(&uri, "--can", "read", true);
    srv.assert_running();
}

/// `nbdinfo --map --json` as (offset, length, type) with neighbours of one type merged, since
/// servers may split a run of one state as they like.
fn map(uri: &str) -> Vec<(u64, u64, u64)> {
    let v = nbdinfo_json(&["--map", "--json"], uri);
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    for e in v.as_array().expect("--map --json prints an array") {
        let (off, len, ty) = (
            e["offset"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["type"].as_u64().unwrap(),
        );
        match runs.last_mut() {
            Some(last) if last.2 == ty && last.0 + last.1 == off => last.1 += len,
            _ => runs.push((off, len, ty)),
        }
    }
    runs
}

fn qemu_io_ok(uri: &str, cmd: &str) {
    let out = run_ok(Command::new("qemu-io").args(["-f", "raw", uri, "-c", cmd]));
    assert!(!out.all().contains("failed"), "{}", out.all());
}

const HOLE_ZERO: u64 = 3;
const DATA: u64 = 0;

fn allocation_map(transport: Transport) {
    require_clients!("nbdinfo", "qemu-io");
    let mut srv = server(64 * MIB, transport);
    let uri = srv.uri();
    let size = srv.size();
    assert_eq!(map(&uri), vec![(0, size, HOLE_ZERO)], "fresh device");

    qemu_io_ok(&uri, &format!("write -P 0x42 {} {}", 2 * CHUNK, 2 * CHUNK));
    qemu_io_ok(&uri, &format!("write -P 0x43 {} 4096", 10 * CHUNK));
    let got = map(&uri);
    // A small write may show as data at a granularity finer than a chunk; everything else
    // must match exactly.
    let want = [
        (0, 2 * CHUNK, HOLE_ZERO),
        (2 * CHUNK, 2 * CHUNK, DATA),
        (4 * CHUNK, 6 * CHUNK, HOLE_ZERO),
    ];
    assert_eq!(got[..3], want, "map after writes: {got:?}");
    assert_eq!(got.len(), 5, "map after writes: {got:?}");
    assert_eq!(got[3].0, 10 * CHUNK, "map after writes: {got:?}");
    assert_eq!(got[3].2, DATA, "map after writes: {got:?}");
    assert!(got[3].1 >= 4096 && got[3].1 <= CHUNK, "{got:?}");
    assert_eq!(got[4].2, HOLE_ZERO, "map after writes: {got:?}");
    assert_eq!(got[4].0 + got[4].1, size, "map after writes: {got:?}");

    let out = run_ok(
        Command::new("nbdinfo")
            .args(["--map", "--totals"])
            .arg(&uri),
    );
    assert!(
        out.stdout.lines().any(|l| l.contains("hole,zero")) && out.stdout.contains("data"),
        "{}",
        out.stdout
    );

    // Trimming the written ranges makes them holes again.
    qemu_io_ok(&uri, &format!("discard {} {}", 2 * CHUNK, 2 * CHUNK));
    qemu_io_ok(&uri, &format!("discard {} {}", 10 * CHUNK, CHUNK));
    assert_eq!(map(&uri), vec![(0, size, HOLE_ZERO)], "map after trim");

    // Zeroing with unmap over a whole chunk leaves a hole too.
    qemu_io_ok(&uri, &format!("write -P 0x44 {} {}", 6 * CHUNK, CHUNK));
    qemu_io_ok(&uri, &format!("write -z -u {} {}", 6 * CHUNK, CHUNK));
    assert_eq!(
        map(&uri),
        vec![(0, size, HOLE_ZERO)],
        "map after write -z -u"
    );
    srv.assert_running();
}

fn list_and_size(transport: Transport) {
    require_clients!("nbdinfo");
    let config = ServerConfig::default()
        .export("alpha", 64 * MIB)
        .export("beta", 32 * MIB)
        .export("gamma", 8 * MIB);
    let mut srv = Server::start(config, transport);
    let names = ["alpha", "beta", "gamma"];

    let list = nbdinfo_json(&["--list", "--json"], &srv.uri());
    let exports = list["exports"].as_array().expect("exports array");
    let listed: Vec<&str> = exports
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    for name in names {
        assert!(listed.contains(&name), "--list misses {name}: {listed:?}");
    }
    for e in exports {
        let name = e["export-name"].as_str().unwrap();
        assert!(
            name.is_empty() || names.contains(&name),
            "--list shows unknown export {name:?}"
        );
        assert_eq!(e["export-size"], srv.export_size(name), "size of {name:?}");
    }
    // The plain text listing names every export too.
    let out = nbdinfo(&["--list"], &srv.uri());
    out.assert_success();
    for name in names {
        assert!(
            out.stdout.contains(&format!("export=\"{name}\"")),
            "{}",
            out.stdout
        );
    }

    for name in names {
        let out = nbdinfo(&["--size"], &srv.export_uri(name));
        out.assert_success();
        assert_eq!(
            out.stdout.trim(),
            srv.export_size(name).to_string(),
            "--size of {name}"
        );
    }
    // Without a name, the first export is served.
    let out = nbdinfo(&["--size"], &srv.uri());
    out.assert_success();
    assert_eq!(out.stdout.trim(), srv.export_size("alpha").to_string());

    let out = nbdinfo(&["--size"], &srv.export_uri("no-such-export"));
    assert_eq!(out.code(), 1, "unknown export: {}", out.all());
    srv.assert_running();
}

fn nbdcopy_round_trip(transport: Transport, connections: u32) {
    require_clients!("nbdcopy");
    let mut srv = server(64 * MIB, transport);
    let uri = srv.uri();
    let size = srv.size() as usize;
    let mut data = common::random_bytes(size);
    data[40 << 20..48 << 20].fill(0);
    let src = srv.dir().join("src.img");
    let back = srv.dir().join("back.img");
    std::fs::write(&src, &data).unwrap();
    let conns = format!("--connections={connections}");
    run_ok(
        Command::new("nbdcopy")
            .args([&conns, "--flush"])
            .arg(&src)
            .arg(&uri),
    );
    run_ok(Command::new("nbdcopy").arg(&conns).arg(&uri).arg(&back));
    assert_same_bytes(&std::fs::read(&back).unwrap(), &data, "nbdcopy round trip");

    srv.assert_running();
}

fn nbdcopy_one_connection(transport: Transport) {
    nbdcopy_round_trip(transport, 1);
}

fn nbdcopy_four_connections(transport: Transport) {
    nbdcopy_round_trip(transport, 4);
}

/// An `nbdfuse` process showing an export as the file `<dir>/disk`; unmounted when dropped.
struct NbdFuse {
    dir: PathBuf,
    proc: Background,
}

impl NbdFuse {
    fn mount(dir: &Path, uri: &str) -> NbdFuse {
        std::fs::create_dir_all(dir).unwrap();
        let pid_file = dir.with_extension("pid");
        let mut proc = Background::spawn(
            Command::new("nbdfuse")
                .arg("-P")
                .arg(&pid_file)
                .arg(dir.join("disk"))
                .arg(uri),
        );
        // nbdfuse writes its pid file once it serves the mount.
        let start = Instant::now();
        while !pid_file.exists() {
            if let Some(status) = proc.try_wait() {
                panic!("nbdfuse exited before serving the mount ({status})");
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nbdfuse did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        NbdFuse {
            dir: dir.to_path_buf(),
            proc,
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.join("disk")
    }

    /// Unmounts and waits for nbdfuse to exit; its exit status.
    fn unmount(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .status();
        self.proc
            .wait_timeout(Duration::from_secs(10))
            .expect("nbdfuse still running 10 s after fusermount3 -u")
    }
}

impl Drop for NbdFuse {
    fn drop(&mut self) {
        // A failed test: detach the mount lazily; dropping `proc` then kills nbdfuse.
        if self.proc.try_wait().is_none() {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.dir)
                .status();
        }
    }
}

/// The whole device as another client (nbdcopy) reads it.
fn device_bytes(srv: &Server) -> Vec<u8> {
    let back = srv.dir().join("device.img");
    run_ok(Command::new("nbdcopy").arg(srv.uri()).arg(&back));
    let bytes = std::fs::read(&back).unwrap();
    let _ = std::fs::remove_file(back);
    bytes
}

/// nbdfuse turns reads, writes, hole punching, zeroing and fsync of a file into NBD
/// requests. Unaligned writes, a punched hole and a zeroed range must reach the device
/// exactly (checked through nbdcopy, another client), a punched hole must give the chunk
/// back (nbdinfo --map), and ext4 made through the file must pass e2fsck.
fn nbdfuse_file(transport: Transport) {
    require_clients!(
        "nbdfuse",
        "fusermount3",
        "nbdinfo",
        "nbdcopy",
        "mkfs.ext4",
        "e2fsck"
    );
    if !Path::new("/dev/fuse").exists() || !nix::unistd::geteuid().is_root() {
        loud("SKIPPED nbdfuse: needs root and /dev/fuse");
        return;
    }
    let mut srv = server(64 * MIB, transport);
    let size = srv.size() as usize;
    let mut fuse = NbdFuse::mount(&srv.dir().join("mnt"), &srv.uri());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(fuse.file())
        .unwrap();
    assert_eq!(file.metadata().unwrap().len(), size as u64);

    let mut model = vec![0u8; size];
    let data = common::random_bytes(12 * MIB as usize);
    // Unaligned at both ends and across chunk boundaries.
    let at = 3 * MIB as usize + 4097;
    file.write_all_at(&data, at as u64).unwrap();
    model[at..at + data.len()].copy_from_slice(&data);
    let small = common::random_bytes(3);
    file.write_all_at(&small, 20 * MIB + 1).unwrap();
    model[20 * MIB as usize + 1..][..3].copy_from_slice(&small);
    file.sync_all().unwrap();

    // Whole chunks punched: a hole on the device. An unaligned range zeroed: zeros.
    let keep = FallocateFlags::FALLOC_FL_KEEP_SIZE;
    fallocate(
        &file,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | keep,
        (4 * MIB) as i64,
        (4 * MIB) as i64,
    )
    .unwrap();
    model[4 * MIB as usize..8 * MIB as usize].fill(0);
    fallocate(
        &file,
        FallocateFlags::FALLOC_FL_ZERO_RANGE | keep,
        (10 * MIB + 512) as i64,
        (MIB + 100) as i64,
    )
    .unwrap();
    model[10 * MIB as usize + 512..][..MIB as usize + 100].fill(0);
    file.sync_all().unwrap();

    assert_same_bytes(&device_bytes(&srv), &model, "the device after nbdfuse I/O");
    let mut read_back = vec![0u8; size];
    file.read_exact_at(&mut read_back, 0).unwrap();
    assert_same_bytes(&read_back, &model, "the nbdfuse file");
    let holes = map(&srv.uri());
    assert!(
        holes
            .iter()
            .any(|&(o, l, t)| t == HOLE_ZERO && o <= 4 * MIB && o + l >= 8 * MIB),
        "the punched chunks are not a hole: {holes:?}"
    );

    // A file system made and checked through the file, then checked again as nbdcopy reads it.
    drop(file);
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(fuse.file()),
    );
    run_ok(Command::new("e2fsck").arg("-fn").arg(fuse.file()));
    let status = fuse.unmount();
    assert!(status.success(), "nbdfuse exited with {status}");
    let image = srv.dir().join("fs.img");
    std::fs::write(&image, device_bytes(&srv)).unwrap();
    run_ok(Command::new("e2fsck").arg("-fn").arg(&image));
    srv.assert_running();
}

over_both_transports! {
    nbdfuse_file_io_trim_zero_and_ext4 => nbdfuse_file;
    nbdinfo_capabilities_and_block_sizes => capabilities;
    nbdinfo_read_only_export => read_only_capabilities;
    nbdinfo_map_data_holes_and_trim => allocation_map;
    nbdinfo_list_and_size_of_named_exports => list_and_size;
    nbdcopy_file_to_nbd_and_back => nbdcopy_one_connection;
    nbdcopy_four_connections_round_trip => nbdcopy_four_connections;
}
