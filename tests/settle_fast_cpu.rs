//! The fast CPU settling (`Device::cpu()`) beyond what the GPU suite (settle_gpu.rs with
//! `FEP_TEST_DEVICE=cpu`) covers: results independent of the thread count (bitwise), more than
//! one tile with partial tiles and per-sample early stops, any depth (no GPU layer limit), the
//! benchmark shape against the f64 reference at the f32 bound, f16/bf16 weights, and the
//! reference's validation and divergence errors with nothing written.

mod common;

use common::{randn, rel_err, rng};
use fep_kernels::settle::{
    self, Activation, Gradients, Init, Layer, Network, Precision, SettleOutputs, SettleSpec,
};
use fep_kernels::{Device, DeviceBuffer, Element, Error, bf16, f16};

/// Everything one learning step (or inference) writes, on the host.
#[derive(Debug, PartialEq)]
struct Out {
    x: Vec<Vec<f32>>,
    eps: Vec<Vec<f32>>,
    energy: Vec<f32>,
    trace: Vec<f32>,
    steps: Vec<u32>,
    gw: Vec<Vec<f32>>,
    gb: Vec<Vec<f32>>,
    gp: Vec<Vec<f32>>,
}

struct Case {
    widths: Vec<usize>,
    acts: Vec<Activation>,
    /// 0 scalar, 1 diagonal, 2 per sample (cycled over layers from this).
    kind: usize,
    batch: usize,
    learn: bool,
    spec: SettleSpec,
    seed: u64,
}

fn run<T: Element>(dev: &Device, c: &Case) -> Result<Out, Error> {
    let mut r = rng(c.seed);
    let depth = c.widths.len() - 1;
    let mut ws = vec![];
    let mut bs = vec![];
    let mut ps = vec![];
    let mut ds = vec![];
    let mut scalars = vec![];
    for l in 1..=depth {
        let (n, n_in) = (c.widths[l], c.widths[l - 1]);
        let w: Vec<T> = randn(&mut r, n * n_in, 1.0 / (n_in as f32).sqrt())
            .into_iter()
            .map(|v| T::from_f64(v as f64))
            .collect();
        let b: Vec<T> = randn(&mut r, n, 0.1)
            .into_iter()
            .map(|v| T::from_f64(v as f64))
            .collect();
        let p: Vec<f32> = randn(&mut r, c.batch * n, 0.3)
            .into_iter()
            .map(|v| (1.0 + v).clamp(0.5, 1.5))
            .collect();
        scalars.push(p[0]);
        ws.push(dev.upload(&w)?);
        bs.push(dev.upload(&b)?);
        ds.push(dev.upload(&p[..n])?);
        ps.push(dev.upload(&p)?);
    }
    let layers = (0..depth)
        .map(|l| {
            let precision = match (c.kind + l) % 3 {
                0 => Precision::Scalar(scalars[l]),
                1 => Precision::Diagonal(ds[l].view()),
                _ => Precision::PerSample(ps[l].view()),
            };
            Layer::new(ws[l].view(), c.acts[l % c.acts.len()], precision).bias(bs[l].view())
        })
        .collect();
    let net = Network::new(&c.widths, layers)?;
    let x0 = dev.upload(&randn(&mut r, c.batch * c.widths[0], 1.0))?;
    let target = dev.upload(&randn(&mut r, c.batch * c.widths[depth], 1.0))?;
    let to = |v: &[DeviceBuffer<f32>]| v.iter().map(|b| b.to_vec().unwrap()).collect();
    if c.learn {
        let o = settle::learn_step(&net, &c.spec, &x0.view(), &target.view(), None)?;
        Ok(Out {
            x: to(&o.state.x),
            eps: to(&o.state.eps),
            energy: o.state.energy.to_vec()?,
            trace: o.state.trace.as_ref().unwrap().to_vec()?,
            steps: o.state.steps.to_vec()?,
            gw: to(&o.grad_w),
            gb: to(&o.grad_b),
            gp: to(&o.grad_pi),
        })
    } else {
        let starts: Vec<DeviceBuffer<f32>> = (1..=depth)
            .map(|l| dev.upload(&randn(&mut r, c.batch * c.widths[l], 1.0)))
            .collect::<Result<_, _>>()?;
        let views: Vec<_> = starts.iter().map(|b| b.view()).collect();
        let o = settle::infer(&net, &c.spec, &x0.view(), Some(&views))?;
        Ok(Out {
            x: to(&o.x),
            eps: to(&o.eps),
            energy: o.energy.to_vec()?,
            trace: o.trace.as_ref().unwrap().to_vec()?,
            steps: o.steps.to_vec()?,
            gw: vec![],
            gb: vec![],
            gp: vec![],
        })
    }
}

