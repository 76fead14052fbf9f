//! The C ABI: `include/fep_kernels.h`, kept in step with this file by tests/ffi_header.rs.
//!
//! Every entry point validates its pointers and sizes, returns a status code, and records a
//! message for [`fep_last_error`] on failure. No panic crosses the boundary: one that escaped
//! the library would be a bug, and is reported as `FEP_ERR_INTERNAL`.

#![allow(missing_docs, clippy::missing_safety_doc)]

use std::cell::RefCell;
use std::ffi::{CString, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use half::{bf16, f16};

use crate::backend::{Device, DeviceKind, Stream, View, ViewMut};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::lca::{Dictionary, DictionaryOptions, LcaOutputs, LcaSpec, Threshold};
use crate::settle::{
    self, Activation, Gradients, Init, Layer, Network, Precision, SettleOutputs, SettleSpec,
};

pub const FEP_ABI_VERSION: i32 = 1;

pub const FEP_OK: i32 = 0;
pub const FEP_ERR_INVALID_ARGUMENT: i32 = 1;
pub const FEP_ERR_NO_DEVICE: i32 = 2;
pub const FEP_ERR_DRIVER: i32 = 3;
pub const FEP_ERR_OUT_OF_MEMORY: i32 = 4;
pub const FEP_ERR_UNSUPPORTED: i32 = 5;
pub const FEP_ERR_INTERNAL: i32 = 6;

pub const FEP_DEVICE_CPU: i32 = 0;
pub const FEP_DEVICE_CUDA: i32 = 1;
pub const FEP_DEVICE_HIP: i32 = 2;

pub const FEP_DTYPE_F32: i32 = 0;
pub const FEP_DTYPE_F16: i32 = 1;
pub const FEP_DTYPE_BF16: i32 = 2;

pub const FEP_LCA_SOFT: i32 = 0;
pub const FEP_LCA_SOFT_NONNEG: i32 = 1;
pub const FEP_LCA_HARD: i32 = 2;
pub const FEP_LCA_HARD_NONNEG: i32 = 3;

pub const FEP_ACT_IDENTITY: i32 = 0;
pub const FEP_ACT_TANH: i32 = 1;
pub const FEP_ACT_RELU: i32 = 2;
pub const FEP_ACT_LEAKY_RELU: i32 = 3;
pub const FEP_ACT_SIGMOID: i32 = 4;
pub const FEP_ACT_GELU: i32 = 5;

pub const FEP_SETTLE_INIT_FEEDFORWARD: i32 = 0;
pub const FEP_SETTLE_INIT_GIVEN: i32 = 1;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `f`, turning an error or a panic into a status and a last-error message.
fn guard(f: impl FnOnce() -> Result<()>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => FEP_OK,
        Ok(Err(e)) => {
            set_last_error(e.to_string());
            e.status()
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            set_last_error(format!("internal error (a bug in fep-kernels): {what}"));
            FEP_ERR_INTERNAL
        }
    }
}

fn kind_from(code: i32) -> Result<DeviceKind> {
    match code {
        FEP_DEVICE_CPU => Ok(DeviceKind::Cpu),
        FEP_DEVICE_CUDA => Ok(DeviceKind::Cuda),
        FEP_DEVICE_HIP => Ok(DeviceKind::Hip),
        other => Err(Error::invalid(
            "kind",
            format!("{other} is not FEP_DEVICE_CPU, _CUDA or _HIP"),
        )),
    }
}

fn non_null<T>(name: &str, p: *const T) -> Result<()> {
    if p.is_null() {
        return Err(Error::invalid(name, "is NULL"));
    }
    Ok(())
}

fn usize_of(name: &str, v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::invalid(name, format!("{v} does not fit in memory")))
}

fn product(name: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::invalid(name, format!("{a} * {b} overflows")))
}

/// Runs `f` with the element type named by `dtype`.
macro_rules! with_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            FEP_DTYPE_F32 => {
                type $t = f32;
                $body
            }
            FEP_DTYPE_F16 => {
                type $t = f16;
                $body
            }
            FEP_DTYPE_BF16 => {
                type $t = bf16;
                $body
            }
            other => Err(Error::invalid(
                "dtype",
                format!("{other} is not FEP_DTYPE_F32, _F16 or _BF16"),
            )),
        }
    };
}

