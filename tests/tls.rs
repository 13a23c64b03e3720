//! TLS (NBD_OPT_STARTTLS) with real clients: nbdinfo/nbdcopy through `nbds://` URIs and
//! qemu-io/qemu-img through `tls-creds-x509`; mutual TLS refusing clients without a
//! certificate from the right CA; the refusals of `--tls require` before TLS; and the CLI's
//! refusal to serve plain text on a network address; RSA keys of sizes ring refused.
//! Certificates are generated here, at test time (rcgen, openssl), never stored.

#[macro_use]
mod common;

use common::{
    Captured, MIB, SIMPLE_REPLY_MAGIC, Server, ServerConfig, Transport, request_header,
    run_with_timeout,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;

/// A CA that signs server and client certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ca {
            issuer: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A leaf certificate and its key, PEM.
    fn leaf(&self, cn: &str, server: bool) -> (String, String) {
        let names = if server {
            vec!["localhost".to_string(), "127.0.0.1".to_string()]
        } else {
            Vec::new()
        };
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::ExplicitNoCa;
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Server and client certificate directories, in the layout libnbd and qemu read
/// (ca-cert.pem, client-cert.pem, client-key.pem).
struct Pki {
    _dir: tempfile::TempDir,
    /// ca-cert.pem, server-cert.pem, server-key.pem.
    server: PathBuf,
    /// A client with a certificate from the server's CA.
    client: PathBuf,
    /// A client that trusts the server's CA but has no certificate.
    anonymous: PathBuf,
    /// A client with a certificate from another CA.
    rogue: PathBuf,
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), text).unwrap();
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("vramdisk test CA");
        let other = Ca::new("some other CA");
        let ca_pem = ca.issuer.pem();
        let server = dir.path().join("server");
        let (c, k) = ca.leaf("localhost", true);
        write(&server, "ca-cert.pem", &ca_pem);
        write(&server, "server-cert.pem", &c);
        write(&server, "server-key.pem", &k);
        let client = dir.path().join("client");
        let (c, k) = ca.leaf("test client", false);
        write(&client, "ca-cert.pem", &ca_pem);
        write(&client, "client-cert.pem", &c);
        write(&client, "client-key.pem", &k);
        let anonymous = dir.path().join("anonymous");
        write(&anonymous, "ca-cert.pem", &ca_pem);
        let rogue = dir.path().join("rogue");
        let (c, k) = other.leaf("rogue client", false);
        write(&rogue, "ca-cert.pem", &ca_pem);
        write(&rogue, "client-cert.pem", &c);
        write(&rogue, "client-key.pem", &k);
        Pki {
            _dir: dir,
            server,
            client,
            anonymous,
            rogue,
        }
    }

    fn server_args(&self, mode: &str, mutual: bool) -> Vec<String> {
        let mut v = vec![
            format!("--tls={mode}"),
            format!(
                "--tls-cert={}",
                self.server.join("server-cert.pem").display()
            ),
            format!("--tls-key={}", self.server.join("server-key.pem").display()),
        ];
        if mutual {
            v.push(format!(
                "--tls-ca={}",
                self.server.join("ca-cert.pem").display()
            ));
        }
        v
    }
}

fn tls_server(pki: &Pki, mode: &str, mutual: bool) -> Server {
    tls_server_with(pki, mode, mutual, &[])
}

/// [`tls_server`] with more arguments for `vramdisk serve`.
fn tls_server_with(pki: &Pki, mode: &str, mutual: bool, extra: &[&str]) -> Server {
    let mut c = ServerConfig::sized(64 * MIB);
    c.extra_args = pki.server_args(mode, mutual);
    c.extra_args.extend(extra.iter().map(|a| a.to_string()));
    Server::start(c, Transport::Tcp)
}

fn port(srv: &Server) -> u16 {
    match srv.endpoint() {
        common::Endpoint::Tcp(p) => *p,
        common::Endpoint::Unix(_) => unreachable!(),
    }
}

