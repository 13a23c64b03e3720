//! End-to-end tests of `vramdisk attach` / `vramdisk detach` with real tools: mkfs.ext4,
//! mount, e2fsck, blkdiscard, mkswap/swapon, dd.
//!
//! They need root, /dev/fuse and /dev/loop-control (CI has them). Where those are missing
//! each test prints a SKIPPED line and passes, unless VRAMDISK_REQUIRE_ATTACH=1.
//! Tests take a global lock: they share the machine's loop devices and swap table.

mod common;

use common::pattern;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

/// The backend the attached devices use: GPU memory where the GPU tests are switched on
/// (`VRAMDISK_TEST_GPU=1`, set by the GPU machine's test runner), host RAM elsewhere, so the
/// same mkfs/mount/discard/swap/kill tests cover both data paths.
fn backend() -> &'static str {
    if std::env::var("VRAMDISK_TEST_GPU").as_deref() == Ok("1") {
        "cuda"
    } else {
        "host"
    }
}

/// The attach method the general tests use: FUSE + loop, or the one named by
/// `VRAMDISK_TEST_VIA` (`nbd`, `ublk`), so that the test VM runs the same mkfs, discard,
/// swap, forced-detach and kill tests through each kernel driver.
fn via() -> String {
    std::env::var("VRAMDISK_TEST_VIA").unwrap_or_else(|_| "fuse".into())
}

/// The prefix of the device paths `via` attaches.
fn dev_prefix(via: &str) -> &'static str {
    match via {
        "nbd" => "/dev/nbd",
        "ublk" => "/dev/ublkb",
        _ => "/dev/loop",
    }
}

fn bin() -> PathBuf {
    std::env::var_os("VRAMDISK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_vramdisk")))
}

/// `secs` seconds, stretched `VRAMDISK_TEST_SLACK` times (the test VM, 10-30x slower than a
/// host, sets it) for waits on things that merely take long there.
fn slack(secs: u64) -> Duration {
    let k = std::env::var("VRAMDISK_TEST_SLACK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1u64);
    Duration::from_secs(secs * k.max(1))
}

/// Whether this machine can run attach tests; prints why not.
fn capable(test: &str) -> bool {
    let mut missing = Vec::new();
    for p in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(p).exists() {
            missing.push(format!("{p} missing"));
        }
    }
    if !nix_is_root() {
        missing.push("not root".into());
    }
    let why_not = match via().as_str() {
        "fuse" => None,
        "nbd" => vramdisk::attach::kernel_nbd::unavailable(),
        "ublk" => vramdisk::attach::ublk::unavailable(),
        other => Some(format!("VRAMDISK_TEST_VIA={other} is not an attach method")),
    };
    missing.extend(why_not);
    if missing.is_empty() {
        return true;
    }
    let why = missing.join(", ");
    if std::env::var_os("VRAMDISK_REQUIRE_ATTACH").is_some() {
        panic!("{test}: cannot run ({why}) but VRAMDISK_REQUIRE_ATTACH is set");
    }
    common::skip_loudly(&format!("{test}: {why}"));
    false
}

fn nix_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The fuse module's switch for FUSE over io_uring.
const URING_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Sets the fuse module's `enable_uring` for as long as it lives, then puts back what was
/// there. It matters only when a mount negotiates (a connection that got io_uring keeps
/// it), so a guard around an attach is enough.
struct UringParam(Option<String>);

impl UringParam {
    /// `on` for a while; `None` where the kernel has no such switch or it cannot be set.
    fn set(on: bool) -> Option<UringParam> {
        let old = std::fs::read_to_string(URING_PARAM).ok()?;
        std::fs::write(URING_PARAM, if on { "Y" } else { "N" }).ok()?;
        Some(UringParam(Some(old)))
    }
}

impl Drop for UringParam {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            let _ = std::fs::write(URING_PARAM, old.trim());
        }
    }
}

/// The FUSE transport the general tests use: the default (fuser), or FUSE over io_uring
/// where `VRAMDISK_FUSE_TRANSPORT=uring` opts in (the daemons read the same variable).
fn wants_uring() -> bool {
    std::env::var("VRAMDISK_FUSE_TRANSPORT").as_deref() == Ok("uring")
}

/// One attached device: the daemon (foreground child) and its private run directory.
struct Attached {
    child: Option<Child>,
    dev: PathBuf,
    run_dir: tempfile::TempDir,
}

