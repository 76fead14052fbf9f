//! The score inputs of attention (issue 23) on the CPU: the additive bias β broadcast to the
//! scores and its gradient dβ, the boolean mask, Student-t's ν per query head and dν per head,
//! lse as a differentiable output (d_lse), packed variable-length sequences, and the
//! materialised probabilities. Checked against central finite differences of the f64 reference,
//! against PyTorch float64 autograd (tests/fixtures/attention_inputs_torch.json, generator
//! tests/fixtures/gen_attention_inputs.py), varlen against each sequence run alone, fully
//! masked rows, determinism, an independent score computation, and bad input.

// `!(err <= tol)` on purpose: a NaN error must fail.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

mod common;

use common::attention::{load_inputs, precision, raw_bits, tensor_data, uniform_pm1};
use fep_kernels::attention::reference::{
    self, RefBroadcast, RefGradInputs, RefGradients, RefInputs, RefOutputs, RefVarlen,
};
use fep_kernels::attention::{
    self, AttentionOutputs, AttentionSpec, BackwardInputs, Gradients, Precisions, Score, ScoreBias,
    Tensor4, Tensor4Mut, Varlen,
};
use fep_kernels::{Device, Error, View};
use serde_json::Value;

// Tensor ids of the generator (ATTENTION-CONVENTIONS.md §2, gen_attention_inputs.py).
const TID_D_O: u64 = 7;
const TID_D_E: u64 = 8;
const TID_BIAS: u64 = 9;
const TID_MASK: u64 = 10;
const TID_NU: u64 = 11;
const TID_D_LSE: u64 = 12;

// =============================================================================================
// Problems
// =============================================================================================

/// One problem with its upstream gradients, every tensor row-major BHLD f64.
#[derive(Clone, Debug)]
struct P {
    name: String,
    spec: AttentionSpec,
    b: usize,
    hq: usize,
    hkv: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    pi_head: Option<Vec<f64>>,
    pi_key: Option<Vec<f64>>,
    kv_len: Option<Vec<i32>>,
    nu_head: Option<Vec<f64>>,
    bias: Option<(Vec<f64>, [usize; 4])>,
    mask: Option<(Vec<bool>, [usize; 4])>,
    varlen: Option<(Vec<i32>, Vec<i32>)>,
    d_o: Vec<f64>,
    d_e: Option<Vec<f64>>,
    d_lse: Option<Vec<f64>>,
}

fn uni(seed: u64, tid: u64, n: usize) -> Vec<f64> {
    raw_bits(seed, tid, n)
        .into_iter()
        .map(uniform_pm1)
        .collect()
}

/// A problem from the fixtures' generator: q, k, v uniform in [−1, 1), both precisions in
/// [0.25, 4), d_o, d_e and d_lse uniform (all three terms in the loss).
fn prob(name: &str, spec: AttentionSpec, seed: u64, [b, hq, hkv, lq, lk, d, dv]: [usize; 7]) -> P {
    let rows = b * hq * lq;
    let pr = |tid, n| -> Vec<f64> { raw_bits(seed, tid, n).into_iter().map(precision).collect() };
    P {
        name: name.to_string(),
        spec,
        b,
        hq,
        hkv,
        lq,
        lk,
        d,
        dv,
        q: uni(seed, 1, rows * d),
        k: uni(seed, 2, b * hkv * lk * d),
        v: uni(seed, 3, b * hkv * lk * dv),
        pi_head: Some(pr(4, hq)),
        pi_key: Some(pr(5, b * hkv * lk)),
        kv_len: None,
        nu_head: None,
        bias: None,
        mask: None,
        varlen: None,
        d_o: uni(seed, TID_D_O, rows * dv),
        d_e: Some(uni(seed, TID_D_E, rows)),
        d_lse: Some(uni(seed, TID_D_LSE, rows)),
    }
}

/// The full shape of a broadcast shape given as "f" (full) or "1" per B, Hq, Lq.
fn bshape(p: &P, spec: &str) -> [usize; 4] {
    let full = [p.b, p.hq, p.lq];
    let c: Vec<char> = spec.chars().collect();
    [
        if c[0] == 'f' { full[0] } else { 1 },
        if c[1] == 'f' { full[1] } else { 1 },
        if c[2] == 'f' { full[2] } else { 1 },
        p.lk,
    ]
}

impl P {
    fn seed(&self) -> u64 {
        self.name.bytes().fold(0xcbf29ce484222325u64, |h, c| {
            (h ^ c as u64).wrapping_mul(0x100000001b3)
        })
    }

    /// A bias of broadcast shape `spec` in [−scale, scale).
    fn with_bias(mut self, spec: &str, scale: f64) -> Self {
        let shape = bshape(&self, spec);
        let n: usize = shape.iter().product();
        let vals = uni(self.seed(), TID_BIAS, n)
            .iter()
            .map(|x| x * scale)
            .collect();
        self.bias = Some((vals, shape));
        self
    }

    /// A mask of broadcast shape `spec`, 3 of 4 kept.
    fn with_mask(mut self, spec: &str) -> Self {
        let shape = bshape(&self, spec);
        let n: usize = shape.iter().product();
        let vals = raw_bits(self.seed(), TID_MASK, n)
            .into_iter()
            .map(|x| (x >> 62) != 0)
            .collect();
        self.mask = Some((vals, shape));
        self
    }

    /// ν per head in [0.5, 8).
    fn with_nu_head(mut self) -> Self {
        assert!(matches!(self.spec.score, Score::StudentT(_)));
        let nu = raw_bits(self.seed(), TID_NU, self.hq)
            .into_iter()
            .map(|x| 2.0 * precision(x))
            .collect();
        self.nu_head = Some(nu);
        self
    }

    fn loss_terms(mut self, o: bool, e: bool, lse: bool) -> Self {
        if !o {
            self.d_o.iter_mut().for_each(|x| *x = 0.0);
        }
        if !e {
            self.d_e = None;
        }
        if !lse {
            self.d_lse = None;
        }
        self
    }

    fn inputs(&self) -> RefInputs<'_> {
        RefInputs {
            b: self.b,
            hq: self.hq,
            hkv: self.hkv,
            lq: self.lq,
            lk: self.lk,
            d: self.d,
            dv: self.dv,
            q: &self.q,
            k: &self.k,
            v: &self.v,
            pi_head: self.pi_head.as_deref(),
            pi_key: self.pi_key.as_deref(),
            kv_len: self.kv_len.as_deref(),
            nu_head: self.nu_head.as_deref(),
            bias: self.bias.as_ref().map(|(values, shape)| RefBroadcast {
                values,
                shape: *shape,
            }),
            mask: self.mask.as_ref().map(|(values, shape)| RefBroadcast {
                values,
                shape: *shape,
            }),
            varlen: self
                .varlen
                .as_ref()
                .map(|(cu_q, cu_k)| RefVarlen { cu_q, cu_k }),
        }
    }

    fn forward(&self) -> RefOutputs {
        reference::forward(&self.spec, &self.inputs())
            .unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    fn grads(&self) -> RefGradients {
        reference::backward(
            &self.spec,
            &self.inputs(),
            &RefGradInputs {
                d_o: &self.d_o,
                d_e: self.d_e.as_deref(),
                d_lse: self.d_lse.as_deref(),
            },
        )
        .unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    /// Every f64 input rounded to f32 (what the f32 device path sees).
    fn rounded(&self) -> P {
        let r = |x: &[f64]| x.iter().map(|&v| v as f32 as f64).collect::<Vec<_>>();
        let mut p = self.clone();
        for x in [&mut p.q, &mut p.k, &mut p.v, &mut p.d_o] {
            *x = r(x);
        }
        for x in [
            p.pi_head.as_mut(),
            p.pi_key.as_mut(),
            p.nu_head.as_mut(),
            p.d_e.as_mut(),
            p.d_lse.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            *x = r(x);
        }
        if let Some((b, _)) = p.bias.as_mut() {
            *b = r(b);
        }
        p
    }

    fn rows(&self) -> usize {
        self.b * self.hq * self.lq
    }
}

// =============================================================================================
// Finite differences of the f64 reference
// =============================================================================================

const FD_TOL: f64 = 1e-7;
const FD_FLOOR: f64 = 1e-3;
const FD_MAX: usize = 200;

/// L = Σ d_o·o + Σ d_e·e + Σ d_lse·lse (rows with lse = −∞ left out).
fn loss(p: &P) -> f64 {
    let r = p.forward();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let mut l = dot(&p.d_o, &r.o);
    if let Some(de) = &p.d_e {
        l += dot(de, &r.e);
    }
    if let Some(dl) = &p.d_lse {
        l += dl
            .iter()
            .zip(&r.lse)
            .filter(|(_, x)| x.is_finite())
            .map(|(a, b)| a * b)
            .sum::<f64>();
    }
    assert!(l.is_finite(), "{}: loss {l}", p.name);
    l
}

/// The differentiable tensors of a problem by name, read and written.
fn tensor_mut<'a>(p: &'a mut P, name: &str) -> &'a mut Vec<f64> {
    match name {
        "q" => &mut p.q,
        "k" => &mut p.k,
        "v" => &mut p.v,
        "pi_head" => p.pi_head.as_mut().unwrap(),
        "pi_key" => p.pi_key.as_mut().unwrap(),
        "nu_head" => p.nu_head.as_mut().unwrap(),
        "bias" => &mut p.bias.as_mut().unwrap().0,
        _ => unreachable!(),
    }
}

/// Worst scaled deviation per tensor of the reference's gradients from central differences.
fn fd_check(p: &P) -> Vec<(&'static str, f64)> {
    // Precisions are always present here (the gradients at π = 1 are attention_backward_cpu's).
    assert!(p.pi_head.is_some() && p.pi_key.is_some());
    let g = p.grads();
    let mut names = vec!["q", "k", "v", "pi_head", "pi_key"];
    if p.nu_head.is_some() {
        names.push("nu_head");
    }
    if p.bias.is_some() {
        names.push("bias");
    }
    let mut rng = common::rng(p.seed());
    let mut out = Vec::new();
    for name in names {
        let r: &[f64] = match name {
            "q" => &g.dq,
            "k" => &g.dk,
            "v" => &g.dv,
            "pi_head" => &g.dpi_head,
            "pi_key" => &g.dpi_key,
            "nu_head" => &g.dnu_head,
            "bias" => &g.dbias,
            _ => unreachable!(),
        };
        let x0 = tensor_mut(&mut p.clone(), name).clone();
        assert_eq!(r.len(), x0.len(), "{}: d{name} length", p.name);
        assert!(
            r.iter().all(|x| x.is_finite()),
            "{}: d{name} not finite",
            p.name
        );
        // −∞ biases are not differentiable: their gradient is exactly 0.
        let cand: Vec<usize> = (0..x0.len()).filter(|&i| x0[i].is_finite()).collect();
        for i in (0..x0.len()).filter(|&i| !x0[i].is_finite()) {
            assert_eq!(r[i], 0.0, "{}: d{name}[{i}] at −∞", p.name);
        }
        let idx: Vec<usize> = if cand.len() <= FD_MAX {
            cand
        } else {
            rand::seq::index::sample(&mut rng, cand.len(), FD_MAX)
                .into_iter()
                .map(|i| cand[i])
                .collect()
        };
        let mut worst = 0.0f64;
        let mut scale = FD_FLOOR;
        let mut fds = Vec::with_capacity(idx.len());
        for &i in &idx {
            let v = x0[i];
            let h = 1e-5 * v.abs().max(1.0);
            let mut pp = p.clone();
            tensor_mut(&mut pp, name)[i] = v + h;
            let lp = loss(&pp);
            let hp = tensor_mut(&mut pp, name)[i];
            tensor_mut(&mut pp, name)[i] = v - h;
            let lm = loss(&pp);
            let hm = tensor_mut(&mut pp, name)[i];
            let fd = (lp - lm) / (hp - hm);
            scale = scale.max(fd.abs()).max(r[i].abs());
            fds.push(fd);
        }
        for (&i, fd) in idx.iter().zip(&fds) {
            worst = worst.max((r[i] - fd).abs() / scale);
        }
        out.push((name, worst));
    }
    out
}

