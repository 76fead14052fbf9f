//! The CPU reference of LCA sparse coding (DESIGN.md §4.3, §6): LASSO optimality, the
//! scikit-learn fixtures, each threshold, the trace, per-sample early stop, warm starts, f16/bf16
//! inputs, dictionary learning, bad input and the C ABI, all on `Device::reference()`.

mod common;

use std::ffi::CStr;
use std::ptr::{null, null_mut};

use common::*;
use fep_kernels::lca::{Dictionary, DictionaryOptions, LcaOutputs, LcaSpec, Threshold, TolMode};
use fep_kernels::{Device, Element, Error, View, bf16, f16};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Everything a solve returns, on the host.
#[derive(Debug, Clone, PartialEq)]
struct Out {
    u: Vec<f32>,
    a: Vec<f32>,
    energy: Option<Vec<f32>>,
    active: Option<Vec<u32>>,
    steps: Vec<u32>,
}

fn dict<T: Element>(phi: &[T], n: usize, m: usize) -> Dictionary {
    Dictionary::new(&common::host(phi), n, m, DictionaryOptions::default())
        .expect("valid dictionary")
}

fn solve<T: Element>(d: &Dictionary, spec: &LcaSpec, x: &[T], u0: Option<&[f32]>) -> Out {
    let u0v = u0.map(View::host);
    let r = d
        .solve(spec, &common::host(x), u0v.as_ref())
        .expect("valid solve");
    assert_eq!(r.u.device(), &Device::reference());
    Out {
        u: r.u.to_vec().unwrap(),
        a: r.a.to_vec().unwrap(),
        energy: r.energy.as_ref().map(|b| b.to_vec().unwrap()),
        active: r.active.as_ref().map(|b| b.to_vec().unwrap()),
        steps: r.steps.to_vec().unwrap(),
    }
}

/// Φᵀ(x − Φa) for one sample, in f64.
fn correlations(phi: &[f32], n: usize, m: usize, x: &[f32], a: &[f32]) -> Vec<f64> {
    let r: Vec<f64> = (0..n)
        .map(|i| {
            x[i] as f64
                - (0..m)
                    .map(|k| phi[i * m + k] as f64 * a[k] as f64)
                    .sum::<f64>()
        })
        .collect();
    (0..m)
        .map(|j| (0..n).map(|i| phi[i * m + j] as f64 * r[i]).sum())
        .collect()
}

/// ½‖x − Φa‖² + λ‖a‖₁ for one sample, in f64.
fn objective<P: Copy + Into<f64>, X: Copy + Into<f64>>(
    phi: &[P],
    n: usize,
    m: usize,
    x: &[X],
    a: &[f32],
    lambda: f64,
) -> f64 {
    let mut sq = 0.0;
    for i in 0..n {
        let recon: f64 = (0..m).map(|k| phi[i * m + k].into() * a[k] as f64).sum();
        sq += (x[i].into() - recon).powi(2);
    }
    0.5 * sq + lambda * a.iter().map(|&v| (v as f64).abs()).sum::<f64>()
}

/// The largest eigenvalue of ΦᵀΦ (= of ΦΦᵀ) by power iteration, in f64.
fn gram_max_eig(phi: &[f32], n: usize, m: usize) -> f64 {
    let mut v = vec![1.0f64; m];
    let mut lam = 0.0;
    for _ in 0..500 {
        let pv: Vec<f64> = (0..n)
            .map(|i| (0..m).map(|k| phi[i * m + k] as f64 * v[k]).sum())
            .collect();
        let w: Vec<f64> = (0..m)
            .map(|j| (0..n).map(|i| phi[i * m + j] as f64 * pv[i]).sum())
            .collect();
        let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
        lam = norm / v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v = w.iter().map(|x| x / norm).collect();
    }
    lam
}

fn nnz(a: &[f32]) -> usize {
    a.iter().filter(|&&v| v != 0.0).count()
}

#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(r: Result<T, Error>, want: &str) {
    match r {
        Err(Error::InvalidArgument { name, reason }) => {
            assert_eq!(name, want, "wrong argument named (reason: {reason})");
            assert!(!reason.is_empty());
        }
        other => panic!("expected InvalidArgument `{want}`, got {other:?}"),
    }
}

/// A random problem: unit-norm Φ `[n, m]` and `batch` noisy sparse signals.
fn problem(
    seed: u64,
    n: usize,
    m: usize,
    batch: usize,
    k: usize,
    nonneg: bool,
) -> (Vec<f32>, Vec<f32>) {
    let mut r = rng(seed);
    let phi = unit_dictionary(&mut r, n, m);
    let (x, _) = sparse_signals(&mut r, &phi, n, m, batch, k, 0.05, nonneg);
    (phi, x)
}

// ---------------------------------------------------------------------------------------------
// 1. LASSO optimality
// ---------------------------------------------------------------------------------------------

fn check_kkt(threshold: Threshold, seed: u64) {
    let (n, m, batch) = (20, 40, 3);
    let (phi, x) = problem(seed, n, m, batch, 4, threshold == Threshold::SoftNonNeg);
    let eta = 0.2f32;
    let lmax = gram_max_eig(&phi, n, m);
    assert!(
        (eta as f64) < 0.95 * 2.0 / lmax,
        "eta {eta} is not safely below 2/lambda_max = {}",
        2.0 / lmax
    );
    let spec = LcaSpec::new(0.1)
        .eta(eta)
        .steps(20000)
        .tol(1e-12)
        .threshold(threshold);
    let lambda = spec.lambda as f64;
    let out = solve(&dict(&phi, n, m), &spec, &x, None);
    for b in 0..batch {
        assert!(
            out.steps[b] < 20000,
            "sample {b} did not converge ({:?} steps)",
            out.steps
        );
        let a = &out.a[b * m..(b + 1) * m];
        let g = correlations(&phi, n, m, &x[b * n..(b + 1) * n], a);
        let on = nnz(a);
        assert!(
            on >= 2 && on < m,
            "sample {b}: {on} nonzeros makes a vacuous check"
        );
        for j in 0..m {
            match (threshold, a[j] != 0.0) {
                (Threshold::Soft, true) => {
                    let s = (a[j] as f64).signum();
                    assert!(
                        (g[j] - lambda * s).abs() <= 1e-6,
                        "soft sample {b} atom {j} on support: g = {}, a = {}",
                        g[j],
                        a[j]
                    );
                }
                (Threshold::Soft, false) => assert!(
                    g[j].abs() <= lambda + 1e-6,
                    "soft sample {b} atom {j} off support: |g| = {}",
                    g[j]
                ),
                (Threshold::SoftNonNeg, true) => {
                    assert!(a[j] > 0.0, "non-negative code has a[{j}] = {}", a[j]);
                    assert!(
                        (g[j] - lambda).abs() <= 1e-6,
                        "nonneg sample {b} atom {j} on support: g = {}",
                        g[j]
                    );
                }
                (Threshold::SoftNonNeg, false) => assert!(
                    g[j] <= lambda + 1e-6,
                    "nonneg sample {b} atom {j} off support: g = {}",
                    g[j]
                ),
                _ => unreachable!(),
            }
        }
    }
}

#[test]
fn soft_threshold_fixed_point_is_the_lasso_minimiser() {
    check_kkt(Threshold::Soft, 11);
    check_kkt(Threshold::Soft, 12);
}

#[test]
fn soft_nonneg_fixed_point_is_the_nonneg_lasso_minimiser() {
    check_kkt(Threshold::SoftNonNeg, 13);
    check_kkt(Threshold::SoftNonNeg, 14);
}

// ---------------------------------------------------------------------------------------------
// 2. scikit-learn fixtures
// ---------------------------------------------------------------------------------------------

