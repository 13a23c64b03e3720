//! `serve --config FILE`: the same settings as the command line, from a TOML file, with
//! several exports at once.
//!
//! The file is turned into the command line it stands for and parsed by the same clap
//! definition, so a setting means exactly what its flag means and is validated the same way.
//! Flags given on the command line (or through the environment) then win, one setting at a
//! time; list settings (`listen`, `socket`, exports) are replaced as a whole, not appended.
//! What flags cannot say — options that differ per export, and save/load files of exports
//! other than the first — is kept aside as [`ExportOverride`]s.
//!
//! ```toml
//! [server]
//! listen = ["127.0.0.1:10809"]
//! socket = ["/run/vramdisk/nbd.sock"]
//! metrics = "127.0.0.1:9100"
//!
//! [device]            # defaults for every export
//! backend = "cuda"
//! chunk_size = "2M"
//!
//! [[export]]
//! name = "scratch"
//! size = "16G"
//! max_memory = "8G"
//! persist = "/var/lib/vramdisk/scratch.img"
//! ```

use super::DeviceArgs;
use super::size::parse_size;
use crate::ops::PersistPlan;
use anyhow::{Context, Result, bail};
use clap::ArgMatches;
use clap::parser::ValueSource;
use serde::Deserialize;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use tracing::info;

/// A size written as a number of bytes or as a string with a suffix ("16G").
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    fn arg(&self) -> String {
        match self {
            Size::Bytes(b) => b.to_string(),
            Size::Text(t) => t.clone(),
        }
    }
}

/// One or several strings.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn list(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct ServerSection {
    listen: Option<OneOrMany>,
    socket: Option<OneOrMany>,
    max_connections: Option<u64>,
    max_request: Option<Size>,
    inflight_memory: Option<Size>,
    client_inflight_memory: Option<Size>,
    handshake_timeout: Option<u64>,
    max_connections_per_client: Option<u64>,
    busy_poll: Option<u64>,
    tls: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    allow_insecure: Option<bool>,
    socket_mode: Option<String>,
    socket_group: Option<String>,
    metrics: Option<String>,
    control_socket: Option<String>,
}

/// Device options, as [device] defaults or per [[export]].
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
struct DeviceSection {
    backend: Option<String>,
    max_memory: Option<Size>,
    chunk_size: Option<Size>,
    preallocate: Option<bool>,
    read_only: Option<bool>,
    gpu: Option<Vec<usize>>,
    keep_free: Option<Size>,
    buffer_memory: Option<Size>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct ExportSection {
    name: String,
    size: Size,
    save: Option<PathBuf>,
    load: Option<PathBuf>,
    persist: Option<PathBuf>,
    #[serde(flatten)]
    device: DeviceSection,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    device: DeviceSection,
    #[serde(default)]
    export: Vec<ExportSection>,
}

/// Settings of one export from the file that flags cannot express.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportOverride {
    /// Export name.
    pub name: String,
    /// Flags (as `--name=value`) that apply to this export only, after the shared ones.
    pub device_flags: Vec<String>,
    /// Its save/load files (for exports after the first; the first's go to the flags).
    pub plan: PersistPlan,
}

fn push_device(argv: &mut Vec<String>, d: &DeviceSection) {
    if let Some(v) = &d.backend {
        argv.push(format!("--backend={v}"));
    }
    if let Some(v) = &d.max_memory {
        argv.push(format!("--max-memory={}", v.arg()));
    }
    if let Some(v) = &d.chunk_size {
        argv.push(format!("--chunk-size={}", v.arg()));
    }
    if d.preallocate == Some(true) {
        argv.push("--preallocate".into());
    }
    if d.read_only == Some(true) {
        argv.push("--read-only".into());
    }
    for g in d.gpu.iter().flatten() {
        argv.push(format!("--gpu={g}"));
    }
    if let Some(v) = &d.keep_free {
        argv.push(format!("--keep-free={}", v.arg()));
    }
    if let Some(v) = &d.buffer_memory {
        argv.push(format!("--buffer-memory={}", v.arg()));
    }
}