fn nbds(srv: &Server, certs: &Path) -> String {
    format!(
        "nbds://localhost:{}/?tls-certificates={}",
        port(srv),
        certs.display()
    )
}

fn timed(cmd: &mut Command) -> Captured {
    run_with_timeout(cmd, Duration::from_secs(60))
}

fn nbdinfo(uri: &str) -> Captured {
    timed(Command::new("nbdinfo").arg(uri))
}

/// nbdcopy writes random data through TLS, reads it back, and compares.
fn copy_round_trip(srv: &Server, certs: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let back = dir.path().join("back");
    let data = common::random_bytes(8 * MIB as usize);
    std::fs::write(&src, &data).unwrap();
    let uri = nbds(srv, certs);
    timed(Command::new("nbdcopy").arg(&src).arg(&uri)).assert_success();
    timed(Command::new("nbdcopy").arg(&uri).arg(&back)).assert_success();
    let got = std::fs::read(&back).unwrap();
    common::assert_same_bytes(&data, &got[..data.len()], "read back through TLS");
}

#[test]
fn nbd_tools_over_tls_require() {
    require_clients!("nbdinfo", "nbdcopy");
    if common::standin_skips("vramdisk's TLS flags") {
        return;
    }
    let pki = Pki::new();
    let srv = tls_server(&pki, "require", false);
    let out = nbdinfo(&nbds(&srv, &pki.anonymous));
    out.assert_success();
    assert!(out.all().contains("export-size: 67108864"), "{}", out.all());
    copy_round_trip(&srv, &pki.anonymous);
    // Plain text is refused: the server answers TLS_REQD.
    let plain = nbdinfo(&format!("nbd://localhost:{}/", port(&srv)));
    assert_ne!(plain.code(), 0, "plain text accepted: {}", plain.all());
    assert!(srv.log().contains("TLS established"));
}

#[test]
fn tls_on_lets_clients_choose() {
    require_clients!("nbdinfo");
    if common::standin_skips("vramdisk's TLS flags") {
        return;
    }
    let pki = Pki::new();
    let srv = tls_server(&pki, "on", false);
    nbdinfo(&nbds(&srv, &pki.anonymous)).assert_success();
    nbdinfo(&format!("nbd://localhost:{}/", port(&srv))).assert_success();
}

#[test]
fn mutual_tls_refuses_clients_without_the_right_certificate() {
    require_clients!("nbdinfo", "nbdcopy");
    if common::standin_skips("vramdisk's TLS flags") {
        return;
    }
    let pki = Pki::new();
    let srv = tls_server(&pki, "require", true);
    copy_round_trip(&srv, &pki.client);
    for (who, dir) in [
        ("no certificate", &pki.anonymous),
        ("another CA", &pki.rogue),
    ] {
        let out = nbdinfo(&nbds(&srv, dir));
        assert_ne!(
            out.code(),
            0,
            "a client with {who} got in:\n{}\n{}",
            out.all(),
            srv.log()
        );
    }
    assert!(srv.log().contains("TLS handshake failed"), "{}", srv.log());
    // Still serving the good client.
    nbdinfo(&nbds(&srv, &pki.client)).assert_success();
}

fn qemu_tls_args(certs: &Path, port: u16, file: &str) -> Vec<String> {
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            certs.display()
        ),
        "--image-opts".into(),
        format!(
            "driver=nbd,server.type=inet,server.host=localhost,server.port={port},\
             tls-creds=tls0{file}"
        ),
    ]
}

