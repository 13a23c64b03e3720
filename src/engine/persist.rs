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
//! The block buffers come from the device's [`BufferPool`](super::BufferPool), which for the
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

use super::{BlockDevice, BufferPool, Extent, IoBuf};
use anyhow::{Context, Result, anyhow, bail, ensure};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"VRAMDISK";
const TAIL_MAGIC: &[u8; 8] = b"VRDKTAIL";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 64;
const TABLE_ENTRY_LEN: usize = 24;
const TRAILER_LEN: usize = 48;
/// Largest record: large enough for the disk to stream, small enough that a few in flight
/// fit easily in the device's buffer pool.
pub const RECORD_SIZE: u64 = 8 << 20;
/// Largest unit of file I/O (one block of the stream).
const MAX_BLOCK: usize = 8 << 20;
/// Most blocks in flight between the device side and the file threads.
const MAX_DEPTH: usize = 8;
/// Threads doing the file I/O and the checksums.
const IO_THREADS: usize = 4;
/// Offset, length and address alignment that `O_DIRECT` needs on the filesystems in use
/// (their logical block is 512 B or 4 KiB); a filesystem that wants more makes the direct
/// call fail with EINVAL, and that call is redone through the page cache.
const DIRECT_ALIGN: usize = 4096;
/// Environment variable that picks the [`IoMode`] of `save` and `load`.
pub const IO_MODE_ENV: &str = "VRAMDISK_PERSIST_IO";

/// Receives progress: bytes done so far out of the total given when it was made.
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

/// Tuning of a save or load; [`Options::from_env`] is what `save` and `load` use.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// How the file is accessed.
    pub io: IoMode,
    /// Bytes per file read or write, a power of two of at least 4 KiB. Default: 8 MiB, or
    /// less where the device's buffer pool is small (a block is at most half of it).
    pub block_size: Option<usize>,
}

