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

/// Inputs and outputs as (name, address, bytes) spans; `Err` naming the first output that
/// overlaps another output or an input (empty spans overlap nothing).
pub(crate) fn check_no_overlap(
    ins: &[(&str, u64, usize)],
    outs: &[(&str, u64, usize)],
) -> Result<()> {
    let overlaps = |a: &(&str, u64, usize), b: &(&str, u64, usize)| {
        let end = |x: &(&str, u64, usize)| x.1.saturating_add(x.2 as u64);
        let (a0, a1, b0, b1) = (a.1, end(a), b.1, end(b));
        a0 < a1 && b0 < b1 && a0 < b1 && b0 < a1
    };
    for (i, a) in outs.iter().enumerate() {
        if let Some(b) = outs[..i].iter().chain(ins).find(|b| overlaps(a, b)) {
            return Err(Error::invalid(
                a.0,
                format!(
                    "overlaps {} (outputs must be distinct from each other and from the inputs)",
                    b.0
                ),
            ));
        }
    }
    Ok(())
}

/// Spans with owned names as the borrowed spans [`check_no_overlap`] takes.
pub(crate) fn borrowed(v: &[(String, u64, usize)]) -> Vec<(&str, u64, usize)> {
    v.iter().map(|(n, a, b)| (n.as_str(), *a, *b)).collect()
}
