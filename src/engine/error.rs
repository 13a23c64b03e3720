//! Errors of block operations, each with the errno a frontend reports for it.

/// The result of a block operation.
pub type IoResult<T> = Result<T, IoError>;

/// Why a block operation failed. Frontends map each variant to their protocol's error
/// (NBD error codes, FUSE and ublk errnos) through [`IoError::errno`].
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The range is not inside the device.
    #[error("range {offset}+{len} lies past the end of the device ({size} bytes)")]
    OutOfRange {
        /// Start of the requested range.
        offset: u64,
        /// Length of the requested range.
        len: u64,
        /// Size of the device.
        size: u64,
    },
    /// Storage for the write could not be taken (memory cap reached, GPU full).
    #[error("no space left: {0}")]
    NoSpace(String),
    /// The device is read-only.
    #[error("the device is read-only")]
    ReadOnly,
    /// A fast write-zeroes was asked for and cannot be done fast.
    #[error("zeroing this range cannot be done fast")]
    FastZeroUnsupported,
    /// The operation is not supported by this device.
    #[error("operation not supported")]
    NotSupported,
    /// The backend failed (a CUDA error, an allocation failure). The message names the
    /// device, offset and cause.
    #[error("{0}")]
    Backend(String),
}

impl IoError {
    /// The errno that best describes this error to a client.
    pub fn errno(&self) -> i32 {
        match self {
            IoError::OutOfRange { .. } => libc::EINVAL,
            IoError::NoSpace(_) => libc::ENOSPC,
            IoError::ReadOnly => libc::EPERM,
            IoError::FastZeroUnsupported | IoError::NotSupported => libc::ENOTSUP,
            IoError::Backend(_) => libc::EIO,
        }
    }
}
