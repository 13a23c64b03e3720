//! A submitter's word that more requests follow at once, as the block layer's plug
//! (`blk_start_plug` / `blk_finish_plug`) is: requests started under a plug are held by the
//! GPU copy queue instead of issued one by one, and go out together when the submitter
//! unplugs, so that a burst of small copies becomes one launch of the gather kernel and one
//! event instead of one driver call and one event each (see `cuda::queue`). A held request
//! also never watches for its own completion (a small copy going out alone does, for up to
//! 20 µs): the submitter has the next request in hand.
//!
//! Why: a connection reading 32 pipelined 4 KiB requests served them one at a time, each
//! waiting out its copy (the rate of queue depth 1 plus the socket); with the watch skipped
//! they still cost 32 submissions.
//!
//! The rule for submitters: whatever a plug held must be issued ([`unplug`]) before the
//! thread waits for anything, since nothing else issues it (a held request polled again, or
//! dropped, issues itself, as a safety net). Dropping a [`Plug`] unplugs; [`Plug::hold`]
//! leaves what it held for a later [`unplug`], for a submitter whose next request is already
//! in hand but whose code between the two is async (the guard cannot live across an await).

use std::cell::{Cell, RefCell};
use std::sync::Arc;

/// What holds submissions made under a plug until the submitter unplugs: the copy queue of
/// a GPU.
pub(crate) trait Unplug: Send + Sync {
    /// Issues what plugged submitters left waiting.
    fn unplug(&self);
}

thread_local! {
    static PLUGGED: Cell<bool> = const { Cell::new(false) };
    /// Queues holding submissions made on this thread under a plug: usually none or one.
    static HELD: RefCell<Vec<Arc<dyn Unplug>>> = const { RefCell::new(Vec::new()) };
}

/// While it lives, requests started on this thread are held until it drops or [`unplug`]
/// runs (see the module docs). Not `Send`: it marks one thread, and must not be held across
/// an `.await`.
pub struct Plug {
    prev: bool,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Plug {
    /// Plugs this thread until the guard drops.
    pub fn new() -> Plug {
        Plug {
            prev: PLUGGED.replace(true),
            _not_send: std::marker::PhantomData,
        }
    }

    /// Ends the plug but leaves what it held waiting for the next [`unplug`] on this thread,
    /// which the caller must make before it waits for anything.
    pub fn hold(self) {
        PLUGGED.set(self.prev);
        std::mem::forget(self);
    }
}

impl Default for Plug {
    fn default() -> Self {
        Plug::new()
    }
}

impl Drop for Plug {
    fn drop(&mut self) {
        PLUGGED.set(self.prev);
        if !self.prev {
            unplug();
        }
    }
}

/// Whether the submitter on this thread said more requests follow.
pub fn plugged() -> bool {
    PLUGGED.get()
}

thread_local! {
    static WATCHED: Cell<bool> = const { Cell::new(false) };
}

/// While it lives, requests started on this thread are watched by their submitter: it polls
/// them again when their waker fires, which costs it nothing, and it has decided not to
/// spin meanwhile (the NBD reader whose poller is off, shares its thread or finds no CPU to
/// spare). So a small GPU copy does not re-poll itself (`QueueOptions::yield_spin`), which
/// would keep the submitter spinning against that decision. Not `Send`, like [`Plug`].
pub struct Watched {
    prev: bool,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Watched {
    /// Marks this thread's submissions as watched until the guard drops.
    pub fn new() -> Watched {
        Watched {
            prev: WATCHED.replace(true),
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Default for Watched {
    fn default() -> Self {
        Watched::new()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        WATCHED.set(self.prev);
    }
}

/// Whether requests started on this thread are watched by their submitter ([`Watched`]).
pub fn watched() -> bool {
    WATCHED.get()
}

/// Notes that `queue` holds a submission made on this thread under a plug, for [`unplug`].
pub(crate) fn held_by<Q: Unplug + 'static>(queue: &Arc<Q>) {
    HELD.with_borrow_mut(|held| {
        let known = held
            .iter()
            .any(|h| std::ptr::addr_eq(Arc::as_ptr(h), Arc::as_ptr(queue)));
        if !known {
            held.push(queue.clone());
        }
    });
}

/// Issues everything plugs on this thread held. Cheap when nothing is held.
pub fn unplug() {
    // One at a time, with the list not borrowed while a queue issues.
    while let Some(queue) = HELD.with_borrow_mut(|held| held.pop()) {
        queue.unplug();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_plug_lasts_as_long_as_its_guard_and_nests() {
        assert!(!plugged());
        let a = Plug::new();
        assert!(plugged());
        {
            let _b = Plug::new();
            assert!(plugged());
        }
        assert!(plugged(), "the inner guard restores the outer plug");
        drop(a);
        assert!(!plugged());
        std::thread::spawn(|| assert!(!plugged(), "another thread is not plugged"))
            .join()
            .unwrap();
    }

    #[derive(Default)]
    struct Counting(AtomicUsize);

    impl Unplug for Counting {
        fn unplug(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn held_queues_are_unplugged_once_each_by_the_outermost_drop_or_unplug() {
        let (a, b) = (Arc::new(Counting::default()), Arc::new(Counting::default()));
        let count = |q: &Arc<Counting>| q.0.load(Ordering::SeqCst);
        let outer = Plug::new();
        {
            let _inner = Plug::new();
            held_by(&a);
            held_by(&a);
            held_by(&b);
        }
        assert_eq!(
            (count(&a), count(&b)),
            (0, 0),
            "an inner plug does not unplug"
        );
        drop(outer);
        assert_eq!((count(&a), count(&b)), (1, 1), "each queue once");
        unplug();
        assert_eq!((count(&a), count(&b)), (1, 1), "nothing left held");

        let p = Plug::new();
        held_by(&a);
        p.hold();
        assert!(!plugged());
        assert_eq!(count(&a), 1, "hold leaves it held");
        unplug();
        assert_eq!(count(&a), 2);
    }
}
