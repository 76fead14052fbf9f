//! The fast CPU forward (`Device::cpu()`): a flash-style blocked kernel with f32 accumulation
//! over f32/f16/bf16 inputs (issue 24). The maths is that of [`crate::attention`]; the f64
//! reference (src/attention/cpu.rs) is the oracle it is tested against.
//!
//! One rayon task per (batch, query head, tile of [`TQ`] = 128 query rows): the tile's q rows are
//! gathered (and converted) into a contiguous f32 scratch once, then for each tile of [`TK`] =
//! 128 keys that some row of the tile sees (keys outside every row's causal / window / kv_len /
//! varlen range are skipped): x = Q·Kᵀ through `matrixmultiply::sgemm`; d² = ‖q‖² + ‖k‖² − 2x
//! (clamped at 0) from the same product; the family's score with the precisions, ν, τ and the
//! normaliser, the bias and the masks (−∞) in vectorised element-wise loops (`multiversion`);
//! the online softmax (running max m and sum l, also the running Σ p π d² for e), and
//! O += P·V through sgemm. No [Lq, Lk] matrix exists; the per-thread scratch is O(TQ·TK +
//! (TQ + TK)·(D + Dv)). Results go to f32 buffers first, so that the reference's overflow check
//! (lse or e not representable) runs before anything is written to the caller's outputs.
//!
//! Deterministic and independent of the thread count: each output row belongs to one task, the
//! key tiles are visited in a fixed order, every reduction has a fixed order ([`super::fast_math`]).
//!
//! Nothing of the forward falls back to the reference; [`super::probabilities`] (which
//! materialises the matrix anyway) stays on it.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use super::cpu::{RefInputs, RefVarlen, visible};
use super::fast_math as fm;
use super::{AttentionOutputs, Problem, Score, Tensor4};
use crate::element::{DType, Element};
use crate::error::{Error, Result};

/// Query rows per task.
pub(crate) const TQ: usize = 128;
/// Keys per tile.
pub(crate) const TK: usize = 128;

/// The family, as a small integer for the const-generic element-wise loops.
pub(crate) const DOT: u8 = 0;
pub(crate) const GAUSS: u8 = 1;
pub(crate) const STUDENT: u8 = 2;
pub(crate) const LAPLACE: u8 = 3;

/// `src` converted to f32 into `dst` (same length).
pub(crate) fn load<T: Element>(src: &[T], dst: &mut [f32]) {
    match T::DTYPE {
        DType::F32 => dst.copy_from_slice(bytemuck::cast_slice::<T, f32>(src)),
        DType::F16 => bytemuck::cast_slice::<T, f16>(src).convert_to_f32_slice(dst),
        DType::BF16 => bytemuck::cast_slice::<T, bf16>(src).convert_to_f32_slice(dst),
    }
}

/// `src` rounded to the element type into `dst`.
pub(crate) fn store<T: Element>(src: &[f32], dst: &mut [T]) {
    match T::DTYPE {
        DType::F32 => bytemuck::cast_slice_mut::<T, f32>(dst).copy_from_slice(src),
        DType::F16 => bytemuck::cast_slice_mut::<T, f16>(dst).convert_from_f32_slice(src),
        DType::BF16 => bytemuck::cast_slice_mut::<T, bf16>(dst).convert_from_f32_slice(src),
    }
}

/// Row `(b, h, l)` of a strided tensor.
pub(crate) fn row<'t, T: Element>(t: &Tensor4<'t, T>, b: usize, h: usize, l: usize) -> &'t [T] {
    let [sb, sh, sl] = t.strides;
    &t.data.host_slice()[b * sb + h * sh + l * sl..][..t.shape[3]]
}

/// The checked, host-side view of a problem that the fast kernels share.
pub(crate) struct Ctx<'p, 'a, T: Element> {
    pub p: &'p Problem<'p, 'a, T>,
    pub family: u8,
    pub tau: f32,
    /// The normaliser's D/2 (0: off).
    pub c: f32,
    pub pi_head: Vec<f32>,
    pub nu: Vec<f32>,
    pub pi_key: Option<&'a [f32]>,
    pub meta: RefInputs<'a>,
}

fn check_precision(name: &str, v: &[f32]) -> Result<()> {
    if let Some((i, x)) = v
        .iter()
        .enumerate()
        .find(|(_, x)| !(x.is_finite() && **x > 0.0))
    {
        return Err(Error::invalid(
            name,
            format!("element {i} is {x}; every precision must be finite and > 0"),
        ));
    }
    Ok(())
}

