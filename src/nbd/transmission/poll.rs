//! Busy polling of a connection's socket before the reader sleeps in the reactor (see
//! [`Poller`]), and the per-thread connection count that decides where polling may run.

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::local_ops::Watch;
use crate::busy_poll::{Misses, cpu_to_spare, spun};
use crate::tunables::{AHEAD_WAITS, WARM_BUDGETS};

/// Busy polling: the reader waits for a client's next request by polling the socket for
/// up to `budget` before it sleeps in the reactor.
///
/// A sleeping reader hands its CPU back, and the client's next request has to wake it.
/// When that CPU has nothing else to run it goes idle, and waking an idle CPU is the
/// slowest part of a small request: on a VM whose idle vCPUs halt at once (no guest halt
/// polling, as on the development machine) it costs about 35 µs, against a few µs to serve
/// a 4 KiB request from RAM. A client at queue depth 1 answers within a few µs of its
/// reply, so a short poll catches its next request with no wakeup at all. This is what
/// the kernel's `busy_poll` and a guest's halt polling do; it is done here because neither
/// reaches a loopback or Unix socket, and neither is on by default.
///
/// The poll is only worth its CPU while the client keeps the connection busy, so it runs
/// only after a short wait (`warm`): an idle client costs one budget at the end of a burst,
/// then nothing. It never runs while this connection has operations waiting elsewhere (a
/// GPU copy: their completions need this thread), and only on a server connection thread
/// that serves this connection alone (polling would hold the others up).
///
/// Over TCP, on a machine with no CPU to spare, nor does it run while the client sends ahead
/// of the replies (queue depth above one): a poll then finds the next request already
/// there, at its first try, and hands it over at once, one request per read and one reply
/// per write, and each TCP read and write on loopback is costly. A wait in the reactor lets
/// a few requests gather, which the server then reads, and answers, with one system call
/// each. So over TCP a poll that finds a request at once turns polling off for the next
/// `AHEAD_WAITS` waits, after which one poll looks again; at queue depth one a first try
/// never finds the next request. Measured on the development machine (2 vCPUs, both sides
/// short of CPU), 4 KiB I/O, one connection: TCP randwrite at queue depth 16 and 64 from
/// 188k and 182k IOPS to 201k and 198k, randread from 180k and 174k to 192k and 183k, queue
/// depth one unchanged. Over a Unix socket, reads and writes are cheap and the reactor's
/// wakeups are not: randwrite at queue depth 16 fell from 217k to 195k, so Unix sockets keep
/// polling. With CPUs to spare the gain turns into a loss: on the H100 machine (16 CPUs,
/// qemu-img bench), 4 KiB writes at queue depth 32 over TCP gave 81k and 89k IOPS polling
/// on, 73k and 75k stepping aside. So the signal is the machine's idle CPU (see
/// [`crate::busy_poll`]), not its CPU count.
///
/// Polls that keep coming back empty, and a machine with no idle CPU, turn spinning off by
/// themselves ([`crate::busy_poll`]): then a poll makes its one try, which costs what the
/// reactor's own read would.
pub(crate) struct Poller {
    budget: Duration,
    /// Whether polling stops while the client sends ahead (TCP) and CPU is short.
    steps_aside: bool,
    /// The previous wait was short: the client is in a tight request loop.
    warm: bool,
    /// Waits left to go through the reactor, since a poll found the client ahead.
    ahead: u32,
    /// Empty polls, which rest polling.
    misses: Misses,
    /// Whether a poll may spin; [`cpu_to_spare`] but for tests.
    spare: fn() -> bool,
    stats: PollStats,
}

/// What a connection's polls did, for its summary (and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PollStats {
    /// Waits for the next request that polled.
    pub polls: u64,
    /// Of those, polls whose first try found bytes.
    pub first_try: u64,
    /// Polls that found bytes after spinning.
    pub caught: u64,
    /// Polls that spun out their budget and found nothing.
    pub empty: u64,
    /// Polls that did not spin because the machine had no CPU to spare.
    pub no_spare: u64,
    /// Waits that polled while operations of the connection were in flight (not counted
    /// above: they watch the GPU as much as the client).
    pub with_ops: u64,
}

impl Poller {
    pub(super) fn new(budget: Duration, steps_aside: bool) -> Self {
        Poller {
            budget,
            steps_aside,
            warm: true,
            ahead: 0,
            misses: Misses::default(),
            spare: cpu_to_spare,
            stats: PollStats::default(),
        }
    }

    /// What the polls did so far.
    pub(super) fn stats(&self) -> PollStats {
        self.stats
    }

