//! One FUSE request answered through [`Disk`], whichever way it came (ring or /dev/fuse).

use super::abi::{self, In, InHeader, Out};
use crate::attach::fuse_disk::{
    Attr, Begun, DISK_INO, DeviceIo, Disk, ENTRIES, Errno, PAGE, ROOT_INO,
};
use crate::engine::IoResult;
use crate::tunables::ATTR_TTL;
use std::time::{Duration, UNIX_EPOCH};

/// What serving a request produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Reply with this many bytes of the payload buffer.
    Data(usize),
    /// Reply with this error.
    Error(Errno),
    /// The kernel expects no reply (FORGET, INTERRUPT).
    None,
}

/// A served request and whether its reply, once sent, releases an open of the image (see
/// [`crate::attach::fuse_disk::OpenFiles`]).
#[derive(Debug)]
pub(crate) struct Served {
    pub(crate) reply: Reply,
    pub(crate) releases: bool,
}

fn put_attr(out: &mut Out, disk: &Disk, a: &Attr) {
    let t = disk
        .created
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let mode = u32::from(a.perm) | if a.dir { libc::S_IFDIR } else { libc::S_IFREG };
    out.u64(a.ino).u64(a.size).u64(a.blocks);
    for _ in 0..3 {
        out.u64(t.as_secs());
    }
    for _ in 0..3 {
        out.u32(t.subsec_nanos());
    }
    out.u32(mode)
        .u32(a.nlink)
        .u32(disk.uid)
        .u32(disk.gid)
        .u32(0)
        .u32(PAGE)
        .u32(0);
}

/// `struct fuse_attr_out` for `a`.
fn attr_out(out: &mut Out, disk: &Disk, a: &Attr) {
    out.u64(ATTR_TTL.as_secs())
        .u32(ATTR_TTL.subsec_nanos())
        .u32(0);
    put_attr(out, disk, a);
}

fn done(out: &Out) -> Reply {
    match out.len() {
        Some(n) => Reply::Data(n),
        // A reply larger than the buffer the kernel gave: only a kernel asking for
        // less than any reply needs could cause it.
        None => Reply::Error(libc::EIO),
    }
}

/// READDIR: as many entries from `offset` as fit in `size` bytes.
fn readdir(payload: &mut [u8], offset: u64, size: usize) -> Reply {
    let limit = size.min(payload.len());
    let mut out = Out::new(&mut payload[..limit]);
    let mut used = 0;
    for (i, (ino, dir, name)) in ENTRIES.iter().enumerate().skip(offset as usize) {
        // struct fuse_dirent, padded to 8 bytes.
        let len = (24 + name.len()).div_ceil(8) * 8;
        if used + len > limit {
            break;
        }
        let kind = if *dir { libc::DT_DIR } else { libc::DT_REG };
        out.u64(*ino)
            .u64((i + 1) as u64)
            .u32(name.len() as u32)
            .u32(u32::from(kind))
            .name(name.as_bytes())
            .zeros(len - 24 - name.len());
        used += len;
    }
    done(&out)
}

/// A request begun ([`begin`]).
pub(crate) enum Step<'a> {
    /// Answered.
    Served(Served),
    /// A READ or WRITE of the disk image, on the device: poll `io` to completion, then
    /// [`finish`] it.
    Io(Pending<'a>),
}

/// A READ or WRITE of the disk image waiting on the device.
pub(crate) struct Pending<'a> {
    /// The device call; it borrows the payload buffer until it completes or is dropped.
    pub(crate) io: DeviceIo<'a>,
    /// What its reply will say.
    pub(crate) then: Then,
}

/// The reply of a [`Pending`] request, once its call is done.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Then {
    len: usize,
    write: bool,
}

/// `struct fuse_write_out` for `written` bytes.
fn write_out(payload: &mut [u8], written: usize) -> Reply {
    let mut out = Out::new(payload);
    out.u32(written as u32).u32(0);
    done(&out)
}

