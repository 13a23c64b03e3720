//! `vramdisk devices`: the GPUs this machine has, as a table for people or JSON for scripts.

use crate::engine::cuda;
use anyhow::Result;
use clap::Args;

/// Arguments of `vramdisk devices`.
#[derive(Args, Debug)]
pub struct DevicesArgs {
    /// Print a JSON array (index, name, total_memory, free_memory, pci_bus_id; bytes).
    #[arg(long)]
    json: bool,
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Runs `vramdisk devices`.
pub fn run(args: DevicesArgs) -> Result<()> {
    let gpus = cuda::probe().map_err(|e| {
        if e.downcast_ref::<cuda::Unavailable>().is_some() {
            anyhow::anyhow!(
                "{e:#}: vramdisk lists NVIDIA GPUs only through their driver; without one, \
                 `vramdisk serve --backend host` keeps devices in host RAM"
            )
        } else {
            e
        }
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&gpus)?);
        return Ok(());
    }
    println!(
        "{:<5} {:<28} {:>11} {:>11}  PCI BUS ID",
        "GPU", "NAME", "TOTAL", "FREE"
    );
    for g in &gpus {
        println!(
            "{:<5} {:<28} {:>11} {:>11}  {}",
            g.index,
            g.name,
            gib(g.total_memory),
            gib(g.free_memory),
            g.pci_bus_id
        );
    }
    Ok(())
}
