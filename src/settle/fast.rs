//! The fast CPU settling (`Device::cpu()`): f32 arithmetic, products through
//! `matrixmultiply::sgemm`, element-wise work in runtime-dispatched (AVX2 / AVX-512 / NEON) loops.
//!
//! Design (kernels/settle/NOTES.md, "CPU fast path (issue 24)"):
//! - The weights and biases are converted to f32 once per call (f16/bf16 exactly), the
//!   precisions expanded to one f32 row per layer (or `[batch, n_l]` per sample).
//! - The batch is cut into fixed tiles of [`TILE`] samples, independent of the thread count; each
//!   tile runs all T steps on its own (rayon over tiles). The early stop is per sample (the
//!   module docs of [`crate::settle`]): a stopped sample's row is frozen (no more updates; its
//!   trace repeats), exactly as the reference, and a tile whose samples have all stopped ends.
//! - Per step and layer: μ_l = f_l(x_{l−1}) W_lᵀ by sgemm on the tile (μ_1 only once: x₀ is
//!   clamped), ε_l = x_l − (μ_l + b_l), Π_l ε_l and the energy fused in one pass; the
//!   back-projection (Π_{l+1} ε_{l+1}) W_{l+1} by sgemm; g_l, the momentum and a compensated
//!   (Kahan) state update fused in one pass, so T steps do not accumulate T roundings of x
//!   (as the GPU kernels).
//! - Learning: ∂E/∂W_l = −(1/B) Σ_b (Π_l ε_l) f_l(x_{l−1})ᵀ by one sgemm per tile, accumulated
//!   into the output in tile order (rayon over layers), so the sums do not depend on the thread
//!   count; ∂b and ∂π summed in batch order.
//! - Validation is the reference's (same helpers, same order, same names), and the states are
//!   checked for divergence before any output is written (`Error::Diverged`, the reference's
//!   message).
//!
//! Nothing falls back to the reference: every option (activations, precision kinds, init, tol,
//! log_det, dtypes, any depth) runs here. `allow_tf32` changes nothing on the CPU.

// Layer numbers l = 1 … L index several per-layer arrays at once, as in the maths.
#![allow(clippy::needless_range_loop)]
// The polynomial coefficients are the published (Cephes) decimals; they round to the same f32.
#![allow(clippy::excessive_precision)]

use rayon::prelude::*;

use super::cpu::{check_precision, converged};
use super::{Activation, Gradients, Init, Precision, Problem, SettleOutputs};
use crate::alloc::zeroed;
use crate::backend::View;
use crate::backend::cpu::check_finite;
use crate::element::Element;
use crate::error::{Error, Result};

/// Samples per tile: fixed (results never depend on the thread count), small enough that a
/// tile's state of a few layers of a few hundred units stays in L2.
pub(crate) const TILE: usize = 64;

/// One layer l ≥ 1 in f32.
struct Layer32 {
    n: usize,
    n_in: usize,
    /// W_l `[n, n_in]`.
    w: Vec<f32>,
    /// b_l `[n]` (zeros without bias).
    b: Vec<f32>,
    f: Activation,
    /// Π_l: `[n]`, or `[batch, n]` when `per_sample`.
    pi: Vec<f32>,
    per_sample: bool,
    scalar: bool,
}

impl Layer32 {
    fn pi_of(&self, b: usize) -> &[f32] {
        if self.per_sample {
            &self.pi[b * self.n..(b + 1) * self.n]
        } else {
            &self.pi
        }
    }
}

simd_fn! {
/// Whether every value is finite (v · 0 is NaN exactly for NaN and ±Inf; sixteen lanes).
fn all_finite(v: &[f32]) -> bool {
    let mut acc = [0f32; 16];
    let chunks = v.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..16 {
            acc[k] += c[k] * 0.0;
        }
    }
    for (k, &x) in tail.iter().enumerate() {
        acc[k] += x * 0.0;
    }
    acc.iter().all(|a| *a == 0.0)
}
}

/// The reference's check (`Err` naming `name` and the first bad element), after a vectorised
/// pass that finds most inputs clean.
fn check_finite32(name: &str, v: &[f32]) -> Result<()> {
    if all_finite(v) {
        return Ok(());
    }
    check_finite(name, v.iter().map(|&x| x as f64))
}

