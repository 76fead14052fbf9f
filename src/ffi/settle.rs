//! The C ABI of predictive-coding settling: the `FEP_ACT_*` and `FEP_SETTLE_INIT_*` codes, the
//! `FepSettleNet` description and `FepSettleParams`, and `fep_settle_infer` /
//! `fep_settle_learn`.

use std::ffi::c_void;

use super::{guard, non_null, open_device, product, raw_stream, slice_of, usize_of};
use crate::backend::{Device, Stream, View, ViewMut};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::settle::{
    self, Activation, Gradients, Init, Layer, Network, Precision, SettleOutputs, SettleSpec,
};

pub const FEP_ACT_IDENTITY: i32 = 0;
pub const FEP_ACT_TANH: i32 = 1;
pub const FEP_ACT_RELU: i32 = 2;
pub const FEP_ACT_LEAKY_RELU: i32 = 3;
pub const FEP_ACT_SIGMOID: i32 = 4;
pub const FEP_ACT_GELU: i32 = 5;

pub const FEP_SETTLE_INIT_FEEDFORWARD: i32 = 0;
pub const FEP_SETTLE_INIT_GIVEN: i32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepSettleNet {
    pub layers: u32,
    pub widths: *const u64,
    pub activations: *const i32,
    pub leaky_alpha: *const f32,
    pub dtype: i32,
    pub weights: *const *mut c_void,
    pub biases: *const *mut c_void,
    pub precision: *const f32,
    pub precision_diag: *const *const f32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepSettleParams {
    pub eta: f32,
    pub momentum: f32,
    pub steps: u32,
    pub tol: f32,
    pub init: i32,
    pub skip_input_checks: i32,
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
    w.iter().map(|&v| usize_of("net.widths", v)).collect()
}

/// Views of a C network description on `dev` (lengths follow from the widths).
unsafe fn net_view<'a, T: Element>(
    dev: &Device,
    net: &FepSettleNet,
    widths: &[usize],
) -> Result<Network<'a, T>> {
    let depth = widths.len() - 1;
    let acts = unsafe { slice_of("net.activations", net.activations, depth)? };
    let weights = unsafe { slice_of("net.weights", net.weights, depth)? };
    let mut layers = Vec::with_capacity(depth);
    for l in 0..depth {
        let (n, n_in) = (widths[l + 1], widths[l]);
        let alpha = if net.leaky_alpha.is_null() {
            0.01
        } else {
            unsafe { *net.leaky_alpha.add(l) }
        };
        non_null(&format!("net.weights[{l}]"), weights[l])?;
        let w =
            unsafe { View::<T>::from_raw(dev, weights[l] as u64, product("net.widths", n, n_in)?) };
        // A diagonal where given, else the scalar (1 without a scalar array).
        let diag = if net.precision_diag.is_null() {
            std::ptr::null()
        } else {
            unsafe { *net.precision_diag.add(l) }
        };
        let precision = if !diag.is_null() {
            Precision::Diagonal(unsafe { View::from_raw(dev, diag as u64, n) })
        } else if net.precision.is_null() {
            Precision::Scalar(1.0)
        } else {
            Precision::Scalar(unsafe { *net.precision.add(l) })
        };
        let mut layer = Layer::new(w, Activation::from_code(acts[l], alpha)?, precision);
        if !net.biases.is_null() {
            let b = unsafe { *net.biases.add(l) };
            if !b.is_null() {
                layer = layer.bias(unsafe { View::from_raw(dev, b as u64, n) });
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
    Ok(SettleSpec {
        eta: p.eta,
        momentum: p.momentum,
        steps: p.steps,
        tol: p.tol,
        init,
        check_finite: p.skip_input_checks == 0,
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
            .push(unsafe { ViewMut::from_raw(dev, xs[l] as u64, len) });
        out.eps
            .push(unsafe { ViewMut::from_raw(dev, es[l] as u64, len) });
    }
    let t1 = product("batch", batch, steps as usize + 1)?;
    unsafe {
        out.energy =
            (!energy_out.is_null()).then(|| ViewMut::from_raw(dev, energy_out as u64, batch));
        out.trace = (!trace_out.is_null()).then(|| ViewMut::from_raw(dev, trace_out as u64, t1));
        out.steps = (!steps_out.is_null()).then(|| ViewMut::from_raw(dev, steps_out as u64, batch));
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
    non_null("net", net)?;
    non_null("params", params)?;
    non_null("x0", x0)?;
    let (net, p) = unsafe { (*net, *params) };
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
    unsafe fn rows<'a>(&self, ptr: *const f32, per_sample: usize) -> Result<View<'a, f32>> {
        let len = product("batch", self.batch, per_sample)?;
        Ok(unsafe { View::from_raw(&self.dev, ptr as u64, len) })
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
        let x0 = unsafe { c.rows(x0, c.widths[0])? };
        let out = unsafe { c.outputs(x_out, eps_out, energy_out, trace_out, steps_out)? };
        let stream = raw_stream(stream);
        with_dtype!(c.net.dtype, T => {
            let network = unsafe { net_view::<T>(&c.dev, &c.net, &c.widths)? };
            settle::infer_into(&network, &c.spec, &x0, out, stream)
        })
    })
}

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
        let x0 = unsafe { c.rows(x0, widths[0])? };
        let target = unsafe { c.rows(target, widths[depth])? };
        let out = unsafe { c.outputs(x_out, eps_out, energy_out, trace_out, steps_out)? };
        let gw = unsafe { slice_of("grad_w", grad_w, depth)? };
        let gb = unsafe { slice_of("grad_b", grad_b, depth)? };
        let mut grads = Gradients {
            weights: Vec::new(),
            biases: Vec::new(),
        };
        for l in 0..depth {
            non_null(&format!("grad_w[{l}]"), gw[l])?;
            non_null(&format!("grad_b[{l}]"), gb[l])?;
            let n_w = product("net.widths", widths[l + 1], widths[l])?;
            unsafe {
                grads
                    .weights
                    .push(ViewMut::from_raw(dev, gw[l] as u64, n_w));
                grads
                    .biases
                    .push(ViewMut::from_raw(dev, gb[l] as u64, widths[l + 1]));
            }
        }
        let stream = raw_stream(stream);
        with_dtype!(c.net.dtype, T => {
            let network = unsafe { net_view::<T>(dev, &c.net, widths)? };
            settle::learn_step_into(&network, &c.spec, &x0, &target, out, grads, stream)?;
            if lr > 0.0 {
                unsafe { apply_sgd::<T>(dev, &c.net, widths, gw, gb, lr, stream) }
            } else {
                Ok(())
            }
        })
    })
}

/// W_l -= lr grad_w[l] and b_l -= lr grad_b[l] (where the layer has a bias), in place.
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
    for l in 0..widths.len() - 1 {
        let n_w = widths[l + 1] * widths[l];
        unsafe {
            let w = *net.weights.add(l);
            let mut wv = ViewMut::<T>::from_raw(dev, w as u64, n_w);
            settle::sgd(&mut wv, &View::from_raw(dev, gw[l] as u64, n_w), lr, stream)?;
            if !net.biases.is_null() && !(*net.biases.add(l)).is_null() {
                let b = *net.biases.add(l);
                let mut bv = ViewMut::<T>::from_raw(dev, b as u64, widths[l + 1]);
                settle::sgd(
                    &mut bv,
                    &View::from_raw(dev, gb[l] as u64, widths[l + 1]),
                    lr,
                    stream,
                )?;
            }
        }
    }
    Ok(())
}
