//! The attention gradients in f64 (the reference of [`super::backward`]): the forward is
//! recomputed per (batch, kv head), so the reference needs neither o nor lse from the caller.
//! The derivation is in the module docs of [`crate::attention`] (section "Backward").

use rayon::prelude::*;

use super::backward::{BackwardProblem, Gradients};
use super::cpu::{
    Gathered, RefInputs, Term, gather, host_f64, normaliser, nu_of, row_terms, scatter, validate,
};
use super::{AttentionSpec, Score};
use crate::element::Element;
use crate::error::{Error, Result};

/// The upstream gradients of [`backward`] (f64, row-major; `..Default::default()` for the
/// optional ones).
#[derive(Clone, Copy, Debug, Default)]
pub struct RefGradInputs<'a> {
    /// ∂L/∂o `[B, Hq, Lq, Dv]`.
    pub d_o: &'a [f64],
    /// ∂L/∂e `[B, Hq, Lq]`, or None (e not used by the loss).
    pub d_e: Option<&'a [f64]>,
    /// ∂L/∂lse `[B, Hq, Lq]`, or None (lse not used by the loss).
    pub d_lse: Option<&'a [f64]>,
}

/// [`backward`]'s results, row-major.
#[derive(Clone, Debug, Default)]
pub struct RefGradients {
    /// `[B, Hq, Lq, D]`.
    pub dq: Vec<f64>,
    /// `[B, Hkv, Lk, D]` (summed over the query heads of each group).
    pub dk: Vec<f64>,
    /// `[B, Hkv, Lk, Dv]`.
    pub dv: Vec<f64>,
    /// ∂L/∂π_h `[Hq]` (at π_h = 1 when the call has no per-head precision).
    pub dpi_head: Vec<f64>,
    /// ∂L/∂π_j `[B, Hkv, Lk]` (at π_j = 1 when the call has no per-key precision).
    pub dpi_key: Vec<f64>,
    /// ∂L/∂ν (Student-t; 0 for the other families): the sum of `dnu_head`.
    pub dnu: f64,
    /// ∂L/∂ν_h per query head `[Hq]` (the gradient of a per-head ν).
    pub dnu_head: Vec<f64>,
    /// ∂L/∂β in the bias's shape (broadcast dimensions summed); empty without a bias.
    pub dbias: Vec<f64>,
}

/// The partial derivatives of one score s(x, d², π, ν), x = q·k, in natural units:
/// (∂s/∂x, ∂s/∂d², π ∂s/∂π, ∂s/∂ν). `nu` is Student-t's ν, `c` the normaliser's D/2 (0 when off).
#[allow(clippy::too_many_arguments)]
pub(crate) fn score_partials(
    score: Score,
    nu: f64,
    tau: f64,
    dim: f64,
    c: f64,
    x: f64,
    d2: f64,
    pi: f64,
) -> (f64, f64, f64, f64) {
    match score {
        Score::Dot => (tau * pi, 0.0, tau * pi * x, 0.0),
        Score::Gaussian => (0.0, -0.5 * tau * pi, -0.5 * tau * pi * d2 + c, 0.0),
        Score::StudentT(_) => {
            let kappa = (nu + dim) / 2.0;
            let a = tau * pi * d2 / nu;
            let s_d2 = -kappa * (tau * pi / nu) / (1.0 + a);
            let s_lnpi = -kappa * a / (1.0 + a) + c;
            let s_nu = -0.5 * a.ln_1p() + kappa * (a / nu) / (1.0 + a);
            (0.0, s_d2, s_lnpi, s_nu)
        }
        Score::Laplace => {
            let r = (tau * pi).sqrt();
            let dd = d2.sqrt();
            // d is not differentiable at q = k: the minimum-norm subgradient, 0.
            let s_d2 = if dd > 0.0 { -r / (2.0 * dd) } else { 0.0 };
            (0.0, s_d2, -0.5 * r * dd + c, 0.0)
        }
    }
}

/// What one (batch, kv head) task returns: dq of its query heads, dk, dv and ∂L/∂π_j of its keys,
/// its share of ∂L/∂π_h per query head of the group, and of ∂L/∂ν.
struct Part {
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    dpi_key: Vec<f64>,
    dpi_head: Vec<f64>,
    dnu: Vec<f64>,
    /// dS of every visible score of the group's rows: (g, i, j, dS), for dβ.
    ds: Vec<(usize, usize, usize, f64)>,
}

