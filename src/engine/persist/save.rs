//! Saving: the device side reads each record into its place in a stream of fixed blocks, the
//! file threads write whole blocks and checksum them, and the end of the file (table and
//! trailer) is written last, into a temporary file renamed over the target.

use super::file::{self, DataFile};
use super::format::{self, HEADER_LEN, RECORD_SIZE, Record, TABLE_ENTRY_LEN, TRAILER_LEN};
use super::{Geometry, IO_THREADS, IoMode, Options, Piece, Progress, Summary, geometry};
use crate::engine::{BlockDevice, Extent, IoBuf, IoError};
use anyhow::{Context, Result, anyhow, bail, ensure};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Bytes a save of `dev` moves (its data, less what reads as zeros by the extent map), for
/// the total of a progress display.
pub fn bytes_to_save(dev: &dyn BlockDevice) -> Result<u64> {
    Ok(plan_records(dev, RECORD_SIZE)?.iter().map(|r| r.1).sum())
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
pub(super) fn is_zero(b: &[u8]) -> bool {
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}

/// The temporary file a save of `path` writes before renaming it over `path`.
fn temp_path_for(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".tmp{}", std::process::id()));
    Ok(path.with_file_name(tmp))
}

/// Writes the data of `dev` to `path` (see the module documentation for the format), with
/// the default [`Options`].
pub async fn save(dev: &dyn BlockDevice, path: &Path, progress: &dyn Progress) -> Result<Summary> {
    save_with(dev, path, progress, &Options::default()).await
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
        IoMode::Auto | IoMode::Direct => file::open_direct(&tmp, true),
    };
    if direct.is_some() && !file::on_tmpfs(&plain) {
        // Taking the space up front keeps the file in few extents, and lets ext4 run direct
        // writes into it side by side (writes that extend a file are serialised). The file
        // is cut to its real length at the end; a failure here only loses those benefits.
        // (On tmpfs it would only zero memory that the writes then overwrite.)
        let most = HEADER_LEN as u64
            + plan.iter().map(|r| r.1).sum::<u64>()
            + (plan.len() * TABLE_ENTRY_LEN + TRAILER_LEN) as u64;
        file::preallocate(&plain, most);
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
    let header = format::header_bytes(dev.size());
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
    let (table, trailer, table_offset) = format::end_bytes(&records, data_bytes, whole);
    let file_len = table_offset + (table.len() + TRAILER_LEN) as u64;
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
            move |e: IoError| {
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
