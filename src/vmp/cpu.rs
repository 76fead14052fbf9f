//! The VMP reference: f64 throughout, one agent per rayon task, written to be read next to the
//! maths in the module docs of [`crate::vmp`] and tests/fixtures/VMP-CONVENTIONS.md (pymdp
//! 1.0.4), not to be fast.
//!
//! Layouts: an agent's beliefs are one flat vector of ΣS entries (factor f at `t.s_off[f]`);
//! A_m is `[O_m, P_m]` with its P_m columns over deps(m) in the list's order (the first
//! dependency varies slowest); B_f is `[S_f, S_f, U_f]`. Nothing here ever builds the joint
//! over all factors: every expectation runs over one modality's own dependency axes.

use rayon::prelude::*;

use super::model::{EPS, Model, Tables, ln_clip, x_ln_x};
use super::{
    FpiSpec, LearnSpec, Method, Obs, PolicyOutputs, PolicySpec, SequenceOutputs, SequenceSpec,
    StatesOutputs, batch_of,
};
use crate::backend::{View, ViewMut};
use crate::error::{Error, Result};
use crate::tensor::check_len;

/// Observations on the host: `[N, (T,) M]` indices or `[N, (T,) ΣO]` distributions.
#[derive(Clone, Copy, Debug)]
pub enum HostObs<'a> {
    /// Indices.
    Index(&'a [i32]),
    /// Distributions.
    Dist(&'a [f64]),
}

impl<'a> HostObs<'a> {
    fn len(&self) -> usize {
        match self {
            HostObs::Index(v) => v.len(),
            HostObs::Dist(v) => v.len(),
        }
    }

    /// Entries per agent and step.
    fn width(&self, t: &Tables) -> usize {
        match self {
            HostObs::Index(_) => t.modalities(),
            HostObs::Dist(_) => t.sum_o,
        }
    }

    /// The observation of one agent at one step (`row` = agent · T + step).
    fn row(&self, t: &Tables, row: usize) -> HostObs<'a> {
        let w = self.width(t);
        match *self {
            HostObs::Index(v) => HostObs::Index(&v[row * w..(row + 1) * w]),
            HostObs::Dist(v) => HostObs::Dist(&v[row * w..(row + 1) * w]),
        }
    }
}

/// [`fpi`]'s results, per agent (`[N, ΣS]`, `[N]`, `[N, K]`).
#[derive(Clone, Debug, Default)]
pub struct FpiOut {
    /// Posteriors `[N, ΣS]`.
    pub qs: Vec<f64>,
    /// F `[N]`.
    pub vfe: Vec<f64>,
    /// Iterations run `[N]`.
    pub iterations: Vec<i32>,
    /// F after each iteration `[N, K]`.
    pub vfe_trace: Vec<f64>,
    /// Σ_f q_f·ln q_f `[N]`.
    pub neg_entropy: Vec<f64>,
    /// −Σ_f q_f·ln prior_f `[N]`.
    pub prior_cross_entropy: Vec<f64>,
    /// Σ_m E_q\[ll_m\] `[N]` (F = neg_entropy + prior_cross_entropy − accuracy).
    pub accuracy: Vec<f64>,
}

/// [`sequence`]'s results.
#[derive(Clone, Debug, Default)]
pub struct SequenceOut {
    /// Posteriors `[N, T, ΣS]`.
    pub qs: Vec<f64>,
    /// F `[N]`.
    pub vfe: Vec<f64>,
    /// Per-step F `[N, T]`.
    pub vfe_t: Vec<f64>,
    /// Per-step terms `[N, T]`.
    pub neg_entropy_t: Vec<f64>,
    /// `[N, T]` (non-zero at t = 0 only).
    pub prior_cross_entropy_t: Vec<f64>,
    /// `[N, T]` (zero at t = 0).
    pub transition_cross_entropy_t: Vec<f64>,
    /// `[N, T]`.
    pub accuracy_t: Vec<f64>,
}

/// [`policies`]'s results, `[N, P]` each.
#[derive(Clone, Debug, Default)]
pub struct PolicyOut {
    /// G = −neg_efe with the spec's terms.
    pub g: Vec<f64>,
    /// q(π).
    pub q_pi: Vec<f64>,
    /// Σ_τ Σ_m q(o)·C (always computed).
    pub utility: Vec<f64>,
    /// Σ_τ Σ_m H\[q(o)\] − E H\[A\] (always computed).
    pub state_info_gain: Vec<f64>,
    /// pA novelty (0 without pA).
    pub novelty_a: Vec<f64>,
    /// pB novelty (0 without pB).
    pub novelty_b: Vec<f64>,
}

/// [`learn`]'s results: the updated counts (None where the model has none).
#[derive(Clone, Debug, Default)]
pub struct LearnOut {
    /// pA per modality.
    pub a: Option<Vec<Vec<f64>>>,
    /// pB per factor.
    pub b: Option<Vec<Vec<f64>>>,
    /// pD per factor.
    pub d: Option<Vec<Vec<f64>>>,
}

// =============================================================================================
// Input checks (data, not shapes alone: the entry points in mod.rs check shapes and devices,
// these run for the public reference and again for the CPU device's views)
// =============================================================================================

