//! Who is using a block device: mounts, swap, and stacked devices (holders).
//!
//! Detaching a device that is mounted or used as swap would turn every later I/O into an
//! error, so detach refuses unless forced; this is how it finds out.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The users of one block device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Users {
    /// Mountpoints of filesystems on the device (this mount namespace).
    pub mounts: Vec<PathBuf>,
    /// The device is active swap.
    pub swap: bool,
    /// Devices stacked on it (device-mapper, md), from /sys/block/*/holders.
    pub holders: Vec<String>,
}

impl Users {
    /// Nothing uses the device, not counting swap when `ignore_swap`.
    pub fn is_idle(&self, ignore_swap: bool) -> bool {
        self.mounts.is_empty() && self.holders.is_empty() && (ignore_swap || !self.swap)
    }

    /// One sentence naming what uses the device, e.g. "mounted at /mnt, swap".
    pub fn describe(&self, ignore_swap: bool) -> String {
        let mut parts = Vec::new();
        if !self.mounts.is_empty() {
            let m: Vec<String> = self
                .mounts
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            parts.push(format!("mounted at {}", m.join(", ")));
        }
        if self.swap && !ignore_swap {
            parts.push("in use as swap".to_string());
        }
        if !self.holders.is_empty() {
            parts.push(format!("held by {}", self.holders.join(", ")));
        }
        parts.join("; ")
    }
}

fn block_rdev(path: &Path) -> Option<u64> {
    let meta = std::fs::metadata(path).ok()?;
    meta.file_type().is_block_device().then(|| meta.rdev())
}

/// Mountpoints in `mountinfo` text whose source is device `major:minor`.
pub fn mounts_of(mountinfo: &str, major: u32, minor: u32) -> Vec<PathBuf> {
    let want = format!("{major}:{minor}");
    mountinfo
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let dev = fields.nth(2)?;
            let _root = fields.next()?;
            let mountpoint = fields.next()?;
            (dev == want).then(|| PathBuf::from(unescape_mount_path(mountpoint)))
        })
        .collect()
}

/// Undoes the octal escapes (`\040` for a space) of /proc/*/mountinfo and /proc/swaps.
pub fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `/proc/swaps` text lists a swap area on device `rdev`.
fn swaps_contain(swaps: &str, rdev: u64) -> bool {
    swaps.lines().skip(1).any(|line| {
        line.split_whitespace()
            .next()
            .map(unescape_mount_path)
            .and_then(|p| block_rdev(Path::new(&p)))
            == Some(rdev)
    })
}

/// Whether `mountinfo` text has something mounted at `path`.
pub fn is_mountpoint(mountinfo: &str, path: &Path) -> bool {
    mountinfo.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .is_some_and(|m| Path::new(&unescape_mount_path(m)) == path)
    })
}

/// The users of block device `dev` (e.g. `/dev/loop3`).
pub fn users(dev: &Path) -> Users {
    let Some(rdev) = block_rdev(dev) else {
        return Users::default();
    };
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    let holders = std::fs::read_dir(format!("/sys/dev/block/{major}:{minor}/holders"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    Users {
        mounts: mounts_of(&mountinfo, major, minor),
        swap: swaps_contain(&swaps, rdev),
        holders,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
95 30 7:3 / /mnt/with\\040space rw,relatime shared:50 - ext4 /dev/loop3 rw
96 30 7:30 / /mnt/other rw,relatime - ext4 /dev/loop30 rw
97 30 0:55 / /run/vramdisk/12/mnt rw - fuse.vramdisk vramdisk rw";

    #[test]
    fn finds_mounts_by_device_number() {
        assert_eq!(
            mounts_of(MOUNTINFO, 7, 3),
            vec![PathBuf::from("/mnt/with space")]
        );
        assert_eq!(
            mounts_of(MOUNTINFO, 7, 30),
            vec![PathBuf::from("/mnt/other")]
        );
        assert!(mounts_of(MOUNTINFO, 7, 4).is_empty());
    }

    #[test]
    fn finds_mountpoints() {
        assert!(is_mountpoint(MOUNTINFO, Path::new("/run/vramdisk/12/mnt")));
        assert!(!is_mountpoint(MOUNTINFO, Path::new("/run/vramdisk/13/mnt")));
    }

    #[test]
    fn describes_users() {
        let u = Users {
            mounts: vec![PathBuf::from("/mnt")],
            swap: true,
            holders: vec![],
        };
        assert!(!u.is_idle(true));
        assert_eq!(u.describe(false), "mounted at /mnt; in use as swap");
        let s = Users {
            swap: true,
            ..Users::default()
        };
        assert!(s.is_idle(true));
        assert!(!s.is_idle(false));
    }
}
