//! One thread serving a FUSE-over-io_uring queue: its io_uring, and the entries it lends
//! the kernel.
//!
//! The kernel has one queue per possible CPU and hands a request to the queue of the CPU
//! that issued it, there to any free entry, whichever thread's ring lent it; so the
//! threads of one queue share nothing but its id. Each entry is a header buffer and a
//! payload buffer registered once (REGISTER); the kernel writes a request into them and
//! completes the entry's command; we serve it in place and send one COMMIT_AND_FETCH,
//! which delivers the reply and lends the entry back for the next request. One
//! `io_uring_enter` per batch submits every reply of the batch and waits for the next
//! requests.
//!
//! A thread keeps every READ and WRITE of its entries in flight on the device at once:
//! it begins them together (under a [`Plug`] where there are several, so that their GPU
//! copies go out as one launch), polls them when their waker fires ([`RingWake`]), and
//! commits each as it completes. Serving one at a time, a queue had as many requests in
//! flight as it had entries in threads, four on the H200 machine, whatever the depth the
//! program asked for. Where all of a thread's entries wait on the device, it lends the
//! kernel another ([`crate::tunables::URING_GROW_DEPTH`]).

use super::abi::{self, In, InHeader};
use super::ops::{self, Pending, Reply, Step};
use super::wake::RingWake;
use crate::attach::fuse_disk::{DISK_INO, Disk};
use crate::attach::pacing::PollGate;
use crate::engine::{IoBuf, Plug};
use crate::tunables::URING_GROW_DEPTH;
use anyhow::{Context as _, Result, bail};
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tracing::{debug, warn};

/// What a queue thread needs.
pub(crate) struct QueueSpec {
    /// Queue index: the CPU whose requests it serves.
    pub(crate) qid: u16,
    /// The /dev/fuse descriptor of the connection (kept open by the session).
    pub(crate) fuse_fd: RawFd,
    /// The entries' payload buffers, each at least the kernel's largest payload.
    pub(crate) payloads: Vec<IoBuf>,
    /// How long to poll for the next request after a batch; zero never polls.
    pub(crate) busy_poll: Duration,
    /// At most one queue polls at a time.
    pub(crate) polling: Arc<PollGate>,
    /// Entries every queue's threads may still add between them.
    pub(crate) spare: Arc<AtomicUsize>,
    /// Entries of this queue, all its threads together, lent to the kernel and free for
    /// its next request.
    pub(crate) queue_free: Arc<AtomicUsize>,
}

/// One entry lent to the kernel.
struct Entry {
    header: Box<[u8]>,
    payload: IoBuf,
    /// Where the kernel finds the two buffers on REGISTER (read while it is submitted).
    iov: Box<[libc::iovec; 2]>,
    /// The command last sent for this entry, to send again on EINTR/EAGAIN.
    last_cmd: u32,
    commit_id: u64,
}

// SAFETY: the iovec's pointers point into this entry's own buffers, which move with it;
// an entry is used by one thread at a time.
unsafe impl Send for Entry {}

impl Entry {
    /// An entry to register, with `payload` as its payload buffer.
    fn new(mut payload: IoBuf) -> Entry {
        payload.set_len(payload.capacity());
        let mut header = vec![0u8; abi::RING_HEADER].into_boxed_slice();
        let iov = Box::new([
            libc::iovec {
                iov_base: header.as_mut_ptr().cast(),
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: payload.as_mut_ptr().cast(),
                iov_len: payload.len(),
            },
        ]);
        Entry {
            header,
            payload,
            iov,
            last_cmd: abi::CMD_REGISTER,
            commit_id: 0,
        }
    }
}

/// `struct fuse_uring_cmd_req` in the SQE's 80-byte command area.
fn cmd_req(qid: u16, commit_id: u64) -> [u8; 80] {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    cmd
}

