//! `serve --config FILE`: the same settings as the command line, from a TOML file, with
//! several exports at once.
//!
//! The file is turned into the command line it stands for and parsed by the same clap
//! definition, so a setting means exactly what its flag means and is validated the same way.
//! Its keys are the flags' long names in snake_case, looked up in clap's own list of
//! arguments: a new flag is a key with no code here, and an error names the key and the
//! value as the file wrote them.
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
use anyhow::{Context, Result, anyhow, bail};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches};
use std::any::TypeId;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use toml::Value;
use tracing::info;

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

/// Flags of `serve` that no section takes as a key: the file itself, clap's own, and what
/// an `[[export]]` says in its own words (`name`, `size`, `save`, `load`, `persist`).
const NOT_KEYS: [&str; 8] = [
    "config", "help", "version", "size", "export", "save", "load", "persist",
];

/// The flags of one export's device: what `[device]` and `[[export]]` may set.
fn device_command() -> clap::Command {
    #[derive(clap::Parser)]
    struct Only {
        #[command(flatten)]
        device: DeviceArgs,
    }
    use clap::CommandFactory;
    Only::command().no_binary_name(true)
}

/// The config key of a flag: `--chunk-size` is `chunk_size`.
fn key_of(long: &str) -> String {
    long.replace('-', "_")
}

/// The flag of `key` among `cmd`'s arguments, unless the key is not one a section takes.
fn arg_of<'c>(cmd: &'c clap::Command, key: &str) -> Option<&'c clap::Arg> {
    cmd.get_arguments().find(|a| {
        a.get_long()
            .is_some_and(|l| key_of(l) == key && !NOT_KEYS.contains(&l))
    })
}

/// The keys a section takes, for an error that lists them.
fn keys_of(cmd: &clap::Command, skip: &clap::Command) -> Vec<String> {
    let mut keys: Vec<String> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set())
        .filter_map(|a| a.get_long())
        .filter(|l| !NOT_KEYS.contains(l))
        .map(key_of)
        .filter(|k| arg_of(skip, k).is_none())
        .collect();
    keys.sort();
    keys
}

/// The flags `key = value` stands for, checked against what the flag takes: a switch
/// takes `true` or `false`, a text flag (an address, a path) a string, a number or size a
/// number or a string, and only a flag that may repeat takes a list.
fn flags_of(arg: &clap::Arg, value: &Value) -> Result<Vec<String>, String> {
    let long = arg.get_long().unwrap_or_default();
    let switch = matches!(arg.get_action(), ArgAction::SetTrue);
    let list = matches!(arg.get_action(), ArgAction::Append);
    let parsed = arg.get_value_parser().type_id();
    let text = [
        TypeId::of::<String>(),
        TypeId::of::<PathBuf>(),
        TypeId::of::<OsString>(),
    ]
    .into_iter()
    .any(|t| parsed == t);
    let scalar = |v: &Value| match v {
        Value::String(s) => Ok(s.clone()),
        Value::Integer(i) if !text => Ok(i.to_string()),
        Value::Float(f) if !text => Ok(f.to_string()),
        _ if text => Err("must be a string (in quotes)".to_string()),
        _ => Err("must be a number or a string".to_string()),
    };
    match value {
        Value::Boolean(on) if switch => Ok(on.then(|| format!("--{long}")).into_iter().collect()),
        _ if switch => Err("is a switch: write true or false".into()),
        Value::Array(items) if list => items
            .iter()
            .map(|v| scalar(v).map(|s| format!("--{long}={s}")))
            .collect(),
        Value::Array(_) => Err("takes one value, not a list".into()),
        v => Ok(vec![format!("--{long}={}", scalar(v)?)]),
    }
}

/// Where a flag of the file's command line came from, to name it in an error.
struct Origin {
    section: String,
    key: String,
    value: Value,
}

/// The file's settings as flags, each remembering its key.
#[derive(Default)]
struct Flags {
    argv: Vec<String>,
    origins: Vec<(String, Origin)>,
}

impl Flags {
    fn push(&mut self, flags: Vec<String>, section: &str, key: &str, value: &Value) {
        for f in flags {
            let long = f.trim_start_matches('-');
            let long = long.split('=').next().unwrap_or(long).to_string();
            let origin = Origin {
                section: section.to_string(),
                key: key.to_string(),
                value: value.clone(),
            };
            self.origins.push((long, origin));
            self.argv.push(f);
        }
    }
}

