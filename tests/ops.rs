//! Running the daemon for real, through the binary: persistence, status, metrics, config
//! files, readiness notification, completions and man page. Everything here uses
//! `--backend host` and needs no NBD client, so it runs anywhere.

#[path = "common/prometheus.rs"]
mod prometheus;

mod common;
use common::pattern;
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vramdisk::engine::host::HostBackend;
use vramdisk::engine::persist::{self, NoProgress};
use vramdisk::engine::{BlockDevice, SparseDevice, SparseOptions};

fn bin() -> PathBuf {
    std::env::var_os("VRAMDISK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_vramdisk")))
}

/// A running daemon in its own runtime directory; killed on drop.
struct Daemon {
    child: Child,
    runtime: PathBuf,
    _notify_dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `vramdisk serve ARGS` and waits for READY=1 on a notify socket.
    fn start(runtime: &Path, args: &[&str]) -> Daemon {
        let notify_dir = tempfile::tempdir().unwrap();
        let notify = notify_dir.path().join("notify");
        let sock = UnixDatagram::bind(&notify).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut child = Command::new(bin())
            .arg("serve")
            .args(args)
            .env("VRAMDISK_RUNTIME_DIR", runtime)
            .env("NOTIFY_SOCKET", &notify)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vramdisk");
        let mut buf = [0u8; 4096];
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "no readiness notification ({e}); stderr:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        };
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(
            msg.lines().any(|l| l == "READY=1"),
            "first notification is not READY=1: {msg:?}"
        );
        Daemon {
            child,
            runtime: runtime.to_path_buf(),
            _notify_dir: notify_dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn cli(&self, args: &[&str]) -> Output {
        cli(&self.runtime, args)
    }

    fn status(&self) -> Vec<Value> {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
    }

    /// SIGTERM, then waits; returns the exit status and stderr.
    fn stop(mut self) -> (bool, String) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                self.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                return (status.success(), err);
            }
            assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cli(runtime: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("VRAMDISK_RUNTIME_DIR", runtime)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run vramdisk")
}

/// Runs `vramdisk serve ARGS` expecting it to fail at start; returns stderr.
fn serve_fails(runtime: &Path, args: &[&str]) -> String {
    let out = Command::new(bin())
        .arg("serve")
        .args(args)
        .env("VRAMDISK_RUNTIME_DIR", runtime)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn device(size: u64) -> Arc<dyn BlockDevice> {
    let mut opts = SparseOptions::new(size);
    opts.chunk_size = 1 << 20;
    opts.buffer_limit = 128 << 20;
    Arc::new(SparseDevice::new(HostBackend::new(), opts).unwrap())
}

const SIZE: u64 = 64 << 20;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// An image of a 64 MiB device with data at a few places; returns its contents too.
fn make_image(path: &Path) -> Vec<u8> {
    rt().block_on(async {
        let dev = device(SIZE);
        dev.write(4096 * 3 + 17, &pattern(1, 300_000), false)
            .await
            .unwrap();
        dev.write((9 << 20) - 1000, &pattern(2, 5000), false)
            .await
            .unwrap();
        dev.write(SIZE - 8192, &pattern(3, 8192), false)
            .await
            .unwrap();
        persist::save(&*dev, path, &NoProgress).await.unwrap();
        contents(&*dev).await
    })
}

async fn contents(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; dev.size() as usize];
    for (i, piece) in v.chunks_mut(8 << 20).enumerate() {
        dev.read(i as u64 * (8 << 20), piece).await.unwrap();
    }
    v
}

/// Loads `path` into a fresh engine device and returns its contents (after a full check).
fn image_contents(path: &Path) -> Vec<u8> {
    persist::verify(path).expect("saved file verifies");
    rt().block_on(async {
        let dev = device(SIZE);
        persist::load(&*dev, path, &NoProgress).await.unwrap();
        contents(&*dev).await
    })
}

#[test]
fn load_then_save_on_demand_and_at_stop_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("in.img");
    let want = make_image(&image);
    let at_stop = dir.path().join("at-stop.img");
    let d = Daemon::start(
        dir.path(),
        &[
            "--backend=host",
            "--size=64M",
            "--listen=127.0.0.1:0",
            "--load",
            image.to_str().unwrap(),
            "--save",
            at_stop.to_str().unwrap(),
        ],
    );
    // The loaded data is resident: three 2 MiB chunks (the default chunk size) hold it.
    let st = d.status();
    let e = &st[0]["exports"][0];
    assert_eq!(e["size"], SIZE);
    assert_eq!(e["allocated"], 6u64 << 20, "{e}");

    // `vramdisk save` with a relative path, resolved against the caller's directory.
    let out = Command::new(bin())
        .args(["save", "on-demand.img"])
        .current_dir(dir.path())
        .env("VRAMDISK_RUNTIME_DIR", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let on_demand = dir.path().join("on-demand.img");
    assert!(image_contents(&on_demand) == want, "on-demand save differs");

    let (ok, err) = d.stop();
    assert!(ok, "daemon failed at stop: {err}");
    // Not a terminal: progress and the result are plain log lines.
    assert!(err.contains("saved export '' to"), "{err}");
    assert!(
        err.contains("loaded 4 MiB") || err.contains("loaded 6 MiB"),
        "{err}"
    );
    assert!(image_contents(&at_stop) == want, "save at stop differs");
    // Sparse: the three chunks and a little metadata, not 64 MiB.
    let len = std::fs::metadata(&at_stop).unwrap().len();
    assert!(len < (6 << 20) + 4096, "file is {len} bytes");
    // The control socket went away with the daemon.
    assert!(
        !dir.path().read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".sock")),
        "control socket left behind"
    );
}

