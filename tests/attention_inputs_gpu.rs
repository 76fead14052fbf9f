//! The per-score inputs of attention on the GPU (or the emulated device) against the f64
//! reference (issue 23): an additive bias and a boolean mask broadcast to the scores (per key,
//! per row, with −∞ and fully masked rows), Student-t's ν per head, and packed variable-length
//! sequences (one empty) with causal and window masks; decode with key splits over all of them;
//! the materialised probabilities; and bad values refused by the input scan before anything is
//! written. A bias or mask varying over Lq runs the row kernel (probabilities.cu), one broadcast
//! over Lq the fused kernels (v1 for f32 and Dv = 256, v2 for bf16): both are covered.
//!
//! Inputs are fresh random values rounded to the dtype (the reference sees the same rounded
//! values); outputs are poisoned with NaN first. Bounds (DESIGN.md §6, as tests/attention_gpu.rs):
//! ‖out − ref‖ / ‖ref‖ < 1e-5 in f32, < 1e-2 in bf16; lse per row |Δ| ≤ tol·max(1, |lse|) and −∞
//! exactly where the reference's is. Shapes are small (the emulator runs each lane as a host
//! thread), and odd (no length a multiple of a tile).

mod common;

use common::attention::relayout;
use common::gpu::gpu;
use common::{rel_err, rng};
use fep_kernels::attention::{
    self, AttentionOutputs, AttentionSpec, Precisions, Score, ScoreBias, Tensor4, Tensor4Mut,
    Varlen,
    reference::{self, RefBroadcast, RefInputs, RefVarlen},
};
use fep_kernels::{DType, Device, DeviceBuffer, Element, Error, bf16};
use rand::Rng;

/// A broadcast input: its shape `[B|1, Hq|1, Lq|1, Lk]`.
type Shape = [usize; 4];

#[derive(Clone, Debug)]
struct Case {
    score: Score,
    b: usize,
    hq: usize,
    hkv: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    causal: bool,
    window: Option<u32>,
    pi_key: bool,
    nu_head: bool,
    /// The bias's shape, and whether about one score in eight gets −∞.
    bias: Option<(Shape, bool)>,
    /// The mask's shape, and whether row 3 (of every batch and head it has) is masked whole.
    mask: Option<(Shape, bool)>,
    /// Packed sequences: their query and key lengths (then b = 1, lq, lk are the totals).
    varlen: Option<(Vec<usize>, Vec<usize>)>,
    key_splits: Option<u32>,
    seed: u64,
}

impl Case {
    fn new(score: Score, seed: u64) -> Self {
        Case {
            score,
            b: 2,
            hq: 4,
            hkv: 2,
            lq: 33,
            lk: 47,
            d: 32,
            dv: 64,
            causal: false,
            window: None,
            pi_key: false,
            nu_head: false,
            bias: None,
            mask: None,
            varlen: None,
            key_splits: None,
            seed,
        }
    }

    /// Packed sequences of these query and key lengths (B = 1, BLHD memory as FlashAttention).
    fn packed(mut self, lq: &[usize], lk: &[usize]) -> Self {
        (self.b, self.lq, self.lk) = (1, lq.iter().sum(), lk.iter().sum());
        self.varlen = Some((lq.to_vec(), lk.to_vec()));
        self
    }

    fn spec(&self) -> AttentionSpec {
        let mut s = AttentionSpec::new(self.score).causal(self.causal);
        if let Some(w) = self.window {
            s = s.window(w);
        }
        if let Some(n) = self.key_splits {
            s = s.key_splits(n);
        }
        s
    }
}

/// Everything a case reads, on the host: q, k, v rounded to T (BHLD), the rest as uploaded.
struct Host<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    pi_key: Option<Vec<f32>>,
    nu: Option<Vec<f32>>,
    bias: Option<(Vec<f32>, Shape)>,
    mask: Option<(Vec<u8>, Shape)>,
    cu: Option<(Vec<i32>, Vec<i32>)>,
}

fn offsets(lens: &[usize]) -> Vec<i32> {
    std::iter::once(0)
        .chain(lens.iter().scan(0, |a, &l| {
            *a += l as i32;
            Some(*a)
        }))
        .collect()
}

