//! Predictive-coding settling: inference by descending the energy of a hierarchical Gaussian
//! model (each layer predicts the one above it), and the local learning step that follows.
//!
//! Layers x₀ … x_L of widths n₀ … n_L for a batch of B samples; layer l ≥ 1 has weights
//! W_l `[n_l, n_{l−1}]`, an optional bias b_l, an activation f_l applied to the layer below
//! ([`Activation`]: identity, tanh, ReLU, leaky ReLU(α), sigmoid, GELU) and a precision Π_l:
//! a scalar, a diagonal `[n_l]`, or one diagonal per sample `[B, n_l]` ([`Precision`]). Per
//! sample, the prediction μ_l, the error ε_l, the energy E (a sum of precision-weighted squared
//! errors), the free energy F (E with the Gaussian's normaliser, [`SettleSpec::log_det`]), and
//! the step on a free layer (the gradient g_l = ∂E/∂x_l, with heavy-ball momentum β and step η):
//!
//! ```text
//! μ_l = W_l f_l(x_{l−1}) + b_l,   ε_l = x_l − μ_l,   E = ½ Σ_l ε_lᵀ Π_l ε_l   (per sample)
//! F = E − ½ Σ_l ln|Π_l|
//! g_l = Π_l ε_l − f′_{l+1}(x_l) ⊙ W_{l+1}ᵀ (Π_{l+1} ε_{l+1})    (no second term for l = L)
//! v_l ← β v_l + g_l,   x_l ← x_l − η v_l                       (every free layer, synchronously)
//! ```
//!
//! The velocities start at v_l = 0. x₀ is clamped to the input. [`infer`] leaves x_L free;
//! [`learn_step`] clamps it to the target and, at the settled state, returns the batch-mean
//! gradients of the weights, biases and precisions
//!
//! ```text
//! ∂F/∂W_l = −(1/B) Σ_b (Π_l ε_l) f_l(x_{l−1})ᵀ,   ∂F/∂b_l = −(1/B) Σ_b Π_l ε_l
//! ∂F/∂π_l,j = (1/B) Σ_b ½ (ε²_l,j − 1/π_l,j)    (a scalar π_l: summed over j; per sample: not
//!                                               summed over b)
//! ```
//!
//! for the caller's optimiser ([`sgd_all`] applies one: W ← W − lr ∂F/∂W; [`sgd_log_all`] a
//! step in log space for the precisions, which keeps them positive). These are the total
//! derivatives of the settled F by the envelope theorem (the settled state minimises F in the
//! free layers), as far as settling converged. Without the normaliser a learned precision would
//! run to 0: E alone falls as Π does. The fixed point of the precision's gradient is
//! π_l,j = 1 / mean_b ε²_l,j, the inverse variance of the settled errors.
//! Free layers start at the feedforward prediction (x_l = μ_l, layer by layer from x₀) or at a
//! given state ([`Init`], or the `init` argument of [`infer`] and [`learn_step`]).
//!
//! Step size: settling is gradient descent on E, stable near a settled state while
//! η < 2(1 + β)/λmax of its curvature; [`max_stable_eta`] bounds it from the weights and
//! precisions. A settle that diverges is reported ([`Error::Diverged`] on the CPU and, with
//! `check_finite`, in the Python bindings) and never reaches a caller's parameters.
//!
//! Accuracy: with f32 weights every backend computes the products to f32 accuracy by default
//! (the CPU in f64; NVIDIA tensor cores as three TF32 products per product, AMD's f32 MFMA
//! exactly), and the GPU kernels compensate the state updates (Kahan), so T steps do not
//! accumulate T roundings of x. The states then match the f64 reference to ~1e-7 relatively, and
//! each layer's error ε_l to ~1e-6 of its own norm, down to the f32 evaluation of μ_l itself
//! (~1e-7 of |μ_l|: 1e-5 of ε_l when ε_l is 1% of x_l). [`SettleSpec::allow_tf32`] allows
//! single-pass TF32 products on NVIDIA instead (about 1e-3 relative per product, ~1e-2 on a
//! small ε_l). f16 and bf16 weights round the operands of each product to their type.
//!
//! Steps, energies and early stop: `trace[b][0]` is the energy at the start, `trace[b][t]` after
//! t updates (E, or F with `log_det`). A sample stops after step t when
//! |E_t − E_{t−1}| ≤ tol · E_{t−1}, or when E_t ≤ tol · E_0 (tol > 0; always on E, which the
//! states descend: F differs from it by a constant); it is then frozen (its trace repeats), so a sample's result never
//! depends on the rest of its batch. The second rule matters for inference: descending towards
//! E = 0 loses a constant fraction of the energy per step, so the relative change alone would
//! never fall below a small tol.
//! ε and the energy returned are those of the settled state.
//!
//! On a GPU the kernel is chosen by size (src/settle/gpu.rs): all T steps in one launch when a
//! 16-sample tile's state fits in shared memory, else a few launches per step; networks of up
//! to 16 layers (more: `Error::Unsupported` on a GPU; the CPU takes any depth).
//!
//! ```
//! use fep_kernels::{Device, settle::{self, Activation, Layer, Network, Precision, SettleSpec}};
//! let dev = Device::best();
//! // 2 -> 3 -> 1, tanh on the hidden layer's output.
//! let w1 = dev.upload(&[0.5f32, -0.2, 0.1, 0.3, -0.4, 0.2])?;
//! let w2 = dev.upload(&[0.3f32, -0.6, 0.9])?;
//! let net = Network::new(&[2, 3, 1], vec![
//!     Layer::new(w1.view(), Activation::Identity, Precision::Scalar(1.0)),
//!     Layer::new(w2.view(), Activation::Tanh, Precision::Scalar(1.0)),
//! ])?;
//! let x0 = dev.upload(&[1.0f32, -1.0])?;
//! let target = dev.upload(&[0.5f32])?;
//! let spec = SettleSpec::new(0.1).steps(20);
//! let out = settle::learn_step(&net, &spec, &x0.view(), &target.view(), None)?;
//! let trace = out.state.trace.as_ref().unwrap().to_vec()?;
//! assert!(trace[20] < trace[0]); // settling lowered the energy
//! println!("dE/dW2 = {:?}", out.grad_w[1].to_vec()?);
//! # Ok::<(), fep_kernels::Error>(())
//! ```

mod cpu;
mod fast;
#[cfg(fep_gpu)]
mod gpu;