impl Attached {
    fn start(extra: &[&str]) -> Attached {
        let run_dir = tempfile::tempdir().unwrap();
        let via = via();
        let via_args: &[&str] = if extra.contains(&"--via") {
            &[]
        } else {
            &["--via", &via]
        };
        // Where the tests opt in to FUSE over io_uring, the module's switch is on only while
        // the daemon negotiates.
        let _uring = (via == "fuse" && !extra.contains(&"--fuse-transport") && wants_uring())
            .then(|| UringParam::set(true))
            .flatten();
        let backend_args: &[&str] = if extra.contains(&"--backend") {
            &[]
        } else {
            &["--backend", backend()]
        };
        let mut child = Command::new(bin())
            .arg("attach")
            .args(backend_args)
            .args(via_args)
            .args(extra)
            .env("VRAMDISK_RUNTIME_DIR", run_dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting vramdisk attach");
        let stdout = child.stdout.take().unwrap();
        // The daemon prints the device path once attached; bound the wait.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut l = String::new();
            let _ = r.read_line(&mut l);
            let _ = tx.send(l);
        });
        let line = rx.recv_timeout(slack(20)).unwrap_or_default();
        let dev = PathBuf::from(line.trim());
        if !dev.starts_with("/dev/") {
            let _ = child.kill();
            let status = child.wait().unwrap();
            panic!("attach printed {line:?} instead of a device path ({status})");
        }
        Attached {
            child: Some(child),
            dev,
            run_dir,
        }
    }

    fn dev(&self) -> &str {
        self.dev.to_str().unwrap()
    }

    fn vramdisk(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .env("VRAMDISK_RUNTIME_DIR", self.run_dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// This device's export as `vramdisk status --json` shows it, with its daemon's pid.
    fn status(&self) -> serde_json::Value {
        status_of(&self.vramdisk(&["status", "--json"]), self.dev())
    }

    /// The daemon's state, as written in its state directory.
    fn state(&self) -> serde_json::Value {
        for e in std::fs::read_dir(self.run_dir.path()).unwrap() {
            let p = e.unwrap().path().join("state.json");
            if let Ok(text) = std::fs::read_to_string(&p) {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                if v["device"] == self.dev() {
                    return v;
                }
            }
        }
        panic!("no state for {}", self.dev.display());
    }

    /// Bytes of memory the device holds, read from the daemon's stats file (FUSE), or from
    /// `vramdisk status --json` (the kernel methods, which have none).
    fn allocated(&self) -> u64 {
        let Some(stats) = self.state()["stats"].as_str().map(str::to_string) else {
            return self.status()["allocated"].as_u64().unwrap();
        };
        let text = std::fs::read_to_string(&stats).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["allocated"].as_u64().unwrap()
    }

    fn detach(&mut self, extra: &[&str]) -> Output {
        let mut args = vec!["detach"];
        args.extend_from_slice(extra);
        args.push(self.dev());
        self.vramdisk(&args)
    }

    /// Detaches and checks that nothing is left behind.
    fn detach_clean(mut self) {
        let state = self.state();
        let out = self.detach(&[]);
        assert!(
            out.status.success(),
            "detach failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut child = self.child.take().unwrap();
        let status = wait_timeout(&mut child, slack(10)).expect("daemon exits");
        assert!(status.success(), "daemon exited with {status}");
        assert_nothing_left(&state, self.run_dir.path());
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A failed test: tear down as best we can so later tests find a clean machine.
            let _ = self.vramdisk(&["detach", "--force", self.dev.to_str().unwrap()]);
            let _ = c.kill();
            let _ = c.wait();
            let _ = self.vramdisk(&["detach", "--force", self.dev.to_str().unwrap()]);
        }
    }
}

/// The process is gone or a zombie (an orphaned daemon is reaped by whatever init this
/// container has, maybe late).
/// A fresh `dd` read of a device whose daemon died fails within `secs` seconds, never hangs.
///
/// Kernel nbd gets 45 s: a request that was in flight when the daemon died (udev's blkid
/// probe of the new device, say) ends only at the nbd request timeout the attach sets
/// (30 s), and a fresh open waits behind it; requests sent after the death fail at once.
/// Seen in the test VM: dd timed out at 20 s in one run of three.
fn assert_dead_device_fails(dev: &str, secs: u32) {
    let secs = if dev.starts_with("/dev/nbd") {
        secs.max(45)
    } else {
        secs
    };
    let start = Instant::now();
    let dd = run(
        "timeout",
        &[
            &secs.to_string(),
            "dd",
            &format!("if={dev}"),
            "of=/dev/null",
            "bs=4k",
            "count=1",
            "iflag=direct",
        ],
    );
    assert_ne!(
        dd.status.code(),
        Some(124),
        "dd hung on the dead device {dev}"
    );
    assert!(!dd.status.success(), "dd read from the dead device {dev}");
    eprintln!(
        "dd of the dead device {dev} failed after {:.1}s",
        start.elapsed().as_secs_f64()
    );
}

fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let after = &stat[stat.rfind(')').unwrap() + 1..];
            matches!(after.split_whitespace().next(), Some("Z") | Some("X"))
        }
    }
}

