//! The sparse map from chunk number to allocated backend memory.
//!
//! Each slot is an `ArcSwapOption`: an I/O takes a reference to its chunk with one atomic
//! load and never holds a lock while data moves, so requests on different chunks, or on
//! disjoint ranges of one chunk, never wait for each other. Freeing a chunk swaps its slot to
//! empty; the memory goes back to the backend when the last in-flight request that still
//! holds the chunk finishes, so a TRIM can never free memory under a running copy.
//!
//! A chunk also lives in one tier (GPU, spill RAM, spill file). Moving it between tiers
//! builds a new [`Allocated`] in the new home and swaps the slot from the old one to it
//! ([`ChunkMap::replace`]); [`ChunkState`] keeps writes off a chunk while it is copied.

use super::tier::{ChunkState, TIERS, Tier};
use super::{Extent, IoError, IoResult};
use arc_swap::ArcSwapOption;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Usage counters shared by a map and its chunks, so a chunk freed late (after the last
/// request holding it finishes) still updates them.
#[derive(Debug, Default)]
pub(crate) struct Usage {
    pub(crate) allocated: AtomicU64,
    pub(crate) chunks: AtomicU64,
    /// Bytes and chunks per [`Tier`], indexed by `Tier as usize`.
    pub(crate) tier_bytes: [AtomicU64; TIERS],
    pub(crate) tier_chunks: [AtomicU64; TIERS],
}

/// One allocated chunk: its memory in one tier, the accounting that frees it, and the
/// state that lets it move between tiers without losing a write.
pub struct Allocated<C> {
    mem: C,
    len: u64,
    tier: Tier,
    state: ChunkState,
    usage: Arc<Usage>,
}

impl<C> Allocated<C> {
    /// The memory of this chunk.
    pub fn mem(&self) -> &C {
        &self.mem
    }

    /// Which tier the memory is in.
    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// Pins, coldness and move state of this chunk.
    pub fn state(&self) -> &ChunkState {
        &self.state
    }

    /// Logical length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty chunk (never: chunks have at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<C> Drop for Allocated<C> {
    fn drop(&mut self) {
        self.usage.allocated.fetch_sub(self.len, Ordering::Relaxed);
        self.usage.chunks.fetch_sub(1, Ordering::Relaxed);
        let t = self.tier as usize;
        self.usage.tier_bytes[t].fetch_sub(self.len, Ordering::Relaxed);
        self.usage.tier_chunks[t].fetch_sub(1, Ordering::Relaxed);
    }
}

/// One piece of a byte range that falls inside a single chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Chunk number.
    pub index: u64,
    /// Offset of the piece inside the chunk.
    pub chunk_offset: usize,
    /// Length of the piece.
    pub len: usize,
    /// Offset of the piece from the start of the whole range.
    pub range_offset: usize,
    /// The piece covers its whole chunk.
    pub whole: bool,
}

/// A fixed-size array of optional chunks covering a device of `size` bytes.
pub struct ChunkMap<C> {
    slots: Box<[ArcSwapOption<Allocated<C>>]>,
    chunk_size: usize,
    size: u64,
    max_memory: Option<u64>,
    usage: Arc<Usage>,
}

