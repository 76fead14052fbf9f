//! The attention reference: f64 throughout, one (batch, query head) per rayon task, written to be
//! read next to the maths in the module docs of [`crate::attention`] and
//! tests/fixtures/ATTENTION-CONVENTIONS.md, not to be fast.

use rayon::prelude::*;

use super::{AttentionOutputs, AttentionSpec, Problem, Score, Tensor4, Tensor4Mut};
use crate::backend::View;
use crate::element::Element;
use crate::error::{Error, Result};

/// Inputs of [`forward`] on the host, every tensor row-major BHLD in f64 (build with
/// `..Default::default()` for the optional ones).
#[derive(Clone, Copy, Debug, Default)]
pub struct RefInputs<'a> {
    /// B, Hq, Hkv, Lq, Lk, D, Dv.
    pub b: usize,
    /// Query heads.
    pub hq: usize,
    /// Key/value heads (divides hq).
    pub hkv: usize,
    /// Query length.
    pub lq: usize,
    /// Key length.
    pub lk: usize,
    /// q/k head dim.
    pub d: usize,
    /// v head dim.
    pub dv: usize,
    /// `[B, Hq, Lq, D]`.
    pub q: &'a [f64],
    /// `[B, Hkv, Lk, D]`.
    pub k: &'a [f64],
    /// `[B, Hkv, Lk, Dv]`.
    pub v: &'a [f64],
    /// π_h `[Hq]`.
    pub pi_head: Option<&'a [f64]>,
    /// π_j `[B, Hkv, Lk]`.
    pub pi_key: Option<&'a [f64]>,
    /// Key lengths `[B]`.
    pub kv_len: Option<&'a [i32]>,
    /// Student-t's ν per query head `[Hq]` (replaces the spec's).
    pub nu_head: Option<&'a [f64]>,
    /// β added to the scores (−∞ allowed: a masked score).
    pub bias: Option<RefBroadcast<'a, f64>>,
    /// Scores kept (true) or masked (false).
    pub mask: Option<RefBroadcast<'a, bool>>,
    /// Packed sequences: B = 1, and sequence s holds query rows `cu_q[s]..cu_q[s + 1]` and key
    /// rows `cu_k[s]..cu_k[s + 1]` ([`crate::attention::Varlen`]).
    pub varlen: Option<RefVarlen<'a>>,
}

/// A row-major tensor of `shape` = `[B | 1, Hq | 1, Lq | 1, Lk]`, broadcast to the scores.
#[derive(Clone, Copy, Debug)]
pub struct RefBroadcast<'a, T> {
    /// The elements, row-major.
    pub values: &'a [T],
    /// Its shape.
    pub shape: [usize; 4],
}

impl<T: Copy> RefBroadcast<'_, T> {
    /// The row-major offset of score (b, h, i, j).
    pub fn offset(&self, b: usize, h: usize, i: usize, j: usize) -> usize {
        let [nb, nh, nl, nk] = self.shape;
        let (b, h, i) = (b.min(nb - 1), h.min(nh - 1), i.min(nl - 1));
        ((b * nh + h) * nl + i) * nk + j
    }

    /// The element for score (b, h, i, j).
    pub fn at(&self, b: usize, h: usize, i: usize, j: usize) -> T {
        self.values[self.offset(b, h, i, j)]
    }
}

/// The offsets of packed sequences (`[S + 1]` each).
#[derive(Clone, Copy, Debug)]
pub struct RefVarlen<'a> {
    /// Query row offsets.
    pub cu_q: &'a [i32],
    /// Key row offsets.
    pub cu_k: &'a [i32],
}

/// [`forward`]'s results: o `[B, Hq, Lq, Dv]`, lse and e `[B, Hq, Lq]` (lse = −∞ on a row with
/// no visible key).
#[derive(Clone, Debug, Default)]
pub struct RefOutputs {
    /// The output.
    pub o: Vec<f64>,
    /// ln Σ_j e^{s_ij}.
    pub lse: Vec<f64>,
    /// Σ_j w_ij π_ij d²_ij.
    pub e: Vec<f64>,
}

