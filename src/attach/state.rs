//! Per-device state files, so `vramdisk detach` finds a daemon and what it set up, even
//! when that daemon is dead.
//!
//! Layout, under [`run_dir`] (`/run/vramdisk`, or `$VRAMDISK_RUNTIME_DIR`):
//!
//! ```text
//! <id>/state.json   what the daemon set up (written once it is attached)
//! <id>/mnt/         the FUSE mount holding `disk` and `stats`
//! <id>/daemon.log   the daemon's log with --daemon
//! <id>/force        written by `detach --force` before it signals the daemon
//! <id>/refused      written by the daemon when it declines to stop (device in use)
//! ```
//!
//! `<id>` is the daemon's pid. A state whose daemon is gone (the pid is dead, or now belongs
//! to another process: the start time is kept to tell) is stale, and [`recover`] undoes what
//! it describes.

use super::loop_dev;
use super::usage;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::{info, warn};

/// File name of the state inside a state directory.
pub const STATE_FILE: &str = "state.json";
/// Marker asking the daemon to tear down even though the device is in use.
pub const FORCE_FILE: &str = "force";
/// Written by the daemon, with the reason, when it declines a stop request.
pub const REFUSED_FILE: &str = "refused";
/// The daemon's log with --daemon.
pub const LOG_FILE: &str = "daemon.log";

/// What one attached device consists of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The daemon's pid.
    pub pid: u32,
    /// The daemon's start time in clock ticks since boot (/proc/PID/stat field 22), so a
    /// recycled pid is not mistaken for the daemon.
    pub start_time: u64,
    /// "fuse", "nbd" or "ublk".
    pub method: String,
    /// The block device, e.g. /dev/loop3.
    pub device: PathBuf,
    /// Loop device number (FUSE method).
    pub loop_number: Option<u32>,
    /// FUSE mountpoint (FUSE method).
    pub mountpoint: Option<PathBuf>,
    /// The device image the loop device is bound to (FUSE method).
    pub image: Option<PathBuf>,
    /// The counters file (FUSE method).
    pub stats: Option<PathBuf>,
    /// The daemon made the device swap itself (and will swapoff it on detach).
    pub swap: bool,
    /// Size in bytes.
    pub size: u64,
    /// Where the data lives, e.g. "host RAM".
    pub backend: String,
    /// --pid-file, removed on detach.
    pub pid_file: Option<PathBuf>,
}

/// The directory holding every state directory: `/run/vramdisk`, or the runtime directory
/// the control sockets also use when `$VRAMDISK_RUNTIME_DIR` moves it. Unlike the control
/// sockets' default it has no per-user fallback: attaching takes root, and `detach` must
/// find what root attached.
pub fn run_dir() -> PathBuf {
    crate::ops::control::runtime_dir_override().unwrap_or_else(|| PathBuf::from("/run/vramdisk"))
}

/// The state directory of the daemon with `pid`.
pub fn state_dir(pid: u32) -> PathBuf {
    run_dir().join(pid.to_string())
}

/// Start time of process `pid` (clock ticks since boot), `None` if it does not exist or has
/// exited (a zombie waiting for its parent counts as gone).
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let run_state = fields.next()?;
    if run_state == "Z" || run_state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

impl State {
    /// Whether the daemon that wrote this state is still running.
    pub fn daemon_alive(&self) -> bool {
        process_start_time(self.pid) == Some(self.start_time)
    }
}

/// Creates the state directory of this process (private to root).
pub fn create_dir(pid: u32) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let run = run_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&run)
        .with_context(|| format!("creating {}", run.display()))?;
    let dir = state_dir(pid);
    if dir.exists() {
        // Our pid, so whatever is there belongs to a dead process.
        if let Ok(old) = read(&dir) {
            recover(&dir, &old, true)?;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    // The kernel reports the loop device's backing file by its canonical path; every path
    // derived from this directory must match it, whatever symlinks lead here.
    std::fs::canonicalize(&dir).with_context(|| format!("resolving {}", dir.display()))
}

/// Writes `state` into `dir` atomically (readers never see half a file).
pub fn write(dir: &Path, state: &State) -> Result<()> {
    let tmp = dir.join(".state.json.tmp");
    let text = serde_json::to_string_pretty(state)? + "\n";
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(STATE_FILE))
        .with_context(|| format!("writing {}", dir.join(STATE_FILE).display()))
}