/// Whether a row holds an infinity or a NaN: the exponent bits tested branch-free (vectorised;
/// the scalar `to_f64` scan was 8% of a forward's time), the element found only on a bad row.
fn row_nonfinite<T: Element>(r: &[T]) -> bool {
    match T::DTYPE {
        DType::F32 => nonfinite32(bytemuck::cast_slice::<T, u32>(r)),
        DType::F16 => nonfinite16(bytemuck::cast_slice::<T, u16>(r), 0x7c00),
        DType::BF16 => nonfinite16(bytemuck::cast_slice::<T, u16>(r), 0x7f80),
    }
}

simd_fn! {
fn nonfinite32(x: &[u32]) -> bool {
    let mut bad = 0u32;
    for &b in x {
        bad |= ((b & 0x7f80_0000) == 0x7f80_0000) as u32;
    }
    bad != 0
}
}

simd_fn! {
fn nonfinite16(x: &[u16], exp: u16) -> bool {
    let mut bad = 0u16;
    for &b in x {
        bad |= ((b & exp) == exp) as u16;
    }
    bad != 0
}
}

fn check_finite<T: Element>(name: &str, t: &Tensor4<'_, T>) -> Result<()> {
    let [nb, nh, nl, nd] = t.shape;
    for b in 0..nb {
        for h in 0..nh {
            for l in 0..nl {
                let r = row(t, b, h, l);
                if !row_nonfinite(r) {
                    continue;
                }
                if let Some(x) = r.iter().position(|v| !v.to_f64().is_finite()) {
                    return Err(Error::invalid(
                        name,
                        format!("element {:?} is {}", [b, h, l, x], r[x].to_f64()),
                    ));
                }
                let _ = nd;
            }
        }
    }
    Ok(())
}

impl<'p, 'a, T: Element> Ctx<'p, 'a, T> {
    /// The reference's checks (`Gathered::new` then `validate`), in its order, on the values.
    /// `between` runs after q, k and v are scanned (the backward's lse check).
    pub(crate) fn new(
        p: &'p Problem<'p, 'a, T>,
        between: impl FnOnce() -> Result<()>,
    ) -> Result<Self> {
        let dm = p.dims;
        let pr = p.precision;
        if let Some(vl) = &pr.varlen {
            super::check_cu_seqlens("cu_seqlens_q", vl.cu_q.host_slice(), dm.lq, vl.max_q)?;
            super::check_cu_seqlens("cu_seqlens_k", vl.cu_k.host_slice(), dm.lk, vl.max_k)?;
        }
        check_finite("q", p.q)?;
        check_finite("k", p.k)?;
        check_finite("v", p.v)?;
        between()?;
        p.spec.validate()?;
        let pi_head = match &pr.head {
            Some(h) => {
                check_precision("precision.head", h.host_slice())?;
                h.host_slice().to_vec()
            }
            None => vec![1.0; dm.hq],
        };
        let pi_key = pr.key.as_ref().map(|k| k.host_slice());
        if let Some(k) = pi_key {
            check_precision("precision.key", k)?;
        }
        let nu = match (&pr.nu, p.spec.score) {
            (Some(nu), _) => {
                let nu = nu.host_slice();
                if let Some((h, v)) = nu
                    .iter()
                    .enumerate()
                    .find(|(_, v)| !(v.is_finite() && **v > 0.0))
                {
                    return Err(Error::invalid(
                        "nu",
                        format!("nu[{h}] is {v}; every nu must be finite and > 0"),
                    ));
                }
                nu.to_vec()
            }
            (None, Score::StudentT(nu)) => vec![nu; dm.hq],
            (None, _) => vec![0.0; dm.hq],
        };
        if let Some(bias) = &pr.bias {
            let src = bias.data.host_slice();
            let [nb, nh, nl, nk] = bias.shape;
            let mut n = 0usize;
            for b in 0..nb {
                for h in 0..nh {
                    for i in 0..nl {
                        let at = bias.offset(b, h, i, 0);
                        if let Some(j) = src[at..at + nk]
                            .iter()
                            .position(|x| x.is_nan() || *x == f32::INFINITY)
                        {
                            return Err(Error::invalid(
                                "bias",
                                format!(
                                    "element {} is {}; a bias is finite or -inf",
                                    n + j,
                                    src[at + j]
                                ),
                            ));
                        }
                        n += nk;
                    }
                }
            }
        }
        if let Some(l) = p.kv_len {
            let l = l.host_slice();
            if let Some((b, &n)) = l
                .iter()
                .enumerate()
                .find(|&(_, &n)| n < 0 || n as usize > dm.lk)
            {
                return Err(Error::invalid(
                    "kv_len",
                    format!("kv_len[{b}] = {n} is outside 0..={}", dm.lk),
                ));
            }
        }
        let family = match p.spec.score {
            Score::Dot => DOT,
            Score::Gaussian => GAUSS,
            Score::StudentT(_) => STUDENT,
            Score::Laplace => LAPLACE,
        };
        let meta = RefInputs {
            b: dm.b,
            hq: dm.hq,
            hkv: dm.hkv,
            lq: dm.lq,
            lk: dm.lk,
            d: dm.d,
            dv: dm.dv,
            kv_len: p.kv_len.map(|l| l.host_slice()),
            varlen: pr.varlen.as_ref().map(|vl| RefVarlen {
                cu_q: vl.cu_q.host_slice(),
                cu_k: vl.cu_k.host_slice(),
            }),
            ..Default::default()
        };
        Ok(Ctx {
            p,
            family,
            tau: p.spec.tau(dm.d) as f32,
            c: super::cpu::normaliser(&p.spec, dm.d) as f32,
            pi_head,
            nu,
            pi_key,
            meta,
        })
    }

