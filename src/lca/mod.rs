//! LCA sparse coding: the locally competitive algorithm of Rozell et al. (2008), a leaky
//! integrator whose thresholded state settles on a sparse code of the input.
//!
//! For a dictionary Φ `[n, m]` with unit-norm columns, a sparsity weight λ > 0 and a step
//! η = dt/τ ∈ (0, 1], each sample x `[n]` of a batch is coded by T steps of
//!
//! ```text
//! b = Φᵀx,   G = ΦᵀΦ − I,   u₀ = 0 (or a given state)
//! u ← u + η (b − u − G a),   a = θ_λ(u)
//! ```
//!
//! Only active units (a_k ≠ 0) inhibit the others, so G a needs only the columns of G for the
//! active units (the CPU reference skips the rest). The threshold θ_λ ([`Threshold`]):
//!
//! ```text
//! Soft         θ(u) = sign(u) max(|u| − λ, 0)
//! SoftNonNeg   θ(u) = max(u − λ, 0)
//! Hard         θ(u) = u · [|u| > λ]
//! HardNonNeg   θ(u) = u · [u > λ]
//! ```
//!
//! With the soft threshold the fixed point is the LASSO minimiser of the energy
//! ½‖x − Φa‖² + λ‖a‖₁ (the non-negative LASSO with `SoftNonNeg`). With a trace the energy and the
//! number of nonzero a_k come back for every sample and step ([`LcaOutputs`]).
//!
//! Dictionary learning ([`Dictionary::learn`]) takes one gradient step on the reconstruction
//! error from the codes of a batch, then puts Φ back on the unit sphere:
//!
//! ```text
//! Φ ← Φ + (lr/B) Σ_b (x_b − Φ a_b) a_bᵀ,   φ_k ← φ_k / ‖φ_k‖ (every column of nonzero norm)
//! ```
//!
//! CPU backends: a dictionary made on `Device::reference()` keeps Φ and G in f64 and runs the
//! f64 reference (the oracle); one made on `Device::cpu()` keeps them in f32 and runs the fast
//! path (f32 accumulation, sgemm for b = Φᵀx, G and the dense steps, gathered G rows for sparse
//! codes, rayon over fixed tiles of samples; see `src/lca/fast.rs`). No option of the fast path
//! falls back to the reference.
//!
//! A [`Dictionary`] holds Φ and G on one device (G is computed once, and again after each
//! learning step), [`Dictionary::solve`] codes a batch, [`Dictionary::learn`] takes one
//! dictionary-learning step.
//!
//! ```
//! use fep_kernels::{Device, View, lca::{Dictionary, LcaSpec, Threshold}};
//! // Two unit-norm atoms in R²; code x = (3, 0) with λ = 1.
//! let dev = Device::best();
//! let phi = dev.upload(&[1.0f32, 0.0, 0.0, 1.0])?;
//! let dict = Dictionary::new(&phi.view(), 2, 2, Default::default())?;
//! let x = dev.upload(&[3.0f32, 0.0])?;
//! let spec = LcaSpec::new(1.0).steps(200).eta(0.2).threshold(Threshold::Soft);
//! let out = dict.solve(&spec, &x.view(), None)?;
//! let a = out.a.to_vec()?;
//! assert!((a[0] - 2.0).abs() < 1e-4 && a[1] == 0.0); // soft threshold: 3 − λ
//! # Ok::<(), fep_kernels::Error>(())
//! ```
//!
//! Early stop is per sample: a sample stops at the first step whose max |Δu| < `tol` (with
//! [`TolMode::Relative`]: < `tol` · max |b|, b = Φᵀx of that sample), and its trace repeats its
//! last values; the batch is done when every sample is. So a sample's code never depends on the
//! other samples in its batch. The rule is the same on every backend.
//!
//! Step size: by default ([`LcaSpec::AUTO_ETA`]) η = 1/λmax(ΦᵀΦ), with λmax computed once per
//! dictionary by power iteration ([`Dictionary::lambda_max`]). Within an active set the
//! iteration is linear with eigenvalues 1 − η λᵢ(Φ_AᵀΦ_A) ∈ [0, 1] at that η (Cauchy
//! interlacing: λᵢ ≤ λmax), so it converges without oscillating; η = 1 (ISTA with step 1)
//! diverges as soon as some λᵢ > 2.

