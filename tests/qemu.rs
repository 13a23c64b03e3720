//! QEMU's clients against the server: qemu-io pattern checks (aligned and unaligned I/O,
//! write-zeroes with and without unmap, discard, flush, FUA, the end of the device, large
//! requests) and qemu-img convert/compare.

#[macro_use]
mod common;

use common::{
    Captured, MIB, Server, ServerConfig, Transport, assert_same_bytes, loud, run, run_ok,
    standin_skips,
};
use std::process::Command;

const CHUNK: u64 = 2 * MIB;

fn server(size: u64, transport: Transport) -> Server {
    Server::start(ServerConfig::sized(size).chunk_size(CHUNK), transport)
}

fn qemu_io(uri: &str, cmds: &[String]) -> Captured {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    run(cmd)
}

/// The result line qemu-io prints for a successful command, if it prints one.
fn expected_line(cmd: &str) -> Option<String> {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let verb = match words[0] {
        "write" => "wrote",
        "read" => "read",
        "discard" => "discard",
        _ => return None,
    };
    let n = words.len();
    let (offset, len): (u64, u64) = (words[n - 2].parse().unwrap(), words[n - 1].parse().unwrap());
    Some(format!("{verb} {len}/{len} bytes at offset {offset}"))
}

/// Runs qemu-io commands that must all succeed: exit 0, no failure or pattern mismatch, and
/// exactly the "wrote/read/discard N/N bytes at offset O" lines the commands call for.
fn qemu_io_ok(uri: &str, cmds: &[String]) -> Captured {
    let out = qemu_io(uri, cmds);
    let all = out.all();
    assert!(
        !all.contains("Pattern verification failed"),
        "qemu-io read back the wrong data:\n{all}"
    );
    assert!(!all.contains("failed"), "a qemu-io command failed:\n{all}");
    out.assert_success();
    let got: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("wrote ") || l.starts_with("read ") || l.starts_with("discard "))
        .collect();
    let want: Vec<String> = cmds.iter().filter_map(|c| expected_line(c)).collect();
    assert_eq!(got, want, "qemu-io result lines differ:\n{all}");
    out
}

/// Runs one qemu-io command that must fail with `message` (e.g. "read failed").
fn qemu_io_fails(uri: &str, cmd: &str, message: &str) {
    let out = qemu_io(uri, &[cmd.to_string()]);
    let all = out.all();
    assert!(
        all.contains(message),
        "`{cmd}` should print '{message}':\n{all}"
    );
    assert!(!out.status.success(), "`{cmd}` should fail:\n{all}");
    assert!(
        expected_line(cmd).is_none_or(|l| !all.contains(&l)),
        "`{cmd}` reports success:\n{all}"
    );
}

macro_rules! cmds {
    ($($fmt:literal $(, $arg:expr)*);+ $(;)?) => {
        [$(format!($fmt $(, $arg)*)),+]
    };
}

fn patterns_and_unaligned_io(transport: Transport) {
    require_clients!("qemu-io");
    let mut srv = server(64 * MIB, transport);
    let uri = srv.uri();
    let c = CHUNK;
    qemu_io_ok(
        &uri,
        &cmds![
            "write -P 0xaa 0 65536";
            // 512-byte aligned but not 4K aligned, over another pattern.
            "write -P 0x55 512 1536";
            "read -P 0xaa 0 512";
            "read -P 0x55 512 1536";
            "read -P 0xaa 2048 63488";
            // Byte-granular, inside a sector.
            "write -P 0x11 4097 3";
            "read -P 0xaa 4096 1";
            "read -P 0x11 4097 3";
            "read -P 0xaa 4100 61436";
            // Across a chunk boundary, neither end aligned, between unwritten neighbours.
            "write -P 0x66 {} 2000", c - 1000;
            "read -P 0x66 {} 2000", c - 1000;
            "read -P 0 {} 512", c - 1512;
            "read -P 0 {} 512", c + 1000;
            // Unwritten space reads as zeros.
            "read -P 0 {} 65536", 5 * c;
        ],
    );
    // The checks can fail: a wrong pattern is reported.
    let out = qemu_io(&uri, &cmds!["read -P 0x55 0 512"]);
    assert!(
        out.all().contains("Pattern verification failed"),
        "qemu-io did not notice a wrong pattern:\n{}",
        out.all()
    );
    srv.assert_running();
    assert_extended_headers_when_offered(&srv);
}

/// qemu's NBD client asks for extended headers from 8.2 on: then the checks above ran over
/// them, and the server's log line for each client says so.
fn assert_extended_headers_when_offered(srv: &Server) {
    if standin_skips("which reply framing qemu negotiated") {
        return;
    }
    let version = run_ok(Command::new("qemu-io").arg("--version")).stdout;
    let numbers: Vec<u32> = version
        .split_whitespace()
        .nth(2)
        .unwrap_or("")
        .split('.')
        .map_while(|n| n.parse().ok())
        .collect();
    if numbers.len() < 2 {
        panic!("cannot read qemu-io's version from {version:?}");
    }
    if (numbers[0], numbers[1]) < (8, 2) {
        loud(&format!(
            "NOTE: qemu-io {}.{} predates extended headers; this run checked structured replies only",
            numbers[0], numbers[1]
        ));
        return;
    }
    let log = srv.log();
    assert!(
        log.contains("(extended-header replies"),
        "qemu {}.{} should have negotiated extended headers:\n{log}",
        numbers[0],
        numbers[1]
    );
}

