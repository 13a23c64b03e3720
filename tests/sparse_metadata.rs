//! A sparse device's own memory grows with what is written, not with its size: a 100 TiB
//! device on host RAM is counted by the heap itself (a counting allocator for this test
//! binary), before and after writes that cross the chunk map's page borders.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use vramdisk::engine::host::HostBackend;
use vramdisk::engine::{BlockDevice, SparseDevice, SparseOptions};

/// The system allocator, keeping count of the bytes each thread holds, so that the test
/// measures its own thread's allocations whatever other threads do.
struct Counting;

thread_local! {
    static HELD: Cell<i64> = const { Cell::new(0) };
}

// SAFETY: every call goes to `System` unchanged; the counter is a const-initialised
// thread-local Cell, which allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = HELD.try_with(|h| h.set(h.get() + layout.size() as i64));
        // SAFETY: as the caller promised for `layout`.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let _ = HELD.try_with(|h| h.set(h.get() + layout.size() as i64));
        // SAFETY: as the caller promised for `layout`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = HELD.try_with(|h| h.set(h.get() - layout.size() as i64));
        // SAFETY: as the caller promised for `ptr` and `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = HELD.try_with(|h| h.set(h.get() + new_size as i64 - layout.size() as i64));
        // SAFETY: as the caller promised for `ptr`, `layout` and `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn held() -> i64 {
    HELD.with(|h| h.get())
}

const MIB: i64 = 1 << 20;
const CHUNK: u64 = 2 << 20;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(31) ^ seed.wrapping_mul(0x9e37_79b9)) as u8)
        .collect()
}

#[test]
fn a_100_tib_device_holds_memory_for_what_is_written_only() {
    // One thread, so that every allocation the device makes is counted on it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let size = 100u64 << 40;
    // Writes across chunk borders at both ends of a page of the map (4096 chunks of 2 MiB:
    // 8 GiB), at the device's very end, and spread over pages far apart.
    let page = 4096 * CHUNK;
    let writes: Vec<(u64, Vec<u8>)> = [
        (0, 5000),
        (page - 3000, 6000),
        (2 * page - 100, 200),
        (37 * page + CHUNK / 2, 3 * CHUNK as usize),
        (size / 2 - 1, 2),
        (size - 4096, 4096),
    ]
    .iter()
    .enumerate()
    .map(|(i, &(at, len))| (at, pattern(i as u64 + 1, len)))
    .collect();
    let before = held();
    let mut opts = SparseOptions::new(size);
    opts.chunk_size = CHUNK as usize;
    opts.buffer_limit = 64 << 20;
    let dev = SparseDevice::new(HostBackend::new(), opts).unwrap();
    let empty = held() - before;
    assert!(
        empty < MIB,
        "an empty 100 TiB device holds {empty} bytes of host memory"
    );

    rt.block_on(async {
        for (at, data) in &writes {
            dev.write(*at, data, false).await.unwrap();
        }
    });
    let chunks = dev.stats().chunks as i64;
    assert_eq!(chunks, 12, "chunks the writes touch");
    let grown = held() - before;
    // The data itself, and at most a page of 32 KiB of slots per chunk beside it, not the
    // flat 400 MB map.
    assert!(
        grown >= chunks * CHUNK as i64 && grown < chunks * (CHUNK as i64 + (64 << 10)) + MIB,
        "{chunks} chunks written, the device holds {grown} bytes"
    );

    rt.block_on(async {
        for (at, data) in &writes {
            let mut back = vec![0u8; data.len()];
            dev.read(*at, &mut back).await.unwrap();
            assert!(back == *data, "data at {at} differs");
        }
        // Beside the writes, in chunks and pages made and never made, reads give zeros.
        for at in [5000, page - 8192, page + CHUNK, 5 * page, size - 8192] {
            let mut back = vec![1u8; 4096];
            dev.read(at, &mut back).await.unwrap();
            assert!(back.iter().all(|&b| b == 0), "non-zero at {at}");
        }
    });
    drop(dev);
    assert!(
        held() - before < MIB,
        "the device's memory was not all freed"
    );
}
