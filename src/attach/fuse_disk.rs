//! The one-file filesystem the FUSE + loop method serves, apart from how requests arrive.
//!
//! Two transports carry the kernel's FUSE requests to this process: `fuser` reading
//! `/dev/fuse` ([`super::fuse_loop`]), and FUSE over io_uring ([`super::fuse_uring`]). Both
//! answer every request through [`Disk`], so the files, their attributes and what each
//! operation does to the device are the same whichever transport is in use.

use crate::engine::{BlockDevice, IoError, IoResult, ZeroFlags};
use crate::tunables::ATTR_TTL;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

/// The mount's root directory.
pub(crate) const ROOT_INO: u64 = 1;
/// The device image.
pub(crate) const DISK_INO: u64 = 2;
/// The counters file.
pub(crate) const STATS_INO: u64 = 3;
/// Name of the device image inside the FUSE mount.
pub const DISK_NAME: &str = "disk";
/// Name of the counters file inside the FUSE mount.
pub const STATS_NAME: &str = "stats";
/// Block size the files report, and the loop device's logical block size.
pub(crate) const PAGE: u32 = 4096;

/// `FOPEN_DIRECT_IO`: every request reaches us as it is, nothing is cached twice.
pub(crate) const FOPEN_DIRECT_IO: u32 = 1 << 0;
/// `FOPEN_PARALLEL_DIRECT_WRITES`: direct writes are not serialised on the inode lock.
pub(crate) const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;

/// A directory entry of the root: inode, whether it is a directory, name.
pub(crate) const ENTRIES: [(u64, bool, &str); 4] = [
    (ROOT_INO, true, "."),
    (ROOT_INO, true, ".."),
    (DISK_INO, false, DISK_NAME),
    (STATS_INO, false, STATS_NAME),
];

/// What a request failed with: an errno for the kernel.
pub(crate) type Errno = i32;

/// The attributes of one of the mount's files.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Attr {
    pub(crate) ino: u64,
    pub(crate) dir: bool,
    pub(crate) size: u64,
    pub(crate) blocks: u64,
    pub(crate) perm: u16,
    pub(crate) nlink: u32,
}

/// Counts the disk image's open files, so that detach can wait for the kernel's RELEASE of
/// the loop device's file before it unmounts: unmounting first ends the connection while
/// that RELEASE is on its way, and its reply then fails ("Failed to send FUSE reply: No
/// such file or directory", seen in the test VM). Nothing was lost then (a RELEASE carries
/// no data, and the kernel had closed the file already), but the error hid real ones.
#[derive(Default)]
pub(crate) struct OpenFiles {
    count: std::sync::Mutex<u64>,
    released: std::sync::Condvar,
}

impl OpenFiles {
    fn opened(&self) {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    /// Called once the reply to a RELEASE of the image has been sent.
    pub(crate) fn released(&self) {
        let mut n = self.count.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.released.notify_all();
        }
    }

    /// Waits up to `timeout` for every open file to be released; whether they were.
    pub(crate) fn wait_all_released(&self, timeout: Duration) -> bool {
        let n = self.count.lock().unwrap_or_else(|e| e.into_inner());
        let (n, _) = self
            .released
            .wait_timeout_while(n, timeout, |n| *n > 0)
            .unwrap_or_else(|e| e.into_inner());
        *n == 0
    }
}

/// A device call on the disk image, as the device returns it: polled to completion by
/// whoever began it.
pub(crate) type DeviceIo<'a> = Pin<Box<dyn Future<Output = IoResult<()>> + Send + 'a>>;

/// A READ or WRITE begun ([`Disk::begin_read`], [`Disk::begin_write`]).
pub(crate) enum Begun<'a> {
    /// Answered at once: this many bytes.
    Done(usize),
    /// On the device: `len` bytes once `io` completes ([`Disk::finish`]).
    Io { io: DeviceIo<'a>, len: usize },
}

/// The filesystem: one device image and a counters file in a read-only directory.
pub(crate) struct Disk {
    pub(crate) device: Arc<dyn BlockDevice>,
    runtime: tokio::runtime::Handle,
    pub(crate) size: u64,
    pub(crate) read_only: bool,
    pub(crate) created: SystemTime,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    io_errors: AtomicU64,
    /// Opens of the disk image not yet released.
    pub(crate) open_files: Arc<OpenFiles>,
    /// Which transport serves the mount, for the stats file ("FUSE over io_uring, 2 queues of 4 threads").
    transport: OnceLock<String>,
    /// The FUSE rings' counters, where they serve the mount.
    pub(crate) rings: RingCounters,
}

/// What the stats file says of the FUSE rings (FUSE over io_uring).
#[derive(Debug, Default)]
pub(crate) struct RingCounters {
    /// Entries lent to the kernel, all queues together: each serves one request at a time.
    pub(crate) entries: AtomicU64,
    /// The most requests one ring thread has had on the device at once.
    pub(crate) most_in_flight: AtomicU64,
}