/// The `serve` arguments the file at `path` stands for, and what flags cannot say.
fn file_argv(path: &Path) -> Result<(Vec<String>, Vec<ExportOverride>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let cfg: ConfigFile = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
    let mut argv = Vec::new();
    let s = &cfg.server;
    for l in s.listen.iter().flat_map(|l| l.list()) {
        argv.push(format!("--listen={l}"));
    }
    for p in s.socket.iter().flat_map(|l| l.list()) {
        argv.push(format!("--socket={p}"));
    }
    if let Some(v) = s.max_connections {
        argv.push(format!("--max-connections={v}"));
    }
    if let Some(v) = &s.max_request {
        argv.push(format!("--max-request={}", v.arg()));
    }
    if let Some(v) = &s.inflight_memory {
        argv.push(format!("--inflight-memory={}", v.arg()));
    }
    if let Some(v) = &s.client_inflight_memory {
        argv.push(format!("--client-inflight-memory={}", v.arg()));
    }
    if let Some(v) = s.handshake_timeout {
        argv.push(format!("--handshake-timeout={v}"));
    }
    if let Some(v) = s.max_connections_per_client {
        argv.push(format!("--max-connections-per-client={v}"));
    }
    if let Some(v) = s.busy_poll {
        argv.push(format!("--busy-poll={v}"));
    }
    if let Some(v) = &s.tls {
        argv.push(format!("--tls={v}"));
    }
    for (flag, v) in [
        ("tls-cert", &s.tls_cert),
        ("tls-key", &s.tls_key),
        ("tls-ca", &s.tls_ca),
    ] {
        if let Some(v) = v {
            argv.push(format!("--{flag}={}", v.display()));
        }
    }
    if s.allow_insecure == Some(true) {
        argv.push("--allow-insecure".into());
    }
    if let Some(v) = &s.socket_mode {
        argv.push(format!("--socket-mode={v}"));
    }
    if let Some(v) = &s.socket_group {
        argv.push(format!("--socket-group={v}"));
    }
    if let Some(v) = &s.metrics {
        argv.push(format!("--metrics={v}"));
    }
    if let Some(v) = &s.control_socket {
        argv.push(format!("--control-socket={v}"));
    }
    push_device(&mut argv, &cfg.device);
    let mut overrides = Vec::new();
    for (i, e) in cfg.export.iter().enumerate() {
        parse_size(&e.size.arg()).map_err(|m| anyhow::anyhow!("export '{}': {m}", e.name))?;
        if e.name.is_empty() {
            argv.push(format!("--size={}", e.size.arg()));
        } else {
            argv.push(format!("--export={}={}", e.name, e.size.arg()));
        }
        let plan = PersistPlan {
            load: e.load.clone(),
            load_if_exists: e.persist.clone(),
            save: e.save.clone().or_else(|| e.persist.clone()),
        };
        if i == 0 {
            for (flag, v) in [
                ("save", &e.save),
                ("load", &e.load),
                ("persist", &e.persist),
            ] {
                if let Some(v) = v {
                    argv.push(format!("--{flag}={}", v.display()));
                }
            }
        }
        let mut device_flags = Vec::new();
        push_device(&mut device_flags, &e.device);
        overrides.push(ExportOverride {
            name: e.name.clone(),
            device_flags,
            plan: if i == 0 { PersistPlan::default() } else { plan },
        });
    }
    // The unnamed export must come first on the command line too, since flags put it first.
    if cfg.export.iter().skip(1).any(|e| e.name.is_empty()) {
        bail!(
            "{}: the export with the empty name (the default) must be the first [[export]]",
            path.display()
        );
    }
    Ok((argv, overrides))
}

fn explicit(m: &ArgMatches, id: &str) -> bool {
    matches!(m.try_get_raw(id), Ok(Some(_)))
        && matches!(
            m.value_source(id),
            Some(ValueSource::CommandLine) | Some(ValueSource::EnvVariable)
        )
}

fn flag_set(m: &ArgMatches, id: &str) -> bool {
    m.try_get_one::<bool>(id).ok().flatten().copied() == Some(true)
}

