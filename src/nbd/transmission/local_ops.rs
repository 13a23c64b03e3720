//! Operations that have to wait (GPU copies) kept inside the connection's reader rather than
//! spawned as tasks of their own.
//!
//! A spawned operation costs a task, and its completion a wake of that task from the GPU's
//! completion thread: tokio's injection queue and a write to the runtime's eventfd, plus a
//! thread wake-up when the runtime sleeps; then its reply goes through the outbox to the
//! writer task. Here, an operation that did not complete at its first poll waits in a slot of
//! the reader's own table, with a waker of its slot. Its completion marks the slot ready and
//! wakes the reader's task only when the reader is not already watching: while operations
//! are in flight, a reader with nothing else to do spins ([`super::poll::Poller`]) on both the
//! socket and [`LocalOps::any_ready`], so a GPU copy of a few µs comes back to it with no
//! wake-up at all, and its reply joins the reader's batch of replies (one `writev` for all).
//! Many completions in a burst wake the reader at most once.
//!
//! Only the reader's wait for the next request drives the table. Before any other wait
//! (budget, buffers, a large payload), the reader hands its operations to tasks
//! ([`LocalOps::drain`]), as before this table existed, so no reply ever waits on a reader
//! that is blocked elsewhere.

use super::reply::Reply;
use futures::task::AtomicWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// An operation's future.
pub(super) type OpFuture = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// What completions tell the reader.
#[derive(Default)]
struct Shared {
    /// Slots whose operation woke (may repeat, may be stale: a spurious poll is harmless).
    ready: Mutex<Vec<usize>>,
    /// Some slot woke since the reader last looked.
    any: AtomicBool,
    /// The reader is spinning and watches `any`: a completion need not wake its task.
    spinning: AtomicBool,
    /// The reader's task, when it sleeps.
    reader: AtomicWaker,
}

/// The waker of one slot.
struct SlotWake {
    index: usize,
    shared: Arc<Shared>,
}

impl Wake for SlotWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let s = &self.shared;
        s.ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.index);
        // SeqCst pairs with the reader's: it sets `spinning` false and then reads `any`, so
        // either the reader sees `any`, or this sees it asleep and wakes it.
        s.any.store(true, Ordering::SeqCst);
        if !s.spinning.load(Ordering::SeqCst) {
            s.reader.wake();
        }
    }
}

/// The reader's table of operations in flight (see the module docs).
pub(super) struct LocalOps {
    slots: Vec<Option<OpFuture>>,
    /// One waker per slot, made once and reused: starting an operation allocates nothing.
    wakers: Vec<Waker>,
    free: Vec<usize>,
    live: usize,
    shared: Arc<Shared>,
    /// Taken from `shared.ready` each time, so that neither side allocates.
    scratch: Vec<usize>,
}

impl LocalOps {
    pub(super) fn new() -> Self {
        LocalOps {
            slots: Vec::new(),
            wakers: Vec::new(),
            free: Vec::new(),
            live: 0,
            shared: Arc::new(Shared::default()),
            scratch: Vec::new(),
        }
    }

    /// Operations in flight.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.live
    }

    pub(super) fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Polls `op` once with a slot's waker: its reply if it is done, else it waits here.
    pub(super) fn start(&mut self, mut op: OpFuture) -> Option<Reply> {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                let i = self.slots.len();
                self.slots.push(None);
                self.wakers.push(Waker::from(Arc::new(SlotWake {
                    index: i,
                    shared: self.shared.clone(),
                })));
                i
            }
        };
        let mut cx = Context::from_waker(&self.wakers[index]);
        match op.as_mut().poll(&mut cx) {
            Poll::Ready(reply) => {
                self.free.push(index);
                Some(reply)
            }
            Poll::Pending => {
                self.slots[index] = Some(op);
                self.live += 1;
                None
            }
        }
    }

    /// Polls the operations that woke; hands each reply to `done`. Cheap when none did.
    pub(super) fn drive(&mut self, mut done: impl FnMut(Reply)) {
        // Called after every request: with nothing in flight (host memory) or nothing woken,
        // it costs a plain load, no read-modify-write.
        if self.live == 0 || !self.shared.any.load(Ordering::SeqCst) {
            return;
        }
        self.shared.any.store(false, Ordering::SeqCst);
        std::mem::swap(
            &mut self.scratch,
            &mut self.shared.ready.lock().unwrap_or_else(|e| e.into_inner()),
        );
        for k in 0..self.scratch.len() {
            let i = self.scratch[k];
            let Some(op) = self.slots[i].as_mut() else {
                continue;
            };
            let mut cx = Context::from_waker(&self.wakers[i]);
            if let Poll::Ready(reply) = op.as_mut().poll(&mut cx) {
                self.slots[i] = None;
                self.free.push(i);
                self.live -= 1;
                done(reply);
            }
        }
        self.scratch.clear();
    }

    /// Resolves once some operation has woken (then [`LocalOps::drive`] them). Registers the
    /// reader's task, which a completion wakes only while the reader is not spinning.
    pub(super) fn woken(&self) -> impl Future<Output = ()> + '_ {
        // Only `shared` is held across the wait (the slots are not `Sync`).
        let shared: &Shared = &self.shared;
        std::future::poll_fn(move |cx| {
            if shared.any.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            shared.reader.register(cx.waker());
            if shared.any.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            Poll::Pending
        })
    }

    /// What a spin on the socket watches besides it (see [`Watch::spinning`]).
    pub(super) fn watch(&self) -> Watch<'_> {
        Watch(&self.shared)
    }

    /// Takes every operation out of the table, to be run elsewhere (spawned).
    pub(super) fn drain(&mut self) -> impl Iterator<Item = OpFuture> + '_ {
        self.live = 0;
        self.free.clear();
        self.free.extend((0..self.slots.len()).rev());
        self.slots.iter_mut().filter_map(Option::take)
    }
}