    /// The visible keys `[lo, hi)` of query row i in batch b (before the bias and mask).
    pub(crate) fn visible(&self, b: usize, i: usize) -> (usize, usize) {
        visible(&self.p.spec, &self.meta, b, i)
    }

    /// Per-key constants of head h over keys `j0..j0 + n` of kv head hk in batch b: π, the
    /// family's coefficient (Dot τπ, Gaussian τπ, Student-t τπ/ν, Laplace √(τπ)) and c ln π.
    pub(crate) fn key_consts(&self, b: usize, h: usize, j0: usize, n: usize, kc: &mut KeyConsts) {
        let dm = self.p.dims;
        let hk = h / (dm.hq / dm.hkv);
        let ph = self.pi_head[h];
        let nu = self.nu[h];
        kc.pi.clear();
        match self.pi_key {
            Some(pk) => {
                let at = (b * dm.hkv + hk) * dm.lk + j0;
                kc.pk.clear();
                kc.pk.extend_from_slice(&pk[at..at + n]);
                kc.pi.extend(pk[at..at + n].iter().map(|&x| ph * x));
            }
            None => {
                kc.pk.clear();
                kc.pk.resize(n, 1.0);
                kc.pi.resize(n, ph);
            }
        }
        let tau = self.tau;
        kc.coef.clear();
        kc.coef.extend(kc.pi.iter().map(|&pi| match self.family {
            STUDENT => tau * pi / nu,
            LAPLACE => (tau * pi).sqrt(),
            _ => tau * pi,
        }));
        kc.cl.clear();
        let c = self.c as f64;
        if c == 0.0 {
            kc.cl.resize(n, 0.0);
        } else if self.pi_key.is_none() {
            kc.cl.resize(n, (c * (ph as f64).ln()) as f32);
        } else {
            kc.cl
                .extend(kc.pi.iter().map(|&pi| (c * (pi as f64).ln()) as f32));
        }
    }
}

/// Per-key constants of a key tile for one head (see [`Ctx::key_consts`]).
#[derive(Default)]
pub(crate) struct KeyConsts {
    pub pk: Vec<f32>,
    pub pi: Vec<f32>,
    pub coef: Vec<f32>,
    pub cl: Vec<f32>,
}