fn host<T: Element>(c: &Case) -> Host<T> {
    let mut r = rng(c.seed);
    let mut vals = |n: usize| -> Vec<T> {
        (0..n)
            .map(|_| T::from_f64(r.random_range(-1.0..1.0)))
            .collect()
    };
    let q = vals(c.b * c.hq * c.lq * c.d);
    let k = vals(c.b * c.hkv * c.lk * c.d);
    let v = vals(c.b * c.hkv * c.lk * c.dv);
    let mut r = rng(c.seed ^ 0xb1a5);
    let pi_key = c.pi_key.then(|| {
        (0..c.b * c.hkv * c.lk)
            .map(|_| 10f32.powf(r.random_range(-0.3..0.3)))
            .collect()
    });
    let nu = c
        .nu_head
        .then(|| (0..c.hq).map(|_| r.random_range(0.5..12.0)).collect());
    let bias = c.bias.map(|(shape, neg_inf)| {
        let n: usize = shape.iter().product();
        let b = (0..n)
            .map(|_| {
                if neg_inf && r.random_range(0..8) == 0 {
                    f32::NEG_INFINITY
                } else {
                    r.random_range(-2.0..2.0)
                }
            })
            .collect();
        (b, shape)
    });
    let mask = c.mask.map(|(shape, full_row)| {
        let n: usize = shape.iter().product();
        let mut m: Vec<u8> = (0..n).map(|_| (r.random_range(0..10) < 7) as u8).collect();
        if full_row {
            // Row 3 of every (batch, head) the mask has: nothing kept.
            let (l, lk) = (shape[2], shape[3]);
            for bh in 0..shape[0] * shape[1] {
                m[(bh * l + 3.min(l - 1)) * lk..][..lk].fill(0);
            }
        }
        (m, shape)
    });
    let cu = c.varlen.as_ref().map(|(lq, lk)| (offsets(lq), offsets(lk)));
    Host {
        q,
        k,
        v,
        pi_key,
        nu,
        bias,
        mask,
        cu,
    }
}

fn f64s<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|a| a.to_f64()).collect()
}

