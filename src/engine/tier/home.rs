//! [`Home`]: what a slot of the chunk map holds, and copies in and out of it wherever it is.

use super::file::FileChunk;
use super::ram::RamChunk;
use crate::engine::host::copy_into_chunk;
use crate::engine::{Backend, IoResult};
use std::ptr::NonNull;

/// Where one chunk's bytes live.
pub enum Home<C> {
    /// In the backend's memory (a GPU).
    Primary(C),
    /// In spill RAM.
    Ram(RamChunk),
    /// In the spill file.
    File(FileChunk),
}

impl<C: Send + Sync + 'static> Home<C> {
    /// Copies `buf.len()` bytes at `offset` into `buf`.
    pub async fn read<B: Backend<Chunk = C>>(
        &self,
        backend: &B,
        offset: usize,
        buf: &mut [u8],
    ) -> IoResult<()> {
        match self {
            Home::Primary(c) => backend.read(c, offset, buf).await,
            Home::Ram(r) => {
                let src = r.range(offset, buf.len())?;
                // SAFETY: src is valid for buf.len() bytes (checked) and is not buf.
                unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
                Ok(())
            }
            Home::File(f) => f.read(offset, buf),
        }
    }

    /// Copies `data` to `offset`.
    pub async fn write<B: Backend<Chunk = C>>(
        &self,
        backend: &B,
        offset: usize,
        data: &[u8],
    ) -> IoResult<()> {
        match self {
            Home::Primary(c) => backend.write(c, offset, data).await,
            Home::Ram(r) => {
                let dst = r.range(offset, data.len())?;
                // SAFETY: dst is valid for data.len() bytes (checked) and is not data.
                unsafe { copy_into_chunk(dst, data) };
                Ok(())
            }
            Home::File(f) => f.write(offset, data),
        }
    }

    /// Copies `data` to `offset` at once where the CPU reaches the chunk (host memory, spill
    /// RAM, the spill file): the copy [`Home::write`] makes, without its future. `None`,
    /// having written nothing, where the copy has to wait (device memory).
    pub fn write_now<B: Backend<Chunk = C>>(
        &self,
        backend: &B,
        offset: usize,
        data: &[u8],
    ) -> Option<IoResult<()>> {
        let dst = match self {
            Home::Primary(c) => backend.host_bytes(c, offset, data.len())?.as_ptr(),
            Home::Ram(r) => match r.range(offset, data.len()) {
                Ok(dst) => dst,
                Err(e) => return Some(Err(e)),
            },
            Home::File(f) => return Some(f.write(offset, data)),
        };
        // SAFETY: dst is valid for data.len() bytes (the backend vouches for host bytes, the
        // spill RAM's range is checked) and is not data.
        unsafe { copy_into_chunk(dst, data) };
        Some(Ok(()))
    }

    /// Sets `len` bytes at `offset` to zero.
    pub async fn zero<B: Backend<Chunk = C>>(
        &self,
        backend: &B,
        offset: usize,
        len: usize,
    ) -> IoResult<()> {
        match self {
            Home::Primary(c) => backend.zero(c, offset, len).await,
            Home::Ram(r) => {
                let dst = r.range(offset, len)?;
                // SAFETY: dst is valid for len bytes (checked).
                unsafe { std::ptr::write_bytes(dst, 0, len) };
                Ok(())
            }
            Home::File(f) => f.zero(offset, len),
        }
    }

    /// Where `len` bytes at `offset` lie in host memory, if the CPU can read them in place.
    pub fn host_bytes<B: Backend<Chunk = C>>(
        &self,
        backend: &B,
        offset: usize,
        len: usize,
    ) -> Option<NonNull<u8>> {
        match self {
            Home::Primary(c) => backend.host_bytes(c, offset, len),
            Home::Ram(r) => r.range(offset, len).ok().and_then(NonNull::new),
            Home::File(_) => None,
        }
    }
}
