//! The settling reference: f64 throughout, one sample per rayon task, written to be read next
//! to the maths in the module docs of [`crate::settle`], not to be fast.

// Layer numbers l = 1 … L index several per-layer arrays at once, as in the maths.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::{Activation, Gradients, Init, Precision, Problem, Rule, SettleOutputs};
use crate::backend::View;
use crate::backend::cpu::check_finite;
use crate::element::Element;
use crate::error::{Error, Result};

/// One layer l ≥ 1 in f64.
pub(crate) struct RefLayer {
    pub n: usize,
    pub n_in: usize,
    /// W_l `[n, n_in]`.
    pub w: Vec<f64>,
    /// b_l `[n]` (zeros without bias).
    pub b: Vec<f64>,
    pub f: Activation,
    /// Π_l: `[n]`, or `[batch, n]` when `per_sample`.
    pub pi: Vec<f64>,
    pub per_sample: bool,
    /// Whether Π_l is one scalar (its gradient sums over units).
    pub scalar: bool,
}

impl RefLayer {
    /// Π_l of sample b, `[n]`.
    fn pi_of(&self, b: usize) -> &[f64] {
        if self.per_sample {
            &self.pi[b * self.n..(b + 1) * self.n]
        } else {
            &self.pi
        }
    }
}

/// The network in f64, checked for NaN/Inf (when asked) and for non-positive precisions.
fn reference_layers<T: Element>(p: &Problem<'_, '_, T>) -> Result<Vec<RefLayer>> {
    let widths = p.net.widths();
    let mut layers = Vec::with_capacity(p.net.depth());
    for (i, layer) in p.net.layers().iter().enumerate() {
        let (n, n_in) = (widths[i + 1], widths[i]);
        let w: Vec<f64> = layer
            .weight
            .host_slice()
            .iter()
            .map(|v| v.to_f64())
            .collect();
        let b: Vec<f64> = match &layer.bias {
            Some(b) => b.host_slice().iter().map(|v| v.to_f64()).collect(),
            None => vec![0.0; n],
        };
        let pi: Vec<f64> = match &layer.precision {
            Precision::Scalar(s) => vec![*s as f64; n],
            Precision::Diagonal(v) | Precision::PerSample(v) => {
                v.host_slice().iter().map(|&v| v as f64).collect()
            }
        };
        if p.spec.check_finite {
            check_finite(&format!("layers[{i}].weight"), w.iter().copied())?;
            check_finite(&format!("layers[{i}].bias"), b.iter().copied())?;
            check_precision(&format!("layers[{i}].precision"), &pi)?;
        }
        layers.push(RefLayer {
            n,
            n_in,
            w,
            b,
            f: layer.activation,
            pi,
            per_sample: matches!(layer.precision, Precision::PerSample(_)),
            scalar: matches!(layer.precision, Precision::Scalar(_)),
        });
    }
    Ok(layers)
}

/// Every precision finite and > 0.
pub(crate) fn check_precision(name: &str, pi: &[f64]) -> Result<()> {
    for (j, &v) in pi.iter().enumerate() {
        if !(v.is_finite() && v > 0.0) {
            return Err(Error::invalid(
                name,
                format!("element {j} is {v}: precisions must be finite and > 0"),
            ));
        }
    }
    Ok(())
}

/// ε_l = x_l − (W_l f_l(x_{l−1}) + b_l) for every layer of sample b; returns the energy
/// ½ Σ π ε².
fn errors(layers: &[RefLayer], b: usize, x: &[Vec<f64>], eps: &mut [Vec<f64>]) -> f64 {
    let mut energy = 0.0;
    for (l, layer) in layers.iter().enumerate() {
        let pi = layer.pi_of(b);
        let fx: Vec<f64> = x[l].iter().map(|&v| layer.f.apply(v)).collect();
        for j in 0..layer.n {
            let row = &layer.w[j * layer.n_in..(j + 1) * layer.n_in];
            let mu: f64 = row.iter().zip(&fx).map(|(w, f)| w * f).sum::<f64>() + layer.b[j];
            let e = x[l + 1][j] - mu;
            eps[l][j] = e;
            energy += 0.5 * pi[j] * e * e;
        }
    }
    energy
}

/// x_l = μ_l for l = 1 … `upto`, layer by layer.
fn feedforward(layers: &[RefLayer], x: &mut [Vec<f64>], upto: usize) {
    for l in 1..=upto {
        let layer = &layers[l - 1];
        let fx: Vec<f64> = x[l - 1].iter().map(|&v| layer.f.apply(v)).collect();
        for j in 0..layer.n {
            let row = &layer.w[j * layer.n_in..(j + 1) * layer.n_in];
            x[l][j] = row.iter().zip(&fx).map(|(w, f)| w * f).sum::<f64>() + layer.b[j];
        }
    }
}