mod cpu;
mod fast;
#[cfg(fep_gpu)]
mod gpu;

use crate::alloc::product;
use crate::backend::{Device, DeviceBuffer, Stream, View, ViewMut};
use crate::element::{DType, Element};
use crate::error::{Error, Result};
use crate::tensor::{check_len, check_no_overlap, same_device};

/// The threshold function θ_λ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(i32)]
pub enum Threshold {
    /// sign(u)·max(|u| − λ, 0): the LASSO.
    #[default]
    Soft = 0,
    /// max(u − λ, 0): the non-negative LASSO.
    SoftNonNeg = 1,
    /// u·\[|u| > λ\].
    Hard = 2,
    /// u·\[u > λ\].
    HardNonNeg = 3,
}

impl Threshold {
    /// All four, for tests and benches.
    pub const ALL: [Threshold; 4] = [
        Threshold::Soft,
        Threshold::SoftNonNeg,
        Threshold::Hard,
        Threshold::HardNonNeg,
    ];

    /// From the C ABI code (`FEP_LCA_*`).
    pub fn from_code(code: i32) -> Result<Threshold> {
        Threshold::ALL
            .into_iter()
            .find(|t| *t as i32 == code)
            .ok_or_else(|| {
                Error::invalid(
                    "threshold",
                    format!("{code} is not one of FEP_LCA_SOFT..FEP_LCA_HARD_NONNEG (0..3)"),
                )
            })
    }

    /// θ_λ(u), in f64 (the reference).
    pub fn apply(self, u: f64, lambda: f64) -> f64 {
        match self {
            Threshold::Soft => u.signum() * (u.abs() - lambda).max(0.0),
            Threshold::SoftNonNeg => (u - lambda).max(0.0),
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
}

/// How the early-stop tolerance of an [`LcaSpec`] is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(i32)]
pub enum TolMode {
    /// Stop a sample when max_j |Δu_j| < tol (in the units of u, i.e. of the input).
    #[default]
    Absolute = 0,
    /// Stop a sample when max_j |Δu_j| < tol · max_j |b_j|, b = Φᵀx of that sample: relative to
    /// the input's scale, so x and c·x (with λ scaled by c too) stop at the same step. A sample
    /// whose b is all zero stops at the first step where Δu is exactly 0.
    Relative = 1,
}

impl TolMode {
    /// From the C ABI code (`FEP_LCA_TOL_*`).
    pub fn from_code(code: i32) -> Result<TolMode> {
        match code {
            0 => Ok(TolMode::Absolute),
            1 => Ok(TolMode::Relative),
            _ => Err(Error::invalid(
                "tol_mode",
                format!("{code} is not FEP_LCA_TOL_ABSOLUTE (0) or FEP_LCA_TOL_RELATIVE (1)"),
            )),
        }
    }
}

/// What to compute: threshold, λ, η, T, tolerance, trace.
///
/// η: `eta` = [`LcaSpec::AUTO_ETA`] (0, the default of [`LcaSpec::new`]) takes η = 1/λmax(ΦᵀΦ)
/// of the dictionary it is solved against ([`Dictionary::auto_eta`]), the largest step for
/// which the linearised iteration contracts on every active set with a margin of 2; any value
/// in (0, 1] is used as given.
///
/// Precision: every backend computes LCA in accurate f32 (plain FMA, f32 accumulation; the
/// reference in f64). `allow_tf32` is a permission in the sense of PyTorch's `allow_tf32`, not
/// a request: today no LCA kernel uses tensor cores, so it changes nothing; it is reserved so
/// that a future TF32 tensor-core step can be opted into without an API change.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LcaSpec {
    /// θ.
    pub threshold: Threshold,
    /// λ > 0.
    pub lambda: f32,
    /// η = dt/τ ∈ (0, 1], or [`LcaSpec::AUTO_ETA`] (0) for 1/λmax(ΦᵀΦ).
    pub eta: f32,
    /// T ≥ 1: the most steps.
    pub steps: u32,
    /// Stop a sample when max |Δu| < tol (see `tol_mode`); 0 runs all T steps.
    pub tol: f32,
    /// Whether `tol` is absolute or relative to the sample's max |Φᵀx|.
    pub tol_mode: TolMode,
    /// Permission to use TF32 tensor cores for f32 products (reserved: no LCA kernel uses
    /// them, so today this changes nothing; results are accurate f32 either way).
    pub allow_tf32: bool,
    /// Record the energy and active count per sample per step.
    pub trace: bool,
    /// Check x and u₀ for NaN/Inf before launching. On a GPU this reads back one float per
    /// sample, which waits for the stream; turn it off for a fully asynchronous launch.
    pub check_finite: bool,
}

impl LcaSpec {
    /// `eta` value meaning η = 1/λmax(ΦᵀΦ) of the dictionary (see [`Dictionary::auto_eta`]).
    pub const AUTO_ETA: f32 = 0.0;

