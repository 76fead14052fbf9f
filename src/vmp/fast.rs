//! The fast CPU VMP (`Device::cpu()`): state, sequence and policy inference in f32, one agent
//! at a time per task, agents split into fixed chunks of [`CHUNK`] run in parallel by rayon.
//!
//! * Per call, the model's tables are converted once to f32 ([`Base`], [`Trans`], [`Efe`]):
//!   ln A with pymdp's eps clipping (the f64 tables of [`super::model::Tables`], rounded), B,
//!   ln B and MMP's B_n transposed per action to `[U][S′][S]` so that B·q is a row of dot
//!   products and qᵀ·B a sum of contiguous rows, H[A_m(·|s)] per column, C, ln D, ln E, and the
//!   novelty weights (computed in f64 by the reference's own `novelty_weights`, then rounded).
//! * Log-likelihoods: an index observation copies a row of ln A_m; distributions of a chunk of
//!   agents go through one `matrixmultiply::sgemm` per modality (`[rows, O_m] × [O_m, P_m]`).
//! * The mean-field expectations over a modality's dependency axes contract the `[L, S_j, R]`
//!   view of ll_m with the outer products of the beliefs before (L) and after (R) axis j: a
//!   contiguous dot over R per (l, s), or contiguous rows when j is the last axis. The
//!   expectation for the first axis, dotted with its beliefs, is the accuracy E_q[ll_m], so the
//!   evidence computed for iteration k + 1 gives F at iteration k for free.
//! * State inference without early stop (tol = 0, pymdp's default) runs 16 agents side by side
//!   in the lanes of `[f32; 16]` vectors ([`super::fast_lanes`]); with tol > 0 (per-agent
//!   stopping) it runs one agent at a time here ([`fpi_chunk`]).
//! * Policy inference: per chunk and policy, the rollout is one GEMM per factor and the
//!   predictions (with H[A] and W(pA) as extra columns) one GEMM per modality.
//! * exp and ln are the polynomial f32 versions of [`super::fast_math`]; the per-chunk workers
//!   are multiversioned (AVX-512 / AVX2+FMA / NEON), everything they call is inlined into them.
//! * Deterministic: each agent's arithmetic does not depend on the chunk or thread it runs on,
//!   every output element is written by one task, and the chunks are fixed.
//!
//! Validation: every input the reference checks (indices in range, distributions, priors and
//! beliefs finite and ≥ 0, actions in range) is scanned first; when a check fails, the call is
//! handed to the reference ([`super::cpu`]), which returns the very same error (variant,
//! argument and message) before writing anything. Nothing here writes before the scan passed.
//!
//! Not here: [`super::learn`] (Dirichlet count updates: one pass of outer products per window,
//! memory-bound, already parallel in the reference, counts kept in f64) still runs the f64
//! reference on the CPU device. Every inference option (fpi with and without early stop, vmp
//! and mmp, every policy term including novelty) runs here; nothing else falls back.

use rayon::prelude::*;

use super::cpu;
use super::fast_math::{axpy, dot, ln_clip, neg_entropy, outer_into, softmax_in_place};
use super::model::{Model, Tables};
use super::{
    FpiSpec, Method, Obs, PolicyOutputs, PolicySpec, SequenceOutputs, SequenceSpec, StatesOutputs,
};
use crate::backend::View;
use crate::error::Result;

/// Agents per rayon task (fixed: the partition does not depend on the thread count).
const CHUNK: usize = 32;

// =============================================================================================
// Per-call f32 tables
// =============================================================================================

/// The model's layout and its f32 log-likelihood tables.
pub(super) struct Base {
    pub(super) fc: usize,
    pub(super) s: Vec<usize>,
    pub(super) s_off: Vec<usize>,
    pub(super) sum_s: usize,
    pub(super) max_s: usize,
    pub(super) o: Vec<usize>,
    pub(super) o_off: Vec<usize>,
    pub(super) sum_o: usize,
    pub(super) deps: Vec<Vec<usize>>,
    pub(super) size: Vec<usize>,
    /// Offset of modality m's ll in a row of Σ P_m.
    pub(super) p_off: Vec<usize>,
    pub(super) sum_p: usize,
    pub(super) max_p: usize,
    /// ln max(A_m, eps) `[O_m, P_m]`.
    pub(super) ln_a: Vec<Vec<f32>>,
    /// ln max(D, eps) `[ΣS]`.
    pub(super) ln_d: Vec<f32>,
}

fn to32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// `[S′, S, U]` → `[U][S][S′]` (column s of action a contiguous: B q is a sum of rows).
fn per_action_t(b: &[f64], n: usize, u: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; b.len()];
    for a in 0..u {
        for s in 0..n {
            for sp in 0..n {
                out[(a * n + s) * n + sp] = b[(sp * n + s) * u + a] as f32;
            }
        }
    }
    out
}