/// The gradients of a loss L(o, e) with respect to q, k, v, the precisions and ν, given ∂L/∂o and
/// ∂L/∂e, in f64 ([`crate::attention`]'s "Backward" section derives them). Rows with no visible key
/// contribute nothing.
pub fn backward(
    spec: &AttentionSpec,
    inp: &RefInputs<'_>,
    grad: &RefGradInputs<'_>,
) -> Result<RefGradients> {
    validate(spec, inp)?;
    let RefInputs {
        b: nb,
        hq,
        hkv,
        lq,
        lk,
        d,
        dv,
        ..
    } = *inp;
    let rows = nb * hq * lq;
    if grad.d_o.len() != rows * dv {
        return Err(Error::invalid(
            "d_o",
            format!("has {} elements, expected {}", grad.d_o.len(), rows * dv),
        ));
    }
    if let Some(de) = grad.d_e
        && de.len() != rows
    {
        return Err(Error::invalid(
            "d_e",
            format!("has {} elements, expected {rows}", de.len()),
        ));
    }
    if let Some(dl) = grad.d_lse
        && dl.len() != rows
    {
        return Err(Error::invalid(
            "d_lse",
            format!("has {} elements, expected {rows}", dl.len()),
        ));
    }
    let group = hq / hkv;
    let tau = spec.tau(d);
    let dim = d as f64;
    let c = normaliser(spec, d);
    let want_ds = inp.bias.is_some();

    let parts: Vec<Part> = (0..nb * hkv)
        .into_par_iter()
        .map(|bk| {
            let (b, hk) = (bk / hkv, bk % hkv);
            let kv0 = bk * lk;
            let mut part = Part {
                dq: vec![0.0; group * lq * d],
                dk: vec![0.0; lk * d],
                dv: vec![0.0; lk * dv],
                dpi_key: vec![0.0; lk],
                dpi_head: vec![0.0; group],
                dnu: vec![0.0; group],
                ds: Vec::new(),
            };
            // Per visible key of a row: its score terms, then w and ∂L/∂w.
            let mut terms: Vec<Term> = Vec::with_capacity(lk);
            let mut w = Vec::with_capacity(lk);
            let mut dw = Vec::with_capacity(lk);
            for g in 0..group {
                let h = hk * group + g;
                let pi_h = inp.pi_head.map_or(1.0, |p| p[h]);
                let nu = nu_of(spec, inp, h);
                for i in 0..lq {
                    row_terms(spec, inp, (b, h, i), c, &mut terms);
                    if terms.is_empty() {
                        continue;
                    }
                    let row = (b * hq + h) * lq + i;
                    let qi = &inp.q[row * d..][..d];
                    let doi = &grad.d_o[row * dv..][..dv];
                    let dei = grad.d_e.map_or(0.0, |de| de[row]);
                    let dli = grad.d_lse.map_or(0.0, |dl| dl[row]);
                    let m = terms.iter().map(|t| t.s).fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = terms.iter().map(|t| (t.s - m).exp()).sum();
                    w.clear();
                    dw.clear();
                    for t in &terms {
                        w.push((t.s - m).exp() / z);
                        let vj = &inp.v[(kv0 + t.j) * dv..][..dv];
                        let dp: f64 = doi.iter().zip(vj).map(|(a, b)| a * b).sum();
                        // ∂L/∂w_ij: through o, and through e = Σ w π d².
                        dw.push(dp + dei * t.pi * t.d2);
                    }
                    // Δ_i = Σ_j w_ij ∂L/∂w_ij (= dO_i·o_i + ∂L/∂e_i e_i), less ∂L/∂lse_i: since
                    // ∂lse_i/∂s_ij = w_ij, dS_ij = w_ij (∂L/∂w_ij − Δ_i + ∂L/∂lse_i).
                    let delta: f64 = w.iter().zip(&dw).map(|(a, b)| a * b).sum::<f64>() - dli;
                    let dqi = &mut part.dq[(g * lq + i) * d..][..d];
                    for (jj, t) in terms.iter().enumerate() {
                        let (j, x, d2, pi) = (t.j, t.x, t.d2, t.pi);
                        let wij = w[jj];
                        let ds = wij * (dw[jj] - delta);
                        if want_ds {
                            part.ds.push((g, i, j, ds));
                        }
                        let (s_x, s_d2, s_lnpi, s_nu) =
                            score_partials(spec.score, nu, tau, dim, c, x, d2, pi);
                        // Coefficient of d² (through s and through e directly), then of k in dq
                        // and of q in dk: dq_i += M k_j + 2g q_i, dk_j += M q_i + 2g k_j.
                        let gc = ds * s_d2 + dei * wij * pi;
                        let mc = ds * s_x - 2.0 * gc;
                        let kj = &inp.k[(kv0 + j) * d..][..d];
                        let dkj = &mut part.dk[j * d..][..d];
                        for t in 0..d {
                            dqi[t] += mc * kj[t] + 2.0 * gc * qi[t];
                            dkj[t] += mc * qi[t] + 2.0 * gc * kj[t];
                        }
                        let dvj = &mut part.dv[j * dv..][..dv];
                        dvj.iter_mut().zip(doi).for_each(|(a, &o)| *a += wij * o);
                        // π ∂L/∂π_ij, shared by π_h and π_j (π_ij = π_h π_j).
                        let pg = ds * s_lnpi + dei * wij * pi * d2;
                        part.dpi_head[g] += pg / pi_h;
                        part.dpi_key[j] += pg / (pi / pi_h);
                        part.dnu[g] += ds * s_nu;
                    }
                }
            }
            part
        })
        .collect();

    let what = || format!("the f64 gradients of [{nb}, {hkv}, {lk}] keys");
    let mut out = RefGradients {
        dq: crate::alloc::zeroed(rows * d, what)?,
        dk: crate::alloc::with_capacity(nb * hkv * lk * d, what)?,
        dv: crate::alloc::with_capacity(nb * hkv * lk * dv, what)?,
        dpi_head: crate::alloc::zeroed(hq, what)?,
        dpi_key: crate::alloc::with_capacity(nb * hkv * lk, what)?,
        dnu: 0.0,
        dnu_head: vec![0.0; hq],
        dbias: match inp.bias {
            Some(b) => crate::alloc::zeroed(b.values.len(), what)?,
            None => Vec::new(),
        },
    };
    let student = matches!(spec.score, Score::StudentT(_));
    // In a fixed order (batch, kv head, group member, row, key): the sums over broadcast
    // dimensions of dβ are deterministic.
    for (bk, p) in parts.into_iter().enumerate() {
        let (b, hk) = (bk / hkv, bk % hkv);
        for g in 0..group {
            let h = hk * group + g;
            let dst = (b * hq + h) * lq * d;
            out.dq[dst..dst + lq * d].copy_from_slice(&p.dq[g * lq * d..][..lq * d]);
            out.dpi_head[h] += p.dpi_head[g];
            if student {
                out.dnu_head[h] += p.dnu[g];
            }
        }
        if let Some(bias) = inp.bias {
            for &(g, i, j, ds) in &p.ds {
                out.dbias[bias.offset(b, hk * group + g, i, j)] += ds;
            }
        }
        out.dk.extend_from_slice(&p.dk);
        out.dv.extend_from_slice(&p.dv);
        out.dpi_key.extend_from_slice(&p.dpi_key);
    }
    out.dnu = out.dnu_head.iter().sum();
    Ok(out)
}

