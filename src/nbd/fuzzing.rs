//! Entry points for fuzzing and property tests: the parsers on byte slices, option handling
//! on a sequence of options, and a whole session (handshake and transmission) driven over an
//! in-process socket pair against small host-memory exports. Each returns normally on any
//! input; a panic, a hang or unbounded memory is a bug. Not part of the stable API.

use super::handshake::{self, Outcome, TlsMode};
use super::proto;
use super::server::{Export, Limits};
use super::transmission;
use crate::engine::host::HostBackend;
use crate::engine::{BlockDevice, SparseDevice, SparseOptions};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Feeds `data` to every pure parser of [`proto`], at every offset for the fixed-size ones.
pub fn parsers(data: &[u8]) {
    if let Some(b) = data.get(..4) {
        let _ = proto::parse_client_flags(b.try_into().unwrap());
    }
    if let Some(b) = data.get(..proto::OPTION_HEADER_LEN) {
        let _ = proto::parse_option_header(b.try_into().unwrap());
    }
    for ext in [false, true] {
        let n = proto::request_len(ext);
        for chunk in data.chunks_exact(n) {
            if let Ok(r) = proto::parse_request(chunk, ext) {
                let _ = r.payload_len(ext);
            }
        }
    }
    if let Ok(r) = proto::parse_info_request(data) {
        assert!(r.name.len() <= data.len());
    }
    if let Ok(r) = proto::parse_meta_context_request(data) {
        for q in &r.queries {
            let _ = proto::query_matches_base_allocation(q, true);
            let _ = proto::query_matches_base_allocation(q, false);
        }
    }
}

fn device(size: u64, read_only: bool) -> Arc<dyn BlockDevice> {
    let mut o = SparseOptions::new(size);
    o.chunk_size = 64 << 10;
    o.read_only = read_only;
    o.buffer_limit = 4 << 20;
    o.max_request = 1 << 20;
    Arc::new(SparseDevice::new(HostBackend::new(), o).expect("a small host device"))
}

/// Two small exports: "" (writable, 4 MiB) and "ro" (read-only, 1 MiB).
pub fn exports() -> Vec<Export> {
    vec![
        Export {
            name: String::new(),
            description: "fuzz".into(),
            device: device(4 << 20, false),
        },
        Export {
            name: "ro".into(),
            description: "fuzz, read-only".into(),
            device: device(1 << 20, true),
        },
    ]
}

/// Runs a sequence of options through option handling. `data` is split into options: a
/// big-endian u32 option number, a u16 length, then that many bytes.
pub fn options(data: &[u8], exports: &[Export]) {
    handshake::fuzz_options(data, exports);
}

/// How [`session`] starts: raw bytes from the first byte on, or a valid handshake chosen by
/// the first byte followed by the rest as transmission-phase bytes.
fn prelude(mode: u8) -> Option<Vec<u8>> {
    let mut v = 3u32.to_be_bytes().to_vec(); // fixed newstyle, no zeroes
    let opt = |v: &mut Vec<u8>, o: u32, d: &[u8]| {
        v.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&(d.len() as u32).to_be_bytes());
        v.extend_from_slice(d);
    };
    let mut meta = 0u32.to_be_bytes().to_vec();
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    match mode % 5 {
        0 => return None,
        1 => {}
        2 => {
            opt(&mut v, proto::OPT_STRUCTURED_REPLY, &[]);
            opt(&mut v, proto::OPT_SET_META_CONTEXT, &meta);
        }
        3 => {
            opt(&mut v, proto::OPT_EXTENDED_HEADERS, &[]);
            opt(&mut v, proto::OPT_SET_META_CONTEXT, &meta);
        }
        _ => {
            // The read-only export.
            opt(&mut v, proto::OPT_GO, &[0, 0, 0, 2, b'r', b'o', 0, 0]);
            return Some(v);
        }
    }
    opt(&mut v, proto::OPT_GO, &[0, 0, 0, 0, 0, 0]);
    Some(v)
}

/// Drives a whole session: the client sends `data` (after a valid handshake, depending on
/// its first byte) and closes its sending side; the server must answer and close within a
/// few seconds whatever the bytes were. Runs on the caller's thread.
pub fn session(data: &[u8], exports: &[Export]) {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
    }
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = prelude(mode).unwrap_or_default();
    input.extend_from_slice(rest);
    RT.with(|rt| {
        rt.block_on(async {
            let done = tokio::time::timeout(Duration::from_secs(10), drive(&input, exports));
            if done.await.is_err() {
                panic!("session did not end within 10 s");
            }
        })
    });
}

async fn drive(input: &[u8], exports: &[Export]) {
    let (mut client, server) = tokio::net::UnixStream::pair().expect("a socket pair");
    let limits = Limits {
        max_connections: 1,
        inflight_bytes: 1 << 20,
        handshake_timeout: Duration::from_secs(5),
        max_per_client: 1,
        tls: None,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let serve = async {
        let mut server = server;
        let neg = handshake::negotiate(&mut server, exports, "fuzz", TlsMode::Off).await;
        if let Ok(Outcome::Transmission(n)) = neg {
            let (rd, wr) = server.into_split();
            transmission::run(rd, wr, &exports[n.export], &n, &limits, &shutdown).await;
        }
    };
    let talk = async {
        let (mut rd, mut wr) = client.split();
        let send = async {
            let _ = wr.write_all(input).await;
            let _ = wr.shutdown().await;
        };
        // Replies are read (and dropped) as they come, so the server never blocks on a
        // full socket.
        let recv = async {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        };
        tokio::join!(send, recv);
    };
    tokio::join!(serve, talk);
}
