//! The C ABI of precision-weighted attention: the `FEP_SCORE_*` codes, the `FepAttnTensor`
//! description and `FepAttentionParams`, and `fep_attention_forward` / `_backward` / `_merge`.

use std::ffi::c_void;

use super::{guard, non_null, open_device, product, raw_stream, usize_of};
use crate::attention::{
    self, AttentionOutputs, AttentionSpec, BackwardInputs, Gradients, MergeParts, Precisions,
    Score, Tensor4, Tensor4Mut,
};
use crate::backend::{Device, View, ViewMut};
use crate::element::Element;
use crate::error::{Error, Result};

pub const FEP_SCORE_DOT: i32 = 0;
pub const FEP_SCORE_GAUSSIAN: i32 = 1;
pub const FEP_SCORE_STUDENT_T: i32 = 2;
pub const FEP_SCORE_LAPLACE: i32 = 3;

/// A `[B, H, L, D]` tensor: element strides of B, H and L, the last dimension contiguous.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepAttnTensor {
    pub data: *mut c_void,
    pub shape: [u64; 4],
    pub strides: [u64; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepAttentionParams {
    pub score: i32,
    pub nu: f32,
    pub scale: f64,
    pub causal: i32,
    pub window: i32,
    pub normalizer: i32,
    pub skip_input_checks: i32,
}

fn attention_spec(p: &FepAttentionParams) -> Result<AttentionSpec> {
    let score = match p.score {
        FEP_SCORE_DOT => Score::Dot,
        FEP_SCORE_GAUSSIAN => Score::Gaussian,
        FEP_SCORE_STUDENT_T => {
            if !(p.nu.is_finite() && p.nu > 0.0) {
                return Err(Error::invalid(
                    "params.nu",
                    format!(
                        "must be finite and > 0 for FEP_SCORE_STUDENT_T, got {}",
                        p.nu
                    ),
                ));
            }
            Score::StudentT(p.nu)
        }
        FEP_SCORE_LAPLACE => Score::Laplace,
        other => {
            return Err(Error::invalid(
                "params.score",
                format!("{other} is not FEP_SCORE_DOT, _GAUSSIAN, _STUDENT_T or _LAPLACE"),
            ));
        }
    };
    let mut spec = AttentionSpec::new(score)
        .causal(p.causal != 0)
        .normalizer(p.normalizer != 0)
        .check_inputs(p.skip_input_checks == 0);
    // <= 0 or NaN: the default τ; +∞ is an error.
    if p.scale > 0.0 {
        if !p.scale.is_finite() {
            return Err(Error::invalid(
                "params.scale",
                format!(
                    "must be finite (or <= 0 / NaN for the default), got {}",
                    p.scale
                ),
            ));
        }
        spec = spec.scale(p.scale);
    }
    match p.window {
        0 => {}
        w if w > 0 => spec = spec.window(w as u32),
        w => {
            return Err(Error::invalid(
                "params.window",
                format!("must be >= 0 (0: no window), got {w}"),
            ));
        }
    }
    Ok(spec)
}

/// A checked C tensor description: shape, strides and the number of elements it addresses.
struct AttnDesc {
    data: *mut c_void,
    shape: [usize; 4],
    strides: [usize; 3],
    extent: usize,
}

unsafe fn attn_desc(name: &str, t: *const FepAttnTensor) -> Result<AttnDesc> {
    non_null(name, t)?;
    let t = unsafe { *t };
    non_null(&format!("{name}.data"), t.data)?;
    let mut shape = [0usize; 4];
    for (i, &s) in t.shape.iter().enumerate() {
        shape[i] = usize_of(&format!("{name}.shape"), s)?;
    }
    let mut strides = [0usize; 3];
    for (i, &s) in t.strides.iter().enumerate() {
        strides[i] = usize_of(&format!("{name}.strides"), s)?;
    }
    // The largest element offset + 1 (0 for an empty tensor: the Rust API names the zero
    // dimension).
    let extent = if shape.contains(&0) {
        0
    } else {
        let overflow = || {
            Error::invalid(
                format!("{name}.strides"),
                format!("shape {shape:?} with strides {strides:?} overflows the address space"),
            )
        };
        let mut e = shape[3];
        for i in 0..3 {
            e = (shape[i] - 1)
                .checked_mul(strides[i])
                .and_then(|x| x.checked_add(e))
                .ok_or_else(overflow)?;
        }
        e.checked_mul(8).ok_or_else(overflow)?;
        e
    };
    Ok(AttnDesc {
        data: t.data,
        shape,
        strides,
        extent,
    })
}

impl AttnDesc {
    unsafe fn view<'a, T: Element>(&self, dev: &Device) -> Tensor4<'a, T> {
        Tensor4 {
            data: unsafe { View::from_raw(dev, self.data as u64, self.extent) },
            shape: self.shape,
            strides: self.strides,
        }
    }

    unsafe fn view_mut<'a, T: Element>(&self, dev: &Device) -> Tensor4Mut<'a, T> {
        Tensor4Mut {
            data: unsafe { ViewMut::from_raw(dev, self.data as u64, self.extent) },
            shape: self.shape,
            strides: self.strides,
        }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_attention_forward(
    kind: i32,
    ordinal: i32,
    stream: *mut c_void,
    params: *const FepAttentionParams,
    dtype: i32,
    q: *const FepAttnTensor,
    k: *const FepAttnTensor,
    v: *const FepAttnTensor,
    pi_head: *const f32,
    pi_key: *const f32,
    kv_len: *const i32,
    o: *const FepAttnTensor,
    lse: *mut f32,
    e: *mut f32,
) -> i32 {
    guard(|| {
        non_null("params", params)?;
        let spec = attention_spec(unsafe { &*params })?;
        let (q, k, v, o) = unsafe {
            (
                attn_desc("q", q)?,
                attn_desc("k", k)?,
                attn_desc("v", v)?,
                attn_desc("o", o)?,
            )
        };
        let dev = open_device(kind, ordinal)?;
        let [b, hq, lq, _] = q.shape;
        let [_, hkv, lk, _] = k.shape;
        // Lengths follow from q's and k's shapes (the Rust API checks that the shapes agree).
        let rows = product("q.shape", product("q.shape", b, hq)?, lq)?;
        let keys = product("k.shape", product("k.shape", b, hkv)?, lk)?;
        let dev = &dev;
        let precision = unsafe {
            Precisions {
                head: (!pi_head.is_null()).then(|| View::from_raw(dev, pi_head as u64, hq)),
                key: (!pi_key.is_null()).then(|| View::from_raw(dev, pi_key as u64, keys)),
            }
        };
        let kv_len = (!kv_len.is_null()).then(|| unsafe { View::from_raw(dev, kv_len as u64, b) });
        let (lse, e) = unsafe {
            (
                (!lse.is_null()).then(|| ViewMut::from_raw(dev, lse as u64, rows)),
                (!e.is_null()).then(|| ViewMut::from_raw(dev, e as u64, rows)),
            )
        };
        let stream = raw_stream(stream);
        with_dtype!(dtype, T => unsafe {
            let (q, k, v) = (q.view::<T>(dev), k.view::<T>(dev), v.view::<T>(dev));
            let out = AttentionOutputs {
                o: o.view_mut::<T>(dev),
                lse,
                e,
            };
            attention::forward_into(&spec, &q, &k, &v, &precision, kv_len.as_ref(), out, stream)
        })
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_attention_backward(
    kind: i32,
    ordinal: i32,
    stream: *mut c_void,
    params: *const FepAttentionParams,
    dtype: i32,
    q: *const FepAttnTensor,
    k: *const FepAttnTensor,
    v: *const FepAttnTensor,
    pi_head: *const f32,
    pi_key: *const f32,
    kv_len: *const i32,
    o: *const FepAttnTensor,
    lse: *const f32,
    d_o: *const FepAttnTensor,
    e: *const f32,
    d_e: *const f32,
    dq: *const FepAttnTensor,
    dk: *const FepAttnTensor,
    dv: *const FepAttnTensor,
    dpi_head: *mut f32,
    dpi_key: *mut f32,
    dnu: *mut f32,
) -> i32 {
    guard(|| {
        non_null("params", params)?;
        let spec = attention_spec(unsafe { &*params })?;
        let (q, k, v, o, d_o, dq, dk, dv) = unsafe {
            (
                attn_desc("q", q)?,
                attn_desc("k", k)?,
                attn_desc("v", v)?,
                attn_desc("o", o)?,
                attn_desc("d_o", d_o)?,
                attn_desc("dq", dq)?,
                attn_desc("dk", dk)?,
                attn_desc("dv", dv)?,
            )
        };
        non_null("lse", lse)?;
        let dev = open_device(kind, ordinal)?;
        let [b, hq, lq, _] = q.shape;
        let [_, hkv, lk, _] = k.shape;
        // Lengths follow from q's and k's shapes (the Rust API checks that the shapes agree).
        let rows = product("q.shape", product("q.shape", b, hq)?, lq)?;
        let keys = product("k.shape", product("k.shape", b, hkv)?, lk)?;
        let dev = &dev;
        let opt = |p: *const f32, len: usize| {
            (!p.is_null()).then(|| unsafe { View::<f32>::from_raw(dev, p as u64, len) })
        };
        let opt_mut = |p: *mut f32, len: usize| {
            (!p.is_null()).then(|| unsafe { ViewMut::<f32>::from_raw(dev, p as u64, len) })
        };
        let precision = Precisions {
            head: opt(pi_head, hq),
            key: opt(pi_key, keys),
        };
        let kv_len = (!kv_len.is_null()).then(|| unsafe { View::from_raw(dev, kv_len as u64, b) });
        let lse = unsafe { View::from_raw(dev, lse as u64, rows) };
        let (e, d_e) = (opt(e, rows), opt(d_e, rows));
        let (dpi_head, dpi_key, dnu) = (
            opt_mut(dpi_head, hq),
            opt_mut(dpi_key, keys),
            opt_mut(dnu, 1),
        );
        let stream = raw_stream(stream);
        with_dtype!(dtype, T => unsafe {
            let (q, k, v) = (q.view::<T>(dev), k.view::<T>(dev), v.view::<T>(dev));
            let inputs = BackwardInputs {
                o: o.view::<T>(dev),
                lse,
                d_o: d_o.view::<T>(dev),
                e,
                d_e,
            };
            let out = Gradients {
                dq: dq.view_mut::<T>(dev),
                dk: dk.view_mut::<T>(dev),
                dv: dv.view_mut::<T>(dev),
                dpi_head,
                dpi_key,
                dnu,
            };
            attention::backward_into(
                &spec,
                &q,
                &k,
                &v,
                &precision,
                kv_len.as_ref(),
                &inputs,
                out,
                stream,
            )
        })
    })
}

/// The Rust API's names of the merge's parts are the C arguments' names.
fn merge_names(err: Error) -> Error {
    let c_names = |s: &str| {
        s.replace("o parts", "o_parts")
            .replace("lse parts", "lse_parts")
            .replace("e parts", "e_parts")
            .replace("MergeParts::e", "e_parts")
    };
    match err {
        Error::InvalidArgument { name, reason } => Error::InvalidArgument {
            name: c_names(&name),
            reason: c_names(&reason),
        },
        other => other,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_attention_merge(
    kind: i32,
    ordinal: i32,
    stream: *mut c_void,
    dtype: i32,
    splits: u64,
    o_parts: *const c_void,
    lse_parts: *const f32,
    e_parts: *const f32,
    o: *const FepAttnTensor,
    lse: *mut f32,
    e: *mut f32,
) -> i32 {
    guard(|| {
        let o = unsafe { attn_desc("o", o)? };
        non_null("o_parts", o_parts)?;
        non_null("lse_parts", lse_parts)?;
        let s = usize_of("splits", splits)?;
        if o.shape.contains(&0) {
            return Err(Error::invalid(
                "o.shape",
                format!("{:?} has a zero dimension", o.shape),
            ));
        }
        if !e.is_null() && e_parts.is_null() {
            return Err(Error::invalid(
                "e",
                "an e output needs e_parts (which is NULL)",
            ));
        }
        let dev = open_device(kind, ordinal)?;
        let dev = &dev;
        let [b, hq, lq, dv] = o.shape;
        let rows = product("o.shape", product("o.shape", b, hq)?, lq)?;
        let part_rows = product("splits", s, rows)?;
        let part_len = product("splits", part_rows, dv)?;
        let lse_parts = unsafe { View::<f32>::from_raw(dev, lse_parts as u64, part_rows) };
        let e_parts = (!e_parts.is_null())
            .then(|| unsafe { View::<f32>::from_raw(dev, e_parts as u64, part_rows) });
        let (lse, e) = unsafe {
            (
                (!lse.is_null()).then(|| ViewMut::from_raw(dev, lse as u64, rows)),
                (!e.is_null()).then(|| ViewMut::from_raw(dev, e as u64, rows)),
            )
        };
        let stream = raw_stream(stream);
        with_dtype!(dtype, T => unsafe {
            let parts = MergeParts {
                o: View::<T>::from_raw(dev, o_parts as u64, part_len),
                lse: lse_parts,
                e: e_parts,
                splits: s,
                shape: o.shape,
            };
            let out = AttentionOutputs {
                o: o.view_mut::<T>(dev),
                lse,
                e,
            };
            attention::merge_into(&parts, out, stream).map_err(merge_names)
        })
    })
}
