//! vramdisk: a block device that lives in GPU memory.
//!
//! The crate is laid out the way a request travels:
//!
//! - [`engine`]: the storage engine. [`engine::BlockDevice`] is the one interface every
//!   frontend talks to; [`engine::SparseDevice`] implements it over a sparse map of chunks,
//!   taking memory from a [`engine::Backend`] (host RAM or CUDA) only when a chunk is first
//!   written and giving it back on TRIM.
//! - [`nbd`]: the NBD protocol. `proto` is the wire format (pure parse/encode, no I/O);
//!   `server` accepts connections and runs the handshake and the transmission phase.
//! - [`attach`]: local attach methods that turn a device into `/dev/...`.
//! - [`ops`]: running the daemon for real: counters, the control socket behind
//!   `vramdisk status` and `vramdisk save`, Prometheus metrics, persistence, systemd.
//! - [`cli`]: the command line.

pub mod attach;
mod busy_poll;
pub mod cli;
pub mod engine;
pub mod nbd;
pub mod ops;
#[cfg(test)]
mod test_support;
mod tunables;
