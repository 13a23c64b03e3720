//! The NBD protocol (NetworkBlockDevice/nbd doc/proto.md).
//!
//! [`proto`] is the wire format: pure parse and encode, no I/O, tested byte for byte.
//! `handshake` negotiates options until the client picks an export, `transmission` serves
//! its requests, and [`server`] accepts connections, applies limits and shuts down. Devices
//! are reached only through [`crate::engine::BlockDevice`].

#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod tls;
mod transmission;
