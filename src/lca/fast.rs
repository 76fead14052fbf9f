//! The fast CPU LCA (`Device::cpu()`): f32 throughout, the GPU's arithmetic contract
//! (DESIGN.md §4.3), with the f64 reference ([`super::cpu`]) as the oracle.
//!
//! Store: Φ `[n, m]` and G = ΦᵀΦ − I `[m, m]` in f32 (G by sgemm, in fixed row blocks). λmax
//! is computed as on a GPU, in f64 by power iteration on Φᵀ(Φv) from the f32 Φ
//! ([`super::Dictionary::lambda_max`]).
//!
//! Solve, per tile of [`TILE`] samples (one rayon task each; the tiles are fixed, so the
//! partitioning never depends on the thread count):
//! - x is converted to f32 once, b = xΦ by one sgemm for the tile;
//! - each step, per live sample, one fused pass over m: u += η((b − u) − c), a = θ(u),
//!   max |Δu| and the active count (lane accumulators, so it vectorises; compiled for
//!   AVX-512/AVX2/NEON by `multiversion`);
//! - c = G a: a sample with at most m/2 active units gathers the G rows of its active units
//!   (four rows per pass over c); the samples of the tile above that ("dense") are packed into
//!   one sgemm `[dense, m] x [m, m]`. The choice is the sample's own, and a row of an sgemm
//!   does not depend on the other rows of the call, so a sample's result is bitwise the same
//!   whatever batch (or tile, or thread count) it is solved in, as with the reference;
//! - early stop per sample, exactly the reference's rule (max |Δu| < limit, or exactly 0; a
//!   NaN Δu never counts as converged), and G a is not computed for a sample that stopped
//!   unless the trace asks for its energy;
//! - the trace: the energy by the GPU's identity ½‖x‖² − a·b + ½a·(Ga) + ½a·a + λ‖a‖₁ (f32
//!   sums; ½‖x‖² summed once per sample in f64, as on a GPU) and the active count.
//!
//! Learn: R = x − aΦᵀ and Φ' = Φ + (lr/B)Rᵀa by sgemm (parallel over fixed row blocks of the
//! output), the column norms in f64 (so that the "overflowed f32" error fires exactly where the
//! reference's does), columns divided by their norm, G recomputed by sgemm. Φ and G change only
//! when everything succeeded.
//!
//! Nothing routes to the reference: every option (the four thresholds, u0, both tolerance
//! modes, trace, f16/bf16 inputs) runs here.

use rayon::prelude::*;

use super::{LcaOutputs, LcaSpec, Store, Threshold, TolMode};
use crate::element::Element;
use crate::error::{Error, Result};

/// Samples per task.
pub(super) const TILE: usize = 32;
/// A sample with more than m / DENSE_DIVISOR active units joins the tile's dense sgemm.
const DENSE_DIVISOR: usize = 2;
/// Rows of an output per sgemm task in the dictionary products.
const ROW_BLOCK: usize = 64;

