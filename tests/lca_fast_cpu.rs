//! The fast CPU LCA (`Device::cpu()`, src/lca/fast.rs) on what the GPU suite (run on it with
//! `FEP_TEST_DEVICE=cpu`) does not cover: bitwise independence of the thread count and of the
//! batch a sample is solved in (its tile, its neighbours, sparse versus dense inhibition), the
//! dense (sgemm) inhibition path against the f64 reference, divergence (NaN never converges),
//! bad input leaving outputs untouched, a failed learning step leaving Φ and G unchanged, and
//! f16/bf16 inputs. Nothing of the fast path routes to the reference, so there is no fallback
//! case to test.

// `!(err < tol)` on purpose: a NaN error must fail.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

mod common;

use std::sync::Mutex;

use common::{randn, rel_err, rng, unit_dictionary};
use fep_kernels::lca::{Dictionary, DictionaryOptions, LcaSpec, Threshold};
use fep_kernels::{Device, Element, Error, View, bf16, f16};

/// set_num_threads is process-wide: tests that change it run one at a time.
static THREADS: Mutex<()> = Mutex::new(());

#[derive(Debug, Clone, PartialEq)]
struct Out {
    u: Vec<f32>,
    a: Vec<f32>,
    energy: Vec<f32>,
    active: Vec<u32>,
    steps: Vec<u32>,
}

fn dict_on(dev: &Device, phi: &[f32], n: usize, m: usize) -> Dictionary {
    Dictionary::new(
        &View::host_on(dev, phi).unwrap(),
        n,
        m,
        DictionaryOptions::default(),
    )
    .unwrap()
}

