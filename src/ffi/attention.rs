//! The C ABI of precision-weighted attention: the `FEP_SCORE_*` codes, the `FepAttnTensor`
//! description and `FepAttentionParams`, and `fep_attention_forward` / `_backward` / `_merge`.

use std::ffi::c_void;

use super::{
    guard, non_null, open_device, product, raw_stream, raw_view, raw_view_mut, read_arg, usize_of,
};
use crate::attention::{
    self, AttentionOutputs, AttentionSpec, BackwardInputs, Gradients, MergeParts, Precisions,
    Score, Tensor4, Tensor4Mut,
};
use crate::backend::Device;
use crate::element::Element;
use crate::error::{Error, Result};

/// Attention score family (`FepAttentionParams.score`; the maths: the Rust crate's `attention`
/// module docs; d2 = |q_i - k_j|^2, pi = pi_h pi_j, tau the scale): s = tau pi q.k.
pub const FEP_SCORE_DOT: i32 = 0;
/// Attention score family: s = -1/2 tau pi d2.
pub const FEP_SCORE_GAUSSIAN: i32 = 1;
/// Attention score family: s = -((nu + D)/2) ln(1 + tau pi d2 / nu).
pub const FEP_SCORE_STUDENT_T: i32 = 2;
/// Attention score family: s = -sqrt(tau pi d2).
pub const FEP_SCORE_LAPLACE: i32 = 3;

/// Precision-weighted attention (the maths: the Rust crate's `attention` module docs): a
/// [B, H, L, D] tensor on the call's device.
/// Element (b, h, l, x) is at `data + b strides[0] + h strides[1] + l strides[2] + x`
/// elements (the last dimension is contiguous). Row-major BHLD: strides {H L D, L D, D}; row-major BLHD
/// memory (FlashAttention's layout) seen as BHLD: {L H D, D, H D}. Rows of D elements may not
/// overlap.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepAttnTensor {
    /// The element at (0, 0, 0, 0).
    pub data: *mut c_void,
    /// B, H, L, D (in this order whatever the memory layout).
    pub shape: [u64; 4],
    /// Element strides of B, H and L.
    pub strides: [u64; 3],
}

/// The parameters of the attention calls (fep_attention_forward, fep_attention_backward).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepAttentionParams {
    /// FEP_SCORE_DOT, _GAUSSIAN, _STUDENT_T or _LAPLACE.
    pub score: i32,
    /// FEP_SCORE_STUDENT_T: degrees of freedom, finite and > 0 (else unused).
    pub nu: f32,
    /// tau; <= 0 or NaN: the default (1/sqrt(D) for DOT, 1 otherwise).
    pub scale: f64,
    /// != 0: keys j > i + Lk - Lq are masked (bottom-right aligned).
    pub causal: i32,
    /// W >= 1: only keys i + Lk - Lq - W < j <= i + Lk - Lq are visible (implies causal); 0: no
    /// window.
    pub window: i32,
    /// != 0: add (D/2) ln pi to the distance families' scores (not DOT).
    pub normalizer: i32,
    /// 0: on a GPU, scan pi_head, pi_key (finite, > 0) and kv_len (in 0 .. Lk) first, which
    /// reads back one word (the call waits for the stream); 1: skip the scan and return without
    /// synchronising. The CPU always checks.
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
    name: String,
    data: *mut c_void,
    shape: [usize; 4],
    strides: [usize; 3],
    extent: usize,
}

unsafe fn attn_desc(name: &str, t: *const FepAttnTensor) -> Result<AttnDesc> {
    let t = unsafe { read_arg(name, t)? };
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
        name: format!("{name}.data"),
        data: t.data,
        shape,
        strides,
        extent,
    })
}

impl AttnDesc {
    unsafe fn view<'a, T: Element>(&self, dev: &Device) -> Tensor4<'a, T> {
        Tensor4 {
            data: unsafe { raw_view(dev, self.data as u64, self.extent, &self.name) },
            shape: self.shape,
            strides: self.strides,
        }
    }

    unsafe fn view_mut<'a, T: Element>(&self, dev: &Device) -> Tensor4Mut<'a, T> {
        Tensor4Mut {
            data: unsafe { raw_view_mut(dev, self.data as u64, self.extent, &self.name) },
            shape: self.shape,
            strides: self.strides,
        }
    }
}

