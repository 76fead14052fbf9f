//! Attention forward and backward as XLA FFI handlers, over `fep_attention_forward2` and
//! `fep_attention_backward2`.
//!
//! Forward `fep_attention_forward`: arguments q, k, v, then the optional inputs named by the
//! `inputs` attribute's bits in this order: 1 pi_head [Hq] f32, 2 pi_key [B, Hkv, Lk] f32,
//! 4 kv_len [B] s32, 8 nu_head [Hq] f32, 16 bias (4-d f32, dims B|1, Hq|1, Lq|1, Lk),
//! 32 mask (4-d bool, the same). Results o (q's dtype, the layout's shape), lse and e
//! [B, Hq, Lq] f32. Attributes: score (0 dot, 1 gaussian, 2 student_t, 3 laplace), nu, scale
//! (≤ 0: the default), causal, window (0: none), normalizer, layout (0 bhld, 1 blhd), inputs.
//!
//! Backward `fep_attention_backward`: arguments q, k, v, o, lse, d_o, then the forward's optional
//! inputs by the same bits, then 64: e and d_e, 128: d_lse. Results dq, dk, dv, then with
//! `precision_grads` = 1 dpi_head [Hq], dpi_key [B, Hkv, Lk], dnu ([Hq] with nu_head, else [1]),
//! then with a bias dbias (the bias's dims). Buffers are dense and row-major (XLA's default
//! layout), so every stride follows from the dims.

use std::ptr::{null, null_mut};

use super::{
    Buf, DT_F32, DT_PRED, DT_S32, DT_U8, Frame, Res, check_status_as, expect, float_code, handlers,
    invalid,
};
use crate::ffi::{
    FepAttentionParams, FepAttnScoreInputs, FepAttnTensor, fep_attention_backward2,
    fep_attention_forward2,
};

/// The C ABI's names of the inputs and `fep_kernels.jax.attention`'s.
const NAMES: &[(&str, &str)] = &[
    ("pi_head", "precision_head"),
    ("pi_key", "precision_key"),
    ("precision.head", "precision_head"),
    ("precision.key", "precision_key"),
    ("inputs.nu_head", "nu"),
    ("inputs.bias", "bias"),
    ("inputs.mask", "attn_mask"),
];

const PI_HEAD: i32 = 1;
const PI_KEY: i32 = 2;
const KV_LEN: i32 = 4;
const NU_HEAD: i32 = 8;
const BIAS: i32 = 16;
const MASK: i32 = 32;
const E_DE: i32 = 64;
const D_LSE: i32 = 128;

fn params(f: &Frame<'_>) -> Res<FepAttentionParams> {
    Ok(FepAttentionParams {
        score: f.int("score", None)?,
        nu: f.attr("nu")?.unwrap_or(5.0) as f32,
        scale: f.attr("scale")?.unwrap_or(0.0),
        causal: f.int("causal", Some(0))?,
        window: f.int("window", Some(0))?,
        normalizer: f.int("normalizer", Some(1))?,
        skip_input_checks: f.int("skip_input_checks", Some(0))?,
    })
}

/// A 4-d buffer as the C ABI's descriptor, in `layout` (0: [B, H, L, D], 1: [B, L, H, D]).
fn tensor(b: &Buf<'_>, what: &str, layout: i32) -> Res<FepAttnTensor> {
    let d: [u64; 4] = match b.dims {
        [a, x, y, z] => [*a as u64, *x as u64, *y as u64, *z as u64],
        _ => {
            return Err(invalid(format!(
                "{what}: expected 4 dims, got {:?}",
                b.dims
            )));
        }
    };
    let (shape, strides) = match layout {
        0 => (d, [d[1] * d[2] * d[3], d[2] * d[3], d[3]]),
        1 => (
            [d[0], d[2], d[1], d[3]],
            [d[1] * d[2] * d[3], d[3], d[2] * d[3]],
        ),
        l => return Err(invalid(format!("layout: {l} is not 0 (bhld) or 1 (blhd)"))),
    };
    Ok(FepAttnTensor {
        data: b.data,
        shape,
        strides,
    })
}

/// Row-major strides of a 4-d broadcast input's B, Hq and Lq dims.
fn strides4(dims: &[i64]) -> [u64; 3] {
    let d: Vec<u64> = dims.iter().map(|&x| x as u64).collect();
    [d[1] * d[2] * d[3], d[2] * d[3], d[3]]
}

fn shape4(b: &Buf<'_>, what: &str) -> Res<[u64; 4]> {
    match b.dims {
        [a, x, y, z] => Ok([*a as u64, *x as u64, *y as u64, *z as u64]),
        _ => Err(invalid(format!(
            "{what}: expected 4 dims, got {:?}",
            b.dims
        ))),
    }
}

/// The optional inputs in `inputs`' bit order, taken from `args` at `next`.
struct Optional<'a> {
    pi_head: *const f32,
    pi_key: *const f32,
    kv_len: *const i32,
    score: Option<FepAttnScoreInputs>,
    bias: Option<Buf<'a>>,
    nu_head: bool,
}

