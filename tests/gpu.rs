//! The CUDA backend on a real GPU. These tests run only with `VRAMDISK_TEST_GPU=1` (the GPU
//! machine's `.gpu/run-tests` sets it); elsewhere each prints a SKIPPED line. The one test
//! that needs no GPU checks the message given when there is no NVIDIA driver.

mod common;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use vramdisk::engine::cuda::{self, BatchMode, CudaBackend, CudaOptions, QueueOptions};
use vramdisk::engine::{BlockDevice, IoBuf, SparseDevice, SparseOptions, ZeroFlags};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 2 * MIB;

fn bin() -> String {
    std::env::var("VRAMDISK_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_vramdisk").to_string())
}

/// True when GPU tests are switched on; otherwise prints the SKIPPED line.
fn gpu_enabled(test: &str) -> bool {
    if std::env::var("VRAMDISK_TEST_GPU").as_deref() == Ok("1") {
        return true;
    }
    common::skip_loudly(&format!(
        "{test} (set VRAMDISK_TEST_GPU=1 on a machine with an NVIDIA GPU)"
    ));
    false
}

/// GPU tests measure free GPU memory, so they run one at a time.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Log lines of this test process, captured (for checking how often a warning is given).
static LOG: Mutex<String> = Mutex::new(String::new());

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().push_str(&String::from_utf8_lossy(b));
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(|| Capture)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}

fn count_log_lines(text: &str) -> usize {
    LOG.lock()
        .unwrap()
        .lines()
        .filter(|l| l.contains(text))
        .count()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

fn open_with(
    size: u64,
    gpus: &[usize],
    keep_free: Option<u64>,
    batch: BatchMode,
    preallocate: bool,
) -> anyhow::Result<Arc<SparseDevice<CudaBackend>>> {
    let mut opts = SparseOptions::new(size);
    opts.chunk_size = CHUNK as usize;
    opts.preallocate = preallocate;
    let copts = CudaOptions {
        gpus: gpus.to_vec(),
        keep_free,
        queue: QueueOptions {
            batch,
            ..QueueOptions::default()
        },
    };
    cuda::open(&copts, opts)
}

fn open(size: u64) -> Arc<SparseDevice<CudaBackend>> {
    open_with(size, &[0], None, BatchMode::Kernel, false).expect("opening a CUDA device")
}

fn free_memory(gpu: usize) -> u64 {
    cuda::probe().unwrap()[gpu].free_memory
}

/// Writes `data` at `offset`, through a pinned I/O buffer or straight from the slice.
async fn write(dev: &SparseDevice<CudaBackend>, offset: u64, data: &[u8], pinned: bool) {
    if pinned {
        let mut buf = dev.buffers().get(data.len()).await.unwrap();
        buf.copy_from_slice(data);
        dev.write(offset, &buf, false).await
    } else {
        dev.write(offset, data, false).await
    }
    .unwrap_or_else(|e| panic!("write {}+{}: {e}", offset, data.len()));
}

async fn read(dev: &SparseDevice<CudaBackend>, offset: u64, len: usize, pinned: bool) -> Vec<u8> {
    if pinned {
        let mut buf: IoBuf = dev.buffers().get(len).await.unwrap();
        dev.read(offset, &mut buf)
            .await
            .unwrap_or_else(|e| panic!("read {offset}+{len}: {e}"));
        buf.to_vec()
    } else {
        let mut v = vec![0x5au8; len];
        dev.read(offset, &mut v)
            .await
            .unwrap_or_else(|e| panic!("read {offset}+{len}: {e}"));
        v
    }
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, want {:#04x} ({} bytes)",
            got[i],
            want[i],
            want.len()
        );
    }
}

