//! [`SpillFile`]: the spill tier on disk, for what spill RAM cannot hold.
//!
//! One file, preallocated at start (so a spill never fails for want of disk space and swap
//! never allocates on its spill path), cut into chunk-sized slots. Whole-chunk moves go
//! through `O_DIRECT` in aligned pinned buffers and never fill the page cache, which would
//! take the very RAM that ran out. Requests on a spilled chunk are served in place: reads
//! and writes are widened to the file's 4 KiB blocks through a bounce buffer, and a write
//! that covers only part of a block reads it first, under the chunk's lock, so that two
//! writes to different bytes of one block cannot undo each other. The calls block their
//! thread for one disk access: this tier is the last resort, where RAM has run out.

use crate::engine::{IoError, IoResult};
use std::alloc::Layout;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Alignment of direct I/O on the spill file (the largest logical block size in use).
pub const BLOCK: usize = 4096;

/// A preallocated file of chunk-sized slots.
pub struct SpillFile {
    file: File,
    path: PathBuf,
    slot: usize,
    slots: u64,
    free: Mutex<Vec<u64>>,
    used: AtomicU64,
    direct: bool,
}

impl SpillFile {
    /// Creates (or truncates) `path` and preallocates `size` bytes of `slot`-byte slots.
    /// Fails with a sentence naming the file and the cause.
    pub fn create(path: &Path, size: u64, slot: usize) -> Result<Arc<SpillFile>, String> {
        let slots = size / slot as u64;
        if slots == 0 {
            return Err(format!(
                "--spill-file {}: {size} bytes do not hold one {slot}-byte chunk",
                path.display()
            ));
        }
        let open = |direct: bool| {
            let mut o = std::fs::OpenOptions::new();
            o.read(true).write(true).create(true).truncate(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let (file, direct) = match open(true) {
            Ok(f) => (f, true),
            // tmpfs and some network filesystems refuse O_DIRECT.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (
                open(false).map_err(|e| format!("--spill-file {}: {e}", path.display()))?,
                false,
            ),
            Err(e) => return Err(format!("--spill-file {}: {e}", path.display())),
        };
        let bytes = slots * slot as u64;
        nix::fcntl::fallocate(
            &file,
            nix::fcntl::FallocateFlags::empty(),
            0,
            bytes as libc::off_t,
        )
        .map_err(|e| {
            format!(
                "--spill-file {}: cannot preallocate {bytes} bytes ({e}): free disk space or give a smaller --spill-file-size",
                path.display()
            )
        })?;
        if !direct {
            tracing::warn!(
                "--spill-file {}: the filesystem refuses O_DIRECT; spilled chunks go through the page cache",
                path.display()
            );
        }
        Ok(Arc::new(SpillFile {
            file,
            path: path.to_path_buf(),
            slot,
            slots,
            free: Mutex::new((0..slots).rev().collect()),
            used: AtomicU64::new(0),
            direct,
        }))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// False where the filesystem refused `O_DIRECT` (tmpfs): spilled data then also sits
    /// in the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Bytes the file may hold.
    pub fn capacity(&self) -> u64 {
        self.slots * self.slot as u64
    }

    /// Bytes held by spilled chunks now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes that more chunks may still take.
    pub fn free_bytes(&self) -> u64 {
        self.capacity().saturating_sub(self.used())
    }

    /// A free slot, or `None` when the file is full.
    pub fn alloc(self: &Arc<Self>) -> Option<FileChunk> {
        let slot = self.free.lock().unwrap().pop()?;
        self.used.fetch_add(self.slot as u64, Ordering::Relaxed);
        Some(FileChunk {
            slot,
            file: self.clone(),
            lock: Mutex::new(()),
        })
    }
}

/// An aligned heap buffer for direct I/O.
struct Bounce {
    ptr: std::ptr::NonNull<u8>,
    layout: Layout,
}

impl Bounce {
    fn new(len: usize) -> IoResult<Bounce> {
        let layout = Layout::from_size_align(len.max(BLOCK), BLOCK)
            .map_err(|e| IoError::Backend(format!("spill file buffer of {len} bytes: {e}")))?;
        // SAFETY: non-zero size. Zeroed so no stale heap bytes can reach the file.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        std::ptr::NonNull::new(ptr)
            .map(|ptr| Bounce { ptr, layout })
            .ok_or_else(|| IoError::NoSpace(format!("no memory for a {len}-byte spill buffer")))
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the allocation is ours, initialised, and this many bytes long.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated in new with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// One chunk's slot in the spill file; goes back to the free list when dropped.
pub struct FileChunk {
    slot: u64,
    file: Arc<SpillFile>,
    /// Serialises partial-block writes (and the reads they make) on this chunk.
    lock: Mutex<()>,
}

impl FileChunk {
    fn at(&self, offset: usize) -> u64 {
        self.slot * self.file.slot as u64 + offset as u64
    }

    fn check(&self, offset: usize, len: usize) -> IoResult<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.file.slot => Ok(()),
            _ => Err(IoError::Backend(format!(
                "spill file access {offset}+{len} outside its {}-byte slot",
                self.file.slot
            ))),
        }
    }

    fn io_error(&self, what: &str, offset: usize, len: usize, e: std::io::Error) -> IoError {
        IoError::Backend(format!(
            "spill file {}: {what} of {len} bytes at {} failed: {e}",
            self.file.path.display(),
            self.at(offset)
        ))
    }

    /// Reads `buf.len()` bytes at `offset` of the chunk.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> IoResult<()> {
        self.check(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let start = offset / BLOCK * BLOCK;
        let end = (offset + buf.len()).div_ceil(BLOCK) * BLOCK;
        let mut b = Bounce::new(end - start)?;
        let bytes = &mut b.bytes()[..end - start];
        self.file
            .file
            .read_exact_at(bytes, self.at(start))
            .map_err(|e| self.io_error("read", offset, buf.len(), e))?;
        buf.copy_from_slice(&bytes[offset - start..][..buf.len()]);
        Ok(())
    }

    /// Writes `data` at `offset` of the chunk.
    pub fn write(&self, offset: usize, data: &[u8]) -> IoResult<()> {
        self.write_with(offset, data.len(), |dst| dst.copy_from_slice(data))
    }

    /// Sets `len` bytes at `offset` of the chunk to zero.
    pub fn zero(&self, offset: usize, len: usize) -> IoResult<()> {
        self.write_with(offset, len, |dst| dst.fill(0))
    }

    fn write_with(&self, offset: usize, len: usize, fill: impl FnOnce(&mut [u8])) -> IoResult<()> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let start = offset / BLOCK * BLOCK;
        let end = (offset + len).div_ceil(BLOCK) * BLOCK;
        let mut b = Bounce::new(end - start)?;
        let bytes = &mut b.bytes()[..end - start];
        // Every write takes the lock, not only partial ones: a whole-block write landing
        // between a partial write's read and its write-back would be undone by it.
        let _guard = self.lock.lock().unwrap();
        let (head, tail) = (start != offset, end != offset + len);
        let mut fetch = |from: usize| {
            self.file
                .file
                .read_exact_at(&mut bytes[from - start..][..BLOCK], self.at(from))
                .map_err(|e| self.io_error("read", offset, len, e))
        };
        // Only the first and last blocks hold bytes outside the write.
        if head {
            fetch(start)?;
        }
        if tail && !(head && end - BLOCK == start) {
            fetch(end - BLOCK)?;
        }
        fill(&mut bytes[offset - start..][..len]);
        self.file
            .file
            .write_all_at(bytes, self.at(start))
            .map_err(|e| self.io_error("write", offset, len, e))
    }
}

impl Drop for FileChunk {
    fn drop(&mut self) {
        self.file.free.lock().unwrap().push(self.slot);
        self.file
            .used
            .fetch_sub(self.file.slot as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unaligned writes and zeroes from several threads to one chunk land exactly and leave
    /// the neighbouring bytes alone, however they share blocks.
    #[test]
    fn unaligned_io_in_place_keeps_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let f = SpillFile::create(&dir.path().join("spill"), 4 << 20, 1 << 20).unwrap();
        assert_eq!(f.capacity(), 4 << 20);
        let c = Arc::new(f.alloc().unwrap());
        c.zero(0, 1 << 20).unwrap();
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..200usize {
                        // Thread t owns bytes t, t+4, t+8 ... of every 1000-byte run.
                        let off = i * 1000 + t as usize * 250 + 1;
                        c.write(off, &[t + 1; 249]).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut back = vec![0u8; 200_000];
        c.read(0, &mut back).unwrap();
        for (i, &b) in back.iter().enumerate() {
            let k = i % 1000;
            let want = if k % 250 == 0 { 0 } else { (k / 250) as u8 + 1 };
            assert_eq!(b, want, "byte {i}");
        }
        c.zero(3, 5000).unwrap();
        let mut z = vec![1u8; 5002];
        c.read(2, &mut z).unwrap();
        assert_eq!(z[0], 1, "byte 2, before the zeroes, lost its data");
        assert!(z[1..5001].iter().all(|&b| b == 0));
        assert_eq!(z[5001], 1, "byte 5003, after the zeroes, lost its data");
        assert_eq!(f.free_bytes(), 3 << 20);
        drop(c);
        assert_eq!(f.free_bytes(), 4 << 20);
        let all: Vec<_> = (0..4).map(|_| f.alloc().unwrap()).collect();
        assert!(f.alloc().is_none(), "a full file hands out no slot");
        drop(all);
    }
}
