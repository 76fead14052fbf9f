//! The candle integration against the crate's own API, bitwise on the CPU: attention, LCA and
//! settling, f32/f16/bf16, strided and offset inputs, bad input.
#![cfg(feature = "candle")]

use candle_core::{DType, Device, Tensor, WithDType};
use fep_kernels::attention::{self, AttentionSpec, Precisions, Score, Tensor4};
use fep_kernels::candle::{LayerPrecision, SettleLayer};
use fep_kernels::lca::{Dictionary, DictionaryOptions, LcaSpec, Threshold};
use fep_kernels::settle::{self, Activation, Init, Layer, Network, Precision, SettleSpec};
use fep_kernels::{Element, View, bf16, f16};

const B: usize = 2;
const HQ: usize = 4;
const HKV: usize = 2;
const LQ: usize = 5;
const LK: usize = 7;
const D: usize = 8;
const DV: usize = 4;

fn randn(shape: &[usize], dtype: DType, seed: f64) -> Tensor {
    // Deterministic values (no RNG state shared between tests).
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as f64 * 0.7548776662 + seed).sin() * 1.3) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn precision(seed: f64) -> Tensor {
    let n = B * HKV * LK;
    let v: Vec<f32> = (0..n)
        .map(|i| (0.5 + ((i as f64 + seed).cos() + 1.0) * 0.75) as f32)
        .collect();
    Tensor::from_vec(v, (B, HKV, LK), &Device::Cpu).unwrap()
}

fn host<T: WithDType>(t: &Tensor) -> Vec<T> {
    t.flatten_all().unwrap().to_vec1::<T>().unwrap()
}

fn bits<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// fep_kernels::attention::forward on contiguous copies of the candle tensors (BHLD).
fn expected<T: Element + WithDType>(
    spec: &AttentionSpec,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    p: Option<&Tensor>,
) -> Vec<T> {
    let (qh, kh, vh) = (host::<T>(q), host::<T>(k), host::<T>(v));
    let ph = p.map(host::<f32>);
    let dims = |t: &Tensor| <[usize; 4]>::try_from(t.dims()).unwrap();
    let precision = Precisions {
        head: None,
        key: ph.as_deref().map(View::host),
        ..Default::default()
    };
    let out = attention::forward(
        spec,
        &Tensor4::bhld(View::host(&qh), dims(q)),
        &Tensor4::bhld(View::host(&kh), dims(k)),
        &Tensor4::bhld(View::host(&vh), dims(v)),
        &precision,
        None,
    )
    .unwrap();
    out.o.to_vec().unwrap()
}

fn specs() -> Vec<AttentionSpec> {
    let mut out = Vec::new();
    for score in [
        Score::Dot,
        Score::Gaussian,
        Score::StudentT(3.0),
        Score::Laplace,
    ] {
        out.push(AttentionSpec::new(score));
        out.push(AttentionSpec::new(score).causal(true).scale(0.37));
    }
    out
}

fn check_dtype<T: Element + WithDType>(dtype: DType) {
    let q = randn(&[B, HQ, LQ, D], dtype, 0.1);
    let k = randn(&[B, HKV, LK, D], dtype, 1.2);
    let v = randn(&[B, HKV, LK, DV], dtype, 2.3);
    let p = precision(0.4);
    for spec in specs() {
        for pk in [None, Some(&p)] {
            let o = fep_kernels::candle::attention(&q, &k, &v, &spec, pk).unwrap();
            assert_eq!(o.dims(), &[B, HQ, LQ, DV]);
            assert_eq!(o.dtype(), dtype);
            let want = expected::<T>(&spec, &q, &k, &v, pk);
            assert_eq!(
                bits(&host::<T>(&o)),
                bits(&want),
                "{dtype:?} {spec:?} precision {}",
                pk.is_some()
            );
        }
    }
}

#[test]
fn f32_matches_forward_bitwise() {
    check_dtype::<f32>(DType::F32);
}

#[test]
fn f16_matches_forward_bitwise() {
    check_dtype::<f16>(DType::F16);
}

#[test]
fn bf16_matches_forward_bitwise() {
    check_dtype::<bf16>(DType::BF16);
}