/// Patterns at many sizes and alignments, across chunk boundaries and the short last chunk,
/// through pinned buffers and plain ones, then the whole device read back against a model.
fn roundtrip(batch: BatchMode, test: &str) {
    if !gpu_enabled(test) {
        return;
    }
    let _g = serial();
    let size = 40 * MIB + 3 * 4096 + 512;
    let dev = open_with(size, &[0], None, batch, false).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = StdRng::seed_from_u64(7);
    let sizes: &[usize] = &[
        512,
        4096,
        4097,
        65536,
        65537,
        (MIB - 3) as usize,
        (2 * MIB) as usize,
        (2 * MIB + 512) as usize,
        (5 * MIB + 123) as usize,
        (32 * MIB) as usize,
    ];
    runtime().block_on(async {
        for (i, &len) in sizes.iter().enumerate() {
            let offsets = [
                0u64,
                CHUNK - (len as u64 / 2).min(CHUNK),
                3 * CHUNK + 1,
                size - len as u64,
                rng.random_range(0..size - len as u64),
            ];
            for (j, &off) in offsets.iter().enumerate() {
                let mut data = vec![0u8; len];
                rng.fill(&mut data[..]);
                let pinned = (i + j) % 2 == 0;
                write(&dev, off, &data, pinned).await;
                model[off as usize..][..len].copy_from_slice(&data);
                for pinned_read in [true, false] {
                    let got = read(&dev, off, len, pinned_read).await;
                    assert_same(&got, &data, &format!("{len} bytes at {off}"));
                }
            }
        }
        // Many small requests at once (batched), some unaligned, then read back together.
        let mut small = Vec::new();
        for k in 0..512u64 {
            let off = (k * 77 * 4096 + (k % 3) * 1000) % (size - 8192);
            let len = if k % 5 == 0 { 512 } else { 4096 };
            small.push((off, len));
        }
        small.sort();
        small.dedup_by(|b, a| b.0 < a.0 + a.1 as u64);
        let mut bufs = Vec::new();
        for &(off, len) in &small {
            let mut buf = dev.buffers().get(len).await.unwrap();
            rng.fill(&mut buf[..]);
            model[off as usize..][..len].copy_from_slice(&buf);
            bufs.push((off, buf));
        }
        futures::future::try_join_all(bufs.iter().map(|(off, buf)| dev.write(*off, buf, false)))
            .await
            .unwrap();
        let mut reads = Vec::new();
        for &(off, len) in &small {
            reads.push((off, dev.buffers().get(len).await.unwrap()));
        }
        futures::future::try_join_all(
            reads
                .iter_mut()
                .map(|(off, buf)| dev.read(*off, &mut buf[..])),
        )
        .await
        .unwrap();
        for (off, buf) in &reads {
            assert_same(
                buf,
                &model[*off as usize..][..buf.len()],
                &format!("batched read at {off}"),
            );
        }
        // The whole device against the model.
        let mut off = 0;
        while off < size {
            let len = (size - off).min(3 * MIB + 5) as usize;
            let got = read(&dev, off, len, off % 2 == 0).await;
            assert_same(
                &got,
                &model[off as usize..][..len],
                &format!("device at {off}"),
            );
            off += len as u64;
        }
    });
}

#[test]
fn patterns_roundtrip_kernel_batching() {
    roundtrip(BatchMode::Kernel, "patterns_roundtrip_kernel_batching");
}

#[test]
fn patterns_roundtrip_memcpy_batching() {
    roundtrip(BatchMode::MemcpyBatch, "patterns_roundtrip_memcpy_batching");
}

#[test]
fn patterns_roundtrip_no_batching() {
    roundtrip(BatchMode::Off, "patterns_roundtrip_no_batching");
}

