//! Attach through the kernel's ublk driver (`/dev/ublk-control`, Linux 6.0+).
//!
//! ublk hands block requests straight to the daemon through io_uring commands: no FUSE
//! round trip and no loop device in between. The `libublk` crate speaks the control and
//! queue protocol; it generates its kernel bindings with bindgen at build time and so needs
//! libclang, which is why it sits behind the cargo feature `ublk` (CI builds it; the default
//! build does not need libclang).
//!
//! Each ublk queue gets one thread (started by libublk before the device exists) that owns
//! the queue's I/O buffers and serves its requests one at a time with [`serve_request`]: a
//! request's data is read into, or written from, the buffer the kernel copies the bio
//! to or from, with no copy of our own. Request handling and the device parameters are
//! plain functions of this module, built and tested without the feature; only the glue to
//! libublk needs it.

use crate::engine::{BlockDevice, Capabilities, IoError, ZeroFlags};
use anyhow::{Result, bail};
use std::path::Path;

// From the ublk uapi header (include/uapi/linux/ublk_cmd.h); checked against libublk's
// bindings where the feature is built.
const UBLK_IO_OP_READ: u32 = 0;
const UBLK_IO_OP_WRITE: u32 = 1;
const UBLK_IO_OP_FLUSH: u32 = 2;
const UBLK_IO_OP_DISCARD: u32 = 3;
const UBLK_IO_OP_WRITE_ZEROES: u32 = 5;
const UBLK_IO_F_FUA: u32 = 1 << 13;
const UBLK_IO_F_NOUNMAP: u32 = 1 << 15;
const UBLK_ATTR_READ_ONLY: u32 = 1 << 0;
const UBLK_ATTR_VOLATILE_CACHE: u32 = 1 << 2;
const UBLK_ATTR_FUA: u32 = 1 << 3;

use crate::tunables::{
    UBLK_IO_BUF_BYTES as IO_BUF_BYTES, UBLK_MAX_DISCARD_BYTES as MAX_DISCARD_BYTES,
    UBLK_QUEUE_DEPTH as QUEUE_DEPTH,
};

/// Why ublk cannot be used here, one sentence; `None` where it can.
pub fn unavailable() -> Option<String> {
    why_unavailable(
        Path::new("/dev/ublk-control").exists(),
        cfg!(feature = "ublk"),
    )
}

/// Why ublk does not work here, one sentence, after asking the driver for its features (an
/// io_uring command on `/dev/ublk-control`: it fails where io_uring is switched off, or the
/// driver is older than 6.5); `None` where it answers. This is `auto`'s probe.
pub fn probe() -> Option<String> {
    if let Some(why) = unavailable() {
        return Some(why);
    }
    match imp::driver_features() {
        Some(_) => None,
        None => Some(
            "the ublk driver did not answer a GET_FEATURES command (io_uring disabled, or a \
             kernel before 6.5)"
                .into(),
        ),
    }
}

fn why_unavailable(kernel_has_ublk: bool, built_with_ublk: bool) -> Option<String> {
    if !kernel_has_ublk {
        return Some(
            "this kernel has no ublk driver (/dev/ublk-control missing; 'modprobe ublk_drv' \
             where the module exists): use --via fuse"
                .into(),
        );
    }
    if !built_with_ublk {
        return Some(
            "this vramdisk was built without ublk support: rebuild it with \
             'cargo build --release --features ublk' (needs libclang-dev), or use --via fuse"
                .into(),
        );
    }
    None
}

