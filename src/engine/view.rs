//! [`View`]: a range of the device lent in place, so a frontend can send it without copying.
//!
//! A read reply over a socket normally costs two copies: chunk to buffer, buffer to the
//! kernel. Where chunks are ordinary host memory, the first is avoidable: the reply's
//! `writev` can point at the chunks themselves. On the 2-CPU development machine a 1 MiB
//! read reply spent a quarter of the connection thread's time in that first copy.
//!
//! A view holds every chunk it points into, so a TRIM that frees a chunk meanwhile only
//! empties the chunk's slot; the memory goes back when the view is dropped.

use std::io::IoSlice;
use std::ptr::NonNull;
use std::sync::Arc;

/// Zeros for the holes of a view, lent as many times as a hole needs. Never written, and
/// in zero-initialised memory, so it costs no RAM until read (and then one shared page).
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

enum Piece {
    /// Bytes of a chunk; `_hold` keeps the chunk allocated.
    Mem {
        _hold: Arc<dyn Send + Sync>,
        ptr: NonNull<u8>,
        len: usize,
    },
    /// A hole: reads as zeros.
    Zeros(usize),
}

/// Device bytes in host memory, lent in place (see [`crate::engine::BlockDevice::view`]).
#[derive(Default)]
pub struct View {
    /// The first piece, kept inline: most reads lie in one chunk, and then making the view
    /// allocates nothing.
    first: Option<Piece>,
    /// The pieces after the first.
    rest: Vec<Piece>,
    len: usize,
}

// SAFETY: the pointers are into chunks that `_hold` keeps alive, and the view only ever
// reads through them, from whichever thread holds it.
unsafe impl Send for View {}
// SAFETY: as above; `&View` gives nothing but reads.
unsafe impl Sync for View {}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("len", &self.len)
            .field("pieces", &self.pieces().count())
            .finish()
    }
}

impl View {
    /// An empty view.
    pub fn new() -> View {
        View::default()
    }

    /// Appends `len` bytes at `ptr`, inside the memory that `hold` owns.
    ///
    /// # Safety
    /// `ptr` must be valid for reads of `len` bytes for as long as `hold` is alive.
    /// Concurrent writes to those bytes are allowed: like a read request that overlaps a
    /// write in flight, the view may then show old bytes, new ones, or a mix.
    pub unsafe fn push_mem(&mut self, hold: Arc<dyn Send + Sync>, ptr: NonNull<u8>, len: usize) {
        if len == 0 {
            return;
        }
        self.len += len;
        self.push(Piece::Mem {
            _hold: hold,
            ptr,
            len,
        });
    }

    /// Appends `len` bytes of zeros.
    pub fn push_zeros(&mut self, len: usize) {
        if len == 0 {
            return;
        }
        self.len += len;
        match self.rest.last_mut().or(self.first.as_mut()) {
            Some(Piece::Zeros(n)) => *n += len,
            _ => self.push(Piece::Zeros(len)),
        }
    }

    fn push(&mut self, piece: Piece) {
        if self.first.is_none() {
            self.first = Some(piece);
        } else {
            self.rest.push(piece);
        }
    }

    fn pieces(&self) -> impl Iterator<Item = &Piece> {
        self.first.iter().chain(&self.rest)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends slices covering the whole view, in order, to `out`.
    pub fn slices<'a>(&'a self, out: &mut Vec<IoSlice<'a>>) {
        for p in self.pieces() {
            match p {
                Piece::Mem { ptr, len, .. } => {
                    // SAFETY: valid for `len` bytes while `self` (holding the chunk) lives,
                    // per push_mem's contract. The slice is only handed to the kernel to
                    // copy from; see push_mem for writes that race with it.
                    out.push(IoSlice::new(unsafe {
                        std::slice::from_raw_parts(ptr.as_ptr(), *len)
                    }));
                }
                Piece::Zeros(len) => {
                    let mut left = *len;
                    while left > 0 {
                        let n = left.min(ZEROS.len());
                        out.push(IoSlice::new(&ZEROS[..n]));
                        left -= n;
                    }
                }
            }
        }
    }

    /// Copies the view into `dst`, which must be exactly as long.
    pub fn copy_to(&self, dst: &mut [u8]) {
        assert_eq!(
            dst.len(),
            self.len,
            "copy_to needs a buffer of the view's length"
        );
        let mut slices = Vec::new();
        self.slices(&mut slices);
        let mut at = 0;
        for s in slices {
            dst[at..at + s.len()].copy_from_slice(&s);
            at += s.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_and_zeros_come_out_in_order() {
        let a: Arc<Vec<u8>> = Arc::new((0..100u8).collect());
        let ptr = NonNull::new(a.as_ptr() as *mut u8).unwrap();
        let mut v = View::new();
        v.push_zeros(3);
        // SAFETY: `a` holds 100 bytes and is kept by the view.
        unsafe { v.push_mem(a.clone(), ptr, 10) };
        v.push_zeros((1 << 20) + 5);
        v.push_zeros(0);
        v.push_zeros(2);
        assert_eq!(v.len(), 3 + 10 + (1 << 20) + 7);
        let mut out = vec![0xffu8; v.len()];
        v.copy_to(&mut out);
        assert_eq!(&out[..3], &[0, 0, 0]);
        assert_eq!(&out[3..13], &(0..10u8).collect::<Vec<_>>()[..]);
        assert!(out[13..].iter().all(|&b| b == 0));
        // Zeros merge; a long hole needs a slice per megabyte.
        let mut s = Vec::new();
        v.slices(&mut s);
        assert_eq!(s.len(), 1 + 1 + 2);
        // The view keeps its memory alive.
        assert_eq!(Arc::strong_count(&a), 2);
        drop(v);
        assert_eq!(Arc::strong_count(&a), 1);
    }

    /// A read inside one chunk, or of one hole, makes a view without allocating.
    #[test]
    fn one_piece_views_allocate_nothing() {
        let a: Arc<Vec<u8>> = Arc::new((0..100u8).collect());
        let ptr = NonNull::new(a.as_ptr() as *mut u8).unwrap();
        let mut v = View::new();
        // SAFETY: `a` holds 100 bytes and is kept by the view.
        unsafe { v.push_mem(a.clone(), ptr, 100) };
        assert_eq!(v.rest.capacity(), 0);
        let mut out = vec![0u8; 100];
        v.copy_to(&mut out);
        assert_eq!(out, *a);
        let mut hole = View::new();
        hole.push_zeros(4096);
        hole.push_zeros(4096);
        assert_eq!((hole.len(), hole.rest.capacity()), (8192, 0));
        // A second piece goes after the first.
        // SAFETY: as above.
        unsafe { hole.push_mem(a.clone(), ptr, 10) };
        let mut out = vec![0xffu8; 8202];
        hole.copy_to(&mut out);
        assert!(out[..8192].iter().all(|&b| b == 0));
        assert_eq!(&out[8192..], &a[..10]);
    }
}
