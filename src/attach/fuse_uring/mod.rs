//! FUSE over io_uring: the FUSE + loop method's filesystem served through per-CPU rings
//! instead of fuser's threads reading `/dev/fuse`.
//!
//! Why: on the fuser path every 4 KiB request costs a `read` that sleeps, a wakeup, and a
//! `write` for the reply. Over io_uring (Linux 6.14+, where the fuse module's
//! `enable_uring` is on) the kernel queues a request on the ring of the CPU that issued
//! it, and one `io_uring_enter` sends a batch of replies and waits for the next requests.
//!
//! How (Documentation/filesystems/fuse-io-uring.rst): we mount with our own `/dev/fuse`
//! descriptor and answer FUSE_INIT over it, with FUSE_OVER_IO_URING among the flags; from
//! then on the kernel holds new requests until every queue (one per possible CPU) has an
//! entry registered. Each queue is served by a few threads, each with its own ring
//! ([`ring`]) and share of the queue's entries: the kernel hands a request to whichever
//! entry of the queue is free, so one queue's large requests are copied in parallel
//! ([`crate::tunables::URING_THREADS_PER_QUEUE`]). One more thread
//! keeps reading `/dev/fuse`, which still carries FORGET and INTERRUPT (which need no
//! reply here) and anything sent before the rings were ready.
//!
//! Only `--fuse-transport uring` asks for it; fuser stays the default. Each ring thread
//! keeps all of its entries' requests in flight on the device at once and lends the kernel
//! more entries when a queue's are all busy ([`ring`]). Before it did, a thread served one
//! request at a time, so a queue had as many in flight as it had entries in threads: on
//! the 16-CPU H200 machine four per queue, and 4 KiB at 32 or 128 requests in flight ran at
//! four times the rate of one (0.39-0.50x tmpfs+loop, against fuser's 0.78-1.08x). Where
//! the kernel refuses (the parameter is off, or a registration fails), [`start`] unmounts
//! again and says why, and attach fails with that.
//!
//! [`start`]: UringSession::start

mod abi;
mod ops;
mod ring;
mod wake;

use super::fuse_disk::Disk;
use crate::tunables::{URING_ENTRIES, URING_ENTRIES_MAX, URING_MAX_DEPTH, URING_THREADS_PER_QUEUE};
use abi::{In, InHeader, Out};
use anyhow::{Context, Result, bail};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::thread::JoinHandle;
use std::time::Duration;
use tracing::{info, warn};

const ENABLE_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Where FUSE over io_uring cannot be used here, one sentence saying why.
pub(crate) fn unavailable() -> Option<String> {
    match std::fs::read_to_string(ENABLE_PARAM) {
        Err(_) => Some(format!(
            "this kernel has no FUSE over io_uring ({ENABLE_PARAM} is missing; it came \
             with Linux 6.14, CONFIG_FUSE_IO_URING)"
        )),
        Ok(v) if v.trim() != "Y" => Some(format!(
            "FUSE over io_uring is off in this kernel: 'echo Y > {ENABLE_PARAM}' turns it on"
        )),
        Ok(_) => None,
    }
}

/// Options of a FUSE-over-io_uring session.
#[derive(Clone, Debug)]
pub(crate) struct UringOptions {
    /// Where to mount.
    pub(crate) mountpoint: PathBuf,
    /// The largest request (FUSE max_write).
    pub(crate) max_write: u32,
    /// Background requests the kernel may have in flight (FUSE max_background).
    pub(crate) max_background: u16,
    /// How long a queue polls for the next request after a batch; zero never polls.
    pub(crate) busy_poll: Duration,
}

/// A mounted filesystem served over io_uring.
pub(crate) struct UringSession {
    fd: Arc<OwnedFd>,
    mountpoint: PathBuf,
    threads: Vec<JoinHandle<()>>,
    queues: usize,
    /// Threads serving each queue.
    per_queue: usize,
}

impl std::fmt::Debug for UringSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringSession")
            .field("mountpoint", &self.mountpoint)
            .field("queues", &self.queues)
            .field("per_queue", &self.per_queue)
            .finish()
    }
}

/// What INIT settled.
struct Negotiated {
    /// Bytes the kernel copies into a ring entry's payload at most.
    max_payload: usize,
    uring: bool,
}