/// d² (when `need_d2`) and the family's score of a [nq, nk] tile in place (`s` holds x = q·k on
/// entry; `d2` unused by Dot unless asked for).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn score_tile_generic<const F: u8>(
    s: &mut [f32],
    d2: &mut [f32],
    qn: &[f32],
    kn: &[f32],
    coef: &[f32],
    cl: &[f32],
    kappa: f32,
    need_d2: bool,
) {
    let nk = kn.len();
    // Equal-length slices and indexed loops: the zipped version of the score loop compiled to
    // scalar code (vmulss) for Dot.
    let (coef, cl) = (&coef[..nk], &cl[..nk]);
    for (r, &qn) in qn.iter().enumerate() {
        let sr = &mut s[r * nk..][..nk];
        let dr = &mut d2[r * nk..][..nk];
        if need_d2 || F != DOT {
            for j in 0..nk {
                let v = qn + kn[j] - 2.0 * sr[j];
                dr[j] = if v > 0.0 { v } else { 0.0 };
            }
        }
        for j in 0..nk {
            let (a, x, d2) = (coef[j], sr[j], dr[j]);
            sr[j] = match F {
                DOT => a * x,
                GAUSS => -0.5 * a * d2 + cl[j],
                STUDENT => -kappa * fm::ln(1.0 + a * d2) + cl[j],
                _ => -a * d2.sqrt() + cl[j],
            };
        }
    }
}

macro_rules! score_fn {
    ($name:ident, $f:expr) => {
        simd_fn! {
        #[allow(clippy::too_many_arguments)]
        fn $name(
            s: &mut [f32],
            d2: &mut [f32],
            qn: &[f32],
            kn: &[f32],
            coef: &[f32],
            cl: &[f32],
            kappa: f32,
            need_d2: bool,
        ) {
            score_tile_generic::<$f>(s, d2, qn, kn, coef, cl, kappa, need_d2)
        }
        }
    };
}
score_fn!(score_dot, DOT);
score_fn!(score_gauss, GAUSS);
score_fn!(score_student, STUDENT);
score_fn!(score_laplace, LAPLACE);

simd_fn! {
/// s += β (−∞ masks).
pub(crate) fn add_bias(s: &mut [f32], bias: &[f32]) {
    for (s, &b) in s.iter_mut().zip(bias) {
        *s += b;
    }
}
}

simd_fn! {
/// s = −∞ where the mask is 0.
pub(crate) fn apply_mask(s: &mut [f32], mask: &[u8]) {
    for (s, &m) in s.iter_mut().zip(mask) {
        *s = if m != 0 { *s } else { f32::NEG_INFINITY };
    }
}
}

simd_fn! {
/// The online-softmax step of a [nq, nk] tile: per row the running max m, sum l and energy e
/// (Σ p π d², when `want_e`) updated, s replaced by p = e^{s − m} (0 on a row with no score yet),
/// and the row of o [nq, dv] rescaled; O += P·V follows through sgemm.
#[allow(clippy::too_many_arguments)]
fn softmax_tile(
    s: &mut [f32],
    d2: &[f32],
    pi: &[f32],
    (m, l, e): (&mut [f32], &mut [f32], &mut [f32]),
    o: &mut [f32],
    (nk, dv): (usize, usize),
    want_e: bool,
    tmp: &mut [f32],
) {
    let tmp = &mut tmp[..nk];
    for r in 0..m.len() {
        let sr = &mut s[r * nk..][..nk];
        let mx = fm::max(sr);
        let m_new = if mx > m[r] { mx } else { m[r] };
        if m_new == f32::NEG_INFINITY {
            sr.fill(0.0);
            continue;
        }
        let alpha = fm::exp(m[r] - m_new);
        m[r] = m_new;
        if want_e {
            let dr = &d2[r * nk..][..nk];
            let pi = &pi[..nk];
            for j in 0..nk {
                let p = fm::exp(sr[j] - m_new);
                sr[j] = p;
                tmp[j] = p * pi[j] * dr[j];
            }
            e[r] = e[r] * alpha + fm::sum(tmp);
        } else {
            for x in sr.iter_mut() {
                *x = fm::exp(*x - m_new);
            }
        }
        l[r] = l[r] * alpha + fm::sum(sr);
        if alpha != 1.0 {
            o[r * dv..][..dv].iter_mut().for_each(|x| *x *= alpha);
        }
    }
}
}

/// One score and its d² from x = q·k (the arithmetic of [`score_tile_generic`], term for term).
#[inline(always)]
fn score_one<const F: u8>(x: f32, qn: f32, kn: f32, a: f32, cl: f32, kappa: f32) -> (f32, f32) {
    let v = qn + kn - 2.0 * x;
    let d2 = if v > 0.0 { v } else { 0.0 };
    let s = match F {
        DOT => a * x,
        GAUSS => -0.5 * a * d2 + cl,
        STUDENT => -kappa * fm::ln(1.0 + a * d2) + cl,
        _ => -a * d2.sqrt() + cl,
    };
    (s, d2)
}