    /// λ as given; η automatic (1/λmax), T = 100, tol = 0 (absolute), soft threshold, no
    /// trace, no TF32, inputs checked.
    pub fn new(lambda: f32) -> Self {
        LcaSpec {
            threshold: Threshold::Soft,
            lambda,
            eta: Self::AUTO_ETA,
            steps: 100,
            tol: 0.0,
            tol_mode: TolMode::Absolute,
            allow_tf32: false,
            trace: false,
            check_finite: true,
        }
    }
    /// Sets θ.
    pub fn threshold(mut self, t: Threshold) -> Self {
        self.threshold = t;
        self
    }
    /// Sets η ∈ (0, 1]; [`LcaSpec::AUTO_ETA`] (0) selects 1/λmax.
    pub fn eta(mut self, eta: f32) -> Self {
        self.eta = eta;
        self
    }
    /// η = 1/λmax(ΦᵀΦ) of the dictionary solved against (the default).
    pub fn auto_eta(mut self) -> Self {
        self.eta = Self::AUTO_ETA;
        self
    }
    /// Sets T.
    pub fn steps(mut self, steps: u32) -> Self {
        self.steps = steps;
        self
    }
    /// Sets an absolute early-stop tolerance: stop a sample when max |Δu| < tol.
    pub fn tol(mut self, tol: f32) -> Self {
        self.tol = tol;
        self.tol_mode = TolMode::Absolute;
        self
    }
    /// Sets a relative early-stop tolerance: stop a sample when max |Δu| < tol · max |Φᵀx|.
    pub fn relative_tol(mut self, tol: f32) -> Self {
        self.tol = tol;
        self.tol_mode = TolMode::Relative;
        self
    }
    /// Allows (does not require) TF32 tensor cores for f32 products; reserved, no effect today.
    pub fn allow_tf32(mut self, on: bool) -> Self {
        self.allow_tf32 = on;
        self
    }
    /// Turns the per-step trace on or off.
    pub fn trace(mut self, on: bool) -> Self {
        self.trace = on;
        self
    }
    /// Turns the finiteness check of the inputs on or off.
    pub fn check_finite(mut self, on: bool) -> Self {
        self.check_finite = on;
        self
    }

