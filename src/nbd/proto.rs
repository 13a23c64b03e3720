//! NBD wire format. (To be written.)
