//! f32 building blocks of the fast CPU VMP: polynomial exp and ln (Cephes-style range
//! reduction, no libm, no branches), and the small slice kernels the per-agent loops are made
//! of. Everything here is `#[inline(always)]` so that it is compiled into the multiversioned
//! per-chunk workers of [`super::fast`] (AVX-512 / AVX2+FMA / NEON clones chosen at run time).

/// pymdp's clipping floor (the float64 epsilon), as f32 (a normal f32: 2.220446e-16).
pub(super) const EPS32: f32 = f64::EPSILON as f32;

/// e^x for x ≤ 88 (the callers pass x ≤ 0 or logs of probabilities); x below −87.3 gives
/// ≈ 1e-38 instead of a denormal or 0. Cephes `expf`: x = n ln2 + r, |r| ≤ ln2/2, degree-6
/// polynomial, 2^n from the exponent bits. Relative error ≈ 1–2 ulp.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let x = x.clamp(-87.3, 88.3);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let r2 = r * r;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r2 + r + 1.0;
    e * f32::from_bits(((ni + 127) as u32) << 23)
}

/// ln max(x, eps) for finite x (pymdp's `log_stable` in f32): Cephes `logf`, x = 2^e · m with
/// m in [√½, √2), degree-8 polynomial in m − 1. Relative error ≈ 1–2 ulp.
#[inline(always)]
pub(super) fn ln_clip(x: f32) -> f32 {
    let x = x.max(EPS32);
    let bits = x.to_bits();
    // m in [0.5, 1): exponent bits of 0.5.
    let mut e = ((bits >> 23) as i32 - 126) as f32;
    let m = f32::from_bits((bits & 0x007F_FFFF) | 0x3F00_0000);
    let small = m < std::f32::consts::FRAC_1_SQRT_2;
    e -= if small { 1.0 } else { 0.0 };
    let m = if small { m + m } else { m } - 1.0;
    let z = m * m;
    let p = 7.037_683_6e-2_f32;
    let p = p * m - 1.151_461e-1;
    let p = p * m + 1.167_699_9e-1;
    let p = p * m - 1.242_014_1e-1;
    let p = p * m + 1.424_932_3e-1;
    let p = p * m - 1.666_805_8e-1;
    let p = p * m + 2.000_071_5e-1;
    let p = p * m - 2.499_999_4e-1;
    let p = p * m + 3.333_333e-1;
    let y = p * m * z - 0.5 * z + e * -2.121_944_4e-4;
    m + y + e * 0.693_359_4
}

/// Σ a·b in index order.
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Four independent partial sums (fixed order: the result does not depend on threads).
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let chunks = n / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] = a[c * 8 + l].mul_add(b[c * 8 + l], acc[l]);
        }
    }
    let mut tail = 0.0;
    for i in chunks * 8..n {
        tail = a[i].mul_add(b[i], tail);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// y += α x.
#[inline(always)]
pub(super) fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = alpha.mul_add(x, *y);
    }
}

/// Σ x ln max(x, eps) (0 ln 0 = 0: x = 0 multiplies a finite log).
#[inline(always)]
pub(super) fn neg_entropy(x: &[f32]) -> f32 {
    let mut acc = 0.0;
    for &v in x {
        acc = v.mul_add(ln_clip(v), acc);
    }
    acc
}

/// x ← softmax(x) = e^(x − max x) / Σ e^(x − max x).
#[inline(always)]
pub(super) fn softmax_in_place(x: &mut [f32]) {
    let mut max = f32::NEG_INFINITY;
    for &v in x.iter() {
        max = max.max(v);
    }
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = exp(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `w[..Π sizes]` = the outer product of `qs` (the first vector varies slowest), built in
/// place; returns its length.
#[inline(always)]
pub(super) fn outer_into<'q>(w: &mut [f32], qs: impl Iterator<Item = &'q [f32]>) -> usize {
    w[0] = 1.0;
    let mut len = 1;
    for q in qs {
        let s = q.len();
        // Backwards, so w[i] is read before block i (at i·s ≥ i) overwrites it.
        for i in (0..len).rev() {
            let wi = w[i];
            for (o, &qv) in w[i * s..(i + 1) * s].iter_mut().zip(q) {
                *o = wi * qv;
            }
        }
        len *= s;
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_ln_are_accurate() {
        let mut worst_exp = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            worst_exp = worst_exp.max(((exp(x) as f64 - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst_exp < 3e-7, "exp: {worst_exp:e}");
        let mut worst_ln = 0.0f64;
        let mut v = 1e-15f32;
        while v < 1e6 {
            let want = (v as f64).ln();
            worst_ln = worst_ln.max((ln_clip(v) as f64 - want).abs() / want.abs().max(1.0));
            v *= 1.0137;
        }
        assert!(worst_ln < 3e-7, "ln: {worst_ln:e}");
        assert_eq!(ln_clip(0.0), ln_clip(EPS32));
        assert!((ln_clip(0.0) as f64 - f64::EPSILON.ln()).abs() < 1e-5);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1e30) >= 0.0 && exp(-1e30) < 1e-37);
    }
}