/// The batch N of `obs` (N·T rows of the modality width), after checking every entry:
/// indices in 0..O_m, distributions finite and ≥ 0.
fn check_obs(t: &Tables, obs: HostObs<'_>, steps: usize) -> Result<usize> {
    let width = obs.width(t);
    let n = batch_of("obs", obs.len(), width * steps)?;
    // Where entry i of a row sits: its agent, step and modality (and outcome, for a dist).
    let place = |i: usize| {
        let (row, e) = (i / width, i % width);
        (row / steps, row % steps, e)
    };
    match obs {
        HostObs::Index(v) => {
            for (i, &o) in v.iter().enumerate() {
                let (agent, step, m) = place(i);
                if o < 0 || o as usize >= t.o[m] {
                    return Err(Error::invalid(
                        "obs",
                        format!(
                            "agent {agent}, step {step}, modality {m}: index {o} is out of range 0..{}",
                            t.o[m]
                        ),
                    ));
                }
            }
        }
        HostObs::Dist(v) => {
            for (i, &x) in v.iter().enumerate() {
                if !(x.is_finite() && x >= 0.0) {
                    let (agent, step, e) = place(i);
                    let m = t.o_off.iter().rposition(|&off| off <= e).unwrap_or(0);
                    return Err(Error::invalid(
                        "obs",
                        format!(
                            "agent {agent}, step {step}, modality {m}, outcome {}: {x} (a \
                             distribution must be finite and >= 0)",
                            e - t.o_off[m]
                        ),
                    ));
                }
            }
        }
    }
    Ok(n)
}

/// `Err` unless `v` holds `rows` belief vectors of ΣS entries (`per_agent` rows per agent),
/// all finite and ≥ 0.
fn check_beliefs(name: &str, t: &Tables, v: &[f64], rows: usize, per_agent: usize) -> Result<()> {
    check_len(name, v.len(), rows * t.sum_s)?;
    if let Some(i) = v.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
        let (row, e) = (i / t.sum_s, i % t.sum_s);
        let f = t.s_off.iter().rposition(|&off| off <= e).unwrap_or(0);
        let step = if per_agent > 1 {
            format!(", step {}", row % per_agent)
        } else {
            String::new()
        };
        return Err(Error::invalid(
            name,
            format!(
                "agent {}{step}, factor {f}, state {}: {} (must be finite and >= 0)",
                row / per_agent,
                e - t.s_off[f],
                v[i]
            ),
        ));
    }
    Ok(())
}

/// `Err` unless `actions` holds `[N, T−1, F]` actions, each in 0..U_f. Missing is an error only
/// when `required` and T > 1.
fn check_actions(
    t: &Tables,
    actions: Option<&[i32]>,
    n: usize,
    steps: usize,
    required: bool,
) -> Result<()> {
    let fc = t.factors();
    let Some(a) = actions else {
        if required && steps > 1 {
            return Err(Error::invalid(
                "actions",
                format!(
                    "missing: a window of {steps} steps needs [N, {}, F] past actions",
                    steps - 1
                ),
            ));
        }
        return Ok(());
    };
    check_len("actions", a.len(), n * (steps - 1) * fc)?;
    for (i, &u) in a.iter().enumerate() {
        let f = i % fc;
        if u < 0 || u as usize >= t.u[f] {
            let row = i / fc;
            return Err(Error::invalid(
                "actions",
                format!(
                    "agent {}, transition {}, factor {f}: action {u} is out of range (factor \
                     {f} has {} controls)",
                    row / (steps - 1),
                    row % (steps - 1),
                    t.u[f]
                ),
            ));
        }
    }
    Ok(())
}

/// ln max(prior, eps) per agent, `[N, ΣS]`: the given priors (checked) or D for everyone.
fn ln_priors(t: &Tables, prior: Option<&[f64]>, n: usize) -> Result<Vec<f64>> {
    match prior {
        Some(p) => {
            check_beliefs("prior", t, p, n, 1)?;
            Ok(p.iter().map(|&x| ln_clip(x)).collect())
        }
        None => {
            let ln_d: Vec<f64> = t.ln_d.concat();
            Ok((0..n).flat_map(|_| ln_d.iter().copied()).collect())
        }
    }
}

// =============================================================================================
// Shared pieces of the maths
// =============================================================================================

/// Factor f's slice of a flat belief vector.
fn factor<'q>(t: &Tables, q: &'q [f64], f: usize) -> &'q [f64] {
    &q[t.s_off[f]..t.s_off[f] + t.s[f]]
}

/// e^(x − max x) / Σ e^(x − max x).
fn softmax(x: &[f64]) -> Vec<f64> {
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|&v| (v - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|v| v / sum).collect()
}

/// softmax per factor of a flat `[ΣS]` vector of logs.
fn beliefs_from_logs(t: &Tables, log_q: &[f64]) -> Vec<f64> {
    (0..t.factors())
        .flat_map(|f| softmax(factor(t, log_q, f)))
        .collect()
}

/// ll_m for every modality, over A_m's columns: Σ_o o[o] ln max(A_m[o, ·], eps) (pymdp's
/// xlogy(o, clip(A)): outcomes with o = 0 contribute exactly 0); one row of ln A for an index.
fn log_likelihoods(t: &Tables, obs: HostObs<'_>) -> Vec<Vec<f64>> {
    (0..t.modalities())
        .map(|m| {
            let p = t.size[m];
            let ln_a = &t.ln_a[m];
            match obs {
                HostObs::Index(idx) => {
                    let o = idx[m] as usize;
                    ln_a[o * p..(o + 1) * p].to_vec()
                }
                HostObs::Dist(d) => {
                    let mut ll = vec![0.0; p];
                    for (o, &w) in d[t.o_off[m]..t.o_off[m] + t.o[m]].iter().enumerate() {
                        if w != 0.0 {
                            for (l, &la) in ll.iter_mut().zip(&ln_a[o * p..(o + 1) * p]) {
                                *l += w * la;
                            }
                        }
                    }
                    ll
                }
            }
        })
        .collect()
}

/// The stride of axis j of A_m's columns (deps(m)[j]): the product of the later axes' sizes.
fn axis_stride(t: &Tables, m: usize, j: usize) -> usize {
    t.deps[m][j + 1..].iter().map(|&g| t.s[g]).product()
}

