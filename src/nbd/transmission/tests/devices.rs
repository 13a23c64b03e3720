//! Device wrappers the tests slow down or watch.

use super::*;

/// A device that forwards to another but for what a test changes: with `slow_writes`,
/// writes wait before they land, as GPU copies do, and no memory is lent in place, as GPU
/// memory cannot be; with `lag`, reads begun are counted against the replies taken.
pub(super) struct Wrapped {
    pub(super) inner: Arc<dyn BlockDevice>,
    pub(super) slow_writes: bool,
    pub(super) lag: Option<Arc<ReadLag>>,
    /// Reads, writes and flushes complete on another thread some µs later, as the GPU's
    /// completion thread wakes them.
    pub(super) elsewhere: bool,
    /// Reads, writes and flushes started under a plug wait until the reader unplugs, as the
    /// GPU copy queue holds them (see `engine::plug`).
    pub(super) holder: Option<Arc<Holder>>,
    /// Reads and writes begun, and how many of them under [`crate::engine::Watched`].
    pub(super) watched: Option<Arc<[std::sync::atomic::AtomicU64; 2]>>,
}

/// A device whose writes wait before they land and that lends no memory, as a GPU's.
pub(super) fn slow_writes(inner: Arc<dyn BlockDevice>) -> Wrapped {
    Wrapped {
        inner,
        slow_writes: true,
        lag: None,
        elsewhere: false,
        holder: None,
        watched: None,
    }
}

/// Requests held under plugs until the reader unplugs, and how they went out.
#[derive(Default)]
pub(super) struct Holder {
    held: std::sync::Mutex<Vec<tokio::sync::oneshot::Sender<()>>>,
    /// Unplugs that let requests go, and the most one let go at once.
    pub(super) bursts: std::sync::atomic::AtomicU64,
    pub(super) most: std::sync::atomic::AtomicU64,
}

impl crate::engine::Unplug for Holder {
    fn unplug(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        let held = std::mem::take(&mut *self.held.lock().unwrap());
        if held.is_empty() {
            return;
        }
        self.bursts.fetch_add(1, SeqCst);
        self.most.fetch_max(held.len() as u64, SeqCst);
        for tx in held {
            let _ = tx.send(());
        }
    }
}

impl Wrapped {
    fn count_watched(&self) {
        if let Some(w) = &self.watched {
            use std::sync::atomic::Ordering::SeqCst;
            w[0].fetch_add(1, SeqCst);
            if crate::engine::watched() {
                w[1].fetch_add(1, SeqCst);
            }
        }
    }

    /// Under a plug, waits for the reader's unplug (nothing else lets it go).
    async fn held(&self) {
        let Some(holder) = self.holder.as_ref().filter(|_| crate::engine::plugged()) else {
            return;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        holder.held.lock().unwrap().push(tx);
        crate::engine::held_by(holder);
        rx.await.expect("the holder went away");
    }
}

/// How far a server runs ahead of its client: reads begun (on the device) against replies
/// the client has taken, and the most the first ever led the second by.
#[derive(Default)]
pub(super) struct ReadLag {
    pub(super) begun: std::sync::atomic::AtomicU64,
    pub(super) taken: std::sync::atomic::AtomicU64,
    pub(super) worst: std::sync::atomic::AtomicU64,
}

impl ReadLag {
    fn begin(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        let begun = self.begun.fetch_add(1, SeqCst) + 1;
        let ahead = begun.saturating_sub(self.taken.load(SeqCst));
        self.worst.fetch_max(ahead, SeqCst);
    }
}

#[async_trait::async_trait]
impl BlockDevice for Wrapped {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn buffers(&self) -> &crate::engine::BufferPool {
        self.inner.buffers()
    }
    fn stats(&self) -> crate::engine::DeviceStats {
        self.inner.stats()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> crate::engine::IoResult<()> {
        if let Some(lag) = &self.lag {
            lag.begin();
        }
        self.count_watched();
        self.held().await;
        if self.elsewhere {
            completed_elsewhere(20).await;
        }
        self.inner.read(offset, buf).await
    }
    fn view(&self, offset: u64, len: u64) -> Option<crate::engine::IoResult<crate::engine::View>> {
        if self.slow_writes || self.elsewhere || self.holder.is_some() {
            return None;
        }
        let view = self.inner.view(offset, len);
        if let (Some(lag), Some(_)) = (&self.lag, &view) {
            lag.begin();
        }
        view
    }
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> crate::engine::IoResult<()> {
        if self.slow_writes {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        self.count_watched();
        self.held().await;
        if self.elsewhere {
            completed_elsewhere(20).await;
        }
        self.inner.write(offset, data, fua).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> crate::engine::IoResult<()> {
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn trim(&self, offset: u64, len: u64) -> crate::engine::IoResult<()> {
        self.inner.trim(offset, len).await
    }
    async fn flush(&self) -> crate::engine::IoResult<()> {
        self.held().await;
        if self.elsewhere {
            completed_elsewhere(20).await;
        }
        self.inner.flush().await
    }
    async fn cache(&self, offset: u64, len: u64) -> crate::engine::IoResult<()> {
        self.inner.cache(offset, len).await
    }
    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> crate::engine::IoResult<()> {
        self.inner.extents(offset, len, out)
    }
}
