//! The C ABI v3 of the attention score inputs (`FepAttnScoreInputs`: per-head ν, bias, mask,
//! packed sequences) through `fep_attention_forward2`, `_backward2` (d_lse, dbias, per-head dν)
//! and `_probabilities` on the CPU device, against the Rust API bit for bit; and each bad
//! argument refused with FEP_ERR_INVALID_ARGUMENT and a message naming its C field, before
//! anything is written.

use std::ffi::{CStr, c_void};
use std::ptr::{null, null_mut};

use fep_kernels::View;
use fep_kernels::attention::{
    self, AttentionSpec, BackwardInputs, Precisions, Score, ScoreBias, Tensor4, Varlen,
};
use fep_kernels::ffi::*;

const B: usize = 2;
const HQ: usize = 4;
const HKV: usize = 2;
const LQ: usize = 5;
const LK: usize = 6;
const D: usize = 8;

fn last_error() -> String {
    unsafe { CStr::from_ptr(fep_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Deterministic values in [-1, 1).
fn values(n: usize, salt: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let x = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15 ^ salt.wrapping_mul(0xA24B_AED4));
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn desc(data: &[f32], shape: [usize; 4]) -> FepAttnTensor {
    desc_ptr(data.as_ptr() as *mut c_void, shape)
}

/// An output's description (the pointer from a mutable borrow: the library writes through it).
fn desc_mut(data: &mut [f32], shape: [usize; 4]) -> FepAttnTensor {
    desc_ptr(data.as_mut_ptr() as *mut c_void, shape)
}

fn desc_ptr(data: *mut c_void, shape: [usize; 4]) -> FepAttnTensor {
    let [_, h, l, d] = shape;
    FepAttnTensor {
        data,
        shape: shape.map(|x| x as u64),
        strides: [(h * l * d) as u64, (l * d) as u64, d as u64],
    }
}

/// The problem: q, k, v, a bias [1, Hq, Lq, Lk], a mask [B, 1, 1, Lk] (one key dropped), ν [Hq].
struct Problem {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    bias: Vec<f32>,
    mask: Vec<u8>,
    nu: Vec<f32>,
}

fn problem() -> Problem {
    let mut mask = vec![1u8; B * LK];
    mask[LK + 2] = 0;
    Problem {
        q: values(B * HQ * LQ * D, 1),
        k: values(B * HKV * LK * D, 2),
        v: values(B * HKV * LK * D, 3),
        bias: values(HQ * LQ * LK, 4),
        mask,
        nu: vec![2.0, 3.0, 5.0, 9.0],
    }
}

fn c_inputs(p: &Problem) -> FepAttnScoreInputs {
    FepAttnScoreInputs {
        nu_head: p.nu.as_ptr(),
        bias: p.bias.as_ptr(),
        bias_shape: [1, HQ as u64, LQ as u64, LK as u64],
        bias_strides: [0, (LQ * LK) as u64, LK as u64],
        mask: p.mask.as_ptr(),
        mask_shape: [B as u64, 1, 1, LK as u64],
        mask_strides: [LK as u64, 0, 0],
        cu_seqlens_q: null(),
        cu_seqlens_k: null(),
        num_seqs: 0,
        max_seqlen_q: 0,
        max_seqlen_k: 0,
    }
}

fn params() -> FepAttentionParams {
    FepAttentionParams {
        score: FEP_SCORE_STUDENT_T,
        nu: 4.0,
        scale: 0.0,
        causal: 1,
        window: 0,
        normalizer: 1,
        skip_input_checks: 0,
    }
}

fn precisions<'a>(p: &'a Problem) -> Precisions<'a> {
    Precisions {
        nu: Some(View::host(&p.nu)),
        bias: Some(ScoreBias::contiguous(View::host(&p.bias), [1, HQ, LQ, LK])),
        mask: Some(ScoreBias::contiguous(View::host(&p.mask), [B, 1, 1, LK])),
        ..Default::default()
    }
}

/// (o, lse, e) through the C ABI.
fn c_forward(
    p: &Problem,
    inputs: *const FepAttnScoreInputs,
) -> (i32, Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = B * HQ * LQ;
    let (mut o, mut lse, mut e) = (
        vec![f32::NAN; rows * D],
        vec![f32::NAN; rows],
        vec![f32::NAN; rows],
    );
    let st = unsafe {
        fep_attention_forward2(
            FEP_DEVICE_CPU,
            0,
            null_mut(),
            &params(),
            FEP_DTYPE_F32,
            &desc(&p.q, [B, HQ, LQ, D]),
            &desc(&p.k, [B, HKV, LK, D]),
            &desc(&p.v, [B, HKV, LK, D]),
            null(),
            null(),
            null(),
            inputs,
            &desc_mut(&mut o, [B, HQ, LQ, D]),
            lse.as_mut_ptr(),
            e.as_mut_ptr(),
        )
    };
    (st, o.split_off(0), lse.split_off(0), e.split_off(0))
}

fn spec() -> AttentionSpec {
    AttentionSpec::new(Score::StudentT(4.0)).causal(true)
}

fn tensors(p: &Problem) -> [Tensor4<'_, f32>; 3] {
    [
        Tensor4::bhld(View::host(&p.q), [B, HQ, LQ, D]),
        Tensor4::bhld(View::host(&p.k), [B, HKV, LK, D]),
        Tensor4::bhld(View::host(&p.v), [B, HKV, LK, D]),
    ]
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn forward2_and_probabilities_match_the_rust_api_bitwise() {
    let p = problem();
    let inputs = c_inputs(&p);
    let (st, o, lse, e) = c_forward(&p, &inputs);
    assert_eq!(st, FEP_OK, "{}", last_error());
    let [q, k, v] = tensors(&p);
    let r = attention::forward(&spec(), &q, &k, &v, &precisions(&p), None).unwrap();
    assert_eq!(bits(&o), bits(&r.o.to_vec().unwrap()));
    assert_eq!(bits(&lse), bits(&r.lse.to_vec().unwrap()));
    assert_eq!(bits(&e), bits(&r.e.to_vec().unwrap()));
    // The mask and the bias change the result (the test can fail).
    let (_, o_plain, _, _) = c_forward(&p, null());
    assert_ne!(bits(&o), bits(&o_plain));

    let n = B * HQ * LQ * LK;
    let mut w = vec![f32::NAN; n];
    let st = unsafe {
        fep_attention_probabilities(
            FEP_DEVICE_CPU,
            0,
            null_mut(),
            &params(),
            FEP_DTYPE_F32,
            &desc(&p.q, [B, HQ, LQ, D]),
            &desc(&p.k, [B, HKV, LK, D]),
            &desc(&p.v, [B, HKV, LK, D]),
            null(),
            null(),
            null(),
            &inputs,
            w.as_mut_ptr(),
            n as u64,
        )
    };
    assert_eq!(st, FEP_OK, "{}", last_error());
    let want = attention::probabilities(&spec(), &q, &k, &v, &precisions(&p), None, n).unwrap();
    assert_eq!(bits(&w), bits(&want.to_vec().unwrap()));
    // Batch 1 masks key 2 for every row; rows sum to 1.
    for row in 0..B * HQ * LQ {
        let r = &w[row * LK..][..LK];
        if row >= HQ * LQ {
            assert_eq!(r[2], 0.0);
        }
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
}

#[test]
fn backward2_matches_the_rust_api_bitwise() {
    let p = problem();
    let inputs = c_inputs(&p);
    let (st, o, lse, e) = c_forward(&p, &inputs);
    assert_eq!(st, FEP_OK, "{}", last_error());
    let rows = B * HQ * LQ;
    let d_o = values(rows * D, 5);
    let d_lse = values(rows, 6);
    let mut dq = vec![f32::NAN; rows * D];
    let mut dk = vec![f32::NAN; B * HKV * LK * D];
    let mut dv = vec![f32::NAN; B * HKV * LK * D];
    let (mut dnu, mut dbias) = (vec![f32::NAN; HQ], vec![f32::NAN; HQ * LQ * LK]);
    let st = unsafe {
        fep_attention_backward2(
            FEP_DEVICE_CPU,
            0,
            null_mut(),
            &params(),
            FEP_DTYPE_F32,
            &desc(&p.q, [B, HQ, LQ, D]),
            &desc(&p.k, [B, HKV, LK, D]),
            &desc(&p.v, [B, HKV, LK, D]),
            null(),
            null(),
            null(),
            &inputs,
            &desc(&o, [B, HQ, LQ, D]),
            lse.as_ptr(),
            &desc(&d_o, [B, HQ, LQ, D]),
            e.as_ptr(),
            null(),
            d_lse.as_ptr(),
            &desc_mut(&mut dq, [B, HQ, LQ, D]),
            &desc_mut(&mut dk, [B, HKV, LK, D]),
            &desc_mut(&mut dv, [B, HKV, LK, D]),
            null_mut(),
            null_mut(),
            dnu.as_mut_ptr(),
            dbias.as_mut_ptr(),
        )
    };
    assert_eq!(st, FEP_OK, "{}", last_error());
    let [q, k, v] = tensors(&p);
    let pr = precisions(&p);
    let bi = BackwardInputs {
        o: Tensor4::bhld(View::host(&o), [B, HQ, LQ, D]),
        lse: View::host(&lse),
        d_o: Tensor4::bhld(View::host(&d_o), [B, HQ, LQ, D]),
        e: Some(View::host(&e)),
        d_e: None,
        d_lse: Some(View::host(&d_lse)),
    };
    let g = attention::backward(&spec(), &q, &k, &v, &pr, None, &bi).unwrap();
    assert_eq!(bits(&dq), bits(&g.dq.to_vec().unwrap()));
    assert_eq!(bits(&dk), bits(&g.dk.to_vec().unwrap()));
    assert_eq!(bits(&dv), bits(&g.dv.to_vec().unwrap()));
    assert_eq!(bits(&dnu), bits(&g.dnu.to_vec().unwrap()));
    assert_eq!(bits(&dbias), bits(&g.dbias.to_vec().unwrap()));
    assert!(dbias.iter().any(|&x| x != 0.0) && dnu.iter().all(|x| x.is_finite()));
}

#[test]
fn packed_sequences_through_the_c_abi() {
    // Two sequences (3 and 5 query rows, 4 and 5 keys), one head, BLHD memory [total, 1, D].
    let (tq, tk) = (8usize, 9usize);
    let q = values(tq * D, 7);
    let k = values(tk * D, 8);
    let v = values(tk * D, 9);
    let (cu_q, cu_k) = ([0i32, 3, 8], [0i32, 4, 9]);
    let inputs = FepAttnScoreInputs {
        nu_head: null(),
        bias: null(),
        bias_shape: [0; 4],
        bias_strides: [0; 3],
        mask: null(),
        mask_shape: [0; 4],
        mask_strides: [0; 3],
        cu_seqlens_q: cu_q.as_ptr(),
        cu_seqlens_k: cu_k.as_ptr(),
        num_seqs: 2,
        max_seqlen_q: 5,
        max_seqlen_k: 5,
    };
    let packed = |x: *const f32, l: usize| FepAttnTensor {
        data: x as *mut c_void,
        shape: [1, 1, l as u64, D as u64],
        strides: [0, D as u64, D as u64],
    };
    let mut o = vec![f32::NAN; tq * D];
    let mut lse = vec![f32::NAN; tq];
    let st = unsafe {
        fep_attention_forward2(
            FEP_DEVICE_CPU,
            0,
            null_mut(),
            &params(),
            FEP_DTYPE_F32,
            &packed(q.as_ptr(), tq),
            &packed(k.as_ptr(), tk),
            &packed(v.as_ptr(), tk),
            null(),
            null(),
            null(),
            &inputs,
            &packed(o.as_mut_ptr(), tq),
            lse.as_mut_ptr(),
            null_mut(),
        )
    };
    assert_eq!(st, FEP_OK, "{}", last_error());
    // Sequence 1 alone, as a dense problem.
    fn one(x: &[f32], r: std::ops::Range<usize>) -> Tensor4<'_, f32> {
        Tensor4::bhld(View::host(&x[r.start * D..r.end * D]), [1, 1, r.len(), D])
    }
    let (q1, k1, v1) = (one(&q, 3..8), one(&k, 4..9), one(&v, 4..9));
    let r = attention::forward(&spec(), &q1, &k1, &v1, &Precisions::default(), None).unwrap();
    assert_eq!(bits(&o[3 * D..]), bits(&r.o.to_vec().unwrap()));
    assert_eq!(bits(&lse[3..]), bits(&r.lse.to_vec().unwrap()));
    // The Rust API sees the same packed problem.
    let vl = Varlen {
        cu_q: View::host(&cu_q),
        cu_k: View::host(&cu_k),
        max_q: 5,
        max_k: 5,
    };
    assert_eq!(vl.sequences(), 2);
}

/// Runs forward2 with `inputs` mutated by `f` and expects FEP_ERR_INVALID_ARGUMENT naming
/// `needle`, with o untouched.
fn refused(f: impl FnOnce(&mut FepAttnScoreInputs), needle: &str) {
    let p = problem();
    let mut inputs = c_inputs(&p);
    f(&mut inputs);
    let (st, o, _, _) = c_forward(&p, &inputs);
    assert_eq!(st, FEP_ERR_INVALID_ARGUMENT, "{needle}: {}", last_error());
    let msg = last_error();
    assert!(msg.contains(needle), "{needle} not in {msg}");
    assert!(o.iter().all(|x| x.is_nan()), "{needle}: o was written");
}

#[test]
fn bad_score_inputs_are_named() {
    refused(|x| x.bias_shape[1] = HKV as u64, "inputs.bias");
    refused(|x| x.bias_shape[3] = 1, "inputs.bias");
    refused(|x| x.mask_shape = [B as u64, 1, 1, 3], "inputs.mask");
    let nu = [1.0f32, -1.0, 1.0, 1.0];
    refused(|x| x.nu_head = nu.as_ptr(), "inputs.nu_head");
    let nan_bias = vec![f32::NAN; HQ * LQ * LK];
    refused(|x| x.bias = nan_bias.as_ptr(), "inputs.bias");
    let cu = [0i32, 5, 10];
    refused(|x| x.cu_seqlens_q = cu.as_ptr(), "inputs.cu_seqlens_k");
    refused(
        |x| {
            x.cu_seqlens_q = cu.as_ptr();
            x.cu_seqlens_k = cu.as_ptr();
            x.num_seqs = 2;
            x.max_seqlen_q = 5;
            x.max_seqlen_k = 5;
        },
        "q",
    ); // B = 2: packed sequences need B = 1
}

#[test]
fn dbias_without_a_bias_is_refused() {
    let p = problem();
    let mut inputs = c_inputs(&p);
    inputs.bias = null();
    let (st, o, lse, e) = c_forward(&p, &inputs);
    assert_eq!(st, FEP_OK, "{}", last_error());
    let mut grads = vec![f32::NAN; B * HQ * LQ * D];
    let mut dkv = vec![f32::NAN; 2 * B * HKV * LK * D];
    let mut dbias = vec![f32::NAN; 4];
    let (dk, dv) = dkv.split_at_mut(B * HKV * LK * D);
    let st = unsafe {
        fep_attention_backward2(
            FEP_DEVICE_CPU,
            0,
            null_mut(),
            &params(),
            FEP_DTYPE_F32,
            &desc(&p.q, [B, HQ, LQ, D]),
            &desc(&p.k, [B, HKV, LK, D]),
            &desc(&p.v, [B, HKV, LK, D]),
            null(),
            null(),
            null(),
            &inputs,
            &desc(&o, [B, HQ, LQ, D]),
            lse.as_ptr(),
            &desc(&o, [B, HQ, LQ, D]),
            e.as_ptr(),
            null(),
            null(),
            &desc_mut(&mut grads, [B, HQ, LQ, D]),
            &desc_mut(dk, [B, HKV, LK, D]),
            &desc_mut(dv, [B, HKV, LK, D]),
            null_mut(),
            null_mut(),
            null_mut(),
            dbias.as_mut_ptr(),
        )
    };
    assert_eq!(st, FEP_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("dbias"), "{}", last_error());
    assert!(grads.iter_mut().all(|x| x.is_nan()));
}