    fn validate(&self) -> Result<()> {
        if !(self.lambda.is_finite() && self.lambda > 0.0) {
            return Err(Error::invalid(
                "lambda",
                format!("must be finite and > 0, got {}", self.lambda),
            ));
        }
        if !(self.eta == Self::AUTO_ETA
            || (self.eta.is_finite() && self.eta > 0.0 && self.eta <= 1.0))
        {
            return Err(Error::invalid(
                "eta",
                format!(
                    "must be in (0, 1], or 0 for the automatic 1/lambda_max, got {}",
                    self.eta
                ),
            ));
        }
        if self.steps == 0 || self.steps > i32::MAX as u32 {
            return Err(Error::invalid(
                "steps",
                format!("must be in 1..=2^31-1, got {}", self.steps),
            ));
        }
        if !(self.tol.is_finite() && self.tol >= 0.0) {
            return Err(Error::invalid(
                "tol",
                format!("must be finite and >= 0, got {}", self.tol),
            ));
        }
        Ok(())
    }
}

/// Power iteration for λmax(ΦᵀΦ): at most this many products.
pub const POWER_ITERS: usize = 1000;
/// Power iteration stops when the Rayleigh quotient changes by less than this, relatively.
pub const POWER_TOL: f64 = 1e-9;

/// λmax of the symmetric positive semi-definite m x m operator `apply` (w = A v), by power
/// iteration in f64 from a fixed start vector (v_j = 1 + ½ sin(0.7 j + 0.3), normalised):
/// at most [`POWER_ITERS`] products, stopping when the Rayleigh quotient vᵀAv changes by less
/// than [`POWER_TOL`] relatively. The Rayleigh quotient never exceeds λmax; it approaches it
/// from below (error ∝ (λ₂/λ₁)^2k).
fn power_iteration(m: usize, apply: impl Fn(&[f64], &mut [f64])) -> Result<f64> {
    let what = || format!("the power iteration on [{m}, {m}]");
    let mut v = crate::alloc::with_capacity::<f64>(m, what)?;
    v.extend((0..m).map(|j| 1.0 + 0.5 * (0.7 * j as f64 + 0.3).sin()));
    let mut w = crate::alloc::zeroed::<f64>(m, what)?;
    let normalise = |v: &mut [f64]| {
        let nrm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if nrm > 0.0 && nrm.is_finite() {
            v.iter_mut().for_each(|x| *x /= nrm);
        }
        nrm
    };
    normalise(&mut v);
    let mut rho = 0.0f64;
    for _ in 0..POWER_ITERS {
        apply(&v, &mut w);
        let next: f64 = v.iter().zip(&w).map(|(a, b)| a * b).sum();
        std::mem::swap(&mut v, &mut w);
        let nrm = normalise(&mut v);
        if !next.is_finite() {
            return Err(Error::invalid(
                "phi",
                "lambda_max(PhiT Phi) is not finite (the dictionary overflows f64)",
            ));
        }
        let done = (next - rho).abs() <= POWER_TOL * next.abs() || nrm == 0.0;
        rho = next;
        if done {
            break;
        }
    }
    Ok(rho.max(0.0))
}

/// How a [`Dictionary`] checks Φ.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DictionaryOptions {
    /// Reject columns whose norm differs from 1 by more than the input type allows
    /// (1e-4 plus four units of roundoff of the dtype).
    pub check_unit_norm: bool,
}

impl Default for DictionaryOptions {
    fn default() -> Self {
        DictionaryOptions {
            check_unit_norm: true,
        }
    }
}

/// Where the outputs of [`Dictionary::solve_into`] go. `u` and `a` are `[batch, m]`; `energy`
/// and `active` are `[batch, steps]`; `steps` is `[batch]`. All on the dictionary's device.
pub struct LcaOutputs<'a> {
    /// u after the last step.
    pub u: ViewMut<'a, f32>,
    /// a = θ(u).
    pub a: ViewMut<'a, f32>,
    /// ½‖x − Φa‖² + λ‖a‖₁ after each step.
    pub energy: Option<ViewMut<'a, f32>>,
    /// Number of nonzero a after each step.
    pub active: Option<ViewMut<'a, u32>>,
    /// Steps each sample ran (T unless it stopped early).
    pub steps: Option<ViewMut<'a, u32>>,
}

/// The outputs of [`Dictionary::solve`], on the dictionary's device.
#[derive(Debug)]
pub struct LcaResult {
    /// u `[batch, m]`.
    pub u: DeviceBuffer<f32>,
    /// a = θ(u) `[batch, m]`.
    pub a: DeviceBuffer<f32>,
    /// Energy `[batch, steps]` when the spec asked for a trace.
    pub energy: Option<DeviceBuffer<f32>>,
    /// Active count `[batch, steps]` when the spec asked for a trace.
    pub active: Option<DeviceBuffer<u32>>,
    /// Steps run per sample `[batch]`.
    pub steps: DeviceBuffer<u32>,
}

pub(crate) enum Store {
    /// The reference (`Device::reference()`) keeps Φ and G in f64.
    Cpu { phi: Vec<f64>, gram: Vec<f64> },
    /// The fast CPU path (`Device::cpu()`) keeps Φ and G in f32 (see `fast`).
    Fast { phi: Vec<f32>, gram: Vec<f32> },
    #[cfg(fep_gpu)]
    Gpu {
        phi: DeviceBuffer<f32>,
        gram: DeviceBuffer<f32>,
    },
}