/// `[S′, S, U]` → `[U][S′][S]`.
fn per_action(b: &[f64], n: usize, u: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; b.len()];
    for a in 0..u {
        for sp in 0..n {
            for s in 0..n {
                out[(a * n + sp) * n + s] = b[(sp * n + s) * u + a] as f32;
            }
        }
    }
    out
}

impl Base {
    fn new(t: &Tables) -> Base {
        let mut p_off = vec![0; t.modalities()];
        for m in 1..t.modalities() {
            p_off[m] = p_off[m - 1] + t.size[m - 1];
        }
        Base {
            fc: t.factors(),
            s: t.s.clone(),
            s_off: t.s_off.clone(),
            sum_s: t.sum_s,
            max_s: t.s.iter().copied().max().unwrap_or(1),
            o: t.o.clone(),
            o_off: t.o_off.clone(),
            sum_o: t.sum_o,
            deps: t.deps.clone(),
            size: t.size.clone(),
            p_off,
            sum_p: t.size.iter().sum(),
            max_p: t.size.iter().copied().max().unwrap_or(1),
            ln_a: t.ln_a.iter().map(|v| to32(v)).collect(),
            ln_d: t.ln_d.iter().flat_map(|v| to32(v)).collect(),
        }
    }

    fn modalities(&self) -> usize {
        self.o.len()
    }

    #[inline(always)]
    fn factor<'q>(&self, q: &'q [f32], f: usize) -> &'q [f32] {
        &q[self.s_off[f]..self.s_off[f] + self.s[f]]
    }
}

/// Per factor and action: B per action (`[U][S′][S]`: B q as row dots) and transposed
/// (`[U][S][S′]`: the policy GEMMs), ln B both ways (fwd = ln B q, bwd = qᵀ ln B as row dots),
/// and B_n transposed (MMP's bwd).
struct Trans {
    b_t: Vec<Vec<f32>>,
    ln_b_t: Vec<Vec<f32>>,
    b: Vec<Vec<f32>>,
    ln_b: Vec<Vec<f32>>,
    bn_t: Vec<Vec<f32>>,
}

impl Trans {
    fn new(t: &Tables) -> Trans {
        let pa = |v: &[Vec<f64>]| -> Vec<Vec<f32>> {
            v.iter()
                .enumerate()
                .map(|(f, b)| per_action(b, t.s[f], t.u[f]))
                .collect()
        };
        let pt = |v: &[Vec<f64>]| -> Vec<Vec<f32>> {
            v.iter()
                .enumerate()
                .map(|(f, b)| per_action_t(b, t.s[f], t.u[f]))
                .collect()
        };
        Trans {
            b_t: pt(&t.b),
            ln_b_t: pt(&t.ln_b),
            b: pa(&t.b),
            ln_b: pa(&t.ln_b),
            bn_t: pt(&t.bn),
        }
    }

    /// Factor f's `[S′][S]` table of action a in `tab`.
    #[inline(always)]
    fn at(tab: &[Vec<f32>], n: usize, f: usize, a: usize) -> &[f32] {
        &tab[f][a * n * n..(a + 1) * n * n]
    }
}

/// y[r] = Σ_c M[r, c] x[c] for a row-major `[rows, n]` M: one dot product per row (each with
/// eight partial sums: on long rows this rounds less than a serial sum).
#[inline(always)]
fn rows_dot(m: &[f32], x: &[f32], y: &mut [f32]) {
    let n = x.len();
    for (r, y) in y.iter_mut().enumerate() {
        *y = dot(&m[r * n..(r + 1) * n], x);
    }
}

// =============================================================================================
// Observations, validation, log-likelihoods
// =============================================================================================

