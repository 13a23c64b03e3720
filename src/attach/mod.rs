//! Local attach methods: turn a [`crate::engine::BlockDevice`] into `/dev/...`.
//!
//! Three methods, chosen at run time by what the kernel offers (`--via auto`) or by name:
//!
//! - [`fuse_loop`]: a FUSE file with a loop device on it. Needs only FUSE and loop, which
//!   every machine we have offers: `auto`'s last resort.
//! - [`kernel_nbd`]: the kernel's nbd driver, given socketpairs to the in-process NBD server
//!   over generic netlink. Where the nbd module and its netlink family are loaded.
//! - [`ublk`]: the kernel's ublk driver, where `/dev/ublk-control` exists and the build has
//!   the cargo feature `ublk`.
//!
//! Around them: [`state`] (per-device state files, recovery after a dead daemon),
//! [`usage`] (is the device mounted or swap?), [`safety`] (memory locking and friends for
//! swap), [`loop_dev`] (loop ioctls).

mod fuse_disk;
pub mod fuse_loop;
mod fuse_uring;
mod io_path;
pub mod kernel_nbd;
pub mod loop_dev;
mod pacing;
pub mod safety;
pub mod state;
pub mod ublk;
pub mod usage;

use crate::engine::BlockDevice;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Which attach method to use, as given on the command line (`--via`: the command line's
/// parser for it lives in `cli`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The best method this kernel and build offer.
    Auto,
    /// FUSE file + loop device.
    Fuse,
    /// The kernel's nbd driver over netlink.
    Nbd,
    /// ublk.
    Ublk,
}

/// An attach method that can actually be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// FUSE file + loop device.
    FuseLoop,
    /// The kernel's nbd driver.
    KernelNbd,
    /// The kernel's ublk driver.
    Ublk,
}

impl Method {
    /// What the log calls it.
    pub fn label(self) -> &'static str {
        match self {
            Method::FuseLoop => "FUSE + loop",
            Method::KernelNbd => "kernel nbd",
            Method::Ublk => "ublk",
        }
    }

    /// Short name for logs and state files.
    pub fn name(self) -> &'static str {
        match self {
            Method::FuseLoop => "fuse",
            Method::KernelNbd => "nbd",
            Method::Ublk => "ublk",
        }
    }
}

/// The method `via` asks for, or one sentence saying why it cannot be used here, with the
/// reason it was picked (for the log). `auto` prefers ublk (requests go from the block layer
/// straight to the daemon), then kernel nbd (one socket hop), then FUSE + loop (loop, FUSE
/// and a daemon thread per request), each only where a quick probe shows that it works:
/// ublk's driver answers a GET_FEATURES command, the kernel's nbd netlink family resolves,
/// /dev/fuse and /dev/loop-control exist.
pub fn choose(via: Via) -> Result<(Method, String)> {
    match via {
        Via::Fuse => match fuse_loop::unavailable() {
            None => Ok((Method::FuseLoop, "FUSE + loop (--via fuse)".into())),
            Some(why) => bail!(why),
        },
        Via::Nbd => match kernel_nbd::unavailable() {
            None => Ok((Method::KernelNbd, "kernel nbd (--via nbd)".into())),
            Some(why) => bail!(why),
        },
        Via::Ublk => match ublk::unavailable() {
            None => Ok((Method::Ublk, "ublk (--via ublk)".into())),
            Some(why) => bail!(why),
        },
        Via::Auto => pick([
            (Method::Ublk, ublk::probe),
            (Method::KernelNbd, kernel_nbd::unavailable),
            (Method::FuseLoop, fuse_loop::unavailable),
        ]),
    }
}

/// A quick check of an attach method: why it does not work here, or `None`.
type Probe = fn() -> Option<String>;

/// The first method of `order` whose probe finds nothing wrong, and why it was picked: the
/// reasons the earlier ones were passed over.
fn pick(order: [(Method, Probe); 3]) -> Result<(Method, String)> {
    let mut why_not = Vec::new();
    for (method, probe) in order {
        match probe() {
            None if why_not.is_empty() => {
                return Ok((
                    method,
                    format!("{} (auto: the first choice)", method.label()),
                ));
            }
            None => {
                return Ok((
                    method,
                    format!("{} (auto; {})", method.label(), why_not.join("; ")),
                ));
            }
            Some(why) => why_not.push(format!("not {}: {why}", method.label())),
        }
    }
    bail!(
        "no attach method works on this machine: {}",
        why_not.join("; ")
    )
}

/// Tunables of an attachment.
#[derive(Clone)]
pub struct AttachOptions {
    /// Where the FUSE filesystem is mounted.
    pub mountpoint: std::path::PathBuf,
    /// Threads serving requests (FUSE method), or ublk queues.
    pub threads: usize,
    /// Kernel nbd connections.
    pub connections: usize,
    /// How long a FUSE thread polls for the next request after replying (zero: never).
    pub busy_poll: std::time::Duration,
    /// How FUSE requests reach the daemon (FUSE method).
    pub fuse_transport: fuse_loop::Transport,
    /// Where the NBD server counts the kernel's connections (status, metrics).
    pub metrics: Option<Arc<crate::engine::metered::DeviceMetrics>>,
}

/// A device attached by one of the methods.
pub enum Attachment {
    /// FUSE + loop.
    FuseLoop(fuse_loop::FuseLoop),
    /// Kernel nbd.
    KernelNbd(kernel_nbd::KernelNbd),
    /// ublk.
    Ublk(ublk::Ublk),
}