#[test]
fn qemu_over_mutual_tls() {
    require_clients!("qemu-io", "qemu-img");
    if common::standin_skips("vramdisk's TLS flags") {
        return;
    }
    let pki = Pki::new();
    let srv = tls_server(&pki, "require", true);
    let p = port(&srv);
    let mut w = Command::new("qemu-io");
    // qemu-io takes --image-opts as a flag of its own, and the options as the file name.
    let args = qemu_tls_args(&pki.client, p, "");
    w.args(&args[..2]).arg("--image-opts");
    w.args(["-c", "write -P 0x5a 1M 2M", "-c", "read -P 0x5a 1M 2M"]);
    w.arg(&args[3]);
    let out = timed(&mut w);
    out.assert_success();
    assert!(
        !out.all().contains("Pattern verification failed"),
        "{}",
        out.all()
    );
    let mut info = Command::new("qemu-img");
    info.arg("info").args(&args);
    let out = timed(&mut info);
    out.assert_success();
    assert!(out.all().contains("64 MiB"), "{}", out.all());
    // Without a client certificate: refused.
    let args = qemu_tls_args(&pki.anonymous, p, "");
    let mut info = Command::new("qemu-img");
    info.arg("info").args(&args);
    let out = timed(&mut info);
    assert_ne!(
        out.code(),
        0,
        "qemu without a certificate got in: {}",
        out.all()
    );
}

/// Raw bytes: what `--tls require` answers before TLS.
fn option(s: &mut impl Write, opt: u32, data: &[u8]) {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

fn reply(s: &mut impl Read) -> (u32, u32) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).unwrap();
    (opt, ty)
}

#[test]
fn require_refuses_everything_but_starttls_and_abort() {
    if common::standin_skips("vramdisk's TLS flags") {
        return;
    }
    let pki = Pki::new();
    let srv = tls_server(&pki, "require", false);
    let mut s = srv.connect_raw();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap();
    for opt in [OPT_LIST, OPT_GO, 99] {
        option(&mut s, opt, if opt == OPT_GO { &[0; 6] } else { &[] });
        assert_eq!(reply(&mut s), (opt, REP_ERR_TLS_REQD), "option {opt}");
    }
    option(&mut s, OPT_ABORT, &[]);
    assert_eq!(reply(&mut s), (OPT_ABORT, REP_ACK));

    // NBD_OPT_EXPORT_NAME has no error reply: the server closes.
    let mut s = srv.connect_raw();
    s.read_exact(&mut greet).unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap();
    option(&mut s, OPT_EXPORT_NAME, b"");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "EXPORT_NAME before TLS answered: {rest:?}");

    // STARTTLS is acknowledged (the TLS handshake would follow).
    let mut s = srv.connect_raw();
    s.read_exact(&mut greet).unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap();
    option(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(reply(&mut s), (OPT_STARTTLS, REP_ACK));
}

fn serve_output(args: &[&str]) -> Captured {
    let mut cmd = Command::new(common::vramdisk_bin());
    cmd.args(["serve", "--backend", "host", "--size", "1M"])
        .args(args);
    run_with_timeout(cmd, Duration::from_secs(20))
}

/// A self-signed server certificate for localhost with an RSA key of `bits` bits, made by
/// openssl (rcgen makes no RSA keys), in a directory that is also the client's: the
/// certificate is its own CA.
fn openssl_rsa_pki(bits: u32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = timed(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
            ])
            .args(["-newkey", &format!("rsa:{bits}")])
            .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
            .args(["-keyout", "server-key.pem", "-out", "server-cert.pem"])
            .current_dir(dir.path()),
    );
    out.assert_success();
    std::fs::copy(
        dir.path().join("server-cert.pem"),
        dir.path().join("ca-cert.pem"),
    )
    .unwrap();
    dir
}

/// nbd's own test suite serves with a 2432-bit RSA key, which ring (a multiple of 512 bits
/// only) refused as "failed to parse private key": such keys must be taken.
#[test]
fn rsa_keys_of_any_usual_size_are_taken() {
    require_clients!("nbdinfo", "nbdcopy", "openssl");
    if common::standin_skips("vramdisk's TLS flags") {
        return;
    }
    let pki = openssl_rsa_pki(2432);
    let mut c = ServerConfig::sized(64 * MIB);
    c.extra_args = vec![
        "--tls=require".into(),
        format!(
            "--tls-cert={}",
            pki.path().join("server-cert.pem").display()
        ),
        format!("--tls-key={}", pki.path().join("server-key.pem").display()),
    ];
    let srv = Server::start(c, Transport::Tcp);
    let out = nbdinfo(&nbds(&srv, pki.path()));
    out.assert_success();
    assert!(out.all().contains("export-size: 67108864"), "{}", out.all());
    copy_round_trip(&srv, pki.path());
}