#[derive(Clone, Copy)]
pub(super) enum ObsRef<'a> {
    Index(&'a [i32]),
    Dist(&'a [f32]),
}

impl<'a> ObsRef<'a> {
    fn new(obs: &Obs<'a>) -> ObsRef<'a> {
        match obs {
            Obs::Index(v) => ObsRef::Index(v.host_slice()),
            Obs::Dist(v) => ObsRef::Dist(v.host_slice()),
        }
    }

    /// The reference's data checks: indices in 0..O_m, distributions finite and ≥ 0.
    fn valid(&self, b: &Base) -> bool {
        match *self {
            ObsRef::Index(v) => {
                let mc = b.modalities();
                v.chunks(mc).all(|row| {
                    row.iter()
                        .zip(&b.o)
                        .all(|(&i, &o)| i >= 0 && (i as usize) < o)
                })
            }
            ObsRef::Dist(v) => finite_nonneg(v),
        }
    }
}

fn finite_nonneg(v: &[f32]) -> bool {
    v.iter().all(|x| x.is_finite() && *x >= 0.0)
}

fn actions_valid(u: &[usize], a: &[i32]) -> bool {
    a.chunks(u.len())
        .all(|row| row.iter().zip(u).all(|(&x, &u)| x >= 0 && (x as usize) < u))
}

/// ll rows `first..first + rows` (row = agent · T + step) into `ll` `[rows, ΣP]`.
#[inline(always)]
pub(super) fn fill_ll(b: &Base, obs: ObsRef<'_>, first: usize, rows: usize, ll: &mut [f32]) {
    match obs {
        ObsRef::Index(idx) => {
            let mc = b.modalities();
            for r in 0..rows {
                let row = &idx[(first + r) * mc..(first + r + 1) * mc];
                for m in 0..mc {
                    let (p, o) = (b.size[m], row[m] as usize);
                    ll[r * b.sum_p + b.p_off[m]..][..p].copy_from_slice(&b.ln_a[m][o * p..][..p]);
                }
            }
        }
        ObsRef::Dist(d) => {
            for m in 0..b.modalities() {
                let (o, p) = (b.o[m], b.size[m]);
                let a = &d[first * b.sum_o + b.o_off[m]..];
                debug_assert!(a.len() >= (rows - 1) * b.sum_o + o);
                // Safety: A is rows × O_m at row stride ΣO inside `d` (checked by the slice
                // above and the caller's batch), B is ln A_m (O_m × P_m, contiguous), C is rows ×
                // P_m at row stride ΣP inside `ll` (len rows · ΣP).
                unsafe {
                    matrixmultiply::sgemm(
                        rows,
                        o,
                        p,
                        1.0,
                        a.as_ptr(),
                        b.sum_o as isize,
                        1,
                        b.ln_a[m].as_ptr(),
                        p as isize,
                        1,
                        0.0,
                        ll[b.p_off[m]..].as_mut_ptr(),
                        b.sum_p as isize,
                        1,
                    );
                }
            }
        }
    }
}

// =============================================================================================
// Mean-field expectations over a modality's dependency axes
// =============================================================================================

/// Per-task scratch of the contractions.
struct Contract {
    wl: Vec<f32>,
    wr: Vec<f32>,
    tmp: Vec<f32>,
}

impl Contract {
    fn new(b: &Base) -> Contract {
        Contract {
            wl: vec![0.0; b.max_p.max(1)],
            wr: vec![0.0; b.max_p.max(1)],
            tmp: vec![0.0; b.max_s],
        }
    }
}

/// out[s] = Σ_{s∖s_j} ll_m(s) Π_{i ≠ j} q_{deps(m)[i]}(s_i): ll_m seen as `[L, S_j, R]`.
#[inline(always)]
fn contract_axis(b: &Base, m: usize, ll: &[f32], q: &[f32], j: usize, c: &mut Contract) {
    let deps = &b.deps[m];
    let s = b.s[deps[j]];
    let l_len = outer_into(&mut c.wl, deps[..j].iter().map(|&g| b.factor(q, g)));
    let r_len = outer_into(&mut c.wr, deps[j + 1..].iter().map(|&g| b.factor(q, g)));
    let out = &mut c.tmp[..s];
    out.fill(0.0);
    if r_len == 1 {
        for l in 0..l_len {
            axpy(out, c.wl[l], &ll[l * s..(l + 1) * s]);
        }
    } else {
        let wr = &c.wr[..r_len];
        for l in 0..l_len {
            let wl = c.wl[l];
            for (si, o) in out.iter_mut().enumerate() {
                *o = wl.mul_add(dot(&ll[(l * s + si) * r_len..][..r_len], wr), *o);
            }
        }
    }
}

/// With `all`: ev = Σ_{m: f ∈ deps(m)} E_{q without f}[ll_m] per factor (modalities in order).
/// Returns Σ_m E_q[ll_m] (the accuracy at q) either way; without `all` ev is untouched.
#[inline(always)]
fn evidence(b: &Base, ll: &[f32], q: &[f32], all: bool, ev: &mut [f32], c: &mut Contract) -> f32 {
    if all {
        ev.fill(0.0);
    }
    let mut acc = 0.0;
    for m in 0..b.modalities() {
        let ll_m = &ll[b.p_off[m]..b.p_off[m] + b.size[m]];
        let deps = &b.deps[m];
        let axes = if all { deps.len() } else { 1 };
        for (j, &g) in deps.iter().enumerate().take(axes) {
            let s = b.s[g];
            contract_axis(b, m, ll_m, q, j, c);
            if j == 0 {
                acc += dot(&c.tmp[..s], b.factor(q, g));
            }
            if all {
                axpy(&mut ev[b.s_off[g]..b.s_off[g] + s], 1.0, &c.tmp[..s]);
            }
        }
    }
    acc
}

/// q ← uniform per factor.
fn uniform(b: &Base, q: &mut [f32]) {
    for f in 0..b.fc {
        let n = b.s[f];
        q[b.s_off[f]..b.s_off[f] + n].fill(1.0 / n as f32);
    }
}

/// ln max(prior, eps) of one agent (its given prior, or D).
#[inline(always)]
fn ln_prior_into(b: &Base, prior: Option<&[f32]>, agent: usize, lnp: &mut [f32]) {
    match prior {
        Some(p) => {
            for (l, &x) in lnp
                .iter_mut()
                .zip(&p[agent * b.sum_s..(agent + 1) * b.sum_s])
            {
                *l = ln_clip(x);
            }
        }
        None => lnp.copy_from_slice(&b.ln_d),
    }
}

/// Disjoint chunks of an optional output, `count` of them (None each without the output).
fn chunks_of<T>(v: Option<&mut [T]>, per: usize, count: usize) -> Vec<Option<&mut [T]>> {
    match v {
        Some(v) => {
            let c: Vec<_> = v.chunks_mut(per.max(1)).map(Some).collect();
            debug_assert_eq!(c.len(), count);
            c
        }
        None => (0..count).map(|_| None).collect(),
    }
}

// =============================================================================================
// State inference
// =============================================================================================

pub(super) struct FpiTask<'a> {
    pub(super) first: usize,
    pub(super) qs: &'a mut [f32],
    pub(super) vfe: Option<&'a mut [f32]>,
    pub(super) its: Option<&'a mut [i32]>,
    pub(super) trace: Option<&'a mut [f32]>,
}

simd_fn! {
fn fpi_chunk<'a, 'o>(
    b: &Base,
    spec: &FpiSpec,
    obs: ObsRef<'o>,
    prior: Option<&[f32]>,
    task: &mut FpiTask<'a>,
) {
    let ss = b.sum_s;
    let cn = task.qs.len() / ss;
    let k_max = spec.num_iter as usize;
    let passes = if b.fc == 1 { 1 } else { k_max };
    let tol = spec.tol;
    let mut ll = vec![0.0f32; cn * b.sum_p];
    fill_ll(b, obs, task.first, cn, &mut ll);
    let mut c = Contract::new(b);
    let (mut q, mut ev, mut lnp) = (vec![0.0f32; ss], vec![0.0f32; ss], vec![0.0f32; ss]);
    let mut trace = vec![0.0f32; k_max];
    for i in 0..cn {
        let ll_i = &ll[i * b.sum_p..(i + 1) * b.sum_p];
        ln_prior_into(b, prior, task.first + i, &mut lnp);
        uniform(b, &mut q);
        evidence(b, ll_i, &q, true, &mut ev, &mut c);
        let (mut f_prev, mut f_k, mut iters) = (0.0f32, 0.0f32, 0);
        for k in 1..=passes {
            // Jacobi: every factor from the previous iterate (ev was computed at it).
            for ((q, &e), &p) in q.iter_mut().zip(&ev).zip(&lnp) {
                *q = e + p;
            }
            for f in 0..b.fc {
                softmax_in_place(&mut q[b.s_off[f]..b.s_off[f] + b.s[f]]);
            }
            // The evidence at q_k feeds iteration k + 1 and gives F_k's accuracy.
            let acc = evidence(b, ll_i, &q, k < passes, &mut ev, &mut c);
            f_k = neg_entropy(&q) + -dot(&q, &lnp) - acc;
            trace[k - 1] = f_k;
            iters = k;
            if tol > 0.0 && k >= 2 && (f_k - f_prev).abs() <= tol {
                break;
            }
            f_prev = f_k;
        }
        trace[iters..].fill(f_k);
        task.qs[i * ss..(i + 1) * ss].copy_from_slice(&q);
        if let Some(v) = task.vfe.as_deref_mut() {
            v[i] = f_k;
        }
        if let Some(v) = task.its.as_deref_mut() {
            v[i] = iters as i32;
        }
        if let Some(v) = task.trace.as_deref_mut() {
            v[i * k_max..(i + 1) * k_max].copy_from_slice(&trace);
        }
    }
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
    let b = Base::new(&model.t);
    let o = ObsRef::new(obs);
    let p = prior.map(|p| p.host_slice());
    if !o.valid(&b) || !p.is_none_or(finite_nonneg) {
        // The reference names the bad element (and writes nothing).
        return cpu::states_views(model, spec, obs, prior, n, out);
    }
    let (ss, k) = (b.sum_s, spec.num_iter as usize);
    let count = n.div_ceil(CHUNK);
    let qs = out.qs.host_slice_mut();
    let vfe = chunks_of(out.vfe.as_mut().map(|v| v.host_slice_mut()), CHUNK, count);
    let its = chunks_of(
        out.iterations.as_mut().map(|v| v.host_slice_mut()),
        CHUNK,
        count,
    );
    let trace = chunks_of(
        out.vfe_trace.as_mut().map(|v| v.host_slice_mut()),
        CHUNK * k,
        count,
    );
    let tasks: Vec<FpiTask<'_>> = qs
        .chunks_mut(CHUNK * ss)
        .zip(vfe)
        .zip(its)
        .zip(trace)
        .enumerate()
        .map(|(i, (((qs, vfe), its), trace))| FpiTask {
            first: i * CHUNK,
            qs,
            vfe,
            its,
            trace,
        })
        .collect();
    tasks.into_par_iter().for_each(|mut t| {
        if spec.tol == 0.0 {
            super::fast_lanes::fpi_chunk_lanes(&b, spec, o, p, &mut t)
        } else {
            fpi_chunk(&b, spec, o, p, &mut t)
        }
    });
    Ok(())
}

// =============================================================================================
// Sequence inference
// =============================================================================================

struct SeqTask<'a> {
    first: usize,
    qs: &'a mut [f32],
    vfe: Option<&'a mut [f32]>,
    vfe_t: Option<&'a mut [f32]>,
}

/// The inputs of a sequence call shared by every task.
struct SeqIn<'a> {
    b: &'a Base,
    tr: &'a Trans,
    spec: &'a SequenceSpec,
    steps: usize,
    obs: ObsRef<'a>,
    actions: &'a [i32],
    prior: Option<&'a [f32]>,
}

