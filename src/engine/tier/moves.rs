//! Moving one chunk between tiers: [`SparseDevice::demote`] (out of the backend's memory)
//! and [`SparseDevice::promote`] (back into it). The protocol that keeps racing writes whole
//! is in the [module docs](super).

use super::{Home, Tier};
use crate::engine::sparse::Slot;
use crate::engine::{Backend, IoError, IoResult, SparseDevice};
use std::sync::Arc;
use std::time::Duration;

/// What became of one move.
#[derive(Debug)]
pub(crate) enum Moved {
    /// The chunk moved; this many bytes changed tier.
    Done(u64),
    /// Nothing to do: the chunk is gone, already elsewhere, or another move has it.
    Skipped,
}

/// Why a move could not be made; the chunk stays where it was, whole.
#[derive(Debug)]
pub(crate) enum MoveError {
    /// The spill tiers have no free slot.
    SpillFull,
    /// The backend has no room for the chunk.
    NoRoom,
    /// A copy failed.
    Io(IoError),
}

impl From<IoError> for MoveError {
    fn from(e: IoError) -> Self {
        MoveError::Io(e)
    }
}

impl<B: Backend> SparseDevice<B> {
    /// Waits for the writes that pinned `chunk` before its move began. Writes are single
    /// copies (microseconds), so a short spin then a coarse sleep is enough.
    async fn drain_writers(&self, chunk: &Slot<B::Chunk>) {
        let mut spins = 0u32;
        while chunk.state().writers() > 0 {
            spins += 1;
            if spins < 256 {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
    }

    /// Publishes a finished copy (or undoes a failed one) and wakes waiting writes.
    fn finish(
        &self,
        index: u64,
        old: &Arc<Slot<B::Chunk>>,
        new: Home<B::Chunk>,
        tier: Tier,
        copied: IoResult<()>,
    ) -> Result<Moved, MoveError> {
        let result = match copied {
            Ok(()) => {
                if self.map.replace(index, old, new, tier) {
                    Ok(Moved::Done(old.len()))
                } else {
                    // Trimmed (and maybe written afresh) while we copied: the copy is stale.
                    Ok(Moved::Skipped)
                }
            }
            Err(e) => {
                old.state().abort_move();
                Err(MoveError::Io(e))
            }
        };
        self.moved.notify_waiters();
        result
    }

    /// Moves chunk `index` from the backend's memory to spill RAM, or to the spill file when
    /// RAM is full. The destination is taken first, so a full spill tier changes nothing.
    pub(crate) async fn demote(&self, index: u64) -> Result<Moved, MoveError> {
        let Some(old) = self.map.get(index) else {
            return Ok(Moved::Skipped);
        };
        let Home::Primary(src) = old.mem() else {
            return Ok(Moved::Skipped);
        };
        let len = old.len() as usize;
        let dest = match &self.spill.ram {
            Some(ram) => ram.alloc()?.map(Home::Ram),
            None => None,
        };
        let dest = match dest {
            Some(d) => d,
            None => match self.spill.file.as_ref().and_then(|f| f.alloc()) {
                Some(f) => Home::File(f),
                None => return Err(MoveError::SpillFull),
            },
        };
        if !old.state().start_move() {
            return Ok(Moved::Skipped);
        }
        self.drain_writers(&old).await;
        let (copied, tier) = match &dest {
            Home::Ram(r) => {
                let copied = async {
                    let dst = r.range(0, len)?;
                    // SAFETY: the slot is ours alone until it is in the map, and len fits it.
                    let dst = unsafe { std::slice::from_raw_parts_mut(dst, len) };
                    self.backend.read(src, 0, dst).await
                }
                .await;
                (copied, Tier::Ram)
            }
            Home::File(f) => {
                let copied = async {
                    let mut buf = self.buffers.get(len).await?;
                    self.backend.read(src, 0, &mut buf[..len]).await?;
                    f.write(0, &buf[..len])
                }
                .await;
                (copied, Tier::File)
            }
            Home::Primary(_) => unreachable!("a demotion goes to a spill tier"),
        };
        self.finish(index, &old, dest, tier, copied)
    }

    /// Moves spilled chunk `index` back into the backend's memory, if it has room.
    pub(crate) async fn promote(&self, index: u64) -> Result<Moved, MoveError> {
        let Some(old) = self.map.get(index) else {
            return Ok(Moved::Skipped);
        };
        if old.tier() == Tier::Primary || old.state().is_moving() {
            return Ok(Moved::Skipped);
        }
        let len = old.len() as usize;
        let fresh = match self.backend.alloc_chunk(index, len) {
            Ok(c) => c,
            Err(IoError::NoSpace(_)) => return Err(MoveError::NoRoom),
            Err(e) => return Err(MoveError::Io(e)),
        };
        if !old.state().start_move() {
            return Ok(Moved::Skipped);
        }
        self.drain_writers(&old).await;
        let copied = match old.mem() {
            Home::Ram(r) => {
                async {
                    let src = r.range(0, len)?;
                    // SAFETY: no write lands in the slot while the chunk moves; len fits it.
                    let src = unsafe { std::slice::from_raw_parts(src, len) };
                    self.backend.write(&fresh, 0, src).await
                }
                .await
            }
            Home::File(f) => {
                async {
                    let mut buf = self.buffers.get(len).await?;
                    f.read(0, &mut buf[..len])?;
                    self.backend.write(&fresh, 0, &buf[..len]).await
                }
                .await
            }
            Home::Primary(_) => unreachable!("checked above"),
        };
        self.finish(index, &old, Home::Primary(fresh), Tier::Primary, copied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fake_gpu::FakeGpuBackend;
    use crate::engine::tier::{SpillFile, SpillRam, SpillStore};
    use crate::engine::{BlockDevice, SparseOptions, ZeroFlags};
    use std::sync::atomic::{AtomicBool, Ordering};

    const CHUNK: usize = 64 << 10;

    fn device(chunks: usize, file: Option<&std::path::Path>) -> Arc<SparseDevice<FakeGpuBackend>> {
        let mut opts = SparseOptions::new((chunks * CHUNK) as u64);
        opts.chunk_size = CHUNK;
        let spill = SpillStore {
            ram: Some(SpillRam::new(CHUNK, (chunks * CHUNK / 2) as u64)),
            file: file.map(|p| SpillFile::create(p, (chunks * CHUNK) as u64, CHUNK).unwrap()),
        };
        let backend = FakeGpuBackend::new((chunks * CHUNK) as u64 * 2, 0, None);
        Arc::new(SparseDevice::with_spill(backend, opts, spill).unwrap())
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (seed.wrapping_mul(0x9e37).wrapping_add(i as u64 * 13) % 251) as u8)
            .collect()
    }

    /// Writers, zeroes and trims hammer four chunks while a mover sends them out (to RAM
    /// and, once RAM is full, to the file) and back as fast as it can. Each writer owns a
    /// slice of every chunk and checks each read against its model: a write lost or torn by
    /// a move shows as a mismatch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn writes_racing_moves_land_whole() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device(8, Some(&dir.path().join("spill")));
        const OWNERS: usize = 4;
        const SLICE: usize = CHUNK / OWNERS;
        let stop = Arc::new(AtomicBool::new(false));
        // The mover has a thread of its own: the owners' copies never yield, and on shared
        // runtime workers they would starve it.
        let mover = {
            let (dev, stop) = (dev.clone(), stop.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let (mut out, mut back) = (0u64, 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        for i in 0..4u64 {
                            if let Ok(Moved::Done(_)) = dev.demote(i).await {
                                out += 1;
                            }
                        }
                        for i in 0..4u64 {
                            if let Ok(Moved::Done(_)) = dev.promote(i).await {
                                back += 1;
                            }
                        }
                    }
                    (out, back)
                })
            })
        };
        let owners: Vec<_> = (0..OWNERS)
            .map(|t| {
                let dev = dev.clone();
                tokio::spawn(async move {
                    let mut model = [0u64; 4];
                    let mut version = 0u64;
                    let mut buf = vec![0u8; SLICE];
                    for round in 0..20000u64 {
                        let c = (round * 7 + t as u64) % 4;
                        let off = c * CHUNK as u64 + (t * SLICE) as u64;
                        match round % 5 {
                            0..=2 => {
                                version += 1;
                                let seed = version << 8 | t as u64;
                                dev.write(off, &pattern(seed, SLICE), false).await.unwrap();
                                model[c as usize] = seed;
                            }
                            3 => {
                                let flags = ZeroFlags::default();
                                dev.write_zeroes(off, SLICE as u64, flags).await.unwrap();
                                model[c as usize] = 0;
                            }
                            _ => {}
                        }
                        dev.read(off, &mut buf).await.unwrap();
                        let want = match model[c as usize] {
                            0 => vec![0u8; SLICE],
                            s => pattern(s, SLICE),
                        };
                        assert!(buf == want, "owner {t} chunk {c} round {round}: wrong data");
                    }
                })
            })
            .collect();
        for o in owners {
            o.await.unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        let (out, back) = mover.join().unwrap();
        assert!(
            out > 20 && back > 20,
            "too few moves: {out} out, {back} back"
        );
    }