/// Runs [`fd_check`] on every problem; prints, returns the worst, asserts the tolerance.
fn run_fd(probs: &[P]) -> f64 {
    let mut failures = Vec::new();
    let mut overall = (0.0f64, String::new());
    for p in probs {
        let errs = fd_check(p);
        let m = errs.iter().map(|e| e.1).fold(0.0, f64::max);
        let line = errs
            .iter()
            .map(|(n, e)| format!("{n} {e:.1e}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!("{}: {line}", p.name);
        if !(m <= FD_TOL) {
            failures.push(format!("{}: {line}", p.name));
        }
        if m > overall.0 {
            overall = (m, p.name.clone());
        }
    }
    println!("worst: {:.2e} ({})", overall.0, overall.1);
    assert!(failures.is_empty(), "failing:\n{}", failures.join("\n"));
    overall.0
}

const FAMILIES: [Score; 4] = [
    Score::Dot,
    Score::Gaussian,
    Score::StudentT(3.0),
    Score::Laplace,
];

fn tag(s: Score) -> String {
    match s {
        Score::Dot => "dot".into(),
        Score::Gaussian => "gaussian".into(),
        Score::StudentT(nu) => format!("studentt{nu}"),
        Score::Laplace => "laplace".into(),
    }
}

/// Shape B 2, Hq 4, Hkv 2 (GQA), Lq 4, Lk 5, D 3, Dv 2.
const SHAPE: [usize; 7] = [2, 4, 2, 4, 5, 3, 2];

#[test]
fn fd_dbias_every_broadcast_shape_and_family() {
    let mut probs = Vec::new();
    for (fi, score) in FAMILIES.into_iter().enumerate() {
        for (si, bs) in ["fff", "ff1", "1ff", "f1f", "111"].into_iter().enumerate() {
            // Alternate plain, causal, causal + mask, window + mask.
            let spec = AttentionSpec::new(score);
            let (spec, mask) = match (fi + si) % 4 {
                0 => (spec, None),
                1 => (spec.causal(true), None),
                2 => (spec.causal(true), Some("f1f")),
                _ => (spec.window(2), Some("fff")),
            };
            let name = format!(
                "{}/bias_{bs}/mask_{mask:?}/causal_{}",
                tag(score),
                spec.is_causal()
            );
            let mut p = prob(&name, spec, 1000 + (fi * 10 + si) as u64, SHAPE).with_bias(bs, 1.5);
            if let Some(m) = mask {
                p = p.with_mask(m);
            }
            probs.push(p);
        }
    }
    // A per-key bias with −∞ entries and a masked score matrix with Lq > Lk.
    let mut p = prob(
        "gaussian/bias_ff1_neg_inf",
        AttentionSpec::new(Score::Gaussian),
        1100,
        SHAPE,
    )
    .with_bias("ff1", 1.0);
    p.bias.as_mut().unwrap().0[3] = f64::NEG_INFINITY;
    p.bias.as_mut().unwrap().0[7] = f64::NEG_INFINITY;
    probs.push(p);
    probs.push(
        prob(
            "laplace/bias_fff_lq_gt_lk_kvlen",
            AttentionSpec::new(Score::Laplace).causal(true),
            1101,
            [2, 4, 2, 6, 4, 3, 2],
        )
        .with_bias("fff", 1.0)
        .with_mask("1ff"),
    );
    probs.last_mut().unwrap().kv_len = Some(vec![4, 2]);
    let worst = run_fd(&probs);
    // The check can fail: a gradient off by the broadcast sum would be O(1).
    assert!(worst > 0.0);
}

#[test]
fn fd_dnu_per_head() {
    let mut probs = Vec::new();
    for (i, (spec, shape)) in [
        (AttentionSpec::new(Score::StudentT(3.0)), SHAPE),
        (AttentionSpec::new(Score::StudentT(3.0)).causal(true), SHAPE),
        (
            AttentionSpec::new(Score::StudentT(1.0))
                .window(2)
                .normalizer(false),
            SHAPE,
        ),
        (
            AttentionSpec::new(Score::StudentT(3.0)).scale(0.375),
            [1, 4, 1, 5, 6, 4, 3],
        ),
        (
            AttentionSpec::new(Score::StudentT(3.0)).causal(true),
            [2, 4, 4, 6, 3, 3, 2],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("studentt/nu_head/{i}/causal_{}", spec.is_causal());
        let mut p = prob(&name, spec, 1200 + i as u64, shape).with_nu_head();
        if i == 1 {
            p = p.with_mask("fff").with_bias("1f1", 1.0);
        }
        if i == 2 {
            // ν < 1 and ν large in the same call.
            p.nu_head = Some(vec![0.3, 7.5, 1.0, 20.0]);
        }
        probs.push(p);
    }
    let worst = run_fd(&probs);
    assert!(worst > 0.0);
    // The per-head gradients are per head: each differs from the others, and their sum is dν.
    for p in &probs {
        let g = p.grads();
        let s: f64 = g.dnu_head.iter().sum();
        assert!((g.dnu - s).abs() <= 1e-12 * s.abs().max(1.0), "{}", p.name);
        assert!(g.dnu_head.iter().all(|x| *x != 0.0), "{}", p.name);
    }
    // A per-head ν equal to the spec's on every head gives the spec's gradients (dν summed).
    let p = prob(
        "studentt/nu_head_uniform",
        AttentionSpec::new(Score::StudentT(3.0)),
        1210,
        SHAPE,
    );
    let mut ph = p.clone();
    ph.nu_head = Some(vec![3.0; p.hq]);
    let (g, gh) = (p.grads(), ph.grads());
    assert!((g.dnu - gh.dnu).abs() <= 1e-12 * g.dnu.abs().max(1.0));
    assert_eq!(g.dq, gh.dq);
}

#[test]
fn fd_d_lse_alone() {
    let mut probs = Vec::new();
    for (fi, score) in FAMILIES.into_iter().enumerate() {
        let spec = AttentionSpec::new(score);
        let base = prob(
            &format!("{}/lse_only", tag(score)),
            spec,
            1300 + fi as u64,
            SHAPE,
        )
        .loss_terms(false, false, true);
        probs.push(base);
        let masked = prob(
            &format!("{}/lse_only_causal_mask_bias", tag(score)),
            spec.causal(true),
            1310 + fi as u64,
            [2, 4, 2, 6, 4, 3, 2],
        )
        .loss_terms(false, false, true)
        .with_mask("fff")
        .with_bias("f1f", 1.0);
        probs.push(masked);
    }
    let worst = run_fd(&probs);
    assert!(worst > 0.0);
    for p in &probs {
        let g = p.grads();
        // v does not reach lse: dv = 0 exactly.
        assert!(g.dv.iter().all(|&x| x == 0.0), "{}: dv", p.name);
        // With the lse term alone, dβ_ij = w_ij d_lse_i: for a full-shape bias, each row of
        // dβ sums to d_lse_i (or 0 for a fully masked row).
        if p.bias
            .as_ref()
            .is_some_and(|b| b.1 == [p.b, p.hq, p.lq, p.lk])
        {
            let f = p.forward();
            let dl = p.d_lse.as_ref().unwrap();
            for row in 0..p.rows() {
                let s: f64 = g.dbias[row * p.lk..][..p.lk].iter().sum();
                let want = if f.lse[row].is_finite() { dl[row] } else { 0.0 };
                assert!(
                    (s - want).abs() <= 1e-14,
                    "{}: row {row}: {s} vs {want}",
                    p.name
                );
            }
        }
    }
    // lse alone with a full bias: dβ = w · d_lse = the probabilities times d_lse.
    let p = prob(
        "dot/lse_only_full_bias",
        AttentionSpec::new(Score::Dot),
        1320,
        SHAPE,
    )
    .loss_terms(false, false, true)
    .with_bias("fff", 1.0);
    let g = p.grads();
    let w = reference::probabilities(&p.spec, &p.inputs()).unwrap();
    let dl = p.d_lse.as_ref().unwrap();
    for (i, (&db, &wi)) in g.dbias.iter().zip(&w).enumerate() {
        assert!((db - wi * dl[i / p.lk]).abs() <= 1e-15, "dbias[{i}]");
    }
}

// =============================================================================================
// The f32 device path
// =============================================================================================

fn f32s(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn to_blhd<T: Copy>(x: &[T], [b, h, l, d]: [usize; 4]) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for bi in 0..b {
        for li in 0..l {
            for hi in 0..h {
                out.extend_from_slice(&x[((bi * h + hi) * l + li) * d..][..d]);
            }
        }
    }
    out
}

fn from_blhd<T: Copy>(x: &[T], [b, h, l, d]: [usize; 4]) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for bi in 0..b {
        for hi in 0..h {
            for li in 0..l {
                out.extend_from_slice(&x[((bi * l + li) * h + hi) * d..][..d]);
            }
        }
    }
    out
}

/// What the device path returned, widened, BHLD.
#[derive(Clone, Debug)]
struct DevOut {
    o: Vec<f64>,
    lse: Vec<f64>,
    e: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    dpi_head: Vec<f64>,
    dpi_key: Vec<f64>,
    dnu: Vec<f64>,
    dbias: Vec<f64>,
    /// The raw f32 bits of every output, in order (for determinism checks).
    bits: Vec<u32>,
}

/// The problem's inputs as f32/u8/i32 host buffers.
struct Host32 {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    ph: Option<Vec<f32>>,
    pk: Option<Vec<f32>>,
    nu: Option<Vec<f32>>,
    bias: Option<Vec<f32>>,
    mask: Option<Vec<u8>>,
    d_o: Vec<f32>,
    d_e: Option<Vec<f32>>,
    d_lse: Option<Vec<f32>>,
}

impl Host32 {
    fn new(p: &P, blhd: bool) -> Self {
        let lay = |x: &[f64], s: [usize; 4]| {
            let x = f32s(x);
            if blhd { to_blhd(&x, s) } else { x }
        };
        Host32 {
            q: lay(&p.q, [p.b, p.hq, p.lq, p.d]),
            k: lay(&p.k, [p.b, p.hkv, p.lk, p.d]),
            v: lay(&p.v, [p.b, p.hkv, p.lk, p.dv]),
            ph: p.pi_head.as_deref().map(f32s),
            pk: p.pi_key.as_deref().map(f32s),
            nu: p.nu_head.as_deref().map(f32s),
            bias: p.bias.as_ref().map(|b| f32s(&b.0)),
            mask: p
                .mask
                .as_ref()
                .map(|m| m.0.iter().map(|&x| x as u8 * 3).collect()),
            d_o: lay(&p.d_o, [p.b, p.hq, p.lq, p.dv]),
            d_e: p.d_e.as_deref().map(f32s),
            d_lse: p.d_lse.as_deref().map(f32s),
        }
    }

    fn t4<'a>(&self, x: &'a [f32], s: [usize; 4], blhd: bool) -> Tensor4<'a, f32> {
        if blhd {
            Tensor4::blhd(common::host(x), s)
        } else {
            Tensor4::bhld(common::host(x), s)
        }
    }
}

