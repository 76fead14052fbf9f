//! LCA on a GPU (CUDA or HIP) against the CPU reference (DESIGN.md §4.3, §6).
//!
//! Every GPU test opens the first CUDA device, else the first HIP device; with neither it prints
//! `SKIPPED <test>: no GPU (CUDA: <why>; HIP: <why>)` on stdout and stderr and returns. With
//! `FEP_REQUIRE_GPU=1` (set by ci/gpu-run.sh) a missing GPU is a failure instead, so a broken
//! GPU machine cannot pass the suite by skipping it.
//!
//! The comparisons run the same inputs through `Device::reference()` (f64) and the GPU (f32
//! accumulation), with every output buffer poisoned beforehand (NaN, `u32::MAX`) so that an
//! element the GPU never wrote fails. Errors are ‖out − ref‖ / ‖ref‖, NaN never passes.
//!
//! Tolerances, and why they hold ("scale" is max |u| over the reference trajectory plus
//! min(1, ηT)·max |b|: the size of u and of what moves it):
//! - u and a: 1e-5. Both devices read identical inputs (x and Φ are rounded to the dtype once,
//!   on the host; the GPU widens f16/bf16 to f32 exactly), so the only difference is f32 versus
//!   f64 arithmetic: ~6e-8 per rounding, in b = Φᵀx and G = ΦᵀΦ − I (n-term dot products), and
//!   in each step's update. The step size is chosen so that the iteration is non-expansive
//!   (η·λmax(ΦᵀΦ) ≤ 0.9), so those roundings add up over T ≤ 50 steps instead of growing. An f32
//!   emulation of the kernels' arithmetic (`emulate_f32`, same fma chains in the same order)
//!   gives at most 2e-7 on u and 1e-6 on a (a = u − λ is smaller than u, so relatively less
//!   accurate) over every case here, the stepped ones included.
//! - Thresholds: θ is discontinuous for the hard thresholds, so a unit whose u lies within
//!   rounding of λ may be active on one device and not on the other, and that jump feeds back
//!   through G·a into every later step. So λ is chosen (from a scan, on an f64 trajectory of the
//!   dynamics) so that no |u| of any sample at any step comes within `LAMBDA_MARGIN`·scale of λ;
//!   the case setup fails loudly if no such λ exists. The f32 emulation drifts at most ~2.5e-7
//!   of the scale from the f64 trajectory at any step. The soft thresholds are continuous (a
//!   flip changes a by at most the rounding of u), so there the scan only prefers a wide margin;
//!   the active counts may differ, per sample and step, by at most the number of units within
//!   `NEAR`·scale of the threshold in the reference trajectory, and are exact everywhere else.
//! - Energy trace: 1e-4. The kernels compute it as ½‖x‖² − a·b + ½a·(Ga) + ½a·a + λ‖a‖₁ in f32,
//!   an identity whose first terms cancel (the energy is smaller than ½‖x‖²), so its error is
//!   a few f32 roundings of ½‖x‖² relative to a smaller number (the emulation: up to 4e-6 on the
//!   m = 16000 cases); the reference sums ½‖x − Φa‖² + λ‖a‖₁ directly in f64.
//! - Steps taken: exact. With tol > 0, tol is chosen so that no sample's max |Δu| at a step where
//!   the stop decision matters lies within `TOL_MARGIN`·η·scale of tol (the emulation's max |Δu|
//!   is within 7e-5·η·scale of the f64 one on every case, and the chosen margins are ≥ 2e-4).
//!
//! `harness_self_check_with_an_f32_emulation` runs the whole harness on every machine, GPU or
//! not: the case setup (the λ and tol scans), the poisoned-buffer plumbing against the library's
//! CPU reference, the harness's own f64 trajectory against that reference, and the f32
//! emulation against every tolerance with its drift 10× inside every margin.

// `!(err < tol)` on purpose throughout: a NaN error must fail.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

mod common;

use std::ffi::{CStr, c_void};
use std::ptr::null_mut;
use std::time::Instant;

use common::gpu::{gpu, is_emulated};
use common::{randn, rel_err, rng, unit_dictionary};
use fep_kernels::ffi;
use fep_kernels::lca::{Dictionary, DictionaryOptions, LcaOutputs, LcaSpec, Threshold};
use fep_kernels::{
    DType, Device, DeviceBuffer, DeviceKind, Element, Error, View, ViewMut, bf16, f16,
};

// ---------------------------------------------------------------------------------------------
// The device under test
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

/// Units whose u is this close to the threshold (relative to the scale) at some step of the
/// reference trajectory may land on either side of it on the GPU (f32 drift: ≤ 2.5e-7).
const NEAR: f64 = 1e-5;
/// The hard-threshold cases need every u at least this far from the threshold (relative to the
/// scale), at every step: 16× the f32 drift.
const LAMBDA_MARGIN: f64 = 4e-6;
/// With tol > 0, every max |Δu| that decides a stop must be this far from tol, in units of
/// η·scale (the GPU's error in Δu = η(b − u − Ga) is η times its error in b, u and Ga).
const TOL_MARGIN: f64 = 2e-4;
const U_TOL: f64 = 1e-5;
const A_TOL: f64 = 1e-5;
const ENERGY_TOL: f64 = 1e-4;

/// Which optional outputs a case asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outs {
    /// energy, active and steps.
    All,
    /// steps only.
    NoTrace,
    /// energy and steps.
    EnergyOnly,
    /// active and steps.
    ActiveOnly,
    /// energy and active, no steps (the kernel then counts into scratch).
    NoSteps,
}

impl Outs {
    const ALL: [Outs; 5] = [
        Outs::All,
        Outs::NoTrace,
        Outs::EnergyOnly,
        Outs::ActiveOnly,
        Outs::NoSteps,
    ];
    fn energy(self) -> bool {
        matches!(self, Outs::All | Outs::EnergyOnly | Outs::NoSteps)
    }
    fn active(self) -> bool {
        matches!(self, Outs::All | Outs::ActiveOnly | Outs::NoSteps)
    }
    fn steps(self) -> bool {
        self != Outs::NoSteps
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    batch: usize,
    n: usize,
    m: usize,
    threshold: Threshold,
    /// The dtype of x.
    dtype: DType,
    /// The dtype Φ is given in (the same as x except in the stepped-kernel case).
    phi_dtype: DType,
    steps: u32,
    u0: bool,
    tol: bool,
    outs: Outs,
    seed: u64,
    /// The fraction of units the final codes should have active (λ is chosen within it).
    band: (f64, f64),
}

impl Case {
    fn label(&self) -> String {
        format!(
            "[B={} n={} m={} {:?} x:{:?} phi:{:?} T={} u0={} tol={} {:?} seed={}]",
            self.batch,
            self.n,
            self.m,
            self.threshold,
            self.dtype,
            self.phi_dtype,
            self.steps,
            self.u0,
            self.tol,
            self.outs,
            self.seed
        )
    }
}

/// (batch, n, m): batch ∈ {1, 7, 65}, n ∈ {1, 7, 33, 65}, m ∈ {1, 7, 65, 257, 1000}; none a
/// multiple of a tile, m = 1 and 7 run the dense inhibition path, the rest the gathered one.
const SHAPES: [(usize, usize, usize); 10] = [
    (1, 1, 1),
    (7, 7, 7),
    (1, 33, 65),
    (65, 7, 65),
    (7, 65, 257),
    (7, 33, 1000),
    (65, 33, 257),
    (1, 65, 1000),
    (65, 65, 7),
    (7, 1, 65),
];
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// The default share of active units in the final codes.
const BAND: (f64, f64) = (0.02, 0.8);

/// (T, u0, tol) patterns: over the nine cases of a threshold every T, both u0, tol on and off
/// with T > 1, and T = 50 with u0 and tol together.
const OPTIONS: [(u32, bool, bool); 9] = [
    (1, false, false),
    (5, true, true),
    (50, false, true),
    (1, true, true),
    (5, false, false),
    (50, true, false),
    (1, false, true),
    (5, true, false),
    (50, true, true),
];

/// The GPU-vs-CPU matrix: every threshold × dtype on three shapes each (36 cases), the options
/// (T, u0, tol, outputs) rotated so that each value meets every threshold and dtype.
/// `matrix_covers_every_option` checks the coverage.
fn matrix_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (ti, &threshold) in Threshold::ALL.iter().enumerate() {
        for (di, &dtype) in DTYPES.iter().enumerate() {
            let combo = ti * DTYPES.len() + di;
            for k in 0..3 {
                let j = di * 3 + k;
                let (batch, n, m) = SHAPES[(combo * 3 + k) % SHAPES.len()];
                let (steps, u0, tol) = OPTIONS[(j + 3 * ti) % OPTIONS.len()];
                cases.push(Case {
                    batch,
                    n,
                    m,
                    threshold,
                    dtype,
                    phi_dtype: dtype,
                    steps,
                    u0,
                    tol,
                    outs: Outs::ALL[(j + ti) % Outs::ALL.len()],
                    seed: 1000 + (combo * 3 + k) as u64,
                    band: BAND,
                });
            }
        }
    }
    cases
}

/// The stepped (global-memory) kernel: used when 16·m + 1024 bytes exceed the opt-in shared
/// memory of a block (227 KiB on an H100 or H200, 64 KiB on an MI300X), so m = 16000 takes it
/// everywhere. Both cases share one f32 dictionary (one 16000² G per device); the second feeds
/// x in f16 to the f32 dictionary, starts from u0, stops early, uses the non-negative soft
/// threshold and keeps over 30% of the units active, so the inhibition sweeps G densely
/// (more than 1/LCA_DENSE_DIV = 1/4 active) where the first gathers the active rows.
fn stepped_cases() -> [Case; 2] {
    let base = Case {
        batch: 2,
        n: 8,
        m: 16000,
        threshold: Threshold::Soft,
        dtype: DType::F32,
        phi_dtype: DType::F32,
        steps: 20,
        u0: false,
        tol: false,
        outs: Outs::All,
        seed: 7,
        band: BAND,
    };
    [
        base,
        Case {
            threshold: Threshold::SoftNonNeg,
            dtype: DType::F16,
            u0: true,
            tol: true,
            band: (0.3, 0.9),
            ..base
        },
    ]
}

/// A batch of 4097 samples (the grid's tail), small n and m.
fn large_batch_case() -> Case {
    Case {
        batch: 4097,
        n: 3,
        m: 5,
        threshold: Threshold::Soft,
        dtype: DType::F32,
        phi_dtype: DType::F32,
        steps: 5,
        u0: true,
        tol: false,
        outs: Outs::All,
        seed: 4097,
        band: BAND,
    }
}

// ---------------------------------------------------------------------------------------------
// Problems: inputs, and the parameters chosen on an f64 trajectory of the dynamics
// ---------------------------------------------------------------------------------------------

/// Rounds `v` to the nearest value of `dtype` (kept in f32, where it is exact).
fn round_to(dtype: DType, v: Vec<f32>) -> Vec<f32> {
    match dtype {
        DType::F32 => v,
        DType::F16 => v.into_iter().map(|x| f16::from_f32(x).to_f32()).collect(),
        DType::BF16 => v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect(),
    }
}

