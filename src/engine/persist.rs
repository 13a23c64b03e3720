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
//! The table sits after the data so that a save is one sequential write with no seeking,
//! and a truncated file loses its trailer and is recognised at once. The writer puts
//! everything in a temporary file in the target's directory, fsyncs it, renames it over the
//! target and fsyncs the directory, so the target is always either the old file or the
//! complete new one.
//!
//! Loading checks the header, the trailer, the table and the file length before it touches
//! the device, and each record's checksum before that record is written. If a record or the
//! whole-file checksum still fails, the device is emptied again and the load fails: the
//! daemon loads before it serves, so no client ever sees a half-loaded device.
//!
//! A save of a device that clients keep writing is not a point-in-time snapshot: each record
//! is copied as it is at the moment it is read. Quiesce writers (or save at shutdown) for a
//! consistent image.

use super::{BlockDevice, Extent, IoBuf};
use anyhow::{Context, Result, bail, ensure};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"VRAMDISK";
const TAIL_MAGIC: &[u8; 8] = b"VRDKTAIL";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 64;
const TABLE_ENTRY_LEN: usize = 24;
const TRAILER_LEN: usize = 48;
/// Largest record: one device read and one file write. Large enough for the disk to stream,
/// small enough that a few in flight fit easily in the device's buffer pool.
pub const RECORD_SIZE: u64 = 8 << 20;
/// Records in flight between the device side and the file side.
const PIPELINE_DEPTH: usize = 4;

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
}

/// One record of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Record {
    offset: u64,
    length: u64,
    crc: u32,
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

