//! The C ABI: `include/fep_kernels.h` is generated from these files by cbindgen (configured by
//! cbindgen.toml; tests/ffi_header.rs fails while the committed header is not what cbindgen
//! generates, and `FEP_BLESS=1 cargo test --test ffi_header` rewrites it).
//!
//! The doc comments of the exported items (the `FEP_*` constants, the `#[repr(C)]` structs and
//! their fields, the opaque handles and the `extern "C"` functions) are the header's
//! documentation: they are written for a C reader and copied into the header as they are.
//!
//! Every entry point validates its pointers and sizes, returns a status code, and records a
//! message for [`fep_last_error`] on failure. No panic crosses the boundary: one that escaped
//! the library would be a bug, and is reported as `FEP_ERR_INTERNAL`.
//!
//! This file holds what every op shares: the ABI version, status, device and dtype codes (and
//! their mapping to [`Error`], [`DeviceKind`] and [`DType`]), the thread-local last error and
//! the panic guard, the library/device entry points, handle helpers and the common argument
//! checks. Each op's `#[repr(C)]` structs, codes and `extern "C"` functions are in its own
//! file (lca.rs, settle.rs, vmp.rs, attention.rs), all re-exported here: the paths stay
//! `fep_kernels::ffi::*`.

#![allow(clippy::missing_safety_doc)]

use std::cell::RefCell;
use std::ffi::{CString, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use bytemuck::Pod;

use crate::backend::{Device, DeviceKind, Stream, View, ViewMut};
use crate::element::DType;
use crate::error::{Error, Result};

/// The version of the C ABI this header declares; `fep_abi_version()` returns the one the loaded
/// library implements.
pub const FEP_ABI_VERSION: i32 = 4;

/// Status code: the call succeeded.
pub const FEP_OK: i32 = 0;
/// Status code: an argument (or a field of one) failed validation before any work was enqueued;
/// outputs are untouched. The message names the argument and the offending value.
pub const FEP_ERR_INVALID_ARGUMENT: i32 = 1;
/// Status code: the device does not exist here (no driver, no GPU, ordinal out of range, or a
/// build without that vendor's feature).
pub const FEP_ERR_NO_DEVICE: i32 = 2;
/// Status code: a CUDA or HIP call failed (the message carries the driver's code and message).
/// An asynchronous kernel fault surfaces as this at the next synchronising call.
pub const FEP_ERR_DRIVER: i32 = 3;
/// Status code: an allocation (host or device: an output, a workspace, a trace) failed for lack
/// of memory, or its size does not fit in the address space; the message says what it was for
/// and how many bytes it asked. Nothing was written.
pub const FEP_ERR_OUT_OF_MEMORY: i32 = 4;
/// Status code: the request is valid, but this build or device cannot serve it.
pub const FEP_ERR_UNSUPPORTED: i32 = 5;
/// Status code: an internal error (a bug in fep-kernels; no panic crosses the C boundary).
pub const FEP_ERR_INTERNAL: i32 = 6;
/// Status code: the computation diverged (an energy, state or update became NaN or infinite:
/// a step size too large for the problem). Parameters the call would have updated are
/// untouched; the message says where it diverged.
pub const FEP_ERR_DIVERGED: i32 = 7;

/// Device kind: the host CPU. Tensors are host memory; `stream` is ignored and calls return
/// when the work is done.
pub const FEP_DEVICE_CPU: i32 = 0;
/// Device kind: an NVIDIA GPU through the CUDA driver API (tensors are `CUdeviceptr`s, streams
/// `CUstream`s).
pub const FEP_DEVICE_CUDA: i32 = 1;
/// Device kind: an AMD GPU through HIP (tensors are `hipDeviceptr_t`s, streams `hipStream_t`s).
pub const FEP_DEVICE_HIP: i32 = 2;
/// Device kind: the f64 reference on the host, the oracle the fast CPU path (`FEP_DEVICE_CPU`)
/// and the GPUs are tested against. Host memory, like `FEP_DEVICE_CPU`; slower by design.
pub const FEP_DEVICE_CPU_REFERENCE: i32 = 3;

/// Element type of inputs: 32-bit IEEE float.
pub const FEP_DTYPE_F32: i32 = 0;
/// Element type of inputs: 16-bit IEEE half.
pub const FEP_DTYPE_F16: i32 = 1;
/// Element type of inputs: bfloat16.
pub const FEP_DTYPE_BF16: i32 = 2;

// ---- the codes of the crate's own types -------------------------------------------------------

impl Error {
    /// The C ABI status code (`FEP_ERR_*` in include/fep_kernels.h).
    pub fn status(&self) -> i32 {
        match self {
            Error::InvalidArgument { .. } => FEP_ERR_INVALID_ARGUMENT,
            Error::NoDevice { .. } => FEP_ERR_NO_DEVICE,
            Error::Driver { .. } => FEP_ERR_DRIVER,
            Error::OutOfMemory { .. } => FEP_ERR_OUT_OF_MEMORY,
            Error::Unsupported(_) => FEP_ERR_UNSUPPORTED,
            Error::Diverged(_) => FEP_ERR_DIVERGED,
        }
    }
}

impl DeviceKind {
    /// The C ABI code (`FEP_DEVICE_*`).
    pub fn code(self) -> i32 {
        match self {
            DeviceKind::Cpu => FEP_DEVICE_CPU,
            DeviceKind::Cuda => FEP_DEVICE_CUDA,
            DeviceKind::Hip => FEP_DEVICE_HIP,
            #[cfg(feature = "emulate")]
            DeviceKind::Emulated => -1,
        }
    }
}

impl DType {
    /// The C ABI code (`FEP_DTYPE_*`).
    pub fn code(self) -> i32 {
        match self {
            DType::F32 => FEP_DTYPE_F32,
            DType::F16 => FEP_DTYPE_F16,
            DType::BF16 => FEP_DTYPE_BF16,
        }
    }
}

/// The device kind of a `FEP_DEVICE_*` code.
fn kind_from(code: i32) -> Result<DeviceKind> {
    match code {
        FEP_DEVICE_CPU | FEP_DEVICE_CPU_REFERENCE => Ok(DeviceKind::Cpu),
        FEP_DEVICE_CUDA => Ok(DeviceKind::Cuda),
        FEP_DEVICE_HIP => Ok(DeviceKind::Hip),
        other => Err(Error::invalid(
            "kind",
            format!("{other} is not FEP_DEVICE_CPU, _CUDA, _HIP or _CPU_REFERENCE"),
        )),
    }
}

/// Runs `$body` with `$t` the element type named by the `FEP_DTYPE_*` code `$dtype`.
macro_rules! with_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            $crate::ffi::FEP_DTYPE_F32 => {
                type $t = f32;
                $body
            }
            $crate::ffi::FEP_DTYPE_F16 => {
                type $t = ::half::f16;
                $body
            }
            $crate::ffi::FEP_DTYPE_BF16 => {
                type $t = ::half::bf16;
                $body
            }
            other => Err($crate::error::Error::invalid(
                "dtype",
                format!("{other} is not FEP_DTYPE_F32, _F16 or _BF16"),
            )),
        }
    };
}