fn step(begun: Result<Begun<'_>, Errno>, write: bool) -> Step<'_> {
    let reply = match begun {
        Ok(Begun::Io { io, len }) => {
            return Step::Io(Pending {
                io,
                then: Then { len, write },
            });
        }
        // A write is never answered without the device, so this is a read's.
        Ok(Begun::Done(n)) => Reply::Data(n),
        Err(errno) => Reply::Error(errno),
    };
    Step::Served(Served {
        reply,
        releases: false,
    })
}

/// Begins one request: a READ or WRITE of the disk image is left on the device for the
/// caller to poll (a thread keeps several in flight that way); anything else is served as
/// [`serve`] does. The arguments are [`serve`]'s.
pub(crate) fn begin<'a>(
    disk: &'a Disk,
    h: &InHeader,
    op_in: &[u8],
    payload: &'a mut [u8],
    payload_len: usize,
) -> Step<'a> {
    let op = In(op_in);
    if h.nodeid == DISK_INO {
        let (offset, size) = (op.u64(8), op.u32(16) as usize);
        match h.opcode {
            abi::READ => {
                return match payload.get_mut(..size) {
                    Some(out) => step(disk.begin_read(DISK_INO, offset, out), false),
                    None => step(Err(libc::EINVAL), false),
                };
            }
            abi::WRITE => {
                return match payload.get(..size.min(payload_len)) {
                    Some(data) => step(
                        disk.begin_write(DISK_INO, offset, data, op.u32(32) as i32),
                        true,
                    ),
                    None => step(Err(libc::EINVAL), true),
                };
            }
            _ => {}
        }
    }
    Step::Served(serve(disk, h, op_in, payload, payload_len))
}

/// The reply of a [`Pending`] request whose call returned `result`, written to `payload`
/// (which the call no longer borrows).
pub(crate) fn finish(disk: &Disk, then: Then, result: IoResult<()>, payload: &mut [u8]) -> Reply {
    match disk.finish(result, then.len) {
        Ok(n) if then.write => write_out(payload, n),
        Ok(n) => Reply::Data(n),
        Err(errno) => Reply::Error(errno),
    }
}