fn wait_timeout(child: &mut Child, t: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if start.elapsed() > t {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The export attached at `dev` in the output of `vramdisk status --json`.
fn status_of(out: &Output, dev: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "vramdisk status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let exports: Vec<&serde_json::Value> = all
        .as_array()
        .expect("status --json prints an array of daemons")
        .iter()
        .flat_map(|d| d["exports"].as_array().unwrap())
        .filter(|e| e["attach"] == dev)
        .collect();
    assert_eq!(
        exports.len(),
        1,
        "status shows {} exports attached at {dev}:\n{all:#}",
        exports.len()
    );
    exports[0].clone()
}

/// Whether the device of `state` is gone: no loop device bound to the image, no nbd
/// connection, no ublk device.
fn device_released(state: &serde_json::Value) -> bool {
    let dev = state["device"].as_str().unwrap();
    match state["method"].as_str().unwrap() {
        "fuse" => {
            let n = state["loop_number"].as_u64().unwrap();
            let image = state["image"].as_str().unwrap();
            let backing = std::fs::read_to_string(format!("/sys/block/loop{n}/loop/backing_file"))
                .unwrap_or_default();
            backing.trim() != image
        }
        // A connected nbd device has a pid file naming its server.
        "nbd" => {
            let name = dev.strip_prefix("/dev/").unwrap();
            !Path::new(&format!("/sys/block/{name}/pid")).exists()
        }
        "ublk" => {
            let id = dev.strip_prefix("/dev/ublkb").unwrap();
            !Path::new(&format!("/dev/ublkc{id}")).exists()
        }
        other => panic!("unknown method {other}"),
    }
}

/// The device released (see [`device_released`]), no FUSE mount, no state directory.
fn assert_nothing_left(state: &serde_json::Value, run_dir: &Path) {
    assert!(
        device_released(state),
        "{} is still attached",
        state["device"]
    );
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let run = run_dir.to_str().unwrap();
    assert!(
        !mountinfo.contains(run),
        "a mount under {run} is left:\n{mountinfo}"
    );
    let left: Vec<_> = std::fs::read_dir(run_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "left in the run directory: {left:?}");
}

#[test]
fn ext4_tree_survives_remount_and_fsck() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !capable("ext4_tree_survives_remount_and_fsck") {
        return;
    }
    let d = Attached::start(&["--size", "256M"]);
    // The device looks like a disk with 4 KiB sectors.
    let name = d.dev.file_name().unwrap().to_str().unwrap().to_string();
    let lbs =
        std::fs::read_to_string(format!("/sys/block/{name}/queue/logical_block_size")).unwrap();
    assert_eq!(lbs.trim(), "4096");
    if via() == "fuse" {
        let dio = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).unwrap();
        assert_eq!(dio.trim(), "1", "loop direct I/O is off");
    }

    run_ok("mkfs.ext4", &["-q", "-F", d.dev()]);
    let mnt = tempfile::tempdir().unwrap();
    let m = mnt.path().to_str().unwrap();
    run_ok("mount", &[d.dev(), m]);

    // A tree of files of varied sizes, some unaligned, with known checksums.
    let mut files = Vec::new();
    for dir in 0..4 {
        let sub = mnt.path().join(format!("d{dir}/e{dir}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..8u64 {
            let len = [0usize, 1, 4095, 4096, 65_537, 1 << 20, 3 << 20, 777][f as usize];
            let path = sub.join(format!("f{f}.bin"));
            std::fs::write(&path, pattern(dir * 100 + f, len)).unwrap();
            files.push(path);
        }
    }
    let names: Vec<&str> = files.iter().map(|p| p.to_str().unwrap()).collect();
    let sums = run_ok("sha256sum", &names);
    let sums_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(sums_file.path(), &sums).unwrap();

    // Detach must refuse while the filesystem is mounted, and leave it working.
    let mut d = d;
    let refused = d.detach(&[]);
    assert!(
        !refused.status.success(),
        "detach of a mounted device succeeded"
    );
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("mounted at"), "unexpected refusal: {why}");

    // So must SIGTERM to the daemon: it keeps serving and says why.
    let pid = d.child.as_ref().unwrap().id() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // The daemon's state directory, named by its pid.
    let refused_file = d.run_dir.path().join(pid.to_string()).join("refused");
    let start = Instant::now();
    while !refused_file.exists() && start.elapsed() < slack(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let why = std::fs::read_to_string(&refused_file).expect("the daemon wrote no refusal");
    assert!(why.contains("mounted at"), "{why}");
    assert!(
        d.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "daemon exited"
    );
    std::fs::write(mnt.path().join("after-sigterm"), b"still here").unwrap();
    files.push(mnt.path().join("after-sigterm"));

    let extra = run_ok("sha256sum", &[files.last().unwrap().to_str().unwrap()]);
    std::fs::write(sums_file.path(), sums.clone() + &extra).unwrap();
    run_ok("umount", &[m]);
    // The data came back from the device, not from a cache: drop caches and remount.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    run_ok("mount", &[d.dev(), m]);
    let check = run(
        "sha256sum",
        &["-c", "--quiet", sums_file.path().to_str().unwrap()],
    );
    assert!(
        check.status.success(),
        "checksums differ after remount:\n{}",
        String::from_utf8_lossy(&check.stdout)
    );
    run_ok("umount", &[m]);
    let fsck = run("e2fsck", &["-fn", d.dev()]);
    assert!(
        fsck.status.success(),
        "e2fsck -fn found problems:\n{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    d.detach_clean();
}

/// Many threads of direct I/O at 4 KiB and 1 MiB, with lulls between bursts, so that the
/// daemon's FUSE threads park, poll and wake in every order (attach::pacing); every read
/// must return what was last written there.
#[test]
fn concurrent_direct_io_in_bursts_reads_back() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !capable("concurrent_direct_io_in_bursts_reads_back") {
        return;
    }
    let d = Attached::start(&["--size", "128M", "--threads", "4"]);
    direct_io_in_bursts_reads_back(&d.dev, 8, 16 << 20);
    d.detach_clean();
}

/// `threads` threads, each on its own `region` bytes of `dev`, write
/// and read back 4 KiB and 1 MiB blocks of [`pattern`] in six bursts with lulls between;
/// every read must return what was last written there.
fn direct_io_in_bursts_reads_back(dev: &Path, threads: u64, region: u64) {
    let workers: Vec<_> = (0..threads)
        .map(|w| {
            let dev = dev.to_path_buf();
            std::thread::spawn(move || {
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc_o_direct())
                    .open(&dev)
                    .unwrap();
                let base = w * region;
                // What each 4 KiB block of this worker's region holds: (seed, block index
                // within the write that put it there; the block is pattern(seed + index)),
                // or never written.
                let mut model: Vec<Option<(u64, u64)>> = vec![None; (region / 4096) as usize];
                let mut x = w.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut next = || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                let mut ops = 0u64;
                for burst in 0..6u64 {
                    for _ in 0..150 {
                        let big = next() % 8 == 0;
                        let blocks = if big { 256 } else { 1 };
                        let first = next() % (region / 4096 - blocks);
                        let offset = base + first * 4096;
                        if next() % 2 == 0 {
                            let seed = next();
                            let data: Vec<u8> =
                                (0..blocks).flat_map(|b| pattern(seed + b, 4096)).collect();
                            let data = AlignedBuf::from(&data);
                            f.write_all_at(data.as_slice(), offset).unwrap();
                            for b in 0..blocks {
                                model[(first + b) as usize] = Some((seed, b));
                            }
                        } else {
                            let got = read_fd_direct(&f, offset, (blocks * 4096) as usize).unwrap();
                            for b in 0..blocks {
                                let block = &got[(b * 4096) as usize..][..4096];
                                let want = match model[(first + b) as usize] {
                                    None => vec![0u8; 4096],
                                    Some((seed, i)) => pattern(seed + i, 4096),
                                };
                                assert!(
                                    block == want.as_slice(),
                                    "worker {w}, burst {burst}: block at {} differs",
                                    offset + b * 4096
                                );
                            }
                        }
                        ops += 1;
                    }
                    // A lull: the daemon's threads poll, then park.
                    std::thread::sleep(Duration::from_millis(20 + 10 * (w % 3)));
                }
                ops
            })
        })
        .collect();
    let ops: u64 = workers.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(ops, threads * 6 * 150);
}