/// The network in f32, checked as the reference checks it (same order, same names).
fn layers32<T: Element>(p: &Problem<'_, '_, T>) -> Result<Vec<Layer32>> {
    let widths = p.net.widths();
    let mut layers = Vec::with_capacity(p.net.depth());
    for (i, layer) in p.net.layers().iter().enumerate() {
        let (n, n_in) = (widths[i + 1], widths[i]);
        let src = layer.weight.host_slice();
        let mut w: Vec<f32> = zeroed(src.len(), || format!("layers[{i}].weight (f32 copy)"))?;
        w.iter_mut()
            .zip(src)
            .for_each(|(o, v)| *o = v.to_f64() as f32);
        let mut b: Vec<f32> = zeroed(n, || format!("layers[{i}].bias (f32 copy)"))?;
        if let Some(bias) = &layer.bias {
            b.iter_mut()
                .zip(bias.host_slice())
                .for_each(|(o, v)| *o = v.to_f64() as f32);
        }
        let pi: Vec<f32> = match &layer.precision {
            Precision::Scalar(s) => vec![*s; n],
            Precision::Diagonal(v) | Precision::PerSample(v) => {
                let src = v.host_slice();
                let mut pi = zeroed(src.len(), || format!("layers[{i}].precision (copy)"))?;
                pi.copy_from_slice(src);
                pi
            }
        };
        if p.spec.check_finite {
            check_finite32(&format!("layers[{i}].weight"), &w)?;
            check_finite32(&format!("layers[{i}].bias"), &b)?;
            let pi64: Vec<f64> = pi.iter().map(|&v| v as f64).collect();
            check_precision(&format!("layers[{i}].precision"), &pi64)?;
        }
        layers.push(Layer32 {
            n,
            n_in,
            w,
            b,
            f: layer.activation,
            pi,
            per_sample: matches!(layer.precision, Precision::PerSample(_)),
            scalar: matches!(layer.precision, Precision::Scalar(_)),
        });
    }
    Ok(layers)
}

// ---------------------------------------------------------------------------------------------
// Element-wise maths in f32 (no libm: polynomials, branch-free selects that keep NaN).

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// 1.5 · 2^23: adding and subtracting it rounds an f32 of magnitude < 2^22 to an integer.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// e^x in f32 (Cephes expf: x = n ln2 + r, |r| ≤ ½ ln2, a degree-7 polynomial; ~1 ulp),
/// clamped to [−87, 88] (so 2^n stays normal); NaN stays NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    let x = if x > 88.0 { 88.0 } else { x };
    let x = if x < -87.0 { -87.0 } else { x };
    let t = x.mul_add(LOG2E, ROUND_MAGIC);
    let n = t - ROUND_MAGIC;
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let p = 1.987_569_1e-4f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 5.000_000_1e-1);
    let y = p.mul_add(r * r, r) + 1.0;
    // t's low mantissa bits hold n (|n| ≤ 127 < 2^22): 2^n from integer operations only (a
    // float-to-int `as` saturates, which does not vectorise well).
    let scale = f32::from_bits(
        t.to_bits()
            .wrapping_sub(ROUND_MAGIC.to_bits())
            .wrapping_add(127)
            << 23,
    );
    y * scale
}

/// tanh in f32 (Cephes tanhf: an odd polynomial below 0.625, 1 − 2/(e^{2|x|} + 1) above).
#[inline(always)]
fn tanh_f32(x: f32) -> f32 {
    let ax = x.abs();
    let z = x * x;
    let poly = (-5.704_988_7e-3f32).mul_add(z, 2.063_908_9e-2);
    let poly = poly.mul_add(z, -5.373_971_6e-2);
    let poly = poly.mul_add(z, 1.333_144_2e-1);
    let poly = poly.mul_add(z, -3.333_328_2e-1);
    let small = (poly * z).mul_add(ax, ax);
    let e = exp_f32(2.0 * ax);
    let big = 1.0 - 2.0 / (e + 1.0);
    let y = if ax >= 0.625 { big } else { small };
    y.copysign(x)
}

/// erf in f32: a rational approximation on [−4, 4] (the one of Eigen and XLA; a few ulp,
/// measured ≤ 4.2e-7 absolute), ±1 beyond (within 1.6e-8 there).
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    let x = if x > 4.0 { 4.0 } else { x };
    let x = if x < -4.0 { -4.0 } else { x };
    let x2 = x * x;
    let p = -2.726_142_3e-10f32;
    let p = p.mul_add(x2, 2.770_681_4e-8);
    let p = p.mul_add(x2, -2.101_024e-6);
    let p = p.mul_add(x2, -5.692_506_4e-5);
    let p = p.mul_add(x2, -7.349_906_3e-4);
    let p = p.mul_add(x2, -2.954_6e-3);
    let p = p.mul_add(x2, -1.609_603_3e-2);
    let q = -1.456_607_2e-5f32;
    let q = q.mul_add(x2, -2.133_740_6e-4);
    let q = q.mul_add(x2, -1.682_827e-3);
    let q = q.mul_add(x2, -7.373_329_2e-3);
    let q = q.mul_add(x2, -1.426_473_9e-2);
    x * p / q
}