impl Options {
    /// The defaults, with the I/O mode taken from `VRAMDISK_PERSIST_IO` (`auto`, `direct`,
    /// `buffered`) when set; an unknown value is logged and ignored.
    pub fn from_env() -> Options {
        let io = match std::env::var(IO_MODE_ENV) {
            Ok(v) => v.parse().unwrap_or_else(|e| {
                tracing::warn!("{IO_MODE_ENV}: {e:#}; using auto");
                IoMode::Auto
            }),
            Err(_) => IoMode::Auto,
        };
        Options {
            io,
            block_size: None,
        }
    }
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

/// One record of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Record {
    offset: u64,
    length: u64,
    crc: u32,
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

fn header_bytes(device_size: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    h[16..24].copy_from_slice(&device_size.to_le_bytes());
    h[24..32].copy_from_slice(&RECORD_SIZE.to_le_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    h[32..40].copy_from_slice(&now.to_le_bytes());
    let crc = crc32c::crc32c(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Splits the allocated extents of `dev` into records of at most `record` bytes, aligned to
/// multiples of it so records line up with chunks.
fn plan_records(dev: &dyn BlockDevice, record: u64) -> Result<Vec<(u64, u64)>> {
    let mut extents: Vec<Extent> = Vec::new();
    dev.extents(0, dev.size(), &mut extents)
        .context("reading the device's extent map")?;
    let mut plan = Vec::new();
    for e in extents.iter().filter(|e| !e.hole && !e.zero) {
        let mut pos = e.offset;
        let end = e.offset + e.length;
        while pos < end {
            let next = ((pos / record) + 1) * record;
            let len = next.min(end) - pos;
            plan.push((pos, len));
            pos += len;
        }
    }
    Ok(plan)
}

/// True when every byte is zero. ORs 4 KiB at a time (which vectorises) and stops at the
/// first block holding data, so a record of data costs one page and a zero record one pass
/// at memory speed.
fn is_zero(b: &[u8]) -> bool {
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

fn temp_path_for(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".tmp{}", std::process::id()));
    Ok(path.with_file_name(tmp))
}

/// The image file, opened through the page cache and, where the filesystem allows it,
/// a second time with `O_DIRECT`.
struct DataFile {
    plain: File,
    direct: Option<File>,
    /// Cleared by the first direct call the kernel refuses; the page cache is used from then
    /// on.
    direct_works: AtomicBool,
}

fn open_direct(path: &Path, write: bool) -> Option<File> {
    OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

impl DataFile {
    fn new(plain: File, direct: Option<File>) -> Self {
        DataFile {
            plain,
            direct,
            direct_works: AtomicBool::new(true),
        }
    }

    /// True while the data goes through `O_DIRECT`.
    fn is_direct(&self) -> bool {
        self.direct.is_some() && self.direct_works.load(Ordering::Relaxed)
    }

    fn direct(&self) -> Option<&File> {
        self.direct.as_ref().filter(|_| self.is_direct())
    }

    /// Whether a failed direct call should be redone through the page cache: EINVAL is a
    /// filesystem (or alignment) that direct I/O does not suit, EFAULT a buffer the kernel
    /// cannot pin for DMA (memory mapped from a driver); neither says anything about the
    /// file.
    fn refused(&self, e: &std::io::Error) -> bool {
        let refused = matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EFAULT));
        if refused && self.direct_works.swap(false, Ordering::Relaxed) {
            tracing::info!("direct I/O refused ({e}); going through the page cache");
        }
        refused
    }

    /// Reads at least `need` bytes at `at` into `buf`. With direct I/O `buf` (whose length
    /// is a multiple of [`DIRECT_ALIGN`]) is filled as far as the file goes.
    fn read_at_least(&self, buf: &mut [u8], at: u64, need: usize) -> std::io::Result<()> {
        let mut got = 0;
        while got < need {
            let direct = self.direct().filter(|_| got.is_multiple_of(DIRECT_ALIGN));
            let r = match direct {
                Some(d) => d.read_at(&mut buf[got..], at + got as u64),
                None => self.plain.read_at(&mut buf[got..need], at + got as u64),
            };
            match r {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!(
                            "the file ends at byte {} (it was cut short while being loaded)",
                            at + got as u64
                        ),
                    ));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if direct.is_some() && self.refused(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes all of `buf` at `at`; direct where offset and length allow it.
    fn write_all_at(&self, buf: &[u8], at: u64) -> std::io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let aligned = done.is_multiple_of(DIRECT_ALIGN)
                && (buf.len() - done).is_multiple_of(DIRECT_ALIGN);
            let direct = self.direct().filter(|_| aligned);
            let r = match direct {
                Some(d) => d.write_at(&buf[done..], at + done as u64),
                None => self.plain.write_at(&buf[done..], at + done as u64),
            };
            match r {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if direct.is_some() && self.refused(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn on_tmpfs(file: &File) -> bool {
    // SAFETY: a plain C struct, all zeros is a valid value; fstatfs fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above, on an open descriptor.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    rc == 0 && st.f_type == libc::TMPFS_MAGIC
}

/// Fraction of the first `len` bytes of `file` held in the page cache (0 when unknown).
fn cached_fraction(file: &File, len: u64) -> f64 {
    let Ok(len) = usize::try_from(len) else {
        return 0.0;
    };
    if len == 0 {
        return 0.0;
    }
    // SAFETY: a read-only shared mapping of an open file, only given to mincore (which
    // touches no page of it) and unmapped before returning.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        if p == libc::MAP_FAILED {
            return 0.0;
        }
        let page = libc::sysconf(libc::_SC_PAGESIZE).max(4096) as usize;
        let mut vec = vec![0u8; len.div_ceil(page)];
        let rc = libc::mincore(p, len, vec.as_mut_ptr());
        libc::munmap(p, len);
        if rc != 0 {
            return 0.0;
        }
        vec.iter().filter(|&&b| b & 1 != 0).count() as f64 / vec.len() as f64
    }
}

/// Writes the data of `dev` to `path` (see the module documentation for the format), with
/// [`Options::from_env`].
pub async fn save(dev: &dyn BlockDevice, path: &Path, progress: &dyn Progress) -> Result<Summary> {
    save_with(dev, path, progress, &Options::from_env()).await
}

/// Writes the data of `dev` to `path` with the given tuning.
pub async fn save_with(
    dev: &dyn BlockDevice,
    path: &Path,
    progress: &dyn Progress,
    opts: &Options,
) -> Result<Summary> {
    let started = Instant::now();
    let geo = geometry(dev.buffers(), opts)?;
    let plan = plan_records(dev, RECORD_SIZE.min(geo.block as u64))?;
    let tmp = temp_path_for(path)?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let plain = File::create(&tmp)
        .with_context(|| format!("cannot create {} (for saving)", tmp.display()))?;
    let direct = match opts.io {
        IoMode::Buffered => None,
        IoMode::Auto | IoMode::Direct => open_direct(&tmp, true),
    };
    if direct.is_some() && !on_tmpfs(&plain) {
        // Taking the space up front keeps the file in few extents, and lets ext4 run direct
        // writes into it side by side (writes that extend a file are serialised). The file
        // is cut to its real length at the end; a failure here only loses those benefits.
        // (On tmpfs it would only zero memory that the writes then overwrite.)
        let most = HEADER_LEN as u64
            + plan.iter().map(|r| r.1).sum::<u64>()
            + (plan.len() * TABLE_ENTRY_LEN + TRAILER_LEN) as u64;
        // SAFETY: plain call on an open descriptor.
        unsafe { libc::fallocate(plain.as_raw_fd(), 0, 0, most as libc::off_t) };
    }
    let files = Arc::new(DataFile::new(plain, direct));
    let written = write_image(dev, &tmp, files.clone(), &plan, geo, progress).await;
    let direct_io = files.is_direct();
    progress.finish();
    let (records, data_bytes, file_bytes) = match written {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.context(format!("saving to {} failed", path.display())));
        }
    };
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()));
    }
    // The rename is durable only once the directory is.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(Summary {
        path: path.to_path_buf(),
        device_size: dev.size(),
        records,
        data_bytes,
        file_bytes,
        millis: started.elapsed().as_millis() as u64,
        direct_io,
    })
}

