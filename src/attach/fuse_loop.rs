//! Attach through FUSE and a loop device: the method that works on every machine we have.
//!
//! The daemon mounts a tiny FUSE filesystem holding one regular file, `disk`, whose bytes
//! are the device, and binds a loop device to that file. A block request on `/dev/loopN`
//! then travels: block layer -> loop (direct I/O, asynchronous) -> FUSE (one request per
//! chunk of up to `max_write` bytes) -> this process -> [`BlockDevice`].
//!
//! What makes it fast and safe, each measured or required:
//! - The file is opened with `FOPEN_DIRECT_IO` and the writeback cache is never enabled:
//!   every loop request reaches us as it is, nothing is cached twice, and an `fsync` has
//!   nothing buffered in the kernel that could be lost when the daemon dies.
//! - `FUSE_ASYNC_DIO` lets the kernel keep many direct requests in flight from the loop's
//!   asynchronous kiocbs (about 5x at 4 KiB on this path); `max_background` is raised so
//!   that a queue depth of 32 does not stall on the default of 16.
//! - `FOPEN_PARALLEL_DIRECT_WRITES` stops FUSE from serialising direct writes on the inode
//!   lock.
//! - Requests are served by several threads, each with its own cloned `/dev/fuse` fd, all
//!   started before the loop device exists (swap safety: nothing is created on the I/O
//!   path). Each thread drives the async device call to completion itself: for host memory
//!   the call never actually waits, and a GPU copy waits without holding any other request.
//!   After each reply the [`Pacer`] decides whether the thread polls for the next request,
//!   parks because it is not needed, or wakes a parked one (see `pacing`).
//! - Discard: the loop turns discard into `fallocate(PUNCH_HOLE|KEEP_SIZE)` on the file,
//!   which becomes [`BlockDevice::trim`]; write-zeroes with NOUNMAP becomes `ZERO_RANGE`.
//! - A second file, `stats`, reads as the device's counters in JSON, so tests and tools can
//!   see the daemon's memory without a control socket.

use super::loop_dev::{LoopDevice, LoopOptions};
use super::pacing::Pacer;
use crate::engine::{BlockDevice, IoError, ZeroFlags};
use anyhow::{Context, Result};
use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, SessionACL, WriteFlags,
};
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tracing::{info, warn};

const ROOT_INO: u64 = 1;
const DISK_INO: u64 = 2;
const STATS_INO: u64 = 3;
/// Name of the device image inside the FUSE mount.
pub const DISK_NAME: &str = "disk";
/// Name of the counters file inside the FUSE mount.
pub const STATS_NAME: &str = "stats";

/// The FUSE ABI caps one request at this many bytes in fuser's receive buffer.
const FUSER_MAX_WRITE: u32 = 16 << 20;
/// The loop driver's default largest request (max_hw_sectors_kb 1280): larger FUSE requests
/// would never be used, only pre-allocated.
const LOOP_MAX_REQUEST: u32 = 1280 << 10;
const FALLBACK_MAX_PAGES: u32 = 256;
const PAGE: u32 = 4096;

use crate::tunables::ATTR_TTL;

/// Options of the FUSE + loop method.
#[derive(Clone, Debug)]
pub struct FuseLoopOptions {
    /// Directory to mount the FUSE filesystem on (created if missing, must be empty).
    pub mountpoint: PathBuf,
    /// Threads serving FUSE requests.
    pub threads: usize,
    /// Requests in flight the kernel may queue to us (FUSE max_background).
    pub max_background: u16,
    /// How long a thread that has just replied polls for the next request before it goes
    /// back to sleep in its read; zero never polls.
    pub busy_poll: Duration,
}

/// The largest FUSE request this kernel allows, capped where larger would not help.
pub fn max_request_bytes() -> u32 {
    let pages = std::fs::read_to_string("/proc/sys/fs/fuse/max_pages_limit")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(FALLBACK_MAX_PAGES);
    (pages.saturating_mul(PAGE))
        .clamp(128 << 10, FUSER_MAX_WRITE)
        .min(LOOP_MAX_REQUEST)
}

/// Where this method cannot work, one sentence saying why.
pub fn unavailable() -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some("this kernel has no FUSE (/dev/fuse missing): try 'modprobe fuse'".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some(
            "this kernel has no loop driver (/dev/loop-control missing): try 'modprobe loop'"
                .into(),
        );
    }
    None
}

struct DiskFs {
    device: Arc<dyn BlockDevice>,
    runtime: tokio::runtime::Handle,
    size: u64,
    read_only: bool,
    max_write: u32,
    max_background: u16,
    created: SystemTime,
    io_errors: AtomicU64,
    uid: u32,
    gid: u32,
    /// Parks spare threads and polls for the next request after each reply.
    pacer: Arc<Pacer>,
    /// Opens of the disk image not yet released.
    open_files: Arc<OpenFiles>,
}