/// The SQE of command `cmd` for the entry at `index`: REGISTER lends the buffers that
/// `iov` describes, COMMIT_AND_FETCH replies to request `commit_id`. User data is `index`.
fn sqe(fd: RawFd, qid: u16, index: usize, cmd: u32, iov: u64, commit_id: u64) -> squeue::Entry128 {
    let op = opcode::UringCmd80::new(types::Fd(fd), cmd);
    let op = if cmd == abi::CMD_REGISTER {
        op.cmd(cmd_req(qid, 0)).addr(Some(iov))
    } else {
        op.cmd(cmd_req(qid, commit_id))
    };
    let sqe = op.build().user_data(index as u64);
    if cmd != abi::CMD_REGISTER {
        return sqe;
    }
    // REGISTER's `len` is the iovec count (2), a field the crate's UringCmd80 cannot set.
    // SAFETY: Entry128 is repr(C): a 64-byte `io_uring_sqe` and 64 bytes of command data,
    // plain bytes with no invalid values; `len` is the u32 at byte 24 of the SQE.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
    // SAFETY: as above, back to the same type.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

/// User data of the ring's read of its [`RingWake`] eventfd (entries are 0, 1, ...).
const WAKE: u64 = u64::MAX;

/// Submission queue size: every entry a thread may grow to, its wake read, and room.
const SQ_SIZE: u32 = (URING_GROW_DEPTH as u32 + 2).next_power_of_two();

/// A queue ready to serve: registered, its thread not yet serving.
pub(crate) struct Queue {
    qid: u16,
    fd: RawFd,
    busy_poll: Duration,
    polling: Arc<PollGate>,
    // Dropped before the buffers it may still name.
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    entries: Vec<Entry>,
    /// Completions that arrived while registering (user data, result), served first.
    early: Vec<(u64, i32)>,
    wake: Arc<RingWake>,
    /// Where the ring's read of the eventfd lands.
    wake_buf: Box<u64>,
    /// Bytes of each payload buffer, for entries added later.
    payload_size: usize,
    spare: Arc<AtomicUsize>,
    queue_free: Arc<AtomicUsize>,
    /// A buffer could not be had: add no more entries.
    grown_out: bool,
}

/// A request of an entry on the device.
struct Flight<'d> {
    pending: Pending<'d>,
    unique: u64,
}

/// What the serving loop keeps count of.
#[derive(Default)]
struct Counts {
    /// Entries not ended: lent to the kernel, or holding a request of ours.
    live: usize,
    /// Entries whose request is on the device.
    in_flight: usize,
    /// RELEASEs whose replies are queued but not yet sent.
    releases: usize,
    /// Whether the ring holds a read of the eventfd.
    wake_armed: bool,
    /// The most requests on the device at once so far.
    most: usize,
}

impl Queue {
    /// Creates the ring and registers every entry; fails where the kernel refuses.
    pub(crate) fn register(spec: QueueSpec) -> Result<Queue> {
        // COOP_TASKRUN: the kernel hands a request to an entry as task work of the thread
        // that lent it, and by default interrupts that thread with an IPI if it is running;
        // this thread enters the kernel often enough by itself (each `sched_yield` of its
        // poll, each `io_uring_enter`, the futex of a GPU wait), and the work runs then. On
        // 2 CPUs, same-run A/B of 4 runs each (fio, MiB/s, median): 4 KiB QD1 read / write
        // 100 / 100 -> 131 / 124, 1 MiB QD32 6472 / 6041 -> 6785 / 6861, 4 KiB QD32 585 /
        // 556 -> 581 / 533 (bench/results/logs/uring-coop-2026-12-04.txt).
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_cqsize(SQ_SIZE * 2)
            .setup_coop_taskrun()
            .build(SQ_SIZE)
            .context("creating an io_uring with 128-byte entries")?;
        let payload_size = spec.payloads.first().map_or(0, IoBuf::capacity);
        let entries: Vec<Entry> = spec.payloads.into_iter().map(Entry::new).collect();
        let mut q = Queue {
            qid: spec.qid,
            fd: spec.fuse_fd,
            busy_poll: spec.busy_poll,
            polling: spec.polling,
            ring,
            entries,
            early: Vec::new(),
            wake: RingWake::new()?,
            wake_buf: Box::new(0),
            payload_size,
            spare: spec.spare,
            queue_free: spec.queue_free,
            grown_out: false,
        };
        for i in 0..q.entries.len() {
            q.push(i)?;
        }
        q.arm_wake()?;
        q.ring
            .submit()
            .context("submitting the FUSE ring registrations")?;
        // The kernel refuses a registration at once, so its error is already here; a
        // success completes only when a request arrives (which may already have happened).
        let done: Vec<(u64, i32)> = q
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        if let Some((_, res)) = done.iter().find(|(_, r)| *r < 0) {
            let e = std::io::Error::from_raw_os_error(-res);
            bail!(
                "the kernel refused FUSE io_uring queue {} ({e}){}",
                q.qid,
                if -res == libc::EOPNOTSUPP {
                    ": is /sys/module/fuse/parameters/enable_uring Y?"
                } else {
                    ""
                }
            );
        }
        q.early = done;
        Ok(q)
    }

