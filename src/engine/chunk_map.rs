//! The sparse map from chunk number to allocated backend memory.
//!
//! Each slot is an `ArcSwapOption`: an I/O takes a reference to its chunk with one atomic
//! load and never holds a lock while data moves, so requests on different chunks, or on
//! disjoint ranges of one chunk, never wait for each other. Freeing a chunk swaps its slot to
//! empty; the memory goes back to the backend when the last in-flight request that still
//! holds the chunk finishes, so a TRIM can never free memory under a running copy.

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
}

/// One allocated chunk: the backend's memory plus the accounting that frees it.
pub struct Allocated<C> {
    mem: C,
    len: u64,
    usage: Arc<Usage>,
}

impl<C> Allocated<C> {
    /// The backend memory of this chunk.
    pub fn mem(&self) -> &C {
        &self.mem
    }
}

impl<C> Drop for Allocated<C> {
    fn drop(&mut self) {
        self.usage.allocated.fetch_sub(self.len, Ordering::Relaxed);
        self.usage.chunks.fetch_sub(1, Ordering::Relaxed);
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
        alloc: impl FnOnce(u64, usize) -> IoResult<C>,
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
                "chunk {index} needs {len} bytes but {before} of the {max} bytes allowed by \
                 --max-memory are in use"
            )));
        }
        let mem = match alloc(index, len as usize) {
            Ok(mem) => mem,
            Err(e) => {
                self.usage.allocated.fetch_sub(len, Ordering::Relaxed);
                return Err(e);
            }
        };
        self.usage.chunks.fetch_add(1, Ordering::Relaxed);
        let fresh = Arc::new(Allocated {
            mem,
            len,
            usage: self.usage.clone(),
        });
        let prev = slot.compare_and_swap(&None::<Arc<Allocated<C>>>, Some(fresh.clone()));
        match &*prev {
            None => Ok(fresh),
            Some(winner) => Ok(winner.clone()),
        }
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
        let alloc = |_, len| Ok(vec![0u8; len]);
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