use crate::alloc::product;
use crate::backend::{Device, DeviceBuffer, Stream, View, ViewMut};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::tensor::{check_len, same_device};

/// The activation f_l in μ_l = W_l f_l(x_{l−1}) + b_l.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Activation {
    /// f(x) = x.
    #[default]
    Identity,
    /// tanh.
    Tanh,
    /// max(x, 0); f′(0) = 0.
    Relu,
    /// x for x > 0, αx otherwise; f′(0) = α.
    LeakyRelu(f32),
    /// 1 / (1 + e^{−x}).
    Sigmoid,
    /// x Φ(x) with the normal CDF Φ (the exact, erf form).
    Gelu,
}

impl Activation {
    /// Every kind, with α = 0.1 for the leaky ReLU; for tests and benches.
    pub const ALL: [Activation; 6] = [
        Activation::Identity,
        Activation::Tanh,
        Activation::Relu,
        Activation::LeakyRelu(0.1),
        Activation::Sigmoid,
        Activation::Gelu,
    ];

    /// The C ABI code (`FEP_ACT_*`).
    pub fn code(self) -> i32 {
        match self {
            Activation::Identity => 0,
            Activation::Tanh => 1,
            Activation::Relu => 2,
            Activation::LeakyRelu(_) => 3,
            Activation::Sigmoid => 4,
            Activation::Gelu => 5,
        }
    }

    /// The slope α of the leaky ReLU (0 for the others).
    pub fn alpha(self) -> f32 {
        match self {
            Activation::LeakyRelu(a) => a,
            _ => 0.0,
        }
    }

    /// From the C ABI code and the leaky slope.
    pub fn from_code(code: i32, alpha: f32) -> Result<Activation> {
        Ok(match code {
            0 => Activation::Identity,
            1 => Activation::Tanh,
            2 => Activation::Relu,
            3 => Activation::LeakyRelu(alpha),
            4 => Activation::Sigmoid,
            5 => Activation::Gelu,
            _ => {
                return Err(Error::invalid(
                    "activation",
                    format!("{code} is not one of FEP_ACT_IDENTITY..FEP_ACT_GELU (0..5)"),
                ));
            }
        })
    }

    /// f(x) in f64 (the reference).
    pub fn apply(self, x: f64) -> f64 {
        match self {
            Activation::Identity => x,
            Activation::Tanh => x.tanh(),
            Activation::Relu => x.max(0.0),
            Activation::LeakyRelu(a) => {
                if x > 0.0 {
                    x
                } else {
                    a as f64 * x
                }
            }
            Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Activation::Gelu => x * normal_cdf(x),
        }
    }

    /// f′(x) in f64.
    pub fn derivative(self, x: f64) -> f64 {
        match self {
            Activation::Identity => 1.0,
            Activation::Tanh => {
                let t = x.tanh();
                1.0 - t * t
            }
            Activation::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::LeakyRelu(a) => {
                if x > 0.0 {
                    1.0
                } else {
                    a as f64
                }
            }
            Activation::Sigmoid => {
                let s = 1.0 / (1.0 + (-x).exp());
                s * (1.0 - s)
            }
            Activation::Gelu => {
                normal_cdf(x) + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
            }
        }
    }
}

/// Φ(x) = ½ erfc(−x/√2) (std has no erf; libm's is the musl one).
fn normal_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// The precision Π_l of a layer's error.
#[derive(Clone, Debug)]
pub enum Precision<'a> {
    /// Π_l = π I, π > 0.
    Scalar(f32),
    /// Π_l = diag(π), `[n_l]`, every entry > 0, on the network's device.
    Diagonal(View<'a, f32>),
    /// One diagonal per sample, `[batch, n_l]` row-major, every entry > 0, on the network's
    /// device: Π_l of sample b is diag(π[b, :]). Its length is checked against the batch of
    /// each call.
    PerSample(View<'a, f32>),
}

impl Precision<'_> {
    /// How many values its gradient ∂F/∂Π_l has for a batch of `batch` samples of width `n`:
    /// 1 (scalar), n (diagonal) or batch · n (per sample).
    pub fn grad_len(&self, batch: usize, n: usize) -> usize {
        match self {
            Precision::Scalar(_) => 1,
            Precision::Diagonal(_) => n,
            Precision::PerSample(_) => batch.saturating_mul(n),
        }
    }
    fn tensor(&self) -> Option<&View<'_, f32>> {
        match self {
            Precision::Scalar(_) => None,
            Precision::Diagonal(v) | Precision::PerSample(v) => Some(v),
        }
    }
}

/// One layer l ≥ 1: W_l `[n_l, n_{l−1}]` row-major, b_l `[n_l]` (optional), f_l, Π_l.
#[derive(Clone, Debug)]
pub struct Layer<'a, T: Element> {
    /// W_l, `[n_l, n_{l−1}]`, row-major (the layout of a torch `Linear` weight).
    pub weight: View<'a, T>,
    /// b_l, `[n_l]`, or none (zero).
    pub bias: Option<View<'a, T>>,
    /// f_l, applied to x_{l−1}.
    pub activation: Activation,
    /// Π_l.
    pub precision: Precision<'a>,
}

impl<'a, T: Element> Layer<'a, T> {
    /// A layer without bias.
    pub fn new(weight: View<'a, T>, activation: Activation, precision: Precision<'a>) -> Self {
        Layer {
            weight,
            bias: None,
            activation,
            precision,
        }
    }
    /// Sets the bias.
    pub fn bias(mut self, bias: View<'a, T>) -> Self {
        self.bias = Some(bias);
        self
    }
}

/// A network description: widths n₀ … n_L and layers 1 … L, borrowing the caller's tensors
/// (all on one device). Checked when made: shapes, devices, parameters.
#[derive(Clone, Debug)]
pub struct Network<'a, T: Element> {
    widths: Vec<usize>,
    layers: Vec<Layer<'a, T>>,
}