fn zero_discard_flush_fua(transport: Transport) {
    require_clients!("qemu-io");
    let mut srv = server(64 * MIB, transport);
    let uri = srv.uri();
    let c = CHUNK;
    qemu_io_ok(
        &uri,
        &cmds![
            "write -P 0xcc 0 {}", 2 * c;
            // Zero without unmap (NO_HOLE), unaligned, inside data.
            "write -z 4096 8192";
            "read -P 0xcc 0 4096";
            "read -P 0 4096 8192";
            "read -P 0xcc 12288 {}", 2 * c - 12288;
            // Zero with unmap over a whole chunk, and over part of one.
            "write -z -u {} {}", c, c;
            "read -P 0 {} {}", c, c;
            "write -z -u 1048576 4096";
            "read -P 0 1048576 4096";
            "read -P 0xcc 12288 {}", 1048576 - 12288;
            "read -P 0xcc 1052672 {}", c - 1052672;
            // Discard a whole chunk, and part of one: reads zeros, neighbours intact.
            "write -P 0xdd {} {}", 4 * c, 2 * c;
            "discard {} {}", 4 * c, c;
            "read -P 0 {} {}", 4 * c, c;
            "discard {} 8192", 5 * c + 4096;
            "read -P 0xdd {} 4096", 5 * c;
            "read -P 0 {} 8192", 5 * c + 4096;
            "read -P 0xdd {} {}", 5 * c + 12288, c - 12288;
            "flush";
            // FUA write and FUA zero.
            "write -f -P 0xee {} 65536", 8 * c;
            "read -P 0xee {} 65536", 8 * c;
            "write -f -z {} 4096", 8 * c;
            "read -P 0 {} 4096", 8 * c;
            "read -P 0xee {} 61440", 8 * c + 4096;
            "flush";
        ],
    );
    srv.assert_running();
}

fn end_of_device(transport: Transport) {
    require_clients!("qemu-io");
    let mut srv = server(64 * MIB, transport);
    let uri = srv.uri();
    let s = srv.size();
    qemu_io_ok(
        &uri,
        &cmds![
            "write -P 0x77 {} 4096", s - 4096;
            "write -P 0x78 {} 1", s - 1;
            "read -P 0x77 {} 4095", s - 4096;
            "read -P 0x78 {} 1", s - 1;
        ],
    );
    // qemu checks against the size the server advertised, so a wrong size shows up here.
    qemu_io_fails(&uri, &format!("read {s} 512"), "read failed");
    qemu_io_fails(&uri, &format!("read {} 1024", s - 512), "read failed");
    qemu_io_fails(&uri, &format!("write -P 1 {s} 512"), "write failed");
    qemu_io_fails(
        &uri,
        &format!("write -P 1 {} 1024", s - 512),
        "write failed",
    );
    qemu_io_fails(&uri, &format!("write -z {s} 512"), "write failed");
    qemu_io_fails(&uri, &format!("discard {s} 512"), "discard failed");
    // Nothing of the refused writes landed.
    qemu_io_ok(
        &uri,
        &cmds![
            "read -P 0x77 {} 4095", s - 4096;
            "read -P 0x78 {} 1", s - 1;
        ],
    );
    srv.assert_running();
}

fn large_io(transport: Transport) {
    require_clients!("qemu-io");
    let mut srv = server(128 * MIB, transport);
    let uri = srv.uri();
    qemu_io_ok(
        &uri,
        &cmds![
            // 32 MiB requests starting mid-chunk: 17 chunks touched.
            "write -P 0x3c {} {}", MIB, 32 * MIB;
            "write -P 0x3d {} {}", 40 * MIB + 4096, 32 * MIB;
            "read -P 0x3c {} {}", MIB, 32 * MIB;
            "read -P 0x3d {} {}", 40 * MIB + 4096, 32 * MIB;
            "read -P 0 0 {}", MIB;
            "read -P 0 {} {}", 33 * MIB, 7 * MIB + 4096;
            "read -P 0 {} {}", 72 * MIB + 4096, 56 * MIB - 4096;
            // Larger than one request (qemu splits it).
            "write -P 0x3e 0 {}", 96 * MIB;
            "read -P 0x3e 0 {}", 96 * MIB;
        ],
    );
    srv.assert_running();
}

fn convert_and_compare(transport: Transport) {
    require_clients!("qemu-img", "qemu-io");
    let mut srv = server(64 * MIB, transport);
    let uri = srv.uri();
    let size = srv.size() as usize;
    // Random data with a zero run in the middle, so zero detection is exercised too.
    let mut data = common::random_bytes(size);
    data[16 << 20..24 << 20].fill(0);
    let src = srv.dir().join("src.img");
    std::fs::write(&src, &data).unwrap();

    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-W", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    assert!(out.stdout.contains("Images are identical"), "{}", out.all());

    let back = srv.dir().join("back.img");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&back),
    );
    assert_same_bytes(&std::fs::read(&back).unwrap(), &data, "nbd -> file copy");

    // One changed byte on the device makes compare fail at its sector (qemu-img compare
    // reports the 512-byte sector the first mismatch is in).
    let at = 12345 + size / 3;
    let flipped = data[at] ^ 0xff;
    qemu_io_ok(&uri, &cmds!["write -P {} {} 1", flipped, at]);
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&uri));
    assert_eq!(
        out.code(),
        1,
        "compare should report a difference:\n{}",
        out.all()
    );
    assert!(
        out.stdout
            .contains(&format!("Content mismatch at offset {}!", at & !511)),
        "{}",
        out.all()
    );
    srv.assert_running();
}

over_both_transports! {
    qemu_io_patterns_and_unaligned_io => patterns_and_unaligned_io;
    qemu_io_zero_discard_flush_fua => zero_discard_flush_fua;
    qemu_io_end_of_device => end_of_device;
    qemu_io_large_requests => large_io;
    qemu_img_convert_and_compare => convert_and_compare;
}