/// The optional per-score inputs of fep_attention_forward2 / _backward2 / _probabilities (the
/// whole struct may be NULL: none of them). Every pointer is on the call's device, NULL when
/// absent.
/// - nu_head `[Hq]` float: Student-t's nu per query head (finite, > 0), replacing params.nu;
///   only with FEP_SCORE_STUDENT_T.
/// - bias: float beta added to every score s_ij after the family's; bias_shape is
///   {B or 1, Hq or 1, Lq or 1, Lk} (a dimension of 1 is broadcast), bias_strides the element
///   strides of its first three dimensions (Lk contiguous). Finite or -inf (-inf masks).
/// - mask: uint8 (nonzero: keep, 0: masked; PyTorch's boolean attn_mask), mask_shape and
///   mask_strides as the bias's.
/// - cu_seqlens_q, cu_seqlens_k `[num_seqs + 1]` int32: packed variable-length sequences
///   (FlashAttention's varlen convention). Then q, k, v (and o, dq, ...) have B = 1 and L = the
///   packed length (memory [total, H, D]: strides {0, D, H D}); sequence s holds query rows
///   `cu_seqlens_q[s] .. cu_seqlens_q[s+1]` and key rows `cu_seqlens_k[s] .. cu_seqlens_k[s+1]`
///   and attends only within itself (causal and window per sequence); lse, e are [Hq, total_q] and
///   pi_key [Hkv, total_k]. max_seqlen_q / _k bound every length. Not with kv_len, bias or mask.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepAttnScoreInputs {
    /// `[Hq]` or NULL.
    pub nu_head: *const f32,
    /// The additive bias or NULL.
    pub bias: *const f32,
    /// {B | 1, Hq | 1, Lq | 1, Lk}.
    pub bias_shape: [u64; 4],
    /// Element strides of the bias's B, Hq and Lq dimensions.
    pub bias_strides: [u64; 3],
    /// The boolean mask (uint8) or NULL.
    pub mask: *const u8,
    /// {B | 1, Hq | 1, Lq | 1, Lk}.
    pub mask_shape: [u64; 4],
    /// Element strides of the mask's B, Hq and Lq dimensions.
    pub mask_strides: [u64; 3],
    /// `[num_seqs + 1]` int32 or NULL.
    pub cu_seqlens_q: *const i32,
    /// `[num_seqs + 1]` int32 or NULL (both or neither).
    pub cu_seqlens_k: *const i32,
    /// The number of packed sequences.
    pub num_seqs: u64,
    /// The longest query sequence (or an upper bound).
    pub max_seqlen_q: u64,
    /// The longest key sequence (or an upper bound).
    pub max_seqlen_k: u64,
}

/// A broadcast tensor of the C struct as the Rust API's `ScoreBias` (extent-checked).
unsafe fn score_bias<'a, T: bytemuck::Pod>(
    dev: &Device,
    name: &str,
    data: *const T,
    shape: [u64; 4],
    strides: [u64; 3],
) -> Result<attention::ScoreBias<'a, T>> {
    let t = FepAttnTensor {
        data: data as *mut c_void,
        shape,
        strides,
    };
    let d = unsafe { attn_desc(name, &t)? };
    Ok(attention::ScoreBias {
        data: unsafe { raw_view(dev, d.data as u64, d.extent, &d.name) },
        shape: d.shape,
        strides: d.strides,
    })
}

/// `Precisions` from the C arguments: pi_head `[Hq]`, pi_key (B Hkv Lk elements) and the
/// optional score inputs.
unsafe fn precisions<'a>(
    dev: &Device,
    hq: usize,
    keys: usize,
    pi_head: *const f32,
    pi_key: *const f32,
    inputs: *const FepAttnScoreInputs,
) -> Result<Precisions<'a>> {
    let mut p = Precisions {
        head: (!pi_head.is_null()).then(|| unsafe { raw_view(dev, pi_head as u64, hq, "pi_head") }),
        key: (!pi_key.is_null()).then(|| unsafe { raw_view(dev, pi_key as u64, keys, "pi_key") }),
        ..Default::default()
    };
    if inputs.is_null() {
        return Ok(p);
    }
    let x = unsafe { read_arg("inputs", inputs)? };
    if !x.nu_head.is_null() {
        p.nu = Some(unsafe { raw_view(dev, x.nu_head as u64, hq, "inputs.nu_head") });
    }
    if !x.bias.is_null() {
        p.bias =
            Some(unsafe { score_bias(dev, "inputs.bias", x.bias, x.bias_shape, x.bias_strides)? });
    }
    if !x.mask.is_null() {
        p.mask =
            Some(unsafe { score_bias(dev, "inputs.mask", x.mask, x.mask_shape, x.mask_strides)? });
    }
    match (x.cu_seqlens_q.is_null(), x.cu_seqlens_k.is_null()) {
        (true, true) => {}
        (false, false) => {
            let s = usize_of("inputs.num_seqs", x.num_seqs)?;
            let n = s
                .checked_add(1)
                .ok_or_else(|| Error::invalid("inputs.num_seqs", "too large"))?;
            p.varlen = Some(attention::Varlen {
                cu_q: unsafe { raw_view(dev, x.cu_seqlens_q as u64, n, "inputs.cu_seqlens_q") },
                cu_k: unsafe { raw_view(dev, x.cu_seqlens_k as u64, n, "inputs.cu_seqlens_k") },
                max_q: usize_of("inputs.max_seqlen_q", x.max_seqlen_q)?,
                max_k: usize_of("inputs.max_seqlen_k", x.max_seqlen_k)?,
            });
        }
        (q_null, _) => {
            return Err(Error::invalid(
                if q_null {
                    "inputs.cu_seqlens_q"
                } else {
                    "inputs.cu_seqlens_k"
                },
                "is NULL while the other cu_seqlens is not: give both or neither",
            ));
        }
    }
    Ok(p)
}