/// See [`LocalOps::watch`].
#[derive(Clone, Copy)]
pub(super) struct Watch<'a>(&'a Shared);

impl<'a> Watch<'a> {
    /// Marks the reader as spinning while the guard lives: completions then only set the
    /// flag the guard hands out, which the spin watches. Drop it before the reader sleeps.
    pub(super) fn spinning(self) -> Spinning<'a> {
        self.0.spinning.store(true, Ordering::SeqCst);
        Spinning(self.0)
    }
}

/// See [`Watch::spinning`].
pub(super) struct Spinning<'a>(&'a Shared);

impl Spinning<'_> {
    /// Set when an operation has completed: the spin should stop.
    pub(super) fn any_ready(&self) -> &AtomicBool {
        &self.0.any
    }
}

impl Drop for Spinning<'_> {
    fn drop(&mut self) {
        self.0.spinning.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::transmission::reply::Body;
    use tokio::sync::oneshot;

    /// A reply told apart by its length.
    fn reply(n: u8) -> Reply {
        Reply::new(Body::Bytes(vec![0; n.into()]), None)
    }

    fn bytes(r: &Reply) -> u8 {
        r.len() as u8
    }

    /// Operations complete in any order, from another thread; the reader's task is woken
    /// only while it is not spinning, and slots are reused.
    #[tokio::test]
    async fn operations_wait_in_slots_and_come_back_when_they_wake() {
        let mut ops = LocalOps::new();
        assert!(
            ops.start(Box::pin(async { reply(0) })).is_some(),
            "ready at once"
        );
        let mut senders = Vec::new();
        for n in 1..=3u8 {
            let (tx, rx) = oneshot::channel::<()>();
            senders.push(tx);
            let done = ops.start(Box::pin(async move {
                rx.await.unwrap();
                reply(n)
            }));
            assert!(done.is_none());
        }
        assert_eq!(ops.len(), 3);
        let mut got = Vec::new();
        ops.drive(|r| got.push(bytes(&r)));
        assert!(got.is_empty(), "nothing woke");

        // Completed from another thread while the reader spins: the flag, no task wake.
        let spin = ops.watch().spinning();
        let tx = senders.remove(1);
        std::thread::spawn(move || tx.send(()).unwrap())
            .join()
            .unwrap();
        assert!(spin.any_ready().load(Ordering::SeqCst));
        drop(spin);
        ops.drive(|r| got.push(bytes(&r)));
        assert_eq!(got, [2]);

        // While the reader sleeps, a completion wakes it.
        let tx = senders.remove(1);
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(5));
            tx.send(()).unwrap();
        });
        ops.woken().await;
        ops.drive(|r| got.push(bytes(&r)));
        assert_eq!(got, [2, 3]);
        assert_eq!(ops.len(), 1);

        // The slot that finished is taken again; the one left is drained to run elsewhere.
        let (tx, rx) = oneshot::channel::<()>();
        assert!(
            ops.start(Box::pin(async move {
                rx.await.unwrap();
                reply(4)
            }))
            .is_none()
        );
        assert_eq!(ops.slots.len(), 3, "a free slot was reused");
        let rest: Vec<OpFuture> = ops.drain().collect();
        assert!(ops.is_empty());
        assert_eq!(rest.len(), 2);
        senders.remove(0).send(()).unwrap();
        tx.send(()).unwrap();
        let mut ends = Vec::new();
        for op in rest {
            ends.push(bytes(&op.await));
        }
        ends.sort();
        assert_eq!(ends, [1, 4]);
    }
}