/// [`tile_scores`] then [`softmax_tile`] for a tile without bias or mask, fused per row into two
/// passes over the row (which stays in L1): (1) the score, d² (kept in the row scratch `dt` [nk]
/// for e only) and the row max; (2) p = e^{s − m} written in place, Σ p and Σ p π d². The lanes
/// and the fold order of the max and of both sums are those of [`fm::max`] / [`fm::sum`], so the
/// results are bitwise those of the unfused path (the one taken with a bias or a mask).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fused_tile_generic<const F: u8, const E: bool>(
    s: &mut [f32],
    dt: &mut [f32],
    (qn, kn): (&[f32], &[f32]),
    (coef, cl, pi): (&[f32], &[f32], &[f32]),
    (vis, j0, kappa): (&[(usize, usize)], usize, f32),
    (m, l, e): (&mut [f32], &mut [f32], &mut [f32]),
    o: &mut [f32],
    dv: usize,
) {
    let nk = kn.len();
    let (coef, cl, pi, dt) = (&coef[..nk], &cl[..nk], &pi[..nk], &mut dt[..nk]);
    let n16 = nk - nk % 16;
    for r in 0..m.len() {
        let sr = &mut s[r * nk..][..nk];
        let q = qn[r];
        let (lo, hi) = vis[r];
        let lo = lo.clamp(j0, j0 + nk) - j0;
        let hi = hi.clamp(j0 + lo, j0 + nk) - j0;
        // Pass 1: scores (−∞ outside the visible range), d², max.
        let mut acc = [f32::NEG_INFINITY; 16];
        let mut c = 0;
        while c < n16 {
            let (s16, kn16, a16, cl16) = (
                &mut sr[c..c + 16],
                &kn[c..c + 16],
                &coef[c..c + 16],
                &cl[c..c + 16],
            );
            let d16 = &mut dt[c..c + 16];
            for t in 0..16 {
                let (v, d2) = score_one::<F>(s16[t], q, kn16[t], a16[t], cl16[t], kappa);
                if E {
                    d16[t] = d2;
                }
                let j = c + t;
                let v = if j >= lo && j < hi {
                    v
                } else {
                    f32::NEG_INFINITY
                };
                s16[t] = v;
                acc[t] = if v > acc[t] { v } else { acc[t] };
            }
            c += 16;
        }
        let mut mx = f32::NEG_INFINITY;
        for a in acc {
            mx = if a > mx { a } else { mx };
        }
        for j in n16..nk {
            let (v, d2) = score_one::<F>(sr[j], q, kn[j], coef[j], cl[j], kappa);
            if E {
                dt[j] = d2;
            }
            let v = if j >= lo && j < hi {
                v
            } else {
                f32::NEG_INFINITY
            };
            sr[j] = v;
            mx = if v > mx { v } else { mx };
        }
        let m_new = if mx > m[r] { mx } else { m[r] };
        if m_new == f32::NEG_INFINITY {
            sr.fill(0.0);
            continue;
        }
        // e^{m − m_new}: exactly 0 on the row's first tile and 1 when the max stays (what fm::exp
        // gives there), without the scalar polynomial.
        let alpha = if m[r] == f32::NEG_INFINITY {
            0.0
        } else if m[r] == m_new {
            1.0
        } else {
            fm::exp(m[r] - m_new)
        };
        m[r] = m_new;
        // Pass 2: p in place, Σ p, Σ p π d².
        let mut al = [0.0f32; 16];
        let mut ae = [0.0f32; 16];
        let mut c = 0;
        while c < n16 {
            let (s16, pi16, d16) = (&mut sr[c..c + 16], &pi[c..c + 16], &dt[c..c + 16]);
            for t in 0..16 {
                let p = fm::exp(s16[t] - m_new);
                s16[t] = p;
                al[t] += p;
                if E {
                    ae[t] += p * pi16[t] * d16[t];
                }
            }
            c += 16;
        }
        let (mut sl, mut se) = (0.0f32, 0.0f32);
        for a in al {
            sl += a;
        }
        if E {
            for a in ae {
                se += a;
            }
        }
        for j in n16..nk {
            let p = fm::exp(sr[j] - m_new);
            sr[j] = p;
            sl += p;
            if E {
                se += p * pi[j] * dt[j];
            }
        }
        if E {
            e[r] = e[r] * alpha + se;
        }
        l[r] = l[r] * alpha + sl;
        if alpha != 1.0 {
            o[r * dv..][..dv].iter_mut().for_each(|x| *x *= alpha);
        }
    }
}

