//! What a user meets on the command line, through the real binary: errors that name the
//! real cause, addresses and sizes taken as people write them, sockets bound before slow
//! work, help without noise, and a control directory nobody else can take over.

#[macro_use]
mod common;

use common::{run_with_timeout, vramdisk_bin};
use std::process::Command;
use std::time::Duration;

/// `vramdisk ARGS` with logs at their default level, run to completion.
fn vramdisk(args: &[&str]) -> common::Captured {
    let mut cmd = Command::new(vramdisk_bin());
    cmd.env("NO_COLOR", "1").env_remove("RUST_LOG").args(args);
    run_with_timeout(&mut cmd, Duration::from_secs(30))
}

/// The error line of a failed run (`vramdisk: ...`); fails the test if it succeeded or
/// printed other than one.
fn error_line(args: &[&str]) -> String {
    let out = vramdisk(args);
    assert!(
        !out.status.success(),
        "vramdisk {args:?} succeeded:\n{}",
        out.all()
    );
    let errors = out.error_lines();
    assert_eq!(
        errors.len(),
        1,
        "vramdisk {args:?}: not one error line:\n{}",
        out.stderr
    );
    errors[0].to_string()
}

/// Under `--backend auto` (the default), --gpu and --keep-free say the user wants the GPU:
/// without one, the error is the driver's, once, not advice to use --backend cuda.
#[test]
fn gpu_flags_under_auto_without_a_gpu_name_the_real_cause() {
    if vramdisk::engine::cuda::driver_present() {
        common::loud("SKIPPED: this machine has an NVIDIA driver; the test needs none");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let sock = sock.to_str().unwrap();
    for flag in [["--gpu", "0"], ["--keep-free", "1G"]] {
        let mut args = vec!["serve", "--size", "64M", "--socket", sock];
        args.extend(flag);
        let line = error_line(&args);
        assert!(
            line.contains(vramdisk::engine::cuda::NO_DRIVER),
            "{args:?}: the cause is not named: {line}"
        );
        assert!(
            line.contains(flag[0]) && !line.contains("--backend cuda"),
            "{args:?}: {line}"
        );
        assert!(!dir.path().join("s").exists(), "the socket is left behind");
    }
}