/// One sample's settled state.
pub(crate) struct Settled {
    /// x₀ … x_L.
    pub x: Vec<Vec<f64>>,
    /// ε₁ … ε_L.
    pub eps: Vec<Vec<f64>>,
    /// Energies at the start and after each step (T + 1).
    pub trace: Vec<f64>,
    pub steps: u32,
}

/// −½ Σ_l ln|Π_l| of sample b: the normaliser of the free energy.
fn log_det_term(layers: &[RefLayer], b: usize) -> f64 {
    -0.5 * layers
        .iter()
        .map(|l| l.pi_of(b).iter().map(|p| p.ln()).sum::<f64>())
        .sum::<f64>()
}

/// Settles sample b. `x` holds x₀ … x_L on entry: x₀ the input, x_L the target when
/// `clamped`, the free layers their start when `given`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn settle_sample(
    layers: &[RefLayer],
    b: usize,
    mut x: Vec<Vec<f64>>,
    clamped: bool,
    given: bool,
    eta: f64,
    beta: f64,
    steps: u32,
    tol: f64,
) -> Settled {
    let depth = layers.len();
    let top_free = if clamped { depth - 1 } else { depth };
    if !given {
        feedforward(layers, &mut x, top_free);
    }
    let mut eps: Vec<Vec<f64>> = layers.iter().map(|l| vec![0.0; l.n]).collect();
    let mut v: Vec<Vec<f64>> = layers.iter().map(|l| vec![0.0; l.n]).collect();
    let mut trace = Vec::with_capacity(steps as usize + 1);
    trace.push(errors(layers, b, &x, &mut eps));
    let mut done = steps;
    for t in 1..=steps {
        // g for every free layer from this step's errors, then all updates at once.
        let mut g: Vec<Vec<f64>> = Vec::with_capacity(top_free);
        for l in 1..=top_free {
            let layer = &layers[l - 1];
            let pi = layer.pi_of(b);
            let mut gl: Vec<f64> = (0..layer.n).map(|j| pi[j] * eps[l - 1][j]).collect();
            if l < depth {
                let above = &layers[l];
                let pi_above = above.pi_of(b);
                for (i, gi) in gl.iter_mut().enumerate() {
                    let back: f64 = (0..above.n)
                        .map(|j| above.w[j * above.n_in + i] * pi_above[j] * eps[l][j])
                        .sum();
                    *gi -= above.f.derivative(x[l][i]) * back;
                }
            }
            g.push(gl);
        }
        for l in 1..=top_free {
            for i in 0..layers[l - 1].n {
                v[l - 1][i] = beta * v[l - 1][i] + g[l - 1][i];
                x[l][i] -= eta * v[l - 1][i];
            }
        }
        let e = errors(layers, b, &x, &mut eps);
        let prev = trace[trace.len() - 1];
        trace.push(e);
        if converged(e, prev, trace[0], tol) {
            done = t;
            break;
        }
    }
    let last = trace[trace.len() - 1];
    trace.resize(steps as usize + 1, last);
    Settled {
        x,
        eps,
        trace,
        steps: done,
    }
}

/// The early-stop rule (module docs): the relative change is within tol, or the energy has
/// fallen to tol times its start (a descent towards E = 0 changes by a constant fraction per
/// step, so its relative change alone never falls below tol).
pub(crate) fn converged(e: f64, prev: f64, start: f64, tol: f64) -> bool {
    tol > 0.0 && ((e - prev).abs() <= tol * prev || e <= tol * start)
}