/// Π_{j ≠ skip} q_{deps(m)[j]}(s_j) for every column (s_0, s_1, …) of A_m: the mean-field
/// weights over A_m's own dependency axes only (`skip`: the axis left free, if any).
fn column_weights(t: &Tables, m: usize, q: &[f64], skip: Option<usize>) -> Vec<f64> {
    let mut w = vec![1.0; t.size[m]];
    for (j, &g) in t.deps[m].iter().enumerate() {
        if skip == Some(j) {
            continue;
        }
        let (stride, qg) = (axis_stride(t, m, j), factor(t, q, g));
        for (col, wc) in w.iter_mut().enumerate() {
            *wc *= qg[(col / stride) % t.s[g]];
        }
    }
    w
}

/// Σ_cols values[col] · w[col]: the expectation of a per-column quantity.
fn dot(values: &[f64], w: &[f64]) -> f64 {
    values.iter().zip(w).map(|(v, w)| v * w).sum()
}

/// Σ_{m: f ∈ deps(m)} E_{q without f}[ll_m] as a function of s_f, modalities in index order (as
/// pymdp sums them). A factor no modality depends on gets zeros.
fn factor_evidence(t: &Tables, ll: &[Vec<f64>], q: &[f64], f: usize) -> Vec<f64> {
    let mut out = vec![0.0; t.s[f]];
    for (m, ll_m) in ll.iter().enumerate() {
        let Some(j) = t.deps[m].iter().position(|&g| g == f) else {
            continue;
        };
        let (stride, w) = (axis_stride(t, m, j), column_weights(t, m, q, Some(j)));
        for (col, (l, w)) in ll_m.iter().zip(&w).enumerate() {
            out[(col / stride) % t.s[f]] += l * w;
        }
    }
    out
}

/// Σ_m E_q[ll_m], the accuracy term of F.
fn accuracy(t: &Tables, ll: &[Vec<f64>], q: &[f64]) -> f64 {
    ll.iter()
        .enumerate()
        .map(|(m, ll_m)| dot(ll_m, &column_weights(t, m, q, None)))
        .sum()
}

/// Σ_f Σ_s q ln q with 0 ln 0 = 0 (pymdp's negative entropy).
fn neg_entropy(q: &[f64]) -> f64 {
    q.iter().map(|&x| x_ln_x(x)).sum()
}

/// y[s′] = Σ_s M[s′, s, a] x[s] for a `[n, n, u]` table M (B_f or a table shaped like it).
fn forward(m: &[f64], n: usize, u: usize, a: usize, x: &[f64]) -> Vec<f64> {
    (0..n)
        .map(|sp| (0..n).map(|s| m[(sp * n + s) * u + a] * x[s]).sum())
        .collect()
}

/// x[s] = Σ_{s′} y[s′] M[s′, s, a]: the transpose of [`forward`].
fn backward(m: &[f64], n: usize, u: usize, a: usize, y: &[f64]) -> Vec<f64> {
    (0..n)
        .map(|s| (0..n).map(|sp| y[sp] * m[(sp * n + s) * u + a]).sum())
        .collect()
}

// =============================================================================================
// State inference (fpi)
// =============================================================================================

/// F's three terms at beliefs q: F = neg_entropy + prior_cross_entropy − accuracy.
#[derive(Clone, Copy, Debug, Default)]
struct Vfe {
    neg_entropy: f64,
    prior_cross_entropy: f64,
    accuracy: f64,
}

impl Vfe {
    fn at(t: &Tables, ll: &[Vec<f64>], q: &[f64], ln_prior: &[f64]) -> Vfe {
        Vfe {
            neg_entropy: neg_entropy(q),
            prior_cross_entropy: -dot(q, ln_prior),
            accuracy: accuracy(t, ll, q),
        }
    }

    fn total(&self) -> f64 {
        self.neg_entropy + self.prior_cross_entropy - self.accuracy
    }
}

struct AgentFpi {
    q: Vec<f64>,
    vfe: Vfe,
    iterations: usize,
    trace: Vec<f64>,
}

/// One agent's fpi: Jacobi iterations of ln q_f = Σ_m E_{q without f}[ll_m] + ln prior_f from
/// uniform q, F_k recorded at q_k = softmax(ln q after k iterations), early stop on |ΔF| ≤ tol
/// after k ≥ 2 (tol > 0). With one factor the update does not depend on q, so one pass is the
/// exact posterior (pymdp ignores K there).
fn fpi_agent(t: &Tables, spec: &FpiSpec, ll: &[Vec<f64>], ln_prior: &[f64]) -> AgentFpi {
    let k_max = spec.num_iter as usize;
    let passes = if t.factors() == 1 { 1 } else { k_max };
    let tol = spec.tol as f64;
    let mut log_q = vec![0.0; t.sum_s];
    let mut q = beliefs_from_logs(t, &log_q);
    let mut vfe = Vfe::default();
    let mut trace = Vec::with_capacity(k_max);
    for k in 1..=passes {
        // Jacobi: every factor from the previous iterate q.
        log_q = (0..t.factors())
            .flat_map(|f| {
                let ev = factor_evidence(t, ll, &q, f);
                let lp = factor(t, ln_prior, f);
                ev.into_iter()
                    .zip(lp)
                    .map(|(e, p)| e + p)
                    .collect::<Vec<_>>()
            })
            .collect();
        q = beliefs_from_logs(t, &log_q);
        vfe = Vfe::at(t, ll, &q, ln_prior);
        trace.push(vfe.total());
        if tol > 0.0 && k >= 2 && (trace[k - 1] - trace[k - 2]).abs() <= tol {
            break;
        }
    }
    let iterations = trace.len();
    // After an early stop (or the single-factor pass) the trace stays at the last F.
    trace.resize(k_max, vfe.total());
    AgentFpi {
        q,
        vfe,
        iterations,
        trace,
    }
}