/// Serves one request: `op_in` is the opcode's fixed in-struct, `payload[..payload_len]`
/// its variable part (a name, write data). The reply's data go to the start of `payload`.
pub(crate) fn serve(
    disk: &Disk,
    h: &InHeader,
    op_in: &[u8],
    payload: &mut [u8],
    payload_len: usize,
) -> Served {
    let op = In(op_in);
    let ino = h.nodeid;
    let mut releases = false;
    let result: Result<Reply, Errno> = (|| {
        Ok(match h.opcode {
            abi::LOOKUP => {
                // The name is NUL-terminated in the payload.
                let name = &payload[..payload_len.min(payload.len())];
                let name = name.split(|b| *b == 0).next().unwrap_or(&[]);
                let (attr, ttl) = disk.lookup(ino, name)?;
                let mut out = Out::new(payload);
                out.u64(attr.ino)
                    .u64(0)
                    .u64(ttl.as_secs())
                    .u64(ttl.as_secs())
                    .u32(ttl.subsec_nanos())
                    .u32(ttl.subsec_nanos());
                put_attr(&mut out, disk, &attr);
                done(&out)
            }
            abi::GETATTR => {
                let attr = disk.attr(ino).ok_or(libc::ENOENT)?;
                let mut out = Out::new(payload);
                attr_out(&mut out, disk, &attr);
                done(&out)
            }
            abi::SETATTR => {
                let size = (op.u32(0) & abi::FATTR_SIZE != 0).then(|| op.u64(16));
                let attr = disk.setattr(ino, size)?;
                let mut out = Out::new(payload);
                attr_out(&mut out, disk, &attr);
                done(&out)
            }
            abi::OPEN => {
                let fopen = disk.open(ino, op.u32(0) as i32)?;
                let mut out = Out::new(payload);
                out.u64(0).u32(fopen).u32(0);
                done(&out)
            }
            abi::OPENDIR => {
                if ino != ROOT_INO {
                    return Err(libc::ENOTDIR);
                }
                let mut out = Out::new(payload);
                out.u64(0).u32(0).u32(0);
                done(&out)
            }
            // The ring begins the disk image's through `begin`; /dev/fuse and the stats file
            // come here.
            abi::READ => {
                let (offset, size) = (op.u64(8), op.u32(16) as usize);
                let out = payload.get_mut(..size).ok_or(libc::EINVAL)?;
                Reply::Data(disk.read(ino, offset, out)?)
            }
            abi::WRITE => {
                let (offset, size) = (op.u64(8), op.u32(16) as usize);
                let data = payload.get(..size.min(payload_len)).ok_or(libc::EINVAL)?;
                let written = disk.write(ino, offset, data, op.u32(32) as i32)?;
                write_out(payload, written as usize)
            }
            abi::RELEASE => {
                releases = ino == DISK_INO;
                Reply::Data(0)
            }
            abi::RELEASEDIR => Reply::Data(0),
            abi::FLUSH | abi::FSYNC => {
                disk.sync(ino)?;
                Reply::Data(0)
            }
            abi::FALLOCATE => {
                disk.fallocate(ino, op.u64(8), op.u64(16), op.u32(24))?;
                Reply::Data(0)
            }
            abi::READDIR => {
                if ino != ROOT_INO {
                    return Err(libc::ENOTDIR);
                }
                readdir(payload, op.u64(8), op.u32(16) as usize)
            }
            abi::STATFS => {
                let (blocks, free) = disk.statfs();
                let mut out = Out::new(payload);
                out.u64(blocks)
                    .u64(free)
                    .u64(free)
                    .u64(2)
                    .u64(0)
                    .u32(PAGE)
                    .u32(255)
                    .u32(PAGE)
                    .zeros(4 + 24);
                done(&out)
            }
            abi::FORGET | abi::BATCH_FORGET | abi::INTERRUPT => Reply::None,
            abi::DESTROY => Reply::Data(0),
            // ENOSYS for xattrs makes the kernel stop asking (it would otherwise ask on
            // every write for security.capability); for anything else, it says "not here".
            _ => return Err(libc::ENOSYS),
        })
    })();
    Served {
        reply: result.unwrap_or_else(Reply::Error),
        releases,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::host::HostBackend;
    use crate::engine::{SparseDevice, SparseOptions};
    use std::sync::Arc;

    fn disk(rt: &tokio::runtime::Runtime) -> Disk {
        let mut opts = SparseOptions::new(1 << 20);
        opts.chunk_size = 1 << 20;
        let dev = SparseDevice::new(HostBackend::new(), opts).unwrap();
        Disk::new(Arc::new(dev), rt.handle().clone())
    }

    fn header(opcode: u32, nodeid: u64) -> InHeader {
        InHeader {
            len: 0,
            opcode,
            unique: 7,
            nodeid,
        }
    }

    #[test]
    fn write_then_read_back_through_the_payload_buffer() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let d = disk(&rt);
        let mut op = [0u8; 40];
        op[8..16].copy_from_slice(&8192u64.to_ne_bytes());
        op[16..20].copy_from_slice(&4096u32.to_ne_bytes());
        let mut payload = vec![0xa5u8; 8192];
        let w = serve(&d, &header(abi::WRITE, DISK_INO), &op, &mut payload, 4096);
        assert_eq!(w.reply, Reply::Data(8));
        assert_eq!(In(&payload).u32(0), 4096);
        payload.fill(0);
        let r = serve(&d, &header(abi::READ, DISK_INO), &op, &mut payload, 0);
        assert_eq!(r.reply, Reply::Data(4096));
        assert!(payload[..4096].iter().all(|b| *b == 0xa5));
    }

    #[test]
    fn begun_reads_and_writes_wait_on_the_device_and_reply_once_finished() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let d = disk(&rt);
        let mut op = [0u8; 40];
        op[8..16].copy_from_slice(&4096u64.to_ne_bytes());
        op[16..20].copy_from_slice(&4096u32.to_ne_bytes());
        let mut payload = vec![0x5au8; 8192];
        let Step::Io(Pending { io, then }) =
            begin(&d, &header(abi::WRITE, DISK_INO), &op, &mut payload, 4096)
        else {
            panic!("a write of the disk image goes to the device");
        };
        let result = d.complete(io);
        // The reply overwrites the written data's first bytes: only after the call.
        assert_eq!(finish(&d, then, result, &mut payload), Reply::Data(8));
        assert_eq!(In(&payload).u32(0), 4096);
        payload.fill(0);
        let Step::Io(Pending { io, then }) =
            begin(&d, &header(abi::READ, DISK_INO), &op, &mut payload, 0)
        else {
            panic!("a read of the disk image goes to the device");
        };
        let result = d.complete(io);
        assert_eq!(finish(&d, then, result, &mut payload), Reply::Data(4096));
        assert!(payload[..4096].iter().all(|b| *b == 0x5a));
        // Answered at once: past the end, and a size larger than the buffer.
        op[8..16].copy_from_slice(&(1u64 << 20).to_ne_bytes());
        let Step::Served(s) = begin(&d, &header(abi::WRITE, DISK_INO), &op, &mut payload, 4096)
        else {
            panic!("a write past the end needs no device");
        };
        assert_eq!(s.reply, Reply::Error(libc::ENOSPC));
        let Step::Served(s) = begin(&d, &header(abi::READ, DISK_INO), &op, &mut payload, 0) else {
            panic!("a read at the end needs no device");
        };
        assert_eq!(s.reply, Reply::Data(0));
        op[16..20].copy_from_slice(&(1u32 << 20).to_ne_bytes());
        let Step::Served(s) = begin(&d, &header(abi::READ, DISK_INO), &op, &mut payload, 0) else {
            panic!("a read larger than the buffer needs no device");
        };
        assert_eq!(s.reply, Reply::Error(libc::EINVAL));
    }

    #[test]
    fn lookup_names_the_two_files_and_nothing_else() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let d = disk(&rt);
        let mut payload = vec![0u8; 4096];
        payload[..5].copy_from_slice(b"disk\0");
        let s = serve(&d, &header(abi::LOOKUP, ROOT_INO), &[], &mut payload, 5);
        // sizeof(struct fuse_entry_out)
        assert_eq!(s.reply, Reply::Data(128));
        assert_eq!(In(&payload).u64(0), DISK_INO);
        // size of the attr: 1 MiB
        assert_eq!(In(&payload).u64(40 + 8), 1 << 20);
        payload[..6].copy_from_slice(b"other\0");
        let s = serve(&d, &header(abi::LOOKUP, ROOT_INO), &[], &mut payload, 6);
        assert_eq!(s.reply, Reply::Error(libc::ENOENT));
    }

    #[test]
    fn write_past_the_end_is_out_of_space_and_release_is_counted_after_reply() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let d = disk(&rt);
        let mut op = [0u8; 40];
        op[8..16].copy_from_slice(&((1u64 << 20) - 512).to_ne_bytes());
        op[16..20].copy_from_slice(&4096u32.to_ne_bytes());
        let mut payload = vec![0u8; 4096];
        let s = serve(&d, &header(abi::WRITE, DISK_INO), &op, &mut payload, 4096);
        assert_eq!(s.reply, Reply::Error(libc::ENOSPC));
        let s = serve(
            &d,
            &header(abi::RELEASE, DISK_INO),
            &[0; 24],
            &mut payload,
            0,
        );
        assert!(s.releases && s.reply == Reply::Data(0));
        let s = serve(
            &d,
            &header(abi::GETXATTR, DISK_INO),
            &[0; 8],
            &mut payload,
            0,
        );
        assert_eq!(s.reply, Reply::Error(libc::ENOSYS));
    }
}
