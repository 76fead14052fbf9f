//! The C ABI of predictive-coding settling: the `FEP_ACT_*` and `FEP_SETTLE_INIT_*` codes, the
//! `FepSettleNet` description and `FepSettleParams`, and `fep_settle_infer` /
//! `fep_settle_learn`.

use std::ffi::c_void;

use super::{
    aligned, guard, non_null, open_device, product, raw_stream, raw_view, raw_view_mut, read_arg,
    slice_of, usize_of, write_out,
};
use crate::backend::{Device, Stream, View};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::settle::{
    self, Activation, Gradients, Init, Layer, Network, Precision, SettleOutputs, SettleSpec,
};

/// Activation f_l of a predictive-coding layer (`FepSettleNet.activations`): f(x) = x.
pub const FEP_ACT_IDENTITY: i32 = 0;
/// Activation: tanh.
pub const FEP_ACT_TANH: i32 = 1;
/// Activation: max(x, 0); f'(0) = 0.
pub const FEP_ACT_RELU: i32 = 2;
/// Activation: x for x > 0, alpha x otherwise (alpha from `FepSettleNet.leaky_alpha`, default
/// 0.01); f'(0) = alpha.
pub const FEP_ACT_LEAKY_RELU: i32 = 3;
/// Activation: 1 / (1 + e^-x).
pub const FEP_ACT_SIGMOID: i32 = 4;
/// Activation: x Phi(x) with the normal CDF Phi (the exact, erf form).
pub const FEP_ACT_GELU: i32 = 5;

/// Where the free layers of a settling start (`FepSettleParams.init`): feedforward,
/// x_l = mu_l layer by layer from x_0.
pub const FEP_SETTLE_INIT_FEEDFORWARD: i32 = 0;
/// Where the free layers start: from the values `x_out` holds on entry.
pub const FEP_SETTLE_INIT_GIVEN: i32 = 1;

/// Predictive-coding settling (the maths: the Rust crate's `settle` module docs): a network of L
/// layers above the input, described per call (nothing is copied or kept):
///   mu_l = W_l f_l(x_{l-1}) + b_l,  eps_l = x_l - mu_l,  E = 1/2 sum_l eps_l^T Pi_l eps_l.
/// All tensors on the device of the call.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepSettleNet {
    /// L >= 1.
    pub layers: u32,
    /// L + 1: n_0 ... n_L.
    pub widths: *const u64,
    /// L: FEP_ACT_*, entry l-1 is f_l (applied to x_{l-1}).
    pub activations: *const i32,
    /// L slopes for FEP_ACT_LEAKY_RELU, or NULL (0.01).
    pub leaky_alpha: *const f32,
    /// FEP_DTYPE_* of the weights and biases.
    pub dtype: i32,
    /// L: W_l, n_l x n_{l-1} row-major (written only by fep_settle_learn with lr > 0).
    pub weights: *const *mut c_void,
    /// L: b_l `[n_l]` (an entry may be NULL: no bias), or NULL.
    pub biases: *const *mut c_void,
    /// L scalar precisions (> 0), or NULL: all 1.
    pub precision: *const f32,
    /// L: `[n_l]` diagonal precisions (> 0) overriding the scalar where an entry is not NULL; or
    /// NULL.
    pub precision_diag: *const *const f32,
    /// L flags, or NULL (all 0): where entry l is not 0, `precision_diag[l]` (required then) holds
    /// one diagonal per sample, `[batch, n_l]` row-major, instead of one `[n_l]` for all.
    pub precision_per_sample: *const i32,
}

/// The parameters of a settling (fep_settle_infer, fep_settle_learn).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepSettleParams {
    /// Step size of the state update, > 0.
    pub eta: f32,
    /// In [0, 1).
    pub momentum: f32,
    /// T >= 1.
    pub steps: u32,
    /// A sample stops when |E_t - E_{t-1}| <= tol * E_{t-1} or E_t <= tol * E_0; 0 runs all T
    /// steps.
    pub tol: f32,
    /// FEP_SETTLE_INIT_FEEDFORWARD, or _GIVEN: the free layers start from x_out.
    pub init: i32,
    /// 0: reject NaN/Inf inputs, weights, biases and non-positive diagonal precisions first,
    /// which on a GPU reads back a few floats (the call waits for the stream); 1: skip the
    /// checks and return without synchronising.
    pub skip_input_checks: i32,
    /// 1: energy_out and trace_out hold the free energy F = E - 1/2 sum_l ln|Pi_l| (the
    /// Gaussian normaliser, needed to learn precisions); 0: E. States, early stop (on E) and
    /// gradients are the same either way.
    pub log_det: i32,
    /// 1: allow single-pass TF32 tensor-core products for f32 weights on NVIDIA GPUs (about 1e-3
    /// relative error per product); 0: f32-accurate products on every backend.
    pub allow_tf32: i32,
}

