//! The control socket: one JSON object per line in each direction over a Unix socket.
//!
//! Requests: `{"cmd":"status"}` and `{"cmd":"save","path":"/abs/file","export":"name"}`
//! (`export` optional: the first export; `"progress":true` asks for
//! `{"progress":DONE,"total":TOTAL}` lines before the reply).
//! `{"cmd":"yield","bytes":N}` moves chunks out of GPU memory until N bytes are free, and
//! `{"cmd":"release"}` lets the device take memory back (both take `export` and `gpu`, a
//! list of positions in the device's `--gpu` list). Every reply is one line,
//! `{"ok":true,...}` or `{"ok":false,"error":"sentence"}`. Each daemon binds `PID.sock` in a
//! well-known runtime directory, so `vramdisk status` finds every daemon without flags.

use super::Daemon;
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Longest request line accepted; requests are tiny, so anything longer is not a client.
const MAX_LINE: usize = 64 * 1024;

/// The environment variable that moves the runtime directory (control sockets, and the
/// state of attached devices) away from its default, for tests and unusual systems.
pub const RUNTIME_DIR_ENV: &str = "VRAMDISK_RUNTIME_DIR";

/// `$VRAMDISK_RUNTIME_DIR`, if set.
pub fn runtime_dir_override() -> Option<PathBuf> {
    std::env::var_os(RUNTIME_DIR_ENV).map(PathBuf::from)
}

/// Where daemons put their control sockets: `$VRAMDISK_RUNTIME_DIR` if set, `/run/vramdisk`
/// as root, `$XDG_RUNTIME_DIR/vramdisk` otherwise, `/tmp/vramdisk-UID` as a last resort.
pub fn runtime_dir() -> PathBuf {
    if let Some(d) = runtime_dir_override() {
        return d;
    }
    let uid = nix::unistd::getuid();
    if uid.is_root() {
        return PathBuf::from("/run/vramdisk");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("vramdisk"),
        _ => fallback_dir(),
    }
}

/// The last-resort runtime directory, in /tmp, where any local user could create it first.
fn fallback_dir() -> PathBuf {
    PathBuf::from(format!("/tmp/vramdisk-{}", nix::unistd::getuid()))
}

