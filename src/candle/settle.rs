//! Predictive-coding settling ([`crate::settle`]) over candle tensors.

use candle_core::{Tensor, WithDType};

use super::{Input, crate_err, dims, output, with_float_type};
use crate::settle::{
    self, Activation, Gradients, Init, Layer, Network, Precision, SettleOutputs, SettleSpec,
};
use crate::{Element, ViewMut};

const OP: &str = "settle";

/// The precision Π_l of a [`SettleLayer`].
#[derive(Clone, Copy, Debug)]
pub enum LayerPrecision<'t> {
    /// Π_l = π I, π > 0.
    Scalar(f32),
    /// Π_l = diag(π), `[n_l]` f32, contiguous, every entry > 0.
    Diagonal(&'t Tensor),
}

/// One layer l ≥ 1 of a settling network over candle tensors: W_l `[n_l, n_{l−1}]` (the layout
/// of a candle/torch `Linear` weight), an optional bias b_l `[n_l]` (the weights' dtype), f_l and
/// Π_l. All read in place: contiguous, in CPU storage.
#[derive(Clone, Copy, Debug)]
pub struct SettleLayer<'t> {
    /// W_l `[n_l, n_{l−1}]`, f32, f16 or bf16 (one dtype for the whole network).
    pub weight: &'t Tensor,
    /// b_l `[n_l]`, or none (zero).
    pub bias: Option<&'t Tensor>,
    /// f_l, applied to x_{l−1}.
    pub activation: Activation,
    /// Π_l.
    pub precision: LayerPrecision<'t>,
}

impl<'t> SettleLayer<'t> {
    /// A layer without bias.
    pub fn new(weight: &'t Tensor, activation: Activation, precision: LayerPrecision<'t>) -> Self {
        SettleLayer {
            weight,
            bias: None,
            activation,
            precision,
        }
    }

    /// Sets the bias.
    pub fn bias(mut self, bias: &'t Tensor) -> Self {
        self.bias = Some(bias);
        self
    }
}

/// The outputs of [`settle_infer`] (and the state of [`settle_learn_step`]): new contiguous
/// candle CPU tensors, f32 unless noted.
#[derive(Debug)]
pub struct SettleTensors {
    /// x₁ … x_L after settling, `[batch, n_l]` (x_L = the target when learning).
    pub x: Vec<Tensor>,
    /// ε₁ … ε_L at the settled state, `[batch, n_l]`.
    pub eps: Vec<Tensor>,
    /// The settled energy per sample, `[batch]`.
    pub energy: Tensor,
    /// The energy at the start and after each step, `[batch, steps + 1]`.
    pub trace: Tensor,
    /// Steps each sample ran, `[batch]` u32.
    pub steps: Tensor,
}

/// The outputs of [`settle_learn_step`].
#[derive(Debug)]
pub struct LearnTensors {
    /// The settled state (x_L = the target).
    pub state: SettleTensors,
    /// ∂E/∂W_l, `[n_l, n_{l−1}]` f32 each.
    pub grad_w: Vec<Tensor>,
    /// ∂E/∂b_l, `[n_l]` f32 each (also for a layer without bias).
    pub grad_b: Vec<Tensor>,
    /// ∂F/∂Π_l of the free energy F = E − ½ Σ ln|Π_l|, f32: `[1]` for a scalar precision
    /// (summed over units), `[n_l]` for a diagonal; (1/B) Σ_b ½ (ε² − 1/π) per unit.
    pub grad_pi: Vec<Tensor>,
}