/// The widths of a C network description (checked against `layers` and the address space).
unsafe fn net_widths(net: &FepSettleNet) -> Result<Vec<usize>> {
    if net.layers == 0 || net.layers > 4096 {
        return Err(Error::invalid(
            "net.layers",
            format!("must be in 1..=4096, got {}", net.layers),
        ));
    }
    let w = unsafe { slice_of("net.widths", net.widths, net.layers as usize + 1)? };
    // Checked here, before any size is formed from them (the Rust API checks them again).
    w.iter()
        .enumerate()
        .map(|(i, &v)| {
            if v == 0 || v > i32::MAX as u64 {
                return Err(Error::invalid(
                    format!("net.widths[{i}]"),
                    format!("must be in 1..=2^31-1, got {v}"),
                ));
            }
            Ok(v as usize)
        })
        .collect()
}

/// Whether an optional C array is given (not NULL), checked aligned for its element type.
fn present<T>(name: &str, p: *const T) -> Result<bool> {
    if p.is_null() {
        return Ok(false);
    }
    aligned::<T>(name, p as u64)?;
    Ok(true)
}

/// Views of a C network description on `dev` (lengths follow from the widths).
unsafe fn net_view<'a, T: Element>(
    dev: &Device,
    net: &FepSettleNet,
    widths: &[usize],
    batch: usize,
) -> Result<Network<'a, T>> {
    let depth = widths.len() - 1;
    let acts = unsafe { slice_of("net.activations", net.activations, depth)? };
    let weights = unsafe { slice_of("net.weights", net.weights, depth)? };
    // The optional per-layer arrays (NULL: absent), each checked aligned once.
    let has_alpha = present("net.leaky_alpha", net.leaky_alpha)?;
    let has_diag = present("net.precision_diag", net.precision_diag)?;
    let has_prec = present("net.precision", net.precision)?;
    let has_bias = present("net.biases", net.biases)?;
    let has_per_sample = present("net.precision_per_sample", net.precision_per_sample)?;
    let mut layers = Vec::with_capacity(depth);
    for l in 0..depth {
        let (n, n_in) = (widths[l + 1], widths[l]);
        let alpha = if has_alpha {
            unsafe { *net.leaky_alpha.add(l) }
        } else {
            0.01
        };
        non_null(&format!("net.weights[{l}]"), weights[l])?;
        let w = unsafe {
            raw_view::<T>(
                dev,
                weights[l] as u64,
                product("net.widths", n, n_in)?,
                &format!("net.weights[{l}]"),
            )
        };
        // A diagonal where given, else the scalar (1 without a scalar array).
        let diag = if has_diag {
            unsafe { *net.precision_diag.add(l) }
        } else {
            std::ptr::null()
        };
        let per_sample = has_per_sample && unsafe { *net.precision_per_sample.add(l) } != 0;
        let precision = if per_sample {
            let name = format!("net.precision_diag[{l}]");
            non_null(&name, diag)?;
            let len = product("batch", batch, n)?;
            Precision::PerSample(unsafe { raw_view(dev, diag as u64, len, &name) })
        } else if !diag.is_null() {
            Precision::Diagonal(unsafe {
                raw_view(dev, diag as u64, n, &format!("net.precision_diag[{l}]"))
            })
        } else if has_prec {
            Precision::Scalar(unsafe { *net.precision.add(l) })
        } else {
            Precision::Scalar(1.0)
        };
        let mut layer = Layer::new(w, Activation::from_code(acts[l], alpha)?, precision);
        if has_bias {
            let b = unsafe { *net.biases.add(l) };
            if !b.is_null() {
                layer =
                    layer.bias(unsafe { raw_view(dev, b as u64, n, &format!("net.biases[{l}]")) });
            }
        }
        layers.push(layer);
    }
    Network::new(widths, layers)
}

