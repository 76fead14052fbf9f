//! The C ABI: `include/fep_kernels.h`, kept in step with this file by tests/ffi_header.rs.
//!
//! Every entry point validates its pointers and sizes, returns a status code, and records a
//! message for [`fep_last_error`] on failure. No panic crosses the boundary: one that escaped
//! the library would be a bug, and is reported as `FEP_ERR_INTERNAL`.

#![allow(missing_docs, clippy::missing_safety_doc)]

use std::cell::RefCell;
use std::ffi::{CString, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use half::{bf16, f16};

use crate::backend::{Device, DeviceKind, Stream, View, ViewMut};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::lca::{Dictionary, DictionaryOptions, LcaOutputs, LcaSpec, Threshold};

pub const FEP_ABI_VERSION: i32 = 1;

pub const FEP_OK: i32 = 0;
pub const FEP_ERR_INVALID_ARGUMENT: i32 = 1;
pub const FEP_ERR_NO_DEVICE: i32 = 2;
pub const FEP_ERR_DRIVER: i32 = 3;
pub const FEP_ERR_OUT_OF_MEMORY: i32 = 4;
pub const FEP_ERR_UNSUPPORTED: i32 = 5;
pub const FEP_ERR_INTERNAL: i32 = 6;

pub const FEP_DEVICE_CPU: i32 = 0;
pub const FEP_DEVICE_CUDA: i32 = 1;
pub const FEP_DEVICE_HIP: i32 = 2;

pub const FEP_DTYPE_F32: i32 = 0;
pub const FEP_DTYPE_F16: i32 = 1;
pub const FEP_DTYPE_BF16: i32 = 2;

pub const FEP_LCA_SOFT: i32 = 0;
pub const FEP_LCA_SOFT_NONNEG: i32 = 1;
pub const FEP_LCA_HARD: i32 = 2;
pub const FEP_LCA_HARD_NONNEG: i32 = 3;

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

fn kind_from(code: i32) -> Result<DeviceKind> {
    match code {
        FEP_DEVICE_CPU => Ok(DeviceKind::Cpu),
        FEP_DEVICE_CUDA => Ok(DeviceKind::Cuda),
        FEP_DEVICE_HIP => Ok(DeviceKind::Hip),
        other => Err(Error::invalid(
            "kind",
            format!("{other} is not FEP_DEVICE_CPU, _CUDA or _HIP"),
        )),
    }
}

fn non_null<T>(name: &str, p: *const T) -> Result<()> {
    if p.is_null() {
        return Err(Error::invalid(name, "is NULL"));
    }
    Ok(())
}

fn usize_of(name: &str, v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::invalid(name, format!("{v} does not fit in memory")))
}

fn product(name: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::invalid(name, format!("{a} * {b} overflows")))
}

/// Runs `f` with the element type named by `dtype`.
macro_rules! with_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            FEP_DTYPE_F32 => {
                type $t = f32;
                $body
            }
            FEP_DTYPE_F16 => {
                type $t = f16;
                $body
            }
            FEP_DTYPE_BF16 => {
                type $t = bf16;
                $body
            }
            other => Err(Error::invalid(
                "dtype",
                format!("{other} is not FEP_DTYPE_F32, _F16 or _BF16"),
            )),
        }
    };
}

#[unsafe(no_mangle)]
pub extern "C" fn fep_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

#[unsafe(no_mangle)]
pub extern "C" fn fep_abi_version() -> i32 {
    FEP_ABI_VERSION
}

#[unsafe(no_mangle)]
pub extern "C" fn fep_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

#[unsafe(no_mangle)]
pub extern "C" fn fep_device_count(kind: i32) -> i32 {
    let mut count = 0;
    let status = guard(|| {
        count = Device::count(kind_from(kind)?) as i32;
        Ok(())
    });
    if status == FEP_OK { count } else { -status }
}

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
        if len == 0 {
            return Err(Error::invalid(
                "len",
                "is 0: no room for the terminating NUL",
            ));
        }
        let ordinal = usize::try_from(ordinal)
            .map_err(|_| Error::invalid("ordinal", format!("{ordinal} is negative")))?;
        let name = Device::open(kind_from(kind)?, ordinal)?.name();
        let bytes = name.as_bytes();
        let n = bytes.len().min(len - 1);
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), n);
            *buf.add(n) = 0;
        }
        Ok(())
    })
}