/// A prepared dictionary: Φ `[n, m]` (f32 on a GPU and on `Device::cpu()`, f64 on
/// `Device::reference()`) and G = ΦᵀΦ − I, on one
/// device. G is computed when the dictionary is made and after each learning step.
pub struct Dictionary {
    device: Device,
    n: usize,
    m: usize,
    store: Store,
    /// λmax(ΦᵀΦ), computed on first use and reset by a learning step.
    lambda_max: std::sync::OnceLock<f64>,
}

impl std::fmt::Debug for Dictionary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Dictionary[{} x {}] on {:?}",
            self.n, self.m, self.device
        )
    }
}

/// w = (G + I) v = ΦᵀΦ v from the cached Gram matrix G = ΦᵀΦ − I.
fn gram_apply(gram: &[f64], m: usize, v: &[f64], w: &mut [f64]) {
    use rayon::prelude::*;
    w.par_iter_mut().enumerate().for_each(|(i, wi)| {
        let row = &gram[i * m..(i + 1) * m];
        *wi = row.iter().zip(v).map(|(g, x)| g * x).sum::<f64>() + v[i];
    });
}

/// w = Φᵀ(Φ v) from Φ `[n, m]`.
fn phi_t_phi_apply(phi: &[f64], n: usize, m: usize, v: &[f64], w: &mut [f64]) {
    use rayon::prelude::*;
    let t: Vec<f64> = (0..n)
        .into_par_iter()
        .map(|i| {
            phi[i * m..(i + 1) * m]
                .iter()
                .zip(v)
                .map(|(p, x)| p * x)
                .sum()
        })
        .collect();
    w.par_iter_mut().enumerate().for_each(|(j, wj)| {
        *wj = (0..n).map(|i| phi[i * m + j] * t[i]).sum();
    });
}

/// The largest |‖φ‖ − 1| accepted for a column given in `dtype`.
fn unit_norm_tolerance(dtype: DType) -> f64 {
    1e-4 + 4.0 * dtype.unit_roundoff()
}

/// Checks the column norms of a new or learned dictionary.
fn check_norms(norms: &[f64], dtype: DType, check_unit: bool) -> Result<()> {
    let tol = unit_norm_tolerance(dtype);
    for (j, &nrm) in norms.iter().enumerate() {
        if !nrm.is_finite() {
            return Err(Error::invalid(
                "phi",
                format!("column {j} holds NaN or Inf"),
            ));
        }
        if check_unit && (nrm - 1.0).abs() > tol {
            return Err(Error::invalid(
                "phi",
                format!(
                    "column {j} has norm {nrm}, not 1 (tolerance {tol:e} for {dtype:?}); normalise the columns or turn check_unit_norm off"
                ),
            ));
        }
    }
    Ok(())
}

impl Dictionary {
    /// Copies Φ (`[n, m]` row-major, on `phi`'s device) into a new prepared dictionary on that
    /// device and computes G. Errors: a length that is not n·m, n or m zero, NaN/Inf in Φ, or
    /// (with `check_unit_norm`) a column that is not of unit norm.
    pub fn new<T: Element>(
        phi: &View<'_, T>,
        n: usize,
        m: usize,
        opts: DictionaryOptions,
    ) -> Result<Dictionary> {
        Self::new_on(phi, n, m, opts, phi.device().default_stream())
    }

    /// [`Dictionary::new`] on a given stream (waits for it: the column check reads back).
    pub fn new_on<T: Element>(
        phi: &View<'_, T>,
        n: usize,
        m: usize,
        opts: DictionaryOptions,
        stream: Stream,
    ) -> Result<Dictionary> {
        if n == 0 || m == 0 {
            return Err(Error::invalid("phi", format!("shape [{n}, {m}] is empty")));
        }
        if n > i32::MAX as usize || m > i32::MAX as usize {
            return Err(Error::invalid(
                "phi",
                format!("shape [{n}, {m}] exceeds 2^31-1 per dimension"),
            ));
        }
        let nm = n
            .checked_mul(m)
            .ok_or_else(|| Error::invalid("phi", "n * m overflows"))?;
        check_len("phi", phi.len(), nm)?;
        let device = phi.device().clone();
        let (store, norms) = if device.is_gpu() {
            #[cfg(fep_gpu)]
            {
                gpu::prepare(phi, n, m, stream)?
            }
            #[cfg(not(fep_gpu))]
            unreachable!("a GPU device exists only with a GPU feature")
        } else if device.is_reference() {
            cpu::prepare(phi.host_slice(), n, m)?
        } else {
            let phi = phi.host_slice();
            crate::threads::install(|| fast::prepare(phi, n, m))?
        };
        check_norms(&norms, T::DTYPE, opts.check_unit_norm)?;
        Ok(Dictionary {
            device,
            n,
            m,
            store,
            lambda_max: std::sync::OnceLock::new(),
        })
    }