fn settle_spec(p: &FepSettleParams) -> Result<SettleSpec> {
    let init = match p.init {
        FEP_SETTLE_INIT_FEEDFORWARD => Init::Feedforward,
        FEP_SETTLE_INIT_GIVEN => Init::FromOutputs,
        other => {
            return Err(Error::invalid(
                "params.init",
                format!("{other} is not FEP_SETTLE_INIT_FEEDFORWARD or _GIVEN"),
            ));
        }
    };
    let flag = |name: &str, v: i32| match v {
        0 | 1 => Ok(v == 1),
        other => Err(Error::invalid(
            format!("params.{name}"),
            format!("must be 0 or 1, got {other}"),
        )),
    };
    Ok(SettleSpec {
        eta: p.eta,
        momentum: p.momentum,
        steps: p.steps,
        tol: p.tol,
        init,
        check_finite: p.skip_input_checks == 0,
        log_det: flag("log_det", p.log_det)?,
        allow_tf32: flag("allow_tf32", p.allow_tf32)?,
    })
}

/// Views of the caller's settle outputs: x and eps per layer, energy, trace and steps.
#[allow(clippy::too_many_arguments)]
unsafe fn settle_outputs<'a>(
    dev: &Device,
    widths: &[usize],
    batch: usize,
    steps: u32,
    x_out: *const *mut f32,
    eps_out: *const *mut f32,
    energy_out: *mut f32,
    trace_out: *mut f32,
    steps_out: *mut u32,
) -> Result<SettleOutputs<'a>> {
    let depth = widths.len() - 1;
    let xs = unsafe { slice_of("x_out", x_out, depth)? };
    let es = unsafe { slice_of("eps_out", eps_out, depth)? };
    let mut out = SettleOutputs {
        x: Vec::new(),
        eps: Vec::new(),
        energy: None,
        trace: None,
        steps: None,
    };
    for l in 0..depth {
        let len = product("batch", batch, widths[l + 1])?;
        non_null(&format!("x_out[{l}]"), xs[l])?;
        non_null(&format!("eps_out[{l}]"), es[l])?;
        out.x
            .push(unsafe { raw_view_mut(dev, xs[l] as u64, len, &format!("x_out[{l}]")) });
        out.eps
            .push(unsafe { raw_view_mut(dev, es[l] as u64, len, &format!("eps_out[{l}]")) });
    }
    let t1 = product("batch", batch, steps as usize + 1)?;
    unsafe {
        out.energy = (!energy_out.is_null())
            .then(|| raw_view_mut(dev, energy_out as u64, batch, "energy_out"));
        out.trace =
            (!trace_out.is_null()).then(|| raw_view_mut(dev, trace_out as u64, t1, "trace_out"));
        out.steps =
            (!steps_out.is_null()).then(|| raw_view_mut(dev, steps_out as u64, batch, "steps_out"));
    }
    Ok(out)
}

/// What both settle entry points read first: the device, the network's widths, the batch, the
/// spec and the view of x0, every pointer checked.
struct SettleCall {
    dev: Device,
    net: FepSettleNet,
    widths: Vec<usize>,
    batch: usize,
    steps: u32,
    spec: SettleSpec,
}

unsafe fn settle_call(
    kind: i32,
    ordinal: i32,
    net: *const FepSettleNet,
    params: *const FepSettleParams,
    batch: u64,
    x0: *const f32,
) -> Result<SettleCall> {
    let (net, p) = unsafe { (read_arg("net", net)?, read_arg("params", params)?) };
    non_null("x0", x0)?;
    Ok(SettleCall {
        dev: open_device(kind, ordinal)?,
        widths: unsafe { net_widths(&net)? },
        batch: usize_of("batch", batch)?,
        steps: p.steps,
        spec: settle_spec(&p)?,
        net,
    })
}

impl SettleCall {
    /// A view of `per_sample` f32 values per sample at `ptr`.
    unsafe fn rows<'a>(
        &self,
        name: &str,
        ptr: *const f32,
        per_sample: usize,
    ) -> Result<View<'a, f32>> {
        let len = product("batch", self.batch, per_sample)?;
        Ok(unsafe { raw_view(&self.dev, ptr as u64, len, name) })
    }

    /// Views of the caller's outputs.
    unsafe fn outputs<'a>(
        &self,
        x_out: *const *mut f32,
        eps_out: *const *mut f32,
        energy_out: *mut f32,
        trace_out: *mut f32,
        steps_out: *mut u32,
    ) -> Result<SettleOutputs<'a>> {
        unsafe {
            settle_outputs(
                &self.dev,
                &self.widths,
                self.batch,
                self.steps,
                x_out,
                eps_out,
                energy_out,
                trace_out,
                steps_out,
            )
        }
    }
}