fn check_slice(name: &str, len: usize, want: usize) -> Result<()> {
    if len != want {
        return Err(Error::invalid(
            name,
            format!("has {len} elements, expected {want}"),
        ));
    }
    Ok(())
}

fn check_precision(name: &str, values: &[f64]) -> Result<()> {
    if let Some((i, v)) = values
        .iter()
        .enumerate()
        .find(|(_, v)| !(v.is_finite() && **v > 0.0))
    {
        return Err(Error::invalid(
            name,
            format!("element {i} is {v}; every precision must be finite and > 0"),
        ));
    }
    Ok(())
}

pub(crate) fn validate(spec: &AttentionSpec, inp: &RefInputs<'_>) -> Result<()> {
    spec.validate()?;
    if inp.hkv == 0 || !inp.hq.is_multiple_of(inp.hkv) {
        return Err(Error::invalid(
            "k",
            format!(
                "{} kv heads do not divide the {} query heads",
                inp.hkv, inp.hq
            ),
        ));
    }
    // Checked products: the reference is public, its sizes are the caller's.
    use crate::alloc::product;
    let (b, hq, hkv, lq, lk) = (inp.b, inp.hq, inp.hkv, inp.lq, inp.lk);
    check_slice("q", inp.q.len(), product("q", &[b, hq, lq, inp.d])?)?;
    check_slice("k", inp.k.len(), product("k", &[b, hkv, lk, inp.d])?)?;
    check_slice("v", inp.v.len(), product("v", &[b, hkv, lk, inp.dv])?)?;
    product("o", &[b, hq, lq, inp.dv])?;
    product("scores", &[b, hq, lq, lk])?;
    if let Some(p) = inp.pi_head {
        check_slice("precision.head", p.len(), inp.hq)?;
        check_precision("precision.head", p)?;
    }
    if let Some(p) = inp.pi_key {
        check_slice("precision.key", p.len(), inp.b * inp.hkv * inp.lk)?;
        check_precision("precision.key", p)?;
    }
    if let Some(nu) = inp.nu_head {
        if !matches!(spec.score, Score::StudentT(_)) {
            return Err(Error::invalid(
                "nu",
                "a per-head nu needs the Student-t score",
            ));
        }
        check_slice("nu", nu.len(), inp.hq)?;
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
    }
    let full = [inp.b, inp.hq, inp.lq, inp.lk];
    let broadcasts = |name: &str, shape: [usize; 4], len: usize| -> Result<()> {
        if !((0..3).all(|i| shape[i] == 1 || shape[i] == full[i]) && shape[3] == full[3]) {
            return Err(Error::invalid(
                name,
                format!("shape {shape:?} does not broadcast to the scores {full:?}"),
            ));
        }
        check_slice(name, len, shape.iter().product())
    };
    if let Some(bias) = inp.bias {
        broadcasts("bias", bias.shape, bias.values.len())?;
        if let Some(i) = bias
            .values
            .iter()
            .position(|x| x.is_nan() || *x == f64::INFINITY)
        {
            return Err(Error::invalid(
                "bias",
                format!(
                    "element {i} is {}; a bias is finite or -inf",
                    bias.values[i]
                ),
            ));
        }
    }
    if let Some(mask) = inp.mask {
        broadcasts("mask", mask.shape, mask.values.len())?;
    }
    if let Some(vl) = inp.varlen {
        if inp.b != 1 || inp.kv_len.is_some() || inp.bias.is_some() || inp.mask.is_some() {
            return Err(Error::invalid(
                "varlen",
                "packed sequences need B = 1 and no kv_len, bias or mask",
            ));
        }
        check_slice("cu_seqlens_k", vl.cu_k.len(), vl.cu_q.len())?;
        if vl.cu_q.len() < 2 {
            return Err(Error::invalid("cu_seqlens_q", "needs S + 1 >= 2 offsets"));
        }
        super::check_cu_seqlens("cu_seqlens_q", vl.cu_q, inp.lq, inp.lq)?;
        super::check_cu_seqlens("cu_seqlens_k", vl.cu_k, inp.lk, inp.lk)?;
    }
    if let Some(l) = inp.kv_len {
        check_slice("kv_len", l.len(), inp.b)?;
        if let Some((b, &n)) = l
            .iter()
            .enumerate()
            .find(|&(_, &n)| n < 0 || n as usize > inp.lk)
        {
            return Err(Error::invalid(
                "kv_len",
                format!("kv_len[{b}] = {n} is outside 0..={}", inp.lk),
            ));
        }
    }
    Ok(())
}

