//! nbd's own test client, `nbd-tester-client` (NetworkBlockDevice/nbd, tests/run), in every
//! mode its `simple_test` runs it, against `vramdisk serve`: reads, writes, flushes, the
//! integrity replays (integrityhuge: requests of up to 47.6 MB), oversized requests, the
//! handshake test, read-only exports, a Unix socket, and TLS with a client certificate,
//! with big requests, and with a certificate the server must refuse.
//!
//! The client is not part of this repository: .ci/run builds it from Debian's source
//! package of nbd. Its path comes from `VRAMDISK_NBD_TESTER`, else where .ci/run puts it
//! (`$XDG_CACHE_HOME` or `~/.cache`, then `vramdisk/nbd-tester/tests/run/nbd-tester-client`);
//! its replay files and certificates are read from the directory it sits in, as
//! `simple_test` does. Where it is missing the tests skip loudly, or fail with
//! `VRAMDISK_REQUIRE_NBD_TESTER=1` (which .ci/run sets once it has built it).
//!
//! Not run: `inetd` (nbd-server serving a connection on its stdin; vramdisk has no such
//! mode), and the modes that differ only in nbd-server's configuration (cfgnew, dirconfig,
//! tree, rotree: the client does what it does in cfg1, write and rowrite).

#[macro_use]
mod common;

use common::{MIB, Server, ServerConfig, Transport, run_with_timeout};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The export's size (simple_test: 4 MiB files, 50 MiB for the TLS modes).
const SIZE: u64 = 64 * MIB;

/// The tester, or None (after saying so) where it is not built.
fn tester() -> Option<PathBuf> {
    let path = match std::env::var_os("VRAMDISK_NBD_TESTER") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
            cache.join("vramdisk/nbd-tester/tests/run/nbd-tester-client")
        }
    };
    if path.is_file() {
        return Some(path);
    }
    let why = format!(
        "nbd-tester-client not found at {} (build it with .ci/run, or point \
         VRAMDISK_NBD_TESTER at it)",
        path.display()
    );
    // Not VRAMDISK_REQUIRE_CLIENTS: the tester is built from a source package that a mirror
    // may not serve (.ci/run says so and sets this variable only once it has built it).
    if std::env::var("VRAMDISK_REQUIRE_NBD_TESTER").as_deref() == Ok("1") {
        panic!("{why}; VRAMDISK_REQUIRE_NBD_TESTER=1 requires it");
    }
    common::loud(&format!("SKIPPED: {why}"));
    None
}

