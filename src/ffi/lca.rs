//! The C ABI of LCA sparse coding: the `FEP_LCA_*` thresholds, `FepLcaParams`, the opaque
//! `FepLcaDict` handle and the `fep_lca_*` entry points.

use std::ffi::c_void;

use super::{
    free_handle, guard, handle_ref, new_handle, non_null, open_device, product, raw_stream,
    usize_of,
};
use crate::backend::{Stream, View, ViewMut};
use crate::element::Element;
use crate::error::Result;
use crate::lca::{Dictionary, DictionaryOptions, LcaOutputs, LcaSpec, Threshold};

pub const FEP_LCA_SOFT: i32 = 0;
pub const FEP_LCA_SOFT_NONNEG: i32 = 1;
pub const FEP_LCA_HARD: i32 = 2;
pub const FEP_LCA_HARD_NONNEG: i32 = 3;

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
        let device = open_device(kind, ordinal)?;
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
        unsafe { new_handle(out, FepLcaDict { dict }) };
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_lca_dict_free(dict: *mut FepLcaDict) {
    unsafe { free_handle(dict) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_lca_dict_shape(
    dict: *const FepLcaDict,
    n: *mut u64,
    m: *mut u64,
) -> i32 {
    guard(|| {
        let d = unsafe { &handle_ref("dict", dict)?.dict };
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

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_lca_dict_phi(
    dict: *const FepLcaDict,
    stream: *mut c_void,
    phi_out: *mut f32,
) -> i32 {
    guard(|| {
        let d = unsafe { &handle_ref("dict", dict)?.dict };
        non_null("phi_out", phi_out)?;
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
        let d = unsafe { &handle_ref("dict", dict)?.dict };
        non_null("params", params)?;
        non_null("x", x)?;
        non_null("u_out", u_out)?;
        non_null("a_out", a_out)?;
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