#[test]
fn forced_detach_of_mounted_device() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !capable("forced_detach_of_mounted_device") {
        return;
    }
    let mut d = Attached::start(&["--size", "64M"]);
    let state = d.state();
    run_ok("mkfs.ext4", &["-q", "-F", d.dev()]);
    let mnt = tempfile::tempdir().unwrap();
    let m = mnt.path().to_str().unwrap();
    run_ok("mount", &[d.dev(), m]);
    std::fs::write(mnt.path().join("f"), pattern(1, 1 << 20)).unwrap();
    run_ok("sync", &[]);

    // --force: the daemon goes although the filesystem is mounted; its users get errors.
    let out = d.detach(&["--force"]);
    assert!(
        out.status.success(),
        "detach --force failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut child = d.child.take().unwrap();
    assert!(
        wait_timeout(&mut child, slack(10)).is_some(),
        "daemon still runs"
    );
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    let read = run(
        "timeout",
        &["10", "cat", mnt.path().join("f").to_str().unwrap()],
    );
    assert_ne!(
        read.status.code(),
        Some(124),
        "reading the orphaned filesystem hung"
    );
    assert!(
        !read.status.success(),
        "read from a detached device succeeded"
    );
    // Unmounting releases the device: a loop device then detaches itself, a ublk device is
    // deleted by the kernel.
    let um = run("timeout", &["20", "umount", m]);
    if !um.status.success() {
        run_ok("umount", &["-l", m]);
    }
    let start = Instant::now();
    while !device_released(&state) {
        assert!(
            start.elapsed() < slack(10),
            "{} stays bound",
            state["device"]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_nothing_left(&state, d.run_dir.path());
}

#[test]
fn discard_frees_memory_and_reads_zeros() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !capable("discard_frees_memory_and_reads_zeros") {
        return;
    }
    // 2 MiB chunks: a 64 MiB write takes 32 of them.
    let d = Attached::start(&["--size", "128M", "--chunk-size", "2M"]);
    assert_eq!(d.allocated(), 0, "a fresh device holds memory");
    let data = pattern(7, 64 << 20);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc_o_direct())
            .open(&d.dev)
            .unwrap();
        // O_DIRECT needs an aligned buffer: copy into one.
        let buf = AlignedBuf::from(&data);
        use std::io::Write;
        f.write_all(buf.as_slice()).unwrap();
        f.sync_all().unwrap();
    }
    assert_eq!(d.allocated(), 64 << 20);

    // `vramdisk status` finds the daemon through its control socket and shows where the
    // device is attached, with what went through it.
    let st = d.status();
    assert_eq!(st["attach"], d.dev());
    assert_eq!(st["pid"], d.child.as_ref().unwrap().id());
    assert_eq!(st["backend"], backend());
    assert_eq!(st["size"], 128u64 << 20);
    assert_eq!(st["allocated"], 64u64 << 20);
    assert!(
        st["write_bytes"].as_u64().unwrap() >= 64 << 20,
        "status counted {} bytes written, 64 MiB went through the device",
        st["write_bytes"]
    );
    let table = d.vramdisk(&["status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    let line = table
        .lines()
        .find(|l| l.contains(d.dev()))
        .unwrap_or_else(|| panic!("no status line shows {}:\n{table}", d.dev()));
    assert!(line.starts_with(&st["pid"].to_string()), "{line}");
    assert!(table.lines().next().unwrap().contains("ATTACH"), "{table}");

    // Discard the first 32 MiB: the memory goes back, the range reads as zeros.
    run_ok(
        "blkdiscard",
        &["-o", "0", "-l", &(32u64 << 20).to_string(), d.dev()],
    );
    assert_eq!(d.allocated(), 32 << 20, "blkdiscard did not free memory");
    let back = read_direct(&d.dev, 0, 64 << 20);
    assert!(
        back[..32 << 20].iter().all(|&b| b == 0),
        "discarded range is not zero"
    );
    assert!(
        back[32 << 20..] == data[32 << 20..],
        "data after the discard changed"
    );

    // Write-zeroes (blkdiscard -z) zeroes too.
    run_ok(
        "blkdiscard",
        &[
            "-z",
            "-o",
            &(40u64 << 20).to_string(),
            "-l",
            "4096",
            d.dev(),
        ],
    );
    let back = read_direct(&d.dev, 40 << 20, 8192);
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert_eq!(back[4096..], data[(40 << 20) + 4096..(40 << 20) + 8192]);

    // The whole device, past the written part too.
    run_ok("blkdiscard", &[d.dev()]);
    assert_eq!(d.allocated(), 0, "a full discard left memory allocated");
    d.detach_clean();
}

#[test]
fn swap_on_attached_device() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !capable("swap_on_attached_device") {
        return;
    }
    // --swap: the daemon runs mkswap and swapon, and swapoff on detach.
    let d = Attached::start(&["--size", "64M", "--swap"]);
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap();
    assert!(swaps.contains(d.dev()), "not in /proc/swaps:\n{swaps}");
    // Preallocated: swap never waits for an allocation.
    assert_eq!(d.allocated(), 64 << 20);
    let state = d.state();
    d.detach_clean();
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap();
    assert!(
        !swaps.contains(state["device"].as_str().unwrap()),
        "still swap after detach:\n{swaps}"
    );

    // Someone else's swap on the device blocks detach until it is turned off.
    let mut d = Attached::start(&["--size", "64M"]);
    run_ok("mkswap", &[d.dev()]);
    run_ok("swapon", &[d.dev()]);
    let refused = d.detach(&[]);
    let why = String::from_utf8_lossy(&refused.stderr).into_owned();
    run_ok("swapoff", &[d.dev()]);
    assert!(!refused.status.success(), "detach of active swap succeeded");
    assert!(why.contains("swap"), "unexpected refusal: {why}");
    d.detach_clean();
}

/// A memory cgroup limited to `limit` bytes that may swap: (directory, v1?). None where
/// neither a v1 memory hierarchy nor a v2 one with the memory controller is writable.
fn swap_cgroup(limit: u64, suffix: &str) -> Option<(PathBuf, bool)> {
    let name = format!("vramdisk-test-{}-{suffix}", std::process::id());
    let v1 = Path::new("/sys/fs/cgroup/memory");
    if v1.join("memory.limit_in_bytes").exists() {
        let dir = v1.join(&name);
        std::fs::create_dir(&dir).ok()?;
        std::fs::write(dir.join("memory.limit_in_bytes"), limit.to_string()).ok()?;
        let _ = std::fs::write(dir.join("memory.swappiness"), "100");
        return Some((dir, true));
    }
    let v2 = Path::new("/sys/fs/cgroup");
    let controllers = std::fs::read_to_string(v2.join("cgroup.controllers")).ok()?;
    if !controllers.split_whitespace().any(|c| c == "memory") {
        return None;
    }
    let _ = std::fs::write(v2.join("cgroup.subtree_control"), "+memory");
    let dir = v2.join(&name);
    std::fs::create_dir(&dir).ok()?;
    std::fs::write(dir.join("memory.max"), limit.to_string()).ok()?;
    let _ = std::fs::write(dir.join("memory.swap.max"), "max");
    Some((dir, false))
}