/// Clap's complaint about the flags of `sets` (the first that has the flag wins), told as
/// the key and value of the file.
fn explain(path: &Path, e: &clap::Error, sets: &[&Flags]) -> anyhow::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let long = |a: &str| -> String {
        let a = a.trim_start_matches('-');
        a.split([' ', '=']).next().unwrap_or(a).to_string()
    };
    let rendered = e.render().to_string();
    let first = rendered.lines().next().unwrap_or("invalid setting");
    let first = first.trim_start_matches("error: ");
    match (e.kind(), e.get(ContextKind::InvalidArg)) {
        (ErrorKind::MissingRequiredArgument, Some(ContextValue::Strings(missing))) => {
            let keys: Vec<String> = missing.iter().map(|a| key_of(&long(a))).collect();
            anyhow!(
                "{}: a setting there needs {} as well: add it",
                path.display(),
                keys.join(" and ")
            )
        }
        (_, Some(ContextValue::String(a))) => {
            let l = long(a);
            let found = sets
                .iter()
                .find_map(|f| f.origins.iter().find(|(o, _)| *o == l));
            let Some((_, o)) = found else {
                return anyhow!("{}: {first}", path.display());
            };
            // A value parser's own sentence says what is wrong better than clap's frame.
            let why = std::error::Error::source(e).map_or(first.to_string(), |s| s.to_string());
            anyhow!(
                "{}: {} {} = {}: {why}",
                path.display(),
                o.section,
                o.key,
                o.value
            )
        }
        _ => anyhow!("{}: {first}", path.display()),
    }
}

/// The flags of one section's keys; `cmd` has the flags the section may set, `skip` those
/// it may not although `cmd` has them (the device's flags, in `[server]`).
fn section_flags(
    path: &Path,
    name: &str,
    table: &toml::Table,
    cmd: &clap::Command,
    skip: &clap::Command,
    out: &mut Flags,
) -> Result<()> {
    for (key, value) in table {
        let Some(arg) = arg_of(cmd, key).filter(|_| arg_of(skip, key).is_none()) else {
            bail!(
                "{}: {name} has no setting {key}; it takes {}",
                path.display(),
                keys_of(cmd, skip).join(", ")
            );
        };
        let flags = flags_of(arg, value)
            .map_err(|why| anyhow!("{}: {name} {key} = {value}: {why}", path.display()))?;
        out.push(flags, name, key, value);
    }
    Ok(())
}

/// A string setting of an `[[export]]`.
fn export_text(path: &Path, name: &str, e: &toml::Table, key: &str) -> Result<Option<String>> {
    match e.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => bail!(
            "{}: {name} {key} = {v}: must be a string (in quotes)",
            path.display()
        ),
    }
}

/// The `serve` arguments the file at `path` stands for, and what flags cannot say.
fn file_argv(path: &Path) -> Result<(Vec<String>, Vec<ExportOverride>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let file: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        anyhow!("{}: {}", path.display(), e.to_string().trim_end())
    })?;
    let serve = serve_command();
    let device = device_command();
    let nothing = clap::Command::new("none");
    let mut flags = Flags::default();
    let mut exports: &[Value] = &[];
    for (section, value) in &file {
        match (section.as_str(), value) {
            ("server", Value::Table(t)) => {
                section_flags(path, "[server]", t, &serve, &device, &mut flags)?
            }
            ("device", Value::Table(t)) => {
                section_flags(path, "[device]", t, &device, &nothing, &mut flags)?
            }
            ("export", Value::Array(list)) => exports = list,
            _ => bail!(
                "{}: {section} is not a section of the config file: it has [server], [device] \
                 and [[export]] tables",
                path.display()
            ),
        }
    }
    let mut overrides = Vec::new();
    for (i, e) in exports.iter().enumerate() {
        let Value::Table(e) = e else {
            bail!("{}: export must be [[export]] tables", path.display());
        };
        let Some(name) = export_text(path, "[[export]]", e, "name")? else {
            bail!(
                "{}: an [[export]] has no name: give it one (name = \"\" is the default export)",
                path.display()
            );
        };
        let title = format!("[[export]] '{name}'");
        let size = match e.get("size") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Integer(b)) => b.to_string(),
            Some(v) => bail!(
                "{}: {title} size = {v}: must be a number or a string",
                path.display()
            ),
            None => bail!(
                "{}: {title} has no size: give it one, like size = \"16G\"",
                path.display()
            ),
        };
        parse_size(&size).map_err(|m| anyhow!("{}: {title} size = {size}: {m}", path.display()))?;
        let arg = if name.is_empty() {
            format!("--size={size}")
        } else {
            format!("--export={name}={size}")
        };
        flags.push(vec![arg], &title, "size", &e["size"]);
        let file = |key| export_text(path, &title, e, key).map(|v| v.map(PathBuf::from));
        let (save, load, persist) = (file("save")?, file("load")?, file("persist")?);
        if i == 0 {
            for (key, v) in [("save", &save), ("load", &load), ("persist", &persist)] {
                if let Some(v) = v {
                    let arg = format!("--{key}={}", v.display());
                    flags.push(vec![arg], &title, key, &e[key]);
                }
            }
        }
        let mut own = toml::Table::new();
        for (key, v) in e {
            if !["name", "size", "save", "load", "persist"].contains(&key.as_str()) {
                own.insert(key.clone(), v.clone());
            }
        }
        let mut mine = Flags::default();
        section_flags(path, &title, &own, &device, &nothing, &mut mine)?;
        // Checked here, under the shared [device] settings, so an error names the key.
        let shared: Vec<String> = flags
            .argv
            .iter()
            .filter(|f| device_long(&device, f).is_some())
            .cloned()
            .collect();
        per_export_matches(&shared, &mine.argv).map_err(|e| explain(path, &e, &[&mine, &flags]))?;
        let plan = PersistPlan {
            load: load.clone(),
            load_if_exists: persist.clone(),
            save: save.or(persist),
        };
        overrides.push(ExportOverride {
            name: name.clone(),
            device_flags: mine.argv,
            plan: if i == 0 { PersistPlan::default() } else { plan },
        });
    }
    // The unnamed export must come first on the command line too, since flags put it first.
    if overrides.iter().skip(1).any(|e| e.name.is_empty()) {
        bail!(
            "{}: the export with the empty name (the default) must be the first [[export]]",
            path.display()
        );
    }
    serve
        .no_binary_name(true)
        .try_get_matches_from(&flags.argv)
        .map_err(|e| explain(path, &e, &[&flags]))?;
    Ok((flags.argv, overrides))
}