impl<'a, T: Element> Network<'a, T> {
    /// Checks and assembles the network. `widths` has L + 1 entries, `layers` L.
    pub fn new(widths: &[usize], layers: Vec<Layer<'a, T>>) -> Result<Self> {
        if widths.len() < 2 {
            return Err(Error::invalid(
                "widths",
                format!("needs at least 2 entries (n_0, n_1), got {}", widths.len()),
            ));
        }
        if layers.len() + 1 != widths.len() {
            return Err(Error::invalid(
                "layers",
                format!(
                    "{} layers for {} widths: need one layer per width after n_0",
                    layers.len(),
                    widths.len()
                ),
            ));
        }
        for (i, &w) in widths.iter().enumerate() {
            if w == 0 || w > i32::MAX as usize {
                return Err(Error::invalid(
                    format!("widths[{i}]"),
                    format!("must be in 1..=2^31-1, got {w}"),
                ));
            }
        }
        let dev = layers[0].weight.device().clone();
        for (i, layer) in layers.iter().enumerate() {
            let l = i + 1;
            let (n, n_in) = (widths[l], widths[l - 1]);
            let name = |what: &str| format!("layers[{i}].{what}");
            same_device(&name("weight"), layer.weight.device(), &dev)?;
            if layer.weight.len() != product(&name("weight"), &[n, n_in])? {
                return Err(Error::invalid(
                    name("weight"),
                    format!(
                        "has {} elements, expected n_{l} x n_{} = {n} x {n_in} = {}",
                        layer.weight.len(),
                        l - 1,
                        n * n_in
                    ),
                ));
            }
            if let Some(b) = &layer.bias {
                same_device(&name("bias"), b.device(), &dev)?;
                check_len(&name("bias"), b.len(), n)?;
            }
            if let Activation::LeakyRelu(a) = layer.activation
                && !a.is_finite()
            {
                return Err(Error::invalid(
                    name("activation"),
                    format!("leaky_relu slope must be finite, got {a}"),
                ));
            }
            match &layer.precision {
                Precision::Scalar(p) => {
                    if !(p.is_finite() && *p > 0.0) {
                        return Err(Error::invalid(
                            name("precision"),
                            format!("must be finite and > 0, got {p}"),
                        ));
                    }
                }
                Precision::Diagonal(v) => {
                    same_device(&name("precision"), v.device(), &dev)?;
                    check_len(&name("precision"), v.len(), n)?;
                }
                Precision::PerSample(v) => {
                    same_device(&name("precision"), v.device(), &dev)?;
                    if v.is_empty() || !v.len().is_multiple_of(n) {
                        return Err(Error::invalid(
                            name("precision"),
                            format!(
                                "per-sample precision has {} elements, not a positive multiple \
                                 of n_{l} = {n} ([batch, n_{l}])",
                                v.len()
                            ),
                        ));
                    }
                }
            }
        }
        Ok(Network {
            widths: widths.to_vec(),
            layers,
        })
    }

    /// n₀ … n_L.
    pub fn widths(&self) -> &[usize] {
        &self.widths
    }
    /// L, the number of layers above the input.
    pub fn depth(&self) -> usize {
        self.layers.len()
    }
    /// Layers 1 … L.
    pub fn layers(&self) -> &[Layer<'a, T>] {
        &self.layers
    }
    /// The device of every tensor.
    pub fn device(&self) -> &Device {
        self.layers[0].weight.device()
    }
    /// Σ_l n_l n_{l−1}: the multiply-adds of one feedforward pass per sample.
    pub fn weight_count(&self) -> usize {
        self.widths.windows(2).map(|w| w[0] * w[1]).sum()
    }
}

/// Where the free layers start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Init {
    /// x_l = μ_l, layer by layer from x₀.
    #[default]
    Feedforward,
    /// The `x` outputs hold the start on entry (x₁ … x_L for [`infer_into`], x₁ … x_{L−1} for
    /// [`learn_step_into`]).
    FromOutputs,
}

/// How to settle: η, β, T, tolerance, initialisation, trace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SettleSpec {
    /// η > 0: the step size of the state update.
    pub eta: f32,
    /// β ∈ [0, 1): momentum of the state update (0: plain gradient descent).
    pub momentum: f32,
    /// T ≥ 1: the most steps.
    pub steps: u32,
    /// Stop a sample when its relative energy change is ≤ tol or its energy is ≤ tol times its
    /// start; 0 runs all T steps.
    pub tol: f32,
    /// Where the free layers start.
    pub init: Init,
    /// Check inputs, weights, biases and precisions for NaN/Inf (and diagonal precisions for
    /// ≤ 0) before launching. On a GPU this reads back a few floats, which waits for the
    /// stream; turn it off for a fully asynchronous launch. On the CPU it also reports a settle
    /// that diverges (a state or energy that leaves f32: η too large) as [`Error::Diverged`],
    /// before any output is written; on a GPU a diverged settle shows as a non-finite energy
    /// output, and [`sgd_all`] refuses to apply its gradients.
    pub check_finite: bool,
    /// Report the free energy F = E − ½ Σ_l ln|Π_l| (the Gaussian's normaliser, which keeps a
    /// learned precision from collapsing to 0) in the energy and trace outputs instead of E.
    /// The states, the early stop (which runs on E) and the weight gradients do not change: the
    /// term depends on the precisions only. Off by default.
    pub log_det: bool,
    /// Allow single-pass TF32 tensor-core products for f32 weights on NVIDIA GPUs (like
    /// PyTorch's `allow_tf32`). Off by default: every backend then computes the products to
    /// f32 accuracy (three TF32 products on NVIDIA tensor cores, exact f32 on AMD's, f64 on the
    /// CPU), and each layer's error ε_l matches the f64 reference to ~1e-6 of its own norm, or
    /// ~1e-7 of ‖x_l‖ where ε_l is much smaller than x_l (the f32 floor of μ_l = W f(x) + b).
    /// With it, a product keeps ~11 significant bits (relative error ~1e-3 per product), for up
    /// to 3x fewer tensor-core operations; a small ε_l may then be off by ~1e-2 of its norm. It
    /// changes nothing on AMD GPUs, on the CPU or for f16/bf16 weights.
    pub allow_tf32: bool,
}