/// What the CPU device runs for `attention::backward_into`: the reference on the gathered inputs.
pub(crate) fn backward_views<T: Element>(
    p: &BackwardProblem<'_, '_, T>,
    mut out: Gradients<'_, T>,
) -> Result<()> {
    let host = Gathered::new(&p.fwd)?;
    // The reference recomputes the forward and never reads lse; a GPU does (unscanned). NaN or
    // +inf (an overflowed or corrupted forward) is refused here (a row with no visible key
    // has −∞).
    let lse = p.inputs.lse.host_slice();
    if let Some(i) = lse.iter().position(|&x| x.is_nan() || x == f32::INFINITY) {
        return Err(Error::invalid(
            "lse",
            format!(
                "element {i} is {}: the forward's lse is finite or -inf",
                lse[i]
            ),
        ));
    }
    let d_o = gather(&p.inputs.d_o)?;
    let d_e = p.inputs.d_e.as_ref().map(host_f64);
    let d_lse = p.inputs.d_lse.as_ref().map(host_f64);
    // Everything is checked here, before the first write.
    let g = backward(
        &p.fwd.spec,
        &host.inputs(&p.fwd),
        &RefGradInputs {
            d_o: &d_o,
            d_e: d_e.as_deref(),
            d_lse: d_lse.as_deref(),
        },
    )?;
    // dν: one value, or one per head with a per-head ν.
    let dnu = if p.fwd.precision.nu.is_some() {
        &g.dnu_head[..]
    } else {
        std::slice::from_ref(&g.dnu)
    };
    scatter(&mut out.dq, &g.dq);
    scatter(&mut out.dk, &g.dk);
    scatter(&mut out.dv, &g.dv);
    for (dst, src) in [
        (out.dpi_head.as_mut(), &g.dpi_head[..]),
        (out.dpi_key.as_mut(), &g.dpi_key[..]),
        (out.dnu.as_mut(), dnu),
        (out.dbias.as_mut(), &g.dbias[..]),
    ] {
        if let Some(dst) = dst {
            dst.host_slice_mut()
                .iter_mut()
                .zip(src)
                .for_each(|(a, &c)| *a = c as f32);
        }
    }
    Ok(())
}
