//! How many FUSE threads read requests, and whether one of them polls.
//!
//! Every thread blocked in `read(/dev/fuse)` is a thread the kernel may wake for the next
//! request, and a wakeup is the most expensive part of a 4 KiB request on a VM whose idle
//! CPUs halt (tens of microseconds against a few for the copy). So the pacer:
//!
//! - keeps one thread polling the device for the next request for a short while after each
//!   reply (`busy_poll`), so that at queue depth 1 no one has to be woken (`bench/attach`
//!   on 2 CPUs: 4 KiB at queue depth 1 went from 0.37x to 0.68x tmpfs+loop), unless polls
//!   keep coming back empty or the machine has no idle CPU ([`crate::busy_poll`]);
//! - parks threads that are not needed (in our own handler, where the kernel cannot wake
//!   them) and brings them back when requests queue up *and* each takes long enough
//!   (a GPU copy, a large transfer) that another thread can overlap it. Fast requests
//!   (host memory at 4 KiB) are served best by few threads: more only add wakeups and
//!   context switches (`bench/attach`: 4 KiB at queue depth 32 on 2 CPUs, 173k IOPS with
//!   one thread against 136k with two; 1 MiB needs both).
//!
//! fuser owns the read loop, so all of this happens in our request handlers after the
//! reply has been sent, before control returns to fuser's next `read`.

use crate::busy_poll::{self, Misses};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::tunables::{CPUS_PER_FAST_READER, PARK_CHECK, SLOW_WORK};

/// Lets one thread of several poll at a time: one catches the next request, more only
/// burn CPU the program doing the I/O may need. It also keeps the pollers' record of empty
/// polls ([`Misses`]), shared by whichever thread holds the gate.
#[derive(Debug, Default)]
pub(crate) struct PollGate {
    held: AtomicBool,
    /// Polls that found nothing, which rest polling (locked only by the holder: never
    /// contended).
    misses: Mutex<Misses>,
}

/// The right to poll, given back on drop.
pub(crate) struct Polling<'a>(&'a PollGate);

impl PollGate {
    /// The right to poll, unless another thread holds it.
    pub(crate) fn try_hold(&self) -> Option<Polling<'_>> {
        self.held
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
            .then_some(Polling(self))
    }
}

impl Polling<'_> {
    /// Spins while `waiting()` says so, for up to `limit`, yielding the CPU in between (the
    /// program doing the I/O may be waiting for this CPU); not at all while polls keep
    /// coming back empty or the machine has no CPU to spare (see [`crate::busy_poll`]).
    pub(crate) fn spin_while(&self, limit: Duration, mut waiting: impl FnMut() -> bool) {
        let mut misses = self.0.misses.lock().unwrap_or_else(|e| e.into_inner());
        if !misses.may_poll() || !busy_poll::cpu_to_spare() {
            return;
        }
        let start = Instant::now();
        let mut found = true;
        while waiting() {
            if start.elapsed() >= limit {
                found = false;
                break;
            }
            std::thread::yield_now();
        }
        busy_poll::spun(start.elapsed());
        misses.record(found);
    }
}

impl Drop for Polling<'_> {
    fn drop(&mut self) {
        self.0.held.store(false, Ordering::Release);
    }
}

/// What polling the FUSE device said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Queue {
    /// A request is waiting.
    Ready,
    /// Nothing is waiting.
    Empty,
    /// The connection is gone (unmounted or aborted).
    Closed,
}

#[derive(Debug)]
struct Parking {
    /// Threads not parked: reading, serving, or polling.
    readers: usize,
    /// Threads parked.
    parked: usize,
    /// Wakeups handed out and not yet taken by a parked thread.
    tokens: usize,
}

