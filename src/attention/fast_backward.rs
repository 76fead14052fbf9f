//! The fast CPU backward (`Device::cpu()`): f32 accumulation over f32/f16/bf16 inputs, the
//! scores recomputed per tile from q, k and the forward's lse (FlashAttention-2 style), with the
//! maths of [`crate::attention`]'s "Backward" section.
//!
//! Δ_i = dO_i·o_i + dE_i e_i − dlse_i comes first (per row, from the forward's o and e; for
//! f16/bf16, whose o is rounded, recomputed from the weights as the reference does:
//! [`exact_delta`]). dπ_h and dν are summed per row with the GPU's correction of the row's own
//! rounding of Σ_j dS_ij (kernels/attention/backward.cuh). Then one
//! rayon task per (batch, kv head) owns every gradient of that kv head's keys and of the query
//! rows of its group, so nothing is summed across tasks but dπ_h and dν (per-task partials added
//! in task order): for each tile of [`TK`] keys, for each query head of the group and each tile
//! of [`TQ`] query rows that sees some of those keys, x = Q·Kᵀ and dP = dO·Vᵀ through sgemm,
//! P = e^{s − lse}, the family's partials in vectorised loops (dS, the d² coefficient g, M, the
//! π and ν terms), then dV += Pᵀ·dO, dK += Mᵀ·Q and dQ += M·K through sgemm, the 2 (Σ g) k and
//! 2 (Σ g) q terms once per key tile and per row. Every reduction has a fixed order; the result
//! does not depend on the thread count.
//!
//! dβ (with a bias whose gradient is asked for): the tasks run one after another in (batch, kv
//! head) order and add dS into dβ directly in that fixed order (batch, head, key tile, row), so
//! the sums over broadcast dimensions need no partial buffers; without dβ the tasks run in
//! parallel. Nothing of the backward falls back to the reference.

use rayon::prelude::*;

use super::backward::{BackwardProblem, Gradients};
use super::fast::{
    Ctx, DOT, GAUSS, KTile, KeyConsts, LAPLACE, STUDENT, TK, TQ, gemm, load, row, store,
    tile_scores, vdot,
};
use super::fast_math as fm;
use crate::element::{DType, Element};
use crate::error::{Error, Result};

/// One row of the backward's element-wise work (see the module docs of [`crate::attention`]):
/// `p` holds P on entry; `dp` holds dP on entry and M on exit; `gc`, `ppi`, `snu` and `ds` get
/// g, π ∂L/∂π, dS ∂s/∂ν and dS per key.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn grad_row_generic<const F: u8, const PG: bool>(
    p: &mut [f32],
    lse: f32,
    dp: &mut [f32],
    x: &[f32],
    d2: &[f32],
    coef: &[f32],
    pi: &[f32],
    (de, delta, kappa, nu, c): (f32, f32, f32, f32, f32),
    gc: &mut [f32],
    ppi: &mut [f32],
    snu: &mut [f32],
    ds_out: &mut [f32],
    wnu: &mut [f32],
    wlnpi: &mut [f32],
) {
    let n = p.len();
    let (wnu, wlnpi) = (&mut wnu[..n], &mut wlnpi[..n]);
    let (dp, x, d2, coef, pi) = (&mut dp[..n], &x[..n], &d2[..n], &coef[..n], &pi[..n]);
    let (gc, ppi, snu, ds_out) = (&mut gc[..n], &mut ppi[..n], &mut snu[..n], &mut ds_out[..n]);
    for j in 0..n {
        // P = e^{s − lse} (s on entry), in place for the dV product.
        let w = fm::exp(p[j] - lse);
        p[j] = w;
        let (pij, d2j, a) = (pi[j], d2[j], coef[j]);
        let ds = w * (dp[j] + de * pij * d2j - delta);
        let (s_x, s_d2, s_lnpi, s_nu) = match F {
            DOT => (a, 0.0, a * x[j], 0.0),
            GAUSS => (0.0, -0.5 * a, -0.5 * a * d2j + c, 0.0),
            STUDENT => {
                let u = a * d2j;
                let inv = 1.0 / (1.0 + u);
                (
                    0.0,
                    -kappa * a * inv,
                    -kappa * u * inv + c,
                    -0.5 * fm::ln(1.0 + u) + kappa * (u / nu) * inv,
                )
            }
            _ => {
                let dd = d2j.sqrt();
                let sd2 = if dd > 0.0 { -0.5 * a / dd } else { 0.0 };
                (0.0, sd2, -0.5 * a * dd + c, 0.0)
            }
        };
        let g = ds * s_d2 + de * w * pij;
        gc[j] = g;
        dp[j] = ds * s_x - 2.0 * g;
        ds_out[j] = ds;
        // Without precision gradients (dπ, dν) these are dead, and so are s_lnpi and s_nu
        // (Student-t's ln among them).
        if PG {
            ppi[j] = ds * s_lnpi + de * w * pij * d2j;
            snu[j] = ds * s_nu;
            wnu[j] = w * s_nu;
            wlnpi[j] = w * s_lnpi;
        }
    }
}

