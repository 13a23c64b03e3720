//! [`ReadOnlyDevice`]: a read-only view of a device, so that a `--read-only` export can
//! still be filled from a `--load` file before it is served.

use crate::engine::{
    BlockDevice, BufferPool, Capabilities, DeviceStats, Extent, IoError, IoResult, View, ZeroFlags,
};
use async_trait::async_trait;
use std::sync::Arc;

/// Forwards reads, flushes, cache hints and extents; refuses every change with
/// [`IoError::ReadOnly`].
pub struct ReadOnlyDevice {
    inner: Arc<dyn BlockDevice>,
}

impl ReadOnlyDevice {
    /// A read-only view of `inner`.
    pub fn new(inner: Arc<dyn BlockDevice>) -> Self {
        ReadOnlyDevice { inner }
    }
}

#[async_trait]
impl BlockDevice for ReadOnlyDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: true,
            can_trim: false,
            can_zero: false,
            can_fast_zero: false,
            ..self.inner.capabilities()
        }
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn buffers(&self) -> &BufferPool {
        self.inner.buffers()
    }
    fn stats(&self) -> DeviceStats {
        self.inner.stats()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> IoResult<()> {
        self.inner.read(offset, buf).await
    }
    fn view(&self, offset: u64, len: u64) -> Option<IoResult<View>> {
        self.inner.view(offset, len)
    }
    async fn write(&self, _: u64, _: &[u8], _: bool) -> IoResult<()> {
        Err(IoError::ReadOnly)
    }
    async fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> IoResult<()> {
        Err(IoError::ReadOnly)
    }
    async fn trim(&self, _: u64, _: u64) -> IoResult<()> {
        Err(IoError::ReadOnly)
    }
    async fn flush(&self) -> IoResult<()> {
        self.inner.flush().await
    }
    async fn cache(&self, offset: u64, len: u64) -> IoResult<()> {
        self.inner.cache(offset, len).await
    }
    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> IoResult<()> {
        self.inner.extents(offset, len, out)
    }
}
