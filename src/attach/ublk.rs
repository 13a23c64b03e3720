//! Attach through ublk (`/dev/ublk-control`, Linux 6.0+): not built.
//!
//! ublk would be the fastest path (io_uring passthrough, no FUSE, no loop), but the
//! `libublk` crate generates its kernel bindings with bindgen at build time and so needs
//! libclang, which neither the build machines nor CI have (tried: libublk 0.4.8 fails in
//! libublk-rs-sys's build script, "Unable to find libclang"). Writing the ublk control and
//! io_uring command protocol by hand is a project of its own; FUSE + loop runs everywhere we
//! have, so `--via ublk` says plainly that it is not available.

use std::path::Path;

/// Why ublk cannot be used, one sentence.
pub fn unavailable() -> Option<String> {
    if !Path::new("/dev/ublk-control").exists() {
        return Some(
            "this kernel has no ublk driver (/dev/ublk-control missing): use --via fuse".into(),
        );
    }
    Some(
        "this vramdisk was built without ublk support (the libublk crate needs libclang to \
         build): use --via fuse"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn always_says_why() {
        let why = super::unavailable().unwrap();
        assert!(why.contains("--via fuse"), "{why}");
    }
}