impl<C> ChunkMap<C> {
    /// An empty map for `size` bytes in chunks of `chunk_size` bytes (a power of two),
    /// holding at most `max_memory` bytes of chunks if given.
    pub fn new(size: u64, chunk_size: usize, max_memory: Option<u64>) -> Self {
        assert!(
            chunk_size.is_power_of_two(),
            "chunk size must be a power of two"
        );
        let count = size.div_ceil(chunk_size as u64) as usize;
        ChunkMap {
            slots: (0..count).map(|_| ArcSwapOption::empty()).collect(),
            chunk_size,
            size,
            max_memory,
            usage: Arc::new(Usage::default()),
        }
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// Number of chunk slots.
    pub fn len(&self) -> u64 {
        self.slots.len() as u64
    }

    /// True for a zero-sized map.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Bytes currently allocated.
    pub fn allocated(&self) -> u64 {
        self.usage.allocated.load(Ordering::Relaxed)
    }

    /// Chunks currently allocated.
    pub fn allocated_chunks(&self) -> u64 {
        self.usage.chunks.load(Ordering::Relaxed)
    }

    /// Bytes and chunks in `tier` now.
    pub fn in_tier(&self, tier: Tier) -> (u64, u64) {
        let t = tier as usize;
        (
            self.usage.tier_bytes[t].load(Ordering::Relaxed),
            self.usage.tier_chunks[t].load(Ordering::Relaxed),
        )
    }

    /// The memory cap, if any.
    pub fn max_memory(&self) -> Option<u64> {
        self.max_memory
    }

    /// Length in bytes of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: u64) -> usize {
        let start = index * self.chunk_size as u64;
        (self.size - start).min(self.chunk_size as u64) as usize
    }