impl SettleSpec {
    /// η as given; β = 0, T = 20, tol = 0, feedforward start, inputs checked.
    pub fn new(eta: f32) -> Self {
        SettleSpec {
            eta,
            momentum: 0.0,
            steps: 20,
            tol: 0.0,
            init: Init::Feedforward,
            check_finite: true,
            log_det: false,
            allow_tf32: false,
        }
    }
    /// Sets β.
    pub fn momentum(mut self, beta: f32) -> Self {
        self.momentum = beta;
        self
    }
    /// Sets T.
    pub fn steps(mut self, steps: u32) -> Self {
        self.steps = steps;
        self
    }
    /// Sets the early-stop tolerance.
    pub fn tol(mut self, tol: f32) -> Self {
        self.tol = tol;
        self
    }
    /// Sets the initialisation.
    pub fn init(mut self, init: Init) -> Self {
        self.init = init;
        self
    }
    /// Turns the finiteness check on or off.
    pub fn check_finite(mut self, on: bool) -> Self {
        self.check_finite = on;
        self
    }
    /// Reports the free energy with the −½ ln|Π| normaliser ([`SettleSpec::log_det`]).
    pub fn log_det(mut self, on: bool) -> Self {
        self.log_det = on;
        self
    }
    /// Allows single-pass TF32 products ([`SettleSpec::allow_tf32`]).
    pub fn allow_tf32(mut self, on: bool) -> Self {
        self.allow_tf32 = on;
        self
    }

