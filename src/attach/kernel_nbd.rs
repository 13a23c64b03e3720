//! Attach through the kernel's NBD driver, where the kernel has it (the `nbd` module).
//!
//! No nbd-client and no TCP: the daemon makes one Unix socketpair per connection, serves the
//! NBD transmission phase on one end with the in-process server, and hands the other ends to
//! the kernel with the generic-netlink `NBD_CMD_CONNECT` (the interface nbd-client uses with
//! `-L`/netlink). The kernel skips the handshake for sockets it is given, so the server end
//! starts directly in the transmission phase, with the flags sent here.
//!
//! The netlink messages are built and parsed here by hand (they are a few attributes); the
//! encoders are pure functions, tested byte for byte. The transmission phase itself is the
//! NBD server's (`crate::nbd::server::serve_transmission_only`), the same loop TCP and Unix
//! socket clients get, entered without a handshake.

use crate::engine::metered::DeviceMetrics;
use crate::engine::{BlockDevice, Capabilities};
use crate::nbd::export::Export;
use crate::nbd::proto::{self, Framing};
use anyhow::{Context, Result, bail};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The generic netlink family of the NBD driver.
pub const NBD_GENL_FAMILY_NAME: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;

const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;

const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// Client flag: remove the device when the last connection goes away.
pub const NBD_CFLAG_DESTROY_ON_DISCONNECT: u64 = 1;

/// The transmission flags the kernel's nbd driver acts on. It sends no `NBD_CMD_CACHE`,
/// no fast zeroes and only simple requests, so the flags offering those are left out of
/// what an NBD client would be sent.
const KERNEL_FLAGS: u16 = proto::FLAG_HAS_FLAGS
    | proto::FLAG_READ_ONLY
    | proto::FLAG_SEND_FLUSH
    | proto::FLAG_SEND_FUA
    | proto::FLAG_SEND_TRIM
    | proto::FLAG_SEND_WRITE_ZEROES
    | proto::FLAG_CAN_MULTI_CONN;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(1 << 15 | 1 << 14);
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;

use crate::tunables::{INFLIGHT_PER_CONNECTION, PREWARM_MAX, PREWARM_PER_CONNECTION};

/// The largest request the kernel's nbd driver sends (its `max_hw_sectors`, 65536 sectors).
const KERNEL_MAX_REQUEST: u32 = 32 << 20;

/// Where this method cannot work, one sentence saying why.
///
/// What counts is the driver's netlink interface: with it the kernel makes a device for
/// each connect, so `/dev/nbd0` need not exist (the module may be loaded with `nbds_max=0`).
pub fn unavailable() -> Option<String> {
    let family = GenlSocket::open().and_then(|mut s| s.family(NBD_GENL_FAMILY_NAME));
    match family {
        Ok(_) => None,
        Err(_) if !Path::new("/dev/nbd0").exists() => Some(
            "this kernel has no nbd driver (/dev/nbd0 missing): use --via fuse \
             (or 'modprobe nbd' where the module exists)"
                .into(),
        ),
        // Kernels before 4.12 have /dev/nbd0 but no netlink interface, and attaching
        // without nbd-client needs it.
        Err(e) => Some(format!(
            "this kernel's nbd driver has no netlink interface ({e:#}): use --via fuse"
        )),
    }
}

/// Serves the NBD transmission phase of `export` on `socket`, one end of a socketpair whose
/// other end the kernel holds: no handshake (the kernel negotiates nothing), simple replies,
/// the transmission flags `flags` that the kernel was given. This is the NBD server's own
/// transmission loop ([`crate::nbd::server::serve_transmission_only`]); it returns when the
/// kernel disconnects (the request count) or `shutdown` is cancelled.
pub async fn serve_connection(
    socket: tokio::net::UnixStream,
    export: Arc<Export>,
    flags: u16,
    shutdown: CancellationToken,
) -> Result<u64> {
    crate::nbd::server::serve_transmission_only(
        socket,
        &export,
        flags,
        INFLIGHT_PER_CONNECTION,
        &shutdown,
    )
    .await
}

/// The NBD transmission flags for a device with `caps`: those an NBD client with simple
/// replies is sent (`crate::nbd::export::transmission_flags`), less what the kernel's
/// driver does not use.
pub fn transmission_flags(caps: &Capabilities) -> u16 {
    crate::nbd::export::transmission_flags(caps, Framing::Simple) & KERNEL_FLAGS
}

/// The parameters of one `NBD_CMD_CONNECT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Device index to use (`/dev/nbdN`); `None` lets the kernel pick a free one.
    pub index: Option<u32>,
    /// Size in bytes.
    pub size: u64,
    /// Logical block size in bytes.
    pub block_size: u64,
    /// NBD transmission flags.
    pub server_flags: u64,
    /// NBD_CFLAG_* bits.
    pub client_flags: u64,
    /// Seconds before a request times out (None: the kernel's default).
    pub timeout_secs: Option<u64>,
    /// Seconds to wait for a reconnect after every connection died.
    pub dead_conn_timeout_secs: Option<u64>,
    /// Identifier shown in /sys/block/nbdN/backend.
    pub backend_identifier: Option<String>,
}