/// Counts the disk image's open files, so that detach can wait for the kernel's RELEASE of
/// the loop device's file before it unmounts: unmounting first ends the connection while
/// that RELEASE is on its way, and its reply then fails ("Failed to send FUSE reply: No
/// such file or directory", seen in the test VM). Nothing was lost then (a RELEASE carries
/// no data, and the kernel had closed the file already), but the error hid real ones.
#[derive(Default)]
struct OpenFiles {
    count: std::sync::Mutex<u64>,
    released: std::sync::Condvar,
}

impl OpenFiles {
    fn opened(&self) {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    fn released(&self) {
        let mut n = self.count.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.released.notify_all();
        }
    }

    /// Waits up to `timeout` for every open file to be released; whether they were.
    fn wait_all_released(&self, timeout: Duration) -> bool {
        let n = self.count.lock().unwrap_or_else(|e| e.into_inner());
        let (n, _) = self
            .released
            .wait_timeout_while(n, timeout, |n| *n > 0)
            .unwrap_or_else(|e| e.into_inner());
        *n == 0
    }
}

fn errno_of(e: &IoError) -> Errno {
    Errno::from_i32(e.errno())
}

impl DiskFs {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = match ino {
            ROOT_INO => (FileType::Directory, 0, 0o500, 2),
            DISK_INO => (
                FileType::RegularFile,
                self.size,
                if self.read_only { 0o400 } else { 0o600 },
                1,
            ),
            STATS_INO => (FileType::RegularFile, 0, 0o444, 1),
            _ => return None,
        };
        let blocks = if ino == DISK_INO {
            self.device.stats().allocated / 512
        } else {
            0
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks,
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: PAGE,
            flags: 0,
        })
    }

    fn stats_json(&self) -> String {
        let s = self.device.stats();
        serde_json::json!({
            "size": s.size,
            "allocated": s.allocated,
            "chunks": s.chunks,
            "max_memory": s.max_memory,
            "io_errors": self.io_errors.load(Ordering::Relaxed),
            "backend": self.device.describe(),
        })
        .to_string()
            + "\n"
    }

    /// FLUSH and FSYNC: both mean "make what was written durable", a device flush for the
    /// disk image and nothing for the directory.
    fn sync(&self, ino: INodeNo, reply: ReplyEmpty) {
        if ino.0 != DISK_INO {
            return reply.ok();
        }
        let start = Instant::now();
        let result = super::io_path::complete(&self.runtime, self.device.flush());
        let work = start.elapsed();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.failed(&e)),
        }
        self.pacer.after_request(work);
    }

    fn failed(&self, e: &IoError) -> Errno {
        // Counted, not logged: a log line per failed request could itself need the device
        // (or memory) that just failed.
        self.io_errors.fetch_add(1, Ordering::Relaxed);
        errno_of(e)
    }
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO) {
            warn!(
                "this kernel's FUSE lacks {missing:?}: small requests will be several times slower"
            );
        }
        if let Err(nearest) = config.set_max_write(self.max_write) {
            let _ = config.set_max_write(nearest);
            self.max_write = nearest;
        }
        let _ = config.set_max_background(self.max_background);
        let _ = config.set_congestion_threshold(self.max_background);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let ino = match (parent.0, name.to_str()) {
            (ROOT_INO, Some(DISK_NAME)) => DISK_INO,
            (ROOT_INO, Some(STATS_NAME)) => STATS_INO,
            _ => return reply.error(Errno::ENOENT),
        };
        let ttl = if ino == STATS_INO {
            Duration::ZERO
        } else {
            ATTR_TTL
        };
        reply.entry(&ttl, &self.attr(ino).unwrap(), fuser::Generation(0));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(attr) => reply.attr(&ATTR_TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        // The device has a fixed size; everything else (times, modes) is accepted and
        // forgotten, as on a device node.
        if size.is_some_and(|s| s != attr.size) {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&ATTR_TTL, &attr)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match ino.0 {
            DISK_INO => {
                let writing = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
                if writing && self.read_only {
                    return reply.error(Errno::EROFS);
                }
                self.open_files.opened();
                reply.opened(
                    FileHandle(0),
                    FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
                )
            }
            STATS_INO => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            ROOT_INO => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino.0 == STATS_INO {
            let text = self.stats_json();
            let start = (offset as usize).min(text.len());
            let end = start.saturating_add(size as usize).min(text.len());
            return reply.data(&text.as_bytes()[start..end]);
        }
        if ino.0 != DISK_INO {
            return reply.error(Errno::ENOENT);
        }
        // Like any file: a read that starts at or runs past the end is short.
        let len = self.size.saturating_sub(offset).min(size as u64) as usize;
        if len == 0 {
            return reply.data(&[]);
        }
        let device = &self.device;
        let start = Instant::now();
        let result = super::io_path::complete(&self.runtime, async {
            let mut buf = device.buffers().get(len).await?;
            device.read(offset, &mut buf[..len]).await?;
            Ok::<_, IoError>(buf)
        });
        let work = start.elapsed();
        match result {
            Ok(buf) => reply.data(&buf[..len]),
            Err(e) => reply.error(self.failed(&e)),
        }
        self.pacer.after_request(work);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino.0 != DISK_INO {
            return reply.error(Errno::EBADF);
        }
        // The file cannot grow: a write past the end is out of space, as on a full disk.
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > self.size)
        {
            return reply.error(Errno::ENOSPC);
        }
        // FUSE passes the kiocb's O_DSYNC/O_SYNC in the flags: the loop's FUA writes.
        let fua = flags.0 & (libc::O_DSYNC | libc::O_SYNC) != 0;
        let start = Instant::now();
        let result = super::io_path::complete(&self.runtime, self.device.write(offset, data, fua));
        let work = start.elapsed();
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(self.failed(&e)),
        }
        self.pacer.after_request(work);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
        // After the reply: detach waits for this, then unmounts.
        if ino.0 == DISK_INO {
            self.open_files.released();
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.sync(ino, reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(ino, reply);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino.0 != DISK_INO {
            return reply.error(Errno::EBADF);
        }
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        // Trims and zeroes past the end are clipped (fstrim may cover the whole range);
        // the file never grows.
        let len = length.min(self.size.saturating_sub(offset));
        let device = &self.device;
        let start = Instant::now();
        let result = if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            if mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
                return reply.error(Errno::EINVAL);
            }
            if len == 0 {
                return reply.ok();
            }
            super::io_path::complete(&self.runtime, device.trim(offset, len))
        } else if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
            if len == 0 {
                return reply.ok();
            }
            // ZERO_RANGE keeps the range allocated: that is what the loop asks for when the
            // block layer said "no unmap".
            let flags = ZeroFlags {
                may_trim: false,
                fast: false,
                fua: false,
            };
            super::io_path::complete(&self.runtime, device.write_zeroes(offset, len, flags))
        } else {
            // Plain preallocation would promise that later writes cannot fail for lack of
            // memory, which a sparse device cannot promise without zeroing live data.
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        };
        let work = start.elapsed();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.failed(&e)),
        }
        self.pacer.after_request(work);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT_INO {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT_INO, FileType::Directory, "."),
            (ROOT_INO, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, DISK_NAME),
            (STATS_INO, FileType::RegularFile, STATS_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.size / PAGE as u64;
        let used = self.device.stats().allocated.div_ceil(PAGE as u64);
        let free = blocks.saturating_sub(used);
        reply.statfs(blocks, free, free, 2, 0, PAGE, 255, PAGE)
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // ENOSYS makes the kernel stop asking (it would otherwise ask on every write for
        // security.capability).
        reply.error(Errno::ENOSYS)
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS)
    }
}