/// The names of the UBLK_F_* feature bits in `bits`, as the driver reports them
/// (UBLK_U_CMD_GET_FEATURES, Linux 6.5+); unknown bits as `bit N`.
pub fn feature_names(bits: u64) -> Vec<String> {
    const NAMES: [&str; 20] = [
        "SUPPORT_ZERO_COPY",
        "URING_CMD_COMP_IN_TASK",
        "NEED_GET_DATA",
        "USER_RECOVERY",
        "USER_RECOVERY_REISSUE",
        "UNPRIVILEGED_DEV",
        "CMD_IOCTL_ENCODE",
        "USER_COPY",
        "ZONED",
        "USER_RECOVERY_FAIL_IO",
        "UPDATE_SIZE",
        "AUTO_BUF_REG",
        "QUIESCE",
        "PER_IO_DAEMON",
        "BUF_REG_OFF_DAEMON",
        "BATCH_IO",
        "INTEGRITY",
        "SAFE_STOP_DEV",
        "NO_AUTO_PART_SCAN",
        "SHMEM_ZC",
    ];
    (0..64)
        .filter(|b| bits & (1 << b) != 0)
        .map(|b| match NAMES.get(b) {
            Some(n) => (*n).to_string(),
            None => format!("bit {b}"),
        })
        .collect()
}

/// The ublk device's geometry and parameters, derived from the block device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Hardware queues, one serving thread each.
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Largest request in bytes (and each request buffer's size).
    pub io_buf_bytes: u32,
    /// log2 of the logical block size.
    pub logical_bs_shift: u8,
    /// UBLK_ATTR_* bits.
    pub attrs: u32,
    /// Size in 512-byte sectors.
    pub dev_sectors: u64,
    /// Discard and write-zeroes limits, in 512-byte sectors; `None` for a read-only device
    /// or one that can do neither.
    pub discard: Option<DiscardPlan>,
}

/// Discard parameters of a [`Plan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardPlan {
    /// Bytes; discards are aligned to this.
    pub granularity: u32,
    /// Largest discard, in sectors (0: discard not offered).
    pub max_discard_sectors: u32,
    /// Largest write-zeroes, in sectors (0: not offered).
    pub max_write_zeroes_sectors: u32,
}

/// The ublk parameters for a device of `size` bytes with `caps`, served by `threads`
/// queues.
pub fn plan(caps: &Capabilities, size: u64, threads: usize) -> Result<Plan> {
    if size == 0 || !size.is_multiple_of(512) {
        bail!("a ublk device needs a size in whole 512-byte sectors, not {size} bytes");
    }
    // The block layer splits requests to the buffer size; a device that takes less per
    // request would refuse them.
    let io_buf_bytes = IO_BUF_BYTES.min(caps.max_block) / 4096 * 4096;
    if io_buf_bytes == 0 {
        bail!(
            "the device takes at most {} bytes per request, less than a page: use --via fuse",
            caps.max_block
        );
    }
    let mut attrs = 0;
    if caps.read_only {
        attrs |= UBLK_ATTR_READ_ONLY;
    }
    if caps.can_flush {
        attrs |= UBLK_ATTR_VOLATILE_CACHE;
    }
    if caps.can_fua {
        attrs |= UBLK_ATTR_FUA;
    }
    let writable = !caps.read_only;
    let max_sectors = MAX_DISCARD_BYTES >> 9;
    let discard = (writable && (caps.can_trim || caps.can_zero)).then_some(DiscardPlan {
        granularity: 4096,
        max_discard_sectors: if caps.can_trim { max_sectors } else { 0 },
        max_write_zeroes_sectors: if caps.can_zero { max_sectors } else { 0 },
    });
    Ok(Plan {
        queues: threads.clamp(1, 64) as u16,
        depth: QUEUE_DEPTH,
        io_buf_bytes,
        // 4 KiB sectors like the loop device of the FUSE path, where the size allows.
        logical_bs_shift: if size.is_multiple_of(4096) { 12 } else { 9 },
        attrs,
        dev_sectors: size >> 9,
        discard,
    })
}

fn failed(e: &IoError) -> i32 {
    -e.errno()
}