/// Merges the config file named by `--config` under the command line `cli` (the `serve`
/// subcommand's matches): returns the effective `serve` argv (without the program and
/// subcommand names) and the per-export settings from the file. Exports given on the command
/// line replace the file's, together with their per-export settings.
pub fn merged_argv(
    cmd: &clap::Command,
    cli: &ArgMatches,
    config: &Path,
) -> Result<(Vec<String>, Vec<ExportOverride>)> {
    let (file_args, mut overrides) = file_argv(config)?;
    let file = cmd
        .clone()
        .no_binary_name(true)
        .try_get_matches_from(&file_args)
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: {}",
                config.display(),
                e.render()
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or("invalid setting")
            )
        })?;
    let mut argv = Vec::new();
    let exports_from_cli = explicit(cli, "size") || explicit(cli, "exports");
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        let Some(long) = arg.get_long() else { continue };
        if id == "config" || id == "help" || id == "version" {
            continue;
        }
        // Export lists and their sizes are one setting: all from the CLI or all from the file.
        let from = if id == "size" || id == "exports" {
            if exports_from_cli { cli } else { &file }
        } else if explicit(cli, id) {
            cli
        } else {
            &file
        };
        let takes_value = arg.get_num_args().is_none_or(|n| n.takes_values());
        if !takes_value || matches!(arg.get_action(), clap::ArgAction::SetTrue) {
            if flag_set(from, id) {
                argv.push(format!("--{long}"));
            }
            continue;
        }
        if from.value_source(id) != Some(ValueSource::CommandLine)
            && from.value_source(id) != Some(ValueSource::EnvVariable)
        {
            continue;
        }
        if let Ok(Some(values)) = from.try_get_raw(id) {
            for v in values {
                let v = v
                    .to_str()
                    .with_context(|| format!("--{long} is not valid UTF-8"))?;
                argv.push(format!("--{long}={v}"));
            }
        }
    }
    if exports_from_cli {
        overrides.clear();
    }
    Ok((argv, overrides))
}

/// The argv of `serve`, as OsStrings for clap.
pub fn to_os(argv: &[String]) -> Vec<OsString> {
    argv.iter().map(OsString::from).collect()
}

/// The `serve` subcommand's definition.
pub fn serve_command() -> clap::Command {
    use clap::CommandFactory;
    super::Cli::command()
        .find_subcommand("serve")
        .cloned()
        .expect("serve is a subcommand")
}

/// Builds every export, each with its own device options when the config file gives some.
pub fn build_devices(
    device: &DeviceArgs,
    ops: &crate::ops::OpsArgs,
    overrides: &[ExportOverride],
) -> Result<Vec<crate::ops::ManagedDevice>> {
    let specs = device.export_specs()?;
    let mut out = Vec::new();
    let mut logged = None;
    // --buffer-memory bounds the buffers of every export together; an export given its own
    // buffer_memory in the config file has a budget of its own.
    let shared = crate::engine::BufferBudget::new(
        usize::try_from(device.buffer_memory).unwrap_or(usize::MAX),
    );
    for (i, spec) in specs.into_iter().enumerate() {
        let ov = overrides.iter().find(|o| o.name == spec.name);
        let mut dev_args = match ov {
            Some(o) if !o.device_flags.is_empty() => per_export_args(device, &o.device_flags)?,
            _ => device.clone(),
        };
        let (backend, why) = dev_args.resolve_backend();
        if logged.as_ref() != Some(&why) {
            info!("backend: {why}");
            logged = Some(why);
        }
        dev_args.size = None;
        dev_args.exports = vec![spec.clone()];
        let plan = if i == 0 {
            ops.default_plan()
        } else {
            ov.map(|o| o.plan.clone()).unwrap_or_default()
        };
        // A read-only export with a file to load is built writable, filled, then served
        // through a read-only view.
        let read_only_view =
            dev_args.read_only && (plan.load.is_some() || plan.load_if_exists.is_some());
        if read_only_view {
            dev_args.read_only = false;
        }
        let budget = (dev_args.buffer_memory == device.buffer_memory).then(|| shared.clone());
        for d in dev_args.build_sharing(backend, budget)? {
            out.push(crate::ops::ManagedDevice {
                name: d.name,
                device: d.device,
                tiers: d.tiers,
                backend: format!("{backend:?}").to_lowercase(),
                plan: plan.clone(),
                read_only_view,
            });
        }
    }
    Ok(out)
}

