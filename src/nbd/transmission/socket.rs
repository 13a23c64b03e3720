//! The two halves of a connection's socket, as the transmission phase sees them: a
//! [`Source`] that requests are read from, and a [`Sink`] that replies are written to,
//! for TCP and Unix stream sockets.

use nix::sys::socket::{MsgFlags, recv};
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use tokio::io::AsyncRead;

/// The read half of a connection: what the reader reads requests from.
pub(crate) trait Source: AsyncRead + Unpin + Send + Sync + 'static {
    /// Whether the poller steps aside while the client sends ahead, on a machine with few
    /// CPUs (see [`Poller`](super::poll::Poller)).
    const STEPS_ASIDE: bool = false;
    /// The socket, for polling it without the reactor (see [`Poller`](super::poll::Poller)).
    fn fd(&self) -> BorrowedFd<'_>;
}

impl Source for tokio::net::tcp::OwnedReadHalf {
    const STEPS_ASIDE: bool = true;
    fn fd(&self) -> BorrowedFd<'_> {
        AsRef::<tokio::net::TcpStream>::as_ref(self).as_fd()
    }
}

impl Source for tokio::net::unix::OwnedReadHalf {
    fn fd(&self) -> BorrowedFd<'_> {
        AsRef::<tokio::net::UnixStream>::as_ref(self).as_fd()
    }
}

/// The write half of a connection, shared by the reader (which writes without waiting)
/// and the writer task (which waits for the socket to drain).
pub(crate) trait Sink: Send + Sync + 'static {
    /// Writes what the socket takes now; `WouldBlock` if nothing.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Waits until the socket may take more.
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Bytes written that the peer has not taken yet (TCP: not acknowledged; Unix: not
    /// read), which closing the socket now could throw away.
    fn unacknowledged(&self) -> usize;
    /// Ends the stream: the peer reads EOF after the last reply. Requests it sends from now
    /// on are never read.
    fn end_stream(&self);
    /// Throws away what the peer sent and nobody read, just before the socket closes.
    fn discard_unread(&self) {}
}

fn shutdown(fd: std::os::fd::RawFd, how: nix::sys::socket::Shutdown) {
    // Fails only if the socket is already gone, which is the same end.
    let _ = nix::sys::socket::shutdown(fd, how);
}

/// `SIOCOUTQ` on a socket: TCP, bytes the peer has not acknowledged; Unix stream, bytes the
/// peer has not read. Zero if the kernel will not say.
fn outq(fd: std::os::fd::RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (= SIOCOUTQ) writes one int.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if rc == 0 { n.max(0) as usize } else { 0 }
}

impl Sink for tokio::net::tcp::OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        tokio::net::tcp::OwnedWriteHalf::try_write_vectored(self, bufs)
    }
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tokio::net::tcp::OwnedWriteHalf::writable(self)
    }
    fn unacknowledged(&self) -> usize {
        outq(AsRef::<tokio::net::TcpStream>::as_ref(self).as_raw_fd())
    }
    fn end_stream(&self) {
        // Only the write side: data arriving on a TCP socket whose read side is shut makes
        // Linux answer with a reset, which would throw away replies not yet acknowledged.
        shutdown(
            AsRef::<tokio::net::TcpStream>::as_ref(self).as_raw_fd(),
            nix::sys::socket::Shutdown::Write,
        )
    }
}

impl Sink for tokio::net::unix::OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        tokio::net::unix::OwnedWriteHalf::try_write_vectored(self, bufs)
    }
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        tokio::net::unix::OwnedWriteHalf::writable(self)
    }
    fn unacknowledged(&self) -> usize {
        outq(AsRef::<tokio::net::UnixStream>::as_ref(self).as_raw_fd())
    }
    fn end_stream(&self) {
        // Both sides: from here on the peer's writes fail (EPIPE) instead of queueing on
        // this socket, so that `discard_unread` can leave its queue empty for good.
        shutdown(
            AsRef::<tokio::net::UnixStream>::as_ref(self).as_raw_fd(),
            nix::sys::socket::Shutdown::Both,
        )
    }
    fn discard_unread(&self) {
        // Closing a Unix socket with unread data sets ECONNRESET on the peer, which its next
        // read returns in place of the EOF (even after it has read every reply). The read
        // side is shut (`end_stream`), so once empty the queue stays empty.
        let fd = AsRef::<tokio::net::UnixStream>::as_ref(self).as_raw_fd();
        let mut buf = [0u8; 16 << 10];
        while let Ok(1..) = recv(fd, &mut buf, MsgFlags::MSG_DONTWAIT) {}
    }
}