macro_rules! fused_fn {
    ($name:ident, $f:expr, $e:expr) => {
        simd_fn! {
        #[allow(clippy::too_many_arguments, clippy::type_complexity)]
        fn $name(
            s: &mut [f32],
            dt: &mut [f32],
            qk: (&[f32], &[f32]),
            consts: (&[f32], &[f32], &[f32]),
            vis: (&[(usize, usize)], usize, f32),
            mle: (&mut [f32], &mut [f32], &mut [f32]),
            o: &mut [f32],
            dv: usize,
        ) {
            fused_tile_generic::<$f, $e>(s, dt, qk, consts, vis, mle, o, dv)
        }
        }
    };
}
fused_fn!(fused_dot, DOT, false);
fused_fn!(fused_gauss, GAUSS, false);
fused_fn!(fused_student, STUDENT, false);
fused_fn!(fused_laplace, LAPLACE, false);
fused_fn!(fused_dot_e, DOT, true);
fused_fn!(fused_gauss_e, GAUSS, true);
fused_fn!(fused_student_e, STUDENT, true);
fused_fn!(fused_laplace_e, LAPLACE, true);

simd_fn! {
/// Σ x (fixed order), Σ x·y, max x: vectorised.
pub(crate) fn vsum(x: &[f32]) -> f32 {
    fm::sum(x)
}
}

simd_fn! {
pub(crate) fn vdot(x: &[f32], y: &[f32]) -> f32 {
    fm::dot(x, y)
}
}

simd_fn! {
pub(crate) fn vmax(x: &[f32]) -> f32 {
    fm::max(x)
}
}

/// C[m, n] = α A·B + β C through matrixmultiply (row-major strides given explicitly).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &mut [f32],
    rsc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(k == 0 || (m - 1) * rsa + (k - 1) * csa < a.len());
    assert!(k == 0 || (k - 1) * rsb + (n - 1) * csb < b.len());
    assert!((m - 1) * rsc + n <= c.len());
    // Safety: the asserts bound every element the strides address.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            rsc as isize,
            1,
        );
    }
}

/// A key tile in f32: k rows, ‖k‖², v rows.
#[derive(Default)]
pub(crate) struct KTile {
    pub k: Vec<f32>,
    pub kn: Vec<f32>,
    pub v: Vec<f32>,
}

impl KTile {
    pub(crate) fn load<T: Element>(
        &mut self,
        p: &Problem<'_, '_, T>,
        b: usize,
        hk: usize,
        j0: usize,
        n: usize,
        with_v: bool,
    ) {
        let (d, dv) = (p.dims.d, p.dims.dv);
        self.k.resize(n * d, 0.0);
        self.kn.resize(n, 0.0);
        for j in 0..n {
            let kr = &mut self.k[j * d..][..d];
            load(row(p.k, b, hk, j0 + j), kr);
            self.kn[j] = vdot(kr, kr);
        }
        if with_v {
            self.v.resize(n * dv, 0.0);
            for j in 0..n {
                load(row(p.v, b, hk, j0 + j), &mut self.v[j * dv..][..dv]);
            }
        }
    }
}

/// The scores of a [nq, nk] tile into `s` (x on entry from the GEMM) and d² into `d2` (when
/// `want_d2` or the family needs it), with the bias, mask and visibility applied (−∞).
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile_scores<T: Element>(
    cx: &Ctx<'_, '_, T>,
    (b, h, i0, j0): (usize, usize, usize, usize),
    (nq, nk): (usize, usize),
    qn: &[f32],
    vis: &[(usize, usize)],
    kt: &KTile,
    kc: &KeyConsts,
    s: &mut [f32],
    d2: &mut [f32],
    want_d2: bool,
) {
    let kappa = (cx.nu[h] + cx.p.dims.d as f32) / 2.0;
    let pr = cx.p.precision;
    let f = match cx.family {
        DOT => score_dot,
        GAUSS => score_gauss,
        STUDENT => score_student,
        _ => score_laplace,
    };
    let (s, d2) = (&mut s[..nq * nk], &mut d2[..nq * nk]);
    f(
        s,
        d2,
        &qn[..nq],
        &kt.kn[..nk],
        &kc.coef,
        &kc.cl,
        kappa,
        want_d2,
    );
    for r in 0..nq {
        let sr = &mut s[r * nk..][..nk];
        let i = i0 + r;
        if let Some(bias) = &pr.bias {
            let at = bias.offset(b, h, i, j0);
            add_bias(sr, &bias.data.host_slice()[at..at + nk]);
        }
        if let Some(mask) = &pr.mask {
            let at = mask.offset(b, h, i, j0);
            apply_mask(sr, &mask.data.host_slice()[at..at + nk]);
        }
        let (lo, hi) = vis[r];
        let lo = lo.clamp(j0, j0 + nk) - j0;
        let hi = hi.clamp(j0 + lo, j0 + nk) - j0;
        sr[..lo].fill(f32::NEG_INFINITY);
        sr[hi..].fill(f32::NEG_INFINITY);
    }
}