simd_fn! {
fn sequence_chunk<'a, 'o>(x: &SeqIn<'o>, task: &mut SeqTask<'a>) {
    let (b, tr, steps) = (x.b, x.tr, x.steps);
    let (ss, fc) = (b.sum_s, b.fc);
    let per = steps * ss;
    let cn = task.qs.len() / per;
    let tau = x.spec.tau;
    let mut ll = vec![0.0f32; cn * steps * b.sum_p];
    fill_ll(b, x.obs, task.first * steps, cn * steps, &mut ll);
    let mut c = Contract::new(b);
    let (mut q, mut next) = (vec![0.0f32; per], vec![0.0f32; per]);
    let (mut ev, mut lnp) = (vec![0.0f32; ss], vec![0.0f32; ss]);
    let (mut fwd, mut bwd) = (vec![0.0f32; b.max_s], vec![0.0f32; b.max_s]);
    let mut vt = vec![0.0f32; steps];
    let per_acts = (steps - 1) * fc;
    for i in 0..cn {
        let agent = task.first + i;
        let ll_i = &ll[i * steps * b.sum_p..(i + 1) * steps * b.sum_p];
        let acts = if per_acts == 0 {
            &[][..]
        } else {
            &x.actions[agent * per_acts..(agent + 1) * per_acts]
        };
        let act = |k: usize, f: usize| acts[k * fc + f] as usize;
        ln_prior_into(b, x.prior, agent, &mut lnp);
        for k in 0..steps {
            uniform(b, &mut q[k * ss..(k + 1) * ss]);
        }
        for _ in 0..x.spec.num_iter {
            for k in 0..steps {
                let last = k + 1 == steps;
                let q_k = &q[k * ss..(k + 1) * ss];
                evidence(
                    b,
                    &ll_i[k * b.sum_p..(k + 1) * b.sum_p],
                    q_k,
                    true,
                    &mut ev,
                    &mut c,
                );
                for f in 0..fc {
                    let (n, off) = (b.s[f], b.s_off[f]);
                    let (fwd, bwd) = (&mut fwd[..n], &mut bwd[..n]);
                    let q_at = |k: usize| &q[k * ss + off..k * ss + off + n];
                    match x.spec.method {
                        Method::Vmp => {
                            if k == 0 {
                                fwd.copy_from_slice(&lnp[off..off + n]);
                            } else {
                                let m = Trans::at(&tr.ln_b, n, f, act(k - 1, f));
                                rows_dot(m, q_at(k - 1), fwd);
                            }
                            if last {
                                bwd.fill(0.0);
                            } else {
                                rows_dot(Trans::at(&tr.ln_b_t, n, f, act(k, f)), q_at(k + 1), bwd);
                            }
                        }
                        Method::Mmp => {
                            let half = if last { 1.0 } else { 0.5 };
                            if k == 0 {
                                for (y, &p) in fwd.iter_mut().zip(&lnp[off..off + n]) {
                                    *y = half * p;
                                }
                            } else {
                                let m = Trans::at(&tr.b, n, f, act(k - 1, f));
                                rows_dot(m, q_at(k - 1), fwd);
                                for y in fwd.iter_mut() {
                                    *y = half * ln_clip(*y);
                                }
                            }
                            if last {
                                bwd.fill(0.0);
                            } else {
                                rows_dot(Trans::at(&tr.bn_t, n, f, act(k, f)), q_at(k + 1), bwd);
                                for y in bwd.iter_mut() {
                                    *y = 0.5 * ln_clip(*y);
                                }
                            }
                        }
                    }
                    let xs = &mut next[k * ss + off..k * ss + off + n];
                    let evf = &ev[off..off + n];
                    // x = ln q + τ (E[ll] − ln q + fwd + bwd), as (1 − τ) ln q + τ (E[ll] +
                    // fwd + bwd): at τ = 1 ln q drops out exactly instead of being added and
                    // subtracted in f32.
                    let keep = 1.0 - tau;
                    for s in 0..n {
                        let ln_q = ln_clip(q_k[off + s]);
                        xs[s] = keep * ln_q + tau * (evf[s] + fwd[s] + bwd[s]);
                    }
                    // pymdp centres x before the softmax; the softmax is shift-invariant and
                    // subtracts its max anyway, so centring would only add a rounding in f32.
                    softmax_in_place(xs);
                }
            }
            std::mem::swap(&mut q, &mut next);
        }
        // The mean-field sequence free energy at the final q, per step.
        for k in 0..steps {
            let q_k = &q[k * ss..(k + 1) * ss];
            let ne = neg_entropy(q_k);
            let pce = if k == 0 { -dot(q_k, &lnp) } else { 0.0 };
            let mut tce = 0.0f32;
            if k > 0 {
                for f in 0..fc {
                    let (n, off) = (b.s[f], b.s_off[f]);
                    let m = Trans::at(&tr.ln_b, n, f, act(k - 1, f));
                    let prev = &q[(k - 1) * ss + off..(k - 1) * ss + off + n];
                    rows_dot(m, prev, &mut fwd[..n]);
                    tce += dot(&q_k[off..off + n], &fwd[..n]);
                }
                tce = -tce;
            }
            let acc = evidence(
                b,
                &ll_i[k * b.sum_p..(k + 1) * b.sum_p],
                q_k,
                false,
                &mut ev,
                &mut c,
            );
            vt[k] = ne + pce + tce - acc;
        }
        task.qs[i * per..(i + 1) * per].copy_from_slice(&q);
        if let Some(v) = task.vfe.as_deref_mut() {
            v[i] = vt.iter().sum();
        }
        if let Some(v) = task.vfe_t.as_deref_mut() {
            v[i * steps..(i + 1) * steps].copy_from_slice(&vt);
        }
    }
}
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
    let b = Base::new(&model.t);
    let o = ObsRef::new(obs);
    let a = actions.map_or(&[][..], |a| a.host_slice());
    let p = prior.map(|p| p.host_slice());
    if !o.valid(&b) || !actions_valid(&model.t.u, a) || !p.is_none_or(finite_nonneg) {
        return cpu::sequence_views(model, spec, steps, obs, actions, prior, n, out);
    }
    let tr = Trans::new(&model.t);
    let x = SeqIn {
        b: &b,
        tr: &tr,
        spec,
        steps,
        obs: o,
        actions: a,
        prior: p,
    };
    let count = n.div_ceil(CHUNK);
    let qs = out.qs.host_slice_mut();
    let vfe = chunks_of(out.vfe.as_mut().map(|v| v.host_slice_mut()), CHUNK, count);
    let vfe_t = chunks_of(
        out.vfe_t.as_mut().map(|v| v.host_slice_mut()),
        CHUNK * steps,
        count,
    );
    let tasks: Vec<SeqTask<'_>> = qs
        .chunks_mut(CHUNK * steps * b.sum_s)
        .zip(vfe)
        .zip(vfe_t)
        .enumerate()
        .map(|(i, ((qs, vfe), vfe_t))| SeqTask {
            first: i * CHUNK,
            qs,
            vfe,
            vfe_t,
        })
        .collect();
    tasks
        .into_par_iter()
        .for_each(|mut t| sequence_chunk(&x, &mut t));
    Ok(())
}

