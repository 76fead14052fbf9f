//! The attention reference: f64 throughout, one (batch, query head) per rayon task, written to be
//! read next to the maths in the module docs of [`crate::attention`] and
//! tests/fixtures/ATTENTION-CONVENTIONS.md, not to be fast.

use rayon::prelude::*;

use super::{AttentionOutputs, AttentionSpec, Problem, Score, Tensor4, Tensor4Mut};
use crate::backend::View;
use crate::element::Element;
use crate::error::{Error, Result};

/// Inputs of [`forward`] on the host, every tensor row-major BHLD in f64.
#[derive(Clone, Copy, Debug)]
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

/// The visible keys `[lo, hi)` of query row `i` in batch `b` (empty when lo ≥ hi).
pub(crate) fn visible(
    spec: &AttentionSpec,
    inp: &RefInputs<'_>,
    b: usize,
    i: usize,
) -> (usize, usize) {
    let lk = inp.lk as i64;
    let diag = i as i64 + lk - inp.lq as i64; // i' (bottom-right aligned)
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
    let hi = hi.max(0) as usize;
    (lo.min(hi as i64) as usize, hi)
}

/// One score in natural units (the maths of [`crate::attention`]); `c` is the normaliser's D/2
/// (0: off).
pub(crate) fn score_value(
    score: Score,
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
        Score::StudentT(nu) => {
            let nu = nu as f64;
            -((nu + dim) / 2.0) * (tau * pi * d2 / nu).ln_1p()
        }
        Score::Laplace => -(tau * pi).sqrt() * d2.sqrt(),
    };
    if c != 0.0 { s + c * pi.ln() } else { s }
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
    let group = hq / hkv;
    let tau = spec.tau(d);
    // The normaliser's D/2 (0 when off; Dot has none).
    let c = if spec.normalizer && spec.score.is_distance() {
        d as f64 / 2.0
    } else {
        0.0
    };

    // One (o, lse, e) block per (b, h).
    let blocks: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = (0..nb * hq)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / hq, bh % hq);
            let hk = h / group;
            let pi_h = inp.pi_head.map_or(1.0, |p| p[h]);
            let kv0 = (b * hkv + hk) * lk; // first key row of this kv head
            let mut o = vec![0.0f64; lq * dv];
            let mut lse = vec![f64::NEG_INFINITY; lq];
            let mut e = vec![0.0f64; lq];
            let mut s = Vec::with_capacity(lk);
            let mut pd2 = Vec::with_capacity(lk);
            for i in 0..lq {
                let (lo, hi) = visible(spec, inp, b, i);
                if lo >= hi {
                    continue; // fully masked: o = 0, lse = −∞, e = 0
                }
                let qi = &inp.q[(bh * lq + i) * d..][..d];
                s.clear();
                pd2.clear();
                for j in lo..hi {
                    let kj = &inp.k[(kv0 + j) * d..][..d];
                    let pi = pi_h * inp.pi_key.map_or(1.0, |p| p[kv0 + j]);
                    let d2: f64 = qi
                        .iter()
                        .zip(kj)
                        .map(|(a, c)| {
                            let t = a - c;
                            t * t
                        })
                        .sum();
                    let x: f64 = qi.iter().zip(kj).map(|(a, c)| a * c).sum();
                    let sij = score_value(spec.score, tau, d as f64, c, x, d2, pi);
                    s.push(sij);
                    pd2.push(pi * d2);
                }
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                s.iter_mut().for_each(|x| *x = (*x - m).exp());
                let z: f64 = s.iter().sum();
                lse[i] = m + z.ln();
                let oi = &mut o[i * dv..][..dv];
                let mut ei = 0.0;
                for (jj, j) in (lo..hi).enumerate() {
                    let w = s[jj] / z;
                    let vj = &inp.v[(kv0 + j) * dv..][..dv];
                    oi.iter_mut().zip(vj).for_each(|(a, &c)| *a += w * c);
                    ei += w * pd2[jj];
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
        Ok(Gathered {
            q: finite("q", p.q)?,
            k: finite("k", p.k)?,
            v: finite("v", p.v)?,
            pi_head: p.precision.head.as_ref().map(host_f64),
            pi_key: p.precision.key.as_ref().map(host_f64),
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