/// The opaque `FepLcaDict` of the header.
pub struct FepLcaDict {
    dict: Dictionary,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepLcaParams {
    pub threshold: i32,
    pub lambda: f32,
    pub eta: f32,
    pub steps: u32,
    pub tol: f32,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_lca_dict_new(
    kind: i32,
    ordinal: i32,
    stream: *mut c_void,
    dtype: i32,
    phi: *const c_void,
    n: u64,
    m: u64,
    check_unit_norm: i32,
    out: *mut *mut FepLcaDict,
) -> i32 {
    guard(|| {
        non_null("out", out)?;
        non_null("phi", phi)?;
        let ordinal = usize::try_from(ordinal)
            .map_err(|_| Error::invalid("ordinal", format!("{ordinal} is negative")))?;
        let device = Device::open(kind_from(kind)?, ordinal)?;
        let (n, m) = (usize_of("n", n)?, usize_of("m", m)?);
        let len = product("phi", n, m)?;
        let opts = DictionaryOptions {
            check_unit_norm: check_unit_norm != 0,
        };
        let stream = raw_stream(stream);
        let dict = with_dtype!(dtype, T => {
            let view = unsafe { View::<T>::from_raw(&device, phi as u64, len) };
            Dictionary::new_on(&view, n, m, opts, stream)
        })?;
        unsafe { *out = Box::into_raw(Box::new(FepLcaDict { dict })) };
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_lca_dict_free(dict: *mut FepLcaDict) {
    if !dict.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(dict) })));
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_lca_dict_shape(
    dict: *const FepLcaDict,
    n: *mut u64,
    m: *mut u64,
) -> i32 {
    guard(|| {
        non_null("dict", dict)?;
        let d = unsafe { &(*dict).dict };
        unsafe {
            if !n.is_null() {
                *n = d.n() as u64;
            }
            if !m.is_null() {
                *m = d.m() as u64;
            }
        }
        Ok(())
    })
}

/// The caller's stream; NULL means the legacy default stream on a GPU.
fn raw_stream(stream: *mut c_void) -> Stream {
    unsafe { Stream::from_raw(stream) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_lca_dict_phi(
    dict: *const FepLcaDict,
    stream: *mut c_void,
    phi_out: *mut f32,
) -> i32 {
    guard(|| {
        non_null("dict", dict)?;
        non_null("phi_out", phi_out)?;
        let d = unsafe { &(*dict).dict };
        let mut out =
            unsafe { ViewMut::<f32>::from_raw(d.device(), phi_out as u64, d.n() * d.m()) };
        d.phi_into(&mut out, raw_stream(stream))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_lca_solve(
    dict: *const FepLcaDict,
    stream: *mut c_void,
    dtype: i32,
    x: *const c_void,
    batch: u64,
    params: *const FepLcaParams,
    u0: *const f32,
    u_out: *mut f32,
    a_out: *mut f32,
    energy_out: *mut f32,
    active_out: *mut u32,
    steps_out: *mut u32,
) -> i32 {
    guard(|| {
        non_null("dict", dict)?;
        non_null("params", params)?;
        non_null("x", x)?;
        non_null("u_out", u_out)?;
        non_null("a_out", a_out)?;
        let d = unsafe { &(*dict).dict };
        let p = unsafe { *params };
        let spec = LcaSpec {
            threshold: Threshold::from_code(p.threshold)?,
            lambda: p.lambda,
            eta: p.eta,
            steps: p.steps,
            tol: p.tol,
            trace: !energy_out.is_null() || !active_out.is_null(),
            check_finite: true,
        };
        let batch = usize_of("batch", batch)?;
        let dev = d.device();
        let bm = product("batch", batch, d.m())?;
        let bt = product("batch", batch, p.steps as usize)?;
        // Views of the caller's memory; lengths follow from batch, n, m and steps.
        unsafe {
            let u0 = (!u0.is_null()).then(|| View::<f32>::from_raw(dev, u0 as u64, bm));
            let out = LcaOutputs {
                u: ViewMut::from_raw(dev, u_out as u64, bm),
                a: ViewMut::from_raw(dev, a_out as u64, bm),
                energy: (!energy_out.is_null())
                    .then(|| ViewMut::from_raw(dev, energy_out as u64, bt)),
                active: (!active_out.is_null())
                    .then(|| ViewMut::from_raw(dev, active_out as u64, bt)),
                steps: (!steps_out.is_null())
                    .then(|| ViewMut::from_raw(dev, steps_out as u64, batch)),
            };
            let n = d.n();
            with_dtype!(dtype, T => solve_typed::<T>(d, &spec, x, product("batch", batch, n)?, u0.as_ref(), out, raw_stream(stream)))
        }
    })
}

unsafe fn solve_typed<T: Element>(
    d: &Dictionary,
    spec: &LcaSpec,
    x: *const c_void,
    len: usize,
    u0: Option<&View<'_, f32>>,
    out: LcaOutputs<'_>,
    stream: Stream,
) -> Result<()> {
    let x = unsafe { View::<T>::from_raw(d.device(), x as u64, len) };
    d.solve_into(spec, &x, u0, out, stream)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_lca_dict_learn(
    dict: *mut FepLcaDict,
    stream: *mut c_void,
    dtype: i32,
    x: *const c_void,
    a: *const f32,
    batch: u64,
    lr: f32,
) -> i32 {
    guard(|| {
        non_null("dict", dict)?;
        non_null("x", x)?;
        non_null("a", a)?;
        let d = unsafe { &mut (*dict).dict };
        let batch = usize_of("batch", batch)?;
        let dev = d.device().clone();
        let a = unsafe { View::<f32>::from_raw(&dev, a as u64, product("batch", batch, d.m())?) };
        let len = product("batch", batch, d.n())?;
        let stream = raw_stream(stream);
        with_dtype!(dtype, T => {
            let x = unsafe { View::<T>::from_raw(&dev, x as u64, len) };
            d.learn(&x, &a, lr, stream)
        })
    })
}