/// The backward's element-wise work on a [nq, nk] tile: per row P = e^{s − lse} (0 on a row with
/// lse = −∞), then [`grad_row_generic`], the row sums (Σ g into `growsum`; Σ π∂L/∂π, Σ dS ∂s/∂ν,
/// Σ dS, Σ w, Σ w ∂s/∂ν, Σ w π∂s/∂π into `rsum`) and the column sums of g and π∂L/∂π.
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn grad_tile_generic<const F: u8, const PG: bool>(
    (s, dp): (&mut [f32], &mut [f32]),
    (x, d2): (&[f32], &[f32]),
    (coef, pi): (&[f32], &[f32]),
    (lse, delta, de): (&[f32], &[f32], &[f32]),
    (kappa, nu, c): (f32, f32, f32),
    [gc, ppi, snu, ds, wnu, wlnpi]: [&mut [f32]; 6],
    (growsum, rsum): (&mut [f32], &mut [[f32; 6]]),
    (gcol, pcol): (&mut [f32], &mut [f32]),
) {
    let nk = coef.len();
    for r in 0..lse.len() {
        let at = r * nk;
        let sr = &mut s[at..at + nk];
        let dpr = &mut dp[at..at + nk];
        if lse[r] == f32::NEG_INFINITY {
            sr.fill(0.0);
            dpr.fill(0.0);
            ds[at..at + nk].fill(0.0);
            continue;
        }
        let dei = if de.is_empty() { 0.0 } else { de[r] };
        let (gcr, ppir, snur, dsr) = (
            &mut gc[at..at + nk],
            &mut ppi[at..at + nk],
            &mut snu[at..at + nk],
            &mut ds[at..at + nk],
        );
        let (wnur, wlnpir) = (&mut wnu[at..at + nk], &mut wlnpi[at..at + nk]);
        grad_row_generic::<F, PG>(
            sr,
            lse[r],
            dpr,
            &x[at..at + nk],
            &d2[at..at + nk],
            coef,
            pi,
            (dei, delta[r], kappa, nu, c),
            gcr,
            ppir,
            snur,
            dsr,
            wnur,
            wlnpir,
        );
        // Dot without dE: g = 0 (its sums would add zeros).
        if !(F == DOT && de.is_empty()) {
            growsum[r] += fm::sum(gcr);
            for (a, &b) in gcol.iter_mut().zip(gcr.iter()) {
                *a += b;
            }
        }
        if !PG {
            continue;
        }
        let acc = &mut rsum[r];
        acc[0] += fm::sum(ppir);
        acc[1] += fm::sum(snur);
        acc[2] += fm::sum(dsr);
        acc[3] += fm::sum(sr);
        acc[4] += fm::sum(wnur);
        acc[5] += fm::sum(wlnpir);
        for (a, &b) in pcol.iter_mut().zip(ppir.iter()) {
            *a += b;
        }
    }
}