// =============================================================================================
// Policy inference
// =============================================================================================

/// Policy inference's tables: per modality the extended Aᵀ, C; the novelty weights of B; ln E.
struct Efe {
    /// `[P_m, X_m]` with X_m = O_m + 1 (+ O_m with pA novelty): columns o are A_m[o, ·], column
    /// O_m is H[A_m(·|s)], columns O_m + 1 + o are W(pA_m)[o, ·]; one GEMM of the agents'
    /// weights `[n, P_m]` with it gives q(o), E_q H[A] and E_q W(pA)[o, ·] together.
    a_ext: Vec<Vec<f32>>,
    cols: Vec<usize>,
    c: Vec<Vec<f32>>,
    novelty_a: bool,
    /// W(pB_f) `[U][S][S′]` (with param_info_gain and pB).
    w_b: Option<Vec<Vec<f32>>>,
    ln_e: Vec<f32>,
    policies: Vec<i32>,
    num_policies: usize,
    horizon: usize,
    utility: bool,
    info_gain: bool,
    gamma: f32,
}

impl Efe {
    fn new(model: &Model, spec: &PolicySpec) -> Result<Efe> {
        let t = &model.t;
        let novelty = spec.param_info_gain;
        let w_a = if novelty {
            cpu::all_counts(t.modalities(), |m| model.counts_a(m))?.map(|pa| {
                pa.iter()
                    .enumerate()
                    .map(|(m, c)| cpu::novelty_weights(c, t.o[m]))
                    .collect::<Vec<_>>()
            })
        } else {
            None
        };
        let w_b = if novelty {
            cpu::all_counts(t.factors(), |f| model.counts_b(f))?.map(|pb| {
                pb.iter()
                    .enumerate()
                    .map(|(f, c)| per_action_t(&cpu::novelty_weights(c, t.s[f]), t.s[f], t.u[f]))
                    .collect()
            })
        } else {
            None
        };
        let mut a_ext = Vec::with_capacity(t.modalities());
        let mut cols = Vec::with_capacity(t.modalities());
        for m in 0..t.modalities() {
            let (o, p) = (t.o[m], t.size[m]);
            let x = o + 1 + if w_a.is_some() { o } else { 0 };
            let mut at = vec![0.0f32; p * x];
            for c in 0..p {
                for r in 0..o {
                    at[c * x + r] = t.a[m][r * p + c] as f32;
                }
                at[c * x + o] = t.h_a[m][c] as f32;
                if let Some(wa) = &w_a {
                    for r in 0..o {
                        at[c * x + o + 1 + r] = wa[m][r * p + c] as f32;
                    }
                }
            }
            a_ext.push(at);
            cols.push(x);
        }
        Ok(Efe {
            a_ext,
            cols,
            c: t.c.iter().map(|v| to32(v)).collect(),
            novelty_a: w_a.is_some(),
            w_b,
            ln_e: to32(&t.ln_e),
            policies: t.policies.clone(),
            num_policies: t.num_policies,
            horizon: t.horizon,
            utility: spec.utility,
            info_gain: spec.state_info_gain,
            gamma: spec.gamma,
        })
    }
}