/// Gradients at the settled states: ∂E/∂W_l = −(1/B) Σ_b (π ε_l) f_l(x_{l−1})ᵀ, ∂E/∂b_l, and
/// ∂F/∂Π_l = (1/B) Σ_b ½ (ε² − 1/π) per unit (per element for a per-sample precision, summed
/// over units for a scalar).
pub(crate) fn gradients(layers: &[RefLayer], settled: &[Settled]) -> RefGradients {
    let batch = settled.len() as f64;
    let scale = -1.0 / batch;
    let mut gw = Vec::new();
    let mut gb = Vec::new();
    let mut gpi = Vec::new();
    for (l, layer) in layers.iter().enumerate() {
        let half = |b: usize, j: usize| {
            let e = settled[b].eps[l][j];
            0.5 * (e * e - 1.0 / layer.pi_of(b)[j]) / batch
        };
        let units = |b: usize| (0..layer.n).map(move |j| half(b, j));
        let p: Vec<f64> = if layer.per_sample {
            (0..settled.len()).flat_map(units).collect()
        } else if layer.scalar {
            vec![(0..settled.len()).flat_map(units).sum()]
        } else {
            (0..layer.n)
                .map(|j| (0..settled.len()).map(|b| half(b, j)).sum())
                .collect()
        };
        gpi.push(p);
        let fx: Vec<Vec<f64>> = settled
            .iter()
            .map(|s| s.x[l].iter().map(|&v| layer.f.apply(v)).collect())
            .collect();
        let mut w = vec![0.0; layer.n * layer.n_in];
        w.par_chunks_mut(layer.n_in)
            .enumerate()
            .for_each(|(j, row)| {
                for (b, (s, f)) in settled.iter().zip(&fx).enumerate() {
                    let pe = layer.pi_of(b)[j] * s.eps[l][j];
                    for (r, fi) in row.iter_mut().zip(f) {
                        *r += pe * fi;
                    }
                }
                row.iter_mut().for_each(|r| *r *= scale);
            });
        let b = (0..layer.n)
            .map(|j| {
                scale
                    * settled
                        .iter()
                        .enumerate()
                        .map(|(b, s)| layer.pi_of(b)[j] * s.eps[l][j])
                        .sum::<f64>()
            })
            .collect();
        gw.push(w);
        gb.push(b);
    }
    RefGradients {
        w: gw,
        b: gb,
        pi: gpi,
    }
}

/// The gradients of every layer, f64: weights `[n·n_in]`, biases `[n]`, precisions (1, `[n]`
/// or `[batch·n]`).
pub(crate) struct RefGradients {
    pub w: Vec<Vec<f64>>,
    pub b: Vec<Vec<f64>>,
    pub pi: Vec<Vec<f64>>,
}

fn rows(v: &View<'_, f32>, width: usize, name: &str, check: bool) -> Result<Vec<Vec<f64>>> {
    let s = v.host_slice();
    if check {
        check_finite(name, s.iter().map(|&v| v as f64))?;
    }
    Ok(s.chunks(width)
        .map(|r| r.iter().map(|&v| v as f64).collect())
        .collect())
}

pub(super) fn run<T: Element>(
    p: &Problem<'_, '_, T>,
    x0: &View<'_, f32>,
    target: Option<&View<'_, f32>>,
    mut out: SettleOutputs<'_>,
    grads: Option<Gradients<'_>>,
) -> Result<()> {
    let widths = p.net.widths();
    let depth = p.net.depth();
    let check = p.spec.check_finite;
    let layers = reference_layers(p)?;
    let x0 = rows(x0, widths[0], "x0", check)?;
    let target = match target {
        Some(t) => Some(rows(t, widths[depth], "target", check)?),
        None => None,
    };
    let given = p.spec.init == Init::FromOutputs;
    let top_free = if p.clamped { depth - 1 } else { depth };
    let mut init: Vec<Vec<Vec<f64>>> = Vec::new(); // [layer 1..=top_free][sample]
    if given {
        for l in 1..=top_free {
            init.push(rows(
                &out.x[l - 1].as_view(),
                widths[l],
                &format!("x[{}] (the start)", l - 1),
                check,
            )?);
        }
    }
    // Everything is checked: from here on the outputs are written.
    let settled: Vec<Settled> = (0..p.batch)
        .into_par_iter()
        .map(|b| {
            let mut x: Vec<Vec<f64>> = widths.iter().map(|&n| vec![0.0; n]).collect();
            x[0] = x0[b].clone();
            if let Some(t) = &target {
                x[depth] = t[b].clone();
            }
            for (l, rows) in init.iter().enumerate() {
                x[l + 1] = rows[b].clone();
            }
            let mut s = settle_sample(
                &layers,
                b,
                x,
                p.clamped,
                given,
                p.spec.eta as f64,
                p.spec.momentum as f64,
                p.spec.steps,
                p.spec.tol as f64,
            );
            if p.spec.log_det {
                let c = log_det_term(&layers, b);
                s.trace.iter_mut().for_each(|e| *e += c);
            }
            s
        })
        .collect();
    if check {
        diverged(p, &settled)?;
    }
    let t1 = p.spec.steps as usize + 1;
    for (b, s) in settled.iter().enumerate() {
        for l in 1..=depth {
            let n = widths[l];
            let xs = &mut out.x[l - 1].host_slice_mut()[b * n..(b + 1) * n];
            xs.iter_mut().zip(&s.x[l]).for_each(|(o, &v)| *o = v as f32);
            let es = &mut out.eps[l - 1].host_slice_mut()[b * n..(b + 1) * n];
            es.iter_mut()
                .zip(&s.eps[l - 1])
                .for_each(|(o, &v)| *o = v as f32);
        }
        if let Some(e) = &mut out.energy {
            e.host_slice_mut()[b] = s.trace[t1 - 1] as f32;
        }
        if let Some(tr) = &mut out.trace {
            let row = &mut tr.host_slice_mut()[b * t1..(b + 1) * t1];
            row.iter_mut()
                .zip(&s.trace)
                .for_each(|(o, &v)| *o = v as f32);
        }
        if let Some(st) = &mut out.steps {
            st.host_slice_mut()[b] = s.steps;
        }
    }
    if let Some(mut g) = grads {
        let RefGradients {
            w: gw,
            b: gb,
            pi: gpi,
        } = gradients(&layers, &settled);
        for l in 0..depth {
            let dst = g.weights[l].host_slice_mut();
            dst.iter_mut().zip(&gw[l]).for_each(|(o, &v)| *o = v as f32);
            let dst = g.biases[l].host_slice_mut();
            dst.iter_mut().zip(&gb[l]).for_each(|(o, &v)| *o = v as f32);
            if let Some(Some(dst)) = g.precisions.get_mut(l) {
                let dst = dst.host_slice_mut();
                dst.iter_mut()
                    .zip(&gpi[l])
                    .for_each(|(o, &v)| *o = v as f32);
            }
        }
    }
    Ok(())
}