/// State inference (pymdp's fpi; the maths is in [`crate::vmp`]'s module docs). `prior`:
/// `[N, ΣS]` or None for D.
pub fn fpi(
    model: &Model,
    spec: &FpiSpec,
    obs: HostObs<'_>,
    prior: Option<&[f64]>,
) -> Result<FpiOut> {
    spec.validate()?;
    let t = &model.t;
    let n = check_obs(t, obs, 1)?;
    let ln_prior = ln_priors(t, prior, n)?;
    let agents: Vec<AgentFpi> = (0..n)
        .into_par_iter()
        .map(|i| {
            let ll = log_likelihoods(t, obs.row(t, i));
            fpi_agent(t, spec, &ll, &ln_prior[i * t.sum_s..(i + 1) * t.sum_s])
        })
        .collect();
    Ok(FpiOut {
        qs: agents.iter().flat_map(|a| a.q.iter().copied()).collect(),
        vfe: agents.iter().map(|a| a.vfe.total()).collect(),
        iterations: agents.iter().map(|a| a.iterations as i32).collect(),
        vfe_trace: agents
            .iter()
            .flat_map(|a| a.trace.iter().copied())
            .collect(),
        neg_entropy: agents.iter().map(|a| a.vfe.neg_entropy).collect(),
        prior_cross_entropy: agents.iter().map(|a| a.vfe.prior_cross_entropy).collect(),
        accuracy: agents.iter().map(|a| a.vfe.accuracy).collect(),
    })
}

// =============================================================================================
// Sequence inference (vmp, mmp) and the mean-field sequence free energy
// =============================================================================================

/// One agent's window: ll per step and modality, its `[T−1, F]` actions, ln max(prior, eps)
/// for step 0.
struct Window<'a> {
    t: &'a Tables,
    ll: Vec<Vec<Vec<f64>>>,
    acts: &'a [i32],
    ln_prior: &'a [f64],
}

impl Window<'_> {
    fn steps(&self) -> usize {
        self.ll.len()
    }

    /// The action of factor f on the transition from step k to k + 1.
    fn action(&self, k: usize, f: usize) -> usize {
        self.acts[k * self.t.factors() + f] as usize
    }

    /// Step k's beliefs `[ΣS]` in a `[T, ΣS]` vector.
    fn at<'q>(&self, q: &'q [f64], k: usize) -> &'q [f64] {
        &q[k * self.t.sum_s..(k + 1) * self.t.sum_s]
    }

    /// The messages into q_{k,f} from its neighbours in time (VMP-CONVENTIONS.md §7.3, §7.4):
    /// (forward, backward), from the beliefs `q` `[T, ΣS]` of the previous iterate.
    fn messages(&self, method: Method, q: &[f64], k: usize, f: usize) -> (Vec<f64>, Vec<f64>) {
        let t = self.t;
        let (n, u) = (t.s[f], t.u[f]);
        let q_f = |k: usize| factor(t, self.at(q, k), f);
        let last = k + 1 == self.steps();
        match method {
            Method::Vmp => {
                // fwd = ln B q_{k−1} (an expectation of logs), bwd = q_{k+1} · ln B.
                let fwd = if k == 0 {
                    factor(t, self.ln_prior, f).to_vec()
                } else {
                    forward(&t.ln_b[f], n, u, self.action(k - 1, f), q_f(k - 1))
                };
                let bwd = if last {
                    vec![0.0; n]
                } else {
                    backward(&t.ln_b[f], n, u, self.action(k, f), q_f(k + 1))
                };
                (fwd, bwd)
            }
            Method::Mmp => {
                // fwd = ln max(B q_{k−1}, eps), halved unless k is the last step (so the prior
                // is halved whenever T > 1); bwd = ½ ln max(q_{k+1} · B_n, eps), B_n being B
                // normalised over the previous state.
                let fwd: Vec<f64> = if k == 0 {
                    factor(t, self.ln_prior, f).to_vec()
                } else {
                    forward(&t.b[f], n, u, self.action(k - 1, f), q_f(k - 1))
                        .into_iter()
                        .map(ln_clip)
                        .collect()
                };
                let half = if last { 1.0 } else { 0.5 };
                let fwd = fwd.into_iter().map(|x| half * x).collect();
                let bwd = if last {
                    vec![0.0; n]
                } else {
                    backward(&t.bn[f], n, u, self.action(k, f), q_f(k + 1))
                        .into_iter()
                        .map(|x| 0.5 * ln_clip(x))
                        .collect()
                };
                (fwd, bwd)
            }
        }
    }

    /// K Jacobi (in t and f) mirror-descent steps from uniform q:
    /// x = ln q + τ (E[ll] − ln q + fwd + bwd), q = softmax(x − mean x). Returns q `[T, ΣS]`.
    fn infer(&self, spec: &SequenceSpec) -> Vec<f64> {
        let t = self.t;
        let tau = spec.tau as f64;
        let uniform: Vec<f64> = t.s.iter().flat_map(|&n| vec![1.0 / n as f64; n]).collect();
        let mut q: Vec<f64> = (0..self.steps())
            .flat_map(|_| uniform.iter().copied())
            .collect();
        for _ in 0..spec.num_iter {
            let mut next = Vec::with_capacity(q.len());
            for (k, ll_k) in self.ll.iter().enumerate() {
                let q_k = self.at(&q, k);
                for f in 0..t.factors() {
                    let ln_a = factor_evidence(t, ll_k, q_k, f);
                    let (fwd, bwd) = self.messages(spec.method, &q, k, f);
                    let x: Vec<f64> = factor(t, q_k, f)
                        .iter()
                        .enumerate()
                        .map(|(s, &qs)| {
                            let ln_q = ln_clip(qs);
                            ln_q + tau * (ln_a[s] - ln_q + fwd[s] + bwd[s])
                        })
                        .collect();
                    // pymdp centres x before the softmax (no change in exact arithmetic).
                    let mean = x.iter().sum::<f64>() / x.len() as f64;
                    let centred: Vec<f64> = x.iter().map(|v| v - mean).collect();
                    next.extend(softmax(&centred));
                }
            }
            q = next;
        }
        q
    }

    /// The per-step terms of the mean-field sequence free energy (§7.5) at beliefs `q`
    /// `[T, ΣS]`: [neg_entropy, prior_cross_entropy, transition_cross_entropy, accuracy].
    fn vfe_terms(&self, q: &[f64]) -> Vec<[f64; 4]> {
        let t = self.t;
        (0..self.steps())
            .map(|k| {
                let q_k = self.at(q, k);
                let ne = neg_entropy(q_k);
                let pce = if k == 0 {
                    -dot(q_k, self.ln_prior)
                } else {
                    0.0
                };
                // −Σ_{s′,s} q_k(s′) ln max(B[s′, s, a_{k−1}], eps) q_{k−1}(s): the pairwise
                // posterior taken as q_k ⊗ q_{k−1}.
                let tce = if k == 0 {
                    0.0
                } else {
                    -(0..t.factors())
                        .map(|f| {
                            let (n, u, a) = (t.s[f], t.u[f], self.action(k - 1, f));
                            let prev = factor(t, self.at(q, k - 1), f);
                            dot(factor(t, q_k, f), &forward(&t.ln_b[f], n, u, a, prev))
                        })
                        .sum::<f64>()
                };
                [ne, pce, tce, accuracy(t, &self.ll[k], q_k)]
            })
            .collect()
    }
}

