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
    /// An allocation (host or device: a buffer, a workspace, a trace) failed for lack of memory,
    /// or its size does not fit in the address space. Nothing was written.
    #[error("out of memory: could not allocate {bytes} bytes for {what} on {device}")]
    OutOfMemory {
        /// The device, in words.
        device: String,
        /// What the memory was for ("the Gram matrix [60000, 60000]", "a buffer of 2^40 f32").
        what: String,
        /// The size asked for (u128: a size that overflows usize is still reported exactly).
        bytes: u128,
    },
    /// The computation diverged: an energy, a state or an update became NaN or infinite (a step
    /// size too large for the problem). Parameters the call would have updated are untouched.
    #[error("diverged: {0}")]
    Diverged(String),
    /// The request is valid but this build or device cannot serve it.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// `Result<T, fep_kernels::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::OutOfMemory`] from a backend, re-labelled with what the memory was for.
    pub(crate) fn for_what(self, what: impl FnOnce() -> String) -> Self {
        match self {
            Error::OutOfMemory { device, bytes, .. } => Error::OutOfMemory {
                device,
                what: what(),
                bytes,
            },
            other => other,
        }
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name: name.into(),
            reason: reason.into(),
        }
    }
}