fn put_header(buf: &mut Vec<u8>, msg_type: u16, flags: u16, seq: u32, cmd: u8, version: u8) {
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by finish()
    buf.extend_from_slice(&msg_type.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    buf.extend_from_slice(&[cmd, version, 0, 0]);
}

fn pad(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn put_attr(buf: &mut Vec<u8>, attr_type: u16, payload: &[u8]) {
    let len = (4 + payload.len()) as u16;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&attr_type.to_ne_bytes());
    buf.extend_from_slice(payload);
    pad(buf);
}

/// Opens a nested attribute; returns where its length goes for [`end_nest`].
fn begin_nest(buf: &mut Vec<u8>, attr_type: u16) -> usize {
    let at = buf.len();
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&(attr_type | NLA_F_NESTED).to_ne_bytes());
    at
}

fn end_nest(buf: &mut [u8], at: usize) {
    let len = (buf.len() - at) as u16;
    buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

fn finish(mut buf: Vec<u8>) -> Vec<u8> {
    let len = buf.len() as u32;
    buf[..4].copy_from_slice(&len.to_ne_bytes());
    buf
}

/// The `CTRL_CMD_GETFAMILY` request that resolves a generic netlink family name to its id.
pub fn encode_get_family(seq: u32, name: &str) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64);
    put_header(
        &mut buf,
        GENL_ID_CTRL,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        CTRL_CMD_GETFAMILY,
        1,
    );
    let mut name_z = name.as_bytes().to_vec();
    name_z.push(0);
    put_attr(&mut buf, CTRL_ATTR_FAMILY_NAME, &name_z);
    finish(buf)
}

/// The `NBD_CMD_CONNECT` request handing `fds` (connected sockets) to the kernel.
pub fn encode_connect(family: u16, seq: u32, req: &ConnectRequest, fds: &[RawFd]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(128 + 16 * fds.len());
    put_header(
        &mut buf,
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_CONNECT,
        NBD_GENL_VERSION,
    );
    if let Some(i) = req.index {
        put_attr(&mut buf, NBD_ATTR_INDEX, &i.to_ne_bytes());
    }
    put_attr(&mut buf, NBD_ATTR_SIZE_BYTES, &req.size.to_ne_bytes());
    put_attr(
        &mut buf,
        NBD_ATTR_BLOCK_SIZE_BYTES,
        &req.block_size.to_ne_bytes(),
    );
    put_attr(
        &mut buf,
        NBD_ATTR_SERVER_FLAGS,
        &req.server_flags.to_ne_bytes(),
    );
    put_attr(
        &mut buf,
        NBD_ATTR_CLIENT_FLAGS,
        &req.client_flags.to_ne_bytes(),
    );
    if let Some(t) = req.timeout_secs {
        put_attr(&mut buf, NBD_ATTR_TIMEOUT, &t.to_ne_bytes());
    }
    if let Some(t) = req.dead_conn_timeout_secs {
        put_attr(&mut buf, NBD_ATTR_DEAD_CONN_TIMEOUT, &t.to_ne_bytes());
    }
    if let Some(id) = &req.backend_identifier {
        let mut z = id.as_bytes().to_vec();
        z.push(0);
        put_attr(&mut buf, NBD_ATTR_BACKEND_IDENTIFIER, &z);
    }
    let sockets = begin_nest(&mut buf, NBD_ATTR_SOCKETS);
    for fd in fds {
        let item = begin_nest(&mut buf, NBD_SOCK_ITEM);
        put_attr(&mut buf, NBD_SOCK_FD, &(*fd as u32).to_ne_bytes());
        end_nest(&mut buf, item);
    }
    end_nest(&mut buf, sockets);
    finish(buf)
}

/// The `NBD_CMD_DISCONNECT` request for `/dev/nbd<index>`.
pub fn encode_disconnect(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut buf = Vec::with_capacity(32);
    put_header(
        &mut buf,
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_DISCONNECT,
        NBD_GENL_VERSION,
    );
    put_attr(&mut buf, NBD_ATTR_INDEX, &index.to_ne_bytes());
    finish(buf)
}

/// One message of a netlink reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    /// NLMSG_ERROR: 0 is an ack, otherwise a negative errno.
    Error(i32),
    /// NLMSG_DONE.
    Done,
    /// A generic netlink message: its command and attribute bytes.
    Genl {
        /// The message type (family id).
        msg_type: u16,
        /// The genl command.
        cmd: u8,
        /// The attributes, undecoded.
        attrs: &'a [u8],
    },
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Splits a datagram from a netlink socket into its messages; fails on a malformed one.
pub fn parse_replies(mut data: &[u8]) -> Result<Vec<Reply<'_>>> {
    let mut out = Vec::new();
    while data.len() >= NLMSG_HDRLEN {
        let len = u32_at(data, 0).unwrap() as usize;
        let msg_type = u16_at(data, 4).unwrap();
        if len < NLMSG_HDRLEN || len > data.len() {
            bail!("malformed netlink reply (length {len} of {})", data.len());
        }
        let body = &data[NLMSG_HDRLEN..len];
        out.push(match msg_type {
            NLMSG_ERROR => {
                Reply::Error(u32_at(body, 0).context("short netlink error message")? as i32)
            }
            NLMSG_DONE => Reply::Done,
            _ => {
                if body.len() < GENL_HDRLEN {
                    bail!("short generic netlink message");
                }
                Reply::Genl {
                    msg_type,
                    cmd: body[0],
                    attrs: &body[GENL_HDRLEN..],
                }
            }
        });
        let aligned = len.div_ceil(4) * 4;
        data = &data[aligned.min(data.len())..];
    }
    Ok(out)
}