/// Sequence inference over windows of `steps` steps.
pub fn sequence(
    model: &Model,
    spec: &SequenceSpec,
    steps: usize,
    obs: HostObs<'_>,
    actions: Option<&[i32]>,
    prior: Option<&[f64]>,
) -> Result<SequenceOut> {
    spec.validate()?;
    model.require_b("sequence inference (the B-messages between steps)")?;
    if steps == 0 {
        return Err(Error::invalid("steps", "must be >= 1"));
    }
    let t = &model.t;
    let n = check_obs(t, obs, steps)?;
    check_actions(t, actions, n, steps, true)?;
    let ln_prior = ln_priors(t, prior, n)?;
    let per_acts = (steps - 1) * t.factors();
    let agents: Vec<(Vec<f64>, Vec<[f64; 4]>)> = (0..n)
        .into_par_iter()
        .map(|i| {
            let window = Window {
                t,
                ll: (0..steps)
                    .map(|k| log_likelihoods(t, obs.row(t, i * steps + k)))
                    .collect(),
                acts: actions.map_or(&[][..], |a| &a[i * per_acts..(i + 1) * per_acts]),
                ln_prior: &ln_prior[i * t.sum_s..(i + 1) * t.sum_s],
            };
            let q = window.infer(spec);
            let terms = window.vfe_terms(&q);
            (q, terms)
        })
        .collect();
    let term = |j: usize| -> Vec<f64> {
        agents
            .iter()
            .flat_map(|(_, terms)| terms.iter().map(move |x| x[j]))
            .collect()
    };
    let vfe_t: Vec<f64> = agents
        .iter()
        .flat_map(|(_, terms)| terms.iter().map(|x| x[0] + x[1] + x[2] - x[3]))
        .collect();
    Ok(SequenceOut {
        qs: agents.iter().flat_map(|(q, _)| q.iter().copied()).collect(),
        vfe: vfe_t.chunks(steps).map(|v| v.iter().sum()).collect(),
        vfe_t,
        neg_entropy_t: term(0),
        prior_cross_entropy_t: term(1),
        transition_cross_entropy_t: term(2),
        accuracy_t: term(3),
    })
}

// =============================================================================================
// Policy inference
// =============================================================================================

/// ψ(x) for x > 0: the recurrence ψ(x) = ψ(x + 1) − 1/x up to x ≥ 10, then the asymptotic
/// series ln x − 1/(2x) − Σ B_2k/(2k x^2k), whose first omitted term is below 1e-16 there.
fn digamma(mut x: f64) -> f64 {
    let mut acc = 0.0;
    while x < 10.0 {
        acc -= 1.0 / x;
        x += 1.0;
    }
    let inv2 = 1.0 / (x * x);
    let series = inv2
        * (1.0 / 12.0
            - inv2
                * (1.0 / 120.0
                    - inv2
                        * (1.0 / 252.0
                            - inv2
                                * (1.0 / 240.0
                                    - inv2
                                        * (1.0 / 132.0
                                            - inv2 * (691.0 / 32760.0 - inv2 / 12.0))))));
    acc + x.ln() - 0.5 / x - series
}

/// pymdp's exact novelty weights of Dirichlet counts α `[rows, cols]` (normalised over axis 0):
/// W = ln ᾱ₀ − ln ᾱ + ψ(ᾱ + 1) − ψ(ᾱ₀ + 1) with ᾱ = max(α, eps), ᾱ₀ = max(Σ_axis0 ᾱ, eps), and
/// W = 0 where α ≤ 0 (spm_wnorm negated: both novelty terms are added to neg_efe).
pub(super) fn novelty_weights(alpha: &[f64], rows: usize) -> Vec<f64> {
    let cols = alpha.len() / rows;
    let sums: Vec<f64> = (0..cols)
        .map(|c| {
            (0..rows)
                .map(|r| alpha[r * cols + c].max(EPS))
                .sum::<f64>()
                .max(EPS)
        })
        .collect();
    alpha
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            if x > 0.0 {
                let (a, a0) = (x.max(EPS), sums[i % cols]);
                a0.ln() - a.ln() + digamma(a + 1.0) - digamma(a0 + 1.0)
            } else {
                0.0
            }
        })
        .collect()
}

