//! systemd integration without libsystemd: readiness over `$NOTIFY_SOCKET` and socket
//! activation through `$LISTEN_FDS`.

use anyhow::{Context, Result};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. "READY=1") to the service manager if `$NOTIFY_SOCKET` is set; does
/// nothing otherwise. Failures are logged, never fatal: a daemon must run without systemd.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&path, state) {
        tracing::warn!("cannot notify the service manager ({state}): {e:#}");
    }
}

fn send(path: &std::ffi::OsStr, state: &str) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let sock = UnixDatagram::unbound().context("creating a datagram socket")?;
    let bytes = path.as_bytes();
    // "@name" is a Linux abstract socket, which systemd uses for containers.
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), std::path::Path::new(path))
            .with_context(|| format!("sending to {}", path.to_string_lossy()))?;
    }
    Ok(())
}

/// First file descriptor passed by socket activation (sd_listen_fds(3)).
const LISTEN_FDS_START: RawFd = 3;

/// Takes the sockets passed by systemd socket activation, if `$LISTEN_PID` names this
/// process, and unsets the variables so that children do not take them too.
pub fn listen_fds() -> Vec<OwnedFd> {
    let pid_matches = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    if !pid_matches || count <= 0 {
        return Vec::new();
    }
    // SAFETY: the environment is changed before any other thread reads it (called at the
    // start of `serve`, before the runtime starts).
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    (LISTEN_FDS_START..LISTEN_FDS_START + count)
        .map(|fd| {
            // SAFETY: systemd passed these descriptors to us and nothing else owns them.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // Don't leak listening sockets into anything we exec.
            let _ = nix::fcntl::fcntl(
                &fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            fd
        })
        .collect()
}

/// A socket passed by systemd, ready to be turned into a tokio listener.
pub enum Activated {
    /// A TCP listening socket.
    Tcp(std::net::TcpListener),
    /// A Unix stream listening socket.
    Unix(std::os::unix::net::UnixListener),
}

/// Sorts passed sockets into TCP and Unix listeners; fails on anything else.
pub fn classify(fds: Vec<OwnedFd>) -> Result<Vec<Activated>> {
    use std::os::fd::AsRawFd;
    fds.into_iter()
        .map(|fd| {
            use nix::sys::socket::{AddressFamily, SockaddrLike, SockaddrStorage, getsockname};
            let Ok(addr) = getsockname::<SockaddrStorage>(fd.as_raw_fd()) else {
                anyhow::bail!(
                    "descriptor {} passed by systemd (LISTEN_FDS) is not a socket",
                    fd.as_raw_fd()
                );
            };
            match addr.family() {
                Some(AddressFamily::Inet | AddressFamily::Inet6) => {
                    let l = std::net::TcpListener::from(fd);
                    l.set_nonblocking(true)?;
                    Ok(Activated::Tcp(l))
                }
                Some(AddressFamily::Unix) => {
                    let l = std::os::unix::net::UnixListener::from(fd);
                    l.set_nonblocking(true)?;
                    Ok(Activated::Unix(l))
                }
                other => anyhow::bail!(
                    "a socket passed by systemd has address family {other:?}: use ListenStream= with an address or a path"
                ),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_a_datagram_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn passed_sockets_are_sorted_by_family_and_the_rest_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let unix = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        let got = classify(vec![OwnedFd::from(tcp), OwnedFd::from(unix)]).unwrap();
        assert!(matches!(got[..], [Activated::Tcp(_), Activated::Unix(_)]));

        let file = std::fs::File::create(dir.path().join("f")).unwrap();
        let e = classify(vec![OwnedFd::from(file)]).err().unwrap();
        assert!(e.to_string().contains("is not a socket"), "{e}");

        use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
        let netlink = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .unwrap();
        let e = classify(vec![netlink]).err().unwrap();
        assert!(e.to_string().contains("address family"), "{e}");
    }
}
