//! Loading: file threads read whole blocks of the stream and checksum the records' pieces in
//! them, the device side checks each record as its last piece arrives and writes the pieces
//! to the device; any failure empties the device again.

use super::file::{self, DIRECT_ALIGN, DataFile, MOSTLY_CACHED};
use super::format::{FileLayout, HEADER_LEN, RECORD_SIZE, Record, check_whole, inspect};
use super::{IO_THREADS, IoMode, Options, Piece, Progress, Summary, geometry};
use crate::engine::{BlockDevice, IoBuf};
use anyhow::{Context, Result, anyhow, bail, ensure};
use futures::StreamExt;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Checks every checksum of the file at `path` without a device.
pub fn verify(path: &Path) -> Result<FileLayout> {
    let layout = inspect(path)?;
    let mut f = File::open(path)?;
    file::sequential(&f);
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

/// Restores the file at `path` into `dev` with the default [`Options`]; see
/// [`load_with`].
pub async fn load(dev: &dyn BlockDevice, path: &Path, progress: &dyn Progress) -> Result<Summary> {
    load_with(dev, path, progress, &Options::default()).await
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
pub(super) async fn load_layout(
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
pub(super) struct StreamMap {
    pub(super) block: u64,
    /// File offset of each record's first byte, and one past its last.
    starts: Vec<u64>,
    ends: Vec<u64>,
    /// End of the data (start of the table).
    pub(super) data_end: u64,
}

impl StreamMap {
    /// The map of `records` in blocks of `block` bytes.
    pub(super) fn new(records: &[Record], block: usize) -> Self {
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
    pub(super) fn blocks(&self) -> u64 {
        if self.starts.is_empty() {
            0
        } else {
            self.data_end.div_ceil(self.block)
        }
    }

    /// Bytes of block `k` up to the end of the data.
    pub(super) fn block_len(&self, k: u64) -> usize {
        (self.data_end - k * self.block).min(self.block) as usize
    }

    /// The pieces of records in block `k`, in file order.
    pub(super) fn pieces(&self, k: u64) -> impl Iterator<Item = Piece> + '_ {
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
        IoMode::Direct => file::open_direct(path, false),
        // A file mostly in the page cache comes faster from there than from the disk.
        IoMode::Auto if file::cached_fraction(&plain, map.data_end) >= MOSTLY_CACHED => None,
        IoMode::Auto => file::open_direct(path, false),
    };
    if direct.is_none() {
        file::sequential(&plain);
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
