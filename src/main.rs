//! The `vramdisk` binary; everything lives in the library, see [`vramdisk::cli`].

fn main() -> std::process::ExitCode {
    vramdisk::cli::main()
}