    /// The device it lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// n: the length of a sample.
    pub fn n(&self) -> usize {
        self.n
    }

    /// m: the number of atoms (columns).
    pub fn m(&self) -> usize {
        self.m
    }

    /// λmax(ΦᵀΦ), the largest eigenvalue of the Gram matrix (≥ 1 for unit-norm columns), by
    /// power iteration in f64 on the host (see [`POWER_ITERS`], [`POWER_TOL`]). Computed once,
    /// on first use, and cached until the next [`Dictionary::learn`]: on the CPU from the
    /// cached f64 Gram matrix (m² per iteration); on a GPU Φ (f32) is copied to the host once
    /// (this waits for the default stream) and each iteration computes Φᵀ(Φv) (2nm).
    pub fn lambda_max(&self) -> Result<f64> {
        if let Some(&v) = self.lambda_max.get() {
            return Ok(v);
        }
        let m = self.m;
        let value = match &self.store {
            Store::Cpu { gram, .. } => power_iteration(m, |v, w| gram_apply(gram, m, v, w))?,
            // As on a GPU: Φᵀ(Φv) in f64 from the f32 Φ (2nm per product).
            Store::Fast { phi, .. } => {
                let phi: Vec<f64> = phi.iter().map(|&v| v as f64).collect();
                crate::threads::install(|| {
                    power_iteration(m, |v, w| phi_t_phi_apply(&phi, self.n, m, v, w))
                })?
            }
            #[cfg(fep_gpu)]
            Store::Gpu { phi, .. } => {
                let phi: Vec<f64> = phi.to_vec()?.into_iter().map(f64::from).collect();
                power_iteration(m, |v, w| phi_t_phi_apply(&phi, self.n, m, v, w))?
            }
        };
        Ok(*self.lambda_max.get_or_init(|| value))
    }

    /// The automatic step η = min(1, 1/λmax(ΦᵀΦ)) (1 for an all-zero Φ) as f32: what
    /// `eta` = [`LcaSpec::AUTO_ETA`] runs with.
    pub fn auto_eta(&self) -> Result<f32> {
        let lmax = self.lambda_max()?;
        Ok(if lmax > 1.0 { (1.0 / lmax) as f32 } else { 1.0 })
    }

    /// `spec` with η resolved (the automatic η replaced by [`Dictionary::auto_eta`]).
    fn resolve(&self, spec: &LcaSpec) -> Result<LcaSpec> {
        let mut s = *spec;
        if s.eta == LcaSpec::AUTO_ETA {
            s.eta = self.auto_eta()?;
        }
        Ok(s)
    }

    /// Φ `[n, m]` as f32, copied to the host.
    pub fn phi(&self) -> Result<Vec<f32>> {
        match &self.store {
            Store::Cpu { phi, .. } => Ok(phi.iter().map(|&v| v as f32).collect()),
            Store::Fast { phi, .. } => Ok(phi.clone()),
            #[cfg(fep_gpu)]
            Store::Gpu { phi, .. } => phi.to_vec(),
        }
    }

    /// G = ΦᵀΦ − I `[m, m]` as f32, copied to the host.
    pub fn gram(&self) -> Result<Vec<f32>> {
        match &self.store {
            Store::Cpu { gram, .. } => Ok(gram.iter().map(|&v| v as f32).collect()),
            Store::Fast { gram, .. } => Ok(gram.clone()),
            #[cfg(fep_gpu)]
            Store::Gpu { gram, .. } => gram.to_vec(),
        }
    }

