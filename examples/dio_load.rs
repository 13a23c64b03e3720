//! A small O_DIRECT load generator for machines without fio (the GPU machine).
//!
//! `dio_load DEVICE read|write|randread|randwrite BLOCK_SIZE QUEUE_DEPTH SECONDS`
//!
//! Queue depth is the number of threads, each with one synchronous O_DIRECT request in
//! flight (like fio's psync engine with numjobs=QD). Sequential jobs share one offset
//! counter, so the device sees one stream. Prints one JSON line: bytes, ops, secs, MiB/s,
//! IOPS. Used by bench/attach when fio is missing.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn usage() -> ! {
    eprintln!(
        "usage: dio_load DEVICE read|write|randread|randwrite BLOCK_SIZE QUEUE_DEPTH SECONDS"
    );
    std::process::exit(2)
}

fn device_size(f: &std::fs::File) -> u64 {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    f.seek(SeekFrom::End(0))
        .expect("seeking to the end of the device")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        usage();
    }
    let dev = &args[1];
    let mode = args[2].as_str();
    let (write, random) = match mode {
        "read" => (false, false),
        "write" => (true, false),
        "randread" => (false, true),
        "randwrite" => (true, true),
        _ => usage(),
    };
    let bs: u64 = args[3].parse().unwrap_or_else(|_| usage());
    let qd: usize = args[4].parse().unwrap_or_else(|_| usage());
    let secs: f64 = args[5].parse().unwrap_or_else(|_| usage());
    if bs == 0 || !bs.is_multiple_of(4096) || qd == 0 {
        eprintln!("block size must be a multiple of 4096 and queue depth at least 1");
        std::process::exit(2);
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap_or_else(|e| panic!("opening {dev}: {e}"));
    let size = device_size(&file);
    let blocks = size / bs;
    assert!(blocks > 0, "{dev} is smaller than one block");
    let file = Arc::new(file);
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..qd)
        .map(|t| {
            let (file, next, stop, ops) = (file.clone(), next.clone(), stop.clone(), ops.clone());
            std::thread::spawn(move || {
                let layout = std::alloc::Layout::from_size_align(bs as usize, 4096).unwrap();
                // SAFETY: non-zero size; freed below.
                let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
                // SAFETY: ptr holds bs bytes, used only by this thread.
                let buf = unsafe { std::slice::from_raw_parts_mut(ptr, bs as usize) };
                buf.iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b = (i * 7 + t) as u8);
                let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ ((t as u64 + 1) << 32);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let block = if random {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x % blocks
                    } else {
                        next.fetch_add(1, Ordering::Relaxed) % blocks
                    };
                    let off = block * bs;
                    let r = if write {
                        file.write_all_at(buf, off)
                    } else {
                        file.read_exact_at(buf, off)
                    };
                    r.unwrap_or_else(|e| panic!("I/O at {off}: {e}"));
                    n += 1;
                }
                ops.fetch_add(n, Ordering::Relaxed);
                // SAFETY: allocated above with this layout.
                unsafe { std::alloc::dealloc(ptr, layout) };
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("worker thread");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let ops = ops.load(Ordering::Relaxed);
    let bytes = ops * bs;
    println!(
        "{{\"bytes\":{bytes},\"ops\":{ops},\"secs\":{elapsed:.3},\"mib_s\":{:.1},\"iops\":{:.0}}}",
        bytes as f64 / elapsed / (1 << 20) as f64,
        ops as f64 / elapsed
    );
}