/// `base` with the flags in `extra` replacing its values of the same settings.
fn per_export_args(base: &DeviceArgs, extra: &[String]) -> Result<DeviceArgs> {
    #[derive(clap::Parser)]
    struct Only {
        #[command(flatten)]
        device: DeviceArgs,
    }
    use clap::{CommandFactory, FromArgMatches};
    let cmd = Only::command().no_binary_name(true);
    let m = cmd
        .try_get_matches_from(extra)
        .map_err(|e| anyhow::anyhow!("per-export setting: {}", e.render()))?;
    let only = Only::from_arg_matches(&m)?;
    let mut out = base.clone();
    let given = |id: &str| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    if given("backend") {
        out.backend = only.device.backend;
    }
    if given("max_memory") {
        out.max_memory = only.device.max_memory;
    }
    if given("chunk_size") {
        out.chunk_size = only.device.chunk_size;
    }
    if given("preallocate") {
        out.preallocate = only.device.preallocate;
    }
    if given("read_only") {
        out.read_only = only.device.read_only;
    }
    if given("gpu") {
        out.gpu = only.device.gpu;
    }
    if given("keep_free") {
        out.keep_free = only.device.keep_free;
    }
    if given("buffer_memory") {
        out.buffer_memory = only.device.buffer_memory;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_cmd() -> clap::Command {
        use clap::CommandFactory;
        super::super::Cli::command()
            .find_subcommand("serve")
            .unwrap()
            .clone()
    }

    fn parse(args: &[&str]) -> ArgMatches {
        serve_cmd()
            .no_binary_name(true)
            .try_get_matches_from(args)
            .unwrap()
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    fn effective(cli: &[&str], file: &str) -> (Vec<String>, Vec<ExportOverride>) {
        let f = write(file);
        merged_argv(&serve_cmd(), &parse(cli), f.path()).unwrap()
    }

    #[test]
    fn file_alone_equals_the_flags_it_stands_for() {
        let (argv, ov) = effective(
            &[],
            r#"
            [server]
            listen = ["127.0.0.1:10999"]
            socket = "/tmp/x.sock"
            max_connections = 7
            metrics = "127.0.0.1:9100"
            [device]
            backend = "host"
            chunk_size = "64K"
            preallocate = true
            [[export]]
            name = ""
            size = "1G"
            save = "/tmp/a.img"
            [[export]]
            name = "b"
            size = 1048576
            max_memory = "512K"
            persist = "/tmp/b.img"
            "#,
        );
        let flags = parse(&[
            "--listen=127.0.0.1:10999",
            "--socket=/tmp/x.sock",
            "--max-connections=7",
            "--metrics=127.0.0.1:9100",
            "--backend=host",
            "--chunk-size=64K",
            "--preallocate",
            "--size=1G",
            "--export=b=1048576",
            "--save=/tmp/a.img",
        ]);
        let from_file = serve_cmd().no_binary_name(true).get_matches_from(&argv);
        for id in serve_cmd()
            .get_arguments()
            .map(|a| a.get_id().as_str().to_string())
        {
            let a: Option<Vec<_>> = flags
                .get_raw(&id)
                .map(|v| v.map(|x| x.to_os_string()).collect());
            let b: Option<Vec<_>> = from_file
                .get_raw(&id)
                .map(|v| v.map(|x| x.to_os_string()).collect());
            assert_eq!(a, b, "setting {id}");
        }
        assert_eq!(ov.len(), 2);
        assert_eq!(ov[1].device_flags, vec!["--max-memory=512K".to_string()]);
        assert_eq!(ov[1].plan.load_if_exists, Some(PathBuf::from("/tmp/b.img")));
        assert_eq!(ov[1].plan.save, Some(PathBuf::from("/tmp/b.img")));
    }

    #[test]
    fn command_line_wins_per_setting() {
        let file = r#"
            [server]
            listen = ["127.0.0.1:1", "127.0.0.1:2"]
            max_connections = 7
            [device]
            backend = "host"
            read_only = true
            [[export]]
            name = "a"
            size = "1G"
            "#;
        let (argv, ov) = effective(&["--listen=127.0.0.1:3", "--backend=cuda"], file);
        assert!(argv.contains(&"--listen=127.0.0.1:3".to_string()));
        assert!(!argv.iter().any(|a| a.contains("127.0.0.1:1")));
        assert!(argv.contains(&"--backend=cuda".to_string()));
        assert!(argv.contains(&"--max-connections=7".to_string()));
        assert!(argv.contains(&"--read-only".to_string()));
        assert!(argv.contains(&"--export=a=1G".to_string()));
        assert_eq!(ov.len(), 1);
        // Exports on the command line replace the file's, overrides included.
        let (argv, ov) = effective(&["--size=2G"], file);
        assert!(argv.contains(&"--size=2G".to_string()));
        assert!(!argv.iter().any(|a| a.starts_with("--export")));
        assert!(ov.is_empty());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::super::Cli::command().debug_assert();
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/vramdisk.toml");
        let (argv, ov) = merged_argv(&serve_cmd(), &parse(&[]), &path).unwrap();
        assert!(
            argv.contains(&"--export=scratch=32G".to_string()),
            "{argv:?}"
        );
        assert!(argv.contains(&"--persist=/var/lib/vramdisk/scratch.img".to_string()));
        assert_eq!(ov.len(), 1);
    }

    #[test]
    fn bad_files_get_one_sentence() {
        let f = write("[server]\nlisten = 5\n");
        let err = merged_argv(&serve_cmd(), &parse(&[]), f.path()).unwrap_err();
        assert!(format!("{err:#}").contains(&f.path().display().to_string()));
        let f = write("[[export]]\nname = \"a\"\nsize = \"lots\"\n");
        let err = merged_argv(&serve_cmd(), &parse(&[]), f.path()).unwrap_err();
        assert!(format!("{err:#}").contains("not a size"), "{err:#}");
        let f = write("[device]\nbakend = \"host\"\n");
        let err = merged_argv(&serve_cmd(), &parse(&[]), f.path()).unwrap_err();
        assert!(format!("{err:#}").contains("bakend"), "{err:#}");
        let f = write("[device]\nbackend = \"tape\"\n");
        assert!(merged_argv(&serve_cmd(), &parse(&[]), f.path()).is_err());
    }
}

#[cfg(test)]
mod security_keys {
    use super::*;

    #[test]
    fn tls_and_socket_keys_map_to_their_flags() {
        use clap::CommandFactory;
        let cmd = super::super::Cli::command()
            .find_subcommand("serve")
            .unwrap()
            .clone();
        let m = cmd
            .clone()
            .no_binary_name(true)
            .try_get_matches_from(Vec::<String>::new())
            .unwrap();
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            f.path(),
            r#"
            [server]
            tls = "require"
            tls_cert = "/c.pem"
            tls_key = "/k.pem"
            tls_ca = "/ca.pem"
            allow_insecure = true
            socket_mode = "0660"
            socket_group = "disk"
            max_connections_per_client = 3
            "#,
        )
        .unwrap();
        let (argv, _) = merged_argv(&cmd, &m, f.path()).unwrap();
        for flag in [
            "--tls=require",
            "--tls-cert=/c.pem",
            "--tls-key=/k.pem",
            "--tls-ca=/ca.pem",
            "--allow-insecure",
            "--socket-mode=0660",
            "--socket-group=disk",
            "--max-connections-per-client=3",
        ] {
            assert!(
                argv.iter().any(|a| a == flag),
                "{flag} missing from {argv:?}"
            );
        }
    }
}