/// The payload of attribute `want` among `attrs` (top level only).
pub fn find_attr(mut attrs: &[u8], want: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = u16_at(attrs, 0)? as usize;
        let ty = u16_at(attrs, 2)? & NLA_TYPE_MASK;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if ty == want {
            return Some(&attrs[4..len]);
        }
        attrs = &attrs[(len.div_ceil(4) * 4).min(attrs.len())..];
    }
    None
}

/// A generic netlink socket.
pub struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
}

impl GenlSocket {
    /// Opens and binds a generic netlink socket.
    pub fn open() -> Result<GenlSocket> {
        use nix::sys::socket::{
            AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket,
        };
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkGeneric,
        )
        .context("opening a netlink socket")?;
        // Port 0: the kernel assigns this socket its own address.
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).context("binding a netlink socket")?;
        Ok(GenlSocket { fd, seq: 1 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `msg` and collects the replies up to the ack; fails with the kernel's errno.
    fn transact(&mut self, msg: &[u8]) -> Result<Vec<Vec<u8>>> {
        use nix::sys::socket::{MsgFlags, recv, send};
        // An unconnected netlink socket sends to the kernel.
        send(self.fd.as_raw_fd(), msg, MsgFlags::empty()).context("sending a netlink request")?;
        let mut messages = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e).context("reading a netlink reply"),
            };
            let data = &buf[..n];
            for reply in parse_replies(data)? {
                match reply {
                    Reply::Error(0) | Reply::Done => return Ok(messages),
                    Reply::Error(e) => {
                        return Err(std::io::Error::from_raw_os_error(-e).into());
                    }
                    Reply::Genl { attrs, .. } => messages.push(attrs.to_vec()),
                }
            }
        }
    }

    /// The id of generic netlink family `name`; fails with a sentence when absent.
    pub fn family(&mut self, name: &str) -> Result<u16> {
        let seq = self.next_seq();
        let replies = self
            .transact(&encode_get_family(seq, name))
            .with_context(|| {
                format!("the kernel has no '{name}' netlink family (module loaded?)")
            })?;
        replies
            .iter()
            .find_map(|a| find_attr(a, CTRL_ATTR_FAMILY_ID).and_then(|v| u16_at(v, 0)))
            .with_context(|| format!("no id in the kernel's reply for netlink family '{name}'"))
    }
}

/// Connects `fds` to an NBD device; returns the device index N of `/dev/nbdN`.
pub fn connect(req: &ConnectRequest, fds: &[RawFd]) -> Result<u32> {
    let mut sock = GenlSocket::open()?;
    let family = sock.family(NBD_GENL_FAMILY_NAME)?;
    let seq = sock.next_seq();
    let replies = sock
        .transact(&encode_connect(family, seq, req, fds))
        .context("NBD_CMD_CONNECT")?;
    replies
        .iter()
        .find_map(|a| find_attr(a, NBD_ATTR_INDEX).and_then(|v| u32_at(v, 0)))
        .or(req.index)
        .context("the kernel did not say which nbd device it connected")
}

/// Disconnects `/dev/nbd<index>`.
pub fn disconnect(index: u32) -> Result<()> {
    let mut sock = GenlSocket::open()?;
    let family = sock.family(NBD_GENL_FAMILY_NAME)?;
    let seq = sock.next_seq();
    sock.transact(&encode_disconnect(family, seq, index))
        .with_context(|| format!("NBD_CMD_DISCONNECT of /dev/nbd{index}"))
        .map(drop)
}

/// A device attached through the kernel's nbd driver.
pub struct KernelNbd {
    index: u32,
    path: PathBuf,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    shutdown: CancellationToken,
    /// Set when every connection has ended (the kernel let go, or the device was
    /// disconnected by someone else).
    connections_left: Arc<std::sync::atomic::AtomicUsize>,
}