/// Forward then backward (every gradient) through `forward_into` / `backward_into` on
/// `Device::reference()` in f32, outputs poisoned with NaN; BLHD tensors when `blhd`.
fn device_run(p: &P, blhd: bool) -> DevOut {
    let h = Host32::new(p, blhd);
    let (qs, ks, vs, os) = (
        [p.b, p.hq, p.lq, p.d],
        [p.b, p.hkv, p.lk, p.d],
        [p.b, p.hkv, p.lk, p.dv],
        [p.b, p.hq, p.lq, p.dv],
    );
    let (tq, tk, tv) = (
        h.t4(&h.q, qs, blhd),
        h.t4(&h.k, ks, blhd),
        h.t4(&h.v, vs, blhd),
    );
    let vl = p.varlen.as_ref();
    let prec = Precisions {
        head: h.ph.as_deref().map(View::host),
        key: h.pk.as_deref().map(View::host),
        nu: h.nu.as_deref().map(View::host),
        bias: h
            .bias
            .as_deref()
            .map(|b| ScoreBias::contiguous(common::host(b), p.bias.as_ref().unwrap().1)),
        mask: h
            .mask
            .as_deref()
            .map(|m| ScoreBias::contiguous(common::host(m), p.mask.as_ref().unwrap().1)),
        varlen: vl.map(|(cq, ck)| Varlen {
            cu_q: common::host(cq),
            cu_k: common::host(ck),
            max_q: cq
                .windows(2)
                .map(|w| (w[1] - w[0]) as usize)
                .max()
                .unwrap()
                .max(1),
            max_k: ck
                .windows(2)
                .map(|w| (w[1] - w[0]) as usize)
                .max()
                .unwrap()
                .max(1),
        }),
    };
    let kl = p.kv_len.as_deref().map(View::host);
    let rows = p.rows();
    let dev = Device::reference();
    fn mk4_(x: &mut [f32], s: [usize; 4], blhd: bool) -> Tensor4Mut<'_, f32> {
        if blhd {
            Tensor4Mut::blhd(common::host_mut(x), s)
        } else {
            Tensor4Mut::bhld(common::host_mut(x), s)
        }
    }

    let mut o = vec![f32::NAN; rows * p.dv];
    let mut lse = vec![f32::NAN; rows];
    let mut e = vec![f32::NAN; rows];
    attention::forward_into(
        &p.spec,
        &tq,
        &tk,
        &tv,
        &prec,
        kl.as_ref(),
        AttentionOutputs {
            o: mk4_(&mut o, os, blhd),
            lse: Some(common::host_mut(&mut lse)),
            e: Some(common::host_mut(&mut e)),
        },
        dev.default_stream(),
    )
    .unwrap_or_else(|err| panic!("{}: forward: {err}", p.name));

    let nb = p.bias.as_ref().map_or(0, |b| b.0.len());
    let mut dq = vec![f32::NAN; rows * p.d];
    let mut dk = vec![f32::NAN; p.b * p.hkv * p.lk * p.d];
    let mut dvv = vec![f32::NAN; p.b * p.hkv * p.lk * p.dv];
    let mut dph = vec![f32::NAN; p.hq];
    let mut dpk = vec![f32::NAN; p.b * p.hkv * p.lk];
    let mut dnu = vec![f32::NAN; if p.nu_head.is_some() { p.hq } else { 1 }];
    let mut dbias = vec![f32::NAN; nb];
    {
        let inputs = BackwardInputs {
            o: h.t4(&o, os, blhd),
            lse: common::host(&lse),
            d_o: h.t4(&h.d_o, os, blhd),
            e: Some(common::host(&e)),
            d_e: h.d_e.as_deref().map(View::host),
            d_lse: h.d_lse.as_deref().map(View::host),
        };
        let out = Gradients {
            dq: mk4_(&mut dq, qs, blhd),
            dk: mk4_(&mut dk, ks, blhd),
            dv: mk4_(&mut dvv, vs, blhd),
            dpi_head: Some(common::host_mut(&mut dph)),
            dpi_key: Some(common::host_mut(&mut dpk)),
            dnu: Some(common::host_mut(&mut dnu)),
            dbias: p.bias.as_ref().map(|_| common::host_mut(&mut dbias)),
        };
        attention::backward_into(
            &p.spec,
            &tq,
            &tk,
            &tv,
            &prec,
            kl.as_ref(),
            &inputs,
            out,
            dev.default_stream(),
        )
        .unwrap_or_else(|err| panic!("{}: backward: {err}", p.name));
    }
    let un = |x: Vec<f32>, s| if blhd { from_blhd(&x, s) } else { x };
    let (o, dq, dk, dvv) = (un(o, os), un(dq, qs), un(dk, ks), un(dvv, vs));
    let bits = [&o, &lse, &e, &dq, &dk, &dvv, &dph, &dpk, &dnu, &dbias]
        .iter()
        .flat_map(|x| x.iter().map(|v| v.to_bits()))
        .collect();
    DevOut {
        o: widen(&o),
        lse: widen(&lse),
        e: widen(&e),
        dq: widen(&dq),
        dk: widen(&dk),
        dv: widen(&dvv),
        dpi_head: widen(&dph),
        dpi_key: widen(&dpk),
        dnu: widen(&dnu),
        dbias: widen(&dbias),
        bits,
    }
}

/// |x − ref| / max(1, |ref|) per element, −∞ matching exactly; ∞ on NaN or a length mismatch.
fn worst(got: &[f64], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    got.iter()
        .zip(want)
        .map(|(&g, &r)| {
            if g.is_nan() || r.is_nan() {
                f64::INFINITY
            } else if r == f64::NEG_INFINITY || g == f64::NEG_INFINITY {
                if g == r { 0.0 } else { f64::INFINITY }
            } else {
                (g - r).abs() / r.abs().max(1.0)
            }
        })
        .fold(0.0, f64::max)
}

/// Every f32 output within one rounding of the f64 value (−∞ exact).
fn one_rounding(what: &str, got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut w = 0.0f64;
    for (i, (&g, &r)) in got.iter().zip(want).enumerate() {
        if r == f64::NEG_INFINITY {
            assert_eq!(g, r, "{what}[{i}]");
            continue;
        }
        let tol = r.abs() * f32::EPSILON as f64 / 2.0 * 1.01;
        assert!(
            (g - r).abs() <= tol,
            "{what}[{i}]: {g} vs {r} (tol {tol:.2e})"
        );
        if r != 0.0 {
            w = w.max((g - r).abs() / r.abs());
        }
    }
    w
}

/// The device path against the f64 reference on the same (f32-rounded) inputs: one f32 rounding
/// per output element. Returns the worst relative difference.
fn device_matches_reference(p: &P, blhd: bool) -> f64 {
    let r = p.rounded();
    let f = r.forward();
    let g = r.grads();
    let got = device_run(p, blhd);
    let n = &p.name;
    let mut w = 0.0f64;
    w = w.max(one_rounding(&format!("{n} o"), &got.o, &f.o));
    w = w.max(one_rounding(&format!("{n} lse"), &got.lse, &f.lse));
    w = w.max(one_rounding(&format!("{n} e"), &got.e, &f.e));
    w = w.max(one_rounding(&format!("{n} dq"), &got.dq, &g.dq));
    w = w.max(one_rounding(&format!("{n} dk"), &got.dk, &g.dk));
    w = w.max(one_rounding(&format!("{n} dv"), &got.dv, &g.dv));
    w = w.max(one_rounding(
        &format!("{n} dpi_head"),
        &got.dpi_head,
        &g.dpi_head,
    ));
    w = w.max(one_rounding(
        &format!("{n} dpi_key"),
        &got.dpi_key,
        &g.dpi_key,
    ));
    let dnu = if p.nu_head.is_some() {
        g.dnu_head.clone()
    } else {
        vec![g.dnu]
    };
    w = w.max(one_rounding(&format!("{n} dnu"), &got.dnu, &dnu));
    w = w.max(one_rounding(&format!("{n} dbias"), &got.dbias, &g.dbias));
    w
}

// =============================================================================================
// PyTorch float64 autograd fixture
// =============================================================================================

/// The reference against torch (f64 inputs): the conventions' metric and bound.
const TORCH_TOL: f64 = 1e-11;
/// The f32 device path against torch (f32-rounded inputs move every output): the bound of
/// attention_cpu's view test.
const TORCH_TOL_F32: f64 = 1e-4;

struct FixtureCase {
    p: P,
    o: Vec<f64>,
    lse: Vec<f64>,
    e: Vec<f64>,
    grad: Value,
    fully_masked_rows: usize,
}

/// Rows [b, h, i] of a broadcast tensor's own shape.
fn rows_of(v: &Value) -> Vec<[usize; 3]> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let r: Vec<usize> = r
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            [r[0], r[1], r[2]]
        })
        .collect()
}

fn shape4(v: &Value) -> [usize; 4] {
    let s: Vec<usize> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    [s[0], s[1], s[2], s[3]]
}

fn load_fixture_case(c: &Value) -> FixtureCase {
    let base = load_inputs(c);
    let seed = base.seed;
    let rows = base.b * base.hq * base.lq;
    let loss = &c["loss"];
    let flag = |n: &str| loss[n].as_bool().unwrap();
    let mut p = P {
        name: base.name.clone(),
        spec: base.spec,
        b: base.b,
        hq: base.hq,
        hkv: base.hkv,
        lq: base.lq,
        lk: base.lk,
        d: base.d,
        dv: base.dv,
        q: base.q.clone(),
        k: base.k.clone(),
        v: base.v.clone(),
        // torch takes gradients at π = 1 for an absent precision; the reference does the same.
        pi_head: base.pi_head.clone(),
        pi_key: base.pi_key.clone(),
        kv_len: base.kv_len.clone(),
        nu_head: None,
        bias: None,
        mask: None,
        varlen: None,
        d_o: if flag("o") {
            uni(seed, TID_D_O, rows * base.dv)
        } else {
            vec![0.0; rows * base.dv]
        },
        d_e: flag("e").then(|| uni(seed, TID_D_E, rows)),
        d_lse: flag("lse").then(|| uni(seed, TID_D_LSE, rows)),
    };
    if let Some(b) = c["bias"].as_object() {
        let shape = shape4(&b["shape"]);
        let n: usize = shape.iter().product();
        let scale = b["scale"].as_f64().unwrap();
        let neg_inf = b["neg_inf"].as_bool().unwrap();
        let mut vals: Vec<f64> = raw_bits(seed, TID_BIAS, n)
            .into_iter()
            .map(|x| {
                let u = uniform_pm1(x);
                let u = if scale == 1.0 { u } else { u * scale };
                if neg_inf && x & 7 == 0 {
                    f64::NEG_INFINITY
                } else {
                    u
                }
            })
            .collect();
        for [bi, hi, ii] in rows_of(&b["neginf_rows"]) {
            let at = ((bi * shape[1] + hi) * shape[2] + ii) * shape[3];
            vals[at..at + shape[3]]
                .iter_mut()
                .for_each(|x| *x = f64::NEG_INFINITY);
        }
        p.bias = Some((vals, shape));
    }
    if let Some(m) = c["score_mask"].as_object() {
        let shape = shape4(&m["shape"]);
        let n: usize = shape.iter().product();
        let mut vals: Vec<bool> = raw_bits(seed, TID_MASK, n)
            .into_iter()
            .map(|x| (x >> 62) != 0)
            .collect();
        for [bi, hi, ii] in rows_of(&m["off_rows"]) {
            let at = ((bi * shape[1] + hi) * shape[2] + ii) * shape[3];
            vals[at..at + shape[3]].iter_mut().for_each(|x| *x = false);
        }
        p.mask = Some((vals, shape));
    }
    if c["nu_head"].as_bool().unwrap() {
        p.nu_head = Some(
            raw_bits(seed, TID_NU, base.hq)
                .into_iter()
                .map(|x| 2.0 * precision(x))
                .collect(),
        );
    }
    let out = &c["out"];
    FixtureCase {
        p,
        o: tensor_data(&out["o"]),
        lse: tensor_data(&out["lse"]),
        e: tensor_data(&out["e"]),
        grad: c["grad"].clone(),
        fully_masked_rows: c["fully_masked_rows"].as_u64().unwrap() as usize,
    }
}