#[unsafe(no_mangle)]
pub extern "C" fn fep_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

#[unsafe(no_mangle)]
pub extern "C" fn fep_abi_version() -> i32 {
    FEP_ABI_VERSION
}

#[unsafe(no_mangle)]
pub extern "C" fn fep_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

#[unsafe(no_mangle)]
pub extern "C" fn fep_device_count(kind: i32) -> i32 {
    let mut count = 0;
    let status = guard(|| {
        count = Device::count(kind_from(kind)?) as i32;
        Ok(())
    });
    if status == FEP_OK { count } else { -status }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_device_name(
    kind: i32,
    ordinal: i32,
    buf: *mut c_char,
    len: u64,
) -> i32 {
    guard(|| {
        non_null("buf", buf)?;
        let len = usize_of("len", len)?;
        if len == 0 {
            return Err(Error::invalid(
                "len",
                "is 0: no room for the terminating NUL",
            ));
        }
        let ordinal = usize::try_from(ordinal)
            .map_err(|_| Error::invalid("ordinal", format!("{ordinal} is negative")))?;
        let name = Device::open(kind_from(kind)?, ordinal)?.name();
        let bytes = name.as_bytes();
        let n = bytes.len().min(len - 1);
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), n);
            *buf.add(n) = 0;
        }
        Ok(())
    })
}