impl KernelNbd {
    /// Makes `connections` socketpairs, serves the transmission phase of `device` on one end
    /// of each (on `runtime`), and connects the other ends to a free kernel nbd device.
    /// Every connection's task and buffers exist before the kernel sees the device.
    pub fn attach(
        device: Arc<dyn BlockDevice>,
        metrics: Option<Arc<DeviceMetrics>>,
        runtime: &tokio::runtime::Handle,
        connections: usize,
    ) -> Result<KernelNbd> {
        if let Some(why) = unavailable() {
            bail!(why);
        }
        let caps = device.capabilities();
        if caps.max_block < KERNEL_MAX_REQUEST {
            bail!(
                "the kernel's nbd driver sends requests of up to 32 MiB but this device takes at \
                 most {} bytes: use --via fuse",
                caps.max_block
            );
        }
        let flags = transmission_flags(&caps);
        super::io_path::prewarm_buffers(
            device.buffers(),
            connections.max(1) * PREWARM_PER_CONNECTION,
            PREWARM_MAX,
        )?;
        let export = Arc::new(Export {
            name: String::new(),
            description: String::new(),
            device: device.clone(),
            metrics,
        });
        let shutdown = CancellationToken::new();
        let connections = connections.max(1);
        let left = Arc::new(std::sync::atomic::AtomicUsize::new(connections));
        let mut kernel_ends = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..connections {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair()
                .context("creating a socketpair for kernel nbd")?;
            ours.set_nonblocking(true)?;
            let _guard = runtime.enter();
            let stream = tokio::net::UnixStream::from_std(ours)?;
            let fut = serve_connection(stream, export.clone(), flags, shutdown.clone());
            let left = left.clone();
            tasks.push(runtime.spawn(async move {
                if let Err(e) = fut.await {
                    tracing::warn!("kernel nbd connection {i} ended: {e:#}");
                }
                left.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }));
            kernel_ends.push(theirs);
        }
        let fds: Vec<RawFd> = kernel_ends.iter().map(|s| s.as_raw_fd()).collect();
        let req = ConnectRequest {
            index: None,
            size: device.size(),
            block_size: 4096,
            server_flags: flags as u64,
            // Not DESTROY_ON_DISCONNECT: that would delete a /dev/nbdN the module made at
            // load time, which scripts (and the next attach) may expect to find.
            client_flags: 0,
            timeout_secs: Some(30),
            dead_conn_timeout_secs: None,
            backend_identifier: Some(backend_identifier(std::process::id())),
        };
        let index = match connect(&req, &fds) {
            Ok(i) => i,
            Err(e) => {
                shutdown.cancel();
                tasks.iter().for_each(|t| t.abort());
                return Err(e);
            }
        };
        // The kernel holds its own references to the sockets now.
        drop(kernel_ends);
        Ok(KernelNbd {
            index,
            path: PathBuf::from(format!("/dev/nbd{index}")),
            tasks,
            shutdown,
            connections_left: left,
        })
    }

    /// `/dev/nbdN`.
    pub fn device_path(&self) -> &Path {
        &self.path
    }

    /// The N of `/dev/nbdN`.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Whether the kernel still holds at least one connection.
    pub fn is_connected(&self) -> bool {
        self.connections_left
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    }

    /// Disconnects the device and stops serving it.
    pub fn detach(&mut self) -> Result<()> {
        let r = if self.is_connected() {
            disconnect(self.index)
        } else {
            Ok(())
        };
        self.shutdown.cancel();
        for t in self.tasks.drain(..) {
            t.abort();
        }
        r
    }
}

/// What `/sys/block/nbdN/backend` says for a device attached by the daemon with `pid`.
pub fn backend_identifier(pid: u32) -> String {
    format!("vramdisk-{pid}")
}

