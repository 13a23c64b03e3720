//! Round trips, damaged and cut files, small buffer pools, both I/O paths.

use super::file::{DIRECT_ALIGN, DataFile, open_direct};
use super::format::{HEADER_LEN, Record, TABLE_ENTRY_LEN, TRAILER_LEN};
use super::load::{StreamMap, load_layout};
use super::save::is_zero;
use super::*;
use crate::engine::host::HostBackend;
use crate::engine::{BlockDevice, SparseDevice, SparseOptions};
use crate::test_support::pattern;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn device(size: u64) -> Arc<dyn BlockDevice> {
    device_with(size, |_| {})
}

fn device_with(size: u64, tune: impl FnOnce(&mut SparseOptions)) -> Arc<dyn BlockDevice> {
    let mut opts = SparseOptions::new(size);
    opts.chunk_size = 1 << 20;
    opts.buffer_limit = 256 << 20;
    tune(&mut opts);
    Arc::new(SparseDevice::new(HostBackend::new(), opts).unwrap())
}

fn opts(io: IoMode, block_size: Option<usize>) -> Options {
    Options { io, block_size }
}

/// Whether the filesystem of `dir` takes O_DIRECT (tmpfs on older kernels does not).
fn direct_works(dir: &Path) -> bool {
    let probe = dir.join("probe");
    std::fs::write(&probe, b"x").unwrap();
    let ok = open_direct(&probe, false).is_some();
    std::fs::remove_file(&probe).unwrap();
    ok
}

async fn filled(size: u64) -> Arc<dyn BlockDevice> {
    let dev = device(size);
    // Unaligned pieces, one across a record boundary, one at the very end, one of zeros.
    dev.write(12345, &pattern(1, 100_000), false).await.unwrap();
    dev.write(RECORD_SIZE - 500, &pattern(2, 3000), false)
        .await
        .unwrap();
    dev.write(size - 4096, &pattern(3, 4096), false)
        .await
        .unwrap();
    dev.write(20 << 20, &vec![0u8; 1 << 20], false)
        .await
        .unwrap();
    dev
}

async fn contents(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; dev.size() as usize];
    for (i, piece) in v.chunks_mut(8 << 20).enumerate() {
        dev.read(i as u64 * (8 << 20), piece).await.unwrap();
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_is_exact_and_sparse() {
    let size = 64 << 20;
    let src = filled(size).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev.img");
    let s = save(&*src, &path, &NoProgress).await.unwrap();
    // Four data-bearing chunks (the second write straddles two); the zero chunk became
    // a hole.
    assert_eq!(s.records, 4);
    assert_eq!(s.data_bytes, 4 << 20);
    assert!(s.file_bytes < (4 << 20) + 4096);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), s.file_bytes);
    verify(&path).unwrap();

    let dst = device(size);
    let l = load(&*dst, &path, &NoProgress).await.unwrap();
    assert_eq!(l.data_bytes, s.data_bytes);
    assert_eq!(contents(&*dst).await, contents(&*src).await);
    assert_eq!(dst.stats().chunks, 4);
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_device_saves_to_a_tiny_file() {
    let src = device(1 << 40);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.img");
    let s = save(&*src, &path, &NoProgress).await.unwrap();
    assert_eq!(s.records, 0);
    assert_eq!(s.file_bytes, (HEADER_LEN + TRAILER_LEN) as u64);
    let dst = device(1 << 40);
    load(&*dst, &path, &NoProgress).await.unwrap();
    assert_eq!(dst.stats().allocated, 0);
}

async fn saved(dir: &Path) -> PathBuf {
    let src = filled(32 << 20).await;
    let path = dir.join("dev.img");
    save(&*src, &path, &NoProgress).await.unwrap();
    path
}