macro_rules! grad_tile_fn {
    ($name:ident, $f:expr, $pg:expr) => {
        simd_fn! {
        #[allow(clippy::too_many_arguments, clippy::type_complexity)]
        fn $name(
            sdp: (&mut [f32], &mut [f32]),
            xd2: (&[f32], &[f32]),
            cp: (&[f32], &[f32]),
            rows: (&[f32], &[f32], &[f32]),
            k: (f32, f32, f32),
            out: [&mut [f32]; 6],
            sums: (&mut [f32], &mut [[f32; 6]]),
            cols: (&mut [f32], &mut [f32]),
        ) {
            grad_tile_generic::<$f, $pg>(sdp, xd2, cp, rows, k, out, sums, cols)
        }
        }
    };
}
grad_tile_fn!(grad_tile_dot, DOT, true);
grad_tile_fn!(grad_tile_gauss, GAUSS, true);
grad_tile_fn!(grad_tile_student, STUDENT, true);
grad_tile_fn!(grad_tile_laplace, LAPLACE, true);
grad_tile_fn!(grad_tile_dot_nopg, DOT, false);
grad_tile_fn!(grad_tile_gauss_nopg, GAUSS, false);
grad_tile_fn!(grad_tile_student_nopg, STUDENT, false);
grad_tile_fn!(grad_tile_laplace_nopg, LAPLACE, false);

simd_fn! {
/// a += b.
fn add_to(a: &mut [f32], b: &[f32]) {
    for (a, &b) in a.iter_mut().zip(b) {
        *a += b;
    }
}
}

simd_fn! {
/// a += s·b.
fn axpy(a: &mut [f32], s: f32, b: &[f32]) {
    for (a, &b) in a.iter_mut().zip(b) {
        *a += s * b;
    }
}
}

simd_fn! {
/// p = e^{s − lse} in place.
fn exp_shift(s: &mut [f32], lse: f32) {
    for s in s.iter_mut() {
        *s = fm::exp(*s - lse);
    }
}
}

simd_fn! {
/// (Σ p (dp + dE π d²), Σ p) of one row: Σ_j w ∂L/∂w and Σ_j w, fixed order.
fn wdw_row(p: &[f32], dp: &[f32], pi: &[f32], d2: &[f32], de: f32, tmp: &mut [f32]) -> (f32, f32) {
    let n = p.len();
    for j in 0..n.min(dp.len()).min(pi.len()).min(d2.len()).min(tmp.len()) {
        tmp[j] = p[j] * (dp[j] + de * pi[j] * d2[j]);
    }
    (fm::sum(&tmp[..n]), fm::sum(p))
}
}