fn tol<T: Element>() -> f64 {
    match T::DTYPE {
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

/// The reference's outputs and probabilities of a case.
fn reference_of<T: Element>(c: &Case, x: &Host<T>) -> (reference::RefOutputs, Vec<f64>) {
    let (q, k, v) = (f64s(&x.q), f64s(&x.k), f64s(&x.v));
    let pk = x.pi_key.as_ref().map(|p| f64s(p));
    let nu = x.nu.as_ref().map(|p| f64s(p));
    let bias = x.bias.as_ref().map(|(b, s)| (f64s(b), *s));
    let mask = x
        .mask
        .as_ref()
        .map(|(m, s)| (m.iter().map(|&a| a != 0).collect::<Vec<_>>(), *s));
    let inp = RefInputs {
        b: c.b,
        hq: c.hq,
        hkv: c.hkv,
        lq: c.lq,
        lk: c.lk,
        d: c.d,
        dv: c.dv,
        q: &q,
        k: &k,
        v: &v,
        pi_key: pk.as_deref(),
        nu_head: nu.as_deref(),
        bias: bias.as_ref().map(|(values, shape)| RefBroadcast {
            values,
            shape: *shape,
        }),
        mask: mask.as_ref().map(|(values, shape)| RefBroadcast {
            values,
            shape: *shape,
        }),
        varlen: x.cu.as_ref().map(|(cu_q, cu_k)| RefVarlen { cu_q, cu_k }),
        ..Default::default()
    };
    let spec = c.spec();
    (
        reference::forward(&spec, &inp).unwrap(),
        reference::probabilities(&spec, &inp).unwrap(),
    )
}

/// A case's inputs on the device; packed cases in BLHD memory (`[total, H, D]`).
struct Dev<T: Element> {
    q: DeviceBuffer<T>,
    k: DeviceBuffer<T>,
    v: DeviceBuffer<T>,
    pi_key: Option<DeviceBuffer<f32>>,
    nu: Option<DeviceBuffer<f32>>,
    bias: Option<(DeviceBuffer<f32>, Shape)>,
    mask: Option<(DeviceBuffer<u8>, Shape)>,
    cu: Option<(DeviceBuffer<i32>, DeviceBuffer<i32>)>,
    blhd: bool,
}

impl<T: Element> Dev<T> {
    fn new(dev: &Device, c: &Case, x: &Host<T>) -> Self {
        let blhd = c.varlen.is_some();
        let lay = |data: &[T], s: Shape| {
            let h = if blhd {
                relayout(data, s, true)
            } else {
                data.to_vec()
            };
            dev.upload(&h).unwrap()
        };
        Dev {
            q: lay(&x.q, [c.b, c.hq, c.lq, c.d]),
            k: lay(&x.k, [c.b, c.hkv, c.lk, c.d]),
            v: lay(&x.v, [c.b, c.hkv, c.lk, c.dv]),
            pi_key: x.pi_key.as_ref().map(|p| dev.upload(p).unwrap()),
            nu: x.nu.as_ref().map(|p| dev.upload(p).unwrap()),
            bias: x.bias.as_ref().map(|(b, s)| (dev.upload(b).unwrap(), *s)),
            mask: x.mask.as_ref().map(|(m, s)| (dev.upload(m).unwrap(), *s)),
            cu: x
                .cu
                .as_ref()
                .map(|(a, b)| (dev.upload(a).unwrap(), dev.upload(b).unwrap())),
            blhd,
        }
    }

    fn t4<'a>(&self, buf: &'a DeviceBuffer<T>, s: Shape) -> Tensor4<'a, T> {
        if self.blhd {
            Tensor4::blhd(buf.view(), s)
        } else {
            Tensor4::bhld(buf.view(), s)
        }
    }

    fn precisions(&self, c: &Case) -> Precisions<'_> {
        Precisions {
            key: self.pi_key.as_ref().map(|p| p.view()),
            nu: self.nu.as_ref().map(|p| p.view()),
            bias: self
                .bias
                .as_ref()
                .map(|(b, s)| ScoreBias::contiguous(b.view(), *s)),
            mask: self
                .mask
                .as_ref()
                .map(|(m, s)| ScoreBias::contiguous(m.view(), *s)),
            varlen: self.cu.as_ref().map(|(q, k)| {
                let (lq, lk) = c.varlen.as_ref().unwrap();
                Varlen {
                    cu_q: q.view(),
                    cu_k: k.view(),
                    max_q: *lq.iter().max().unwrap(),
                    max_k: *lk.iter().max().unwrap(),
                }
            }),
            ..Default::default()
        }
    }
}

/// o (BHLD), lse and e of a case on `dev`, from NaN-poisoned buffers, read back whatever the
/// call returned (a refused call must leave them NaN).
type Outputs<T> = (Vec<T>, Vec<f32>, Vec<f32>);

fn run<T: Element>(
    dev: &Device,
    c: &Case,
    d: &Dev<T>,
    pr: &Precisions<'_>,
) -> (Result<(), Error>, Outputs<T>) {
    let os = [c.b, c.hq, c.lq, c.dv];
    let rows = c.b * c.hq * c.lq;
    let mut o = dev
        .upload(&vec![T::from_f64(f64::NAN); rows * c.dv])
        .unwrap();
    let mut lse = dev.upload(&vec![f32::NAN; rows]).unwrap();
    let mut e = dev.upload(&vec![f32::NAN; rows]).unwrap();
    let (tq, tk, tv) = (
        d.t4(&d.q, [c.b, c.hq, c.lq, c.d]),
        d.t4(&d.k, [c.b, c.hkv, c.lk, c.d]),
        d.t4(&d.v, [c.b, c.hkv, c.lk, c.dv]),
    );
    let out = AttentionOutputs {
        o: Tensor4Mut::bhld(o.view_mut(), os),
        lse: Some(lse.view_mut()),
        e: Some(e.view_mut()),
    };
    let r = attention::forward_into(
        &c.spec(),
        &tq,
        &tk,
        &tv,
        pr,
        None,
        out,
        dev.default_stream(),
    );
    (
        r,
        (
            o.to_vec().unwrap(),
            lse.to_vec().unwrap(),
            e.to_vec().unwrap(),
        ),
    )
}