/// `Err(Diverged)` naming the first sample whose settled state is not finite in f32 (energy,
/// states or errors), and the step where its energy first was: checked before any output is
/// written, so a diverged settle leaves the outputs (and the gradients) untouched.
fn diverged<T: Element>(p: &Problem<'_, '_, T>, settled: &[Settled]) -> Result<()> {
    let finite = |v: &f64| (*v as f32).is_finite();
    let bad = settled.iter().position(|s| {
        !s.trace.iter().all(finite)
            || !s.x.iter().flatten().all(finite)
            || !s.eps.iter().flatten().all(finite)
    });
    let Some(b) = bad else { return Ok(()) };
    let trace = &settled[b].trace;
    let at = match trace.iter().position(|v| !finite(v)) {
        Some(0) => "at the start (the feedforward state)".to_string(),
        Some(t) => format!("at step {t} (energy {} there)", trace[t] as f32),
        None => "in its states (the energy stayed finite in f32)".to_string(),
    };
    Err(Error::Diverged(format!(
        "settling sample {b} diverged {at} with eta = {}, momentum = {}: lower eta; nothing was \
         written",
        p.spec.eta, p.spec.momentum
    )))
}

/// p ← p − lr · g (or, `Rule::Log`, p · exp(−lr · p · g)), rounded once to T, for every
/// (param, grad) pair, all or nothing: when a gradient or a new value is not finite in T (or a
/// log-space value is not > 0), nothing is written and the error names it.
pub(super) fn sgd_all<T: Element>(
    params: &mut [&mut [T]],
    grads: &[&[f32]],
    lr: f64,
    rule: Rule,
) -> Result<()> {
    let new = |p: &T, g: f32| {
        let p = p.to_f64();
        T::from_f64(match rule {
            Rule::Plain => p - lr * g as f64,
            Rule::Log => p * (-lr * p * g as f64).exp(),
        })
    };
    let ok = |v: f64, g: f32| g.is_finite() && v.is_finite() && (rule == Rule::Plain || v > 0.0);
    for (i, (param, grad)) in params.iter().zip(grads).enumerate() {
        if let Some(j) = param
            .iter()
            .zip(grad.iter())
            .position(|(p, &g)| !ok(new(p, g).to_f64(), g))
        {
            return Err(Error::Diverged(format!(
                "the SGD step on parameter {i} makes element {j} non-finite{} (grad {}, lr \
                 {lr}); no parameter was written",
                if rule == Rule::Log { " or 0" } else { "" },
                grad[j]
            )));
        }
    }
    for (param, grad) in params.iter_mut().zip(grads) {
        param
            .par_iter_mut()
            .zip(grad.par_iter())
            .for_each(|(p, &g)| *p = new(p, g));
    }
    Ok(())
}
