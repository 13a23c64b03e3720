//! Helpers every kind of test needs: the library's unit tests compile this file as a module,
//! and the integration tests include it from `tests/common` by path, so there is one of each.
//!
//! Skips that show: the test harness captures `print!`/`eprint!` output and shows it only for
//! a failed test, so a test that skips with `eprintln!` reports a silent `ok`. These write to
//! the process's stderr directly, past the capture.

use rand::RngExt;
use std::path::PathBuf;

/// A seeded random generator: with one build, the same seed gives the same sequence, so a
/// test that prints its seed (or fixes one) can be repeated exactly.
pub fn seeded_rng(seed: u64) -> rand::rngs::StdRng {
    rand::SeedableRng::seed_from_u64(seed)
}

/// The source tree the tests read their data files from (the example config, the fuzz
/// corpus, test scripts): `VRAMDISK_SOURCE_DIR` when set, for a test binary run from a copy
/// of the tree somewhere else than where it was built, else the tree it was built from.
pub fn source_dir() -> PathBuf {
    match std::env::var_os("VRAMDISK_SOURCE_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

/// Prints `line` on the process's stderr past the harness's capture, prefixed by the running
/// test's name.
pub fn loud(line: &str) {
    use std::io::Write;
    let name = std::thread::current().name().unwrap_or("test").to_string();
    let _ = writeln!(std::io::stderr().lock(), "{name}: {line}");
}

/// Reports that the running test is skipped, and `why`, where it shows even though the test
/// passes. The caller returns right after.
pub fn skip_loudly(why: &str) {
    loud(&format!("*** SKIPPED: {why} ***"));
}

/// A few libFuzzer-like edits of `input`, for the fuzz targets' short runs in the test
/// suite: bit flips, random bytes, inserted and erased runs, splices
/// from another input, interesting 32- and 64-bit values (lengths, offsets), truncation.
pub fn mutate(rng: &mut rand::rngs::StdRng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.random_range(0..6) {
        match rng.random_range(0..8) {
            0 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] = rng.random::<u8>();
            }
            2 => {
                let i = rng.random_range(0..v.len() + 1);
                let bytes: Vec<u8> = (0..rng.random_range(0..32))
                    .map(|_| rng.random::<u8>())
                    .collect();
                v.splice(i..i, bytes);
            }
            3 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                let n = rng.random_range(0..v.len() - i + 1);
                v.drain(i..i + n);
            }
            4 if v.len() >= 4 => {
                let i = rng.random_range(0..v.len() - 3);
                let x: u32 = [0, 1, 512, 4096, 1 << 20, 1 << 25, 0x7fff_ffff, u32::MAX]
                    [rng.random_range(0..8)];
                v[i..i + 4].copy_from_slice(&x.to_be_bytes());
            }
            5 if v.len() >= 8 => {
                let i = rng.random_range(0..v.len() - 7);
                let x: u64 = [0, 4 << 20, (4 << 20) - 1, 1 << 63, u64::MAX][rng.random_range(0..5)];
                v[i..i + 8].copy_from_slice(&x.to_be_bytes());
            }
            6 if !other.is_empty() => {
                // The head of this input, the tail of another.
                let i = rng.random_range(0..v.len() + 1);
                let j = rng.random_range(0..other.len());
                v.truncate(i);
                v.extend_from_slice(&other[j..]);
            }
            _ => {
                let n = rng.random_range(0..v.len() + 1);
                v.truncate(n);
            }
        }
    }
    v
}

/// Deterministic pseudo-random bytes (xorshift): fast enough to fill megabytes per test,
/// which a general generator is not.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
