//! Entry points for fuzzing and property tests: the parsers on byte slices, option handling
//! on a sequence of options, and a whole session (handshake and transmission) driven over an
//! in-process socket pair against small host-memory exports. Each returns normally on any
//! input; a panic, a hang or unbounded memory is a bug. Not part of the stable API.

use super::export::{ConnectionLimits, Export};
use super::handshake::{self, Outcome};
use super::proto;
use super::tls::TlsMode;
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
            metrics: None,
        },
        Export {
            name: "ro".into(),
            description: "fuzz, read-only".into(),
            device: device(1 << 20, true),
            metrics: None,
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
    let limits = ConnectionLimits {
        inflight_bytes: 1 << 20,
        // Polling would make runs depend on timing; the fuzzer wants them repeatable.
        busy_poll: Duration::ZERO,
        // Small, so that the streaming of requests above the maximum payload is reached.
        max_request: 64 << 20,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let serve = async {
        let mut server = server;
        let neg = handshake::negotiate(&mut server, exports, "fuzz", TlsMode::Off, &|| true).await;
        if let Ok(Outcome::Transmission(n)) = neg {
            let (rd, wr) = server.into_split();
            transmission::run(rd, wr, &exports[n.export], &n, &limits, None, &shutdown).await;
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

/// The short, bounded version of the fuzz targets that runs with the test suite: seeded
/// mutations of valid sessions and options, fed to the same entry points.
#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    fn req(cmd: u16, flags: u16, off: u64, len: u32, payload: usize) -> Vec<u8> {
        let mut v = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&7u64.to_be_bytes());
        v.extend_from_slice(&off.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v.resize(v.len() + payload, 0x5a);
        v
    }

    fn xreq(cmd: u16, flags: u16, off: u64, len: u64, payload: usize) -> Vec<u8> {
        let mut v = proto::EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&9u64.to_be_bytes());
        v.extend_from_slice(&off.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v.resize(v.len() + payload, 0xa5);
        v
    }

    fn seeds() -> Vec<Vec<u8>> {
        use proto::*;
        let mut simple = vec![1u8];
        simple.extend(req(CMD_WRITE, 0, 0, 512, 512));
        simple.extend(req(CMD_READ, 0, 0, 512, 0));
        simple.extend(req(CMD_TRIM, 0, 4096, 4096, 0));
        simple.extend(req(CMD_WRITE_ZEROES, CMD_FLAG_FUA, 8192, 4096, 0));
        simple.extend(req(CMD_FLUSH, 0, 0, 0, 0));
        simple.extend(req(CMD_DISC, 0, 0, 0, 0));
        let mut structured = vec![2u8];
        structured.extend(req(CMD_WRITE, 0, 65536, 1024, 1024));
        structured.extend(req(CMD_READ, 0, 0, 131072, 0));
        structured.extend(req(CMD_BLOCK_STATUS, 0, 0, 1 << 20, 0));
        structured.extend(req(CMD_READ, CMD_FLAG_DF, 0, 4096, 0));
        let mut extended = vec![3u8];
        extended.extend(xreq(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 512, 512));
        extended.extend(xreq(CMD_BLOCK_STATUS, 0, 0, 1 << 22, 0));
        extended.extend(xreq(CMD_FLUSH, CMD_FLAG_PAYLOAD_LEN, 0, 8, 8));
        let mut ro = vec![4u8];
        ro.extend(req(CMD_WRITE, 0, 0, 512, 512));
        ro.extend(req(CMD_READ, 0, 0, 512, 0));
        let mut raw = vec![0u8, 0, 0, 0, 3];
        for (o, d) in [
            (OPT_LIST, vec![]),
            (OPT_STRUCTURED_REPLY, vec![]),
            (OPT_STARTTLS, vec![]),
            (OPT_GO, vec![0, 0, 0, 0, 0, 1, 0, 3]),
        ] {
            raw.extend_from_slice(&IHAVEOPT.to_be_bytes());
            raw.extend_from_slice(&o.to_be_bytes());
            raw.extend_from_slice(&(d.len() as u32).to_be_bytes());
            raw.extend_from_slice(&d);
        }
        raw.extend(req(CMD_READ, 0, 0, 512, 0));
        vec![simple, structured, extended, ro, raw]
    }

    fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..1 + rng.below(8) {
            match rng.below(6) {
                0 if !v.is_empty() => {
                    let i = rng.below(v.len());
                    v[i] ^= 1 << rng.below(8);
                }
                1 if !v.is_empty() => {
                    let i = rng.below(v.len());
                    v[i] = rng.next() as u8;
                }
                2 => {
                    let i = rng.below(v.len() + 1);
                    let n = rng.below(64);
                    let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                    v.splice(i..i, bytes);
                }
                3 if !v.is_empty() => {
                    let i = rng.below(v.len());
                    let n = rng.below(v.len() - i + 1);
                    v.drain(i..i + n);
                }
                4 if v.len() > 8 => {
                    // An interesting 32-bit value somewhere (lengths, offsets).
                    let i = rng.below(v.len() - 4);
                    let x: u32 = [0, 1, 0x7fff_ffff, 0xffff_ffff, 1 << 25, 4096][rng.below(6)];
                    v[i..i + 4].copy_from_slice(&x.to_be_bytes());
                }
                _ => v.truncate(rng.below(v.len() + 1)),
            }
        }
        v
    }

    fn seed_from_env() -> u64 {
        std::env::var("VRAMDISK_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x6e62_645f_6675_7a7a)
    }

    #[test]
    fn parsers_and_options_survive_mutations() {
        let exports = exports();
        let mut rng = Rng(seed_from_env());
        let seeds = seeds();
        for i in 0..50_000 {
            let s = &seeds[i % seeds.len()];
            let input = mutate(&mut rng, s);
            parsers(&input);
            parsers(&input[1.min(input.len())..]);
            // Options: reinterpret as (u32, u16, data) records.
            options(&input, &exports);
        }
    }

    #[test]
    fn sessions_survive_mutations() {
        let exports = exports();
        let mut rng = Rng(seed_from_env() ^ 1);
        let seeds = seeds();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let mut runs = 0;
        while runs < 100 || std::time::Instant::now() < deadline {
            let s = &seeds[runs % seeds.len()];
            session(&mutate(&mut rng, s), &exports);
            runs += 1;
        }
        // The unmutated seeds too: each must run to the end.
        for s in &seeds {
            session(s, &exports);
        }
    }
}