/// The visible keys `[lo, hi)` of query row `i` in batch `b` (empty when lo ≥ hi), before the
/// bias and mask; with packed sequences, in packed key rows, within row i's sequence.
pub(crate) fn visible(
    spec: &AttentionSpec,
    inp: &RefInputs<'_>,
    b: usize,
    i: usize,
) -> (usize, usize) {
    // Row i's sequence: its first query and key rows, and its lengths.
    let (q0, k0, lq, lk) = match inp.varlen {
        None => (0, 0, inp.lq as i64, inp.lk as i64),
        Some(vl) => {
            let s = vl.cu_q.partition_point(|&c| c as usize <= i) - 1;
            let (q0, k0) = (vl.cu_q[s] as i64, vl.cu_k[s] as i64);
            (
                q0,
                k0,
                vl.cu_q[s + 1] as i64 - q0,
                vl.cu_k[s + 1] as i64 - k0,
            )
        }
    };
    let diag = i as i64 - q0 + lk - lq; // i' (bottom-right aligned)
    let lo = match spec.window {
        Some(w) => (diag - w as i64 + 1).max(0),
        None => 0,
    };
    let mut hi = lk;
    if spec.is_causal() {
        hi = hi.min(diag + 1);
    }
    if let Some(l) = inp.kv_len {
        hi = hi.min(l[b] as i64);
    }
    let hi = hi.max(0);
    ((lo.min(hi) + k0) as usize, (hi + k0) as usize)
}

/// Student-t's ν for query head `h` (the per-head one when given), else 0.
pub(crate) fn nu_of(spec: &AttentionSpec, inp: &RefInputs<'_>, h: usize) -> f64 {
    match (spec.score, inp.nu_head) {
        (Score::StudentT(_), Some(nu)) => nu[h],
        (Score::StudentT(nu), None) => nu as f64,
        _ => 0.0,
    }
}

/// One visible, unmasked key of a row: j, the score s (bias included), x = q·k, d² and π.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Term {
    pub j: usize,
    pub s: f64,
    pub x: f64,
    pub d2: f64,
    pub pi: f64,
}

/// The scores of row i of head h in batch b over its visible keys, those the mask keeps and the
/// bias leaves finite, into `out` (cleared first). `c` is the normaliser's D/2.
pub(crate) fn row_terms(
    spec: &AttentionSpec,
    inp: &RefInputs<'_>,
    (b, h, i): (usize, usize, usize),
    c: f64,
    out: &mut Vec<Term>,
) {
    out.clear();
    let (lo, hi) = visible(spec, inp, b, i);
    let (d, lk) = (inp.d, inp.lk);
    let hk = h / (inp.hq / inp.hkv);
    let kv0 = (b * inp.hkv + hk) * lk; // first key row of this kv head
    let qi = &inp.q[((b * inp.hq + h) * inp.lq + i) * d..][..d];
    let pi_h = inp.pi_head.map_or(1.0, |p| p[h]);
    let nu = nu_of(spec, inp, h);
    let tau = spec.tau(d);
    for j in lo..hi {
        if inp.mask.is_some_and(|m| !m.at(b, h, i, j)) {
            continue;
        }
        let kj = &inp.k[(kv0 + j) * d..][..d];
        let pi = pi_h * inp.pi_key.map_or(1.0, |p| p[kv0 + j]);
        let d2: f64 = qi.iter().zip(kj).map(|(a, c)| (a - c) * (a - c)).sum();
        let x: f64 = qi.iter().zip(kj).map(|(a, c)| a * c).sum();
        let mut s = score_value(spec.score, nu, tau, d as f64, c, x, d2, pi);
        if let Some(bias) = inp.bias {
            s += bias.at(b, h, i, j);
        }
        if s == f64::NEG_INFINITY {
            continue; // a bias of −∞ masks the score
        }
        out.push(Term { j, s, x, d2, pi });
    }
}