/// The shared pacing state of one FUSE session's threads.
#[derive(Debug)]
pub(crate) struct Pacer {
    busy_poll: Duration,
    /// How many threads may read while requests are fast.
    fast_readers: usize,
    /// A descriptor of the FUSE connection: its readiness says whether a request is queued
    /// (all cloned descriptors of a connection share one queue). Set once mounted; until
    /// then the pacer does nothing.
    fd: OnceLock<OwnedFd>,
    /// One thread polls at a time: one catches the next request, more only burn CPU.
    polling: PollGate,
    /// Moving average of the device time per request, in nanoseconds.
    work_ns: AtomicU64,
    parking: Mutex<Parking>,
    unpark: Condvar,
}

impl Pacer {
    /// A pacer for `threads` threads on a machine with `cpus` CPUs.
    pub(crate) fn new(busy_poll: Duration, threads: usize, cpus: usize) -> Pacer {
        Pacer {
            busy_poll,
            fast_readers: (cpus / CPUS_PER_FAST_READER).clamp(1, threads.max(1)),
            fd: OnceLock::new(),
            polling: PollGate::default(),
            work_ns: AtomicU64::new(0),
            parking: Mutex::new(Parking {
                readers: threads.max(1),
                parked: 0,
                tokens: 0,
            }),
            unpark: Condvar::new(),
        }
    }

    /// Gives the pacer the connection's descriptor; before this it does nothing.
    pub(crate) fn set_fd(&self, fd: OwnedFd) {
        let _ = self.fd.set(fd);
    }

    /// Called by a thread after it has replied to a request that kept the device busy for
    /// `work`. Returns when the thread should go back to reading.
    pub(crate) fn after_request(&self, work: Duration) {
        let Some(fd) = self.fd.get() else {
            return;
        };
        let slow = self.note_work(work);
        match queue_state(fd) {
            Queue::Closed => {}
            Queue::Ready => {
                if slow {
                    self.unpark_one();
                } else {
                    self.park_if_spare(self.fast_readers);
                }
            }
            Queue::Empty => {
                // Nothing queued: one reader is enough until requests queue up again.
                if !self.park_if_spare(1) {
                    self.linger(fd);
                }
            }
        }
    }

    /// Updates the average device time; says whether requests are slow.
    fn note_work(&self, work: Duration) -> bool {
        let ns = u64::try_from(work.as_nanos()).unwrap_or(u64::MAX);
        let old = self.work_ns.load(Ordering::Relaxed);
        // Weight 1/8: a few requests of a new kind change the verdict. Racing updates lose
        // a sample now and then, which an average can afford.
        let new = old - old / 8 + ns / 8;
        self.work_ns.store(new, Ordering::Relaxed);
        new >= SLOW_WORK.as_nanos() as u64
    }

    /// Polls for the next request for up to `busy_poll`, if no other thread is polling,
    /// polls have not kept coming back empty, and the machine has a CPU to spare (see
    /// [`crate::busy_poll`]).
    fn linger(&self, fd: &OwnedFd) {
        if self.busy_poll.is_zero() {
            return;
        }
        let Some(held) = self.polling.try_hold() else {
            return;
        };
        held.spin_while(self.busy_poll, || queue_state(fd) == Queue::Empty);
    }

    /// Parks this thread if more than `keep` threads are reading; returns whether it
    /// parked (and has since been woken to read again).
    fn park_if_spare(&self, keep: usize) -> bool {
        let mut p = self.parking.lock().unwrap_or_else(|e| e.into_inner());
        if p.readers <= keep {
            return false;
        }
        p.readers -= 1;
        p.parked += 1;
        loop {
            let (guard, _) = self
                .unpark
                .wait_timeout(p, PARK_CHECK)
                .unwrap_or_else(|e| e.into_inner());
            p = guard;
            if p.tokens > 0 {
                p.tokens -= 1;
                break;
            }
            if self
                .fd
                .get()
                .is_some_and(|fd| queue_state(fd) == Queue::Closed)
            {
                break;
            }
        }
        p.parked -= 1;
        p.readers += 1;
        true
    }

    /// Wakes one parked thread, if any is parked and not already being woken.
    fn unpark_one(&self) {
        let mut p = self.parking.lock().unwrap_or_else(|e| e.into_inner());
        if p.parked > p.tokens {
            p.tokens += 1;
            drop(p);
            self.unpark.notify_one();
        }
    }