/// The Rust API's argument names as the C struct's fields.
fn inputs_names(err: Error) -> Error {
    match err {
        Error::InvalidArgument { name, reason } => {
            let name = match name.as_str() {
                "nu" => "inputs.nu_head".to_string(),
                "bias" | "mask" | "cu_seqlens_q" | "cu_seqlens_k" => format!("inputs.{name}"),
                "max_seqlen_q" | "max_seqlen_k" => format!("inputs.{name}"),
                _ => name,
            };
            Error::InvalidArgument { name, reason }
        }
        other => other,
    }
}

/// o_i = sum_j softmax_j(s_ij) v_j over the visible keys, with q [B, Hq, Lq, D],
/// k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] (Hq % Hkv == 0: query head h reads kv head
/// h / (Hq / Hkv)), all of `dtype` (FEP_DTYPE_F32, _F16 or _BF16), o [B, Hq, Lq, Dv] of `dtype`
/// (any strides, as the inputs). Optional (NULL: none): pi_head `[Hq]` and pi_key [B, Hkv, Lk]
/// float precisions (pi = 1 where absent), kv_len `[B]` int32 key lengths (keys j >= `kv_len[b]`
/// are padding); outputs lse [B, Hq, Lq] = ln sum_j e^{s_ij} and e [B, Hq, Lq] =
/// sum_j w_ij pi_ij d2_ij, float, row-major. A row with no visible key gets o = 0, lse = -inf,
/// e = 0. Outputs may not alias any input or each other. On the CPU the computation is the
/// float64 reference; on a GPU the fused kernels, enqueued on `stream`, for D and Dv each one
/// of 32, 64, 96, 128, 256 (others: FEP_ERR_UNSUPPORTED).
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
    unsafe {
        fep_attention_forward2(
            kind,
            ordinal,
            stream,
            params,
            dtype,
            q,
            k,
            v,
            pi_head,
            pi_key,
            kv_len,
            std::ptr::null(),
            o,
            lse,
            e,
        )
    }
}

/// fep_attention_forward with the optional score inputs (`inputs`, NULL: none; see
/// FepAttnScoreInputs): per-head nu, an additive bias, a boolean mask, packed sequences.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_attention_forward2(
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
    inputs: *const FepAttnScoreInputs,
    o: *const FepAttnTensor,
    lse: *mut f32,
    e: *mut f32,
) -> i32 {
    guard(|| {
        let spec = attention_spec(&unsafe { read_arg("params", params)? })?;
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
        let precision = unsafe { precisions(dev, hq, keys, pi_head, pi_key, inputs)? };
        let kv_len =
            (!kv_len.is_null()).then(|| unsafe { raw_view(dev, kv_len as u64, b, "kv_len") });
        let (lse, e) = unsafe {
            (
                (!lse.is_null()).then(|| raw_view_mut(dev, lse as u64, rows, "lse")),
                (!e.is_null()).then(|| raw_view_mut(dev, e as u64, rows, "e")),
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
                .map_err(inputs_names)
        })
    })
}