fn optional<'a>(
    args: &[Buf<'a>],
    next: &mut usize,
    bits: i32,
    dims: ([i64; 4], [i64; 4]),
) -> Res<Optional<'a>> {
    let ([b, hq, _, _], [_, hkv, lk, _]) = dims;
    let mut take = |bit: i32, what: &str| -> Res<Option<Buf<'a>>> {
        if bits & bit == 0 {
            return Ok(None);
        }
        let a = *args
            .get(*next)
            .ok_or_else(|| invalid(format!("{what}: missing (the inputs attribute names it)")))?;
        *next += 1;
        Ok(Some(a))
    };
    let pi_head = take(PI_HEAD, "pi_head")?;
    let pi_key = take(PI_KEY, "pi_key")?;
    let kv_len = take(KV_LEN, "kv_len")?;
    let nu_head = take(NU_HEAD, "nu_head")?;
    let bias = take(BIAS, "bias")?;
    let mask = take(MASK, "mask")?;
    if let Some(p) = &pi_head {
        expect(p, "pi_head", DT_F32, &[hq])?;
    }
    if let Some(p) = &pi_key {
        expect(p, "pi_key", DT_F32, &[b, hkv, lk])?;
    }
    if let Some(p) = &kv_len {
        expect(p, "kv_len", DT_S32, &[b])?;
    }
    if let Some(p) = &nu_head {
        expect(p, "nu_head", DT_F32, &[hq])?;
    }
    let score = if nu_head.is_some() || bias.is_some() || mask.is_some() {
        let mut s = FepAttnScoreInputs {
            nu_head: nu_head.map_or(null(), |n| n.data as *const f32),
            bias: null(),
            bias_shape: [0; 4],
            bias_strides: [0; 3],
            mask: null(),
            mask_shape: [0; 4],
            mask_strides: [0; 3],
            cu_seqlens_q: null(),
            cu_seqlens_k: null(),
            num_seqs: 0,
            max_seqlen_q: 0,
            max_seqlen_k: 0,
        };
        if let Some(x) = &bias {
            if x.dtype != DT_F32 {
                return Err(invalid(format!(
                    "bias: XLA dtype {} is not float32",
                    x.dtype
                )));
            }
            s.bias = x.data as *const f32;
            s.bias_shape = shape4(x, "bias")?;
            s.bias_strides = strides4(x.dims);
        }
        if let Some(m) = &mask {
            if m.dtype != DT_PRED && m.dtype != DT_U8 {
                return Err(invalid(format!(
                    "mask: XLA dtype {} is not bool or uint8",
                    m.dtype
                )));
            }
            s.mask = m.data as *const u8;
            s.mask_shape = shape4(m, "mask")?;
            s.mask_strides = strides4(m.dims);
        }
        Some(s)
    } else {
        None
    };
    Ok(Optional {
        pi_head: pi_head.map_or(null(), |p| p.data as *const f32),
        pi_key: pi_key.map_or(null(), |p| p.data as *const f32),
        kv_len: kv_len.map_or(null(), |p| p.data as *const i32),
        score,
        bias,
        nu_head: nu_head.is_some(),
    })
}

fn dims4(t: &FepAttnTensor) -> [i64; 4] {
    t.shape.map(|x| x as i64)
}

fn forward(f: &Frame<'_>) -> Res<()> {
    let p = params(f)?;
    let layout = f.int("layout", Some(0))?;
    let bits = f.int("inputs", Some(0))?;
    let args = f.args()?;
    let rets = f.rets()?;
    if args.len() < 3 || rets.len() != 3 {
        return Err(invalid(format!(
            "fep_attention_forward: expected q, k, v and 3 results, got {} arguments and {} \
             results",
            args.len(),
            rets.len()
        )));
    }
    let dtype = float_code(&args[0], "q")?;
    let (q, k, v) = (
        tensor(&args[0], "q", layout)?,
        tensor(&args[1], "k", layout)?,
        tensor(&args[2], "v", layout)?,
    );
    let mut next = 3;
    let opt = optional(&args, &mut next, bits, (dims4(&q), dims4(&k)))?;
    if next != args.len() {
        return Err(invalid(format!(
            "fep_attention_forward: {} arguments, the inputs attribute names {next}",
            args.len()
        )));
    }
    let o = tensor(&rets[0], "o", layout)?;
    let [b, hq, lq, _] = dims4(&q);
    expect(&rets[1], "lse", DT_F32, &[b, hq, lq])?;
    expect(&rets[2], "e", DT_F32, &[b, hq, lq])?;
    let (kind, ordinal, stream) = f.device()?;
    // Safety: every pointer is an XLA buffer whose dims were checked against the shapes the
    // call reads (the C ABI checks the rest: shapes agree, dtypes, values).
    let status = unsafe {
        fep_attention_forward2(
            kind,
            ordinal,
            stream,
            &p,
            dtype,
            &q,
            &k,
            &v,
            opt.pi_head,
            opt.pi_key,
            opt.kv_len,
            opt.score.as_ref().map_or(null(), |s| s as *const _),
            &o,
            rets[1].data as *mut f32,
            rets[2].data as *mut f32,
        )
    };
    check_status_as(status, "attention forward", NAMES)
}

