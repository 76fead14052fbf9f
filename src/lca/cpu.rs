//! The LCA reference: f64 throughout, one sample per rayon task. Written to be read next to
//! the maths in the module docs of [`crate::lca`], not to be fast (it still skips inactive units
//! in G·a).

use rayon::prelude::*;

use super::{LcaOutputs, LcaSpec, Store, TolMode};
use crate::element::Element;
use crate::error::{Error, Result};

/// Φ in f64, G = ΦᵀΦ − I, and the column norms.
pub(super) fn prepare<T: Element>(phi: &[T], n: usize, m: usize) -> Result<(Store, Vec<f64>)> {
    let mut copy =
        crate::alloc::with_capacity(phi.len(), || format!("an f64 copy of phi [{n}, {m}]"))?;
    copy.extend(phi.iter().map(|v| v.to_f64()));
    let phi = copy;
    let gram = gram(&phi, n, m)?;
    // NaN must stay NaN (f64::max would turn it into 0): check_norms reports it.
    let norms = (0..m)
        .map(|j| {
            let sq = gram[j * m + j] + 1.0;
            if sq.is_nan() { sq } else { sq.max(0.0).sqrt() }
        })
        .collect();
    Ok((Store::Cpu { phi, gram }, norms))
}

/// G = ΦᵀΦ − I: m² f64, the one allocation that outgrows its input (a 1 x 60000 Φ asks 28.8 GB).
fn gram(phi: &[f64], n: usize, m: usize) -> Result<Vec<f64>> {
    let mut g = crate::alloc::zeroed(m.saturating_mul(m), || {
        format!("the Gram matrix G = PhiT Phi - I [{m}, {m}] (f64)")
    })?;
    g.par_chunks_mut(m).enumerate().for_each(|(i, row)| {
        for (j, gij) in row.iter_mut().enumerate() {
            let dot: f64 = (0..n).map(|r| phi[r * m + i] * phi[r * m + j]).sum();
            *gij = dot - if i == j { 1.0 } else { 0.0 };
        }
    });
    Ok(g)
}

/// c = G a, over the nonzero entries of a.
fn inhibit(gram: &[f64], m: usize, a: &[f64], c: &mut [f64]) {
    c.iter_mut().for_each(|v| *v = 0.0);
    for (k, &ak) in a.iter().enumerate() {
        if ak != 0.0 {
            let row = &gram[k * m..(k + 1) * m];
            for (cj, &g) in c.iter_mut().zip(row) {
                *cj += g * ak;
            }
        }
    }
}

/// ½‖x − Φa‖² + λ‖a‖₁, straight from the definition.
fn energy(phi: &[f64], n: usize, m: usize, x: &[f64], a: &[f64], lambda: f64) -> f64 {
    let mut sq = 0.0;
    for i in 0..n {
        let recon: f64 = (0..m)
            .filter(|&k| a[k] != 0.0)
            .map(|k| phi[i * m + k] * a[k])
            .sum();
        sq += (x[i] - recon).powi(2);
    }
    0.5 * sq + lambda * a.iter().map(|v| v.abs()).sum::<f64>()
}

/// One sample's run; returns the steps taken.
#[allow(clippy::too_many_arguments)]
fn solve_one(
    phi: &[f64],
    gram: &[f64],
    n: usize,
    m: usize,
    spec: &LcaSpec,
    x: &[f64],
    u: &mut [f64],
    mut trace: Option<(&mut [f32], &mut [u32])>,
) -> u32 {
    let (lambda, eta, tol) = (spec.lambda as f64, spec.eta as f64, spec.tol as f64);
    let theta = |u: f64| spec.threshold.apply(u, lambda);
    let b: Vec<f64> = (0..m)
        .map(|j| (0..n).map(|i| x[i] * phi[i * m + j]).sum())
        .collect();
    // The early-stop threshold on max |Δu|: tol, or tol · max |b| (relative to the input).
    let limit = match spec.tol_mode {
        TolMode::Absolute => tol,
        TolMode::Relative => tol * b.iter().fold(0.0f64, |acc, v| acc.max(v.abs())),
    };
    let mut a: Vec<f64> = u.iter().map(|&v| theta(v)).collect();
    let mut c = vec![0.0; m];
    inhibit(gram, m, &a, &mut c);
    let steps = spec.steps as usize;
    for t in 0..steps {
        let mut max_du: f64 = 0.0;
        for j in 0..m {
            let du = eta * (b[j] - u[j] - c[j]);
            u[j] += du;
            // NaN (a diverging run, η too large for ΦᵀΦ) never counts as converged.
            max_du = if du.is_nan() {
                f64::INFINITY
            } else {
                max_du.max(du.abs())
            };
        }
        a.iter_mut()
            .zip(u.iter())
            .for_each(|(aj, &uj)| *aj = theta(uj));
        inhibit(gram, m, &a, &mut c);
        // Exactly 0 counts as converged too (a zero input with relative tol has limit 0).
        let stop = tol > 0.0 && (max_du < limit || max_du == 0.0);
        if let Some((e, act)) = trace.as_mut() {
            let value = energy(phi, n, m, x, &a, lambda) as f32;
            let count = a.iter().filter(|&&v| v != 0.0).count() as u32;
            let last = if stop { steps } else { t + 1 };
            e[t..last].iter_mut().for_each(|v| *v = value);
            act[t..last].iter_mut().for_each(|v| *v = count);
        }
        if stop {
            return (t + 1) as u32;
        }
    }
    spec.steps
}

