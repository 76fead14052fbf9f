//! The CPU backend: the reference every GPU kernel is tested against. Straightforward code, f64
//! accumulation, parallel over the batch with rayon. The maths of each op lives beside the op
//! (`src/<op>/cpu.rs`); this file holds what they share. CPU "device memory" is host memory, and
//! the CPU device ignores streams: its calls return when the work is done.

use crate::error::{Error, Result};

/// `Err` naming the first element of `values` that is NaN or infinite.
pub(crate) fn check_finite(name: &str, values: impl Iterator<Item = f64>) -> Result<()> {
    for (i, v) in values.enumerate() {
        if !v.is_finite() {
            return Err(Error::invalid(name, format!("element {i} is {v}")));
        }
    }
    Ok(())
}