fn to_elem<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x as f64)).collect()
}

/// Distance of u from the threshold's switching point.
fn boundary_distance(th: Threshold, u: f64, lambda: f64) -> f64 {
    match th {
        Threshold::Soft | Threshold::Hard => (u.abs() - lambda).abs(),
        Threshold::SoftNonNeg | Threshold::HardNonNeg => (u - lambda).abs(),
    }
}

/// The largest eigenvalue of ΦΦᵀ (= that of ΦᵀΦ), by power iteration on the n×n matrix.
fn max_eig(phi: &[f64], n: usize, m: usize) -> f64 {
    let mut k = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            k[i * n + j] = (0..m).map(|c| phi[i * m + c] * phi[j * m + c]).sum();
        }
    }
    let mut v = vec![1.0; n];
    let mut lam = 0.0;
    for _ in 0..200 {
        let w: Vec<f64> = (0..n)
            .map(|i| (0..n).map(|j| k[i * n + j] * v[j]).sum())
            .collect();
        let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
        lam = norm / v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v = w.iter().map(|x| x / norm).collect();
    }
    lam
}

/// The LCA dynamics of one sample in f64 (DESIGN.md §4.3), written independently of the
/// library: G·a is formed as Φᵀ(Φa) − a, so no m×m matrix is needed. `visit(t, u, max|Δu|)` sees
/// u before the first step (t = −1) and after every step. Returns (steps taken, max |b|).
#[allow(clippy::too_many_arguments)]
fn trajectory(
    phi: &[f64],
    n: usize,
    m: usize,
    x: &[f64],
    u0: Option<&[f32]>,
    spec: &LcaSpec,
    mut visit: impl FnMut(i64, &[f64], f64),
) -> (u32, f64) {
    let (lambda, eta, tol) = (spec.lambda as f64, spec.eta as f64, spec.tol as f64);
    let b: Vec<f64> = (0..m)
        .map(|j| (0..n).map(|i| x[i] * phi[i * m + j]).sum())
        .collect();
    let bmax = b.iter().fold(0.0f64, |acc, v| acc.max(v.abs()));
    let mut u: Vec<f64> = match u0 {
        Some(u0) => u0.iter().map(|&v| v as f64).collect(),
        None => vec![0.0; m],
    };
    let mut c = vec![0.0; m];
    let mut r = vec![0.0; n];
    let inhibit = |u: &[f64], r: &mut [f64], c: &mut [f64]| {
        let a: Vec<(usize, f64)> = u
            .iter()
            .enumerate()
            .map(|(j, &v)| (j, spec.threshold.apply(v, lambda)))
            .filter(|&(_, v)| v != 0.0)
            .collect();
        for (i, ri) in r.iter_mut().enumerate() {
            *ri = a.iter().map(|&(k, ak)| phi[i * m + k] * ak).sum();
        }
        for (j, cj) in c.iter_mut().enumerate() {
            *cj = (0..n).map(|i| phi[i * m + j] * r[i]).sum::<f64>();
        }
        for &(k, ak) in &a {
            c[k] -= ak;
        }
    };
    visit(-1, &u, 0.0);
    inhibit(&u, &mut r, &mut c);
    for t in 0..spec.steps {
        let mut maxdu: f64 = 0.0;
        for j in 0..m {
            let du = eta * (b[j] - u[j] - c[j]);
            u[j] += du;
            maxdu = maxdu.max(du.abs());
        }
        visit(t as i64, &u, maxdu);
        if tol > 0.0 && maxdu < tol {
            return (t + 1, bmax);
        }
        inhibit(&u, &mut r, &mut c);
    }
    (spec.steps, bmax)
}

/// A case made concrete: inputs (already rounded to their dtypes) and the spec, plus what the
/// reference trajectory says about it.
struct Problem {
    case: Case,
    x: Vec<f32>,
    phi: Vec<f32>,
    u0: Option<Vec<f32>>,
    spec: LcaSpec,
    /// Scale of u and b over the trajectory (max |u|, max |b|).
    scale: f64,
    /// Smallest distance of any u from the threshold, relative to `scale`.
    lambda_margin: f64,
    /// Smallest |max|Δu| − tol| where a stop is decided, in units of η·scale (∞ without tol).
    tol_margin: f64,
    /// [batch, steps]: units within NEAR·scale of the threshold after each step.
    near: Vec<u32>,
    /// The trajectory's final u [batch, m] and steps taken, to check the harness against the
    /// library's reference.
    traj_u: Vec<f64>,
    traj_steps: Vec<u32>,
}

