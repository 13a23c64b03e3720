//! The NBD protocol (NetworkBlockDevice/nbd doc/proto.md).
//!
//! [`proto`] is the wire format: pure parse and encode, no I/O, tested byte for byte.
//! [`server`] accepts connections, runs the handshake and the transmission phase, and talks
//! to devices only through [`crate::engine::BlockDevice`].

pub mod proto;
pub mod server;
