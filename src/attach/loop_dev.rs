//! Loop devices through raw ioctls.
//!
//! The loop crates on crates.io cannot set what this path depends on: `LOOP_CONFIGURE` (one
//! atomic call instead of SET_FD + SET_STATUS, so no half-configured device is ever visible),
//! `LO_FLAGS_DIRECT_IO` (without it every request is copied through the page cache of the
//! backing file, and FUSE would see buffered writeback instead of the loop's own requests),
//! `LO_FLAGS_AUTOCLEAR` (the device detaches itself once the last opener is gone, which is
//! what makes a killed daemon recoverable) and a 4096-byte logical block size.

use anyhow::{Context, Result, bail};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Major device number of loop devices.
pub const LOOP_MAJOR: u32 = 7;

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_DIRECT_IO: libc::c_ulong = 0x4C08;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

/// `lo_flags` bits (linux/loop.h).
pub const LO_FLAGS_READ_ONLY: u32 = 1;
/// Detach when the last opener closes the device.
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// Issue direct I/O to the backing file.
pub const LO_FLAGS_DIRECT_IO: u32 = 16;

const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64` from linux/loop.h.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config` from linux/loop.h (the argument of LOOP_CONFIGURE).
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// How to set up a loop device.
#[derive(Clone, Debug)]
pub struct LoopOptions {
    /// Logical block size the device reports (512, 1024, 2048 or 4096).
    pub block_size: u32,
    /// Refuse writes.
    pub read_only: bool,
    /// Direct I/O to the backing file.
    pub direct_io: bool,
    /// Detach when the last opener is gone.
    pub autoclear: bool,
}

/// A loop device this process configured, held open.
///
/// Holding it open is what keeps an autoclear device alive while nothing else uses it; once
/// this is dropped (or the process dies) and no one else has it open, the kernel detaches it.
#[derive(Debug)]
pub struct LoopDevice {
    file: File,
    number: u32,
    path: PathBuf,
}

fn ioctl_arg(fd: &File, request: libc::c_ulong, arg: libc::c_ulong) -> std::io::Result<i32> {
    // SAFETY: the caller passes a request that takes an integer argument.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The `/dev` path of loop device `number`.
pub fn loop_path(number: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{number}"))
}

/// The loop device number of a path like `/dev/loop3` (by its device number, so symlinks
/// and other names of the same node work).
pub fn loop_number(path: &Path) -> Option<u32> {
    let meta = std::fs::metadata(path).ok()?;
    use std::os::unix::fs::FileTypeExt;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let rdev = meta.rdev();
    (libc::major(rdev) == LOOP_MAJOR).then(|| libc::minor(rdev))
}

/// The backing file of loop device `number` as the kernel reports it, `None` when unbound.
pub fn backing_file(number: u32) -> Option<PathBuf> {
    let s = std::fs::read_to_string(format!("/sys/block/loop{number}/loop/backing_file")).ok()?;
    let s = s.trim_end_matches('\n');
    // The kernel appends " (deleted)" when the file was unlinked; ours never is.
    (!s.is_empty()).then(|| PathBuf::from(s))
}

fn open_node(number: u32) -> std::io::Result<File> {
    let path = loop_path(number);
    match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Containers with a static /dev get no node for a loop device created on demand.
            let dev = libc::makedev(LOOP_MAJOR, number);
            let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: c is a valid NUL-terminated path.
            if unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o660, dev) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            OpenOptions::new().read(true).write(true).open(&path)
        }
        other => other,
    }
}

impl LoopDevice {
    /// Binds a free loop device to `backing` with `opts`, in one LOOP_CONFIGURE call.
    pub fn attach(backing: &Path, opts: &LoopOptions) -> Result<LoopDevice> {
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/loop-control")
            .context("opening /dev/loop-control (is the loop module loaded?)")?;
        let backing_file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(backing)
            .with_context(|| format!("opening the device image {}", backing.display()))?;

        let mut flags = 0;
        if opts.read_only {
            flags |= LO_FLAGS_READ_ONLY;
        }
        if opts.direct_io {
            flags |= LO_FLAGS_DIRECT_IO;
        }
        if opts.autoclear {
            flags |= LO_FLAGS_AUTOCLEAR;
        }
        let mut info = LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: flags,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        };
        let name = backing.as_os_str().as_encoded_bytes();
        let n = name.len().min(LO_NAME_SIZE - 1);
        info.lo_file_name[..n].copy_from_slice(&name[..n]);
        let config = LoopConfig {
            fd: backing_file.as_raw_fd() as u32,
            block_size: opts.block_size,
            info,
            reserved: [0; 8],
        };