fn backward(f: &Frame<'_>) -> Res<()> {
    let p = params(f)?;
    let layout = f.int("layout", Some(0))?;
    let bits = f.int("inputs", Some(0))?;
    let precision_grads = f.int("precision_grads", Some(0))? != 0;
    let args = f.args()?;
    let rets = f.rets()?;
    if args.len() < 6 || rets.len() < 3 {
        return Err(invalid(format!(
            "fep_attention_backward: expected q, k, v, o, lse, d_o and at least dq, dk, dv, got \
             {} arguments and {} results",
            args.len(),
            rets.len()
        )));
    }
    let dtype = float_code(&args[0], "q")?;
    let (q, k, v) = (
        tensor(&args[0], "q", layout)?,
        tensor(&args[1], "k", layout)?,
        tensor(&args[2], "v", layout)?,
    );
    let o = tensor(&args[3], "o", layout)?;
    let d_o = tensor(&args[5], "d_o", layout)?;
    let [b, hq, lq, _] = dims4(&q);
    let [_, hkv, lk, _] = dims4(&k);
    expect(&args[4], "lse", DT_F32, &[b, hq, lq])?;
    let mut next = 6;
    let opt = optional(&args, &mut next, bits, (dims4(&q), dims4(&k)))?;
    let mut row = |what: &str| -> Res<*const f32> {
        let a = args
            .get(next)
            .ok_or_else(|| invalid(format!("{what}: missing")))?;
        expect(a, what, DT_F32, &[b, hq, lq])?;
        next += 1;
        Ok(a.data as *const f32)
    };
    let (e, d_e) = if bits & E_DE != 0 {
        (row("e")?, row("d_e")?)
    } else {
        (null(), null())
    };
    let d_lse = if bits & D_LSE != 0 {
        row("d_lse")?
    } else {
        null()
    };
    if next != args.len() {
        return Err(invalid(format!(
            "fep_attention_backward: {} arguments, the inputs attribute names {next}",
            args.len()
        )));
    }
    let (dq, dk, dv) = (
        tensor(&rets[0], "dq", layout)?,
        tensor(&rets[1], "dk", layout)?,
        tensor(&rets[2], "dv", layout)?,
    );
    let mut r = 3;
    let (mut dpi_head, mut dpi_key, mut dnu) = (null_mut(), null_mut(), null_mut());
    if precision_grads {
        let nu_dims: &[i64] = if opt.nu_head { &[hq] } else { &[1] };
        let want: [(&str, &[i64]); 3] = [
            ("dpi_head", &[hq]),
            ("dpi_key", &[b, hkv, lk]),
            ("dnu", nu_dims),
        ];
        let mut ptrs = [null_mut(); 3];
        for (slot, (what, dims)) in ptrs.iter_mut().zip(want) {
            let a = rets
                .get(r)
                .ok_or_else(|| invalid(format!("{what}: missing result")))?;
            expect(a, what, DT_F32, dims)?;
            *slot = a.data as *mut f32;
            r += 1;
        }
        [dpi_head, dpi_key, dnu] = ptrs;
    }
    let mut dbias = null_mut();
    if let Some(x) = &opt.bias {
        let a = rets
            .get(r)
            .ok_or_else(|| invalid("dbias: missing result (a bias was given)"))?;
        expect(a, "dbias", DT_F32, x.dims)?;
        dbias = a.data as *mut f32;
        r += 1;
    }
    if r != rets.len() {
        return Err(invalid(format!(
            "fep_attention_backward: {} results, expected {r}",
            rets.len()
        )));
    }
    let (kind, ordinal, stream) = f.device()?;
    // Safety: as for the forward.
    let status = unsafe {
        fep_attention_backward2(
            kind,
            ordinal,
            stream,
            &p,
            dtype,
            &q,
            &k,
            &v,
            opt.pi_head,
            opt.pi_key,
            opt.kv_len,
            opt.score.as_ref().map_or(null(), |s| s as *const _),
            &o,
            args[4].data as *const f32,
            &d_o,
            e,
            d_e,
            d_lse,
            &dq,
            &dk,
            &dv,
            dpi_head,
            dpi_key,
            dnu,
            dbias,
        )
    };
    check_status_as(status, "attention backward", NAMES)
}

handlers!(
    fep_xla_cpu_attention_forward,
    fep_xla_cuda_attention_forward,
    "fep_attention_forward",
    forward
);
handlers!(
    fep_xla_cpu_attention_backward,
    fep_xla_cuda_attention_backward,
    "fep_attention_backward",
    backward
);
