//! Save/load throughput of `engine::persist` against the disk, for bench/save-load.sh.
//!
//! Usage: persist-bench DIR SIZE_MIB [FILL_PERCENT] [--backend host|cuda] [--gpu N]
//!                      [--io auto|direct|buffered] [--block BYTES]
//!
//! Fills a device of SIZE_MIB (host RAM, or GPU memory with `--backend cuda`) with data in
//! FILL_PERCENT of its 2 MiB chunks (default 100), saves it to DIR/bench.img, drops the file
//! from the page cache, checks the file alone (read + checksums, no device), empties the
//! device, loads the file back into it and checks every byte. Also times the device side
//! alone (reading the data into the I/O buffers, writing it into fresh chunks), so that disk
//! time can be told from device time. One JSON line per step. With PERSIST_BENCH_KEEP=1 the
//! image is left in DIR (the script reads it again with dd).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use vramdisk::engine::host::HostBackend;
use vramdisk::engine::persist::{self, IoMode, NoProgress};
use vramdisk::engine::{BlockDevice, SparseDevice, SparseOptions};

const CHUNK: u64 = 2 << 20;
/// Unit of the fill, the device-side timings and the final check.
const STEP: u64 = 8 << 20;

fn drop_cache(path: &Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).expect("open");
    // The file was fsynced, so its pages are clean and DONTNEED really drops them (tmpfs
    // keeps them: there the file is the memory).
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

fn usage(msg: &str) -> ! {
    eprintln!("persist-bench: {msg}");
    eprintln!(
        "usage: persist-bench DIR SIZE_MIB [FILL_PERCENT] [--backend host|cuda] [--gpu N] \
         [--io auto|direct|buffered] [--block BYTES]"
    );
    std::process::exit(2);
}

/// Pseudo-random bytes, the same for every run.
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut v = vec![0u8; len];
    for w in v.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    v
}

/// The content of chunk `c`: a slice of the noise chosen by `c`, stamped with `c` so that a
/// chunk landing at the wrong offset is caught.
fn chunk_data(noise: &[u8], c: u64, out: &mut [u8]) {
    let slots = noise.len() as u64 / CHUNK;
    let from = ((c * 7919) % slots * CHUNK) as usize;
    out.copy_from_slice(&noise[from..from + CHUNK as usize]);
    out[..8].copy_from_slice(&c.to_le_bytes());
    out[CHUNK as usize - 8..].copy_from_slice(&(!c).to_le_bytes());
}

fn holds_data(c: u64, fill: u64) -> bool {
    c % 100 < fill
}