/// One score in natural units (the maths of [`crate::attention`]); `nu` is Student-t's ν, `c`
/// the normaliser's D/2 (0: off).
#[allow(clippy::too_many_arguments)]
pub(crate) fn score_value(
    score: Score,
    nu: f64,
    tau: f64,
    dim: f64,
    c: f64,
    x: f64,
    d2: f64,
    pi: f64,
) -> f64 {
    let s = match score {
        Score::Dot => tau * pi * x,
        Score::Gaussian => -0.5 * tau * pi * d2,
        Score::StudentT(_) => -((nu + dim) / 2.0) * (tau * pi * d2 / nu).ln_1p(),
        Score::Laplace => -(tau * pi).sqrt() * d2.sqrt(),
    };
    if c != 0.0 { s + c * pi.ln() } else { s }
}

/// The attention weights w_ij `[B, Hq, Lq, Lk]` in f64 (0 for masked keys and fully masked rows).
pub fn probabilities(spec: &AttentionSpec, inp: &RefInputs<'_>) -> Result<Vec<f64>> {
    validate(spec, inp)?;
    let (hq, lq, lk) = (inp.hq, inp.lq, inp.lk);
    let c = normaliser(spec, inp.d);
    let n = crate::alloc::product("probabilities", &[inp.b, hq, lq, lk])?;
    let mut w = crate::alloc::zeroed(n, || format!("[{}, {hq}, {lq}, {lk}] probabilities", inp.b))?;
    w.par_chunks_mut(lk).enumerate().for_each(|(row, wr)| {
        let mut t = Vec::new();
        row_terms(
            spec,
            inp,
            (row / (hq * lq), row / lq % hq, row % lq),
            c,
            &mut t,
        );
        let m = t.iter().map(|t| t.s).fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = t.iter().map(|t| (t.s - m).exp()).sum();
        for t in &t {
            wr[t.j] = (t.s - m).exp() / z;
        }
    });
    Ok(w)
}

/// The normaliser's D/2 (0 when off; Dot has none).
pub(crate) fn normaliser(spec: &AttentionSpec, d: usize) -> f64 {
    if spec.normalizer && spec.score.is_distance() {
        d as f64 / 2.0
    } else {
        0.0
    }
}

/// Precision-weighted attention in f64 (the maths of [`crate::attention`]'s module docs).
pub fn forward(spec: &AttentionSpec, inp: &RefInputs<'_>) -> Result<RefOutputs> {
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
    let c = normaliser(spec, d);

    // One (o, lse, e) block per (b, h).
    let blocks: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = (0..nb * hq)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / hq, bh % hq);
            let kv0 = (b * hkv + h / (hq / hkv)) * lk; // first key row of this kv head
            let mut o = vec![0.0f64; lq * dv];
            let mut lse = vec![f64::NEG_INFINITY; lq];
            let mut e = vec![0.0f64; lq];
            let mut terms = Vec::with_capacity(lk);
            for i in 0..lq {
                row_terms(spec, inp, (b, h, i), c, &mut terms);
                if terms.is_empty() {
                    continue; // fully masked: o = 0, lse = −∞, e = 0
                }
                let m = terms.iter().map(|t| t.s).fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = terms.iter().map(|t| (t.s - m).exp()).sum();
                lse[i] = m + z.ln();
                let oi = &mut o[i * dv..][..dv];
                let mut ei = 0.0;
                for t in &terms {
                    let w = (t.s - m).exp() / z;
                    let vj = &inp.v[(kv0 + t.j) * dv..][..dv];
                    oi.iter_mut().zip(vj).for_each(|(a, &c)| *a += w * c);
                    ei += w * t.pi * t.d2;
                }
                e[i] = ei;
            }
            (o, lse, e)
        })
        .collect();

    let rows = nb * hq * lq;
    let what = || format!("the f64 outputs of {rows} rows");
    let mut out = RefOutputs {
        o: crate::alloc::with_capacity(rows * dv, what)?,
        lse: crate::alloc::with_capacity(rows, what)?,
        e: crate::alloc::with_capacity(rows, what)?,
    };
    for (o, lse, e) in blocks {
        out.o.extend_from_slice(&o);
        out.lse.extend_from_slice(&lse);
        out.e.extend_from_slice(&e);
    }
    Ok(out)
}