// The op files come after `with_dtype!`, which they use (a macro's textual scope).
mod attention;
mod lca;
mod settle;
mod vmp;

pub use self::attention::*;
pub use self::lca::*;
pub use self::settle::*;
pub use self::vmp::*;

// ---- the last error and the panic guard -------------------------------------------------------

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `f`, turning an error or a panic into a status and a last-error message.
fn guard(f: impl FnOnce() -> Result<()>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => FEP_OK,
        Ok(Err(e)) => {
            set_last_error(e.to_string());
            e.status()
        }
        Err(panic) => {
            // A checked error carried by an unwind (raw_view's misaligned pointer).
            let panic = match panic.downcast::<Error>() {
                Ok(e) => {
                    set_last_error(e.to_string());
                    return e.status();
                }
                Err(other) => other,
            };
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            set_last_error(format!("internal error (a bug in fep-kernels): {what}"));
            FEP_ERR_INTERNAL
        }
    }
}

// ---- common argument checks -------------------------------------------------------------------

fn non_null<T>(name: &str, p: *const T) -> Result<()> {
    if p.is_null() {
        return Err(Error::invalid(name, "is NULL"));
    }
    Ok(())
}

fn usize_of(name: &str, v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::invalid(name, format!("{v} does not fit in memory")))
}

/// `a * b`, or an error naming `name` (the argument whose size is too large) when it overflows.
fn product(name: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| {
        Error::invalid(
            name,
            format!("is too large: {a} x {b} elements overflow the address space"),
        )
    })
}

/// A copy of the struct at `p`, or an error naming it when it is NULL or misaligned.
unsafe fn read_arg<T: Copy>(name: &str, p: *const T) -> Result<T> {
    non_null(name, p)?;
    aligned::<T>(name, p as u64)?;
    Ok(unsafe { *p })
}