/// The four terms of neg_efe for one policy, summed over the horizon.
#[derive(Clone, Copy, Debug, Default)]
struct EfeTerms {
    utility: f64,
    info_gain: f64,
    novelty_a: f64,
    novelty_b: f64,
}

/// One agent and one policy (§8): roll q forward through B at the policy's actions (no
/// normalisation), predict q(o_m) = Σ_s A_m[:, s] Π q(s), and score every step τ = 0…H−1.
fn policy_terms(
    t: &Tables,
    q0: &[f64],
    policy: &[i32],
    w_a: Option<&[Vec<f64>]>,
    w_b: Option<&[Vec<f64>]>,
) -> EfeTerms {
    let fc = t.factors();
    let mut out = EfeTerms::default();
    let mut q = q0.to_vec();
    for tau in 0..t.horizon {
        let prev = q;
        let action = |f: usize| policy[tau * fc + f] as usize;
        q = (0..fc)
            .flat_map(|f| forward(&t.b[f], t.s[f], t.u[f], action(f), factor(t, &prev, f)))
            .collect();
        for m in 0..t.modalities() {
            let (o_m, p) = (t.o[m], t.size[m]);
            let w = column_weights(t, m, &q, None);
            let qo: Vec<f64> = (0..o_m)
                .map(|o| dot(&t.a[m][o * p..(o + 1) * p], &w))
                .collect();
            out.utility += dot(&qo, &t.c[m]);
            // H[q(o)] − E_q[H[A(·|s)]], per modality.
            out.info_gain += -neg_entropy(&qo) - dot(&t.h_a[m], &w);
            if let Some(wa) = w_a {
                out.novelty_a += (0..o_m)
                    .map(|o| qo[o] * dot(&wa[m][o * p..(o + 1) * p], &w))
                    .sum::<f64>();
            }
        }
        if let Some(wb) = w_b {
            // q_next · W(pB[:, :, a]) · q_prev, per factor.
            out.novelty_b += (0..fc)
                .map(|f| {
                    let (n, u) = (t.s[f], t.u[f]);
                    let pred = forward(&wb[f], n, u, action(f), factor(t, &prev, f));
                    dot(factor(t, &q, f), &pred)
                })
                .sum::<f64>();
        }
    }
    out
}

/// All of a model's counts of one kind (via `read`, which works for GPU models too), or None.
pub(super) fn all_counts(
    len: usize,
    read: impl Fn(usize) -> Result<Option<Vec<f64>>>,
) -> Result<Option<Vec<Vec<f64>>>> {
    let mut out = Vec::with_capacity(len);
    for i in 0..len {
        match read(i)? {
            Some(c) => out.push(c),
            None => return Ok(None),
        }
    }
    Ok(Some(out))
}

/// Policy inference from beliefs `[N, ΣS]`.
pub fn policies(model: &Model, spec: &PolicySpec, qs: &[f64]) -> Result<PolicyOut> {
    spec.validate(model)?;
    let t = &model.t;
    let n = batch_of("qs", qs.len(), t.sum_s)?;
    check_beliefs("qs", t, qs, n, 1)?;
    // Novelty uses the model's current counts.
    let w_a = all_counts(t.modalities(), |m| model.counts_a(m))?.map(|pa| {
        pa.iter()
            .enumerate()
            .map(|(m, c)| novelty_weights(c, t.o[m]))
            .collect::<Vec<_>>()
    });
    let w_b = all_counts(t.factors(), |f| model.counts_b(f))?.map(|pb| {
        pb.iter()
            .enumerate()
            .map(|(f, c)| novelty_weights(c, t.s[f]))
            .collect::<Vec<_>>()
    });
    let (p_count, per_policy) = (t.num_policies, t.horizon * t.factors());
    let gamma = spec.gamma as f64;
    let agents: Vec<Vec<EfeTerms>> = (0..n)
        .into_par_iter()
        .map(|i| {
            let q0 = &qs[i * t.sum_s..(i + 1) * t.sum_s];
            (0..p_count)
                .map(|p| {
                    let policy = &t.policies[p * per_policy..(p + 1) * per_policy];
                    policy_terms(t, q0, policy, w_a.as_deref(), w_b.as_deref())
                })
                .collect()
        })
        .collect();
    // G = −neg_efe over the spec's terms; q(π) = softmax(−γG + ln E).
    let g: Vec<f64> = agents
        .iter()
        .flatten()
        .map(|e| {
            let mut neg_efe = 0.0;
            if spec.utility {
                neg_efe += e.utility;
            }
            if spec.state_info_gain {
                neg_efe += e.info_gain;
            }
            if spec.param_info_gain {
                neg_efe += e.novelty_a + e.novelty_b;
            }
            -neg_efe
        })
        .collect();
    let q_pi = g
        .chunks(p_count)
        .flat_map(|g| {
            let x: Vec<f64> = g
                .iter()
                .zip(&t.ln_e)
                .map(|(g, ln_e)| -gamma * g + ln_e)
                .collect();
            softmax(&x)
        })
        .collect();
    let term = |pick: fn(&EfeTerms) -> f64| agents.iter().flatten().map(pick).collect();
    Ok(PolicyOut {
        g,
        q_pi,
        utility: term(|e| e.utility),
        state_info_gain: term(|e| e.info_gain),
        novelty_a: term(|e| e.novelty_a),
        novelty_b: term(|e| e.novelty_b),
    })
}

// =============================================================================================
// Learning
// =============================================================================================

/// Agents per rayon task of learning: each task sums its agents in order and the chunks are
/// then summed in order, so the result does not depend on the thread count.
const LEARN_CHUNK: usize = 64;