/// How many tasks the kernel's OOM killer has killed in the cgroup made by `swap_cgroup`.
fn cgroup_oom_kills(dir: &Path, v1: bool) -> u64 {
    let file = if v1 {
        "memory.oom_control"
    } else {
        "memory.events"
    };
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn swap_holds_pages_under_memory_pressure() {
    const LIMIT: u64 = 48 << 20;
    const ATTEMPTS: u32 = 6;
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !capable("swap_holds_pages_under_memory_pressure") {
        return;
    }
    if Command::new("python3").arg("-c").arg("1").output().is_err() {
        common::skip_loudly("swap_holds_pages_under_memory_pressure: no python3");
        return;
    }
    // A process limited to 48 MiB of RAM writes 128 MiB and reads it back: most of it must go
    // out to our swap device and come back intact. It also pages each 8 MiB out as soon as it
    // is written or checked (MADV_PAGEOUT), the way proactive reclaim does, so the limit is hit
    // tens of thousands of times, but seldom with nothing left to reclaim.
    let Some((probe, _)) = swap_cgroup(LIMIT, "probe") else {
        common::skip_loudly("swap_holds_pages_under_memory_pressure: no writable memory cgroup");
        return;
    };
    let _ = std::fs::remove_dir(probe);
    let script = r#"
import mmap, os
MiB = 1 << 20
size, step = 128 * MiB, 8 * MiB
PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21)
seed = os.urandom(MiB)
def piece(off):
    return bytes(x ^ (off >> 20) & 0xff for x in seed[:64]) + seed[64:]
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for off in range(0, size, step):
    for o in range(off, off + step, MiB):
        m[o:o + MiB] = piece(o)
    m.madvise(PAGEOUT, off, step)
used = 0
for line in open("/proc/swaps").read().splitlines()[1:]:
    f = line.split()
    if f[0] == os.environ["DEV"]:
        used = int(f[3]) * 1024
print(used)
bad = 0
for off in range(0, size, step):
    for o in range(off, off + step, MiB):
        bad += m[o:o + MiB] != piece(o)
    m.madvise(PAGEOUT, off, step)
print("match" if bad == 0 else "MISMATCH in %d of 128 MiB" % bad)
"#;
    // Even so, the kernel's memory cgroup sometimes gives up reclaiming and kills the task
    // while the pages it needs are still being read in. Measured on the development VM
    // (cgroup v1), this script in a shell loop: killed 3 times in 30 runs on vramdisk, once
    // in 30 on a swap file on the VM's disk; the test's first version (one 128 MiB fill, no
    // MADV_PAGEOUT) 3 in 10 and 2 in 10. Run with the other attach tests, the first attempt
    // was killed in 4 of 10 runs with a 32 MiB limit, in 1 of 10 with this one. A kill the
    // cgroup itself reports is retried; any other failure, a hang, or wrong data fails at
    // once. Each attempt gets a fresh device: after a kill, half of the swap space stayed in
    // use (swap-cache pages of the dead task, freed lazily), so a second run on the same
    // device ran out of swap and was killed too.
    for attempt in 1..=ATTEMPTS {
        let d = Attached::start(&["--size", "256M", "--swap"]);
        let (cg, v1) = swap_cgroup(LIMIT, &attempt.to_string()).unwrap();
        let out = Command::new("timeout")
            .args([
                "60",
                "sh",
                "-c",
                "echo $$ > \"$CG/cgroup.procs\" && exec python3 -c \"$SCRIPT\"",
            ])
            .env("CG", &cg)
            .env("SCRIPT", script)
            .env("DEV", d.dev())
            .output()
            .unwrap();
        let oom_kills = cgroup_oom_kills(&cg, v1);
        let _ = std::fs::remove_dir(&cg);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            let mut lines = stdout.lines();
            let used: u64 = lines.next().unwrap().trim().parse().unwrap();
            assert_eq!(
                lines.next(),
                Some("match"),
                "swapped pages came back corrupted"
            );
            assert!(used >= 64 << 20, "only {used} bytes went to swap");
            eprintln!("swapped out {} MiB through {}", used >> 20, d.dev());
            d.detach_clean();
            return;
        }
        assert!(
            oom_kills > 0 && attempt < ATTEMPTS,
            "the memory hog failed ({}, {oom_kills} OOM kills in its cgroup, attempt {attempt}): \
             {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // Past the harness's capture, so that a retry shows even when the test passes.
        let _ = writeln!(
            std::io::stderr().lock(),
            "swap_holds_pages_under_memory_pressure: attempt {attempt}: the cgroup's OOM \
             killer took the memory hog; trying again on a fresh device"
        );
        d.detach_clean();
    }
}

#[test]
fn daemon_mode_with_pid_file() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !capable("daemon_mode_with_pid_file") {
        return;
    }
    let run_dir = tempfile::tempdir().unwrap();
    let pid_file = run_dir.path().join("vd.pid");
    let start = Instant::now();
    let uring = (via() == "fuse" && wants_uring())
        .then(|| UringParam::set(true))
        .flatten();
    let out = Command::new(bin())
        .args([
            "attach",
            "--backend",
            backend(),
            "--via",
            &via(),
            "--size",
            "32M",
            "--daemon",
            "--pid-file",
        ])
        .arg(&pid_file)
        .env("VRAMDISK_RUNTIME_DIR", run_dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    drop(uring);
    // output() returning at all means the daemon let go of our stdout and stderr.
    assert!(
        out.status.success(),
        "attach --daemon failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(start.elapsed() < slack(20));
    let dev = String::from_utf8(out.stdout).unwrap();
    let dev = dev.trim();
    assert!(dev.starts_with(dev_prefix(&via())), "printed {dev:?}");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!process_gone(pid), "the daemon is not running");
    let status = Command::new(bin())
        .args(["status", "--json"])
        .env("VRAMDISK_RUNTIME_DIR", run_dir.path())
        .output()
        .unwrap();
    assert_eq!(status_of(&status, dev)["pid"], pid);
    // The device works.
    run_ok(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={dev}"),
            "bs=1M",
            "count=4",
            "oflag=direct",
        ],
    );
    let out = Command::new(bin())
        .args(["detach", dev])
        .env("VRAMDISK_RUNTIME_DIR", run_dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(process_gone(pid), "daemon still runs");
    assert!(!pid_file.exists(), "pid file left behind");
    let left: Vec<_> = std::fs::read_dir(run_dir.path()).unwrap().collect();
    assert!(left.is_empty(), "left in the run directory: {left:?}");
}

