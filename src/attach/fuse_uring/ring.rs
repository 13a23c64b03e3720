//! One thread serving a FUSE-over-io_uring queue: its io_uring, and the entries it lends
//! the kernel.
//!
//! The kernel has one queue per possible CPU and hands a request to the queue of the CPU
//! that issued it, there to any free entry, whichever thread's ring lent it; so the
//! threads of one queue share nothing but its id. Each entry is a header buffer and a payload buffer registered once
//! (REGISTER); the kernel writes a request into them and completes the entry's command;
//! we serve it in place and send one COMMIT_AND_FETCH, which delivers the reply and lends
//! the entry back for the next request. One `io_uring_enter` per batch submits every
//! reply of the batch and waits for the next requests.

use super::abi::{self, In, InHeader};
use super::ops::{self, Reply};
use crate::attach::fuse_disk::Disk;
use crate::attach::pacing::PollGate;
use crate::engine::IoBuf;
use anyhow::{Context, Result, bail};
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use std::os::fd::RawFd;
use std::sync::Arc;
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

/// A queue ready to serve: registered, its thread not yet serving.
pub(crate) struct Queue {
    qid: u16,
    fd: RawFd,
    busy_poll: Duration,
    polling: Arc<PollGate>,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    entries: Vec<Entry>,
    /// Completions that arrived while registering (user data, result), served first.
    early: Vec<(u64, i32)>,
}

/// What one completion asks of the queue.
enum Next {
    /// Send this entry's command again (EINTR, EAGAIN).
    Again,
    /// A request was served: commit it; `releases` as in [`ops::Served`].
    Commit { releases: bool },
    /// The entry is finished (the connection ended, or the kernel refused it).
    Ended,
}

impl Queue {
    /// Creates the ring and registers every entry; fails where the kernel refuses.
    pub(crate) fn register(spec: QueueSpec) -> Result<Queue> {
        let depth = spec.payloads.len() as u32;
        // COOP_TASKRUN: the kernel hands a request to an entry as task work of the thread
        // that lent it, and by default interrupts that thread with an IPI if it is running;
        // this thread enters the kernel often enough by itself (each `sched_yield` of its
        // poll, each `io_uring_enter`, the futex of a GPU wait), and the work runs then. On
        // 2 CPUs, same-run A/B of 4 runs each (fio, MiB/s, median): 4 KiB QD1 read / write
        // 100 / 100 -> 131 / 124, 1 MiB QD32 6472 / 6041 -> 6785 / 6861, 4 KiB QD32 585 /
        // 556 -> 581 / 533 (bench/results/logs/uring-coop-2026-12-04.txt).
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_cqsize(depth * 2)
            .setup_coop_taskrun()
            .build(depth)
            .context("creating an io_uring with 128-byte entries")?;
        let entries: Vec<Entry> = spec
            .payloads
            .into_iter()
            .map(|mut payload| {
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
            })
            .collect();
        let mut q = Queue {
            qid: spec.qid,
            fd: spec.fuse_fd,
            busy_poll: spec.busy_poll,
            polling: spec.polling,
            ring,
            entries,
            early: Vec::new(),
        };
        for i in 0..q.entries.len() {
            q.push(i)?;
        }
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
            .map_err(|_| anyhow::anyhow!("FUSE ring {}: submission queue full", self.qid))
    }

    /// Serves the request entry `i` holds and prepares its reply in place.
    fn serve(&mut self, disk: &Disk, i: usize) -> Next {
        let e = &mut self.entries[i];
        let Some(h) = InHeader::parse(&e.header[abi::RING_IN_OUT..]) else {
            return Next::Ended;
        };
        let meta = In(&e.header);
        e.commit_id = meta.u64(abi::RING_COMMIT_ID);
        if e.commit_id == 0 {
            // The kernel would never find our reply; nothing sane can follow.
            warn!("FUSE ring {}: a request without a commit id", self.qid);
            return Next::Ended;
        }
        let payload_len = meta.u32(abi::RING_PAYLOAD_SZ) as usize;
        let op_in = &e.header[abi::RING_OP_IN..abi::RING_ENT_IN_OUT];
        let served = ops::serve(disk, &h, op_in, &mut e.payload[..], payload_len);
        let (n, error) = match served.reply {
            Reply::Data(n) => (n, 0),
            Reply::Error(errno) => (0, -errno),
            // Only /dev/fuse carries requests without replies; the ring must commit.
            Reply::None => (0, -libc::ENOSYS),
        };
        abi::put_out_header(
            &mut e.header[abi::RING_IN_OUT..],
            (abi::OUT_HEADER + n) as u32,
            error,
            h.unique,
        );
        e.header[abi::RING_PAYLOAD_SZ..abi::RING_PAYLOAD_SZ + 4]
            .copy_from_slice(&(n as u32).to_ne_bytes());
        e.last_cmd = abi::CMD_COMMIT_AND_FETCH;
        Next::Commit {
            releases: served.releases,
        }
    }

    /// What to do with entry `index`'s completion `res`.
    fn complete(&mut self, disk: &Disk, index: u64, res: i32) -> Next {
        let i = index as usize;
        if i >= self.entries.len() {
            return Next::Ended;
        }
        match -res {
            0 => self.serve(disk, i),
            libc::EINTR | libc::EAGAIN => Next::Again,
            // The connection ended (unmount) or our ring is going away: the normal end.
            libc::ENOTCONN | libc::ECANCELED | libc::ECONNABORTED => Next::Ended,
            errno => {
                warn!(
                    "FUSE ring {}: the kernel ended an entry: {}",
                    self.qid,
                    std::io::Error::from_raw_os_error(errno)
                );
                Next::Ended
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
        let mut live = self.entries.len();
        let mut batch = std::mem::take(&mut self.early);
        let mut releases = 0usize;
        loop {
            for (index, res) in batch.drain(..) {
                match self.complete(disk, index, res) {
                    Next::Again => {}
                    Next::Commit { releases: r } => releases += usize::from(r),
                    Next::Ended => {
                        live -= 1;
                        continue;
                    }
                }
                if let Err(e) = self.push(index as usize) {
                    warn!("{e:#}");
                    live -= 1;
                }
            }
            if live == 0 {
                break;
            }
            if releases > 0 {
                // A RELEASE is counted only once its reply is sent: detach waits for it,
                // then unmounts.
                if let Err(e) = self.ring.submit() {
                    warn!("FUSE ring {}: submitting replies: {e}", self.qid);
                }
                for _ in 0..std::mem::take(&mut releases) {
                    disk.open_files.released();
                }
            }
            self.linger();
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    warn!("FUSE ring {}: {e}; the queue stops", self.qid);
                    break;
                }
            }
            batch.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        }
        debug!("FUSE ring {} ended", self.qid);
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