/// ‖a − b‖ / ‖scale‖.
fn err_vs(a: &[f32], b: &[f32], scale: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let den: f64 = scale.iter().map(|&v| (v as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// ‖a − b‖ / max(‖b‖, 1e-6 √len): relative, with an absolute floor for gradients that are
/// ~0 in the reference (deep layers whose errors settle below f32's resolution of x).
fn grad_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|&v| (v as f64).powi(2)).sum();
    num.sqrt() / den.sqrt().max(1e-6 * (b.len() as f64).sqrt())
}

/// The fast path against the reference: x and the energies relative, ε against ‖x‖, the
/// gradients relative to their own norm (with a floor: `grad_err`).
fn close(c: &Case, fast: &Out, reference: &Out, tol: f64) {
    for l in 0..fast.x.len() {
        let e = rel_err(&fast.x[l], &reference.x[l]);
        assert!(e < tol, "x[{l}] {e:e}");
        let e = err_vs(&fast.eps[l], &reference.eps[l], &reference.x[l]);
        assert!(e < tol, "eps[{l}] {e:e}");
    }
    let e = rel_err(&fast.trace, &reference.trace);
    assert!(e < tol, "trace {e:e}");
    assert_eq!(fast.steps, reference.steps);
    if c.learn {
        for l in 0..fast.gw.len() {
            // A layer whose settled errors are far below f32's resolution of x (deep layers
            // that 20 steps barely reach) has gradients of rounding noise on any f32 path.
            let norm = reference.gw[l]
                .iter()
                .map(|&v| (v as f64).powi(2))
                .sum::<f64>();
            if norm.sqrt() < 1e-3 {
                continue;
            }
            let e = grad_err(&fast.gw[l], &reference.gw[l]);
            assert!(e < 10.0 * tol, "grad_w[{l}] {e:e}");
            let e = grad_err(&fast.gb[l], &reference.gb[l]);
            assert!(e < 10.0 * tol, "grad_b[{l}] {e:e}");
            let e = grad_err(&fast.gp[l], &reference.gp[l]);
            assert!(e < 10.0 * tol, "grad_pi[{l}] {e:e}");
        }
    }
}

fn case(widths: &[usize], batch: usize, learn: bool, seed: u64) -> Case {
    Case {
        widths: widths.to_vec(),
        acts: Activation::ALL.to_vec(),
        kind: seed as usize % 3,
        batch,
        learn,
        spec: SettleSpec::new(0.1).momentum(0.5).steps(20),
        seed,
    }
}

#[test]
fn fast_settle_is_independent_of_the_thread_count() {
    // Several tiles and a partial one, every precision kind, early stops inside tiles.
    let mut cases = vec![
        case(&[20, 33, 17, 5], 101, true, 1),
        case(&[9, 40, 7], 70, false, 2),
    ];
    cases[1].spec = cases[1].spec.tol(0.01).steps(60);
    cases.push(case(&[12, 24, 6], 97, true, 3));
    cases[2].spec = cases[2].spec.log_det(true).tol(1e-3);
    for c in &cases {
        let mut outs = vec![];
        for threads in [1, 2, 3] {
            fep_kernels::set_num_threads(threads).unwrap();
            outs.push(run::<f32>(&Device::cpu(), c).unwrap());
        }
        fep_kernels::set_num_threads(0).unwrap();
        assert_eq!(outs[0], outs[1], "1 vs 2 threads");
        assert_eq!(outs[0], outs[2], "1 vs 3 threads");
    }
}

#[test]
fn fast_settle_matches_the_reference_across_tiles_and_early_stops() {
    let mut c = case(&[9, 40, 7], 70, false, 2);
    c.spec = c.spec.tol(0.01).momentum(0.0).steps(60);
    let fast = run::<f32>(&Device::cpu(), &c).unwrap();
    let reference = run::<f32>(&Device::reference(), &c).unwrap();
    assert!(fast.steps.iter().any(|&s| s < 60), "{:?}", fast.steps);
    close(&c, &fast, &reference, 1e-5);
    for (kind, seed) in [(0, 10), (1, 11), (2, 12)] {
        let mut c = case(&[64, 64, 10], 100, true, seed);
        c.kind = kind;
        let fast = run::<f32>(&Device::cpu(), &c).unwrap();
        let reference = run::<f32>(&Device::reference(), &c).unwrap();
        close(&c, &fast, &reference, 1e-5);
    }
}

/// No GPU layer table: 17 layers settle on the fast path as on the reference.
#[test]
fn fast_settle_takes_any_depth() {
    let mut c = case(&[3; 18], 5, true, 20);
    c.acts = vec![Activation::Tanh];
    let fast = run::<f32>(&Device::cpu(), &c).unwrap();
    let reference = run::<f32>(&Device::reference(), &c).unwrap();
    close(&c, &fast, &reference, 1e-5);
}

/// f16 and bf16 weights are converted to f32 exactly once: the fast path is as close to the
/// reference as with f32 weights.
#[test]
fn fast_settle_half_precision_weights() {
    let c = case(&[16, 31, 9], 40, true, 30);
    let fast = run::<f16>(&Device::cpu(), &c).unwrap();
    let reference = run::<f16>(&Device::reference(), &c).unwrap();
    close(&c, &fast, &reference, 1e-5);
    let fast = run::<bf16>(&Device::cpu(), &c).unwrap();
    let reference = run::<bf16>(&Device::reference(), &c).unwrap();
    close(&c, &fast, &reference, 1e-5);
}

/// The reference's checks with the same names, and nothing written; a diverging settle is
/// `Diverged` on both.
#[test]
fn fast_settle_errors_as_the_reference() {
    let (n0, n1, n2) = (3usize, 4usize, 2usize);
    let batch = 2;
    let mut w1 = vec![0.3f32; n1 * n0];
    let w2 = vec![-0.2f32; n2 * n1];
    let x0 = vec![0.5f32; batch * n0];
    let target = vec![1.0f32; batch * n2];
    let outcome = |dev: &Device,
                   w1: &[f32],
                   x0: &[f32],
                   target: &[f32],
                   start: Option<&[f32]>,
                   spec: SettleSpec|
     -> (Result<(), Error>, Vec<f32>) {
        let w1 = dev.upload(w1).unwrap();
        let w2 = dev.upload(&w2).unwrap();
        let net = Network::new(
            &[n0, n1, n2],
            vec![
                Layer::new(w1.view(), Activation::Tanh, Precision::Scalar(1.0)),
                Layer::new(w2.view(), Activation::Gelu, Precision::Scalar(2.0)),
            ],
        )
        .unwrap();
        let x0 = dev.upload(x0).unwrap();
        let target = dev.upload(target).unwrap();
        let mut x1 = dev
            .upload(start.unwrap_or(&vec![7.0f32; batch * n1]))
            .unwrap();
        let mut x2 = dev.upload(&vec![7.0f32; batch * n2]).unwrap();
        let mut e1 = dev.upload(&vec![7.0f32; batch * n1]).unwrap();
        let mut e2 = dev.upload(&vec![7.0f32; batch * n2]).unwrap();
        let mut gw1 = dev.upload(&vec![7.0f32; n1 * n0]).unwrap();
        let mut gw2 = dev.upload(&vec![7.0f32; n2 * n1]).unwrap();
        let mut gb1 = dev.upload(&vec![7.0f32; n1]).unwrap();
        let mut gb2 = dev.upload(&vec![7.0f32; n2]).unwrap();
        let spec = if start.is_some() {
            spec.init(Init::FromOutputs)
        } else {
            spec
        };
        let r = settle::learn_step_into(
            &net,
            &spec,
            &x0.view(),
            &target.view(),
            SettleOutputs {
                x: vec![x1.view_mut(), x2.view_mut()],
                eps: vec![e1.view_mut(), e2.view_mut()],
                energy: None,
                trace: None,
                steps: None,
            },
            Gradients {
                weights: vec![gw1.view_mut(), gw2.view_mut()],
                biases: vec![gb1.view_mut(), gb2.view_mut()],
                precisions: vec![],
            },
            dev.default_stream(),
        );
        let mut all = vec![];
        for b in [&x2, &e1, &e2, &gw1, &gw2, &gb1, &gb2] {
            all.extend(b.to_vec().unwrap());
        }
        (r, all)
    };
    let spec = SettleSpec::new(0.1).steps(5);
    let mut bad_x0 = x0.clone();
    bad_x0[4] = f32::NAN;
    let mut bad_target = target.clone();
    bad_target[1] = f32::INFINITY;
    let mut bad_start = vec![0.1f32; batch * n1];
    bad_start[2] = f32::NAN;
    w1[5] = f32::NAN;
    let good_w1 = vec![0.3f32; n1 * n0];
    // (the argument named, W_1, x0, target, the start of x_1)
    type BadCase<'a> = (&'a str, &'a [f32], &'a [f32], &'a [f32], Option<&'a [f32]>);
    let cases: [BadCase<'_>; 4] = [
        ("layers[0].weight", &w1, &x0, &target, None),
        ("x0", &good_w1, &bad_x0, &target, None),
        ("target", &good_w1, &x0, &bad_target, None),
        ("x[0] (the start)", &good_w1, &x0, &target, Some(&bad_start)),
    ];
    for (name, w, x, t, s) in cases {
        for dev in [Device::cpu(), Device::reference()] {
            let (r, written) = outcome(&dev, w, x, t, s, spec);
            match r {
                Err(Error::InvalidArgument { name: n, .. }) if n == name => {}
                other => panic!("{name} on {dev:?}: {other:?}"),
            }
            assert!(written.iter().all(|&v| v == 7.0), "{name}: written");
        }
    }
    // η far too large: the state leaves f32 on both paths; nothing is written.
    for dev in [Device::cpu(), Device::reference()] {
        let big = vec![40.0f32; n1 * n0];
        let (r, written) = outcome(
            &dev,
            &big,
            &x0,
            &target,
            None,
            SettleSpec::new(1e3).steps(50),
        );
        match r {
            Err(Error::Diverged(m)) => assert!(m.contains("lower eta"), "{m}"),
            other => panic!("{dev:?}: expected Diverged, got {other:?}"),
        }
        assert!(written.iter().all(|&v| v == 7.0), "diverged: written");
    }
}