/// Splits the allocated extents of `dev` into records of at most [`RECORD_SIZE`] bytes,
/// aligned to multiples of it so records line up with chunks.
fn plan_records(dev: &dyn BlockDevice) -> Result<Vec<(u64, u64)>> {
    let mut extents: Vec<Extent> = Vec::new();
    dev.extents(0, dev.size(), &mut extents)
        .context("reading the device's extent map")?;
    let mut plan = Vec::new();
    for e in extents.iter().filter(|e| !e.hole && !e.zero) {
        let mut pos = e.offset;
        let end = e.offset + e.length;
        while pos < end {
            let next = ((pos / RECORD_SIZE) + 1) * RECORD_SIZE;
            let len = next.min(end) - pos;
            plan.push((pos, len));
            pos += len;
        }
    }
    Ok(plan)
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

/// Writes the data of `dev` to `path` (see the module documentation for the format).
pub async fn save(dev: &dyn BlockDevice, path: &Path, progress: &dyn Progress) -> Result<Summary> {
    let started = Instant::now();
    let plan = plan_records(dev)?;
    let tmp = temp_path_for(path)?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file = File::create(&tmp)
        .with_context(|| format!("cannot create {} (for saving)", tmp.display()))?;
    let device_size = dev.size();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, IoBuf)>(PIPELINE_DEPTH);
    let tmp_w = tmp.clone();
    // The file side runs on a blocking thread so that disk writes never stall the runtime
    // that serves clients; the device side keeps up to PIPELINE_DEPTH records ahead of it.
    let writer = tokio::task::spawn_blocking(move || -> Result<(u64, u64, u64)> {
        let mut file = file;
        let mut records: Vec<Record> = Vec::new();
        let header = header_bytes(device_size);
        file.write_all(&header)?;
        let mut whole = crc32c::crc32c(&header);
        let mut data_bytes = 0u64;
        while let Some((offset, buf)) = rx.blocking_recv() {
            let crc = crc32c::crc32c(&buf);
            // Combining costs O(log n) instead of a second pass over the data.
            whole = crc32c::crc32c_combine(whole, crc, buf.len());
            file.write_all(&buf)
                .with_context(|| format!("writing {}", tmp_w.display()))?;
            records.push(Record {
                offset,
                length: buf.len() as u64,
                crc,
            });
            data_bytes += buf.len() as u64;
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
        file.write_all(&table)
            .and_then(|_| file.write_all(&trailer))
            .with_context(|| format!("writing {}", tmp_w.display()))?;
        file.sync_all()
            .with_context(|| format!("fsync of {}", tmp_w.display()))?;
        Ok((records.len() as u64, data_bytes, file_len))
    });

    let mut done = 0u64;
    let mut read_err: Option<anyhow::Error> = None;
    for &(offset, len) in &plan {
        let mut buf = match dev.buffers().get(len as usize).await {
            Ok(b) => b,
            Err(e) => {
                read_err = Some(anyhow::Error::new(e).context("taking an I/O buffer"));
                break;
            }
        };
        if let Err(e) = dev.read(offset, &mut buf).await {
            read_err = Some(anyhow::Error::new(e).context(format!(
                "reading {len} bytes at offset {offset} of the device"
            )));
            break;
        }
        done += len;
        progress.update(done);
        // Data that was written as zeros is stored as a hole: it reads back the same.
        if buf.iter().all(|&b| b == 0) {
            continue;
        }
        if tx.send((offset, buf)).await.is_err() {
            break; // The writer failed; its error is reported below.
        }
    }
    drop(tx);
    let written = writer.await.context("the file writer thread died");
    progress.finish();
    let result = match (read_err, written) {
        (Some(e), _) => Err(e),
        (None, Err(e)) => Err(e),
        (None, Ok(Err(e))) => Err(e),
        (None, Ok(Ok(counts))) => Ok(counts),
    };
    let (records, data_bytes, file_bytes) = match result {
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
        device_size,
        records,
        data_bytes,
        file_bytes,
        millis: started.elapsed().as_millis() as u64,
    })
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

/// Restores the file at `path` into `dev`, which must be freshly made (all holes) and not
/// yet served. On any error the device is emptied again (see the module documentation).
pub async fn load(dev: &dyn BlockDevice, path: &Path, progress: &dyn Progress) -> Result<Summary> {
    let started = Instant::now();
    let layout = inspect(path)?;
    if layout.device_size != dev.size() {
        bail!(
            "{} holds a device of {} bytes but this device has {} bytes: give the same --size as when it was saved",
            path.display(),
            layout.device_size,
            dev.size()
        );
    }
    match load_data(dev, path, &layout, progress).await {
        Ok(()) => {
            dev.flush()
                .await
                .context("flushing the device after loading")?;
            Ok(Summary {
                path: path.to_path_buf(),
                device_size: layout.device_size,
                records: layout.records.len() as u64,
                data_bytes: layout.data_bytes,
                file_bytes: layout.file_bytes,
                millis: started.elapsed().as_millis() as u64,
            })
        }
        Err(e) => {
            // Leave nothing of a bad file behind; a trim of the whole device frees it all.
            let _ = dev.trim(0, dev.size()).await;
            Err(e.context(format!("{} was not loaded", path.display())))
        }
    }
}

async fn load_data(
    dev: &dyn BlockDevice,
    path: &Path,
    layout: &FileLayout,
    progress: &dyn Progress,
) -> Result<()> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    sequential(&file);
    file.seek(SeekFrom::Start(HEADER_LEN as u64))?;
    let records = layout.records.clone();
    let pool = dev.buffers().clone();
    let shown = path.display().to_string();
    let header_crc = crc32c::crc32c(&layout.header);
    let handle = tokio::runtime::Handle::current();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<(u64, IoBuf)>>(PIPELINE_DEPTH);
    // The file side reads and checks each record on a blocking thread; only records whose
    // checksum matched are handed to the device side.
    let reader = tokio::task::spawn_blocking(move || -> Option<u32> {
        let mut whole = header_crc;
        for r in records {
            let step = (|| -> Result<IoBuf> {
                let mut buf = handle
                    .block_on(pool.get(r.length as usize))
                    .context("taking an I/O buffer")?;
                file.read_exact(&mut buf)
                    .with_context(|| format!("reading {shown}"))?;
                ensure!(
                    crc32c::crc32c(&buf) == r.crc,
                    "{shown} is corrupt: the data of the record at device offset {} does not match its checksum",
                    r.offset
                );
                Ok(buf)
            })();
            match step {
                Ok(buf) => {
                    whole = crc32c::crc32c_combine(whole, r.crc, buf.len());
                    if tx.blocking_send(Ok((r.offset, buf))).is_err() {
                        return None;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return None;
                }
            }
        }
        Some(whole)
    });
    let mut done = 0u64;
    let mut failure = None;
    while let Some(item) = rx.recv().await {
        match item {
            Ok((offset, buf)) => {
                if let Err(e) = dev.write(offset, &buf, false).await {
                    failure = Some(anyhow::Error::new(e).context(format!(
                        "writing {} bytes at offset {offset} of the device",
                        buf.len()
                    )));
                    break;
                }
                done += buf.len() as u64;
                progress.update(done);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    drop(rx);
    let whole = reader.await.context("the file reader thread died")?;
    progress.finish();
    if let Some(e) = failure {
        return Err(e);
    }
    let whole = whole.context("the file reader stopped early")?;
    check_whole(path, layout, whole)
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
        plan_records(dev)
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
        let mut opts = SparseOptions::new(size);
        opts.chunk_size = 1 << 20;
        opts.buffer_limit = 256 << 20;
        Arc::new(SparseDevice::new(HostBackend::new(), opts).unwrap())
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
}
