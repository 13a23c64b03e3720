//! The waker of a ring thread's device calls: a flag the thread looks at between batches,
//! and an eventfd its ring keeps a read on, written only while the thread sleeps in
//! `io_uring_enter`, so that a GPU copy completing wakes the thread that serves it and a
//! copy completing while the thread is busy costs one atomic swap.

use anyhow::{Context, Result};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::task::Wake;

/// See the module docs. The thread's side: [`RingWake::take`], [`RingWake::sleep`],
/// [`RingWake::awake`]; the waker's: [`Wake`].
pub(super) struct RingWake {
    woken: AtomicBool,
    sleeping: AtomicBool,
    fd: OwnedFd,
}

impl RingWake {
    /// A waker and its eventfd, blocking (io_uring would fail a read of a non-blocking
    /// one with EAGAIN instead of waiting).
    pub(super) fn new() -> Result<Arc<RingWake>> {
        let fd = nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_CLOEXEC)
            .context("creating an eventfd for a FUSE ring")?;
        Ok(Arc::new(RingWake {
            woken: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            fd: fd.into(),
        }))
    }

    /// The eventfd the ring reads.
    pub(super) fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Whether a wake came since the last call, clearing it.
    pub(super) fn take(&self) -> bool {
        self.woken.swap(false, SeqCst)
    }

    /// Whether a wake came and was not yet taken.
    #[cfg(test)]
    pub(super) fn woken(&self) -> bool {
        self.woken.load(SeqCst)
    }

    /// Says the thread is about to sleep: false, and not sleeping, where a wake came first.
    /// Either this sees the wake, or the waker sees the thread sleeping and writes the
    /// eventfd (both sides store, then load, sequentially consistent).
    pub(super) fn sleep(&self) -> bool {
        self.sleeping.store(true, SeqCst);
        if self.woken.load(SeqCst) {
            self.sleeping.store(false, SeqCst);
            return false;
        }
        true
    }

    /// Says the thread is running again.
    pub(super) fn awake(&self) {
        self.sleeping.store(false, SeqCst);
    }

    /// Writes the eventfd, whatever the thread is doing (to end its read before the ring
    /// goes away).
    pub(super) fn ring(&self) {
        // Cannot fail short of the counter's overflow, which would take 2^64 wakes.
        let _ = nix::unistd::write(self.fd.as_fd(), &1u64.to_ne_bytes());
    }
}

impl Wake for RingWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // The first wake since the thread took the last one decides; a later one finds the
        // thread either still to take it or kept from sleeping by it.
        if !self.woken.swap(true, SeqCst) && self.sleeping.load(SeqCst) {
            self.ring();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn count(w: &RingWake) -> Option<u64> {
        let mut fds = [nix::poll::PollFd::new(
            w.fd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap();
        if ready == 0 {
            return None;
        }
        let mut b = [0u8; 8];
        nix::unistd::read(&w.fd, &mut b).unwrap();
        Some(u64::from_ne_bytes(b))
    }

    #[test]
    fn a_busy_thread_is_woken_by_the_flag_and_a_sleeping_one_by_the_eventfd() {
        let w = RingWake::new().unwrap();
        let waker = Waker::from(w.clone());
        // Awake: the flag only, no system call.
        waker.wake_by_ref();
        assert!(w.woken());
        assert_eq!(count(&w), None);
        // A wake not yet taken keeps the thread from sleeping.
        assert!(!w.sleep());
        assert!(w.take());
        assert!(!w.take());
        // Asleep: the eventfd, once however many wakes come.
        assert!(w.sleep());
        waker.wake_by_ref();
        let owned = waker.clone();
        owned.wake();
        assert_eq!(count(&w), Some(1));
        w.awake();
        assert!(w.take());
        waker.wake_by_ref();
        assert_eq!(count(&w), None, "awake again");
    }

    #[test]
    fn wakes_from_other_threads_are_never_lost() {
        use std::sync::atomic::AtomicUsize;
        let w = RingWake::new().unwrap();
        let taken = Arc::new(AtomicUsize::new(0));
        let rounds = 20_000;
        let t = {
            let (waker, taken) = (Waker::from(w.clone()), taken.clone());
            // Each wake waits until the thread has taken the one before: a lost one would
            // leave it asleep for good.
            std::thread::spawn(move || {
                for i in 0..rounds {
                    waker.wake_by_ref();
                    while taken.load(SeqCst) <= i {
                        std::hint::spin_loop();
                    }
                }
            })
        };
        let mut slept = 0;
        while taken.load(SeqCst) < rounds {
            if w.take() {
                taken.fetch_add(1, SeqCst);
                continue;
            }
            if w.sleep() {
                slept += 1;
                let mut fds = [nix::poll::PollFd::new(
                    w.fd.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10_000u16));
                assert_eq!(
                    ready.unwrap(),
                    1,
                    "a wake was lost after {} rounds",
                    taken.load(SeqCst)
                );
                let mut b = [0u8; 8];
                nix::unistd::read(&w.fd, &mut b).unwrap();
                w.awake();
            }
        }
        t.join().unwrap();
        assert!(
            slept > 0,
            "the thread never slept: the eventfd path went untested"
        );
    }
}
