//! Attention backward, the f64 CPU reference (`attention::reference::backward`): against central
//! finite differences of the f64 forward reference (every family, precision kind, normaliser,
//! mask, GQA ratio, D ≠ Dv, with and without ∂L/∂e), against PyTorch float64 autograd
//! (tests/fixtures/attention_backward_torch.json, conventions in
//! tests/fixtures/ATTENTION-CONVENTIONS.md §11), the View API (`backward`, `backward_into`) on
//! `Device::reference()` with strided BLHD tensors, and bad input.

// `!(err <= tol)` on purpose: a NaN error must fail.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

mod common;

use common::attention::{
    BackwardCase, TID_D_E, TID_D_O, load_backward_case, precision, raw_bits, uniform_pm1,
    uniform_tensor,
};
use fep_kernels::attention::reference::{self, RefGradInputs, RefGradients, RefInputs};
use fep_kernels::attention::{
    self, AttentionSpec, BackwardInputs, Gradients, Precisions, Score, Tensor4, Tensor4Mut,
};
use fep_kernels::{Device, Error, View, ViewMut};
use serde_json::Value;

// =============================================================================================
// Problems
// =============================================================================================

/// One attention problem with its upstream gradients, every tensor row-major BHLD in f64.
#[derive(Clone, Debug)]
struct Prob {
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
    d_o: Vec<f64>,
    d_e: Option<Vec<f64>>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Prec {
    None,
    Head,
    Key,
    Both,
}

/// Inputs from the fixtures' SplitMix64 generator (q, k, v in [−1, 1), precisions in
/// [0.25, 4)), ∂L/∂o and ∂L/∂e from tensor ids 7 and 8.
fn prob(
    name: &str,
    spec: AttentionSpec,
    seed: u64,
    [b, hq, hkv, lq, lk, d, dv]: [usize; 7],
    prec: Prec,
) -> Prob {
    let pr = |tid, n| -> Vec<f64> { raw_bits(seed, tid, n).into_iter().map(precision).collect() };
    let rows = b * hq * lq;
    Prob {
        name: name.to_string(),
        spec,
        b,
        hq,
        hkv,
        lq,
        lk,
        d,
        dv,
        q: uniform_tensor(seed, 1, rows * d),
        k: uniform_tensor(seed, 2, b * hkv * lk * d),
        v: uniform_tensor(seed, 3, b * hkv * lk * dv),
        pi_head: matches!(prec, Prec::Head | Prec::Both).then(|| pr(4, hq)),
        pi_key: matches!(prec, Prec::Key | Prec::Both).then(|| pr(5, b * hkv * lk)),
        kv_len: None,
        d_o: uniform_tensor(seed, TID_D_O, rows * dv),
        d_e: Some(uniform_tensor(seed, TID_D_E, rows)),
    }
}

impl Prob {
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
            ..Default::default()
        }
    }

    fn grads(&self) -> RefGradients {
        reference::backward(
            &self.spec,
            &self.inputs(),
            &RefGradInputs {
                d_o: &self.d_o,
                d_e: self.d_e.as_deref(),
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    fn kv_len(mut self, l: &[i32]) -> Self {
        assert_eq!(l.len(), self.b);
        self.kv_len = Some(l.to_vec());
        self
    }

    fn no_e(mut self) -> Self {
        self.d_e = None;
        self
    }

    /// Only the e term in the loss.
    fn e_only(mut self) -> Self {
        self.d_o.iter_mut().for_each(|x| *x = 0.0);
        self
    }

    /// Whether key j of batch b is visible from query row i (the conventions' predicates, §4).
    fn visible(&self, b: usize, i: usize, j: usize) -> bool {
        let ip = i as i64 + self.lk as i64 - self.lq as i64;
        let j = j as i64;
        (!self.spec.is_causal() || j <= ip)
            && self.spec.window.is_none_or(|w| j > ip - w as i64)
            && self.kv_len.as_ref().is_none_or(|l| j < l[b] as i64)
    }
}

// =============================================================================================
// Finite differences
// =============================================================================================

/// The differentiable inputs: q, k, v, π_h and π_j (ones where the problem has none: the
/// reference's gradients are taken at π = 1 there), ν.
#[derive(Clone)]
struct Point {
    t: [Vec<f64>; 5],
    nu: f32,
}

const NAMES: [&str; 5] = ["q", "k", "v", "pi_head", "pi_key"];

fn point(p: &Prob) -> Point {
    Point {
        t: [
            p.q.clone(),
            p.k.clone(),
            p.v.clone(),
            p.pi_head.clone().unwrap_or_else(|| vec![1.0; p.hq]),
            p.pi_key
                .clone()
                .unwrap_or_else(|| vec![1.0; p.b * p.hkv * p.lk]),
        ],
        nu: match p.spec.score {
            Score::StudentT(nu) => nu,
            _ => 0.0,
        },
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// L = Σ d_o·o + Σ d_e·e at `x`, by the f64 forward reference.
fn loss(p: &Prob, x: &Point) -> f64 {
    let mut spec = p.spec;
    if let Score::StudentT(_) = spec.score {
        spec.score = Score::StudentT(x.nu);
    }
    let inp = RefInputs {
        q: &x.t[0],
        k: &x.t[1],
        v: &x.t[2],
        pi_head: Some(&x.t[3]),
        pi_key: Some(&x.t[4]),
        ..p.inputs()
    };
    let r = reference::forward(&spec, &inp).unwrap();
    dot(&p.d_o, &r.o) + p.d_e.as_deref().map_or(0.0, |de| dot(de, &r.e))
}

/// Largest number of elements per tensor perturbed (a random sample beyond it).
const FD_MAX: usize = 300;
/// |reference − finite difference| / max(max |gradient| of the tensor, FD_FLOOR).
const FD_TOL: f64 = 1e-7;
const FD_FLOOR: f64 = 1e-3;

/// The worst scaled deviation of the reference from finite differences, per tensor.
fn fd_check(p: &Prob) -> Vec<(String, f64)> {
    let g = p.grads();
    let refs: [&[f64]; 5] = [&g.dq, &g.dk, &g.dv, &g.dpi_head, &g.dpi_key];
    let x0 = point(p);
    for (n, r) in NAMES.iter().zip(refs) {
        assert_eq!(
            r.len(),
            x0.t[NAMES.iter().position(|m| m == n).unwrap()].len()
        );
        assert!(
            r.iter().all(|x| x.is_finite()),
            "{}: d{n} not finite",
            p.name
        );
    }
    assert!(g.dnu.is_finite(), "{}: dnu not finite", p.name);
    // With a missing precision, the same gradients as with a precision of ones.
    if p.pi_head.is_none() || p.pi_key.is_none() {
        let ones = Prob {
            pi_head: Some(x0.t[3].clone()),
            pi_key: Some(x0.t[4].clone()),
            ..p.clone()
        };
        let g1 = ones.grads();
        let same = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-15);
        assert!(
            same(&g.dq, &g1.dq)
                && same(&g.dk, &g1.dk)
                && same(&g.dpi_head, &g1.dpi_head)
                && same(&g.dpi_key, &g1.dpi_key),
            "{}: π = None and π = 1 differ",
            p.name
        );
    }

    let mut rng = common::rng(0xfd);
    let mut out = Vec::new();
    for (ti, r) in refs.iter().enumerate() {
        let n = x0.t[ti].len();
        let idx: Vec<usize> = if n <= FD_MAX {
            (0..n).collect()
        } else {
            rand::seq::index::sample(&mut rng, n, FD_MAX).into_vec()
        };
        let mut fd = Vec::with_capacity(idx.len());
        for &i in &idx {
            let v = x0.t[ti][i];
            let h = 1e-5 * v.abs().max(1.0);
            let mut x = x0.clone();
            x.t[ti][i] = v + h;
            let lp = loss(p, &x);
            let hp = x.t[ti][i];
            x.t[ti][i] = v - h;
            let lm = loss(p, &x);
            fd.push((lp - lm) / (hp - x.t[ti][i]));
        }
        let scale = idx
            .iter()
            .map(|&i| r[i].abs())
            .chain(fd.iter().map(|x| x.abs()))
            .fold(FD_FLOOR, f64::max);
        let worst = idx
            .iter()
            .zip(&fd)
            .map(|(&i, f)| (r[i] - f).abs() / scale)
            .fold(0.0, f64::max);
        out.push((NAMES[ti].to_string(), worst));
    }
    // ν: ν is an f32, so a fourth-order stencil with a power-of-two step (exact in f32).
    if let Score::StudentT(nu) = p.spec.score {
        let h = 2f32.powi(nu.log2().floor() as i32 - 8);
        let at = |m: f32| {
            let mut x = x0.clone();
            x.nu = nu + m * h;
            assert_eq!((x.nu - nu) / h, m);
            loss(p, &x)
        };
        let fd = (at(-2.0) - 8.0 * at(-1.0) + 8.0 * at(1.0) - at(2.0)) / (12.0 * h as f64);
        out.push((
            "nu".to_string(),
            (g.dnu - fd).abs() / g.dnu.abs().max(fd.abs()).max(FD_FLOOR),
        ));
    } else {
        assert_eq!(g.dnu, 0.0, "{}: dnu of a family without ν", p.name);
    }
    check_masked_zeros(p, &g);
    out
}

/// Fully masked rows give dq = 0 exactly, and keys no row sees give dk = dv = dπ_j = 0.
fn check_masked_zeros(p: &Prob, g: &RefGradients) {
    for b in 0..p.b {
        for i in 0..p.lq {
            if (0..p.lk).any(|j| p.visible(b, i, j)) {
                continue;
            }
            for h in 0..p.hq {
                let row = (b * p.hq + h) * p.lq + i;
                assert!(
                    g.dq[row * p.d..][..p.d].iter().all(|&x| x == 0.0),
                    "{}: dq of fully masked row {row}",
                    p.name
                );
            }
        }
        for j in 0..p.lk {
            if (0..p.lq).any(|i| p.visible(b, i, j)) {
                continue;
            }
            for hk in 0..p.hkv {
                let kr = (b * p.hkv + hk) * p.lk + j;
                assert!(
                    g.dk[kr * p.d..][..p.d].iter().all(|&x| x == 0.0)
                        && g.dv[kr * p.dv..][..p.dv].iter().all(|&x| x == 0.0)
                        && g.dpi_key[kr] == 0.0,
                    "{}: gradients of the invisible key {kr}",
                    p.name
                );
            }
        }
    }
}

/// Runs the finite-difference check on every problem; prints and asserts.
fn run_fd(probs: &[Prob]) {
    run_fd_tol(probs, FD_TOL);
}

/// [`run_fd`] with a tolerance.
fn run_fd_tol(probs: &[Prob], tol: f64) {
    let mut worst = (0.0f64, String::new());
    let mut failures = Vec::new();
    for p in probs {
        let errs = fd_check(p);
        let m = errs.iter().map(|e| e.1).fold(0.0, f64::max);
        let line = errs
            .iter()
            .map(|(n, e)| format!("{n} {e:.1e}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!("{}: {line}", p.name);
        if !(m <= tol) {
            failures.push(format!("{}: {line}", p.name));
        }
        if m > worst.0 {
            worst = (m, p.name.clone());
        }
    }
    println!("worst: {:.2e} ({})", worst.0, worst.1);
    assert!(failures.is_empty(), "failing:\n{}", failures.join("\n"));
}

const FAMILIES: [Score; 5] = [
    Score::Dot,
    Score::Gaussian,
    Score::StudentT(5.0),
    Score::StudentT(1.0),
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

#[test]
fn fd_families_precisions_normaliser() {
    let mut probs = Vec::new();
    let mut seed = 100;
    for score in FAMILIES {
        for prec in [Prec::None, Prec::Head, Prec::Key, Prec::Both] {
            let norms: &[bool] = if score == Score::Dot {
                &[true]
            } else {
                &[true, false]
            };
            for &norm in norms {
                seed += 1;
                let spec = AttentionSpec::new(score).normalizer(norm);
                let name = format!("{}/{prec:?}/norm={norm}", tag(score));
                probs.push(prob(&name, spec, seed, [2, 2, 1, 4, 6, 3, 2], prec));
            }
        }
    }
    // ν < 1, an explicit τ.
    probs.push(prob(
        "studentt0.5/both",
        AttentionSpec::new(Score::StudentT(0.5)),
        150,
        [1, 2, 1, 4, 6, 3, 2],
        Prec::Both,
    ));
    for (i, score) in FAMILIES.into_iter().enumerate() {
        let spec = AttentionSpec::new(score).scale(0.375);
        let name = format!("{}/tau0.375", tag(score));
        probs.push(prob(
            &name,
            spec,
            160 + i as u64,
            [1, 2, 1, 4, 6, 3, 2],
            Prec::Both,
        ));
    }
    run_fd(&probs);
}

#[test]
fn fd_masks() {
    let mut probs = Vec::new();
    let mut seed = 200;
    for score in FAMILIES {
        let t = tag(score);
        let s = AttentionSpec::new(score);
        let mut add = |name: &str, spec: AttentionSpec, shape: [usize; 7], kl: Option<&[i32]>| {
            seed += 1;
            let mut p = prob(&format!("{t}/{name}"), spec, seed, shape, Prec::Both);
            if let Some(kl) = kl {
                p = p.kv_len(kl);
            }
            probs.push(p);
        };
        add(
            "causal_lq_lt_lk",
            s.causal(true),
            [1, 2, 1, 4, 7, 3, 2],
            None,
        );
        add(
            "causal_lq_gt_lk",
            s.causal(true),
            [1, 2, 1, 7, 3, 3, 2],
            None,
        );
        add("causal_square", s.causal(true), [1, 2, 1, 5, 5, 3, 2], None);
        add("window2", s.window(2), [1, 2, 1, 6, 6, 3, 2], None);
        add(
            "window3_bottom_right",
            s.window(3),
            [1, 2, 1, 4, 8, 3, 2],
            None,
        );
        add("window1", s.window(1), [1, 1, 1, 5, 5, 3, 2], None);
        add(
            "varlen_empty_batch",
            s,
            [2, 2, 1, 4, 6, 3, 2],
            Some(&[0, 4]),
        );
        add(
            "causal_varlen",
            s.causal(true),
            [3, 2, 1, 5, 7, 3, 2],
            Some(&[7, 0, 3]),
        );
        add(
            "window_varlen",
            s.window(3),
            [2, 2, 1, 5, 7, 3, 2],
            Some(&[4, 0]),
        );
        add(
            "causal_lq_gt_lk_varlen",
            s.causal(true),
            [2, 2, 1, 9, 5, 3, 2],
            Some(&[5, 2]),
        );
    }
    run_fd(&probs);
}

#[test]
fn fd_gqa_head_dims_and_the_e_term() {
    let mut probs = Vec::new();
    let mut seed = 300;
    for score in FAMILIES {
        let t = tag(score);
        let s = AttentionSpec::new(score);
        let mut add = |p: Prob| probs.push(p);
        let mut sd = || {
            seed += 1;
            seed
        };
        // GQA ratios 1, 2, 4 with per-key precision per kv head.
        add(prob(
            &format!("{t}/gqa1"),
            s.causal(true),
            sd(),
            [1, 2, 2, 4, 6, 3, 2],
            Prec::Both,
        ));
        add(prob(
            &format!("{t}/gqa2"),
            s,
            sd(),
            [1, 4, 2, 3, 5, 3, 2],
            Prec::Both,
        ));
        add(prob(
            &format!("{t}/gqa4"),
            s.window(3),
            sd(),
            [2, 4, 1, 4, 6, 3, 2],
            Prec::Both,
        ));
        // D ≠ Dv both ways, D = 1, Dv = 1.
        add(prob(
            &format!("{t}/d5dv2"),
            s,
            sd(),
            [1, 2, 1, 4, 5, 5, 2],
            Prec::Key,
        ));
        add(prob(
            &format!("{t}/d2dv5"),
            s,
            sd(),
            [1, 2, 1, 4, 5, 2, 5],
            Prec::Head,
        ));
        add(prob(
            &format!("{t}/d1dv1"),
            s,
            sd(),
            [2, 1, 1, 3, 4, 1, 1],
            Prec::Both,
        ));
        // Lengths 1.
        add(prob(
            &format!("{t}/1x1"),
            s,
            sd(),
            [2, 2, 1, 1, 1, 3, 2],
            Prec::Both,
        ));
        add(prob(
            &format!("{t}/1x9_causal"),
            s.causal(true),
            sd(),
            [1, 2, 1, 1, 9, 3, 2],
            Prec::Both,
        ));
        add(prob(
            &format!("{t}/9x1"),
            s,
            sd(),
            [1, 1, 1, 9, 1, 3, 2],
            Prec::Both,
        ));
        // Without d_e, and with the e term alone.
        add(prob(
            &format!("{t}/no_e"),
            s.causal(true),
            sd(),
            [2, 2, 1, 4, 6, 3, 2],
            Prec::Both,
        )
        .no_e());
        add(prob(
            &format!("{t}/no_e_none"),
            s,
            sd(),
            [1, 2, 1, 4, 6, 3, 2],
            Prec::None,
        )
        .no_e());
        add(prob(
            &format!("{t}/e_only"),
            s,
            sd(),
            [1, 2, 1, 4, 6, 3, 2],
            Prec::Both,
        )
        .e_only());
        add(prob(
            &format!("{t}/e_only_varlen"),
            s.causal(true),
            sd(),
            [2, 2, 1, 4, 6, 3, 2],
            Prec::Key,
        )
        .e_only()
        .kv_len(&[0, 5]));
    }
    // The largest problem of the brief's bounds: B 2, Hq 4, Hkv 1, L 9, D 5 (sampled).
    probs.push(
        prob(
            "gaussian/b2h4l9d5",
            AttentionSpec::new(Score::Gaussian).causal(true),
            399,
            [2, 4, 1, 9, 9, 5, 4],
            Prec::Both,
        )
        .kv_len(&[9, 6]),
    );
    run_fd(&probs);
}

/// q_i = k_j exactly at visible pairs. The smooth families are checked as everywhere else.
/// Laplace's d is not differentiable there; the reference takes the gradient through d as 0,
/// the limit of central differences (|h| is even), which converge only at O(h) there (L mixes the
/// even |h| with odd terms: F_ab |h| h), so Laplace gets a tolerance of 1e-5 (measured 1.3e-6
/// at h = 1e-5; anything else than the 0 subgradient would be off by O(1)).
#[test]
fn fd_coincident_query_and_key() {
    let mut probs = Vec::new();
    let mut laplace = Vec::new();
    for (i, score) in FAMILIES.into_iter().enumerate() {
        let spec = AttentionSpec::new(score).causal(true);
        let mut p = prob(
            &format!("{}/coincident", tag(score)),
            spec,
            500 + i as u64,
            [1, 2, 1, 4, 5, 3, 2],
            Prec::Both,
        );
        // (head 0, row 3) = key 0; (head 1, row 1) = key 2 (both visible under causal).
        let d = p.d;
        let k0 = p.k[..d].to_vec();
        let k2 = p.k[2 * d..3 * d].to_vec();
        p.q[3 * d..4 * d].copy_from_slice(&k0);
        p.q[(p.lq + 1) * d..(p.lq + 2) * d].copy_from_slice(&k2);
        assert!(p.visible(0, 3, 0) && p.visible(0, 1, 2));
        if score == Score::Laplace {
            laplace.push(p);
        } else {
            probs.push(p);
        }
    }
    run_fd(&probs);
    run_fd_tol(&laplace, 1e-5);
}

#[test]
fn reference_rejects_bad_upstream_gradients() {
    let p = prob(
        "bad",
        AttentionSpec::new(Score::Gaussian),
        7,
        [2, 2, 1, 3, 4, 3, 2],
        Prec::Both,
    );
    let name = |r: fep_kernels::Result<RefGradients>| match r {
        Err(Error::InvalidArgument { name, .. }) => name,
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    let de = p.d_e.clone().unwrap();
    let inp = p.inputs();
    for bad in [
        &p.d_o[1..],
        &p.d_o[..0],
        &[p.d_o.clone(), vec![0.0]].concat()[..],
    ] {
        let g = RefGradInputs {
            d_o: bad,
            d_e: Some(&de),
            ..Default::default()
        };
        assert_eq!(name(reference::backward(&p.spec, &inp, &g)), "d_o");
    }
    for bad in [&de[1..], &[de.clone(), vec![0.0]].concat()[..]] {
        let g = RefGradInputs {
            d_o: &p.d_o,
            d_e: Some(bad),
            ..Default::default()
        };
        assert_eq!(name(reference::backward(&p.spec, &inp, &g)), "d_e");
    }
    // The forward's checks apply as well.
    let good = RefGradInputs {
        d_o: &p.d_o,
        d_e: Some(&de),
        ..Default::default()
    };
    let mut pk = p.pi_key.clone().unwrap();
    pk[1] = 0.0;
    assert_eq!(
        name(reference::backward(
            &p.spec,
            &RefInputs {
                pi_key: Some(&pk),
                ..inp
            },
            &good
        )),
        "precision.key"
    );
    assert_eq!(
        name(reference::backward(
            &p.spec,
            &RefInputs {
                kv_len: Some(&[1, 5]),
                ..inp
            },
            &good
        )),
        "kv_len"
    );
    assert_eq!(
        name(reference::backward(
            &AttentionSpec::new(Score::StudentT(f32::NAN)),
            &inp,
            &good
        )),
        "nu"
    );
    assert_eq!(
        name(reference::backward(
            &p.spec,
            &RefInputs { hkv: 3, ..inp },
            &good
        )),
        "k"
    );
}

// =============================================================================================
// PyTorch float64 autograd fixture
// =============================================================================================

/// |x − ref| / max(1, |ref|) per element: the conventions' metric (worst seen: 2.7e-14).
const TORCH_TOL: f64 = 1e-12;

fn worst(got: &[f64], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    got.iter()
        .zip(want)
        .map(|(g, r)| {
            let d = (g - r).abs() / r.abs().max(1.0);
            if d.is_finite() { d } else { f64::INFINITY }
        })
        .fold(0.0, f64::max)
}

fn hex(v: &Value) -> u64 {
    u64::from_str_radix(v.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
}

#[test]
fn every_case_matches_torch_autograd() {
    let fx = common::load_fixture("attention_backward_torch.json");
    println!("torch {}", fx["versions"]["torch"]);
    let raw = fx["cases"].as_array().expect("cases");
    let cases: Vec<BackwardCase> = raw.iter().map(load_backward_case).collect();
    assert_eq!(cases.len(), 33);

    // The new tensor ids' streams.
    let chk = &fx["input_generator"]["check"];
    let seed = chk["seed"].as_u64().unwrap();
    for (field, tid) in [("d_o_raw_u64", TID_D_O), ("d_e_raw_u64", TID_D_E)] {
        let want: Vec<u64> = chk[field].as_array().unwrap().iter().map(hex).collect();
        assert_eq!(raw_bits(seed, tid, want.len()), want, "{field}");
    }
    let first = cases
        .iter()
        .find(|c| c.case.name == chk["case"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        first.d_o[0].to_bits(),
        uniform_pm1(raw_bits(seed, TID_D_O, 1)[0]).to_bits()
    );

    let mut failures = Vec::new();
    let mut overall = (0.0f64, String::new());
    let (mut masked_rows, mut studentt) = (0, 0);
    for c in &cases {
        let inp = c.case.inputs();
        let g = reference::backward(
            &c.case.spec,
            &inp,
            &RefGradInputs {
                d_o: &c.d_o,
                d_e: c.d_e.as_deref(),
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{}: {e}", c.case.name));
        let f = reference::forward(&c.case.spec, &inp).unwrap();
        let n_masked = f.lse.iter().filter(|x| **x == f64::NEG_INFINITY).count();
        assert_eq!(n_masked, c.fully_masked_rows, "{}", c.case.name);
        masked_rows += n_masked;
        let mut errs = vec![
            ("q", worst(&g.dq, &c.dq)),
            ("k", worst(&g.dk, &c.dk)),
            ("v", worst(&g.dv, &c.dv)),
            ("pi_head", worst(&g.dpi_head, &c.dpi_head)),
            ("pi_key", worst(&g.dpi_key, &c.dpi_key)),
        ];
        match (c.case.spec.score, c.dnu) {
            (Score::StudentT(_), Some(nu)) => {
                studentt += 1;
                errs.push(("nu", worst(&[g.dnu], &[nu])));
            }
            (Score::StudentT(_), None) => panic!("{}: no nu gradient stored", c.case.name),
            (_, None) => assert_eq!(g.dnu, 0.0),
            (_, Some(_)) => panic!("{}: a nu gradient for a family without nu", c.case.name),
        }
        let m = errs.iter().map(|e| e.1).fold(0.0, f64::max);
        let line = errs
            .iter()
            .map(|(n, e)| format!("{n} {e:.1e}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!("{}: {line}", c.case.name);
        if !(m <= TORCH_TOL) {
            failures.push(format!("{}: {line}", c.case.name));
        }
        if m > overall.0 {
            overall = (m, c.case.name.clone());
        }
    }
    println!("worst over all cases: {:.2e} ({})", overall.0, overall.1);
    assert!(failures.is_empty(), "failing:\n{}", failures.join("\n"));
    assert!(masked_rows > 0 && studentt >= 8);
}

// =============================================================================================
// The View API on Device::reference()
// =============================================================================================

fn f32s(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// BHLD `[B, H, L, D]` → BLHD memory.
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

/// f32 results within one rounding of the f64 reference (run on the same f32 inputs).
fn assert_one_rounding(name: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = w.abs() * f32::EPSILON as f64 / 2.0 * 1.01;
        assert!(
            (g as f64 - w).abs() <= tol,
            "{name}[{i}]: {g} vs {w} (tol {tol:.2e})"
        );
    }
}

#[test]
fn view_api_blhd_matches_the_reference() {
    let shape = [2, 4, 2, 5, 7, 8, 4];
    let [b, hq, hkv, lq, lk, d, dv] = shape;
    for (score, e_term) in [
        (Score::StudentT(3.0), true),
        (Score::Laplace, true),
        (Score::Dot, false),
        (Score::Gaussian, false),
    ] {
        let spec = AttentionSpec::new(score).causal(true);
        // The problem on f32-rounded values, so the reference sees exactly the f32 inputs.
        let mut p = prob("api", spec, 11, shape, Prec::Both).kv_len(&[7, 0]);
        let r32 = |x: &mut Vec<f64>| *x = widen(&f32s(x));
        for x in [&mut p.q, &mut p.k, &mut p.v, &mut p.d_o] {
            r32(x);
        }
        for x in [p.pi_head.as_mut(), p.pi_key.as_mut(), p.d_e.as_mut()]
            .into_iter()
            .flatten()
        {
            r32(x);
        }
        if !e_term {
            p = p.no_e();
        }
        let want = p.grads();
        let fwd = reference::forward(&spec, &p.inputs()).unwrap();

        let (qs, ks, vs, os) = (
            [b, hq, lq, d],
            [b, hkv, lk, d],
            [b, hkv, lk, dv],
            [b, hq, lq, dv],
        );
        let q = to_blhd(&f32s(&p.q), qs);
        let k = to_blhd(&f32s(&p.k), ks);
        let v = to_blhd(&f32s(&p.v), vs);
        let o = to_blhd(&f32s(&fwd.o), os);
        let d_o = to_blhd(&f32s(&p.d_o), os);
        let lse = f32s(&fwd.lse);
        let e = f32s(&fwd.e);
        let d_e = p.d_e.as_deref().map(f32s);
        let ph = f32s(p.pi_head.as_ref().unwrap());
        let pk = f32s(p.pi_key.as_ref().unwrap());
        let kl = p.kv_len.clone().unwrap();
        let tq = Tensor4::blhd(common::host(&q), qs);
        let tk = Tensor4::blhd(common::host(&k), ks);
        let tv = Tensor4::blhd(common::host(&v), vs);
        let prec = Precisions {
            head: Some(common::host(&ph)),
            key: Some(common::host(&pk)),
            ..Default::default()
        };
        let klv = common::host(&kl);
        let inputs = BackwardInputs {
            o: Tensor4::blhd(common::host(&o), os),
            lse: common::host(&lse),
            d_o: Tensor4::blhd(common::host(&d_o), os),
            e: Some(common::host(&e)),
            d_e: d_e.as_deref().map(View::host),
            d_lse: None,
        };

        // backward_into, BLHD outputs poisoned with NaN.
        let mut dq = vec![f32::NAN; b * hq * lq * d];
        let mut dk = vec![f32::NAN; b * hkv * lk * d];
        let mut dvv = vec![f32::NAN; b * hkv * lk * dv];
        let mut dph = vec![f32::NAN; hq];
        let mut dpk = vec![f32::NAN; b * hkv * lk];
        let mut dnu = [f32::NAN];
        let out = Gradients {
            dq: Tensor4Mut::blhd(common::host_mut(&mut dq), qs),
            dk: Tensor4Mut::blhd(common::host_mut(&mut dk), ks),
            dv: Tensor4Mut::blhd(common::host_mut(&mut dvv), vs),
            dpi_head: Some(common::host_mut(&mut dph)),
            dpi_key: Some(common::host_mut(&mut dpk)),
            dnu: Some(common::host_mut(&mut dnu)),
            dbias: None,
        };
        let dev = Device::reference();
        attention::backward_into(
            &spec,
            &tq,
            &tk,
            &tv,
            &prec,
            Some(&klv),
            &inputs,
            out,
            dev.default_stream(),
        )
        .unwrap();
        assert_one_rounding("dq", &from_blhd(&dq, qs), &want.dq);
        assert_one_rounding("dk", &from_blhd(&dk, ks), &want.dk);
        assert_one_rounding("dv", &from_blhd(&dvv, vs), &want.dv);
        assert_one_rounding("dpi_head", &dph, &want.dpi_head);
        assert_one_rounding("dpi_key", &dpk, &want.dpi_key);
        assert_one_rounding("dnu", &dnu, &[want.dnu]);
        // Batch 1 has no key: its gradients are exactly zero, not NaN.
        assert!(from_blhd(&dq, qs)[hq * lq * d..].iter().all(|&x| x == 0.0));

        // Some gradients left out.
        let mut dq2 = vec![f32::NAN; b * hq * lq * d];
        let mut dk2 = vec![f32::NAN; b * hkv * lk * d];
        let mut dv2 = vec![f32::NAN; b * hkv * lk * dv];
        let out = Gradients {
            dq: Tensor4Mut::bhld(common::host_mut(&mut dq2), qs),
            dk: Tensor4Mut::bhld(common::host_mut(&mut dk2), ks),
            dv: Tensor4Mut::bhld(common::host_mut(&mut dv2), vs),
            dpi_head: None,
            dpi_key: None,
            dnu: None,
            dbias: None,
        };
        attention::backward_into(
            &spec,
            &tq,
            &tk,
            &tv,
            &prec,
            Some(&klv),
            &inputs,
            out,
            dev.default_stream(),
        )
        .unwrap();
        assert_one_rounding("dq (BHLD)", &dq2, &want.dq);
        assert_one_rounding("dk (BHLD)", &dk2, &want.dk);
        assert_one_rounding("dv (BHLD)", &dv2, &want.dv);

        // backward (new buffers, BHLD).
        let r = attention::backward(&spec, &tq, &tk, &tv, &prec, Some(&klv), &inputs).unwrap();
        assert_one_rounding("backward dq", &r.dq.to_vec().unwrap(), &want.dq);
        assert_one_rounding("backward dk", &r.dk.to_vec().unwrap(), &want.dk);
        assert_one_rounding("backward dv", &r.dv.to_vec().unwrap(), &want.dv);
        assert_one_rounding(
            "backward dpi_head",
            &r.dpi_head.to_vec().unwrap(),
            &want.dpi_head,
        );
        assert_one_rounding(
            "backward dpi_key",
            &r.dpi_key.to_vec().unwrap(),
            &want.dpi_key,
        );
        assert_one_rounding("backward dnu", &r.dnu.to_vec().unwrap(), &[want.dnu]);
        if score == Score::Dot || score == Score::Laplace {
            assert_eq!(r.dnu.to_vec().unwrap(), vec![0.0]);
        }
    }
}

// =============================================================================================
// Bad arguments of backward_into: an error, and nothing written
// =============================================================================================

/// What to break in [`try_bad`].
#[derive(Clone, Copy, Debug, PartialEq)]
enum Bad {
    Nothing,
    NuZero,
    NuNan,
    WindowZero,
    ScaleNegative,
    HeadsNotDividing,
    KHeadDim,
    VLength,
    VHeads,
    KBatch,
    QViewShort,
    QStrideBelowRow,
    QZeroDim,
    PiHeadLen,
    PiKeyLen,
    KvLenLen,
    OShape,
    DoShape,
    OViewShort,
    DoStrideBelowRow,
    LseLen,
    DeWithoutE,
    ELen,
    DeLen,
    DqShape,
    DkShape,
    DvShape,
    DqViewShort,
    DvStrideBelowRow,
    DpiHeadLen,
    DpiKeyLen,
    DnuLen,
    DkOverlapsDq,
    DvOverlapsDk,
    DnuInsideDpiKey,
    DpiHeadOverlapsDq,
    DqOverlapsQ,
    DvOverlapsV,
    DqOverlapsDo,
    DpiKeyOverlapsPiKey,
    DnuOverlapsLse,
    PiHeadZero,
    PiKeyNan,
    PiKeyNegative,
    KvLenTooLong,
    KvLenNegative,
}

const B: usize = 2;
const HQ: usize = 4;
const HKV: usize = 2;
const LQ: usize = 5;
const LK: usize = 7;
const D: usize = 8;
const DV: usize = 4;

/// Element offsets in the output arena: dq | dk | dv | dpi_head | dpi_key | dnu.
const N_DQ: usize = B * HQ * LQ * D;
const N_DK: usize = B * HKV * LK * D;
const N_DV: usize = B * HKV * LK * DV;
const N_DPH: usize = HQ;
const N_DPK: usize = B * HKV * LK;
const OFF_DK: usize = N_DQ;
const OFF_DV: usize = OFF_DK + N_DK;
const OFF_DPH: usize = OFF_DV + N_DV;
const OFF_DPK: usize = OFF_DPH + N_DPH;
const OFF_DNU: usize = OFF_DPK + N_DPK;
const N_ARENA: usize = OFF_DNU + 1;

/// One backward_into call on a small valid problem (B 2, Hq 4, Hkv 2, Lq 5, Lk 7, D 8, Dv 4,
/// Student-t with both precisions, causal, key lengths, e and d_e) with `bad` applied. The outputs
/// live in one NaN-poisoned arena (views made with `from_raw`, so two can overlap). Returns the
/// error's argument name (None on success), how many of the outputs' elements are still NaN (of
/// N_ARENA), and whether the inputs (and the arena's slack past the outputs) are unchanged.
fn try_bad(bad: Bad) -> (Option<String>, usize, bool) {
    let dev = Device::reference();
    let g = |tid, n| -> Vec<f32> { f32s(&uniform_tensor(77, tid, n)) };
    let rows = B * HQ * LQ;
    let q = g(1, rows * D + 8);
    let k = g(2, N_DK);
    let v = g(3, N_DV);
    let o = g(9, rows * DV);
    // Room for a dq-sized view in the overlap case.
    let d_o = g(TID_D_O, N_DQ);
    let lse = g(10, rows + 1);
    let e = g(11, rows + 1);
    let d_e = g(TID_D_E, rows + 1);
    let mut ph = vec![1.5f32; HQ + 1];
    let mut pk = vec![0.5f32; N_DPK + 1];
    let mut kl = [LK as i32, 3, 1];
    match bad {
        Bad::PiHeadZero => ph[1] = 0.0,
        Bad::PiKeyNan => pk[3] = f32::NAN,
        Bad::PiKeyNegative => pk[N_DPK - 1] = -0.5,
        Bad::KvLenTooLong => kl[1] = LK as i32 + 1,
        Bad::KvLenNegative => kl[0] = -1,
        _ => {}
    }
    let inputs_before: Vec<Vec<f32>> = vec![
        q.clone(),
        k.clone(),
        v.clone(),
        o.clone(),
        d_o.clone(),
        lse.clone(),
        e.clone(),
        d_e.clone(),
        ph.clone(),
        pk.clone(),
    ];
    let mut arena = vec![f32::NAN; N_ARENA + 8];

    let spec = match bad {
        Bad::NuZero => AttentionSpec::new(Score::StudentT(0.0)),
        Bad::NuNan => AttentionSpec::new(Score::StudentT(f32::NAN)),
        Bad::WindowZero => AttentionSpec::new(Score::StudentT(2.0)).window(0),
        Bad::ScaleNegative => AttentionSpec::new(Score::StudentT(2.0)).scale(-1.0),
        _ => AttentionSpec::new(Score::StudentT(2.0)),
    }
    .causal(true);

    let mut qs = [B, HQ, LQ, D];
    let mut ks = [B, HKV, LK, D];
    let mut vs = [B, HKV, LK, DV];
    let mut os = [B, HQ, LQ, DV];
    let mut dos = os;
    match bad {
        Bad::HeadsNotDividing => qs[1] = 3,
        Bad::KHeadDim => ks[3] = D - 1,
        Bad::VLength => vs[2] = LK - 1,
        Bad::VHeads => vs[1] = 1,
        Bad::KBatch => ks[0] = 1,
        Bad::QZeroDim => qs[2] = 0,
        Bad::OShape => os[3] = DV - 1,
        Bad::DoShape => dos[2] = LQ + 1,
        _ => {}
    }
    let q_len = if bad == Bad::QViewShort {
        rows * D - 1
    } else {
        rows * D
    };
    let mut tq = Tensor4::bhld(common::host(&q[..q_len]), qs);
    if bad == Bad::QStrideBelowRow {
        tq.strides[2] = D - 1;
    }
    let tk = Tensor4::bhld(common::host(&k), ks);
    let tv = Tensor4::bhld(common::host(&v), vs);
    let o_len = if bad == Bad::OViewShort {
        rows * DV - 1
    } else {
        rows * DV
    };
    let mut t_do = Tensor4::bhld(common::host(&d_o[..rows * DV]), dos);
    if bad == Bad::DoStrideBelowRow {
        t_do.strides[1] = 1;
    }
    let prec = Precisions {
        head: Some(common::host(&ph[..HQ + (bad == Bad::PiHeadLen) as usize])),
        key: Some(common::host(&pk[..N_DPK - (bad == Bad::PiKeyLen) as usize])),
        ..Default::default()
    };
    let klv = common::host(&kl[..B + (bad == Bad::KvLenLen) as usize]);
    let inputs = BackwardInputs {
        o: Tensor4::bhld(common::host(&o[..o_len]), os),
        lse: common::host(&lse[..rows + (bad == Bad::LseLen) as usize]),
        d_o: t_do,
        e: (bad != Bad::DeWithoutE).then(|| common::host(&e[..rows - (bad == Bad::ELen) as usize])),
        d_e: Some(common::host(&d_e[..rows + (bad == Bad::DeLen) as usize])),
        d_lse: None,
    };

    // Output views into the arena (or, for the overlap cases, onto an input).
    let base = arena.as_mut_ptr() as u64;
    let at = |off: usize, len: usize| unsafe {
        ViewMut::<f32>::from_raw(&dev, base + 4 * off as u64, len)
    };
    let onto =
        |x: &[f32], len: usize| unsafe { ViewMut::<f32>::from_raw(&dev, x.as_ptr() as u64, len) };
    let dq_view = match bad {
        Bad::DqOverlapsQ => onto(&q, N_DQ),
        Bad::DqOverlapsDo => onto(&d_o, N_DQ),
        Bad::DqViewShort => at(0, N_DQ - 1),
        _ => at(0, N_DQ),
    };
    let dk_view = match bad {
        Bad::DkOverlapsDq => at(N_DQ - 8, N_DK),
        _ => at(OFF_DK, N_DK),
    };
    let dv_view = match bad {
        Bad::DvOverlapsDk => at(OFF_DK + 3, N_DV),
        Bad::DvOverlapsV => onto(&v, N_DV),
        _ => at(OFF_DV, N_DV),
    };
    let dph_view = match bad {
        Bad::DpiHeadOverlapsDq => at(N_DQ - 1, N_DPH),
        _ => at(OFF_DPH, N_DPH + (bad == Bad::DpiHeadLen) as usize),
    };
    let dpk_view = match bad {
        Bad::DpiKeyOverlapsPiKey => onto(&pk, N_DPK),
        _ => at(OFF_DPK, N_DPK - (bad == Bad::DpiKeyLen) as usize),
    };
    let dnu_view = match bad {
        Bad::DnuInsideDpiKey => at(OFF_DPK + 2, 1),
        Bad::DnuOverlapsLse => onto(&lse, 1),
        Bad::DnuLen => at(OFF_DNU, 2),
        _ => at(OFF_DNU, 1),
    };
    let mut dqs = [B, HQ, LQ, D];
    let mut dks = [B, HKV, LK, D];
    let mut dvs = [B, HKV, LK, DV];
    match bad {
        Bad::DqShape => dqs[3] = D - 1,
        Bad::DkShape => dks[1] = 1,
        Bad::DvShape => dvs[3] = DV + 1,
        _ => {}
    }
    let mut t_dv = Tensor4Mut::bhld(dv_view, dvs);
    if bad == Bad::DvStrideBelowRow {
        t_dv.strides[2] = DV - 1;
    }
    let out = Gradients {
        dq: Tensor4Mut::bhld(dq_view, dqs),
        dk: Tensor4Mut::bhld(dk_view, dks),
        dv: t_dv,
        dpi_head: Some(dph_view),
        dpi_key: Some(dpk_view),
        dnu: Some(dnu_view),
        dbias: None,
    };
    let r = attention::backward_into(
        &spec,
        &tq,
        &tk,
        &tv,
        &prec,
        Some(&klv),
        &inputs,
        out,
        dev.default_stream(),
    );
    let nan = arena[..N_ARENA].iter().filter(|x| x.is_nan()).count();
    let slack = arena[N_ARENA..].iter().all(|x| x.is_nan());
    let after: Vec<Vec<f32>> = vec![q, k, v, o, d_o, lse, e, d_e, ph, pk];
    let inputs_same = inputs_before
        .iter()
        .zip(&after)
        .all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()))
        && slack;
    match r {
        Ok(()) => (None, nan, inputs_same),
        Err(Error::InvalidArgument { name, reason }) => {
            println!("{bad:?}: {name}: {reason}");
            (Some(name), nan, inputs_same)
        }
        Err(other) => panic!("{bad:?}: unexpected error kind: {other}"),
    }
}

#[test]
fn backward_into_rejects_bad_arguments_before_any_write() {
    // The valid call writes every output element (and nothing else).
    let (err, nan, inputs_same) = try_bad(Bad::Nothing);
    assert_eq!(err, None);
    assert!(nan == 0 && inputs_same, "{nan} outputs unwritten");

    let table = [
        (Bad::NuZero, "nu"),
        (Bad::NuNan, "nu"),
        (Bad::WindowZero, "window"),
        (Bad::ScaleNegative, "scale"),
        (Bad::HeadsNotDividing, "k"),
        (Bad::KHeadDim, "k"),
        (Bad::VLength, "v"),
        (Bad::VHeads, "v"),
        (Bad::KBatch, "k"),
        (Bad::QViewShort, "q"),
        (Bad::QStrideBelowRow, "q"),
        (Bad::QZeroDim, "q"),
        (Bad::PiHeadLen, "precision.head"),
        (Bad::PiKeyLen, "precision.key"),
        (Bad::KvLenLen, "kv_len"),
        (Bad::OShape, "o"),
        (Bad::DoShape, "d_o"),
        (Bad::OViewShort, "o"),
        (Bad::DoStrideBelowRow, "d_o"),
        (Bad::LseLen, "lse"),
        (Bad::DeWithoutE, "e"),
        (Bad::ELen, "e"),
        (Bad::DeLen, "d_e"),
        (Bad::DqShape, "dq"),
        (Bad::DkShape, "dk"),
        (Bad::DvShape, "dv"),
        (Bad::DqViewShort, "dq"),
        (Bad::DvStrideBelowRow, "dv"),
        (Bad::DpiHeadLen, "dpi_head"),
        (Bad::DpiKeyLen, "dpi_key"),
        (Bad::DnuLen, "dnu"),
        (Bad::DkOverlapsDq, "dk"),
        (Bad::DvOverlapsDk, "dv"),
        (Bad::DnuInsideDpiKey, "dnu"),
        (Bad::DpiHeadOverlapsDq, "dpi_head"),
        (Bad::DqOverlapsQ, "dq"),
        (Bad::DvOverlapsV, "dv"),
        (Bad::DqOverlapsDo, "dq"),
        (Bad::DpiKeyOverlapsPiKey, "dpi_key"),
        (Bad::DnuOverlapsLse, "dnu"),
        (Bad::PiHeadZero, "precision.head"),
        (Bad::PiKeyNan, "precision.key"),
        (Bad::PiKeyNegative, "precision.key"),
        (Bad::KvLenTooLong, "kv_len"),
        (Bad::KvLenNegative, "kv_len"),
    ];
    let mut failures = Vec::new();
    for (bad, name) in table {
        let (err, nan, inputs_same) = try_bad(bad);
        let untouched = nan == N_ARENA;
        if err.as_deref() != Some(name) || !untouched || !inputs_same {
            failures.push(format!(
                "{bad:?}: error {err:?} (expected {name}), outputs untouched {untouched}, \
                 inputs unchanged {inputs_same}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