/// Writes `value` through an optional out-pointer (NULL: skipped), checked aligned first.
unsafe fn write_out<T>(name: &str, p: *mut T, value: T) -> Result<()> {
    if !p.is_null() {
        aligned::<T>(name, p as u64)?;
        unsafe { p.write(value) };
    }
    Ok(())
}

/// `len` entries of a C array, or an error naming it when it is NULL.
unsafe fn slice_of<'a, T>(name: &str, p: *const T, len: usize) -> Result<&'a [T]> {
    non_null(name, p)?;
    addressable::<T>(name, p as u64, len)?;
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// `Err` unless `addr` is aligned for `T` (a misaligned `float*` is undefined behaviour in Rust,
/// and slower or faulting on a GPU).
fn aligned<T>(name: &str, addr: u64) -> Result<()> {
    let align = std::mem::align_of::<T>() as u64;
    if !addr.is_multiple_of(align) {
        return Err(Error::invalid(
            name,
            format!(
                "address {addr:#x} is not aligned to {align} bytes (its element type, {})",
                std::any::type_name::<T>()
            ),
        ));
    }
    Ok(())
}

/// `Err` unless `len` elements of `T` at `addr` can exist: aligned, and at most isize::MAX
/// bytes (no allocation is larger; a longer slice is undefined behaviour in Rust).
fn addressable<T>(name: &str, addr: u64, len: usize) -> Result<()> {
    aligned::<T>(name, addr)?;
    if len as u128 * std::mem::size_of::<T>() as u128 > isize::MAX as u128 {
        return Err(Error::invalid(
            name,
            format!(
                "{len} elements of {} cannot exist (more than isize::MAX bytes)",
                std::any::type_name::<T>()
            ),
        ));
    }
    Ok(())
}

/// A view of a caller's pointer, checked [`addressable`] for `T`. The views are made inside
/// closures and struct literals that cannot return early, so a bad pointer unwinds instead: with
/// `resume_unwind` (no panic hook, nothing printed) to the entry point's [`guard`], which returns
/// the [`Error`] carried as the payload (FEP_ERR_INVALID_ARGUMENT naming the argument).
///
/// # Safety
/// As [`View::from_raw`].
unsafe fn raw_view<'a, T: Pod>(dev: &Device, addr: u64, len: usize, name: &str) -> View<'a, T> {
    if let Err(e) = addressable::<T>(name, addr, len) {
        std::panic::resume_unwind(Box::new(e));
    }
    unsafe { View::from_raw(dev, addr, len) }
}

/// As [`raw_view`], writable.
///
/// # Safety
/// As [`ViewMut::from_raw`].
unsafe fn raw_view_mut<'a, T: Pod>(
    dev: &Device,
    addr: u64,
    len: usize,
    name: &str,
) -> ViewMut<'a, T> {
    if let Err(e) = addressable::<T>(name, addr, len) {
        std::panic::resume_unwind(Box::new(e));
    }
    unsafe { ViewMut::from_raw(dev, addr, len) }
}

/// The device of a `FEP_DEVICE_*` code and an ordinal (checked non-negative first).
fn open_device(kind: i32, ordinal: i32) -> Result<Device> {
    let ordinal = usize::try_from(ordinal)
        .map_err(|_| Error::invalid("ordinal", format!("{ordinal} is negative")))?;
    let device = Device::open(kind_from(kind)?, ordinal)?;
    Ok(match kind {
        FEP_DEVICE_CPU_REFERENCE => Device::reference(),
        _ => device,
    })
}

/// The caller's stream; NULL means the legacy default stream on a GPU.
fn raw_stream(stream: *mut c_void) -> Stream {
    unsafe { Stream::from_raw(stream) }
}

// ---- handles ----------------------------------------------------------------------------------

/// A handle type: a struct with a `magic: u64` field, set to `MAGIC` while the handle lives. Every entry point checks it, so a garbage pointer or a freed handle (whose
/// first word the allocator has reused, or which `free_handle` cleared) is an error instead of
/// undefined behaviour — as far as reading one word at that address is safe, which is the
/// documented contract of the header: a pointer that is not NULL must point at readable memory.
trait Tagged {
    const MAGIC: u64;
    /// The address of the magic field (no reference is made to the memory behind `handle`).
    fn magic(handle: *mut Self) -> *mut u64;
}

