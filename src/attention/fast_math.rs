//! Branch-free f32 exp and ln (Cephes-style range reduction and minimax polynomials, ~1-2 ulp)
//! and fixed-order lane reductions, written so the loops that call them autovectorise; every
//! caller is compiled per target with `multiversion`, these are `#[inline(always)]` so they take
//! the caller's target features. Polynomials and dot products use `mul_add`: one FMA instead of
//! a multiply and an add (Rust never contracts them itself; the exp's separate operations were
//! ~half of the Dot forward's element-wise time), and the same bits on every target (an FMA is
//! exactly rounded everywhere; every target of `simd_fn!` has one in hardware).

/// e^x in f32: exact 0 below −87 (and for −∞), saturating near 88.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer (nearest even)
    let xc = x.clamp(-87.0, 88.0);
    let n = xc.mul_add(LOG2E, MAGIC) - MAGIC;
    let r = n.mul_add(-C2, n.mul_add(-C1, xc));
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let y = (p * r).mul_add(r, r) + 1.0;
    // 2^n without a float-to-int conversion (which would not vectorise): n + 127 + 2^23 holds
    // the integer n + 127 ∈ [1, 254] in its low mantissa bits; shifted into the exponent field.
    let scale = f32::from_bits((n + 8_388_735.0).to_bits() << 23);
    let v = y * scale;
    if x < -87.0 { 0.0 } else { v }
}

/// ln x in f32 for finite x > 0 (normal numbers; the callers pass 1 + u, u ≥ 0).
#[inline(always)]
pub(crate) fn ln(x: f32) -> f32 {
    const SQRTHF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 126;
    // Mantissa in [0.5, 1).
    let m0 = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    let small = m0 < SQRTHF;
    e -= small as i32;
    let m = if small { m0 + m0 - 1.0 } else { m0 - 1.0 };
    let ef = e as f32;
    let z = m * m;
    let mut y = 7.037_683_6e-2f32;
    y = y.mul_add(m, -1.151_461e-1);
    y = y.mul_add(m, 1.167_699_9e-1);
    y = y.mul_add(m, -1.242_014_1e-1);
    y = y.mul_add(m, 1.424_932_3e-1);
    y = y.mul_add(m, -1.666_805_8e-1);
    y = y.mul_add(m, 2.000_071_4e-1);
    y = y.mul_add(m, -2.499_999_4e-1);
    y = y.mul_add(m, 0.333_333_3);
    y = y * m * z;
    y = ef.mul_add(-2.121_944_4e-4, y);
    y = z.mul_add(-0.5, y);
    let r = m + y;
    ef.mul_add(0.693_359_4, r)
}

/// Σ x in a fixed order (16 lanes, then the lanes in order, then the tail): vectorisable and the
/// same bits on every target.
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..16 {
            acc[l] += c[l];
        }
    }
    let mut s = 0.0f32;
    for a in acc {
        s += a;
    }
    for &t in tail {
        s += t;
    }
    s
}

/// Σ x·y in the order of [`sum`].
#[inline(always)]
pub(crate) fn dot(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let mut acc = [0.0f32; 16];
    let cx = x.chunks_exact(16);
    let cy = y.chunks_exact(16);
    let (tx, ty) = (cx.remainder(), cy.remainder());
    for (a, b) in cx.zip(cy) {
        for l in 0..16 {
            acc[l] = a[l].mul_add(b[l], acc[l]);
        }
    }
    let mut s = 0.0f32;
    for a in acc {
        s += a;
    }
    for (a, b) in tx.iter().zip(ty) {
        s = a.mul_add(*b, s);
    }
    s
}

/// max x (−∞ for an empty slice), 16 lanes.
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..16 {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &a in acc.iter().chain(tail) {
        m = if a > m { a } else { m };
    }
    m
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_ln_accuracy() {
        let mut worst_e = 0.0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let r = (x as f64).exp();
            let e = ((super::exp(x) as f64 - r) / r).abs();
            worst_e = worst_e.max(e);
            x += 0.01731;
        }
        assert!(worst_e < 3e-7, "exp rel err {worst_e}");
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(-100.0), 0.0);
        let mut worst_l = 0.0f64;
        let mut x = 1.0f32;
        while x < 1e30 {
            let r = (x as f64).ln();
            let e = (super::ln(x) as f64 - r).abs() / r.abs().max(1.0);
            worst_l = worst_l.max(e);
            x *= 1.0137;
        }
        assert!(worst_l < 3e-7, "ln err {worst_l}");
        assert_eq!(super::ln(1.0), 0.0);
    }
}