    /// Threads reading and parked, for tests.
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let p = self.parking.lock().unwrap();
        (p.readers, p.parked)
    }
}

fn queue_state(fd: &OwnedFd) -> Queue {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(0) | Err(nix::errno::Errno::EINTR) => Queue::Empty,
        Ok(_) => {
            let got = fds[0].revents().unwrap_or(PollFlags::empty());
            if got.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL) {
                Queue::Closed
            } else {
                Queue::Ready
            }
        }
        Err(_) => Queue::Closed,
    }
}

#[cfg(test)]
mod tests {
    //! A pipe stands in for `/dev/fuse`: readable means a request is queued, and closing
    //! its write end reads as the connection going away.
    use super::*;
    use std::sync::Arc;

    fn pacer(threads: usize, cpus: usize) -> (Arc<Pacer>, OwnedFd) {
        let (r, w) = nix::unistd::pipe().unwrap();
        let p = Arc::new(Pacer::new(Duration::from_micros(200), threads, cpus));
        p.set_fd(r);
        (p, w)
    }

    fn wait_for(p: &Pacer, want: (usize, usize)) {
        let start = Instant::now();
        while p.counts() != want {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "counts stayed {:?}, wanted {want:?}",
                p.counts()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn spawn_request(p: &Arc<Pacer>, work: Duration) -> std::thread::JoinHandle<()> {
        let p = p.clone();
        std::thread::spawn(move || p.after_request(work))
    }

    #[test]
    fn idle_threads_park_down_to_one_reader_and_slow_queued_requests_wake_them() {
        let (p, w) = pacer(3, 2);
        let fast = Duration::from_micros(1);
        let a = spawn_request(&p, fast);
        wait_for(&p, (2, 1));
        let b = spawn_request(&p, fast);
        wait_for(&p, (1, 2));
        // The last reader never parks: it polls for the budget and goes back to read.
        let start = Instant::now();
        p.after_request(fast);
        assert!(start.elapsed() >= Duration::from_micros(200));
        assert_eq!(p.counts(), (1, 2));
        // A queue of fast requests wakes no one.
        nix::unistd::write(&w, b"x").unwrap();
        p.after_request(fast);
        assert_eq!(p.counts(), (1, 2));
        // A queue of slow requests wakes a parked thread per request.
        p.after_request(Duration::from_millis(1));
        wait_for(&p, (2, 1));
        p.after_request(Duration::from_millis(1));
        wait_for(&p, (3, 0));
        a.join().unwrap();
        b.join().unwrap();
    }

    #[test]
    fn fast_queued_requests_keep_a_reader_per_four_cpus() {
        let (p, w) = pacer(4, 8);
        nix::unistd::write(&w, b"x").unwrap();
        let fast = Duration::from_micros(1);
        let spares = [spawn_request(&p, fast), spawn_request(&p, fast)];
        wait_for(&p, (2, 2));
        // Two readers already: this one goes on reading at once.
        let start = Instant::now();
        p.after_request(fast);
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(p.counts(), (2, 2));
        // The connection going away releases the parked threads.
        drop(w);
        for t in spares {
            t.join().unwrap();
        }
        assert_eq!(p.counts(), (4, 0));
    }

    #[test]
    fn parked_threads_leave_when_the_connection_closes() {
        let (p, w) = pacer(2, 2);
        let t = std::thread::spawn({
            let p = p.clone();
            move || p.after_request(Duration::from_micros(1))
        });
        wait_for(&p, (1, 1));
        drop(w);
        t.join().unwrap();
        assert_eq!(p.counts(), (2, 0));
    }

    #[test]
    fn nothing_happens_before_the_descriptor_is_set() {
        let p = Pacer::new(Duration::from_secs(1), 4, 2);
        let start = Instant::now();
        p.after_request(Duration::from_micros(1));
        assert!(start.elapsed() < Duration::from_millis(100));
        assert_eq!(p.counts(), (4, 0));
    }
}