/// Serves one ublk request on `device`: `op_flags`, `start_sector` and `nr_sectors` as in
/// the request's `ublksrv_io_desc` (sectors of 512 bytes whatever the block size), `buf` the
/// request's buffer. Returns what the kernel expects back: bytes transferred for reads and
/// writes, 0 for the other operations, or a negative errno. Never allocates or logs: this
/// is the I/O path of a device that may be swap.
pub fn serve_request(
    device: &dyn BlockDevice,
    runtime: &tokio::runtime::Handle,
    op_flags: u32,
    start_sector: u64,
    nr_sectors: u32,
    buf: &mut [u8],
) -> i32 {
    let op = op_flags & 0xff;
    let fua = op_flags & UBLK_IO_F_FUA != 0;
    // A flush covers no range: the kernel sends it with whatever sector the request had
    // (u64::MAX on 6.12), so it is not bounds-checked.
    if op == UBLK_IO_OP_FLUSH {
        return match super::io_path::complete(runtime, device.flush()) {
            Ok(()) => 0,
            Err(e) => failed(&e),
        };
    }
    let offset = start_sector.saturating_mul(512);
    let len = (nr_sectors as u64) << 9;
    if offset
        .checked_add(len)
        .is_none_or(|end| end > device.size())
    {
        return -libc::EINVAL;
    }
    match op {
        UBLK_IO_OP_READ | UBLK_IO_OP_WRITE => {
            let len = len as usize;
            if len > buf.len() {
                return -libc::EINVAL;
            }
            let r = if op == UBLK_IO_OP_READ {
                super::io_path::complete(runtime, device.read(offset, &mut buf[..len]))
            } else {
                super::io_path::complete(runtime, device.write(offset, &buf[..len], fua))
            };
            match r {
                Ok(()) => len as i32,
                Err(e) => failed(&e),
            }
        }
        UBLK_IO_OP_DISCARD if len > 0 => {
            match super::io_path::complete(runtime, device.trim(offset, len)) {
                Ok(()) => 0,
                Err(e) => failed(&e),
            }
        }
        UBLK_IO_OP_WRITE_ZEROES if len > 0 => {
            // NOUNMAP: the caller wants the range to stay allocated (no trim).
            let flags = ZeroFlags {
                may_trim: op_flags & UBLK_IO_F_NOUNMAP == 0,
                fast: false,
                fua,
            };
            match super::io_path::complete(runtime, device.write_zeroes(offset, len, flags)) {
                Ok(()) => 0,
                Err(e) => failed(&e),
            }
        }
        UBLK_IO_OP_DISCARD | UBLK_IO_OP_WRITE_ZEROES => 0,
        _ => -libc::EOPNOTSUPP,
    }
}

#[cfg(feature = "ublk")]
mod imp {
    use super::{Plan, serve_request};
    use crate::engine::BlockDevice;
    use anyhow::{Context, Result, anyhow, bail};
    use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
    use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
    use libublk::{BufDesc, UblkFlags, UblkIORes, sys};
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    // The constants this module's request handling uses are the kernel's.
    const _: () = {
        assert!(super::UBLK_IO_OP_READ == sys::UBLK_IO_OP_READ);
        assert!(super::UBLK_IO_OP_WRITE == sys::UBLK_IO_OP_WRITE);
        assert!(super::UBLK_IO_OP_FLUSH == sys::UBLK_IO_OP_FLUSH);
        assert!(super::UBLK_IO_OP_DISCARD == sys::UBLK_IO_OP_DISCARD);
        assert!(super::UBLK_IO_OP_WRITE_ZEROES == sys::UBLK_IO_OP_WRITE_ZEROES);
        assert!(super::UBLK_IO_F_FUA == sys::UBLK_IO_F_FUA);
        assert!(super::UBLK_IO_F_NOUNMAP == sys::UBLK_IO_F_NOUNMAP);
        assert!(super::UBLK_ATTR_READ_ONLY == sys::UBLK_ATTR_READ_ONLY);
        assert!(super::UBLK_ATTR_VOLATILE_CACHE == sys::UBLK_ATTR_VOLATILE_CACHE);
        assert!(super::UBLK_ATTR_FUA == sys::UBLK_ATTR_FUA);
    };

    /// A device attached through ublk.
    pub struct Ublk {
        ctrl: Arc<UblkCtrl>,
        id: u32,
        path: PathBuf,
        server: Option<std::thread::JoinHandle<()>>,
        stopped: Arc<AtomicBool>,
    }

