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
use crate::vmp::{
    self, FpiSpec, LearnSpec, Method, Model, ModelSpec, Obs, PolicyOutputs, PolicySpec,
    SequenceOutputs, SequenceSpec, StatesOutputs,
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

pub const FEP_VMP_OBS_INDEX: i32 = 0;
pub const FEP_VMP_OBS_DIST: i32 = 1;

pub const FEP_VMP_METHOD_VMP: i32 = 0;
pub const FEP_VMP_METHOD_MMP: i32 = 1;

pub const FEP_VMP_COUNTS_A: i32 = 0;
pub const FEP_VMP_COUNTS_B: i32 = 1;
pub const FEP_VMP_COUNTS_D: i32 = 2;

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

// ---- variational message passing -------------------------------------------------------------

/// The opaque `FepVmpModel` of the header: a validated model on one device.
pub struct FepVmpModel {
    model: Model,
}

/// A generative model in pymdp's layouts (see [`ModelSpec`]), every array in host memory.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepVmpModelDesc {
    pub num_factors: u64,
    pub num_modalities: u64,
    pub num_states: *const u64,
    pub num_controls: *const u64,
    pub num_obs: *const u64,
    pub a_num_deps: *const u64,
    pub a_deps: *const u64,
    pub a: *const *const f64,
    pub b: *const *const f64,
    pub c: *const *const f64,
    pub d: *const *const f64,
    pub policies: *const i32,
    pub num_policies: u64,
    pub policy_len: u64,
    pub e: *const f64,
    pub pa: *const *const f64,
    pub pb: *const *const f64,
    pub pd: *const *const f64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepVmpFpiParams {
    pub num_iter: u32,
    pub tol: f32,
    pub skip_input_checks: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepVmpSequenceParams {
    pub method: i32,
    pub num_iter: u32,
    pub tau: f32,
    pub skip_input_checks: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepVmpPolicyParams {
    pub gamma: f32,
    pub utility: i32,
    pub state_info_gain: i32,
    pub param_info_gain: i32,
    pub skip_input_checks: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepVmpLearnParams {
    pub lr_a: f32,
    pub lr_b: f32,
    pub lr_d: f32,
    pub skip_input_checks: i32,
}

/// The most factors or modalities a description may name (a guard against a garbage count
/// making the library read far past the caller's arrays).
const VMP_MAX_LIST: u64 = 1 << 16;

/// Copies of the `F` or `M` host tensors of a `double *const *` list, tensor `i` having
/// `lens[i]` elements. A NULL list is `None`; a NULL entry is an error unless `fill` gives its
/// value (C's zeros, D's uniform).
unsafe fn host_tensors(
    name: &str,
    list: *const *const f64,
    lens: &[usize],
    fill: Option<&dyn Fn(usize) -> f64>,
) -> Result<Option<Vec<Vec<f64>>>> {
    if list.is_null() {
        return Ok(None);
    }
    let ptrs = unsafe { slice_of(name, list, lens.len())? };
    let mut out = Vec::with_capacity(lens.len());
    for (i, (&p, &len)) in ptrs.iter().zip(lens).enumerate() {
        out.push(match (p.is_null(), fill) {
            (true, Some(fill)) => vec![fill(len); len],
            _ => unsafe { slice_of(&format!("{name}[{i}]"), p, len)? }.to_vec(),
        });
    }
    Ok(Some(out))
}

/// `len` sizes from a `uint64_t` array.
unsafe fn host_sizes(name: &str, p: *const u64, len: usize) -> Result<Vec<usize>> {
    let v = unsafe { slice_of(name, p, len)? };
    v.iter().map(|&x| usize_of(name, x)).collect()
}

/// The product of `dims`, or an error naming `name` when it overflows.
fn dims_product(name: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| product(name, acc, d))
}

/// The [`ModelSpec`] of a C description: its arrays copied, their lengths derived from the
/// sizes (checked against overflow and the factor count before anything is read).
unsafe fn model_spec(d: &FepVmpModelDesc) -> Result<ModelSpec> {
    let list_len = |name: &str, v: u64| -> Result<usize> {
        if v == 0 || v > VMP_MAX_LIST {
            return Err(Error::invalid(
                name,
                format!("must be in 1..={VMP_MAX_LIST}, got {v}"),
            ));
        }
        Ok(v as usize)
    };
    let f_count = list_len("desc.num_factors", d.num_factors)?;
    let m_count = list_len("desc.num_modalities", d.num_modalities)?;
    let num_states = unsafe { host_sizes("desc.num_states", d.num_states, f_count)? };
    let num_controls = if d.num_controls.is_null() {
        Vec::new()
    } else {
        unsafe { host_sizes("desc.num_controls", d.num_controls, f_count)? }
    };
    let num_obs = unsafe { host_sizes("desc.num_obs", d.num_obs, m_count)? };
    let dep_counts = unsafe { host_sizes("desc.a_num_deps", d.a_num_deps, m_count)? };
    if let Some(m) = dep_counts.iter().position(|&c| c > f_count) {
        return Err(Error::invalid(
            "desc.a_num_deps",
            format!(
                "entry {m} is {}, more than the {f_count} factors",
                dep_counts[m]
            ),
        ));
    }
    let flat = unsafe { host_sizes("desc.a_deps", d.a_deps, dep_counts.iter().sum())? };
    let mut a_deps = Vec::with_capacity(m_count);
    let mut a_lens = Vec::with_capacity(m_count);
    let mut rest = flat.as_slice();
    for (m, &count) in dep_counts.iter().enumerate() {
        let (deps, tail) = rest.split_at(count);
        rest = tail;
        let name = format!("desc.a_deps[{m}]");
        let mut dims = vec![num_obs[m]];
        for &dep in deps {
            let s = num_states.get(dep).ok_or_else(|| {
                Error::invalid(
                    &name,
                    format!("factor {dep} is out of range (there are {f_count} factors)"),
                )
            })?;
            dims.push(*s);
        }
        a_lens.push(dims_product(&name, &dims)?);
        a_deps.push(deps.to_vec());
    }
    let b_lens = (0..f_count)
        .map(|f| {
            let u = num_controls.get(f).copied().unwrap_or(1);
            dims_product("desc.num_states", &[num_states[f], num_states[f], u])
        })
        .collect::<Result<Vec<_>>>()?;
    let zeros = |_: usize| 0.0;
    let uniform = |len: usize| 1.0 / len as f64;
    let required = |name: &str, list, lens: &[usize]| -> Result<Vec<Vec<f64>>> {
        non_null(name, list)?;
        Ok(unsafe { host_tensors(name, list, lens, None)? }.unwrap_or_default())
    };
    let optional = |name: &str, list, lens: &[usize], fill: Option<&dyn Fn(usize) -> f64>| {
        Ok::<_, Error>(unsafe { host_tensors(name, list, lens, fill)? }.unwrap_or_default())
    };
    let (num_policies, policy_len) = (
        usize_of("desc.num_policies", d.num_policies)?,
        usize_of("desc.policy_len", d.policy_len)?,
    );
    let policies = match (d.policies.is_null(), num_policies) {
        (true, 0) => Vec::new(),
        (true, p) => {
            return Err(Error::invalid(
                "desc.policies",
                format!("is NULL but desc.num_policies is {p}"),
            ));
        }
        (false, 0) => {
            return Err(Error::invalid(
                "desc.num_policies",
                "is 0 with a policy table given",
            ));
        }
        (false, _) if policy_len == 0 => {
            return Err(Error::invalid(
                "desc.policy_len",
                "is 0 with a policy table given",
            ));
        }
        (false, p) => {
            let len = dims_product("desc.num_policies", &[p, policy_len, f_count])?;
            unsafe { slice_of("desc.policies", d.policies, len)? }.to_vec()
        }
    };
    let e = if d.e.is_null() {
        Vec::new()
    } else if policies.is_empty() {
        return Err(Error::invalid("desc.e", "given without policies"));
    } else {
        unsafe { slice_of("desc.e", d.e, num_policies)? }.to_vec()
    };
    Ok(ModelSpec {
        a: required("desc.a", d.a, &a_lens)?,
        b: required("desc.b", d.b, &b_lens)?,
        c: optional("desc.c", d.c, &num_obs, Some(&zeros))?,
        d: optional("desc.d", d.d, &num_states, Some(&uniform))?,
        pa: optional("desc.pa", d.pa, &a_lens, None)?,
        pb: optional("desc.pb", d.pb, &b_lens, None)?,
        pd: optional("desc.pd", d.pd, &num_states, None)?,
        num_states,
        num_controls,
        num_obs,
        a_deps,
        policies,
        policy_len: if num_policies == 0 { 0 } else { policy_len },
        e,
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_vmp_model_new(
    kind: i32,
    ordinal: i32,
    desc: *const FepVmpModelDesc,
    out: *mut *mut FepVmpModel,
) -> i32 {
    guard(|| {
        non_null("out", out)?;
        non_null("desc", desc)?;
        let spec = unsafe { model_spec(&*desc)? };
        let device = open_device(kind, ordinal)?;
        // The model's own checks name ModelSpec's fields: the C caller knows them as desc.*.
        let model = Model::new(&device, &spec).map_err(|e| match e {
            Error::InvalidArgument { name, reason } => Error::InvalidArgument {
                name: format!("desc.{name}"),
                reason,
            },
            other => other,
        })?;
        unsafe { *out = Box::into_raw(Box::new(FepVmpModel { model })) };
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_vmp_model_free(model: *mut FepVmpModel) {
    if !model.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(model) })));
    }
}

/// The model behind a handle, or an error naming `model` when it is NULL.
unsafe fn vmp_model<'m>(model: *const FepVmpModel) -> Result<&'m Model> {
    non_null("model", model)?;
    Ok(unsafe { &(*model).model })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_vmp_model_info(
    model: *const FepVmpModel,
    num_factors: *mut u64,
    num_modalities: *mut u64,
    belief_len: *mut u64,
    obs_len: *mut u64,
    num_policies: *mut u64,
    policy_len: *mut u64,
) -> i32 {
    guard(|| {
        let m = unsafe { vmp_model(model)? };
        for (p, v) in [
            (num_factors, m.num_states().len()),
            (num_modalities, m.num_obs().len()),
            (belief_len, m.belief_len()),
            (obs_len, m.obs_len()),
            (num_policies, m.num_policies()),
            (policy_len, m.policy_len()),
        ] {
            if !p.is_null() {
                unsafe { *p = v as u64 };
            }
        }
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_vmp_model_counts(
    model: *const FepVmpModel,
    stream: *mut c_void,
    which: i32,
    index: u64,
    out: *mut f64,
    len: u64,
) -> i32 {
    guard(|| {
        let m = unsafe { vmp_model(model)? };
        non_null("out", out)?;
        let i = usize_of("index", index)?;
        // The counts are read on the device's own stream: first let a learning step enqueued
        // on the caller's stream finish.
        m.device().synchronize(raw_stream(stream))?;
        let (counts, field) = match which {
            FEP_VMP_COUNTS_A => (m.counts_a(i)?, "pa"),
            FEP_VMP_COUNTS_B => (m.counts_b(i)?, "pb"),
            FEP_VMP_COUNTS_D => (m.counts_d(i)?, "pd"),
            other => {
                return Err(Error::invalid(
                    "which",
                    format!("{other} is not FEP_VMP_COUNTS_A, _B or _D"),
                ));
            }
        };
        let counts = counts.ok_or_else(|| {
            Error::invalid(
                "which",
                format!("the model has no Dirichlet counts {field} (desc.{field} was NULL)"),
            )
        })?;
        if usize_of("len", len)? != counts.len() {
            return Err(Error::invalid(
                "len",
                format!("is {len}, but {field}[{i}] has {} elements", counts.len()),
            ));
        }
        unsafe { std::ptr::copy_nonoverlapping(counts.as_ptr(), out, counts.len()) };
        Ok(())
    })
}

/// What every VMP call reads first, every pointer checked: the model, the params, the batch
/// size n (>= 1) and the caller's stream. Its methods make views of the caller's memory on the
/// model's device, `n` times a per-agent length each.
struct VmpCall<'m, P> {
    model: &'m Model,
    params: P,
    n: usize,
    stream: Stream,
}

unsafe fn vmp_call<'m, P: Copy>(
    model: *const FepVmpModel,
    params: *const P,
    n: u64,
    stream: *mut c_void,
) -> Result<VmpCall<'m, P>> {
    let model = unsafe { vmp_model(model)? };
    non_null("params", params)?;
    let n = usize_of("n", n)?;
    if n == 0 {
        return Err(Error::invalid("n", "is 0 (a batch has at least one agent)"));
    }
    Ok(VmpCall {
        model,
        params: unsafe { *params },
        n,
        stream: raw_stream(stream),
    })
}

impl<P> VmpCall<'_, P> {
    /// A view of `per_agent` elements per agent at `p` (required).
    unsafe fn input<'a, T: bytemuck::Pod>(
        &self,
        name: &str,
        p: *const T,
        per_agent: usize,
    ) -> Result<View<'a, T>> {
        non_null(name, p)?;
        let len = product(name, self.n, per_agent)?;
        Ok(unsafe { View::from_raw(self.model.device(), p as u64, len) })
    }

    /// As [`Self::input`], `None` for NULL.
    unsafe fn opt_input<'a, T: bytemuck::Pod>(
        &self,
        name: &str,
        p: *const T,
        per_agent: usize,
    ) -> Result<Option<View<'a, T>>> {
        if p.is_null() {
            return Ok(None);
        }
        unsafe { self.input(name, p, per_agent).map(Some) }
    }

    /// A writable view of `per_agent` elements per agent at `p` (required).
    unsafe fn output<'a, T: bytemuck::Pod>(
        &self,
        name: &str,
        p: *mut T,
        per_agent: usize,
    ) -> Result<ViewMut<'a, T>> {
        non_null(name, p)?;
        let len = product(name, self.n, per_agent)?;
        Ok(unsafe { ViewMut::from_raw(self.model.device(), p as u64, len) })
    }

    /// As [`Self::output`], `None` for NULL (the output is skipped).
    unsafe fn opt_output<'a, T: bytemuck::Pod>(
        &self,
        name: &str,
        p: *mut T,
        per_agent: usize,
    ) -> Result<Option<ViewMut<'a, T>>> {
        if p.is_null() {
            return Ok(None);
        }
        unsafe { self.output(name, p, per_agent).map(Some) }
    }

    /// The observations of `steps` steps per agent: `[n, steps, M]` int32 indices or
    /// `[n, steps, ΣO]` f32 distributions, as `kind` says.
    unsafe fn obs<'a>(&self, kind: i32, p: *const c_void, steps: usize) -> Result<Obs<'a>> {
        let width = match kind {
            FEP_VMP_OBS_INDEX => self.model.num_obs().len(),
            FEP_VMP_OBS_DIST => self.model.obs_len(),
            other => {
                return Err(Error::invalid(
                    "obs_kind",
                    format!("{other} is not FEP_VMP_OBS_INDEX or FEP_VMP_OBS_DIST"),
                ));
            }
        };
        let per_agent = product("steps", steps, width)?;
        Ok(unsafe {
            if kind == FEP_VMP_OBS_INDEX {
                Obs::Index(self.input("obs", p.cast::<i32>(), per_agent)?)
            } else {
                Obs::Dist(self.input("obs", p.cast::<f32>(), per_agent)?)
            }
        })
    }

    /// The past actions of windows of `steps` steps, `[n, steps - 1, F]`, or `None` for NULL.
    unsafe fn actions<'a>(&self, p: *const i32, steps: usize) -> Result<Option<View<'a, i32>>> {
        let per_agent = product(
            "steps",
            steps.saturating_sub(1),
            self.model.num_states().len(),
        )?;
        unsafe { self.opt_input("actions", p, per_agent) }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_vmp_infer_states(
    model: *const FepVmpModel,
    stream: *mut c_void,
    params: *const FepVmpFpiParams,
    obs_kind: i32,
    obs: *const c_void,
    n: u64,
    prior: *const f32,
    qs: *mut f32,
    vfe: *mut f32,
    iterations: *mut i32,
    vfe_trace: *mut f32,
) -> i32 {
    guard(|| unsafe {
        let c = vmp_call(model, params, n, stream)?;
        let p = c.params;
        let spec = FpiSpec {
            num_iter: p.num_iter,
            tol: p.tol,
            check_inputs: p.skip_input_checks == 0,
        };
        let s = c.model.belief_len();
        let obs = c.obs(obs_kind, obs, 1)?;
        let prior = c.opt_input("prior", prior, s)?;
        let out = StatesOutputs {
            qs: c.output("qs", qs, s)?,
            vfe: c.opt_output("vfe", vfe, 1)?,
            iterations: c.opt_output("iterations", iterations, 1)?,
            vfe_trace: c.opt_output("vfe_trace", vfe_trace, p.num_iter as usize)?,
        };
        vmp::infer_states_into(c.model, &spec, &obs, prior.as_ref(), out, c.stream)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_vmp_infer_sequence(
    model: *const FepVmpModel,
    stream: *mut c_void,
    params: *const FepVmpSequenceParams,
    steps: u64,
    obs_kind: i32,
    obs: *const c_void,
    n: u64,
    actions: *const i32,
    prior: *const f32,
    qs: *mut f32,
    vfe: *mut f32,
    vfe_t: *mut f32,
) -> i32 {
    guard(|| unsafe {
        let c = vmp_call(model, params, n, stream)?;
        let p = c.params;
        let spec = SequenceSpec {
            method: Method::from_code(p.method)?,
            num_iter: p.num_iter,
            tau: p.tau,
            check_inputs: p.skip_input_checks == 0,
        };
        let steps = usize_of("steps", steps)?;
        let s = c.model.belief_len();
        let obs = c.obs(obs_kind, obs, steps)?;
        let actions = c.actions(actions, steps)?;
        let prior = c.opt_input("prior", prior, s)?;
        let out = SequenceOutputs {
            qs: c.output("qs", qs, product("steps", steps, s)?)?,
            vfe: c.opt_output("vfe", vfe, 1)?,
            vfe_t: c.opt_output("vfe_t", vfe_t, steps)?,
        };
        vmp::infer_sequence_into(
            c.model,
            &spec,
            steps,
            &obs,
            actions.as_ref(),
            prior.as_ref(),
            out,
            c.stream,
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_vmp_infer_policies(
    model: *const FepVmpModel,
    stream: *mut c_void,
    params: *const FepVmpPolicyParams,
    qs: *const f32,
    n: u64,
    g: *mut f32,
    q_pi: *mut f32,
) -> i32 {
    guard(|| unsafe {
        let c = vmp_call(model, params, n, stream)?;
        let p = c.params;
        let spec = PolicySpec {
            gamma: p.gamma,
            utility: p.utility != 0,
            state_info_gain: p.state_info_gain != 0,
            param_info_gain: p.param_info_gain != 0,
            check_inputs: p.skip_input_checks == 0,
        };
        let num_policies = c.model.num_policies();
        if num_policies == 0 {
            // Before the outputs: with no policies there is nothing to allocate for them.
            return Err(Error::invalid(
                "model",
                "has no policy table (desc.policies was NULL)",
            ));
        }
        let qs = c.input("qs", qs, c.model.belief_len())?;
        let out = PolicyOutputs {
            g: c.opt_output("g", g, num_policies)?,
            q_pi: c.output("q_pi", q_pi, num_policies)?,
        };
        vmp::infer_policies_into(c.model, &spec, &qs, out, c.stream)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_vmp_learn(
    model: *mut FepVmpModel,
    stream: *mut c_void,
    params: *const FepVmpLearnParams,
    steps: u64,
    obs_kind: i32,
    obs: *const c_void,
    n: u64,
    qs: *const f32,
    actions: *const i32,
) -> i32 {
    guard(|| unsafe {
        let (spec, steps, obs, qs, actions, stream) = {
            let c = vmp_call(model, params, n, stream)?;
            let p = c.params;
            let spec = LearnSpec {
                lr_a: p.lr_a,
                lr_b: p.lr_b,
                lr_d: p.lr_d,
                check_inputs: p.skip_input_checks == 0,
            };
            let steps = usize_of("steps", steps)?;
            let per_agent = product("steps", steps, c.model.belief_len())?;
            (
                spec,
                steps,
                c.obs(obs_kind, obs, steps)?,
                c.input("qs", qs, per_agent)?,
                c.actions(actions, steps)?,
                c.stream,
            )
        };
        // The views own no borrow of the model: learning may now take it mutably.
        let model = &mut (*model).model;
        vmp::learn(model, &spec, steps, &obs, &qs, actions.as_ref(), stream)
    })
}

// ---- precision-weighted attention -------------------------------------------------------------

use crate::attention::{
    self, AttentionOutputs, AttentionSpec, BackwardInputs, Gradients as AttnGradients, MergeParts,
    Precisions, Score, Tensor4, Tensor4Mut,
};

pub const FEP_SCORE_DOT: i32 = 0;
pub const FEP_SCORE_GAUSSIAN: i32 = 1;
pub const FEP_SCORE_STUDENT_T: i32 = 2;
pub const FEP_SCORE_LAPLACE: i32 = 3;

/// A `[B, H, L, D]` tensor: element strides of B, H and L, the last dimension contiguous.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepAttnTensor {
    pub data: *mut c_void,
    pub shape: [u64; 4],
    pub strides: [u64; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FepAttentionParams {
    pub score: i32,
    pub nu: f32,
    pub scale: f64,
    pub causal: i32,
    pub window: i32,
    pub normalizer: i32,
    pub skip_input_checks: i32,
}

fn attention_spec(p: &FepAttentionParams) -> Result<AttentionSpec> {
    let score = match p.score {
        FEP_SCORE_DOT => Score::Dot,
        FEP_SCORE_GAUSSIAN => Score::Gaussian,
        FEP_SCORE_STUDENT_T => {
            if !(p.nu.is_finite() && p.nu > 0.0) {
                return Err(Error::invalid(
                    "params.nu",
                    format!(
                        "must be finite and > 0 for FEP_SCORE_STUDENT_T, got {}",
                        p.nu
                    ),
                ));
            }
            Score::StudentT(p.nu)
        }
        FEP_SCORE_LAPLACE => Score::Laplace,
        other => {
            return Err(Error::invalid(
                "params.score",
                format!("{other} is not FEP_SCORE_DOT, _GAUSSIAN, _STUDENT_T or _LAPLACE"),
            ));
        }
    };
    let mut spec = AttentionSpec::new(score)
        .causal(p.causal != 0)
        .normalizer(p.normalizer != 0)
        .check_inputs(p.skip_input_checks == 0);
    // <= 0 or NaN: the default τ; +∞ is an error.
    if p.scale > 0.0 {
        if !p.scale.is_finite() {
            return Err(Error::invalid(
                "params.scale",
                format!(
                    "must be finite (or <= 0 / NaN for the default), got {}",
                    p.scale
                ),
            ));
        }
        spec = spec.scale(p.scale);
    }
    match p.window {
        0 => {}
        w if w > 0 => spec = spec.window(w as u32),
        w => {
            return Err(Error::invalid(
                "params.window",
                format!("must be >= 0 (0: no window), got {w}"),
            ));
        }
    }
    Ok(spec)
}

/// A checked C tensor description: shape, strides and the number of elements it addresses.
struct AttnDesc {
    data: *mut c_void,
    shape: [usize; 4],
    strides: [usize; 3],
    extent: usize,
}

unsafe fn attn_desc(name: &str, t: *const FepAttnTensor) -> Result<AttnDesc> {
    non_null(name, t)?;
    let t = unsafe { *t };
    non_null(&format!("{name}.data"), t.data)?;
    let mut shape = [0usize; 4];
    for (i, &s) in t.shape.iter().enumerate() {
        shape[i] = usize_of(&format!("{name}.shape"), s)?;
    }
    let mut strides = [0usize; 3];
    for (i, &s) in t.strides.iter().enumerate() {
        strides[i] = usize_of(&format!("{name}.strides"), s)?;
    }
    // The largest element offset + 1 (0 for an empty tensor: the Rust API names the zero
    // dimension).
    let extent = if shape.contains(&0) {
        0
    } else {
        let overflow = || {
            Error::invalid(
                format!("{name}.strides"),
                format!("shape {shape:?} with strides {strides:?} overflows the address space"),
            )
        };
        let mut e = shape[3];
        for i in 0..3 {
            e = (shape[i] - 1)
                .checked_mul(strides[i])
                .and_then(|x| x.checked_add(e))
                .ok_or_else(overflow)?;
        }
        e.checked_mul(8).ok_or_else(overflow)?;
        e
    };
    Ok(AttnDesc {
        data: t.data,
        shape,
        strides,
        extent,
    })
}

impl AttnDesc {
    unsafe fn view<'a, T: Element>(&self, dev: &Device) -> Tensor4<'a, T> {
        Tensor4 {
            data: unsafe { View::from_raw(dev, self.data as u64, self.extent) },
            shape: self.shape,
            strides: self.strides,
        }
    }

    unsafe fn view_mut<'a, T: Element>(&self, dev: &Device) -> Tensor4Mut<'a, T> {
        Tensor4Mut {
            data: unsafe { ViewMut::from_raw(dev, self.data as u64, self.extent) },
            shape: self.shape,
            strides: self.strides,
        }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_attention_forward(
    kind: i32,
    ordinal: i32,
    stream: *mut c_void,
    params: *const FepAttentionParams,
    dtype: i32,
    q: *const FepAttnTensor,
    k: *const FepAttnTensor,
    v: *const FepAttnTensor,
    pi_head: *const f32,
    pi_key: *const f32,
    kv_len: *const i32,
    o: *const FepAttnTensor,
    lse: *mut f32,
    e: *mut f32,
) -> i32 {
    guard(|| {
        non_null("params", params)?;
        let spec = attention_spec(unsafe { &*params })?;
        let (q, k, v, o) = unsafe {
            (
                attn_desc("q", q)?,
                attn_desc("k", k)?,
                attn_desc("v", v)?,
                attn_desc("o", o)?,
            )
        };
        let dev = open_device(kind, ordinal)?;
        let [b, hq, lq, _] = q.shape;
        let [_, hkv, lk, _] = k.shape;
        // Lengths follow from q's and k's shapes (the Rust API checks that the shapes agree).
        let rows = product("q.shape", product("q.shape", b, hq)?, lq)?;
        let keys = product("k.shape", product("k.shape", b, hkv)?, lk)?;
        let dev = &dev;
        let precision = unsafe {
            Precisions {
                head: (!pi_head.is_null()).then(|| View::from_raw(dev, pi_head as u64, hq)),
                key: (!pi_key.is_null()).then(|| View::from_raw(dev, pi_key as u64, keys)),
            }
        };
        let kv_len = (!kv_len.is_null()).then(|| unsafe { View::from_raw(dev, kv_len as u64, b) });
        let (lse, e) = unsafe {
            (
                (!lse.is_null()).then(|| ViewMut::from_raw(dev, lse as u64, rows)),
                (!e.is_null()).then(|| ViewMut::from_raw(dev, e as u64, rows)),
            )
        };
        let stream = raw_stream(stream);
        with_dtype!(dtype, T => unsafe {
            let (q, k, v) = (q.view::<T>(dev), k.view::<T>(dev), v.view::<T>(dev));
            let out = AttentionOutputs {
                o: o.view_mut::<T>(dev),
                lse,
                e,
            };
            attention::forward_into(&spec, &q, &k, &v, &precision, kv_len.as_ref(), out, stream)
        })
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_attention_backward(
    kind: i32,
    ordinal: i32,
    stream: *mut c_void,
    params: *const FepAttentionParams,
    dtype: i32,
    q: *const FepAttnTensor,
    k: *const FepAttnTensor,
    v: *const FepAttnTensor,
    pi_head: *const f32,
    pi_key: *const f32,
    kv_len: *const i32,
    o: *const FepAttnTensor,
    lse: *const f32,
    d_o: *const FepAttnTensor,
    e: *const f32,
    d_e: *const f32,
    dq: *const FepAttnTensor,
    dk: *const FepAttnTensor,
    dv: *const FepAttnTensor,
    dpi_head: *mut f32,
    dpi_key: *mut f32,
    dnu: *mut f32,
) -> i32 {
    guard(|| {
        non_null("params", params)?;
        let spec = attention_spec(unsafe { &*params })?;
        let (q, k, v, o, d_o, dq, dk, dv) = unsafe {
            (
                attn_desc("q", q)?,
                attn_desc("k", k)?,
                attn_desc("v", v)?,
                attn_desc("o", o)?,
                attn_desc("d_o", d_o)?,
                attn_desc("dq", dq)?,
                attn_desc("dk", dk)?,
                attn_desc("dv", dv)?,
            )
        };
        non_null("lse", lse)?;
        let dev = open_device(kind, ordinal)?;
        let [b, hq, lq, _] = q.shape;
        let [_, hkv, lk, _] = k.shape;
        // Lengths follow from q's and k's shapes (the Rust API checks that the shapes agree).
        let rows = product("q.shape", product("q.shape", b, hq)?, lq)?;
        let keys = product("k.shape", product("k.shape", b, hkv)?, lk)?;
        let dev = &dev;
        let opt = |p: *const f32, len: usize| {
            (!p.is_null()).then(|| unsafe { View::<f32>::from_raw(dev, p as u64, len) })
        };
        let opt_mut = |p: *mut f32, len: usize| {
            (!p.is_null()).then(|| unsafe { ViewMut::<f32>::from_raw(dev, p as u64, len) })
        };
        let precision = Precisions {
            head: opt(pi_head, hq),
            key: opt(pi_key, keys),
        };
        let kv_len = (!kv_len.is_null()).then(|| unsafe { View::from_raw(dev, kv_len as u64, b) });
        let lse = unsafe { View::from_raw(dev, lse as u64, rows) };
        let (e, d_e) = (opt(e, rows), opt(d_e, rows));
        let (dpi_head, dpi_key, dnu) = (
            opt_mut(dpi_head, hq),
            opt_mut(dpi_key, keys),
            opt_mut(dnu, 1),
        );
        let stream = raw_stream(stream);
        with_dtype!(dtype, T => unsafe {
            let (q, k, v) = (q.view::<T>(dev), k.view::<T>(dev), v.view::<T>(dev));
            let inputs = BackwardInputs {
                o: o.view::<T>(dev),
                lse,
                d_o: d_o.view::<T>(dev),
                e,
                d_e,
            };
            let out = AttnGradients {
                dq: dq.view_mut::<T>(dev),
                dk: dk.view_mut::<T>(dev),
                dv: dv.view_mut::<T>(dev),
                dpi_head,
                dpi_key,
                dnu,
            };
            attention::backward_into(
                &spec,
                &q,
                &k,
                &v,
                &precision,
                kv_len.as_ref(),
                &inputs,
                out,
                stream,
            )
        })
    })
}

/// The Rust API's names of the merge's parts are the C arguments' names.
fn merge_names(err: Error) -> Error {
    let c_names = |s: &str| {
        s.replace("o parts", "o_parts")
            .replace("lse parts", "lse_parts")
            .replace("e parts", "e_parts")
            .replace("MergeParts::e", "e_parts")
    };
    match err {
        Error::InvalidArgument { name, reason } => Error::InvalidArgument {
            name: c_names(&name),
            reason: c_names(&reason),
        },
        other => other,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn fep_attention_merge(
    kind: i32,
    ordinal: i32,
    stream: *mut c_void,
    dtype: i32,
    splits: u64,
    o_parts: *const c_void,
    lse_parts: *const f32,
    e_parts: *const f32,
    o: *const FepAttnTensor,
    lse: *mut f32,
    e: *mut f32,
) -> i32 {
    guard(|| {
        let o = unsafe { attn_desc("o", o)? };
        non_null("o_parts", o_parts)?;
        non_null("lse_parts", lse_parts)?;
        let s = usize_of("splits", splits)?;
        if o.shape.contains(&0) {
            return Err(Error::invalid(
                "o.shape",
                format!("{:?} has a zero dimension", o.shape),
            ));
        }
        if !e.is_null() && e_parts.is_null() {
            return Err(Error::invalid(
                "e",
                "an e output needs e_parts (which is NULL)",
            ));
        }
        let dev = open_device(kind, ordinal)?;
        let dev = &dev;
        let [b, hq, lq, dv] = o.shape;
        let rows = product("o.shape", product("o.shape", b, hq)?, lq)?;
        let part_rows = product("splits", s, rows)?;
        let part_len = product("splits", part_rows, dv)?;
        let lse_parts = unsafe { View::<f32>::from_raw(dev, lse_parts as u64, part_rows) };
        let e_parts = (!e_parts.is_null())
            .then(|| unsafe { View::<f32>::from_raw(dev, e_parts as u64, part_rows) });
        let (lse, e) = unsafe {
            (
                (!lse.is_null()).then(|| ViewMut::from_raw(dev, lse as u64, rows)),
                (!e.is_null()).then(|| ViewMut::from_raw(dev, e as u64, rows)),
            )
        };
        let stream = raw_stream(stream);
        with_dtype!(dtype, T => unsafe {
            let parts = MergeParts {
                o: View::<T>::from_raw(dev, o_parts as u64, part_len),
                lse: lse_parts,
                e: e_parts,
                splits: s,
                shape: o.shape,
            };
            let out = AttentionOutputs {
                o: o.view_mut::<T>(dev),
                lse,
                e,
            };
            attention::merge_into(&parts, out, stream).map_err(merge_names)
        })
    })
}