/// A full block of the stream on its way to the file.
struct WriteJob {
    k: u64,
    buf: IoBuf,
    pieces: Vec<Piece>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// What the file threads of a save report back.
#[derive(Default)]
struct WriteState {
    /// (record, block, crc of the record's piece in that block, piece length)
    crcs: Vec<(usize, u64, u32, usize)>,
    error: Option<anyhow::Error>,
}

/// The blocks the device side is filling: `blocks[0]` is block `k` of the stream, filled up
/// to `pos`; a record that does not fit spills into `blocks[1]`.
struct Filling {
    blocks: Vec<IoBuf>,
    pieces: Vec<Vec<Piece>>,
    k: u64,
    pos: usize,
    records: Vec<(u64, u64)>,
}

/// Streams the records of `plan` from the device into `files`, then writes the table and
/// trailer and fsyncs. Returns (records, data bytes, file length).
async fn write_image(
    dev: &dyn BlockDevice,
    tmp: &Path,
    files: Arc<DataFile>,
    plan: &[(u64, u64)],
    geo: Geometry,
    progress: &dyn Progress,
) -> Result<(u64, u64, u64)> {
    let shown = tmp.display().to_string();
    let block = geo.block;
    let header = header_bytes(dev.size());
    let state = Arc::new(Mutex::new(WriteState::default()));
    let failed = Arc::new(AtomicBool::new(false));
    let (job_tx, job_rx) = std::sync::mpsc::channel::<WriteJob>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    // The file side runs on blocking threads so that disk writes never stall the runtime
    // that serves clients; `slots` bounds the blocks handed to them.
    let writers: Vec<_> = (0..IO_THREADS)
        .map(|_| {
            let (files, job_rx, state, failed, shown) = (
                files.clone(),
                job_rx.clone(),
                state.clone(),
                failed.clone(),
                shown.clone(),
            );
            tokio::task::spawn_blocking(move || {
                loop {
                    let job = job_rx.lock().unwrap().recv();
                    let Ok(job) = job else { return };
                    if failed.load(Ordering::Relaxed) {
                        continue;
                    }
                    let crcs: Vec<_> = job
                        .pieces
                        .iter()
                        .map(|p| {
                            let crc = crc32c::crc32c(&job.buf[p.at..p.at + p.len]);
                            (p.rec, job.k, crc, p.len)
                        })
                        .collect();
                    let at = job.k * block as u64;
                    match files.write_all_at(&job.buf, at) {
                        Ok(()) => state.lock().unwrap().crcs.extend(crcs),
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            let e = anyhow!(e).context(format!(
                                "writing {} bytes at byte {at} of {shown}",
                                job.buf.len()
                            ));
                            state.lock().unwrap().error.get_or_insert(e);
                        }
                    }
                }
            })
        })
        .collect();
    let slots = Arc::new(tokio::sync::Semaphore::new(geo.depth));
    let filled = fill_blocks(dev, plan, geo, &header, &job_tx, &slots, &failed, progress).await;
    drop(job_tx);
    for w in writers {
        w.await.context("a file writer thread died")?;
    }
    let mut state = std::mem::take(&mut *state.lock().unwrap());
    let f = filled?;
    if let Some(e) = state.error.take() {
        return Err(e);
    }
    // The last, partial block is written here, with the table and trailer after it.
    let (tail_block, pos) = (&f.blocks[0], f.pos);
    for p in &f.pieces[0] {
        let crc = crc32c::crc32c(&tail_block[p.at..p.at + p.len]);
        state.crcs.push((p.rec, f.k, crc, p.len));
    }
    state.crcs.sort_unstable_by_key(|c| (c.0, c.1));
    let mut records = Vec::with_capacity(f.records.len());
    let mut whole = crc32c::crc32c(&header);
    let mut data_bytes = 0u64;
    let mut pieces = state.crcs.iter().peekable();
    for (rec, &(offset, length)) in f.records.iter().enumerate() {
        let (mut crc, mut got) = (0u32, 0u64);
        while let Some(&(_, _, piece_crc, len)) = pieces.next_if(|c| c.0 == rec) {
            crc = if got == 0 {
                piece_crc
            } else {
                crc32c::crc32c_combine(crc, piece_crc, len)
            };
            got += len as u64;
        }
        // Every piece is accounted for, or the checksums below would describe other data.
        ensure!(
            got == length,
            "internal error: record {rec} has {got} of its {length} bytes checksummed"
        );
        whole = crc32c::crc32c_combine(whole, crc, length as usize);
        data_bytes += length;
        records.push(Record {
            offset,
            length,
            crc,
        });
    }
    let mut table = Vec::with_capacity(records.len() * TABLE_ENTRY_LEN);
    for r in &records {
        table.extend_from_slice(&r.offset.to_le_bytes());
        table.extend_from_slice(&r.length.to_le_bytes());
        table.extend_from_slice(&r.crc.to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
    }
    let table_offset = HEADER_LEN as u64 + data_bytes;
    let file_len = table_offset + table.len() as u64 + TRAILER_LEN as u64;
    whole = crc32c::crc32c_append(whole, &table);
    let mut trailer = [0u8; TRAILER_LEN];
    trailer[0..8].copy_from_slice(TAIL_MAGIC);
    trailer[8..16].copy_from_slice(&(records.len() as u64).to_le_bytes());
    trailer[16..24].copy_from_slice(&table_offset.to_le_bytes());
    trailer[24..32].copy_from_slice(&data_bytes.to_le_bytes());
    trailer[32..40].copy_from_slice(&file_len.to_le_bytes());
    trailer[40..44].copy_from_slice(&crc32c::crc32c(&table).to_le_bytes());
    whole = crc32c::crc32c_append(whole, &trailer[..44]);
    trailer[44..48].copy_from_slice(&whole.to_le_bytes());
    let tail_at = f.k * block as u64;
    ensure!(
        tail_at + pos as u64 == table_offset,
        "internal error: the data ends at byte {} but the table is to start at {table_offset}",
        tail_at + pos as u64
    );
    let mut tail = Vec::with_capacity(pos + table.len() + TRAILER_LEN);
    tail.extend_from_slice(&tail_block[..pos]);
    tail.extend_from_slice(&table);
    tail.extend_from_slice(&trailer);
    files
        .plain
        .write_all_at(&tail, tail_at)
        .and_then(|_| files.plain.set_len(file_len))
        .with_context(|| format!("writing the end of {shown}"))?;
    files
        .plain
        .sync_all()
        .with_context(|| format!("fsync of {shown}"))?;
    Ok((records.len() as u64, data_bytes, file_len))
}

/// The device side of a save: reads each record into its place in the stream, drops records
/// of zeros, and hands every full block to the file threads.
#[allow(clippy::too_many_arguments)]
async fn fill_blocks(
    dev: &dyn BlockDevice,
    plan: &[(u64, u64)],
    geo: Geometry,
    header: &[u8; HEADER_LEN],
    jobs: &std::sync::mpsc::Sender<WriteJob>,
    slots: &Arc<tokio::sync::Semaphore>,
    failed: &AtomicBool,
    progress: &dyn Progress,
) -> Result<Filling> {
    let pool = dev.buffers();
    let block = geo.block;
    let take = || async {
        pool.get(block)
            .await
            .map_err(|e| anyhow!(e).context("taking an I/O buffer"))
    };
    let mut f = Filling {
        blocks: vec![take().await?],
        pieces: vec![Vec::new()],
        k: 0,
        pos: HEADER_LEN,
        records: Vec::new(),
    };
    f.blocks[0][..HEADER_LEN].copy_from_slice(header);
    let mut done = 0u64;
    for &(offset, len) in plan {
        if failed.load(Ordering::Relaxed) {
            break; // The writer's error is reported by the caller.
        }
        let len = len as usize;
        // A record is at most one block, so it ends in this block or the next.
        let first = len.min(block - f.pos);
        let rest = len - first;
        let read = |at: u64, n: usize| {
            move |e: super::IoError| {
                anyhow!(e).context(format!("reading {n} bytes at offset {at} of the device"))
            }
        };
        let pos = f.pos;
        dev.read(offset, &mut f.blocks[0][pos..pos + first])
            .await
            .map_err(read(offset, first))?;
        if rest > 0 {
            f.blocks.push(take().await?);
            let at = offset + first as u64;
            dev.read(at, &mut f.blocks[1][..rest])
                .await
                .map_err(read(at, rest))?;
        }
        done += len as u64;
        progress.update(done);
        // Data that was written as zeros is stored as a hole: it reads back the same. Its
        // bytes in the stream are overwritten by the next record.
        if is_zero(&f.blocks[0][pos..pos + first]) && (rest == 0 || is_zero(&f.blocks[1][..rest])) {
            f.blocks.truncate(1);
            continue;
        }
        let rec = f.records.len();
        f.records.push((offset, len as u64));
        f.pieces[0].push(Piece {
            rec,
            at: pos,
            len: first,
        });
        f.pos += first;
        if rest > 0 {
            f.pieces.push(vec![Piece {
                rec,
                at: 0,
                len: rest,
            }]);
        }
        if f.pos == block {
            let slot = slots.clone().acquire_owned().await?;
            let job = WriteJob {
                k: f.k,
                buf: f.blocks.remove(0),
                pieces: f.pieces.remove(0),
                _slot: slot,
            };
            if jobs.send(job).is_err() {
                bail!("the file writer threads are gone");
            }
            f.k += 1;
            f.pos = rest;
            if f.blocks.is_empty() {
                f.blocks.push(take().await?);
                f.pieces.push(Vec::new());
            }
        }
    }
    Ok(f)
}

/// The parts of a saved file that can be checked without reading its data.
#[derive(Debug)]
pub struct FileLayout {
    /// Size of the device the file was saved from.
    pub device_size: u64,
    /// Total data bytes.
    pub data_bytes: u64,
    /// File length.
    pub file_bytes: u64,
    records: Vec<Record>,
    table: Vec<u8>,
    header: [u8; HEADER_LEN],
    trailer: [u8; TRAILER_LEN],
}

/// Reads and checks the header, trailer and table of the file at `path`: everything but the
/// data. Fails with a sentence naming what is wrong.
pub fn inspect(path: &Path) -> Result<FileLayout> {
    let shown = path.display();
    let mut f = File::open(path).with_context(|| format!("cannot open {shown}"))?;
    let len = f
        .metadata()
        .with_context(|| format!("cannot stat {shown}"))?
        .len();
    ensure!(
        len >= (HEADER_LEN + TRAILER_LEN) as u64,
        "{shown} is not a vramdisk image: it is only {len} bytes long"
    );
    let mut header = [0u8; HEADER_LEN];
    f.read_exact(&mut header)
        .with_context(|| format!("reading the header of {shown}"))?;
    ensure!(
        &header[0..8] == MAGIC,
        "{shown} is not a vramdisk image (no VRAMDISK magic at its start)"
    );
    let version = u32_at(&header, 8);
    ensure!(
        version == VERSION,
        "{shown} is a vramdisk image of format version {version}; this vramdisk reads version {VERSION}"
    );
    ensure!(
        u32_at(&header, 60) == crc32c::crc32c(&header[..60]),
        "{shown} is corrupt: the header checksum does not match"
    );
    let device_size = u64_at(&header, 16);
    let mut trailer = [0u8; TRAILER_LEN];
    f.seek(SeekFrom::Start(len - TRAILER_LEN as u64))?;
    f.read_exact(&mut trailer)
        .with_context(|| format!("reading the trailer of {shown}"))?;
    ensure!(
        &trailer[0..8] == TAIL_MAGIC,
        "{shown} is truncated or was not completely written (no trailer at its end)"
    );
    let count = u64_at(&trailer, 8);
    let table_offset = u64_at(&trailer, 16);
    let data_bytes = u64_at(&trailer, 24);
    let file_len = u64_at(&trailer, 32);
    ensure!(
        file_len == len,
        "{shown} is damaged: its trailer says {file_len} bytes but the file has {len}"
    );
    let table_len = count
        .checked_mul(TABLE_ENTRY_LEN as u64)
        .filter(|t| {
            table_offset == HEADER_LEN as u64 + data_bytes
                && table_offset
                    .checked_add(*t)
                    .and_then(|e| e.checked_add(TRAILER_LEN as u64))
                    == Some(len)
        })
        .with_context(|| format!("{shown} is corrupt: its trailer does not match its length"))?;
    let mut table = vec![0u8; table_len as usize];
    f.seek(SeekFrom::Start(table_offset))?;
    f.read_exact(&mut table)
        .with_context(|| format!("reading the record table of {shown}"))?;
    ensure!(
        u32_at(&trailer, 40) == crc32c::crc32c(&table),
        "{shown} is corrupt: the record table checksum does not match"
    );
    let mut records = Vec::with_capacity(count as usize);
    let mut end_of_last = 0u64;
    let mut sum = 0u64;
    for e in table.chunks_exact(TABLE_ENTRY_LEN) {
        let r = Record {
            offset: u64_at(e, 0),
            length: u64_at(e, 8),
            crc: u32_at(e, 16),
        };
        let end = r.offset.checked_add(r.length);
        ensure!(
            r.length > 0
                && r.length <= RECORD_SIZE
                && r.offset >= end_of_last
                && end.is_some_and(|e| e <= device_size),
            "{shown} is corrupt: record at offset {} of length {} is out of order or out of range",
            r.offset,
            r.length
        );
        end_of_last = r.offset + r.length;
        sum += r.length;
        records.push(r);
    }
    ensure!(
        sum == data_bytes,
        "{shown} is corrupt: its records add up to {sum} bytes, its trailer says {data_bytes}"
    );
    Ok(FileLayout {
        device_size,
        data_bytes,
        file_bytes: len,
        records,
        table,
        header,
        trailer,
    })
}

/// Asks the kernel for large readahead: the file is read once, front to back.
fn sequential(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: advice on an open descriptor; failure only loses the hint.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
}

/// Checks every checksum of the file at `path` without a device.
pub fn verify(path: &Path) -> Result<FileLayout> {
    let layout = inspect(path)?;
    let mut f = File::open(path)?;
    sequential(&f);
    f.seek(SeekFrom::Start(HEADER_LEN as u64))?;
    let mut whole = crc32c::crc32c(&layout.header);
    let mut buf = vec![0u8; RECORD_SIZE as usize];
    for r in &layout.records {
        let b = &mut buf[..r.length as usize];
        f.read_exact(b)
            .with_context(|| format!("reading {}", path.display()))?;
        let crc = crc32c::crc32c(b);
        ensure!(
            crc == r.crc,
            "{} is corrupt: the data of the record at device offset {} does not match its checksum",
            path.display(),
            r.offset
        );
        whole = crc32c::crc32c_combine(whole, crc, b.len());
    }
    check_whole(path, &layout, whole)?;
    Ok(layout)
}

fn check_whole(path: &Path, layout: &FileLayout, data_crc: u32) -> Result<()> {
    let whole = crc32c::crc32c_append(data_crc, &layout.table);
    let whole = crc32c::crc32c_append(whole, &layout.trailer[..44]);
    ensure!(
        whole == u32_at(&layout.trailer, 44),
        "{} is corrupt: the whole-file checksum does not match",
        path.display()
    );
    Ok(())
}

/// Restores the file at `path` into `dev` with [`Options::from_env`]; see [`load_with`].
pub async fn load(dev: &dyn BlockDevice, path: &Path, progress: &dyn Progress) -> Result<Summary> {
    load_with(dev, path, progress, &Options::from_env()).await
}

/// Restores the file at `path` into `dev`, which must be freshly made (all holes, or all
/// zeros if preallocated) and not yet served. On any error the device is emptied again (see
/// the module documentation).
pub async fn load_with(
    dev: &dyn BlockDevice,
    path: &Path,
    progress: &dyn Progress,
    opts: &Options,
) -> Result<Summary> {
    let layout = inspect(path)?;
    load_layout(dev, path, layout, progress, opts).await
}

/// [`load_with`] for a file already inspected.
async fn load_layout(
    dev: &dyn BlockDevice,
    path: &Path,
    layout: FileLayout,
    progress: &dyn Progress,
    opts: &Options,
) -> Result<Summary> {
    let started = Instant::now();
    if layout.device_size != dev.size() {
        bail!(
            "{} holds a device of {} bytes but this device has {} bytes: give the same --size as when it was saved",
            path.display(),
            layout.device_size,
            dev.size()
        );
    }
    let loaded = load_data(dev, path, &layout, progress, opts).await;
    progress.finish();
    let loaded = match loaded {
        Ok(direct) => dev
            .flush()
            .await
            .context("flushing the device after loading")
            .map(|_| direct),
        Err(e) => Err(e),
    };
    match loaded {
        Ok(direct_io) => Ok(Summary {
            path: path.to_path_buf(),
            device_size: layout.device_size,
            records: layout.records.len() as u64,
            data_bytes: layout.data_bytes,
            file_bytes: layout.file_bytes,
            millis: started.elapsed().as_millis() as u64,
            direct_io,
        }),
        Err(e) => {
            // Leave nothing of a bad file behind; a trim of the whole device frees it all.
            let e = match dev.trim(0, dev.size()).await {
                Ok(()) => e,
                Err(t) => e.context(format!(
                    "and emptying the device again failed too ({t}): do not use it"
                )),
            };
            Err(e.context(format!("{} was not loaded", path.display())))
        }
    }
}

/// Where the records lie in the file, for cutting blocks of it into pieces.
struct StreamMap {
    block: u64,
    /// File offset of each record's first byte, and one past its last.
    starts: Vec<u64>,
    ends: Vec<u64>,
    /// End of the data (start of the table).
    data_end: u64,
}

impl StreamMap {
    fn new(records: &[Record], block: usize) -> Self {
        let mut starts = Vec::with_capacity(records.len());
        let mut ends = Vec::with_capacity(records.len());
        let mut at = HEADER_LEN as u64;
        for r in records {
            starts.push(at);
            at += r.length;
            ends.push(at);
        }
        StreamMap {
            block: block as u64,
            starts,
            ends,
            data_end: at,
        }
    }