/// Δ_i = Σ_j w_ij ∂L/∂w_ij / Σ_j w_ij − dlse_i over the recomputed weights, for every row of head
/// h in batch b (what the reference computes; `delta` holds dO·o + dE e − dlse on entry, kept for
/// a row with no visible key). Used for f16/bf16, whose rounded o would put the forward's
/// rounding into every dS (Σ_j dS_ij ≠ dlse_i), which the sums over rows of dπ and dν amplify.
fn exact_delta<T: Element>(
    cx: &Ctx<'_, '_, T>,
    bp: &BackwardProblem<'_, '_, T>,
    lse: &[f32],
    de: Option<&[f32]>,
    dl: Option<&[f32]>,
    (b, h): (usize, usize),
    delta: &mut [f32],
) {
    let p = cx.p;
    let dm = p.dims;
    let (d, dv, lq) = (dm.d, dm.dv, dm.lq);
    let hk = h / (dm.hq / dm.hkv);
    let mut sc = Scratch::default();
    let mut vis = Vec::with_capacity(TQ);
    let want_d2 = de.is_some();
    for i0 in (0..lq).step_by(TQ) {
        let nq = TQ.min(lq - i0);
        let row0 = (b * dm.hq + h) * lq + i0;
        vis.clear();
        vis.extend((i0..i0 + nq).map(|i| cx.visible(b, i)));
        let Some(klo) = vis.iter().filter(|v| v.0 < v.1).map(|v| v.0).min() else {
            continue;
        };
        let khi = vis.iter().map(|v| v.1).max().unwrap_or(0);
        sc.q.resize(nq * d, 0.0);
        sc.qn.resize(nq, 0.0);
        sc.d_o.resize(nq * dv, 0.0);
        for r in 0..nq {
            let qr = &mut sc.q[r * d..][..d];
            load(row(p.q, b, h, i0 + r), qr);
            sc.qn[r] = vdot(qr, qr);
            load(
                row(&bp.inputs.d_o, b, h, i0 + r),
                &mut sc.d_o[r * dv..][..dv],
            );
        }
        let mut acc = vec![(0.0f32, 0.0f32); nq];
        let mut j0 = klo;
        while j0 < khi {
            let nk = TK.min(khi - j0);
            sc.kt.load(p, b, hk, j0, nk, true);
            cx.key_consts(b, h, j0, nk, &mut sc.kc);
            for buf in [&mut sc.s, &mut sc.d2, &mut sc.dp] {
                buf.resize(nq * nk, 0.0);
            }
            sc.gc.resize(nk, 0.0);
            gemm(
                nq,
                d,
                nk,
                &sc.q,
                (d, 1),
                &sc.kt.k,
                (1, d),
                0.0,
                &mut sc.s,
                nk,
            );
            tile_scores(
                cx,
                (b, h, i0, j0),
                (nq, nk),
                &sc.qn,
                &vis,
                &sc.kt,
                &sc.kc,
                &mut sc.s,
                &mut sc.d2,
                want_d2,
            );
            if !want_d2 && cx.family == DOT {
                sc.d2.fill(0.0);
            }
            gemm(
                nq,
                dv,
                nk,
                &sc.d_o,
                (dv, 1),
                &sc.kt.v,
                (1, dv),
                0.0,
                &mut sc.dp,
                nk,
            );
            for (r, a) in acc.iter_mut().enumerate() {
                let l = lse[row0 + r];
                if l == f32::NEG_INFINITY {
                    continue;
                }
                let at = r * nk;
                let s = &mut sc.s[at..at + nk];
                exp_shift(s, l);
                let dei = de.map_or(0.0, |x| x[row0 + r]);
                let (x, y) = wdw_row(
                    s,
                    &sc.dp[at..at + nk],
                    &sc.kc.pi,
                    &sc.d2[at..at + nk],
                    dei,
                    &mut sc.gc,
                );
                a.0 += x;
                a.1 += y;
            }
            j0 += nk;
        }
        for (r, a) in acc.iter().enumerate() {
            if a.1 > 0.0 {
                delta[i0 + r] = a.0 / a.1 - dl.map_or(0.0, |x| x[row0 + r]);
            }
        }
    }
}

/// What one (batch, kv head) task returns.
struct Part {
    /// `[group, Lq, D]`.
    dq: Vec<f32>,
    /// `[Lk, D]`.
    dk: Vec<f32>,
    /// `[Lk, Dv]`.
    dv: Vec<f32>,
    /// `[Lk]`.
    dpk: Vec<f32>,
    /// `[group]`, divided by π_h.
    dph: Vec<f32>,
    /// `[group]`.
    dnu: Vec<f32>,
}

/// Per-task scratch.
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    qn: Vec<f32>,
    d_o: Vec<f32>,
    kt: KTile,
    kc: KeyConsts,
    s: Vec<f32>,
    x: Vec<f32>,
    d2: Vec<f32>,
    dp: Vec<f32>,
    gc: Vec<f32>,
    ppi: Vec<f32>,
    snu: Vec<f32>,
    ds: Vec<f32>,
    wnu: Vec<f32>,
    wlnpi: Vec<f32>,
    gcol: Vec<f32>,
    pcol: Vec<f32>,
}

