//! Busy polling of a connection's socket before the reader sleeps in the reactor (see
//! [`Poller`]), and the per-thread connection count that decides where polling may run.

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
/// Over TCP, nor does it run while the client sends ahead of the replies (queue depth above
/// one): a poll then finds the next request already there, at its first try, and hands it
/// over at once, one request per read and one reply per write, and each TCP read and write
/// on loopback is costly. A wait in the reactor lets a few requests gather, which the
/// server then reads, and answers, with one system call each. So over TCP a poll that finds
/// a request at once turns polling off for the next `AHEAD_WAITS` waits, after which one
/// poll looks again; at queue depth one a first try never finds the next request. Measured
/// on the development machine (2 vCPUs, both sides short of CPU), 4 KiB I/O, one
/// connection: TCP randwrite at queue depth 16 and 64 from 188k and 182k IOPS to 201k and
/// 198k, randread from 180k and 174k to 192k and 183k, queue depth one unchanged. Over a
/// Unix socket, reads and writes are cheap and the reactor's wakeups are not: randwrite
/// at queue depth 16 fell from 217k to 195k, so Unix sockets keep polling. The gain needs
/// client and server short of CPU: on the H100 machine (16 CPUs, qemu-img bench), 4 KiB
/// writes at queue depth 32 over TCP went the other way (81k and 89k IOPS without, 73k and
/// 75k with), so only a machine of at most `FEW_CPUS` CPUs steps aside.
pub(crate) struct Poller {
    budget: Duration,
    /// Whether polling stops while the client sends ahead (TCP).
    steps_aside: bool,
    /// The previous wait was short: the client is in a tight request loop.
    warm: bool,
    /// Waits left to go through the reactor, since a poll found the client ahead.
    ahead: u32,
}

/// Waits through the reactor after a poll found the client's next request already there.
const AHEAD_WAITS: u32 = 32;

/// Most CPUs of a machine on which a TCP connection's poller steps aside (see [`Poller`]).
const FEW_CPUS: usize = 4;

/// Whether this machine has at most [`FEW_CPUS`] CPUs to run on.
pub(super) fn few_cpus() -> bool {
    static FEW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FEW.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() <= FEW_CPUS))
}

impl Poller {
    pub(super) fn new(budget: Duration, steps_aside: bool) -> Self {
        Poller {
            budget,
            steps_aside,
            warm: true,
            ahead: 0,
        }
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
        let (r, first_try) = self.poll_for(fd, buf)?;
        if first_try && self.steps_aside {
            self.ahead = AHEAD_WAITS;
        }
        Some(r)
    }

    /// Whether polling is on at all (a budget of zero turns it off).
    pub(super) fn is_on(&self) -> bool {
        !self.budget.is_zero()
    }

    /// Notes how long the last wait for the client took: polling goes on only while the
    /// waits are short (see `warm`).
    pub(super) fn waited(&mut self, elapsed: Duration) {
        self.warm = elapsed <= 2 * self.budget;
    }

    /// Like [`Poller::poll`], whether or not the client was quick last time: for the rest
    /// of a payload the client is already sending.
    pub(super) fn poll_now(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> Option<io::Result<usize>> {
        self.poll_for(fd, buf).map(|(r, _)| r)
    }

    /// The poll itself; with the result, whether the first try found bytes.
    fn poll_for(&self, fd: BorrowedFd<'_>, buf: &mut [u8]) -> Option<(io::Result<usize>, bool)> {
        if self.budget.is_zero() {
            return None;
        }
        let start = Instant::now();
        let mut first_try = true;
        loop {
            // The reactor is not asked: its readiness flag only changes when this thread
            // goes back to it, which is what polling avoids. Edge-triggered epoll copes
            // with bytes taken behind its back: it sees a spurious wakeup, at worst.
            match recv(fd.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => return Some((Ok(n), first_try)),
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                Err(e) => return Some((Err(e.into()), first_try)),
            }
            first_try = false;
            if start.elapsed() >= self.budget {
                return None;
            }
            // If the client runs on this CPU, let it.
            std::thread::yield_now();
        }
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

    /// A poll that finds the client's bytes at its first try leaves the next
    /// `AHEAD_WAITS` waits to the reactor (over TCP); one that had to wait for them keeps
    /// polling.
    #[test]
    fn poller_steps_aside_for_a_client_that_sends_ahead() {
        use std::io::Write;
        use std::os::fd::AsFd;
        let (mut client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut p = Poller::new(Duration::from_millis(50), true);
        let mut buf = [0u8; 64];

        // Queue depth one: the request comes while the server polls.
        let mut c = client.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            c.write_all(b"late").unwrap();
        });
        assert_eq!(p.poll(server.as_fd(), &mut buf, true).unwrap().unwrap(), 4);
        sender.join().unwrap();
        assert_eq!(p.ahead, 0, "a poll that waited keeps polling");

        // Ahead: the request is there before the poll.
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

        // Nothing comes: the poll gives up after its budget.
        for _ in 0..AHEAD_WAITS {
            assert!(p.poll(server.as_fd(), &mut buf, true).is_none());
        }
        let t = Instant::now();
        assert!(p.poll(server.as_fd(), &mut buf, true).is_none());
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert_eq!(p.ahead, 0);

        // A poller that does not step aside (Unix sockets) keeps polling.
        let mut p = Poller::new(Duration::from_millis(50), false);
        client.write_all(b"early").unwrap();
        assert_eq!(p.poll(server.as_fd(), &mut buf, true).unwrap().unwrap(), 5);
        client.write_all(b"more").unwrap();
        assert_eq!(p.poll(server.as_fd(), &mut buf, true).unwrap().unwrap(), 4);
        // Nor does the rest of a request count, over TCP either.
        let mut p = Poller::new(Duration::from_millis(50), true);
        client.write_all(b"payload").unwrap();
        assert_eq!(p.poll(server.as_fd(), &mut buf, false).unwrap().unwrap(), 7);
        assert_eq!(p.ahead, 0);
    }
}