#[test]
fn persist_starts_empty_then_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keep.img");
    let args = [
        "--backend=host",
        "--size=64M",
        "--listen=127.0.0.1:0",
        "--persist",
        file.to_str().unwrap(),
    ];
    let d = Daemon::start(dir.path(), &args);
    let (ok, err) = d.stop();
    assert!(ok, "{err}");
    assert!(file.exists());
    // The next start loads what the last one saved.
    let want = make_image(&file);
    let d = Daemon::start(dir.path(), &args);
    assert_eq!(d.status()[0]["exports"][0]["allocated"], 6u64 << 20);
    let (ok, err) = d.stop();
    assert!(ok, "{err}");
    assert!(image_contents(&file) == want);
}

#[test]
fn damaged_files_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.img");
    make_image(&good);
    let bytes = std::fs::read(&good).unwrap();
    let bad = dir.path().join("bad.img");
    let run = |extra: &str| {
        serve_fails(
            dir.path(),
            &[
                "--backend=host",
                extra,
                "--listen=127.0.0.1:0",
                "--load",
                bad.to_str().unwrap(),
            ],
        )
    };

    // One flipped bit in the data of the middle record.
    let mut flipped = bytes.clone();
    flipped[64 + (1 << 20) + 12345] ^= 1;
    std::fs::write(&bad, &flipped).unwrap();
    let err = run("--size=64M");
    assert!(err.contains("corrupt") && err.contains("checksum"), "{err}");

    // Cut short.
    std::fs::write(&bad, &bytes[..bytes.len() - 100]).unwrap();
    let err = run("--size=64M");
    assert!(err.contains("truncated"), "{err}");

    // Not an image at all.
    std::fs::write(&bad, vec![7u8; 4096]).unwrap();
    let err = run("--size=64M");
    assert!(err.contains("not a vramdisk image"), "{err}");

    // Another device size.
    std::fs::write(&bad, &bytes).unwrap();
    let err = run("--size=128M");
    let last = err.trim().lines().last().unwrap();
    assert!(
        last.starts_with("vramdisk: ") && last.contains("same --size"),
        "{err}"
    );
}

fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