async fn refused(path: &Path, size: u64) -> String {
    let dst = device(size);
    let err = load(&*dst, path, &NoProgress).await.unwrap_err();
    assert_eq!(dst.stats().allocated, 0, "a refused load left data behind");
    assert!(verify(path).is_err() || size != 32 << 20);
    format!("{err:#}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_flipped_byte_region_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved(dir.path()).await;
    let good = std::fs::read(&path).unwrap();
    let len = good.len();
    // Header, first record's data, last record's data, table, trailer fields.
    let table_start = len - TRAILER_LEN - 4 * TABLE_ENTRY_LEN;
    for at in [
        3,
        20,
        HEADER_LEN + 10,
        table_start - 1,
        table_start + 5,
        len - TRAILER_LEN + 9,
        len - 10,
        len - 1,
    ] {
        let mut bad = good.clone();
        bad[at] ^= 0x40;
        std::fs::write(&path, &bad).unwrap();
        let msg = refused(&path, 32 << 20).await;
        assert!(
            msg.contains("corrupt")
                || msg.contains("damaged")
                || msg.contains("not a vramdisk")
                || msg.contains("truncated")
                || msg.contains("bytes but this device"),
            "flip at {at}: {msg}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved(dir.path()).await;
    let good = std::fs::read(&path).unwrap();
    for cut in [good.len() - 1, good.len() / 2, 70, 10, 0] {
        std::fs::write(&path, &good[..cut]).unwrap();
        let msg = refused(&path, 32 << 20).await;
        assert!(
            msg.contains("truncated") || msg.contains("not a vramdisk"),
            "cut at {cut}: {msg}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_size_is_refused_in_a_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let path = saved(dir.path()).await;
    let msg = refused(&path, 64 << 20).await;
    assert!(msg.contains("same --size"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_in_every_mode_and_block_size() {
    let size = 64 << 20;
    let src = filled(size).await;
    let want = contents(&*src).await;
    let dir = tempfile::tempdir().unwrap();
    let direct_ok = direct_works(dir.path());
    if !direct_ok {
        crate::test_support::skip_loudly(
            "in part: no O_DIRECT on the temporary directory's filesystem",
        );
    }
    let path = dir.path().join("dev.img");
    // 4 KiB and 64 KiB blocks: every record straddles blocks (the header shifts the
    // stream by 64 bytes) and the chunk of zeros is dropped across a block boundary.
    for save_block in [Some(4096), Some(64 << 10), Some(1 << 20), None] {
        for io in [IoMode::Direct, IoMode::Buffered, IoMode::Auto] {
            let s = save_with(&*src, &path, &NoProgress, &opts(io, save_block))
                .await
                .unwrap();
            let what = format!("{io:?}, save block {save_block:?}");
            assert_eq!(s.direct_io, io != IoMode::Buffered && direct_ok, "{what}");
            // Records are cut at multiples of the block size or 8 MiB, whichever is
            // smaller, within extents of whole 1 MiB chunks (here never longer than two
            // chunks, split at 8 MiB); those holding only zeros are dropped.
            let record = save_block.unwrap_or(MAX_BLOCK).min(1 << 20);
            let data = want.chunks(record).filter(|c| !is_zero(c)).count() as u64;
            assert_eq!(s.records, data, "{what}");
            assert_eq!(s.data_bytes, data * record as u64, "{what}");
            verify(&path).unwrap();
            // Loading with other block sizes than the save's: records larger than a
            // block, blocks holding several records.
            for load_block in [Some(4096), Some(64 << 10), None] {
                let dst = device(size);
                let l = load_with(&*dst, &path, &NoProgress, &opts(io, load_block))
                    .await
                    .unwrap();
                let what = format!("{what}, load block {load_block:?}");
                assert_eq!(l.data_bytes, s.data_bytes, "{what}");
                assert_eq!(l.direct_io, io == IoMode::Direct && direct_ok, "{what}");
                assert!(contents(&*dst).await == want, "{what}: contents differ");
                assert_eq!(dst.stats().chunks, 4, "{what}");
            }
        }
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_buffer_pools_still_round_trip() {
    let size = 16 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small.img");
    // 8 KiB of buffers: one 4 KiB block at a time on each side.
    for limit in [8 << 10, 100 << 10, 20 << 20] {
        let tune = |o: &mut SparseOptions| o.buffer_limit = limit;
        let src = device_with(size, tune);
        src.write(5000, &pattern(7, 3 << 20), false).await.unwrap();
        src.write(size - 70_000, &pattern(8, 70_000), false)
            .await
            .unwrap();
        save(&*src, &path, &NoProgress).await.unwrap();
        let dst = device_with(size, tune);
        load(&*dst, &path, &NoProgress).await.unwrap();
        assert!(
            contents(&*dst).await == contents(&*src).await,
            "limit {limit}"
        );
    }
    let tiny = device_with(size, |o| o.buffer_limit = 4096);
    let err = save(&*tiny, &path, &NoProgress).await.unwrap_err();
    assert!(format!("{err:#}").contains("too small"), "{err:#}");
}

/// A device whose every byte is data: `records` records of 8 MiB.
async fn full(records: u64, preallocate: bool) -> Arc<dyn BlockDevice> {
    let dev = device_with(records * RECORD_SIZE, |o| o.preallocate = preallocate);
    for r in 0..records {
        let data = pattern(r + 11, RECORD_SIZE as usize);
        dev.write(r * RECORD_SIZE, &data, false).await.unwrap();
    }
    dev
}

async fn assert_all_zero(dev: &dyn BlockDevice, what: &str) {
    assert!(
        is_zero(&contents(dev).await),
        "{what}: data left on the device"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_checksum_failures_leave_the_device_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.img");
    let records = 5;
    let src = full(records, false).await;
    save(&*src, &path, &NoProgress).await.unwrap();
    let good = std::fs::read(&path).unwrap();
    let data_end = HEADER_LEN + (records * RECORD_SIZE) as usize;
    // The last byte of the last record's data, and the whole-file checksum (checked only
    // once every record has been written to the device).
    for (at, says) in [
        (data_end - 1, "record at device offset 33554432"),
        (good.len() - 1, "whole-file checksum"),
    ] {
        let mut bad = good.clone();
        bad[at] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        for io in [IoMode::Direct, IoMode::Buffered] {
            for preallocate in [false, true] {
                let dst = device_with(records * RECORD_SIZE, |o| o.preallocate = preallocate);
                let before = dst.stats();
                // 1 MiB blocks: dozens of blocks reach the device before the failure.
                let err = load_with(&*dst, &path, &NoProgress, &opts(io, Some(1 << 20)))
                    .await
                    .unwrap_err();
                let msg = format!("{err:#}");
                let what = format!("flip at {at}, {io:?}, preallocate {preallocate}");
                assert!(
                    msg.contains(says) && msg.contains("was not loaded"),
                    "{what}: {msg}"
                );
                assert_eq!(dst.stats(), before, "{what}");
                assert_all_zero(&*dst, &what).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_cut_short_during_the_load_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.img");
    let src = full(3, false).await;
    save(&*src, &path, &NoProgress).await.unwrap();
    let good = std::fs::read(&path).unwrap();
    // Cut in the middle of the second record, once the header, table and trailer have
    // been checked (as if another program truncated it then).
    for io in [IoMode::Direct, IoMode::Buffered] {
        std::fs::write(&path, &good).unwrap();
        let layout = inspect(&path).unwrap();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(HEADER_LEN as u64 + RECORD_SIZE + 12345).unwrap();
        let dst = device(3 * RECORD_SIZE);
        let err = load_layout(&*dst, &path, layout, &NoProgress, &opts(io, Some(1 << 20)))
            .await
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("cut short"), "{io:?}: {msg}");
        assert_eq!(dst.stats().allocated, 0, "{io:?}");
        assert_all_zero(&*dst, &format!("{io:?}")).await;
    }
}

#[test]
fn pieces_cover_the_data_exactly_once() {
    let lens = [5000u64, 4096, 1, 20_000, 3, 8192];
    let mut offset = 0;
    let records: Vec<Record> = lens
        .iter()
        .map(|&length| {
            offset += length + 4096;
            Record {
                offset,
                length,
                crc: 0,
            }
        })
        .collect();
    for block in [4096usize, 8192, 1 << 20] {
        let map = StreamMap::new(&records, block);
        let mut next = HEADER_LEN as u64;
        let mut per_record = vec![0u64; records.len()];
        for k in 0..map.blocks() {
            for p in map.pieces(k) {
                let at = k * block as u64 + p.at as u64;
                assert_eq!(at, next, "block {block}: gap or overlap");
                assert!(p.len > 0 && p.at + p.len <= map.block_len(k));
                next += p.len as u64;
                per_record[p.rec] += p.len as u64;
            }
        }
        assert_eq!(next, map.data_end);
        assert_eq!(per_record, lens);
    }
    assert_eq!(StreamMap::new(&[], 4096).blocks(), 0);
}

#[test]
fn io_modes_parse_and_zero_check_is_exact() {
    assert_eq!("direct".parse::<IoMode>().unwrap(), IoMode::Direct);
    assert_eq!("buffered".parse::<IoMode>().unwrap(), IoMode::Buffered);
    assert_eq!("auto".parse::<IoMode>().unwrap(), IoMode::Auto);
    assert!("fast".parse::<IoMode>().is_err());
    let mut b = vec![0u8; 10_000];
    assert!(is_zero(&b));
    for at in [0, 4095, 4096, 9999] {
        b[at] = 1;
        assert!(!is_zero(&b), "{at}");
        b[at] = 0;
    }
}

#[test]
fn refused_direct_calls_are_redone_through_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    if !direct_works(dir.path()) {
        crate::test_support::skip_loudly("no O_DIRECT on the temporary directory's filesystem");
        return;
    }
    let path = dir.path().join("f");
    let data = pattern(5, 3 * DIRECT_ALIGN);
    std::fs::write(&path, &data).unwrap();
    // A buffer one byte off a page boundary: the kernel refuses it for direct I/O (EINVAL).
    let mut backing = vec![0u8; 4 * DIRECT_ALIGN + 1];
    let off = backing.as_ptr().align_offset(DIRECT_ALIGN) + 1;
    let f = DataFile::new(File::open(&path).unwrap(), open_direct(&path, false));
    assert!(f.is_direct());
    let buf = &mut backing[off..off + 2 * DIRECT_ALIGN];
    f.read_at_least(buf, DIRECT_ALIGN as u64, 2 * DIRECT_ALIGN)
        .unwrap();
    assert!(
        buf[..] == data[DIRECT_ALIGN..],
        "read through the cache differs"
    );
    assert!(!f.is_direct(), "direct I/O still on after a refusal");

    let out = dir.path().join("g");
    std::fs::write(&out, b"").unwrap();
    let plain = OpenOptions::new().write(true).open(&out).unwrap();
    let w = DataFile::new(plain, open_direct(&out, true));
    backing[off..off + 2 * DIRECT_ALIGN].copy_from_slice(&data[..2 * DIRECT_ALIGN]);
    w.write_all_at(&backing[off..off + 2 * DIRECT_ALIGN], 0)
        .unwrap();
    assert!(!w.is_direct());
    assert!(std::fs::read(&out).unwrap() == data[..2 * DIRECT_ALIGN]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_write_failing_mid_load_leaves_it_empty() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.img");
    let src = full(4, false).await;
    save(&*src, &path, &NoProgress).await.unwrap();
    // Room for half the data: writes fail with ENOSPC while others are in flight.
    let dst = device_with(4 * RECORD_SIZE, |o| o.max_memory = Some(2 * RECORD_SIZE));
    let err = load_with(
        &*dst,
        &path,
        &NoProgress,
        &opts(IoMode::Auto, Some(1 << 20)),
    )
    .await
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("writing") && msg.contains("of the device"),
        "{msg}"
    );
    assert_eq!(dst.stats().allocated, 0);
    assert_all_zero(&*dst, "after ENOSPC").await;
}
