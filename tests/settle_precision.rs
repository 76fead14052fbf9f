//! Learnable precision (the free energy with the −½ ln|Π| normaliser) on the CPU reference:
//! every precision gradient against finite differences of the settled free energy, the
//! normaliser in the energies, per-sample precision, log-space SGD, learning from a given
//! start, the demonstration that learning precision recovers known noise levels, and the
//! stability bound on the step size.

// `!(err < tol)` on purpose: a NaN error must fail.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

mod common;

use common::{randn, rng};
use fep_kernels::Device;
use fep_kernels::settle::{self, Activation, Layer, Network, Precision, SettleSpec};

/// A small settled problem: widths [3, 5, 4], tanh, batch 6.
struct Problem {
    widths: Vec<usize>,
    w: Vec<Vec<f32>>,
    x0: Vec<f32>,
    y: Vec<f32>,
    batch: usize,
}

fn problem(seed: u64) -> Problem {
    let mut r = rng(seed);
    let widths = vec![3, 5, 4];
    let batch = 6;
    let w = (1..widths.len())
        .map(|l| randn(&mut r, widths[l] * widths[l - 1], 0.5))
        .collect();
    Problem {
        x0: randn(&mut r, batch * widths[0], 1.0),
        y: randn(&mut r, batch * widths[2], 1.0),
        widths,
        w,
        batch,
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Scalar,
    Diagonal,
    PerSample,
}

/// The precision values of layer l for `kind` (scalar: one value).
fn precision_values(kind: Kind, n: usize, batch: usize, seed: u64) -> Vec<f32> {
    let len = match kind {
        Kind::Scalar => 1,
        Kind::Diagonal => n,
        Kind::PerSample => batch * n,
    };
    (0..len)
        .map(|i| 0.5 + ((i as u64 * 7 + seed * 3) % 11) as f32 / 10.0)
        .collect()
}

fn spec() -> SettleSpec {
    // Settled far past f32 resolution: the envelope theorem needs the minimum.
    SettleSpec::new(0.2).steps(3000).log_det(true)
}

/// learn_step with the given precisions: (mean energy (F), grad_pi per layer).
fn learn(p: &Problem, kinds: [Kind; 2], pis: &[Vec<f32>]) -> (f64, Vec<Vec<f32>>) {
    let layers = (0..2)
        .map(|l| {
            let precision = match kinds[l] {
                Kind::Scalar => Precision::Scalar(pis[l][0]),
                Kind::Diagonal => Precision::Diagonal(common::host(&pis[l])),
                Kind::PerSample => Precision::PerSample(common::host(&pis[l])),
            };
            Layer::new(common::host(&p.w[l]), Activation::Tanh, precision)
        })
        .collect();
    let net = Network::new(&p.widths, layers).expect("network");
    let r = settle::learn_step(
        &net,
        &spec(),
        &common::host(&p.x0),
        &common::host(&p.y),
        None,
    )
    .expect("learn step");
    let energy = r.state.energy.to_vec().expect("energy");
    let mean = energy.iter().map(|&e| e as f64).sum::<f64>() / p.batch as f64;
    (
        mean,
        r.grad_pi
            .iter()
            .map(|g| g.to_vec().expect("grad"))
            .collect(),
    )
}

/// Every precision gradient (scalar, diagonal and per-sample, on the hidden and the clamped
/// output layer) against central differences of the batch-mean settled free energy: at the
/// settled state the envelope theorem makes ∂F/∂π the total derivative.
#[test]
fn precision_gradients_match_finite_differences() {
    let p = problem(1);
    for kinds in [
        [Kind::Scalar, Kind::Scalar],
        [Kind::Diagonal, Kind::Diagonal],
        [Kind::PerSample, Kind::Diagonal],
        [Kind::Scalar, Kind::PerSample],
    ] {
        let pis: Vec<Vec<f32>> = (0..2)
            .map(|l| precision_values(kinds[l], p.widths[l + 1], p.batch, l as u64))
            .collect();
        let (_, grads) = learn(&p, kinds, &pis);
        for l in 0..2 {
            assert_eq!(
                grads[l].len(),
                pis[l].len(),
                "{kinds:?} layer {l}: gradient length"
            );
            for i in 0..pis[l].len() {
                let h = 1e-2 * pis[l][i];
                let mut plus = pis.clone();
                plus[l][i] += h;
                let mut minus = pis.clone();
                minus[l][i] -= h;
                let fd = (learn(&p, kinds, &plus).0 - learn(&p, kinds, &minus).0)
                    / (plus[l][i] - minus[l][i]) as f64;
                let got = grads[l][i] as f64;
                let err = (got - fd).abs() / (fd.abs() + 1e-2);
                assert!(
                    err < 5e-3,
                    "{kinds:?} layer {l} element {i}: grad {got:.6e}, finite difference \
                     {fd:.6e} (rel err {err:.1e})"
                );
            }
        }
    }
}

/// The normaliser: F − E = −½ Σ_l ln|Π_l| per sample, in the energy and every trace entry,
/// and nothing else changes (states, errors, weight gradients).
#[test]
fn log_det_adds_the_normaliser_and_changes_nothing_else() {
    let p = problem(2);
    let pis = [
        precision_values(Kind::PerSample, 5, p.batch, 3),
        precision_values(Kind::Diagonal, 4, p.batch, 4),
    ];
    let layers = || {
        vec![
            Layer::new(
                common::host(&p.w[0]),
                Activation::Tanh,
                Precision::PerSample(common::host(&pis[0])),
            ),
            Layer::new(
                common::host(&p.w[1]),
                Activation::Tanh,
                Precision::Diagonal(common::host(&pis[1])),
            ),
        ]
    };
    let net = Network::new(&p.widths, layers()).unwrap();
    let run = |log_det: bool| {
        let spec = SettleSpec::new(0.1).steps(30).log_det(log_det);
        settle::learn_step(&net, &spec, &common::host(&p.x0), &common::host(&p.y), None).unwrap()
    };
    let (e, f) = (run(false), run(true));
    let t = e.state.trace.as_ref().unwrap().to_vec().unwrap();
    let tf = f.state.trace.as_ref().unwrap().to_vec().unwrap();
    let (en, fen) = (
        e.state.energy.to_vec().unwrap(),
        f.state.energy.to_vec().unwrap(),
    );
    for b in 0..p.batch {
        let c: f64 = -0.5
            * (pis[0][b * 5..(b + 1) * 5]
                .iter()
                .chain(&pis[1])
                .map(|&v| (v as f64).ln())
                .sum::<f64>());
        assert!(((fen[b] - en[b]) as f64 - c).abs() < 1e-5, "sample {b}");
        for s in 0..31 {
            let d = (tf[b * 31 + s] - t[b * 31 + s]) as f64;
            assert!((d - c).abs() < 1e-5, "sample {b} step {s}");
        }
    }
    assert_eq!(e.grad_w[0].to_vec().unwrap(), f.grad_w[0].to_vec().unwrap());
    assert_eq!(
        e.grad_pi[0].to_vec().unwrap(),
        f.grad_pi[0].to_vec().unwrap()
    );
    assert_eq!(
        e.state.x[0].to_vec().unwrap(),
        f.state.x[0].to_vec().unwrap()
    );
}

/// A per-sample precision must have the call's batch.
#[test]
fn per_sample_precision_must_match_the_batch() {
    let p = problem(3);
    let pi = vec![1.0f32; 5 * (p.batch + 1)];
    let net = Network::new(
        &p.widths,
        vec![
            Layer::new(
                common::host(&p.w[0]),
                Activation::Tanh,
                Precision::PerSample(common::host(&pi)),
            ),
            Layer::new(
                common::host(&p.w[1]),
                Activation::Tanh,
                Precision::Scalar(1.0),
            ),
        ],
    )
    .unwrap();
    match settle::learn_step(
        &net,
        &spec(),
        &common::host(&p.x0),
        &common::host(&p.y),
        None,
    ) {
        Err(fep_kernels::Error::InvalidArgument { name, reason }) => {
            assert_eq!(name, "layers[0].precision");
            assert!(reason.contains("batch x n_1 = 6 x 5 = 30"), "{reason}");
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

/// Learning from a given start equals learn_step_into with Init::FromOutputs, and differs from
/// the feedforward start when the settling is short.
#[test]
fn learn_step_from_a_given_start() {
    let p = problem(4);
    let net = Network::new(
        &p.widths,
        (0..2)
            .map(|l| {
                Layer::new(
                    common::host(&p.w[l]),
                    Activation::Tanh,
                    Precision::Scalar(1.0),
                )
            })
            .collect(),
    )
    .unwrap();
    let start = vec![0.3f32; p.batch * 5];
    let spec = SettleSpec::new(0.1).steps(3);
    let x0 = common::host(&p.x0);
    let y = common::host(&p.y);
    let given = settle::learn_step(&net, &spec, &x0, &y, Some(&[common::host(&start)])).unwrap();
    let ff = settle::learn_step(&net, &spec, &x0, &y, None).unwrap();
    // The start is the trace's first state: its energy is that of x_1 = 0.3.
    let mut eps1 = vec![0.0f64; 0];
    for b in 0..p.batch {
        for j in 0..5 {
            let mu: f64 = (0..3)
                .map(|i| p.w[0][j * 3 + i] as f64 * (p.x0[b * 3 + i] as f64).tanh())
                .sum();
            eps1.push(0.3 - mu);
        }
    }
    let mut e0 = 0.5 * eps1[..5].iter().map(|e| e * e).sum::<f64>();
    let t = given.state.trace.as_ref().unwrap().to_vec().unwrap();
    for j in 0..4 {
        let mu: f64 = (0..5)
            .map(|i| p.w[1][j * 5 + i] as f64 * 0.3f64.tanh())
            .sum();
        e0 += 0.5 * (p.y[j] as f64 - mu).powi(2);
    }
    assert!(
        (t[0] as f64 - e0).abs() < 1e-5 * e0.max(1.0),
        "{} vs {e0}",
        t[0]
    );
    assert_ne!(
        given.grad_w[0].to_vec().unwrap(),
        ff.grad_w[0].to_vec().unwrap()
    );
    // Errors: the wrong number of start tensors.
    let r = settle::learn_step(&net, &spec, &x0, &y, Some(&[]));
    assert!(
        matches!(r, Err(fep_kernels::Error::InvalidArgument { .. })),
        "{r:?}"
    );
}

/// The demonstration of precision learning: data from a network whose output units have known,
/// different noise variances σ_j². Learning the weights with a fixed precision leaves Π = 1
/// (every unit weighted alike); learning the output precision as well (log-space SGD on
/// ∂F/∂π) recovers π_j ≈ 1/σ_j², each within 10% (measured: within 1%).
#[test]
fn learned_precision_recovers_the_noise_levels() {
    let dev = Device::reference();
    let stream = dev.default_stream();
    let mut r = rng(7);
    let (n0, n1, n2, batch) = (4usize, 6usize, 3usize, 256usize);
    let sigma = [0.1f32, 0.3, 1.0];
    let w1_true = randn(&mut r, n1 * n0, 0.6);
    let w2_true = randn(&mut r, n2 * n1, 0.6);
    // Learned weights start at the truth plus noise. The data have no hidden-layer noise, so
    // the hidden layer is stiff (π_1 = 10⁴, a prior that it is nearly deterministic): a free
    // hidden layer of a compliant prior would explain part of the output noise and the output
    // precisions would come out high (the posterior splits the error by precision).
    let mut w1 = w1_true.clone();
    let mut w2: Vec<f32> = w2_true
        .iter()
        .zip(randn(&mut r, n2 * n1, 0.1))
        .map(|(a, b)| a + b)
        .collect();
    let mut pi2 = vec![1.0f32; n2];
    let pi1 = 1e4f32;
    let spec = SettleSpec::new(0.5 / pi1).steps(50).log_det(true);
    for step in 0..600 {
        let x0 = randn(&mut r, batch * n0, 1.0);
        let mut y = vec![0f32; batch * n2];
        let noise = randn(&mut r, batch * n2, 1.0);
        for b in 0..batch {
            let h: Vec<f32> = (0..n1)
                .map(|j| {
                    (0..n0)
                        .map(|i| w1_true[j * n0 + i] * x0[b * n0 + i].tanh())
                        .sum()
                })
                .collect();
            for k in 0..n2 {
                let mu: f32 = (0..n1).map(|j| w2_true[k * n1 + j] * h[j].tanh()).sum();
                y[b * n2 + k] = mu + sigma[k] * noise[b * n2 + k];
            }
        }
        let net = Network::new(
            &[n0, n1, n2],
            vec![
                Layer::new(common::host(&w1), Activation::Tanh, Precision::Scalar(pi1)),
                Layer::new(
                    common::host(&w2),
                    Activation::Tanh,
                    Precision::Diagonal(common::host(&pi2)),
                ),
            ],
        )
        .unwrap();
        let out =
            settle::learn_step(&net, &spec, &common::host(&x0), &common::host(&y), None).unwrap();
        let gw: Vec<Vec<f32>> = out.grad_w.iter().map(|g| g.to_vec().unwrap()).collect();
        let gp = out.grad_pi[1].to_vec().unwrap();
        drop(net);
        settle::sgd_all(
            &mut [common::host_mut(&mut w1), common::host_mut(&mut w2)],
            &[common::host(&gw[0]), common::host(&gw[1])],
            // Decayed: SGD's own noise in the weights would add to the errors' variance.
            0.05 / (1.0 + step as f32 / 50.0),
            None,
            stream,
        )
        .unwrap();
        // The precision learns faster (its gradient is O(1/π)).
        settle::sgd_log_all(
            &mut [common::host_mut(&mut pi2)],
            &[common::host(&gp)],
            0.2,
            None,
            stream,
        )
        .unwrap();
        if step % 200 == 0 {
            println!("step {step}: pi_2 = {pi2:?}");
        }
    }
    println!(
        "learned pi_2 = {pi2:?}, true 1/sigma^2 = {:?}",
        sigma.map(|s| 1.0 / (s * s))
    );
    for k in 0..n2 {
        let want = 1.0 / (sigma[k] * sigma[k]);
        let ratio = pi2[k] / want;
        assert!(
            (0.9..1.11).contains(&ratio),
            "unit {k}: learned pi {} vs 1/sigma^2 = {want} (ratio {ratio:.3})",
            pi2[k]
        );
    }
}

/// `max_stable_eta` is exact for a linear network with one free layer (H = π_1 I + π_2 W_2ᵀW_2):
/// 0.95 of it settles, 1.05 of it diverges (reported as `Error::Diverged`, nothing written).
#[test]
fn max_stable_eta_separates_stable_from_diverging_steps() {
    let mut r = rng(9);
    let (w1, w2) = (randn(&mut r, 5 * 3, 0.7), randn(&mut r, 4 * 5, 0.7));
    let x0 = randn(&mut r, 2 * 3, 1.0);
    let y = randn(&mut r, 2 * 4, 1.0);
    let net = Network::new(
        &[3, 5, 4],
        vec![
            Layer::new(
                common::host(&w1),
                Activation::Identity,
                Precision::Scalar(0.5),
            ),
            Layer::new(
                common::host(&w2),
                Activation::Identity,
                Precision::Scalar(3.0),
            ),
        ],
    )
    .unwrap();
    for beta in [0.0f32, 0.5] {
        let eta = settle::max_stable_eta(&net, beta, true).unwrap();
        assert!(eta.is_finite() && eta > 0.0);
        let run = |e: f32| {
            let spec = SettleSpec::new(e).momentum(beta).steps(3000);
            settle::learn_step(&net, &spec, &common::host(&x0), &common::host(&y), None)
        };
        let ok = run(0.95 * eta).expect("0.95 of the bound settles");
        let t = ok.state.trace.as_ref().unwrap().to_vec().unwrap();
        assert!(t[3000] <= t[0], "beta {beta}: the energy did not fall");
        match run(1.05 * eta) {
            Err(fep_kernels::Error::Diverged(m)) => assert!(m.contains("lower eta"), "{m}"),
            other => panic!("beta {beta}: 1.05 x the bound should diverge, got {other:?}"),
        }
    }
    // Inference (x_L free too) allows a smaller step than learning.
    let infer = settle::max_stable_eta(&net, 0.0, false).unwrap();
    assert!(infer < settle::max_stable_eta(&net, 0.0, true).unwrap());
    assert!(settle::max_stable_eta(&net, 1.0, true).is_err());
}
