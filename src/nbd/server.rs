//! The NBD server. (To be written: this file holds the interface the CLI uses.)

use crate::engine::BlockDevice;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// One export: a device under a name.
pub struct Export {
    /// Name clients ask for; "" for the default export.
    pub name: String,
    /// Free-text description sent with NBD_INFO_DESCRIPTION.
    pub description: String,
    /// The device.
    pub device: Arc<dyn BlockDevice>,
}

/// Resource bounds of the server.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most connections served at once.
    pub max_connections: usize,
    /// Most payload bytes in flight per connection.
    pub inflight_bytes: usize,
    /// Time a client has to finish the handshake.
    pub handshake_timeout: Duration,
}

/// A bound listening socket.
pub enum Listener {
    /// TCP.
    Tcp(tokio::net::TcpListener),
    /// A Unix socket, removed again when the server stops.
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Listener {
    /// Binds a Unix socket at `path`, replacing a stale socket file left by a dead daemon.
    pub fn bind_unix(path: &Path) -> Result<Listener> {
        let l = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("cannot listen on Unix socket {}", path.display()))?;
        Ok(Listener::Unix(l, path.to_path_buf()))
    }
}

/// Serves `exports` on `listeners` until `shutdown` is cancelled.
pub async fn serve(
    _exports: Vec<Export>,
    _listeners: Vec<Listener>,
    _limits: Limits,
    shutdown: CancellationToken,
) -> Result<()> {
    shutdown.cancelled().await;
    Ok(())
}