/// [`settle::infer`] on candle tensors: settles x₀ `[batch, n₀]` (f32) through `layers` with x_L
/// free. `init`: None for the feedforward start, or x₁ … x_L (`[batch, n_l]` f32 each) to start
/// from (copied: the inputs are not written). Bitwise the crate's result. Errors: ranks, shapes
/// that do not chain, dtypes, layouts, tensors not in CPU storage, and everything
/// [`settle::infer_into`] rejects.
pub fn settle_infer(
    layers: &[SettleLayer<'_>],
    spec: &SettleSpec,
    x0: &Tensor,
    init: Option<&[Tensor]>,
) -> candle_core::Result<SettleTensors> {
    let p = Prepared::new(layers, spec, x0)?;
    let mut state = State::new(&p.widths, p.batch, spec.steps).map_err(crate_err(OP))?;
    let mut spec = SettleSpec {
        init: Init::Feedforward,
        ..*spec
    };
    if let Some(init) = init {
        if init.len() != layers.len() {
            candle_core::bail!(
                "fep_kernels {OP}: init has {} tensors, expected one per layer ({})",
                init.len(),
                layers.len()
            );
        }
        for (l, (t, x)) in init.iter().zip(&mut state.x).enumerate() {
            let name = format!("init[{l}]");
            let d = dims::<2>(OP, &name, t, "[batch, n_l]")?;
            if d != [p.batch, p.widths[l + 1]] {
                candle_core::bail!(
                    "fep_kernels {OP}: {name} is {d:?}, expected [{}, {}]",
                    p.batch,
                    p.widths[l + 1]
                );
            }
            let i = Input::new(OP, name, t)?;
            x.copy_from_slice(i.view::<f32>()?.host_slice());
        }
        spec.init = Init::FromOutputs;
    }
    let x0v = p.x0.view::<f32>()?;
    with_float_type!(OP, "weights", p.dtype, |T| {
        let net = p.network::<T>(layers)?;
        let stream = net.device().default_stream();
        settle::infer_into(&net, &spec, &x0v, state.outputs(), stream).map_err(crate_err(OP))?
    });
    state.tensors(&p)
}

/// [`settle::learn_step`] on candle tensors: settles x₀ `[batch, n₀]` (f32) with x_L clamped to
/// `target` (`[batch, n_L]` f32) from the feedforward start, then returns the settled state and
/// the gradients ∂E/∂W_l, ∂E/∂b_l as tensors (apply them with candle: `(w - grad * lr)?`).
/// Bitwise the crate's result. Errors: as [`settle_infer`], and a target of the wrong shape.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use fep_kernels::candle::{LayerPrecision, SettleLayer};
/// use fep_kernels::settle::{Activation, SettleSpec};
/// let dev = Device::Cpu;
/// // 2 -> 3 -> 1, tanh on the hidden layer's output; a batch of 4.
/// let w1 = Tensor::randn(0f32, 0.5, (3, 2), &dev)?;
/// let w2 = Tensor::randn(0f32, 0.5, (1, 3), &dev)?;
/// let layers = [
///     SettleLayer::new(&w1, Activation::Identity, LayerPrecision::Scalar(1.0)),
///     SettleLayer::new(&w2, Activation::Tanh, LayerPrecision::Scalar(1.0)),
/// ];
/// let x0 = Tensor::randn(0f32, 1.0, (4, 2), &dev)?;
/// let target = Tensor::randn(0f32, 1.0, (4, 1), &dev)?;
/// let spec = SettleSpec::new(0.1).steps(20);
/// let out = fep_kernels::candle::settle_learn_step(&layers, &spec, &x0, &target)?;
/// assert_eq!(out.grad_w[0].dims(), &[3, 2]);
/// // One SGD step, in candle.
/// let w1 = (&w1 - (&out.grad_w[0] * 0.05)?)?;
/// # let _ = w1;
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn settle_learn_step(
    layers: &[SettleLayer<'_>],
    spec: &SettleSpec,
    x0: &Tensor,
    target: &Tensor,
) -> candle_core::Result<LearnTensors> {
    let p = Prepared::new(layers, spec, x0)?;
    let Some(&n_top) = p.widths.last() else {
        return Err(candle_core::Error::Msg(format!("{OP}: no layers")));
    };
    let d = dims::<2>(OP, "target", target, "[batch, n_L]")?;
    if d != [p.batch, n_top] {
        candle_core::bail!(
            "fep_kernels {OP}: target is {d:?}, expected [{}, {n_top}]",
            p.batch
        );
    }
    let ti = Input::new(OP, "target", target)?;
    let tv = ti.view::<f32>()?;
    let x0v = p.x0.view::<f32>()?;
    let mut state = State::new(&p.widths, p.batch, spec.steps).map_err(crate_err(OP))?;
    let mut grad_w: Vec<Vec<f32>> = p
        .widths
        .windows(2)
        .map(|w| vec![0.0; w[0] * w[1]])
        .collect();
    let mut grad_b: Vec<Vec<f32>> = p.widths[1..].iter().map(|&n| vec![0.0; n]).collect();
    let pi_len = |l: usize| match layers[l].precision {
        LayerPrecision::Scalar(_) => 1,
        LayerPrecision::Diagonal(_) => p.widths[l + 1],
    };
    let mut grad_pi: Vec<Vec<f32>> = (0..layers.len()).map(|l| vec![0.0; pi_len(l)]).collect();
    let spec = SettleSpec {
        init: Init::Feedforward,
        ..*spec
    };
    with_float_type!(OP, "weights", p.dtype, |T| {
        let net = p.network::<T>(layers)?;
        let grads = Gradients {
            weights: grad_w.iter_mut().map(|g| ViewMut::host(g)).collect(),
            biases: grad_b.iter_mut().map(|g| ViewMut::host(g)).collect(),
            precisions: grad_pi.iter_mut().map(|g| Some(ViewMut::host(g))).collect(),
        };
        let stream = net.device().default_stream();
        settle::learn_step_into(&net, &spec, &x0v, &tv, state.outputs(), grads, stream)
            .map_err(crate_err(OP))?
    });
    let w = &p.widths;
    Ok(LearnTensors {
        state: state.tensors(&p)?,
        grad_w: grad_w
            .into_iter()
            .enumerate()
            .map(|(l, g)| output(g, &[w[l + 1], w[l]]))
            .collect::<candle_core::Result<_>>()?,
        grad_b: grad_b
            .into_iter()
            .enumerate()
            .map(|(l, g)| output(g, &[w[l + 1]]))
            .collect::<candle_core::Result<_>>()?,
        grad_pi: grad_pi
            .into_iter()
            .map(|g| {
                let n = g.len();
                output(g, &[n])
            })
            .collect::<candle_core::Result<_>>()?,
    })
}

/// The checked inputs under their read guards.
struct Prepared<'t> {
    widths: Vec<usize>,
    batch: usize,
    steps: u32,
    /// The weights' (and biases') dtype.
    dtype: candle_core::DType,
    x0: Input<'t>,
    weights: Vec<Input<'t>>,
    biases: Vec<Option<Input<'t>>>,
    precisions: Vec<Option<Input<'t>>>,
}

impl<'t> Prepared<'t> {
    fn new(
        layers: &[SettleLayer<'t>],
        spec: &SettleSpec,
        x0: &'t Tensor,
    ) -> candle_core::Result<Self> {
        if layers.is_empty() {
            candle_core::bail!("fep_kernels {OP}: a network needs at least one layer");
        }
        // Reject before allocating [batch, steps + 1] traces (the crate checks the rest).
        if spec.steps == 0 || spec.steps >= i32::MAX as u32 {
            candle_core::bail!(
                "fep_kernels {OP}: steps must be in 1..2^31-1, got {}",
                spec.steps
            );
        }
        let [batch, n0] = dims::<2>(OP, "x0", x0, "[batch, n_0]")?;
        let mut widths = vec![n0];
        let dtype = layers[0].weight.dtype();
        for (i, layer) in layers.iter().enumerate() {
            let name = |what: &str| format!("layers[{i}].{what}");
            let [n, n_in] = dims::<2>(OP, &name("weight"), layer.weight, "[n_l, n_{l-1}]")?;
            if n_in != widths[i] {
                candle_core::bail!(
                    "fep_kernels {OP}: {} is [{n}, {n_in}], but the layer below has width {}",
                    name("weight"),
                    widths[i]
                );
            }
            let tensors = std::iter::once(("weight", Some(layer.weight)))
                .chain(std::iter::once(("bias", layer.bias)));
            for (what, t) in tensors {
                if let Some(t) = t.filter(|t| t.dtype() != dtype) {
                    candle_core::bail!(
                        "fep_kernels {OP}: weights and biases must share one dtype: {} is {:?}, \
                         layers[0].weight {dtype:?}",
                        name(what),
                        t.dtype()
                    );
                }
            }
            for (what, t) in [
                ("bias", layer.bias),
                (
                    "precision",
                    match layer.precision {
                        LayerPrecision::Diagonal(t) => Some(t),
                        LayerPrecision::Scalar(_) => None,
                    },
                ),
            ] {
                if let Some(t) = t {
                    let [len] = dims::<1>(OP, &name(what), t, "[n_l]")?;
                    if len != n {
                        candle_core::bail!(
                            "fep_kernels {OP}: {} has {len} elements, expected n_{} = {n}",
                            name(what),
                            i + 1
                        );
                    }
                }
            }
            widths.push(n);
        }
        let mut weights = Vec::new();
        let mut biases = Vec::new();
        let mut precisions = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            weights.push(Input::new(OP, format!("layers[{i}].weight"), layer.weight)?);
            biases.push(
                layer
                    .bias
                    .map(|b| Input::new(OP, format!("layers[{i}].bias"), b))
                    .transpose()?,
            );
            precisions.push(match layer.precision {
                LayerPrecision::Diagonal(t) => {
                    Some(Input::new(OP, format!("layers[{i}].precision"), t)?)
                }
                LayerPrecision::Scalar(_) => None,
            });
        }
        Ok(Prepared {
            widths,
            batch,
            steps: spec.steps,
            dtype,
            x0: Input::new(OP, "x0", x0)?,
            weights,
            biases,
            precisions,
        })
    }

    /// The crate's network over the tensors' memory.
    fn network<T: Element + WithDType>(
        &self,
        layers: &[SettleLayer<'_>],
    ) -> candle_core::Result<Network<'_, T>> {
        let mut out = Vec::with_capacity(layers.len());
        for (i, layer) in layers.iter().enumerate() {
            let precision = match (&layer.precision, &self.precisions[i]) {
                (LayerPrecision::Scalar(p), _) => Precision::Scalar(*p),
                (LayerPrecision::Diagonal(_), Some(t)) => Precision::Diagonal(t.view::<f32>()?),
                (LayerPrecision::Diagonal(_), None) => unreachable!("prepared with the layers"),
            };
            let mut l = Layer::new(self.weights[i].view::<T>()?, layer.activation, precision);
            if let Some(b) = &self.biases[i] {
                l = l.bias(b.view::<T>()?);
            }
            out.push(l);
        }
        Network::new(&self.widths, out).map_err(crate_err(OP))
    }
}

/// Host buffers for the settled state.
struct State {
    x: Vec<Vec<f32>>,
    eps: Vec<Vec<f32>>,
    energy: Vec<f32>,
    trace: Vec<f32>,
    steps: Vec<u32>,
}

impl State {
    /// The host state; the trace (batch x (T + 1), sized by a parameter) is allocated fallibly.
    fn new(widths: &[usize], batch: usize, steps: u32) -> crate::Result<State> {
        let per_layer = || widths[1..].iter().map(|&n| vec![0f32; batch * n]).collect();
        let t1 = steps as usize + 1;
        Ok(State {
            x: per_layer(),
            eps: per_layer(),
            energy: vec![0.0; batch],
            trace: crate::alloc::zeroed(batch.saturating_mul(t1), || {
                format!("a settling trace of {batch} x {t1}")
            })?,
            steps: vec![0; batch],
        })
    }

    fn outputs(&mut self) -> SettleOutputs<'_> {
        SettleOutputs {
            x: self.x.iter_mut().map(|v| ViewMut::host(v)).collect(),
            eps: self.eps.iter_mut().map(|v| ViewMut::host(v)).collect(),
            energy: Some(ViewMut::host(&mut self.energy)),
            trace: Some(ViewMut::host(&mut self.trace)),
            steps: Some(ViewMut::host(&mut self.steps)),
        }
    }

    fn tensors(self, p: &Prepared<'_>) -> candle_core::Result<SettleTensors> {
        let b = p.batch;
        let layers = |v: Vec<Vec<f32>>| -> candle_core::Result<Vec<Tensor>> {
            v.into_iter()
                .zip(&p.widths[1..])
                .map(|(v, &n)| output(v, &[b, n]))
                .collect()
        };
        Ok(SettleTensors {
            x: layers(self.x)?,
            eps: layers(self.eps)?,
            energy: output(self.energy, &[b])?,
            trace: output(self.trace, &[b, p.steps as usize + 1])?,
            steps: output(self.steps, &[b])?,
        })
    }
}
