//! The image file: one descriptor through the page cache and, where the filesystem allows
//! it, one with `O_DIRECT`, with the fall-back from the second to the first, and the hints
//! given to the kernel about it.

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, OFlag, PosixFadviseAdvice};
use nix::sys::mman::{MapFlags, ProtFlags};
use std::fs::{File, OpenOptions};
use std::num::NonZeroUsize;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Offset, length and address alignment that `O_DIRECT` needs on the filesystems in use
/// (their logical block is 512 B or 4 KiB); a filesystem that wants more makes the direct
/// call fail with EINVAL, and that call is redone through the page cache.
pub(super) const DIRECT_ALIGN: usize = 4096;
/// Share of a file in the page cache from which an `Auto` load reads through the cache. A
/// file mostly cached (a restart without a reboot) comes from memory faster than the disk
/// gives it by direct I/O; one mostly not cached comes faster directly. Between the two ends
/// the rates cross somewhere; half is the obvious middle, not a measured crossing point.
pub(super) const MOSTLY_CACHED: f64 = 0.5;

/// The image file, opened through the page cache and, where the filesystem allows it,
/// a second time with `O_DIRECT`.
pub(super) struct DataFile {
    /// Through the page cache; also what writes the end of a save and fsyncs.
    pub(super) plain: File,
    direct: Option<File>,
    /// Cleared by the first direct call the kernel refuses; the page cache is used from then
    /// on.
    direct_works: AtomicBool,
}

/// `path` opened with `O_DIRECT` for reading or writing, where the filesystem allows it.
pub(super) fn open_direct(path: &Path, write: bool) -> Option<File> {
    OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(OFlag::O_DIRECT.bits())
        .open(path)
        .ok()
}

impl DataFile {
    /// The file by its two descriptors.
    pub(super) fn new(plain: File, direct: Option<File>) -> Self {
        DataFile {
            plain,
            direct,
            direct_works: AtomicBool::new(true),
        }
    }

    /// True while the data goes through `O_DIRECT`.
    pub(super) fn is_direct(&self) -> bool {
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
        let refused = matches!(
            e.raw_os_error().map(Errno::from_raw),
            Some(Errno::EINVAL | Errno::EFAULT)
        );
        if refused && self.direct_works.swap(false, Ordering::Relaxed) {
            tracing::info!("direct I/O refused ({e}); going through the page cache");
        }
        refused
    }

    /// Reads at least `need` bytes at `at` into `buf`. With direct I/O `buf` (whose length
    /// is a multiple of [`DIRECT_ALIGN`]) is filled as far as the file goes.
    pub(super) fn read_at_least(
        &self,
        buf: &mut [u8],
        at: u64,
        need: usize,
    ) -> std::io::Result<()> {
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
    pub(super) fn write_all_at(&self, buf: &[u8], at: u64) -> std::io::Result<()> {
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

/// True when `file` lies on tmpfs (its pages are memory already).
pub(super) fn on_tmpfs(file: &File) -> bool {
    nix::sys::statfs::fstatfs(file)
        .is_ok_and(|st| st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// Takes `len` bytes of disk for `file` up front; failing only loses the benefits.
pub(super) fn preallocate(file: &File, len: u64) {
    if let Ok(len) = i64::try_from(len) {
        let _ = nix::fcntl::fallocate(file, FallocateFlags::empty(), 0, len);
    }
}

/// Fraction of the first `len` bytes of `file` held in the page cache (0 when unknown).
pub(super) fn cached_fraction(file: &File, len: u64) -> f64 {
    let Some(len) = usize::try_from(len).ok().and_then(NonZeroUsize::new) else {
        return 0.0;
    };
    let page = match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(p)) => (p as usize).max(4096),
        _ => 4096,
    };
    // SAFETY: a read-only shared mapping of an open file, only given to mincore (which
    // touches no page of it) and unmapped before returning.
    let Ok(p) = (unsafe {
        nix::sys::mman::mmap(
            None,
            len,
            ProtFlags::PROT_READ,
            MapFlags::MAP_SHARED,
            file,
            0,
        )
    }) else {
        return 0.0;
    };
    let mut vec = vec![0u8; len.get().div_ceil(page)];
    // SAFETY: `p` maps `len` bytes and `vec` has a byte for each of their pages. Neither nix
    // nor rustix wraps mincore.
    let rc = unsafe { libc::mincore(p.as_ptr(), len.get(), vec.as_mut_ptr()) };
    // SAFETY: the mapping made above, used by nothing after this.
    let _ = unsafe { nix::sys::mman::munmap(p, len.get()) };
    if rc != 0 {
        return 0.0;
    }
    vec.iter().filter(|&&b| b & 1 != 0).count() as f64 / vec.len() as f64
}

/// Asks the kernel for large readahead: the file is read once, front to back; failing only
/// loses the hint.
pub(super) fn sequential(file: &File) {
    let _ = nix::fcntl::posix_fadvise(file, 0, 0, PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL);
}
