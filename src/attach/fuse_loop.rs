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
//!   After each reply the `Pacer` decides whether the thread polls for the next request,
//!   parks because it is not needed, or wakes a parked one (see `pacing`).
//! - Discard: the loop turns discard into `fallocate(PUNCH_HOLE|KEEP_SIZE)` on the file,
//!   which becomes [`BlockDevice::trim`]; write-zeroes with NOUNMAP becomes `ZERO_RANGE`.
//! - A second file, `stats`, reads as the device's counters in JSON, so tests and tools can
//!   see the daemon's memory without a control socket.

use super::fuse_disk::{Attr, DISK_INO, Disk, ENTRIES, OpenFiles, PAGE, ROOT_INO};
pub use super::fuse_disk::{DISK_NAME, STATS_NAME};
use super::loop_dev::{LoopDevice, LoopOptions};
use super::pacing::Pacer;
use crate::engine::BlockDevice;
use crate::tunables::ATTR_TTL;
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
use std::time::{Duration, Instant, SystemTime};
use tracing::{info, warn};

/// The FUSE ABI caps one request at this many bytes in fuser's receive buffer.
const FUSER_MAX_WRITE: u32 = 16 << 20;
/// The loop driver's default largest request (max_hw_sectors_kb 1280): larger FUSE requests
/// would never be used, only pre-allocated.
const LOOP_MAX_REQUEST: u32 = 1280 << 10;
const FALLBACK_MAX_PAGES: u32 = 256;

/// Options of the FUSE + loop method.
#[derive(Clone, Debug)]
pub struct FuseLoopOptions {
    /// Directory to mount the FUSE filesystem on (created if missing, must be empty).
    pub mountpoint: PathBuf,
    /// Threads serving FUSE requests (fuser).
    pub threads: usize,
    /// Requests in flight the kernel may queue to us (FUSE max_background).
    pub max_background: u16,
    /// How long a thread that has just replied polls for the next request before it goes
    /// back to sleep in its read; zero never polls.
    pub busy_poll: Duration,
    /// How requests reach this process: fuser reading /dev/fuse, or FUSE over io_uring
    /// where asked for.
    pub transport: Transport,
}

/// How FUSE requests reach the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// The daemon's choice: fuser, which on GPU memory serves 4 KiB requests twice as fast
    /// as FUSE over io_uring ([`Transport::Uring`], opt-in; faster at 1 MiB).
    Auto,
    /// FUSE over io_uring, or fail saying why not.
    Uring,
    /// fuser threads reading /dev/fuse.
    Fuser,
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

/// The filesystem as fuser serves it: [`Disk`] plus the pacing of fuser's threads.
struct DiskFs {
    disk: Arc<Disk>,
    max_write: u32,
    max_background: u16,
    /// Parks spare threads and polls for the next request after each reply.
    pacer: Arc<Pacer>,
}

fn fuser_attr(disk: &Disk, a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: disk.created,
        mtime: disk.created,
        ctime: disk.created,
        crtime: disk.created,
        kind: if a.dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: a.perm,
        nlink: a.nlink,
        uid: disk.uid,
        gid: disk.gid,
        rdev: 0,
        blksize: PAGE,
        flags: 0,
    }
}

impl DiskFs {
    /// Runs `work` (a request that uses the device), sends its `reply`, and only then lets
    /// the pacer see how long the work took: the pacer may park this thread, which must
    /// not hold a reply back.
    fn paced<T>(&self, work: impl FnOnce(&Disk) -> T, reply: impl FnOnce(T)) {
        let start = Instant::now();
        let out = work(&self.disk);
        let took = start.elapsed();
        reply(out);
        self.pacer.after_request(took);
    }
}