/// The shared per-row inputs of the backward.
struct Rows<'r> {
    lse: &'r [f32],
    delta: &'r [f32],
    de: Option<&'r [f32]>,
    dl: Option<&'r [f32]>,
    /// Some precision gradient (dπ_h, dπ_key, dν) asked for: else the element-wise work skips
    /// π∂L/∂π, ∂s/∂ν and their sums.
    pg: bool,
}

/// The gradients of kv head hk in batch b; with `dbias`, dS is added into it (row-major in the
/// bias's shape).
fn task<T: Element>(
    cx: &Ctx<'_, '_, T>,
    bp: &BackwardProblem<'_, '_, T>,
    rows: &Rows<'_>,
    (b, hk): (usize, usize),
    mut dbias: Option<&mut [f32]>,
    sc: &mut Scratch,
) -> Result<Part> {
    let p = cx.p;
    let dm = p.dims;
    let (d, dv, lq, lk) = (dm.d, dm.dv, dm.lq, dm.lk);
    let group = dm.hq / dm.hkv;
    let what = || format!("the f32 gradients of [{lq}, {lk}] rows and keys");
    let mut part = Part {
        dq: crate::alloc::zeroed(group * lq * d, what)?,
        dk: crate::alloc::zeroed(lk * d, what)?,
        dv: crate::alloc::zeroed(lk * dv, what)?,
        dpk: crate::alloc::zeroed(lk, what)?,
        dph: vec![0.0; group],
        dnu: vec![0.0; group],
    };
    let mut growsum: Vec<f32> = crate::alloc::zeroed(group * lq, what)?;
    // Per row: Σ π∂L/∂π, Σ dS ∂s/∂ν, Σ dS, Σ w, Σ w ∂s/∂ν, Σ w π∂s/∂π (for the row's correction).
    let mut rsum: Vec<[f32; 6]> = crate::alloc::zeroed(group * lq, what)?;
    let vis: Vec<(usize, usize)> = (0..lq).map(|i| cx.visible(b, i)).collect();
    // Per query tile: the union of its rows' visible keys (None: no visible key).
    let qtiles: Vec<Option<(usize, usize)>> = vis
        .chunks(TQ)
        .map(|c| {
            let lo = c.iter().filter(|v| v.0 < v.1).map(|v| v.0).min()?;
            Some((lo, c.iter().map(|v| v.1).max().unwrap_or(0)))
        })
        .collect();
    let want_d2 = rows.de.is_some();
    let is_dot = cx.family == DOT;
    let c = cx.c;
    let pr = p.precision;
    // `sc` is reused across tasks (no per-task zeroing of its [TQ, TK] buffers: 9% of a Dot
    // backward at L 128): every buffer is written before it is read, except d² for Dot without
    // dE, which nothing writes in this call and stays the zeros of `resize`.
    let mut j0 = 0;
    while j0 < lk {
        let nk = TK.min(lk - j0);
        let hit = |t: &Option<(usize, usize)>| t.is_some_and(|(lo, hi)| lo < j0 + nk && hi > j0);
        if !qtiles.iter().any(hit) {
            j0 += nk;
            continue;
        }
        sc.kt.load(p, b, hk, j0, nk, true);
        sc.gcol.clear();
        sc.gcol.resize(nk, 0.0);
        sc.pcol.clear();
        sc.pcol.resize(nk, 0.0);
        for g in 0..group {
            let h = hk * group + g;
            cx.key_consts(b, h, j0, nk, &mut sc.kc);
            let nu = cx.nu[h];
            let kappa = (nu + d as f32) / 2.0;
            for (t, qt) in qtiles.iter().enumerate() {
                if !hit(qt) {
                    continue;
                }
                let i0 = t * TQ;
                let nq = TQ.min(lq - i0);
                let row0 = (b * dm.hq + h) * lq + i0;
                sc.q.resize(nq * d, 0.0);
                sc.qn.resize(nq, 0.0);
                sc.d_o.resize(nq * dv, 0.0);
                for r in 0..nq {
                    let qr = &mut sc.q[r * d..][..d];
                    load(row(p.q, b, h, i0 + r), qr);
                    sc.qn[r] = vdot(qr, qr);
                    load(
                        row(&bp.inputs.d_o, b, h, i0 + r),
                        &mut sc.d_o[r * dv..][..dv],
                    );
                }
                for buf in [
                    &mut sc.s,
                    &mut sc.d2,
                    &mut sc.dp,
                    &mut sc.gc,
                    &mut sc.ppi,
                    &mut sc.snu,
                    &mut sc.ds,
                    &mut sc.wnu,
                    &mut sc.wlnpi,
                ] {
                    buf.resize(nq * nk, 0.0);
                }
                gemm(
                    nq,
                    d,
                    nk,
                    &sc.q,
                    (d, 1),
                    &sc.kt.k,
                    (1, d),
                    0.0,
                    &mut sc.s,
                    nk,
                );
                // Dot's x is read for π∂s/∂π only (precision gradients).
                if is_dot && rows.pg {
                    sc.x.clear();
                    sc.x.extend_from_slice(&sc.s);
                }
                tile_scores(
                    cx,
                    (b, h, i0, j0),
                    (nq, nk),
                    &sc.qn,
                    &vis[i0..i0 + nq],
                    &sc.kt,
                    &sc.kc,
                    &mut sc.s,
                    &mut sc.d2,
                    want_d2,
                );
                // Dot without dE never writes d² in this call: it stays the zeros of `resize`.
                debug_assert!(want_d2 || !is_dot || sc.d2.iter().all(|&x| x == 0.0));
                gemm(
                    nq,
                    dv,
                    nk,
                    &sc.d_o,
                    (dv, 1),
                    &sc.kt.v,
                    (1, dv),
                    0.0,
                    &mut sc.dp,
                    nk,
                );
                let f = match (cx.family, rows.pg) {
                    (DOT, true) => grad_tile_dot,
                    (GAUSS, true) => grad_tile_gauss,
                    (STUDENT, true) => grad_tile_student,
                    (_, true) => grad_tile_laplace,
                    (DOT, false) => grad_tile_dot_nopg,
                    (GAUSS, false) => grad_tile_gauss_nopg,
                    (STUDENT, false) => grad_tile_student_nopg,
                    (_, false) => grad_tile_laplace_nopg,
                };
                let n = nq * nk;
                let ri = g * lq + i0;
                f(
                    (&mut sc.s[..n], &mut sc.dp[..n]),
                    (
                        if is_dot && rows.pg {
                            &sc.x[..n]
                        } else {
                            &sc.d2[..n]
                        },
                        &sc.d2[..n],
                    ),
                    (&sc.kc.coef, &sc.kc.pi),
                    (
                        &rows.lse[row0..row0 + nq],
                        &rows.delta[row0..row0 + nq],
                        rows.de.map_or(&[][..], |x| &x[row0..row0 + nq]),
                    ),
                    (kappa, nu, c),
                    [
                        &mut sc.gc[..n],
                        &mut sc.ppi[..n],
                        &mut sc.snu[..n],
                        &mut sc.ds[..n],
                        &mut sc.wnu[..n],
                        &mut sc.wlnpi[..n],
                    ],
                    (&mut growsum[ri..ri + nq], &mut rsum[ri..ri + nq]),
                    (&mut sc.gcol, &mut sc.pcol),
                );
                if let (Some(db), Some(bias)) = (dbias.as_deref_mut(), &pr.bias) {
                    for r in 0..nq {
                        let [nb, nh, nl, nkk] = bias.shape;
                        let (bb, hh, ii) = (b.min(nb - 1), h.min(nh - 1), (i0 + r).min(nl - 1));
                        let o = ((bb * nh + hh) * nl + ii) * nkk + j0;
                        add_to(&mut db[o..o + nk], &sc.ds[r * nk..][..nk]);
                    }
                }
                gemm(
                    nk,
                    nq,
                    dv,
                    &sc.s,
                    (1, nk),
                    &sc.d_o,
                    (dv, 1),
                    1.0,
                    &mut part.dv[j0 * dv..],
                    dv,
                );
                gemm(
                    nk,
                    nq,
                    d,
                    &sc.dp,
                    (1, nk),
                    &sc.q,
                    (d, 1),
                    1.0,
                    &mut part.dk[j0 * d..],
                    d,
                );
                let dq = &mut part.dq[(g * lq + i0) * d..];
                gemm(nq, nk, d, &sc.dp, (nk, 1), &sc.kt.k, (d, 1), 1.0, dq, d);
            }
        }
        for j in 0..nk {
            let kr = &sc.kt.k[j * d..][..d];
            axpy(&mut part.dk[(j0 + j) * d..][..d], 2.0 * sc.gcol[j], kr);
            part.dpk[j0 + j] += sc.pcol[j] / sc.kc.pk[j];
        }
        j0 += nk;
    }
    // dq_i += 2 (Σ_j g_ij) q_i.
    let mut qr = vec![0.0f32; d];
    for g in 0..group {
        let h = hk * group + g;
        for i in 0..lq {
            let gs = growsum[g * lq + i];
            if gs != 0.0 {
                load(row(p.q, b, h, i), &mut qr);
                axpy(&mut part.dq[(g * lq + i) * d..][..d], 2.0 * gs, &qr);
            }
        }
        // The scalar gradients per row, corrected as on the GPU (backward.cuh): Σ_j dS_ij is
        // dlse_i Σ_j w_ij in exact arithmetic, and the rounding of this row's own dS would stay
        // in dπ_h and dν (sums over rows whose terms cancel): with shift = Σ dS / Σ w − dlse,
        // Σ dS ∂s/∂ν − shift Σ w ∂s/∂ν (likewise for π∂s/∂π) is the row's sum with that removed.
        let (mut hp, mut np) = (0.0f32, 0.0f32);
        for i in 0..lq {
            let a = rsum[g * lq + i];
            let r = (b * dm.hq + h) * lq + i;
            let shift = if a[3] > 0.0 {
                a[2] / a[3] - rows.dl.map_or(0.0, |x| x[r])
            } else {
                0.0
            };
            hp += a[0] - shift * a[5];
            np += a[1] - shift * a[4];
        }
        part.dph[g] = hp / cx.pi_head[h];
        part.dnu[g] = np;
    }
    Ok(part)
}