    /// Serves queue `qid` of `dev` until the device stops: allocates the queue's request
    /// buffers (locked in RAM by the daemon's mlockall and by libublk), hands them to the
    /// kernel, then serves every request that arrives.
    fn serve_queue(
        qid: u16,
        dev: &UblkDev,
        device: &Arc<dyn BlockDevice>,
        runtime: &tokio::runtime::Handle,
    ) {
        let mut bufs = dev.alloc_queue_io_bufs();
        let queue = match UblkQueue::new(qid, dev)
            .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))))
        {
            Ok(q) => q,
            Err(e) => {
                tracing::error!("ublk queue {qid}: cannot start: {e}");
                return;
            }
        };
        let device = &**device;
        queue.wait_and_handle_io(move |q: &UblkQueue, tag: u16, _io: &UblkIOCtx| {
            let iod = q.get_iod(tag);
            let (op_flags, start, sectors) = (iod.op_flags, iod.start_sector, iod.nr_sectors);
            let buf = bufs[tag as usize].as_mut_slice();
            let res = serve_request(device, runtime, op_flags, start, sectors, buf);
            // Only fails where the buffer is not the one registered for this tag, which
            // cannot happen here: the kernel then fails the request.
            let _ = q.complete_io_cmd_unified(
                tag,
                BufDesc::Slice(bufs[tag as usize].as_slice()),
                Ok(UblkIORes::Result(res)),
            );
        });
    }

    /// After a failed start: stops the device and has the kernel delete it once its last
    /// user closes it, without waiting (a synchronous delete would wait for queue threads
    /// that may never end).
    fn abandon(ctrl: &UblkCtrl) {
        let _ = ctrl.kill_dev();
        let _ = ctrl.del_dev_async();
        ctrl.disown();
    }

    /// The driver's UBLK_F_* feature bits, or `None` where it does not answer.
    pub fn driver_features() -> Option<u64> {
        // On a thread of its own: libublk keeps a control ring per thread, and this one
        // should not stay around in the caller.
        std::thread::spawn(UblkCtrl::get_features)
            .join()
            .ok()
            .flatten()
    }

    /// Gives this thread the io_uring that libublk sends control commands on.
    fn init_ctrl_ring() -> Result<()> {
        libublk::ublk_init_ctrl_task_ring(|ring| {
            if ring.is_none() {
                *ring = Some(
                    io_uring::IoUring::<io_uring::squeue::Entry128>::builder()
                        .build(32)
                        .map_err(libublk::UblkError::IOError)?,
                );
            }
            Ok(())
        })
        .map_err(|e| anyhow!("creating the ublk control ring: {e}"))
    }

    impl Ublk {
        /// Creates a ublk device shaped by `plan`, starts one serving thread per queue
        /// (each with its buffers) and then the device. Returns once `/dev/ublkbN` exists.
        pub fn attach(
            device: Arc<dyn BlockDevice>,
            runtime: tokio::runtime::Handle,
            plan: Plan,
        ) -> Result<Ublk> {
            if let Some(why) = super::unavailable() {
                bail!(why);
            }
            let ctrl = UblkCtrlBuilder::default()
                .name("vramdisk")
                .id(-1)
                .nr_queues(plan.queues)
                .depth(plan.depth)
                .io_buf_bytes(plan.io_buf_bytes)
                .ctrl_flags(0)
                .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV | UblkFlags::UBLK_DEV_F_MLOCK_IO_BUFFER)
                .build()
                .map_err(|e| anyhow!("creating a ublk device: {e}"))?;
            let ctrl = Arc::new(ctrl);
            let id = ctrl.dev_info().dev_id;
            let features = ctrl
                .get_driver_features()
                .map(|f| format!("{f:#x} ({})", super::feature_names(f).join(", ")))
                .unwrap_or_else(|| "not reported".into());
            let mut ops = vec!["read"];
            if plan.attrs & sys::UBLK_ATTR_READ_ONLY == 0 {
                ops.push("write");
            }
            if plan.attrs & sys::UBLK_ATTR_VOLATILE_CACHE != 0 {
                ops.push("flush");
            }
            if plan.attrs & sys::UBLK_ATTR_FUA != 0 {
                ops.push("FUA");
            }
            if plan.discard.is_some_and(|d| d.max_discard_sectors > 0) {
                ops.push("discard");
            }
            if plan.discard.is_some_and(|d| d.max_write_zeroes_sectors > 0) {
                ops.push("write zeroes");
            }
            tracing::info!(
                "ublk: driver features {features}; device {id}: {} queues of depth {}, {} KiB \
                 per request, {}",
                plan.queues,
                plan.depth,
                plan.io_buf_bytes >> 10,
                ops.join(", ")
            );
            let (started_tx, started_rx) = std::sync::mpsc::channel::<Result<PathBuf>>();
            let stopped = Arc::new(AtomicBool::new(false));
            let server = {
                let ctrl = ctrl.clone();
                let stopped = stopped.clone();
                let failed_tx = started_tx.clone();
                std::thread::Builder::new()
                    .name("vramdisk-ublk".into())
                    .spawn(move || {
                        // libublk sends control commands (queue affinity, start) on a
                        // ring of the calling thread; only the thread that built the
                        // controller has one.
                        if let Err(e) = init_ctrl_ring() {
                            let _ = failed_tx.send(Err(e));
                            stopped.store(true, Ordering::Release);
                            return;
                        }
                        let tgt_init = move |dev: &mut UblkDev| {
                            let size = plan.dev_sectors << 9;
                            dev.set_default_params(size);
                            let p = &mut dev.tgt.params;
                            p.basic.attrs = plan.attrs;
                            p.basic.logical_bs_shift = plan.logical_bs_shift;
                            p.basic.physical_bs_shift = 12;
                            p.basic.io_min_shift = 12;
                            p.basic.io_opt_shift = 12;
                            p.basic.max_sectors = plan.io_buf_bytes >> 9;
                            p.basic.dev_sectors = plan.dev_sectors;
                            if let Some(d) = plan.discard {
                                p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
                                p.discard = sys::ublk_param_discard {
                                    discard_alignment: 0,
                                    discard_granularity: d.granularity,
                                    max_discard_sectors: d.max_discard_sectors,
                                    max_write_zeroes_sectors: d.max_write_zeroes_sectors,
                                    max_discard_segments: 1,
                                    reserved0: 0,
                                };
                            }
                            Ok(())
                        };
                        let q_fn =
                            move |qid: u16, dev: &UblkDev| serve_queue(qid, dev, &device, &runtime);
                        let on_started = move |c: &UblkCtrl| {
                            let _ = started_tx.send(Ok(PathBuf::from(c.get_bdev_path())));
                        };
                        if let Err(e) = ctrl.run_target(tgt_init, q_fn, on_started) {
                            let _ = failed_tx.send(Err(anyhow!("starting the ublk device: {e}")));
                        }
                        stopped.store(true, Ordering::Release);
                    })
                    .context("starting the ublk thread")?
            };
            // On failure the queue threads may be blocked for good (a queue that never
            // fetched keeps START_DEV waiting), so nothing here waits for them: the device
            // is stopped and deleted asynchronously, and the caller ends the process.
            let path = match started_rx.recv_timeout(Duration::from_secs(60)) {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    abandon(&ctrl);
                    return Err(e);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    abandon(&ctrl);
                    bail!("the ublk device did not start within 60 s");
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    abandon(&ctrl);
                    bail!("the ublk thread died while starting the device (see the log above)");
                }
            };
            Ok(Ublk {
                ctrl,
                id,
                path,
                server: Some(server),
                stopped,
            })
        }

        /// `/dev/ublkbN`.
        pub fn device_path(&self) -> &Path {
            &self.path
        }

        /// The N of `/dev/ublkbN`.
        pub fn id(&self) -> u32 {
            self.id
        }

        /// Whether the device is still served (someone may have deleted it with a ublk
        /// tool, which stops its queues).
        pub fn is_intact(&self) -> bool {
            !self.stopped.load(Ordering::Acquire)
        }

        /// Stops the device (its users get I/O errors from then on), waits for the queue
        /// threads, and deletes it.
        pub fn detach(&mut self) -> Result<()> {
            // ENOENT or the like: the device is already gone, which is what we want.
            let _ = self.ctrl.kill_dev();
            if let Some(t) = self.server.take() {
                let start = std::time::Instant::now();
                while !t.is_finished() && start.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if t.is_finished() {
                    let _ = t.join();
                } else {
                    tracing::warn!("ublk queues of {} did not stop", self.path.display());
                }
            }
            delete(self.ctrl.clone(), self.id)
        }
    }

    /// Deletes ublk device `id`. DEL_DEV_ASYNC returns at once; on kernels without it the
    /// plain DEL_DEV waits until nobody holds the disk open, which a forced detach
    /// of a mounted device would make forever, so that one gets a few seconds and is left
    /// to finish on its own.
    fn delete(ctrl: Arc<UblkCtrl>, id: u32) -> Result<()> {
        if ctrl.del_dev_async().is_ok() {
            return Ok(());
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(ctrl.del_dev());
        });
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) if !Path::new(&format!("/dev/ublkc{id}")).exists() => Ok(()),
            Ok(Err(e)) => Err(anyhow!("deleting ublk device {id}: {e}")),
            Err(_) => {
                tracing::warn!(
                    "ublk device {id} is still held open; the kernel deletes it once it is \
                     closed"
                );
                Ok(())
            }
        }
    }

    /// After a daemon died: deletes the ublk device `id` it left (its queues are dead, so
    /// its I/O already fails), freeing the id.
    pub fn delete_stale(id: u32) -> Result<()> {
        if !Path::new(&format!("/dev/ublkc{id}")).exists() {
            return Ok(());
        }
        let ctrl = UblkCtrl::new_simple(id as i32)
            .map_err(|e| anyhow!("opening ublk device {id}: {e}"))?;
        delete(Arc::new(ctrl), id)
    }
}

