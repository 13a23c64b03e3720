//! The sparse map from chunk number to allocated backend memory.
//!
//! The map has two levels: a table of pages, each page [`PAGE_SLOTS`] slots, made on the
//! first write into its range. So a sparse device's metadata grows with what is written (a
//! 100 TiB device starts at about 100 KiB, not 400 MB), and a lookup stays two loads: the
//! page pointer, then the slot. Pages stay once made: freeing one under a lock-free reader
//! would need a reclamation scheme, and a page costs 1/64 of the 2 MiB chunk it may hold.
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
use once_cell::race::OnceBox;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// log2 of [`PAGE_SLOTS`].
const PAGE_SHIFT: u32 = 12;
/// Slots per page of the map: 32 KiB of slots, covering 8 GiB of 2 MiB chunks. Larger pages
/// make the first write into a range dearer and scattered writes hold more empty slots;
/// smaller ones grow the table every device pays for up front (100 TiB in 2 MiB chunks:
/// 12,800 pages, a 100 KiB table).
pub const PAGE_SLOTS: usize = 1 << PAGE_SHIFT;

/// One page of slots.
type Page<C> = [ArcSwapOption<Allocated<C>>; PAGE_SLOTS];

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

/// Optional chunks covering a device of `size` bytes, in pages made on demand.
pub struct ChunkMap<C> {
    pages: Box<[OnceBox<Page<C>>]>,
    /// Chunk slots (the device's size in chunks).
    count: u64,
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
        let count = size.div_ceil(chunk_size as u64);
        let pages = count.div_ceil(PAGE_SLOTS as u64) as usize;
        ChunkMap {
            pages: (0..pages).map(|_| OnceBox::new()).collect(),
            count,
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
        self.count
    }

    /// True for a zero-sized map.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of host memory the map itself holds: its page table and the pages made so far
    /// (not the chunks, and not what the chunks' memory handles hold).
    pub fn metadata_bytes(&self) -> u64 {
        let table = self.pages.len() * std::mem::size_of::<OnceBox<Page<C>>>();
        let made = self.pages.iter().filter(|p| p.get().is_some()).count();
        (table + made * std::mem::size_of::<Page<C>>()) as u64
    }

    /// The slot of chunk `index`, if its page has been made.
    fn slot(&self, index: u64) -> Option<&ArcSwapOption<Allocated<C>>> {
        debug_assert!(index < self.count, "chunk {index} is past the map's end");
        let page = self.pages[(index >> PAGE_SHIFT) as usize].get()?;
        Some(&page[index as usize & (PAGE_SLOTS - 1)])
    }

    /// The slot of chunk `index`, making its page if need be. Two writers that race to make
    /// one page both build it; one is published and the other dropped, unseen.
    fn slot_or_make(&self, index: u64) -> &ArcSwapOption<Allocated<C>> {
        debug_assert!(index < self.count, "chunk {index} is past the map's end");
        let page = self.pages[(index >> PAGE_SHIFT) as usize]
            .get_or_init(|| Box::new(std::array::from_fn(|_| ArcSwapOption::empty())));
        &page[index as usize & (PAGE_SLOTS - 1)]
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
        self.slot(index)?.load_full()
    }

    /// The chunk at `index`, allocating it with `alloc` if it is empty. The memory cap is
    /// charged before `alloc` runs; when two writers race to fill one slot, the loser's
    /// chunk is dropped (and its charge returned).
    pub fn get_or_alloc(
        &self,
        index: u64,
        alloc: impl FnOnce(u64, usize) -> IoResult<(C, Tier)>,
    ) -> IoResult<Arc<Allocated<C>>> {
        let slot = self.slot_or_make(index);
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
        // `old` came from this slot, so its page exists.
        let prev = self.slot_or_make(index).compare_and_swap(old, Some(fresh));
        matches!(&*prev, Some(p) if Arc::ptr_eq(p, old))
    }

    /// Empties slot `index`. The memory is freed once no request holds the chunk.
    pub fn free(&self, index: u64) -> bool {
        self.slot(index).is_some_and(|s| s.swap(None).is_some())
    }