/// Settles `batch` samples x0 (f32, batch x n_0) with x_L free. Writes x_out[l-1] and
/// eps_out[l-1] (f32, batch x n_l, l = 1..L; required). Optional (NULL to skip): energy_out
/// (batch: the settled energy), trace_out (batch x (steps + 1): the energy at the start and
/// after each step; a sample that stopped early repeats its last value), steps_out (batch).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_settle_infer(
    kind: i32,
    ordinal: i32,
    stream: *mut c_void,
    net: *const FepSettleNet,
    params: *const FepSettleParams,
    batch: u64,
    x0: *const f32,
    x_out: *const *mut f32,
    eps_out: *const *mut f32,
    energy_out: *mut f32,
    trace_out: *mut f32,
    steps_out: *mut u32,
) -> i32 {
    guard(|| {
        let c = unsafe { settle_call(kind, ordinal, net, params, batch, x0)? };
        let x0 = unsafe { c.rows("x0", x0, c.widths[0])? };
        let out = unsafe { c.outputs(x_out, eps_out, energy_out, trace_out, steps_out)? };
        let stream = raw_stream(stream);
        with_dtype!(c.net.dtype, T => {
            let network = unsafe { net_view::<T>(&c.dev, &c.net, &c.widths, c.batch)? };
            settle::infer_into(&network, &c.spec, &x0, out, stream)
        })
    })
}

/// One learning step: settles with x_L clamped to target (f32, batch x n_L), then writes the
/// gradients of the settled energy, grad_w[l-1] = -(1/B) sum_b (Pi_l eps_l) f_l(x_{l-1})^T
/// (f32, n_l x n_{l-1}) and grad_b[l-1] (f32, n_l), both required; grad_pi (NULL, or L entries
/// each NULL to skip) receives dF/dPi_l = (1/B) sum_b 1/2 (eps_l^2 - 1/pi) per unit: 1 value for
/// a scalar precision (summed over units), n_l for a diagonal, batch x n_l per sample (f32; see
/// fep_settle_sgd_log to apply it). lr > 0 then applies
/// W_l -= lr grad_w, b_l -= lr grad_b in place (lr = 0: gradients only), all or nothing: the
/// weights and biases must not share memory, and an update that would write a NaN or infinity
/// writes no parameter. Outputs as for fep_settle_infer (x_out[L-1] receives the target).
/// Divergence: on the CPU, a settle that diverges returns FEP_ERR_DIVERGED with nothing written;
/// an update that alone would overflow (lr too large) returns FEP_ERR_DIVERGED after the
/// outputs and gradients are written, the parameters untouched. On a GPU nothing waits: a
/// diverged settle shows as a non-finite energy_out, and the update is skipped on the device
/// whenever a gradient or a new parameter is not finite.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_settle_learn(
    kind: i32,
    ordinal: i32,
    stream: *mut c_void,
    net: *const FepSettleNet,
    params: *const FepSettleParams,
    batch: u64,
    x0: *const f32,
    target: *const f32,
    x_out: *const *mut f32,
    eps_out: *const *mut f32,
    energy_out: *mut f32,
    trace_out: *mut f32,
    steps_out: *mut u32,
    grad_w: *const *mut f32,
    grad_b: *const *mut f32,
    grad_pi: *const *mut f32,
    lr: f32,
) -> i32 {
    guard(|| {
        non_null("target", target)?;
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::invalid(
                "lr",
                format!("must be finite and >= 0, got {lr}"),
            ));
        }
        let c = unsafe { settle_call(kind, ordinal, net, params, batch, x0)? };
        let (dev, widths) = (&c.dev, &c.widths);
        let depth = widths.len() - 1;
        let x0 = unsafe { c.rows("x0", x0, widths[0])? };
        let target = unsafe { c.rows("target", target, widths[depth])? };
        let out = unsafe { c.outputs(x_out, eps_out, energy_out, trace_out, steps_out)? };
        let gw = unsafe { slice_of("grad_w", grad_w, depth)? };
        let gb = unsafe { slice_of("grad_b", grad_b, depth)? };
        let mut grads = Gradients {
            weights: Vec::new(),
            biases: Vec::new(),
            precisions: Vec::new(),
        };
        let gp = if grad_pi.is_null() {
            None
        } else {
            Some(unsafe { slice_of("grad_pi", grad_pi, depth)? })
        };
        for l in 0..depth {
            non_null(&format!("grad_w[{l}]"), gw[l])?;
            non_null(&format!("grad_b[{l}]"), gb[l])?;
            let n_w = product("net.widths", widths[l + 1], widths[l])?;
            unsafe {
                grads.weights.push(raw_view_mut(
                    dev,
                    gw[l] as u64,
                    n_w,
                    &format!("grad_w[{l}]"),
                ));
                grads.biases.push(raw_view_mut(
                    dev,
                    gb[l] as u64,
                    widths[l + 1],
                    &format!("grad_b[{l}]"),
                ));
            }
        }
        let stream = raw_stream(stream);
        with_dtype!(c.net.dtype, T => {
            let network = unsafe { net_view::<T>(dev, &c.net, widths, c.batch)? };
            if let Some(gp) = gp {
                for (l, &ptr) in gp.iter().enumerate() {
                    let len = network.layers()[l].precision.grad_len(c.batch, widths[l + 1]);
                    grads.precisions.push((!ptr.is_null()).then(|| unsafe {
                        raw_view_mut(dev, ptr as u64, len, &format!("grad_pi[{l}]"))
                    }));
                }
            }
            if lr > 0.0 {
                // Updated in place: checked distinct before anything is written.
                check_params_distinct(&network, &x0, &target)?;
            }
            settle::learn_step_into(&network, &c.spec, &x0, &target, out, grads, stream)?;
            if lr > 0.0 {
                unsafe { apply_sgd::<T>(dev, &c.net, widths, gw, gb, lr, stream) }
            } else {
                Ok(())
            }
        })
    })
}