fn solve<T: Element>(d: &Dictionary, spec: &LcaSpec, x: &[T], u0: Option<&[f32]>) -> Out {
    let dev = d.device().clone();
    let x = View::host_on(&dev, x).unwrap();
    let u0 = u0.map(|u| View::host_on(&dev, u).unwrap());
    let r = d.solve(spec, &x, u0.as_ref()).unwrap();
    Out {
        u: r.u.to_vec().unwrap(),
        a: r.a.to_vec().unwrap(),
        energy: r.energy.map(|e| e.to_vec().unwrap()).unwrap_or_default(),
        active: r.active.map(|e| e.to_vec().unwrap()).unwrap_or_default(),
        steps: r.steps.to_vec().unwrap(),
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn same(p: &Out, q: &Out) -> bool {
    bits(&p.u) == bits(&q.u)
        && bits(&p.a) == bits(&q.a)
        && bits(&p.energy) == bits(&q.energy)
        && p.active == q.active
        && p.steps == q.steps
}

/// A dictionary whose codes are dense at small λ (many atoms active: the sgemm path) and sparse
/// at large λ (the gather path).
fn problem(seed: u64, n: usize, m: usize, batch: usize) -> (Vec<f32>, Vec<f32>) {
    let mut g = rng(seed);
    let phi = unit_dictionary(&mut g, n, m);
    let x = randn(&mut g, batch * n, 1.0);
    (phi, x)
}

/// Mean active fraction after the last step.
fn active_fraction(o: &Out) -> f64 {
    o.a.iter().filter(|&&v| v != 0.0).count() as f64 / o.a.len() as f64
}

#[test]
fn thread_count_does_not_change_a_bit() {
    let _g = THREADS.lock().unwrap_or_else(|p| p.into_inner());
    let (n, m, batch) = (24, 96, 53); // 53: four tiles, the last one partial
    let (phi, x) = problem(1, n, m, batch);
    let u0 = randn(&mut rng(2), batch * m, 0.3);
    let cpu = Device::cpu();
    let d = dict_on(&cpu, &phi, n, m);
    let mut failures = Vec::new();
    for th in Threshold::ALL {
        for (lambda, tol) in [(0.02f32, 0.0f32), (0.3, 1e-4)] {
            let spec = LcaSpec::new(lambda)
                .threshold(th)
                .steps(60)
                .tol(tol)
                .trace(true);
            let mut outs = Vec::new();
            for threads in [1usize, 2, 3] {
                fep_kernels::set_num_threads(threads).unwrap();
                outs.push((solve(&d, &spec, &x, None), solve(&d, &spec, &x, Some(&u0))));
            }
            for (i, o) in outs.iter().enumerate().skip(1) {
                if !same(&o.0, &outs[0].0) || !same(&o.1, &outs[0].1) {
                    failures.push(format!("{th:?} λ {lambda} tol {tol}: run {i} differs"));
                }
            }
        }
    }
    // learning too
    let a = solve(&d, &LcaSpec::new(0.1).steps(30), &x, None).a;
    let mut learned = Vec::new();
    for threads in [1usize, 3] {
        fep_kernels::set_num_threads(threads).unwrap();
        let mut dl = dict_on(&cpu, &phi, n, m);
        dl.learn(&View::host(&x), &View::host(&a), 0.3, cpu.default_stream())
            .unwrap();
        learned.push((dl.phi().unwrap(), dl.gram().unwrap()));
    }
    fep_kernels::set_num_threads(0).unwrap();
    assert!(
        bits(&learned[0].0) == bits(&learned[1].0) && bits(&learned[0].1) == bits(&learned[1].1),
        "learning differs between 1 and 3 threads"
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A sample's result does not depend on the batch it is in: alone, or at any position of a
/// larger batch (another tile, other neighbours, some of which take the dense path while it
/// takes the sparse one), bitwise, trace and early stop included.
#[test]
fn a_sample_does_not_depend_on_its_batch() {
    let (n, m, batch) = (20, 64, 37);
    let (phi, mut x) = problem(3, n, m, batch);
    // Samples of very different sizes: at λ = 0.15 the large ones are dense, the small sparse.
    for s in 0..batch {
        let scale = if s % 3 == 0 { 8.0 } else { 0.4 };
        x[s * n..(s + 1) * n].iter_mut().for_each(|v| *v *= scale);
    }
    let d = dict_on(&Device::cpu(), &phi, n, m);
    for th in [Threshold::Soft, Threshold::Hard] {
        let spec = LcaSpec::new(0.15)
            .threshold(th)
            .steps(80)
            .tol(1e-4)
            .trace(true);
        let all = solve(&d, &spec, &x, None);
        let t = 80;
        let dense = (0..batch)
            .filter(|&s| {
                all.a[s * m..(s + 1) * m]
                    .iter()
                    .filter(|&&v| v != 0.0)
                    .count()
                    * 2
                    > m
            })
            .count();
        assert!(
            dense > 0 && dense < batch,
            "{th:?}: want a mix of dense and sparse samples, got {dense} of {batch} dense"
        );
        for s in [0usize, 1, 15, 16, 17, 36] {
            let one = solve(&d, &spec, &x[s * n..(s + 1) * n], None);
            let row = Out {
                u: all.u[s * m..(s + 1) * m].to_vec(),
                a: all.a[s * m..(s + 1) * m].to_vec(),
                energy: all.energy[s * t..(s + 1) * t].to_vec(),
                active: all.active[s * t..(s + 1) * t].to_vec(),
                steps: vec![all.steps[s]],
            };
            assert!(same(&row, &one), "{th:?}: sample {s} alone differs");
        }
    }
}

/// Dense codes (most units active: the packed sgemm inhibition) and sparse codes (the G-row
/// gather) against the f64 reference at DESIGN §6's f32 bound, every threshold, with u0 and the
/// trace.
#[test]
fn dense_and_sparse_inhibition_match_the_reference() {
    let (n, m, batch) = (48, 80, 21);
    let (phi, x) = problem(5, n, m, batch);
    let u0 = randn(&mut rng(6), batch * m, 0.2);
    let fast = dict_on(&Device::cpu(), &phi, n, m);
    let refd = dict_on(&Device::reference(), &phi, n, m);
    let eta = fast.auto_eta().unwrap() * 0.9;
    for th in Threshold::ALL {
        for lambda in [0.005f32, 1.2] {
            let spec = LcaSpec::new(lambda)
                .threshold(th)
                .eta(eta)
                .steps(40)
                .trace(true);
            for u0 in [None, Some(&u0[..])] {
                let f = solve(&fast, &spec, &x, u0);
                let r = solve(&refd, &spec, &x, u0);
                let (eu, ea, ee) = (
                    rel_err(&f.u, &r.u),
                    rel_err(&f.a, &r.a),
                    rel_err(&f.energy, &r.energy),
                );
                let label = format!(
                    "{th:?} λ {lambda} u0 {} (active {:.2})",
                    u0.is_some(),
                    active_fraction(&r)
                );
                assert!(
                    eu < 1e-5 && ea < 1e-5 && ee < 1e-4,
                    "{label}: u {eu:e} a {ea:e} energy {ee:e}"
                );
                assert_eq!(f.steps, r.steps, "{label}");
            }
        }
    }
    // the small λ really is dense and the large one sparse (both paths ran)
    let dense = solve(&fast, &LcaSpec::new(0.005).eta(eta).steps(40), &x, None);
    let sparse = solve(&fast, &LcaSpec::new(1.2).eta(eta).steps(40), &x, None);
    assert!(active_fraction(&dense) > 0.5);
    assert!(active_fraction(&sparse) < 0.25);
}

/// f16 and bf16 inputs are widened exactly: the same values given as f32 give bitwise the same
/// result (x and Φ).
#[test]
fn half_inputs_equal_their_f32_values() {
    let (n, m, batch) = (16, 40, 9);
    let (phi, x) = problem(7, n, m, batch);
    let cpu = Device::cpu();
    let spec = LcaSpec::new(0.1).steps(50).trace(true);
    let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let xh32: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
    let xb32: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
    let d = dict_on(&cpu, &phi, n, m);
    assert!(same(
        &solve(&d, &spec, &xh, None),
        &solve(&d, &spec, &xh32, None)
    ));
    assert!(same(
        &solve(&d, &spec, &xb, None),
        &solve(&d, &spec, &xb32, None)
    ));
    // a bf16 dictionary: stored as its exact f32 values
    let pb: Vec<bf16> = phi.iter().map(|&v| bf16::from_f32(v)).collect();
    let pb32: Vec<f32> = pb.iter().map(|v| v.to_f32()).collect();
    let opts = DictionaryOptions {
        check_unit_norm: false,
    };
    let db = Dictionary::new(&View::host(&pb), n, m, opts).unwrap();
    let d32 = Dictionary::new(&View::host(&pb32), n, m, opts).unwrap();
    assert_eq!(bits(&db.phi().unwrap()), bits(&pb32));
    assert_eq!(bits(&db.gram().unwrap()), bits(&d32.gram().unwrap()));
    assert!(same(
        &solve(&db, &spec, &x, None),
        &solve(&d32, &spec, &x, None)
    ));
    // and both are within the f32 bound of the reference on the same values
    let r = solve(
        &dict_on(&Device::reference(), &phi, n, m),
        &spec,
        &xh32,
        None,
    );
    let f = solve(&d, &spec, &xh, None);
    assert!(rel_err(&f.u, &r.u) < 1e-5 && rel_err(&f.a, &r.a) < 1e-5);
}

/// η = 1 on nearly parallel atoms diverges: NaN/Inf never counts as converged (all T steps,
/// as in the reference), and nothing panics.
#[test]
fn divergence_never_converges() {
    let (n, m) = (6, 8);
    let mut phi = vec![0f32; n * m];
    for j in 0..m {
        // eight atoms close to e0
        let mut col = [0f32; 6];
        col[0] = 1.0;
        col[1 + j % 5] = 0.05 * (j as f32 + 1.0);
        let nrm = col.iter().map(|v| v * v).sum::<f32>().sqrt();
        for i in 0..n {
            phi[i * m + j] = col[i] / nrm;
        }
    }
    let x: Vec<f32> = (0..2 * n)
        .map(|k| if k % n == 0 { 3.0 } else { 0.0 })
        .collect();
    let spec = LcaSpec::new(0.05)
        .eta(1.0)
        .steps(3000)
        .tol(1e-3)
        .trace(true);
    let f = solve(&dict_on(&Device::cpu(), &phi, n, m), &spec, &x, None);
    let r = solve(&dict_on(&Device::reference(), &phi, n, m), &spec, &x, None);
    assert_eq!(f.steps, r.steps);
    assert_eq!(f.steps, vec![3000, 3000]);
    assert!(f.u.iter().any(|v| !v.is_finite()));
}

/// Rejected calls write nothing, with the reference's error naming the same argument.
#[test]
fn bad_input_leaves_outputs_untouched() {
    let (n, m, batch) = (8, 12, 3);
    let (phi, x) = problem(9, n, m, batch);
    let cpu = Device::cpu();
    let d = dict_on(&cpu, &phi, n, m);
    let spec = LcaSpec::new(0.1).steps(5).trace(true);
    let run = |x: &[f32], u0: Option<&[f32]>, spec: &LcaSpec| {
        let mut u = vec![7f32; batch * m];
        let mut a = vec![7f32; batch * m];
        let mut e = vec![7f32; batch * 5];
        let mut c = vec![7u32; batch * 5];
        let mut s = vec![7u32; batch];
        let u0v = u0.map(View::host);
        let res = d.solve_into(
            spec,
            &View::host(x),
            u0v.as_ref(),
            fep_kernels::lca::LcaOutputs {
                u: fep_kernels::ViewMut::host(&mut u),
                a: fep_kernels::ViewMut::host(&mut a),
                energy: Some(fep_kernels::ViewMut::host(&mut e)),
                active: Some(fep_kernels::ViewMut::host(&mut c)),
                steps: Some(fep_kernels::ViewMut::host(&mut s)),
            },
            cpu.default_stream(),
        );
        let untouched =
            u.iter().chain(&a).chain(&e).all(|&v| v == 7.0) && c.iter().chain(&s).all(|&v| v == 7);
        (res, untouched)
    };
    let named = |r: &Result<(), Error>, arg: &str| matches!(r, Err(Error::InvalidArgument { name, .. }) if name == arg);
    let mut bad = x.clone();
    bad[5] = f32::NAN;
    let (r, untouched) = run(&bad, None, &spec);
    assert!(named(&r, "x") && untouched, "{r:?}");
    let mut u0 = vec![0f32; batch * m];
    u0[3] = f32::INFINITY;
    let (r, untouched) = run(&x, Some(&u0), &spec);
    assert!(named(&r, "u0") && untouched, "{r:?}");
    let (r, untouched) = run(&x, None, &LcaSpec::new(-1.0));
    assert!(named(&r, "lambda") && untouched, "{r:?}");
    // check_finite off: a NaN input runs (no panic) and gives NaN codes somewhere
    let (r, untouched) = run(&bad, None, &spec.check_finite(false));
    assert!(r.is_ok() && !untouched);
}

/// A learning step that overflows f32 is rejected naming `lr`, and Φ, G stay bitwise as they
/// were; a normal step matches the reference's at the f32 bound.
#[test]
fn learning_overflow_leaves_the_dictionary_and_normal_steps_match() {
    let (n, m, batch) = (10, 14, 6);
    let (phi, x) = problem(11, n, m, batch);
    let cpu = Device::cpu();
    let mut d = dict_on(&cpu, &phi, n, m);
    let (p0, g0) = (d.phi().unwrap(), d.gram().unwrap());
    let a = vec![1e30f32; batch * m];
    let r = d.learn(&View::host(&x), &View::host(&a), 1.0, cpu.default_stream());
    assert!(
        matches!(&r, Err(Error::InvalidArgument { name, .. }) if name == "lr"),
        "{r:?}"
    );
    assert_eq!(bits(&d.phi().unwrap()), bits(&p0));
    assert_eq!(bits(&d.gram().unwrap()), bits(&g0));
    let mut bad = x.clone();
    bad[0] = f32::NAN;
    let a = solve(&d, &LcaSpec::new(0.1).steps(30), &x, None).a;
    let r = d.learn(
        &View::host(&bad),
        &View::host(&a),
        0.1,
        cpu.default_stream(),
    );
    assert!(
        matches!(&r, Err(Error::InvalidArgument { name, .. }) if name == "x"),
        "{r:?}"
    );
    assert_eq!(bits(&d.phi().unwrap()), bits(&p0));
    let refdev = Device::reference();
    let mut dr = dict_on(&refdev, &phi, n, m);
    d.learn(&View::host(&x), &View::host(&a), 0.5, cpu.default_stream())
        .unwrap();
    dr.learn(
        &View::host_on(&refdev, &x).unwrap(),
        &View::host_on(&refdev, &a).unwrap(),
        0.5,
        refdev.default_stream(),
    )
    .unwrap();
    let (ep, eg) = (
        rel_err(&d.phi().unwrap(), &dr.phi().unwrap()),
        rel_err(&d.gram().unwrap(), &dr.gram().unwrap()),
    );
    assert!(ep < 1e-5 && eg < 1e-5, "Φ {ep:e} G {eg:e}");
    // λmax is recomputed after learning, and agrees with the reference's
    let (lf, lr) = (d.lambda_max().unwrap(), dr.lambda_max().unwrap());
    assert!((lf - lr).abs() < 1e-5 * lr, "{lf} vs {lr}");
}
