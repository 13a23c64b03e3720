//! Local attach methods: turn a [`crate::engine::BlockDevice`] into `/dev/...`.
//! (To be written.)