/// Σ over a chunk of agents and their steps of the Dirichlet increments (before η), for the
/// tensors being learnt (None: skipped).
#[derive(Clone, Debug)]
struct Increments {
    a: Option<Vec<Vec<f64>>>,
    b: Option<Vec<Vec<f64>>>,
    d: Option<Vec<Vec<f64>>>,
}

impl Increments {
    fn zeros(t: &Tables, a: bool, b: bool, d: bool) -> Increments {
        let zeros = |on: bool, lens: Vec<usize>| {
            on.then(|| lens.into_iter().map(|l| vec![0.0; l]).collect())
        };
        Increments {
            a: zeros(a, (0..t.modalities()).map(|m| t.o[m] * t.size[m]).collect()),
            b: zeros(b, t.b.iter().map(Vec::len).collect()),
            d: zeros(d, t.s.clone()),
        }
    }

    fn add(&mut self, other: &Increments) {
        for (mine, theirs) in [
            (&mut self.a, &other.a),
            (&mut self.b, &other.b),
            (&mut self.d, &other.d),
        ] {
            if let (Some(x), Some(y)) = (mine, theirs) {
                for (x, y) in x.iter_mut().zip(y) {
                    x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
                }
            }
        }
    }
}

/// One agent's window into `inc`: o_{t,m} ⊗ q_t(deps(m)) for every step (A's axis order),
/// q_{t+1,f} ⊗ q_{t,f} at the action taken for every transition, q_{0,f} for D.
fn accumulate(t: &Tables, inc: &mut Increments, obs: &[HostObs<'_>], q: &[f64], acts: &[i32]) {
    let fc = t.factors();
    let q_at = |k: usize| &q[k * t.sum_s..(k + 1) * t.sum_s];
    if let Some(a) = &mut inc.a {
        for (k, o_k) in obs.iter().enumerate() {
            for (m, a_m) in a.iter_mut().enumerate() {
                let (o_m, p) = (t.o[m], t.size[m]);
                let w = column_weights(t, m, q_at(k), None);
                // The observation as a distribution over O_m (one-hot for an index).
                let dist: Vec<f64> = match *o_k {
                    HostObs::Index(idx) => (0..o_m)
                        .map(|o| if o == idx[m] as usize { 1.0 } else { 0.0 })
                        .collect(),
                    HostObs::Dist(d) => d[t.o_off[m]..t.o_off[m] + o_m].to_vec(),
                };
                for (o, &x) in dist.iter().enumerate() {
                    if x != 0.0 {
                        for (c, wc) in a_m[o * p..(o + 1) * p].iter_mut().zip(&w) {
                            *c += x * wc;
                        }
                    }
                }
            }
        }
    }
    if let Some(b) = &mut inc.b {
        for k in 0..obs.len().saturating_sub(1) {
            for (f, b_f) in b.iter_mut().enumerate() {
                let (n, u, act) = (t.s[f], t.u[f], acts[k * fc + f] as usize);
                let (next, prev) = (factor(t, q_at(k + 1), f), factor(t, q_at(k), f));
                for sp in 0..n {
                    for s in 0..n {
                        b_f[(sp * n + s) * u + act] += next[sp] * prev[s];
                    }
                }
            }
        }
    }
    if let Some(d) = &mut inc.d {
        for (f, d_f) in d.iter_mut().enumerate() {
            d_f.iter_mut()
                .zip(factor(t, q_at(0), f))
                .for_each(|(x, q)| *x += q);
        }
    }
}

/// The Dirichlet updates of the model's counts (not applied: returned).
pub fn learn(
    model: &Model,
    spec: &LearnSpec,
    steps: usize,
    obs: HostObs<'_>,
    qs: &[f64],
    actions: Option<&[i32]>,
) -> Result<LearnOut> {
    spec.validate(model)?;
    if steps == 0 {
        return Err(Error::invalid("steps", "must be >= 1"));
    }
    let t = &model.t;
    let n = check_obs(t, obs, steps)?;
    check_beliefs("qs", t, qs, n * steps, steps)?;
    check_actions(t, actions, n, steps, spec.lr_b > 0.0)?;
    let pa = all_counts(t.modalities(), |m| model.counts_a(m))?;
    let pb = all_counts(t.factors(), |f| model.counts_b(f))?;
    let pd = all_counts(t.factors(), |f| model.counts_d(f))?;
    let (lr_a, lr_b, lr_d) = (spec.lr_a as f64, spec.lr_b as f64, spec.lr_d as f64);
    // pB needs a transition; with T = 1 there is nothing to add (pymdp skips the update).
    let (on_a, on_b, on_d) = (
        lr_a > 0.0 && pa.is_some(),
        lr_b > 0.0 && pb.is_some() && steps > 1,
        lr_d > 0.0 && pd.is_some(),
    );
    let per_acts = (steps - 1) * t.factors();
    let chunks: Vec<Increments> = (0..n.div_ceil(LEARN_CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut inc = Increments::zeros(t, on_a, on_b, on_d);
            for i in c * LEARN_CHUNK..((c + 1) * LEARN_CHUNK).min(n) {
                let rows: Vec<HostObs<'_>> =
                    (0..steps).map(|k| obs.row(t, i * steps + k)).collect();
                let q = &qs[i * steps * t.sum_s..(i + 1) * steps * t.sum_s];
                let acts = actions.map_or(&[][..], |a| &a[i * per_acts..(i + 1) * per_acts]);
                accumulate(t, &mut inc, &rows, q, acts);
            }
            inc
        })
        .collect();
    let mut total = Increments::zeros(t, on_a, on_b, on_d);
    chunks.iter().for_each(|c| total.add(c));
    // counts + η · increments; pD only where pD > 0 (pymdp's legacy rule).
    let apply = |counts: Option<Vec<Vec<f64>>>,
                 inc: Option<Vec<Vec<f64>>>,
                 lr: f64,
                 masked: bool| match (counts, inc) {
        (Some(mut c), Some(inc)) => {
            for (c, inc) in c.iter_mut().zip(&inc) {
                for (c, x) in c.iter_mut().zip(inc) {
                    if !masked || *c > 0.0 {
                        *c += lr * x;
                    }
                }
            }
            Some(c)
        }
        (counts, _) => counts,
    };
    Ok(LearnOut {
        a: apply(pa, total.a, lr_a, false),
        b: apply(pb, total.b, lr_b, false),
        d: apply(pd, total.d, lr_d, true),
    })
}

// =============================================================================================
// The CPU device: f32/i32 host views → the reference → f32 outputs
// =============================================================================================

/// Host observations from the CPU device's views: indices as they are, distributions in f64.
enum ObsCopy<'a> {
    Index(&'a [i32]),
    Dist(Vec<f64>),
}

impl<'a> ObsCopy<'a> {
    fn new(obs: &Obs<'a>) -> ObsCopy<'a> {
        match obs {
            Obs::Index(v) => ObsCopy::Index(v.host_slice()),
            Obs::Dist(v) => ObsCopy::Dist(widen(v)),
        }
    }

    fn host(&self) -> HostObs<'_> {
        match self {
            ObsCopy::Index(v) => HostObs::Index(v),
            ObsCopy::Dist(v) => HostObs::Dist(v),
        }
    }
}

fn widen(v: &View<'_, f32>) -> Vec<f64> {
    v.host_slice().iter().map(|&x| x as f64).collect()
}

fn store_f32(dst: &mut ViewMut<'_, f32>, src: &[f64]) {
    debug_assert_eq!(dst.len(), src.len());
    for (d, &s) in dst.host_slice_mut().iter_mut().zip(src) {
        *d = s as f32;
    }
}

pub(crate) fn states_views(
    model: &Model,
    spec: &FpiSpec,
    obs: &Obs<'_>,
    prior: Option<&View<'_, f32>>,
    n: usize,
    mut out: StatesOutputs<'_>,
) -> Result<()> {
    let obs = ObsCopy::new(obs);
    let prior = prior.map(widen);
    let r = fpi(model, spec, obs.host(), prior.as_deref())?;
    debug_assert_eq!(r.vfe.len(), n);
    store_f32(&mut out.qs, &r.qs);
    if let Some(v) = &mut out.vfe {
        store_f32(v, &r.vfe);
    }
    if let Some(v) = &mut out.iterations {
        v.host_slice_mut().copy_from_slice(&r.iterations);
    }
    if let Some(v) = &mut out.vfe_trace {
        store_f32(v, &r.vfe_trace);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn sequence_views(
    model: &Model,
    spec: &SequenceSpec,
    steps: usize,
    obs: &Obs<'_>,
    actions: Option<&View<'_, i32>>,
    prior: Option<&View<'_, f32>>,
    n: usize,
    mut out: SequenceOutputs<'_>,
) -> Result<()> {
    let obs = ObsCopy::new(obs);
    let actions = actions.map(|a| a.host_slice());
    let prior = prior.map(widen);
    let r = sequence(model, spec, steps, obs.host(), actions, prior.as_deref())?;
    debug_assert_eq!(r.vfe.len(), n);
    store_f32(&mut out.qs, &r.qs);
    if let Some(v) = &mut out.vfe {
        store_f32(v, &r.vfe);
    }
    if let Some(v) = &mut out.vfe_t {
        store_f32(v, &r.vfe_t);
    }
    Ok(())
}

pub(crate) fn policies_views(
    model: &Model,
    spec: &PolicySpec,
    qs: &View<'_, f32>,
    n: usize,
    mut out: PolicyOutputs<'_>,
) -> Result<()> {
    let r = policies(model, spec, &widen(qs))?;
    debug_assert_eq!(r.g.len(), n * model.t.num_policies);
    if let Some(v) = &mut out.g {
        store_f32(v, &r.g);
    }
    store_f32(&mut out.q_pi, &r.q_pi);
    Ok(())
}

pub(crate) fn learn_views(
    model: &mut Model,
    spec: &LearnSpec,
    steps: usize,
    obs: &Obs<'_>,
    qs: &View<'_, f32>,
    actions: Option<&View<'_, i32>>,
    n: usize,
) -> Result<()> {
    let obs = ObsCopy::new(obs);
    let r = learn(
        model,
        spec,
        steps,
        obs.host(),
        &widen(qs),
        actions.map(|a| a.host_slice()),
    )?;
    debug_assert!(n >= 1);
    model.counts.a = r.a;
    model.counts.b = r.b;
    model.counts.d = r.d;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digamma_matches_known_values() {
        // ψ(1) = −γ, ψ(2) = 1 − γ, ψ(1/2) = −γ − 2 ln 2, and two values from the asymptotic range.
        let euler = 0.577_215_664_901_532_9_f64;
        let cases = [
            (1.0, -euler),
            (2.0, 1.0 - euler),
            (0.5, -euler - 2.0 * std::f64::consts::LN_2),
            (10.0, 2.251_752_589_066_721),
            (100.0, 4.600_161_852_738_087),
            (1.0 + 1e-12, -euler + 1.644_934_066_848_226 * 1e-12),
        ];
        for (x, want) in cases {
            let got = digamma(x);
            assert!(
                (got - want).abs() <= 2e-15 * want.abs().max(1.0),
                "psi({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn softmax_is_shift_invariant_and_normalised() {
        let a = softmax(&[1.0, 2.0, 3.0]);
        let b = softmax(&[1001.0, 1002.0, 1003.0]);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-15);
        }
        assert!((a.iter().sum::<f64>() - 1.0).abs() < 1e-15);
    }
}