#[allow(clippy::too_many_arguments)]
pub(super) fn solve<T: Element>(
    phi: &[f64],
    gram: &[f64],
    n: usize,
    m: usize,
    spec: &LcaSpec,
    x: &[T],
    u0: Option<&[f32]>,
    mut out: LcaOutputs<'_>,
) -> Result<()> {
    let batch = x.len() / n;
    let tracing = out.energy.is_some() || out.active.is_some();
    // Without a trace each sample still gets a (dummy) row of width 1, so the zip below lines up.
    // The sizes were checked against the outputs (batch · steps, batch · m) by the caller.
    let width = if tracing { spec.steps as usize } else { 1 };
    let what = || format!("the LCA state of a batch of {batch}");
    let mut energy = crate::alloc::zeroed::<f32>(batch * width, what)?;
    let mut active = crate::alloc::zeroed::<u32>(batch * width, what)?;
    let mut taken = crate::alloc::zeroed::<u32>(batch, what)?;
    let mut u = crate::alloc::zeroed::<f64>(batch * m, what)?;
    if let Some(u0) = u0 {
        u.iter_mut().zip(u0).for_each(|(d, &s)| *d = s as f64);
    }
    u.par_chunks_mut(m)
        .zip(taken.par_iter_mut())
        .zip(
            energy
                .par_chunks_mut(width)
                .zip(active.par_chunks_mut(width)),
        )
        .enumerate()
        .for_each(|(s, ((u, t), (e, c)))| {
            let xs: Vec<f64> = x[s * n..(s + 1) * n].iter().map(|v| v.to_f64()).collect();
            *t = solve_one(phi, gram, n, m, spec, &xs, u, tracing.then_some((e, c)));
        });

    let theta = |v: f64| spec.threshold.apply(v, spec.lambda as f64);
    out.u
        .host_slice_mut()
        .iter_mut()
        .zip(&u)
        .for_each(|(o, &v)| *o = v as f32);
    out.a
        .host_slice_mut()
        .iter_mut()
        .zip(&u)
        .for_each(|(o, &v)| *o = theta(v) as f32);
    if let Some(e) = out.energy.as_mut() {
        e.host_slice_mut().copy_from_slice(&energy);
    }
    if let Some(c) = out.active.as_mut() {
        c.host_slice_mut().copy_from_slice(&active);
    }
    if let Some(s) = out.steps.as_mut() {
        s.host_slice_mut().copy_from_slice(&taken);
    }
    Ok(())
}

/// Φ += (lr/B) Σ_b (x_b − Φa_b) a_bᵀ; columns renormalised; G recomputed. An update that is not
/// finite leaves Φ and G as they were (as on a GPU, where it would overflow f32 first).
pub(super) fn learn<T: Element>(
    phi: &mut Vec<f64>,
    gram_out: &mut Vec<f64>,
    n: usize,
    m: usize,
    x: &[T],
    a: &[f32],
    lr: f64,
) -> Result<()> {
    let batch = x.len() / n;
    let what = || format!("a dictionary-learning step on [{n}, {m}]");
    let mut next = crate::alloc::with_capacity(phi.len(), what)?;
    next.extend_from_slice(phi);
    let mut delta = crate::alloc::zeroed::<f64>(n * m, what)?;
    for s in 0..batch {
        let a_s = &a[s * m..(s + 1) * m];
        for i in 0..n {
            let recon: f64 = (0..m)
                .filter(|&k| a_s[k] != 0.0)
                .map(|k| phi[i * m + k] * a_s[k] as f64)
                .sum();
            let r = x[s * n + i].to_f64() - recon;
            for (j, &aj) in a_s.iter().enumerate() {
                delta[i * m + j] += r * aj as f64;
            }
        }
    }
    let scale = lr / batch as f64;
    next.iter_mut()
        .zip(&delta)
        .for_each(|(p, d)| *p += scale * d);
    for j in 0..m {
        let norm = (0..n).map(|i| next[i * m + j].powi(2)).sum::<f64>().sqrt();
        if !(norm as f32).is_finite() {
            return Err(Error::invalid(
                "lr",
                format!(
                    "the learning step overflowed f32 in column {j} of the dictionary (lower lr, or check the codes a); the dictionary is unchanged"
                ),
            ));
        }
        if norm > 0.0 {
            (0..n).for_each(|i| next[i * m + j] /= norm);
        }
    }
    *gram_out = gram(&next, n, m)?;
    *phi = next;
    Ok(())
}