    /// Queues entry `i`'s next command.
    fn push(&mut self, i: usize) -> Result<()> {
        let e = &self.entries[i];
        let iov = e.iov.as_ptr() as u64;
        let sqe = sqe(self.fd, self.qid, i, e.last_cmd, iov, e.commit_id);
        // SAFETY: the SQE points at this entry's iovec and buffers, which live as long as
        // the queue; the kernel reads the iovec while the SQE is submitted and keeps the
        // buffers until the connection ends, after which no command of ours is pending.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| anyhow::anyhow!("FUSE ring {}: submission queue full", self.qid))?;
        self.queue_free.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Queues a read of the wake eventfd.
    fn arm_wake(&mut self) -> Result<()> {
        let buf = std::ptr::from_mut::<u64>(&mut self.wake_buf).cast::<u8>();
        let sqe = opcode::Read::new(types::Fd(self.wake.fd()), buf, 8)
            .build()
            .user_data(WAKE)
            .into();
        // SAFETY: the buffer is boxed in the queue, which outlives every read it queues:
        // `run` ends only once the last one has completed.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| anyhow::anyhow!("FUSE ring {}: submission queue full", self.qid))
    }

    /// The request entry `i` holds: its header and payload length, its commit id noted.
    /// `None` where there is none to answer.
    fn request(&mut self, i: usize) -> Option<(InHeader, usize)> {
        let e = &mut self.entries[i];
        let h = InHeader::parse(&e.header[abi::RING_IN_OUT..])?;
        let meta = In(&e.header);
        e.commit_id = meta.u64(abi::RING_COMMIT_ID);
        if e.commit_id == 0 {
            // The kernel would never find our reply; nothing sane can follow.
            warn!("FUSE ring {}: a request without a commit id", self.qid);
            return None;
        }
        Some((h, meta.u32(abi::RING_PAYLOAD_SZ) as usize))
    }

    /// Entry `i`'s payload buffer, for as long as `'d`.
    ///
    /// # Safety
    /// The entry must hold a request (the kernel has handed it to us and waits for our
    /// commit), and what the slice lends must be gone before the commit is queued and
    /// before the queue drops. The buffer never moves: an [`IoBuf`] owns its memory.
    unsafe fn payload<'d>(&mut self, i: usize) -> &'d mut [u8] {
        let p = &mut self.entries[i].payload;
        // SAFETY: the caller's promise; the pointer and length are the buffer's own.
        unsafe { std::slice::from_raw_parts_mut(p.as_mut_ptr(), p.len()) }
    }

    /// Begins entry `i`'s request `h`: answered at once, or on the device.
    fn begin<'d>(&mut self, disk: &'d Disk, i: usize, h: &InHeader, len: usize) -> Step<'d> {
        // SAFETY: entry `i` holds a request; a `Step::Io` lends the payload to its call,
        // which `run` keeps until the call completes and drops it before committing.
        let payload = unsafe { self.payload(i) };
        let op_in = &self.entries[i].header[abi::RING_OP_IN..abi::RING_ENT_IN_OUT];
        ops::begin(disk, h, op_in, payload, len)
    }

    /// Writes entry `i`'s reply to request `unique` and queues its commit.
    fn commit(&mut self, i: usize, unique: u64, reply: Reply, counts: &mut Counts) {
        let e = &mut self.entries[i];
        let (n, error) = match reply {
            Reply::Data(n) => (n, 0),
            Reply::Error(errno) => (0, -errno),
            // Only /dev/fuse carries requests without replies; the ring must commit.
            Reply::None => (0, -libc::ENOSYS),
        };
        abi::put_out_header(
            &mut e.header[abi::RING_IN_OUT..],
            (abi::OUT_HEADER + n) as u32,
            error,
            unique,
        );
        e.header[abi::RING_PAYLOAD_SZ..abi::RING_PAYLOAD_SZ + 4]
            .copy_from_slice(&(n as u32).to_ne_bytes());
        e.last_cmd = abi::CMD_COMMIT_AND_FETCH;
        if let Err(e) = self.push(i) {
            warn!("{e:#}");
            counts.live -= 1;
        }
    }

    /// Polls request `i` on the device; commits it once done.
    fn poll_flight<'d>(
        &mut self,
        disk: &'d Disk,
        flights: &mut [Option<Flight<'d>>],
        i: usize,
        cx: &mut Context<'_>,
        counts: &mut Counts,
    ) {
        let Some(f) = flights[i].as_mut() else {
            return;
        };
        let Poll::Ready(result) = f.pending.io.as_mut().poll(cx) else {
            return;
        };
        let Some(f) = flights[i].take() else {
            return;
        };
        let (then, unique) = (f.pending.then, f.unique);
        // The call, done, lends the payload no more.
        drop(f);
        counts.in_flight -= 1;
        // SAFETY: entry `i` still holds its request; the slice lives for this statement.
        let reply = ops::finish(disk, then, result, unsafe { self.payload(i) });
        self.commit(i, unique, reply, counts);
    }

    /// Handles a batch of completions: entries to send again or ended, and new requests,
    /// whose READs and WRITEs are begun together.
    fn take<'d>(
        &mut self,
        disk: &'d Disk,
        batch: &mut Vec<(u64, i32)>,
        fresh: &mut Vec<(usize, InHeader, usize)>,
        flights: &mut [Option<Flight<'d>>],
        cx: &mut Context<'_>,
        counts: &mut Counts,
    ) {
        for (index, res) in batch.drain(..) {
            if index == WAKE {
                counts.wake_armed = false;
                continue;
            }
            let i = index as usize;
            if i >= self.entries.len() {
                continue;
            }
            // Back from the kernel, with a request or ended.
            self.queue_free.fetch_sub(1, Ordering::Relaxed);
            match -res {
                0 => match self.request(i) {
                    Some((h, len)) => fresh.push((i, h, len)),
                    None => counts.live -= 1,
                },
                libc::EINTR | libc::EAGAIN => {
                    if let Err(e) = self.push(i) {
                        warn!("{e:#}");
                        counts.live -= 1;
                    }
                }
                // The connection ended (unmount) or our ring is going away: the normal end.
                libc::ENOTCONN | libc::ECANCELED | libc::ECONNABORTED => counts.live -= 1,
                errno => {
                    warn!(
                        "FUSE ring {}: the kernel ended an entry: {}",
                        self.qid,
                        std::io::Error::from_raw_os_error(errno)
                    );
                    counts.live -= 1;
                }
            }
        }
        if fresh.is_empty() {
            return;
        }
        let io = |h: &InHeader| h.nodeid == DISK_INO && matches!(h.opcode, abi::READ | abi::WRITE);
        // Several at once: their copies go out together when the plug drops. Alone, a
        // small copy watches for its own completion instead (a few microseconds at QD1).
        let plug = (fresh.iter().filter(|(_, h, _)| io(h)).count() > 1).then(Plug::new);
        for &(i, h, len) in fresh.iter().filter(|(_, h, _)| io(h)) {
            self.start(disk, i, &h, len, flights, cx, counts);
        }
        // Whatever else came waits for nothing the plug holds.
        drop(plug);
        for &(i, h, len) in fresh.iter().filter(|(_, h, _)| !io(h)) {
            self.start(disk, i, &h, len, flights, cx, counts);
        }
        fresh.clear();
    }

    /// Begins entry `i`'s request and polls it once.
    #[allow(clippy::too_many_arguments)]
    fn start<'d>(
        &mut self,
        disk: &'d Disk,
        i: usize,
        h: &InHeader,
        len: usize,
        flights: &mut [Option<Flight<'d>>],
        cx: &mut Context<'_>,
        counts: &mut Counts,
    ) {
        match self.begin(disk, i, h, len) {
            Step::Served(served) => {
                counts.releases += usize::from(served.releases);
                self.commit(i, h.unique, served.reply, counts);
            }
            Step::Io(pending) => {
                flights[i] = Some(Flight {
                    pending,
                    unique: h.unique,
                });
                counts.in_flight += 1;
                if counts.in_flight > counts.most {
                    counts.most = counts.in_flight;
                    disk.rings
                        .most_in_flight
                        .fetch_max(counts.most as u64, Ordering::Relaxed);
                }
                self.poll_flight(disk, flights, i, cx, counts);
            }
        }
    }

    /// Lends the kernel one more entry, where every entry of this thread waits on the
    /// device and the queue has no entry free (so the kernel may be holding requests back:
    /// one program at queue depth 1 keeps the other threads' entries free), and the caps
    /// and the buffer pool allow.
    fn grow(&mut self, disk: &Disk, flights: &mut Vec<Option<Flight<'_>>>, counts: &mut Counts) {
        if self.grown_out
            || counts.in_flight < self.entries.len()
            || self.entries.len() >= URING_GROW_DEPTH
            || self.queue_free.load(Ordering::Relaxed) > 0
        {
            return;
        }
        let taken = self
            .spare
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if taken.is_err() {
            self.grown_out = true;
            return;
        }
        let buf = match disk.device.buffers().try_get(self.payload_size) {
            Ok(Some(buf)) => buf,
            other => {
                if let Err(e) = other {
                    debug!("FUSE ring {}: no buffer for another entry: {e}", self.qid);
                }
                self.spare.fetch_add(1, Ordering::Relaxed);
                self.grown_out = true;
                return;
            }
        };
        self.entries.push(Entry::new(buf));
        flights.push(None);
        match self.push(self.entries.len() - 1) {
            Ok(()) => {
                counts.live += 1;
                disk.rings.entries.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                warn!("{e:#}");
                self.grown_out = true;
            }
        }
    }

    /// Sends the replies queued so far, then polls for a completion for up to `busy_poll`
    /// if no other queue is polling (and [`crate::busy_poll`] allows): at queue depth 1
    /// this saves the wakeup of a thread asleep in `io_uring_enter`.
    fn linger(&mut self) {
        if self.busy_poll.is_zero() {
            return;
        }
        let Some(held) = self.polling.try_hold() else {
            return;
        };
        if let Err(e) = self.ring.submit() {
            warn!("FUSE ring {}: submitting replies: {e}", self.qid);
        }
        let ring = &mut self.ring;
        held.spin_while(self.busy_poll, || ring.completion().is_empty());
    }

    /// Serves requests until every entry has ended (the connection is gone).
    pub(crate) fn run(mut self, disk: &Disk) {
        // Device calls are polled here, outside the runtime's own threads.
        let _runtime = disk.enter();
        let waker = Waker::from(self.wake.clone());
        let mut cx = Context::from_waker(&waker);
        let mut flights: Vec<Option<Flight<'_>>> = Vec::with_capacity(URING_GROW_DEPTH);
        flights.resize_with(self.entries.len(), || None);
        let mut fresh = Vec::with_capacity(URING_GROW_DEPTH);
        let mut counts = Counts {
            live: self.entries.len(),
            wake_armed: true,
            ..Counts::default()
        };
        let mut batch = std::mem::take(&mut self.early);
        loop {
            self.take(
                disk,
                &mut batch,
                &mut fresh,
                &mut flights,
                &mut cx,
                &mut counts,
            );
            if self.wake.take() {
                for i in 0..flights.len() {
                    self.poll_flight(disk, &mut flights, i, &mut cx, &mut counts);
                }
            }
            if counts.live == 0 {
                break;
            }
            if !counts.wake_armed {
                match self.arm_wake() {
                    Ok(()) => counts.wake_armed = true,
                    Err(e) => warn!("{e:#}"),
                }
            }
            if counts.releases > 0 {
                // A RELEASE is counted only once its reply is sent: detach waits for it,
                // then unmounts.
                if let Err(e) = self.ring.submit() {
                    warn!("FUSE ring {}: submitting replies: {e}", self.qid);
                }
                for _ in 0..std::mem::take(&mut counts.releases) {
                    disk.open_files.released();
                }
            }
            if counts.in_flight == 0 {
                self.linger();
            } else {
                self.grow(disk, &mut flights, &mut counts);
            }
            // A call that asked to be polled again (a small copy's short watch), or a
            // wake since: send what is queued and look again without sleeping.
            let result = if self.wake.sleep() {
                let r = self.ring.submit_and_wait(1);
                self.wake.awake();
                r
            } else {
                self.ring.submit()
            };
            match result {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    warn!("FUSE ring {}: {e}; the queue stops", self.qid);
                    break;
                }
            }
            batch.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        }
        // Every call is done or, if the ring failed, waits for its copy as it drops.
        drop(flights);
        self.end_wake(counts.wake_armed);
        debug!("FUSE ring {} ended", self.qid);
    }

    /// Completes the ring's read of the eventfd, if one is queued, so that nothing writes
    /// into the queue's memory after it is gone.
    fn end_wake(&mut self, mut armed: bool) {
        if armed {
            self.wake.ring();
        }
        while armed {
            if self
                .ring
                .submit_and_wait(1)
                .is_err_and(|e| e.raw_os_error() != Some(libc::EINTR))
            {
                // The ring cannot wait: leave its buffer behind rather than free it early.
                std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
                return;
            }
            armed = !self.ring.completion().any(|c| c.user_data() == WAKE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(e: squeue::Entry128) -> [u8; 128] {
        // SAFETY: as in `sqe`: a repr(C) struct of plain bytes.
        unsafe { std::mem::transmute(e) }
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_ne_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn register_and_commit_sqes_have_the_kernels_layout() {
        let b = bytes(sqe(7, 3, 5, abi::CMD_REGISTER, 0x1000, 99));
        assert_eq!(b[0], 46, "IORING_OP_URING_CMD");
        assert_eq!(u32_at(&b, 4), 7, "fd");
        assert_eq!(u32_at(&b, 8), abi::CMD_REGISTER, "cmd_op");
        assert_eq!(u64_at(&b, 16), 0x1000, "addr: the iovec array");
        assert_eq!(u32_at(&b, 24), 2, "len: header and payload");
        assert_eq!(u64_at(&b, 32), 5, "user data: the entry");
        // struct fuse_uring_cmd_req at the command area (byte 48): flags, commit_id, qid.
        assert_eq!(u64_at(&b, 48 + 8), 0, "no commit id on REGISTER");
        assert_eq!(u16::from_ne_bytes([b[48 + 16], b[48 + 17]]), 3, "qid");

        let b = bytes(sqe(7, 3, 5, abi::CMD_COMMIT_AND_FETCH, 0x1000, 99));
        assert_eq!(u32_at(&b, 8), abi::CMD_COMMIT_AND_FETCH);
        assert_eq!(u64_at(&b, 16), 0, "no buffers on commit");
        assert_eq!(u32_at(&b, 24), 0);
        assert_eq!(u64_at(&b, 48 + 8), 99, "commit id");
        assert_eq!(u16::from_ne_bytes([b[48 + 16], b[48 + 17]]), 3);
    }
}