    fn validate(&self) -> Result<()> {
        if !(self.eta.is_finite() && self.eta > 0.0) {
            return Err(Error::invalid(
                "eta",
                format!("must be finite and > 0, got {}", self.eta),
            ));
        }
        if !(self.momentum.is_finite() && self.momentum >= 0.0 && self.momentum < 1.0) {
            return Err(Error::invalid(
                "momentum",
                format!("must be in [0, 1), got {}", self.momentum),
            ));
        }
        if self.steps == 0 || self.steps >= i32::MAX as u32 {
            return Err(Error::invalid(
                "steps",
                format!("must be in 1..2^31-1, got {}", self.steps),
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

/// Where [`infer_into`] and [`learn_step_into`] write, on the network's device. `x[l−1]` and
/// `eps[l−1]` are layer l's state and error, `[batch, n_l]`, for l = 1 … L; `energy` is
/// `[batch]` (the settled state's), `trace` `[batch, steps + 1]`, `steps` `[batch]`.
pub struct SettleOutputs<'a> {
    /// x₁ … x_L after settling (x_L = the target when learning).
    pub x: Vec<ViewMut<'a, f32>>,
    /// ε₁ … ε_L at the settled state.
    pub eps: Vec<ViewMut<'a, f32>>,
    /// The settled energy per sample.
    pub energy: Option<ViewMut<'a, f32>>,
    /// The energy per sample at the start and after each step.
    pub trace: Option<ViewMut<'a, f32>>,
    /// Steps each sample ran (T unless it stopped early).
    pub steps: Option<ViewMut<'a, u32>>,
}

/// Where [`learn_step_into`] writes the gradients (f32): `weights[l−1]` `[n_l, n_{l−1}]` and
/// `biases[l−1]` `[n_l]`. A layer without bias still gets its bias gradient. `precisions` is
/// empty (no precision gradients) or has one entry per layer, `None` to skip that layer, else
/// ∂F/∂Π_l of [`Precision::grad_len`] values: 1 for a scalar, `[n_l]` for a diagonal,
/// `[batch, n_l]` per sample.
pub struct Gradients<'a> {
    /// ∂E/∂W_l.
    pub weights: Vec<ViewMut<'a, f32>>,
    /// ∂E/∂b_l.
    pub biases: Vec<ViewMut<'a, f32>>,
    /// ∂F/∂Π_l = (1/B) Σ_b ½ (ε²_l − 1/π_l) per unit (summed over units for a scalar).
    pub precisions: Vec<Option<ViewMut<'a, f32>>>,
}

/// The outputs of [`infer`], on the network's device.
#[derive(Debug)]
pub struct SettleResult {
    /// x₁ … x_L, `[batch, n_l]`.
    pub x: Vec<DeviceBuffer<f32>>,
    /// ε₁ … ε_L, `[batch, n_l]`.
    pub eps: Vec<DeviceBuffer<f32>>,
    /// Settled energy `[batch]`.
    pub energy: DeviceBuffer<f32>,
    /// `[batch, steps + 1]`.
    pub trace: Option<DeviceBuffer<f32>>,
    /// `[batch]`.
    pub steps: DeviceBuffer<u32>,
}

/// The outputs of [`learn_step`].
#[derive(Debug)]
pub struct LearnResult {
    /// The settled state (x_L = the target).
    pub state: SettleResult,
    /// ∂E/∂W_l, `[n_l, n_{l−1}]` each.
    pub grad_w: Vec<DeviceBuffer<f32>>,
    /// ∂E/∂b_l, `[n_l]` each.
    pub grad_b: Vec<DeviceBuffer<f32>>,
    /// ∂F/∂Π_l of the free energy with the normaliser, one per layer, of
    /// [`Precision::grad_len`] values: `[1]` for a scalar precision, `[n_l]` for a diagonal,
    /// `[batch, n_l]` per sample. Returned whether or not the spec's `log_det` is on (the
    /// gradient of E alone, ½ ε², would drive a learned precision to 0).
    pub grad_pi: Vec<DeviceBuffer<f32>>,
}

/// What the backends run: the checked arguments.
pub(crate) struct Problem<'n, 'a, T: Element> {
    pub net: &'n Network<'a, T>,
    pub spec: SettleSpec,
    pub batch: usize,
    /// Whether x_L is clamped (learning).
    pub clamped: bool,
}

fn batch_of(name: &str, len: usize, width: usize) -> Result<usize> {
    if len == 0 {
        return Err(Error::invalid(
            name,
            "is empty: the batch must hold at least one sample",
        ));
    }
    if !len.is_multiple_of(width) {
        return Err(Error::invalid(
            name,
            format!("has {len} elements, not a multiple of n_0 = {width}"),
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

/// Per-sample precisions must hold `[batch, n_l]`.
fn check_precisions<T: Element>(net: &Network<'_, T>, batch: usize) -> Result<()> {
    for (i, layer) in net.layers.iter().enumerate() {
        if let Precision::PerSample(v) = &layer.precision {
            let n = net.widths[i + 1];
            let want = product(&format!("layers[{i}].precision"), &[batch, n])?;
            if v.len() != want {
                return Err(Error::invalid(
                    format!("layers[{i}].precision"),
                    format!(
                        "per-sample precision has {} elements, expected batch x n_{} = {batch} \
                         x {n} = {want}",
                        v.len(),
                        i + 1
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn check_outputs<T: Element>(
    net: &Network<'_, T>,
    spec: &SettleSpec,
    batch: usize,
    out: &SettleOutputs<'_>,
) -> Result<()> {
    check_precisions(net, batch)?;
    let dev = net.device();
    let depth = net.depth();
    check_len("x (number of layers)", out.x.len(), depth)?;
    check_len("eps (number of layers)", out.eps.len(), depth)?;
    for l in 1..=depth {
        let n = batch * net.widths[l];
        same_device(&format!("x[{}]", l - 1), out.x[l - 1].device(), dev)?;
        check_len(&format!("x[{}]", l - 1), out.x[l - 1].len(), n)?;
        same_device(&format!("eps[{}]", l - 1), out.eps[l - 1].device(), dev)?;
        check_len(&format!("eps[{}]", l - 1), out.eps[l - 1].len(), n)?;
    }
    if let Some(e) = &out.energy {
        same_device("energy", e.device(), dev)?;
        check_len("energy", e.len(), batch)?;
    }
    if let Some(t) = &out.trace {
        same_device("trace", t.device(), dev)?;
        check_len(
            "trace",
            t.len(),
            product("trace", &[batch, spec.steps as usize + 1])?,
        )?;
    }
    if let Some(s) = &out.steps {
        same_device("steps", s.device(), dev)?;
        check_len("steps", s.len(), batch)?;
    }
    Ok(())
}

/// A named byte range of device memory.
type Span = (String, u64, u64);

fn span<E: bytemuck::Pod>(name: String, addr: u64, len: usize) -> Span {
    let bytes = (len as u64).saturating_mul(std::mem::size_of::<E>() as u64);
    (name, addr, addr.saturating_add(bytes))
}

/// Outputs must not share memory with each other or with any input: the kernels read some while
/// writing others. (Two empty ranges never overlap.)
fn check_no_overlap<T: Element>(
    net: &Network<'_, T>,
    x0: &View<'_, f32>,
    target: Option<&View<'_, f32>>,
    out: &SettleOutputs<'_>,
    grads: Option<&Gradients<'_>>,
) -> Result<()> {
    let mut outs: Vec<Span> = Vec::new();
    for (l, v) in out.x.iter().enumerate() {
        outs.push(span::<f32>(format!("x[{l}]"), v.addr, v.len()));
    }
    for (l, v) in out.eps.iter().enumerate() {
        outs.push(span::<f32>(format!("eps[{l}]"), v.addr, v.len()));
    }
    if let Some(v) = &out.energy {
        outs.push(span::<f32>("energy".into(), v.addr, v.len()));
    }
    if let Some(v) = &out.trace {
        outs.push(span::<f32>("trace".into(), v.addr, v.len()));
    }
    if let Some(v) = &out.steps {
        outs.push(span::<u32>("steps".into(), v.addr, v.len()));
    }
    if let Some(g) = grads {
        for (l, v) in g.weights.iter().enumerate() {
            outs.push(span::<f32>(format!("grad weights[{l}]"), v.addr, v.len()));
        }
        for (l, v) in g.biases.iter().enumerate() {
            outs.push(span::<f32>(format!("grad biases[{l}]"), v.addr, v.len()));
        }
        for (l, v) in g.precisions.iter().enumerate() {
            if let Some(v) = v {
                outs.push(span::<f32>(
                    format!("grad precisions[{l}]"),
                    v.addr,
                    v.len(),
                ));
            }
        }
    }
    let mut ins: Vec<Span> = vec![span::<f32>("x0".into(), x0.addr, x0.len())];
    if let Some(t) = target {
        ins.push(span::<f32>("target".into(), t.addr, t.len()));
    }
    for (i, layer) in net.layers.iter().enumerate() {
        let w = &layer.weight;
        ins.push(span::<T>(format!("layers[{i}].weight"), w.addr, w.len()));
        if let Some(b) = &layer.bias {
            ins.push(span::<T>(format!("layers[{i}].bias"), b.addr, b.len()));
        }
        if let Some(p) = layer.precision.tensor() {
            ins.push(span::<f32>(
                format!("layers[{i}].precision"),
                p.addr,
                p.len(),
            ));
        }
    }
    let overlaps = |a: &Span, b: &Span| a.1 < a.2 && b.1 < b.2 && a.1 < b.2 && b.1 < a.2;
    for (i, a) in outs.iter().enumerate() {
        if let Some(b) = outs[..i].iter().chain(&ins).find(|b| overlaps(a, b)) {
            return Err(Error::invalid(
                a.0.clone(),
                format!(
                    "overlaps {} (outputs must be distinct from each other and from the inputs)",
                    b.0
                ),
            ));
        }
    }
    Ok(())
}

fn run<T: Element>(
    p: &Problem<'_, '_, T>,
    x0: &View<'_, f32>,
    target: Option<&View<'_, f32>>,
    out: SettleOutputs<'_>,
    grads: Option<Gradients<'_>>,
    stream: Stream,
) -> Result<()> {
    let dev = p.net.device();
    if dev.is_reference() {
        return cpu::run(p, x0, target, out, grads);
    }
    if !dev.is_gpu() {
        return crate::threads::install(|| fast::run(p, x0, target, out, grads));
    }
    #[cfg(fep_gpu)]
    {
        gpu::run(p, x0, target, out, grads, stream)
    }
    #[cfg(not(fep_gpu))]
    unreachable!("a GPU device exists only with a GPU feature")
}

/// Settles the batch x₀ (`[batch, n₀]`) with x_L free, into `out`, enqueued on `stream`.
/// Everything is checked before anything is written: on error the outputs are untouched.
pub fn infer_into<T: Element>(
    net: &Network<'_, T>,
    spec: &SettleSpec,
    x0: &View<'_, f32>,
    out: SettleOutputs<'_>,
    stream: Stream,
) -> Result<()> {
    spec.validate()?;
    let batch = batch_of("x0", x0.len(), net.widths[0])?;
    same_device("x0", x0.device(), net.device())?;
    check_outputs(net, spec, batch, &out)?;
    check_no_overlap(net, x0, None, &out, None)?;
    let p = Problem {
        net,
        spec: *spec,
        batch,
        clamped: false,
    };
    run(&p, x0, None, out, None, stream)
}

/// Settles the batch x₀ with x_L clamped to `target` (`[batch, n_L]`), then writes the gradients
/// of the settled energy. Enqueued on `stream`; on error nothing is written.
pub fn learn_step_into<T: Element>(
    net: &Network<'_, T>,
    spec: &SettleSpec,
    x0: &View<'_, f32>,
    target: &View<'_, f32>,
    out: SettleOutputs<'_>,
    grads: Gradients<'_>,
    stream: Stream,
) -> Result<()> {
    spec.validate()?;
    let batch = batch_of("x0", x0.len(), net.widths[0])?;
    same_device("x0", x0.device(), net.device())?;
    same_device("target", target.device(), net.device())?;
    let depth = net.depth();
    check_len("target", target.len(), batch * net.widths[depth])?;
    check_outputs(net, spec, batch, &out)?;
    check_len(
        "grad weights (number of layers)",
        grads.weights.len(),
        depth,
    )?;
    check_len("grad biases (number of layers)", grads.biases.len(), depth)?;
    for l in 1..=depth {
        let (n, n_in) = (net.widths[l], net.widths[l - 1]);
        let name = format!("grad weights[{}]", l - 1);
        same_device(&name, grads.weights[l - 1].device(), net.device())?;
        check_len(&name, grads.weights[l - 1].len(), n * n_in)?;
        let name = format!("grad biases[{}]", l - 1);
        same_device(&name, grads.biases[l - 1].device(), net.device())?;
        check_len(&name, grads.biases[l - 1].len(), n)?;
    }
    if !grads.precisions.is_empty() {
        check_len(
            "grad precisions (number of layers)",
            grads.precisions.len(),
            depth,
        )?;
        for (i, g) in grads.precisions.iter().enumerate() {
            if let Some(g) = g {
                let name = format!("grad precisions[{i}]");
                same_device(&name, g.device(), net.device())?;
                let want = net.layers[i].precision.grad_len(batch, net.widths[i + 1]);
                check_len(&name, g.len(), want)?;
            }
        }
    }
    check_no_overlap(net, x0, Some(target), &out, Some(&grads))?;
    let p = Problem {
        net,
        spec: *spec,
        batch,
        clamped: true,
    };
    run(&p, x0, Some(target), out, Some(grads), stream)
}

fn alloc_state(dev: &Device, widths: &[usize], batch: usize, steps: u32) -> Result<SettleResult> {
    let per_layer = |what| -> Result<Vec<DeviceBuffer<f32>>> {
        widths[1..]
            .iter()
            .map(|&n| dev.alloc::<f32>(product(what, &[batch, n])?))
            .collect()
    };
    Ok(SettleResult {
        x: per_layer("x")?,
        eps: per_layer("eps")?,
        energy: dev.alloc(batch)?,
        trace: Some(dev.alloc(product("trace", &[batch, steps as usize + 1])?)?),
        steps: dev.alloc(batch)?,
    })
}

fn outputs(res: &mut SettleResult) -> SettleOutputs<'_> {
    SettleOutputs {
        x: res.x.iter_mut().map(|b| b.view_mut()).collect(),
        eps: res.eps.iter_mut().map(|b| b.view_mut()).collect(),
        energy: Some(res.energy.view_mut()),
        trace: res.trace.as_mut().map(|b| b.view_mut()),
        steps: Some(res.steps.view_mut()),
    }
}

/// Copies a given start into the state buffers (`init` has one view per free layer, from x₁).
fn copy_init(dev: &Device, init: &[View<'_, f32>], x: &mut [DeviceBuffer<f32>]) -> Result<()> {
    check_len("init (number of layers)", init.len(), x.len())?;
    for (l, (src, dst)) in init.iter().zip(x.iter_mut()).enumerate() {
        let name = format!("init[{l}]");
        same_device(&name, src.device(), dev)?;
        check_len(&name, src.len(), dst.len())?;
        let bytes = 4 * src.len();
        // Both are checked: same device, same length, and dst is a fresh buffer.
        unsafe { dev.copy_dtod(dst.addr(), src.addr, bytes, dev.default_stream())? };
    }
    Ok(())
}

/// Settles x₀ (`[batch, n₀]`) with x_L free on the default stream, into new buffers (with the
/// trace). `init`: None for the feedforward start, or x₁ … x_L to start from.
pub fn infer<T: Element>(
    net: &Network<'_, T>,
    spec: &SettleSpec,
    x0: &View<'_, f32>,
    init: Option<&[View<'_, f32>]>,
) -> Result<SettleResult> {
    spec.validate()?;
    let batch = batch_of("x0", x0.len(), net.widths[0])?;
    let dev = net.device();
    let mut res = alloc_state(dev, &net.widths, batch, spec.steps)?;
    let mut spec = *spec;
    spec.init = Init::Feedforward;
    if let Some(init) = init {
        copy_init(dev, init, &mut res.x)?;
        spec.init = Init::FromOutputs;
    }
    infer_into(net, &spec, x0, outputs(&mut res), dev.default_stream())?;
    Ok(res)
}

/// One learning step on the default stream into new buffers: settle with x_L clamped to
/// `target`, then the gradients of the weights, biases and precisions. `init`: None for the
/// feedforward start, or x₁ … x_{L−1} (`[batch, n_l]` each) to start the free layers from.
pub fn learn_step<T: Element>(
    net: &Network<'_, T>,
    spec: &SettleSpec,
    x0: &View<'_, f32>,
    target: &View<'_, f32>,
    init: Option<&[View<'_, f32>]>,
) -> Result<LearnResult> {
    spec.validate()?;
    let batch = batch_of("x0", x0.len(), net.widths[0])?;
    check_precisions(net, batch)?;
    let dev = net.device();
    let mut state = alloc_state(dev, &net.widths, batch, spec.steps)?;
    let mut grad_w = Vec::new();
    let mut grad_b = Vec::new();
    let mut grad_pi = Vec::new();
    for (l, w) in net.widths.windows(2).enumerate() {
        grad_w.push(dev.alloc::<f32>(product("grad weights", &[w[0], w[1]])?)?);
        grad_b.push(dev.alloc::<f32>(w[1])?);
        grad_pi.push(dev.alloc::<f32>(net.layers[l].precision.grad_len(batch, w[1]))?);
    }
    let mut spec = SettleSpec {
        init: Init::Feedforward,
        ..*spec
    };
    if let Some(init) = init {
        let depth = net.depth();
        check_len("init (number of layers)", init.len(), depth - 1)?;
        copy_init(dev, init, &mut state.x[..depth - 1])?;
        spec.init = Init::FromOutputs;
    }
    let grads = Gradients {
        weights: grad_w.iter_mut().map(|b| b.view_mut()).collect(),
        biases: grad_b.iter_mut().map(|b| b.view_mut()).collect(),
        precisions: grad_pi.iter_mut().map(|b| Some(b.view_mut())).collect(),
    };
    learn_step_into(
        net,
        &spec,
        x0,
        target,
        outputs(&mut state),
        grads,
        dev.default_stream(),
    )?;
    Ok(LearnResult {
        state,
        grad_w,
        grad_b,
        grad_pi,
    })
}

/// Plain SGD on one parameter tensor: p ← p − lr · grad (grad in f32, p in its own dtype,
/// rounded once). Enqueued on `stream`. All or nothing, as [`sgd_all`]: an update that would
/// write a non-finite value writes nothing (on the CPU it is an [`Error::Diverged`]). Errors:
/// lengths or devices that differ, lr not finite or < 0.
pub fn sgd<T: Element>(
    param: &mut ViewMut<'_, T>,
    grad: &View<'_, f32>,
    lr: f32,
    stream: Stream,
) -> Result<()> {
    let grads = std::slice::from_ref(grad);
    // A ViewMut is not Clone: borrow the caller's through a one-element slice.
    sgd_all(std::slice::from_mut(param), grads, lr, None, stream)
}

/// SGD on several parameter tensors at once (a network's weights and biases), all or nothing:
/// p_i ← p_i − lr · grad_i, and when any gradient or any new value is not finite in its
/// dtype, no parameter is written.
///
/// On the CPU that is an [`Error::Diverged`] naming the tensor and element. On a GPU the check
/// runs on the device, so the call never waits: the update is skipped there, and `status` (one
/// `u32` on the device, optional) is set to 1 when it was skipped and 0 when it was applied, for
/// the caller to read whenever it synchronises anyway.
///
/// ```
/// use fep_kernels::{Device, Error, settle};
/// let dev = Device::cpu();
/// let (mut w, mut b) = (dev.upload(&[1.0f32, 2.0])?, dev.upload(&[0.5f32])?);
/// let (gw, gb) = (dev.upload(&[1.0f32, 1.0])?, dev.upload(&[f32::INFINITY])?);
/// let r = settle::sgd_all(&mut [w.view_mut(), b.view_mut()], &[gw.view(), gb.view()], 0.5, None,
///                         dev.default_stream());
/// assert!(matches!(r, Err(Error::Diverged(_))));
/// assert_eq!(w.to_vec()?, [1.0, 2.0]); // untouched: the bias's update was not finite
/// # Ok::<(), fep_kernels::Error>(())
/// ```
pub fn sgd_all<T: Element>(
    params: &mut [ViewMut<'_, T>],
    grads: &[View<'_, f32>],
    lr: f32,
    status: Option<&mut ViewMut<'_, u32>>,
    stream: Stream,
) -> Result<()> {
    update_all(params, grads, lr, status, stream, Rule::Plain)
}

/// SGD in log space on positive parameters (precisions), all or nothing like [`sgd_all`]: with
/// π = exp(θ), a step θ ← θ − lr ∂F/∂θ = θ − lr π ∂F/∂π, that is
///
/// ```text
/// π ← π · exp(−lr · π · ∂F/∂π)
/// ```
///
/// which keeps every π > 0 for any step size. `grads` are ∂F/∂π as [`learn_step`] returns them
/// (`LearnResult::grad_pi`). When any gradient or new value is not finite, or a new value
/// underflows to 0, nothing is written (CPU: [`Error::Diverged`]; GPU: skipped on the device,
/// `status` as for [`sgd_all`]).
///
/// ```
/// use fep_kernels::{Device, settle};
/// let dev = Device::cpu();
/// let mut pi = dev.upload(&[1.0f32, 4.0])?;
/// // dF/dπ = ½(ε² − 1/π) with ε² = 0.25 for both units: the fixed point is π = 4.
/// for _ in 0..200 {
///     let p = pi.to_vec()?;
///     let g = dev.upload(&[0.5 * (0.25 - 1.0 / p[0]), 0.5 * (0.25 - 1.0 / p[1])])?;
///     settle::sgd_log_all(&mut [pi.view_mut()], &[g.view()], 0.5, None, dev.default_stream())?;
/// }
/// let p = pi.to_vec()?;
/// assert!((p[0] - 4.0).abs() < 1e-3 && (p[1] - 4.0).abs() < 1e-3);
/// # Ok::<(), fep_kernels::Error>(())
/// ```
pub fn sgd_log_all(
    params: &mut [ViewMut<'_, f32>],
    grads: &[View<'_, f32>],
    lr: f32,
    status: Option<&mut ViewMut<'_, u32>>,
    stream: Stream,
) -> Result<()> {
    update_all(params, grads, lr, status, stream, Rule::Log)
}

/// The update rule of [`sgd_all`] and [`sgd_log_all`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rule {
    /// p − lr g.
    Plain,
    /// p exp(−lr p g), for positive parameters.
    Log,
}

fn update_all<T: Element>(
    params: &mut [ViewMut<'_, T>],
    grads: &[View<'_, f32>],
    lr: f32,
    status: Option<&mut ViewMut<'_, u32>>,
    stream: Stream,
    rule: Rule,
) -> Result<()> {
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(Error::invalid(
            "lr",
            format!("must be finite and >= 0, got {lr}"),
        ));
    }
    check_len("grads", grads.len(), params.len())?;
    let Some(dev) = params.first().map(|p| p.device().clone()) else {
        return Ok(());
    };
    let mut outs = Vec::new();
    let mut ins = Vec::new();
    for (i, (p, g)) in params.iter().zip(grads).enumerate() {
        same_device(&format!("params[{i}]"), p.device(), &dev)?;
        same_device(&format!("grads[{i}]"), g.device(), &dev)?;
        check_len(&format!("grads[{i}]"), g.len(), p.len())?;
        outs.push((
            format!("params[{i}]"),
            p.addr,
            p.len().saturating_mul(size_of::<T>()),
        ));
        ins.push((format!("grads[{i}]"), g.addr(), g.len().saturating_mul(4)));
    }
    if let Some(s) = &status {
        same_device("status", s.device(), &dev)?;
        check_len("status", s.len(), 1)?;
        outs.push(("status".into(), s.addr, 4));
    }
    crate::tensor::check_no_overlap(
        &crate::tensor::borrowed(&ins),
        &crate::tensor::borrowed(&outs),
    )?;
    if !dev.is_gpu() {
        let mut ps: Vec<&mut [T]> = params.iter_mut().map(|p| p.host_slice_mut()).collect();
        let gs: Vec<&[f32]> = grads.iter().map(|g| g.host_slice()).collect();
        let r = cpu::sgd_all(&mut ps, &gs, lr as f64, rule);
        if let Some(s) = status {
            s.host_slice_mut()[0] = r.is_err() as u32;
        }
        return r;
    }
    #[cfg(fep_gpu)]
    {
        gpu::sgd_all(params, grads, lr, status, stream, rule)
    }
    #[cfg(not(fep_gpu))]
    unreachable!("a GPU device exists only with a GPU feature")
}

/// The largest step size η for which settling `net` is certain to be stable near a settled
/// state, with momentum β (`momentum`) and x_L clamped (`clamped`, learning) or free.
///
/// Settling is (heavy-ball) gradient descent on E, stable on a quadratic when
/// 0 < η < 2(1 + β)/λmax(H), H the Hessian of E in the free layers. Near a settled state (small
/// errors, where the terms of H with f″ vanish) H = Σ_l J_lᵀ Π_l J_l, with J_l = ∂ε_l/∂x: I on
/// x_l and −W_l diag(f′_l(x_{l−1})) on x_{l−1} when those are free. So
///
/// ```text
/// λmax(H) ≤ Σ_l π_l,max (a_l + c_l ‖W_l‖₂ b_l)²
/// ```
///
/// with a_l = [x_l free], b_l = [x_{l−1} free] (l ≥ 2), c_l = max |f′_l| (1 for identity, tanh,
/// ReLU; max(1, |α|) for leaky ReLU; ¼ for the sigmoid; 1.13 for GELU) and ‖W_l‖₂ by power
/// iteration (f64, on the host: weights on a GPU are copied back, which waits for the default
/// stream). The result 2(1 + β)/bound is a sufficient bound, not a necessary one: steps up to
/// it never diverge near the minimum, larger ones may still converge. Errors: momentum outside
/// [0, 1), a non-positive or non-finite precision.
///
/// ```
/// use fep_kernels::{Device, settle::{self, Activation, Layer, Network, Precision}};
/// let dev = Device::cpu();
/// let w1 = dev.upload(&[2.0f32, 0.0, 0.0, 1.0])?;   // ‖W_1‖ = 2
/// let w2 = dev.upload(&[1.0f32, 0.0, 0.0, 1.0])?;   // ‖W_2‖ = 1
/// let net = Network::new(&[2, 2, 2], vec![
///     Layer::new(w1.view(), Activation::Identity, Precision::Scalar(1.0)),
///     Layer::new(w2.view(), Activation::Identity, Precision::Scalar(4.0)),
/// ])?;
/// // Learning (x_2 clamped): H ≤ π_1 + π_2 ‖W_2‖² = 1 + 4 = 5, so η < 2/5.
/// let eta = settle::max_stable_eta(&net, 0.0, true)?;
/// assert!((eta - 0.4).abs() < 1e-4);
/// # Ok::<(), fep_kernels::Error>(())
/// ```
pub fn max_stable_eta<T: Element>(
    net: &Network<'_, T>,
    momentum: f32,
    clamped: bool,
) -> Result<f32> {
    if !(momentum.is_finite() && (0.0..1.0).contains(&momentum)) {
        return Err(Error::invalid(
            "momentum",
            format!("must be in [0, 1), got {momentum}"),
        ));
    }
    let depth = net.depth();
    let top_free = if clamped { depth - 1 } else { depth };
    let mut bound = 0.0f64;
    for (i, layer) in net.layers.iter().enumerate() {
        let l = i + 1;
        let pi_max = match &layer.precision {
            Precision::Scalar(p) => *p as f64,
            Precision::Diagonal(v) | Precision::PerSample(v) => {
                let vals = v.to_vec()?;
                let mut m = 0.0f64;
                for (j, &p) in vals.iter().enumerate() {
                    if !(p.is_finite() && p > 0.0) {
                        return Err(Error::invalid(
                            format!("layers[{i}].precision"),
                            format!("element {j} is {p}: precisions must be finite and > 0"),
                        ));
                    }
                    m = m.max(p as f64);
                }
                m
            }
        };
        let a = if l <= top_free { 1.0 } else { 0.0 };
        let below_free = l >= 2 && l - 1 <= top_free;
        let coupling = if below_free {
            let w: Vec<f64> = layer.weight.to_vec()?.iter().map(|v| v.to_f64()).collect();
            let c = match layer.activation {
                Activation::Sigmoid => 0.25,
                Activation::Gelu => 1.13,
                Activation::LeakyRelu(alpha) => (alpha.abs() as f64).max(1.0),
                _ => 1.0,
            };
            c * spectral_norm(&w, net.widths[l], net.widths[l - 1])
        } else {
            0.0
        };
        bound += pi_max * (a + coupling).powi(2);
    }
    if bound == 0.0 {
        // No free layer: any step is stable (nothing moves).
        return Ok(f32::INFINITY);
    }
    Ok((2.0 * (1.0 + momentum as f64) / bound) as f32)
}

/// ‖W‖₂ of an `[n, m]` row-major matrix by power iteration on WᵀW (f64, a fixed start, at most
/// 500 iterations or until the estimate changes by less than 1e-10 relatively).
fn spectral_norm(w: &[f64], n: usize, m: usize) -> f64 {
    let mut v: Vec<f64> = (0..m).map(|i| 1.0 + 0.01 * (i % 7) as f64).collect();
    let mut sigma2 = 0.0f64;
    for _ in 0..500 {
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 {
            return 0.0;
        }
        v.iter_mut().for_each(|x| *x /= norm);
        let u: Vec<f64> = (0..n)
            .map(|j| (0..m).map(|i| w[j * m + i] * v[i]).sum())
            .collect();
        let next: Vec<f64> = (0..m)
            .map(|i| (0..n).map(|j| w[j * m + i] * u[j]).sum())
            .collect();
        let s2 = next.iter().zip(&v).map(|(a, b)| a * b).sum::<f64>();
        let done = (s2 - sigma2).abs() <= 1e-10 * s2.abs();
        sigma2 = s2;
        v = next;
        if done {
            break;
        }
    }
    sigma2.max(0.0).sqrt()
}