/// Mounts a FUSE filesystem on `mountpoint` served through `fd`.
fn mount(fd: &OwnedFd, mountpoint: &Path) -> Result<()> {
    use nix::mount::MsFlags;
    let data = format!(
        "fd={},rootmode=40000,user_id={},group_id={}",
        fd.as_raw_fd(),
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    nix::mount::mount(
        Some("vramdisk"),
        mountpoint,
        Some("fuse.vramdisk"),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NOATIME,
        Some(data.as_str()),
    )
    .with_context(|| format!("mounting the FUSE filesystem on {}", mountpoint.display()))
}

/// Reads FUSE_INIT from `fd` and answers it, asking for io_uring where the kernel offers it.
fn handshake(fd: &OwnedFd, opts: &UringOptions) -> Result<Negotiated> {
    let mut buf = vec![0u8; 64 << 10];
    let n = loop {
        match nix::unistd::read(fd, &mut buf) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("reading FUSE_INIT from /dev/fuse"),
        }
    };
    let h = InHeader::parse(&buf[..n]).context("a short FUSE_INIT from the kernel")?;
    if h.opcode != abi::INIT {
        bail!(
            "the kernel's first FUSE request was opcode {}, not INIT",
            h.opcode
        );
    }
    let init = In(&buf[abi::IN_HEADER..n]);
    let (major, max_readahead) = (init.u32(0), init.u32(8));
    let mut offered = u64::from(init.u32(12));
    if offered & abi::FUSE_INIT_EXT != 0 {
        offered |= u64::from(init.u32(16)) << 32;
    }
    let mut reply = [0u8; abi::OUT_HEADER + abi::INIT_OUT];
    if major != abi::KERNEL_VERSION {
        abi::put_out_header(&mut reply, abi::OUT_HEADER as u32, -libc::EPROTO, h.unique);
        let _ = nix::unistd::write(fd, &reply[..abi::OUT_HEADER]);
        bail!(
            "the kernel speaks FUSE {major}, not {}",
            abi::KERNEL_VERSION
        );
    }
    let wanted = abi::FUSE_ASYNC_READ
        | abi::FUSE_BIG_WRITES
        | abi::FUSE_ASYNC_DIO
        | abi::FUSE_MAX_PAGES
        | abi::FUSE_INIT_EXT
        | abi::FUSE_OVER_IO_URING;
    let flags = wanted & offered;
    if flags & abi::FUSE_ASYNC_DIO == 0 {
        warn!(
            "this kernel's FUSE lacks FUSE_ASYNC_DIO: small requests will be several times slower"
        );
    }
    let max_pages = (opts.max_write.max(max_readahead).max(1) - 1) / 4096 + 1;
    let mut out = Out::new(&mut reply[abi::OUT_HEADER..]);
    out.u32(abi::KERNEL_VERSION)
        .u32(abi::KERNEL_MINOR)
        .u32(max_readahead)
        .u32(flags as u32)
        .u16(opts.max_background)
        .u16(opts.max_background)
        .u32(opts.max_write)
        .u32(1)
        .u16(max_pages as u16)
        .u16(0)
        .u32((flags >> 32) as u32);
    let len = reply.len() as u32;
    abi::put_out_header(&mut reply, len, 0, h.unique);
    nix::unistd::write(fd, &reply).context("answering FUSE_INIT")?;
    Ok(Negotiated {
        max_payload: (opts.max_write as usize)
            .max(max_pages as usize * 4096)
            .max(8192),
        uring: flags & abi::FUSE_OVER_IO_URING != 0,
    })
}