/// C `[rows, cols]` (row stride ldc) = alpha · A B + beta · C, A `[rows, inner]` and B
/// `[inner, cols]` with arbitrary strides: one single-threaded matrixmultiply call.
#[allow(clippy::too_many_arguments)]
fn sgemm(
    rows: usize,
    inner: usize,
    cols: usize,
    alpha: f32,
    a: (&[f32], isize, isize),
    b: (&[f32], isize, isize),
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    // The extent each operand's strides reach must lie inside its slice.
    let reach = |(s, rs, cs): (&[f32], isize, isize), r: usize, k: usize| {
        let last = (r.saturating_sub(1)) as isize * rs + (k.saturating_sub(1)) as isize * cs;
        assert!(
            r == 0 || k == 0 || (last >= 0 && (last as usize) < s.len()),
            "sgemm operand out of bounds"
        );
    };
    reach(a, rows, inner);
    reach(b, inner, cols);
    assert!(
        (rows - 1) * ldc + cols <= c.len(),
        "sgemm output out of bounds"
    );
    // Safety: every element the strides reach lies inside its slice (checked above); C is a
    // unique borrow with unit column stride and row stride ldc ≥ cols, so no two elements alias.
    unsafe {
        matrixmultiply::sgemm(
            rows,
            inner,
            cols,
            alpha,
            a.0.as_ptr(),
            a.1,
            a.2,
            b.0.as_ptr(),
            b.1,
            b.2,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
}

/// G = ΦᵀΦ − I in f32, by sgemm over fixed blocks of rows of G.
fn gram(phi: &[f32], n: usize, m: usize) -> Result<Vec<f32>> {
    let mut g = crate::alloc::zeroed::<f32>(m.saturating_mul(m), || {
        format!("the Gram matrix G = PhiT Phi - I [{m}, {m}] (f32)")
    })?;
    g.par_chunks_mut(ROW_BLOCK * m)
        .enumerate()
        .for_each(|(blk, rows)| {
            let r0 = blk * ROW_BLOCK;
            let nr = rows.len() / m;
            // A(i, k) = Φ[k, r0 + i]; B = Φ.
            sgemm(
                nr,
                n,
                m,
                1.0,
                (&phi[r0..], 1, m as isize),
                (phi, m as isize, 1),
                0.0,
                rows,
                m,
            );
            for i in 0..nr {
                rows[i * m + r0 + i] -= 1.0;
            }
        });
    Ok(g)
}

/// Σ_i Φ[i, j]² per column, in f64 (a NaN stays NaN, an Inf Inf), then the square root.
fn column_norms(phi: &[f32], m: usize) -> Vec<f64> {
    let mut sq = vec![0f64; m];
    for row in phi.chunks_exact(m) {
        for (s, &v) in sq.iter_mut().zip(row) {
            *s += v as f64 * v as f64;
        }
    }
    sq.iter_mut().for_each(|s| *s = s.sqrt());
    sq
}

/// Φ in f32 (f16/bf16 widened exactly), G = ΦᵀΦ − I by sgemm, the column norms.
pub(super) fn prepare<T: Element>(phi: &[T], n: usize, m: usize) -> Result<(Store, Vec<f64>)> {
    let mut copy =
        crate::alloc::with_capacity(phi.len(), || format!("an f32 copy of phi [{n}, {m}]"))?;
    copy.extend(phi.iter().map(|v| v.to_f64() as f32));
    let norms = column_norms(&copy, m);
    let gram = gram(&copy, n, m)?;
    Ok((Store::Fast { phi: copy, gram }, norms))
}

// ---------------------------------------------------------------------------------------------
// Element-wise kernels (one pass over m each, lane accumulators so that they vectorise)
// ---------------------------------------------------------------------------------------------

const LANES: usize = 16;

/// θ_λ(u) in f32, branch-free (the GPU's lca_theta; selects, so that loops vectorise: a NaN u
/// gives 0 as fmaxf does, except for the hard thresholds where the comparison is false anyway).
#[inline(always)]
fn theta(th: Threshold, u: f32, lambda: f32) -> f32 {
    match th {
        Threshold::Soft => {
            let t = u.abs() - lambda;
            (if t > 0.0 { t } else { 0.0 }).copysign(u)
        }
        Threshold::SoftNonNeg => {
            let t = u - lambda;
            if t > 0.0 { t } else { 0.0 }
        }
        Threshold::Hard => {
            if u.abs() > lambda {
                u
            } else {
                0.0
            }
        }
        Threshold::HardNonNeg => {
            if u > lambda {
                u
            } else {
                0.0
            }
        }
    }
}

/// One element of a step: u += η((b − u) − c), a = θ(u); the running max |Δu| (a NaN Δu is
/// skipped: the caller checks u for NaN before it accepts a stop) and the active count.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn step_one(
    th: Threshold,
    b: f32,
    u: &mut f32,
    c: f32,
    a: &mut f32,
    eta: f32,
    lambda: f32,
    mx: &mut f32,
    cnt: &mut u32,
) {
    let du = eta * ((b - *u) - c);
    let un = *u + du;
    *u = un;
    let ad = du.abs();
    *mx = if ad > *mx { ad } else { *mx };
    let av = theta(th, un, lambda);
    *a = av;
    *cnt += (av != 0.0) as u32;
}

/// One step of one sample. Returns max |Δu| (NaN skipped) and the number of nonzero a.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // one accumulator per lane, on purpose
fn step_body(
    th: Threshold,
    b: &[f32],
    u: &mut [f32],
    c: &[f32],
    a: &mut [f32],
    eta: f32,
    lambda: f32,
) -> (f32, usize) {
    let mut mx = [0f32; LANES];
    let mut cnt = [0u32; LANES];
    let m = u.len();
    let (b, c, a) = (&b[..m], &c[..m], &mut a[..m]);
    let (uc, ur) = u.as_chunks_mut::<LANES>();
    let (bc, br) = b.as_chunks::<LANES>();
    let (cc, cr) = c.as_chunks::<LANES>();
    let (ac, ar) = a.as_chunks_mut::<LANES>();
    for (((uu, bb), cs), aa) in uc.iter_mut().zip(bc).zip(cc).zip(ac.iter_mut()) {
        for l in 0..LANES {
            step_one(
                th,
                bb[l],
                &mut uu[l],
                cs[l],
                &mut aa[l],
                eta,
                lambda,
                &mut mx[l],
                &mut cnt[l],
            );
        }
    }
    let (mut tail_max, mut tail_cnt) = (0f32, 0u32);
    for (((uv, &bv), &cv), av) in ur.iter_mut().zip(br).zip(cr).zip(ar.iter_mut()) {
        step_one(
            th,
            bv,
            uv,
            cv,
            av,
            eta,
            lambda,
            &mut tail_max,
            &mut tail_cnt,
        );
    }
    let max = mx
        .iter()
        .fold(tail_max, |acc, &v| if v > acc { v } else { acc });
    let count = cnt.iter().map(|&v| v as usize).sum::<usize>() + tail_cnt as usize;
    (max, count)
}

simd_fn! {
fn step(
    th: Threshold,
    b: &[f32],
    u: &mut [f32],
    c: &[f32],
    a: &mut [f32],
    eta: f32,
    lambda: f32,
) -> (f32, usize) {
    // One monomorphic loop per threshold: no branch on θ inside the loop.
    match th {
        Threshold::Soft => step_body(Threshold::Soft, b, u, c, a, eta, lambda),
        Threshold::SoftNonNeg => step_body(Threshold::SoftNonNeg, b, u, c, a, eta, lambda),
        Threshold::Hard => step_body(Threshold::Hard, b, u, c, a, eta, lambda),
        Threshold::HardNonNeg => step_body(Threshold::HardNonNeg, b, u, c, a, eta, lambda),
    }
}
}

/// a = θ(u) and the number of nonzero a (the initial state).
fn threshold_all(th: Threshold, u: &[f32], a: &mut [f32], lambda: f32) -> usize {
    let mut count = 0;
    for (av, &uv) in a.iter_mut().zip(u) {
        *av = theta(th, uv, lambda);
        count += (*av != 0.0) as usize;
    }
    count
}

simd_fn! {
/// The indices of the nonzero a (NaN counts as nonzero, as in the reference), in increasing
/// order: a 16-bit mask per chunk of 16 (one vector compare), then its set bits.
fn compact(a: &[f32], idx: &mut [u32]) -> usize {
    let mut k = 0;
    let (chunks, rest) = a.as_chunks::<LANES>();
    for (ci, ch) in chunks.iter().enumerate() {
        let mut mask = 0u32;
        for (l, &v) in ch.iter().enumerate() {
            mask |= ((v != 0.0) as u32) << l;
        }
        while mask != 0 {
            idx[k] = (ci * LANES) as u32 + mask.trailing_zeros();
            k += 1;
            mask &= mask - 1;
        }
    }
    let base = a.len() - rest.len();
    for (l, &v) in rest.iter().enumerate() {
        if v != 0.0 {
            idx[k] = (base + l) as u32;
            k += 1;
        }
    }
    k
}
}

simd_fn! {
/// c = Σ_{k in idx} a_k G[k, :] (G symmetric: row k is column k), four rows per pass over c.
fn gather(gram: &[f32], m: usize, a: &[f32], idx: &[u32], c: &mut [f32]) {
    let c = &mut c[..m];
    c.fill(0.0);
    let row = |k: u32| &gram[k as usize * m..k as usize * m + m];
    let mut quads = idx.chunks_exact(4);
    for q in &mut quads {
        let (g0, g1, g2, g3) = (row(q[0]), row(q[1]), row(q[2]), row(q[3]));
        let (a0, a1, a2, a3) = (
            a[q[0] as usize],
            a[q[1] as usize],
            a[q[2] as usize],
            a[q[3] as usize],
        );
        for ((((cj, &x0), &x1), &x2), &x3) in c.iter_mut().zip(g0).zip(g1).zip(g2).zip(g3) {
            *cj = *cj + a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3;
        }
    }
    // The one to three rows left: one pass over c.
    match *quads.remainder() {
        [k0] => {
            let (g0, a0) = (row(k0), a[k0 as usize]);
            for (cj, &x0) in c.iter_mut().zip(g0) {
                *cj += a0 * x0;
            }
        }
        [k0, k1] => {
            let (g0, g1) = (row(k0), row(k1));
            let (a0, a1) = (a[k0 as usize], a[k1 as usize]);
            for ((cj, &x0), &x1) in c.iter_mut().zip(g0).zip(g1) {
                *cj = *cj + a0 * x0 + a1 * x1;
            }
        }
        [k0, k1, k2] => {
            let (g0, g1, g2) = (row(k0), row(k1), row(k2));
            let (a0, a1, a2) = (a[k0 as usize], a[k1 as usize], a[k2 as usize]);
            for (((cj, &x0), &x1), &x2) in c.iter_mut().zip(g0).zip(g1).zip(g2) {
                *cj = *cj + a0 * x0 + a1 * x1 + a2 * x2;
            }
        }
        _ => {}
    }
}
}

simd_fn! {
/// a·b, a·c, a·a and Σ|a| in f32 (lane accumulators, then the lanes in order).
#[allow(clippy::needless_range_loop)] // one accumulator per lane, on purpose
fn energy_sums(a: &[f32], b: &[f32], c: &[f32]) -> [f32; 4] {
    let m = a.len();
    let (b, c) = (&b[..m], &c[..m]);
    let mut s = [[0f32; LANES]; 4];
    let (ac, ar) = a.as_chunks::<LANES>();
    let (bc, br) = b.as_chunks::<LANES>();
    let (cc, cr) = c.as_chunks::<LANES>();
    for ((aa, bb), cs) in ac.iter().zip(bc).zip(cc) {
        for l in 0..LANES {
            let av = aa[l];
            s[0][l] += av * bb[l];
            s[1][l] += av * cs[l];
            s[2][l] += av * av;
            s[3][l] += av.abs();
        }
    }
    let mut out = [0f32; 4];
    for (o, lanes) in out.iter_mut().zip(&s) {
        *o = lanes.iter().sum();
    }
    for ((&av, &bv), &cv) in ar.iter().zip(br).zip(cr) {
        out[0] += av * bv;
        out[1] += av * cv;
        out[2] += av * av;
        out[3] += av.abs();
    }
    out
}
}

// ---------------------------------------------------------------------------------------------
// Solve
// ---------------------------------------------------------------------------------------------

/// One tile's share of the outputs.
struct TileOut<'a> {
    first: usize,
    u: &'a mut [f32],
    a: &'a mut [f32],
    energy: Option<&'a mut [f32]>,
    active: Option<&'a mut [u32]>,
    steps: Option<&'a mut [u32]>,
}