#[test]
fn concurrent_writers_on_disjoint_ranges() {
    if !gpu_enabled("concurrent_writers_on_disjoint_ranges") {
        return;
    }
    let _g = serial();
    const TASKS: u64 = 24;
    const REGION: u64 = 3 * MIB + 4096 + 17;
    let dev = open(TASKS * REGION);
    runtime().block_on(async {
        let mut handles = Vec::new();
        for t in 0..TASKS {
            let dev = dev.clone();
            handles.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(t);
                let base = t * REGION;
                let mut model = vec![0u8; REGION as usize];
                for i in 0..150 {
                    let len = if i % 3 == 0 {
                        rng.random_range(1..300_000usize)
                    } else {
                        4096
                    };
                    let off = rng.random_range(0..REGION - len as u64);
                    let mut data = vec![0u8; len];
                    rng.fill(&mut data[..]);
                    write(&dev, base + off, &data, i % 2 == 0).await;
                    model[off as usize..][..len].copy_from_slice(&data);
                }
                let got = read(&dev, base, REGION as usize, t % 2 == 0).await;
                assert_same(&got, &model, &format!("region of task {t}"));
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
    });
}

#[test]
fn trim_and_zero_free_gpu_memory() {
    if !gpu_enabled("trim_and_zero_free_gpu_memory") {
        return;
    }
    let _g = serial();
    let size = 256 * MIB;
    let dev = open(size);
    let slack = 8 * MIB;
    let free0 = free_memory(0);
    runtime().block_on(async {
        let data = vec![0xc3u8; MIB as usize];
        for i in 0..size / MIB {
            write(&dev, i * MIB, &data, true).await;
        }
        assert_eq!(dev.stats().allocated, size);
        let free1 = free_memory(0);
        assert!(
            free0 - free1 + slack >= size,
            "writing 256 MiB took only {} bytes of GPU memory",
            free0 - free1
        );
        // TRIM of the first half gives its memory back, and it reads as zeros.
        dev.trim(0, size / 2).await.unwrap();
        assert_eq!(dev.stats().allocated, size / 2);
        let free2 = free_memory(0);
        assert!(
            free2 + slack >= free1 + size / 2,
            "trimming 128 MiB gave back only {} bytes",
            free2.saturating_sub(free1)
        );
        assert!(
            read(&dev, 0, (size / 2) as usize, true)
                .await
                .iter()
                .all(|&b| b == 0)
        );
        // Zeroing without freeing (NO_HOLE), unaligned, keeps the memory.
        let (zoff, zlen) = (size / 2 + 100, 3 * MIB + 7);
        let flags = ZeroFlags::default();
        dev.write_zeroes(zoff, zlen, flags).await.unwrap();
        assert_eq!(dev.stats().allocated, size / 2);
        let got = read(&dev, size / 2, (4 * MIB) as usize, false).await;
        for (i, &b) in got.iter().enumerate() {
            let inside = (i as u64) >= 100 && (i as u64) < 100 + zlen;
            assert_eq!(b, if inside { 0 } else { 0xc3 }, "byte {i} after zeroing");
        }
        // Zeroing that may trim frees whole chunks.
        let flags = ZeroFlags {
            may_trim: true,
            ..ZeroFlags::default()
        };
        dev.write_zeroes(size / 2, size / 2, flags).await.unwrap();
        assert_eq!(dev.stats().allocated, 0);
        assert_eq!(dev.stats().chunks, 0);
        let free3 = free_memory(0);
        assert!(
            free3 + slack >= free0,
            "memory not given back: {free3} vs {free0}"
        );
        assert!(
            read(&dev, 0, size as usize, true)
                .await
                .iter()
                .all(|&b| b == 0)
        );
    });
}

#[test]
fn keep_free_refuses_with_enospc() {
    if !gpu_enabled("keep_free_refuses_with_enospc") {
        return;
    }
    let _g = serial();
    capture_logs();
    // The first copies and launches make the driver take memory for the context; let that
    // happen before measuring what is free.
    let warm = open(64 * MIB);
    runtime().block_on(async {
        write(&warm, 0, &vec![1u8; (8 * MIB) as usize], true).await;
        write(&warm, 9 * MIB, &[2u8; 4096], false).await;
        read(&warm, 0, (8 * MIB) as usize, true).await;
    });
    drop(warm);
    let free = free_memory(0);
    let room = 64 * MIB;
    let dev = open_with(1 << 30, &[0], Some(free - room), BatchMode::Kernel, false).unwrap();
    runtime().block_on(async {
        let data = vec![0x11u8; MIB as usize];
        let mut written = 0u64;
        let err = loop {
            match dev.write(written, &data, false).await {
                Ok(()) => written += MIB,
                Err(e) => break e,
            }
            assert!(written < 512 * MIB, "--keep-free did not stop the writes");
        };
        assert_eq!(err.errno(), libc::ENOSPC, "error was {err}");
        assert!(
            written >= room - 16 * MIB && written <= room + 8 * MIB,
            "wrote {written} bytes with {room} to spare"
        );
        // Refused again and again, but warned about once.
        for i in 1..10 {
            let err = dev
                .write(written + i * 2 * MIB, &data, false)
                .await
                .unwrap_err();
            assert_eq!(err.errno(), libc::ENOSPC, "error was {err}");
        }
        let warning = "--keep-free asks to leave";
        assert_eq!(count_log_lines(warning), 1, "log:\n{}", LOG.lock().unwrap());
        // The refusal is clean: what was written reads back, and freeing makes room again.
        assert_eq!(read(&dev, 0, MIB as usize, true).await, data);
        dev.trim(0, 4 * MIB).await.unwrap();
        dev.write(written, &data, false).await.unwrap();
        // A new episode of a full GPU gets a new warning.
        let mut off = written + MIB;
        while dev.write(off, &data, false).await.is_ok() {
            off += MIB;
            assert!(off < 512 * MIB, "--keep-free did not stop the writes");
        }
        assert_eq!(count_log_lines(warning), 2, "log:\n{}", LOG.lock().unwrap());
    });
}

#[test]
fn preallocate_takes_everything_or_refuses() {
    if !gpu_enabled("preallocate_takes_everything_or_refuses") {
        return;
    }
    let _g = serial();
    let size = 512 * MIB;
    let free0 = free_memory(0);
    let dev = open_with(size, &[0], None, BatchMode::Kernel, true).unwrap();
    assert_eq!(dev.stats().allocated, size);
    assert_eq!(dev.stats().chunks, size / CHUNK);
    assert!(free0 - free_memory(0) + 8 * MIB >= size);
    runtime().block_on(async {
        assert!(
            read(&dev, 100 * MIB, MIB as usize, true)
                .await
                .iter()
                .all(|&b| b == 0)
        );
        write(&dev, 0, &vec![9u8; (4 * MIB) as usize], true).await;
        dev.trim(0, 4 * MIB).await.unwrap();
        assert_eq!(
            dev.stats().allocated,
            size,
            "preallocated memory stays allocated"
        );
        assert!(
            read(&dev, 0, (4 * MIB) as usize, false)
                .await
                .iter()
                .all(|&b| b == 0)
        );
    });
    drop(dev);
    let total = cuda::probe().unwrap()[0].total_memory;
    let err = match open_with(total + (1 << 30), &[0], None, BatchMode::Kernel, true) {
        Ok(_) => panic!("--preallocate larger than the GPU succeeded"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("--preallocate needs") && err.contains("free"),
        "message: {err}"
    );
}

#[test]
fn two_gpus_share_one_device() {
    if !gpu_enabled("two_gpus_share_one_device") {
        return;
    }
    let gpus = cuda::probe().unwrap();
    if gpus.len() < 2 {
        common::skip_loudly("two_gpus_share_one_device (this machine has one GPU)");
        return;
    }
    let _g = serial();
    let size = 128 * MIB + 4096;
    let free0: Vec<u64> = (0..2).map(free_memory).collect();
    let dev = open_with(size, &[0, 1], None, BatchMode::Kernel, false).unwrap();
    assert!(dev.describe().starts_with("cuda:0,1"), "{}", dev.describe());
    let mut rng = StdRng::seed_from_u64(3);
    let mut data = vec![0u8; size as usize];
    rng.fill(&mut data[..]);
    runtime().block_on(async {
        // Requests that cross from one GPU's chunk into the other's.
        let mut off = 0;
        while off < size {
            let len = (size - off).min(3 * MIB + 4096) as usize;
            write(&dev, off, &data[off as usize..][..len], off % 2 == 0).await;
            off += len as u64;
        }
        let got = read(&dev, 0, size as usize, true).await;
        assert_same(&got, &data, "device over two GPUs");
    });
    for (g, before) in free0.iter().enumerate() {
        let used = before - free_memory(g);
        assert!(
            used + 8 * MIB >= size / 2,
            "GPU {g} holds only {used} bytes"
        );
    }
}

#[test]
fn devices_lists_gpus_as_json() {
    if !gpu_enabled("devices_lists_gpus_as_json") {
        return;
    }
    // The child process takes GPU memory too; keep it away from tests that measure it.
    let _g = serial();
    let out = Command::new(bin())
        .args(["devices", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = v.as_array().unwrap();
    assert!(!list.is_empty());
    for g in list {
        let total = g["total_memory"].as_u64().unwrap();
        let free = g["free_memory"].as_u64().unwrap();
        assert!(free <= total && total > 1 << 30, "{g}");
        assert!(g["name"].as_str().unwrap().contains("NVIDIA"), "{g}");
        assert_eq!(
            g["pci_bus_id"].as_str().unwrap().matches(':').count(),
            2,
            "{g}"
        );
    }
    let out = Command::new(bin()).arg("devices").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("PCI BUS ID"));
}

#[test]
fn bench_runs_on_the_gpu() {
    if !gpu_enabled("bench_runs_on_the_gpu") {
        return;
    }
    let _g = serial();
    let out = Command::new(bin())
        .args([
            "bench",
            "--backend",
            "cuda",
            "--size",
            "128M",
            "--seconds",
            "0.1",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for t in ["write 1M seq QD16", "read 4K rand QD128", "ceiling: write"] {
        assert!(text.contains(t), "no '{t}' in:\n{text}");
    }
}

/// Runs here: with no NVIDIA driver, `--backend cuda` and `devices` fail with one sentence.
#[test]
fn without_a_driver_cuda_fails_with_one_sentence() {
    if cuda::driver_present() {
        common::skip_loudly(
            "without_a_driver_cuda_fails_with_one_sentence (this machine has an NVIDIA driver)",
        );
        return;
    }
    let sock = tempfile::tempdir().unwrap();
    let sock = sock.path().join("s");
    // The engine states the fact; each command adds advice it can back: `serve` takes
    // --backend, `devices` does not.
    let serve_advice = ": use --backend host to keep the data in host RAM instead";
    let devices_advice = "`vramdisk serve --backend host`";
    let runs: [(Vec<&str>, &str); 3] = [
        (
            vec![
                "serve",
                "--backend",
                "cuda",
                "--size",
                "64M",
                "--socket",
                sock.to_str().unwrap(),
            ],
            serve_advice,
        ),
        (vec!["devices"], devices_advice),
        (vec!["devices", "--json"], devices_advice),
    ];
    for (args, advice) in runs {
        let out = Command::new(bin()).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        let last = err.lines().last().unwrap_or("");
        let want = format!("vramdisk: {}: ", cuda::NO_DRIVER);
        assert!(last.starts_with(&want), "{args:?} said:\n{err}");
        assert!(
            last.contains(advice),
            "{args:?} gave no fitting advice:\n{err}"
        );
        if args[0] == "devices" {
            assert!(
                !last.contains("use --backend"),
                "devices has no --backend flag, yet said:\n{err}"
            );
        }
        assert!(out.stdout.is_empty(), "{args:?} printed {:?}", out.stdout);
    }
}

/// A CUDA error fails the request with EIO and a message naming the GPU; a non-sticky one
/// leaves the device serving, a sticky one (a faulting kernel) makes every later request
/// fail with EIO, promptly. The fault ruins the process's GPU context, so it runs in a child
/// process (this test binary again, running only `sticky_error_child`).
#[test]
fn gpu_errors_fail_requests_with_eio() {
    if !gpu_enabled("gpu_errors_fail_requests_with_eio") {
        return;
    }
    let _g = serial();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sticky_error_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("VRAMDISK_FAULT_CHILD", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(90) {
            child.kill().unwrap();
            panic!("requests after a GPU fault hung");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("CHILD OK"), "{text}");
    for line in text.lines().filter(|l| l.contains("error")) {
        println!("child: {line}");
    }
}

#[test]
fn sticky_error_child() {
    if std::env::var("VRAMDISK_FAULT_CHILD").as_deref() != Ok("1") {
        return; // a helper: runs only as the child of gpu_errors_fail_requests_with_eio
    }
    let dev = open(64 * MIB);
    runtime().block_on(async {
        write(&dev, 0, &[7u8; 8192], true).await;
        // A refused copy fails that request alone.
        let err = dev.backend().bad_copy().await.unwrap_err();
        assert_eq!(err.errno(), libc::EIO);
        let msg = err.to_string();
        assert!(
            msg.contains("cuda:0") && msg.contains("CUDA_ERROR"),
            "{msg}"
        );
        println!("non-sticky error: {msg}");
        assert_eq!(read(&dev, 0, 8192, true).await, vec![7u8; 8192]);
        write(&dev, 4096, &[8u8; 4096], false).await;
        // A faulting kernel ruins the context: every request fails with EIO, none hangs.
        dev.backend().queue(0).inject_sticky_fault().unwrap();
        let mut saw_sticky = false;
        for i in 0..50u64 {
            let buf = dev.buffers().get(4096).await.unwrap();
            let r = if i % 2 == 0 {
                dev.write(i * 4096, &buf, false).await
            } else {
                let mut buf = buf;
                dev.read(0, &mut buf).await
            };
            let err = r.expect_err("a request succeeded on a faulted GPU");
            assert_eq!(err.errno(), libc::EIO, "{err}");
            let msg = err.to_string();
            assert!(
                msg.contains("cuda:0") && msg.contains("CUDA_ERROR"),
                "{msg}"
            );
            if dev.backend().queue(0).broken().is_some() {
                saw_sticky = true;
            }
            if i < 2 {
                println!("error after the fault: {msg}");
            }
        }
        assert!(saw_sticky, "the fault was not recognised as sticky");
        // Writes that need a new chunk fail too (allocation goes through the context).
        let err = dev.write(40 * MIB, &[1u8; 4096], false).await.unwrap_err();
        assert_eq!(err.errno(), libc::EIO, "{err}");
    });
    println!("CHILD OK");
}
