//! The command line: argument definitions shared by every subcommand, and dispatch.

mod attach;
mod device;
mod serve;
pub mod size;

pub use device::{BackendKind, DeviceArgs};

use clap::{Parser, Subcommand};
use std::process::ExitCode;

const EXAMPLES: &str = "\
Examples:
  Serve a 16 GiB device over NBD on 127.0.0.1:10809 (GPU memory if there is a GPU):
    vramdisk serve --size 16G
  Serve from host RAM on a Unix socket and on TCP at once:
    vramdisk serve --backend host --size 1G --socket /run/vramdisk.sock --listen 127.0.0.1:10809
  Serve two named exports from one daemon:
    vramdisk serve --export scratch=8G --export cache=32G
  Use it:
    nbdinfo nbd://127.0.0.1:10809
    qemu-img convert -p -O raw disk.qcow2 nbd://127.0.0.1:10809
    nbdcopy nbd+unix:///?socket=/run/vramdisk.sock backup.img
    nbd-client 127.0.0.1 10809 /dev/nbd0 -N ''     # on a host whose kernel has nbd

Sizes take K, M, G and T suffixes (powers of 1024).
Logs go to stderr; set RUST_LOG=debug for more.";

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
    #[command(after_help = EXAMPLES)]
    Serve(serve::ServeArgs),
    /// Make a local block device (/dev/loopN) you can mkfs, mount or swapon; prints its path.
    #[command(after_help = attach::EXAMPLES)]
    Attach(attach::AttachArgs),
    /// Detach a device made by `attach` (also cleans up after a daemon that died).
    Detach(attach::DetachArgs),
}

/// Parses the command line, runs the subcommand, and turns its error into one plain line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Attach(args) => attach::run(args),
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

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