fn check_lse(what: &str, got: &[f32], want: &[f64], tol: f64) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w == f64::NEG_INFINITY {
            g == f32::NEG_INFINITY
        } else {
            (g as f64 - w).abs() <= tol * w.abs().max(1.0)
        };
        assert!(ok, "{what}: lse[{i}] = {g}, reference {w}");
    }
}

/// Runs `c` in T and holds o, lse, e (and, with `probs`, the probabilities) to the reference.
fn check<T: Element>(dev: &Device, c: &Case, probs: bool) {
    let x = host::<T>(c);
    let (want, want_w) = reference_of(c, &x);
    let d = Dev::new(dev, c, &x);
    let pr = d.precisions(c);
    let (r, (o, lse, e)) = run(dev, c, &d, &pr);
    r.unwrap_or_else(|err| panic!("{c:?}: {err}"));
    let tol = tol::<T>();
    let what = format!("{} {c:?}", T::DTYPE.suffix());
    let err = rel_err(&f64s(&o), &want.o);
    assert!(err < tol, "{what}: o rel err {err:e}");
    check_lse(&what, &lse, &want.lse, tol);
    let err = rel_err(&e, &want.e);
    assert!(err < tol, "{what}: e rel err {err:e}");
    if probs {
        let n = c.b * c.hq * c.lq * c.lk;
        let mut w = dev.upload(&vec![f32::NAN; n]).unwrap();
        attention::probabilities_into(
            &c.spec(),
            &d.t4(&d.q, [c.b, c.hq, c.lq, c.d]),
            &d.t4(&d.k, [c.b, c.hkv, c.lk, c.d]),
            &d.t4(&d.v, [c.b, c.hkv, c.lk, c.dv]),
            &pr,
            None,
            w.view_mut(),
            dev.default_stream(),
        )
        .unwrap_or_else(|err| panic!("{what}: probabilities: {err}"));
        let w = w.to_vec().unwrap();
        // f32 scores from the same rounded inputs in every dtype: the f32 bound.
        let err = rel_err(&w, &want_w);
        assert!(err < 1e-5, "{what}: probabilities rel err {err:e}");
        let zeros = want_w
            .iter()
            .zip(&w)
            .filter(|(r, g)| **r == 0.0 && **g != 0.0)
            .count();
        assert_eq!(
            zeros, 0,
            "{what}: probabilities nonzero where the reference's are 0"
        );
    }
}

/// The case list of one family (seeds apart per family and case).
fn family_cases(score: Score, fi: u64) -> Vec<Case> {
    let s = 1000 * fi;
    let (b, hq, lq, lk) = (2, 4, 33, 47);
    let mut out = Vec::new();
    // Bias per key [B, H, 1, Lk], causal (Lq < Lk: bottom-right).
    let mut c = Case::new(score, s + 1);
    (c.bias, c.causal) = (Some(([b, hq, 1, lk], false)), true);
    out.push(c);
    // Bias [1, H, Lq, Lk] (per row: applied per score), window, per-key precision.
    let mut c = Case::new(score, s + 2);
    (c.bias, c.window, c.pi_key) = (Some(([1, hq, lq, lk], false)), Some(9), true);
    out.push(c);
    // Bias [B, 1, Lq, Lk] with −∞ (some rows may lose every key).
    let mut c = Case::new(score, s + 3);
    c.bias = Some(([b, 1, lq, lk], true));
    out.push(c);
    // Mask [B, 1, 1, Lk] (padding-style), with a per-key bias too.
    let mut c = Case::new(score, s + 4);
    (c.mask, c.bias) = (Some(([b, 1, 1, lk], false)), Some(([1, 1, 1, lk], false)));
    out.push(c);
    // Mask [1, 1, Lq, Lk] with row 3 fully masked, causal.
    let mut c = Case::new(score, s + 5);
    (c.mask, c.causal) = (Some(([1, 1, lq, lk], true)), true);
    out.push(c);
    // Packed: 3 sequences, one without queries and one without keys, causal.
    let mut c = Case::new(score, s + 6).packed(&[7, 0, 19, 5], &[12, 5, 17, 0]);
    c.causal = true;
    out.push(c);
    // Packed with a window and per-key precision; a sequence with Lq > Lk (first rows see none).
    let mut c = Case::new(score, s + 7).packed(&[21, 9, 0], &[30, 4, 6]);
    (c.window, c.pi_key) = (Some(5), true);
    out.push(c);
    if matches!(score, Score::StudentT(_)) {
        // ν per head, with a per-row bias and packed sequences.
        let mut c = Case::new(score, s + 8);
        (c.nu_head, c.bias) = (true, Some(([b, hq, lq, lk], false)));
        out.push(c);
        let mut c = Case::new(score, s + 9).packed(&[3, 18], &[25, 11]);
        (c.nu_head, c.causal) = (true, true);
        out.push(c);
    }
    out
}