impl Attachment {
    /// Attaches `device` with `method`. All threads and buffers of the I/O path are created
    /// before the block device appears.
    pub fn attach(
        method: Method,
        device: Arc<dyn BlockDevice>,
        runtime: &tokio::runtime::Handle,
        opts: &AttachOptions,
    ) -> Result<Attachment> {
        match method {
            Method::FuseLoop => {
                let fo = fuse_loop::FuseLoopOptions {
                    mountpoint: opts.mountpoint.clone(),
                    threads: opts.threads,
                    max_background: 128,
                    busy_poll: opts.busy_poll,
                    transport: opts.fuse_transport,
                };
                Ok(Attachment::FuseLoop(fuse_loop::FuseLoop::attach(
                    device,
                    runtime.clone(),
                    &fo,
                )?))
            }
            Method::KernelNbd => Ok(Attachment::KernelNbd(kernel_nbd::KernelNbd::attach(
                device,
                opts.metrics.clone(),
                runtime,
                opts.connections,
            )?)),
            Method::Ublk => {
                let plan = ublk::plan(&device.capabilities(), device.size(), opts.threads)?;
                Ok(Attachment::Ublk(ublk::Ublk::attach(
                    device,
                    runtime.clone(),
                    plan,
                )?))
            }
        }
    }

    /// The method and, for FUSE, how its requests arrive: "FUSE + loop (FUSE over
    /// io_uring, 2 queues of 4 threads)".
    pub fn describe(&self) -> String {
        match self {
            Attachment::FuseLoop(f) => format!("{} ({})", Method::FuseLoop.label(), f.transport()),
            Attachment::KernelNbd(_) => Method::KernelNbd.label().into(),
            Attachment::Ublk(_) => Method::Ublk.label().into(),
        }
    }

    /// The block device path, e.g. `/dev/loop3`.
    pub fn device_path(&self) -> &Path {
        match self {
            Attachment::FuseLoop(f) => f.device_path(),
            Attachment::KernelNbd(n) => n.device_path(),
            Attachment::Ublk(u) => u.device_path(),
        }
    }

    /// Whether the attachment is still in place (someone may have detached the loop device
    /// behind our back with `losetup -d`, disconnected the nbd device, or deleted the ublk
    /// one).
    pub fn is_intact(&self) -> bool {
        match self {
            Attachment::FuseLoop(f) => {
                loop_dev::backing_file(f.loop_number()).as_deref() == Some(f.image())
            }
            Attachment::KernelNbd(n) => n.is_connected(),
            Attachment::Ublk(u) => u.is_intact(),
        }
    }

    /// Tears the attachment down; see [`fuse_loop::FuseLoop::detach`] for `force`.
    pub fn detach(&mut self, force: bool, timeout: Duration) -> Result<()> {
        match self {
            Attachment::FuseLoop(f) => f.detach(force, timeout),
            Attachment::KernelNbd(n) => n.detach(),
            Attachment::Ublk(u) => u.detach(),
        }
    }
}

fn c_path(path: &Path) -> Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .with_context(|| format!("{} has a NUL byte", path.display()))
}

/// Writes a swap signature on `dev` with mkswap.
pub fn mkswap(dev: &Path) -> Result<()> {
    let out = std::process::Command::new("mkswap")
        .arg(dev)
        .stdin(std::process::Stdio::null())
        .output()
        .context("running mkswap (util-linux): is it installed?")?;
    if !out.status.success() {
        bail!(
            "mkswap {} failed: {}",
            dev.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Enables swap on `dev` (the swapon(2) system call).
pub fn swapon(dev: &Path) -> Result<()> {
    let c = c_path(dev)?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::swapon(c.as_ptr(), 0) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("swapon {}", dev.display()));
    }
    Ok(())
}

/// Disables swap on `dev` (the swapoff(2) system call); the kernel reads every swapped page
/// back first, which fails with ENOMEM when RAM cannot hold them.
pub fn swapoff(dev: &Path) -> Result<()> {
    let c = c_path(dev)?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::swapoff(c.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("swapoff {}", dev.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn works() -> Option<String> {
        None
    }
    fn no_ublk() -> Option<String> {
        Some("no ublk here".into())
    }
    fn no_nbd() -> Option<String> {
        Some("no nbd here".into())
    }

    #[test]
    fn auto_takes_the_first_method_that_works_and_says_why() {
        let (m, why) = pick([
            (Method::Ublk, works),
            (Method::KernelNbd, works),
            (Method::FuseLoop, works),
        ])
        .unwrap();
        assert_eq!(m, Method::Ublk);
        assert_eq!(why, "ublk (auto: the first choice)");

        let (m, why) = pick([
            (Method::Ublk, no_ublk),
            (Method::KernelNbd, no_nbd),
            (Method::FuseLoop, works),
        ])
        .unwrap();
        assert_eq!(m, Method::FuseLoop);
        assert_eq!(
            why,
            "FUSE + loop (auto; not ublk: no ublk here; not kernel nbd: no nbd here)"
        );

        let e = pick([
            (Method::Ublk, no_ublk),
            (Method::KernelNbd, no_nbd),
            (Method::FuseLoop, no_nbd),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("no attach method works on this machine: not ublk"),
            "{e}"
        );
    }
}
