//! The wire-format parsers on arbitrary bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vramdisk::nbd::fuzzing::parsers(data);
});