    /// Copies Φ (f32) into `out` (`[n, m]`, on the dictionary's device), enqueued on `stream`.
    pub fn phi_into(&self, out: &mut ViewMut<'_, f32>, stream: Stream) -> Result<()> {
        same_device("phi_out", out.device(), &self.device)?;
        check_len("phi_out", out.len(), self.n * self.m)?;
        match &self.store {
            Store::Cpu { phi, .. } => {
                for (o, &v) in out.host_slice_mut().iter_mut().zip(phi) {
                    *o = v as f32;
                }
                Ok(())
            }
            Store::Fast { phi, .. } => {
                out.host_slice_mut().copy_from_slice(phi);
                Ok(())
            }
            #[cfg(fep_gpu)]
            Store::Gpu { phi, .. } => unsafe {
                self.device
                    .copy_dtod(out.addr, phi.addr(), out.len * 4, stream)
            },
        }
    }

    fn batch_of(&self, name: &str, len: usize, width: usize) -> Result<usize> {
        if len == 0 {
            return Err(Error::invalid(
                name,
                "is empty: the batch must hold at least one sample",
            ));
        }
        if !len.is_multiple_of(width) {
            return Err(Error::invalid(
                name,
                format!("has {len} elements, not a multiple of {width}"),
            ));
        }
        let batch = len / width;
        if batch > i32::MAX as usize {
            return Err(Error::invalid(
                name,
                format!("batch {batch} exceeds 2^31-1"),
            ));
        }
        Ok(batch)
    }

    /// Codes the batch `x` (`[batch, n]`), starting from `u0` (`[batch, m]`, or 0), into
    /// `out`, enqueued on `stream`. All views on the dictionary's device. Everything is checked
    /// before anything is written: on error the outputs are untouched.
    pub fn solve_into<T: Element>(
        &self,
        spec: &LcaSpec,
        x: &View<'_, T>,
        u0: Option<&View<'_, f32>>,
        out: LcaOutputs<'_>,
        stream: Stream,
    ) -> Result<()> {
        spec.validate()?;
        let batch = self.batch_of("x", x.len(), self.n)?;
        same_device("x", x.device(), &self.device)?;
        let spec = &self.resolve(spec)?;
        let bm = product("u", &[batch, self.m])?;
        let bt = product("energy", &[batch, spec.steps as usize])?;
        if let Some(u0) = u0 {
            same_device("u0", u0.device(), &self.device)?;
            check_len("u0", u0.len(), bm)?;
        }
        same_device("u", out.u.device(), &self.device)?;
        check_len("u", out.u.len(), bm)?;
        same_device("a", out.a.device(), &self.device)?;
        check_len("a", out.a.len(), bm)?;
        if let Some(e) = &out.energy {
            same_device("energy", e.device(), &self.device)?;
            check_len("energy", e.len(), bt)?;
        }
        if let Some(c) = &out.active {
            same_device("active", c.device(), &self.device)?;
            check_len("active", c.len(), bt)?;
        }
        if let Some(s) = &out.steps {
            same_device("steps", s.device(), &self.device)?;
            check_len("steps", s.len(), batch)?;
        }
        // No output may overlap another output or an input, but u0 may be u itself (updated in
        // place): it is an input only when it is other memory.
        let span = |name, addr: u64, len: usize| (name, addr, len.saturating_mul(4));
        let mut ins = vec![(
            "x",
            x.addr(),
            x.len().saturating_mul(std::mem::size_of::<T>()),
        )];
        if let Some(u0) = u0.filter(|u0| u0.addr != out.u.addr) {
            ins.push(span("u0", u0.addr, u0.len()));
        }
        let mut outs = vec![span("u", out.u.addr, bm), span("a", out.a.addr, bm)];
        let energy = out.energy.as_ref().map(|v| span("energy", v.addr, v.len()));
        let active = out.active.as_ref().map(|v| span("active", v.addr, v.len()));
        let steps = out.steps.as_ref().map(|v| span("steps", v.addr, v.len()));
        outs.extend([energy, active, steps].into_iter().flatten());
        check_no_overlap(&ins, &outs)?;
        match &self.store {
            Store::Cpu { phi, gram } => {
                // u0 is copied: it may be the very memory u is written to.
                let (x, u0) = (x.host_slice(), u0.map(|v| v.host_slice().to_vec()));
                let u0 = u0.as_deref();
                if spec.check_finite {
                    crate::backend::cpu::check_finite("x", x.iter().map(|v| v.to_f64()))?;
                    if let Some(u0) = u0 {
                        crate::backend::cpu::check_finite("u0", u0.iter().map(|&v| v as f64))?;
                    }
                }
                cpu::solve(phi, gram, self.n, self.m, spec, x, u0, out)
            }
            Store::Fast { phi, gram } => {
                // The same checks as the reference, before anything is written.
                let (x, u0) = (x.host_slice(), u0.map(|v| v.host_slice().to_vec()));
                let u0 = u0.as_deref();
                if spec.check_finite {
                    crate::backend::cpu::check_finite("x", x.iter().map(|v| v.to_f64()))?;
                    if let Some(u0) = u0 {
                        crate::backend::cpu::check_finite("u0", u0.iter().map(|&v| v as f64))?;
                    }
                }
                let (n, m) = (self.n, self.m);
                crate::threads::install(|| fast::solve(phi, gram, n, m, spec, x, u0, out))
            }
            #[cfg(fep_gpu)]
            Store::Gpu { gram, phi } => gpu::solve(
                &self.device,
                phi,
                gram,
                self.n,
                self.m,
                batch,
                spec,
                x,
                u0,
                out,
                stream,
            ),
        }
    }