#[test]
fn attach_cli_mistakes_get_one_plain_sentence() {
    // Checked before anything is set up, so this runs without root too.
    for (args, phrase) in [
        (&["--busy-poll", "5000"][..], "too long"),
        (&["--threads", "0"][..], "--threads must be"),
        (
            &["--pid-file", "/tmp/x.pid"][..],
            "--pid-file goes with --daemon",
        ),
    ] {
        let out = Command::new(bin())
            .args(["attach", "--backend", "host", "--size", "16M"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "attach {args:?} succeeded");
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("vramdisk: "))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "attach {args:?}: expected one error line:\n{err}"
        );
        assert!(lines[0].contains(phrase), "attach {args:?}: {err}");
    }
}

#[test]
fn killed_daemon_fails_io_and_detach_recovers() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !capable("killed_daemon_fails_io_and_detach_recovers") {
        return;
    }
    let mut d = Attached::start(&["--size", "64M"]);
    let state = d.state();
    // Hold the device open across the kill, like a mounted filesystem would, so that the
    // loop device stays bound and I/O reaches the dead connection.
    let held = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_direct())
        .open(&d.dev)
        .unwrap();
    assert!(read_fd_direct(&held, 0, 4096).is_ok());

    // Its control socket, which detach must clean up after the kill.
    let sock = d
        .run_dir
        .path()
        .join(format!("{}.sock", d.child.as_ref().unwrap().id()));
    assert!(sock.exists(), "no control socket at {}", sock.display());

    let mut child = d.child.take().unwrap();
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9));

    // I/O fails within seconds: run it on a thread and bound the wait.
    let (tx, rx) = std::sync::mpsc::channel();
    let h = held.try_clone().unwrap();
    std::thread::spawn(move || {
        let _ = tx.send(read_fd_direct(&h, 1 << 20, 4096));
    });
    let r = rx
        .recv_timeout(slack(10))
        .expect("a read after the daemon died hung");
    let err = r.expect_err("a read after the daemon died succeeded");
    eprintln!("read after kill -9: {err}");
    // Another program too (a fresh open of the still-bound device).
    assert_dead_device_fails(d.dev(), 10);

    // Last opener gone: the loop device detaches itself (autoclear).
    drop(held);
    // detach cleans up after the dead daemon: stale FUSE mount and state directory.
    let out = d.detach(&[]);
    assert!(
        out.status.success(),
        "detach after kill -9 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_nothing_left(&state, d.run_dir.path());

    // And a new attach works right away.
    let d2 = Attached::start(&["--size", "16M"]);
    run_ok(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", d2.dev()),
            "bs=1M",
            "count=1",
            "oflag=direct",
        ],
    );
    d2.detach_clean();
}

/// FUSE over io_uring is opt-in, and status (and the stats file) says which transport
/// serves the mount: auto is fuser whatever the fuse module's enable_uring says;
/// `--fuse-transport uring` where it is off fails in a sentence naming the switch, and
/// where it is on serves data over a queue per possible CPU; fuser is fuser.
#[test]
fn fuse_uring_is_opt_in_and_status_says_which() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let test = "fuse_uring_is_opt_in_and_status_says_which";
    if via() != "fuse" {
        common::skip_loudly(&format!("{test}: VRAMDISK_TEST_VIA={} is not fuse", via()));
        return;
    }
    if !capable(test) {
        return;
    }
    let Some(off) = UringParam::set(false) else {
        if std::env::var_os("VRAMDISK_REQUIRE_FUSE_URING").is_some() {
            panic!("{test}: {URING_PARAM} cannot be set but VRAMDISK_REQUIRE_FUSE_URING is set");
        }
        common::skip_loudly(&format!(
            "{test}: this kernel has no settable {URING_PARAM}"
        ));
        return;
    };
    let via_of = |d: &Attached| -> (String, String) {
        let status = d.status()["attach_via"].as_str().unwrap_or("").to_string();
        let stats = std::fs::read_to_string(d.state()["stats"].as_str().unwrap()).unwrap();
        let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
        (
            status,
            stats["transport"].as_str().unwrap_or("").to_string(),
        )
    };

    let auto_is_fuser = |how: &str| {
        let d = Attached::start(&["--size", "64M", "--fuse-transport", "auto"]);
        let (status, stats) = via_of(&d);
        assert!(
            status.starts_with("FUSE + loop (fuser, "),
            "{how}: {status}"
        );
        assert!(stats.starts_with("fuser, "), "{how}: {stats}");
        d.detach_clean();
    };

    // Off: auto is fuser, and asking for io_uring says what to switch on.
    auto_is_fuser("enable_uring off");
    let run_dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["attach", "--backend", backend(), "--size", "64M"])
        .args(["--via", "fuse", "--fuse-transport", "uring"])
        .env("VRAMDISK_RUNTIME_DIR", run_dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "attach over io_uring succeeded with it off"
    );
    assert!(
        err.contains("FUSE over io_uring is off in this kernel") && err.contains(URING_PARAM),
        "{err}"
    );
    drop(off);

    // On: auto is still fuser; uring asked for takes io_uring, one queue per possible CPU
    // with several threads each (where the CPUs are few), and serves data through it,
    // many writers and readers at once included.
    let on = UringParam::set(true).unwrap();
    auto_is_fuser("enable_uring on");
    let d = Attached::start(&["--size", "128M", "--fuse-transport", "uring"]);
    let queues = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    let queues: usize = queues
        .trim()
        .split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum();
    let (status, stats) = via_of(&d);
    let per_queue: usize = status
        .strip_prefix(&format!(
            "FUSE + loop (FUSE over io_uring, {queues} queues of "
        ))
        .and_then(|rest| rest.strip_suffix(" threads)"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("status says {status:?}"));
    assert_eq!(status, format!("FUSE + loop ({stats})"));
    // A queue's large requests are copied by more than one thread: the kernel puts all the
    // requests of one CPU on its queue (64 ring entries are shared out, so very many CPUs
    // get one thread each).
    if queues <= 32 {
        assert!(per_queue >= 2, "{status}");
    }
    let pid = d.status()["pid"].as_u64().unwrap();
    let ring_threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter(|t| {
            let comm = std::fs::read_to_string(t.as_ref().unwrap().path().join("comm"));
            comm.is_ok_and(|c| c.starts_with("fuse-ring-"))
        })
        .count();
    assert_eq!(ring_threads, queues * per_queue, "{status}");
    // The bursts expect never-written blocks to read as zeros: before the write below.
    direct_io_in_bursts_reads_back(&d.dev, 16, 8 << 20);
    let data = pattern(11, 1 << 20);
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc_o_direct())
            .open(d.dev())
            .unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(AlignedBuf::from(&data).as_slice(), 3 << 20)
            .unwrap();
    }
    assert!(
        read_direct(&d.dev, 3 << 20, 1 << 20) == data,
        "data read back differ"
    );
    d.detach_clean();

    // On, but fuser asked for: fuser it is.
    let d = Attached::start(&["--size", "64M", "--fuse-transport", "fuser"]);
    let (status, _) = via_of(&d);
    assert!(status.starts_with("FUSE + loop (fuser, "), "{status}");
    d.detach_clean();
    drop(on);
}