/// After a daemon died: disconnects `/dev/nbd<index>` if it is still the one that daemon
/// attached (its backend identifier says so), so that the index is free again.
pub fn disconnect_stale(index: u32, pid: u32) -> Result<()> {
    let backend =
        std::fs::read_to_string(format!("/sys/block/nbd{index}/backend")).unwrap_or_default();
    if backend.trim() == backend_identifier(pid) {
        disconnect(index)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs_of(msg: &[u8]) -> &[u8] {
        &msg[NLMSG_HDRLEN + GENL_HDRLEN..]
    }

    #[test]
    fn get_family_message_layout() {
        let m = encode_get_family(7, "nbd");
        assert_eq!(m.len(), 16 + 4 + 8);
        assert_eq!(u32_at(&m, 0), Some(m.len() as u32));
        assert_eq!(u16_at(&m, 4), Some(GENL_ID_CTRL));
        assert_eq!(u16_at(&m, 6), Some(NLM_F_REQUEST | NLM_F_ACK));
        assert_eq!(u32_at(&m, 8), Some(7));
        assert_eq!(m[16], CTRL_CMD_GETFAMILY);
        // "nbd\0" in a 4+4 byte attribute.
        assert_eq!(u16_at(&m, 20), Some(8));
        assert_eq!(u16_at(&m, 22), Some(CTRL_ATTR_FAMILY_NAME));
        assert_eq!(&m[24..28], b"nbd\0");
    }

    #[test]
    fn connect_message_carries_every_attribute() {
        let req = ConnectRequest {
            index: Some(3),
            size: 16 << 30,
            block_size: 4096,
            server_flags: 0x16d,
            client_flags: NBD_CFLAG_DESTROY_ON_DISCONNECT,
            timeout_secs: Some(30),
            dead_conn_timeout_secs: None,
            backend_identifier: Some("vd".into()),
        };
        let m = encode_connect(0x1c, 9, &req, &[5, 6]);
        assert_eq!(u32_at(&m, 0), Some(m.len() as u32));
        assert!(m.len().is_multiple_of(4));
        assert_eq!(u16_at(&m, 4), Some(0x1c));
        assert_eq!(m[16], NBD_CMD_CONNECT);
        assert_eq!(m[17], NBD_GENL_VERSION);
        let a = attrs_of(&m);
        let u64_of = |t| u64::from_ne_bytes(find_attr(a, t).unwrap().try_into().unwrap());
        assert_eq!(u32_at(find_attr(a, NBD_ATTR_INDEX).unwrap(), 0), Some(3));
        assert_eq!(u64_of(NBD_ATTR_SIZE_BYTES), 16 << 30);
        assert_eq!(u64_of(NBD_ATTR_BLOCK_SIZE_BYTES), 4096);
        assert_eq!(u64_of(NBD_ATTR_SERVER_FLAGS), 0x16d);
        assert_eq!(u64_of(NBD_ATTR_CLIENT_FLAGS), 1);
        assert_eq!(u64_of(NBD_ATTR_TIMEOUT), 30);
        assert!(find_attr(a, NBD_ATTR_DEAD_CONN_TIMEOUT).is_none());
        assert_eq!(
            find_attr(a, NBD_ATTR_BACKEND_IDENTIFIER),
            Some(&b"vd\0"[..])
        );
        // Sockets: a nested list of nested items, each holding one fd.
        let sockets_at = a.len() - (4 + 2 * 12);
        assert_eq!(
            u16_at(a, sockets_at + 2),
            Some(NBD_ATTR_SOCKETS | NLA_F_NESTED)
        );
        let sockets = find_attr(a, NBD_ATTR_SOCKETS).unwrap();
        assert_eq!(sockets.len(), 24);
        let mut fds = Vec::new();
        let mut rest = sockets;
        while !rest.is_empty() {
            assert_eq!(u16_at(rest, 2), Some(NBD_SOCK_ITEM | NLA_F_NESTED));
            let len = u16_at(rest, 0).unwrap() as usize;
            let item = &rest[4..len];
            fds.push(u32_at(find_attr(item, NBD_SOCK_FD).unwrap(), 0).unwrap());
            rest = &rest[len..];
        }
        assert_eq!(fds, vec![5, 6]);
    }

    #[test]
    fn disconnect_message() {
        let m = encode_disconnect(0x1c, 1, 4);
        assert_eq!(m.len(), 28);
        assert_eq!(m[16], NBD_CMD_DISCONNECT);
        assert_eq!(
            u32_at(find_attr(attrs_of(&m), NBD_ATTR_INDEX).unwrap(), 0),
            Some(4)
        );
    }

    #[test]
    fn parses_replies_and_errors() {
        // A genl reply with NBD_ATTR_INDEX = 2, then an ack, in one datagram.
        let mut reply = Vec::new();
        put_header(&mut reply, 0x1c, 0, 9, NBD_CMD_CONNECT, 1);
        put_attr(&mut reply, NBD_ATTR_INDEX, &2u32.to_ne_bytes());
        let reply = finish(reply);
        let mut ack = vec![0u8; 16 + 4 + 16];
        let ack_len = ack.len() as u32;
        ack[..4].copy_from_slice(&ack_len.to_ne_bytes());
        ack[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        let mut both = reply.clone();
        both.extend_from_slice(&ack);
        let parsed = parse_replies(&both).unwrap();
        assert_eq!(parsed.len(), 2);
        match &parsed[0] {
            Reply::Genl {
                msg_type,
                cmd,
                attrs,
            } => {
                assert_eq!((*msg_type, *cmd), (0x1c, NBD_CMD_CONNECT));
                assert_eq!(
                    u32_at(find_attr(attrs, NBD_ATTR_INDEX).unwrap(), 0),
                    Some(2)
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(parsed[1], Reply::Error(0));
        // An error reply carries a negative errno.
        ack[16..20].copy_from_slice(&(-libc::EBUSY).to_ne_bytes());
        assert_eq!(
            parse_replies(&ack).unwrap(),
            vec![Reply::Error(-libc::EBUSY)]
        );
        // A length past the end is malformed, not a crash.
        let mut bad = ack.clone();
        bad[..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_replies(&bad).is_err());
    }

    #[test]
    fn flags_follow_capabilities() {
        let caps = Capabilities {
            read_only: false,
            can_flush: true,
            can_fua: true,
            can_trim: true,
            can_zero: true,
            can_fast_zero: true,
            can_multi_conn: true,
            can_cache: true,
            can_extents: true,
            min_block: 1,
            preferred_block: 4096,
            max_block: 32 << 20,
        };
        assert_eq!(transmission_flags(&caps), 0x16d);
        let ro = Capabilities {
            read_only: true,
            can_trim: false,
            can_zero: false,
            ..caps
        };
        assert_eq!(transmission_flags(&ro), 0x10f);
    }

    #[test]
    fn says_why_unavailable_here() {
        if Path::new("/dev/nbd0").exists() || Path::new("/sys/module/nbd").exists() {
            crate::test_support::skip_loudly("this kernel has nbd");
            return;
        }
        let why = unavailable().unwrap();
        assert!(why.contains("/dev/nbd0 missing"), "{why}");
        assert!(why.contains("--via fuse"), "{why}");
    }

    #[test]
    fn netlink_family_resolves_where_nbd_exists() {
        if !Path::new("/sys/module/nbd").exists() {
            crate::test_support::skip_loudly("no nbd module");
            return;
        }
        let mut s = GenlSocket::open().unwrap();
        assert!(s.family(NBD_GENL_FAMILY_NAME).unwrap() > 0);
    }

    /// Byte for byte, written out by hand from the netlink and NBD uapi headers rather than
    /// with the encoder's helpers: one socket, no optional attributes.
    #[test]
    fn connect_message_bytes() {
        let req = ConnectRequest {
            index: None,
            size: 0x1_0000_0000,
            block_size: 4096,
            server_flags: 0x16d,
            client_flags: NBD_CFLAG_DESTROY_ON_DISCONNECT,
            timeout_secs: None,
            dead_conn_timeout_secs: None,
            backend_identifier: None,
        };
        let m = encode_connect(0x1c, 5, &req, &[7]);
        let mut want: Vec<u8> = Vec::new();
        let u16b = |v: u16| v.to_ne_bytes();
        let u32b = |v: u32| v.to_ne_bytes();
        let u64b = |v: u64| v.to_ne_bytes();
        // nlmsghdr: len, type (family), flags REQUEST|ACK, seq 5, port 0.
        want.extend_from_slice(&u32b(84));
        want.extend_from_slice(&u16b(0x1c));
        want.extend_from_slice(&u16b(1 | 4));
        want.extend_from_slice(&u32b(5));
        want.extend_from_slice(&u32b(0));
        // genlmsghdr: cmd CONNECT (1), version 1, reserved.
        want.extend_from_slice(&[1, 1, 0, 0]);
        // Four u64 attributes of 12 bytes each: SIZE_BYTES (2), BLOCK_SIZE_BYTES (3),
        // SERVER_FLAGS (5), CLIENT_FLAGS (6).
        for (ty, v) in [(2u16, 0x1_0000_0000u64), (3, 4096), (5, 0x16d), (6, 1)] {
            want.extend_from_slice(&u16b(12));
            want.extend_from_slice(&u16b(ty));
            want.extend_from_slice(&u64b(v));
        }
        // SOCKETS (7 | NLA_F_NESTED) holding one ITEM (1 | NESTED) holding FD (1) = 7.
        want.extend_from_slice(&u16b(16));
        want.extend_from_slice(&u16b(7 | 0x8000));
        want.extend_from_slice(&u16b(12));
        want.extend_from_slice(&u16b(1 | 0x8000));
        want.extend_from_slice(&u16b(8));
        want.extend_from_slice(&u16b(1));
        want.extend_from_slice(&u32b(7));
        assert_eq!(want.len(), 84);
        assert_eq!(m, want);
    }

    #[test]
    fn get_family_and_disconnect_bytes() {
        let mut want = Vec::new();
        want.extend_from_slice(&28u32.to_ne_bytes());
        want.extend_from_slice(&0x10u16.to_ne_bytes()); // GENL_ID_CTRL
        want.extend_from_slice(&5u16.to_ne_bytes()); // REQUEST | ACK
        want.extend_from_slice(&3u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[3, 1, 0, 0]); // CTRL_CMD_GETFAMILY, version 1
        want.extend_from_slice(&8u16.to_ne_bytes());
        want.extend_from_slice(&2u16.to_ne_bytes()); // CTRL_ATTR_FAMILY_NAME
        want.extend_from_slice(b"nbd\0");
        assert_eq!(encode_get_family(3, "nbd"), want);

        let mut want = Vec::new();
        want.extend_from_slice(&28u32.to_ne_bytes());
        want.extend_from_slice(&0x1cu16.to_ne_bytes());
        want.extend_from_slice(&5u16.to_ne_bytes());
        want.extend_from_slice(&9u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[2, 1, 0, 0]); // NBD_CMD_DISCONNECT
        want.extend_from_slice(&8u16.to_ne_bytes());
        want.extend_from_slice(&1u16.to_ne_bytes()); // NBD_ATTR_INDEX
        want.extend_from_slice(&6u32.to_ne_bytes());
        assert_eq!(encode_disconnect(0x1c, 9, 6), want);
    }

    /// A client that speaks to the server the way the kernel's nbd driver does: no
    /// handshake, 28-byte simple requests, simple replies matched by handle.
    struct KernelLikeClient {
        sock: std::os::unix::net::UnixStream,
    }

    const REQ_MAGIC: u32 = 0x2560_9513;
    const REPLY_MAGIC: u32 = 0x6744_6698;
    const T_READ: u16 = 0;
    const T_WRITE: u16 = 1;
    const T_DISC: u16 = 2;
    const T_FLUSH: u16 = 3;
    const T_TRIM: u16 = 4;
    const T_WRITE_ZEROES: u16 = 6;
    const F_FUA: u16 = 1;
    const F_NO_HOLE: u16 = 2;

    impl KernelLikeClient {
        fn new(sock: std::os::unix::net::UnixStream) -> Self {
            sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            KernelLikeClient { sock }
        }

        fn request(flags: u16, ty: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
            let mut b = Vec::with_capacity(28);
            b.extend_from_slice(&REQ_MAGIC.to_be_bytes());
            b.extend_from_slice(&flags.to_be_bytes());
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(&handle.to_be_bytes());
            b.extend_from_slice(&offset.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
            b
        }

        fn send(&mut self, bytes: &[u8]) {
            use std::io::Write;
            self.sock.write_all(bytes).unwrap();
        }

        /// One simple reply: (error, handle).
        fn reply(&mut self) -> (u32, u64) {
            use std::io::Read;
            let mut h = [0u8; 16];
            self.sock.read_exact(&mut h).expect("a reply");
            assert_eq!(
                u32::from_be_bytes(h[0..4].try_into().unwrap()),
                REPLY_MAGIC,
                "not a simple reply: {h:02x?}"
            );
            (
                u32::from_be_bytes(h[4..8].try_into().unwrap()),
                u64::from_be_bytes(h[8..16].try_into().unwrap()),
            )
        }

        fn payload(&mut self, len: usize) -> Vec<u8> {
            use std::io::Read;
            let mut d = vec![0u8; len];
            self.sock.read_exact(&mut d).unwrap();
            d
        }

        fn write(&mut self, handle: u64, offset: u64, data: &[u8], flags: u16) -> u32 {
            let mut b = Self::request(flags, T_WRITE, handle, offset, data.len() as u32);
            b.extend_from_slice(data);
            self.send(&b);
            let (err, h) = self.reply();
            assert_eq!(h, handle);
            err
        }

        fn read(&mut self, handle: u64, offset: u64, len: usize) -> Result<Vec<u8>, u32> {
            self.send(&Self::request(0, T_READ, handle, offset, len as u32));
            let (err, h) = self.reply();
            assert_eq!(h, handle);
            if err != 0 {
                return Err(err);
            }
            Ok(self.payload(len))
        }

        fn simple(&mut self, ty: u16, flags: u16, handle: u64, offset: u64, len: u32) -> u32 {
            self.send(&Self::request(flags, ty, handle, offset, len));
            let (err, h) = self.reply();
            assert_eq!(h, handle);
            err
        }
    }

    fn host_device(size: u64) -> Arc<dyn BlockDevice> {
        use crate::engine::host::HostBackend;
        use crate::engine::{SparseDevice, SparseOptions};
        let mut o = SparseOptions::new(size);
        o.buffer_limit = 256 << 20;
        Arc::new(SparseDevice::new(HostBackend::new(), o).unwrap())
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Starts `n` connections on `device` the way [`KernelNbd::attach`] does; returns the
    /// kernel's ends and the serving tasks.
    fn start_connections(
        rt: &tokio::runtime::Runtime,
        device: Arc<dyn BlockDevice>,
        n: usize,
        shutdown: &CancellationToken,
    ) -> (
        Vec<KernelLikeClient>,
        Vec<tokio::task::JoinHandle<Result<u64>>>,
    ) {
        let flags = transmission_flags(&device.capabilities());
        let export = Arc::new(Export {
            name: String::new(),
            description: String::new(),
            device,
            metrics: None,
        });
        let mut clients = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            let _g = rt.enter();
            let stream = tokio::net::UnixStream::from_std(ours).unwrap();
            tasks.push(rt.spawn(serve_connection(
                stream,
                export.clone(),
                flags,
                shutdown.clone(),
            )));
            clients.push(KernelLikeClient::new(theirs));
        }
        (clients, tasks)
    }

    #[test]
    fn serves_kernel_requests_without_a_handshake() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let device = host_device(64 << 20);
        let shutdown = CancellationToken::new();
        let (mut clients, mut tasks) = start_connections(&rt, device.clone(), 1, &shutdown);
        let mut c = clients.pop().unwrap();

        // The kernel expects no greeting: nothing may arrive before the first request.
        c.sock
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        let mut probe = [0u8; 1];
        let got = std::io::Read::read(&mut c.sock, &mut probe);
        assert!(
            matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut),
            "the server sent something before any request: {got:?}"
        );
        c.sock
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();

        // Write (with FUA, which the flags offer), read back.
        let data = pattern(1, 64 << 10);
        assert_eq!(c.write(1, 1 << 20, &data, F_FUA), 0);
        assert_eq!(c.read(2, 1 << 20, data.len()).unwrap(), data);
        assert_eq!(c.simple(T_FLUSH, 0, 3, 0, 0), 0);
        // Trim reads back as zeros.
        assert_eq!(c.simple(T_TRIM, 0, 4, 1 << 20, 4096), 0);
        let back = c.read(5, 1 << 20, 8192).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert_eq!(back[4096..], data[4096..8192]);
        // Write zeroes, as the kernel sends it for REQ_NOUNMAP.
        assert_eq!(
            c.simple(T_WRITE_ZEROES, F_NO_HOLE, 6, (1 << 20) + 8192, 4096),
            0
        );
        let back = c.read(7, (1 << 20) + 8192, 8192).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert_eq!(back[4096..], data[12288..16384]);
        // Past the end: EINVAL for a read, ENOSPC for a write (as the NBD spec asks), no
        // data, and the connection goes on.
        assert_eq!(c.read(8, 64 << 20, 4096), Err(libc::EINVAL as u32));
        assert_eq!(
            c.write(9, (64 << 20) - 4096, &data[..8192], 0),
            libc::ENOSPC as u32
        );

        // Pipelined like a queue of 32 requests: every write goes out before any reply
        // is read, then every read; replies are matched by handle, in any order.
        let mut batch = Vec::new();
        for i in 0..32u64 {
            batch.extend(KernelLikeClient::request(
                0,
                T_WRITE,
                100 + i,
                i * 65536,
                4096,
            ));
            batch.extend(pattern(i as u8, 4096));
        }
        c.send(&batch);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..32 {
            let (err, h) = c.reply();
            assert_eq!(err, 0);
            assert!(seen.insert(h), "handle {h} answered twice");
        }
        assert_eq!(seen, (100..132).collect());
        let mut batch = Vec::new();
        for i in 0..32u64 {
            batch.extend(KernelLikeClient::request(
                0,
                T_READ,
                200 + i,
                i * 65536,
                4096,
            ));
        }
        c.send(&batch);
        for _ in 0..32 {
            let (err, h) = c.reply();
            assert_eq!(err, 0);
            let i = h - 200;
            assert!(i < 32, "unexpected handle {h}");
            assert_eq!(c.payload(4096), pattern(i as u8, 4096), "read {i}");
        }

        // NBD_CMD_DISC ends the connection cleanly; the count includes every request.
        c.send(&KernelLikeClient::request(0, T_DISC, 999, 0, 0));
        let served = rt
            .block_on(tasks.pop().unwrap())
            .unwrap()
            .expect("a clean disconnect");
        assert_eq!(served, 9 + 64 + 1);
        assert!(device.stats().allocated > 0);
    }

    #[test]
    fn several_connections_serve_one_device() {
        // The kernel spreads requests over every socket it was given (NBD_ATTR_SOCKETS);
        // CAN_MULTI_CONN promises that a write acknowledged on one is seen on all.
        let rt = tokio::runtime::Runtime::new().unwrap();
        let device = host_device(16 << 20);
        assert_ne!(
            (transmission_flags(&device.capabilities()) & proto::FLAG_CAN_MULTI_CONN) as u64,
            0
        );
        let shutdown = CancellationToken::new();
        let (mut clients, tasks) = start_connections(&rt, device, 4, &shutdown);
        let threads: Vec<_> = clients
            .drain(..)
            .enumerate()
            .map(|(i, mut c)| {
                std::thread::spawn(move || {
                    for k in 0..64u64 {
                        let off = (i as u64 * 64 + k) * 8192;
                        let d = pattern((i * 64 + k as usize) as u8, 8192);
                        assert_eq!(c.write(k, off, &d, 0), 0);
                    }
                    c
                })
            })
            .collect();
        let mut clients: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        // Each connection reads what the next one wrote.
        for (i, c) in clients.iter_mut().enumerate() {
            let other = (i + 1) % 4;
            for k in 0..64u64 {
                let off = (other as u64 * 64 + k) * 8192;
                let want = pattern((other * 64 + k as usize) as u8, 8192);
                assert_eq!(c.read(1000 + k, off, 8192).unwrap(), want);
            }
        }
        // The kernel going away (sockets closed) ends every connection without an error.
        drop(clients);
        for t in tasks {
            rt.block_on(t).unwrap().expect("EOF is a clean end");
        }
    }

    #[test]
    fn garbage_ends_the_connection_with_an_error() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let shutdown = CancellationToken::new();
        let (mut clients, mut tasks) = start_connections(&rt, host_device(1 << 20), 1, &shutdown);
        let mut c = clients.pop().unwrap();
        c.send(&[0xffu8; 28]);
        let r = rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(10), tasks.pop().unwrap()).await
        });
        let err = r.expect("no hang").unwrap().unwrap_err();
        assert!(format!("{err:#}").contains("protocol violation"), "{err:#}");
    }

    #[test]
    fn shutdown_ends_idle_connections() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let shutdown = CancellationToken::new();
        let (_clients, tasks) = start_connections(&rt, host_device(1 << 20), 2, &shutdown);
        shutdown.cancel();
        for t in tasks {
            let r = rt.block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(10), t).await
            });
            r.expect("no hang").unwrap().unwrap();
        }
    }

    #[test]
    fn netlink_controller_answers() {
        // The controller family itself always exists: a real round trip through the kernel.
        let mut s = GenlSocket::open().unwrap();
        assert_eq!(s.family("nlctrl").unwrap(), GENL_ID_CTRL);
        // A family that does not exist fails with a sentence, not a hang.
        let e = s.family("no-such-family-vd").unwrap_err();
        assert!(format!("{e:#}").contains("no 'no-such-family-vd' netlink family"));
    }
}