    /// Polls `fd` into `buf` for up to the budget. `None`: nothing came (or polling is
    /// off, or the client is sending ahead), wait in the reactor. `next_request`: the wait
    /// is for the client's next request, not for the rest of one it is sending (which a
    /// client may send in two writes, header and payload, at any queue depth).
    pub(super) fn poll(
        &mut self,
        fd: BorrowedFd<'_>,
        buf: &mut [u8],
        next_request: bool,
    ) -> Option<io::Result<usize>> {
        if !self.warm {
            return None;
        }
        if !next_request {
            return self.poll_now(fd, buf);
        }
        if self.ahead > 0 {
            self.ahead -= 1;
            return None;
        }
        if self.budget.is_zero() || !self.misses.may_poll() {
            return None;
        }
        let spare = (self.spare)();
        self.stats.polls += 1;
        match self.poll_for(fd, buf, spare) {
            None => {
                if spare {
                    self.stats.empty += 1;
                    self.misses.record(false);
                } else {
                    self.stats.no_spare += 1;
                }
                None
            }
            Some((r, first_try)) => {
                self.misses.record(true);
                if first_try {
                    self.stats.first_try += 1;
                    if self.steps_aside && !spare {
                        self.ahead = AHEAD_WAITS;
                    }
                } else {
                    self.stats.caught += 1;
                }
                Some(r)
            }
        }
    }

    /// Polls `fd` into `buf` while operations of this connection are in flight (GPU copies,
    /// see [`super::local_ops`]): for up to the budget, until bytes come or an operation
    /// completes (`None`: wait in the reactor, or drive the operations). The client's pace
    /// does not matter here, the GPU's does: a copy comes back within µs, sooner than a
    /// wake-up of this thread would.
    pub(super) fn poll_with_ops(
        &mut self,
        fd: BorrowedFd<'_>,
        buf: &mut [u8],
        ops: Watch<'_>,
    ) -> Option<io::Result<usize>> {
        if self.budget.is_zero() {
            return None;
        }
        let spin = ops.spinning();
        let ready = spin.any_ready();
        if ready.load(Ordering::SeqCst) {
            return None;
        }
        let spare = (self.spare)();
        let start = Instant::now();
        let mut first_try = true;
        let found = loop {
            match recv(fd.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => break Some(Ok(n)),
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                Err(e) => break Some(Err(e.into())),
            }
            first_try = false;
            if !spare || ready.load(Ordering::SeqCst) || start.elapsed() >= self.budget {
                break None;
            }
            std::thread::yield_now();
        };
        drop(spin);
        if !first_try && spare {
            spun(start.elapsed());
        }
        self.stats.with_ops += 1;
        found
    }

    /// Whether polling is on at all (a budget of zero turns it off).
    pub(super) fn is_on(&self) -> bool {
        !self.budget.is_zero()
    }

    /// Notes how long the last wait for the client took: polling goes on only while the
    /// waits are short (see [`WARM_BUDGETS`]).
    pub(super) fn waited(&mut self, elapsed: Duration) {
        self.warm = elapsed <= WARM_BUDGETS * self.budget;
    }