/// Serves what still arrives over `/dev/fuse` until the connection ends.
fn serve_dev(fd: &OwnedFd, disk: &Disk, max_payload: usize) {
    let mut req = vec![0u8; max_payload + 4096];
    let mut reply = vec![0u8; max_payload + abi::OUT_HEADER];
    loop {
        let n = match nix::unistd::read(fd, &mut req) {
            Ok(n) => n,
            // ENOENT: the request was interrupted and withdrawn before we read it.
            Err(
                nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN | nix::errno::Errno::ENOENT,
            ) => {
                continue;
            }
            Err(nix::errno::Errno::ENODEV) => return,
            Err(e) => {
                warn!("reading /dev/fuse: {e}; its reader stops");
                return;
            }
        };
        let Some(h) = InHeader::parse(&req[..n]) else {
            continue;
        };
        let body = &req[abi::IN_HEADER..n.min(h.len as usize).max(abi::IN_HEADER)];
        let (op_in, rest) = body.split_at(abi::op_in_len(h.opcode).min(body.len()));
        let payload = &mut reply[abi::OUT_HEADER..];
        payload[..rest.len()].copy_from_slice(rest);
        let served = ops::serve(disk, &h, op_in, payload, rest.len());
        let (n, error) = match served.reply {
            ops::Reply::None => continue,
            ops::Reply::Data(n) => (n, 0),
            ops::Reply::Error(errno) => (0, -errno),
        };
        let len = abi::OUT_HEADER + n;
        abi::put_out_header(&mut reply, len as u32, error, h.unique);
        if let Err(e) = nix::unistd::write(fd, &reply[..len])
            && e != nix::errno::Errno::ENOENT
        {
            warn!("replying on /dev/fuse: {e}");
        }
        if served.releases {
            disk.open_files.released();
        }
    }
}

/// CPUs the kernel may ever run on, so FUSE queues: the kernel's `num_possible_cpus`, the
/// weight of the mask in /sys/devices/system/cpu/possible ("0-15", "0,2-3").
fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| parse_cpu_list(s.trim()))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn parse_cpu_list(s: &str) -> Option<usize> {
    let mut n = 0;
    for part in s.split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().ok()?.checked_sub(a.parse().ok()?)? + 1,
            None => part.parse::<usize>().map(|_| 1).ok()?,
        };
    }
    (n > 0).then_some(n)
}

/// Threads per queue and entries per thread for `queues` queues: every queue gets
/// [`URING_THREADS_PER_QUEUE`] threads unless that would take more than [`URING_ENTRIES`]
/// entries in all (many CPUs), and each thread an equal share of the entries.
fn layout(queues: usize) -> (usize, usize) {
    let per_queue = (URING_ENTRIES / queues.max(1)).clamp(1, URING_THREADS_PER_QUEUE);
    let depth = (URING_ENTRIES / (queues.max(1) * per_queue)).clamp(1, URING_MAX_DEPTH);
    (per_queue, depth)
}

// A thread starts with no more entries than it may grow to.
const _: () = assert!(URING_MAX_DEPTH <= crate::tunables::URING_GROW_DEPTH);

/// Pins this thread to `cpu`, whose requests its queue serves; best effort (a CPU that is
/// possible but offline sends nothing anyway).
fn pin_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

impl UringSession {
    /// Mounts on `opts.mountpoint`, negotiates io_uring and registers every queue. On any
    /// failure the mount is gone again and the error says why.
    pub(crate) fn start(disk: Arc<Disk>, opts: &UringOptions) -> Result<UringSession> {
        let fd: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .context("opening /dev/fuse")?
            .into();
        mount(&fd, &opts.mountpoint)?;
        let mut session = UringSession {
            fd: Arc::new(fd),
            mountpoint: opts.mountpoint.clone(),
            threads: Vec::new(),
            queues: possible_cpus(),
            per_queue: 1,
        };
        match session.serve(disk, opts) {
            Ok(()) => Ok(session),
            Err(e) => {
                if let Err(u) = session.unmount_and_join() {
                    warn!("{u:#}");
                    let _ = nix::mount::umount2(&opts.mountpoint, nix::mount::MntFlags::MNT_DETACH);
                }
                Err(e)
            }
        }
    }

