//! The storage engine: one interface for every frontend, one sparse map for every backend.
//!
//! Frontends (the NBD server, FUSE, ublk) see only [`BlockDevice`]: capability queries and
//! byte-range operations, in the spirit of nbdkit's plugin table. They never see a chunk or a
//! GPU pointer. [`SparseDevice`] implements [`BlockDevice`] over a [`ChunkMap`]: the device
//! has a fixed advertised size, but memory is taken from a [`Backend`] one chunk at a time,
//! the first time a chunk is written, and given back when TRIM or write-zeroes covers a whole
//! chunk. Backends (host RAM, CUDA) know nothing of NBD and only store chunks.
//!
//! Data moves through [`IoBuf`]s from the device's [`BufferPool`]: for the CUDA backend they
//! are pinned host memory, so a payload read off a socket straight into one can be copied to
//! the GPU by DMA with no staging copy. The pool is bounded, which is how in-flight data is
//! capped for the whole process.

mod backend;
mod buffer;
mod chunk_map;
mod error;
pub mod error_log;
pub mod fake_gpu;
pub mod host;
pub mod metered;
pub mod persist;
mod plug;
mod sparse;
pub mod tier;
mod view;

pub mod cuda;

pub use backend::{Backend, HostAllocator};
pub use buffer::{BufferBudget, BufferPool, IoBuf};
pub use chunk_map::ChunkMap;
pub use error::{IoError, IoResult};
pub use plug::{Plug, Watched, plugged, unplug, watched};
pub(crate) use plug::{Unplug, held_by};
pub use sparse::{SparseDevice, SparseOptions};
pub use view::View;

use async_trait::async_trait;

/// What a device can do; asked once per export by each frontend (NBD transmission flags,
/// FUSE and ublk parameters).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Writes, trims and zeroes are refused with [`IoError::ReadOnly`].
    pub read_only: bool,
    /// `flush` does something a client should wait for.
    pub can_flush: bool,
    /// Writes honour a force-unit-access flag.
    pub can_fua: bool,
    /// `trim` releases storage.
    pub can_trim: bool,
    /// `write_zeroes` is efficient (no data crosses the wire).
    pub can_zero: bool,
    /// `write_zeroes` with `fast` set either succeeds quickly or fails with
    /// [`IoError::FastZeroUnsupported`] before doing anything.
    pub can_fast_zero: bool,
    /// Several connections see one consistent device, and a flush on any of them makes
    /// every write completed on any of them durable.
    pub can_multi_conn: bool,
    /// `cache` (prefetch) is meaningful.
    pub can_cache: bool,
    /// `extents` reports holes and zeroes.
    pub can_extents: bool,
    /// Smallest request size that is not slower than a larger one (never required).
    pub min_block: u32,
    /// Request size and alignment that performs best.
    pub preferred_block: u32,
    /// Largest data payload a single request may carry.
    pub max_block: u32,
}

/// One run of blocks with the same allocation state, as reported by [`BlockDevice::extents`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Start of the run, in bytes from the start of the device.
    pub offset: u64,
    /// Length of the run in bytes.
    pub length: u64,
    /// No storage is allocated (NBD_STATE_HOLE).
    pub hole: bool,
    /// The run reads as zeros (NBD_STATE_ZERO).
    pub zero: bool,
}

/// How a [`BlockDevice::write_zeroes`] may be carried out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Storage may be released (the opposite of NBD's NO_HOLE).
    pub may_trim: bool,
    /// Fail with [`IoError::FastZeroUnsupported`] rather than doing slow work.
    pub fast: bool,
    /// Force unit access: the zeroes are durable when the call returns.
    pub fua: bool,
}

/// Counters a frontend can show (`vramdisk status`, FUSE statfs, logs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Advertised size in bytes.
    pub size: u64,
    /// Backend memory currently held for data, in bytes.
    pub allocated: u64,
    /// The cap on `allocated`, if any.
    pub max_memory: Option<u64>,
    /// Number of chunks currently allocated.
    pub chunks: u64,
    /// Bytes of `allocated` moved out to spill RAM (the rest is in the backend's memory,
    /// or in the spill file).
    pub spilled_ram: u64,
    /// Bytes of `allocated` in the spill file.
    pub spilled_file: u64,
}

/// A block device as every frontend sees it: a fixed size, capabilities, and byte-range
/// operations that may run concurrently from many tasks.
///
/// Ranges are in bytes and need no alignment. Every operation checks its range against
/// [`BlockDevice::size`] and fails with [`IoError::OutOfRange`] rather than touching memory
/// outside the device. Concurrent operations on overlapping ranges complete in some order but
/// never corrupt bytes outside those ranges.
#[async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes advertised to clients.
    fn size(&self) -> u64;
    /// What the device supports.
    fn capabilities(&self) -> Capabilities;
    /// A short human description for logs: "host RAM", "cuda:0 NVIDIA H200".
    fn describe(&self) -> String;
    /// Where frontends get buffers for payloads (pinned for GPU backends).
    fn buffers(&self) -> &BufferPool;
    /// Current usage counters.
    fn stats(&self) -> DeviceStats;

    /// Reads `buf.len()` bytes at `offset` into `buf`. Unwritten ranges read as zeros.
    async fn read(&self, offset: u64, buf: &mut [u8]) -> IoResult<()>;
    /// Writes `data` at `offset`; with `fua`, the data is durable when this returns.
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> IoResult<()>;
    /// Makes `len` bytes at `offset` read as zeros.
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoResult<()>;
    /// Tells the device `len` bytes at `offset` are no longer needed. They read as zeros
    /// afterwards (stronger than NBD requires, and what swap and filesystems expect).
    async fn trim(&self, offset: u64, len: u64) -> IoResult<()>;
    /// Makes every completed write durable (as far as this medium has durability).
    async fn flush(&self) -> IoResult<()>;
    /// Hints that `len` bytes at `offset` will be read soon.
    async fn cache(&self, offset: u64, len: u64) -> IoResult<()>;
    /// Appends the allocation state of `[offset, offset + len)` to `out`, in order, merging
    /// neighbours with the same state. Touches only metadata, never backend memory.
    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> IoResult<()>;

    /// `[offset, offset + len)` lent in place, where the device's memory is host memory the
    /// CPU can read: a frontend sends it without copying it first. `None` where it is not
    /// (GPU memory): use [`BlockDevice::read`]. Counts as a read.
    fn view(&self, _offset: u64, _len: u64) -> Option<IoResult<View>> {
        None
    }

    /// Writes `data` at `offset` there and then, where the device can without waiting (host
    /// memory): what [`BlockDevice::write`] does, without a future, which a dyn-compatible
    /// async call has to allocate. `None`, having written nothing, where it cannot (GPU
    /// memory, a chunk being moved, a range over several chunks, `fua`): use
    /// [`BlockDevice::write`]. A wrapper that does not forward it (the default) sees every
    /// write through [`BlockDevice::write`].
    fn write_now(&self, _offset: u64, _data: &[u8], _fua: bool) -> Option<IoResult<()>> {
        None
    }
}

/// Checks that `[offset, offset + len)` lies inside a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> IoResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(IoError::OutOfRange { offset, len, size }),
    }
}
