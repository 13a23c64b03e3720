//! Keeping the daemon alive and unblocked when its own device is swap.
//!
//! A process that serves a swap device must never need that device to make progress: if
//! serving a request needed a page that was swapped out to it, or needed memory that can only
//! be found by swapping to it, the machine deadlocks. So the daemon locks all its memory,
//! marks itself an I/O flusher (its allocations never wait on I/O), and tells the OOM killer
//! to pick someone else; the I/O path itself neither allocates nor logs once warm.

use anyhow::{Result, bail};
use tracing::{info, warn};

const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// What [`harden`] managed to do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hardening {
    /// All current and future memory is locked.
    pub memory_locked: bool,
    /// PR_SET_IO_FLUSHER is set.
    pub io_flusher: bool,
    /// oom_score_adj is -1000.
    pub oom_protected: bool,
}

/// Locks all memory (current and future), sets PR_SET_IO_FLUSHER and oom_score_adj -1000.
///
/// Failing to lock memory is an error when `required` (the device is to be swap), a warning
/// otherwise; the other two only warn, as the issue asks (a container may forbid them).
pub fn harden(required: bool) -> Result<Hardening> {
    let mut h = Hardening::default();

    // Root's default RLIMIT_MEMLOCK is often 8 MiB; lift it where we may.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    // SAFETY: plain syscall.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } == 0 {
        h.memory_locked = true;
    } else {
        let e = std::io::Error::last_os_error();
        if required {
            bail!(
                "cannot lock the daemon's memory (mlockall: {e}); a swap device served from \
                 memory that can itself be swapped out can deadlock: run as root or raise \
                 RLIMIT_MEMLOCK"
            );
        }
        warn!("cannot lock the daemon's memory (mlockall: {e}); do not use this device as swap");
    }

    // SAFETY: plain syscall with integer arguments.
    if unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) } == 0 {
        h.io_flusher = true;
    } else {
        let e = std::io::Error::last_os_error();
        warn!("cannot set PR_SET_IO_FLUSHER ({e}): under memory pressure the daemon may stall");
    }

    match std::fs::write("/proc/self/oom_score_adj", "-1000") {
        Ok(()) => h.oom_protected = true,
        Err(e) => warn!("cannot set oom_score_adj to -1000 ({e}): the OOM killer may pick us"),
    }
    info!(
        "swap safety: memory locked {}, io flusher {}, oom protected {}",
        h.memory_locked, h.io_flusher, h.oom_protected
    );
    Ok(h)
}

/// Bytes of this process's memory that are resident (VmRSS); with [`harden`] all of it is
/// locked. (VmLck overstates: it counts whole locked mappings, reserved or not.)
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