/// A key TLS cannot use at all (RSA below 2048 bits) is refused in one sentence naming the
/// flag and what would do, not as a key that "does not go with" its certificate.
#[test]
fn unusable_tls_keys_are_named_as_such() {
    require_clients!("openssl");
    if common::standin_skips("vramdisk's TLS flags") {
        return;
    }
    let pki = openssl_rsa_pki(1024);
    let key = pki.path().join("server-key.pem");
    let out = serve_output(&[
        "--tls=require",
        &format!(
            "--tls-cert={}",
            pki.path().join("server-cert.pem").display()
        ),
        &format!("--tls-key={}", key.display()),
    ]);
    assert_ne!(out.code(), 0, "a 1024-bit RSA key was taken");
    let all = out.all();
    assert!(
        all.contains(&format!(
            "--tls-key {}: TLS cannot use this private key",
            key.display()
        )) && all.contains("RSA key of 2048 to 8192 bits")
            && !all.contains("does not go with"),
        "{all}"
    );
}

#[test]
fn network_listening_needs_tls_or_consent() {
    if common::standin_skips("vramdisk's CLI") {
        return;
    }
    let port = common::free_port().to_string();
    let addr = format!("0.0.0.0:{port}");
    let out = serve_output(&["--listen", &addr]);
    assert_ne!(out.code(), 0);
    let all = out.all();
    assert!(
        all.contains("--allow-insecure") && all.contains("--tls require"),
        "{all}"
    );
    // TLS without certificates: one sentence naming the flags.
    let out = serve_output(&["--tls", "require"]);
    assert!(out.all().contains("--tls-cert"), "{}", out.all());
    // With consent or TLS required, it starts (then is stopped here).
    let pki = Pki::new();
    for extra in [
        vec!["--allow-insecure".to_string()],
        pki.server_args("require", false),
    ] {
        let mut c = ServerConfig::sized(MIB);
        c.extra_args = vec!["--listen".into(), addr.clone()];
        c.extra_args.extend(extra);
        let mut cmd = Command::new(common::vramdisk_bin());
        cmd.args(["serve", "--backend", "host", "--size", "1M"])
            .args(&c.extra_args);
        let mut bg = common::Background::spawn(cmd);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_err() {
            assert!(bg.try_wait().is_none(), "refused with {:?}", c.extra_args);
            assert!(std::time::Instant::now() < deadline, "never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        bg.kill();
    }
}

#[test]
fn unix_sockets_are_private_unless_widened() {
    use std::os::unix::fs::PermissionsExt;
    if common::standin_skips("vramdisk's socket permissions") {
        return;
    }
    let srv = Server::start(ServerConfig::sized(MIB), Transport::Unix);
    let common::Endpoint::Unix(path) = srv.endpoint() else {
        unreachable!()
    };
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let mut c = ServerConfig::sized(MIB);
    c.extra_args = vec!["--socket-mode=0660".into(), "--socket-group=0".into()];
    let srv = Server::start(c, Transport::Unix);
    let common::Endpoint::Unix(path) = srv.endpoint() else {
        unreachable!()
    };
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");
}

#[test]
fn stalled_tls_handshake_is_dropped() {
    if common::standin_skips("vramdisk's TLS flags") {
        return;
    }
    let pki = Pki::new();
    let mut c = ServerConfig::sized(MIB);
    c.extra_args = pki.server_args("require", true);
    c.extra_args
        .extend(["--handshake-timeout".into(), "1".into()]);
    let srv = Server::start(c, Transport::Tcp);
    let mut s = srv.connect_raw();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap();
    option(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(reply(&mut s), (OPT_STARTTLS, REP_ACK));
    // No ClientHello follows: the server gives up after the handshake timeout.
    let t0 = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let waited = t0.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "a stalled TLS handshake held on for {waited:?}"
    );
    // The log line follows the close.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !srv.log().contains("no handshake within") {
        assert!(std::time::Instant::now() < deadline, "{}", srv.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client through STARTTLS on a raw socket, with rustls: the NBD handshake up to
/// NBD_OPT_GO on the default export (simple replies).
fn tls_transmission(
    srv: &Server,
    ca: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port(srv))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap();
    option(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(reply(&mut s), (OPT_STARTTLS, REP_ACK));
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, s);
    option(&mut tls, OPT_GO, &[0; 6]);
    while reply(&mut tls).1 != REP_ACK {}
    tls
}

/// SIGTERM while a TLS client has more requests queued than the server has read, reads its
/// replies slowly and keeps sending: every request the server took is answered whole, and
/// the stream then ends with TLS's close_notify, not a cut. The TLS relay in the server has
/// to keep forwarding replies after the server stopped reading requests.
#[test]
fn sigterm_over_tls_with_a_slow_reader_gets_every_reply() {
    if common::standin_skips("vramdisk's TLS flags") {
        return;
    }
    const EXPORT: u64 = 64 * MIB;
    let pki = Pki::new();
    // The least --inflight-memory there is (32M: 512 of these reads), so that the replies
    // owed at SIGTERM reach a reader this slow well inside the server's grace
    // (SHUTDOWN_GRACE, 5 s) on a loaded machine too; with the default 128M they were up to
    // 2,048, and at 300 µs a reply and more under load that came close to the grace.
    let srv = tls_server_with(&pki, "require", false, &["--inflight-memory", "32M"]);
    let mut tls = tls_transmission(&srv, &pki.server.join("ca-cert.pem"));
    // NBD_CMD_READ (0) of 64 KiB.
    let request = |i: u64| request_header(0, i, (i * 65536) % EXPORT, 65536);
    // Far more in replies than the server buffers.
    let mut sent = 0u64;
    for _ in 0..4096 {
        tls.write_all(&request(sent)).unwrap();
        sent += 1;
    }
    // SIGTERM from another thread, once some replies are in: `terminate` waits for the exit.
    let (go, signal) = std::sync::mpsc::channel::<()>();
    let stopper = std::thread::spawn(move || {
        let mut srv = srv;
        let _ = signal.recv();
        let status = srv.terminate(Duration::from_secs(10));
        (status, srv)
    });
    let mut replies = 0u64;
    let mut data = vec![0u8; 65536];
    loop {
        let mut h = [0u8; 16];
        // rustls: Ok(0) at close_notify, UnexpectedEof if the connection was cut.
        match tls.read(&mut h[..1]) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => panic!("the stream failed with '{e}' after {replies} replies"),
        }
        if let Err(e) = tls.read_exact(&mut h[1..]) {
            panic!("a torn reply header after {replies} replies: {e}");
        }
        assert_eq!(&h[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes(), "reply magic");
        assert_eq!(&h[4..8], &[0; 4], "error in reply {replies}");
        if let Err(e) = tls.read_exact(&mut data) {
            panic!("a torn read reply after {replies} replies: {e}");
        }
        replies += 1;
        if replies == 200 {
            go.send(()).unwrap();
        }
        if replies >= 200 {
            // Still sending while the server shuts down; refused sends are fine.
            let _ = tls.write_all(&request(sent));
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    let (status, srv) = stopper.join().unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
    let log = srv.log();
    let served: u64 = log
        .lines()
        .find_map(|l| l.split("server shutting down (").nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of requests served in the log:\n{log}"));
    assert_eq!(
        replies, served,
        "replies received against requests the server took"
    );
}