    /// Blocks holding data.
    fn blocks(&self) -> u64 {
        if self.starts.is_empty() {
            0
        } else {
            self.data_end.div_ceil(self.block)
        }
    }

    /// Bytes of block `k` up to the end of the data.
    fn block_len(&self, k: u64) -> usize {
        (self.data_end - k * self.block).min(self.block) as usize
    }

    /// The pieces of records in block `k`, in file order.
    fn pieces(&self, k: u64) -> impl Iterator<Item = Piece> + '_ {
        let base = k * self.block;
        let s = base.max(HEADER_LEN as u64);
        let e = (base + self.block).min(self.data_end);
        let first = self.ends.partition_point(|&end| end <= s);
        (first..self.starts.len())
            .take_while(move |&i| self.starts[i] < e)
            .map(move |i| {
                let from = self.starts[i].max(s);
                let to = self.ends[i].min(e);
                Piece {
                    rec: i,
                    at: (from - base) as usize,
                    len: (to - from) as usize,
                }
            })
    }
}

/// One block read by a file thread, with the checksums of its pieces.
type ReadResult = (u64, Result<(IoBuf, Vec<u32>)>);

fn read_block(
    files: &DataFile,
    map: &StreamMap,
    shown: &str,
    k: u64,
    mut buf: IoBuf,
) -> Result<(IoBuf, Vec<u32>)> {
    let need = map.block_len(k);
    // Direct reads need whole aligned blocks; reading past the data into the table is
    // harmless, and the buffer is a whole block.
    let want = if files.is_direct() {
        need.next_multiple_of(DIRECT_ALIGN).min(buf.capacity())
    } else {
        need
    };
    buf.set_len(want);
    let at = k * map.block;
    files
        .read_at_least(&mut buf, at, need)
        .with_context(|| format!("reading {need} bytes at byte {at} of {shown}"))?;
    buf.set_len(need);
    let crcs = map
        .pieces(k)
        .map(|p| crc32c::crc32c(&buf[p.at..p.at + p.len]))
        .collect();
    Ok((buf, crcs))
}