    /// Splits `[offset, offset + len)` (already range-checked) into per-chunk pieces.
    pub fn segments(&self, offset: u64, len: u64) -> impl Iterator<Item = Segment> + '_ {
        let cs = self.chunk_size as u64;
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let index = pos / cs;
            let chunk_offset = (pos % cs) as usize;
            let piece = (end - pos).min(cs - chunk_offset as u64) as usize;
            let seg = Segment {
                index,
                chunk_offset,
                len: piece,
                range_offset: (pos - offset) as usize,
                whole: chunk_offset == 0 && piece == self.chunk_len(index),
            };
            pos += piece as u64;
            Some(seg)
        })
    }

    /// The chunk at `index`, if allocated.
    pub fn get(&self, index: u64) -> Option<Arc<Allocated<C>>> {
        self.slots[index as usize].load_full()
    }

    /// The chunk at `index`, allocating it with `alloc` if it is empty. The memory cap is
    /// charged before `alloc` runs; when two writers race to fill one slot, the loser's
    /// chunk is dropped (and its charge returned).
    pub fn get_or_alloc(
        &self,
        index: u64,
        alloc: impl FnOnce(u64, usize) -> IoResult<(C, Tier)>,
    ) -> IoResult<Arc<Allocated<C>>> {
        let slot = &self.slots[index as usize];
        if let Some(chunk) = slot.load_full() {
            return Ok(chunk);
        }
        let len = self.chunk_len(index) as u64;
        let before = self.usage.allocated.fetch_add(len, Ordering::Relaxed);
        if let Some(max) = self.max_memory
            && before + len > max
        {
            self.usage.allocated.fetch_sub(len, Ordering::Relaxed);
            return Err(IoError::NoSpace(format!(
                "chunk {index} needs {len} bytes but {before} of the device's memory limit of \
                 {max} bytes are in use"
            )));
        }
        let (mem, tier) = match alloc(index, len as usize) {
            Ok(mem) => mem,
            Err(e) => {
                self.usage.allocated.fetch_sub(len, Ordering::Relaxed);
                return Err(e);
            }
        };
        let fresh = self.charged(mem, len, tier);
        let prev = slot.compare_and_swap(&None::<Arc<Allocated<C>>>, Some(fresh.clone()));
        match &*prev {
            None => Ok(fresh),
            Some(winner) => Ok(winner.clone()),
        }
    }

    /// Wraps memory already charged to `allocated` in an [`Allocated`] that uncharges it.
    fn charged(&self, mem: C, len: u64, tier: Tier) -> Arc<Allocated<C>> {
        self.usage.chunks.fetch_add(1, Ordering::Relaxed);
        self.usage.tier_bytes[tier as usize].fetch_add(len, Ordering::Relaxed);
        self.usage.tier_chunks[tier as usize].fetch_add(1, Ordering::Relaxed);
        Arc::new(Allocated {
            mem,
            len,
            tier,
            state: ChunkState::default(),
            usage: self.usage.clone(),
        })
    }

    /// Puts `mem` (in `tier`, holding a copy of `old`'s bytes) in slot `index` in place of
    /// `old`, if the slot still holds `old`; otherwise (trimmed or replaced meanwhile)
    /// drops `mem` and returns false. Not charged against the cap: a move takes the new
    /// home before it lets go of the old one, and the total stays what it was.
    pub fn replace(&self, index: u64, old: &Arc<Allocated<C>>, mem: C, tier: Tier) -> bool {
        self.usage.allocated.fetch_add(old.len, Ordering::Relaxed);
        let fresh = self.charged(mem, old.len, tier);
        let prev = self.slots[index as usize].compare_and_swap(old, Some(fresh));
        matches!(&*prev, Some(p) if Arc::ptr_eq(p, old))
    }

    /// Empties slot `index`. The memory is freed once no request holds the chunk.
    pub fn free(&self, index: u64) -> bool {
        self.slots[index as usize].swap(None).is_some()
    }

    /// Appends the allocation state of `[offset, offset + len)` to `out`, merging runs.
    pub fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) {
        let start_len = out.len();
        for seg in self.segments(offset, len) {
            let hole = self.slots[seg.index as usize].load().is_none();
            let pos = offset + seg.range_offset as u64;
            let can_merge = out.len() > start_len;
            match out.last_mut() {
                Some(last) if can_merge && last.hole == hole => last.length += seg.len as u64,
                _ => out.push(Extent {
                    offset: pos,
                    length: seg.len as u64,
                    hole,
                    zero: hole,
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_split_at_chunk_boundaries() {
        let map: ChunkMap<()> = ChunkMap::new(10_000, 4096, None);
        assert_eq!(map.len(), 3);
        assert_eq!(map.chunk_len(2), 10_000 - 8192);
        let segs: Vec<_> = map.segments(4000, 5000).collect();
        assert_eq!(
            segs,
            vec![
                Segment {
                    index: 0,
                    chunk_offset: 4000,
                    len: 96,
                    range_offset: 0,
                    whole: false
                },
                Segment {
                    index: 1,
                    chunk_offset: 0,
                    len: 4096,
                    range_offset: 96,
                    whole: true
                },
                Segment {
                    index: 2,
                    chunk_offset: 0,
                    len: 808,
                    range_offset: 4192,
                    whole: false
                },
            ]
        );
        let last: Vec<_> = map.segments(8192, 10_000 - 8192).collect();
        assert!(last[0].whole, "the short last chunk counts as whole");
    }

    #[test]
    fn cap_refuses_and_free_returns_memory() {
        let map: ChunkMap<Vec<u8>> = ChunkMap::new(4 * 4096, 4096, Some(2 * 4096));
        let alloc = |_, len| Ok((vec![0u8; len], Tier::Primary));
        let a = map.get_or_alloc(0, alloc).unwrap();
        map.get_or_alloc(1, alloc).unwrap();
        assert_eq!(map.allocated(), 8192);
        assert!(matches!(
            map.get_or_alloc(2, alloc),
            Err(IoError::NoSpace(_))
        ));
        assert_eq!(map.allocated(), 8192, "a refused allocation is not charged");
        assert!(map.free(0));
        assert_eq!(
            map.allocated(),
            8192,
            "memory held by a request stays charged"
        );
        drop(a);
        assert_eq!(map.allocated(), 4096);
        assert_eq!(map.allocated_chunks(), 1);
        map.get_or_alloc(2, alloc).unwrap();

        let mut ext = Vec::new();
        map.extents(0, 4 * 4096, &mut ext);
        let runs: Vec<_> = ext.iter().map(|e| (e.offset, e.length, e.hole)).collect();
        assert_eq!(
            runs,
            vec![(0, 4096, true), (4096, 8192, false), (12288, 4096, true)]
        );
    }
}