        // Another process may take the free device between GET_FREE and CONFIGURE: the
        // configure then fails with EBUSY and we ask again.
        let mut last_err = None;
        for _ in 0..16 {
            let number = ioctl_arg(&control, LOOP_CTL_GET_FREE, 0)
                .context("asking /dev/loop-control for a free loop device")?
                as u32;
            let dev = open_node(number)
                .with_context(|| format!("opening {}", loop_path(number).display()))?;
            // SAFETY: LOOP_CONFIGURE reads a struct loop_config, which `config` is.
            let rc = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &config) };
            if rc == 0 {
                let this = LoopDevice {
                    file: dev,
                    number,
                    path: loop_path(number),
                };
                return Ok(this);
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EBUSY) => last_err = Some(err),
                Some(libc::EINVAL) if opts.direct_io => {
                    bail!(
                        "{}: the kernel refused LOOP_CONFIGURE with direct I/O and a {}-byte \
                         block size ({err}); this needs Linux 5.8 or newer",
                        loop_path(number).display(),
                        opts.block_size
                    )
                }
                _ => {
                    return Err(err).with_context(|| {
                        format!(
                            "configuring {} on {}",
                            loop_path(number).display(),
                            backing.display()
                        )
                    });
                }
            }
        }
        Err(last_err.unwrap()).context("every free loop device was taken by someone else")
    }

    /// The device number N of `/dev/loopN`.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the kernel actually does direct I/O on this device (it silently falls back to
    /// buffered I/O when the backing file cannot do it).
    pub fn direct_io(&self) -> bool {
        std::fs::read_to_string(format!("/sys/block/loop{}/loop/dio", self.number))
            .map(|s| s.trim() == "1")
            .unwrap_or(false)
    }

    /// Asks for direct I/O again (LOOP_SET_DIRECT_IO), for kernels that ignored the flag.
    pub fn set_direct_io(&self, on: bool) -> Result<()> {
        ioctl_arg(&self.file, LOOP_SET_DIRECT_IO, on as libc::c_ulong)
            .map(drop)
            .with_context(|| format!("LOOP_SET_DIRECT_IO on {}", self.path.display()))
    }

    /// Detaches the backing file. When others still have the device open the kernel only
    /// marks it autoclear and detaches when they close it; [`wait_unbound`] waits for that.
    pub fn clear(&self) -> Result<()> {
        clear_fd(&self.file).with_context(|| format!("detaching {}", self.path.display()))
    }
}

fn clear_fd(dev: &File) -> std::io::Result<()> {
    match ioctl_arg(dev, LOOP_CLR_FD, 0) {
        Ok(_) => Ok(()),
        // Already unbound (autoclear beat us to it).
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Detaches loop device `number` if it is still bound to `backing` (a device that was
/// already detached, or rebound to another file since, is left alone).
pub fn clear_if_bound_to(number: u32, backing: &Path) -> Result<bool> {
    if backing_file(number).as_deref() != Some(backing) {
        return Ok(false);
    }
    let dev =
        open_node(number).with_context(|| format!("opening {}", loop_path(number).display()))?;
    clear_fd(&dev).with_context(|| format!("detaching {}", loop_path(number).display()))?;
    Ok(true)
}

/// Waits until loop device `number` is no longer bound to `backing`; false on timeout.
pub fn wait_unbound(number: u32, backing: &Path, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        if backing_file(number).as_deref() != Some(backing) {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uapi_struct_sizes() {
        // Sizes from linux/loop.h; a mismatch would make the kernel read garbage.
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    #[test]
    fn loop_paths() {
        assert_eq!(loop_path(3), PathBuf::from("/dev/loop3"));
        assert_eq!(loop_number(Path::new("/dev/null")), None);
    }
}