const FAMILIES: [Score; 4] = [
    Score::Dot,
    Score::Gaussian,
    Score::StudentT(3.0),
    Score::Laplace,
];

#[test]
fn score_inputs_match_reference() {
    let Some(dev) = gpu("score_inputs_match_reference") else {
        return;
    };
    for (fi, score) in FAMILIES.into_iter().enumerate() {
        for c in family_cases(score, fi as u64) {
            check::<f32>(&dev, &c, false);
            check::<bf16>(&dev, &c, false);
        }
    }
}

/// Wider heads (v1 at Dv = 256 in 16-bit; D = 64) with a per-row bias, a mask and packed rows.
#[test]
fn score_inputs_other_head_dims() {
    let Some(dev) = gpu("score_inputs_other_head_dims") else {
        return;
    };
    for (fi, score) in [Score::Dot, Score::StudentT(4.0)].into_iter().enumerate() {
        let mut c = Case::new(score, 50 + fi as u64);
        (c.d, c.dv, c.lq, c.lk, c.hq, c.hkv) = (64, 256, 17, 21, 2, 1);
        (c.bias, c.mask) = (Some(([2, 2, 17, 21], true)), Some(([2, 1, 1, 21], false)));
        check::<f32>(&dev, &c, false);
        check::<bf16>(&dev, &c, false);
        let mut c = Case::new(score, 60 + fi as u64).packed(&[4, 0, 13], &[9, 3, 8]);
        (c.d, c.dv, c.hq, c.hkv, c.causal) = (64, 64, 2, 2, true);
        check::<bf16>(&dev, &c, false);
    }
}

/// Decode (Lq ≤ 16) with forced key splits (incl. more splits than key tiles) over a bias and a
/// mask broadcast over Lq, per-head ν and packed sequences: each split attends its chunk,
/// merge.cu joins them; and a per-row bias (the row kernel, unsplit).
#[test]
fn decode_splits_with_score_inputs() {
    let Some(dev) = gpu("decode_splits_with_score_inputs") else {
        return;
    };
    for (fi, score) in [Score::Dot, Score::StudentT(2.0)].into_iter().enumerate() {
        let s = 200 + 10 * fi as u64;
        let mut c = Case::new(score, s);
        (c.lq, c.lk, c.key_splits) = (3, 300, Some(3));
        c.bias = Some(([2, 4, 3, 300], true));
        c.mask = Some(([2, 1, 1, 300], false));
        c.nu_head = matches!(score, Score::StudentT(_));
        check::<f32>(&dev, &c, false);
        check::<bf16>(&dev, &c, false);
        // Broadcast over Lq: the split fused kernels (the one above runs the row kernel, unsplit).
        let mut c = Case::new(score, s + 3);
        (c.lq, c.lk, c.key_splits) = (2, 290, Some(4));
        c.bias = Some(([2, 4, 1, 290], true));
        c.mask = Some(([2, 1, 1, 290], false));
        c.nu_head = matches!(score, Score::StudentT(_));
        check::<f32>(&dev, &c, false);
        check::<bf16>(&dev, &c, false);
        let mut c = Case::new(score, s + 1).packed(&[1, 0, 2, 4], &[130, 7, 250, 0]);
        (c.key_splits, c.causal) = (Some(5), true);
        check::<f32>(&dev, &c, false);
        check::<bf16>(&dev, &c, false);
        // More splits than key tiles: most chunks empty.
        let mut c = Case::new(score, s + 2).packed(&[2, 1], &[20, 3]);
        c.key_splits = Some(9);
        check::<f32>(&dev, &c, false);
    }
}