/// Writes the pieces of block `k` to the device; returns the buffer and the bytes written.
async fn write_block(
    dev: &dyn BlockDevice,
    map: &StreamMap,
    records: &[Record],
    k: u64,
    buf: IoBuf,
) -> Result<(IoBuf, u64)> {
    let pieces: Vec<Piece> = map.pieces(k).collect();
    let writes = pieces.iter().map(|p| {
        let at = records[p.rec].offset + (k * map.block + p.at as u64 - map.starts[p.rec]);
        let data = &buf[p.at..p.at + p.len];
        async move {
            dev.write(at, data, false).await.map_err(|e| {
                anyhow!(e).context(format!(
                    "writing {} bytes at offset {at} of the device",
                    data.len()
                ))
            })
        }
    });
    futures::future::try_join_all(writes).await?;
    let bytes = pieces.iter().map(|p| p.len as u64).sum();
    Ok((buf, bytes))
}

/// Streams the data of the file into `dev`, checking every checksum. Returns whether direct
/// I/O was used.
async fn load_data(
    dev: &dyn BlockDevice,
    path: &Path,
    layout: &FileLayout,
    progress: &dyn Progress,
    opts: &Options,
) -> Result<bool> {
    let shown = path.display().to_string();
    let pool = dev.buffers();
    let geo = geometry(pool, opts)?;
    let map = Arc::new(StreamMap::new(&layout.records, geo.block));
    let plain = File::open(path).with_context(|| format!("cannot open {shown}"))?;
    let direct = match opts.io {
        IoMode::Buffered => None,
        IoMode::Direct => open_direct(path, false),
        // A file mostly in the page cache comes faster from there than from the disk.
        IoMode::Auto if cached_fraction(&plain, map.data_end) >= 0.5 => None,
        IoMode::Auto => open_direct(path, false),
    };
    if direct.is_none() {
        // SAFETY: advice on an open descriptor; failure only loses the hint.
        unsafe { libc::posix_fadvise(plain.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
    }
    let files = Arc::new(DataFile::new(plain, direct));
    let blocks = map.blocks();
    let (job_tx, job_rx) = std::sync::mpsc::channel::<(u64, IoBuf)>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    let (res_tx, mut res_rx) = tokio::sync::mpsc::unbounded_channel::<ReadResult>();
    let readers: Vec<_> = (0..IO_THREADS.min(blocks as usize))
        .map(|_| {
            let (files, map, job_rx, res_tx, shown) = (
                files.clone(),
                map.clone(),
                job_rx.clone(),
                res_tx.clone(),
                shown.clone(),
            );
            tokio::task::spawn_blocking(move || {
                loop {
                    let job = job_rx.lock().unwrap().recv();
                    let Ok((k, buf)) = job else { return };
                    let r = read_block(&files, &map, &shown, k, buf);
                    if res_tx.send((k, r)).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    drop(res_tx);

    let streamed = async {
        // The block buffers are taken once and passed round: a buffer goes back to the file
        // threads as soon as its block is on the device.
        let mut issued = 0u64;
        while issued < blocks.min(geo.depth as u64) {
            let buf = pool
                .get(geo.block)
                .await
                .map_err(|e| anyhow!(e).context("taking an I/O buffer"))?;
            job_tx.send((issued, buf)).ok();
            issued += 1;
        }
        let mut arrived: BTreeMap<u64, Result<(IoBuf, Vec<u32>)>> = BTreeMap::new();
        let mut whole = crc32c::crc32c(&layout.header);
        let mut rec_crc = 0u32;
        let mut done = 0u64;
        // Several blocks on their way to the device at once, so that a GPU copies one while
        // the chunks of the next are allocated and its checksums checked.
        let most_writing = (geo.depth / 2).max(1);
        let mut writing = futures::stream::FuturesUnordered::new();
        let mut k = 0u64;
        while k < blocks || !writing.is_empty() {
            // Blocks are checked in file order, whichever thread read them first.
            if writing.len() < most_writing
                && let Some(block) = arrived.remove(&k)
            {
                let (buf, crcs) = block?;
                // Every record that ends in this block is checked before any of the block
                // is written to the device.
                for (p, &crc) in map.pieces(k).zip(&crcs) {
                    let r = &layout.records[p.rec];
                    let start = k * map.block + p.at as u64;
                    rec_crc = if start == map.starts[p.rec] {
                        crc
                    } else {
                        crc32c::crc32c_combine(rec_crc, crc, p.len)
                    };
                    if start + p.len as u64 == map.ends[p.rec] {
                        ensure!(
                            rec_crc == r.crc,
                            "{shown} is corrupt: the data of the record at device offset {} does not match its checksum",
                            r.offset
                        );
                        whole = crc32c::crc32c_combine(whole, rec_crc, r.length as usize);
                    }
                }
                writing.push(write_block(dev, &map, &layout.records, k, buf));
                k += 1;
                continue;
            }
            tokio::select! {
                r = res_rx.recv(), if k < blocks && writing.len() < most_writing => {
                    let (j, r) = r.context("the file reader threads stopped early")?;
                    arrived.insert(j, r);
                }
                Some(w) = writing.next(), if !writing.is_empty() => {
                    let (buf, bytes) = w?;
                    done += bytes;
                    progress.update(done);
                    // The buffer goes back to the file threads for the next block.
                    if issued < blocks {
                        job_tx.send((issued, buf)).ok();
                        issued += 1;
                    }
                }
            }
        }
        Ok::<u32, anyhow::Error>(whole)
    }
    .await;
    drop(job_tx);
    // The threads finish the block in hand (if any) and see the channel closed.
    drop(res_rx);
    for r in readers {
        r.await.context("a file reader thread died")?;
    }
    check_whole(path, layout, streamed?)?;
    Ok(files.is_direct())
}

/// Reports progress as a bar when stderr is a terminal, as a log line every few seconds
/// otherwise.
pub struct ConsoleProgress {
    bar: Option<indicatif::ProgressBar>,
    label: String,
    total: u64,
    started: Instant,
    last_log: std::sync::Mutex<Instant>,
}

impl ConsoleProgress {
    /// Progress of `label` ("saving to x.img") over `total` bytes.
    pub fn new(label: &str, total: u64) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(label.to_string());
            bar
        });
        ConsoleProgress {
            bar,
            label: label.to_string(),
            total,
            started: Instant::now(),
            last_log: std::sync::Mutex::new(Instant::now()),
        }
    }

    /// Total bytes to be moved by a save of `dev`.
    pub fn save_total(dev: &dyn BlockDevice) -> u64 {
        plan_records(dev, RECORD_SIZE)
            .map(|p| p.iter().map(|r| r.1).sum())
            .unwrap_or(0)
    }

    /// Total bytes to be moved by a load of `path`.
    pub fn load_total(path: &Path) -> u64 {
        inspect(path).map(|l| l.data_bytes).unwrap_or(0)
    }
}

impl Progress for ConsoleProgress {
    fn update(&self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            return;
        }
        // Called once per 8 MiB record, so the lock is not on any client's I/O path.
        let mut last = self.last_log.lock().unwrap();
        if last.elapsed() >= Duration::from_secs(5) {
            *last = Instant::now();
            tracing::info!(
                "{}: {} of {} MiB ({:.0}%)",
                self.label,
                done >> 20,
                self.total >> 20,
                done as f64 * 100.0 / self.total.max(1) as f64
            );
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let secs = self.started.elapsed().as_secs_f64();
        tracing::info!(
            "{}: {} MiB in {:.2} s ({:.0} MiB/s)",
            self.label,
            self.total >> 20,
            secs,
            (self.total >> 20) as f64 / secs.max(1e-9)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::host::HostBackend;
    use crate::engine::{SparseDevice, SparseOptions};
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

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
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
}