#[test]
fn strided_blhd_and_offset_inputs() {
    let spec = AttentionSpec::new(Score::StudentT(2.0)).causal(true);
    // [B, L, H, D] memory seen as [B, H, L, D] through candle's transpose: no copy.
    let q_blhd = randn(&[B, LQ, HQ, D], DType::F32, 0.3);
    let k_blhd = randn(&[B, LK, HKV, D], DType::F32, 0.9);
    let v_blhd = randn(&[B, LK, HKV, DV], DType::F32, 1.7);
    let (q, k, v) = (
        q_blhd.transpose(1, 2).unwrap(),
        k_blhd.transpose(1, 2).unwrap(),
        v_blhd.transpose(1, 2).unwrap(),
    );
    assert!(!q.is_contiguous());
    let o = fep_kernels::candle::attention(&q, &k, &v, &spec, None).unwrap();
    // The crate's own BLHD view of the same memory.
    let (qh, kh, vh) = (
        host::<f32>(&q_blhd),
        host::<f32>(&k_blhd),
        host::<f32>(&v_blhd),
    );
    let want = attention::forward(
        &spec,
        &Tensor4::blhd(View::host(&qh), [B, HQ, LQ, D]),
        &Tensor4::blhd(View::host(&kh), [B, HKV, LK, D]),
        &Tensor4::blhd(View::host(&vh), [B, HKV, LK, DV]),
        &Precisions::default(),
        None,
    )
    .unwrap()
    .o
    .to_vec()
    .unwrap();
    assert_eq!(bits(&host::<f32>(&o)), bits(&want));
    // And against contiguous copies.
    let want2 = expected::<f32>(
        &spec,
        &q.contiguous().unwrap(),
        &k.contiguous().unwrap(),
        &v.contiguous().unwrap(),
        None,
    );
    assert_eq!(bits(&host::<f32>(&o)), bits(&want2));

    // A start offset and a strided L (narrowing a larger tensor along L and D's neighbour).
    let big = randn(&[B, HKV, LK + 3, D], DType::F32, 4.4);
    let k2 = big.narrow(2, 2, LK).unwrap();
    assert!(!k2.is_contiguous());
    let q2 = randn(&[B, HQ, LQ, D], DType::F32, 5.5);
    let v2 = randn(&[B, HKV, LK, DV], DType::F32, 6.6);
    let p = precision(1.0);
    let o2 = fep_kernels::candle::attention(&q2, &k2, &v2, &spec, Some(&p)).unwrap();
    let want3 = expected::<f32>(&spec, &q2, &k2.contiguous().unwrap(), &v2, Some(&p));
    assert_eq!(bits(&host::<f32>(&o2)), bits(&want3));
}

#[test]
fn bad_inputs_are_candle_errors() {
    let spec = AttentionSpec::new(Score::Gaussian);
    let q = randn(&[B, HQ, LQ, D], DType::F32, 0.1);
    let k = randn(&[B, HKV, LK, D], DType::F32, 1.2);
    let v = randn(&[B, HKV, LK, DV], DType::F32, 2.3);
    let att = |q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttentionSpec, p: Option<&Tensor>| {
        fep_kernels::candle::attention(q, k, v, spec, p)
            .unwrap_err()
            .to_string()
    };
    // Rank.
    let e = att(&q.flatten(0, 1).unwrap(), &k, &v, &spec, None);
    assert!(e.contains("rank 4"), "{e}");
    // Mixed dtypes.
    let e = att(&q, &k.to_dtype(DType::F16).unwrap(), &v, &spec, None);
    assert!(e.contains("dtype"), "{e}");
    // Unsupported dtype.
    let e = att(
        &q.to_dtype(DType::F64).unwrap(),
        &k.to_dtype(DType::F64).unwrap(),
        &v.to_dtype(DType::F64).unwrap(),
        &spec,
        None,
    );
    assert!(e.contains("dtype"), "{e}");
    // Last dimension not contiguous.
    let kt = randn(&[B, HKV, D, LK], DType::F32, 0.5)
        .transpose(2, 3)
        .unwrap();
    let e = att(&q, &kt, &v, &spec, None);
    assert!(e.contains("contiguous last dimension"), "{e}");
    // Head dims that differ, heads that do not divide, ν ≤ 0: the crate's own errors.
    let e = att(
        &randn(&[B, HQ, LQ, D + 1], DType::F32, 0.0),
        &k,
        &v,
        &spec,
        None,
    );
    assert!(!e.is_empty());
    let e = att(&randn(&[B, 3, LQ, D], DType::F32, 0.0), &k, &v, &spec, None);
    assert!(!e.is_empty());
    let e = att(&q, &k, &v, &AttentionSpec::new(Score::StudentT(-1.0)), None);
    assert!(e.contains("nu"), "{e}");
    // Precision: wrong dtype, wrong length, a non-positive entry.
    let p = precision(0.0);
    let e = att(&q, &k, &v, &spec, Some(&p.to_dtype(DType::F64).unwrap()));
    assert!(e.contains("f32"), "{e}");
    let e = att(&q, &k, &v, &spec, Some(&p.narrow(2, 0, LK - 1).unwrap()));
    assert!(!e.is_empty());
    let e = att(&q, &k, &v, &spec, Some(&(p.zeros_like().unwrap())));
    assert!(!e.is_empty());
}