impl Disk {
    /// The filesystem of `device`, whose async calls run on `runtime`.
    pub(crate) fn new(device: Arc<dyn BlockDevice>, runtime: tokio::runtime::Handle) -> Disk {
        Disk {
            size: device.size(),
            read_only: device.capabilities().read_only,
            device,
            runtime,
            created: SystemTime::now(),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            io_errors: AtomicU64::new(0),
            open_files: Arc::new(OpenFiles::default()),
            transport: OnceLock::new(),
            rings: RingCounters::default(),
        }
    }

    /// Records which transport serves the mount (once).
    pub(crate) fn set_transport(&self, what: String) {
        let _ = self.transport.set(what);
    }

    /// Runs a device call to completion on this (FUSE) thread (see
    /// [`super::io_path::complete`]).
    pub(crate) fn complete<F: std::future::Future>(&self, fut: F) -> F::Output {
        super::io_path::complete(&self.runtime, fut)
    }

    /// The attributes of inode `ino`, if it is one of ours.
    pub(crate) fn attr(&self, ino: u64) -> Option<Attr> {
        let (dir, size, perm, nlink) = match ino {
            ROOT_INO => (true, 0, 0o500, 2),
            DISK_INO => (
                false,
                self.size,
                if self.read_only { 0o400 } else { 0o600 },
                1,
            ),
            STATS_INO => (false, 0, 0o444, 1),
            _ => return None,
        };
        let blocks = if ino == DISK_INO {
            self.device.stats().allocated / 512
        } else {
            0
        };
        Some(Attr {
            ino,
            dir,
            size,
            blocks,
            perm,
            nlink,
        })
    }

    /// LOOKUP: the entry `name` in directory `parent`, and how long the kernel may cache it.
    pub(crate) fn lookup(&self, parent: u64, name: &[u8]) -> Result<(Attr, Duration), Errno> {
        let ino = match (parent, name) {
            (ROOT_INO, n) if n == DISK_NAME.as_bytes() => DISK_INO,
            (ROOT_INO, n) if n == STATS_NAME.as_bytes() => STATS_INO,
            _ => return Err(libc::ENOENT),
        };
        // The counters change with every request: never cached.
        let ttl = if ino == STATS_INO {
            Duration::ZERO
        } else {
            ATTR_TTL
        };
        Ok((self.attr(ino).ok_or(libc::ENOENT)?, ttl))
    }

    /// SETATTR: the device has a fixed size; everything else (times, modes) is accepted and
    /// forgotten, as on a device node.
    pub(crate) fn setattr(&self, ino: u64, size: Option<u64>) -> Result<Attr, Errno> {
        let attr = self.attr(ino).ok_or(libc::ENOENT)?;
        if size.is_some_and(|s| s != attr.size) {
            return Err(libc::EPERM);
        }
        Ok(attr)
    }

    /// OPEN: the `FOPEN_*` flags to answer with.
    pub(crate) fn open(&self, ino: u64, flags: i32) -> Result<u32, Errno> {
        match ino {
            DISK_INO => {
                let writing = flags & libc::O_ACCMODE != libc::O_RDONLY;
                if writing && self.read_only {
                    return Err(libc::EROFS);
                }
                self.open_files.opened();
                Ok(FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES)
            }
            STATS_INO => Ok(FOPEN_DIRECT_IO),
            ROOT_INO => Err(libc::EISDIR),
            _ => Err(libc::ENOENT),
        }
    }

    /// The counters, as the `stats` file reads.
    fn stats_json(&self) -> String {
        let s = self.device.stats();
        serde_json::json!({
            "size": s.size,
            "allocated": s.allocated,
            "chunks": s.chunks,
            "max_memory": s.max_memory,
            "io_errors": self.io_errors.load(Ordering::Relaxed),
            "backend": self.device.describe(),
            "transport": self.transport.get(),
            "ring_entries": self.rings.entries.load(Ordering::Relaxed),
            "ring_most_in_flight": self.rings.most_in_flight.load(Ordering::Relaxed),
        })
        .to_string()
            + "\n"
    }

    /// READ of up to `out.len()` bytes at `offset` into `out`; the bytes read. Like any
    /// file, a read that starts at or runs past the end is short.
    pub(crate) fn read(&self, ino: u64, offset: u64, out: &mut [u8]) -> Result<usize, Errno> {
        match self.begin_read(ino, offset, out)? {
            Begun::Done(n) => Ok(n),
            Begun::Io { io, len } => self.finish(self.complete(io), len),
        }
    }