simd_fn! {
/// fx = f(x) and, when `df` is not empty, df = f′(x), for one activation over a slice.
fn activate(f: Activation, x: &[f32], fx: &mut [f32], df: &mut [f32]) {
    let fx = &mut fx[..x.len()];
    let with_df = !df.is_empty();
    match f {
        Activation::Identity => {
            fx.copy_from_slice(x);
            if with_df {
                df[..x.len()].fill(1.0);
            }
        }
        Activation::Relu => {
            for (o, &v) in fx.iter_mut().zip(x) {
                *o = if v > 0.0 { v } else { 0.0 };
            }
            if with_df {
                for (d, &v) in df[..x.len()].iter_mut().zip(x) {
                    *d = if v > 0.0 { 1.0 } else { 0.0 };
                }
            }
        }
        Activation::LeakyRelu(a) => {
            for (o, &v) in fx.iter_mut().zip(x) {
                *o = if v > 0.0 { v } else { a * v };
            }
            if with_df {
                for (d, &v) in df[..x.len()].iter_mut().zip(x) {
                    *d = if v > 0.0 { 1.0 } else { a };
                }
            }
        }
        Activation::Tanh => {
            if with_df {
                for ((o, d), &v) in fx.iter_mut().zip(&mut df[..x.len()]).zip(x) {
                    let t = tanh_f32(v);
                    *o = t;
                    *d = 1.0 - t * t;
                }
            } else {
                for (o, &v) in fx.iter_mut().zip(x) {
                    *o = tanh_f32(v);
                }
            }
        }
        Activation::Sigmoid => {
            if with_df {
                for ((o, d), &v) in fx.iter_mut().zip(&mut df[..x.len()]).zip(x) {
                    let s = 1.0 / (1.0 + exp_f32(-v));
                    *o = s;
                    *d = s * (1.0 - s);
                }
            } else {
                for (o, &v) in fx.iter_mut().zip(x) {
                    *o = 1.0 / (1.0 + exp_f32(-v));
                }
            }
        }
        Activation::Gelu => {
            const INV_SQRT_2PI: f32 = 0.398_942_3;
            if with_df {
                for ((o, d), &v) in fx.iter_mut().zip(&mut df[..x.len()]).zip(x) {
                    let phi = 0.5 * (1.0 + erf_f32(v * std::f32::consts::FRAC_1_SQRT_2));
                    *o = v * phi;
                    *d = phi + v * exp_f32(-0.5 * v * v) * INV_SQRT_2PI;
                }
            } else {
                for (o, &v) in fx.iter_mut().zip(x) {
                    let phi = 0.5 * (1.0 + erf_f32(v * std::f32::consts::FRAC_1_SQRT_2));
                    *o = v * phi;
                }
            }
        }
    }
}
}