#[cfg(not(feature = "ublk"))]
mod imp {
    use super::Plan;
    use crate::engine::BlockDevice;
    use anyhow::{Result, bail};
    use std::path::Path;
    use std::sync::Arc;

    /// A device attached through ublk; this build has none (see [`super::unavailable`]).
    pub enum Ublk {}

    impl Ublk {
        /// Fails with the sentence of [`super::unavailable`].
        pub fn attach(
            _device: Arc<dyn BlockDevice>,
            _runtime: tokio::runtime::Handle,
            _plan: Plan,
        ) -> Result<Ublk> {
            bail!(super::unavailable().unwrap_or_default())
        }

        /// `/dev/ublkbN`.
        pub fn device_path(&self) -> &Path {
            match *self {}
        }

        /// The N of `/dev/ublkbN`.
        pub fn id(&self) -> u32 {
            match *self {}
        }

        /// Whether the device is still served.
        pub fn is_intact(&self) -> bool {
            match *self {}
        }

        /// Stops and deletes the device.
        pub fn detach(&mut self) -> Result<()> {
            match *self {}
        }
    }

    /// The driver's features: none without ublk support in the build.
    pub fn driver_features() -> Option<u64> {
        None
    }

    /// After a daemon died: deletes the ublk device it left. A build without ublk cannot
    /// have made one, but another build's daemon may have.
    pub fn delete_stale(id: u32) -> Result<()> {
        if Path::new(&format!("/dev/ublkc{id}")).exists() {
            bail!(
                "ublk device {id} was left by a dead daemon, and this vramdisk was built \
                 without ublk support: delete it with a build that has it ('--features ublk')"
            );
        }
        Ok(())
    }
}