impl Problem {
    fn new(case: Case) -> Problem {
        let Case { batch, n, m, .. } = case;
        let mut g = rng(case.seed);
        let phi = round_to(case.phi_dtype, unit_dictionary(&mut g, n, m));
        let x = round_to(case.dtype, randn(&mut g, batch * n, 1.0));
        let u0 = case.u0.then(|| randn(&mut g, batch * m, 0.5));
        let phi64: Vec<f64> = phi.iter().map(|&v| v as f64).collect();
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        // Non-expansive steps: η·λmax(ΦᵀΦ) ≤ 0.9.
        let eta = (0.9 / max_eig(&phi64, n, m)).min(0.9) as f32;
        let mut spec = LcaSpec::new(1.0)
            .threshold(case.threshold)
            .eta(eta)
            .steps(case.steps)
            .tol(0.0);
        spec.trace = case.outs.energy() || case.outs.active();
        let u0_of = |s: usize| u0.as_ref().map(|u| &u[s * m..(s + 1) * m]);
        let x_of = |s: usize| &x64[s * n..(s + 1) * n];

        // λ: scan a band around the level u can reach (b grows u by at most 1 − (1 − η)^T of
        // itself; u0 decays by (1 − η)^T), keep the candidates whose final codes are neither
        // empty nor nearly full, and take the one whose threshold no u comes near.
        let decay = (1.0 - eta as f64).powi(case.steps as i32);
        let rms = |v: &[f64]| (v.iter().map(|x| x * x).sum::<f64>() / v.len().max(1) as f64).sqrt();
        let brms = {
            let mut all = Vec::with_capacity(batch * m);
            for s in 0..batch {
                let xs = x_of(s);
                all.extend((0..m).map(|j| (0..n).map(|i| xs[i] * phi64[i * m + j]).sum::<f64>()));
            }
            rms(&all)
        };
        let level = brms * (1.0 - decay) + if case.u0 { 0.5 * decay } else { 0.0 };
        let total = batch * m;
        let (lo, hi) = (
            (total as f64 * case.band.0).round().max(1.0) as usize,
            ((total as f64 * case.band.1) as usize).max(1),
        );
        // One λ: (codes in band, margin, scale, the boundary values within ±15% of λ).
        let eval = |lambda: f32| {
            let spec = LcaSpec { lambda, ..spec };
            let l = lambda as f64;
            let (mut dist, mut umax, mut bmax_all, mut active) =
                (f64::INFINITY, 0.0f64, 0.0f64, 0usize);
            let mut window = Vec::new();
            for s in 0..batch {
                let last = spec.steps as i64 - 1;
                let (_, bmax) = trajectory(&phi64, n, m, x_of(s), u0_of(s), &spec, |t, u, _| {
                    for &v in u {
                        dist = dist.min(boundary_distance(spec.threshold, v, l));
                        umax = umax.max(v.abs());
                        let w = match spec.threshold {
                            Threshold::Soft | Threshold::Hard => v.abs(),
                            _ => v,
                        };
                        if (w - l).abs() < 0.15 * l {
                            window.push(w);
                        }
                    }
                    if t == last {
                        active += u
                            .iter()
                            .filter(|&&v| spec.threshold.apply(v, l) != 0.0)
                            .count();
                    }
                });
                bmax_all = bmax_all.max(bmax);
            }
            // The scale of u and of what moves it: |u| itself, and b over the steps run (the
            // f32 errors of b and G·a reach u through η per step).
            let scale = umax + (eta as f64 * spec.steps as f64).min(1.0) * bmax_all;
            (active >= lo && active <= hi, dist / scale, scale, window)
        };
        let mut best: Option<(bool, f64, f32, f64)> = None; // (in band, margin, λ, scale)
        let consider = |lambda: f32, best: &mut Option<(bool, f64, f32, f64)>| {
            if !(lambda > 0.0 && lambda.is_finite()) {
                return Vec::new();
            }
            let (band, margin, scale, window) = eval(lambda);
            if best.is_none_or(|(b, mg, _, _)| (band, margin) > (b, mg)) {
                *best = Some((band, margin, lambda, scale));
            }
            window
        };
        const K: usize = 16;
        for k in 0..K {
            let f = (0.2f64.ln() + (1.5f64 / 0.2).ln() * k as f64 / (K - 1) as f64).exp();
            consider((level * f) as f32, &mut best);
        }
        // For a hard threshold the trajectory depends on λ only through which side of it each
        // u lies, so moving λ into a wide gap of the values it saw changes little: try the
        // middles of the widest gaps near the best λ so far.
        if matches!(case.threshold, Threshold::Hard | Threshold::HardNonNeg) {
            for _round in 0..2 {
                let (_, _, lambda, _) = best.expect("some λ candidate is finite");
                let mut window = consider(lambda, &mut best);
                window.sort_by(f64::total_cmp);
                let mut gaps: Vec<(f64, f64)> = window
                    .windows(2)
                    .map(|w| (w[1] - w[0], 0.5 * (w[0] + w[1])))
                    .collect();
                gaps.sort_by(|p, q| q.0.total_cmp(&p.0));
                for &(_, mid) in gaps.iter().take(8) {
                    consider(mid as f32, &mut best);
                }
            }
        }
        let (_, lambda_margin, lambda, scale) = best.expect("some λ candidate is finite");
        spec.lambda = lambda;
        let hard = matches!(case.threshold, Threshold::Hard | Threshold::HardNonNeg);
        assert!(
            !hard || lambda_margin >= LAMBDA_MARGIN,
            "test setup {}: no λ keeps every u at least {LAMBDA_MARGIN:e}·scale from the hard \
             threshold (best {lambda_margin:e}); change the seed or shrink the case",
            case.label()
        );

        // tol: the one with the widest margin to every max |Δu| of every sample at the steps
        // where the stop decision matters (t < T − 1, up to the sample's stop), preferring one
        // that stops sample 0 in the middle of the run.
        let mut tol_margin = f64::INFINITY;
        if case.tol {
            let steps = spec.steps as usize;
            let mut maxdu = vec![Vec::with_capacity(steps); batch];
            for (s, md) in maxdu.iter_mut().enumerate() {
                trajectory(&phi64, n, m, x_of(s), u0_of(s), &spec, |t, _, d| {
                    if t >= 0 {
                        md.push(d)
                    }
                });
            }
            // Candidates: the middles between consecutive values (of all samples, sorted), so
            // the widest gaps are among them.
            let mut values: Vec<f64> = maxdu
                .iter()
                .flat_map(|md| md.iter().take(steps.saturating_sub(1)).copied())
                .collect();
            values.push(maxdu[0][0] * 2.0);
            values.sort_by(f64::total_cmp);
            let mut candidates: Vec<f64> = values.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
            candidates.push(maxdu[0][0] * 1.5);
            let unit = eta as f64 * scale;
            let mut best: Option<(bool, f64, f32)> = None;
            for tol in candidates {
                let tol32 = tol as f32;
                let tol = tol32 as f64;
                if !(tol > 0.0 && tol.is_finite()) {
                    continue;
                }
                let mut margin = f64::INFINITY;
                for md in &maxdu {
                    for &d in md.iter().take(steps.saturating_sub(1)) {
                        margin = margin.min((d - tol).abs() / unit);
                        if d < tol {
                            break;
                        }
                    }
                }
                // Prefer (with a wide enough margin) a stop of sample 0 in the middle of the run.
                let stop0 = maxdu[0].iter().position(|&d| d < tol).unwrap_or(steps);
                let middle = margin >= TOL_MARGIN
                    && stop0 >= steps / 4
                    && stop0 < steps.saturating_sub(1).max(1);
                if best.is_none_or(|(mid, mg, _)| (middle, margin) > (mid, mg)) {
                    best = Some((middle, margin, tol32));
                }
            }
            let (_, margin, tol) = best.expect("a tol candidate");
            assert!(
                margin >= TOL_MARGIN,
                "test setup {}: no tol keeps every deciding max |Δu| {TOL_MARGIN:e}·η·scale away \
                 (best {margin:e})",
                case.label()
            );
            spec.tol = tol;
            tol_margin = margin;
        }

        // The final trajectory: near-threshold counts per step, final u and steps.
        let steps = spec.steps as usize;
        let mut near = vec![0u32; batch * steps];
        let mut traj_u = vec![0.0; batch * m];
        let mut traj_steps = vec![0u32; batch];
        for s in 0..batch {
            let row = &mut near[s * steps..(s + 1) * steps];
            let fin = &mut traj_u[s * m..(s + 1) * m];
            let (taken, _) = trajectory(&phi64, n, m, x_of(s), u0_of(s), &spec, |t, u, _| {
                if t >= 0 {
                    let k = u
                        .iter()
                        .filter(|&&v| {
                            boundary_distance(spec.threshold, v, lambda as f64) < NEAR * scale
                        })
                        .count();
                    row[t as usize] = k as u32;
                    fin.copy_from_slice(u);
                }
            });
            // A stopped sample's trace repeats its last step.
            let last = row[taken as usize - 1];
            row[taken as usize..].iter_mut().for_each(|v| *v = last);
            traj_steps[s] = taken;
        }
        Problem {
            case,
            x,
            phi,
            u0,
            spec,
            scale,
            lambda_margin,
            tol_margin,
            near,
            traj_u,
            traj_steps,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running a problem on a device
// ---------------------------------------------------------------------------------------------

/// Everything a solve returned, on the host.
#[derive(Clone, Debug, PartialEq)]
struct HostOut {
    u: Vec<f32>,
    a: Vec<f32>,
    energy: Option<Vec<f32>>,
    active: Option<Vec<u32>>,
    steps: Option<Vec<u32>>,
}

/// Makes a dictionary on `dev` from f32 values given to it in `dtype`.
fn dictionary(
    dev: &Device,
    phi: &[f32],
    n: usize,
    m: usize,
    dtype: DType,
) -> Result<Dictionary, Error> {
    fn typed<T: Element>(
        dev: &Device,
        phi: &[f32],
        n: usize,
        m: usize,
    ) -> Result<Dictionary, Error> {
        let buf = dev.upload(&to_elem::<T>(phi))?;
        Dictionary::new(&buf.view(), n, m, DictionaryOptions::default())
    }
    match dtype {
        DType::F32 => typed::<f32>(dev, phi, n, m),
        DType::F16 => typed::<f16>(dev, phi, n, m),
        DType::BF16 => typed::<bf16>(dev, phi, n, m),
    }
}

/// Solves `p` with `dict` into freshly poisoned output buffers on its device.
fn solve_poisoned(dict: &Dictionary, p: &Problem) -> Result<HostOut, Error> {
    fn typed<T: Element>(dict: &Dictionary, p: &Problem) -> Result<HostOut, Error> {
        let dev = dict.device();
        let Case { batch, m, outs, .. } = p.case;
        let (bm, bt) = (batch * m, batch * p.spec.steps as usize);
        let x = dev.upload(&to_elem::<T>(&p.x))?;
        let u0 = p.u0.as_ref().map(|u| dev.upload(u)).transpose()?;
        let mut u = dev.upload(&vec![f32::NAN; bm])?;
        let mut a = dev.upload(&vec![f32::NAN; bm])?;
        let mut energy = if outs.energy() {
            Some(dev.upload(&vec![f32::NAN; bt])?)
        } else {
            None
        };
        let mut active = if outs.active() {
            Some(dev.upload(&vec![u32::MAX; bt])?)
        } else {
            None
        };
        let mut steps = if outs.steps() {
            Some(dev.upload(&vec![u32::MAX; batch])?)
        } else {
            None
        };
        let out = LcaOutputs {
            u: u.view_mut(),
            a: a.view_mut(),
            energy: energy.as_mut().map(|b| b.view_mut()),
            active: active.as_mut().map(|b| b.view_mut()),
            steps: steps.as_mut().map(|b| b.view_mut()),
        };
        let u0v = u0.as_ref().map(|b| b.view());
        let stream = dev.default_stream();
        dict.solve_into(&p.spec, &x.view(), u0v.as_ref(), out, stream)?;
        dev.synchronize(stream)?;
        Ok(HostOut {
            u: u.to_vec()?,
            a: a.to_vec()?,
            energy: energy.map(|b| b.to_vec()).transpose()?,
            active: active.map(|b| b.to_vec()).transpose()?,
            steps: steps.map(|b| b.to_vec()).transpose()?,
        })
    }
    match p.case.dtype {
        DType::F32 => typed::<f32>(dict, p),
        DType::F16 => typed::<f16>(dict, p),
        DType::BF16 => typed::<bf16>(dict, p),
    }
}

/// Checks the library's CPU reference against the harness's own trajectory (so the margins the
/// harness computed describe the run it compares against).
fn check_reference(p: &Problem, reference: &HostOut) -> Vec<String> {
    let mut errs = Vec::new();
    let label = p.case.label();
    let e = rel_err(&reference.u, &p.traj_u);
    if !(e < 1e-6) {
        errs.push(format!(
            "{label}: harness trajectory and CPU reference disagree on u: {e:e}"
        ));
    }
    if let Some(steps) = &reference.steps
        && steps != &p.traj_steps
    {
        errs.push(format!(
            "{label}: harness trajectory stops at {:?}, CPU reference at {steps:?}",
            p.traj_steps
        ));
    }
    errs
}

/// Compares `got` (device under test) with `want` (CPU reference); returns the failures.
fn compare(p: &Problem, got: &HostOut, want: &HostOut) -> Vec<String> {
    let mut errs = Vec::new();
    let label = p.case.label();
    let unwritten_f = |v: &[f32]| v.iter().filter(|x| x.is_nan()).count();
    let unwritten_u = |v: &[u32]| v.iter().filter(|&&x| x == u32::MAX).count();
    for (name, g, w, tol) in [("u", &got.u, &want.u, U_TOL), ("a", &got.a, &want.a, A_TOL)] {
        let e = rel_err(g, w);
        if !(e < tol) {
            errs.push(format!(
                "{label}: {name} rel err {e:e} >= {tol:e} ({} elements NaN/unwritten)",
                unwritten_f(g)
            ));
        }
    }
    match (&got.energy, &want.energy) {
        (Some(g), Some(w)) => {
            let e = rel_err(g, w);
            if !(e < ENERGY_TOL) {
                errs.push(format!(
                    "{label}: energy rel err {e:e} >= {ENERGY_TOL:e} ({} NaN/unwritten)",
                    unwritten_f(g)
                ));
            }
        }
        (None, None) => {}
        _ => errs.push(format!("{label}: energy present on one device only")),
    }
    match (&got.active, &want.active) {
        (Some(g), Some(w)) => {
            let bad: Vec<String> = g
                .iter()
                .zip(w)
                .zip(&p.near)
                .enumerate()
                .filter(|&(_, ((&g, &w), &near))| g == u32::MAX || g.abs_diff(w) > near)
                .take(5)
                .map(|(i, ((g, w), near))| {
                    format!(
                        "(sample {}, step {}) got {g} want {w} near {near}",
                        i / p.spec.steps as usize,
                        i % p.spec.steps as usize
                    )
                })
                .collect();
            if !bad.is_empty() {
                errs.push(format!("{label}: active counts differ beyond the near-threshold units ({} unwritten): {}", unwritten_u(g), bad.join(", ")));
            }
        }
        (None, None) => {}
        _ => errs.push(format!("{label}: active present on one device only")),
    }
    if got.steps != want.steps {
        errs.push(format!(
            "{label}: steps {:?} want {:?}",
            got.steps, want.steps
        ));
    }
    errs
}

/// Runs `cases` on `dev` and on the CPU and compares. The CPU dictionary of each case is made
/// from the same rounded values; cases with the same (n, m, seed, phi dtype) share dictionaries.
fn run_cases(dev: &Device, cases: &[Case]) -> Vec<String> {
    let cpu = Device::reference();
    let mut errs = Vec::new();
    // (n, m, seed, phi dtype) → the dictionary on `dev` and on the CPU.
    type Shared = ((usize, usize, u64, DType), Dictionary, Dictionary);
    let mut dicts: Option<Shared> = None;
    for &case in cases {
        let t0 = Instant::now();
        let p = Problem::new(case);
        let key = (case.n, case.m, case.seed, case.phi_dtype);
        if dicts.as_ref().is_none_or(|(k, _, _)| *k != key) {
            dicts = None; // free the old pair first (the stepped case holds a 16000² G on each)
            let made = dictionary(dev, &p.phi, case.n, case.m, case.phi_dtype)
                .and_then(|d| Ok((d, dictionary(&cpu, &p.phi, case.n, case.m, case.phi_dtype)?)));
            match made {
                Ok((d, r)) => dicts = Some((key, d, r)),
                Err(e) => {
                    errs.push(format!("{}: dictionary: {e}", case.label()));
                    continue;
                }
            }
        }
        let (_, dut, reference) = dicts.as_ref().unwrap();
        let setup = t0.elapsed();
        let want = match solve_poisoned(reference, &p) {
            Ok(w) => w,
            Err(e) => {
                errs.push(format!("{}: CPU reference failed: {e}", case.label()));
                continue;
            }
        };
        errs.extend(check_reference(&p, &want));
        let got = match solve_poisoned(dut, &p) {
            Ok(g) => g,
            Err(e) => {
                errs.push(format!("{}: solve on {dev:?} failed: {e}", case.label()));
                continue;
            }
        };
        let case_errs = compare(&p, &got, &want);
        let nnz = want.a.iter().filter(|&&v| v != 0.0).count();
        println!(
            "{} {}: λ={:.4} η={:.4} tol={:e} active {}/{} margins λ {:.1e} tol {:.1e}; u err {:.1e} a err {:.1e}{} ({:.2?} setup, {:.2?} total)",
            if case_errs.is_empty() { "ok  " } else { "FAIL" },
            case.label(),
            p.spec.lambda,
            p.spec.eta,
            p.spec.tol,
            nnz,
            case.batch * case.m,
            p.lambda_margin,
            p.tol_margin,
            rel_err(&got.u, &want.u),
            rel_err(&got.a, &want.a),
            match (&got.energy, &want.energy) {
                (Some(g), Some(w)) => format!(" energy err {:.1e}", rel_err(g, w)),
                _ => String::new(),
            },
            setup,
            t0.elapsed()
        );
        errs.extend(case_errs);
    }
    errs
}

fn assert_no_failures(errs: Vec<String>) {
    assert!(
        errs.is_empty(),
        "{} failure(s):\n{}",
        errs.len(),
        errs.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// GPU vs CPU
// ---------------------------------------------------------------------------------------------

fn matrix_for(dtype: DType) -> Vec<Case> {
    matrix_cases()
        .into_iter()
        .filter(|c| c.dtype == dtype)
        .collect()
}

#[test]
fn gpu_matches_cpu_f32() {
    let Some(dev) = gpu("gpu_matches_cpu_f32") else {
        return;
    };
    assert_no_failures(run_cases(&dev, &matrix_for(DType::F32)));
}

#[test]
fn gpu_matches_cpu_f16() {
    let Some(dev) = gpu("gpu_matches_cpu_f16") else {
        return;
    };
    assert_no_failures(run_cases(&dev, &matrix_for(DType::F16)));
}

#[test]
fn gpu_matches_cpu_bf16() {
    let Some(dev) = gpu("gpu_matches_cpu_bf16") else {
        return;
    };
    assert_no_failures(run_cases(&dev, &matrix_for(DType::BF16)));
}

#[test]
fn gpu_stepped_kernel_matches_cpu() {
    let Some(dev) = gpu("gpu_stepped_kernel_matches_cpu") else {
        return;
    };
    if is_emulated(&dev) {
        println!(
            "SKIPPED gpu_stepped_kernel_matches_cpu on the emulated device: {}",
            if "gpu_stepped_kernel_matches_cpu".contains("abi") {
                "the C ABI names real devices only"
            } else {
                "m = 16000 takes hours on host threads (the stepped kernel is covered with FEP_TEST_EMU_SHARED small)"
            }
        );
        return;
    }
    assert_no_failures(run_cases(&dev, &stepped_cases()));
}

#[test]
fn gpu_large_batch_matches_cpu() {
    let Some(dev) = gpu("gpu_large_batch_matches_cpu") else {
        return;
    };
    if is_emulated(&dev) {
        println!(
            "SKIPPED gpu_large_batch_matches_cpu on the emulated device: 4097 blocks take minutes on host threads"
        );
        return;
    }
    assert_no_failures(run_cases(&dev, &[large_batch_case()]));
}

/// The GPU suite runs each test once; a second solve of the same inputs must give the same
/// bits (no race, no dependence on leftover memory).
#[test]
fn gpu_solve_is_deterministic() {
    let Some(dev) = gpu("gpu_solve_is_deterministic") else {
        return;
    };
    if is_emulated(&dev) {
        println!(
            "SKIPPED gpu_solve_is_deterministic on the emulated device: host threads say nothing about the GPU's determinism"
        );
        return;
    }
    let case = Case {
        batch: 65,
        n: 33,
        m: 257,
        threshold: Threshold::Soft,
        steps: 50,
        outs: Outs::All,
        ..large_batch_case()
    };
    let p = Problem::new(case);
    let dict = dictionary(&dev, &p.phi, case.n, case.m, case.phi_dtype).unwrap();
    let first = solve_poisoned(&dict, &p).unwrap();
    let second = solve_poisoned(&dict, &p).unwrap();
    assert!(
        bits_equal(&first, &second),
        "two solves of the same inputs differ"
    );
}

fn bits_equal(x: &HostOut, y: &HostOut) -> bool {
    let f = |a: &[f32], b: &[f32]| {
        a.len() == b.len() && a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits())
    };
    f(&x.u, &y.u)
        && f(&x.a, &y.a)
        && match (&x.energy, &y.energy) {
            (Some(a), Some(b)) => f(a, b),
            (None, None) => true,
            _ => false,
        }
        && x.active == y.active
        && x.steps == y.steps
}

// ---------------------------------------------------------------------------------------------
// Dictionaries and learning
// ---------------------------------------------------------------------------------------------

/// The codes a of `x` (given in `dtype`) on a CPU dictionary.
fn host_codes(dict: &Dictionary, spec: &LcaSpec, dtype: DType, x: &[f32]) -> Vec<f32> {
    fn typed<T: Element>(dict: &Dictionary, spec: &LcaSpec, x: &[f32]) -> Vec<f32> {
        dict.solve(spec, &View::host(&to_elem::<T>(x)), None)
            .unwrap()
            .a
            .to_vec()
            .unwrap()
    }
    match dtype {
        DType::F32 => typed::<f32>(dict, spec, x),
        DType::F16 => typed::<f16>(dict, spec, x),
        DType::BF16 => typed::<bf16>(dict, spec, x),
    }
}

fn learn_typed<T: Element>(
    dict: &mut Dictionary,
    x: &[f32],
    a: &[f32],
    lr: f32,
) -> Result<(), Error> {
    let dev = dict.device().clone();
    let xb = dev.upload(&to_elem::<T>(x))?;
    let ab = dev.upload(a)?;
    dict.learn(&xb.view(), &ab.view(), lr, dev.default_stream())?;
    dev.synchronize(dev.default_stream())
}

fn learn_any(
    dict: &mut Dictionary,
    dtype: DType,
    x: &[f32],
    a: &[f32],
    lr: f32,
) -> Result<(), Error> {
    match dtype {
        DType::F32 => learn_typed::<f32>(dict, x, a, lr),
        DType::F16 => learn_typed::<f16>(dict, x, a, lr),
        DType::BF16 => learn_typed::<bf16>(dict, x, a, lr),
    }
}

/// Φ as made (bitwise: both hold the same rounded values), G = ΦᵀΦ − I, and Φ and G after three
/// learning steps, GPU against CPU to 1e-5. The codes fed to both are the CPU's, so the two
/// learn from identical inputs.
#[test]
fn gpu_dictionary_and_learning_match_cpu() {
    let Some(dev) = gpu("gpu_dictionary_and_learning_match_cpu") else {
        return;
    };
    let cpu = Device::reference();
    let mut errs = Vec::new();
    for (batch, n, m, dtype, seed) in [
        (7, 33, 65, DType::F32, 1u64),
        (65, 7, 257, DType::BF16, 2),
        (1, 65, 7, DType::F16, 3),
        (4, 1, 1, DType::F32, 4),
    ] {
        let label = format!("[B={batch} n={n} m={m} {dtype:?}]");
        let mut g = rng(seed);
        let phi = round_to(dtype, unit_dictionary(&mut g, n, m));
        let x = round_to(dtype, randn(&mut g, batch * n, 1.0));
        let mut dg = dictionary(&dev, &phi, n, m, dtype).unwrap();
        let mut dc = dictionary(&cpu, &phi, n, m, dtype).unwrap();
        let (pg, pc) = (dg.phi().unwrap(), dc.phi().unwrap());
        if pg.iter().zip(&pc).any(|(a, b)| a.to_bits() != b.to_bits()) {
            errs.push(format!("{label}: Φ as stored differs between GPU and CPU"));
        }
        let e = rel_err(&dg.gram().unwrap(), &dc.gram().unwrap());
        println!("{label}: gram err {e:.1e}");
        if !(e < 1e-5) {
            errs.push(format!("{label}: gram rel err {e:e}"));
        }
        for step in 0..3 {
            // η from the dictionary as it is now (learning changes ΦᵀΦ), so the codes stay
            // bounded; they are the CPU's, fed to both devices.
            let now: Vec<f64> = dc.phi().unwrap().iter().map(|&v| v as f64).collect();
            let eta = (0.9 / max_eig(&now, n, m)).min(0.9) as f32;
            let a = host_codes(&dc, &LcaSpec::new(0.1).eta(eta).steps(30), dtype, &x);
            let amax = a.iter().fold(0f32, |acc, v| acc.max(v.abs()));
            assert!(
                amax < 1e3,
                "{label}: the codes diverged (max |a| = {amax}): a test bug"
            );
            learn_any(&mut dg, dtype, &x, &a, 0.2).unwrap();
            learn_any(&mut dc, dtype, &x, &a, 0.2).unwrap();
            let ep = rel_err(&dg.phi().unwrap(), &dc.phi().unwrap());
            let eg = rel_err(&dg.gram().unwrap(), &dc.gram().unwrap());
            println!(
                "{label} after learn step {}: Φ err {ep:.1e}, gram err {eg:.1e}",
                step + 1
            );
            if !(ep < 1e-5 && eg < 1e-5) {
                errs.push(format!(
                    "{label} after learn step {}: Φ rel err {ep:e}, gram rel err {eg:e} (tol 1e-5)",
                    step + 1
                ));
            }
        }
    }
    assert_no_failures(errs);
}

// ---------------------------------------------------------------------------------------------
// Bad input on the GPU
// ---------------------------------------------------------------------------------------------

const SENTINEL_F: f32 = 1234.5;
const SENTINEL_U: u32 = 777;

/// Output buffers pre-filled with sentinels, to show that a rejected call wrote nothing.
struct Sentinels {
    u: DeviceBuffer<f32>,
    a: DeviceBuffer<f32>,
    energy: DeviceBuffer<f32>,
    active: DeviceBuffer<u32>,
    steps: DeviceBuffer<u32>,
}

impl Sentinels {
    fn new(dev: &Device, bm: usize, bt: usize, batch: usize) -> Sentinels {
        Sentinels {
            u: dev.upload(&vec![SENTINEL_F; bm]).unwrap(),
            a: dev.upload(&vec![SENTINEL_F; bm]).unwrap(),
            energy: dev.upload(&vec![SENTINEL_F; bt]).unwrap(),
            active: dev.upload(&vec![SENTINEL_U; bt]).unwrap(),
            steps: dev.upload(&vec![SENTINEL_U; batch]).unwrap(),
        }
    }
    fn outputs(&mut self) -> LcaOutputs<'_> {
        LcaOutputs {
            u: self.u.view_mut(),
            a: self.a.view_mut(),
            energy: Some(self.energy.view_mut()),
            active: Some(self.active.view_mut()),
            steps: Some(self.steps.view_mut()),
        }
    }
    fn untouched(&self) -> bool {
        let f = |b: &DeviceBuffer<f32>| b.to_vec().unwrap().iter().all(|&v| v == SENTINEL_F);
        let u = |b: &DeviceBuffer<u32>| b.to_vec().unwrap().iter().all(|&v| v == SENTINEL_U);
        f(&self.u) && f(&self.a) && f(&self.energy) && u(&self.active) && u(&self.steps)
    }
}

fn expect_invalid<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, Error>,
    name: &str,
) -> Option<String> {
    match r {
        Err(Error::InvalidArgument { name: got, reason }) if got == name => {
            println!("{what}: rejected as expected: `{got}`: {reason}");
            None
        }
        other => Some(format!(
            "{what}: expected InvalidArgument naming `{name}`, got {other:?}"
        )),
    }
}

#[test]
fn gpu_rejects_bad_input_and_leaves_outputs_untouched() {
    let Some(dev) = gpu("gpu_rejects_bad_input_and_leaves_outputs_untouched") else {
        return;
    };
    let (batch, n, m, steps) = (5usize, 7usize, 65usize, 4u32);
    let mut g = rng(99);
    let phi = unit_dictionary(&mut g, n, m);
    let x = randn(&mut g, batch * n, 1.0);
    let u0 = randn(&mut g, batch * m, 0.5);
    let dict = dictionary(&dev, &phi, n, m, DType::F32).unwrap();
    let spec = LcaSpec::new(0.3).eta(0.05).steps(steps).trace(true);
    let stream = dev.default_stream();
    let (bm, bt) = (batch * m, batch * steps as usize);
    let mut errs = Vec::new();

    // Runs one solve that must fail naming `name`, into sentinel outputs that must stay as
    // they were.
    let mut attempt =
        |what: &str, name: &str, run: &mut dyn FnMut(LcaOutputs<'_>) -> Result<(), Error>| {
            let mut s = Sentinels::new(&dev, bm, bt, batch);
            errs.extend(expect_invalid(what, run(s.outputs()), name));
            dev.synchronize(stream).unwrap();
            if !s.untouched() {
                errs.push(format!(
                    "{what}: the outputs were written although the call failed"
                ));
            }
        };

    let good_x = dev.upload(&x).unwrap();
    let good_u0 = dev.upload(&u0).unwrap();
    for (what, idx, v) in [
        ("NaN in x", 3 * n + 2, f32::NAN),
        ("+Inf in x", batch * n - 1, f32::INFINITY),
        ("-Inf in x", 0, f32::NEG_INFINITY),
    ] {
        let mut bad = x.clone();
        bad[idx] = v;
        let xb = dev.upload(&bad).unwrap();
        attempt(what, "x", &mut |out| {
            dict.solve_into(&spec, &xb.view(), None, out, stream)
        });
    }
    {
        let mut bad = to_elem::<f16>(&x);
        bad[n + 1] = f16::NAN;
        let xb = dev.upload(&bad).unwrap();
        attempt("NaN in f16 x", "x", &mut |out| {
            dict.solve_into(&spec, &xb.view(), None, out, stream)
        });
        let mut bad = to_elem::<bf16>(&x);
        bad[2] = bf16::INFINITY;
        let xb = dev.upload(&bad).unwrap();
        attempt("Inf in bf16 x", "x", &mut |out| {
            dict.solve_into(&spec, &xb.view(), None, out, stream)
        });
    }
    {
        let mut bad = u0.clone();
        bad[4 * m + 64] = f32::NAN;
        let ub = dev.upload(&bad).unwrap();
        attempt("NaN in u0", "u0", &mut |out| {
            dict.solve_into(&spec, &good_x.view(), Some(&ub.view()), out, stream)
        });
    }
    // Mismatched devices (a GPU under test only: host memory is the CPU device's own memory).
    if dev.kind() != DeviceKind::Cpu {
        attempt("x on the CPU, dictionary on the GPU", "x", &mut |out| {
            dict.solve_into(&spec, &View::host(&x), None, out, stream)
        });
        attempt("u0 on the CPU", "u0", &mut |out| {
            dict.solve_into(&spec, &good_x.view(), Some(&View::host(&u0)), out, stream)
        });
        {
            let mut host_u = vec![SENTINEL_F; bm];
            attempt("u on the CPU", "u", &mut |out| {
                let out = LcaOutputs {
                    u: ViewMut::host(&mut host_u),
                    ..out
                };
                dict.solve_into(&spec, &good_x.view(), None, out, stream)
            });
            assert!(host_u.iter().all(|&v| v == SENTINEL_F), "host u written");
        }
    }
    // The same parameter checks as on the CPU.
    let bad_specs: [(&str, LcaSpec, &str); 7] = [
        (
            "lambda 0",
            LcaSpec {
                lambda: 0.0,
                ..spec
            },
            "lambda",
        ),
        (
            "lambda NaN",
            LcaSpec {
                lambda: f32::NAN,
                ..spec
            },
            "lambda",
        ),
        ("eta < 0", LcaSpec { eta: -0.5, ..spec }, "eta"),
        ("eta 1.5", LcaSpec { eta: 1.5, ..spec }, "eta"),
        ("steps 0", LcaSpec { steps: 0, ..spec }, "steps"),
        ("tol -1", LcaSpec { tol: -1.0, ..spec }, "tol"),
        (
            "tol Inf",
            LcaSpec {
                tol: f32::INFINITY,
                ..spec
            },
            "tol",
        ),
    ];
    for (what, bad, name) in bad_specs {
        attempt(what, name, &mut |out| {
            dict.solve_into(&bad, &good_x.view(), Some(&good_u0.view()), out, stream)
        });
    }
    {
        let short = dev.upload(&x[..batch * n - 1]).unwrap();
        attempt("x not a multiple of n", "x", &mut |out| {
            dict.solve_into(&spec, &short.view(), None, out, stream)
        });
        let empty = dev.upload::<f32>(&[]).unwrap();
        attempt("empty x", "x", &mut |out| {
            dict.solve_into(&spec, &empty.view(), None, out, stream)
        });
        let short_u0 = dev.upload(&u0[..bm - 1]).unwrap();
        attempt("u0 too short", "u0", &mut |out| {
            dict.solve_into(&spec, &good_x.view(), Some(&short_u0.view()), out, stream)
        });
        let mut wrong = dev.upload(&vec![SENTINEL_F; bt + 1]).unwrap();
        attempt("energy too long", "energy", &mut |out| {
            let out = LcaOutputs {
                energy: Some(wrong.view_mut()),
                ..out
            };
            dict.solve_into(&spec, &good_x.view(), None, out, stream)
        });
        let mut wrong = dev.upload(&vec![SENTINEL_U; batch + 1]).unwrap();
        attempt("steps too long", "steps", &mut |out| {
            let out = LcaOutputs {
                steps: Some(wrong.view_mut()),
                ..out
            };
            dict.solve_into(&spec, &good_x.view(), None, out, stream)
        });
    }

    // Dictionaries.
    let mut nan_phi = phi.clone();
    nan_phi[5] = f32::NAN;
    errs.extend(expect_invalid(
        "NaN in Φ",
        dictionary(&dev, &nan_phi, n, m, DType::F32),
        "phi",
    ));
    let mut long_col = phi.clone();
    (0..n).for_each(|i| long_col[i * m + 10] *= 1.01);
    errs.extend(expect_invalid(
        "a column of norm 1.01",
        dictionary(&dev, &long_col, n, m, DType::F32),
        "phi",
    ));
    errs.extend(expect_invalid(
        "Φ of the wrong length",
        dictionary(&dev, &phi[1..], n, m, DType::F32),
        "phi",
    ));
    errs.extend(expect_invalid(
        "n = 0",
        dictionary(&dev, &[], 0, m, DType::F32),
        "phi",
    ));
    let relaxed = dev.upload(&long_col).unwrap();
    if let Err(e) = Dictionary::new(
        &relaxed.view(),
        n,
        m,
        DictionaryOptions {
            check_unit_norm: false,
        },
    ) {
        errs.push(format!(
            "check_unit_norm off still rejects a column of norm 1.01: {e}"
        ));
    }

    // Learning: a rejected step leaves Φ and G as they were.
    let mut d = dictionary(&dev, &phi, n, m, DType::F32).unwrap();
    let (phi0, gram0) = (d.phi().unwrap(), d.gram().unwrap());
    let a = vec![0.25f32; bm];
    let mut bad_a = a.clone();
    bad_a[7] = f32::NAN;
    let mut bad_x = x.clone();
    bad_x[1] = f32::INFINITY;
    errs.extend(expect_invalid(
        "learn: NaN in a",
        learn_any(&mut d, DType::F32, &x, &bad_a, 0.1),
        "a",
    ));
    errs.extend(expect_invalid(
        "learn: Inf in x",
        learn_any(&mut d, DType::F32, &bad_x, &a, 0.1),
        "x",
    ));
    errs.extend(expect_invalid(
        "learn: lr -1",
        learn_any(&mut d, DType::F32, &x, &a, -1.0),
        "lr",
    ));
    errs.extend(expect_invalid(
        "learn: lr NaN",
        learn_any(&mut d, DType::F32, &x, &a, f32::NAN),
        "lr",
    ));
    errs.extend(expect_invalid(
        "learn: a too short",
        learn_any(&mut d, DType::F32, &x, &a[1..], 0.1),
        "a",
    ));
    // Mismatched devices (a GPU under test only, as above).
    if dev.kind() != DeviceKind::Cpu {
        let xb = dev.upload(&x).unwrap();
        errs.extend(expect_invalid(
            "learn: a on the CPU",
            d.learn(&xb.view(), &View::host(&a), 0.1, stream),
            "a",
        ));
        let ab = dev.upload(&a).unwrap();
        errs.extend(expect_invalid(
            "learn: x on the CPU",
            d.learn(&View::host(&x), &ab.view(), 0.1, stream),
            "x",
        ));
    }
    let same = |p: &[f32], q: &[f32]| p.iter().zip(q).all(|(a, b)| a.to_bits() == b.to_bits());
    if !same(&d.phi().unwrap(), &phi0) || !same(&d.gram().unwrap(), &gram0) {
        errs.push("a rejected learning step changed Φ or G".into());
    }
    assert_no_failures(errs);
}

// ---------------------------------------------------------------------------------------------
// Devices (these run everywhere: they must not panic or hang without a GPU)
// ---------------------------------------------------------------------------------------------

/// Runs `f` on a thread and fails if it does not return within `secs` (a hung driver call).
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what} did not return within {secs} s")
        }
        Err(e) => panic!("{what} panicked ({e})"),
    }
}

