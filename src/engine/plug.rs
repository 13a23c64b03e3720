//! A submitter's word that more requests follow at once, as the block layer's plug
//! (`blk_start_plug`) is: a request that would otherwise watch for its own completion (a
//! small GPU copy going out alone, see `cuda::queue`) leaves the CPU to the submitter, which
//! has the next request in hand. Without it, a connection reading 32 pipelined requests
//! served them one at a time, each waiting out its copy: 4 KiB at queue depth 32 over one
//! NBD connection ran at the rate of queue depth 1 plus the socket.

use std::cell::Cell;

thread_local! {
    static PLUGGED: Cell<bool> = const { Cell::new(false) };
}

/// While it lives, requests started on this thread know more follow (see the module docs).
/// Not `Send`: it marks one thread, and must not be held across an `.await`.
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
}

impl Default for Plug {
    fn default() -> Self {
        Plug::new()
    }
}

impl Drop for Plug {
    fn drop(&mut self) {
        PLUGGED.set(self.prev);
    }
}

/// Whether the submitter on this thread said more requests follow.
pub fn plugged() -> bool {
    PLUGGED.get()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
