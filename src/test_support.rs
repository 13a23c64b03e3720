//! Helpers every kind of test needs: the library's unit tests compile this file as a module,
//! and the integration tests include it from `tests/common` by path, so there is one of each.
//!
//! Skips that show: the test harness captures `print!`/`eprint!` output and shows it only for
//! a failed test, so a test that skips with `eprintln!` reports a silent `ok`. These write to
//! the process's stderr directly, past the capture.

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