/// `Err` naming `name` unless `handle` is non-NULL, aligned, and carries `T::MAGIC`.
unsafe fn check_tag<T: Tagged>(name: &str, handle: *const T) -> Result<()> {
    non_null(name, handle)?;
    aligned::<T>(name, handle as u64)?;
    // Safety: the caller's contract (a non-NULL pointer points at readable memory).
    let magic = unsafe { std::ptr::read_volatile(T::magic(handle.cast_mut())) };
    if magic != T::MAGIC {
        return Err(Error::invalid(
            name,
            "is not a live handle (already freed, or not made by this library)",
        ));
    }
    Ok(())
}

/// Stores a new handle owning `value` at `*out` (`Err`, dropping `value`, when `out` is NULL or
/// misaligned).
unsafe fn new_handle<T: Tagged>(out: *mut *mut T, value: T) -> Result<()> {
    non_null("out", out)?;
    aligned::<*mut T>("out", out as u64)?;
    unsafe { *out = Box::into_raw(Box::new(value)) };
    Ok(())
}

/// Frees a handle made by [`new_handle`]; NULL is a no-op, a pointer that is not a live handle
/// (a double free, garbage) is left alone and recorded for [`fep_last_error`], and a panic
/// while dropping does not cross the boundary.
unsafe fn free_handle<T: Tagged>(name: &str, handle: *mut T) {
    if handle.is_null() {
        return;
    }
    if let Err(e) = unsafe { check_tag(name, handle) } {
        set_last_error(e.to_string());
        return;
    }
    // Cleared first: a second free of the same pointer finds no magic (until reused).
    unsafe { std::ptr::write_volatile(T::magic(handle), 0) };
    let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(handle) })));
}

/// The object behind a handle, or an error naming `name` (NULL, or not a live handle).
unsafe fn handle_ref<'a, T: Tagged>(name: &str, handle: *const T) -> Result<&'a T> {
    unsafe { check_tag(name, handle)? };
    Ok(unsafe { &*handle })
}

/// As [`handle_ref`], mutably.
unsafe fn handle_mut<'a, T: Tagged>(name: &str, handle: *mut T) -> Result<&'a mut T> {
    unsafe { check_tag(name, handle)? };
    Ok(unsafe { &mut *handle })
}

// ---- the library and its devices --------------------------------------------------------------

/// The library version, e.g. "0.1.0". Static storage, never NULL.
#[unsafe(no_mangle)]
pub extern "C" fn fep_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The ABI version this library implements (`FEP_ABI_VERSION` of its header).
#[unsafe(no_mangle)]
pub extern "C" fn fep_abi_version() -> i32 {
    FEP_ABI_VERSION
}

/// Sets the number of threads the CPU device uses: n >= 1 a pool of n threads of the library's
/// own, 0 rayon's global pool (the default; `RAYON_NUM_THREADS` or one per core). A call made
/// from inside a rayon pool runs on that pool. Results do not depend on the thread count.
#[unsafe(no_mangle)]
pub extern "C" fn fep_set_num_threads(n: i32) -> i32 {
    guard(|| {
        let n = usize::try_from(n)
            .map_err(|_| Error::invalid("threads", format!("{n} is negative")))?;
        crate::threads::set_num_threads(n)
    })
}

/// The number of threads a CPU call made here and now would use.
#[unsafe(no_mangle)]
pub extern "C" fn fep_num_threads() -> i32 {
    crate::threads::num_threads().min(i32::MAX as usize) as i32
}

/// The message of the last failed call on this thread ("" if none). Valid until the next call.
#[unsafe(no_mangle)]
pub extern "C" fn fep_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Number of devices of `kind` (>= 0); on error a negative status (-FEP_ERR_...). A build
/// without that vendor's feature, or a machine without its driver, has 0 devices of that kind.
#[unsafe(no_mangle)]
pub extern "C" fn fep_device_count(kind: i32) -> i32 {
    let mut count = 0;
    let status = guard(|| {
        count = Device::count(kind_from(kind)?) as i32;
        Ok(())
    });
    if status == FEP_OK { count } else { -status }
}

/// Writes the device's name into `buf`, NUL-terminated, truncated to fit `len` bytes (`len` >= 1).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_device_name(
    kind: i32,
    ordinal: i32,
    buf: *mut c_char,
    len: u64,
) -> i32 {
    guard(|| {
        non_null("buf", buf)?;
        let len = usize_of("len", len)?;
        addressable::<c_char>("buf", buf as u64, len)?;
        if len == 0 {
            return Err(Error::invalid(
                "len",
                "is 0: no room for the terminating NUL",
            ));
        }
        let name = open_device(kind, ordinal)?.name();
        let bytes = name.as_bytes();
        let n = bytes.len().min(len - 1);
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), n);
            *buf.add(n) = 0;
        }
        Ok(())
    })
}