/// A task's working memory, allocated once per task and reused for all its tiles.
struct Scratch {
    xs: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    pack_a: Vec<f32>,
    pack_c: Vec<f32>,
    idx: Vec<u32>,
}

impl Scratch {
    fn new(n: usize, m: usize) -> Result<Scratch> {
        let what = || format!("the fast LCA's scratch for a tile of {TILE} x [{n}, {m}]");
        Ok(Scratch {
            xs: crate::alloc::zeroed(TILE * n, what)?,
            b: crate::alloc::zeroed(TILE * m, what)?,
            c: crate::alloc::zeroed(TILE * m, what)?,
            pack_a: crate::alloc::zeroed(TILE * m, what)?,
            pack_c: crate::alloc::zeroed(TILE * m, what)?,
            idx: crate::alloc::zeroed(m, what)?,
        })
    }
}

struct Ctx<'a, T> {
    phi: &'a [f32],
    gram: &'a [f32],
    n: usize,
    m: usize,
    spec: &'a LcaSpec,
    x: &'a [T],
    u0: Option<&'a [f32]>,
}

/// c = G a for the samples `rows` of the tile (each with `count[s]` active units): the sparse
/// ones by gathering G rows, the dense ones by one packed sgemm.
#[allow(clippy::too_many_arguments)]
fn inhibit(
    gram: &[f32],
    m: usize,
    rows: &[usize],
    count: &[usize],
    a: &[f32],
    c: &mut [f32],
    pack_a: &mut [f32],
    pack_c: &mut [f32],
    idx: &mut [u32],
) {
    let mut dense = 0;
    for &r in rows {
        let (ar, cr) = (&a[r * m..(r + 1) * m], &mut c[r * m..(r + 1) * m]);
        if count[r] * DENSE_DIVISOR > m {
            pack_a[dense * m..(dense + 1) * m].copy_from_slice(ar);
            dense += 1;
        } else {
            let k = compact(ar, idx);
            gather(gram, m, ar, &idx[..k], cr);
        }
    }
    if dense == 0 {
        return;
    }
    sgemm(
        dense,
        m,
        m,
        1.0,
        (pack_a, m as isize, 1),
        (gram, m as isize, 1),
        0.0,
        pack_c,
        m,
    );
    let mut d = 0;
    for &r in rows {
        if count[r] * DENSE_DIVISOR > m {
            c[r * m..(r + 1) * m].copy_from_slice(&pack_c[d * m..(d + 1) * m]);
            d += 1;
        }
    }
}