/// Reads the state in `dir`.
pub fn read(dir: &Path) -> Result<State> {
    let path = dir.join(STATE_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Every state directory with a readable state, in pid order.
pub fn list() -> Vec<(PathBuf, State)> {
    let Ok(rd) = std::fs::read_dir(run_dir()) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, State)> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter_map(|dir| read(&dir).ok().map(|s| (dir, s)))
        .collect();
    out.sort_by_key(|(_, s)| s.pid);
    out
}

/// The state of the device named `name`: a device path (`/dev/loop3`), its name (`loop3`),
/// or a state id (the daemon's pid).
pub fn find(name: &str) -> Result<(PathBuf, State)> {
    let all = list();
    let by_path = |p: &Path| -> bool {
        let as_path = Path::new(name);
        let candidate = if as_path.is_absolute() {
            as_path.to_path_buf()
        } else {
            Path::new("/dev").join(name)
        };
        p == candidate
            || (loop_dev::loop_number(p).is_some()
                && loop_dev::loop_number(p) == loop_dev::loop_number(&candidate))
    };
    if let Some(found) = all
        .iter()
        .find(|(dir, s)| by_path(&s.device) || dir.file_name().is_some_and(|f| f == name))
    {
        return Ok(found.clone());
    }
    if all.is_empty() {
        bail!(
            "no vramdisk device is attached (nothing in {}): nothing to detach",
            run_dir().display()
        );
    }
    let known: Vec<String> = all
        .iter()
        .map(|(_, s)| s.device.display().to_string())
        .collect();
    bail!(
        "{name} is not a vramdisk device; attached ones are: {}",
        known.join(", ")
    )
}

/// Undoes what a state describes, for a daemon that is gone: detaches its loop device if it
/// is still bound to the daemon's image, lazily unmounts the stale FUSE mount, disconnects a
/// kernel nbd device or deletes a ublk device it left, removes its control socket and the
/// state directory. Without `force`, refuses while the device is mounted or swap.
pub fn recover(dir: &Path, state: &State, force: bool) -> Result<()> {
    if let (Some(n), Some(image)) = (state.loop_number, &state.image)
        && loop_dev::backing_file(n).as_deref() == Some(image.as_path())
    {
        release_users(state, force)?;
        loop_dev::clear_if_bound_to(n, image)?;
        if !loop_dev::wait_unbound(n, image, Duration::from_secs(2)) {
            warn!(
                "{} is still open by someone; it will detach itself when they close it",
                state.device.display()
            );
        }
    }
    let kernel_device = match state.method.as_str() {
        "nbd" => device_number(&state.device, "nbd").filter(|n| {
            std::fs::read_to_string(format!("/sys/block/nbd{n}/backend"))
                .is_ok_and(|b| b.trim() == super::kernel_nbd::backend_identifier(state.pid))
        }),
        "ublk" => device_number(&state.device, "ublkb")
            .filter(|n| Path::new(&format!("/dev/ublkc{n}")).exists()),
        _ => None,
    };
    if let Some(n) = kernel_device {
        release_users(state, force)?;
        if state.method == "nbd" {
            super::kernel_nbd::disconnect_stale(n, state.pid)?;
        } else {
            super::ublk::delete_stale(n)?;
        }
    }
    if let Some(mnt) = &state.mountpoint {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        if usage::is_mountpoint(&mountinfo, mnt) {
            // The connection is dead; a lazy unmount cannot hang on it.
            nix::mount::umount2(mnt.as_path(), nix::mount::MntFlags::MNT_DETACH)
                .with_context(|| format!("unmounting the stale FUSE mount {}", mnt.display()))?;
            info!("unmounted stale FUSE mount {}", mnt.display());
        }
    }
    if let Some(p) = &state.pid_file {
        let _ = std::fs::remove_file(p);
    }
    // The dead daemon's control socket, unless a live process (another daemon that got the
    // same pid) answers on it.
    let sock = crate::ops::control::runtime_dir().join(format!("{}.sock", state.pid));
    if sock.exists() && std::os::unix::net::UnixStream::connect(&sock).is_err() {
        let _ = std::fs::remove_file(&sock);
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(())
}

/// Before a dead daemon's device is torn down: refuses (without `force`) while it is
/// mounted or swap, and takes it off swap.
fn release_users(state: &State, force: bool) -> Result<()> {
    let users = usage::users(&state.device);
    if !users.is_idle(false) && !force {
        bail!(
            "{} is {} and its daemon (pid {}) is dead, so its I/O fails: stop using it \
             (umount / swapoff) and run detach again, or use --force",
            state.device.display(),
            users.describe(false),
            state.pid
        );
    }
    if users.swap {
        // Swap on a dead device: try to take it off; this fails when the pages cannot be
        // read back, which then needs a reboot anyway.
        let _ = super::swapoff(&state.device);
    }
    Ok(())
}

/// The N of `/dev/<prefix>N`.
fn device_number(dev: &Path, prefix: &str) -> Option<u32> {
    dev.file_name()?
        .to_str()?
        .strip_prefix(prefix)?
        .parse()
        .ok()
}

/// Recovers every state whose daemon is gone and whose device is not in use; returns how
/// many. Called by `attach`, so a crashed daemon's leftovers never pile up.
pub fn recover_stale() -> usize {
    let mut n = 0;
    for (dir, state) in list() {
        if state.daemon_alive() {
            continue;
        }
        match recover(&dir, &state, false) {
            Ok(()) => {
                info!(
                    "cleaned up after a dead daemon (pid {}, {})",
                    state.pid,
                    state.device.display()
                );
                n += 1;
            }
            Err(e) => warn!("leaving {}: {e:#}", dir.display()),
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_readable() {
        let me = std::process::id();
        let t = process_start_time(me).expect("start time of this process");
        assert_eq!(process_start_time(me), Some(t));
        assert_eq!(process_start_time(u32::MAX), None);
    }

    #[test]
    fn device_numbers() {
        assert_eq!(device_number(Path::new("/dev/nbd12"), "nbd"), Some(12));
        assert_eq!(device_number(Path::new("/dev/ublkb0"), "ublkb"), Some(0));
        assert_eq!(device_number(Path::new("/dev/ublkc0"), "ublkb"), None);
        assert_eq!(device_number(Path::new("/dev/loop3"), "nbd"), None);
    }

    #[test]
    fn state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let s = State {
            pid: 1,
            start_time: 2,
            method: "fuse".into(),
            device: "/dev/loop9".into(),
            loop_number: Some(9),
            mountpoint: Some("/run/vramdisk/1/mnt".into()),
            image: Some("/run/vramdisk/1/mnt/disk".into()),
            stats: Some("/run/vramdisk/1/mnt/stats".into()),
            swap: false,
            size: 1 << 30,
            backend: "host RAM".into(),
            pid_file: None,
        };
        write(dir.path(), &s).unwrap();
        assert_eq!(read(dir.path()).unwrap(), s);
        assert!(!s.daemon_alive());
    }
}