/// The value of the sample `name{labels}` in a Prometheus exposition.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The host:port of the metrics endpoint that a daemon's status names.
fn metrics_addr(status: &[Value]) -> &str {
    let url = status[0]["metrics"].as_str().expect("a metrics endpoint");
    url.strip_prefix("http://")
        .and_then(|u| u.strip_suffix("/metrics"))
        .expect("http://HOST:PORT/metrics")
}

#[test]
fn status_and_metrics_count_gpu_copies_on_gpu_memory() {
    if std::env::var("VRAMDISK_TEST_GPU").as_deref() != Ok("1") {
        common::skip_loudly(
            "status_and_metrics_count_gpu_copies_on_gpu_memory (set VRAMDISK_TEST_GPU=1 on a \
             machine with an NVIDIA GPU)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("in.img");
    make_image(&image);
    // Loading the image writes its data through the GPU copy queue.
    let d = Daemon::start(
        dir.path(),
        &[
            "--backend=cuda",
            "--size=64M",
            "--metrics=127.0.0.1:0",
            "--load",
            image.to_str().unwrap(),
        ],
    );
    let st = d.status();
    let copies = &st[0]["exports"][0]["gpu_copies"];
    let ops = copies["ops"].as_u64().unwrap_or(0);
    assert!(ops > 0, "no GPU copies counted after a load: {copies}");
    assert!(copies["batched_ops"].as_u64().unwrap() <= ops, "{copies}");
    let (_, body) = http_get(metrics_addr(&st), "/metrics");
    let counted = sample(&body, "vramdisk_gpu_copies_total{export=\"\"}").unwrap_or(0.0);
    assert!(counted >= ops as f64, "{body}");
}

#[test]
fn status_and_metrics_describe_every_export() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("in.img");
    make_image(&image);
    let d = Daemon::start(
        dir.path(),
        &[
            "--backend=host",
            "--size=64M",
            "--export=scratch=1G",
            "--max-memory=256M",
            "--listen=127.0.0.1:0",
            "--metrics=127.0.0.1:0",
            "--load",
            image.to_str().unwrap(),
        ],
    );
    let st = d.status();
    assert_eq!(st.len(), 1);
    assert_eq!(st[0]["pid"], d.pid());
    let exports = st[0]["exports"].as_array().unwrap();
    assert_eq!(exports.len(), 2);
    assert_eq!(exports[1]["name"], "scratch");
    assert_eq!(exports[1]["size"], 1u64 << 30);
    assert_eq!(exports[1]["max_memory"], 256u64 << 20);
    assert_eq!(exports[1]["allocated"], 0);
    assert_eq!(exports[0]["backend"], "host");
    // Host memory has no GPU copy queues to count.
    assert!(exports[0]["gpu_copies"].is_null(), "{:?}", exports[0]);

    // The table: a header and one line per export, with the pid and sizes.
    let out = d.cli(&["status"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("PID") && lines[0].contains("USED"));
    assert!(lines[1].contains("(default)") && lines[1].contains("64M") && lines[1].contains("6M"));
    assert!(lines[2].contains("scratch") && lines[2].contains("1G") && lines[2].contains("256M"));
    assert!(lines[2].starts_with(&d.pid().to_string()));

    let (head, body) = http_get(metrics_addr(&st), "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"));
    assert!(!body.contains("vramdisk_gpu_cop"), "{body}");
    assert_eq!(
        sample(&body, "vramdisk_size_bytes{export=\"scratch\"}"),
        Some((1u64 << 30) as f64)
    );
    assert_eq!(
        sample(
            &body,
            "vramdisk_memory_used_bytes{export=\"\",backend=\"host\"}"
        ),
        Some((6u64 << 20) as f64)
    );
    assert_eq!(
        sample(&body, "vramdisk_memory_limit_bytes{export=\"scratch\"}"),
        Some((256u64 << 20) as f64)
    );
    assert_eq!(
        sample(&body, "vramdisk_connections{export=\"scratch\"}"),
        Some(0.0)
    );
    // Two exports, one buffer budget (--buffer-memory, 1G by default), idle.
    assert_eq!(
        sample(&body, "vramdisk_buffer_limit_bytes"),
        Some((1u64 << 30) as f64)
    );
    assert_eq!(sample(&body, "vramdisk_buffer_in_use_bytes"), Some(0.0));
    assert_eq!(st[0]["buffer_limit"], 1u64 << 30);
    for op in [
        "read",
        "write",
        "write_zeroes",
        "trim",
        "flush",
        "cache",
        "extents",
    ] {
        let inf = format!(
            "vramdisk_request_duration_seconds_bucket{{export=\"scratch\",op=\"{op}\",le=\"+Inf\"}}"
        );
        let count =
            format!("vramdisk_request_duration_seconds_count{{export=\"scratch\",op=\"{op}\"}}");
        assert_eq!(sample(&body, &inf), sample(&body, &count), "{op}");
        assert!(
            sample(
                &body,
                &format!("vramdisk_bytes_total{{export=\"scratch\",op=\"{op}\"}}")
            )
            .is_some()
        );
    }
    // The whole exposition reads as a Prometheus server reads it, and says what `status` says.
    let samples = prometheus::parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    assert_eq!(
        samples["vramdisk_connections_total{export=\"scratch\"}"],
        exports[1]["connections_total"].as_f64().unwrap()
    );
    assert_eq!(
        samples["vramdisk_chunks{export=\"\"}"],
        exports[0]["chunks"].as_f64().unwrap()
    );
    let (head, _) = http_get(metrics_addr(&st), "/nothing");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    // The control protocol answers garbage with an error line and keeps the connection.
    {
        use std::io::BufRead;
        let sock = dir.path().join(format!("{}.sock", d.pid()));
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"hello\n{\"cmd\":\"reboot\"}\n{\"cmd\":\"save\",\"path\":\"rel.img\"}\n{\"cmd\":\"status\"}\n")
            .unwrap();
        let mut r = std::io::BufReader::new(s);
        let mut replies = Vec::new();
        for _ in 0..4 {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            replies.push(serde_json::from_str::<Value>(&line).unwrap());
        }
        assert_eq!(replies[0]["ok"], false);
        assert_eq!(replies[1]["ok"], false);
        assert!(replies[2]["error"].as_str().unwrap().contains("absolute"));
        assert_eq!(replies[3]["ok"], true);
        assert_eq!(replies[3]["pid"], d.pid());

        // A save that asks for progress gets progress lines (if it takes long enough), then
        // its reply.
        let target = dir.path().join("progress.img");
        let mut s = r.into_inner();
        writeln!(
            s,
            "{}",
            serde_json::json!({"cmd": "save", "path": target, "progress": true})
        )
        .unwrap();
        let mut r = std::io::BufReader::new(s);
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            if v.get("ok").is_some() {
                assert_eq!(v["ok"], true, "{v}");
                assert_eq!(v["saved"]["data_bytes"], 6u64 << 20);
                break;
            }
            assert!(v["progress"].as_u64().unwrap() <= v["total"].as_u64().unwrap());
        }
        persist::verify(&target).unwrap();
    }

    // `save` names the export; an unknown one is refused in a sentence.
    let out = d.cli(&[
        "save",
        "--export=nope",
        dir.path().join("x.img").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no export named 'nope'"));
    let (ok, err) = d.stop();
    assert!(ok, "{err}");
}

#[test]
fn stale_control_sockets_are_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    // A pid that cannot exist (above the kernel's pid_max limit of 2^22).
    let stale = dir.path().join("99999999.sock");
    std::os::unix::net::UnixListener::bind(&stale).unwrap();
    let out = cli(dir.path(), &["status", "--json"]);
    assert!(out.status.success());
    assert_eq!(
        serde_json::from_slice::<Vec<Value>>(&out.stdout)
            .unwrap()
            .len(),
        0
    );
    assert!(!stale.exists(), "stale socket not removed");
    let out = cli(dir.path(), &["save", "/tmp/never.img"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no vramdisk daemon is running"));

    // A socket file of a live pid that nobody listens on (pid reused) is stale too, and a
    // starting daemon clears dead ones.
    let reused = dir.path().join(format!("{}.sock", std::process::id()));
    drop(std::os::unix::net::UnixListener::bind(&reused).unwrap());
    std::os::unix::net::UnixListener::bind(&stale).unwrap();
    let d = Daemon::start(
        dir.path(),
        &["--backend=host", "--size=1M", "--listen=127.0.0.1:0"],
    );
    assert!(!stale.exists(), "daemon start left a dead socket");
    assert_eq!(d.status().len(), 1);
    assert!(!reused.exists(), "status left a refused socket");
    d.stop();
}

/// Everything status says about an export that flags or a config file decide.
fn settings(d: &Daemon) -> Vec<Value> {
    d.status()[0]["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            serde_json::json!({
                "name": e["name"], "size": e["size"], "backend": e["backend"],
                "max_memory": e["max_memory"], "read_only": e["read_only"],
                "allocated": e["allocated"], "save": e["save"],
            })
        })
        .collect()
}

