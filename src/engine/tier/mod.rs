//! Tiers: where a chunk lives when the GPU needs its memory back.
//!
//! Every chunk lives in exactly one place: the backend's memory (the primary tier: a GPU, or
//! host RAM for the host backend), or a spill tier: pinned host RAM ([`ram::SpillRam`]) and,
//! for what RAM cannot hold, a preallocated file ([`file::SpillFile`]). The chunk map stays
//! the one source of truth: a slot holds a [`Home`], and moving a chunk is building it anew in
//! another home and swapping the slot over (`moves`). Backends know nothing of tiers; they
//! only report how much of their memory other programs have left ([`crate::engine::Backend::shared_memory`]).
//!
//! **No write is lost or torn by a move.** A write pins its chunk ([`ChunkState::pin_write`]:
//! one atomic add and one load), a move marks the chunk moving and waits for the pins to go
//! before it copies. The two sides use sequentially consistent operations on the two counters
//! (Dekker's pattern), so either the write sees the move and waits for the chunk's new home,
//! or the move sees the write and copies after it. Reads never wait: until the slot changes,
//! the old home holds exactly the bytes being copied. A trim or write-zeroes that frees the
//! chunk while it moves empties the slot, and the move, finding the slot changed, drops its
//! copy.
//!
//! **Coldness** is a clock (second-chance) bit per chunk, set by every access with a load and,
//! only when it was clear, a store: no lock and no allocation on the I/O path. [`control`]
//! sweeps it to pick the coldest chunks to move out, and moves chunks back hottest first.

pub mod control;
pub mod file;
mod home;
pub(crate) mod moves;
pub mod ram;

pub use control::{MemoryStatus, TierControl, TierStats, YieldProgress, YieldReport};
pub use file::SpillFile;
pub use home::Home;
pub use ram::SpillRam;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Number of tiers.
pub const TIERS: usize = 3;

/// Where a chunk's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// The backend's own memory (a GPU's, or host RAM for the host backend).
    Primary = 0,
    /// Pinned host RAM of the spill tier.
    Ram = 1,
    /// The spill file.
    File = 2,
}

impl Tier {
    /// Every tier, in index order.
    pub const ALL: [Tier; TIERS] = [Tier::Primary, Tier::Ram, Tier::File];

    /// Lower-case name for JSON and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Primary => "primary",
            Tier::Ram => "spill_ram",
            Tier::File => "spill_file",
        }
    }
}

/// Per-chunk state for moves and coldness; see the module docs for the protocol.
#[derive(Debug, Default)]
pub struct ChunkState {
    /// Writes copying into the chunk right now.
    writers: AtomicU32,
    /// Set while the chunk is copied to another home, and for good once it has moved.
    moving: AtomicBool,
    /// The clock's second-chance bit: set by every access, cleared by the sweep.
    referenced: AtomicBool,
}

/// A write's claim on a chunk: while it lives, no move copies the chunk.
pub struct WritePin<'a>(&'a ChunkState);

impl Drop for WritePin<'_> {
    fn drop(&mut self) {
        self.0.writers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ChunkState {
    /// Marks the chunk used. A load first, so hot chunks do not bounce a cache line.
    #[inline]
    pub fn touch(&self) {
        if !self.referenced.load(Ordering::Relaxed) {
            self.referenced.store(true, Ordering::Relaxed);
        }
    }

    /// Clears the second-chance bit, returning what it was.
    pub fn take_referenced(&self) -> bool {
        self.referenced.load(Ordering::Relaxed) && self.referenced.swap(false, Ordering::Relaxed)
    }

    /// True when the chunk was used since the sweep last looked.
    pub fn referenced(&self) -> bool {
        self.referenced.load(Ordering::Relaxed)
    }

    /// Pins the chunk for a write, or `None` while it is moving (wait for its new home).
    #[inline]
    pub fn pin_write(&self) -> Option<WritePin<'_>> {
        self.writers.fetch_add(1, Ordering::SeqCst);
        if self.moving.load(Ordering::SeqCst) {
            self.writers.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(WritePin(self))
    }

    /// Starts a move: later writes wait. Returns false if another move has it already.
    pub fn start_move(&self) -> bool {
        !self.moving.swap(true, Ordering::SeqCst)
    }

    /// Writes that started before [`ChunkState::start_move`] and are still copying.
    pub fn writers(&self) -> u32 {
        self.writers.load(Ordering::SeqCst)
    }

    /// Ends a move that did not happen (its copy failed): writes go on here.
    pub fn abort_move(&self) {
        self.moving.store(false, Ordering::SeqCst);
    }

    /// True while (or after) the chunk moves.
    pub fn is_moving(&self) -> bool {
        self.moving.load(Ordering::SeqCst)
    }
}

/// The spill tiers a device (or several exports of one daemon) may move chunks to.
#[derive(Clone, Default)]
pub struct SpillStore {
    /// Pinned host RAM, tried first.
    pub ram: Option<Arc<SpillRam>>,
    /// The spill file, for what RAM cannot hold.
    pub file: Option<Arc<SpillFile>>,
}

impl SpillStore {
    /// True when there is nowhere to spill to.
    pub fn is_empty(&self) -> bool {
        self.ram.is_none() && self.file.is_none()
    }

    /// Total bytes the spill tiers may hold.
    pub fn capacity(&self) -> u64 {
        self.ram.as_ref().map_or(0, |r| r.capacity())
            + self.file.as_ref().map_or(0, |f| f.capacity())
    }
}
