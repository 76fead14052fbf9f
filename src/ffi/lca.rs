//! The C ABI of LCA sparse coding: the `FEP_LCA_*` thresholds, `FepLcaParams`, the opaque
//! `FepLcaDict` handle and the `fep_lca_*` entry points.

use std::ffi::c_void;

use super::{
    Tagged, aligned, free_handle, guard, handle_mut, handle_ref, new_handle, non_null, open_device,
    product, raw_stream, raw_view, raw_view_mut, read_arg, usize_of, write_out,
};
use crate::backend::{Stream, View};
use crate::element::Element;
use crate::error::Result;
use crate::lca::{Dictionary, DictionaryOptions, LcaOutputs, LcaSpec, Threshold, TolMode};

/// LCA threshold (`FepLcaParams.threshold`): soft, a = sign(u) max(|u| - lambda, 0).
pub const FEP_LCA_SOFT: i32 = 0;
/// LCA threshold: soft and non-negative, a = max(u - lambda, 0).
pub const FEP_LCA_SOFT_NONNEG: i32 = 1;
/// LCA threshold: hard, a = u where |u| > lambda, else 0.
pub const FEP_LCA_HARD: i32 = 2;
/// LCA threshold: hard and non-negative, a = u where u > lambda, else 0.
pub const FEP_LCA_HARD_NONNEG: i32 = 3;

/// LCA early stop (`FepLcaParams.tol_mode`): stop a sample when max |du| < tol.
pub const FEP_LCA_TOL_ABSOLUTE: i32 = 0;
/// LCA early stop: stop a sample when max |du| < tol * max |b|, b = Phi^T x of that sample
/// (relative to the input's scale; a sample with b = 0 stops when du is exactly 0).
pub const FEP_LCA_TOL_RELATIVE: i32 = 1;

/// LCA sparse coding (the maths: the Rust crate's `lca` module docs): a prepared dictionary,
/// Phi (n x m, row-major, unit-norm columns) in f32 and G = Phi^T Phi - I, stored on one device. Made by
/// fep_lca_dict_new, freed by fep_lca_dict_free.
pub struct FepLcaDict {
    magic: u64,
    dict: Dictionary,
}

impl Tagged for FepLcaDict {
    const MAGIC: u64 = u64::from_le_bytes(*b"fepLCAd1");
    fn magic(handle: *mut Self) -> *mut u64 {
        unsafe { &raw mut (*handle).magic }
    }
}

/// The parameters of an LCA solve (fep_lca_solve).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepLcaParams {
    /// FEP_LCA_*.
    pub threshold: i32,
    /// lambda > 0.
    pub lambda: f32,
    /// dt / tau, in (0, 1]; or 0 for the automatic step 1 / lambda_max(Phi^T Phi) of the
    /// dictionary (fep_lca_dict_lambda_max; computed once per dictionary, on first use).
    pub eta: f32,
    /// T >= 1.
    pub steps: u32,
    /// Early stop when max |du| < tol for a sample (see tol_mode); 0 disables.
    pub tol: f32,
    /// FEP_LCA_TOL_ABSOLUTE (0) or FEP_LCA_TOL_RELATIVE (1): tol absolute, or relative to the
    /// sample's max |Phi^T x|.
    pub tol_mode: i32,
    /// Nonzero allows (does not require) TF32 tensor cores for f32 products, as PyTorch's
    /// allow_tf32. Reserved: no LCA kernel uses tensor cores, so it changes nothing today;
    /// results are accurate f32 (FMA, f32 accumulation) either way.
    pub allow_tf32: i32,
}

/// Copies `phi` (dtype, n x m row-major, on the device) into a new prepared dictionary, stored
/// at `*out`. check_unit_norm != 0 rejects columns whose norm differs from 1 by more than the
/// dtype allows.
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
        aligned::<*mut u8>("out", out as u64)?;
        non_null("phi", phi)?;
        let device = open_device(kind, ordinal)?;
        let (n, m) = (usize_of("n", n)?, usize_of("m", m)?);
        let len = product("phi", n, m)?;
        let opts = DictionaryOptions {
            check_unit_norm: check_unit_norm != 0,
        };
        let stream = raw_stream(stream);
        let dict = with_dtype!(dtype, T => {
            let view = unsafe { raw_view::<T>(&device, phi as u64, len, "phi") };
            Dictionary::new_on(&view, n, m, opts, stream)
        })?;
        unsafe {
            new_handle(
                out,
                FepLcaDict {
                    magic: FepLcaDict::MAGIC,
                    dict,
                },
            )
        }
    })
}

/// Frees a dictionary (NULL is a no-op). A pointer that is not a live dictionary (freed
/// already, or garbage pointing at readable memory) is detected where cheap by a tag in the
/// handle, left alone, and reported by fep_last_error; every call taking a handle checks the
/// same tag and returns FEP_ERR_INVALID_ARGUMENT.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_lca_dict_free(dict: *mut FepLcaDict) {
    unsafe { free_handle("dict", dict) }
}