#[test]
fn config_file_is_equivalent_to_flags_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let save = dir.path().join("a.img");
    let flags = [
        "--backend=host".to_string(),
        "--size=32M".into(),
        "--export=b=16M".into(),
        "--max-memory=8M".into(),
        "--chunk-size=1M".into(),
        "--read-only".into(),
        "--listen=127.0.0.1:0".into(),
        format!("--save={}", save.display()),
    ];
    let flags: Vec<&str> = flags.iter().map(|s| s.as_str()).collect();
    let d = Daemon::start(dir.path(), &flags);
    let from_flags = settings(&d);
    d.stop();

    let config = dir.path().join("vramdisk.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"

[device]
backend = "host"
max_memory = "8M"
chunk_size = "1M"
read_only = true

[[export]]
name = ""
size = "32M"
save = "{}"

[[export]]
name = "b"
size = 16777216
"#,
            save.display()
        ),
    )
    .unwrap();
    let d = Daemon::start(dir.path(), &["--config", config.to_str().unwrap()]);
    assert_eq!(settings(&d), from_flags);
    d.stop();

    // A flag beats the file; per-export settings apply to their export only.
    std::fs::write(
        &config,
        r#"
[server]
listen = "127.0.0.1:0"
[device]
backend = "host"
max_memory = "8M"
[[export]]
name = "a"
size = "32M"
[[export]]
name = "b"
size = "4M"
max_memory = "4M"
preallocate = true
"#,
    )
    .unwrap();
    let d = Daemon::start(
        dir.path(),
        &["--config", config.to_str().unwrap(), "--max-memory=12M"],
    );
    let s = settings(&d);
    assert_eq!(s[0]["max_memory"], 12u64 << 20);
    assert_eq!(s[1]["max_memory"], 4u64 << 20);
    assert_eq!(s[1]["allocated"], 4u64 << 20, "b is preallocated");
    assert_eq!(s[0]["allocated"], 0, "a is not");
    d.stop();

    let out = Command::new(bin())
        .args(["serve", "--config", "/nonexistent/vramdisk.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the config file"));
}