#[test]
fn device_best_does_not_panic() {
    let best = within(120, "Device::best()", Device::best);
    println!("Device::best() = {best:?}");
    let want = if Device::cuda(0).is_ok() {
        DeviceKind::Cuda
    } else if Device::hip(0).is_ok() {
        DeviceKind::Hip
    } else {
        DeviceKind::Cpu
    };
    assert_eq!(
        best.kind(),
        want,
        "best() must pick CUDA, then HIP, then the CPU"
    );
    assert_eq!(best.ordinal(), 0);
}

#[test]
fn out_of_range_ordinals_are_no_device() {
    for (what, r) in [
        ("Device::cuda(99)", Device::cuda(99)),
        ("Device::hip(99)", Device::hip(99)),
    ] {
        match r {
            Err(Error::NoDevice { vendor, reason }) => {
                println!("{what}: NoDevice ({vendor}: {reason})")
            }
            other => panic!("{what}: expected Err(NoDevice), got {other:?}"),
        }
    }
    assert!(matches!(
        Device::open(DeviceKind::Cuda, 99),
        Err(Error::NoDevice { .. })
    ));
    assert!(matches!(
        Device::open(DeviceKind::Cpu, 1),
        Err(Error::InvalidArgument { .. })
    ));
}

/// Without a driver (or without the feature), opening a CUDA device is `Err(NoDevice)` with a
/// reason, promptly and without a panic; with one it is a device. The count agrees, and the C
/// ABI's count is never negative.
#[test]
fn cuda_without_driver_is_no_device_not_a_panic() {
    let r = within(120, "Device::cuda(0)", || {
        Device::cuda(0).map(|d| format!("{d:?}"))
    });
    match &r {
        Ok(d) => println!("Device::cuda(0) = {d}"),
        Err(Error::NoDevice { vendor, reason }) => {
            assert_eq!(*vendor, "CUDA");
            assert!(!reason.is_empty());
            println!(
                "Device::cuda(0): no device ({reason}); feature cuda: {}",
                cfg!(feature = "cuda")
            );
        }
        Err(e) => panic!("Device::cuda(0) must be Ok or Err(NoDevice), got {e:?}"),
    }
    if !cfg!(feature = "cuda") {
        assert!(
            r.is_err(),
            "a build without the `cuda` feature has no CUDA device"
        );
    }
    // A second call gives the same answer (the driver is loaded once).
    assert_eq!(Device::cuda(0).is_ok(), r.is_ok());
    let count = Device::count(DeviceKind::Cuda);
    assert_eq!(
        count > 0,
        r.is_ok(),
        "Device::count(Cuda) = {count} disagrees with Device::cuda(0)"
    );
    assert_eq!(ffi::fep_device_count(ffi::FEP_DEVICE_CUDA), count as i32);
    // Same for HIP.
    let h = within(120, "Device::hip(0)", || {
        Device::hip(0).map(|d| format!("{d:?}"))
    });
    assert!(
        matches!(h, Ok(_) | Err(Error::NoDevice { .. })),
        "Device::hip(0): {h:?}"
    );
    assert_eq!(Device::count(DeviceKind::Hip) > 0, h.is_ok());
    assert!(ffi::fep_device_count(ffi::FEP_DEVICE_HIP) >= 0);
}