/// Refuses the /tmp fallback directory unless it is ours alone: another user who made it
/// first, or could write to it, could stand in for our daemons and read what `status` and
/// `save` send. Other runtime directories sit in places only their owner can write.
pub fn check_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if dir != fallback_dir() {
        return Ok(());
    }
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", dir.display())),
    };
    let uid = nix::unistd::getuid().as_raw();
    if !meta.file_type().is_dir() {
        bail!(
            "{} is not a directory (a symlink or file made by someone else?): remove it, or \
             set XDG_RUNTIME_DIR to a directory of your own",
            dir.display()
        );
    }
    if meta.uid() != uid {
        bail!(
            "{} belongs to uid {}, not to you (uid {uid}), so its sockets cannot be trusted: \
             remove it, or set XDG_RUNTIME_DIR to a directory of your own",
            dir.display(),
            meta.uid()
        );
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{} has mode {mode:04o}, so other users can reach or replace its sockets: run \
             chmod 700 {}",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Creates the runtime directory (mode 0755, the /tmp fallback 0700 and checked to be
/// ours; the sockets themselves are 0600) and removes sockets of daemons that are gone.
pub fn prepare_runtime_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let private = dir == fallback_dir();
    let made = std::fs::DirBuilder::new()
        // /tmp exists; creating only the last component makes it ours, or fails.
        .recursive(!private)
        .mode(if private { 0o700 } else { 0o755 })
        .create(dir);
    match made {
        Err(e) if !(private && e.kind() == std::io::ErrorKind::AlreadyExists) => {
            return Err(e)
                .with_context(|| format!("cannot create the runtime directory {}", dir.display()));
        }
        _ => {}
    }
    check_private(dir)?;
    for (pid, path) in sockets_in(dir) {
        if !pid_alive(pid) {
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(())
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // Signal 0 checks existence; EPERM means it exists but belongs to someone else.
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// The `PID.sock` files in `dir`, sorted by pid.
pub fn sockets_in(dir: &Path) -> Vec<(u32, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<(u32, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let pid = name.to_str()?.strip_suffix(".sock")?.parse().ok()?;
            Some((pid, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Binds the control socket at `path`, or at PID.sock in the runtime directory when none is
/// given (preparing that directory); returns it with the path it is bound at.
pub fn bind_default(path: Option<PathBuf>) -> Result<(UnixListener, PathBuf)> {
    let path = match path {
        Some(p) => p,
        None => {
            let dir = runtime_dir();
            prepare_runtime_dir(&dir)?;
            dir.join(format!("{}.sock", std::process::id()))
        }
    };
    Ok((bind(&path)?, path))
}

/// Binds the control socket at `path` (mode 0600), replacing a stale file.
pub fn bind(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        // A live daemon answers; only a dead one's socket is replaced.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "{} is in use by a running daemon: give another --control-socket",
                path.display()
            );
        }
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path)
        .with_context(|| format!("cannot bind the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    Ok(l)
}

/// Serves control clients until the daemon shuts down.
pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = daemon.shutdown().cancelled() => return,
        };
        match conn {
            Ok((stream, _)) => {
                tokio::spawn(handle(stream, daemon.clone()));
            }
            Err(e) => {
                tracing::warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Status,
    Save {
        path: PathBuf,
        #[serde(default)]
        export: Option<String>,
        /// Send `{"progress":DONE,"total":TOTAL}` lines while saving.
        #[serde(default)]
        progress: bool,
    },
    /// Move chunks out of GPU memory until `bytes` are free on each GPU named by position
    /// in the device's `--gpu` list (all when empty), then hold them.
    Yield {
        bytes: u64,
        #[serde(default)]
        export: Option<String>,
        #[serde(default)]
        gpu: Vec<usize>,
        /// Send `{"progress":MOVED,"total":FREE_NOW,"target":BYTES}` lines while moving.
        #[serde(default)]
        progress: bool,
    },
    /// Let go of held GPUs: chunks come back as memory allows.
    Release {
        #[serde(default)]
        export: Option<String>,
        #[serde(default)]
        gpu: Vec<usize>,
    },
}

async fn handle(stream: UnixStream, daemon: Arc<Daemon>) {
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd.take(MAX_LINE as u64 * 16)).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        let reply = if line.len() > MAX_LINE {
            json!({"ok": false, "error": "request too long"})
        } else {
            answer(&line, &daemon, &mut wr).await
        };
        let mut out = reply.to_string();
        out.push('\n');
        if wr.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}

use tokio::io::AsyncReadExt as _;

use crate::tunables::SAVE_PROGRESS_EVERY as PROGRESS_EVERY;

async fn answer(line: &str, daemon: &Daemon, wr: &mut tokio::net::unix::OwnedWriteHalf) -> Value {
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => {
            return json!({"ok": false, "error": format!(
                "bad request ({e}): send {{\"cmd\":\"status\"}}, {{\"cmd\":\"save\",\"path\":\"/file\"}}, {{\"cmd\":\"yield\",\"bytes\":N}} or {{\"cmd\":\"release\"}}"
            )});
        }
    };
    match req {
        Request::Status => {
            let mut v = serde_json::to_value(daemon.status()).unwrap_or(Value::Null);
            v["ok"] = Value::Bool(true);
            v
        }
        Request::Save {
            path,
            export,
            progress,
        } => {
            let (tx, rx) = tokio::sync::watch::channel((0u64, 0u64));
            let saving = save(daemon, &path, export.as_deref(), &tx);
            tokio::pin!(saving);
            let mut tick = tokio::time::interval(PROGRESS_EVERY);
            let result = loop {
                tokio::select! {
                    r = &mut saving => break r,
                    _ = tick.tick(), if progress => {
                        if rx.has_changed().unwrap_or(false) {
                            let (done, total) = *rx.borrow();
                            let mut l = json!({"progress": done, "total": total}).to_string();
                            l.push('\n');
                            // A client that went away does not stop the save.
                            let _ = wr.write_all(l.as_bytes()).await;
                        }
                    }
                }
            };
            match result {
                Ok(summary) => json!({"ok": true, "saved": summary}),
                Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
            }
        }
        Request::Yield {
            bytes,
            export,
            gpu,
            progress,
        } => {
            let tiers = match tiers_of(daemon, export.as_deref()) {
                Ok(t) => t,
                Err(e) => return json!({"ok": false, "error": format!("{e:#}")}),
            };
            let (tx, rx) = tokio::sync::watch::channel((0u64, 0u64));
            let report = move |p: crate::engine::tier::YieldProgress| {
                tx.send_replace((p.moved, p.free));
            };
            let yielding = tiers.yield_memory(bytes, &gpu, &report);
            tokio::pin!(yielding);
            let mut tick = tokio::time::interval(PROGRESS_EVERY);
            let result = loop {
                tokio::select! {
                    r = &mut yielding => break r,
                    _ = tick.tick(), if progress => {
                        let (moved, free) = *rx.borrow();
                        let mut l = json!({"progress": moved, "total": free, "target": bytes})
                            .to_string();
                        l.push('\n');
                        let _ = wr.write_all(l.as_bytes()).await;
                    }
                }
            };
            match result {
                Ok(r) => json!({"ok": true, "yielded": r}),
                Err(e) => json!({"ok": false, "error": e}),
            }
        }
        Request::Release { export, gpu } => match tiers_of(daemon, export.as_deref()) {
            Ok(t) => {
                t.release(&gpu);
                json!({"ok": true})
            }
            Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
        },
    }
}

/// The export a request names (or the daemon's only or default one).
fn export_of<'a>(daemon: &'a Daemon, export: Option<&str>) -> Result<&'a Arc<super::ExportState>> {
    Ok(match export {
        Some(name) => daemon
            .export(name)
            .with_context(|| format!("this daemon has no export named '{name}'"))?,
        None => match (daemon.export(""), daemon.exports()) {
            (Some(e), _) => e,
            (None, [only]) => only,
            _ => {
                bail!("this daemon has several exports and no default one: name one with --export")
            }
        },
    })
}

fn tiers_of(
    daemon: &Daemon,
    export: Option<&str>,
) -> Result<Arc<dyn crate::engine::tier::TierControl>> {
    let state = export_of(daemon, export)?;
    state.tiers.clone().with_context(|| {
        format!(
            "export '{}' keeps its data in {}, with no spill tier: only a GPU device with \
             --spill-memory or --spill-file can give memory back",
            state.name, state.backend
        )
    })
}

async fn save(
    daemon: &Daemon,
    path: &Path,
    export: Option<&str>,
    watch: &tokio::sync::watch::Sender<(u64, u64)>,
) -> Result<crate::engine::persist::Summary> {
    if !path.is_absolute() {
        bail!("the save path must be absolute (the daemon's working directory is not yours)");
    }
    let state = export_of(daemon, export)?;
    state.save_with_progress(path, Some(watch)).await
}

/// Sends one request to the control socket at `path` and returns the reply; fails with a
/// sentence if the daemon is unreachable or answers with an error.
pub fn request(path: &Path, req: &Value, timeout: Option<Duration>) -> Result<Value> {
    request_with_progress(path, req, timeout, |_, _| {})
}

/// Like [`request`], calling `progress(done, total)` for each progress line before the reply.
pub fn request_with_progress(
    path: &Path,
    req: &Value,
    timeout: Option<Duration>,
    mut progress: impl FnMut(u64, u64),
) -> Result<Value> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .with_context(|| format!("cannot reach the daemon at {}", path.display()))?;
    s.set_read_timeout(timeout)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut r = std::io::BufReader::new(s);
    let v = loop {
        let mut reply = String::new();
        let n = r
            .read_line(&mut reply)
            .with_context(|| format!("no answer from the daemon at {}", path.display()))?;
        if n == 0 {
            bail!(
                "the daemon at {} closed the connection without answering",
                path.display()
            );
        }
        let v: Value = serde_json::from_str(&reply)
            .with_context(|| format!("the daemon at {} answered garbage", path.display()))?;
        match (v["progress"].as_u64(), v["total"].as_u64()) {
            (Some(done), Some(total)) if v.get("ok").is_none() => progress(done, total),
            _ => break v,
        }
    };
    if v["ok"] != Value::Bool(true) {
        bail!(
            "{}",
            v["error"]
                .as_str()
                .unwrap_or("the daemon refused the request")
        );
    }
    Ok(v)
}

/// What `status` and friends say when they find no daemon in `dir`: where they looked, and
/// why daemons of other users are not there.
pub fn none_found(dir: &Path) -> String {
    let why = if std::env::var_os("VRAMDISK_RUNTIME_DIR").is_some() {
        "$VRAMDISK_RUNTIME_DIR chose it".to_string()
    } else if nix::unistd::getuid().is_root() {
        "root's daemons are found there; a daemon started by another user keeps its \
         socket in that user's $XDG_RUNTIME_DIR/vramdisk or /tmp/vramdisk-UID"
            .to_string()
    } else {
        "each user's daemons keep their sockets in their own directory, and root's are in \
         /run/vramdisk: use sudo vramdisk status for those"
            .to_string()
    };
    format!(
        "no vramdisk daemon is running (looked in {}; {why}); --control-socket PATH asks one \
         daemon directly",
        dir.display()
    )
}

/// Control sockets of the daemons running now; removes sockets of dead daemons on the way
/// (when allowed to). A socket nobody listens on is dead even if its pid was reused.
pub fn live_daemons(dir: &Path) -> Vec<(u32, PathBuf)> {
    sockets_in(dir)
        .into_iter()
        .filter(|(pid, path)| {
            let refused = matches!(
                std::os::unix::net::UnixStream::connect(path),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
            );
            if pid_alive(*pid) && !refused {
                return true;
            }
            let _ = std::fs::remove_file(path);
            false
        })
        .collect()
}