/// `Err` when a weight or bias (updated in place) shares memory with another one or with an
/// input the step reads (x0, the target, a diagonal precision); the settle itself checks its
/// outputs against all of them.
fn check_params_distinct<T: Element>(
    net: &Network<'_, T>,
    x0: &View<'_, f32>,
    target: &View<'_, f32>,
) -> Result<()> {
    let el = std::mem::size_of::<T>();
    let mut params = Vec::new();
    let mut ins = vec![
        ("x0".to_string(), x0.addr(), x0.len().saturating_mul(4)),
        (
            "target".to_string(),
            target.addr(),
            target.len().saturating_mul(4),
        ),
    ];
    for (l, layer) in net.layers().iter().enumerate() {
        let w = &layer.weight;
        params.push((
            format!("net.weights[{l}]"),
            w.addr(),
            w.len().saturating_mul(el),
        ));
        if let Some(b) = &layer.bias {
            params.push((
                format!("net.biases[{l}]"),
                b.addr(),
                b.len().saturating_mul(el),
            ));
        }
        if let Precision::Diagonal(p) | Precision::PerSample(p) = &layer.precision {
            let name = format!("net.precision_diag[{l}]");
            ins.push((name, p.addr(), p.len().saturating_mul(4)));
        }
    }
    use crate::tensor::{borrowed, check_no_overlap};
    check_no_overlap(&borrowed(&ins), &borrowed(&params))
}

/// W_l -= lr grad_w[l] and b_l -= lr grad_b[l] (where the layer has a bias), in place, all or
/// nothing (settle::sgd_all): an update that would write a non-finite value writes nothing.
#[allow(clippy::too_many_arguments)]
unsafe fn apply_sgd<T: Element>(
    dev: &Device,
    net: &FepSettleNet,
    widths: &[usize],
    gw: &[*mut f32],
    gb: &[*mut f32],
    lr: f32,
    stream: Stream,
) -> Result<()> {
    let (mut params, mut grads) = (Vec::new(), Vec::new());
    for l in 0..widths.len() - 1 {
        let (n_w, n_b) = (widths[l + 1] * widths[l], widths[l + 1]);
        unsafe {
            let w = *net.weights.add(l);
            params.push(raw_view_mut::<T>(
                dev,
                w as u64,
                n_w,
                &format!("net.weights[{l}]"),
            ));
            grads.push(raw_view(dev, gw[l] as u64, n_w, &format!("grad_w[{l}]")));
            if !net.biases.is_null() && !(*net.biases.add(l)).is_null() {
                let b = *net.biases.add(l);
                params.push(raw_view_mut::<T>(
                    dev,
                    b as u64,
                    n_b,
                    &format!("net.biases[{l}]"),
                ));
                grads.push(raw_view(dev, gb[l] as u64, n_b, &format!("grad_b[{l}]")));
            }
        }
    }
    settle::sgd_all(&mut params, &grads, lr, None, stream)
}