/// A device attached through FUSE and a loop device.
pub struct FuseLoop {
    session: Option<BackgroundSession>,
    loop_dev: Option<LoopDevice>,
    loop_number: u32,
    loop_path: PathBuf,
    mountpoint: PathBuf,
    image: PathBuf,
    max_request: u32,
    open_files: Arc<OpenFiles>,
}

impl std::fmt::Debug for FuseLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseLoop")
            .field("mountpoint", &self.mountpoint)
            .field("loop", &self.loop_dev)
            .finish()
    }
}

impl FuseLoop {
    /// Mounts the FUSE filesystem, starts its threads, and binds a loop device to the image.
    /// Every thread and buffer the I/O path uses exists before the loop device does.
    pub fn attach(
        device: Arc<dyn BlockDevice>,
        runtime: tokio::runtime::Handle,
        opts: &FuseLoopOptions,
    ) -> Result<FuseLoop> {
        if let Some(why) = unavailable() {
            anyhow::bail!(why);
        }
        let caps = device.capabilities();
        let max_request = max_request_bytes().min(caps.max_block.max(PAGE));
        let threads = opts.threads.max(1);
        // Every size the FUSE path asks for, once per thread.
        super::io_path::prewarm_buffers(device.buffers(), threads, max_request as usize)?;

        std::fs::create_dir_all(&opts.mountpoint)
            .with_context(|| format!("creating mountpoint {}", opts.mountpoint.display()))?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pacer = Arc::new(Pacer::new(opts.busy_poll, threads, cpus));
        let open_files = Arc::new(OpenFiles::default());
        let fs = DiskFs {
            size: device.size(),
            read_only: caps.read_only,
            device,
            runtime,
            max_write: max_request,
            max_background: opts.max_background.max(1),
            created: SystemTime::now(),
            io_errors: AtomicU64::new(0),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            pacer: pacer.clone(),
            open_files: open_files.clone(),
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("vramdisk".into()),
            MountOption::Subtype("vramdisk".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
            MountOption::NoAtime,
        ];
        config.acl = SessionACL::Owner;
        config.n_threads = Some(threads);
        config.clone_fd = true;
        let session = fuser::Session::new(fs, &opts.mountpoint, &config).with_context(|| {
            format!(
                "mounting the FUSE filesystem on {}",
                opts.mountpoint.display()
            )
        })?;
        pacer.set_fd(
            session
                .as_fd()
                .try_clone_to_owned()
                .context("duplicating the /dev/fuse descriptor")?,
        );
        let session = session.spawn().context("starting the FUSE threads")?;
        let mut this = FuseLoop {
            session: Some(session),
            loop_dev: None,
            loop_number: 0,
            loop_path: PathBuf::new(),
            mountpoint: opts.mountpoint.clone(),
            image: opts.mountpoint.join(DISK_NAME),
            max_request,
            open_files,
        };

        let loop_opts = LoopOptions {
            block_size: PAGE,
            read_only: caps.read_only,
            direct_io: true,
            autoclear: true,
        };
        let loop_dev = match LoopDevice::attach(&this.image, &loop_opts) {
            Ok(l) => l,
            Err(e) => {
                this.unmount();
                return Err(e);
            }
        };
        if !loop_dev.direct_io() {
            // Older kernels ignore the flag in LOOP_CONFIGURE for some files; ask again.
            let _ = loop_dev.set_direct_io(true);
            if !loop_dev.direct_io() {
                warn!(
                    "{}: the kernel would not do direct I/O to the FUSE file; the loop \
                     driver then serves one request at a time (correct, but slower)",
                    loop_dev.path().display()
                );
            }
        }
        info!(
            "{} -> {} (FUSE requests up to {} KiB, {} threads)",
            loop_dev.path().display(),
            this.image.display(),
            max_request >> 10,
            threads
        );
        this.loop_number = loop_dev.number();
        this.loop_path = loop_dev.path().to_path_buf();
        this.loop_dev = Some(loop_dev);
        Ok(this)
    }

    /// `/dev/loopN`.
    pub fn device_path(&self) -> &Path {
        &self.loop_path
    }

    /// N of `/dev/loopN`.
    pub fn loop_number(&self) -> u32 {
        self.loop_number
    }

    /// The device image file the loop device is bound to.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// The FUSE mountpoint.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Largest FUSE request negotiated.
    pub fn max_request(&self) -> u32 {
        self.max_request
    }

    /// Detaches the loop device and unmounts the FUSE filesystem.
    ///
    /// Without `force`, fails (leaving everything working) if the loop device does not go
    /// away because someone still has it open. With `force`, the loop device is left to
    /// autoclear when its users close it, the FUSE filesystem is unmounted lazily, and I/O
    /// that still arrives fails once this process exits.
    pub fn detach(&mut self, force: bool, timeout: Duration) -> Result<()> {
        if let Some(loop_dev) = self.loop_dev.take() {
            // LOOP_CLR_FD only marks the device autoclear (and closes it to new openers);
            // the kernel unbinds it at the last close, which is ours when no one else
            // has it open.
            loop_dev.clear()?;
            drop(loop_dev);
        }
        let path = super::loop_dev::loop_path(self.loop_number);
        if !super::loop_dev::wait_unbound(self.loop_number, &self.image, timeout) {
            if !force {
                anyhow::bail!(
                    "{} is still open by another program after {}s; it will detach itself \
                     when that program closes it (or use --force)",
                    path.display(),
                    timeout.as_secs()
                );
            }
            warn!(
                "{} is still open: it will detach itself when closed; its I/O fails from now",
                path.display()
            );
        } else if !self.open_files.wait_all_released(Duration::from_secs(5)) {
            warn!(
                "the kernel has not released {} within 5 s: unmounting anyway",
                self.image.display()
            );
        }
        self.unmount();
        Ok(())
    }

    fn unmount(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        // Unmounting ends the FUSE connection, so every thread's read returns and the
        // session ends.
        if let Err(e) = session.umount_and_join() {
            // Busy (a shell sitting in the mountpoint, or a loop device still bound after a
            // forced detach): detach it from the tree now; the connection ends when the
            // last user lets go, or when this process exits.
            warn!(
                "unmounting {}: {e}; unmounting lazily",
                self.mountpoint.display()
            );
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir(&self.mountpoint);
    }
}

impl Drop for FuseLoop {
    fn drop(&mut self) {
        if self.session.is_some() {
            let _ = self.detach(true, Duration::from_secs(2));
        }
    }
}