    /// Like [`Poller::poll`], whether or not the client was quick last time: for the rest
    /// of a payload the client is already sending.
    pub(super) fn poll_now(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> Option<io::Result<usize>> {
        if self.budget.is_zero() {
            return None;
        }
        self.poll_for(fd, buf, (self.spare)()).map(|(r, _)| r)
    }

    /// The poll itself, spinning for up to the budget if `spin`, else one try; with the
    /// result, whether the first try found bytes.
    fn poll_for(
        &self,
        fd: BorrowedFd<'_>,
        buf: &mut [u8],
        spin: bool,
    ) -> Option<(io::Result<usize>, bool)> {
        let start = Instant::now();
        let mut first_try = true;
        let found = loop {
            // The reactor is not asked: its readiness flag only changes when this thread
            // goes back to it, which is what polling avoids. Edge-triggered epoll copes
            // with bytes taken behind its back: it sees a spurious wakeup, at worst.
            match recv(fd.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => break Some((Ok(n), first_try)),
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                Err(e) => break Some((Err(e.into()), first_try)),
            }
            first_try = false;
            if !spin || start.elapsed() >= self.budget {
                break None;
            }
            // If the client runs on this CPU, let it.
            std::thread::yield_now();
        };
        if !first_try && spin {
            spun(start.elapsed());
        }
        found
    }
}

thread_local! {
    /// On a server connection thread (`server::Workers`), the count of connections it
    /// serves; elsewhere (tests, the kernel nbd attach) none, and nothing polls.
    static THREAD_LOAD: std::cell::OnceCell<Arc<AtomicUsize>> = const { std::cell::OnceCell::new() };
}

/// Makes `load` the connection count of this thread, which serves connections from start to
/// end on a single-threaded runtime. Called once by each server connection thread.
pub(crate) fn set_thread_load(load: Arc<AtomicUsize>) {
    THREAD_LOAD.with(|l| {
        let _ = l.set(load);
    });
}

/// This thread is a server connection thread serving exactly one connection.
pub(super) fn alone_on_thread() -> bool {
    THREAD_LOAD.with(|l| l.get().is_some_and(|c| c.load(Ordering::Relaxed) == 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    /// A budget no loaded test machine runs out of while a sender thread gets to write: a
    /// poll returns as soon as the bytes are there, so only a poll that finds nothing waits
    /// this long.
    const LONG: Duration = Duration::from_secs(20);

    fn poller(budget: Duration, steps_aside: bool, spare: bool) -> Poller {
        let mut p = Poller::new(budget, steps_aside);
        p.spare = if spare { || true } else { || false };
        p
    }

    /// A poll catches bytes that come while it spins; with no CPU to spare it makes one try
    /// and leaves the wait to the reactor.
    #[test]
    fn a_poll_catches_a_late_request_only_with_cpu_to_spare() {
        let (client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut buf = [0u8; 64];
        let mut p = poller(LONG, true, true);
        let mut c = client.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            c.write_all(b"late").unwrap();
        });
        let t = Instant::now();
        assert_eq!(p.poll(server.as_fd(), &mut buf, true).unwrap().unwrap(), 4);
        assert!(t.elapsed() < LONG, "the poll returned when the bytes came");
        sender.join().unwrap();
        let st = p.stats();
        // Almost always caught while spinning; a poll that starts late finds them at once.
        assert_eq!(
            (st.polls, st.caught + st.first_try, st.empty),
            (1, 1, 0),
            "{st:?}"
        );
        assert_eq!(p.ahead, 0, "a poll that waited keeps polling");

        // No CPU to spare: one try, nothing there, no spinning (the budget is long).
        let mut p = poller(LONG, true, false);
        let t = Instant::now();
        assert!(p.poll(server.as_fd(), &mut buf, true).is_none());
        assert!(t.elapsed() < LONG);
        assert_eq!(p.stats().no_spare, 1);
        assert!(!p.misses.is_resting(), "a single try is no empty poll");
    }

    /// Over TCP with no CPU to spare, a poll that finds the client's bytes at its first try
    /// leaves the next `AHEAD_WAITS` waits to the reactor; with CPU to spare, and over Unix
    /// sockets, polling goes on.
    #[test]
    fn poller_steps_aside_for_a_client_that_sends_ahead() {
        let (mut client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut buf = [0u8; 64];
        let mut p = poller(LONG, true, false);
        client.write_all(b"early").unwrap();
        assert_eq!(p.poll(server.as_fd(), &mut buf, true).unwrap().unwrap(), 5);
        assert_eq!(p.ahead, AHEAD_WAITS);
        client.write_all(b"more").unwrap();
        for _ in 0..AHEAD_WAITS {
            assert!(
                p.poll(server.as_fd(), &mut buf, true).is_none(),
                "the reactor's turn"
            );
        }
        assert_eq!(p.poll(server.as_fd(), &mut buf, true).unwrap().unwrap(), 4);
        assert_eq!(p.ahead, AHEAD_WAITS, "still ahead");
        assert_eq!(p.stats().first_try, 2);

        // CPU to spare: the poller stays on however far ahead the client is.
        let mut p = poller(LONG, true, true);
        client.write_all(b"early").unwrap();
        assert_eq!(p.poll(server.as_fd(), &mut buf, true).unwrap().unwrap(), 5);
        assert_eq!(p.ahead, 0);
        // A poller that does not step aside (Unix sockets) keeps polling, CPU or not.
        let mut p = poller(LONG, false, false);
        client.write_all(b"early").unwrap();
        assert_eq!(p.poll(server.as_fd(), &mut buf, true).unwrap().unwrap(), 5);
        client.write_all(b"more").unwrap();
        assert_eq!(p.poll(server.as_fd(), &mut buf, true).unwrap().unwrap(), 4);
        // Nor does the rest of a request count, over TCP either.
        let mut p = poller(LONG, true, false);
        client.write_all(b"payload").unwrap();
        assert_eq!(p.poll(server.as_fd(), &mut buf, false).unwrap().unwrap(), 7);
        assert_eq!(p.ahead, 0);
    }

    /// Polls that spin out their budget rest polling: a client slower than the budget stops
    /// costing a budget of CPU per request.
    #[test]
    fn empty_polls_turn_polling_off() {
        let (mut client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut buf = [0u8; 64];
        let mut p = poller(Duration::from_micros(200), false, true);
        for _ in 0..crate::busy_poll::MISS_LIMIT {
            assert!(p.poll(server.as_fd(), &mut buf, true).is_none());
        }
        assert_eq!(p.stats().empty, u64::from(crate::busy_poll::MISS_LIMIT));
        assert!(p.misses.is_resting());
        // Resting: bytes that are there are left to the reactor, without a try.
        client.write_all(b"x").unwrap();
        assert!(p.poll(server.as_fd(), &mut buf, true).is_none());
        assert_eq!(p.stats().polls, u64::from(crate::busy_poll::MISS_LIMIT));
        while p.misses.is_resting() {
            assert!(p.poll(server.as_fd(), &mut buf, true).is_none());
        }
        // The try after the rest finds the byte: polling is back.
        assert_eq!(p.poll(server.as_fd(), &mut buf, true).unwrap().unwrap(), 1);
        assert!(!p.misses.is_resting());
    }
}