    /// A trim that frees a chunk while it is moving wins: the move drops its copy, and the
    /// chunk reads as zeros afterwards.
    #[tokio::test]
    async fn a_trim_during_a_move_is_not_undone() {
        let dev = device(4, None);
        dev.write(0, &pattern(1, CHUNK), false).await.unwrap();
        let chunk = dev.map.get(0).unwrap();
        // Pin a write so the move has to wait, then trim while it waits.
        let pin = chunk.state().pin_write().unwrap();
        let moving = {
            let dev = dev.clone();
            tokio::spawn(async move { dev.demote(0).await })
        };
        while !chunk.state().is_moving() {
            tokio::task::yield_now().await;
        }
        dev.trim(0, CHUNK as u64).await.unwrap();
        drop(pin);
        assert!(matches!(moving.await.unwrap(), Ok(Moved::Skipped)));
        let mut buf = vec![1u8; CHUNK];
        dev.read(0, &mut buf).await.unwrap();
        assert!(
            buf.iter().all(|&b| b == 0),
            "the trim was undone by the move"
        );
        assert_eq!(dev.stats().spilled_ram, 0, "the stale copy was kept");
    }

    /// With spill RAM and file full, a demotion is refused and the chunk stays whole.
    #[tokio::test]
    async fn a_full_spill_tier_refuses_and_keeps_the_data() {
        let dev = device(4, None);
        for i in 0..4u64 {
            dev.write(i * CHUNK as u64, &pattern(i, CHUNK), false)
                .await
                .unwrap();
        }
        assert!(matches!(dev.demote(0).await, Ok(Moved::Done(_))));
        assert!(matches!(dev.demote(1).await, Ok(Moved::Done(_))));
        assert!(matches!(dev.demote(2).await, Err(MoveError::SpillFull)));
        assert_eq!(dev.stats().spilled_ram, 2 * CHUNK as u64);
        for i in 0..4u64 {
            let mut buf = vec![0u8; CHUNK];
            dev.read(i * CHUNK as u64, &mut buf).await.unwrap();
            assert!(buf == pattern(i, CHUNK), "chunk {i} changed");
        }
        // Trimming a spilled chunk frees its spill slot.
        dev.trim(0, CHUNK as u64).await.unwrap();
        assert_eq!(dev.stats().spilled_ram, CHUNK as u64);
        assert!(matches!(dev.demote(2).await, Ok(Moved::Done(_))));
    }
}