pub use imp::{Ublk, delete_stale};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::host::HostBackend;
    use crate::engine::{SparseDevice, SparseOptions};
    use std::sync::Arc;

    #[test]
    fn feature_bits_have_names() {
        assert!(feature_names(0).is_empty());
        assert_eq!(
            feature_names(0b1000_0010),
            ["URING_CMD_COMP_IN_TASK", "USER_COPY"]
        );
        assert_eq!(feature_names(1 << 40), ["bit 40"]);
    }

    #[test]
    fn says_why_or_works() {
        let no_kernel = why_unavailable(false, true).unwrap();
        assert!(
            no_kernel.contains("/dev/ublk-control missing"),
            "{no_kernel}"
        );
        assert!(no_kernel.contains("--via fuse"), "{no_kernel}");
        assert_eq!(why_unavailable(false, false), Some(no_kernel));
        // One sentence saying how to get it.
        let no_build = why_unavailable(true, false).unwrap();
        assert!(no_build.contains("--features ublk"), "{no_build}");
        assert!(no_build.contains("libclang-dev"), "{no_build}");
        assert!(no_build.contains("--via fuse"), "{no_build}");
        assert_eq!(no_build.matches(". ").count(), 0, "{no_build}");
        assert_eq!(why_unavailable(true, true), None);
        // And here, what this machine and build give.
        assert_eq!(
            unavailable(),
            why_unavailable(
                Path::new("/dev/ublk-control").exists(),
                cfg!(feature = "ublk")
            )
        );
    }

    fn caps() -> Capabilities {
        Capabilities {
            read_only: false,
            can_flush: true,
            can_fua: true,
            can_trim: true,
            can_zero: true,
            can_fast_zero: true,
            can_multi_conn: true,
            can_cache: true,
            can_extents: true,
            min_block: 1,
            preferred_block: 4096,
            max_block: 32 << 20,
        }
    }

    #[test]
    fn plan_follows_the_device() {
        let p = plan(&caps(), 16 << 30, 4).unwrap();
        assert_eq!(p.queues, 4);
        assert_eq!(p.depth, QUEUE_DEPTH);
        assert_eq!(p.io_buf_bytes, 512 << 10);
        assert_eq!(p.logical_bs_shift, 12);
        assert_eq!(p.dev_sectors, (16u64 << 30) / 512);
        assert_eq!(
            p.attrs,
            UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA,
            "writable, flush and FUA"
        );
        let d = p.discard.unwrap();
        assert_eq!(d.granularity, 4096);
        assert_eq!(d.max_discard_sectors, (1 << 30) / 512);
        assert_eq!(d.max_write_zeroes_sectors, (1 << 30) / 512);

        // Read-only: the attribute, and no discard or write zeroes.
        let ro = Capabilities {
            read_only: true,
            ..caps()
        };
        let p = plan(&ro, 1 << 20, 1).unwrap();
        assert_eq!(p.attrs & UBLK_ATTR_READ_ONLY, UBLK_ATTR_READ_ONLY);
        assert_eq!(p.discard, None);

        // A size that is not a multiple of 4 KiB gets 512-byte sectors; a device that takes
        // small requests gets small buffers; nonsense is refused.
        let small = Capabilities {
            max_block: 64 << 10,
            can_trim: false,
            ..caps()
        };
        let p = plan(&small, (1 << 20) + 512, 0).unwrap();
        assert_eq!(p.logical_bs_shift, 9);
        assert_eq!(p.io_buf_bytes, 64 << 10);
        assert_eq!(p.queues, 1);
        assert_eq!(p.discard.unwrap().max_discard_sectors, 0);
        assert!(plan(&caps(), 1000, 1).is_err());
        let tiny = Capabilities {
            max_block: 512,
            ..caps()
        };
        assert!(plan(&tiny, 1 << 20, 1).is_err());
    }

    fn device(size: u64, read_only: bool) -> Arc<dyn BlockDevice> {
        let mut o = SparseOptions::new(size);
        o.buffer_limit = 64 << 20;
        o.read_only = read_only;
        Arc::new(SparseDevice::new(HostBackend::new(), o).unwrap())
    }

    /// What a ublk queue thread does per request, driven the way the kernel fills
    /// `ublksrv_io_desc`: 512-byte sectors, the op in the low byte, flags above.
    #[test]
    fn requests_are_served_like_the_kernel_sends_them() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let h = rt.handle();
        let dev = device(8 << 20, false);
        let mut buf = vec![0u8; IO_BUF_BYTES as usize];
        let data: Vec<u8> = (0..64 << 10).map(|i| (i * 7 % 251) as u8).collect();

        // Write 64 KiB at 1 MiB with FUA, read it back.
        buf[..data.len()].copy_from_slice(&data);
        let r = serve_request(
            &*dev,
            h,
            UBLK_IO_OP_WRITE | UBLK_IO_F_FUA,
            2048,
            128,
            &mut buf,
        );
        assert_eq!(r, 64 << 10);
        buf.fill(0xee);
        assert_eq!(
            serve_request(&*dev, h, UBLK_IO_OP_READ, 2048, 128, &mut buf),
            64 << 10
        );
        assert_eq!(buf[..data.len()], data[..]);
        assert!(dev.stats().allocated > 0);

        assert_eq!(serve_request(&*dev, h, UBLK_IO_OP_FLUSH, 0, 0, &mut buf), 0);
        // As the 6.12 kernel sends a flush: no range, start sector u64::MAX.
        assert_eq!(
            serve_request(&*dev, h, UBLK_IO_OP_FLUSH, u64::MAX, 0, &mut buf),
            0
        );

        // Discard the first 4 KiB of it: zeros there, the rest intact.
        assert_eq!(
            serve_request(&*dev, h, UBLK_IO_OP_DISCARD, 2048, 8, &mut buf),
            0
        );
        serve_request(&*dev, h, UBLK_IO_OP_READ, 2048, 16, &mut buf);
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert_eq!(buf[4096..8192], data[4096..8192]);

        // Write zeroes, with and without NOUNMAP.
        for flags in [0, UBLK_IO_F_NOUNMAP] {
            let r = serve_request(
                &*dev,
                h,
                UBLK_IO_OP_WRITE_ZEROES | flags,
                2048 + 8,
                8,
                &mut buf,
            );
            assert_eq!(r, 0);
            serve_request(&*dev, h, UBLK_IO_OP_READ, 2048 + 8, 16, &mut buf);
            assert!(buf[..4096].iter().all(|&b| b == 0));
            assert_eq!(buf[4096..8192], data[8192..12288]);
        }

        // Discarding everything gives the memory back.
        let all = ((8u64 << 20) >> 9) as u32;
        assert_eq!(
            serve_request(&*dev, h, UBLK_IO_OP_DISCARD, 0, all, &mut buf),
            0
        );
        assert_eq!(dev.stats().allocated, 0);

        // Past the end, larger than the buffer, or an unknown op: errors, not panics.
        let end = (8u64 << 20) >> 9;
        assert_eq!(
            serve_request(&*dev, h, UBLK_IO_OP_READ, end - 4, 8, &mut buf),
            -libc::EINVAL
        );
        assert_eq!(
            serve_request(&*dev, h, UBLK_IO_OP_READ, u64::MAX / 256, 8, &mut buf),
            -libc::EINVAL
        );
        let too_big = (IO_BUF_BYTES >> 9) + 8;
        assert_eq!(
            serve_request(&*dev, h, UBLK_IO_OP_WRITE, 0, too_big, &mut buf),
            -libc::EINVAL
        );
        assert_eq!(
            serve_request(&*dev, h, 4 /* WRITE_SAME */, 0, 8, &mut buf),
            -libc::EOPNOTSUPP
        );
    }

    #[test]
    fn device_errors_become_negative_errnos() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dev = device(1 << 20, true);
        let mut buf = vec![0u8; 8192];
        let r = serve_request(&*dev, rt.handle(), UBLK_IO_OP_WRITE, 0, 8, &mut buf);
        assert_eq!(r, -libc::EPERM, "a write to a read-only device");
        // Reads of a read-only device work (and read zeros: nothing was written).
        buf.fill(1);
        let r = serve_request(&*dev, rt.handle(), UBLK_IO_OP_READ, 0, 16, &mut buf);
        assert_eq!(r, 8192);
        assert!(buf.iter().all(|&b| b == 0));
    }
}