simd_fn! {
/// One layer of a tile of samples (rows of width n): ε = x − (μ + b), pe = π ε, and
/// energy[r] += ½ Σ pe ε per row (sixteen partial sums folded in a fixed tree; a row narrower
/// than 16 summed in order). π's row r starts at
/// `r · pi_stride` (0: one row for all samples).
#[allow(clippy::too_many_arguments)]
fn errors_tile(
    n: usize,
    x: &[f32],
    mu: &[f32],
    b: &[f32],
    pi: &[f32],
    pi_stride: usize,
    eps: &mut [f32],
    pe: &mut [f32],
    energy: &mut [f32],
) {
    let b = &b[..n];
    for (r, en) in energy.iter_mut().enumerate() {
        let span = r * n..(r + 1) * n;
        let (x, mu, eps, pe) = (
            &x[span.clone()],
            &mu[span.clone()],
            &mut eps[span.clone()],
            &mut pe[span],
        );
        let pi = &pi[r * pi_stride..r * pi_stride + n];
        // One pass: ε, π ε and ½ Σ π ε² in sixteen partial sums (one vector), then folded in
        // a fixed tree; a row narrower than 16 sums in order instead (no tree over empty
        // lanes: the per-row fold was most of the time of a 10-wide output layer).
        let chunks = n / 16 * 16;
        let sum = if chunks == 0 {
            let mut acc = 0f32;
            for j in 0..n {
                let e = x[j] - (mu[j] + b[j]);
                let q = pi[j] * e;
                eps[j] = e;
                pe[j] = q;
                acc += q * e;
            }
            acc
        } else {
            let mut acc = [0f32; 16];
            for c in (0..chunks).step_by(16) {
                let (x, mu, b, pi) = (&x[c..c + 16], &mu[c..c + 16], &b[c..c + 16], &pi[c..c + 16]);
                let (eps, pe) = (&mut eps[c..c + 16], &mut pe[c..c + 16]);
                for k in 0..16 {
                    let e = x[k] - (mu[k] + b[k]);
                    let q = pi[k] * e;
                    eps[k] = e;
                    pe[k] = q;
                    acc[k] += q * e;
                }
            }
            for j in chunks..n {
                let e = x[j] - (mu[j] + b[j]);
                let q = pi[j] * e;
                eps[j] = e;
                pe[j] = q;
                acc[j - chunks] += q * e;
            }
            let mut w = 8;
            while w > 0 {
                for k in 0..w {
                    acc[k] += acc[k + w];
                }
                w /= 2;
            }
            acc[0]
        };
        *en += 0.5 * sum;
    }
}
}

simd_fn! {
/// One free layer of a tile (rows of width n, the rows marked active only):
/// g = pe − df ⊙ back (no second term when `back` is empty), v ← β v + g, x ← x − η v with
/// Kahan compensation c.
#[allow(clippy::too_many_arguments)]
fn update_tile(
    n: usize,
    active: &[bool],
    x: &mut [f32],
    c: &mut [f32],
    v: &mut [f32],
    pe: &[f32],
    df: &[f32],
    back: &[f32],
    beta: f32,
    eta: f32,
) {
    for (r, _) in active.iter().enumerate().filter(|(_, a)| **a) {
        let span = r * n..(r + 1) * n;
        let (x, c, v, pe) = (
            &mut x[span.clone()],
            &mut c[span.clone()],
            &mut v[span.clone()],
            &pe[span.clone()],
        );
        if back.is_empty() {
            for j in 0..n {
                let vj = beta * v[j] + pe[j];
                v[j] = vj;
                let y = -eta * vj - c[j];
                let t = x[j] + y;
                c[j] = (t - x[j]) - y;
                x[j] = t;
            }
        } else {
            let (df, back) = (&df[span.clone()], &back[span]);
            for j in 0..n {
                let vj = beta * v[j] + (pe[j] - df[j] * back[j]);
                v[j] = vj;
                let y = -eta * vj - c[j];
                let t = x[j] + y;
                c[j] = (t - x[j]) - y;
                x[j] = t;
            }
        }
    }
}
}

/// C `[m, n]` (row stride n) = alpha · A B + beta · C, A `[m, k]` with strides (rsa, csa), B
/// `[k, n]` with strides (rsb, csb).
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    rsa: usize,
    csa: usize,
    b: &[f32],
    rsb: usize,
    csb: usize,
    beta: f32,
    c: &mut [f32],
) {
    if m == 0 || n == 0 {
        return;
    }
    // The slices cover every element the strides reach.
    assert!(k == 0 || a.len() > (m - 1) * rsa + (k - 1) * csa);
    assert!(k == 0 || b.len() > (k - 1) * rsb + (n - 1) * csb);
    assert!(c.len() >= m * n);
    // Safety: the asserts above bound every index the strides reach; C is exclusive.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// One tile of samples, all T steps.

/// A tile's settled state (rows `b0 .. b0 + rows`).
struct Tile {
    rows: usize,
    /// x₀ … x_L, `[rows, n_l]`.
    x: Vec<Vec<f32>>,
    /// ε_l (index l − 1), `[rows, n_l]`.
    eps: Vec<Vec<f32>>,
    /// Π_l ε_l (index l − 1).
    pe: Vec<Vec<f32>>,
    /// f_l(x_{l−1}) (index l − 1), `[rows, n_{l−1}]`.
    fx: Vec<Vec<f32>>,
    /// E per sample at the start and after each step, `[rows, T + 1]`.
    trace: Vec<f32>,
    steps: Vec<u32>,
}

/// The problem's inputs as host rows.
struct Inputs<'a> {
    x0: &'a [f32],
    target: Option<&'a [f32]>,
    /// The given starts of the free layers (x₁ …), `[batch, n_l]` each; empty for feedforward.
    init: Vec<&'a [f32]>,
}

