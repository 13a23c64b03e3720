//! A whole connection (handshake, then transmission) on arbitrary client bytes.
#![no_main]
use std::sync::OnceLock;
use vramdisk::nbd::export::Export;

static EXPORTS: OnceLock<Vec<Export>> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let exports = EXPORTS.get_or_init(vramdisk::nbd::fuzzing::exports);
    vramdisk::nbd::fuzzing::session(data, exports);
});