pub(crate) fn backward<T: Element>(
    bp: &BackwardProblem<'_, '_, T>,
    mut out: Gradients<'_, T>,
) -> Result<()> {
    let inputs = bp.inputs;
    let lse = inputs.lse.host_slice();
    let cx = Ctx::new(&bp.fwd, || {
        // The forward's lse: finite or −∞ (as the reference checks).
        if let Some(i) = lse.iter().position(|&x| x.is_nan() || x == f32::INFINITY) {
            return Err(Error::invalid(
                "lse",
                format!(
                    "element {i} is {}: the forward's lse is finite or -inf",
                    lse[i]
                ),
            ));
        }
        Ok(())
    })?;
    let p = &bp.fwd;
    let dm = p.dims;
    let (d, dv, lq, lk) = (dm.d, dm.dv, dm.lq, dm.lk);
    let rows_n = dm.b * dm.hq * lq;
    let de = inputs.d_e.as_ref().map(|x| x.host_slice());
    let e = inputs.e.as_ref().map(|x| x.host_slice());
    let dl = inputs.d_lse.as_ref().map(|x| x.host_slice());
    // Δ_i = dO_i·o_i + dE_i e_i − dlse_i.
    let mut delta: Vec<f32> =
        crate::alloc::zeroed(rows_n, || format!("the f32 row terms of {rows_n} rows"))?;
    delta.par_chunks_mut(lq).enumerate().for_each(|(bh, dr)| {
        let (b, h) = (bh / dm.hq, bh % dm.hq);
        let mut o = vec![0.0f32; dv];
        let mut g = vec![0.0f32; dv];
        for (i, x) in dr.iter_mut().enumerate() {
            load(row(&inputs.o, b, h, i), &mut o);
            load(row(&inputs.d_o, b, h, i), &mut g);
            let r = bh * lq + i;
            let mut v = vdot(&g, &o);
            if let (Some(de), Some(e)) = (de, e) {
                v += de[r] * e[r];
            }
            if let Some(dl) = dl {
                v -= dl[r];
            }
            *x = v;
        }
        if T::DTYPE != DType::F32 {
            exact_delta(&cx, bp, lse, de, dl, (b, h), dr);
        }
    });
    let rows = Rows {
        lse,
        delta: &delta,
        de,
        dl,
        pg: out.dpi_head.is_some() || out.dpi_key.is_some() || out.dnu.is_some(),
    };
    let tasks = dm.b * dm.hkv;
    let mut dbias = match (&out.dbias, &p.precision.bias) {
        (Some(_), Some(bias)) => {
            let n: usize = bias.shape.iter().product();
            Some(crate::alloc::zeroed::<f32>(n, || {
                format!("dbias of {n} elements")
            })?)
        }
        _ => None,
    };
    let parts: Vec<Part> = match dbias.as_deref_mut() {
        // dβ sums over broadcast dimensions across tasks: one task after another, in order.
        Some(db) => {
            let mut v = Vec::with_capacity(tasks);
            let mut sc = Scratch::default();
            for bk in 0..tasks {
                v.push(task(
                    &cx,
                    bp,
                    &rows,
                    (bk / dm.hkv, bk % dm.hkv),
                    Some(&mut *db),
                    &mut sc,
                )?);
            }
            v
        }
        None => (0..tasks)
            .into_par_iter()
            .map_init(Scratch::default, |sc, bk| {
                task(&cx, bp, &rows, (bk / dm.hkv, bk % dm.hkv), None, sc)
            })
            .collect::<Result<Vec<Part>>>()?,
    };
    // Everything was checked before the tasks; now the writes.
    let group = dm.hq / dm.hkv;
    let mut dph = vec![0.0f32; dm.hq];
    let mut dnu_head = vec![0.0f32; dm.hq];
    for (bk, part) in parts.iter().enumerate() {
        let (b, hk) = (bk / dm.hkv, bk % dm.hkv);
        for g in 0..group {
            let h = hk * group + g;
            dph[h] += part.dph[g];
            dnu_head[h] += part.dnu[g];
            for i in 0..lq {
                let dst = &mut out.dq;
                let [sb, sh, sl] = dst.strides;
                store(
                    &part.dq[(g * lq + i) * d..][..d],
                    &mut dst.data.host_slice_mut()[b * sb + h * sh + i * sl..][..d],
                );
            }
        }
        for j in 0..lk {
            let [sb, sh, sl] = out.dk.strides;
            store(
                &part.dk[j * d..][..d],
                &mut out.dk.data.host_slice_mut()[b * sb + hk * sh + j * sl..][..d],
            );
            let [sb, sh, sl] = out.dv.strides;
            store(
                &part.dv[j * dv..][..dv],
                &mut out.dv.data.host_slice_mut()[b * sb + hk * sh + j * sl..][..dv],
            );
        }
        if let Some(x) = out.dpi_key.as_mut() {
            x.host_slice_mut()[bk * lk..][..lk].copy_from_slice(&part.dpk);
        }
    }
    if let Some(x) = out.dpi_head.as_mut() {
        x.host_slice_mut().copy_from_slice(&dph);
    }
    if let Some(x) = out.dnu.as_mut() {
        let x = x.host_slice_mut();
        if p.precision.nu.is_some() {
            x.copy_from_slice(&dnu_head);
        } else {
            x[0] = dnu_head.iter().sum();
        }
    }
    if let (Some(x), Some(db)) = (out.dbias.as_mut(), dbias.as_ref()) {
        x.host_slice_mut().copy_from_slice(db);
    }
    Ok(())
}