// ---------------------------------------------------------------------------------------------
// The C ABI on the GPU, with device pointers
// ---------------------------------------------------------------------------------------------

fn last_error() -> String {
    unsafe { CStr::from_ptr(ffi::fep_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn gpu_c_abi_matches_rust_api_bitwise() {
    let Some(dev) = gpu("gpu_c_abi_matches_rust_api_bitwise") else {
        return;
    };
    if is_emulated(&dev) {
        println!(
            "SKIPPED gpu_c_abi_matches_rust_api_bitwise on the emulated device: {}",
            if "gpu_c_abi_matches_rust_api_bitwise".contains("abi") {
                "the C ABI names real devices only"
            } else {
                "m = 16000 takes hours on host threads (the stepped kernel is covered with FEP_TEST_EMU_SHARED small)"
            }
        );
        return;
    }
    let (kind, ordinal) = (dev.kind().code(), dev.ordinal() as i32);
    let stream = dev.default_stream();
    let raw = stream.as_raw();

    // Device queries.
    assert!(ffi::fep_device_count(kind) >= 1);
    let mut name = [0 as std::ffi::c_char; 256];
    assert_eq!(
        unsafe { ffi::fep_device_name(kind, ordinal, name.as_mut_ptr(), name.len() as u64) },
        ffi::FEP_OK,
        "{}",
        last_error()
    );
    let name = unsafe { CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    assert_eq!(name, dev.name());

    let mut errs = Vec::new();
    for (case, dtype_code) in [
        (
            Case {
                batch: 7,
                n: 33,
                m: 257,
                threshold: Threshold::SoftNonNeg,
                dtype: DType::BF16,
                phi_dtype: DType::BF16,
                steps: 30,
                u0: true,
                tol: true,
                outs: Outs::All,
                seed: 31,
                band: BAND,
            },
            ffi::FEP_DTYPE_BF16,
        ),
        (
            Case {
                batch: 65,
                n: 7,
                m: 65,
                threshold: Threshold::Hard,
                dtype: DType::F32,
                phi_dtype: DType::F32,
                steps: 5,
                u0: false,
                tol: false,
                outs: Outs::EnergyOnly,
                seed: 32,
                band: BAND,
            },
            ffi::FEP_DTYPE_F32,
        ),
        (
            Case {
                batch: 1,
                n: 65,
                m: 1000,
                threshold: Threshold::Soft,
                dtype: DType::F16,
                phi_dtype: DType::F16,
                steps: 20,
                u0: false,
                tol: false,
                outs: Outs::NoSteps,
                seed: 33,
                band: BAND,
            },
            ffi::FEP_DTYPE_F16,
        ),
    ] {
        errs.extend(c_abi_case(&dev, &Problem::new(case), dtype_code, raw));
    }
    // Errors through the C ABI: status, message, untouched outputs.
    {
        let p = Problem::new(Case {
            batch: 3,
            n: 7,
            m: 65,
            threshold: Threshold::Soft,
            dtype: DType::F32,
            phi_dtype: DType::F32,
            steps: 4,
            u0: false,
            tol: false,
            outs: Outs::All,
            seed: 34,
            band: BAND,
        });
        let phi = dev.upload(&p.phi).unwrap();
        let mut h: *mut ffi::FepLcaDict = null_mut();
        let st = unsafe {
            ffi::fep_lca_dict_new(
                kind,
                ordinal,
                raw,
                ffi::FEP_DTYPE_F32,
                phi.addr() as *const c_void,
                7,
                65,
                1,
                &mut h,
            )
        };
        assert_eq!(st, ffi::FEP_OK, "{}", last_error());
        let mut bad = p.x.clone();
        bad[4] = f32::NAN;
        let xb = dev.upload(&bad).unwrap();
        let s = Sentinels::new(&dev, 3 * 65, 3 * 4, 3);
        let params = ffi::FepLcaParams {
            threshold: ffi::FEP_LCA_SOFT,
            lambda: 0.3,
            eta: 0.1,
            steps: 4,
            tol: 0.0,
            tol_mode: ffi::FEP_LCA_TOL_ABSOLUTE,
            allow_tf32: 0,
        };
        let st = unsafe {
            ffi::fep_lca_solve(
                h,
                raw,
                ffi::FEP_DTYPE_F32,
                xb.addr() as *const c_void,
                3,
                &params,
                std::ptr::null(),
                s.u.addr() as *mut f32,
                s.a.addr() as *mut f32,
                s.energy.addr() as *mut f32,
                s.active.addr() as *mut u32,
                s.steps.addr() as *mut u32,
            )
        };
        let msg = last_error();
        if st != ffi::FEP_ERR_INVALID_ARGUMENT || !msg.contains("`x`") {
            errs.push(format!(
                "C ABI: NaN in x gave status {st} and message {msg:?}"
            ));
        }
        dev.synchronize(stream).unwrap();
        if !s.untouched() {
            errs.push("C ABI: a rejected solve wrote its outputs".into());
        }
        let bad_params = ffi::FepLcaParams {
            threshold: 9,
            ..params
        };
        let xb = dev.upload(&p.x).unwrap();
        let st = unsafe {
            ffi::fep_lca_solve(
                h,
                raw,
                ffi::FEP_DTYPE_F32,
                xb.addr() as *const c_void,
                3,
                &bad_params,
                std::ptr::null(),
                s.u.addr() as *mut f32,
                s.a.addr() as *mut f32,
                null_mut(),
                null_mut(),
                null_mut(),
            )
        };
        if st != ffi::FEP_ERR_INVALID_ARGUMENT || !last_error().contains("threshold") {
            errs.push(format!(
                "C ABI: threshold 9 gave status {st} and message {:?}",
                last_error()
            ));
        }
        let st = unsafe {
            ffi::fep_lca_dict_new(
                kind,
                99,
                raw,
                ffi::FEP_DTYPE_F32,
                phi.addr() as *const c_void,
                7,
                65,
                1,
                &mut h,
            )
        };
        // The CPU has one device: ordinal 99 is an invalid argument there, not a missing GPU.
        let want = if dev.kind() == DeviceKind::Cpu {
            ffi::FEP_ERR_INVALID_ARGUMENT
        } else {
            ffi::FEP_ERR_NO_DEVICE
        };
        if st != want {
            errs.push(format!(
                "C ABI: ordinal 99 gave status {st} ({})",
                last_error()
            ));
        }
        unsafe { ffi::fep_lca_dict_free(h) };
    }
    assert_no_failures(errs);
}

/// One problem through the C ABI and through the Rust API on the same GPU: solve outputs, Φ
/// after a learning step, bit for bit.
fn c_abi_case(dev: &Device, p: &Problem, dtype_code: i32, stream: *mut c_void) -> Vec<String> {
    fn typed<T: Element>(
        dev: &Device,
        p: &Problem,
        dtype_code: i32,
        stream: *mut c_void,
    ) -> Vec<String> {
        let mut errs = Vec::new();
        let label = format!("C ABI {}", p.case.label());
        let Case {
            batch, n, m, outs, ..
        } = p.case;
        let (kind, ordinal) = (dev.kind().code(), dev.ordinal() as i32);
        let phi = dev.upload(&to_elem::<T>(&p.phi)).unwrap();
        let x = dev.upload(&to_elem::<T>(&p.x)).unwrap();
        let u0 = p.u0.as_ref().map(|u| dev.upload(u).unwrap());

        let mut h: *mut ffi::FepLcaDict = null_mut();
        let st = unsafe {
            ffi::fep_lca_dict_new(
                kind,
                ordinal,
                stream,
                dtype_code,
                phi.addr() as *const c_void,
                n as u64,
                m as u64,
                1,
                &mut h,
            )
        };
        if st != ffi::FEP_OK {
            return vec![format!("{label}: fep_lca_dict_new: {st} {}", last_error())];
        }
        let (mut cn, mut cm) = (0u64, 0u64);
        assert_eq!(
            unsafe { ffi::fep_lca_dict_shape(h, &mut cn, &mut cm) },
            ffi::FEP_OK
        );
        assert_eq!((cn, cm), (n as u64, m as u64));
        let mut rust = Dictionary::new(&phi.view(), n, m, DictionaryOptions::default()).unwrap();

        // Solve: the C ABI into poisoned buffers, the Rust API via solve_poisoned.
        let (bm, bt) = (batch * m, batch * p.spec.steps as usize);
        let u = dev.upload(&vec![f32::NAN; bm]).unwrap();
        let a = dev.upload(&vec![f32::NAN; bm]).unwrap();
        let energy = outs
            .energy()
            .then(|| dev.upload(&vec![f32::NAN; bt]).unwrap());
        let active = outs
            .active()
            .then(|| dev.upload(&vec![u32::MAX; bt]).unwrap());
        let steps = outs
            .steps()
            .then(|| dev.upload(&vec![u32::MAX; batch]).unwrap());
        let params = ffi::FepLcaParams {
            threshold: p.spec.threshold as i32,
            lambda: p.spec.lambda,
            eta: p.spec.eta,
            steps: p.spec.steps,
            tol: p.spec.tol,
            tol_mode: p.spec.tol_mode as i32,
            allow_tf32: p.spec.allow_tf32 as i32,
        };
        let st = unsafe {
            ffi::fep_lca_solve(
                h,
                stream,
                dtype_code,
                x.addr() as *const c_void,
                batch as u64,
                &params,
                u0.as_ref()
                    .map_or(std::ptr::null(), |b| b.addr() as *const f32),
                u.addr() as *mut f32,
                a.addr() as *mut f32,
                energy.as_ref().map_or(null_mut(), |b| b.addr() as *mut f32),
                active.as_ref().map_or(null_mut(), |b| b.addr() as *mut u32),
                steps.as_ref().map_or(null_mut(), |b| b.addr() as *mut u32),
            )
        };
        if st != ffi::FEP_OK {
            errs.push(format!("{label}: fep_lca_solve: {st} {}", last_error()));
        } else {
            // The work was enqueued on `stream`, the device's default stream, which to_vec waits for.
            let via_c = HostOut {
                u: u.to_vec().unwrap(),
                a: a.to_vec().unwrap(),
                energy: energy.as_ref().map(|b| b.to_vec().unwrap()),
                active: active.as_ref().map(|b| b.to_vec().unwrap()),
                steps: steps.as_ref().map(|b| b.to_vec().unwrap()),
            };
            let via_rust = solve_poisoned(&rust, p).unwrap();
            if !bits_equal(&via_c, &via_rust) {
                errs.push(format!(
                    "{label}: fep_lca_solve and Dictionary::solve_into differ (u err {:e})",
                    rel_err(&via_c.u, &via_rust.u)
                ));
            }
            if via_c.u.iter().any(|v| v.is_nan()) {
                errs.push(format!("{label}: fep_lca_solve left u unwritten"));
            }

            // One learning step on each, from the same codes.
            let st = unsafe {
                ffi::fep_lca_dict_learn(
                    h,
                    stream,
                    dtype_code,
                    x.addr() as *const c_void,
                    a.addr() as *const f32,
                    batch as u64,
                    0.3,
                )
            };
            if st != ffi::FEP_OK {
                errs.push(format!(
                    "{label}: fep_lca_dict_learn: {st} {}",
                    last_error()
                ));
            }
            rust.learn(&x.view(), &a.view(), 0.3, dev.default_stream())
                .unwrap();
            let phi_c = dev.upload(&vec![f32::NAN; n * m]).unwrap();
            let st = unsafe { ffi::fep_lca_dict_phi(h, stream, phi_c.addr() as *mut f32) };
            if st != ffi::FEP_OK {
                errs.push(format!("{label}: fep_lca_dict_phi: {st} {}", last_error()));
            }
            let (pc, pr) = (phi_c.to_vec().unwrap(), rust.phi().unwrap());
            if pc.iter().zip(&pr).any(|(a, b)| a.to_bits() != b.to_bits()) {
                errs.push(format!(
                    "{label}: Φ after fep_lca_dict_learn differs from Dictionary::learn (err {:e})",
                    rel_err(&pc, &pr)
                ));
            }
        }
        unsafe { ffi::fep_lca_dict_free(h) };
        errs
    }
    match p.case.dtype {
        DType::F32 => typed::<f32>(dev, p, dtype_code, stream),
        DType::F16 => typed::<f16>(dev, p, dtype_code, stream),
        DType::BF16 => typed::<bf16>(dev, p, dtype_code, stream),
    }
}

// ---------------------------------------------------------------------------------------------
// The harness itself (no GPU needed)
// ---------------------------------------------------------------------------------------------

/// The matrix reaches every value the test plan names, for every threshold and dtype.
#[test]
fn matrix_covers_every_option() {
    let cases = matrix_cases();
    for th in Threshold::ALL {
        for dt in DTYPES {
            let sub: Vec<&Case> = cases
                .iter()
                .filter(|c| c.threshold == th && c.dtype == dt)
                .collect();
            assert!(!sub.is_empty(), "{th:?} {dt:?} has no case");
        }
        let sub: Vec<&Case> = cases.iter().filter(|c| c.threshold == th).collect();
        for t in [1, 5, 50] {
            assert!(
                sub.iter().any(|c| c.steps == t),
                "{th:?} never runs T = {t}"
            );
        }
        for flag in [false, true] {
            assert!(
                sub.iter().any(|c| c.u0 == flag),
                "{th:?}: u0 = {flag} missing"
            );
            assert!(
                sub.iter().any(|c| c.tol == flag && c.steps > 1),
                "{th:?}: tol = {flag} (T > 1) missing"
            );
            assert!(
                sub.iter()
                    .any(|c| (c.outs.energy() || c.outs.active()) == flag),
                "{th:?}: trace = {flag} missing"
            );
        }
    }
    for o in Outs::ALL {
        assert!(cases.iter().any(|c| c.outs == o), "outputs {o:?} missing");
    }
    for b in [1, 7, 65] {
        assert!(cases.iter().any(|c| c.batch == b), "batch {b} missing");
    }
    for n in [1, 7, 33, 65] {
        assert!(cases.iter().any(|c| c.n == n), "n {n} missing");
    }
    for m in [1, 7, 65, 257, 1000] {
        assert!(cases.iter().any(|c| c.m == m), "m {m} missing");
    }
    assert!(
        cases.iter().any(|c| c.tol && c.steps == 50 && c.u0),
        "tol with T = 50 and u0 missing"
    );
    println!("{} matrix cases", cases.len());
}

/// θ in f32, as kernels/lca/lca.cuh computes it.
fn theta_f32(th: Threshold, u: f32, lambda: f32) -> f32 {
    match th {
        Threshold::Soft => (u.abs() - lambda).max(0.0).copysign(u),
        Threshold::SoftNonNeg => (u - lambda).max(0.0),
        Threshold::Hard if u.abs() > lambda => u,
        Threshold::HardNonNeg if u > lambda => u,
        _ => 0.0,
    }
}

/// What an f32 implementation computes: the kernels' arithmetic (f32 fma chains in their order
/// for b, G and G·a; the update η((b − u) − c); the energy identity), emulated on the host. It
/// stands in for a GPU to show that the tolerances and margins above leave room for f32
/// rounding. Returns the outputs, the largest |u − u_ref| over all steps and units relative to
/// the problem's scale, and the largest |max|Δu| − ref| in units of η·scale.
fn emulate_f32(p: &Problem) -> (HostOut, f64, f64) {
    let Case {
        batch, n, m, outs, ..
    } = p.case;
    let (phi, spec) = (&p.phi, &p.spec);
    let steps = spec.steps as usize;
    let mut g = vec![0f32; m * m];
    for i in 0..m {
        for j in 0..m {
            let dot = (0..n).fold(0f32, |acc, k| phi[k * m + i].mul_add(phi[k * m + j], acc));
            g[i * m + j] = if i == j { dot + -1.0 } else { dot };
        }
    }
    let inhibit = |u: &[f32]| {
        let mut c = vec![0f32; m];
        for (k, &uk) in u.iter().enumerate() {
            let v = theta_f32(spec.threshold, uk, spec.lambda);
            if v != 0.0 {
                c.iter_mut()
                    .zip(&g[k * m..(k + 1) * m])
                    .for_each(|(cj, &gkj)| *cj = gkj.mul_add(v, *cj));
            }
        }
        c
    };
    let phi64: Vec<f64> = phi.iter().map(|&v| v as f64).collect();
    let mut out = HostOut {
        u: vec![0.0; batch * m],
        a: vec![0.0; batch * m],
        energy: Some(vec![0.0; batch * steps]),
        active: Some(vec![0; batch * steps]),
        steps: Some(vec![0; batch]),
    };
    let (mut udev, mut dudev) = (0f64, 0f64);
    for s in 0..batch {
        let x = &p.x[s * n..(s + 1) * n];
        let b: Vec<f32> = (0..m)
            .map(|j| (0..n).fold(0f32, |acc, k| x[k].mul_add(phi[k * m + j], acc)))
            .collect();
        let xsq = x.iter().fold(0f32, |acc, &v| v.mul_add(v, acc));
        let u0 = p.u0.as_ref().map(|u0| &u0[s * m..(s + 1) * m]);
        // The f64 trajectory, step by step, to measure how far f32 drifts from it.
        let mut reference: Vec<(Vec<f64>, f64)> = Vec::new();
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        trajectory(&phi64, n, m, &x64, u0, spec, |t, u, d| {
            if t >= 0 {
                reference.push((u.to_vec(), d));
            }
        });
        let mut u: Vec<f32> = u0.map_or(vec![0.0; m], |u0| u0.to_vec());
        let mut c = inhibit(&u);
        let mut taken = spec.steps;
        for t in 0..steps {
            let mut maxdu = 0f32;
            for j in 0..m {
                let du = spec.eta * ((b[j] - u[j]) - c[j]);
                u[j] += du;
                maxdu = maxdu.max(du.abs());
            }
            c = inhibit(&u);
            if let Some((ru, rd)) = reference.get(t) {
                udev = u
                    .iter()
                    .zip(ru)
                    .fold(udev, |d, (&v, &r)| d.max((v as f64 - r).abs() / p.scale));
                dudev = dudev.max((maxdu as f64 - rd).abs() / (spec.eta as f64 * p.scale));
            }
            let (mut ab, mut ac, mut aa, mut l1, mut count) = (0f32, 0f32, 0f32, 0f32, 0u32);
            for j in 0..m {
                let a = theta_f32(spec.threshold, u[j], spec.lambda);
                ab = a.mul_add(b[j], ab);
                ac = a.mul_add(c[j], ac);
                aa = a.mul_add(a, aa);
                l1 += a.abs();
                count += (a != 0.0) as u32;
            }
            let e = 0.5 * xsq - ab + 0.5 * ac + 0.5 * aa + spec.lambda * l1;
            let stop = spec.tol > 0.0 && maxdu < spec.tol;
            let last = if stop { steps } else { t + 1 };
            out.energy.as_mut().unwrap()[s * steps + t..s * steps + last].fill(e);
            out.active.as_mut().unwrap()[s * steps + t..s * steps + last].fill(count);
            if stop {
                taken = t as u32 + 1;
                break;
            }
        }
        out.steps.as_mut().unwrap()[s] = taken;
        out.u[s * m..(s + 1) * m].copy_from_slice(&u);
        for (a, &v) in out.a[s * m..(s + 1) * m].iter_mut().zip(&u) {
            *a = theta_f32(spec.threshold, v, spec.lambda);
        }
    }
    out.energy = out.energy.filter(|_| outs.energy());
    out.active = out.active.filter(|_| outs.active());
    out.steps = out.steps.filter(|_| outs.steps());
    (out, udev, dudev)
}

/// The harness itself, on any machine: for every case the setup must find its margins, the
/// library's CPU reference (through the same poisoned-buffer plumbing as the GPU) must agree
/// with the harness's own f64 trajectory, and an f32 emulation of the kernels must pass every
/// comparison, with its drift at least 10× inside the margins. The stepped cases are only set up
/// (their 16000² G is for the GPU suite to build).
#[test]
fn harness_self_check_with_an_f32_emulation() {
    let cpu = Device::reference();
    let mut cases = matrix_cases();
    cases.push(large_batch_case());
    let mut errs = Vec::new();
    let (mut worst_u, mut worst_du) = (0f64, 0f64);
    let (mut worst_eu, mut worst_ea, mut worst_ee) = (0f64, 0f64, 0f64);
    for case in cases {
        let p = Problem::new(case);
        let dict = dictionary(&cpu, &p.phi, case.n, case.m, case.phi_dtype).unwrap();
        let want = solve_poisoned(&dict, &p).unwrap();
        errs.extend(check_reference(&p, &want));
        let (emu, udev, dudev) = emulate_f32(&p);
        let case_errs = compare(&p, &emu, &want);
        let (eu, ea) = (rel_err(&emu.u, &want.u), rel_err(&emu.a, &want.a));
        let ee = match (&emu.energy, &want.energy) {
            (Some(g), Some(w)) => rel_err(g, w),
            _ => 0.0,
        };
        println!(
            "{} {}: f32 emulation u {eu:.1e} a {ea:.1e} energy {ee:.1e}; drift u {udev:.1e} Δu {dudev:.1e}; margins λ {:.1e} tol {:.1e}",
            if case_errs.is_empty() { "ok  " } else { "FAIL" },
            case.label(),
            p.lambda_margin,
            p.tol_margin
        );
        errs.extend(case_errs);
        let hard = matches!(case.threshold, Threshold::Hard | Threshold::HardNonNeg);
        if 10.0 * udev > NEAR || (hard && 10.0 * udev > p.lambda_margin) {
            errs.push(format!(
                "{}: f32 drift {udev:e} of u is not 10x inside the margins",
                case.label()
            ));
        }
        if case.tol && 10.0 * dudev > p.tol_margin {
            errs.push(format!(
                "{}: f32 drift {dudev:e} of max |Δu| is not 10x inside the tol margin {:e}",
                case.label(),
                p.tol_margin
            ));
        }
        (worst_u, worst_du) = (worst_u.max(udev), worst_du.max(dudev));
        (worst_eu, worst_ea, worst_ee) = (worst_eu.max(eu), worst_ea.max(ea), worst_ee.max(ee));
    }
    println!(
        "worst f32 emulation errors: u {worst_eu:.1e} (tol {U_TOL:e}), a {worst_ea:.1e} (tol {A_TOL:e}), energy {worst_ee:.1e} (tol {ENERGY_TOL:e}); drift u {worst_u:.1e} (NEAR {NEAR:e}, LAMBDA_MARGIN {LAMBDA_MARGIN:e}), Δu {worst_du:.1e} (TOL_MARGIN {TOL_MARGIN:e})"
    );
    for case in stepped_cases() {
        let p = Problem::new(case);
        let active: Vec<usize> = p
            .traj_u
            .chunks(case.m)
            .map(|u| {
                u.iter()
                    .filter(|&&v| case.threshold.apply(v, p.spec.lambda as f64) != 0.0)
                    .count()
            })
            .collect();
        println!(
            "setup {}: λ={} tol={:e} margins λ {:.1e} tol {:.1e}; final active {active:?} of {}; steps {:?}",
            case.label(),
            p.spec.lambda,
            p.spec.tol,
            p.lambda_margin,
            p.tol_margin,
            case.m,
            p.traj_steps
        );
    }
    assert_no_failures(errs);
}

// ---------------------------------------------------------------------------------------------
// λmax, the automatic step and the relative tolerance on the GPU
// ---------------------------------------------------------------------------------------------

/// Codes, u and steps of `x` (f32) on `dict` with `spec`, poisoned outputs, on the host.
fn solve_f32(dict: &Dictionary, spec: &LcaSpec, x: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
    let dev = dict.device().clone();
    let xb = dev.upload(x).unwrap();
    let batch = x.len() / dict.n();
    let bm = batch * dict.m();
    let mut u = dev.upload(&vec![f32::NAN; bm]).unwrap();
    let mut a = dev.upload(&vec![f32::NAN; bm]).unwrap();
    let mut s = dev.upload(&vec![u32::MAX; batch]).unwrap();
    let out = LcaOutputs {
        u: u.view_mut(),
        a: a.view_mut(),
        energy: None,
        active: None,
        steps: Some(s.view_mut()),
    };
    dict.solve_into(spec, &xb.view(), None, out, dev.default_stream())
        .unwrap();
    (
        u.to_vec().unwrap(),
        a.to_vec().unwrap(),
        s.to_vec().unwrap(),
    )
}

/// λmax of a GPU dictionary (computed from its f32 Φ) equals the CPU dictionary's (from its f64
/// Gram matrix of the same f32 Φ), and so does the automatic step; the default (automatic) η
/// gives the CPU's codes; m = 80 runs the stepped kernel with 2 KiB of shared memory and the
/// persistent one with 64 KiB.
#[test]
fn gpu_lambda_max_and_auto_eta_match_cpu() {
    let Some(dev) = gpu("gpu_lambda_max_and_auto_eta_match_cpu") else {
        return;
    };
    for (seed, n, m) in [(1u64, 7usize, 5usize), (2, 24, 80), (3, 33, 65)] {
        let mut r = rng(seed);
        let phi = unit_dictionary(&mut r, n, m);
        let cpu = Dictionary::new(
            &View::host_on(&Device::reference(), &phi).unwrap(),
            n,
            m,
            DictionaryOptions::default(),
        )
        .unwrap();
        let up = dev.upload(&phi).unwrap();
        let g = Dictionary::new(&up.view(), n, m, DictionaryOptions::default()).unwrap();
        let (lc, lg) = (cpu.lambda_max().unwrap(), g.lambda_max().unwrap());
        assert!(
            (lc - lg).abs() <= 1e-9 * lc,
            "[{n}, {m}]: lambda_max CPU {lc}, GPU {lg}"
        );
        let (ec, eg) = (cpu.auto_eta().unwrap(), g.auto_eta().unwrap());
        assert!(
            (ec - eg).abs() <= f32::EPSILON * ec,
            "auto eta CPU {ec}, GPU {eg}"
        );
        let x = randn(&mut r, 3 * n, 1.0);
        let spec = LcaSpec::new(0.2).steps(40);
        let (uc, ac, sc) = solve_f32(&cpu, &spec, &x);
        let (ug, ag, sg) = solve_f32(&g, &spec.eta(ec), &x);
        assert_eq!(sc, sg);
        let (eu, ea) = (rel_err(&ug, &uc), rel_err(&ag, &ac));
        assert!(
            eu < 1e-4 && ea < 1e-4,
            "[{n}, {m}] auto eta: u {eu:e}, a {ea:e}"
        );
        // the GPU's own automatic step is the one it reports
        let (ug2, _, _) = solve_f32(&g, &spec, &x);
        assert_eq!(ug2, solve_f32(&g, &spec.eta(eg), &x).0);
    }
}

/// The relative stop on the GPU: x and 1024·x (with λ·1024: an exact power-of-two scaling, so
/// every f32 operation scales exactly) stop at the same step with codes scaled bit for bit;
/// with an absolute tol they do not. The steps agree with the CPU reference to within one (the
/// stop decision compares an f32 max |Δu| with the limit), the codes within 1e-4.
#[test]
fn gpu_relative_tol_is_scale_invariant_and_matches_cpu() {
    let Some(dev) = gpu("gpu_relative_tol_is_scale_invariant_and_matches_cpu") else {
        return;
    };
    let (n, m, batch) = (24usize, 80usize, 5usize);
    let mut r = rng(11);
    let phi = unit_dictionary(&mut r, n, m);
    let up = dev.upload(&phi).unwrap();
    let g = Dictionary::new(&up.view(), n, m, DictionaryOptions::default()).unwrap();
    let cpu = Dictionary::new(
        &View::host_on(&Device::reference(), &phi).unwrap(),
        n,
        m,
        DictionaryOptions::default(),
    )
    .unwrap();
    let mut x = randn(&mut r, batch * n, 1.0);
    x[n..2 * n].iter_mut().for_each(|v| *v = 0.0); // a zero sample: stops at step 1
    let scale = 1024.0f32;
    let xs: Vec<f32> = x.iter().map(|v| v * scale).collect();
    let (lambda, steps, tol) = (0.15f32, 4000u32, 1e-4f32);
    let eta = g.auto_eta().unwrap();
    let rel = LcaSpec::new(lambda).eta(eta).steps(steps).relative_tol(tol);
    let rel_big = LcaSpec::new(lambda * scale)
        .eta(eta)
        .steps(steps)
        .relative_tol(tol);
    let (_, a1, s1) = solve_f32(&g, &rel, &x);
    let (_, a2, s2) = solve_f32(&g, &rel_big, &xs);
    assert_eq!(s1, s2, "relative tol: steps differ between x and 1024 x");
    assert_eq!(s1[1], 1, "the zero sample should stop at step 1");
    assert!(s1.iter().all(|&t| t < steps), "{s1:?}");
    let scaled: Vec<f32> = a1.iter().map(|v| v * scale).collect();
    assert_eq!(
        a2, scaled,
        "relative tol: codes of 1024 x are not 1024 x the codes"
    );
    let (_, ac, sc) = solve_f32(&cpu, &rel, &x);
    for (s, (&tg, &tc)) in s1.iter().zip(&sc).enumerate() {
        assert!(
            tg.abs_diff(tc) <= 1,
            "sample {s}: GPU stopped at {tg}, CPU at {tc}"
        );
    }
    let e = rel_err(&a1, &ac);
    assert!(
        e < 1e-4,
        "relative tol: GPU codes differ from the CPU's by {e:e}"
    );
    let abs = LcaSpec::new(lambda).eta(eta).steps(steps).tol(tol);
    let abs_big = LcaSpec::new(lambda * scale).eta(eta).steps(steps).tol(tol);
    let (_, _, t1) = solve_f32(&g, &abs, &x);
    let (_, _, t2) = solve_f32(&g, &abs_big, &xs);
    assert_ne!(t1, t2, "absolute tol: the same steps for x and 1024 x?");
    // allow_tf32 is a permission the LCA kernels do not use: bitwise the same
    let (u3, a3, s3) = solve_f32(&g, &rel.allow_tf32(true), &x);
    let (u4, a4, s4) = solve_f32(&g, &rel, &x);
    assert!(u3 == u4 && a3 == a4 && s3 == s4);
}