/// SGD in log space on `count` positive f32 tensors (precisions), all or nothing:
/// p <- p exp(-lr p g) for every element, which keeps p > 0 for any lr (with p = exp(theta),
/// a plain SGD step on theta). `params[i]` and `grads[i]` hold `lens[i]` floats (grads as
/// fep_settle_learn's grad_pi returns them). When any gradient or new value is not finite or
/// not > 0, nothing is written: on the CPU the call returns FEP_ERR_DIVERGED; on a GPU the
/// update is skipped on the device without waiting, and *status (optional, device memory, one
/// u32) is set to 1 (0 when applied). lr finite and >= 0; the tensors must not overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_settle_sgd_log(
    kind: i32,
    ordinal: i32,
    stream: *mut c_void,
    count: u32,
    params: *const *mut f32,
    grads: *const *const f32,
    lens: *const u64,
    lr: f32,
    status: *mut u32,
) -> i32 {
    guard(|| {
        let dev = open_device(kind, ordinal)?;
        let n = count as usize;
        let (ps, gs, ls) = unsafe {
            (
                slice_of("params", params, n)?,
                slice_of("grads", grads, n)?,
                slice_of("lens", lens, n)?,
            )
        };
        let (mut pv, mut gv) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            non_null(&format!("params[{i}]"), ps[i])?;
            non_null(&format!("grads[{i}]"), gs[i])?;
            let len = usize_of(&format!("lens[{i}]"), ls[i])?;
            unsafe {
                pv.push(raw_view_mut::<f32>(
                    &dev,
                    ps[i] as u64,
                    len,
                    &format!("params[{i}]"),
                ));
                gv.push(raw_view::<f32>(
                    &dev,
                    gs[i] as u64,
                    len,
                    &format!("grads[{i}]"),
                ));
            }
        }
        let mut st = (!status.is_null())
            .then(|| unsafe { raw_view_mut::<u32>(&dev, status as u64, 1, "status") });
        settle::sgd_log_all(&mut pv, &gv, lr, st.as_mut(), raw_stream(stream))
    })
}

/// The largest stable step size for settling `net` (settle::max_stable_eta): with momentum in
/// [0, 1) and x_L clamped (clamped = 1, learning) or free (0), *eta_out receives
/// 2 (1 + momentum) / B, B an upper bound on the curvature of the energy near a settled state
/// (sum over layers of max(Pi_l) (1 + max|f_l'| ||W_l||_2)^2 over the free layers); steps up
/// to it never diverge near the minimum. `batch` sizes per-sample precisions (1 otherwise).
/// On a GPU the weights and diagonal precisions are copied back (the call waits). eta_out is
/// required.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_settle_max_stable_eta(
    kind: i32,
    ordinal: i32,
    net: *const FepSettleNet,
    batch: u64,
    momentum: f32,
    clamped: i32,
    eta_out: *mut f32,
) -> i32 {
    guard(|| {
        non_null("eta_out", eta_out)?;
        let net = unsafe { read_arg("net", net)? };
        let dev = open_device(kind, ordinal)?;
        let widths = unsafe { net_widths(&net)? };
        let batch = usize_of("batch", batch)?;
        if batch == 0 {
            return Err(Error::invalid("batch", "must be >= 1"));
        }
        let clamped = match clamped {
            0 | 1 => clamped == 1,
            other => {
                return Err(Error::invalid(
                    "clamped",
                    format!("must be 0 or 1, got {other}"),
                ));
            }
        };
        let eta = with_dtype!(net.dtype, T => {
            let network = unsafe { net_view::<T>(&dev, &net, &widths, batch)? };
            settle::max_stable_eta(&network, momentum, clamped)
        })?;
        unsafe { write_out("eta_out", eta_out, eta) }
    })
}