fn hex(v: &Value) -> u64 {
    u64::from_str_radix(v.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
}

/// The gradients of the torch fixture as (name, stored, ours) triples.
fn torch_pairs(
    fc: &FixtureCase,
    g: &RefGradients,
    dnu_dev: Option<&[f64]>,
    dev: Option<&DevOut>,
) -> Vec<(&'static str, Vec<f64>, Vec<f64>)> {
    let gr = &fc.grad;
    let pick = |name: &'static str, ours: &[f64], devv: Option<&[f64]>| {
        (name, tensor_data(&gr[name]), devv.unwrap_or(ours).to_vec())
    };
    let mut out = vec![
        pick("q", &g.dq, dev.map(|d| &d.dq[..])),
        pick("k", &g.dk, dev.map(|d| &d.dk[..])),
        pick("v", &g.dv, dev.map(|d| &d.dv[..])),
        pick("pi_head", &g.dpi_head, dev.map(|d| &d.dpi_head[..])),
        pick("pi_key", &g.dpi_key, dev.map(|d| &d.dpi_key[..])),
    ];
    match &gr["nu"] {
        Value::Null => {
            assert!(
                !matches!(fc.p.spec.score, Score::StudentT(_)),
                "{}: no nu gradient",
                fc.p.name
            );
            assert_eq!(g.dnu, 0.0);
        }
        Value::Number(n) => {
            assert!(fc.p.nu_head.is_none());
            out.push((
                "nu",
                vec![n.as_f64().unwrap()],
                dnu_dev.map_or(vec![g.dnu], |d| d.to_vec()),
            ));
        }
        t => {
            assert!(fc.p.nu_head.is_some());
            out.push((
                "nu",
                tensor_data(t),
                dnu_dev.map_or(g.dnu_head.clone(), |d| d.to_vec()),
            ));
        }
    }
    match &gr["bias"] {
        Value::Null => assert!(fc.p.bias.is_none() && g.dbias.is_empty()),
        t => out.push((
            "bias",
            tensor_data(t),
            dev.map_or(g.dbias.clone(), |d| d.dbias.clone()),
        )),
    }
    out
}