/// The long name of `flag` (`--chunk-size=2M`) if it is one of a device's own settings.
fn device_long<'f>(device: &clap::Command, flag: &'f str) -> Option<&'f str> {
    let long = flag.strip_prefix("--")?.split('=').next()?;
    arg_of(device, &key_of(long)).map(|_| long)
}

/// One export's device flags: the shared ones in `base` (any `serve` flags; the device's are
/// kept) with those that `own` sets replaced, lists included.
fn per_export_matches(base: &[String], own: &[String]) -> Result<ArgMatches, clap::Error> {
    let device = device_command();
    let own_longs: Vec<&str> = own.iter().filter_map(|f| device_long(&device, f)).collect();
    let argv: Vec<&String> = base
        .iter()
        .filter(|f| device_long(&device, f).is_some_and(|l| !own_longs.contains(&l)))
        .chain(own)
        .collect();
    device.try_get_matches_from(argv)
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
        .with_context(|| format!("{}: invalid settings", config.display()))?;
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

/// Builds every export, each with its own device options when the config file gives some
/// (`argv` is the effective `serve` command line those options amend).
pub fn build_devices(
    device: &DeviceArgs,
    ops: &super::serve::OpsArgs,
    overrides: &[ExportOverride],
    argv: &[String],
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
            Some(o) if !o.device_flags.is_empty() => per_export_args(argv, &o.device_flags)?,
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
                copies: d.copies,
                backend: format!("{backend:?}").to_lowercase(),
                plan: plan.clone(),
                read_only_view,
            });
        }
    }
    Ok(out)
}