    /// [`Disk::read`] begun: answered at once where the device is not needed (the stats
    /// file, a read at the end), else the device call to poll and the bytes it will read.
    pub(crate) fn begin_read<'a>(
        &'a self,
        ino: u64,
        offset: u64,
        out: &'a mut [u8],
    ) -> Result<Begun<'a>, Errno> {
        if ino == STATS_INO {
            let text = self.stats_json();
            let start = (offset as usize).min(text.len());
            let end = start.saturating_add(out.len()).min(text.len());
            out[..end - start].copy_from_slice(&text.as_bytes()[start..end]);
            return Ok(Begun::Done(end - start));
        }
        if ino != DISK_INO {
            return Err(libc::ENOENT);
        }
        let len = self.size.saturating_sub(offset).min(out.len() as u64) as usize;
        if len == 0 {
            return Ok(Begun::Done(0));
        }
        Ok(Begun::Io {
            io: self.device.read(offset, &mut out[..len]),
            len,
        })
    }

    /// WRITE of `data` at `offset`, with the open flags of the request; the bytes written.
    pub(crate) fn write(
        &self,
        ino: u64,
        offset: u64,
        data: &[u8],
        flags: i32,
    ) -> Result<u32, Errno> {
        match self.begin_write(ino, offset, data, flags)? {
            Begun::Done(n) => Ok(n as u32),
            Begun::Io { io, len } => self.finish(self.complete(io), len).map(|n| n as u32),
        }
    }

    /// [`Disk::write`] begun: the device call to poll and the bytes it will write.
    pub(crate) fn begin_write<'a>(
        &'a self,
        ino: u64,
        offset: u64,
        data: &'a [u8],
        flags: i32,
    ) -> Result<Begun<'a>, Errno> {
        if ino != DISK_INO {
            return Err(libc::EBADF);
        }
        // The file cannot grow: a write past the end is out of space, as on a full disk.
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(libc::ENOSPC);
        }
        // FUSE passes the kiocb's O_DSYNC/O_SYNC in the flags: the loop's FUA writes.
        let fua = flags & (libc::O_DSYNC | libc::O_SYNC) != 0;
        Ok(Begun::Io {
            io: self.device.write(offset, data, fua),
            len: data.len(),
        })
    }

    /// The answer to a [`Begun::Io`] whose call returned `result`: its `len` bytes, or the
    /// errno of the failure (counted).
    pub(crate) fn finish(&self, result: IoResult<()>, len: usize) -> Result<usize, Errno> {
        match result {
            Ok(()) => Ok(len),
            Err(e) => Err(self.failed(&e)),
        }
    }

    /// Enters the runtime's context on this thread while the guard lives, for a server
    /// that polls device calls itself (the FUSE rings).
    pub(crate) fn enter(&self) -> tokio::runtime::EnterGuard<'_> {
        self.runtime.enter()
    }

    /// FLUSH and FSYNC: both mean "make what was written durable", a device flush for the
    /// disk image and nothing for the directory.
    pub(crate) fn sync(&self, ino: u64) -> Result<(), Errno> {
        if ino != DISK_INO {
            return Ok(());
        }
        self.complete(self.device.flush())
            .map_err(|e| self.failed(&e))
    }

    /// FALLOCATE: the loop's discard (PUNCH_HOLE) and write-zeroes (ZERO_RANGE).
    pub(crate) fn fallocate(
        &self,
        ino: u64,
        offset: u64,
        length: u64,
        mode: u32,
    ) -> Result<(), Errno> {
        if ino != DISK_INO {
            return Err(libc::EBADF);
        }
        if self.read_only {
            return Err(libc::EROFS);
        }
        // Trims and zeroes past the end are clipped (fstrim may cover the whole range);
        // the file never grows.
        let len = length.min(self.size.saturating_sub(offset));
        let result = if mode & libc::FALLOC_FL_PUNCH_HOLE as u32 != 0 {
            if mode & libc::FALLOC_FL_KEEP_SIZE as u32 == 0 {
                return Err(libc::EINVAL);
            }
            if len == 0 {
                return Ok(());
            }
            self.complete(self.device.trim(offset, len))
        } else if mode & libc::FALLOC_FL_ZERO_RANGE as u32 != 0 {
            if len == 0 {
                return Ok(());
            }
            // ZERO_RANGE keeps the range allocated: that is what the loop asks for when the
            // block layer said "no unmap".
            let flags = ZeroFlags {
                may_trim: false,
                fast: false,
                fua: false,
            };
            self.complete(self.device.write_zeroes(offset, len, flags))
        } else {
            // Plain preallocation would promise that later writes cannot fail for lack of
            // memory, which a sparse device cannot promise without zeroing live data.
            return Err(libc::EOPNOTSUPP);
        };
        result.map_err(|e| self.failed(&e))
    }

    /// STATFS: (blocks, free blocks) in [`PAGE`] units.
    pub(crate) fn statfs(&self) -> (u64, u64) {
        let blocks = self.size / PAGE as u64;
        let used = self.device.stats().allocated.div_ceil(PAGE as u64);
        (blocks, blocks.saturating_sub(used))
    }

    fn failed(&self, e: &IoError) -> Errno {
        // Counted, not logged: a log line per failed request could itself need the device
        // (or memory) that just failed.
        self.io_errors.fetch_add(1, Ordering::Relaxed);
        e.errno()
    }
}
