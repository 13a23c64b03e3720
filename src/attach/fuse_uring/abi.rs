//! The few parts of the FUSE kernel ABI (`include/uapi/linux/fuse.h`) that a one-file
//! server needs, read from and written to byte buffers at their fixed offsets.
//!
//! The kernel writes these structures into our buffers (a `/dev/fuse` read, a ring entry's
//! header) and reads our replies from them, so they are handled as bytes: nothing is
//! transmuted, and a short buffer is an error, not undefined behaviour.

/// `FUSE_KERNEL_VERSION`.
pub(crate) const KERNEL_VERSION: u32 = 7;
/// The minor version we answer with: 7.42 brought FUSE over io_uring.
pub(crate) const KERNEL_MINOR: u32 = 42;

pub(crate) const LOOKUP: u32 = 1;
pub(crate) const FORGET: u32 = 2;
pub(crate) const GETATTR: u32 = 3;
pub(crate) const SETATTR: u32 = 4;
pub(crate) const OPEN: u32 = 14;
pub(crate) const READ: u32 = 15;
pub(crate) const WRITE: u32 = 16;
pub(crate) const STATFS: u32 = 17;
pub(crate) const RELEASE: u32 = 18;
pub(crate) const FSYNC: u32 = 20;
pub(crate) const GETXATTR: u32 = 22;
pub(crate) const LISTXATTR: u32 = 23;
pub(crate) const FLUSH: u32 = 25;
pub(crate) const INIT: u32 = 26;
pub(crate) const OPENDIR: u32 = 27;
pub(crate) const READDIR: u32 = 28;
pub(crate) const RELEASEDIR: u32 = 29;
pub(crate) const INTERRUPT: u32 = 36;
pub(crate) const DESTROY: u32 = 38;
pub(crate) const BATCH_FORGET: u32 = 42;
pub(crate) const FALLOCATE: u32 = 43;

/// INIT flags (`fuse_init_in.flags`, low word).
pub(crate) const FUSE_ASYNC_READ: u64 = 1 << 0;
pub(crate) const FUSE_BIG_WRITES: u64 = 1 << 5;
pub(crate) const FUSE_ASYNC_DIO: u64 = 1 << 15;
pub(crate) const FUSE_MAX_PAGES: u64 = 1 << 22;
pub(crate) const FUSE_INIT_EXT: u64 = 1 << 30;
/// The high word of the INIT flags (`flags2`) holds this one.
pub(crate) const FUSE_OVER_IO_URING: u64 = 1 << 41;

/// `FATTR_SIZE` in `fuse_setattr_in.valid`.
pub(crate) const FATTR_SIZE: u32 = 1 << 3;

/// `sizeof(struct fuse_in_header)`.
pub(crate) const IN_HEADER: usize = 40;
/// `sizeof(struct fuse_out_header)`.
pub(crate) const OUT_HEADER: usize = 16;
/// `sizeof(struct fuse_init_out)`.
pub(crate) const INIT_OUT: usize = 64;

/// Layout of a ring entry's header buffer (`struct fuse_uring_req_header`): the in/out
/// header, the opcode's own in-struct, then `struct fuse_uring_ent_in_out`.
pub(crate) const RING_IN_OUT: usize = 0;
pub(crate) const RING_OP_IN: usize = 128;
pub(crate) const RING_ENT_IN_OUT: usize = 256;
/// `fuse_uring_ent_in_out.commit_id`.
pub(crate) const RING_COMMIT_ID: usize = RING_ENT_IN_OUT + 8;
/// `fuse_uring_ent_in_out.payload_sz`.
pub(crate) const RING_PAYLOAD_SZ: usize = RING_ENT_IN_OUT + 16;
/// `sizeof(struct fuse_uring_req_header)`.
pub(crate) const RING_HEADER: usize = RING_ENT_IN_OUT + 32;

/// `FUSE_IO_URING_CMD_REGISTER`: give the kernel an entry's buffers and wait for a request.
pub(crate) const CMD_REGISTER: u32 = 1;
/// `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`: reply to an entry's request, then wait for the next.
pub(crate) const CMD_COMMIT_AND_FETCH: u32 = 2;

/// The size of the fixed in-struct that precedes an opcode's variable part on `/dev/fuse`
/// (on the ring it sits apart, in the header's `op_in`).
pub(crate) fn op_in_len(opcode: u32) -> usize {
    match opcode {
        GETATTR | FSYNC => 16,
        SETATTR => 88,
        OPEN | OPENDIR | GETXATTR | LISTXATTR | FORGET | INTERRUPT | BATCH_FORGET => 8,
        READ | WRITE | READDIR => 40,
        RELEASE | RELEASEDIR | FLUSH => 24,
        FALLOCATE => 32,
        INIT => 64,
        _ => 0,
    }
}

/// A little byte reader: fields at fixed offsets, zero where the buffer is short (the
/// kernel sends shorter structs for old minors, and zero means "not set" in all of them).
#[derive(Clone, Copy)]
pub(crate) struct In<'a>(pub(crate) &'a [u8]);

impl In<'_> {
    pub(crate) fn u32(&self, at: usize) -> u32 {
        self.0
            .get(at..at + 4)
            .map_or(0, |b| u32::from_ne_bytes(b.try_into().unwrap()))
    }

    pub(crate) fn u64(&self, at: usize) -> u64 {
        self.0
            .get(at..at + 8)
            .map_or(0, |b| u64::from_ne_bytes(b.try_into().unwrap()))
    }
}

/// The fields of `struct fuse_in_header` that we use.
#[derive(Clone, Copy, Debug)]
pub(crate) struct InHeader {
    pub(crate) len: u32,
    pub(crate) opcode: u32,
    pub(crate) unique: u64,
    pub(crate) nodeid: u64,
}

impl InHeader {
    /// Parses the header at the start of `b`.
    pub(crate) fn parse(b: &[u8]) -> Option<InHeader> {
        if b.len() < IN_HEADER {
            return None;
        }
        let b = In(b);
        Some(InHeader {
            len: b.u32(0),
            opcode: b.u32(4),
            unique: b.u64(8),
            nodeid: b.u64(16),
        })
    }
}

/// Writes `struct fuse_out_header` into `out[..16]`.
pub(crate) fn put_out_header(out: &mut [u8], len: u32, error: i32, unique: u64) {
    out[0..4].copy_from_slice(&len.to_ne_bytes());
    out[4..8].copy_from_slice(&error.to_ne_bytes());
    out[8..16].copy_from_slice(&unique.to_ne_bytes());
}

/// A little byte writer for replies.
pub(crate) struct Out<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl<'a> Out<'a> {
    /// A writer at the start of `buf`; writes past its end are an error for the caller to
    /// see in [`Out::len`]'s check, never a panic.
    pub(crate) fn new(buf: &'a mut [u8]) -> Out<'a> {
        Out { buf, at: 0 }
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        if let Some(dst) = self.buf.get_mut(self.at..self.at + b.len()) {
            dst.copy_from_slice(b);
        }
        self.at += b.len();
        self
    }

    pub(crate) fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_ne_bytes())
    }

    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_ne_bytes())
    }

    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_ne_bytes())
    }

    pub(crate) fn zeros(&mut self, n: usize) -> &mut Self {
        for _ in 0..n {
            self.bytes(&[0]);
        }
        self
    }

    pub(crate) fn name(&mut self, name: &[u8]) -> &mut Self {
        self.bytes(name)
    }

    /// Bytes written, or `None` if they did not fit.
    pub(crate) fn len(&self) -> Option<usize> {
        (self.at <= self.buf.len()).then_some(self.at)
    }
}
