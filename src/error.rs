//! The one error type of the crate. Nothing in the library panics on user input or on a missing
//! driver: every failure is one of these values.

use std::fmt;

/// Which driver a [`Error::Driver`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    /// NVIDIA's CUDA driver API.
    Cuda,
    /// AMD's HIP runtime.
    Hip,
}

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Vendor::Cuda => "CUDA",
            Vendor::Hip => "HIP",
        })
    }
}

/// Everything that can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input failed validation before anything was launched; outputs are untouched.
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument (or field) at fault.
        name: String,
        /// What was wrong with it, with the offending value.
        reason: String,
    },
    /// The requested device does not exist here (no driver, no GPU, ordinal out of range, or the
    /// crate was built without that vendor's feature).
    #[error("no {vendor} device: {reason}")]
    NoDevice {
        /// "CUDA", "HIP".
        vendor: &'static str,
        /// Why.
        reason: String,
    },
    /// A driver call failed; carries the driver's own code and message. Asynchronous kernel
    /// faults surface as this at the next synchronising call.
    #[error("{vendor} call {call} failed: {message} (code {code})")]
    Driver {
        /// Which driver.
        vendor: Vendor,
        /// The driver function that failed.
        call: &'static str,
        /// The driver's error code.
        code: i32,
        /// The driver's message for that code.
        message: String,
    },
    /// A device allocation failed for lack of memory.
    #[error("out of memory: could not allocate {bytes} bytes on {device}")]
    OutOfMemory {
        /// The device, in words.
        device: String,
        /// The size asked for.
        bytes: usize,
    },
    /// The request is valid but this build or device cannot serve it.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// `Result<T, fep_kernels::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name: name.into(),
            reason: reason.into(),
        }
    }
}