/// Rough timings (not a benchmark; run by hand with `--ignored --nocapture`): one learning step,
/// f_1 = identity and tanh above, unit precisions, η = 0.1, β = 0, T steps from the feedforward
/// start, 1 thread, the best of several repetitions, fast path vs reference.
#[test]
#[ignore]
fn fast_settle_rough_timings() {
    fep_kernels::set_num_threads(1).unwrap();
    let configs: [(&[usize], usize, u32); 5] = [
        (&[64, 64, 10], 64, 20),
        (&[64, 64, 10], 256, 20),
        (&[784, 128, 128, 128, 10], 256, 8),
        (&[784, 128, 128, 128, 10], 256, 32),
        (&[784, 128, 128, 128, 10], 64, 20),
    ];
    // FEP_SETTLE_TIMING=i: only configuration i, the fast path only, many repetitions (to
    // profile).
    let only: Option<usize> = std::env::var("FEP_SETTLE_TIMING")
        .ok()
        .and_then(|v| v.parse().ok());
    for (i, (widths, batch, steps)) in configs.into_iter().enumerate() {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        let mut r = rng(5);
        let depth = widths.len() - 1;
        let mut times = vec![];
        for dev in [Device::cpu(), Device::reference()] {
            let ws: Vec<DeviceBuffer<f32>> = (1..=depth)
                .map(|l| {
                    let w = randn(
                        &mut r,
                        widths[l] * widths[l - 1],
                        1.0 / (widths[l - 1] as f32).sqrt(),
                    );
                    dev.upload(&w).unwrap()
                })
                .collect();
            let bs: Vec<DeviceBuffer<f32>> = (1..=depth)
                .map(|l| dev.upload(&randn(&mut r, widths[l], 0.1)).unwrap())
                .collect();
            let layers = (0..depth)
                .map(|l| {
                    let f = if l == 0 {
                        Activation::Identity
                    } else {
                        Activation::Tanh
                    };
                    Layer::new(ws[l].view(), f, Precision::Scalar(1.0)).bias(bs[l].view())
                })
                .collect();
            let net = Network::new(widths, layers).unwrap();
            let x0 = dev.upload(&randn(&mut r, batch * widths[0], 1.0)).unwrap();
            let target = dev
                .upload(&randn(&mut r, batch * widths[depth], 1.0))
                .unwrap();
            let spec = SettleSpec::new(0.1).steps(steps);
            if only.is_some() && dev.is_reference() {
                times.push(f64::NAN);
                continue;
            }
            let reps = match (dev.is_reference(), only) {
                (true, _) => 3,
                (false, None) => 30,
                (false, Some(_)) => 1000,
            };
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                let t = std::time::Instant::now();
                let o = settle::learn_step(&net, &spec, &x0.view(), &target.view(), None).unwrap();
                best = best.min(t.elapsed().as_secs_f64());
                std::hint::black_box(o);
            }
            times.push(best * 1e3);
        }
        println!(
            "{widths:?} B {batch} T {steps}: fast {:.3} ms, reference {:.2} ms ({:.0}x)",
            times[0],
            times[1],
            times[1] / times[0]
        );
    }
    fep_kernels::set_num_threads(0).unwrap();
}