fn reply_empty(reply: ReplyEmpty, result: Result<(), i32>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(Errno::from_i32(e)),
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
        match self.disk.lookup(parent.0, name.as_encoded_bytes()) {
            Ok((attr, ttl)) => {
                reply.entry(&ttl, &fuser_attr(&self.disk, &attr), fuser::Generation(0))
            }
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.disk.attr(ino.0) {
            Some(attr) => reply.attr(&ATTR_TTL, &fuser_attr(&self.disk, &attr)),
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
        match self.disk.setattr(ino.0, size) {
            Ok(attr) => reply.attr(&ATTR_TTL, &fuser_attr(&self.disk, &attr)),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.disk.open(ino.0, flags.0) {
            Ok(fopen) => reply.opened(FileHandle(0), FopenFlags::from_bits_retain(fopen)),
            Err(e) => reply.error(Errno::from_i32(e)),
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
        self.paced(
            |disk| {
                let mut buf = disk
                    .complete(disk.device.buffers().get((size as usize).max(1)))
                    .map_err(|e| e.errno())?;
                let n = disk.read(ino.0, offset, &mut buf[..size as usize])?;
                Ok::<_, i32>((buf, n))
            },
            |result| match result {
                Ok((buf, n)) => reply.data(&buf[..n]),
                Err(e) => reply.error(Errno::from_i32(e)),
            },
        );
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
        self.paced(
            |disk| disk.write(ino.0, offset, data, flags.0),
            |result| match result {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(Errno::from_i32(e)),
            },
        );
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
            self.disk.open_files.released();
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
        self.paced(|disk| disk.sync(ino.0), |r| reply_empty(reply, r));
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.paced(|disk| disk.sync(ino.0), |r| reply_empty(reply, r));
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
        self.paced(
            |disk| disk.fallocate(ino.0, offset, length, mode as u32),
            |r| reply_empty(reply, r),
        );
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
        for (i, (ino, dir, name)) in ENTRIES.iter().enumerate().skip(offset as usize) {
            let kind = if *dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(*ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (blocks, free) = self.disk.statfs();
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

/// The transport serving the mount.
enum Session {
    Fuser(BackgroundSession),
    Uring(super::fuse_uring::UringSession),
}

/// A device attached through FUSE and a loop device.
pub struct FuseLoop {
    session: Option<Session>,
    loop_dev: Option<LoopDevice>,
    loop_number: u32,
    loop_path: PathBuf,
    mountpoint: PathBuf,
    image: PathBuf,
    max_request: u32,
    transport: String,
    open_files: Arc<OpenFiles>,
}

impl std::fmt::Debug for FuseLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseLoop")
            .field("mountpoint", &self.mountpoint)
            .field("loop", &self.loop_dev)
            .field("transport", &self.transport)
            .finish()
    }
}

/// Mounts the filesystem served by fuser's threads.
fn start_fuser(
    disk: &Arc<Disk>,
    opts: &FuseLoopOptions,
    threads: usize,
    max_request: u32,
) -> Result<BackgroundSession> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pacer = Arc::new(Pacer::new(opts.busy_poll, threads, cpus));
    let fs = DiskFs {
        disk: disk.clone(),
        max_write: max_request,
        max_background: opts.max_background.max(1),
        pacer: pacer.clone(),
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
    session.spawn().context("starting the FUSE threads")
}

/// Mounts the filesystem with the transport `opts` asks for: FUSE over io_uring only where
/// asked for (and then it must work), else fuser.
fn start_session(
    disk: &Arc<Disk>,
    opts: &FuseLoopOptions,
    threads: usize,
    max_request: u32,
) -> Result<(Session, String)> {
    use super::fuse_uring;
    let why_not = match opts.transport {
        Transport::Fuser => "fuser asked for (--fuse-transport fuser)".to_string(),
        Transport::Auto => {
            "the default (--fuse-transport uring opts in to FUSE over io_uring)".to_string()
        }
        Transport::Uring => {
            let uring_opts = fuse_uring::UringOptions {
                mountpoint: opts.mountpoint.clone(),
                max_write: max_request,
                max_background: opts.max_background.max(1),
                busy_poll: opts.busy_poll,
            };
            let started = match fuse_uring::unavailable() {
                Some(why) => Err(anyhow::anyhow!(why)),
                None => fuse_uring::UringSession::start(disk.clone(), &uring_opts),
            };
            let s = started?;
            let what = format!(
                "FUSE over io_uring, {} queues of {} threads",
                s.queues(),
                s.threads_per_queue()
            );
            return Ok((Session::Uring(s), what));
        }
    };
    let session = start_fuser(disk, opts, threads, max_request)?;
    info!("FUSE requests through fuser: {why_not}");
    Ok((Session::Fuser(session), format!("fuser, {threads} threads")))
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
        let disk = Arc::new(Disk::new(device, runtime));
        let (session, transport) = start_session(&disk, opts, threads, max_request)?;
        disk.set_transport(transport.clone());
        let mut this = FuseLoop {
            session: Some(session),
            loop_dev: None,
            loop_number: 0,
            loop_path: PathBuf::new(),
            mountpoint: opts.mountpoint.clone(),
            image: opts.mountpoint.join(DISK_NAME),
            max_request,
            transport,
            open_files: disk.open_files.clone(),
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
            "{} -> {} (FUSE requests up to {} KiB, {})",
            loop_dev.path().display(),
            this.image.display(),
            max_request >> 10,
            this.transport
        );
        this.loop_number = loop_dev.number();
        this.loop_path = loop_dev.path().to_path_buf();
        this.loop_dev = Some(loop_dev);
        Ok(this)
    }

    /// How requests reach the daemon: "FUSE over io_uring, 2 queues of 4 threads" or "fuser, 2 threads".
    pub fn transport(&self) -> &str {
        &self.transport
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
        // Unmounting ends the FUSE connection, so every thread's read (or ring) returns
        // and the session ends.
        let result = match session {
            Session::Fuser(s) => s.umount_and_join().map_err(anyhow::Error::from),
            Session::Uring(s) => s.unmount_and_join(),
        };
        if let Err(e) = result {
            // Busy (a shell sitting in the mountpoint, or a loop device still bound after a
            // forced detach): detach it from the tree now; the connection ends when the
            // last user lets go, or when this process exits.
            warn!(
                "unmounting {}: {e:#}; unmounting lazily",
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
