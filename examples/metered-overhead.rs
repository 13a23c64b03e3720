//! Cost of MeteredDevice per request: 4 KiB reads and writes through a host device, bare and
//! wrapped, from one task. Usage: metered-overhead [REQUESTS]
use std::sync::Arc;
use std::time::Instant;
use vramdisk::engine::host::HostBackend;
use vramdisk::engine::metered::MeteredDevice;
use vramdisk::engine::{BlockDevice, SparseDevice, SparseOptions};

async fn run(dev: &dyn BlockDevice, n: u64) -> f64 {
    let mut buf = vec![1u8; 4096];
    let span = dev.size() / 4096;
    let t = Instant::now();
    for i in 0..n {
        let off = (i * 7919 % span) * 4096;
        if i % 2 == 0 {
            dev.write(off, &buf, false).await.unwrap();
        } else {
            dev.read(off, &mut buf).await.unwrap();
        }
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(2_000_000);
    let bare: Arc<dyn BlockDevice> =
        Arc::new(SparseDevice::new(HostBackend::new(), SparseOptions::new(256 << 20)).unwrap());
    let metered = MeteredDevice::new(bare.clone());
    // Warm both (allocate every chunk) before timing.
    run(&*bare, n / 4).await;
    for round in 0..3 {
        let b = run(&*bare, n).await;
        let m = run(&metered, n).await;
        println!(
            "round {round}: bare {b:.0} ns/request, metered {m:.0} ns/request, overhead {:.0} ns",
            m - b
        );
    }
}