#[test]
fn completions_and_man_page_come_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = cli(dir.path(), &["completions", shell]);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("serve") && text.contains("max-memory"),
            "{shell}"
        );
    }
    let out = cli(dir.path(), &["manpage"]);
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.starts_with(".ie") || page.contains(".TH vramdisk 1"));
    assert!(page.contains("serve"));
    let mandir = dir.path().join("man");
    let out = cli(dir.path(), &["manpage", "--dir", mandir.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(mandir.join("vramdisk-serve.1").exists());
}

#[test]
fn read_only_export_is_filled_from_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("in.img");
    let want = make_image(&image);
    let d = Daemon::start(
        dir.path(),
        &[
            "--backend=host",
            "--size=64M",
            "--read-only",
            "--listen=127.0.0.1:0",
            "--load",
            image.to_str().unwrap(),
        ],
    );
    let e = &d.status()[0]["exports"][0];
    assert_eq!(e["read_only"], true);
    assert_eq!(e["allocated"], 6u64 << 20);
    let copy = dir.path().join("copy.img");
    let out = d.cli(&["save", copy.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(image_contents(&copy) == want);
    let (ok, err) = d.stop();
    assert!(ok, "{err}");
}

#[test]
fn socket_activation_takes_the_passed_sockets() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let unix_path = dir.path().join("nbd.sock");
    let unix = std::os::unix::net::UnixListener::bind(&unix_path).unwrap();
    let (tcp_fd, unix_fd) = (tcp.as_raw_fd(), unix.as_raw_fd());
    let notify = dir.path().join("notify");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // The shell sets LISTEN_PID to its own pid and execs the daemon, which keeps it, the way
    // systemd does.
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=2 exec \"$0\" serve --backend=host --size=16M")
        .arg(bin())
        .env("VRAMDISK_RUNTIME_DIR", dir.path())
        .env("NOTIFY_SOCKET", &notify)
        .stderr(Stdio::null());
    // Park both sockets above every descriptor in use before moving them to 3 and 4, so that
    // neither move overwrites the other socket whatever numbers the kernel handed out.
    let (park_tcp, park_unix) = {
        let top = tcp_fd.max(unix_fd).max(4);
        (top + 1, top + 2)
    };
    // SAFETY: only dup2 between fork and exec, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            for (from, to) in [
                (tcp_fd, park_tcp),
                (unix_fd, park_unix),
                (park_tcp, 3),
                (park_unix, 4),
            ] {
                if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut buf = [0u8; 256];
    let got = sock.recv(&mut buf);
    let status = cli(dir.path(), &["status", "--json"]);
    let _ = child.kill();
    let _ = child.wait();
    let n = got.expect("READY=1");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("READY=1"));
    let st: Vec<Value> = serde_json::from_slice(&status.stdout).unwrap();
    let listen: Vec<String> = st[0]["listen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    // Exactly the two passed sockets; no default 127.0.0.1:10809 next to them.
    assert_eq!(listen.len(), 2, "{listen:?}");
    assert!(
        listen[0].contains(&format!("127.0.0.1:{port}")),
        "{listen:?}"
    );
    assert!(
        listen[1].contains(&unix_path.display().to_string()),
        "{listen:?}"
    );
}

