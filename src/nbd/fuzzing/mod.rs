//! Entry points for fuzzing and property tests: the parsers on byte slices, option handling
//! on a sequence of options, and a whole session (handshake and transmission) driven over an
//! in-process socket pair against small host-memory exports. Each returns normally on any
//! input; a panic, a hang or unbounded memory is a bug. Not part of the stable API.

mod replies;

use super::export::{BlockSizes, ConnectionLimits, Export};
use super::handshake::{self, Negotiated, Outcome};
use super::proto::{self, Framing};
use super::tls::TlsMode;
use super::transmission;
use crate::engine::host::HostBackend;
use crate::engine::{BlockDevice, SparseDevice, SparseOptions};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

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
/// few seconds whatever the bytes were, and its replies must keep to the protocol (see
/// `replies`). Runs on the caller's thread.
///
/// A first run stops after the handshake, to learn where the transmission phase starts in
/// the bytes and in which framing; the requests there then get cookies 1, 2, … (so that
/// each reply names one), and the second, whole run's replies are checked against them.
pub fn session(data: &[u8], exports: &[Export]) {
    session_answers(data, exports);
}

/// [`session`], returning how many requests the server answered.
fn session_answers(data: &[u8], exports: &[Export]) -> usize {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
    }
    let Some((&mode, rest)) = data.split_first() else {
        return 0;
    };
    let mut input = prelude(mode).unwrap_or_default();
    input.extend_from_slice(rest);
    RT.with(|rt| {
        rt.block_on(async {
            let done = tokio::time::timeout(Duration::from_secs(10), checked(input, exports));
            match done.await {
                Err(_) => panic!("session did not end within 10 s"),
                Ok(Err(e)) => panic!("the server's replies break the protocol: {e}"),
                Ok(Ok(n)) => n,
            }
        })
    })
}

/// Runs the session twice (see [`session`]) and checks the second run's replies; returns
/// how many requests were answered.
async fn checked(mut input: Vec<u8>, exports: &[Export]) -> Result<usize, String> {
    let first = drive(&input, exports, false).await;
    let Some(neg) = first.neg else {
        // The handshake was the whole session.
        return Ok(0);
    };
    let extended = neg.framing == Framing::Extended;
    let sent = replies::number_requests(&mut input[first.read..], extended);
    let run = drive(&input, exports, true).await;
    if run.read != first.read || run.neg.as_ref() != Some(&neg) {
        return Err(format!(
            "the same handshake ended differently: {} bytes read and {:?}, then {} and {:?}",
            first.read, neg, run.read, run.neg
        ));
    }
    let device = &exports[neg.export].device;
    let terms = replies::Terms {
        framing: neg.framing,
        size: device.size(),
        read_only: neg.flags & proto::FLAG_READ_ONLY != 0,
        max_payload: BlockSizes::of(&device.capabilities()).max as u64,
        meta_context: neg.allocation_context,
    };
    replies::check(&sent, &terms, &run.output[run.written..])
}

/// What one run of a session showed.
struct Run {
    /// Bytes the handshake read from the client.
    read: usize,
    /// Bytes the handshake wrote to the client.
    written: usize,
    /// What the handshake settled, if it got to the transmission phase.
    neg: Option<Negotiated>,
    /// Everything the server sent.
    output: Vec<u8>,
}

/// Sends `input` and reads everything the server sends back until it closes; `transmit`:
/// the server goes on to the transmission phase (else it closes after the handshake).
async fn drive(input: &[u8], exports: &[Export], transmit: bool) -> Run {
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
        let mut server = Counted {
            inner: server,
            read: 0,
            written: 0,
        };
        let neg = handshake::negotiate(&mut server, exports, "fuzz", TlsMode::Off, &|| true).await;
        let (read, written) = (server.read, server.written);
        let neg = match neg {
            Ok(Outcome::Transmission(n)) => Some(n),
            _ => None,
        };
        match (&neg, transmit) {
            (Some(n), true) => {
                let (rd, wr) = server.inner.into_split();
                transmission::run(rd, wr, &exports[n.export], n, &limits, None, &shutdown).await;
            }
            // Takes the rest and closes only at its end, so that the client's writes never
            // meet a closed socket (SIGPIPE where nothing ignores it, as in a fuzz binary).
            _ => {
                let _ = tokio::io::copy(&mut server.inner, &mut tokio::io::sink()).await;
            }
        }
        (read, written, neg)
    };
    let talk = async {
        let (mut rd, mut wr) = client.split();
        let send = async {
            let _ = wr.write_all(input).await;
            let _ = wr.shutdown().await;
        };
        // Replies are read as they come, so the server never blocks on a full socket.
        let recv = async {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
            out
        };
        tokio::join!(send, recv).1
    };
    let ((read, written, neg), output) = tokio::join!(serve, talk);
    Run {
        read,
        written,
        neg,
        output,
    }
}

/// A stream that counts what passes through it: where the handshake ends, each way.
struct Counted<S> {
    inner: S,
    read: usize,
    written: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.read += buf.filled().len() - before;
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.written += n;
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The short, bounded version of the fuzz targets that runs with the test suite: seeded
/// mutations of valid sessions and options, fed to the same entry points.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{mutate, seeded_rng};

    /// A request header (cookie 7, or 9 with extended headers), then `payload` filler bytes.
    fn request(ext: bool, cmd: u16, flags: u16, off: u64, len: u64, payload: usize) -> Vec<u8> {
        let (cookie, fill) = if ext { (9, 0xa5) } else { (7, 0x5a) };
        let mut v = proto::encode_request(ext, cmd, flags, cookie, off, len);
        v.resize(v.len() + payload, fill);
        v
    }

    fn req(cmd: u16, flags: u16, off: u64, len: u32, payload: usize) -> Vec<u8> {
        request(false, cmd, flags, off, len.into(), payload)
    }

    fn xreq(cmd: u16, flags: u16, off: u64, len: u64, payload: usize) -> Vec<u8> {
        request(true, cmd, flags, off, len, payload)
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

    fn seed_from_env() -> u64 {
        std::env::var("VRAMDISK_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x6e62_645f_6675_7a7a)
    }

    #[test]
    fn parsers_and_options_survive_mutations() {
        let exports = exports();
        let mut rng = seeded_rng(seed_from_env());
        let seeds = seeds();
        for i in 0..50_000 {
            let s = &seeds[i % seeds.len()];
            let input = mutate(&mut rng, s, &seeds[(i + 1) % seeds.len()]);
            parsers(&input);
            parsers(&input[1.min(input.len())..]);
            // Options: reinterpret as (u32, u16, data) records.
            options(&input, &exports);
        }
    }

    #[test]
    fn sessions_survive_mutations() {
        let exports = exports();
        let mut rng = seeded_rng(seed_from_env() ^ 1);
        let seeds = seeds();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let mut runs = 0;
        while runs < 100 || std::time::Instant::now() < deadline {
            let s = &seeds[runs % seeds.len()];
            session(
                &mutate(&mut rng, s, &seeds[(runs + 1) % seeds.len()]),
                &exports,
            );
            runs += 1;
        }
        // The unmutated seeds too: each must run to the end, its replies checked.
        for s in &seeds {
            let answered = session_answers(s, &exports);
            assert!(answered > 0, "seed {}: no reply checked", s[0]);
        }
    }
}
