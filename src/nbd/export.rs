//! What the listener, the handshake and the transmission phase share, below all three: an
//! [`Export`] (a device under a name), the resource [`Limits`] of the server and of each
//! connection, and what an export offers a client (its block sizes and transmission
//! flags, computed here once for every kind of connection, the kernel's included).

use super::proto::{self, Framing};
use super::tls::TlsSetup;
use crate::engine::{BlockDevice, Capabilities};
use std::sync::Arc;
use std::time::Duration;

/// One export: a device under a name.
pub struct Export {
    /// Name clients ask for; "" for the default export.
    pub name: String,
    /// Free-text description sent with NBD_INFO_DESCRIPTION.
    pub description: String,
    /// The device.
    pub device: Arc<dyn BlockDevice>,
    /// Where the connection count of this export is kept (`vramdisk status`, metrics).
    pub metrics: Option<Arc<crate::engine::metered::DeviceMetrics>>,
}

/// Resource bounds of the server: those it applies as it accepts connections and runs
/// their handshakes, and those every connection gets for its transmission phase.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Most connections served at once.
    pub max_connections: usize,
    /// Most connections at once from one source: a TCP client's IP address, or the user
    /// on the other end of a Unix socket.
    pub max_per_client: usize,
    /// Most payload bytes in flight over all connections of one source (as for
    /// `max_per_client`), so that one client cannot take every I/O buffer of the daemon
    /// however many connections it opens.
    pub client_inflight_bytes: usize,
    /// Time a client has to finish the handshake (TLS included).
    pub handshake_timeout: Duration,
    /// TLS through `NBD_OPT_STARTTLS`, if offered.
    pub tls: Option<TlsSetup>,
    /// What each connection may take once in the transmission phase.
    pub connection: ConnectionLimits,
}

/// Resource bounds of one connection in the transmission phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Most payload bytes in flight on the connection (counted as the I/O buffers they
    /// take).
    pub inflight_bytes: usize,
    /// How long the connection's reader polls its socket for the next request before it
    /// sleeps (zero: never). See `transmission::poll::Poller`.
    pub busy_poll: Duration,
    /// Largest read or write accepted. Requests above the advertised maximum payload
    /// (`BlockSizes::max`) are streamed through buffers of that size, so this bounds the
    /// time one request holds its connection, not memory.
    pub max_request: u64,
}

/// Default of [`ConnectionLimits::max_request`] (`serve --max-request`). nbd's own tester
/// sends requests of up to 47.6 MB and libnbd up to 64 MiB, whatever the server advertises
/// to a client that never asked (`NBD_OPT_EXPORT_NAME`); 1 GiB leaves room for any client
/// known, while a request of 4 GiB (the most simple headers can say) is still refused,
/// and one far larger than any client sends (an attack or a bug) closes the connection
/// rather than being read for minutes.
pub const DEFAULT_MAX_REQUEST: u64 = 1 << 30;

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`, made to obey the spec's
/// rules whatever the device reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlockSizes {
    /// Minimum block size: a power of two, at most 64 KiB.
    pub min: u32,
    /// Preferred block size: a power of two, at least max(min, 512).
    pub preferred: u32,
    /// Maximum payload: at least the preferred size.
    pub max: u32,
}

impl BlockSizes {
    pub(crate) fn of(caps: &Capabilities) -> Self {
        let min = caps.min_block.clamp(1, 1 << 16).next_power_of_two();
        let preferred = caps
            .preferred_block
            .clamp(min.max(512), 1 << 30)
            .next_power_of_two();
        let max = caps.max_block.max(preferred);
        BlockSizes {
            min,
            preferred,
            max,
        }
    }
}

/// Transmission flags for an export with `caps` on a connection with `framing`: what the
/// handshake sends, and (less what the kernel's driver does not use) what kernel nbd is given.
pub(crate) fn transmission_flags(caps: &Capabilities, framing: Framing) -> u16 {
    let mut f = proto::FLAG_HAS_FLAGS;
    let writable = !caps.read_only;
    if caps.read_only {
        f |= proto::FLAG_READ_ONLY;
    }
    if caps.can_flush {
        f |= proto::FLAG_SEND_FLUSH;
    }
    if caps.can_fua {
        f |= proto::FLAG_SEND_FUA;
    }
    if writable && caps.can_trim {
        f |= proto::FLAG_SEND_TRIM;
    }
    if writable && caps.can_zero {
        f |= proto::FLAG_SEND_WRITE_ZEROES;
        if caps.can_fast_zero {
            f |= proto::FLAG_SEND_FAST_ZERO;
        }
    }
    if caps.can_multi_conn {
        f |= proto::FLAG_CAN_MULTI_CONN;
    }
    if caps.can_cache {
        f |= proto::FLAG_SEND_CACHE;
    }
    if framing != Framing::Simple {
        f |= proto::FLAG_SEND_DF;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::host::HostBackend;
    use crate::engine::{SparseDevice, SparseOptions};

    #[test]
    fn block_sizes_obey_the_spec() {
        let mut caps = SparseDevice::new(HostBackend::new(), SparseOptions::new(4096))
            .unwrap()
            .capabilities();
        assert_eq!(
            BlockSizes::of(&caps),
            BlockSizes {
                min: 1,
                preferred: 4096,
                max: 32 << 20
            }
        );
        caps.min_block = 3;
        caps.preferred_block = 100;
        caps.max_block = 10;
        assert_eq!(
            BlockSizes::of(&caps),
            BlockSizes {
                min: 4,
                preferred: 512,
                max: 512
            }
        );
    }
}
