//! Saving a device to a file and loading it back (`--save`, `--load`, `vramdisk save`).
//!
//! Only allocated data is stored: the extent map says where data is, holes are skipped, and
//! records that turn out to be all zeros are dropped too, so a mostly empty 100 GiB device
//! saves in a moment and loads back just as sparse.
//!
//! File format, version 1 (all integers little-endian):
//!
//! ```text
//! header   64 B   "VRAMDISK", version u32 = 1, header length u32 = 64, device size u64,
//!                 record size u64, created (unix seconds) u64, 20 reserved zero bytes,
//!                 crc32c of the 60 bytes before it u32
//! data            the records' bytes back to back, in table order
//! table    24 B   per record: offset u64, length u64, crc32c of its data u32, reserved u32
//! trailer  48 B   "VRDKTAIL", record count u64, table offset u64, data bytes u64,
//!                 file length u64, crc32c of the table u32,
//!                 crc32c of every byte of the file before this field u32
//! ```
//!
//! The table sits after the data so that a save is one sequential stream with no seeking
//! back, and a truncated file loses its trailer and is recognised at once. The writer puts
//! everything in a temporary file in the target's directory, fsyncs it, renames it over the
//! target and fsyncs the directory, so the target is always either the old file or the
//! complete new one.
//!
//! **Throughput.** Both directions treat the file as a stream of fixed blocks (8 MiB, aligned
//! to the file's start) that does not care where records begin, so every file access is one
//! large aligned `pread`/`pwrite` of a whole block, and the device side moves records straight
//! between the device and the block buffers: a record is read from the device into its place
//! in the stream (a save), or written to the device from where it lies in the block (a load).
//! The block buffers come from the device's [`BufferPool`], which for the
//! CUDA backend is pinned memory, so the GPU copies them by DMA with no staging copy; and by
//! default the file is opened with `O_DIRECT`, so the disk moves them by DMA too, with no
//! page-cache copy (see [`IoMode`]). Four threads do the file I/O, several blocks at a time
//! (a disk needs more than one request in flight to reach its rate), and compute the
//! records' checksums as pieces that the device side combines with `crc32c_combine`.
//!
//! **Loading** checks the header, the trailer, the table and the file length before it touches
//! the device. The data's checksums can only be checked as the data streams by: reading the
//! file twice (check, then load) would halve the rate, and holding a whole device's worth of
//! data in host memory until it is checked is out of the question. So a record is written to
//! the device as it arrives, and if any record's checksum or the whole-file checksum fails, or
//! the file ends early, the device is emptied again (trimmed: every chunk freed, or zeroed
//! where preallocated) before the load fails. The daemon loads before it serves, so no client
//! ever sees a half-loaded device; the device is left as it was given, empty.
//!
//! A save of a device that clients keep writing is not a point-in-time snapshot: each record
//! is copied as it is at the moment it is read. Quiesce writers (or save at shutdown) for a
//! consistent image.
//!
//! The parts: `format` (the bytes of header, table and trailer, and checking them), `file`
//! (the image file with its direct and buffered paths), `save` and `load` (the two streams).

mod file;
mod format;
mod load;
mod save;
#[cfg(test)]
mod tests;

pub use format::{FileLayout, RECORD_SIZE, inspect};
pub use load::{load, load_with, verify};
pub use save::{bytes_to_save, save, save_with};

use super::BufferPool;
use anyhow::{Result, bail, ensure};
use file::DIRECT_ALIGN;
use std::path::PathBuf;

/// Largest unit of file I/O (one block of the stream).
const MAX_BLOCK: usize = 8 << 20;
/// Most blocks in flight between the device side and the file threads.
const MAX_DEPTH: usize = 8;
/// Threads doing the file I/O and the checksums.
const IO_THREADS: usize = 4;

/// Receives progress: bytes done so far out of the total given when it was made. The engine
/// only counts; how progress is shown (a terminal bar, log lines) is the caller's.
pub trait Progress: Send + Sync {
    /// `done` bytes of the total are finished.
    fn update(&self, done: u64);
    /// The operation finished (successfully or not).
    fn finish(&self);
}

/// A [`Progress`] that reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn update(&self, _: u64) {}
    fn finish(&self) {}
}

/// How the file's data is read and written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoMode {
    /// Direct I/O where the filesystem allows it, except for loading a file that is mostly in
    /// the page cache already (after a restart without a reboot), which reads faster through
    /// the cache than from the disk.
    #[default]
    Auto,
    /// `O_DIRECT`: the disk moves data straight to and from the block buffers, with no copy
    /// through the page cache and no cache left behind. Where the filesystem refuses it
    /// (tmpfs on older kernels), the page cache is used instead.
    Direct,
    /// Through the page cache (`posix_fadvise(SEQUENTIAL)` on loads).
    Buffered,
}

impl std::str::FromStr for IoMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "direct" => Ok(IoMode::Direct),
            "buffered" => Ok(IoMode::Buffered),
            _ => bail!("unknown I/O mode '{s}': use auto, direct or buffered"),
        }
    }
}

/// Tuning of a save or load; [`save`] and [`load`] use the defaults.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// How the file is accessed.
    pub io: IoMode,
    /// Bytes per file read or write, a power of two of at least 4 KiB. Default: 8 MiB, or
    /// less where the device's buffer pool is small (a block is at most half of it).
    pub block_size: Option<usize>,
}

/// What a save or load did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// The file written or read.
    pub path: PathBuf,
    /// Device size in bytes.
    pub device_size: u64,
    /// Records stored in the file.
    pub records: u64,
    /// Data bytes stored in the file (the device's non-zero allocated data).
    pub data_bytes: u64,
    /// Length of the file in bytes.
    pub file_bytes: u64,
    /// Wall time taken, in milliseconds.
    pub millis: u64,
    /// The file's data went through `O_DIRECT` (else through the page cache).
    pub direct_io: bool,
}

/// The part of one record that lies in one block of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Piece {
    /// Index of the record in the table.
    rec: usize,
    /// Where the piece starts in the block.
    at: usize,
    len: usize,
}

/// Block size and blocks in flight for a device's buffer pool.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    block: usize,
    depth: usize,
}

/// The block size and depth `opts` and the size of `pool` allow.
fn geometry(pool: &BufferPool, opts: &Options) -> Result<Geometry> {
    let limit = pool.limit();
    if let Some(b) = opts.block_size {
        ensure!(
            b.is_power_of_two() && b >= DIRECT_ALIGN,
            "block size {b} is not a power of two of at least 4 KiB"
        );
    }
    // At most half the pool, so that a save's device side can always hold the two blocks a
    // record may straddle while the file threads hold none.
    let half = limit / 2;
    let fit = if half == 0 {
        0
    } else {
        1usize << (usize::BITS - 1 - half.leading_zeros())
    };
    let block = opts.block_size.unwrap_or(MAX_BLOCK).min(fit);
    ensure!(
        block >= DIRECT_ALIGN,
        "the device's I/O buffer pool ({limit} bytes) is too small to save or load through: it needs at least 8 KiB"
    );
    let depth = (half / block).saturating_sub(2).clamp(2, MAX_DEPTH);
    Ok(Geometry { block, depth })
}