fn buf(len: usize, what: &str) -> Result<Vec<f32>> {
    zeroed(len, || format!("settle CPU scratch ({what})"))
}

/// μ_l (without bias) of the tile into `mu`, and f_l(x_{l−1}) into `fx` (f′ into `df` when
/// given non-empty).
fn forward(
    layer: &Layer32,
    rows: usize,
    x_in: &[f32],
    fx: &mut [f32],
    df: &mut [f32],
    mu: &mut [f32],
) {
    activate(layer.f, &x_in[..rows * layer.n_in], fx, df);
    gemm(
        rows, layer.n_in, layer.n, 1.0, fx, layer.n_in, 1, &layer.w, 1, layer.n_in, 0.0, mu,
    );
}

struct Scratch {
    /// μ_l without bias (index l − 1); μ_1 is computed once.
    mu: Vec<Vec<f32>>,
    /// f′_{l+1}(x_l) (index l − 1) for l = 1 … L − 1.
    df: Vec<Vec<f32>>,
    energy: Vec<f32>,
}

/// ε, Π ε and the energy of every row of the tile; `first` also computes μ_1.
/// `fresh`: layers 1 … fresh already hold this state's μ and f(x) (and f′), from the
/// feedforward start.
fn tile_errors(
    layers: &[Layer32],
    b0: usize,
    t: &mut Tile,
    s: &mut Scratch,
    first: bool,
    fresh: usize,
) {
    let rows = t.rows;
    s.energy[..rows].fill(0.0);
    for l in 1..=layers.len() {
        let layer = &layers[l - 1];
        if (l >= 2 || first) && l > fresh {
            let df: &mut [f32] = if l >= 2 { &mut s.df[l - 2] } else { &mut [] };
            forward(
                layer,
                rows,
                &t.x[l - 1],
                &mut t.fx[l - 1],
                df,
                &mut s.mu[l - 1],
            );
        }
        let n = layer.n;
        let (pi, stride) = if layer.per_sample {
            (&layer.pi[b0 * n..], n)
        } else {
            (&layer.pi[..], 0)
        };
        errors_tile(
            n,
            &t.x[l],
            &s.mu[l - 1],
            &layer.b,
            pi,
            stride,
            &mut t.eps[l - 1],
            &mut t.pe[l - 1],
            &mut s.energy[..rows],
        );
    }
}