#[test]
fn matches_scikit_learn_lasso() {
    let fx = load_fixture("lca_sklearn.json");
    let version = fx["sklearn_version"].as_str().expect("sklearn_version");
    println!(
        "scikit-learn {version} (numpy {}) fixtures",
        fx["numpy_version"].as_str().unwrap_or("?")
    );
    let problems = fx["problems"].as_array().expect("problems");
    assert!(problems.len() >= 4);
    let eta = 0.2f32;
    let max_steps = 100_000;
    for p in problems {
        let name = p["name"].as_str().unwrap();
        let (n, m, batch) = (
            json_usize(p, "n"),
            json_usize(p, "m"),
            json_usize(p, "batch"),
        );
        let lambda = p["lambda"].as_f64().unwrap();
        let positive = p["positive"].as_bool().unwrap();
        let (x64, phi64, a_ref, obj_ref) = (
            json_f64s(p, "x"),
            json_f64s(p, "phi"),
            json_f64s(p, "a"),
            json_f64s(p, "objective"),
        );
        assert_eq!(
            (x64.len(), phi64.len(), a_ref.len(), obj_ref.len()),
            (batch * n, n * m, batch * m, batch),
            "{name}: sizes"
        );
        let gmax = p["gram_max_eig"].as_f64().unwrap();
        assert!(
            (eta as f64) < 2.0 / gmax,
            "{name}: eta {eta} unstable for lambda_max {gmax}"
        );

        let phi: Vec<f32> = phi64.iter().map(|&v| v as f32).collect();
        let x: Vec<f32> = x64.iter().map(|&v| v as f32).collect();
        let threshold = if positive {
            Threshold::SoftNonNeg
        } else {
            Threshold::Soft
        };
        let spec = LcaSpec::new(lambda as f32)
            .eta(eta)
            .steps(max_steps)
            .tol(1e-10)
            .threshold(threshold);
        let out = solve(&dict(&phi, n, m), &spec, &x, None);

        let mut worst_a = 0.0f64;
        let mut worst_obj = 0.0f64;
        for b in 0..batch {
            assert!(
                out.steps[b] < max_steps,
                "{name} sample {b}: no convergence in {max_steps} steps"
            );
            let a = &out.a[b * m..(b + 1) * m];
            let ar = &a_ref[b * m..(b + 1) * m];
            let diff = max_abs_diff(a, ar);
            worst_a = worst_a.max(diff);
            // Our inputs are the f64 fixture rounded to f32 (relative 6e-8), which moves the
            // minimiser by about 6e-8·‖a‖ / (smallest eigenvalue of Φ_SᵀΦ_S ≥ 0.045), and the
            // stop at tol 1e-10 leaves about tol / (η · 0.045) ≈ 1e-8: measured ≤ 7e-8, so 1e-6
            // has a wide margin. A wrong sign or a missing term is off by > 1e-2.
            assert!(
                diff <= 1e-6,
                "{name} sample {b}: max |a - a_sklearn| = {diff:e}\n ours {a:?}\n sklearn {ar:?}"
            );
            for j in 0..m {
                if ar[j].abs() > 1e-4 {
                    assert_eq!(
                        (a[j] as f64).signum(),
                        ar[j].signum(),
                        "{name} sample {b} atom {j}: sign"
                    );
                }
            }
            // Evaluated on the f64 problem, the objective is flat to first order at the
            // minimiser (KKT), so a code off by δ ≈ 1e-7 changes it by O(δ²): measured ≤ 2e-14
            // relative. 1e-9 still catches a code off by ~1e-4.
            let obj = objective(&phi64, n, m, &x64[b * n..(b + 1) * n], a, lambda);
            let rel = (obj - obj_ref[b]).abs() / obj_ref[b];
            worst_obj = worst_obj.max(rel);
            assert!(
                rel <= 1e-9,
                "{name} sample {b}: objective {obj} vs sklearn {} (relative {rel:e})",
                obj_ref[b]
            );
        }
        println!(
            "{name}: steps {:?}, max |a - a_sklearn| {worst_a:.2e}, objective rel. diff {worst_obj:.2e}",
            out.steps
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Each threshold on hand-computable cases
// ---------------------------------------------------------------------------------------------

#[test]
fn thresholds_with_identity_dictionary() {
    // Φ = I: b = x, G = 0, so u ← u + η(x − u). With η = 1 one step gives u = x exactly and
    // a = θ(x) exactly.
    let n = 6;
    let mut phi = vec![0f32; n * n];
    (0..n).for_each(|i| phi[i * n + i] = 1.0);
    let d = dict(&phi, n, n);
    assert!(d.gram().unwrap().iter().all(|&g| g == 0.0));
    let above = f32::from_bits(0.5f32.to_bits() + 1); // the next float above λ = 0.5
    #[rustfmt::skip]
    let x = [
        0.75f32, -0.75, 0.5, -0.5, 0.25, -0.25,
        0.0, 2.0, -2.0, above, -above, 0.4999,
    ];
    let tiny = above - 0.5; // exact in f32 and f64
    #[rustfmt::skip]
    let want: [(Threshold, [f32; 12]); 4] = [
        (Threshold::Soft, [0.25, -0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 1.5, -1.5, tiny, -tiny, 0.0]),
        (Threshold::SoftNonNeg, [0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.5, 0.0, tiny, 0.0, 0.0]),
        (Threshold::Hard, [0.75, -0.75, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, -2.0, above, -above, 0.0]),
        (Threshold::HardNonNeg, [0.75, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, above, 0.0, 0.0]),
    ];
    for (t, expect) in want {
        // exact, one step
        let spec = LcaSpec::new(0.5).eta(1.0).steps(1).threshold(t).trace(true);
        let out = solve(&d, &spec, &x, None);
        assert_eq!(out.u, x, "{t:?}: u after one step with eta = 1");
        assert_eq!(out.a, expect, "{t:?}: a = theta(x)");
        assert_eq!(out.steps, vec![1, 1]);
        let active = out.active.unwrap();
        assert_eq!(
            active,
            vec![nnz(&expect[..n]) as u32, nnz(&expect[n..]) as u32],
            "{t:?}: active counts"
        );
        // Energy for Φ = I: ½‖x − a‖² + λ‖a‖₁.
        let energy = out.energy.unwrap();
        for b in 0..2 {
            let e = objective(
                &phi,
                n,
                n,
                &x[b * n..(b + 1) * n],
                &expect[b * n..(b + 1) * n],
                0.5,
            );
            assert!(
                (energy[b] as f64 - e).abs() <= 1e-6 * e.max(1.0),
                "{t:?} sample {b}: energy {} vs {e}",
                energy[b]
            );
        }
        // converging with a small step: u → x from below in magnitude, a → θ(x)
        let spec = LcaSpec::new(0.5).eta(0.25).steps(300).threshold(t);
        let out = solve(&d, &spec, &x, None);
        assert!(max_abs_diff(&out.u, &x) <= 1e-6, "{t:?}: u {:?}", out.u);
        assert!(
            max_abs_diff(&out.a, &expect) <= 1e-6,
            "{t:?}: a {:?} vs {expect:?}",
            out.a
        );
    }
}

#[test]
fn thresholds_with_inhibition() {
    // Atoms e₁ and (e₁ + e₂)/√2, x = (3, 0), λ = 1: b = (3, 3c), G₁₂ = c = 1/√2.
    // Soft: fixed point a = (2, 0), u = (3, 3c − 2c) = (3, c) (c < λ keeps atom 2 off).
    // Hard: a = (3, 0), u = (3, 3c − 3c) = (3, 0), the only consistent fixed point.
    let c = std::f32::consts::FRAC_1_SQRT_2;
    let phi = [1.0f32, c, 0.0, c];
    let d = dict(&phi, 2, 2);
    let g = d.gram().unwrap();
    assert!(
        (g[1] - c).abs() < 1e-7
            && (g[2] - c).abs() < 1e-7
            && g[0].abs() < 1e-7
            && g[3].abs() < 1e-7,
        "G = {g:?}"
    );
    let x = [3.0f32, 0.0];
    let cases = [
        (Threshold::Soft, [2.0f32, 0.0], [3.0f32, c]),
        (Threshold::SoftNonNeg, [2.0, 0.0], [3.0, c]),
        (Threshold::Hard, [3.0, 0.0], [3.0, 0.0]),
        (Threshold::HardNonNeg, [3.0, 0.0], [3.0, 0.0]),
    ];
    for (t, a_want, u_want) in cases {
        let spec = LcaSpec::new(1.0)
            .eta(0.1)
            .steps(5000)
            .tol(1e-9)
            .threshold(t);
        let out = solve(&d, &spec, &x, None);
        assert!(out.steps[0] < 5000, "{t:?}: no convergence");
        assert!(
            max_abs_diff(&out.a, &a_want) <= 1e-5,
            "{t:?}: a = {:?}, want {a_want:?}",
            out.a
        );
        assert_eq!(out.a[1], 0.0, "{t:?}: atom 2 must be exactly off");
        assert!(
            max_abs_diff(&out.u, &u_want) <= 1e-5,
            "{t:?}: u = {:?}, want {u_want:?}",
            out.u
        );
    }
    // Negated input: the signed thresholds mirror, the non-negative ones code nothing.
    let x = [-3.0f32, 0.0];
    for (t, a_want) in [
        (Threshold::Soft, [-2.0f32, 0.0]),
        (Threshold::Hard, [-3.0, 0.0]),
        (Threshold::SoftNonNeg, [0.0, 0.0]),
        (Threshold::HardNonNeg, [0.0, 0.0]),
    ] {
        let spec = LcaSpec::new(1.0)
            .eta(0.1)
            .steps(5000)
            .tol(1e-9)
            .threshold(t);
        let out = solve(&d, &spec, &x, None);
        assert!(
            max_abs_diff(&out.a, &a_want) <= 1e-5,
            "{t:?} on -x: a = {:?}, want {a_want:?}",
            out.a
        );
        if a_want[0] == 0.0 {
            // nothing active: u → b = (−3, −3c)
            assert!(
                max_abs_diff(&out.u, &[-3.0, -3.0 * c]) <= 1e-5,
                "{t:?} on -x: u = {:?}",
                out.u
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. The trace
// ---------------------------------------------------------------------------------------------

#[test]
fn trace_energy_active_and_steps() {
    let (n, m, batch) = (24, 48, 2);
    let (phi, x) = problem(21, n, m, batch, 4, false);
    let d = dict(&phi, n, m);
    let lambda = 0.1f32;
    let big_t = 400usize;
    let spec = LcaSpec::new(lambda)
        .eta(0.05)
        .steps(big_t as u32)
        .trace(true);
    let out = solve(&d, &spec, &x, None);
    assert_eq!(
        out.steps,
        vec![big_t as u32; batch],
        "tol = 0 runs all T steps"
    );
    let (energy, active) = (out.energy.clone().unwrap(), out.active.clone().unwrap());
    assert_eq!((energy.len(), active.len()), (batch * big_t, batch * big_t));
    for b in 0..batch {
        let (xb, ab) = (&x[b * n..(b + 1) * n], &out.a[b * m..(b + 1) * m]);
        let e = &energy[b * big_t..(b + 1) * big_t];
        // first entry: after one step from u = 0, u = ηb and a = θ(ηb)
        let b_vec: Vec<f64> = (0..m)
            .map(|j| (0..n).map(|i| phi[i * m + j] as f64 * xb[i] as f64).sum())
            .collect();
        let a1: Vec<f32> = b_vec
            .iter()
            .map(|&v| Threshold::Soft.apply(0.05f32 as f64 * v, lambda as f64) as f32)
            .collect();
        let e1 = objective(&phi, n, m, xb, &a1, lambda as f64);
        assert!(
            (e[0] as f64 - e1).abs() <= 1e-6 * e1,
            "sample {b}: energy[0] = {} vs {e1}",
            e[0]
        );
        assert_eq!(active[b * big_t], nnz(&a1) as u32, "sample {b}: active[0]");
        // last entry: the energy of the final code
        let e_final = objective(&phi, n, m, xb, ab, lambda as f64);
        assert!(
            (e[big_t - 1] as f64 - e_final).abs() <= 2e-6 * e_final,
            "sample {b}: energy[T-1] = {} vs {e_final}",
            e[big_t - 1]
        );
        assert_eq!(
            active[b * big_t + big_t - 1],
            nnz(ab) as u32,
            "sample {b}: active[T-1]"
        );
        // non-increasing (to f32 roundoff) and really decreasing
        for t in 1..big_t {
            assert!(
                e[t] <= e[t - 1] + 1e-6 * e[0],
                "sample {b}: energy rises at step {t}: {} -> {}",
                e[t - 1],
                e[t]
            );
        }
        let e0 = 0.5 * xb.iter().map(|&v| (v as f64).powi(2)).sum::<f64>();
        assert!(
            (e[big_t - 1] as f64) < 0.5 * e0,
            "sample {b}: energy {} barely below ½‖x‖² = {e0}",
            e[big_t - 1]
        );
    }
    // The trace changes nothing else.
    let plain = solve(&d, &spec.trace(false), &x, None);
    assert_eq!(
        (plain.u, plain.a, plain.steps),
        (out.u.clone(), out.a.clone(), out.steps.clone())
    );
    assert!(plain.energy.is_none() && plain.active.is_none());

    // Early stop: the trace stops changing at `steps` and repeats its last values.
    let big_t = 5000usize;
    let full = solve(
        &d,
        &LcaSpec::new(lambda)
            .eta(0.05)
            .steps(big_t as u32)
            .trace(true),
        &x,
        None,
    );
    let early = solve(
        &d,
        &LcaSpec::new(lambda)
            .eta(0.05)
            .steps(big_t as u32)
            .tol(1e-5)
            .trace(true),
        &x,
        None,
    );
    let (fe, fa) = (full.energy.unwrap(), full.active.unwrap());
    let (ee, ea) = (early.energy.unwrap(), early.active.unwrap());
    for b in 0..batch {
        let s = early.steps[b] as usize;
        assert!(
            s > 10 && s < big_t,
            "sample {b}: early stop after {s} of {big_t} steps"
        );
        let row = b * big_t..(b + 1) * big_t;
        let (fe, fa, ee, ea) = (
            &fe[row.clone()],
            &fa[row.clone()],
            &ee[row.clone()],
            &ea[row],
        );
        assert_eq!(
            &ee[..s],
            &fe[..s],
            "sample {b}: trace before the stop equals the full run's"
        );
        assert_eq!(
            &ea[..s],
            &fa[..s],
            "sample {b}: active before the stop equals the full run's"
        );
        assert!(
            ee[s..].iter().all(|&v| v == ee[s - 1]),
            "sample {b}: energy after the stop repeats the last value"
        );
        assert!(
            ea[s..].iter().all(|&v| v == ea[s - 1]),
            "sample {b}: active after the stop repeats the last value"
        );
        let e_final = objective(
            &phi,
            n,
            m,
            &x[b * n..(b + 1) * n],
            &early.a[b * m..(b + 1) * m],
            lambda as f64,
        );
        assert!((ee[big_t - 1] as f64 - e_final).abs() <= 2e-6 * e_final);
        assert_eq!(ea[big_t - 1] as usize, nnz(&early.a[b * m..(b + 1) * m]));
    }
    // early stop at tol really means max |Δu| < tol: one more step from the stopped u moves
    // nothing by tol or more.
    let again = solve(
        &d,
        &LcaSpec::new(lambda).eta(0.05).steps(1),
        &x,
        Some(&early.u),
    );
    let moved = max_abs_diff(&again.u, &early.u);
    assert!(moved < 1.5e-5, "one more step moved u by {moved:e}");
}

// ---------------------------------------------------------------------------------------------
// 5. Early stop is per sample
// ---------------------------------------------------------------------------------------------

#[test]
fn early_stop_is_per_sample() {
    let (n, m) = (24, 48);
    let (phi, x) = problem(31, n, m, 2, 5, false);
    let d = dict(&phi, n, m);
    let (h1, h2) = (&x[..n], &x[n..]);
    let zero = vec![0f32; n];
    let batch_x: Vec<f32> = [&zero[..], h1, &zero[..], h2].concat();
    let t = 3000u32;
    let spec = LcaSpec::new(0.1).eta(0.2).steps(t).tol(1e-7).trace(true);
    let all = solve(&d, &spec, &batch_x, None);
    let one = solve(&d, &spec, h1, None);
    let two = solve(&d, &spec, h2, None);
    let (tu, mu) = (t as usize, m);
    for (slot, alone) in [(1usize, &one), (3, &two)] {
        assert_eq!(
            &all.u[slot * mu..(slot + 1) * mu],
            &alone.u[..],
            "slot {slot}: u"
        );
        assert_eq!(
            &all.a[slot * mu..(slot + 1) * mu],
            &alone.a[..],
            "slot {slot}: a"
        );
        assert_eq!(all.steps[slot], alone.steps[0], "slot {slot}: steps");
        assert_eq!(
            &all.energy.as_ref().unwrap()[slot * tu..(slot + 1) * tu],
            &alone.energy.as_ref().unwrap()[..]
        );
        assert_eq!(
            &all.active.as_ref().unwrap()[slot * tu..(slot + 1) * tu],
            &alone.active.as_ref().unwrap()[..]
        );
        assert!(
            alone.steps[0] > 20 && alone.steps[0] < t,
            "hard sample took {} steps",
            alone.steps[0]
        );
    }
    for slot in [0usize, 2] {
        assert_eq!(all.steps[slot], 1, "x = 0 stops after one step");
        assert!(all.u[slot * mu..(slot + 1) * mu].iter().all(|&v| v == 0.0));
        assert!(all.a[slot * mu..(slot + 1) * mu].iter().all(|&v| v == 0.0));
        assert!(
            all.energy.as_ref().unwrap()[slot * tu..(slot + 1) * tu]
                .iter()
                .all(|&v| v == 0.0)
        );
        assert!(
            all.active.as_ref().unwrap()[slot * tu..(slot + 1) * tu]
                .iter()
                .all(|&v| v == 0)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 6. u0
// ---------------------------------------------------------------------------------------------

#[test]
fn warm_start_from_u0() {
    let (n, m, batch) = (24, 48, 3);
    let (phi, x) = problem(41, n, m, batch, 4, false);
    let d = dict(&phi, n, m);
    let cold = solve(
        &d,
        &LcaSpec::new(0.1).eta(0.2).steps(20000).tol(1e-9),
        &x,
        None,
    );
    assert!(
        cold.steps.iter().all(|&s| s > 50 && s < 20000),
        "cold steps {:?}",
        cold.steps
    );
    let spec = LcaSpec::new(0.1).eta(0.2).steps(20000).tol(1e-6);
    let cold6 = solve(&d, &spec, &x, None);
    let warm = solve(&d, &spec, &x, Some(&cold.u));
    assert!(
        warm.steps.iter().all(|&s| s <= 3),
        "warm start from the fixed point took {:?} steps",
        warm.steps
    );
    assert!(
        cold6.steps.iter().all(|&s| s > 20),
        "cold start at tol 1e-6 took {:?} steps",
        cold6.steps
    );
    assert!(
        max_abs_diff(&warm.a, &cold.a) <= 1e-6,
        "warm a differs by {:e}",
        max_abs_diff(&warm.a, &cold.a)
    );
    assert!(max_abs_diff(&warm.u, &cold.u) <= 1e-6);

    // u0 is really used: one step with η = 1 gives u = u0 + (b − u0 − Gθ(u0)) = b − Gθ(u0).
    let mut r = rng(42);
    let u0 = randn(&mut r, batch * m, 0.3);
    let lambda = 0.1f32;
    let out = solve(&d, &LcaSpec::new(lambda).eta(1.0).steps(1), &x, Some(&u0));
    let g = d.gram().unwrap();
    let mut want = vec![0f64; batch * m];
    for b in 0..batch {
        let th: Vec<f64> = u0[b * m..(b + 1) * m]
            .iter()
            .map(|&v| Threshold::Soft.apply(v as f64, lambda as f64))
            .collect();
        assert!(th.iter().any(|&v| v != 0.0));
        for j in 0..m {
            let bj: f64 = (0..n)
                .map(|i| phi[i * m + j] as f64 * x[b * n + i] as f64)
                .sum();
            let gj: f64 = (0..m).map(|k| g[j * m + k] as f64 * th[k]).sum();
            want[b * m + j] = bj - gj;
        }
    }
    let err = max_abs_diff(&out.u, &want);
    assert!(err <= 1e-5, "u after one step from u0: max error {err:e}");
    // and differs from the cold first step (b)
    let cold1 = solve(&d, &LcaSpec::new(lambda).eta(1.0).steps(1), &x, None);
    assert!(max_abs_diff(&out.u, &cold1.u) > 1e-2);

    // wrong length
    let short = vec![0f32; batch * m - 1];
    let r = d.solve(&spec, &common::host(&x), Some(&common::host(&short)));
    assert_invalid(r, "u0");
    let long = vec![0f32; batch * m + m];
    assert_invalid(
        d.solve(&spec, &common::host(&x), Some(&common::host(&long))),
        "u0",
    );
}

// ---------------------------------------------------------------------------------------------
// 7. f16 and bf16 inputs
// ---------------------------------------------------------------------------------------------

/// `bound`: relative error allowed against the f32 run (DESIGN.md §6: f16/bf16 < 1e-2, tighter
/// where the maths allows: f16 keeps 11 bits, so 2e-3 there; measured 1.7e-4 and 1.5e-3).
fn check_half<T: Element>(label: &str, bound: f64) {
    let (n, m, batch) = (32, 48, 4);
    let (phi, x) = problem(51, n, m, batch, 4, false);
    let spec = LcaSpec::new(0.2).eta(0.2).steps(300).trace(true);
    let reference = solve(&dict(&phi, n, m), &spec, &x, None);
    let phi_h: Vec<T> = phi.iter().map(|&v| T::from_f64(v as f64)).collect();
    let x_h: Vec<T> = x.iter().map(|&v| T::from_f64(v as f64)).collect();
    let d_h = dict(&phi_h, n, m); // default options: the unit-norm check is on
    let out = solve(&d_h, &spec, &x_h, None);
    let (ea, eu) = (rel_err(&out.a, &reference.a), rel_err(&out.u, &reference.u));
    let ee = rel_err(
        out.energy.as_ref().unwrap(),
        reference.energy.as_ref().unwrap(),
    );
    println!("{label}: rel. error a {ea:.2e}, u {eu:.2e}, energy {ee:.2e}");
    assert!(
        ea < bound && eu < bound && ee < bound,
        "{label}: a {ea:e}, u {eu:e}, energy {ee:e}"
    );
    assert!(
        ea > 0.0,
        "{label}: rounding to a half type changed nothing?"
    );
    // Inputs are widened exactly: the same values given as f32 give bitwise the same result.
    let phi_w: Vec<f32> = phi_h.iter().map(|v| v.to_f64() as f32).collect();
    let x_w: Vec<f32> = x_h.iter().map(|v| v.to_f64() as f32).collect();
    let widened = solve(
        &Dictionary::new(
            &common::host(&phi_w),
            n,
            m,
            DictionaryOptions {
                check_unit_norm: false,
            },
        )
        .unwrap(),
        &spec,
        &x_w,
        None,
    );
    assert_eq!(
        out, widened,
        "{label}: differs from the same values given as f32"
    );
    // Mixed: half x on an f32 dictionary.
    let mixed = solve(&dict(&phi, n, m), &spec, &x_h, None);
    assert!(rel_err(&mixed.a, &reference.a) < bound);
}

#[test]
fn half_inputs_match_f32() {
    check_half::<f16>("f16", 2e-3);
    check_half::<bf16>("bf16", 1e-2);
}

#[test]
fn unit_norm_check_tolerance_per_dtype() {
    let mut r = rng(61);
    // Unit-norm dictionaries rounded to each type pass the default check.
    for &(n, m) in &[(1, 3), (3, 5), (16, 24), (64, 96), (300, 20)] {
        let phi = unit_dictionary(&mut r, n, m);
        let phi16: Vec<f16> = phi.iter().map(|&v| f16::from_f32(v)).collect();
        let phib: Vec<bf16> = phi.iter().map(|&v| bf16::from_f32(v)).collect();
        let norms_b = column_norms(&phib, n, m);
        assert!(
            Dictionary::new(&common::host(&phi), n, m, Default::default()).is_ok(),
            "f32 {n}x{m}"
        );
        assert!(
            Dictionary::new(&common::host(&phi16), n, m, Default::default()).is_ok(),
            "f16 {n}x{m}"
        );
        let worst = norms_b.iter().map(|v| (v - 1.0).abs()).fold(0.0, f64::max);
        assert!(
            Dictionary::new(&common::host(&phib), n, m, Default::default()).is_ok(),
            "bf16 {n}x{m}: worst |norm-1| = {worst:e}"
        );
    }
    // A column scaled by s, checked in each type: (s, f32 ok, f16 ok, bf16 ok).
    let (n, m) = (16, 8);
    let base = unit_dictionary(&mut r, n, m);
    for &(s, ok32, ok16, okb) in &[
        (1.00005f64, true, true, true),
        (1.0003, false, true, true),
        (1.01, false, false, true),
        (1.05, false, false, false),
        (0.95, false, false, false),
    ] {
        let mut phi: Vec<f64> = base.iter().map(|&v| v as f64).collect();
        (0..n).for_each(|i| phi[i * m + 2] *= s);
        let p32: Vec<f32> = phi.iter().map(|&v| v as f32).collect();
        let p16: Vec<f16> = phi.iter().map(|&v| f16::from_f64(v)).collect();
        let pb: Vec<bf16> = phi.iter().map(|&v| bf16::from_f64(v)).collect();
        for (label, got, want) in [
            (
                "f32",
                Dictionary::new(&common::host(&p32), n, m, Default::default()).map(|_| ()),
                ok32,
            ),
            (
                "f16",
                Dictionary::new(&common::host(&p16), n, m, Default::default()).map(|_| ()),
                ok16,
            ),
            (
                "bf16",
                Dictionary::new(&common::host(&pb), n, m, Default::default()).map(|_| ()),
                okb,
            ),
        ] {
            if want {
                assert!(
                    got.is_ok(),
                    "{label}: column scaled by {s} rejected: {got:?}"
                );
            } else {
                assert_invalid(got, "phi");
            }
        }
        // with the check off, every one is accepted
        let off = DictionaryOptions {
            check_unit_norm: false,
        };
        assert!(Dictionary::new(&common::host(&pb), n, m, off).is_ok());
    }
}

// ---------------------------------------------------------------------------------------------
// 8. Dictionary learning
// ---------------------------------------------------------------------------------------------

/// Unit-norm columns and G = ΦᵀΦ − I. `learned`: Φ came out of `learn`, which normalises in
/// f64, so G's diagonal (‖φ_j‖² − 1, from the f64 store) is ~1e-16, not f32 roundoff.
fn check_unit_and_gram(d: &Dictionary, learned: bool) {
    let (n, m) = (d.n(), d.m());
    let phi = d.phi().unwrap();
    let g = d.gram().unwrap();
    for (j, nrm) in column_norms(&phi, n, m).into_iter().enumerate() {
        // phi() is f32: norms are 1 to f32 roundoff
        assert!((nrm - 1.0).abs() < 1e-6, "column {j} norm {nrm}");
        // G_jj = ‖φ_j‖² − 1 comes from the f64 store: 1 to 1e-9
        assert!(
            !learned || (g[j * m + j] as f64).abs() < 2e-9,
            "G[{j},{j}] = {}: column not unit norm in f64",
            g[j * m + j]
        );
    }
    for i in 0..m {
        for j in 0..m {
            let dot: f64 = (0..n)
                .map(|r| phi[r * m + i] as f64 * phi[r * m + j] as f64)
                .sum::<f64>()
                - if i == j { 1.0 } else { 0.0 };
            assert!(
                (g[i * m + j] as f64 - dot).abs() < 1e-6,
                "G[{i},{j}] = {} but (ΦᵀΦ − I) = {dot}",
                g[i * m + j]
            );
        }
    }
}

#[test]
fn learn_keeps_unit_norm_and_updates_gram() {
    let (n, m, batch) = (12, 20, 5);
    let (phi, x) = problem(71, n, m, batch, 3, false);
    let mut d = dict(&phi, n, m);
    check_unit_and_gram(&d, false);
    let code = solve(&d, &LcaSpec::new(0.1).eta(0.2).steps(200), &x, None);
    let g_before = d.gram().unwrap();
    d.learn(
        &common::host(&x),
        &common::host(&code.a),
        0.5,
        Device::reference().default_stream(),
    )
    .unwrap();
    let phi_after = d.phi().unwrap();
    assert!(
        max_abs_diff(&phi_after, &phi) > 1e-3,
        "learning changed nothing"
    );
    assert!(
        max_abs_diff(&d.gram().unwrap(), &g_before) > 1e-3,
        "G was not recomputed"
    );
    check_unit_and_gram(&d, true);
    // lr = 0 is a no-op (up to renormalising an already unit-norm column)
    let before = d.phi().unwrap();
    d.learn(
        &common::host(&x),
        &common::host(&code.a),
        0.0,
        Device::reference().default_stream(),
    )
    .unwrap();
    assert!(max_abs_diff(&d.phi().unwrap(), &before) <= 1e-7);
}

#[test]
fn learn_matches_hand_computation() {
    // Φ = I₂. Sample 1: x = (0, 1), a = (1, 0): r = (−1, 1), r aᵀ = [[−1, 0], [1, 0]].
    // Sample 2: x = (0, 0), a = (0, 0): no contribution, but B = 2 halves the step.
    // lr = 1: Φ = I + ½[[−1, 0], [1, 0]] = [[0.5, 0], [0.5, 1]] → column 0 → (1, 1)/√2.
    let s = std::f32::consts::FRAC_1_SQRT_2;
    let mut d = dict(&[1.0f32, 0.0, 0.0, 1.0], 2, 2);
    let st = Device::reference().default_stream();
    d.learn(
        &common::host(&[0.0f32, 1.0, 0.0, 0.0]),
        &common::host(&[1.0f32, 0.0, 0.0, 0.0]),
        1.0,
        st,
    )
    .unwrap();
    let p = d.phi().unwrap();
    assert!(max_abs_diff(&p, &[s, 0.0, s, 1.0]) <= 1e-7, "phi = {p:?}");
    let g = d.gram().unwrap();
    assert!(max_abs_diff(&g, &[0.0, s, s, 0.0]) <= 1e-7, "G = {g:?}");

    // Φ = I₂, batch 1: x = (0, 1), a = (1, 0), lr = 0.5: column 0 → (0.5, 0.5)/‖·‖ = (1, 1)/√2
    // batch 1 with lr 0.25 → (0.75, 0.25)/‖·‖ = (3, 1)/√10. Both columns used: a = (1, 2):
    // r = x − Φa = (0, 1) − (1, 2) = (−1, −1); Δ = r aᵀ = [[−1, −2], [−1, −2]]; lr = 0.25:
    // col0 = (1, 0) + 0.25(−1, −1) = (0.75, −0.25) → (3, −1)/√10,
    // col1 = (0, 1) + 0.25(−2, −2) = (−0.5, 0.5) → (−1, 1)/√2.
    let mut d = dict(&[1.0f32, 0.0, 0.0, 1.0], 2, 2);
    d.learn(
        &common::host(&[0.0f32, 1.0]),
        &common::host(&[1.0f32, 2.0]),
        0.25,
        st,
    )
    .unwrap();
    let t = 1.0 / 10f32.sqrt();
    let p = d.phi().unwrap();
    assert!(
        max_abs_diff(&p, &[3.0 * t, -s, -t, s]) <= 1e-7,
        "phi = {p:?}"
    );

    // A random case against the formula in f64, with a non-identity Φ and B = 3.
    let (n, m, batch) = (5, 7, 3);
    let mut r = rng(72);
    let phi = unit_dictionary(&mut r, n, m);
    let x = randn(&mut r, batch * n, 1.0);
    let a = randn(&mut r, batch * m, 0.5);
    let lr = 0.3f64;
    let mut want: Vec<f64> = phi.iter().map(|&v| v as f64).collect();
    for b in 0..batch {
        for i in 0..n {
            let res = x[b * n + i] as f64
                - (0..m)
                    .map(|k| phi[i * m + k] as f64 * a[b * m + k] as f64)
                    .sum::<f64>();
            for j in 0..m {
                want[i * m + j] += lr / batch as f64 * res * a[b * m + j] as f64;
            }
        }
    }
    normalize_columns(&mut want, n, m);
    let mut d = dict(&phi, n, m);
    d.learn(&common::host(&x), &common::host(&a), lr as f32, st)
        .unwrap();
    let got = d.phi().unwrap();
    assert!(
        max_abs_diff(&got, &want) <= 2e-7,
        "learned phi off by {:e}",
        max_abs_diff(&got, &want)
    );
    check_unit_and_gram(&d, true);
    // f16 x gives the update of the f16-rounded values
    let x16: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let x16w: Vec<f32> = x16.iter().map(|v| v.to_f32()).collect();
    let (mut d1, mut d2) = (dict(&phi, n, m), dict(&phi, n, m));
    d1.learn(&common::host(&x16), &common::host(&a), lr as f32, st)
        .unwrap();
    d2.learn(&common::host(&x16w), &common::host(&a), lr as f32, st)
        .unwrap();
    assert_eq!(d1.phi().unwrap(), d2.phi().unwrap());
}

#[test]
fn learning_reduces_reconstruction_error() {
    let (n, m) = (16, 24);
    let mut r = rng(81);
    let truth = unit_dictionary(&mut r, n, m);
    let (eval_x, _) = sparse_signals(&mut r, &truth, n, m, 64, 2, 0.01, false);
    let start = unit_dictionary(&mut r, n, m);
    let mut d = dict(&start, n, m);
    let spec = LcaSpec::new(0.1).eta(0.2).steps(150).tol(1e-4);
    let st = Device::reference().default_stream();
    let mean_energy = |d: &Dictionary| -> f64 {
        let out = solve(d, &spec, &eval_x, None);
        let phi = d.phi().unwrap();
        (0..64)
            .map(|b| {
                objective(
                    &phi,
                    n,
                    m,
                    &eval_x[b * n..(b + 1) * n],
                    &out.a[b * m..(b + 1) * m],
                    0.1,
                )
            })
            .sum::<f64>()
            / 64.0
    };
    let recovered = |d: &Dictionary| -> f64 {
        // mean over true atoms of the best |cos| with a learned atom
        let phi = d.phi().unwrap();
        (0..m)
            .map(|j| {
                (0..m)
                    .map(|k| {
                        (0..n)
                            .map(|i| truth[i * m + j] as f64 * phi[i * m + k] as f64)
                            .sum::<f64>()
                            .abs()
                    })
                    .fold(0.0, f64::max)
            })
            .sum::<f64>()
            / m as f64
    };
    let (e_start, rec_start) = (mean_energy(&d), recovered(&d));
    for _ in 0..300 {
        let (x, _) = sparse_signals(&mut r, &truth, n, m, 32, 2, 0.01, false);
        let code = solve(&d, &spec, &x, None);
        d.learn(&common::host(&x), &common::host(&code.a), 2.0, st)
            .unwrap();
    }
    let (e_end, rec_end) = (mean_energy(&d), recovered(&d));
    println!(
        "learning: mean energy {e_start:.4} -> {e_end:.4}, atom recovery {rec_start:.3} -> {rec_end:.3}"
    );
    // From a random start (mean energy 0.47, best |cos| with a true atom 0.54 on average) to
    // near the truth (measured 0.21 and 0.97; with x = Φ*a + 1% noise and 2 atoms of magnitude
    // ~1 per sample the floor is about λ‖a‖₁ ≈ 0.2).
    assert!(e_end < 0.6 * e_start, "mean energy {e_start} -> {e_end}");
    assert!(rec_end > 0.9, "atom recovery {rec_start} -> {rec_end}");
    check_unit_and_gram(&d, true);
}

// ---------------------------------------------------------------------------------------------
// 9. Bad input
// ---------------------------------------------------------------------------------------------

/// Output buffers pre-filled with 7, with the given lengths [u, a, energy, active, steps].
struct Filled {
    u: Vec<f32>,
    a: Vec<f32>,
    energy: Vec<f32>,
    active: Vec<u32>,
    steps: Vec<u32>,
}

impl Filled {
    fn new(lens: [usize; 5]) -> Self {
        Filled {
            u: vec![7.0; lens[0]],
            a: vec![7.0; lens[1]],
            energy: vec![7.0; lens[2]],
            active: vec![7; lens[3]],
            steps: vec![7; lens[4]],
        }
    }
    fn outputs(&mut self) -> LcaOutputs<'_> {
        LcaOutputs {
            u: common::host_mut(&mut self.u),
            a: common::host_mut(&mut self.a),
            energy: Some(common::host_mut(&mut self.energy)),
            active: Some(common::host_mut(&mut self.active)),
            steps: Some(common::host_mut(&mut self.steps)),
        }
    }
    fn untouched(&self) -> bool {
        self.u
            .iter()
            .chain(&self.a)
            .chain(&self.energy)
            .all(|&v| v == 7.0)
            && self.active.iter().chain(&self.steps).all(|&v| v == 7)
    }
}

#[test]
fn bad_solve_arguments_are_rejected_and_leave_outputs_untouched() {
    let (n, m, batch, steps) = (4usize, 6usize, 2usize, 5u32);
    let (phi, x) = problem(91, n, m, batch, 2, false);
    let d = dict(&phi, n, m);
    let good = LcaSpec::new(0.1).eta(0.2).steps(steps).trace(true);
    let (bm, bt) = (batch * m, batch * steps as usize);
    let lens = [bm, bm, bt, bt, batch];
    let u0 = vec![0.1f32; bm];
    let st = Device::reference().default_stream();

    let run =
        |spec: &LcaSpec, x: &[f32], u0: Option<&[f32]>, lens: [usize; 5], want: Option<&str>| {
            let mut f = Filled::new(lens);
            let u0v = u0.map(View::host);
            let r = d.solve_into(spec, &common::host(x), u0v.as_ref(), f.outputs(), st);
            match want {
                None => {
                    r.unwrap();
                    assert!(
                        f.steps.iter().all(|&s| s == steps),
                        "valid call wrote steps {:?}",
                        f.steps
                    );
                    assert!(!f.u.contains(&7.0) && !f.energy.contains(&7.0));
                }
                Some(name) => {
                    assert_invalid(r, name);
                    assert!(f.untouched(), "`{name}` error wrote to the outputs");
                }
            }
        };
    // the baseline is valid, with and without u0
    run(&good, &x, None, lens, None);
    run(&good, &x, Some(&u0), lens, None);
    assert!(
        d.solve(&good.eta(1.0), &common::host(&x), None).is_ok(),
        "eta = 1 is allowed"
    );

    // shapes
    run(&good, &x[..batch * n - 1], None, lens, Some("x"));
    run(
        &good,
        &[x.clone(), vec![0.5]].concat(),
        None,
        lens,
        Some("x"),
    );
    run(&good, &[], None, lens, Some("x"));
    run(&good, &x, None, [bm - 1, bm, bt, bt, batch], Some("u"));
    run(&good, &x, None, [bm + 1, bm, bt, bt, batch], Some("u"));
    run(&good, &x, None, [bm, bm - 1, bt, bt, batch], Some("a"));
    run(&good, &x, None, [bm, 0, bt, bt, batch], Some("a"));
    run(&good, &x, None, [bm, bm, bt - 1, bt, batch], Some("energy"));
    run(&good, &x, None, [bm, bm, bt, bt + 1, batch], Some("active"));
    run(&good, &x, None, [bm, bm, bt, bt, batch + 1], Some("steps"));
    run(&good, &x, Some(&u0[1..]), lens, Some("u0"));
    // parameters
    for lambda in [0.0, -0.1, f32::NAN, f32::INFINITY] {
        run(&LcaSpec { lambda, ..good }, &x, None, lens, Some("lambda"));
    }
    // (η = 0 is not an error: it selects the automatic 1/λmax)
    for eta in [-0.2, 1.0001, 1.5, f32::NAN, f32::INFINITY] {
        run(&good.eta(eta), &x, None, lens, Some("eta"));
    }
    run(
        &good.steps(0),
        &x,
        None,
        [bm, bm, 0, 0, batch],
        Some("steps"),
    );
    for tol in [-1e-6, f32::NAN, f32::INFINITY] {
        run(&good.tol(tol), &x, None, lens, Some("tol"));
    }
    // non-finite inputs
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut xb = x.clone();
        xb[5] = bad;
        run(&good, &xb, None, lens, Some("x"));
        let mut ub = u0.clone();
        ub[bm - 1] = bad;
        run(&good, &x, Some(&ub), lens, Some("u0"));
    }
    // NaN in half-precision x
    let xh: Vec<f16> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| if i == 3 { f16::NAN } else { f16::from_f32(v) })
        .collect();
    let mut f = Filled::new(lens);
    assert_invalid(
        d.solve_into(&good, &common::host(&xh), None, f.outputs(), st),
        "x",
    );
    assert!(f.untouched());
    let xb: Vec<bf16> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if i == 0 {
                bf16::INFINITY
            } else {
                bf16::from_f32(v)
            }
        })
        .collect();
    assert_invalid(d.solve(&good, &common::host(&xb), None), "x");
    // solve (allocating) rejects the same things
    assert_invalid(
        d.solve(&LcaSpec::new(0.0), &common::host(&x), None),
        "lambda",
    );
    assert_invalid(d.solve(&good, &common::host(&x[..3]), None), "x");
    assert_invalid(d.solve::<f32>(&good, &common::host(&[]), None), "x");
}

#[test]
fn bad_dictionaries_are_rejected() {
    let mut r = rng(92);
    let (n, m) = (8, 5);
    let phi = unit_dictionary(&mut r, n, m);
    let on = DictionaryOptions::default();
    let off = DictionaryOptions {
        check_unit_norm: false,
    };
    assert!(Dictionary::new(&common::host(&phi), n, m, on).is_ok());
    // shapes
    assert_invalid(Dictionary::new(&common::host(&phi), n, m + 1, on), "phi");
    assert_invalid(Dictionary::new(&common::host(&phi[1..]), n, m, on), "phi");
    assert_invalid(Dictionary::new(&common::host(&phi), n * m, 0, off), "phi");
    assert_invalid(Dictionary::new(&common::host(&phi), 0, n * m, off), "phi");
    assert_invalid(Dictionary::new::<f32>(&common::host(&[]), 0, 0, off), "phi");
    assert_invalid(
        Dictionary::new(&common::host(&phi), usize::MAX, 2, off),
        "phi",
    );
    // not unit norm: rejected with the check, accepted without
    let scaled: Vec<f32> = phi.iter().map(|&v| v * 2.0).collect();
    assert_invalid(Dictionary::new(&common::host(&scaled), n, m, on), "phi");
    let d = Dictionary::new(&common::host(&scaled), n, m, off)
        .expect("check off accepts any finite phi");
    assert!(
        (d.gram().unwrap()[0] - 3.0).abs() < 1e-5,
        "G_00 = ‖2φ‖² − 1 = 3"
    );
    let mut zero_col = phi.clone();
    (0..n).for_each(|i| zero_col[i * m + 1] = 0.0);
    assert_invalid(Dictionary::new(&common::host(&zero_col), n, m, on), "phi");
    assert!(Dictionary::new(&common::host(&zero_col), n, m, off).is_ok());
    // non-finite: always rejected
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for pos in [0, n * m / 2, n * m - 1] {
            let mut p = phi.clone();
            p[pos] = bad;
            for opts in [on, off] {
                let r = Dictionary::new(&common::host(&p), n, m, opts);
                // a clear error: it says the column is not finite (not, say, "norm 0")
                if let Err(Error::InvalidArgument { reason, .. }) = &r {
                    assert!(
                        reason.contains("NaN") || reason.contains("Inf"),
                        "{bad} at {pos} ({opts:?}): unclear reason `{reason}`"
                    );
                }
                assert_invalid(r, "phi");
            }
        }
    }
    let mut ph: Vec<bf16> = phi.iter().map(|&v| bf16::from_f32(v)).collect();
    ph[7] = bf16::NAN;
    assert_invalid(Dictionary::new(&common::host(&ph), n, m, off), "phi");
}

#[test]
fn bad_learn_arguments_are_rejected_and_leave_the_dictionary_untouched() {
    let (n, m, batch) = (6, 9, 3);
    let (phi, x) = problem(93, n, m, batch, 2, false);
    let mut d = dict(&phi, n, m);
    let a = solve(&d, &LcaSpec::new(0.1).steps(50), &x, None).a;
    let (phi0, g0) = (d.phi().unwrap(), d.gram().unwrap());
    let st = Device::reference().default_stream();
    let mut check = |x: &[f32], a: &[f32], lr: f32, name: &str| {
        assert_invalid(d.learn(&common::host(x), &common::host(a), lr, st), name);
        assert_eq!(
            d.phi().unwrap(),
            phi0,
            "failed learn (`{name}`) changed phi"
        );
        assert_eq!(d.gram().unwrap(), g0, "failed learn (`{name}`) changed G");
    };
    check(&x, &a, -0.1, "lr");
    check(&x, &a, f32::NAN, "lr");
    check(&x, &a, f32::INFINITY, "lr");
    let mut an = a.clone();
    an[4] = f32::NAN;
    check(&x, &an, 0.1, "a");
    an[4] = f32::INFINITY;
    check(&x, &an, 0.1, "a");
    let mut xn = x.clone();
    xn[2] = f32::NAN;
    check(&xn, &a, 0.1, "x");
    check(&x, &a[1..], 0.1, "a");
    check(&x, &[a.clone(), vec![0.0; m]].concat(), 0.1, "a");
    check(&x[1..], &a, 0.1, "x");
    check(&[], &[], 0.1, "x");
    // and a valid call does change it
    d.learn(&common::host(&x), &common::host(&a), 0.1, st)
        .unwrap();
    assert_ne!(d.phi().unwrap(), phi0);
}

// ---------------------------------------------------------------------------------------------
// 10. The C ABI on the CPU device
// ---------------------------------------------------------------------------------------------

mod c_abi {
    use super::*;
    use fep_kernels::ffi::*;

    /// `fep_lca_solve` on the default stream without u0, trace or steps: the shape of most
    /// error cases below.
    fn solve_untraced(
        h: *const FepLcaDict,
        dtype: i32,
        x: *const std::ffi::c_void,
        batch: u64,
        params: *const FepLcaParams,
        u: &mut [f32],
        a: &mut [f32],
    ) -> i32 {
        unsafe {
            fep_lca_solve(
                h,
                null_mut(),
                dtype,
                x,
                batch,
                params,
                null(),
                u.as_mut_ptr(),
                a.as_mut_ptr(),
                null_mut(),
                null_mut(),
                null_mut(),
            )
        }
    }

    /// A reference-CPU f32 dictionary [n, m] through fep_lca_dict_new (unit norms checked), to
    /// compare bitwise with the Rust API on `Device::reference()`; panics with the library's
    /// message when that fails.
    pub(super) fn c_dict_f32(phi: &[f32], n: usize, m: usize) -> *mut FepLcaDict {
        let mut h: *mut FepLcaDict = null_mut();
        let st = unsafe {
            fep_lca_dict_new(
                FEP_DEVICE_CPU_REFERENCE,
                0,
                null_mut(),
                FEP_DTYPE_F32,
                phi.as_ptr().cast(),
                n as u64,
                m as u64,
                1,
                &mut h,
            )
        };
        assert_eq!(st, FEP_OK, "{}", last_error());
        assert!(!h.is_null());
        h
    }

    pub(super) fn last_error() -> String {
        unsafe { CStr::from_ptr(fep_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn device_queries() {
        assert_eq!(fep_device_count(FEP_DEVICE_CPU), 1);
        assert_eq!(fep_device_count(42), -FEP_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("kind"), "{}", last_error());
        assert!(fep_device_count(FEP_DEVICE_CUDA) >= 0 && fep_device_count(FEP_DEVICE_HIP) >= 0);
        assert_eq!(fep_abi_version(), FEP_ABI_VERSION);
        let v = unsafe { CStr::from_ptr(fep_version()) }.to_str().unwrap();
        assert_eq!(v, fep_kernels::VERSION);
        let mut buf = [0i8; 64];
        let st = unsafe {
            fep_device_name(FEP_DEVICE_CPU, 0, buf.as_mut_ptr().cast(), buf.len() as u64)
        };
        assert_eq!(st, FEP_OK);
        let name = unsafe { CStr::from_ptr(buf.as_ptr().cast()) }
            .to_str()
            .unwrap();
        assert!(name.starts_with("cpu"), "{name}");
    }

    #[test]
    fn solve_and_learn_match_the_rust_api() {
        let (n, m, batch, steps) = (10usize, 16usize, 3usize, 120u32);
        let (phi, x) = problem(101, n, m, batch, 3, false);
        let mut d = dict(&phi, n, m);
        let spec = LcaSpec::new(0.1)
            .eta(0.2)
            .steps(steps)
            .tol(1e-6)
            .trace(true)
            .threshold(Threshold::Soft);
        let mut r = rng(102);
        let u0 = randn(&mut r, batch * m, 0.1);
        let want = solve(&d, &spec, &x, Some(&u0));
        let want_plain = solve(
            &d,
            &spec.trace(false).threshold(Threshold::HardNonNeg),
            &x,
            None,
        );

        let h = c_dict_f32(&phi, n, m);
        let (mut gn, mut gm) = (0u64, 0u64);
        assert_eq!(unsafe { fep_lca_dict_shape(h, &mut gn, &mut gm) }, FEP_OK);
        assert_eq!((gn, gm), (n as u64, m as u64));
        let mut phi_out = vec![0f32; n * m];
        assert_eq!(
            unsafe { fep_lca_dict_phi(h, null_mut(), phi_out.as_mut_ptr()) },
            FEP_OK
        );
        assert_eq!(phi_out, phi);

        let params = FepLcaParams {
            threshold: FEP_LCA_SOFT,
            lambda: 0.1,
            eta: 0.2,
            steps,
            tol: 1e-6,
            tol_mode: 0,
            allow_tf32: 0,
        };
        let bm = batch * m;
        let bt = batch * steps as usize;
        let (mut u, mut a, mut e, mut c, mut s) = (
            vec![f32::NAN; bm],
            vec![f32::NAN; bm],
            vec![f32::NAN; bt],
            vec![u32::MAX; bt],
            vec![u32::MAX; batch],
        );
        let st = unsafe {
            fep_lca_solve(
                h,
                null_mut(),
                FEP_DTYPE_F32,
                x.as_ptr().cast(),
                batch as u64,
                &params,
                u0.as_ptr(),
                u.as_mut_ptr(),
                a.as_mut_ptr(),
                e.as_mut_ptr(),
                c.as_mut_ptr(),
                s.as_mut_ptr(),
            )
        };
        assert_eq!(st, FEP_OK, "{}", last_error());
        let got = Out {
            u: u.clone(),
            a: a.clone(),
            energy: Some(e.clone()),
            active: Some(c.clone()),
            steps: s.clone(),
        };
        // bitwise (NaN would fail ==)
        assert_eq!(got, want);

        // no trace, no steps, no u0, another threshold
        let params_h = FepLcaParams {
            threshold: FEP_LCA_HARD_NONNEG,
            ..params
        };
        let (mut u2, mut a2) = (vec![f32::NAN; bm], vec![f32::NAN; bm]);
        let st = solve_untraced(
            h,
            FEP_DTYPE_F32,
            x.as_ptr().cast(),
            batch as u64,
            &params_h,
            &mut u2,
            &mut a2,
        );
        assert_eq!(st, FEP_OK, "{}", last_error());
        assert_eq!((u2, a2), (want_plain.u.clone(), want_plain.a.clone()));

        // f16 input through the ABI equals the Rust API on the same f16 values
        let x16: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let want16 = solve(&d, &spec.trace(false), &x16, None);
        let (mut u3, mut a3) = (vec![f32::NAN; bm], vec![f32::NAN; bm]);
        let st = solve_untraced(
            h,
            FEP_DTYPE_F16,
            x16.as_ptr().cast(),
            batch as u64,
            &params,
            &mut u3,
            &mut a3,
        );
        assert_eq!(st, FEP_OK, "{}", last_error());
        assert_eq!((u3, a3), (want16.u, want16.a));

        // λ = 0: invalid, named, outputs untouched
        let bad = FepLcaParams {
            lambda: 0.0,
            ..params
        };
        let (mut u4, mut a4, mut s4) = (vec![7.0f32; bm], vec![7.0f32; bm], vec![7u32; batch]);
        let st = unsafe {
            fep_lca_solve(
                h,
                null_mut(),
                FEP_DTYPE_F32,
                x.as_ptr().cast(),
                batch as u64,
                &bad,
                null(),
                u4.as_mut_ptr(),
                a4.as_mut_ptr(),
                null_mut(),
                null_mut(),
                s4.as_mut_ptr(),
            )
        };
        assert_eq!(st, FEP_ERR_INVALID_ARGUMENT);
        assert!(
            last_error().contains("lambda"),
            "last error: {}",
            last_error()
        );
        assert!(u4.iter().chain(&a4).all(|&v| v == 7.0) && s4.iter().all(|&v| v == 7));
        // bad threshold code, bad dtype, zero batch
        let bad = FepLcaParams {
            threshold: 9,
            ..params
        };
        let st = solve_untraced(
            h,
            FEP_DTYPE_F32,
            x.as_ptr().cast(),
            batch as u64,
            &bad,
            &mut u4,
            &mut a4,
        );
        assert_eq!(st, FEP_ERR_INVALID_ARGUMENT);
        assert!(
            last_error().contains("threshold"),
            "last error: {}",
            last_error()
        );
        let st = solve_untraced(
            h,
            17,
            x.as_ptr().cast(),
            batch as u64,
            &params,
            &mut u4,
            &mut a4,
        );
        assert_eq!(st, FEP_ERR_INVALID_ARGUMENT);
        assert!(
            last_error().contains("dtype"),
            "last error: {}",
            last_error()
        );
        let st = solve_untraced(
            h,
            FEP_DTYPE_F32,
            x.as_ptr().cast(),
            0,
            &params,
            &mut u4,
            &mut a4,
        );
        assert_eq!(st, FEP_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("`x`"), "last error: {}", last_error());
        assert!(u4.iter().chain(&a4).all(|&v| v == 7.0));
        // NULL pointers
        let xp: *const std::ffi::c_void = x.as_ptr().cast();
        let cases: [(&str, i32); 5] = unsafe {
            [
                (
                    "dict",
                    fep_lca_solve(
                        null(),
                        null_mut(),
                        FEP_DTYPE_F32,
                        xp,
                        batch as u64,
                        &params,
                        null(),
                        u4.as_mut_ptr(),
                        a4.as_mut_ptr(),
                        null_mut(),
                        null_mut(),
                        null_mut(),
                    ),
                ),
                (
                    "params",
                    fep_lca_solve(
                        h,
                        null_mut(),
                        FEP_DTYPE_F32,
                        xp,
                        batch as u64,
                        null(),
                        null(),
                        u4.as_mut_ptr(),
                        a4.as_mut_ptr(),
                        null_mut(),
                        null_mut(),
                        null_mut(),
                    ),
                ),
                (
                    "x",
                    fep_lca_solve(
                        h,
                        null_mut(),
                        FEP_DTYPE_F32,
                        null(),
                        batch as u64,
                        &params,
                        null(),
                        u4.as_mut_ptr(),
                        a4.as_mut_ptr(),
                        null_mut(),
                        null_mut(),
                        null_mut(),
                    ),
                ),
                (
                    "u_out",
                    fep_lca_solve(
                        h,
                        null_mut(),
                        FEP_DTYPE_F32,
                        xp,
                        batch as u64,
                        &params,
                        null(),
                        null_mut(),
                        a4.as_mut_ptr(),
                        null_mut(),
                        null_mut(),
                        null_mut(),
                    ),
                ),
                (
                    "a_out",
                    fep_lca_solve(
                        h,
                        null_mut(),
                        FEP_DTYPE_F32,
                        xp,
                        batch as u64,
                        &params,
                        null(),
                        u4.as_mut_ptr(),
                        null_mut(),
                        null_mut(),
                        null_mut(),
                        null_mut(),
                    ),
                ),
            ]
        };
        for (name, st) in cases {
            assert_eq!(st, FEP_ERR_INVALID_ARGUMENT, "NULL {name}");
        }
        let st = unsafe {
            fep_lca_solve(
                h,
                null_mut(),
                FEP_DTYPE_F32,
                xp,
                batch as u64,
                &params,
                null(),
                u4.as_mut_ptr(),
                null_mut(),
                null_mut(),
                null_mut(),
                null_mut(),
            )
        };
        assert_eq!(st, FEP_ERR_INVALID_ARGUMENT);
        assert!(
            last_error().contains("a_out"),
            "last error: {}",
            last_error()
        );
        assert!(u4.iter().all(|&v| v == 7.0));
        assert_eq!(
            unsafe { fep_lca_dict_shape(null(), null_mut(), null_mut()) },
            FEP_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            unsafe { fep_lca_dict_phi(h, null_mut(), null_mut()) },
            FEP_ERR_INVALID_ARGUMENT
        );

        // learning through the ABI equals learning through the Rust API
        let st = unsafe {
            fep_lca_dict_learn(
                h,
                null_mut(),
                FEP_DTYPE_F32,
                x.as_ptr().cast(),
                want.a.as_ptr(),
                batch as u64,
                0.5,
            )
        };
        assert_eq!(st, FEP_OK, "{}", last_error());
        d.learn(
            &common::host(&x),
            &common::host(&want.a),
            0.5,
            Device::reference().default_stream(),
        )
        .unwrap();
        assert_eq!(
            unsafe { fep_lca_dict_phi(h, null_mut(), phi_out.as_mut_ptr()) },
            FEP_OK
        );
        assert_eq!(phi_out, d.phi().unwrap());
        let st = unsafe {
            fep_lca_dict_learn(
                h,
                null_mut(),
                FEP_DTYPE_F32,
                x.as_ptr().cast(),
                want.a.as_ptr(),
                batch as u64,
                -1.0,
            )
        };
        assert_eq!(st, FEP_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("lr"), "last error: {}", last_error());
        let st = unsafe {
            fep_lca_dict_learn(
                h,
                null_mut(),
                FEP_DTYPE_F32,
                x.as_ptr().cast(),
                null(),
                batch as u64,
                0.5,
            )
        };
        assert_eq!(st, FEP_ERR_INVALID_ARGUMENT);
        let st = unsafe {
            fep_lca_dict_learn(
                null_mut(),
                null_mut(),
                FEP_DTYPE_F32,
                x.as_ptr().cast(),
                want.a.as_ptr(),
                batch as u64,
                0.5,
            )
        };
        assert_eq!(st, FEP_ERR_INVALID_ARGUMENT);
        unsafe { fep_lca_dict_free(h) };
    }

    #[test]
    fn dict_new_errors() {
        let (n, m) = (4usize, 6usize);
        let mut r = rng(103);
        let phi = unit_dictionary(&mut r, n, m);
        let new = |kind: i32,
                   ordinal: i32,
                   dtype: i32,
                   p: *const f32,
                   check: i32,
                   out: *mut *mut FepLcaDict| unsafe {
            fep_lca_dict_new(
                kind,
                ordinal,
                null_mut(),
                dtype,
                p.cast(),
                n as u64,
                m as u64,
                check,
                out,
            )
        };
        let mut h: *mut FepLcaDict = null_mut();
        assert_eq!(
            new(FEP_DEVICE_CPU, 0, 5, phi.as_ptr(), 1, &mut h),
            FEP_ERR_INVALID_ARGUMENT
        );
        assert!(
            last_error().contains("dtype"),
            "last error: {}",
            last_error()
        );
        assert!(h.is_null(), "a failed call wrote the handle");
        assert_eq!(
            new(FEP_DEVICE_CPU, 0, FEP_DTYPE_F32, null(), 1, &mut h),
            FEP_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("phi"), "last error: {}", last_error());
        assert_eq!(
            new(
                FEP_DEVICE_CPU,
                0,
                FEP_DTYPE_F32,
                phi.as_ptr(),
                1,
                null_mut()
            ),
            FEP_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("out"), "last error: {}", last_error());
        assert_eq!(
            new(FEP_DEVICE_CPU, 1, FEP_DTYPE_F32, phi.as_ptr(), 1, &mut h),
            FEP_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            new(FEP_DEVICE_CPU, -1, FEP_DTYPE_F32, phi.as_ptr(), 1, &mut h),
            FEP_ERR_INVALID_ARGUMENT
        );
        assert_eq!(
            new(77, 0, FEP_DTYPE_F32, phi.as_ptr(), 1, &mut h),
            FEP_ERR_INVALID_ARGUMENT
        );
        assert!(h.is_null());
        // not unit norm: rejected with the check, accepted without
        let scaled: Vec<f32> = phi.iter().map(|&v| v * 1.5).collect();
        assert_eq!(
            new(FEP_DEVICE_CPU, 0, FEP_DTYPE_F32, scaled.as_ptr(), 1, &mut h),
            FEP_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("phi"), "last error: {}", last_error());
        assert!(h.is_null());
        assert_eq!(
            new(FEP_DEVICE_CPU, 0, FEP_DTYPE_F32, scaled.as_ptr(), 0, &mut h),
            FEP_OK,
            "{}",
            last_error()
        );
        assert!(!h.is_null());
        unsafe { fep_lca_dict_free(h) };
        // bf16 dictionary through the ABI
        let pb: Vec<bf16> = phi.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut h: *mut FepLcaDict = null_mut();
        let st = unsafe {
            fep_lca_dict_new(
                FEP_DEVICE_CPU,
                0,
                null_mut(),
                FEP_DTYPE_BF16,
                pb.as_ptr().cast(),
                n as u64,
                m as u64,
                1,
                &mut h,
            )
        };
        assert_eq!(st, FEP_OK, "{}", last_error());
        let mut out = vec![0f32; n * m];
        assert_eq!(
            unsafe { fep_lca_dict_phi(h, null_mut(), out.as_mut_ptr()) },
            FEP_OK
        );
        assert_eq!(out, pb.iter().map(|v| v.to_f32()).collect::<Vec<_>>());
        unsafe { fep_lca_dict_free(h) };
        // zero sizes
        let st = unsafe {
            fep_lca_dict_new(
                FEP_DEVICE_CPU,
                0,
                null_mut(),
                FEP_DTYPE_F32,
                phi.as_ptr().cast(),
                0,
                m as u64,
                0,
                &mut h,
            )
        };
        assert_eq!(st, FEP_ERR_INVALID_ARGUMENT);
        // freeing NULL is a no-op
        unsafe { fep_lca_dict_free(null_mut()) };
    }
}

// ---------------------------------------------------------------------------------------------
// λmax(ΦᵀΦ), the automatic step η = 1/λmax, the relative tolerance, allow_tf32
// ---------------------------------------------------------------------------------------------

/// Every eigenvalue of the symmetric `[m, m]` matrix `a` (cyclic Jacobi rotations, f64): the
/// dense check of the power iteration.
fn jacobi_eigenvalues(mut a: Vec<f64>, m: usize) -> Vec<f64> {
    for _sweep in 0..100 {
        let off: f64 = (0..m)
            .flat_map(|i| (0..m).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * m + j].powi(2))
            .sum();
        if off < 1e-30 {
            break;
        }
        for p in 0..m {
            for q in p + 1..m {
                let apq = a[p * m + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * m + q] - a[p * m + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let (c, s) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
                for k in 0..m {
                    let (akp, akq) = (a[k * m + p], a[k * m + q]);
                    a[k * m + p] = c * akp - s * akq;
                    a[k * m + q] = s * akp + c * akq;
                }
                for k in 0..m {
                    let (apk, aqk) = (a[p * m + k], a[q * m + k]);
                    a[p * m + k] = c * apk - s * aqk;
                    a[q * m + k] = s * apk + c * aqk;
                }
            }
        }
    }
    (0..m).map(|i| a[i * m + i]).collect()
}

/// ΦᵀΦ in f64 from an f32 Φ.
fn phi_t_phi(phi: &[f32], n: usize, m: usize) -> Vec<f64> {
    let mut g = vec![0.0; m * m];
    for i in 0..m {
        for j in 0..m {
            g[i * m + j] = (0..n)
                .map(|r| phi[r * m + i] as f64 * phi[r * m + j] as f64)
                .sum();
        }
    }
    g
}

#[test]
fn lambda_max_matches_a_dense_eigendecomposition() {
    for (seed, n, m) in [
        (1, 3, 2),
        (2, 5, 8),
        (3, 8, 5),
        (4, 12, 12),
        (5, 4, 16),
        (6, 1, 7),
    ] {
        let phi = unit_dictionary(&mut rng(seed), n, m);
        let d = dict(&phi, n, m);
        let eig = jacobi_eigenvalues(phi_t_phi(&phi, n, m), m);
        let want = eig.iter().cloned().fold(f64::MIN, f64::max);
        let got = d.lambda_max().unwrap();
        assert!(
            (got - want).abs() <= 1e-6 * want,
            "[{n}, {m}]: power iteration {got}, Jacobi {want} (all: {eig:?})"
        );
        assert!(
            got >= 1.0 - 1e-9,
            "unit-norm columns: lambda_max >= 1, got {got}"
        );
        // cached: the same value again; the automatic step is its inverse
        assert_eq!(d.lambda_max().unwrap(), got);
        assert_eq!(d.auto_eta().unwrap(), (1.0 / got).min(1.0) as f32);
    }
    // closed forms: orthonormal atoms (1), two atoms at cosine c (1 + |c|), one atom repeated
    // m times (m), a 1 x m dictionary of ±1 (m)
    let d = dict(&[1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], 3, 3);
    assert!((d.lambda_max().unwrap() - 1.0).abs() < 1e-12);
    assert_eq!(d.auto_eta().unwrap(), 1.0);
    let (c, s) = (0.6f32, 0.8f32);
    let d = dict(&[1.0f32, c, 0.0, s], 2, 2);
    assert!((d.lambda_max().unwrap() - 1.6).abs() < 1e-7);
    let col = [0.6f32, 0.8];
    let rep: Vec<f32> = (0..2).flat_map(|i| [col[i]; 5]).collect();
    let d = dict(&rep, 2, 5);
    assert!((d.lambda_max().unwrap() - 5.0).abs() < 1e-6);
    let d = dict(&[1.0f32, -1.0, 1.0, 1.0], 1, 4);
    assert!((d.lambda_max().unwrap() - 4.0).abs() < 1e-9);
    assert_eq!(d.auto_eta().unwrap(), 0.25);
}

#[test]
fn lambda_max_is_recomputed_after_learning() {
    let (n, m) = (6, 10);
    let (phi, x) = problem(21, n, m, 4, 2, false);
    let mut d = dict(&phi, n, m);
    let before = d.lambda_max().unwrap();
    let a = solve(&d, &LcaSpec::new(0.05).steps(50), &x, None).a;
    d.learn(
        &common::host(&x),
        &common::host(&a),
        0.5,
        Device::reference().default_stream(),
    )
    .unwrap();
    let after = d.lambda_max().unwrap();
    let fresh = dict(&d.phi().unwrap(), n, m).lambda_max().unwrap();
    assert!((after - fresh).abs() <= 1e-6 * fresh, "{after} vs {fresh}");
    assert!(
        (after - before).abs() > 1e-9,
        "the learning step did not change lambda_max?"
    );
}

#[test]
fn default_eta_is_automatic_and_explicit_eta_still_works() {
    let spec = LcaSpec::new(0.1);
    assert_eq!(spec.eta, LcaSpec::AUTO_ETA);
    assert!(!spec.allow_tf32);
    assert_eq!(spec.tol_mode, TolMode::Absolute);
    let (n, m) = (8, 12);
    let (phi, x) = problem(31, n, m, 2, 2, false);
    let d = dict(&phi, n, m);
    // eta(0) and the default are the same as an explicit eta = auto_eta()
    let eta = d.auto_eta().unwrap();
    let auto = solve(&d, &spec.steps(40).trace(true), &x, None);
    let explicit = solve(&d, &spec.steps(40).trace(true).eta(eta), &x, None);
    assert_eq!(auto, explicit);
    assert_eq!(solve(&d, &spec.steps(40).auto_eta(), &x, None).a, auto.a);
    // an explicit η is used as given (η = 0.05 differs from 1/λmax here)
    assert!((eta - 0.05).abs() > 0.01);
    let slow = solve(&d, &spec.steps(40).eta(0.05), &x, None);
    assert_ne!(slow.u, auto.u);
    // bad η: negative, above 1, NaN
    for bad in [-0.1f32, 1.5, f32::NAN] {
        assert_invalid(d.solve(&spec.eta(bad), &common::host(&x), None), "eta");
    }
}

/// A dictionary of `m` nearly equal atoms in R^n: λmax(ΦᵀΦ) ≈ m, so η = 1 (ISTA with step 1)
/// amplifies the joint mode of the active atoms by about 1 − m per step.
fn clustered_dictionary(n: usize, m: usize) -> Vec<f32> {
    let mut r = rng(77);
    let noise = randn_f64(&mut r, n * m);
    let mut phi: Vec<f64> = (0..n * m)
        .map(|k| if k / m == 0 { 1.0 } else { 0.0 } + 0.15 * noise[k])
        .collect();
    normalize_columns(&mut phi, n, m);
    phi.iter().map(|&v| v as f32).collect()
}

#[test]
fn auto_eta_converges_where_eta_one_diverges() {
    let (n, m) = (6, 8);
    let phi = clustered_dictionary(n, m);
    let d = dict(&phi, n, m);
    let lmax = d.lambda_max().unwrap();
    assert!(
        lmax > 4.0,
        "the clustered atoms should give lambda_max > 4, got {lmax}"
    );
    let x: Vec<f32> = (0..2 * n)
        .map(|k| {
            if k % n == 0 {
                3.0
            } else {
                0.1 * (k as f32).sin()
            }
        })
        .collect();
    let lambda = 0.05;
    let steps = 3000;
    let base = LcaSpec::new(lambda)
        .steps(steps)
        .trace(true)
        .relative_tol(1e-6);
    let auto = solve(&d, &base, &x, None);
    let one = solve(&d, &base.eta(1.0), &x, None);
    for s in 0..2 {
        let row =
            |o: &Out| o.energy.as_ref().unwrap()[s * steps as usize..][..steps as usize].to_vec();
        let (ea, e1) = (row(&auto), row(&one));
        // automatic step: stopped early, with a finite energy
        assert!(
            auto.steps[s] < steps,
            "sample {s}: auto eta ran all {steps} steps"
        );
        let last = auto.steps[s] as usize - 1;
        assert!(ea[last].is_finite());
        // and is at the LASSO optimum: |Φᵀ(x − Φa)|_j ≤ λ (+ roundoff) everywhere
        let xs = &x[s * n..(s + 1) * n];
        let a = &auto.a[s * m..(s + 1) * m];
        let c = correlations(&phi, n, m, xs, a);
        assert!(
            c.iter().all(|v| v.abs() <= lambda as f64 * (1.0 + 1e-2)),
            "{c:?}"
        );
        // η = 1: never stops, and the energy blows up (or is no longer finite)
        assert_eq!(one.steps[s], steps, "sample {s}: eta = 1 converged?");
        let e_end = e1[steps as usize - 1];
        assert!(
            !e_end.is_finite() || e_end > 1e6 * ea[last],
            "sample {s}: eta = 1 ended at energy {e_end} (auto: {})",
            ea[last]
        );
    }
}

#[test]
fn relative_tol_is_scale_invariant_and_absolute_is_not() {
    let (n, m, batch) = (20, 40, 3);
    let (phi, x) = problem(41, n, m, batch, 4, false);
    let d = dict(&phi, n, m);
    let scale = 1000.0f32;
    let xs: Vec<f32> = x.iter().map(|v| v * scale).collect();
    let (lambda, steps) = (0.1f32, 20000);
    for tol in [1e-3f32, 1e-5] {
        let rel = LcaSpec::new(lambda).steps(steps).relative_tol(tol);
        let small = solve(&d, &rel, &x, None);
        let big = solve(
            &d,
            &LcaSpec::new(lambda * scale).steps(steps).relative_tol(tol),
            &xs,
            None,
        );
        assert!(small.steps.iter().all(|&t| t < steps), "{:?}", small.steps);
        assert_eq!(
            small.steps, big.steps,
            "relative tol {tol}: steps differ with scale"
        );
        let scaled: Vec<f32> = small.a.iter().map(|v| v * scale).collect();
        let err = rel_err(&big.a, &scaled);
        assert!(
            err < 1e-5,
            "relative tol {tol}: codes of 1000 x differ from 1000 x codes by {err}"
        );
        // absolute: the same tol stops x and 1000 x at different steps
        let abs = LcaSpec::new(lambda).steps(steps).tol(tol);
        let small_abs = solve(&d, &abs, &x, None);
        let big_abs = solve(
            &d,
            &LcaSpec::new(lambda * scale).steps(steps).tol(tol),
            &xs,
            None,
        );
        assert_ne!(
            small_abs.steps, big_abs.steps,
            "absolute tol {tol} is scale-invariant?"
        );
        assert!(
            big_abs
                .steps
                .iter()
                .zip(&small_abs.steps)
                .all(|(b, s)| b > s)
        );
    }
    // a zero sample with a relative tol stops at once (Δu = 0), not after T steps
    let zeros = vec![0.0f32; n];
    let out = solve(
        &d,
        &LcaSpec::new(lambda).steps(100).relative_tol(1e-3),
        &zeros,
        None,
    );
    assert_eq!(out.steps, vec![1]);
    assert!(out.a.iter().all(|&v| v == 0.0));
}

#[test]
fn relative_tol_stops_at_the_first_step_that_meets_it() {
    // Recompute the stop rule from the trace of u: run t steps without tol and compare.
    let (n, m) = (10, 16);
    let (phi, x) = problem(51, n, m, 1, 3, false);
    let d = dict(&phi, n, m);
    let tol = 1e-3f32;
    let out = solve(
        &d,
        &LcaSpec::new(0.1).steps(5000).relative_tol(tol),
        &x,
        None,
    );
    let t = out.steps[0];
    assert!(t > 2 && t < 5000);
    let bmax = (0..m)
        .map(|j| {
            (0..n)
                .map(|i| phi[i * m + j] as f64 * x[i] as f64)
                .sum::<f64>()
                .abs()
        })
        .fold(0.0, f64::max);
    let u_at = |k: u32| solve(&d, &LcaSpec::new(0.1).steps(k), &x, None).u;
    let du = |k: u32| max_abs_diff(&u_at(k), &u_at(k - 1));
    let limit = tol as f64 * bmax;
    assert!(du(t) < limit * 1.001, "step {t}: |du| {} >= {limit}", du(t));
    assert!(
        du(t - 1) >= limit * 0.999,
        "step {}: |du| {} < {limit} already",
        t - 1,
        du(t - 1)
    );
}

#[test]
fn allow_tf32_changes_nothing() {
    let (n, m) = (12, 20);
    let (phi, x) = problem(61, n, m, 3, 3, false);
    let d = dict(&phi, n, m);
    let spec = LcaSpec::new(0.1).steps(60).trace(true);
    assert_eq!(
        solve(&d, &spec, &x, None),
        solve(&d, &spec.allow_tf32(true), &x, None)
    );
}

mod c_abi_auto {
    use super::*;
    use fep_kernels::ffi::*;

    use super::c_abi::{c_dict_f32, last_error};

    /// fep_lca_dict_lambda_max, eta = 0 (automatic), FEP_LCA_TOL_RELATIVE and allow_tf32
    /// through the C ABI agree with the Rust API; bad codes and pointers are errors.
    #[test]
    fn lambda_max_auto_eta_and_relative_tol() {
        let (n, m, batch) = (9, 14, 2);
        let (phi, x) = problem(71, n, m, batch, 3, false);
        let d = dict(&phi, n, m);
        let h = c_dict_f32(&phi, n, m);
        let mut lmax = f64::NAN;
        assert_eq!(unsafe { fep_lca_dict_lambda_max(h, &mut lmax) }, FEP_OK);
        assert_eq!(lmax, d.lambda_max().unwrap());
        assert_eq!(
            unsafe { fep_lca_dict_lambda_max(h, null_mut()) },
            FEP_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("out"), "{}", last_error());
        assert_eq!(
            unsafe { fep_lca_dict_lambda_max(null(), &mut lmax) },
            FEP_ERR_INVALID_ARGUMENT
        );
        let steps = 500u32;
        let params = FepLcaParams {
            threshold: FEP_LCA_SOFT,
            lambda: 0.1,
            eta: 0.0,
            steps,
            tol: 1e-4,
            tol_mode: FEP_LCA_TOL_RELATIVE,
            allow_tf32: 1,
        };
        let bm = batch * m;
        let (mut u, mut a, mut s) = (vec![0f32; bm], vec![0f32; bm], vec![0u32; batch]);
        let st = unsafe {
            fep_lca_solve(
                h,
                null_mut(),
                FEP_DTYPE_F32,
                x.as_ptr().cast(),
                batch as u64,
                &params,
                null(),
                u.as_mut_ptr(),
                a.as_mut_ptr(),
                null_mut(),
                null_mut(),
                s.as_mut_ptr(),
            )
        };
        assert_eq!(st, FEP_OK, "{}", last_error());
        let want = solve(
            &d,
            &LcaSpec::new(0.1)
                .steps(steps)
                .relative_tol(1e-4)
                .allow_tf32(true),
            &x,
            None,
        );
        assert_eq!(
            (u.clone(), a.clone(), s.clone()),
            (want.u, want.a, want.steps)
        );
        // a bad tol_mode is named and leaves the outputs alone
        let bad = FepLcaParams {
            tol_mode: 2,
            ..params
        };
        let mut u2 = vec![7.0f32; bm];
        let st = unsafe {
            fep_lca_solve(
                h,
                null_mut(),
                FEP_DTYPE_F32,
                x.as_ptr().cast(),
                batch as u64,
                &bad,
                null(),
                u2.as_mut_ptr(),
                a.as_mut_ptr(),
                null_mut(),
                null_mut(),
                null_mut(),
            )
        };
        assert_eq!(st, FEP_ERR_INVALID_ARGUMENT);
        assert!(last_error().contains("tol_mode"), "{}", last_error());
        assert!(u2.iter().all(|&v| v == 7.0));
        unsafe { fep_lca_dict_free(h) };
    }
}