/// The materialised probabilities against the reference's: a per-row bias with −∞, a mask with
/// a fully masked row, ν per head, packed sequences (zero across sequences), causal and window.
#[test]
fn probabilities_match_reference() {
    let Some(dev) = gpu("probabilities_match_reference") else {
        return;
    };
    for (fi, score) in FAMILIES.into_iter().enumerate() {
        let s = 300 + 10 * fi as u64;
        let mut c = Case::new(score, s);
        (c.bias, c.mask, c.causal) = (
            Some(([1, 4, 33, 47], true)),
            Some(([2, 1, 33, 47], true)),
            true,
        );
        (c.pi_key, c.nu_head) = (true, matches!(score, Score::StudentT(_)));
        check::<f32>(&dev, &c, true);
        let mut c = Case::new(score, s + 1).packed(&[7, 0, 19], &[12, 5, 17]);
        c.window = Some(6);
        check::<bf16>(&dev, &c, true);
    }
}

/// A small problem whose one bad input the scan must name, leaving o, lse and e poisoned.
fn refused(dev: &Device, c: &Case, spoil: impl Fn(&mut Host<f32>), name: &str, says: &str) {
    let mut x = host::<f32>(c);
    spoil(&mut x);
    let d = Dev::new(dev, c, &x);
    let (r, (o, lse, e)) = run(dev, c, &d, &d.precisions(c));
    let Err(err) = r else {
        panic!("{name} ({says}): accepted");
    };
    let msg = err.to_string();
    assert!(
        matches!(err, Error::InvalidArgument { .. }) && msg.contains(name) && msg.contains(says),
        "{name}: expected an invalid argument saying {says:?}, got {msg}"
    );
    assert!(o.iter().all(|v| v.is_nan()), "{name}: o written");
    assert!(
        lse.iter().chain(&e).all(|v| v.is_nan()),
        "{name}: lse or e written"
    );
}

#[test]
fn bad_values_are_refused_before_writing() {
    let Some(dev) = gpu("bad_values_are_refused_before_writing") else {
        return;
    };
    let mut c = Case::new(Score::StudentT(3.0), 400);
    c.nu_head = true;
    refused(
        &dev,
        &c,
        |x| x.nu.as_mut().unwrap()[2] = 0.0,
        "nu",
        "nu[2] is 0",
    );
    refused(
        &dev,
        &c,
        |x| x.nu.as_mut().unwrap()[1] = -1.0,
        "nu",
        "finite and > 0",
    );
    refused(
        &dev,
        &c,
        |x| x.nu.as_mut().unwrap()[3] = f32::INFINITY,
        "nu",
        "nu[3]",
    );
    let mut c = Case::new(Score::Dot, 401);
    c.bias = Some(([2, 1, 33, 47], false));
    refused(
        &dev,
        &c,
        |x| x.bias.as_mut().unwrap().0[100] = f32::NAN,
        "bias",
        "element 100 is NaN",
    );
    refused(
        &dev,
        &c,
        |x| x.bias.as_mut().unwrap().0[7] = f32::INFINITY,
        "bias",
        "element 7 is inf",
    );
    let c = Case::new(Score::Gaussian, 402).packed(&[7, 0, 19], &[12, 5, 17]);
    let spoil_q = |i: usize, v: i32| move |x: &mut Host<f32>| x.cu.as_mut().unwrap().0[i] = v;
    let spoil_k = |i: usize, v: i32| move |x: &mut Host<f32>| x.cu.as_mut().unwrap().1[i] = v;
    refused(&dev, &c, spoil_q(0, 1), "cu_seqlens_q", "must start at 0");
    refused(&dev, &c, spoil_k(2, 3), "cu_seqlens_k", "nondecreasing");
    refused(
        &dev,
        &c,
        spoil_q(3, 25),
        "cu_seqlens_q",
        "end at the packed length 26",
    );
    // A length above max_seqlen_q (19): 0, 0, 0, 26 holds sequence 2 of length 26.
    let long = |x: &mut Host<f32>| x.cu.as_mut().unwrap().0[1..3].fill(0);
    refused(
        &dev,
        &c,
        long,
        "cu_seqlens_q",
        "length 26 > the max length 19",
    );
}
