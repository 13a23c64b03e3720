//! Save/load throughput of `engine::persist` against the disk, for bench/save-load.sh.
//!
//! Usage: persist-bench DIR SIZE_MIB [FILL_PERCENT]
//! Fills a host-RAM device of SIZE_MIB with incompressible data (FILL_PERCENT of its chunks,
//! default 100), saves it to DIR/bench.img, drops the file from the page cache, loads it into
//! a second device, checks the contents are equal, and prints one JSON line per step.
//! With PERSIST_BENCH_KEEP=1 the image is left in DIR.

use std::sync::Arc;
use std::time::Instant;
use vramdisk::engine::host::HostBackend;
use vramdisk::engine::persist::{self, NoProgress};
use vramdisk::engine::{BlockDevice, SparseDevice, SparseOptions};

fn device(size: u64) -> Arc<dyn BlockDevice> {
    let mut opts = SparseOptions::new(size);
    opts.chunk_size = 2 << 20;
    Arc::new(SparseDevice::new(HostBackend::new(), opts).expect("device"))
}

fn drop_cache(path: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).expect("open");
    // The file was fsynced, so its pages are clean and DONTNEED really drops them.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: persist-bench DIR SIZE_MIB [FILL_PERCENT]");
        std::process::exit(2);
    }
    let dir = std::path::PathBuf::from(&args[1]);
    let size: u64 = args[2].parse::<u64>().expect("SIZE_MIB") << 20;
    let fill: u64 = args
        .get(3)
        .map(|f| f.parse().expect("FILL_PERCENT"))
        .unwrap_or(100);
    let src = device(size);
    let chunk = 2u64 << 20;
    let mut buf = vec![0u8; chunk as usize];
    let mut x = 0x1234_5678_9abc_def1u64;
    for c in 0..size / chunk {
        if c % 100 >= fill {
            continue;
        }
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        src.write(c * chunk, &buf, false).await.expect("fill");
    }
    let data = src.stats().allocated;
    let path = dir.join("bench.img");
    let t = Instant::now();
    let s = persist::save(&*src, &path, &NoProgress)
        .await
        .expect("save");
    let save_s = t.elapsed().as_secs_f64();
    println!(
        "{{\"step\":\"save\",\"device_mib\":{},\"data_mib\":{},\"file_mib\":{},\"seconds\":{:.3},\"mib_per_s\":{:.0}}}",
        size >> 20,
        data >> 20,
        s.file_bytes >> 20,
        save_s,
        (data >> 20) as f64 / save_s
    );
    drop_cache(&path);
    // Reading and checking the file alone, to tell disk time from device time.
    let t = Instant::now();
    persist::verify(&path).expect("verify");
    let verify_s = t.elapsed().as_secs_f64();
    println!(
        "{{\"step\":\"verify\",\"data_mib\":{},\"seconds\":{:.3},\"mib_per_s\":{:.0}}}",
        data >> 20,
        verify_s,
        (data >> 20) as f64 / verify_s
    );
    // Writing the same amount into a fresh device from memory: the device side of a load
    // (for the host backend, mostly first-touch page faults of new chunks).
    {
        let fresh = device(size);
        let mut piece = vec![0u8; 8 << 20];
        let mut y = 0x0f0f_1234_5678_9abcu64;
        for w in piece.chunks_exact_mut(8) {
            y ^= y << 13;
            y ^= y >> 7;
            y ^= y << 17;
            w.copy_from_slice(&y.to_le_bytes());
        }
        let t = Instant::now();
        let mut written = 0u64;
        for c in 0..size / chunk {
            if c % 100 >= fill {
                continue;
            }
            fresh
                .write(c * chunk, &piece[..chunk as usize], false)
                .await
                .unwrap();
            written += chunk;
        }
        let w_s = t.elapsed().as_secs_f64();
        println!(
            "{{\"step\":\"device write from memory\",\"data_mib\":{},\"seconds\":{:.3},\"mib_per_s\":{:.0}}}",
            written >> 20,
            w_s,
            (written >> 20) as f64 / w_s
        );
    }
    drop_cache(&path);
    let dst = device(size);
    let t = Instant::now();
    persist::load(&*dst, &path, &NoProgress)
        .await
        .expect("load");
    let load_s = t.elapsed().as_secs_f64();
    println!(
        "{{\"step\":\"load\",\"data_mib\":{},\"seconds\":{:.3},\"mib_per_s\":{:.0}}}",
        data >> 20,
        load_s,
        (data >> 20) as f64 / load_s
    );
    // The copy must be exact, or the figures mean nothing.
    let mut a = vec![0u8; chunk as usize];
    let mut b = vec![0u8; chunk as usize];
    for c in 0..size / chunk {
        src.read(c * chunk, &mut a).await.unwrap();
        dst.read(c * chunk, &mut b).await.unwrap();
        assert!(a == b, "contents differ in chunk {c}");
    }
    // PERSIST_BENCH_KEEP=1 keeps the image, e.g. to try `serve --load` by hand.
    if std::env::var_os("PERSIST_BENCH_KEEP").is_none() {
        std::fs::remove_file(&path).ok();
    }
}