/// The gradients of a loss L(o, e) of a forward call (the same params, dtype, q, k, v, pi_head,
/// pi_key and kv_len as that call) with respect to q, k, v, the precisions and nu, given
/// d_o = dL/do and optionally d_e = dL/de. The maths is in src/attention/backward.rs.
///
/// Inputs, all on the call's device:
/// - q, k, v, pi_head, pi_key, kv_len: as for fep_attention_forward (pi_head, pi_key and
///   kv_len may be NULL: pi = 1, every key visible)
/// - o [B, Hq, Lq, Dv] of `dtype` (any strides): the forward's o
/// - lse [B, Hq, Lq] float, row-major: the forward's lse (required)
/// - d_o [B, Hq, Lq, Dv] of `dtype` (any strides): dL/do
/// - e [B, Hq, Lq] float: the forward's e; required when d_e is given, else may be NULL
/// - d_e [B, Hq, Lq] float: dL/de, or NULL when the loss does not use e
///
/// Outputs (written, not accumulated into):
/// - dq [B, Hq, Lq, D], dk [B, Hkv, Lk, D], dv [B, Hkv, Lk, Dv], of `dtype`, any strides
///   (required; dk and dv summed over the query heads of each kv head's group)
/// - dpi_head `[Hq]`, dpi_key [B, Hkv, Lk], dnu `[1]`: float, each NULL when not wanted:
///   dL/dpi_h, dL/dpi_j (at pi = 1 for a precision the call did not pass) and dL/dnu (0 unless
///   the score is FEP_SCORE_STUDENT_T)
///
/// Rows with no visible key contribute nothing. No output may alias an input or another
/// output. Deterministic (no floating-point atomics): two calls give the same bits. On the CPU
/// the computation is the float64 reference (which recomputes the forward: o and lse are
/// checked but not read); on a GPU three kernels enqueued on `stream`, for D and Dv each one of
/// 32, 64, 96, 128, 256 and, in float32, D + Dv <= 384 (others: FEP_ERR_UNSUPPORTED).
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
    unsafe {
        fep_attention_backward2(
            kind,
            ordinal,
            stream,
            params,
            dtype,
            q,
            k,
            v,
            pi_head,
            pi_key,
            kv_len,
            std::ptr::null(),
            o,
            lse,
            d_o,
            e,
            d_e,
            std::ptr::null(),
            dq,
            dk,
            dv,
            dpi_head,
            dpi_key,
            dnu,
            std::ptr::null_mut(),
        )
    }
}

/// fep_attention_backward with the optional score inputs (`inputs`, NULL: none; the same as the
/// forward call's), the gradient arriving through lse and the bias's gradient:
/// - d_lse [B, Hq, Lq] float: dL/dlse, or NULL when the loss does not use lse (then
///   dS_ij = w_ij (dL/dw_ij - Delta_i + d_lse_i))
/// - dnu: `[Hq]` float when inputs->nu_head is given, else `[1]`
/// - dbias: float in the bias's shape (row-major, each broadcast dimension summed in a fixed
///   order), or NULL; only with a bias
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_attention_backward2(
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
    inputs: *const FepAttnScoreInputs,
    o: *const FepAttnTensor,
    lse: *const f32,
    d_o: *const FepAttnTensor,
    e: *const f32,
    d_e: *const f32,
    d_lse: *const f32,
    dq: *const FepAttnTensor,
    dk: *const FepAttnTensor,
    dv: *const FepAttnTensor,
    dpi_head: *mut f32,
    dpi_key: *mut f32,
    dnu: *mut f32,
    dbias: *mut f32,
) -> i32 {
    guard(|| {
        let spec = attention_spec(&unsafe { read_arg("params", params)? })?;
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
        let opt = |name: &str, p: *const f32, len: usize| {
            (!p.is_null()).then(|| unsafe { raw_view::<f32>(dev, p as u64, len, name) })
        };
        let opt_mut = |name: &str, p: *mut f32, len: usize| {
            (!p.is_null()).then(|| unsafe { raw_view_mut::<f32>(dev, p as u64, len, name) })
        };
        let precision = unsafe { precisions(dev, hq, keys, pi_head, pi_key, inputs)? };
        let kv_len =
            (!kv_len.is_null()).then(|| unsafe { raw_view(dev, kv_len as u64, b, "kv_len") });
        let lse = unsafe { raw_view(dev, lse as u64, rows, "lse") };
        let (e, d_e, d_lse) = (
            opt("e", e, rows),
            opt("d_e", d_e, rows),
            opt("d_lse", d_lse, rows),
        );
        let nu_len = if precision.nu.is_some() { hq } else { 1 };
        if !dbias.is_null() && precision.bias.is_none() {
            return Err(Error::invalid("dbias", "given without inputs->bias"));
        }
        let bias_len = match &precision.bias {
            Some(b) => b
                .shape
                .iter()
                .try_fold(1usize, |a, &x| product("inputs.bias_shape", a, x))?,
            None => 0,
        };
        let (dpi_head, dpi_key, dnu, dbias) = (
            opt_mut("dpi_head", dpi_head, hq),
            opt_mut("dpi_key", dpi_key, keys),
            opt_mut("dnu", dnu, nu_len),
            opt_mut("dbias", dbias, bias_len),
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
                d_lse,
            };
            let out = Gradients {
                dq: dq.view_mut::<T>(dev),
                dk: dk.view_mut::<T>(dev),
                dv: dv.view_mut::<T>(dev),
                dpi_head,
                dpi_key,
                dnu,
                dbias,
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
            .map_err(inputs_names)
        })
    })
}