/// The device options of an export with flags of its own (`own`) amending `base`.
fn per_export_args(base: &[String], own: &[String]) -> Result<DeviceArgs> {
    use clap::FromArgMatches;
    let m =
        per_export_matches(base, own).map_err(|e| anyhow!("per-export setting: {}", e.render()))?;
    Ok(DeviceArgs::from_arg_matches(&m)?)
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;

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
        let path = crate::test_support::source_dir().join("contrib/vramdisk.toml");
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
mod key_errors {
    use super::tests_support::*;

    /// Each file's error has its phrase.
    fn refused(cases: &[(&str, &str)]) {
        for (file, phrase) in cases {
            let e = error(file);
            assert!(e.contains(phrase), "{file:?}: no {phrase:?} in {e}");
        }
    }

    #[test]
    fn a_bad_value_is_named_by_its_key_not_its_flag() {
        let e = error("[device]\nchunk_size = \"3M\"\n");
        assert!(!e.contains("--chunk-size") && !e.contains("3145728"), "{e}");
        let export = "[[export]]\nname = \"a\"\nsize = \"1G\"\n";
        let shared_then_export = format!("[device]\nchunk_size = \"3M\"\n{export}");
        refused(&[
            (
                "[device]\nchunk_size = \"3M\"\n",
                "[device] chunk_size = \"3M\": '3M' is not a power of two",
            ),
            (
                &format!("{export}chunk_size = \"3M\"\n"),
                "[[export]] 'a' chunk_size = \"3M\": '3M' is not",
            ),
            // A shared setting is named as such when an export's check finds it wrong.
            (
                &shared_then_export,
                "[device] chunk_size = \"3M\": '3M' is not",
            ),
            (
                "[server]\nbusy_poll = \"often\"\n",
                "[server] busy_poll = \"often\": ",
            ),
            (
                "[device]\nbackend = \"tape\"\n",
                "[device] backend = \"tape\": ",
            ),
            (
                "[device]\nspill_file_size = \"1G\"\n",
                "a setting there needs spill_file as well",
            ),
        ]);
    }

    #[test]
    fn unknown_keys_and_sections_are_refused_with_the_keys_there_are() {
        let export = "[[export]]\nname = \"a\"\nsize = \"1G\"\n";
        refused(&[
            (
                "[device]\nbakend = \"host\"\n",
                "[device] has no setting bakend; it takes",
            ),
            (
                "[device]\nbakend = \"host\"\n",
                "backend, buffer_memory, chunk_size",
            ),
            // A device setting belongs to [device] or an export, not to [server].
            (
                "[server]\nchunk_size = \"2M\"\n",
                "[server] has no setting chunk_size",
            ),
            (
                "[device]\nlisten = \"127.0.0.1:1\"\n",
                "[device] has no setting listen",
            ),
            // What an export says in its own words is not a flag of the sections.
            (
                "[server]\npersist = \"/x.img\"\n",
                "[server] has no setting persist",
            ),
            (
                &format!("{export}listen = \"x\"\n"),
                "[[export]] 'a' has no setting listen",
            ),
            (
                "[sever]\nlisten = \"127.0.0.1:1\"\n",
                "sever is not a section",
            ),
        ]);
    }

    #[test]
    fn wrong_types_say_what_the_key_takes() {
        let export = "[[export]]\nname = \"a\"\n";
        refused(&[
            (
                "[server]\nlisten = 5\n",
                "[server] listen = 5: must be a string",
            ),
            (
                "[device]\nread_only = \"yes\"\n",
                "[device] read_only = \"yes\": is a switch",
            ),
            (
                "[device]\nmax_memory = [\"1G\"]\n",
                "max_memory = [\"1G\"]: takes one value, not a list",
            ),
            (
                "[device]\nmax_memory = true\n",
                "max_memory = true: must be a number or a string",
            ),
            (
                &format!("{export}size = true\n"),
                "[[export]] 'a' size = true: must be",
            ),
            (export, "[[export]] 'a' has no size"),
            (
                &format!("{export}size = \"1G\"\nsave = 3\n"),
                "'a' save = 3: must be a string",
            ),
        ]);
    }

    #[test]
    fn every_flag_is_a_key_without_listing_it() {
        // Spill settings were never written into the config code: they come from clap.
        let (argv, ov) = effective(
            &[],
            "[device]\nspill_memory = \"1G\"\ngpu = [0, 1]\n\
             [[export]]\nname = \"a\"\nsize = \"1G\"\nkeep_free = 1048576\n",
        );
        assert!(argv.contains(&"--spill-memory=1G".to_string()), "{argv:?}");
        assert!(argv.contains(&"--gpu=0".to_string()) && argv.contains(&"--gpu=1".to_string()));
        assert_eq!(ov[0].device_flags, vec!["--keep-free=1048576".to_string()]);
    }

    #[test]
    fn an_export_replaces_a_shared_list_and_keeps_the_rest() {
        let base = [
            "--gpu=0".to_string(),
            "--gpu=1".into(),
            "--read-only".into(),
            "--listen=x".into(),
        ];
        let d = super::per_export_args(&base, &["--gpu=2".to_string()]).unwrap();
        assert_eq!(d.gpu, vec![2]);
        assert!(d.read_only);
    }
}

#[cfg(test)]
mod tests_support {
    pub use super::*;

    pub fn serve_cmd() -> clap::Command {
        serve_command()
    }

    pub fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    pub fn parse(args: &[&str]) -> ArgMatches {
        serve_cmd()
            .no_binary_name(true)
            .try_get_matches_from(args)
            .unwrap()
    }

    pub fn effective(cli: &[&str], file: &str) -> (Vec<String>, Vec<ExportOverride>) {
        let f = write(file);
        merged_argv(&serve_cmd(), &parse(cli), f.path()).unwrap()
    }

    /// The error for a file holding `text`, which must name the file.
    pub fn error(text: &str) -> String {
        let f = write(text);
        let e = merged_argv(&serve_cmd(), &parse(&[]), f.path()).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.starts_with(&f.path().display().to_string()), "{e}");
        e
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