/// Runs the tester with `args` against a new server of `config` on `transport`: TCP
/// arguments are `localhost ARGS PORT`, Unix ones `ARGS -u SOCKET`. Fails with both
/// outputs unless it exits 0 (which `-F` turns into "the test failed, as expected").
fn run_mode(config: ServerConfig, transport: Transport, args: &[&str]) {
    if common::standin_skips("nbd-tester-client against vramdisk") {
        return;
    }
    let Some(tester) = tester() else { return };
    let dir = tester.parent().expect("the tester sits in a directory");
    let mut srv = Server::start(config, transport);
    let mut cmd = Command::new(&tester);
    cmd.current_dir(dir);
    match srv.endpoint().clone() {
        common::Endpoint::Tcp(port) => {
            cmd.arg("localhost").args(args).arg(port.to_string());
        }
        common::Endpoint::Unix(path) => {
            cmd.args(args).arg("-u").arg(path);
        }
    }
    // integrityhuge takes half a minute with a debug build.
    let out = run_with_timeout(&mut cmd, Duration::from_secs(300));
    // The tester prints a progress line per request; keep the sentences.
    let all = out.all();
    let said: Vec<&str> = all
        .split("  ")
        .filter(|l| !l.contains("Requests:") && !l.contains("Seq 0"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        out.code(),
        0,
        "nbd-tester-client {args:?} failed:\n{}\n--- server log\n{}",
        said.join("\n"),
        srv.log()
    );
    println!("{}", said.join("\n"));
    srv.assert_running();
}

fn export1() -> ServerConfig {
    ServerConfig::default().export("export1", SIZE)
}

/// The suite's certificates where they are still valid, else (nbd 3.24's expired in April
/// 2026) new ones of the same shape, made with openssl: a CA, a server certificate for
/// localhost with a 2432-bit RSA key as the suite's has, a client certificate from the CA,
/// and a self-signed one the server must refuse.
fn certificates(tester_dir: &Path) -> (PathBuf, Option<tempfile::TempDir>) {
    let suite = tester_dir.join("certs");
    let valid = |name: &str| {
        Command::new("openssl")
            .args(["x509", "-checkend", "3600", "-noout", "-in"])
            .arg(suite.join(name))
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let names = ["ca-cert.pem", "server-cert.pem", "client-cert.pem"];
    if names.iter().all(|n| valid(n)) {
        return (suite, None);
    }
    common::loud("the suite's certificates have expired: using new ones of the same shape");
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let openssl = |args: &[&str]| {
        let out = run_with_timeout(
            Command::new("openssl").args(args).current_dir(d),
            Duration::from_secs(60),
        );
        out.assert_success();
    };
    std::fs::write(
        d.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    let days = ["-days", "2"];
    let self_signed = |name: &str, subject: &str, ext: &[&str]| {
        let (key, cert) = (format!("{name}-key.pem"), format!("{name}-cert.pem"));
        let mut args = vec![
            "req", "-x509", "-nodes", "-newkey", "rsa:2048", "-subj", subject,
        ];
        args.extend(["-keyout", &key, "-out", &cert, days[0], days[1]]);
        args.extend(ext);
        openssl(&args);
    };
    self_signed("ca", "/CN=nbd test CA", &[]);
    for (who, bits, cn) in [
        ("server", "rsa:2432", "localhost"),
        ("client", "rsa:2048", "client"),
    ] {
        let (key, csr) = (format!("{who}-key.pem"), format!("{who}.csr"));
        let subj = format!("/CN={cn}");
        openssl(&[
            "req", "-nodes", "-newkey", bits, "-subj", &subj, "-keyout", &key, "-out", &csr,
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-extfile",
            &format!("{who}.ext"),
            "-out",
            &format!("{who}-cert.pem"),
            days[0],
            days[1],
        ]);
    }
    self_signed(
        "selfsigned",
        "/CN=selfsigned",
        &["-addext", "extendedKeyUsage=clientAuth"],
    );
    (d.to_path_buf(), Some(tmp))
}

/// A TLS mode: the server requires TLS and client certificates from the suite's CA (as
/// nbd-server with certfile, keyfile and cacertfile); `args` name certificate files by
/// their file names in the certificate directory.
fn tls_mode(args: &[&str]) {
    require_clients!("openssl");
    let Some(tester) = tester() else { return };
    let (certs, _keep) = certificates(tester.parent().unwrap());
    let file = |n: &str| certs.join(n).display().to_string();
    let mut config = export1();
    config.extra_args = vec![
        "--tls=require".into(),
        format!("--tls-cert={}", file("server-cert.pem")),
        format!("--tls-key={}", file("server-key.pem")),
        format!("--tls-ca={}", file("ca-cert.pem")),
    ];
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            if a.ends_with(".pem") {
                file(a)
            } else {
                a.to_string()
            }
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_mode(config, Transport::Tcp, &args);
}

#[test]
fn cfg1_reads() {
    run_mode(export1(), Transport::Tcp, &["-N", "export1"]);
}

#[test]
fn cfgmulti_reads_two_exports() {
    let config = export1().export("export2", SIZE / 2);
    run_mode(config.clone(), Transport::Tcp, &["-N", "export1"]);
    run_mode(config, Transport::Tcp, &["-N", "export2"]);
}

#[test]
fn cfgsize_oversized_requests() {
    run_mode(export1(), Transport::Tcp, &["-o", "-N", "export1"]);
}

#[test]
fn write() {
    run_mode(export1(), Transport::Tcp, &["-N", "export1", "-w"]);
}

#[test]
fn flush() {
    run_mode(export1(), Transport::Tcp, &["-N", "export1", "-w", "-f"]);
}

#[test]
fn rowrite_is_refused() {
    run_mode(
        export1().read_only(),
        Transport::Tcp,
        &["-N", "export1", "-w", "-F"],
    );
}

#[test]
fn integrity() {
    let args = ["-N", "export1", "-i", "-t", "integrity-test.tr"];
    run_mode(export1(), Transport::Tcp, &args);
}

#[test]
fn integrityhuge() {
    let args = ["-N", "export1", "-i", "-t", "integrityhuge-test.tr"];
    run_mode(export1(), Transport::Tcp, &args);
}

#[test]
fn list_then_read() {
    // simple_test lists with nbd-client first; the tester's part is a read test.
    run_mode(export1().read_only(), Transport::Tcp, &["-N", "export1"]);
}

#[test]
fn unix_socket() {
    run_mode(export1(), Transport::Unix, &["-N", "export1"]);
}

#[test]
fn handshake() {
    run_mode(export1(), Transport::Tcp, &["-h", "-N", "export1"]);
}

/// The client certificate from the suite's CA, and the CA, as the tls modes pass them.
const CLIENT_CERT: [&str; 6] = [
    "-C",
    "client-cert.pem",
    "-K",
    "client-key.pem",
    "-A",
    "ca-cert.pem",
];

#[test]
fn tls() {
    let replay = ["-N", "export1", "-i", "-t", "integrity-test.tr"];
    tls_mode(&[&replay[..], &CLIENT_CERT].concat());
}

#[test]
fn tlshuge() {
    let replay = ["-N", "export1", "-i", "-t", "integrityhuge-test.tr"];
    tls_mode(&[&replay[..], &CLIENT_CERT, &["-H", "localhost"]].concat());
}

#[test]
fn tlswrongcert_is_refused() {
    tls_mode(&[
        "-N",
        "export1",
        "-t",
        "integrity-test.tr",
        "-C",
        "selfsigned-cert.pem",
        "-K",
        "selfsigned-key.pem",
        "-F",
    ]);
}
