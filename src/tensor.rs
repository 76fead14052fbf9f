//! Validation shared by every op: lengths, devices, parameters. Each failure is an
//! [`Error::InvalidArgument`] naming the argument and the offending value.

use crate::backend::Device;
use crate::error::{Error, Result};

/// `Err` unless `got == expected` (elements).
pub(crate) fn check_len(name: &str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(Error::invalid(
            name,
            format!("has {got} elements, expected {expected}"),
        ));
    }
    Ok(())
}

/// `Err` unless the tensor `name` is on `want`.
pub(crate) fn same_device(name: &str, got: &Device, want: &Device) -> Result<()> {
    if got != want {
        return Err(Error::invalid(
            name,
            format!("is on {got:?}, expected {want:?}"),
        ));
    }
    Ok(())
}