/// Wall time and the CPU time of the whole process (every thread) since it was made.
struct Timer {
    wall: Instant,
    cpu: f64,
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

impl Timer {
    fn start() -> Self {
        Timer {
            wall: Instant::now(),
            cpu: cpu_seconds(),
        }
    }
}

/// One JSON line; cpu_s (CPU seconds, all threads) shows how busy the step kept the CPUs,
/// which on a shared machine varies less than the rate.
fn line(step: &str, mib: u64, t: &Timer, extra: &str) {
    let secs = t.wall.elapsed().as_secs_f64();
    println!(
        "{{\"step\":\"{step}\",\"data_mib\":{mib},\"seconds\":{secs:.3},\"mib_per_s\":{:.0},\"cpu_s\":{:.3}{extra}}}",
        mib as f64 / secs,
        cpu_seconds() - t.cpu
    );
}

#[tokio::main]
async fn main() {
    let mut pos = Vec::new();
    let mut backend = "host".to_string();
    let mut gpu = 0usize;
    let mut opts = vramdisk::ops::progress::persist_options();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        match a.as_str() {
            "--backend" => backend = value("--backend"),
            "--gpu" => {
                gpu = value("--gpu")
                    .parse()
                    .unwrap_or_else(|_| usage("bad --gpu"))
            }
            "--io" => {
                opts.io = value("--io")
                    .parse::<IoMode>()
                    .unwrap_or_else(|e| usage(&e.to_string()))
            }
            "--block" => {
                opts.block_size = Some(
                    value("--block")
                        .parse()
                        .unwrap_or_else(|_| usage("bad --block")),
                )
            }
            _ if a.starts_with("--") => usage(&format!("unknown option {a}")),
            _ => pos.push(a),
        }
    }
    if pos.len() < 2 {
        usage("DIR and SIZE_MIB are required");
    }
    let dir = std::path::PathBuf::from(&pos[0]);
    let size: u64 = pos[1]
        .parse::<u64>()
        .unwrap_or_else(|_| usage("bad SIZE_MIB"))
        << 20;
    let fill: u64 = pos
        .get(2)
        .map(|f| f.parse().unwrap_or_else(|_| usage("bad FILL_PERCENT")))
        .unwrap_or(100);
    if size == 0 || !size.is_multiple_of(STEP) {
        usage("SIZE_MIB must be a positive multiple of 8");
    }
    let mut sopts = SparseOptions::new(size);
    sopts.chunk_size = CHUNK as usize;
    let dev: Arc<dyn BlockDevice> = match backend.as_str() {
        "host" => Arc::new(SparseDevice::new(HostBackend::new(), sopts).expect("device")),
        "cuda" => match vramdisk::engine::cuda::open_device(&[gpu], None, sopts) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("persist-bench: cannot open the CUDA device: {e:#}");
                std::process::exit(1);
            }
        },
        _ => usage("--backend is host or cuda"),
    };
    println!(
        "{{\"step\":\"setup\",\"device\":\"{}\",\"device_mib\":{},\"fill_percent\":{fill},\"io\":\"{:?}\",\"block\":{}}}",
        dev.describe(),
        size >> 20,
        opts.io,
        opts.block_size.unwrap_or(0)
    );

    // Fill, from the device's own I/O buffers (pinned for CUDA), as a client would.
    let noise = noise(64 << 20);
    let chunks_per_step = STEP / CHUNK;
    let mut filled = 0u64;
    {
        let mut buf = dev.buffers().get(STEP as usize).await.expect("buffer");
        for s in 0..size / STEP {
            let mut any = false;
            for i in 0..chunks_per_step {
                let c = s * chunks_per_step + i;
                let piece = &mut buf[(i * CHUNK) as usize..((i + 1) * CHUNK) as usize];
                if holds_data(c, fill) {
                    chunk_data(&noise, c, piece);
                    any = true;
                } else {
                    piece.fill(0);
                }
            }
            if !any {
                continue;
            }
            // Chunks without data are left as holes, not written as zeros.
            for i in 0..chunks_per_step {
                let c = s * chunks_per_step + i;
                if holds_data(c, fill) {
                    let r = (i * CHUNK) as usize..((i + 1) * CHUNK) as usize;
                    dev.write(c * CHUNK, &buf[r], false).await.expect("fill");
                    filled += CHUNK;
                }
            }
        }
    }
    assert_eq!(dev.stats().allocated, filled);
    let data_mib = filled >> 20;

    // The device side alone: reading the data into an I/O buffer, 8 MiB at a time with the
    // chunks of each 8 MiB read side by side, as a save does.
    let t = Timer::start();
    {
        let mut buf = dev.buffers().get(STEP as usize).await.expect("buffer");
        for s in 0..size / STEP {
            let reads = buf
                .chunks_mut(CHUNK as usize)
                .enumerate()
                .filter_map(|(i, piece)| {
                    let c = s * chunks_per_step + i as u64;
                    holds_data(c, fill).then(|| dev.read(c * CHUNK, piece))
                });
            futures::future::try_join_all(reads).await.expect("read");
        }
    }
    line("device read", data_mib, &t, "");

    let path = dir.join("bench.img");
    let t = Timer::start();
    let s = persist::save_with(&*dev, &path, &NoProgress, &opts)
        .await
        .expect("save");
    let extra = format!(
        ",\"file_mib\":{},\"records\":{},\"direct_io\":{}",
        s.file_bytes >> 20,
        s.records,
        s.direct_io
    );
    line("save", data_mib, &t, &extra);
    assert_eq!(s.data_bytes, filled);

    drop_cache(&path);
    // Reading and checking the file alone (buffered, one thread: the old load's file side).
    let t = Timer::start();
    persist::verify(&path).expect("verify");
    line("verify", data_mib, &t, "");

    // The device side alone: writing the data into fresh chunks (allocation included), as a
    // load does.
    dev.trim(0, size).await.expect("trim");
    assert_eq!(dev.stats().allocated, 0);
    let t = Timer::start();
    {
        let mut buf = dev.buffers().get(STEP as usize).await.expect("buffer");
        buf.copy_from_slice(&noise[..STEP as usize]);
        for s in 0..size / STEP {
            let writes = buf
                .chunks(CHUNK as usize)
                .enumerate()
                .filter_map(|(i, piece)| {
                    let c = s * chunks_per_step + i as u64;
                    holds_data(c, fill).then(|| dev.write(c * CHUNK, piece, false))
                });
            futures::future::try_join_all(writes).await.expect("write");
        }
    }
    line("device write", data_mib, &t, "");

    dev.trim(0, size).await.expect("trim");
    drop_cache(&path);
    let t = Timer::start();
    let l = persist::load_with(&*dev, &path, &NoProgress, &opts)
        .await
        .expect("load");
    let extra = format!(",\"direct_io\":{}", l.direct_io);
    line("load", data_mib, &t, &extra);

    // The copy must be exact, or the figures mean nothing.
    assert_eq!(dev.stats().allocated, filled);
    let mut buf = dev.buffers().get(CHUNK as usize).await.expect("buffer");
    let mut want = vec![0u8; CHUNK as usize];
    for c in 0..size / CHUNK {
        dev.read(c * CHUNK, &mut buf).await.expect("read back");
        if holds_data(c, fill) {
            chunk_data(&noise, c, &mut want);
            assert!(buf[..] == want[..], "chunk {c} differs after the load");
        } else {
            assert!(buf.iter().all(|&b| b == 0), "hole {c} holds data");
        }
    }
    println!("{{\"step\":\"check\",\"ok\":true}}");
    // PERSIST_BENCH_KEEP=1 keeps the image, e.g. to read it with dd or try `serve --load`.
    if std::env::var_os("PERSIST_BENCH_KEEP").is_none() {
        std::fs::remove_file(&path).ok();
    }
}