// ---------------------------------------------------------------------------------------------
// LCA
// ---------------------------------------------------------------------------------------------

const N: usize = 6;
const M: usize = 10;
const BATCH: usize = 3;

/// Φ `[N, M]` f32 with unit-norm columns (normalised in f64), deterministic.
fn phi_host() -> Vec<f32> {
    let raw: Vec<f64> = (0..N * M)
        .map(|i| (i as f64 * 1.618034 + 0.3).sin())
        .collect();
    let mut out = vec![0f32; N * M];
    for j in 0..M {
        let norm = (0..N).map(|i| raw[i * M + j].powi(2)).sum::<f64>().sqrt();
        for i in 0..N {
            out[i * M + j] = (raw[i * M + j] / norm) as f32;
        }
    }
    out
}

fn phi_tensor(dtype: DType) -> Tensor {
    Tensor::from_vec(phi_host(), (N, M), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Everything an LCA solve returns, on the host.
#[derive(Debug, PartialEq)]
struct LcaHost {
    u: Vec<u8>,
    a: Vec<u8>,
    steps: Vec<u32>,
    energy: Option<Vec<u8>>,
    active: Option<Vec<u32>>,
}

fn lca_from_candle(out: &fep_kernels::candle::LcaTensors, batch: usize, spec: &LcaSpec) -> LcaHost {
    assert_eq!(out.u.dims(), &[batch, M]);
    assert_eq!(out.a.dims(), &[batch, M]);
    assert_eq!(out.steps.dims(), &[batch]);
    assert_eq!((out.u.dtype(), out.steps.dtype()), (DType::F32, DType::U32));
    let trace = [batch, spec.steps as usize];
    LcaHost {
        u: bits(&host::<f32>(&out.u)),
        a: bits(&host::<f32>(&out.a)),
        steps: host::<u32>(&out.steps),
        energy: out.energy.as_ref().map(|e| {
            assert_eq!(e.dims(), &trace);
            bits(&host::<f32>(e))
        }),
        active: out.active.as_ref().map(|c| {
            assert_eq!(c.dims(), &trace);
            host::<u32>(c)
        }),
    }
}

/// Dictionary::new + solve on contiguous host copies of the candle tensors.
fn lca_expected<P: Element + WithDType, X: Element + WithDType>(
    phi: &Tensor,
    x: &Tensor,
    spec: &LcaSpec,
    u0: Option<&Tensor>,
) -> LcaHost {
    let (ph, xh) = (host::<P>(phi), host::<X>(x));
    let u0h = u0.map(host::<f32>);
    let dict = Dictionary::new(&View::host(&ph), N, M, DictionaryOptions::default()).unwrap();
    let r = dict
        .solve(
            spec,
            &View::host(&xh),
            u0h.as_deref().map(View::host).as_ref(),
        )
        .unwrap();
    LcaHost {
        u: bits(&r.u.to_vec().unwrap()),
        a: bits(&r.a.to_vec().unwrap()),
        steps: r.steps.to_vec().unwrap(),
        energy: r.energy.map(|e| bits(&e.to_vec().unwrap())),
        active: r.active.map(|c| c.to_vec().unwrap()),
    }
}

fn lca_specs() -> Vec<LcaSpec> {
    let mut out = Vec::new();
    for t in Threshold::ALL {
        out.push(LcaSpec::new(0.1).threshold(t).steps(40).eta(0.2));
        // Per-sample early stop and the trace.
        out.push(
            LcaSpec::new(0.05)
                .threshold(t)
                .steps(60)
                .eta(0.3)
                .tol(1e-3)
                .trace(true),
        );
    }
    out
}

fn check_lca<P: Element + WithDType, X: Element + WithDType>(pd: DType, xd: DType) {
    let phi = phi_tensor(pd);
    let x = randn(&[BATCH, N], xd, 0.7);
    let u0 = randn(&[BATCH, M], DType::F32, 2.2);
    let dict = fep_kernels::candle::dictionary(&phi, DictionaryOptions::default()).unwrap();
    for spec in lca_specs() {
        for u0 in [None, Some(&u0)] {
            let out = fep_kernels::candle::lca_solve_with(&dict, &x, &spec, u0).unwrap();
            assert_eq!(out.energy.is_some(), spec.trace);
            let got = lca_from_candle(&out, BATCH, &spec);
            let want = lca_expected::<P, X>(&phi, &x, &spec, u0);
            assert_eq!(
                got,
                want,
                "phi {pd:?} x {xd:?} {spec:?} u0 {}",
                u0.is_some()
            );
        }
    }
    // The convenience entry point: the same (u, a).
    let spec = LcaSpec::new(0.1).steps(30);
    let (u, a) = fep_kernels::candle::lca_solve(&phi, &x, &spec).unwrap();
    let want = lca_expected::<P, X>(&phi, &x, &spec, None);
    assert_eq!(bits(&host::<f32>(&u)), want.u);
    assert_eq!(bits(&host::<f32>(&a)), want.a);
    // Some code is nonzero (the comparison is not between two all-zero results).
    assert!(host::<f32>(&a).iter().any(|&v| v != 0.0));
}

#[test]
fn lca_f32_matches_solve_bitwise() {
    check_lca::<f32, f32>(DType::F32, DType::F32);
}

#[test]
fn lca_f16_bf16_match_solve_bitwise() {
    check_lca::<f16, f16>(DType::F16, DType::F16);
    check_lca::<bf16, bf16>(DType::BF16, DType::BF16);
    // Φ and x may differ in dtype, as in the crate's API.
    check_lca::<f32, bf16>(DType::F32, DType::BF16);
}

#[test]
fn lca_offset_inputs_are_read_in_place() {
    // Φ as rows 2 .. 2 + N of a larger tensor, x and u0 as rows of larger batches: contiguous
    // with a start offset, read without a copy.
    let junk = randn(&[2, M], DType::F32, 9.0);
    let big_phi = Tensor::cat(&[&junk, &phi_tensor(DType::F32), &junk], 0).unwrap();
    let phi = big_phi.narrow(0, 2, N).unwrap();
    assert!(phi.is_contiguous() && phi.layout().start_offset() == 2 * M);
    let x = randn(&[BATCH + 3, N], DType::F32, 1.1)
        .narrow(0, 2, BATCH)
        .unwrap();
    let u0 = randn(&[BATCH + 1, M], DType::F32, 0.2)
        .narrow(0, 1, BATCH)
        .unwrap();
    let spec = LcaSpec::new(0.1).steps(50).trace(true);
    let dict = fep_kernels::candle::dictionary(&phi, DictionaryOptions::default()).unwrap();
    let out = fep_kernels::candle::lca_solve_with(&dict, &x, &spec, Some(&u0)).unwrap();
    let want = lca_expected::<f32, f32>(&phi, &x, &spec, Some(&u0));
    assert_eq!(lca_from_candle(&out, BATCH, &spec), want);
    // The dictionary holds exactly Φ (not the junk rows around it).
    let phi_back = fep_kernels::candle::dictionary_phi(&dict).unwrap();
    assert_eq!(bits(&host::<f32>(&phi_back)), bits(&phi_host()));
}

#[test]
fn lca_learn_matches_dictionary_learn_bitwise() {
    let phi = phi_tensor(DType::F32);
    let x = randn(&[BATCH, N], DType::BF16, 0.4);
    let spec = LcaSpec::new(0.1).steps(30);
    let mut dict = fep_kernels::candle::dictionary(&phi, DictionaryOptions::default()).unwrap();
    let (_, a) = fep_kernels::candle::lca_solve(&phi, &x, &spec).unwrap();
    fep_kernels::candle::lca_learn(&mut dict, &x, &a, 0.5).unwrap();
    let learned = host::<f32>(&fep_kernels::candle::dictionary_phi(&dict).unwrap());

    let (ph, xh, ah) = (phi_host(), host::<bf16>(&x), host::<f32>(&a));
    let mut want = Dictionary::new(&View::host(&ph), N, M, DictionaryOptions::default()).unwrap();
    want.learn(
        &View::host(&xh),
        &View::host(&ah),
        0.5,
        fep_kernels::Device::cpu().default_stream(),
    )
    .unwrap();
    assert_eq!(bits(&learned), bits(&want.phi().unwrap()));
    assert_ne!(bits(&learned), bits(&ph), "the step changed Φ");
}

#[test]
fn lca_bad_inputs_are_candle_errors() {
    let phi = phi_tensor(DType::F32);
    let x = randn(&[BATCH, N], DType::F32, 0.7);
    let spec = LcaSpec::new(0.1).steps(20);
    let dict = fep_kernels::candle::dictionary(&phi, DictionaryOptions::default()).unwrap();
    let solve = |x: &Tensor, spec: &LcaSpec, u0: Option<&Tensor>| {
        fep_kernels::candle::lca_solve_with(&dict, x, spec, u0)
            .unwrap_err()
            .to_string()
    };
    // Not contiguous: a transposed [N, BATCH] tensor seen as [BATCH, N].
    let xt = randn(&[N, BATCH], DType::F32, 0.7).t().unwrap();
    let e = solve(&xt, &spec, None);
    assert!(e.contains("must be contiguous"), "{e}");
    // Rank, width, dtype.
    let e = solve(&x.flatten_all().unwrap(), &spec, None);
    assert!(e.contains("rank 2"), "{e}");
    let e = solve(&randn(&[BATCH, N + 1], DType::F32, 0.0), &spec, None);
    assert!(e.contains("length 6"), "{e}");
    let e = solve(&x.to_dtype(DType::F64).unwrap(), &spec, None);
    assert!(e.contains("f32, f16 or bf16"), "{e}");
    // An empty batch, and the crate's own spec checks.
    let e = solve(&randn(&[0, N], DType::F32, 0.0), &spec, None);
    assert!(e.contains("empty"), "{e}");
    let e = solve(&x, &LcaSpec::new(-1.0), None);
    assert!(e.contains("lambda"), "{e}");
    let e = solve(&x, &spec.steps(0), None);
    assert!(e.contains("steps"), "{e}");
    // u0: dtype and shape.
    let u0 = randn(&[BATCH, M], DType::F32, 0.0);
    let e = solve(&x, &spec, Some(&u0.to_dtype(DType::F16).unwrap()));
    assert!(e.contains("u0 must be F32"), "{e}");
    let e = solve(&x, &spec, Some(&u0.narrow(0, 0, BATCH - 1).unwrap()));
    assert!(e.contains("u0 is"), "{e}");
    // Φ: columns not of unit norm, NaN.
    let e = fep_kernels::candle::dictionary(&(phi.clone() * 2.0).unwrap(), Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("norm"), "{e}");
    let e = fep_kernels::candle::lca_solve(&phi.t().unwrap(), &x, &spec)
        .unwrap_err()
        .to_string();
    assert!(e.contains("must be contiguous"), "{e}");
    // lca_learn: a not f32, shapes.
    let mut d2 = fep_kernels::candle::dictionary(&phi, DictionaryOptions::default()).unwrap();
    let a = randn(&[BATCH, M], DType::F32, 0.0);
    let e = fep_kernels::candle::lca_learn(&mut d2, &x, &a.to_dtype(DType::BF16).unwrap(), 0.1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("a must be F32"), "{e}");
    let e = fep_kernels::candle::lca_learn(&mut d2, &x, &a.narrow(1, 0, M - 1).unwrap(), 0.1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[batch, 10]"), "{e}");
    let e = fep_kernels::candle::lca_learn(&mut d2, &x, &a, f32::NAN)
        .unwrap_err()
        .to_string();
    assert!(e.contains("lr"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Settling
// ---------------------------------------------------------------------------------------------

const WIDTHS: [usize; 4] = [5, 7, 4, 3];
const SB: usize = 4;

/// A network's tensors: W_l `[n_l, n_{l−1}]` (dtype), b_l, diagonal Π_l (f32).
struct Net {
    w: Vec<Tensor>,
    b: Vec<Tensor>,
    p: Vec<Tensor>,
    acts: Vec<Activation>,
}

impl Net {
    fn new(dtype: DType, seed: f64) -> Net {
        let mut net = Net {
            w: vec![],
            b: vec![],
            p: vec![],
            acts: vec![],
        };
        for (l, w) in WIDTHS.windows(2).enumerate() {
            let s = seed + l as f64;
            let scale = 1.0 / (w[0] as f64).sqrt();
            net.w.push(
                (randn(&[w[1], w[0]], DType::F32, s) * scale)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            );
            net.b.push(
                (randn(&[w[1]], DType::F32, s + 0.5) * 0.1)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            );
            let p: Vec<f32> = (0..w[1])
                .map(|i| 0.5 + 0.25 * ((i + l) % 5) as f32)
                .collect();
            net.p.push(Tensor::new(p, &Device::Cpu).unwrap());
            net.acts
                .push(Activation::ALL[(l + seed as usize) % Activation::ALL.len()]);
        }
        net
    }

    /// The candle layers: diagonal precision on even layers, scalar on odd; bias on all but
    /// the last.
    fn layers(&self) -> Vec<SettleLayer<'_>> {
        (0..self.w.len())
            .map(|l| {
                let prec = if l % 2 == 0 {
                    LayerPrecision::Diagonal(&self.p[l])
                } else {
                    LayerPrecision::Scalar(1.5)
                };
                let layer = SettleLayer::new(&self.w[l], self.acts[l], prec);
                if l + 1 < self.w.len() {
                    layer.bias(&self.b[l])
                } else {
                    layer
                }
            })
            .collect()
    }
}

/// The network's tensors copied to the host, for the crate's own API.
struct NetHost<T> {
    w: Vec<Vec<T>>,
    b: Vec<Vec<T>>,
    p: Vec<Vec<f32>>,
    acts: Vec<Activation>,
}

impl<T: Element + WithDType> NetHost<T> {
    fn of(net: &Net) -> Self {
        NetHost {
            w: net.w.iter().map(host::<T>).collect(),
            b: net.b.iter().map(host::<T>).collect(),
            p: net.p.iter().map(host::<f32>).collect(),
            acts: net.acts.clone(),
        }
    }

    /// The same layers as [`Net::layers`] over host memory.
    fn network(&self) -> Network<'_, T> {
        let depth = self.w.len();
        let layers = (0..depth)
            .map(|l| {
                let prec = if l % 2 == 0 {
                    Precision::Diagonal(View::host(&self.p[l]))
                } else {
                    Precision::Scalar(1.5)
                };
                let layer = Layer::new(View::host(&self.w[l]), self.acts[l], prec);
                if l + 1 < depth {
                    layer.bias(View::host(&self.b[l]))
                } else {
                    layer
                }
            })
            .collect();
        Network::new(&WIDTHS, layers).unwrap()
    }
}

/// A settled state on the host, as bits.
#[derive(Debug, PartialEq)]
struct StateHost {
    x: Vec<Vec<u8>>,
    eps: Vec<Vec<u8>>,
    energy: Vec<u8>,
    trace: Vec<u8>,
    steps: Vec<u32>,
}

fn state_from_candle(
    s: &fep_kernels::candle::SettleTensors,
    batch: usize,
    spec: &SettleSpec,
) -> StateHost {
    for (l, (x, e)) in s.x.iter().zip(&s.eps).enumerate() {
        assert_eq!(x.dims(), &[batch, WIDTHS[l + 1]]);
        assert_eq!(e.dims(), &[batch, WIDTHS[l + 1]]);
    }
    assert_eq!(s.trace.dims(), &[batch, spec.steps as usize + 1]);
    assert_eq!(s.steps.dtype(), DType::U32);
    StateHost {
        x: s.x.iter().map(|t| bits(&host::<f32>(t))).collect(),
        eps: s.eps.iter().map(|t| bits(&host::<f32>(t))).collect(),
        energy: bits(&host::<f32>(&s.energy)),
        trace: bits(&host::<f32>(&s.trace)),
        steps: host::<u32>(&s.steps),
    }
}

fn state_from_crate(s: &settle::SettleResult) -> StateHost {
    let v = |b: &fep_kernels::DeviceBuffer<f32>| bits(&b.to_vec().unwrap());
    StateHost {
        x: s.x.iter().map(v).collect(),
        eps: s.eps.iter().map(v).collect(),
        energy: v(&s.energy),
        trace: v(s.trace.as_ref().unwrap()),
        steps: s.steps.to_vec().unwrap(),
    }
}

fn settle_specs() -> Vec<SettleSpec> {
    vec![
        SettleSpec::new(0.1).steps(15),
        SettleSpec::new(0.05).steps(25).momentum(0.5).tol(1e-3),
    ]
}

fn check_settle<T: Element + WithDType>(dtype: DType) {
    for seed in [0.0, 1.0, 3.0] {
        let net = Net::new(dtype, seed);
        let nh = NetHost::<T>::of(&net);
        let layers = net.layers();
        let x0 = randn(&[SB, WIDTHS[0]], DType::F32, seed + 0.3);
        let target = randn(&[SB, WIDTHS[3]], DType::F32, seed + 0.6);
        let (x0h, th) = (host::<f32>(&x0), host::<f32>(&target));
        for spec in settle_specs() {
            let got = fep_kernels::candle::settle_infer(&layers, &spec, &x0, None).unwrap();
            let want = settle::infer(&nh.network(), &spec, &View::host(&x0h), None).unwrap();
            assert_eq!(
                state_from_candle(&got, SB, &spec),
                state_from_crate(&want),
                "infer {dtype:?} seed {seed} {spec:?}"
            );

            let got = fep_kernels::candle::settle_learn_step(&layers, &spec, &x0, &target).unwrap();
            let want = settle::learn_step(
                &nh.network(),
                &spec,
                &View::host(&x0h),
                &View::host(&th),
                None,
            )
            .unwrap();
            assert_eq!(
                state_from_candle(&got.state, SB, &spec),
                state_from_crate(&want.state),
                "learn {dtype:?} seed {seed} {spec:?}"
            );
            for l in 0..layers.len() {
                assert_eq!(got.grad_w[l].dims(), &[WIDTHS[l + 1], WIDTHS[l]]);
                assert_eq!(got.grad_b[l].dims(), &[WIDTHS[l + 1]]);
                assert_eq!(
                    bits(&host::<f32>(&got.grad_w[l])),
                    bits(&want.grad_w[l].to_vec().unwrap()),
                    "grad_w[{l}] {dtype:?} seed {seed}"
                );
                assert_eq!(
                    bits(&host::<f32>(&got.grad_b[l])),
                    bits(&want.grad_b[l].to_vec().unwrap()),
                    "grad_b[{l}] {dtype:?} seed {seed}"
                );
                // ∂F/∂Π: [1] for a scalar precision, [n_l] for a diagonal.
                assert_eq!(
                    bits(&host::<f32>(&got.grad_pi[l])),
                    bits(&want.grad_pi[l].to_vec().unwrap()),
                    "grad_pi[{l}] {dtype:?} seed {seed}"
                );
            }
            // Not all zero (the comparison means something).
            assert!(host::<f32>(&got.grad_w[0]).iter().any(|&g| g != 0.0));
        }
    }
}

#[test]
fn settle_f32_matches_crate_bitwise() {
    check_settle::<f32>(DType::F32);
}

#[test]
fn settle_f16_bf16_match_crate_bitwise() {
    check_settle::<f16>(DType::F16);
    check_settle::<bf16>(DType::BF16);
}

#[test]
fn settle_from_init_and_offset_inputs() {
    let net = Net::new(DType::F32, 2.0);
    // Weights as rows 1 .. 1 + n_l of larger tensors and x0 as rows of a larger batch:
    // contiguous with a start offset, read in place.
    let big: Vec<Tensor> = net
        .w
        .iter()
        .map(|w| {
            let pad = Tensor::ones((1, w.dim(1).unwrap()), DType::F32, &Device::Cpu).unwrap();
            Tensor::cat(&[&pad, w, &pad, &pad], 0).unwrap()
        })
        .collect();
    let w_views: Vec<Tensor> = big
        .iter()
        .zip(&net.w)
        .map(|(b, w)| b.narrow(0, 1, w.dim(0).unwrap()).unwrap())
        .collect();
    assert!(w_views[0].layout().start_offset() > 0 && w_views[0].is_contiguous());
    let layers: Vec<SettleLayer<'_>> = net
        .layers()
        .into_iter()
        .zip(&w_views)
        .map(|(l, w)| SettleLayer { weight: w, ..l })
        .collect();
    let x0 = randn(&[SB + 2, WIDTHS[0]], DType::F32, 0.8)
        .narrow(0, 1, SB)
        .unwrap();
    let init: Vec<Tensor> = WIDTHS[1..]
        .iter()
        .enumerate()
        .map(|(l, &n)| randn(&[SB, n], DType::F32, 3.0 + l as f64))
        .collect();
    let spec = SettleSpec::new(0.1).steps(10).init(Init::FromOutputs);
    let got = fep_kernels::candle::settle_infer(&layers, &spec, &x0, Some(&init)).unwrap();

    let nh = NetHost::<f32>::of(&net);
    let x0h = host::<f32>(&x0);
    let inith: Vec<Vec<f32>> = init.iter().map(host::<f32>).collect();
    let initv: Vec<View<'_, f32>> = inith.iter().map(|v| View::host(v)).collect();
    let want = settle::infer(&nh.network(), &spec, &View::host(&x0h), Some(&initv)).unwrap();
    assert_eq!(state_from_candle(&got, SB, &spec), state_from_crate(&want));
    // The init tensors are inputs: not written.
    assert_eq!(bits(&host::<f32>(&init[0])), bits(&inith[0]));
    // And the feedforward start gives another result.
    let ff = fep_kernels::candle::settle_infer(&layers, &spec, &x0, None).unwrap();
    assert_ne!(bits(&host::<f32>(&ff.x[0])), bits(&host::<f32>(&got.x[0])));
}

#[test]
fn settle_bad_inputs_are_candle_errors() {
    let net = Net::new(DType::F32, 0.0);
    let layers = net.layers();
    let x0 = randn(&[SB, WIDTHS[0]], DType::F32, 0.3);
    let target = randn(&[SB, WIDTHS[3]], DType::F32, 0.6);
    let spec = SettleSpec::new(0.1).steps(5);
    let infer = |layers: &[SettleLayer<'_>], spec: &SettleSpec, x0: &Tensor| {
        fep_kernels::candle::settle_infer(layers, spec, x0, None)
            .unwrap_err()
            .to_string()
    };
    // A transposed weight: not contiguous.
    let wt = randn(&[WIDTHS[0], WIDTHS[1]], DType::F32, 0.0).t().unwrap();
    let mut bad = layers.clone();
    bad[0].weight = &wt;
    let e = infer(&bad, &spec, &x0);
    assert!(e.contains("layers[0].weight must be contiguous"), "{e}");
    // Shapes that do not chain.
    let mut bad = layers.clone();
    bad[1] = layers[2];
    let e = infer(&bad, &spec, &x0);
    assert!(e.contains("layer below"), "{e}");
    // Weights of two dtypes; x0 not f32; an unsupported weight dtype.
    let w16 = net.w[1].to_dtype(DType::F16).unwrap();
    let mut bad = layers.clone();
    bad[1].weight = &w16;
    let e = infer(&bad, &spec, &x0);
    assert!(e.contains("share one dtype"), "{e}");
    let e = infer(&layers, &spec, &x0.to_dtype(DType::BF16).unwrap());
    assert!(e.contains("x0 must be F32"), "{e}");
    let w64: Vec<Tensor> = net
        .w
        .iter()
        .map(|w| w.to_dtype(DType::F64).unwrap())
        .collect();
    let bad: Vec<SettleLayer<'_>> = w64
        .iter()
        .zip(&net.acts)
        .map(|(w, &a)| SettleLayer::new(w, a, LayerPrecision::Scalar(1.0)))
        .collect();
    let e = infer(&bad, &spec, &x0);
    assert!(e.contains("f32, f16 or bf16"), "{e}");
    // A bias of the wrong length; a non-positive diagonal precision (the crate's check).
    let short = net.b[1].narrow(0, 0, 2).unwrap();
    let mut bad = layers.clone();
    bad[0] = bad[0].bias(&short);
    let e = infer(&bad, &spec, &x0);
    assert!(e.contains("layers[0].bias has 2 elements"), "{e}");
    let zero_p = net.p[0].zeros_like().unwrap();
    let mut bad = layers.clone();
    bad[0].precision = LayerPrecision::Diagonal(&zero_p);
    let e = infer(&bad, &spec, &x0);
    assert!(e.contains("precision"), "{e}");
    // The spec, an empty network, an empty batch.
    let e = infer(&layers, &SettleSpec::new(-0.1), &x0);
    assert!(e.contains("eta"), "{e}");
    let e = infer(&layers, &spec.steps(0), &x0);
    assert!(e.contains("steps"), "{e}");
    let e = infer(&[], &spec, &x0);
    assert!(e.contains("at least one layer"), "{e}");
    let e = infer(&layers, &spec, &x0.narrow(0, 0, 0).unwrap());
    assert!(e.contains("empty"), "{e}");
    // init: count and shape.
    let e = fep_kernels::candle::settle_infer(&layers, &spec, &x0, Some(std::slice::from_ref(&x0)))
        .unwrap_err()
        .to_string();
    assert!(e.contains("one per layer"), "{e}");
    let init: Vec<Tensor> = WIDTHS[1..]
        .iter()
        .map(|&n| randn(&[SB, n], DType::F32, 0.0))
        .collect();
    let mut bad = init.clone();
    bad[1] = randn(&[SB, WIDTHS[2] + 1], DType::F32, 0.0);
    let e = fep_kernels::candle::settle_infer(&layers, &spec, &x0, Some(&bad))
        .unwrap_err()
        .to_string();
    assert!(e.contains("init[1] is"), "{e}");
    bad[1] = init[1].to_dtype(DType::F16).unwrap();
    let e = fep_kernels::candle::settle_infer(&layers, &spec, &x0, Some(&bad))
        .unwrap_err()
        .to_string();
    assert!(e.contains("init[1] must be F32"), "{e}");
    // target: shape and dtype.
    let learn = |t: &Tensor| {
        fep_kernels::candle::settle_learn_step(&layers, &spec, &x0, t)
            .unwrap_err()
            .to_string()
    };
    let e = learn(&target.narrow(1, 0, 2).unwrap());
    assert!(e.contains("target is"), "{e}");
    let e = learn(&target.to_dtype(DType::F16).unwrap());
    assert!(e.contains("target must be F32"), "{e}");
}