/// C `[m, n]` (row stride rsc) = A `[m, k]` (row stride rsa) × B `[k, n]` (row stride rsb), all
/// unit column stride, through matrixmultiply (bounds checked here).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    rsa: usize,
    b: &[f32],
    rsb: usize,
    c: &mut [f32],
    rsc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(a.len() >= (m - 1) * rsa + k && b.len() >= k.saturating_sub(1) * rsb + n);
    assert!(c.len() >= (m - 1) * rsc + n);
    // Safety: the asserts above keep every element the strides address inside the slices.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa as isize,
            1,
            b.as_ptr(),
            rsb as isize,
            1,
            0.0,
            c.as_mut_ptr(),
            rsc as isize,
            1,
        );
    }
}

struct PolTask<'a> {
    first: usize,
    q_pi: &'a mut [f32],
    g: Option<&'a mut [f32]>,
}

simd_fn! {
/// A chunk of agents, policy by policy: the rollout B q for all agents of the chunk is one
/// GEMM per factor (`[n, S] × Bᵀ`), the predictions one GEMM per modality (`[n, P_m] ×` the
/// extended Aᵀ); the outer products, logs and dot products stay per agent.
fn policies_chunk<'a>(b: &Base, tr: &Trans, e: &Efe, qs: &[f32], task: &mut PolTask<'a>) {
    let (ss, fc, np, h) = (b.sum_s, b.fc, e.num_policies, e.horizon);
    let cn = task.q_pi.len() / np;
    let q0 = &qs[task.first * ss..(task.first + cn) * ss];
    let (mut cur, mut nxt) = (vec![0.0f32; cn * ss], vec![0.0f32; cn * ss]);
    let max_p = b.max_p.max(1);
    let max_x = e.cols.iter().copied().max().unwrap_or(1);
    let mut w = vec![0.0f32; cn * max_p];
    let mut pred = vec![0.0f32; cn * max_x];
    let mut tmp = vec![0.0f32; cn * b.max_s];
    let mut g = vec![0.0f32; cn * np];
    let mut terms = vec![[0.0f32; 4]; cn];
    for p in 0..np {
        let policy = &e.policies[p * h * fc..(p + 1) * h * fc];
        cur.copy_from_slice(q0);
        terms.iter_mut().for_each(|t| *t = [0.0; 4]);
        for tau in 0..h {
            for f in 0..fc {
                let (n, off, a) = (b.s[f], b.s_off[f], policy[tau * fc + f] as usize);
                let bt = Trans::at(&tr.b_t, n, f, a);
                gemm(cn, n, n, &cur[off..], ss, bt, n, &mut nxt[off..], ss);
                if let Some(wb) = &e.w_b {
                    // q_τ · W(pB) q_{τ−1} per agent.
                    gemm(
                        cn,
                        n,
                        n,
                        &cur[off..],
                        ss,
                        Trans::at(wb, n, f, a),
                        n,
                        &mut tmp,
                        n,
                    );
                    for i in 0..cn {
                        terms[i][3] += dot(
                            &nxt[i * ss + off..i * ss + off + n],
                            &tmp[i * n..(i + 1) * n],
                        );
                    }
                }
            }
            for m in 0..b.modalities() {
                let (o_m, p_m, x) = (b.o[m], b.size[m], e.cols[m]);
                for i in 0..cn {
                    let qn = &nxt[i * ss..(i + 1) * ss];
                    let len = outer_into(
                        &mut w[i * max_p..(i + 1) * max_p],
                        b.deps[m].iter().map(|&g| b.factor(qn, g)),
                    );
                    debug_assert_eq!(len, p_m);
                }
                gemm(cn, p_m, x, &w, max_p, &e.a_ext[m], x, &mut pred, max_x);
                for i in 0..cn {
                    let row = &pred[i * max_x..i * max_x + x];
                    let qo = &row[..o_m];
                    let t = &mut terms[i];
                    if e.utility {
                        t[0] += dot(qo, &e.c[m]);
                    }
                    if e.info_gain {
                        // H[q(o)] − E_q[H[A(·|s)]].
                        t[1] += -neg_entropy(qo) - row[o_m];
                    }
                    if e.novelty_a {
                        t[2] += dot(qo, &row[o_m + 1..o_m + 1 + o_m]);
                    }
                }
            }
            std::mem::swap(&mut cur, &mut nxt);
        }
        for i in 0..cn {
            let t = terms[i];
            g[i * np + p] = -(t[0] + t[1] + (t[2] + t[3]));
        }
    }
    for i in 0..cn {
        let g = &g[i * np..(i + 1) * np];
        let q_pi = &mut task.q_pi[i * np..(i + 1) * np];
        for ((x, &g), &ln_e) in q_pi.iter_mut().zip(g).zip(&e.ln_e) {
            *x = -e.gamma * g + ln_e;
        }
        softmax_in_place(q_pi);
    }
    if let Some(out) = task.g.as_deref_mut() {
        out.copy_from_slice(&g);
    }
}
}