/// Over FUSE io_uring, a ring thread keeps the requests of its entries in flight on the
/// device at once, and lends the kernel more entries when all of a queue's are busy: on a
/// pretend GPU whose copies complete later, from another thread (as a GPU's do), 64
/// threads of direct I/O read back what they wrote, the stats file shows one thread with
/// several requests on the device at once and more entries than at the start, and one
/// program at queue depth 1 adds none.
#[test]
fn fuse_uring_keeps_a_queues_copies_in_flight_and_grows_its_entries() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let test = "fuse_uring_keeps_a_queues_copies_in_flight_and_grows_its_entries";
    if via() != "fuse" {
        common::skip_loudly(&format!("{test}: VRAMDISK_TEST_VIA={} is not fuse", via()));
        return;
    }
    if !capable(test) {
        return;
    }
    let Some(on) = UringParam::set(true) else {
        if std::env::var_os("VRAMDISK_REQUIRE_FUSE_URING").is_some() {
            panic!("{test}: {URING_PARAM} cannot be set but VRAMDISK_REQUIRE_FUSE_URING is set");
        }
        common::skip_loudly(&format!(
            "{test}: this kernel has no settable {URING_PARAM}"
        ));
        return;
    };
    let d = Attached::start(&[
        "--backend",
        "fake-gpu",
        "--fake-gpu-memory",
        "1G",
        "--fake-gpu-async",
        "--size",
        "160M",
        "--fuse-transport",
        "uring",
    ]);
    drop(on);
    let stats = || -> serde_json::Value {
        let path = d.state()["stats"].as_str().unwrap().to_string();
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let count =
        |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k}: {v}"));
    let at_start = count(&stats(), "ring_entries");
    assert!(at_start > 0, "{}", stats());
    // One program, one request at a time: every request finds a free entry. Past the
    // regions of the bursts below, which expect zeros where they have not written.
    let data = pattern(5, 4096);
    let base = 128u64 << 20;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc_o_direct())
            .open(d.dev())
            .unwrap();
        let buf = AlignedBuf::from(&data);
        for i in 0..200u64 {
            let at = base + (i % 64) * 4096;
            f.write_all_at(buf.as_slice(), at).unwrap();
            assert!(read_fd_direct(&f, at, 4096).unwrap() == data, "at {at}");
        }
    }
    let after_qd1 = stats();
    assert_eq!(count(&after_qd1, "ring_entries"), at_start, "{after_qd1}");
    // Many at once, more than the entries at the start.
    direct_io_in_bursts_reads_back(&d.dev, 64, 2 << 20);
    let after = stats();
    eprintln!("{test}: ring entries {at_start} at the start; after the bursts: {after}");
    assert!(count(&after, "ring_most_in_flight") > 1, "{after}");
    assert!(count(&after, "ring_entries") > at_start, "{after}");
    assert_eq!(count(&after, "io_errors"), 0, "{after}");
    d.detach_clean();
}

#[test]
fn unavailable_methods_say_why() {
    // No root or FUSE needed: these fail before touching anything.
    let run_dir = tempfile::tempdir().unwrap();
    let try_via = |via: &str| {
        Command::new(bin())
            .args([
                "attach",
                "--backend",
                backend(),
                "--size",
                "16M",
                "--via",
                via,
            ])
            .env("VRAMDISK_RUNTIME_DIR", run_dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    if let Some(why) = vramdisk::attach::kernel_nbd::unavailable() {
        let out = try_via("nbd");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&why) && err.contains("use --via fuse"),
            "{err}"
        );
        if !Path::new("/dev/nbd0").exists() {
            assert!(
                err.contains("this kernel has no nbd driver (/dev/nbd0 missing)"),
                "{err}"
            );
        }
    } else {
        common::skip_loudly("nbd part of unavailable_methods_say_why: this kernel has nbd");
    }
    if let Some(why) = vramdisk::attach::ublk::unavailable() {
        let out = try_via("ublk");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&why) && err.contains("--via fuse"), "{err}");
        if Path::new("/dev/ublk-control").exists() {
            // The kernel has ublk, so the build lacks it: say how to get it.
            assert!(err.contains("--features ublk"), "{err}");
        }
    } else {
        common::skip_loudly(
            "ublk part of unavailable_methods_say_why: this kernel and build have ublk",
        );
    }

    let out = Command::new(bin())
        .args(["detach", "/dev/loop250"])
        .env("VRAMDISK_RUNTIME_DIR", run_dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no vramdisk device is attached"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn libc_o_direct() -> i32 {
    libc::O_DIRECT
}

struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, len }
    }
    fn from(data: &[u8]) -> Self {
        let b = Self::new(data.len());
        // SAFETY: b has data.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), b.ptr, data.len()) };
        b
    }
    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr holds len bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr holds len bytes, and &mut self is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len.max(4096), 4096).unwrap();
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

// SAFETY: AlignedBuf owns its memory like a Vec.
unsafe impl Send for AlignedBuf {}

fn read_fd_direct(f: &std::fs::File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = AlignedBuf::new(len);
    f.read_exact_at(buf.as_mut_slice(), offset)?;
    Ok(buf.as_slice().to_vec())
}

fn read_direct(dev: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_direct())
        .open(dev)
        .unwrap();
    read_fd_direct(&f, offset, len).unwrap()
}

/// Whether the kernel attach method `via` can be tested here: root, the kernel driver, and
/// (for ublk) a build with the feature. Prints a SKIPPED line saying why not, or panics
/// where `require` is set in the environment.
fn kernel_method_capable(test: &str, via: &str, require: &str) -> bool {
    let why = if !nix_is_root() {
        Some("not root".to_string())
    } else if via == "nbd" {
        vramdisk::attach::kernel_nbd::unavailable()
    } else {
        vramdisk::attach::ublk::unavailable()
    };
    let Some(why) = why else {
        return true;
    };
    if std::env::var_os(require).is_some() {
        panic!("{test}: cannot run ({why}) but {require} is set");
    }
    common::skip_loudly(&format!("{test}: {why}"));
    false
}

/// The same checks as on FUSE + loop, through a kernel method: raw O_DIRECT data,
/// discard giving memory back, write zeroes, ext4 with a remount and fsck, status, a clean
/// detach; then kill -9 of the daemon fails I/O within seconds and detach recovers.
fn kernel_method_end_to_end(via: &str, prefix: &str) {
    let d = Attached::start(&["--via", via, "--size", "256M", "--chunk-size", "2M"]);
    assert!(d.dev().starts_with(prefix), "{via} attached {}", d.dev());
    assert_eq!(d.state()["method"], via);
    let name = d.dev.file_name().unwrap().to_str().unwrap().to_string();
    let lbs =
        std::fs::read_to_string(format!("/sys/block/{name}/queue/logical_block_size")).unwrap();
    assert_eq!(lbs.trim(), "4096");
    let allocated = |d: &Attached| d.status()["allocated"].as_u64().unwrap();
    assert_eq!(allocated(&d), 0);

    let data = pattern(11, 32 << 20);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc_o_direct())
            .open(&d.dev)
            .unwrap();
        f.write_all(AlignedBuf::from(&data).as_slice()).unwrap();
        f.sync_all().unwrap();
    }
    assert_eq!(read_direct(&d.dev, 0, 32 << 20), data);
    assert_eq!(allocated(&d), 32 << 20);
    run_ok(
        "blkdiscard",
        &["-o", "0", "-l", &(16u64 << 20).to_string(), d.dev()],
    );
    assert_eq!(allocated(&d), 16 << 20, "blkdiscard did not free memory");
    let back = read_direct(&d.dev, 0, 32 << 20);
    assert!(back[..16 << 20].iter().all(|&b| b == 0));
    assert!(back[16 << 20..] == data[16 << 20..]);
    run_ok(
        "blkdiscard",
        &[
            "-z",
            "-o",
            &(20u64 << 20).to_string(),
            "-l",
            "4096",
            d.dev(),
        ],
    );
    let back = read_direct(&d.dev, 20 << 20, 8192);
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert_eq!(back[4096..], data[(20 << 20) + 4096..(20 << 20) + 8192]);

    run_ok("mkfs.ext4", &["-q", "-F", d.dev()]);
    let mnt = tempfile::tempdir().unwrap();
    let m = mnt.path().to_str().unwrap();
    run_ok("mount", &[d.dev(), m]);
    let mut files = Vec::new();
    for f in 0..16u64 {
        let path = mnt.path().join(format!("f{f}.bin"));
        std::fs::write(&path, pattern(f, (f as usize * 77_777) % (3 << 20))).unwrap();
        files.push(path.to_str().unwrap().to_string());
    }
    let names: Vec<&str> = files.iter().map(|s| s.as_str()).collect();
    let sums = run_ok("sha256sum", &names);
    let sums_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(sums_file.path(), &sums).unwrap();
    let mut d = d;
    let refused = d.detach(&[]);
    assert!(
        !refused.status.success(),
        "detach of a mounted device worked"
    );
    run_ok("umount", &[m]);
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    run_ok("mount", &[d.dev(), m]);
    run_ok(
        "sha256sum",
        &["-c", "--quiet", sums_file.path().to_str().unwrap()],
    );
    run_ok("umount", &[m]);
    let fsck = run("e2fsck", &["-fn", d.dev()]);
    assert!(
        fsck.status.success(),
        "e2fsck -fn found problems:\n{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    d.detach_clean();

    // kill -9: I/O fails within seconds, never hangs; detach cleans up.
    let mut d = Attached::start(&["--via", via, "--size", "64M"]);
    let state = d.state();
    let mut child = d.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_dead_device_fails(d.dev(), 20);
    let out = d.detach(&[]);
    assert!(
        out.status.success(),
        "detach after kill -9 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_nothing_left(&state, d.run_dir.path());
}

#[test]
fn kernel_nbd_end_to_end() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kernel_method_capable(
        "kernel_nbd_end_to_end",
        "nbd",
        "VRAMDISK_REQUIRE_KERNEL_NBD",
    ) {
        return;
    }
    kernel_method_end_to_end("nbd", "/dev/nbd");
}

#[test]
fn ublk_end_to_end() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !kernel_method_capable("ublk_end_to_end", "ublk", "VRAMDISK_REQUIRE_UBLK") {
        return;
    }
    kernel_method_end_to_end("ublk", "/dev/ublkb");
}
