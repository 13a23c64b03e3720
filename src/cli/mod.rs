//! The command line: argument definitions shared by every subcommand, and dispatch.

mod attach;
mod bench;
mod config;
mod device;
mod devices;
mod ops;
mod serve;
pub mod size;

pub use device::{BackendKind, DeviceArgs};

/// `--via`, for `attach::Via`: the attach library knows nothing of the command line.
impl clap::ValueEnum for crate::attach::Via {
    fn value_variants<'a>() -> &'a [Self] {
        use crate::attach::Via;
        &[Via::Auto, Via::Fuse, Via::Nbd, Via::Ublk]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        use crate::attach::Via;
        let (name, help) = match self {
            Via::Auto => ("auto", "The best method this kernel and build offer"),
            Via::Fuse => ("fuse", "FUSE file + loop device"),
            Via::Nbd => ("nbd", "The kernel's nbd driver over netlink"),
            Via::Ublk => ("ublk", "ublk"),
        };
        Some(clap::builder::PossibleValue::new(name).help(help))
    }
}

impl clap::ValueEnum for crate::attach::fuse_loop::Transport {
    fn value_variants<'a>() -> &'a [Self] {
        use crate::attach::fuse_loop::Transport;
        &[Transport::Auto, Transport::Uring, Transport::Fuser]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        use crate::attach::fuse_loop::Transport;
        let (name, help) = match self {
            Transport::Auto => (
                "auto",
                "fuser (on GPU memory the faster at 4 KiB; io_uring is the faster at 1 MiB)",
            ),
            Transport::Uring => (
                "uring",
                "FUSE over io_uring (the fuse module's enable_uring on), or fail saying why not",
            ),
            Transport::Fuser => ("fuser", "fuser threads reading /dev/fuse"),
        };
        Some(clap::builder::PossibleValue::new(name).help(help))
    }
}

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

/// How sizes are read, said in the help of every command that takes sizes (a macro, so
/// that `concat!` can put it into the constant texts).
macro_rules! sizes_note {
    () => {
        "Sizes are binary: K, M, G and T are powers of 1024, written with or without B or iB \
         (1G, 1GB and 1GiB are all 1073741824 bytes)."
    };
}

const EXAMPLES: &str = concat!(
    "\
Examples:
  Serve a 16 GiB device over NBD on 127.0.0.1:10809 (GPU memory if there is a GPU):
    vramdisk serve --size 16G
  Serve from host RAM on a Unix socket and on TCP at once:
    vramdisk serve --backend host --size 1G --socket /run/vramdisk.sock --listen 127.0.0.1:10809
  Serve two named exports from one daemon:
    vramdisk serve --export scratch=8G --export cache=32G
  Keep the data across restarts, watch it, save it on demand:
    vramdisk serve --size 16G --persist /var/lib/vramdisk/disk.img --metrics 127.0.0.1:9100
    vramdisk status
    vramdisk save /var/lib/vramdisk/snapshot.img
  Use it:
    nbdinfo nbd://127.0.0.1:10809
    qemu-img convert -p -O raw disk.qcow2 nbd://127.0.0.1:10809
    nbdcopy nbd+unix:///?socket=/run/vramdisk.sock backup.img
    nbd-client 127.0.0.1 10809 /dev/nbd0 -N ''     # on a host whose kernel has nbd

",
    sizes_note!(),
    "
Logs go to stderr; set RUST_LOG=debug for more."
);

/// Shown under `vramdisk serve --help` (the examples are under `vramdisk --help`).
const SERVE_NOTES: &str = concat!(
    sizes_note!(),
    "\nExamples: vramdisk --help. Logs go to stderr; set RUST_LOG=debug for more."
);

/// vramdisk: a block device in GPU memory, served over NBD.
#[derive(Parser, Debug)]
#[command(name = "vramdisk", version, about, after_help = EXAMPLES)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve one or more devices over the NBD protocol (TCP and/or Unix socket).
    #[command(after_help = SERVE_NOTES)]
    Serve(Box<serve::ServeArgs>),
    /// Show every running daemon's exports: size, memory used, clients, I/O counters.
    Status(ops::StatusArgs),
    /// Save an export of a running daemon to a file (restore it with `serve --load FILE`).
    Save(ops::SaveArgs),
    /// Give GPU memory back to other programs: move the device's chunks to spill RAM (or the
    /// spill file) until SIZE is free, and hold it until `vramdisk yield --release`.
    #[command(after_help = ops::YIELD_EXAMPLES)]
    Yield(ops::YieldArgs),
    /// Print a shell completion script: vramdisk completions bash > /etc/bash_completion.d/vramdisk
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): vramdisk manpage | man -l -
    Manpage {
        /// Write one page per subcommand into this directory instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
    /// List the NVIDIA GPUs: index, name, total and free memory, PCI bus id.
    Devices(devices::DevicesArgs),
    /// Measure the engine in process (no network) against the machine's copy ceiling.
    Bench(bench::BenchArgs),
    /// Make a local block device (/dev/loopN) you can mkfs, mount or swapon; prints its path.
    #[command(after_help = attach::EXAMPLES)]
    Attach(Box<attach::AttachArgs>),
    /// Detach a device made by `attach` (also cleans up after a daemon that died).
    Detach(attach::DetachArgs),
}

/// Parses the command line, runs the subcommand, and turns its error into one plain line.
pub fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_logging();
    let result = match cli.command {
        Command::Serve(args) => serve::run(
            *args,
            matches.subcommand_matches("serve").expect("serve matched"),
        ),
        Command::Status(args) => ops::status(args),
        Command::Save(args) => ops::save(args),
        Command::Yield(args) => ops::yield_memory(args),
        Command::Completions { shell } => ops::completions(shell),
        Command::Manpage { dir } => ops::manpage(dir),
        Command::Devices(args) => devices::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Attach(args) => attach::run(*args),
        Command::Detach(args) => attach::detach(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vramdisk: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr. A person at a terminal gets the level and the message alone; logs bound
/// for a file or journal keep timestamps and module paths, which is what reading them later
/// needs.
fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if std::io::stderr().is_terminal() {
        fmt.without_time().with_target(false).try_init()
    } else {
        fmt.try_init()
    };
}