/// The attention weights w_ij = softmax_j(s_ij) of a forward call (the same params, dtype, q,
/// k, v, pi_head, pi_key, kv_len and inputs) into `w` [B, Hq, Lq, Lk] float, row-major, of
/// `w_len` elements (checked): a materialised score matrix for inspection and visualisation
/// only (B Hq Lq Lk floats, which the fused forward never stores). Masked keys and fully masked
/// rows give 0; with packed sequences w is [Hq, total_q, total_k], 0 across sequences.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_attention_probabilities(
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
    inputs: *const FepAttnScoreInputs,
    w: *mut f32,
    w_len: u64,
) -> i32 {
    guard(|| {
        let spec = attention_spec(&unsafe { read_arg("params", params)? })?;
        let (q, k, v) = unsafe { (attn_desc("q", q)?, attn_desc("k", k)?, attn_desc("v", v)?) };
        non_null("w", w)?;
        let dev = open_device(kind, ordinal)?;
        let dev = &dev;
        let [b, hq, _, _] = q.shape;
        let [_, hkv, lk, _] = k.shape;
        let keys = product("k.shape", product("k.shape", b, hkv)?, lk)?;
        let precision = unsafe { precisions(dev, hq, keys, pi_head, pi_key, inputs)? };
        let kv_len =
            (!kv_len.is_null()).then(|| unsafe { raw_view(dev, kv_len as u64, b, "kv_len") });
        let w = unsafe { raw_view_mut::<f32>(dev, w as u64, usize_of("w_len", w_len)?, "w") };
        let stream = raw_stream(stream);
        with_dtype!(dtype, T => unsafe {
            let (q, k, v) = (q.view::<T>(dev), k.view::<T>(dev), v.view::<T>(dev));
            attention::probabilities_into(&spec, &q, &k, &v, &precision, kv_len.as_ref(), w, stream)
                .map_err(inputs_names)
                .map_err(|e| match e {
                    Error::InvalidArgument { name, reason } if name == "probabilities" => {
                        Error::InvalidArgument { name: "w".into(), reason }
                    }
                    other => other,
                })
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

/// Merges `splits` = S >= 1 partial attention results of the same rows, each over a subset of
/// the keys (a split decode, or shards of a sequence on several devices), by their lse:
///   lse = ln sum_c e^{lse_c},  o = sum_c e^{lse_c - lse} o_c,  e = sum_c e^{lse_c - lse} e_c
/// (a row whose every lse_c is -inf gives o = 0, lse = -inf, e = 0). The shape B, Hq, Lq, Dv is
/// o's.
///
/// Inputs, row-major on the call's device:
/// - o_parts [S, B, Hq, Lq, Dv] of `dtype`: each part's normalised o
/// - lse_parts [S, B, Hq, Lq] float: each part's lse (-inf for a part with no visible key)
/// - e_parts [S, B, Hq, Lq] float: each part's e, or NULL (then e must be NULL)
///
/// Outputs: o [B, Hq, Lq, Dv] of `dtype`, any strides (required); lse and e [B, Hq, Lq] float,
/// row-major, or NULL. No output may alias an input or another output. On the CPU the merge
/// runs in float64; on a GPU one kernel enqueued on `stream`, accumulating in float.
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
        let lse_parts = unsafe { raw_view::<f32>(dev, lse_parts as u64, part_rows, "lse_parts") };
        let e_parts = (!e_parts.is_null())
            .then(|| unsafe { raw_view::<f32>(dev, e_parts as u64, part_rows, "e_parts") });
        let (lse, e) = unsafe {
            (
                (!lse.is_null()).then(|| raw_view_mut(dev, lse as u64, rows, "lse")),
                (!e.is_null()).then(|| raw_view_mut(dev, e as u64, rows, "e")),
            )
        };
        let stream = raw_stream(stream);
        with_dtype!(dtype, T => unsafe {
            let parts = MergeParts {
                o: raw_view::<T>(dev, o_parts as u64, part_len, "o_parts"),
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