/// A strided `[B, H, L, D]` host tensor gathered into row-major BHLD f64.
pub(crate) fn gather<T: Element>(t: &Tensor4<'_, T>) -> Result<Vec<f64>> {
    let src = t.data.host_slice();
    let [nb, nh, nl, nd] = t.shape;
    let [sb, sh, sl] = t.strides;
    let n = crate::alloc::product("shape", &t.shape)?;
    let mut out = crate::alloc::with_capacity(n, || format!("an f64 copy of {:?}", t.shape))?;
    for b in 0..nb {
        for h in 0..nh {
            for l in 0..nl {
                let row = &src[b * sb + h * sh + l * sl..][..nd];
                out.extend(row.iter().map(|x| x.to_f64()));
            }
        }
    }
    Ok(out)
}

/// A problem's inputs gathered into row-major f64 host vectors (what the reference takes).
pub(crate) struct Gathered {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    pi_head: Option<Vec<f64>>,
    pi_key: Option<Vec<f64>>,
    nu: Option<Vec<f64>>,
    bias: Option<(Vec<f64>, [usize; 4])>,
    mask: Option<(Vec<bool>, [usize; 4])>,
}

/// A strided broadcast tensor gathered row-major over its own shape.
pub(crate) fn gather_broadcast<T: bytemuck::Pod, U>(
    t: &super::ScoreBias<'_, T>,
    f: impl Fn(T) -> U,
) -> Result<Vec<U>> {
    let src = t.data.host_slice();
    let [nb, nh, nl, nk] = t.shape;
    let n = crate::alloc::product("shape", &t.shape)?;
    let mut out = crate::alloc::with_capacity(n, || format!("a copy of {:?}", t.shape))?;
    for b in 0..nb {
        for h in 0..nh {
            for i in 0..nl {
                let at = t.offset(b, h, i, 0);
                out.extend(src[at..at + nk].iter().map(|&x| f(x)));
            }
        }
    }
    Ok(out)
}

/// f32 host values as f64.
pub(crate) fn host_f64(v: &View<'_, f32>) -> Vec<f64> {
    v.host_slice().iter().map(|&x| x as f64).collect()
}