fn settle_tile(
    layers: &[Layer32],
    p: &Problem<'_, '_, impl Element>,
    inp: &Inputs<'_>,
    b0: usize,
    rows: usize,
) -> Result<Tile> {
    let depth = layers.len();
    let steps = p.spec.steps as usize;
    let t1 = steps + 1;
    let top_free = if p.clamped { depth - 1 } else { depth };
    let widths = p.net.widths();
    let mut t = Tile {
        rows,
        x: Vec::with_capacity(depth + 1),
        eps: Vec::with_capacity(depth),
        pe: Vec::with_capacity(depth),
        fx: Vec::with_capacity(depth),
        trace: buf(rows * t1, "trace")?,
        steps: vec![p.spec.steps; rows],
    };
    for (l, &n) in widths.iter().enumerate() {
        let mut x = buf(rows * n, "x")?;
        let span = b0 * n..(b0 + rows) * n;
        if l == 0 {
            x.copy_from_slice(&inp.x0[span]);
        } else if let (true, Some(target)) = (l == depth && p.clamped, inp.target) {
            x.copy_from_slice(&target[span]);
        } else if !inp.init.is_empty() && l <= top_free {
            x.copy_from_slice(&inp.init[l - 1][span]);
        }
        t.x.push(x);
    }
    for l in 1..=depth {
        t.eps.push(buf(rows * widths[l], "eps")?);
        t.pe.push(buf(rows * widths[l], "pe")?);
        t.fx.push(buf(rows * widths[l - 1], "f(x)")?);
    }
    let mut s = Scratch {
        mu: (1..=depth)
            .map(|l| buf(rows * widths[l], "mu"))
            .collect::<Result<_>>()?,
        df: (1..depth)
            .map(|l| buf(rows * widths[l], "f'(x)"))
            .collect::<Result<_>>()?,
        energy: vec![0.0; rows],
    };
    let mut v: Vec<Vec<f32>> = (1..=top_free)
        .map(|l| buf(rows * widths[l], "velocity"))
        .collect::<Result<_>>()?;
    let mut comp: Vec<Vec<f32>> = (1..=top_free)
        .map(|l| buf(rows * widths[l], "compensation"))
        .collect::<Result<_>>()?;
    let max_n = widths.iter().copied().max().unwrap_or(0);
    let mut back = buf(rows * max_n, "back-projection")?;

    let fresh = if inp.init.is_empty() { top_free } else { 0 };
    if inp.init.is_empty() {
        // Feedforward start: x_l = μ_l, layer by layer (μ, f(x) and f′ kept for the first
        // errors).
        for l in 1..=top_free {
            let layer = &layers[l - 1];
            let (below, here) = t.x.split_at_mut(l);
            let df: &mut [f32] = if l >= 2 { &mut s.df[l - 2] } else { &mut [] };
            forward(
                layer,
                rows,
                &below[l - 1],
                &mut t.fx[l - 1],
                df,
                &mut s.mu[l - 1],
            );
            let n = layer.n;
            for r in 0..rows {
                for j in 0..n {
                    here[0][r * n + j] = s.mu[l - 1][r * n + j] + layer.b[j];
                }
            }
        }
    }
    tile_errors(layers, b0, &mut t, &mut s, true, fresh);
    let mut prev = vec![0f32; rows];
    let mut start = vec![0f32; rows];
    for r in 0..rows {
        t.trace[r * t1] = s.energy[r];
        prev[r] = s.energy[r];
        start[r] = s.energy[r];
    }
    let mut active = vec![true; rows];
    let (eta, beta, tol) = (p.spec.eta, p.spec.momentum, p.spec.tol as f64);
    for step in 1..=steps {
        for l in 1..=top_free {
            let n = widths[l];
            if l < depth {
                let above = &layers[l];
                gemm(
                    rows, above.n, n, 1.0, &t.pe[l], above.n, 1, &above.w, n, 1, 0.0, &mut back,
                );
            }
            let (df, bk): (&[f32], &[f32]) = if l < depth {
                (&s.df[l - 1], &back[..rows * n])
            } else {
                (&[], &[])
            };
            update_tile(
                n,
                &active,
                &mut t.x[l],
                &mut comp[l - 1],
                &mut v[l - 1],
                &t.pe[l - 1],
                df,
                bk,
                beta,
                eta,
            );
        }
        tile_errors(layers, b0, &mut t, &mut s, false, 0);
        let mut any = false;
        for r in 0..rows {
            if !active[r] {
                continue;
            }
            let e = s.energy[r];
            t.trace[r * t1 + step] = e;
            if converged(e as f64, prev[r] as f64, start[r] as f64, tol) {
                active[r] = false;
                t.steps[r] = step as u32;
                t.trace[r * t1 + step + 1..(r + 1) * t1].fill(e);
            } else {
                any = true;
            }
            prev[r] = e;
        }
        if !any {
            break;
        }
    }
    Ok(t)
}

/// −½ Σ_l ln|Π_l| of sample b (f64, as the reference).
fn log_det_term(layers: &[Layer32], b: usize) -> f64 {
    -0.5 * layers
        .iter()
        .map(|l| l.pi_of(b).iter().map(|&p| (p as f64).ln()).sum::<f64>())
        .sum::<f64>()
}

