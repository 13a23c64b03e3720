//! `vramdisk status`, `vramdisk save`, `vramdisk completions` and `vramdisk manpage`.

use super::size::format_size;
use crate::ops::control;
use crate::ops::{DaemonStatus, ExportStatus};
use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `vramdisk status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Print JSON (one array of daemons with their exports) instead of a table.
    #[arg(long)]
    json: bool,

    /// Ask only the daemon at this control socket (default: every daemon in the runtime
    /// directory).
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
}

/// Arguments of `vramdisk save`.
#[derive(Args, Debug)]
pub struct SaveArgs {
    /// File to write (replaced atomically when complete).
    file: PathBuf,

    /// Which export (default: the daemon's first).
    #[arg(long, value_name = "NAME")]
    export: Option<String>,

    /// The daemon to ask, by pid (needed when several run).
    #[arg(long)]
    pid: Option<u32>,

    /// The daemon to ask, by control socket path.
    #[arg(long, value_name = "PATH", conflicts_with = "pid")]
    control_socket: Option<PathBuf>,
}

/// Examples under `vramdisk yield --help`.
pub const YIELD_EXAMPLES: &str = "Examples:
  vramdisk yield 100G            # before a job: 100 GiB free on every GPU of the device
  vramdisk yield 40G --gpu 1     # only the device's second GPU
  vramdisk yield --release       # after the job: chunks come back at their own pace";

/// Arguments of `vramdisk yield`.
#[derive(Args, Debug)]
pub struct YieldArgs {
    /// Free GPU memory to wait for, e.g. 100G.
    #[arg(value_name = "SIZE", value_parser = super::size::parse_size,
          required_unless_present = "release")]
    size: Option<u64>,

    /// Let the device take memory back instead (at its own pace, in the background).
    #[arg(long, conflicts_with = "size")]
    release: bool,

    /// Which export (default: the daemon's default or only one).
    #[arg(long, value_name = "NAME")]
    export: Option<String>,

    /// Only these GPUs, by position in the device's --gpu list (default: all of them).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    gpu: Vec<usize>,

    /// The daemon to ask, by pid (needed when several run).
    #[arg(long)]
    pid: Option<u32>,

    /// The daemon to ask, by control socket path.
    #[arg(long, value_name = "PATH", conflicts_with = "pid")]
    control_socket: Option<PathBuf>,
}

/// Runs `vramdisk yield`.
pub fn yield_memory(args: YieldArgs) -> Result<()> {
    let target = one_daemon(&args.control_socket, args.pid)?;
    let mut req = match args.size {
        Some(bytes) if !args.release => json!({"cmd": "yield", "bytes": bytes}),
        _ => json!({"cmd": "release"}),
    };
    if let Some(e) = &args.export {
        req["export"] = json!(e);
    }
    if !args.gpu.is_empty() {
        req["gpu"] = json!(args.gpu);
    }
    if args.release {
        control::request(&target, &req, Some(Duration::from_secs(10)))?;
        eprintln!("released: the device takes memory back as it becomes free");
        return Ok(());
    }
    let bar = terminal_bar("yielding [{bar:30}] {msg} moved {bytes} at {bytes_per_sec}");
    req["progress"] = json!(bar.is_some());
    let reply = control::request_with_progress(&target, &req, None, |moved, free| {
        if let Some(bar) = &bar {
            bar.set_length(args.size.unwrap_or(0));
            bar.set_position(moved);
            bar.set_message(format!("{} free", format_size(free)));
        }
    });
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let reply = reply?;
    let y = &reply["yielded"];
    let free: Vec<String> = y["free"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| format_size(f.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    eprintln!(
        "moved {} ({} chunks) off the GPU in {:.2} s; free now: {}; held until `vramdisk yield --release`",
        format_size(y["moved"].as_u64().unwrap_or(0)),
        y["chunks"],
        y["seconds"].as_f64().unwrap_or(0.0),
        free.join(", ")
    );
    Ok(())
}

/// A progress bar drawn with `template`, where stderr is a terminal.
fn terminal_bar(template: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    })
}

/// The one daemon a command talks to: by pid, by socket, or the only one running.
fn one_daemon(socket: &Option<PathBuf>, pid: Option<u32>) -> Result<PathBuf> {
    let candidates = daemons(socket)?;
    Ok(match (pid, candidates.as_slice()) {
        (Some(pid), c) => c
            .iter()
            .find(|(p, _)| *p == Some(pid))
            .map(|(_, s)| s.clone())
            .with_context(|| format!("no vramdisk daemon with pid {pid} is running"))?,
        (None, [(_, s)]) => s.clone(),
        (None, []) => bail!(control::none_found(&control::runtime_dir())),
        (None, _) => {
            bail!("several vramdisk daemons are running: pick one with --pid (see vramdisk status)")
        }
    })
}

fn daemons(only: &Option<PathBuf>) -> Result<Vec<(Option<u32>, PathBuf)>> {
    Ok(match only {
        Some(p) => vec![(None, p.clone())],
        None => {
            let dir = control::runtime_dir();
            control::check_private(&dir)?;
            control::live_daemons(&dir)
                .into_iter()
                .map(|(pid, p)| (Some(pid), p))
                .collect()
        }
    })
}

/// Runs `vramdisk status`.
pub fn status(args: StatusArgs) -> Result<()> {
    let mut all: Vec<DaemonStatus> = Vec::new();
    for (pid, path) in daemons(&args.control_socket)? {
        match control::request(
            &path,
            &json!({"cmd": "status"}),
            Some(Duration::from_secs(5)),
        )
        .and_then(|v| serde_json::from_value(v).context("the daemon's status is not understood"))
        {
            Ok(s) => all.push(s),
            // A daemon that is starting or stopping may not answer; say so and go on.
            Err(e) if pid.is_some() => eprintln!("vramdisk: daemon {}: {e:#}", pid.unwrap()),
            Err(e) => return Err(e),
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    if all.is_empty() {
        eprintln!("{}", control::none_found(&control::runtime_dir()));
        return Ok(());
    }
    print!("{}", table(&all));
    Ok(())
}

fn cell_name(e: &ExportStatus) -> String {
    if e.name.is_empty() {
        "(default)".into()
    } else {
        e.name.clone()
    }
}

/// The status table: one line per export, like `zramctl`.
pub fn table(all: &[DaemonStatus]) -> String {
    let header = [
        "PID", "NAME", "BACKEND", "DEVICE", "SIZE", "USED", "SPILLED", "LIMIT", "ATTACH", "CONN",
        "READ", "RD-OPS", "WRITTEN", "WR-OPS", "ERRORS", "LISTEN",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for d in all {
        for e in &d.exports {
            rows.push(vec![
                e.pid.to_string(),
                cell_name(e),
                e.backend.clone(),
                e.device.clone(),
                format_size(e.size),
                format_size(e.allocated),
                format_size(e.spilled_ram + e.spilled_file),
                e.max_memory.map(format_size).unwrap_or_else(|| "-".into()),
                e.attach.clone().unwrap_or_else(|| "-".into()),
                e.connections.to_string(),
                format_size(e.read_bytes),
                e.read_ops.to_string(),
                format_size(e.write_bytes),
                e.write_ops.to_string(),
                e.errors.to_string(),
                d.listen.first().cloned().unwrap_or_else(|| "-".into()),
            ]);
        }
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, v)| format!("{v:<w$}", w = widths[c]))
            .collect();
        out.push_str(line.join(" ").trim_end());
        out.push('\n');
    }
    out
}

/// Runs `vramdisk save`.
pub fn save(args: SaveArgs) -> Result<()> {
    let path = std::path::absolute(&args.file)
        .with_context(|| format!("{} is not a usable path", args.file.display()))?;
    let target = one_daemon(&args.control_socket, args.pid)?;
    let bar = terminal_bar("saving [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}");
    let mut req = json!({"cmd": "save", "path": path, "progress": bar.is_some()});
    if let Some(e) = &args.export {
        req["export"] = json!(e);
    }
    let reply = control::request_with_progress(&target, &req, None, |done, total| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    });
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let reply = reply?;
    let s = &reply["saved"];
    eprintln!(
        "saved {} of data ({} records) to {} in {} ms",
        format_size(s["data_bytes"].as_u64().unwrap_or(0)),
        s["records"],
        path.display(),
        s["millis"]
    );
    Ok(())
}

/// Prints a completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> Result<()> {
    use clap::CommandFactory;
    let mut cmd = super::Cli::command();
    clap_complete::generate(shell, &mut cmd, "vramdisk", &mut std::io::stdout());
    Ok(())
}

/// Prints the man page (roff) of vramdisk and every subcommand, one after the other.
pub fn manpage(dir: Option<PathBuf>) -> Result<()> {
    use clap::CommandFactory;
    let cmd = super::Cli::command();
    match dir {
        // One page per command: vramdisk.1, vramdisk-serve.1, ...
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("writing man pages to {}", dir.display()))?;
        }
        None => {
            clap_mangen::Man::new(cmd)
                .render(&mut std::io::stdout())
                .context("writing the man page")?;
        }
    }
    Ok(())
}