impl Gathered {
    /// The inputs in f64; NaN or Inf in q, k or v is an error naming the tensor and the
    /// element's [b, h, l, x] index (the CPU has the values at hand; a GPU does not scan them).
    pub(crate) fn new<T: Element>(p: &Problem<'_, '_, T>) -> Result<Self> {
        let finite = |name: &str, t: &Tensor4<'_, T>| -> Result<Vec<f64>> {
            let v = gather(t)?;
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                let [_, h, l, d] = t.shape;
                let at = [i / (h * l * d), i / (l * d) % h, i / d % l, i % d];
                return Err(Error::invalid(name, format!("element {at:?} is {}", v[i])));
            }
            Ok(v)
        };
        if let Some(vl) = &p.precision.varlen {
            let dm = p.dims;
            super::check_cu_seqlens("cu_seqlens_q", vl.cu_q.host_slice(), dm.lq, vl.max_q)?;
            super::check_cu_seqlens("cu_seqlens_k", vl.cu_k.host_slice(), dm.lk, vl.max_k)?;
        }
        Ok(Gathered {
            q: finite("q", p.q)?,
            k: finite("k", p.k)?,
            v: finite("v", p.v)?,
            pi_head: p.precision.head.as_ref().map(host_f64),
            pi_key: p.precision.key.as_ref().map(host_f64),
            nu: p.precision.nu.as_ref().map(host_f64),
            bias: match &p.precision.bias {
                Some(b) => Some((gather_broadcast(b, |x: f32| x as f64)?, b.shape)),
                None => None,
            },
            mask: match &p.precision.mask {
                Some(m) => Some((gather_broadcast(m, |x: u8| x != 0)?, m.shape)),
                None => None,
            },
        })
    }

    /// The reference's view of them, with the problem's sizes and key lengths.
    pub(crate) fn inputs<'s, T: Element>(&'s self, p: &Problem<'_, 's, T>) -> RefInputs<'s> {
        let dm = p.dims;
        RefInputs {
            b: dm.b,
            hq: dm.hq,
            hkv: dm.hkv,
            lq: dm.lq,
            lk: dm.lk,
            d: dm.d,
            dv: dm.dv,
            q: &self.q,
            k: &self.k,
            v: &self.v,
            pi_head: self.pi_head.as_deref(),
            pi_key: self.pi_key.as_deref(),
            kv_len: p.kv_len.map(|l| l.host_slice()),
            nu_head: self.nu.as_deref(),
            bias: self.bias.as_ref().map(|(values, shape)| RefBroadcast {
                values,
                shape: *shape,
            }),
            mask: self.mask.as_ref().map(|(values, shape)| RefBroadcast {
                values,
                shape: *shape,
            }),
            varlen: p.precision.varlen.as_ref().map(|vl| RefVarlen {
                cu_q: vl.cu_q.host_slice(),
                cu_k: vl.cu_k.host_slice(),
            }),
        }
    }
}

/// A row-major BHLD f64 block written into a strided output tensor of the element type.
pub(crate) fn scatter<T: Element>(t: &mut Tensor4Mut<'_, T>, src: &[f64]) {
    let [nb, nh, nl, nd] = t.shape;
    let [sb, sh, sl] = t.strides;
    let dst = t.data.host_slice_mut();
    let mut row = 0;
    for b in 0..nb {
        for h in 0..nh {
            for l in 0..nl {
                let out = &mut dst[b * sb + h * sh + l * sl..][..nd];
                out.iter_mut()
                    .zip(&src[row * nd..][..nd])
                    .for_each(|(a, &c)| *a = T::from_f64(c));
                row += 1;
            }
        }
    }
}

pub(crate) fn forward_views<T: Element>(
    p: &Problem<'_, '_, T>,
    mut out: AttentionOutputs<'_, T>,
) -> Result<()> {
    let host = Gathered::new(p)?;
    // Everything is checked here, before the first write.
    let r = forward(&p.spec, &host.inputs(p))?;
    check_representable(&p.spec, &r)?;
    scatter(&mut out.o, &r.o);
    if let Some(lse) = out.lse.as_mut() {
        let dst = lse.host_slice_mut();
        dst.iter_mut().zip(&r.lse).for_each(|(a, &c)| *a = c as f32);
    }
    if let Some(e) = out.e.as_mut() {
        let dst = e.host_slice_mut();
        dst.iter_mut().zip(&r.e).for_each(|(a, &c)| *a = c as f32);
    }
    Ok(())
}

/// `Err` when a row's lse or e does not fit in f32 (scores that overflow: inputs or τ too
/// large), before anything is written; a fully masked row's lse of −∞ is not an overflow.
pub(crate) fn check_representable(spec: &AttentionSpec, r: &RefOutputs) -> Result<()> {
    let bad = |x: f64| x.is_nan() || (x as f32).is_infinite() && x != f64::NEG_INFINITY;
    let row = r.lse.iter().position(|&x| bad(x)).or_else(|| {
        r.e.iter()
            .position(|&x| x.is_nan() || (x as f32).is_infinite())
    });
    match row {
        None => Ok(()),
        Some(i) => Err(Error::invalid(
            if spec.scale.is_some() { "scale" } else { "q" },
            format!(
                "the scores of row {i} overflow f32 (lse = {}, e = {}): inputs or scale too large",
                r.lse[i] as f32,
                r.e.get(i).map_or(0.0, |&e| e as f32)
            ),
        )),
    }
}