pub(crate) fn policies_views(
    model: &Model,
    spec: &PolicySpec,
    qs: &View<'_, f32>,
    n: usize,
    mut out: PolicyOutputs<'_>,
) -> Result<()> {
    let q = qs.host_slice();
    if !finite_nonneg(q) {
        return cpu::policies_views(model, spec, qs, n, out);
    }
    let b = Base::new(&model.t);
    let tr = Trans::new(&model.t);
    let e = Efe::new(model, spec)?;
    let np = e.num_policies;
    let count = n.div_ceil(CHUNK);
    let g = chunks_of(
        out.g.as_mut().map(|v| v.host_slice_mut()),
        CHUNK * np,
        count,
    );
    let tasks: Vec<PolTask<'_>> = out
        .q_pi
        .host_slice_mut()
        .chunks_mut(CHUNK * np)
        .zip(g)
        .enumerate()
        .map(|(i, (q_pi, g))| PolTask {
            first: i * CHUNK,
            q_pi,
            g,
        })
        .collect();
    tasks
        .into_par_iter()
        .for_each(|mut t| policies_chunk(&b, &tr, &e, q, &mut t));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outer_and_contraction_agree_with_direct_sums() {
        let mut w = vec![0.0; 12];
        let (a, bq, c) = ([1.0f32, 2.0], [3.0f32, 5.0, 7.0], [1.0f32, 10.0]);
        let len = outer_into(&mut w, [&a[..], &bq[..], &c[..]].into_iter());
        assert_eq!(len, 12);
        for i in 0..2 {
            for j in 0..3 {
                for k in 0..2 {
                    assert_eq!(w[(i * 3 + j) * 2 + k], a[i] * bq[j] * c[k]);
                }
            }
        }
    }
}