/// A client in the transmission phase counts as a connection of its export in `status`, and
/// stops counting when it goes away.
#[test]
fn status_counts_nbd_connections() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let d = Daemon::start(
        dir.path(),
        &[
            "--backend",
            "host",
            "--size",
            "64M",
            "--socket",
            sock.to_str().unwrap(),
        ],
    );
    let connections = |d: &Daemon| d.status()[0]["exports"][0]["connections"].as_u64().unwrap();
    assert_eq!(connections(&d), 0);

    // Fixed newstyle handshake by hand: NBD_OPT_EXPORT_NAME "" with NO_ZEROES.
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"IHAVEOPT").unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap();
    s.write_all(&0u32.to_be_bytes()).unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 64 << 20);

    let until = |want: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while connections(&d) != want {
            assert!(Instant::now() < deadline, "connections never became {want}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    until(1);
    drop(s);
    until(0);
    let (clean, err) = d.stop();
    assert!(clean, "{err}");
}

/// The strict reader the metrics test relies on refuses what a scraper would misread.
#[test]
fn the_exposition_reader_refuses_what_scrapers_misread() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\\\"\"} 1\n";
    assert!(prometheus::parse(good).is_ok());
    for bad in [
        "a_total 1\n",
        "# HELP a A.\n# TYPE a counter\na 1\n",
        "# HELP a A.\n# TYPE a gauge\nb 1\n",
        "# HELP a A.\n# TYPE a gauge\na{x=\"\\q\"} 1\n",
        "# HELP a A.\n# TYPE a gauge\na 1\na 2\n",
        "# HELP a A.\n# TYPE a gauge\n# HELP a A.\n# TYPE a gauge\n",
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
        "# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 1\n",
    ] {
        assert!(prometheus::parse(bad).is_err(), "accepted {bad:?}");
    }
}
