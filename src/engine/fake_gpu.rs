//! [`FakeGpuBackend`]: host RAM that behaves like a GPU shared with other programs, so the
//! tier logic (watermark, yield, spill and promotion) runs in CI, where there is no GPU.
//!
//! It has a total size; "other programs" take part of it, set by a test through
//! [`FakeGpuBackend::others`] or a file holding a byte count (re-read each time free memory
//! is asked for, as `cuMemGetInfo` would see another process grow). Allocation honours
//! `--keep-free` as the CUDA backend does, and the CPU cannot read chunks in place, so
//! frontends take the same copy path as for GPU memory.

use super::host::{HeapAllocator, HostBackend, HostChunk};
use super::{Backend, HostAllocator, IoError, IoResult};
use async_trait::async_trait;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::task::Waker;

/// A pretend GPU of `total` bytes in host RAM.
pub struct FakeGpuBackend {
    host: HostBackend,
    total: u64,
    keep_free: u64,
    ours: Arc<AtomicU64>,
    others: Arc<AtomicU64>,
    others_file: Option<PathBuf>,
    /// Copies complete later, woken from another thread ([`FakeGpuBackend::async_copies`]).
    async_copies: bool,
}

/// One chunk of the pretend GPU.
pub struct FakeChunk {
    inner: HostChunk,
    len: u64,
    ours: Arc<AtomicU64>,
}

impl Drop for FakeChunk {
    fn drop(&mut self) {
        self.ours.fetch_sub(self.len, Ordering::Relaxed);
    }
}

impl FakeGpuBackend {
    /// A pretend GPU of `total` bytes leaving `keep_free` free; with `others_file`, the
    /// bytes other programs use are read from that file (a decimal count; missing: 0).
    pub fn new(total: u64, keep_free: u64, others_file: Option<PathBuf>) -> Self {
        FakeGpuBackend {
            host: HostBackend::new(),
            total,
            keep_free,
            ours: Arc::new(AtomicU64::new(0)),
            others: Arc::new(AtomicU64::new(0)),
            others_file,
            async_copies: false,
        }
    }

    /// With `on`, every copy completes as a GPU's does: its future is pending at first,
    /// and woken from another thread (a GPU's copy queue has its poller), so that frontends
    /// which keep copies in flight are tested where there is no GPU.
    pub fn async_copies(mut self, on: bool) -> Self {
        self.async_copies = on;
        self
    }

    async fn copy_wait(&self) {
        if self.async_copies {
            Later::default().await;
        }
    }

    /// The bytes "other programs" use; a test stores into it to squeeze or release.
    pub fn others(&self) -> Arc<AtomicU64> {
        self.others.clone()
    }

    fn refresh(&self) {
        if let Some(path) = &self.others_file {
            let n = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            self.others.store(n, Ordering::Relaxed);
        }
    }

    fn free(&self) -> u64 {
        self.total
            .saturating_sub(self.ours.load(Ordering::Relaxed))
            .saturating_sub(self.others.load(Ordering::Relaxed))
    }
}

/// Pending once, then woken by the completer thread: the copy "runs" meanwhile.
#[derive(Default)]
struct Later(bool);

impl std::future::Future for Later {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        static COMPLETER: OnceLock<Mutex<mpsc::Sender<Waker>>> = OnceLock::new();
        let tx = COMPLETER.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Waker>();
            std::thread::Builder::new()
                .name("fake-gpu-completer".into())
                .spawn(move || rx.into_iter().for_each(Waker::wake))
                .expect("starting the fake GPU's completer thread");
            Mutex::new(tx)
        });
        let sent = tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(cx.waker().clone());
        if sent.is_err() {
            cx.waker().wake_by_ref();
        }
        std::task::Poll::Pending
    }
}

#[async_trait]
impl Backend for FakeGpuBackend {
    type Chunk = FakeChunk;

    fn describe(&self) -> String {
        format!("fake GPU ({} bytes of host RAM)", self.total)
    }

    fn host_allocator(&self) -> Arc<dyn HostAllocator> {
        Arc::new(HeapAllocator)
    }

    fn alloc_chunk(&self, index: u64, len: usize) -> IoResult<FakeChunk> {
        // Like cuMemCreate: a program that frees memory shows at once, so look again.
        self.refresh();
        let free = self.free();
        if free < len as u64 + self.keep_free {
            return Err(IoError::NoSpace(format!(
                "the fake GPU has {free} bytes free and --keep-free asks to leave {}",
                self.keep_free
            )));
        }
        self.ours.fetch_add(len as u64, Ordering::Relaxed);
        match self.host.alloc_chunk(index, len) {
            Ok(inner) => Ok(FakeChunk {
                inner,
                len: len as u64,
                ours: self.ours.clone(),
            }),
            Err(e) => {
                self.ours.fetch_sub(len as u64, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    fn shared_memory(&self, position: usize) -> Option<IoResult<(u64, u64)>> {
        (position == 0).then(|| {
            self.refresh();
            Ok((self.free(), self.total))
        })
    }

    fn keep_free(&self, _position: usize) -> u64 {
        self.keep_free
    }

    fn memory_name(&self, _position: usize) -> String {
        "the fake GPU".into()
    }

    async fn read(&self, chunk: &FakeChunk, offset: usize, buf: &mut [u8]) -> IoResult<()> {
        self.copy_wait().await;
        self.host.read(&chunk.inner, offset, buf).await
    }

    async fn write(&self, chunk: &FakeChunk, offset: usize, data: &[u8]) -> IoResult<()> {
        self.copy_wait().await;
        self.host.write(&chunk.inner, offset, data).await
    }

    async fn zero(&self, chunk: &FakeChunk, offset: usize, len: usize) -> IoResult<()> {
        self.host.zero(&chunk.inner, offset, len).await
    }
}
