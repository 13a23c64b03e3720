//! The NBD protocol (NetworkBlockDevice/nbd doc/proto.md).
//!
//! [`proto`] is the wire format: pure parse and encode, no I/O, tested byte for byte.
//! `handshake` negotiates options until the client picks an export, `transmission` serves
//! its requests, and [`server`] accepts connections, applies limits and shuts down. What
//! the three share ([`export::Export`], [`export::Limits`]) sits below them in [`export`],
//! so none of them imports another back. Devices are reached only through
//! [`crate::engine::BlockDevice`].

pub(crate) mod admission;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod tls;
mod transmission;