fn solve_tile<T: Element>(ctx: &Ctx<'_, T>, out: TileOut<'_>, s: &mut Scratch) {
    let (n, m, spec) = (ctx.n, ctx.m, ctx.spec);
    let rows = out.u.len() / m;
    let first = out.first;
    let steps = spec.steps as usize;
    let (lambda, eta, th) = (spec.lambda, spec.eta, spec.threshold);
    let tracing = out.energy.is_some() || out.active.is_some();

    // b = x Φ for the tile, x converted once.
    let xs = &mut s.xs[..rows * n];
    for (d, v) in xs.iter_mut().zip(&ctx.x[first * n..(first + rows) * n]) {
        *d = v.to_f64() as f32;
    }
    sgemm(
        rows,
        n,
        m,
        1.0,
        (xs, n as isize, 1),
        (ctx.phi, m as isize, 1),
        0.0,
        &mut s.b,
        m,
    );
    let mut xsq = [0f32; TILE];
    if tracing {
        for (r, q) in xsq.iter_mut().enumerate().take(rows) {
            *q = ctx.x[(first + r) * n..(first + r + 1) * n]
                .iter()
                .map(|v| v.to_f64() * v.to_f64())
                .sum::<f64>() as f32;
        }
    }
    let mut limit = [spec.tol; TILE];
    if spec.tol_mode == TolMode::Relative {
        for (r, l) in limit.iter_mut().enumerate().take(rows) {
            let bmax = s.b[r * m..(r + 1) * m]
                .iter()
                .fold(0f32, |acc, v| acc.max(v.abs()));
            *l = spec.tol * bmax;
        }
    }

    let (u, a) = (out.u, out.a);
    match ctx.u0 {
        Some(u0) => u.copy_from_slice(&u0[first * m..(first + rows) * m]),
        None => u.fill(0.0),
    }
    let mut count = [0usize; TILE];
    for r in 0..rows {
        count[r] = threshold_all(
            th,
            &u[r * m..(r + 1) * m],
            &mut a[r * m..(r + 1) * m],
            lambda,
        );
    }
    let mut live: Vec<usize> = (0..rows).collect();
    inhibit(
        ctx.gram,
        m,
        &live,
        &count,
        a,
        &mut s.c,
        &mut s.pack_a,
        &mut s.pack_c,
        &mut s.idx,
    );
    let mut taken = [spec.steps; TILE];
    let (mut energy, mut active) = (out.energy, out.active);
    let mut stopping = [false; TILE];
    let mut need_c: Vec<usize> = Vec::with_capacity(rows);
    for t in 0..steps {
        need_c.clear();
        for &r in &live {
            let span = r * m..(r + 1) * m;
            let (max_du, cnt) = step(
                th,
                &s.b[span.clone()],
                &mut u[span.clone()],
                &s.c[span.clone()],
                &mut a[span.clone()],
                eta,
                lambda,
            );
            count[r] = cnt;
            // Exactly 0 counts as converged too (a zero input with relative tol has limit 0);
            // a NaN Δu never does (it leaves u NaN: checked only when the rest says stop).
            let stop = spec.tol > 0.0
                && (max_du < limit[r] || max_du == 0.0)
                && !u[span].iter().any(|v| v.is_nan());
            stopping[r] = stop;
            let last = t + 1 == steps;
            if (!stop && !last) || tracing {
                need_c.push(r);
            }
        }
        inhibit(
            ctx.gram,
            m,
            &need_c,
            &count,
            a,
            &mut s.c,
            &mut s.pack_a,
            &mut s.pack_c,
            &mut s.idx,
        );
        for &r in &live {
            let stop = stopping[r];
            let last = if stop { steps } else { t + 1 };
            if let Some(e) = energy.as_deref_mut() {
                let span = r * m..(r + 1) * m;
                let q = energy_sums(&a[span.clone()], &s.b[span.clone()], &s.c[span]);
                let value = 0.5 * xsq[r] - q[0] + 0.5 * q[1] + 0.5 * q[2] + lambda * q[3];
                e[r * steps + t..r * steps + last].fill(value);
            }
            if let Some(act) = active.as_deref_mut() {
                act[r * steps + t..r * steps + last].fill(count[r] as u32);
            }
            if stop {
                taken[r] = (t + 1) as u32;
            }
        }
        live.retain(|&r| !stopping[r]);
        if live.is_empty() {
            break;
        }
    }
    if let Some(st) = out.steps {
        st.copy_from_slice(&taken[..rows]);
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn solve<T: Element>(
    phi: &[f32],
    gram: &[f32],
    n: usize,
    m: usize,
    spec: &LcaSpec,
    x: &[T],
    u0: Option<&[f32]>,
    mut out: LcaOutputs<'_>,
) -> Result<()> {
    let batch = x.len() / n;
    let steps = spec.steps as usize;
    let ntiles = batch.div_ceil(TILE);
    // Fail before anything is written if even one task's scratch cannot be had.
    drop(Scratch::new(n, m)?);
    let mut tiles: Vec<TileOut<'_>> = out
        .u
        .host_slice_mut()
        .chunks_mut(TILE * m)
        .zip(out.a.host_slice_mut().chunks_mut(TILE * m))
        .enumerate()
        .map(|(i, (u, a))| TileOut {
            first: i * TILE,
            u,
            a,
            energy: None,
            active: None,
            steps: None,
        })
        .collect();
    if let Some(e) = out.energy.as_mut() {
        for (t, e) in tiles
            .iter_mut()
            .zip(e.host_slice_mut().chunks_mut(TILE * steps))
        {
            t.energy = Some(e);
        }
    }
    if let Some(c) = out.active.as_mut() {
        for (t, c) in tiles
            .iter_mut()
            .zip(c.host_slice_mut().chunks_mut(TILE * steps))
        {
            t.active = Some(c);
        }
    }
    if let Some(s) = out.steps.as_mut() {
        for (t, s) in tiles.iter_mut().zip(s.host_slice_mut().chunks_mut(TILE)) {
            t.steps = Some(s);
        }
    }
    debug_assert_eq!(tiles.len(), ntiles);
    let ctx = Ctx {
        phi,
        gram,
        n,
        m,
        spec,
        x,
        u0,
    };
    tiles.into_par_iter().try_for_each_init(
        || Scratch::new(n, m).ok(),
        |scratch, tile| {
            let s = scratch.as_mut().ok_or_else(|| {
                crate::alloc::oom::<f32>(
                    "the host",
                    || format!("the fast LCA's scratch for a tile of {TILE} x [{n}, {m}]"),
                    TILE * (n + 4 * m) + m,
                )
            })?;
            solve_tile(&ctx, tile, s);
            Ok::<(), Error>(())
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Learn
// ---------------------------------------------------------------------------------------------

/// Φ += (lr/B) Σ_b (x_b − Φa_b) a_bᵀ; columns renormalised; G recomputed. On error (a column
/// that overflows f32) Φ and G stay as they were.
pub(super) fn learn<T: Element>(
    phi: &mut Vec<f32>,
    gram_out: &mut Vec<f32>,
    n: usize,
    m: usize,
    x: &[T],
    a: &[f32],
    lr: f32,
) -> Result<()> {
    let batch = x.len() / n;
    let what = || format!("a dictionary-learning step on [{n}, {m}] (batch {batch})");
    // R = x − a Φᵀ  [batch, n].
    let mut r = crate::alloc::with_capacity::<f32>(x.len(), what)?;
    r.extend(x.iter().map(|v| v.to_f64() as f32));
    r.par_chunks_mut(ROW_BLOCK * n)
        .enumerate()
        .for_each(|(blk, rr)| {
            let rows = rr.len() / n;
            sgemm(
                rows,
                m,
                n,
                -1.0,
                (&a[blk * ROW_BLOCK * m..], m as isize, 1),
                (phi, 1, m as isize),
                1.0,
                rr,
                n,
            );
        });
    // Φ' = Φ + (lr/B) Rᵀ a  [n, m].
    let mut next = crate::alloc::with_capacity::<f32>(phi.len(), what)?;
    next.extend_from_slice(phi);
    let alpha = lr / batch as f32;
    next.par_chunks_mut(ROW_BLOCK * m)
        .enumerate()
        .for_each(|(blk, nn)| {
            let rows = nn.len() / m;
            sgemm(
                rows,
                batch,
                m,
                alpha,
                (&r[blk * ROW_BLOCK..], 1, n as isize),
                (a, m as isize, 1),
                1.0,
                nn,
                m,
            );
        });
    let norms = column_norms(&next, m);
    if let Some(j) = norms.iter().position(|&v| !(v as f32).is_finite()) {
        return Err(Error::invalid(
            "lr",
            format!(
                "the learning step overflowed f32 in column {j} of the dictionary (lower lr, or check the codes a); the dictionary is unchanged"
            ),
        ));
    }
    let div: Vec<f32> = norms
        .iter()
        .map(|&v| if v > 0.0 { v as f32 } else { 1.0 })
        .collect();
    next.par_chunks_mut(m).for_each(|row| {
        for (p, &d) in row.iter_mut().zip(&div) {
            *p /= d;
        }
    });
    *gram_out = gram(&next, n, m)?;
    *phi = next;
    Ok(())
}