    /// Codes the batch `x` (`[batch, n]`) on the device's default stream into new buffers.
    pub fn solve<T: Element>(
        &self,
        spec: &LcaSpec,
        x: &View<'_, T>,
        u0: Option<&View<'_, f32>>,
    ) -> Result<LcaResult> {
        spec.validate()?;
        let batch = self.batch_of("x", x.len(), self.n)?;
        let d = &self.device;
        let bm = product("u", &[batch, self.m])?;
        let bt = product("energy", &[batch, spec.steps as usize])?;
        let mut res = LcaResult {
            u: d.alloc(bm)?,
            a: d.alloc(bm)?,
            energy: if spec.trace { Some(d.alloc(bt)?) } else { None },
            active: if spec.trace { Some(d.alloc(bt)?) } else { None },
            steps: d.alloc(batch)?,
        };
        let out = LcaOutputs {
            u: res.u.view_mut(),
            a: res.a.view_mut(),
            energy: res.energy.as_mut().map(|b| b.view_mut()),
            active: res.active.as_mut().map(|b| b.view_mut()),
            steps: Some(res.steps.view_mut()),
        };
        self.solve_into(spec, x, u0, out, d.default_stream())?;
        Ok(res)
    }

    /// One dictionary-learning step on the batch x (`[batch, n]`) with its codes a
    /// (`[batch, m]`): Φ += (lr/batch) Σ_b (x_b − Φa_b) a_bᵀ, every column renormalised to unit
    /// norm (a column of norm 0 stays as it is), G recomputed. Enqueued on `stream`.
    pub fn learn<T: Element>(
        &mut self,
        x: &View<'_, T>,
        a: &View<'_, f32>,
        lr: f32,
        stream: Stream,
    ) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::invalid(
                "lr",
                format!("must be finite and >= 0, got {lr}"),
            ));
        }
        let batch = self.batch_of("x", x.len(), self.n)?;
        same_device("x", x.device(), &self.device)?;
        same_device("a", a.device(), &self.device)?;
        check_len("a", a.len(), product("a", &[batch, self.m])?)?;
        let (n, m) = (self.n, self.m);
        match &mut self.store {
            Store::Cpu { phi, gram } => {
                let (x, a) = (x.host_slice(), a.host_slice());
                crate::backend::cpu::check_finite("x", x.iter().map(|v| v.to_f64()))?;
                crate::backend::cpu::check_finite("a", a.iter().map(|&v| v as f64))?;
                cpu::learn(phi, gram, n, m, x, a, lr as f64)?
            }
            Store::Fast { phi, gram } => {
                let (x, a) = (x.host_slice(), a.host_slice());
                crate::backend::cpu::check_finite("x", x.iter().map(|v| v.to_f64()))?;
                crate::backend::cpu::check_finite("a", a.iter().map(|&v| v as f64))?;
                crate::threads::install(|| fast::learn(phi, gram, n, m, x, a, lr))?
            }
            #[cfg(fep_gpu)]
            Store::Gpu { phi, gram } => {
                gpu::learn(&self.device, phi, gram, n, m, batch, x, a, lr, stream)?
            }
        }
        // Φ changed: λmax is recomputed on next use.
        self.lambda_max = std::sync::OnceLock::new();
        Ok(())
    }
}