    /// Appends the allocation state of `[offset, offset + len)` to `out`, merging runs.
    pub fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) {
        let start_len = out.len();
        for seg in self.segments(offset, len) {
            let hole = self.slot(seg.index).is_none_or(|s| s.load().is_none());
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

    #[test]
    fn pages_are_made_by_the_first_write_into_them_and_lookups_cross_their_borders() {
        let chunk = 2 << 20;
        let map: ChunkMap<u64> = ChunkMap::new(100 << 40, chunk, None);
        let empty = map.metadata_bytes();
        assert!(empty < 1 << 20, "an empty 100 TiB map holds {empty} bytes");
        let page = PAGE_SLOTS as u64;
        let page_bytes = std::mem::size_of::<Page<u64>>() as u64;
        let last = map.len() - 1;
        let alloc = |index: u64, _| Ok((index * 7 + 1, Tier::Primary));
        // (chunk, pages made once it is written)
        let writes = [
            (0, 1),
            (page - 1, 1),
            (page, 2),
            (2 * page - 1, 2),
            (2 * page, 3),
            (37 * page + 5, 4),
            (last, 5),
        ];
        for (i, made) in writes {
            map.get_or_alloc(i, alloc).unwrap();
            assert_eq!(map.metadata_bytes(), empty + made * page_bytes, "chunk {i}");
        }
        assert_eq!(map.allocated_chunks(), writes.len() as u64);
        assert_eq!(map.in_tier(Tier::Primary).1, writes.len() as u64);
        for (i, _) in writes {
            assert_eq!(map.get(i).map(|c| *c.mem()), Some(i * 7 + 1), "chunk {i}");
            for near in [i.wrapping_sub(2), i + 2] {
                if near < map.len() {
                    assert!(map.get(near).is_none(), "chunk {near} is not written");
                }
            }
        }
        // Lookups and frees in a page never made answer "hole" and make no page.
        assert!(map.get(5 * page).is_none());
        assert!(!map.free(5 * page + 1));
        let mut ext = Vec::new();
        map.extents(5 * page * chunk as u64, 3 * chunk as u64, &mut ext);
        assert_eq!(ext.len(), 1);
        assert!(ext[0].hole);
        assert_eq!(map.metadata_bytes(), empty + 5 * page_bytes);
        // Extents merge across a page border.
        ext.clear();
        let cs = chunk as u64;
        map.extents((page - 3) * cs, 6 * cs, &mut ext);
        let runs: Vec<_> = ext
            .iter()
            .map(|e| (e.offset / cs, e.length / cs, e.hole))
            .collect();
        assert_eq!(
            runs,
            vec![
                (page - 3, 2, true),
                (page - 1, 2, false),
                (page + 1, 2, true)
            ]
        );
        // Freed chunks read as holes; their page stays for the next write.
        assert!(map.free(page));
        assert!(map.get(page).is_none());
        assert_eq!(map.allocated_chunks(), writes.len() as u64 - 1);
        map.get_or_alloc(page, alloc).unwrap();
        assert_eq!(map.metadata_bytes(), empty + 5 * page_bytes);
    }

    #[test]
    fn writers_racing_into_fresh_pages_lose_no_chunk() {
        let threads = 8u64;
        let pages = 3u64;
        let count = pages * PAGE_SLOTS as u64;
        for round in 0..4 {
            let map: ChunkMap<u64> = ChunkMap::new(count * 4096, 4096, None);
            let start = std::sync::Barrier::new(threads as usize);
            std::thread::scope(|s| {
                for t in 0..threads {
                    let (map, start) = (&map, &start);
                    s.spawn(move || {
                        start.wait();
                        // Every thread takes every page's first slot (one chunk wins each),
                        // then its own share of slots, page by page.
                        for p in 0..pages {
                            let first = p * PAGE_SLOTS as u64;
                            map.get_or_alloc(first, |i, _| Ok((i, Tier::Primary)))
                                .unwrap();
                        }
                        for i in (t..count).step_by(threads as usize) {
                            let c = map.get_or_alloc(i, |i, _| Ok((i, Tier::Primary))).unwrap();
                            assert_eq!(*c.mem(), i);
                        }
                    });
                }
            });
            for i in 0..count {
                assert_eq!(
                    map.get(i).map(|c| *c.mem()),
                    Some(i),
                    "round {round}, chunk {i}"
                );
            }
            assert_eq!(map.allocated_chunks(), count, "round {round}");
            assert_eq!(map.allocated(), count * 4096, "round {round}");
        }
    }
}