/// Per-thread scratch of the forward.
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    qn: Vec<f32>,
    vis: Vec<(usize, usize)>,
    kt: KTile,
    kc: KeyConsts,
    s: Vec<f32>,
    d2: Vec<f32>,
    tmp: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    e: Vec<f32>,
}

/// Query rows `i0..i0 + nq` of head h in batch b into `o` [nq, Dv], `lse` and `e`.
#[allow(clippy::too_many_arguments)]
fn forward_tile<T: Element>(
    cx: &Ctx<'_, '_, T>,
    sc: &mut Scratch,
    (b, h, i0): (usize, usize, usize),
    o: &mut [f32],
    lse: &mut [f32],
    e: &mut [f32],
    want_e: bool,
) {
    let p = cx.p;
    let dm = p.dims;
    let (d, dv) = (dm.d, dm.dv);
    let nq = lse.len();
    let hk = h / (dm.hq / dm.hkv);
    sc.q.resize(nq * d, 0.0);
    sc.qn.resize(nq, 0.0);
    sc.vis.clear();
    for r in 0..nq {
        let qr = &mut sc.q[r * d..][..d];
        load(row(p.q, b, h, i0 + r), qr);
        sc.qn[r] = vdot(qr, qr);
        sc.vis.push(cx.visible(b, i0 + r));
    }
    let klo = sc.vis.iter().filter(|v| v.0 < v.1).map(|v| v.0).min();
    let khi = sc.vis.iter().map(|v| v.1).max().unwrap_or(0);
    sc.m.clear();
    sc.m.resize(nq, f32::NEG_INFINITY);
    sc.l.clear();
    sc.l.resize(nq, 0.0);
    sc.e.clear();
    sc.e.resize(nq, 0.0);
    o.fill(0.0);
    // ‖q‖² or ‖k‖² beyond f32: d² = ‖q‖² + ‖k‖² − 2x would be ∞ − ∞ (or silently −∞ scores);
    // such a tile reports NaN, which the overflow check turns into the reference's error.
    let mut overflow = sc.qn.iter().any(|x| !x.is_finite());
    // Without a bias or a mask the score and softmax steps run fused (the same bits).
    let fused = p.precision.bias.is_none() && p.precision.mask.is_none();
    let kappa = (cx.nu[h] + d as f32) / 2.0;
    if let Some(klo) = klo {
        let mut j0 = klo;
        while j0 < khi {
            let nk = TK.min(khi - j0);
            sc.kt.load(p, b, hk, j0, nk, true);
            overflow |= sc.kt.kn.iter().any(|x| !x.is_finite());
            cx.key_consts(b, h, j0, nk, &mut sc.kc);
            sc.s.resize(nq * nk, 0.0);
            sc.tmp.resize(nk, 0.0);
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
            if fused {
                let f = match (cx.family, want_e) {
                    (DOT, false) => fused_dot,
                    (GAUSS, false) => fused_gauss,
                    (STUDENT, false) => fused_student,
                    (_, false) => fused_laplace,
                    (DOT, true) => fused_dot_e,
                    (GAUSS, true) => fused_gauss_e,
                    (STUDENT, true) => fused_student_e,
                    (_, true) => fused_laplace_e,
                };
                f(
                    &mut sc.s,
                    &mut sc.tmp,
                    (&sc.qn[..nq], &sc.kt.kn[..nk]),
                    (&sc.kc.coef, &sc.kc.cl, &sc.kc.pi),
                    (&sc.vis, j0, kappa),
                    (&mut sc.m, &mut sc.l, &mut sc.e),
                    o,
                    dv,
                );
                gemm(nq, nk, dv, &sc.s, (nk, 1), &sc.kt.v, (dv, 1), 1.0, o, dv);
                j0 += nk;
                continue;
            }
            sc.d2.resize(nq * nk, 0.0);
            tile_scores(
                cx,
                (b, h, i0, j0),
                (nq, nk),
                &sc.qn,
                &sc.vis,
                &sc.kt,
                &sc.kc,
                &mut sc.s,
                &mut sc.d2,
                want_e,
            );
            softmax_tile(
                &mut sc.s,
                &sc.d2,
                &sc.kc.pi,
                (&mut sc.m, &mut sc.l, &mut sc.e),
                o,
                (nk, dv),
                want_e,
                &mut sc.tmp,
            );
            gemm(nq, nk, dv, &sc.s, (nk, 1), &sc.kt.v, (dv, 1), 1.0, o, dv);
            j0 += nk;
        }
    }
    for r in 0..nq {
        let l = sc.l[r];
        if l > 0.0 {
            let inv = 1.0 / l;
            o[r * dv..][..dv].iter_mut().for_each(|x| *x *= inv);
            lse[r] = sc.m[r] + l.ln();
            e[r] = sc.e[r] * inv;
        } else {
            o[r * dv..][..dv].fill(0.0);
            lse[r] = f32::NEG_INFINITY;
            e[r] = 0.0;
        }
        if overflow {
            lse[r] = f32::NAN;
        }
    }
}

