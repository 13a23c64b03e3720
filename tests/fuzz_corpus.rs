//! The committed fuzz corpus through the fuzz targets' entry points, with the normal test
//! suite: every file of `fuzz/corpus/` and `fuzz/seeds/` replayed through its own target
//! (and through the other two, which cost little), then seeded random mutations of those
//! files for a bounded time. What a fuzzer found once stays tested without cargo-fuzz.
//! A panic, a hang (the session entry point fails after 10 s) or a crash is a failure.
//!
//! Environment: `VRAMDISK_FUZZ_SEED` (mutation seed, printed), `VRAMDISK_FUZZ_SECS`
//! (seconds of mutations per target, default 2), `VRAMDISK_SOURCE_DIR` (where `fuzz/` is).

mod common;

use rand::RngExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vramdisk::nbd::fuzzing;

const TARGETS: [&str; 3] = ["parsers", "options", "session"];

/// Every input of one target: its corpus and its seeds, in a fixed order.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = common::source_dir().join("fuzz");
    let mut out = Vec::new();
    for dir in ["corpus", "seeds"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
        paths.sort();
        for p in paths {
            let data = std::fs::read(&p).unwrap();
            out.push((p, data));
        }
    }
    out
}

fn run(target: &str, data: &[u8], exports: &[vramdisk::nbd::export::Export]) {
    match target {
        "parsers" => fuzzing::parsers(data),
        "options" => fuzzing::options(data, exports),
        "session" => fuzzing::session(data, exports),
        _ => unreachable!(),
    }
}

#[test]
fn corpus_replays_and_mutations_through_every_target() {
    let exports = fuzzing::exports();
    let seed = std::env::var("VRAMDISK_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let secs = std::env::var("VRAMDISK_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2u64);
    eprintln!("fuzz corpus: mutation seed {seed} (VRAMDISK_FUZZ_SEED to repeat)");
    let mut report = Vec::new();
    for target in TARGETS {
        let own = inputs(target);
        assert!(
            !own.is_empty(),
            "no committed inputs for the {target} target under {}: run from the source tree, \
             or point VRAMDISK_SOURCE_DIR at it",
            common::source_dir().join("fuzz").display()
        );
        // Replay: the target's own inputs, then the other targets' (any bytes are valid).
        let t0 = Instant::now();
        let mut replayed = 0;
        for other in TARGETS {
            for (path, data) in inputs(other) {
                // A panic names the input that caused it.
                eprintln_on_panic(&path, target, || run(target, &data, &exports));
                replayed += 1;
            }
        }
        let replay_time = t0.elapsed();
        // Mutations of the target's own inputs, bounded by time (and at least a few).
        let mut rng = common::seeded_rng(seed ^ target.len() as u64);
        let t0 = Instant::now();
        let mut mutated = 0;
        while mutated < 50 || t0.elapsed() < Duration::from_secs(secs) {
            let (path, a) = &own[rng.random_range(0..own.len())];
            let (_, b) = &own[rng.random_range(0..own.len())];
            let input = common::mutate(&mut rng, a, b);
            eprintln_on_panic(path, target, || run(target, &input, &exports));
            mutated += 1;
        }
        report.push(format!(
            "{target}: {} own inputs, {replayed} replayed in {:.1} s, {mutated} mutations",
            own.len(),
            replay_time.as_secs_f64()
        ));
    }
    eprintln!("fuzz corpus: {}", report.join("; "));
}

/// Runs `f`; if it panics, says which input (or which input's mutation) did it first.
fn eprintln_on_panic(path: &Path, target: &str, f: impl FnOnce()) {
    if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        eprintln!(
            "the {target} target panicked on {} (or a mutation of it)",
            path.display()
        );
        std::panic::resume_unwind(e);
    }
}