pub(super) fn run<T: Element>(
    p: &Problem<'_, '_, T>,
    x0: &View<'_, f32>,
    target: Option<&View<'_, f32>>,
    mut out: SettleOutputs<'_>,
    grads: Option<Gradients<'_>>,
) -> Result<()> {
    let widths = p.net.widths();
    let depth = p.net.depth();
    let check = p.spec.check_finite;
    let layers = layers32(p)?;
    let x0 = x0.host_slice();
    if check {
        check_finite32("x0", x0)?;
    }
    let target = target.map(|t| t.host_slice());
    if check && let Some(t) = target {
        check_finite32("target", t)?;
    }
    let given = p.spec.init == Init::FromOutputs;
    let top_free = if p.clamped { depth - 1 } else { depth };
    // The given starts are read from the outputs: copied (they are overwritten below).
    let mut starts: Vec<Vec<f32>> = Vec::new();
    if given {
        for l in 1..=top_free {
            let s = out.x[l - 1].as_view();
            let s = s.host_slice();
            if check {
                check_finite32(&format!("x[{}] (the start)", l - 1), s)?;
            }
            let mut c = zeroed(s.len(), || format!("x[{}] (the start, copy)", l - 1))?;
            c.copy_from_slice(s);
            starts.push(c);
        }
    }
    let inp = Inputs {
        x0,
        target,
        init: starts.iter().map(|v| v.as_slice()).collect(),
    };
    let batch = p.batch;
    let tiles = batch.div_ceil(TILE);
    let settled: Vec<Tile> = (0..tiles)
        .into_par_iter()
        .map(|i| {
            let b0 = i * TILE;
            settle_tile(&layers, p, &inp, b0, TILE.min(batch - b0))
        })
        .collect::<Result<_>>()?;
    let t1 = p.spec.steps as usize + 1;
    // The trace and energy as reported (F with the normaliser when asked), per sample.
    let uniform_log_det = if p.spec.log_det && !layers.iter().any(|l| l.per_sample) {
        Some(log_det_term(&layers, 0))
    } else {
        None
    };
    let reported = |b: usize, e: f32| -> f32 {
        if !p.spec.log_det {
            e
        } else {
            let c = uniform_log_det.unwrap_or_else(|| log_det_term(&layers, b));
            (e as f64 + c) as f32
        }
    };
    if check {
        diverged(p, &settled, &reported)?;
    }
    // Everything is checked: from here on the outputs are written.
    for (i, t) in settled.iter().enumerate() {
        let b0 = i * TILE;
        for l in 1..=depth {
            let n = widths[l];
            let span = b0 * n..(b0 + t.rows) * n;
            out.x[l - 1].host_slice_mut()[span.clone()].copy_from_slice(&t.x[l]);
            out.eps[l - 1].host_slice_mut()[span].copy_from_slice(&t.eps[l - 1]);
        }
        for r in 0..t.rows {
            let b = b0 + r;
            let row = &t.trace[r * t1..(r + 1) * t1];
            if let Some(e) = &mut out.energy {
                e.host_slice_mut()[b] = reported(b, row[t1 - 1]);
            }
            if let Some(tr) = &mut out.trace {
                let dst = &mut tr.host_slice_mut()[b * t1..(b + 1) * t1];
                if p.spec.log_det {
                    let c = uniform_log_det.unwrap_or_else(|| log_det_term(&layers, b));
                    dst.iter_mut()
                        .zip(row)
                        .for_each(|(o, &v)| *o = (v as f64 + c) as f32);
                } else {
                    dst.copy_from_slice(row);
                }
            }
        }
        if let Some(st) = &mut out.steps {
            st.host_slice_mut()[b0..b0 + t.rows].copy_from_slice(&t.steps);
        }
    }
    if let Some(g) = grads {
        gradients(&layers, batch, &settled, g);
    }
    Ok(())
}

/// `Err(Diverged)` naming the first sample whose settled state is not finite (energy, states or
/// errors), as the reference words it.
fn diverged<T: Element>(
    p: &Problem<'_, '_, T>,
    settled: &[Tile],
    reported: &dyn Fn(usize, f32) -> f32,
) -> Result<()> {
    let t1 = p.spec.steps as usize + 1;
    let depth = p.net.depth();
    let widths = p.net.widths();
    for (i, t) in settled.iter().enumerate() {
        for r in 0..t.rows {
            let b = i * TILE + r;
            let trace: Vec<f32> = t.trace[r * t1..(r + 1) * t1]
                .iter()
                .map(|&e| reported(b, e))
                .collect();
            let states_ok = (0..=depth).all(|l| {
                let n = widths[l];
                t.x[l][r * n..(r + 1) * n].iter().all(|v| v.is_finite())
                    && (l == 0
                        || t.eps[l - 1][r * n..(r + 1) * n]
                            .iter()
                            .all(|v| v.is_finite()))
            });
            if trace.iter().all(|v| v.is_finite()) && states_ok {
                continue;
            }
            let at = match trace.iter().position(|v| !v.is_finite()) {
                Some(0) => "at the start (the feedforward state)".to_string(),
                Some(s) => format!("at step {s} (energy {} there)", trace[s]),
                None => "in its states (the energy stayed finite in f32)".to_string(),
            };
            return Err(Error::Diverged(format!(
                "settling sample {b} diverged {at} with eta = {}, momentum = {}: lower eta; \
                 nothing was written",
                p.spec.eta, p.spec.momentum
            )));
        }
    }
    Ok(())
}