pub(crate) fn forward<T: Element>(
    p: &Problem<'_, '_, T>,
    mut out: AttentionOutputs<'_, T>,
) -> Result<()> {
    let cx = Ctx::new(p, || Ok(()))?;
    let dm = p.dims;
    let (lq, dv) = (dm.lq, dm.dv);
    let rows = dm.b * dm.hq * lq;
    let what = || format!("the f32 outputs of {rows} rows");
    let mut o = crate::alloc::zeroed::<f32>(rows * dv, what)?;
    let mut lse = crate::alloc::zeroed::<f32>(rows, what)?;
    let mut e = crate::alloc::zeroed::<f32>(rows, what)?;
    let want_e = out.e.is_some();
    o.par_chunks_mut(lq * dv)
        .zip(lse.par_chunks_mut(lq))
        .zip(e.par_chunks_mut(lq))
        .enumerate()
        .for_each(|(bh, ((o, lse), e))| {
            let (b, h) = (bh / dm.hq, bh % dm.hq);
            o.par_chunks_mut(TQ * dv)
                .zip(lse.par_chunks_mut(TQ))
                .zip(e.par_chunks_mut(TQ))
                .enumerate()
                .for_each_init(Scratch::default, |sc, (t, ((o, lse), e))| {
                    forward_tile(&cx, sc, (b, h, t * TQ), o, lse, e, want_e)
                });
        });
    // The reference's overflow check (lse or e not representable in f32), before any write.
    let bad_lse = |x: f32| x.is_nan() || x == f32::INFINITY;
    let bad_e = |x: f32| !x.is_finite();
    let at = lse
        .iter()
        .position(|&x| bad_lse(x))
        .or_else(|| e.iter().position(|&x| want_e && bad_e(x)))
        .or_else(|| o.iter().position(|x| x.is_nan()).map(|i| i / dv));
    if let Some(i) = at {
        return Err(Error::invalid(
            if p.spec.scale.is_some() { "scale" } else { "q" },
            format!(
                "the scores of row {i} overflow f32 (lse = {}, e = {}): inputs or scale too large",
                lse[i], e[i]
            ),
        ));
    }
    let t = &mut out.o;
    let [nb, nh, nl, _] = t.shape;
    let [sb, sh, sl] = t.strides;
    let dst = t.data.host_slice_mut();
    for b in 0..nb {
        for h in 0..nh {
            for l in 0..nl {
                let r = (b * nh + h) * nl + l;
                store(
                    &o[r * dv..][..dv],
                    &mut dst[b * sb + h * sh + l * sl..][..dv],
                );
            }
        }
    }
    if let Some(x) = out.lse.as_mut() {
        x.host_slice_mut().copy_from_slice(&lse);
    }
    if let Some(x) = out.e.as_mut() {
        x.host_slice_mut().copy_from_slice(&e);
    }
    Ok(())
}