    fn serve(&mut self, disk: Arc<Disk>, opts: &UringOptions) -> Result<()> {
        let negotiated = handshake(&self.fd, opts)?;
        let reader = {
            let (fd, disk) = (self.fd.clone(), disk.clone());
            let max_payload = negotiated.max_payload;
            std::thread::Builder::new()
                .name("fuse-dev".into())
                .spawn(move || serve_dev(&fd, &disk, max_payload))
                .context("starting the /dev/fuse thread")?
        };
        self.threads.push(reader);
        if !negotiated.uring {
            bail!("the kernel did not offer FUSE_OVER_IO_URING at INIT");
        }
        let (per_queue, depth) = layout(self.queues);
        self.per_queue = per_queue;
        let polling = Arc::new(super::pacing::PollGate::default());
        let spare = Arc::new(AtomicUsize::new(
            URING_ENTRIES_MAX.saturating_sub(self.queues * per_queue * depth),
        ));
        let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
        let threads = (0..self.queues).flat_map(|q| (0..per_queue).map(move |w| (q, w)));
        let mut queue_free = Arc::new(AtomicUsize::new(0));
        for (qid, worker) in threads {
            if worker == 0 {
                queue_free = Arc::new(AtomicUsize::new(0));
            }
            let mut payloads = Vec::with_capacity(depth);
            for _ in 0..depth {
                let buf = disk
                    .device
                    .buffers()
                    .try_get(negotiated.max_payload)
                    .context("taking a FUSE ring buffer")?
                    .context(
                        "no I/O buffer memory left for the FUSE rings: raise --buffer-memory",
                    )?;
                payloads.push(buf);
            }
            let spec = ring::QueueSpec {
                qid: qid as u16,
                fuse_fd: self.fd.as_raw_fd(),
                payloads,
                busy_poll: opts.busy_poll,
                polling: polling.clone(),
                spare: spare.clone(),
                queue_free: queue_free.clone(),
            };
            let (disk, tx, fd) = (disk.clone(), tx.clone(), self.fd.clone());
            let thread = std::thread::Builder::new()
                .name(format!("fuse-ring-{qid}-{worker}"))
                .spawn(move || {
                    // The first thread stays beside the CPU it serves (its wakeups are
                    // local); the others run where the scheduler finds room, since that
                    // CPU is busy issuing the requests they are there to take over.
                    if worker == 0 {
                        pin_to(qid);
                    }
                    match ring::Queue::register(spec) {
                        Ok(queue) => {
                            let _ = tx.send(Ok(()));
                            queue.run(&disk);
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                    // The descriptor stays open until every queue is done with it.
                    drop(fd);
                })
                .context("starting a FUSE ring thread")?;
            self.threads.push(thread);
        }
        drop(tx);
        for _ in 0..self.queues * per_queue {
            rx.recv()
                .context("a FUSE ring thread ended before registering")??;
            disk.rings
                .entries
                .fetch_add(depth as u64, std::sync::atomic::Ordering::Relaxed);
        }
        info!(
            "FUSE over io_uring: {} queues of {per_queue} threads with {depth} entries \
             each, payloads of {} KiB",
            self.queues,
            negotiated.max_payload >> 10
        );
        Ok(())
    }

    /// Queues: one per possible CPU.
    pub(crate) fn queues(&self) -> usize {
        self.queues
    }

    /// Threads serving each queue.
    pub(crate) fn threads_per_queue(&self) -> usize {
        self.per_queue
    }

    /// Unmounts, which ends the connection, and waits for every thread to finish. Fails,
    /// leaving the threads running, where the unmount does (busy).
    pub(crate) fn unmount_and_join(mut self) -> Result<()> {
        nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty())
            .with_context(|| format!("unmounting {}", self.mountpoint.display()))?;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn possible_cpu_lists_count_every_cpu() {
        assert_eq!(parse_cpu_list("0-1"), Some(2));
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0,2-3,8-15"), Some(11));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
    }

    #[test]
    fn few_cpus_get_several_threads_per_queue_and_many_cpus_no_more_entries() {
        // Few CPUs: every queue gets its threads, each the most entries a thread may have.
        assert_eq!(layout(2), (URING_THREADS_PER_QUEUE, URING_MAX_DEPTH));
        assert_eq!(layout(1), (URING_THREADS_PER_QUEUE, URING_MAX_DEPTH));
        for queues in [1, 2, 3, 4, 8, 16, 31, 32, 33, 64, 65, 256] {
            let (per_queue, depth) = layout(queues);
            assert!(per_queue >= 1 && depth >= 1, "{queues} queues");
            assert!(depth <= URING_MAX_DEPTH, "{queues} queues");
            // Never more entries than before threads were shared (one entry per queue
            // where the CPUs outnumber the entries).
            assert!(
                queues * per_queue * depth <= URING_ENTRIES.max(queues),
                "{queues} queues: {per_queue} x {depth}"
            );
        }
        assert_eq!(layout(64), (1, 1));
    }
}
