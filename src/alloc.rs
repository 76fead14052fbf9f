//! The one fallible allocation path. Every buffer whose size comes from a caller (outputs,
//! workspaces, traces, the Gram matrix, host copies) is sized here with checked arithmetic and
//! allocated with a fallible call, so an impossible request is an [`Error::OutOfMemory`] naming
//! what it was for and how many bytes it asked, never an abort ("memory allocation of N bytes
//! failed") or a "capacity overflow" panic.
//!
//! What this cannot catch: on Linux with overcommit, a request that the kernel grants but
//! cannot back (a little more than the free memory) succeeds here and may meet the OOM killer
//! when its pages are first touched. Requests larger than memory plus swap fail here.

use std::alloc::Layout;

use bytemuck::Zeroable;

use crate::error::{Error, Result};

/// The bytes of `len` elements of `T`, exact even when they overflow `usize`.
pub(crate) fn bytes_of<T>(len: usize) -> u128 {
    len as u128 * size_of::<T>() as u128
}

/// The error for a request of `len` elements of `T` that could not be had.
pub(crate) fn oom<T>(device: &str, what: impl FnOnce() -> String, len: usize) -> Error {
    Error::OutOfMemory {
        device: device.to_string(),
        what: what(),
        bytes: bytes_of::<T>(len),
    }
}

/// `len` zeroed elements on the host (calloc: untouched pages cost nothing until written).
pub(crate) fn zeroed<T: Zeroable>(len: usize, what: impl FnOnce() -> String) -> Result<Vec<T>> {
    if len == 0 || size_of::<T>() == 0 {
        return Ok((0..len).map(|_| T::zeroed()).collect());
    }
    let Ok(layout) = Layout::array::<T>(len) else {
        return Err(oom::<T>("the host", what, len));
    };
    // Safety: the layout has a non-zero size; the memory is owned by the Vec below, whose
    // capacity and element type are the layout's (the global allocator's contract for Vec).
    let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if p.is_null() {
        return Err(oom::<T>("the host", what, len));
    }
    // Safety: `p` holds `len` zeroed `T`s, and all-zero bytes are a valid `T` (Zeroable).
    Ok(unsafe { Vec::from_raw_parts(p, len, len) })
}

/// `len` copies of `value` on the host.
pub(crate) fn filled<T: Clone>(
    len: usize,
    value: T,
    what: impl FnOnce() -> String,
) -> Result<Vec<T>> {
    let mut v = with_capacity(len, what)?;
    v.resize(len, value);
    Ok(v)
}

/// An empty vector with room for `len` elements (fallible `Vec::with_capacity`).
pub(crate) fn with_capacity<T>(len: usize, what: impl FnOnce() -> String) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| oom::<T>("the host", what, len))?;
    Ok(v)
}

/// The product of `dims`, or an [`Error::InvalidArgument`] naming `name` and the factors when it
/// overflows `usize` (a shape whose element count cannot exist).
pub(crate) fn product(name: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            let factors: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
            Error::invalid(
                name,
                format!(
                    "{} elements overflow the address space",
                    factors.join(" x ")
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_requests_are_errors() {
        for len in [usize::MAX / 4, usize::MAX, 1 << 60] {
            match zeroed::<f32>(len, || "test".into()) {
                Err(Error::OutOfMemory { what, bytes, .. }) => {
                    assert_eq!(what, "test");
                    assert_eq!(bytes, len as u128 * 4);
                }
                other => panic!("{len}: {other:?}"),
            }
            assert!(matches!(
                filled(len, 1.0f64, || "f".into()),
                Err(Error::OutOfMemory { .. })
            ));
        }
        assert_eq!(zeroed::<f64>(3, || "x".into()).unwrap(), vec![0.0; 3]);
        assert_eq!(filled(2, 7u8, || "x".into()).unwrap(), vec![7, 7]);
        assert!(zeroed::<f32>(0, || "x".into()).unwrap().is_empty());
    }

    #[test]
    fn products_are_checked() {
        assert_eq!(product("s", &[2, 3, 4]).unwrap(), 24);
        assert_eq!(product("s", &[]).unwrap(), 1);
        let e = product("shape", &[1 << 32, 1 << 32])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("shape") && e.contains("4294967296 x 4294967296"),
            "{e}"
        );
    }
}