/// The batch-mean gradients at the settled states, written into `g`: ∂E/∂W_l by sgemm per tile
/// accumulated in tile order, ∂E/∂b_l and ∂F/∂Π_l summed in batch order (rayon over layers).
fn gradients(layers: &[Layer32], batch: usize, settled: &[Tile], g: Gradients<'_>) {
    let scale = -1.0 / batch as f32;
    let inv_b = 1.0 / batch as f32;
    let Gradients {
        weights,
        biases,
        precisions,
    } = g;
    let mut precisions: Vec<Option<_>> = precisions.into_iter().collect();
    precisions.resize_with(layers.len(), || None);
    weights
        .into_iter()
        .zip(biases)
        .zip(precisions)
        .enumerate()
        .collect::<Vec<_>>()
        .into_par_iter()
        .for_each(|(li, ((mut gw, mut gb), gp))| {
            let layer = &layers[li];
            let (n, n_in) = (layer.n, layer.n_in);
            let gw = gw.host_slice_mut();
            gw.fill(0.0);
            for t in settled {
                gemm(
                    n, t.rows, n_in, scale, &t.pe[li], 1, n, &t.fx[li], n_in, 1, 1.0, gw,
                );
            }
            let gb = gb.host_slice_mut();
            gb.fill(0.0);
            for t in settled {
                for r in 0..t.rows {
                    let pe = &t.pe[li][r * n..(r + 1) * n];
                    gb.iter_mut().zip(pe).for_each(|(o, &v)| *o += v);
                }
            }
            gb.iter_mut().for_each(|o| *o *= scale);
            let Some(mut gp) = gp else { return };
            let gp = gp.host_slice_mut();
            fn half_terms<'t>(
                layer: &'t Layer32,
                li: usize,
                inv_b: f32,
                b: usize,
                r: usize,
                t: &'t Tile,
            ) -> impl Iterator<Item = f32> + 't {
                let n = layer.n;
                let eps = &t.eps[li][r * n..(r + 1) * n];
                eps.iter()
                    .zip(layer.pi_of(b))
                    .map(move |(&e, &p)| 0.5 * (e * e - 1.0 / p) * inv_b)
            }
            if layer.per_sample {
                for (i, t) in settled.iter().enumerate() {
                    for r in 0..t.rows {
                        let b = i * TILE + r;
                        gp[b * n..(b + 1) * n]
                            .iter_mut()
                            .zip(half_terms(layer, li, inv_b, b, r, t))
                            .for_each(|(o, v)| *o = v);
                    }
                }
            } else if layer.scalar {
                // Per sample, then over the batch in order.
                let mut total = 0f32;
                for (i, t) in settled.iter().enumerate() {
                    for r in 0..t.rows {
                        total += half_terms(layer, li, inv_b, i * TILE + r, r, t).sum::<f32>();
                    }
                }
                gp[0] = total;
            } else {
                gp.fill(0.0);
                for (i, t) in settled.iter().enumerate() {
                    for r in 0..t.rows {
                        gp.iter_mut()
                            .zip(half_terms(layer, li, inv_b, i * TILE + r, r, t))
                            .for_each(|(o, v)| *o += v);
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elementwise_maths_is_f32_accurate() {
        let mut worst = [0f64; 4];
        for i in -20000..=20000 {
            let x = i as f32 * 1e-3;
            let xd = x as f64;
            let e = (exp_f32(x) as f64 - xd.exp()).abs() / xd.exp();
            let t = (tanh_f32(x) as f64 - xd.tanh()).abs() / xd.tanh().abs().max(1e-30);
            let s = (1.0 / (1.0 + exp_f32(-x)) as f64 - 1.0 / (1.0 + (-xd).exp())).abs();
            let r = (erf_f32(x) as f64 - libm::erf(xd)).abs();
            for (w, v) in worst
                .iter_mut()
                .zip([e, if x == 0.0 { 0.0 } else { t }, s, r])
            {
                *w = w.max(v);
            }
        }
        assert!(worst[0] < 3e-7, "exp rel err {:e}", worst[0]);
        assert!(worst[1] < 3e-7, "tanh rel err {:e}", worst[1]);
        assert!(worst[2] < 2e-7, "sigmoid abs err {:e}", worst[2]);
        assert!(worst[3] < 5e-7, "erf abs err {:e}", worst[3]);
        assert!(tanh_f32(f32::NAN).is_nan() && exp_f32(f32::NAN).is_nan());
        assert_eq!(tanh_f32(100.0), 1.0);
        assert_eq!(tanh_f32(-100.0), -1.0);
    }
}