/// The opaque `FepLcaDict` of the header.
pub struct FepLcaDict {
    dict: Dictionary,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepLcaParams {
    pub threshold: i32,
    pub lambda: f32,
    pub eta: f32,
    pub steps: u32,
    pub tol: f32,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_lca_dict_new(
    kind: i32,
    ordinal: i32,
    stream: *mut c_void,
    dtype: i32,
    phi: *const c_void,
    n: u64,
    m: u64,
    check_unit_norm: i32,
    out: *mut *mut FepLcaDict,
) -> i32 {
    guard(|| {
        non_null("out", out)?;
        non_null("phi", phi)?;
        let ordinal = usize::try_from(ordinal)
            .map_err(|_| Error::invalid("ordinal", format!("{ordinal} is negative")))?;
        let device = Device::open(kind_from(kind)?, ordinal)?;
        let (n, m) = (usize_of("n", n)?, usize_of("m", m)?);
        let len = product("phi", n, m)?;
        let opts = DictionaryOptions {
            check_unit_norm: check_unit_norm != 0,
        };
        let stream = raw_stream(stream);
        let dict = with_dtype!(dtype, T => {
            let view = unsafe { View::<T>::from_raw(&device, phi as u64, len) };
            Dictionary::new_on(&view, n, m, opts, stream)
        })?;
        unsafe { *out = Box::into_raw(Box::new(FepLcaDict { dict })) };
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_lca_dict_free(dict: *mut FepLcaDict) {
    if !dict.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(dict) })));
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_lca_dict_shape(
    dict: *const FepLcaDict,
    n: *mut u64,
    m: *mut u64,
) -> i32 {
    guard(|| {
        non_null("dict", dict)?;
        let d = unsafe { &(*dict).dict };
        unsafe {
            if !n.is_null() {
                *n = d.n() as u64;
            }
            if !m.is_null() {
                *m = d.m() as u64;
            }
        }
        Ok(())
    })
}

/// The caller's stream; NULL means the legacy default stream on a GPU.
fn raw_stream(stream: *mut c_void) -> Stream {
    unsafe { Stream::from_raw(stream) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_lca_dict_phi(
    dict: *const FepLcaDict,
    stream: *mut c_void,
    phi_out: *mut f32,
) -> i32 {
    guard(|| {
        non_null("dict", dict)?;
        non_null("phi_out", phi_out)?;
        let d = unsafe { &(*dict).dict };
        let mut out =
            unsafe { ViewMut::<f32>::from_raw(d.device(), phi_out as u64, d.n() * d.m()) };
        d.phi_into(&mut out, raw_stream(stream))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_lca_solve(
    dict: *const FepLcaDict,
    stream: *mut c_void,
    dtype: i32,
    x: *const c_void,
    batch: u64,
    params: *const FepLcaParams,
    u0: *const f32,
    u_out: *mut f32,
    a_out: *mut f32,
    energy_out: *mut f32,
    active_out: *mut u32,
    steps_out: *mut u32,
) -> i32 {
    guard(|| {
        non_null("dict", dict)?;
        non_null("params", params)?;
        non_null("x", x)?;
        non_null("u_out", u_out)?;
        non_null("a_out", a_out)?;
        let d = unsafe { &(*dict).dict };
        let p = unsafe { *params };
        let spec = LcaSpec {
            threshold: Threshold::from_code(p.threshold)?,
            lambda: p.lambda,
            eta: p.eta,
            steps: p.steps,
            tol: p.tol,
            trace: !energy_out.is_null() || !active_out.is_null(),
            check_finite: true,
        };
        let batch = usize_of("batch", batch)?;
        let dev = d.device();
        let bm = product("batch", batch, d.m())?;
        let bt = product("batch", batch, p.steps as usize)?;
        // Views of the caller's memory; lengths follow from batch, n, m and steps.
        unsafe {
            let u0 = (!u0.is_null()).then(|| View::<f32>::from_raw(dev, u0 as u64, bm));
            let out = LcaOutputs {
                u: ViewMut::from_raw(dev, u_out as u64, bm),
                a: ViewMut::from_raw(dev, a_out as u64, bm),
                energy: (!energy_out.is_null())
                    .then(|| ViewMut::from_raw(dev, energy_out as u64, bt)),
                active: (!active_out.is_null())
                    .then(|| ViewMut::from_raw(dev, active_out as u64, bt)),
                steps: (!steps_out.is_null())
                    .then(|| ViewMut::from_raw(dev, steps_out as u64, batch)),
            };
            let n = d.n();
            with_dtype!(dtype, T => solve_typed::<T>(d, &spec, x, product("batch", batch, n)?, u0.as_ref(), out, raw_stream(stream)))
        }
    })
}

unsafe fn solve_typed<T: Element>(
    d: &Dictionary,
    spec: &LcaSpec,
    x: *const c_void,
    len: usize,
    u0: Option<&View<'_, f32>>,
    out: LcaOutputs<'_>,
    stream: Stream,
) -> Result<()> {
    let x = unsafe { View::<T>::from_raw(d.device(), x as u64, len) };
    d.solve_into(spec, &x, u0, out, stream)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_lca_dict_learn(
    dict: *mut FepLcaDict,
    stream: *mut c_void,
    dtype: i32,
    x: *const c_void,
    a: *const f32,
    batch: u64,
    lr: f32,
) -> i32 {
    guard(|| {
        non_null("dict", dict)?;
        non_null("x", x)?;
        non_null("a", a)?;
        let d = unsafe { &mut (*dict).dict };
        let batch = usize_of("batch", batch)?;
        let dev = d.device().clone();
        let a = unsafe { View::<f32>::from_raw(&dev, a as u64, product("batch", batch, d.m())?) };
        let len = product("batch", batch, d.n())?;
        let stream = raw_stream(stream);
        with_dtype!(dtype, T => {
            let x = unsafe { View::<T>::from_raw(&dev, x as u64, len) };
            d.learn(&x, &a, lr, stream)
        })
    })
}

// ---- predictive-coding settling ---------------------------------------------------------------

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

/// `len` entries of a C array, or an error naming it when it is NULL.
unsafe fn slice_of<'a, T>(name: &str, p: *const T, len: usize) -> Result<&'a [T]> {
    non_null(name, p)?;
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
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

fn open_device(kind: i32, ordinal: i32) -> Result<Device> {
    let ordinal = usize::try_from(ordinal)
        .map_err(|_| Error::invalid("ordinal", format!("{ordinal} is negative")))?;
    Device::open(kind_from(kind)?, ordinal)
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