#[test]
fn fixture_matches_torch_autograd() {
    let fx = common::load_fixture("attention_inputs_torch.json");
    println!("torch {}", fx["versions"]["torch"]);
    let raw = fx["cases"].as_array().expect("cases");
    assert_eq!(raw.len(), 16);
    // The new tensor ids' streams.
    let chk = &fx["input_generator"]["check"];
    let seed = chk["seed"].as_u64().unwrap();
    for (field, tid) in [
        ("bias_raw_u64", TID_BIAS),
        ("mask_raw_u64", TID_MASK),
        ("nu_raw_u64", TID_NU),
        ("d_lse_raw_u64", TID_D_LSE),
    ] {
        let want: Vec<u64> = chk[field].as_array().unwrap().iter().map(hex).collect();
        assert_eq!(raw_bits(seed, tid, want.len()), want, "{field}");
    }
    let cases: Vec<FixtureCase> = raw.iter().map(load_fixture_case).collect();

    let mut failures = Vec::new();
    let (mut worst_ref, mut worst_dev_torch, mut worst_dev_ref) = (0.0f64, 0.0f64, 0.0f64);
    let (mut masked_rows, mut with_bias, mut with_mask, mut with_nu, mut with_lse) =
        (0, 0, 0, 0, 0);
    for fc in &cases {
        let p = &fc.p;
        with_bias += p.bias.is_some() as usize;
        with_mask += p.mask.is_some() as usize;
        with_nu += p.nu_head.is_some() as usize;
        with_lse += p.d_lse.is_some() as usize;
        // The f64 reference on the f64 inputs.
        let f = p.forward();
        let n_masked = f.lse.iter().filter(|x| **x == f64::NEG_INFINITY).count();
        assert_eq!(n_masked, fc.fully_masked_rows, "{}", p.name);
        masked_rows += n_masked;
        let g = p.grads();
        let mut errs = vec![
            ("o".to_string(), worst(&f.o, &fc.o)),
            ("lse".to_string(), worst(&f.lse, &fc.lse)),
            ("e".to_string(), worst(&f.e, &fc.e)),
        ];
        for (n, want, got) in torch_pairs(fc, &g, None, None) {
            errs.push((format!("d{n}"), worst(&got, &want)));
        }
        let m = errs.iter().map(|e| e.1).fold(0.0, f64::max);
        worst_ref = worst_ref.max(m);
        // The f32 device path (BLHD for every other case): against torch loosely, against the
        // reference on the same f32 inputs at one rounding.
        let blhd = p.seed() % 2 == 1;
        let dev = device_run(p, blhd);
        let mut derrs = vec![
            ("o".to_string(), worst(&dev.o, &fc.o)),
            ("lse".to_string(), worst(&dev.lse, &fc.lse)),
            ("e".to_string(), worst(&dev.e, &fc.e)),
        ];
        for (n, want, got) in torch_pairs(fc, &g, Some(&dev.dnu), Some(&dev)) {
            derrs.push((format!("d{n}"), worst(&got, &want)));
        }
        let dm = derrs.iter().map(|e| e.1).fold(0.0, f64::max);
        worst_dev_torch = worst_dev_torch.max(dm);
        worst_dev_ref = worst_dev_ref.max(device_matches_reference(p, blhd));
        let line = |e: &[(String, f64)]| {
            e.iter()
                .map(|(n, e)| format!("{n} {e:.1e}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!("{}: ref {}\n    f32 {}", p.name, line(&errs), line(&derrs));
        if !(m <= TORCH_TOL) || !(dm <= TORCH_TOL_F32) {
            failures.push(format!(
                "{}: ref {} / f32 {}",
                p.name,
                line(&errs),
                line(&derrs)
            ));
        }
    }
    println!(
        "worst: reference vs torch {worst_ref:.2e}; f32 device vs torch {worst_dev_torch:.2e}; \
         f32 device vs reference (relative) {worst_dev_ref:.2e}"
    );
    assert!(failures.is_empty(), "failing:\n{}", failures.join("\n"));
    // The fixture exercises what it claims to.
    assert!(
        masked_rows >= 5 && with_bias >= 10 && with_mask >= 5 && with_nu >= 4 && with_lse == 16
    );
}

// =============================================================================================
// Packed variable-length sequences
// =============================================================================================

/// The packed problem: sequences of `lq`/`lk` rows, B = 1, q/k/v rows in sequence order.
fn varlen_prob(name: &str, spec: AttentionSpec, seed: u64, lq: &[usize], lk: &[usize]) -> P {
    let (tq, tk): (usize, usize) = (lq.iter().sum(), lk.iter().sum());
    let mut p = prob(name, spec, seed, [1, 4, 2, tq, tk, 3, 2]);
    let cu = |l: &[usize]| -> Vec<i32> {
        std::iter::once(0)
            .chain(l.iter().scan(0, |a, &x| {
                *a += x as i32;
                Some(*a)
            }))
            .collect()
    };
    p.varlen = Some((cu(lq), cu(lk)));
    p
}

/// Sequence s of a packed problem as a dense B = 1 problem.
fn sequence(p: &P, s: usize) -> P {
    let (cq, ck) = p.varlen.as_ref().unwrap();
    let (q0, q1, k0, k1) = (
        cq[s] as usize,
        cq[s + 1] as usize,
        ck[s] as usize,
        ck[s + 1] as usize,
    );
    let (lq, lk) = (q1 - q0, k1 - k0);
    // Rows [r0, r1) of each head of a [1, H, L, X] tensor.
    let rows = |x: &[f64], h: usize, l: usize, w: usize, r0: usize, r1: usize| -> Vec<f64> {
        (0..h)
            .flat_map(|hi| x[(hi * l + r0) * w..(hi * l + r1) * w].to_vec())
            .collect()
    };
    P {
        name: format!("{}/seq{s}", p.name),
        lq,
        lk,
        q: rows(&p.q, p.hq, p.lq, p.d, q0, q1),
        k: rows(&p.k, p.hkv, p.lk, p.d, k0, k1),
        v: rows(&p.v, p.hkv, p.lk, p.dv, k0, k1),
        pi_key: p.pi_key.as_ref().map(|x| rows(x, p.hkv, p.lk, 1, k0, k1)),
        varlen: None,
        d_o: rows(&p.d_o, p.hq, p.lq, p.dv, q0, q1),
        d_e: p.d_e.as_ref().map(|x| rows(x, p.hq, p.lq, 1, q0, q1)),
        d_lse: p.d_lse.as_ref().map(|x| rows(x, p.hq, p.lq, 1, q0, q1)),
        ..p.clone()
    }
}

#[test]
fn varlen_equals_each_sequence_alone() {
    let lq = [5, 0, 9];
    let lk = [7, 3, 9];
    let mut checked = 0;
    let (mut worst_sum, mut worst_dense) = (0.0f64, 0.0f64);
    for (si, spec) in [
        AttentionSpec::new(Score::Gaussian).causal(true),
        AttentionSpec::new(Score::StudentT(3.0)).window(3),
        AttentionSpec::new(Score::Laplace).window(2),
        AttentionSpec::new(Score::Dot).causal(true),
        AttentionSpec::new(Score::Gaussian),
    ]
    .into_iter()
    .enumerate()
    {
        let mut p = varlen_prob(
            &format!("varlen/{}/{si}", tag(spec.score)),
            spec,
            1400 + si as u64,
            &lq,
            &lk,
        );
        if matches!(spec.score, Score::StudentT(_)) {
            p = p.with_nu_head();
        }
        let packed = device_run(&p, true);
        // The f64 reference agrees with the device path on the packed problem too.
        device_matches_reference(&p, si % 2 == 0);
        let r = p.rounded();
        let mut sums = [vec![0.0f64; p.hq], vec![0.0f64; packed.dnu.len()]];
        let (cq, ck) = p.varlen.clone().unwrap();
        for s in 0..lq.len() {
            let (q0, q1, k0, k1) = (
                cq[s] as usize,
                cq[s + 1] as usize,
                ck[s] as usize,
                ck[s + 1] as usize,
            );
            let take =
                |x: &[f64], h: usize, l: usize, w: usize, r0: usize, r1: usize| -> Vec<f64> {
                    (0..h)
                        .flat_map(|hi| x[(hi * l + r0) * w..(hi * l + r1) * w].to_vec())
                        .collect()
                };
            let n = format!("{} seq {s}", p.name);
            if q1 == q0 {
                // No query of this sequence: its keys get no gradient at all.
                for (what, x, w) in [
                    ("dk", &packed.dk, p.d),
                    ("dv", &packed.dv, p.dv),
                    ("dpi_key", &packed.dpi_key, 1),
                ] {
                    assert!(
                        take(x, p.hkv, p.lk, w, k0, k1).iter().all(|&v| v == 0.0),
                        "{n}: {what}"
                    );
                }
                continue;
            }
            // The sequence alone through the device path (f32), and through the f64 reference
            // on the same f32 inputs: the packed f32 outputs are one rounding of the latter.
            let alone = device_run(&sequence(&p, s), false);
            let sr = sequence(&r, s);
            let (fr, gr) = (sr.forward(), sr.grads());
            let parts: [(&str, Vec<f64>, &[f64], &[f64]); 7] = [
                (
                    "o",
                    take(&packed.o, p.hq, p.lq, p.dv, q0, q1),
                    &alone.o,
                    &fr.o,
                ),
                (
                    "lse",
                    take(&packed.lse, p.hq, p.lq, 1, q0, q1),
                    &alone.lse,
                    &fr.lse,
                ),
                ("e", take(&packed.e, p.hq, p.lq, 1, q0, q1), &alone.e, &fr.e),
                (
                    "dq",
                    take(&packed.dq, p.hq, p.lq, p.d, q0, q1),
                    &alone.dq,
                    &gr.dq,
                ),
                (
                    "dk",
                    take(&packed.dk, p.hkv, p.lk, p.d, k0, k1),
                    &alone.dk,
                    &gr.dk,
                ),
                (
                    "dv",
                    take(&packed.dv, p.hkv, p.lk, p.dv, k0, k1),
                    &alone.dv,
                    &gr.dv,
                ),
                (
                    "dpi_key",
                    take(&packed.dpi_key, p.hkv, p.lk, 1, k0, k1),
                    &alone.dpi_key,
                    &gr.dpi_key,
                ),
            ];
            for (what, got, dense, exact) in parts {
                let w = worst(&got, dense);
                worst_dense = worst_dense.max(w);
                assert!(
                    w <= 1e-6,
                    "{n}: {what} differs from the dense run by {w:.2e}"
                );
                one_rounding(&format!("{n} {what}"), &got, exact);
            }
            sums[0]
                .iter_mut()
                .zip(&gr.dpi_head)
                .for_each(|(a, b)| *a += b);
            let dnu = if p.nu_head.is_some() {
                gr.dnu_head.clone()
            } else {
                vec![gr.dnu]
            };
            sums[1].iter_mut().zip(&dnu).for_each(|(a, b)| *a += b);
            checked += 1;
        }
        // Per-head sums over the sequences (f64): the packed f32 value is one rounding of them.
        for (what, got, want) in [
            ("dpi_head", &packed.dpi_head, &sums[0]),
            ("dnu", &packed.dnu, &sums[1]),
        ] {
            for (a, b) in got.iter().zip(want.iter()) {
                let tol = b.abs() * f32::EPSILON as f64 / 2.0 * 1.01 + 1e-13 * b.abs().max(1.0);
                worst_sum = worst_sum.max((a - b).abs() / b.abs().max(1e-300));
                assert!(
                    (a - b).abs() <= tol,
                    "{}: {what} {a} vs the sum over sequences {b}",
                    p.name
                );
            }
        }
        // A causal row sees only its own sequence: the packed probabilities are zero across
        // sequences and each block equals the sequence's own matrix.
        if si == 0 {
            let r = p.rounded();
            let w = reference::probabilities(&p.spec, &r.inputs()).unwrap();
            for s in [0, 2] {
                let sp = sequence(&r, s);
                let ws = reference::probabilities(&sp.spec, &sp.inputs()).unwrap();
                for h in 0..p.hq {
                    for i in 0..p.lq {
                        for j in 0..p.lk {
                            let v = w[(h * p.lq + i) * p.lk + j];
                            let (ii, jj) = (i as i32 - cq[s], j as i32 - ck[s]);
                            let inside = ii >= 0
                                && (ii as usize) < sp.lq
                                && jj >= 0
                                && (jj as usize) < sp.lk;
                            if inside {
                                assert_eq!(v, ws[(h * sp.lq + ii as usize) * sp.lk + jj as usize]);
                            } else if ii >= 0 && (ii as usize) < sp.lq {
                                assert_eq!(v, 0.0, "row {i} of seq {s}, key {j}");
                            }
                        }
                    }
                }
            }
        }
    }
    println!(
        "varlen: {checked} sequences checked; packed vs dense device runs {worst_dense:.1e}; \
         per-head sums vs the f64 sum over sequences (relative) {worst_sum:.1e}"
    );
    assert_eq!(checked, 10);
}

// =============================================================================================
// Fully masked rows
// =============================================================================================

#[test]
fn fully_masked_rows_give_zero_and_minus_infinity_without_nan() {
    for (fi, score) in FAMILIES.into_iter().enumerate() {
        let spec = AttentionSpec::new(score).causal(true);
        // Lq 6 > Lk 4: rows 0, 1 fully masked by causality; mask row off; −∞ bias row.
        let mut p = prob(
            &format!("{}/masked_rows", tag(score)),
            spec,
            1500 + fi as u64,
            [2, 4, 2, 6, 4, 3, 2],
        )
        .with_mask("fff")
        .with_bias("fff", 1.0);
        let (lq, lk, hq) = (p.lq, p.lk, p.hq);
        let at = |b: usize, h: usize, i: usize| ((b * hq + h) * lq + i) * lk;
        {
            let (m, _) = p.mask.as_mut().unwrap();
            m.iter_mut().for_each(|x| *x = true);
            m[at(0, 1, 4)..at(0, 1, 4) + lk]
                .iter_mut()
                .for_each(|x| *x = false);
            m[at(1, 3, 5)..at(1, 3, 5) + lk]
                .iter_mut()
                .for_each(|x| *x = false);
            let (bv, _) = p.bias.as_mut().unwrap();
            bv[at(1, 0, 3)..at(1, 0, 3) + lk]
                .iter_mut()
                .for_each(|x| *x = f64::NEG_INFINITY);
            bv[at(0, 2, 5)..at(0, 2, 5) + lk]
                .iter_mut()
                .for_each(|x| *x = f64::NEG_INFINITY);
            // Row (1, 2, 2) sees only key 0 (causal): a −∞ there alone masks the row.
            bv[at(1, 2, 2)] = f64::NEG_INFINITY;
        }
        let mut dead: Vec<usize> = Vec::new();
        for b in 0..p.b {
            for h in 0..hq {
                dead.push((b * hq + h) * lq);
                dead.push((b * hq + h) * lq + 1);
            }
        }
        let row = |b: usize, h: usize, i: usize| (b * hq + h) * lq + i;
        dead.extend([
            row(1, 3, 5),
            row(0, 1, 4),
            row(1, 0, 3),
            row(0, 2, 5),
            row(1, 2, 2),
        ]);
        dead.sort();
        let dev = device_run(&p, fi % 2 == 0);
        device_matches_reference(&p, fi % 2 == 1);
        // No NaN anywhere.
        for (what, x) in [
            ("o", &dev.o),
            ("lse", &dev.lse),
            ("e", &dev.e),
            ("dq", &dev.dq),
            ("dk", &dev.dk),
            ("dv", &dev.dv),
            ("dpi_head", &dev.dpi_head),
            ("dpi_key", &dev.dpi_key),
            ("dnu", &dev.dnu),
            ("dbias", &dev.dbias),
        ] {
            assert!(x.iter().all(|v| !v.is_nan()), "{}: NaN in {what}", p.name);
            if what != "lse" {
                assert!(
                    x.iter().all(|v| v.is_finite()),
                    "{}: non-finite {what}",
                    p.name
                );
            }
        }
        let got_dead: Vec<usize> = (0..p.rows())
            .filter(|&r| dev.lse[r] == f64::NEG_INFINITY)
            .collect();
        assert_eq!(got_dead, dead, "{}: fully masked rows", p.name);
        for &r in &dead {
            assert!(
                dev.o[r * p.dv..][..p.dv].iter().all(|&x| x == 0.0),
                "{}: o row {r}",
                p.name
            );
            assert_eq!(dev.e[r], 0.0);
            assert!(
                dev.dq[r * p.d..][..p.d].iter().all(|&x| x == 0.0),
                "{}: dq row {r}",
                p.name
            );
            assert!(
                dev.dbias[r * lk..][..lk].iter().all(|&x| x == 0.0),
                "{}: dbias row {r}",
                p.name
            );
            // d_lse and d_o of the dead rows are nonzero: they are ignored, not absent.
            assert!(p.d_lse.as_ref().unwrap()[r] != 0.0);
        }
        for r in (0..p.rows()).filter(|r| !dead.contains(r)) {
            assert!(dev.lse[r].is_finite(), "{}: lse row {r}", p.name);
        }
        // The same gradients with the dead rows' upstream gradients zeroed.
        let mut z = p.clone();
        for &r in &dead {
            z.d_lse.as_mut().unwrap()[r] = 0.0;
            z.d_e.as_mut().unwrap()[r] = 0.0;
            z.d_o[r * p.dv..][..p.dv].iter_mut().for_each(|x| *x = 0.0);
        }
        let (g, gz) = (p.grads(), z.grads());
        assert_eq!(g.dq, gz.dq);
        assert_eq!(g.dk, gz.dk);
        assert_eq!(g.dbias, gz.dbias);
        assert_eq!(g.dpi_head, gz.dpi_head);
        // Probabilities: zero rows.
        let w = reference::probabilities(&p.spec, &p.inputs()).unwrap();
        for r in 0..p.rows() {
            let s: f64 = w[r * lk..][..lk].iter().sum();
            if dead.contains(&r) {
                assert_eq!(s, 0.0);
            } else {
                assert!((s - 1.0).abs() <= 1e-15);
            }
        }
    }
}

// =============================================================================================
// Determinism
// =============================================================================================

/// [`device_run`]'s bits through the allocating `attention::forward` and `attention::backward`
/// (BHLD), which size dν (`[Hq]` with a per-head ν) and dβ (the bias's shape) themselves.
fn alloc_api_bits(p: &P) -> Vec<u32> {
    let h = Host32::new(p, false);
    let (qs, ks, vs, os) = (
        [p.b, p.hq, p.lq, p.d],
        [p.b, p.hkv, p.lk, p.d],
        [p.b, p.hkv, p.lk, p.dv],
        [p.b, p.hq, p.lq, p.dv],
    );
    let (tq, tk, tv) = (
        h.t4(&h.q, qs, false),
        h.t4(&h.k, ks, false),
        h.t4(&h.v, vs, false),
    );
    let prec = Precisions {
        head: h.ph.as_deref().map(View::host),
        key: h.pk.as_deref().map(View::host),
        nu: h.nu.as_deref().map(View::host),
        bias: h
            .bias
            .as_deref()
            .map(|b| ScoreBias::contiguous(common::host(b), p.bias.as_ref().unwrap().1)),
        mask: h
            .mask
            .as_deref()
            .map(|m| ScoreBias::contiguous(common::host(m), p.mask.as_ref().unwrap().1)),
        varlen: None,
    };
    let kl = p.kv_len.as_deref().map(View::host);
    let f = attention::forward(&p.spec, &tq, &tk, &tv, &prec, kl.as_ref()).unwrap();
    let inputs = BackwardInputs {
        o: Tensor4::bhld(f.o.view(), os),
        lse: f.lse.view(),
        d_o: h.t4(&h.d_o, os, false),
        e: Some(f.e.view()),
        d_e: h.d_e.as_deref().map(View::host),
        d_lse: h.d_lse.as_deref().map(View::host),
    };
    let g = attention::backward(&p.spec, &tq, &tk, &tv, &prec, kl.as_ref(), &inputs).unwrap();
    assert_eq!(g.dnu.len(), if p.nu_head.is_some() { p.hq } else { 1 });
    assert_eq!(g.dbias.len(), p.bias.as_ref().map_or(0, |b| b.0.len()));
    [
        &f.o,
        &f.lse,
        &f.e,
        &g.dq,
        &g.dk,
        &g.dv,
        &g.dpi_head,
        &g.dpi_key,
        &g.dnu,
        &g.dbias,
    ]
    .iter()
    .flat_map(|x| x.to_vec().unwrap().into_iter().map(|v| v.to_bits()))
    .collect()
}

#[test]
fn repeated_backward_is_bitwise_equal_with_a_broadcast_bias() {
    for (i, (score, bs)) in [
        (Score::StudentT(3.0), "1f1"),
        (Score::Gaussian, "f11"),
        (Score::Dot, "111"),
    ]
    .into_iter()
    .enumerate()
    {
        let spec = AttentionSpec::new(score).causal(true);
        let mut p = prob(
            &format!("{}/determinism", tag(score)),
            spec,
            1600 + i as u64,
            [3, 4, 2, 33, 40, 16, 8],
        )
        .with_bias(bs, 1.0)
        .with_mask("f1f");
        if matches!(score, Score::StudentT(_)) {
            p = p.with_nu_head();
        }
        let a = device_run(&p, false);
        let b = device_run(&p, false);
        assert_eq!(a.bits.len(), b.bits.len());
        let diff = a.bits.iter().zip(&b.bits).filter(|(x, y)| x != y).count();
        assert_eq!(
            diff, 0,
            "{}: {diff} output elements differ between two runs",
            p.name
        );
        // The allocating API (`forward`, `backward`) gives the same bits.
        assert_eq!(
            alloc_api_bits(&p),
            a.bits,
            "{}: forward/backward vs the _into calls",
            p.name
        );
        // The layout does not change the bits either.
        let c = device_run(&p, true);
        assert_eq!(a.bits, c.bits, "{}: BHLD and BLHD differ", p.name);
        assert!(a.dbias.iter().any(|&x| x != 0.0));
    }
}

// =============================================================================================
// Probabilities
// =============================================================================================

/// The scores s_ij [B, Hq, Lq, Lk] computed here from the definitions (−∞ where hidden),
/// independently of the library.
fn independent_scores(p: &P) -> Vec<f64> {
    let (b_, hq, lq, lk, d) = (p.b, p.hq, p.lq, p.lk, p.d);
    let g = hq / p.hkv;
    let tau = p.spec.scale.unwrap_or(if p.spec.score == Score::Dot {
        1.0 / (d as f64).sqrt()
    } else {
        1.0
    });
    let mut s = vec![f64::NEG_INFINITY; b_ * hq * lq * lk];
    for b in 0..b_ {
        for h in 0..hq {
            let hk = h / g;
            for i in 0..lq {
                // The sequence of row i (one sequence without varlen).
                let (q0, k0, slq, slk) = match &p.varlen {
                    None => (0, 0, lq as i64, lk as i64),
                    Some((cq, ck)) => {
                        let s = (0..cq.len() - 1)
                            .find(|&s| (cq[s] as usize) <= i && i < cq[s + 1] as usize)
                            .unwrap();
                        (
                            cq[s] as i64,
                            ck[s] as i64,
                            (cq[s + 1] - cq[s]) as i64,
                            (ck[s + 1] - ck[s]) as i64,
                        )
                    }
                };
                for j in 0..lk {
                    let jj = j as i64 - k0;
                    if jj < 0 || jj >= slk {
                        continue;
                    }
                    let ip = i as i64 - q0 + slk - slq;
                    if p.spec.is_causal() && jj > ip {
                        continue;
                    }
                    if p.spec.window.is_some_and(|w| jj <= ip - w as i64) {
                        continue;
                    }
                    if p.kv_len.as_ref().is_some_and(|l| jj >= l[b] as i64) {
                        continue;
                    }
                    let idx4 = |shape: [usize; 4]| {
                        let bb = if shape[0] == 1 { 0 } else { b };
                        let hh = if shape[1] == 1 { 0 } else { h };
                        let ii = if shape[2] == 1 { 0 } else { i };
                        ((bb * shape[1] + hh) * shape[2] + ii) * shape[3] + j
                    };
                    if let Some((m, shape)) = &p.mask
                        && !m[idx4(*shape)]
                    {
                        continue;
                    }
                    let qi = &p.q[((b * hq + h) * lq + i) * d..][..d];
                    let kj = &p.k[((b * p.hkv + hk) * lk + j) * d..][..d];
                    let pi = p.pi_head.as_ref().map_or(1.0, |x| x[h])
                        * p.pi_key
                            .as_ref()
                            .map_or(1.0, |x| x[(b * p.hkv + hk) * lk + j]);
                    let d2: f64 = qi.iter().zip(kj).map(|(a, c)| (a - c).powi(2)).sum();
                    let dt: f64 = qi.iter().zip(kj).map(|(a, c)| a * c).sum();
                    let norm = if p.spec.normalizer && p.spec.score != Score::Dot {
                        d as f64 / 2.0 * pi.ln()
                    } else {
                        0.0
                    };
                    let mut v = match p.spec.score {
                        Score::Dot => tau * pi * dt,
                        Score::Gaussian => -0.5 * tau * pi * d2 + norm,
                        Score::StudentT(nu) => {
                            let nu = p.nu_head.as_ref().map_or(nu as f64, |x| x[h]);
                            -(nu + d as f64) / 2.0 * (tau * pi * d2 / nu).ln_1p() + norm
                        }
                        Score::Laplace => -(tau * pi).sqrt() * d2.sqrt() + norm,
                    };
                    if let Some((bv, shape)) = &p.bias {
                        v += bv[idx4(*shape)];
                    }
                    s[((b * hq + h) * lq + i) * lk + j] = v;
                }
            }
        }
    }
    s
}

#[test]
fn probabilities_are_the_softmax_of_independent_scores() {
    let mut probs = Vec::new();
    for (fi, score) in FAMILIES.into_iter().enumerate() {
        let spec = AttentionSpec::new(score).causal(fi % 2 == 0);
        let mut p = prob(
            &format!("{}/probs", tag(score)),
            spec,
            1700 + fi as u64,
            [2, 4, 2, 6, 5, 3, 2],
        )
        .with_bias(["fff", "ff1", "1ff", "111"][fi], 2.0)
        .with_mask(["f1f", "fff", "111", "ff1"][fi]);
        if matches!(score, Score::StudentT(_)) {
            p = p.with_nu_head();
        }
        if fi == 1 {
            p.kv_len = Some(vec![5, 2]);
        }
        p.bias.as_mut().unwrap().0[1] = f64::NEG_INFINITY;
        probs.push(p);
    }
    let mut vl = varlen_prob(
        "varlen/probs",
        AttentionSpec::new(Score::Laplace).window(3),
        1710,
        &[5, 0, 9],
        &[7, 3, 9],
    );
    vl.pi_head = None;
    probs.push(vl);

    let dev = Device::reference();
    let mut worst_ref = 0.0f64;
    let mut worst_dev = 0.0f64;
    let mut dead_rows = 0;
    for p in &probs {
        let p = p.rounded();
        let s = independent_scores(&p);
        let lk = p.lk;
        // lse and w here from the independent scores.
        let mut w_ind = vec![0.0f64; s.len()];
        let mut lse_ind = vec![f64::NEG_INFINITY; p.rows()];
        for r in 0..p.rows() {
            let row = &s[r * lk..][..lk];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            if m == f64::NEG_INFINITY {
                dead_rows += 1;
                continue;
            }
            let z: f64 = row.iter().map(|x| (x - m).exp()).sum();
            lse_ind[r] = m + z.ln();
            for j in 0..lk {
                w_ind[r * lk + j] = (row[j] - lse_ind[r]).exp();
            }
        }
        let f = p.forward();
        let wl = worst(&f.lse, &lse_ind);
        assert!(wl <= 1e-13, "{}: lse vs independent {wl:.2e}", p.name);
        let w = reference::probabilities(&p.spec, &p.inputs()).unwrap();
        let wr = common::max_abs_diff(&w, &w_ind);
        worst_ref = worst_ref.max(wr);
        assert!(
            wr <= 1e-14,
            "{}: reference probabilities vs exp(s − lse) {wr:.2e}",
            p.name
        );
        for r in 0..p.rows() {
            let sum: f64 = w[r * lk..][..lk].iter().sum();
            let want = if lse_ind[r].is_finite() { 1.0 } else { 0.0 };
            assert!(
                (sum - want).abs() <= 1e-15,
                "{}: row {r} sums to {sum}",
                p.name
            );
        }
        // The device path, f32.
        let h = Host32::new(&p, false);
        let (qs, ks, vs) = (
            [p.b, p.hq, p.lq, p.d],
            [p.b, p.hkv, p.lk, p.d],
            [p.b, p.hkv, p.lk, p.dv],
        );
        let (tq, tk, tv) = (
            h.t4(&h.q, qs, false),
            h.t4(&h.k, ks, false),
            h.t4(&h.v, vs, false),
        );
        let prec = Precisions {
            head: h.ph.as_deref().map(View::host),
            key: h.pk.as_deref().map(View::host),
            nu: h.nu.as_deref().map(View::host),
            bias: h
                .bias
                .as_deref()
                .map(|b| ScoreBias::contiguous(common::host(b), p.bias.as_ref().unwrap().1)),
            mask: h
                .mask
                .as_deref()
                .map(|m| ScoreBias::contiguous(common::host(m), p.mask.as_ref().unwrap().1)),
            varlen: p.varlen.as_ref().map(|(cq, ck)| Varlen {
                cu_q: common::host(cq),
                cu_k: common::host(ck),
                max_q: 9,
                max_k: 9,
            }),
        };
        let kl = p.kv_len.as_deref().map(View::host);
        let n = p.rows() * lk;
        let got = attention::probabilities(&p.spec, &tq, &tk, &tv, &prec, kl.as_ref(), n)
            .unwrap()
            .to_vec()
            .unwrap();
        let mut into = vec![f32::NAN; n];
        attention::probabilities_into(
            &p.spec,
            &tq,
            &tk,
            &tv,
            &prec,
            kl.as_ref(),
            common::host_mut(&mut into),
            dev.default_stream(),
        )
        .unwrap();
        assert_eq!(
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            into.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let gw = widen(&got);
        worst_dev = worst_dev.max(one_rounding(&format!("{} probabilities", p.name), &gw, &w));
        for r in 0..p.rows() {
            let sum: f64 = gw[r * lk..][..lk].iter().sum();
            if lse_ind[r].is_finite() {
                assert!(
                    (sum - 1.0).abs() <= lk as f64 * f32::EPSILON as f64,
                    "{}: row {r}: {sum}",
                    p.name
                );
            } else {
                assert_eq!(sum, 0.0);
            }
        }
        // The size limit: one element short is refused, naming "probabilities".
        match attention::probabilities(&p.spec, &tq, &tk, &tv, &prec, kl.as_ref(), n - 1) {
            Err(Error::InvalidArgument { name, .. }) => assert_eq!(name, "probabilities"),
            other => panic!("{}: expected the size limit, got {other:?}", p.name),
        }
        // A wrong output length for probabilities_into, nothing written.
        let mut short = vec![f32::NAN; n - 1];
        match attention::probabilities_into(
            &p.spec,
            &tq,
            &tk,
            &tv,
            &prec,
            kl.as_ref(),
            common::host_mut(&mut short),
            dev.default_stream(),
        ) {
            Err(Error::InvalidArgument { name, .. }) => assert_eq!(name, "probabilities"),
            other => panic!("{}: expected an error, got {other:?}", p.name),
        }
        assert!(short.iter().all(|x| x.is_nan()));
    }
    println!(
        "probabilities: reference vs exp(s − lse) {worst_ref:.2e}; f32 vs reference (relative) {worst_dev:.2e}; {dead_rows} fully masked rows"
    );
    assert!(dead_rows > 0);
}

// =============================================================================================
// Bad input
// =============================================================================================

/// What to break in [`try_bad`].
#[derive(Clone, Copy, Debug, PartialEq)]
enum Bad {
    Nothing,
    BiasHkvHeads,
    BiasLkBroadcast,
    BiasLqWrong,
    BiasNan,
    BiasPosInf,
    BiasViewShort,
    BiasOverlapsO,
    MaskShape,
    MaskLkBroadcast,
    MaskViewShort,
    NuWithGaussian,
    NuZero,
    NuNegative,
    NuNan,
    NuInf,
    NuShort,
    NuLong,
    DLseLen,
    DbiasLen,
    DbiasWithoutBias,
    DbiasEmptyWithoutBias,
    DnuLenWithNuHead,
}

/// Forward and backward on a small valid problem (B 2, Hq 4, Hkv 2, Lq 5, Lk 7, D 8, Dv 4,
/// Student-t with ν per head, a [B, 1, Lq, Lk] bias, a [1, Hq, 1, Lk] mask, causal, d_lse) with
/// `bad` applied, outputs poisoned with NaN. Returns the forward's and the backward's error
/// names (None: Ok) and whether each left its outputs untouched.
fn try_bad(bad: Bad) -> ((Option<String>, bool), (Option<String>, bool)) {
    let (b, hq, hkv, lq, lk, d, dv) = (2, 4, 2, 5, 7, 8, 4);
    let g = |tid, n| f32s(&uni(91, tid, n));
    let rows = b * hq * lq;
    let q = g(1, rows * d);
    let k = g(2, b * hkv * lk * d);
    let v = g(3, b * hkv * lk * dv);
    let mut nu = vec![2.0f32, 3.0, 0.75, 5.0, 1.0];
    match bad {
        Bad::NuZero => nu[2] = 0.0,
        Bad::NuNegative => nu[1] = -1.0,
        Bad::NuNan => nu[3] = f32::NAN,
        Bad::NuInf => nu[0] = f32::INFINITY,
        _ => {}
    }
    let nu_len = match bad {
        Bad::NuShort => hq - 1,
        Bad::NuLong => hq + 1,
        _ => hq,
    };
    let mut bshape = [b, 1, lq, lk];
    match bad {
        Bad::BiasHkvHeads => bshape = [b, hkv, lq, lk],
        Bad::BiasLkBroadcast => bshape = [b, 1, lq, 1],
        Bad::BiasLqWrong => bshape = [b, 1, lq - 1, lk],
        _ => {}
    }
    let mut bias = g(TID_BIAS, b * hkv * lq * lk + 8);
    bias[5] = f32::NEG_INFINITY; // allowed
    match bad {
        Bad::BiasNan => bias[9] = f32::NAN,
        Bad::BiasPosInf => bias[b * lq * lk - 1] = f32::INFINITY,
        _ => {}
    }
    let bias_len = if bad == Bad::BiasViewShort {
        b * lq * lk - 1
    } else {
        bshape.iter().product()
    };
    let mshape = match bad {
        Bad::MaskShape => [1, 2, 1, lk],
        Bad::MaskLkBroadcast => [1, hq, 1, 1],
        _ => [1, hq, 1, lk],
    };
    let mask: Vec<u8> = (0..hq * lk).map(|i| (i % 5 != 2) as u8).collect();
    let mask_len = if bad == Bad::MaskViewShort {
        hq * lk - 1
    } else {
        mshape.iter().product()
    };
    let spec = AttentionSpec::new(if bad == Bad::NuWithGaussian {
        Score::Gaussian
    } else {
        Score::StudentT(2.0)
    })
    .causal(true);
    let (qs, ks, vs, os) = (
        [b, hq, lq, d],
        [b, hkv, lk, d],
        [b, hkv, lk, dv],
        [b, hq, lq, dv],
    );
    let (tq, tk, tv) = (
        Tensor4::bhld(common::host(&q), qs),
        Tensor4::bhld(common::host(&k), ks),
        Tensor4::bhld(common::host(&v), vs),
    );
    let dev = Device::reference();
    // o lives in an arena after a copy of the bias for the overlap case.
    let mut arena = vec![f32::NAN; rows * dv + rows * 2];
    let bias_view = if bad == Bad::BiasOverlapsO {
        unsafe { View::<f32>::from_raw(&dev, arena.as_ptr() as u64 + 4 * 3, bias_len) }
    } else {
        common::host(&bias[..bias_len])
    };
    let prec = Precisions {
        nu: Some(common::host(&nu[..nu_len])),
        bias: Some(ScoreBias::contiguous(bias_view, bshape)),
        mask: Some(ScoreBias::contiguous(
            common::host(&mask[..mask_len]),
            mshape,
        )),
        ..Default::default()
    };
    let (o, rest) = arena.split_at_mut(rows * dv);
    let (lse, e) = rest.split_at_mut(rows);
    let fwd = attention::forward_into(
        &spec,
        &tq,
        &tk,
        &tv,
        &prec,
        None,
        AttentionOutputs {
            o: Tensor4Mut::bhld(common::host_mut(o), os),
            lse: Some(common::host_mut(lse)),
            e: Some(common::host_mut(e)),
        },
        dev.default_stream(),
    );
    let fwd_untouched = arena.iter().all(|x| x.is_nan());
    let name = |r: fep_kernels::Result<()>, what: &str| match r {
        Ok(()) => None,
        Err(Error::InvalidArgument { name, reason }) => {
            println!("{bad:?} {what}: {name}: {reason}");
            Some(name)
        }
        Err(other) => panic!("{bad:?}: unexpected error kind: {other}"),
    };
    let fwd_name = name(fwd, "forward");

    // Backward, on a valid forward's outputs (computed with the valid inputs).
    let good_bias = f32s(&uni(91, TID_BIAS, b * lq * lk));
    let good_nu = [2.0f32, 3.0, 0.75, 5.0];
    let good_prec = Precisions {
        nu: Some(common::host(&good_nu)),
        bias: Some(ScoreBias::contiguous(
            common::host(&good_bias),
            [b, 1, lq, lk],
        )),
        mask: Some(ScoreBias::contiguous(common::host(&mask), [1, hq, 1, lk])),
        ..Default::default()
    };
    let fspec = AttentionSpec::new(Score::StudentT(2.0)).causal(true);
    let fo = attention::forward(&fspec, &tq, &tk, &tv, &good_prec, None).unwrap();
    let (fo_o, fo_lse, fo_e) = (
        fo.o.to_vec().unwrap(),
        fo.lse.to_vec().unwrap(),
        fo.e.to_vec().unwrap(),
    );
    let d_o = g(TID_D_O, rows * dv);
    let d_e = g(TID_D_E, rows);
    let d_lse = g(TID_D_LSE, rows + 1);
    let inputs = BackwardInputs {
        o: Tensor4::bhld(common::host(&fo_o), os),
        lse: common::host(&fo_lse),
        d_o: Tensor4::bhld(common::host(&d_o), os),
        e: Some(common::host(&fo_e)),
        d_e: Some(common::host(&d_e)),
        d_lse: Some(common::host(
            &d_lse[..rows + (bad == Bad::DLseLen) as usize],
        )),
    };
    let nb: usize = bshape.iter().product();
    let (n_dq, n_dk, n_dv) = (rows * d, b * hkv * lk * d, b * hkv * lk * dv);
    let mut out_arena = vec![f32::NAN; n_dq + n_dk + n_dv + hq + b * hkv * lk + hq + nb + 2];
    let (dq, r) = out_arena.split_at_mut(n_dq);
    let (dk, r) = r.split_at_mut(n_dk);
    let (dvv, r) = r.split_at_mut(n_dv);
    let (dph, r) = r.split_at_mut(hq);
    let (dpk, r) = r.split_at_mut(b * hkv * lk);
    let (dnu, r) = r.split_at_mut(hq);
    let dnu_len = if bad == Bad::DnuLenWithNuHead { 1 } else { hq };
    let dbias_len = match bad {
        Bad::DbiasLen => nb + 1,
        Bad::DbiasEmptyWithoutBias => 0,
        _ => nb,
    };
    let bwd_prec = if matches!(bad, Bad::DbiasWithoutBias | Bad::DbiasEmptyWithoutBias) {
        Precisions {
            bias: None,
            ..prec.clone()
        }
    } else {
        prec.clone()
    };
    let out = Gradients {
        dq: Tensor4Mut::bhld(common::host_mut(dq), qs),
        dk: Tensor4Mut::bhld(common::host_mut(dk), ks),
        dv: Tensor4Mut::bhld(common::host_mut(dvv), vs),
        dpi_head: Some(common::host_mut(dph)),
        dpi_key: Some(common::host_mut(dpk)),
        dnu: Some(common::host_mut(&mut dnu[..dnu_len])),
        dbias: Some(common::host_mut(&mut r[..dbias_len])),
    };
    let bwd = attention::backward_into(
        &spec,
        &tq,
        &tk,
        &tv,
        &bwd_prec,
        None,
        &inputs,
        out,
        dev.default_stream(),
    );
    let bwd_untouched = out_arena.iter().all(|x| x.is_nan());
    let bwd_name = name(bwd, "backward");
    ((fwd_name, fwd_untouched), (bwd_name, bwd_untouched))
}

#[test]
fn bad_score_inputs_are_rejected_before_any_write() {
    // The valid problem runs and writes.
    let ((fe, fu), (be, bu)) = try_bad(Bad::Nothing);
    assert_eq!((fe, be), (None, None));
    assert!(!fu && !bu);

    // (bad, forward's error, backward's error): None where the argument is the backward's own.
    let table = [
        (Bad::BiasHkvHeads, Some("bias"), "bias"),
        (Bad::BiasLkBroadcast, Some("bias"), "bias"),
        (Bad::BiasLqWrong, Some("bias"), "bias"),
        (Bad::BiasNan, Some("bias"), "bias"),
        (Bad::BiasPosInf, Some("bias"), "bias"),
        (Bad::BiasViewShort, Some("bias"), "bias"),
        (Bad::BiasOverlapsO, Some("o"), "bias"),
        (Bad::MaskShape, Some("mask"), "mask"),
        (Bad::MaskLkBroadcast, Some("mask"), "mask"),
        (Bad::MaskViewShort, Some("mask"), "mask"),
        (Bad::NuWithGaussian, Some("nu"), "nu"),
        (Bad::NuZero, Some("nu"), "nu"),
        (Bad::NuNegative, Some("nu"), "nu"),
        (Bad::NuNan, Some("nu"), "nu"),
        (Bad::NuInf, Some("nu"), "nu"),
        (Bad::NuShort, Some("nu"), "nu"),
        (Bad::NuLong, Some("nu"), "nu"),
        (Bad::DLseLen, None, "d_lse"),
        (Bad::DbiasLen, None, "dbias"),
        (Bad::DbiasWithoutBias, None, "dbias"),
        (Bad::DbiasEmptyWithoutBias, None, "dbias"),
        (Bad::DnuLenWithNuHead, None, "dnu"),
    ];
    let mut failures = Vec::new();
    for (bad, fwd_want, bwd_want) in table {
        let ((fe, fu), (be, bu)) = try_bad(bad);
        let fwd_ok = match fwd_want {
            Some(n) => fe.as_deref() == Some(n) && fu,
            None => fe.is_none(),
        };
        // The overlap of the bias with o is a forward matter; the backward sees a bias that
        // aliases nothing it writes but reads a NaN-poisoned arena: any error naming the bias.
        let bwd_ok = be.as_deref() == Some(bwd_want) && bu;
        if !fwd_ok || !bwd_ok {
            failures.push(format!(
                "{bad:?}: forward {fe:?} (want {fwd_want:?}, untouched {fu}), backward {be:?} \
                 (want {bwd_want}, untouched {bu})"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Varlen's own errors, forward_into on the CPU device: (what, error name).
#[test]
fn bad_varlen_is_rejected_before_any_write() {
    let base = varlen_prob(
        "varlen/bad",
        AttentionSpec::new(Score::Gaussian).causal(true),
        1800,
        &[5, 0, 9],
        &[7, 3, 9],
    );
    let dense = prob(
        "dense",
        AttentionSpec::new(Score::Gaussian),
        1801,
        [2, 4, 2, 5, 7, 3, 2],
    );
    #[derive(Debug)]
    enum V {
        Ok,
        BatchTwo,
        WithKvLen,
        WithBias,
        WithMask,
        QNotFromZero,
        KDecreasing,
        QEndShort,
        KEndLong,
        QOverMax,
        KOverMax,
        MaxQZero,
        MaxKOverTotal,
        CuKLength,
        CuQOneOffset,
    }
    let run = |what: V| -> (Option<String>, bool) {
        let mut cq = vec![0i32, 5, 5, 14];
        let mut ck = vec![0i32, 7, 10, 19];
        let (mut max_q, mut max_k) = (9usize, 9usize);
        let p = if matches!(what, V::BatchTwo) {
            &dense
        } else {
            &base
        };
        match what {
            V::QNotFromZero => cq[0] = 1,
            V::KDecreasing => ck[2] = 6,
            V::QEndShort => cq[3] = 13,
            V::KEndLong => ck[3] = 20,
            V::QOverMax => max_q = 8,
            V::KOverMax => max_k = 8,
            V::MaxQZero => max_q = 0,
            V::MaxKOverTotal => max_k = 20,
            V::CuKLength => ck.push(19),
            V::CuQOneOffset => {
                cq.truncate(1);
                ck.truncate(1);
            }
            _ => {}
        }
        let h = Host32::new(p, false);
        let (qs, ks, vs, os) = (
            [p.b, p.hq, p.lq, p.d],
            [p.b, p.hkv, p.lk, p.d],
            [p.b, p.hkv, p.lk, p.dv],
            [p.b, p.hq, p.lq, p.dv],
        );
        let (tq, tk, tv) = (
            h.t4(&h.q, qs, false),
            h.t4(&h.k, ks, false),
            h.t4(&h.v, vs, false),
        );
        let bias = vec![0.5f32; p.hq * p.lq * p.lk];
        let mask = vec![1u8; p.lk];
        let kl = vec![p.lk as i32; p.b];
        let prec = Precisions {
            head: h.ph.as_deref().map(View::host),
            key: h.pk.as_deref().map(View::host),
            bias: matches!(what, V::WithBias)
                .then(|| ScoreBias::contiguous(common::host(&bias), [1, p.hq, p.lq, p.lk])),
            mask: matches!(what, V::WithMask)
                .then(|| ScoreBias::contiguous(common::host(&mask), [1, 1, 1, p.lk])),
            varlen: Some(Varlen {
                cu_q: common::host(&cq),
                cu_k: common::host(&ck),
                max_q,
                max_k,
            }),
            ..Default::default()
        };
        let klv = matches!(what, V::WithKvLen).then(|| common::host(&kl));
        let rows = p.rows();
        let mut o = vec![f32::NAN; rows * p.dv];
        let mut lse = vec![f32::NAN; rows];
        let mut e = vec![f32::NAN; rows];
        let r = attention::forward_into(
            &p.spec,
            &tq,
            &tk,
            &tv,
            &prec,
            klv.as_ref(),
            AttentionOutputs {
                o: Tensor4Mut::bhld(common::host_mut(&mut o), os),
                lse: Some(common::host_mut(&mut lse)),
                e: Some(common::host_mut(&mut e)),
            },
            Device::reference().default_stream(),
        );
        let untouched = o.iter().chain(&lse).chain(&e).all(|x| x.is_nan());
        match r {
            Ok(()) => (None, untouched),
            Err(Error::InvalidArgument { name, reason }) => {
                println!("{what:?}: {name}: {reason}");
                (Some(name), untouched)
            }
            Err(other) => panic!("{what:?}: unexpected error kind {other}"),
        }
    };
    let (e, u) = run(V::Ok);
    assert!(e.is_none() && !u);
    let table = [
        (V::BatchTwo, "q"),
        (V::WithKvLen, "kv_len"),
        (V::WithBias, "bias"),
        (V::WithMask, "mask"),
        (V::QNotFromZero, "cu_seqlens_q"),
        (V::KDecreasing, "cu_seqlens_k"),
        (V::QEndShort, "cu_seqlens_q"),
        (V::KEndLong, "cu_seqlens_k"),
        (V::QOverMax, "cu_seqlens_q"),
        (V::KOverMax, "cu_seqlens_k"),
        (V::MaxQZero, "max_seqlen_q"),
        (V::MaxKOverTotal, "max_seqlen_k"),
        (V::CuKLength, "cu_seqlens_k"),
        (V::CuQOneOffset, "cu_seqlens_q"),
    ];
    let mut failures = Vec::new();
    for (what, want) in table {
        let tag = format!("{what:?}");
        let (e, u) = run(what);
        if e.as_deref() != Some(want) || !u {
            failures.push(format!("{tag}: {e:?} (want {want}), untouched {u}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The reference on slices refuses the same inputs, naming them.
#[test]
fn reference_rejects_bad_score_inputs() {
    let p = prob(
        "ref/bad",
        AttentionSpec::new(Score::StudentT(2.0)),
        1900,
        SHAPE,
    )
    .with_nu_head()
    .with_bias("f1f", 1.0)
    .with_mask("1f1");
    let name = |r: fep_kernels::Result<RefOutputs>| match r {
        Err(Error::InvalidArgument { name, .. }) => name,
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    let inp = p.inputs();
    assert!(reference::forward(&p.spec, &inp).is_ok());
    let (bv, bs) = p.bias.clone().unwrap();
    let (mv, ms) = p.mask.clone().unwrap();
    let with_bias = |vals: &[f64], shape| {
        name(reference::forward(
            &p.spec,
            &RefInputs {
                bias: Some(RefBroadcast {
                    values: vals,
                    shape,
                }),
                ..inp
            },
        ))
    };
    assert_eq!(with_bias(&bv, [2, 2, 4, 5]), "bias"); // Hkv heads
    assert_eq!(with_bias(&bv[..40], [2, 1, 4, 1]), "bias"); // Lk broadcast
    assert_eq!(with_bias(&bv[..39], bs), "bias"); // length
    for bad in [f64::NAN, f64::INFINITY] {
        let mut b2 = bv.clone();
        b2[7] = bad;
        assert_eq!(with_bias(&b2, bs), "bias");
    }
    assert_eq!(
        name(reference::forward(
            &p.spec,
            &RefInputs {
                mask: Some(RefBroadcast {
                    values: &mv,
                    shape: [1, 4, 2, 5]
                }),
                ..inp
            }
        )),
        "mask"
    );
    assert_eq!(
        name(reference::forward(
            &p.spec,
            &RefInputs {
                mask: Some(RefBroadcast {
                    values: &mv[1..],
                    shape: ms
                }),
                ..inp
            }
        )),
        "mask"
    );
    for nu in [
        &[1.0, 2.0, 0.0, 3.0][..],
        &[1.0, -2.0, 1.0, 3.0][..],
        &[1.0, 2.0, f64::NAN, 3.0][..],
        &[1.0, 2.0, 3.0][..],
        &[1.0; 5][..],
    ] {
        assert_eq!(
            name(reference::forward(
                &p.spec,
                &RefInputs {
                    nu_head: Some(nu),
                    ..inp
                }
            )),
            "nu"
        );
    }
    assert_eq!(
        name(reference::forward(
            &AttentionSpec::new(Score::Laplace),
            &inp
        )),
        "nu"
    );
    // Varlen with B ≠ 1, kv_len, bias or mask.
    let cu = [0, 2, 4];
    let vl = Some(RefVarlen {
        cu_q: &cu,
        cu_k: &[0, 2, 5],
    });
    assert_eq!(
        name(reference::forward(
            &p.spec,
            &RefInputs { varlen: vl, ..inp }
        )),
        "varlen"
    );
    let one = varlen_prob(
        "ref/vl",
        AttentionSpec::new(Score::Gaussian),
        1901,
        &[5, 0, 9],
        &[7, 3, 9],
    );
    let oi = one.inputs();
    assert!(reference::forward(&one.spec, &oi).is_ok());
    assert_eq!(
        name(reference::forward(
            &one.spec,
            &RefInputs {
                kv_len: Some(&[19]),
                ..oi
            }
        )),
        "varlen"
    );
    for (cq, ck, want) in [
        (&[1, 5, 5, 14][..], &[0, 7, 10, 19][..], "cu_seqlens_q"),
        (&[0, 5, 5, 14][..], &[0, 7, 6, 19][..], "cu_seqlens_k"),
        (&[0, 5, 5, 13][..], &[0, 7, 10, 19][..], "cu_seqlens_q"),
        (&[0, 5, 5, 14][..], &[0, 7, 10, 19, 19][..], "cu_seqlens_k"),
        (&[0][..], &[0][..], "cu_seqlens_q"),
    ] {
        assert_eq!(
            name(reference::forward(
                &one.spec,
                &RefInputs {
                    varlen: Some(RefVarlen { cu_q: cq, cu_k: ck }),
                    ..oi
                }
            )),
            want
        );
    }
    // d_lse of the wrong length.
    let rows = p.rows();
    let dl = vec![0.5; rows + 1];
    for bad in [&dl[..rows - 1], &dl[..]] {
        match reference::backward(
            &p.spec,
            &inp,
            &RefGradInputs {
                d_o: &p.d_o,
                d_e: None,
                d_lse: Some(bad),
            },
        ) {
            Err(Error::InvalidArgument { name, .. }) => assert_eq!(name, "d_lse"),
            other => panic!("expected d_lse, got {other:?}"),
        }
    }
}

/// Strided broadcast tensors: a size-1 dimension's stride is never read (any value, 0 or
/// huge, gives the same result), and a padded row stride is honoured, for the bias and the mask.
#[test]
fn strided_bias_and_mask_equal_the_contiguous_ones() {
    let p = prob(
        "gaussian/strided",
        AttentionSpec::new(Score::Gaussian).causal(true),
        2000,
        SHAPE,
    )
    .with_bias("1f1", 1.0)
    .with_mask("f1f");
    let want = device_run(&p, false);
    let h = Host32::new(&p, false);
    let (qs, ks, vs) = (
        [p.b, p.hq, p.lq, p.d],
        [p.b, p.hkv, p.lk, p.d],
        [p.b, p.hkv, p.lk, p.dv],
    );
    let (bias, mask) = (h.bias.clone().unwrap(), h.mask.clone().unwrap());
    // bias [1, Hq, 1, Lk] with rows padded to 8 and the size-1 strides 0 and 10^6.
    let lk = p.lk;
    let mut bpad = vec![f32::NAN; p.hq * 8];
    for hh in 0..p.hq {
        bpad[hh * 8..hh * 8 + lk].copy_from_slice(&bias[hh * lk..][..lk]);
    }
    // mask [B, 1, Lq, Lk] as rows of 7 with garbage (0) in the padding.
    let mut mpad = vec![0u8; p.b * p.lq * 7];
    for r in 0..p.b * p.lq {
        mpad[r * 7..r * 7 + lk].copy_from_slice(&mask[r * lk..][..lk]);
    }
    let sb = ScoreBias {
        data: common::host(&bpad),
        shape: [1, p.hq, 1, lk],
        strides: [0, 8, 1_000_000],
    };
    let sm = ScoreBias {
        data: common::host(&mpad),
        shape: [p.b, 1, p.lq, lk],
        strides: [p.lq * 7, 0, 7],
    };
    let prec = Precisions {
        head: h.ph.as_deref().map(View::host),
        key: h.pk.as_deref().map(View::host),
        bias: Some(sb),
        mask: Some(sm),
        ..Default::default()
    };
    let r = attention::forward(
        &p.spec,
        &h.t4(&h.q, qs, false),
        &h.t4(&h.k, ks, false),
        &h.t4(&h.v, vs, false),
        &prec,
        None,
    )
    .unwrap();
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&r.o.to_vec().unwrap()), bits(&f32s(&want.o)));
    assert_eq!(bits(&r.lse.to_vec().unwrap()), bits(&f32s(&want.lse)));
    assert_eq!(bits(&r.e.to_vec().unwrap()), bits(&f32s(&want.e)));
}

/// A bias given as a broadcast view with a zero stride on a full dimension (what torch's
/// `expand` makes) is the same bias as the materialised one (ScoreBias: strides "free, 0
/// allowed"; refused by the shared stride check until commit 71541ce).
#[test]
fn zero_stride_bias_equals_the_materialised_bias() {
    let p = prob(
        "gaussian/stride0",
        AttentionSpec::new(Score::Gaussian).causal(true),
        2000,
        SHAPE,
    )
    .with_bias("1ff", 1.0);
    let dense = {
        // The same bias repeated over the batch.
        let (bv, _) = p.bias.clone().unwrap();
        let mut q = p.clone();
        q.bias = Some(([bv.clone(), bv].concat(), [p.b, p.hq, p.lq, p.lk]));
        q
    };
    let h = Host32::new(&p, false);
    let (qs, ks, vs) = (
        [p.b, p.hq, p.lq, p.d],
        [p.b, p.hkv, p.lk, p.d],
        [p.b, p.hkv, p.lk, p.dv],
    );
    let bias = h.bias.clone().unwrap();
    let mut sb = ScoreBias::contiguous(common::host(&bias), [p.b, p.hq, p.lq, p.lk]);
    sb.strides = [0, p.lq * p.lk, p.lk];
    let prec = Precisions {
        head: h.ph.as_deref().map(View::host),
        key: h.pk.as_deref().map(View::host),
        bias: Some(sb),
        ..Default::default()
    };
    let r = attention::forward(
        &p.spec,
        &h.t4(&h.q, qs, false),
        &h.t4(&h.k, ks, false),
        &h.t4(&h.v, vs, false),
        &prec,
        None,
    )
    .unwrap_or_else(|e| panic!("a zero-stride (expanded) bias is refused: {e}"));
    let w = worst(&widen(&r.o.to_vec().unwrap()), &dense.rounded().forward().o);
    assert!(w <= 1e-6, "o differs by {w:.2e}");
}