/// Writes the dictionary's shape (`n` or `m` may be NULL).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_lca_dict_shape(
    dict: *const FepLcaDict,
    n: *mut u64,
    m: *mut u64,
) -> i32 {
    guard(|| {
        let d = unsafe { &handle_ref("dict", dict)?.dict };
        // Both checked before either is written.
        aligned::<u64>("n", n as u64)?;
        aligned::<u64>("m", m as u64)?;
        unsafe {
            write_out("n", n, d.n() as u64)?;
            write_out("m", m, d.m() as u64)
        }
    })
}

/// Writes lambda_max(Phi^T Phi), the largest eigenvalue of the dictionary's Gram matrix, to
/// `*out` (f64): power iteration in f64 on the host from a fixed start vector (at most 1000
/// iterations, until the Rayleigh quotient changes by less than 1e-9 relatively), computed
/// once per dictionary on first use and again after fep_lca_dict_learn. On a GPU the first
/// call copies Phi to the host (it waits for the device). The automatic step (eta = 0 in
/// FepLcaParams) is min(1, 1 / lambda_max).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_lca_dict_lambda_max(dict: *const FepLcaDict, out: *mut f64) -> i32 {
    guard(|| {
        let d = unsafe { &handle_ref("dict", dict)?.dict };
        non_null("out", out)?;
        aligned::<f64>("out", out as u64)?;
        let v = d.lambda_max()?;
        unsafe { write_out("out", out, v) }
    })
}

/// Copies Phi (f32, n x m) into `phi_out` on the dictionary's device.
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
            unsafe { raw_view_mut::<f32>(d.device(), phi_out as u64, d.n() * d.m(), "phi_out") };
        d.phi_into(&mut out, raw_stream(stream))
    })
}

/// Runs LCA on `batch` samples x (dtype, batch x n). u0 (batch x m f32) may be NULL (u starts
/// at 0). Writes u and a (batch x m f32). Optional outputs (NULL to skip): energy and active
/// (batch x steps, f32 and uint32: per sample per step, after the step's update; a sample that
/// stopped early repeats its last values), steps_out (batch, uint32: the steps each sample ran).
/// Outputs may not overlap each other or x; u0 may be u_out itself (warm start in place) but
/// may not overlap it otherwise.
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
        let p = unsafe { read_arg("params", params)? };
        non_null("x", x)?;
        non_null("u_out", u_out)?;
        non_null("a_out", a_out)?;
        let spec = LcaSpec {
            threshold: Threshold::from_code(p.threshold)?,
            lambda: p.lambda,
            eta: p.eta,
            steps: p.steps,
            tol: p.tol,
            tol_mode: TolMode::from_code(p.tol_mode)?,
            allow_tf32: p.allow_tf32 != 0,
            trace: !energy_out.is_null() || !active_out.is_null(),
            check_finite: true,
        };
        let batch = usize_of("batch", batch)?;
        let dev = d.device();
        let bm = product("batch", batch, d.m())?;
        let bt = product("batch", batch, p.steps as usize)?;
        // Views of the caller's memory; lengths follow from batch, n, m and steps.
        unsafe {
            let u0 = (!u0.is_null()).then(|| raw_view::<f32>(dev, u0 as u64, bm, "u0"));
            let out = LcaOutputs {
                u: raw_view_mut(dev, u_out as u64, bm, "u_out"),
                a: raw_view_mut(dev, a_out as u64, bm, "a_out"),
                energy: (!energy_out.is_null())
                    .then(|| raw_view_mut(dev, energy_out as u64, bt, "energy_out")),
                active: (!active_out.is_null())
                    .then(|| raw_view_mut(dev, active_out as u64, bt, "active_out")),
                steps: (!steps_out.is_null())
                    .then(|| raw_view_mut(dev, steps_out as u64, batch, "steps_out")),
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
    let x = unsafe { raw_view::<T>(d.device(), x as u64, len, "x") };
    d.solve_into(spec, &x, u0, out, stream)
}

/// One dictionary-learning step: Phi += (lr / batch) * sum_b (x_b - Phi a_b) a_b^T, then every
/// column renormalised to unit norm and G recomputed. x: dtype, batch x n; a: f32, batch x m.
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
        non_null("x", x)?;
        non_null("a", a)?;
        let d = unsafe { &mut handle_mut("dict", dict)?.dict };
        let batch = usize_of("batch", batch)?;
        let dev = d.device().clone();
        let a_len = product("batch", batch, d.m())?;
        let a = unsafe { raw_view::<f32>(&dev, a as u64, a_len, "a") };
        let len = product("batch", batch, d.n())?;
        let stream = raw_stream(stream);
        with_dtype!(dtype, T => {
            let x = unsafe { raw_view::<T>(&dev, x as u64, len, "x") };
            d.learn(&x, &a, lr, stream)
        })
    })
}
