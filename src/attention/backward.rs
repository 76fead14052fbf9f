//! Attention backward: the gradients of a loss L(o, e) with respect to q, k, v, the precisions
//! and Student-t's ν. The maths (derived by hand; `reference::backward` codes it in f64) is in
//! the module docs of [`crate::attention`], section "Backward"; the GPU side is in
//! src/attention/gpu_backward.rs and kernels/attention/backward*.cuh.

use super::{
    AttentionSpec, Precisions, Problem, Tensor4, Tensor4Mut, check_problem, check_tensor, dims,
    extent, input_spans,
};
use crate::backend::{Device, DeviceBuffer, Stream, View, ViewMut};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::tensor::{check_len, check_no_overlap, same_device};

/// What the backward pass reads besides the forward's inputs.
#[derive(Clone, Debug)]
pub struct BackwardInputs<'a, T: Element> {
    /// The forward's output o `[B, Hq, Lq, Dv]`.
    pub o: Tensor4<'a, T>,
    /// The forward's lse `[B, Hq, Lq]`.
    pub lse: View<'a, f32>,
    /// ∂L/∂o `[B, Hq, Lq, Dv]`.
    pub d_o: Tensor4<'a, T>,
    /// The forward's e `[B, Hq, Lq]`; required with `d_e`.
    pub e: Option<View<'a, f32>>,
    /// ∂L/∂e `[B, Hq, Lq]`, or None when the loss does not use e.
    pub d_e: Option<View<'a, f32>>,
    /// ∂L/∂lse `[B, Hq, Lq]`, or None when the loss does not use lse (entries of rows with no
    /// visible key are ignored).
    pub d_lse: Option<View<'a, f32>>,
}

/// Where [`backward_into`] writes: dq `[B, Hq, Lq, D]`, dk `[B, Hkv, Lk, D]`, dv
/// `[B, Hkv, Lk, Dv]` in the input dtype; dπ_h `[Hq]`, dπ_j `[B, Hkv, Lk]`, dν (`[1]`, or `[Hq]`
/// with a per-head ν) and dβ (the bias's shape, row-major) in f32, each optional.
#[derive(Debug)]
pub struct Gradients<'a, T: Element> {
    /// ∂L/∂q.
    pub dq: Tensor4Mut<'a, T>,
    /// ∂L/∂k.
    pub dk: Tensor4Mut<'a, T>,
    /// ∂L/∂v.
    pub dv: Tensor4Mut<'a, T>,
    /// ∂L/∂π_h.
    pub dpi_head: Option<ViewMut<'a, f32>>,
    /// ∂L/∂π_j.
    pub dpi_key: Option<ViewMut<'a, f32>>,
    /// ∂L/∂ν (0 unless the score is Student-t): `[1]`, or `[Hq]` with a per-head ν.
    pub dnu: Option<ViewMut<'a, f32>>,
    /// ∂L/∂β in the bias's shape (row-major; each broadcast dimension summed in a fixed order);
    /// only with a bias.
    pub dbias: Option<ViewMut<'a, f32>>,
}

/// What [`backward`] returns (dq, dk, dv in BHLD).
#[derive(Debug)]
pub struct GradientResult<T: Element> {
    /// `[B, Hq, Lq, D]`.
    pub dq: DeviceBuffer<T>,
    /// `[B, Hkv, Lk, D]`.
    pub dk: DeviceBuffer<T>,
    /// `[B, Hkv, Lk, Dv]`.
    pub dv: DeviceBuffer<T>,
    /// `[Hq]`.
    pub dpi_head: DeviceBuffer<f32>,
    /// `[B, Hkv, Lk]`.
    pub dpi_key: DeviceBuffer<f32>,
    /// `[1]`, or `[Hq]` with a per-head ν.
    pub dnu: DeviceBuffer<f32>,
    /// The bias's shape (row-major), or empty without a bias.
    pub dbias: DeviceBuffer<f32>,
}

/// The backward problem, checked.
pub(crate) struct BackwardProblem<'p, 'a, T: Element> {
    pub fwd: Problem<'p, 'a, T>,
    pub inputs: &'p BackwardInputs<'a, T>,
}

/// Attention backward into `out`, enqueued on `stream`. The arguments before `inputs` are the
/// forward's (the same spec, tensors, precisions and key lengths); `inputs` holds o and lse from
/// that forward and the upstream gradients. Everything is checked before anything is written, as
/// for [`super::forward_into`]; an output may alias nothing.
#[allow(clippy::too_many_arguments)]
pub fn backward_into<'a, T: Element>(
    spec: &AttentionSpec,
    q: &Tensor4<'a, T>,
    k: &Tensor4<'a, T>,
    v: &Tensor4<'a, T>,
    precision: &Precisions<'a>,
    kv_len: Option<&View<'a, i32>>,
    inputs: &BackwardInputs<'a, T>,
    out: Gradients<'_, T>,
    stream: Stream,
) -> Result<()> {
    let dm = check_problem(spec, q, k, v, precision, kv_len)?;
    let dev = q.data.device();
    let rows = dm.b * dm.hq * dm.lq;
    let o_shape = [dm.b, dm.hq, dm.lq, dm.dv];
    for (name, t) in [("o", &inputs.o), ("d_o", &inputs.d_o)] {
        if t.shape != o_shape {
            return Err(Error::invalid(
                name,
                format!("shape {:?}, expected {o_shape:?}", t.shape),
            ));
        }
        same_device(name, t.data.device(), dev)?;
        check_tensor(name, t.shape, t.strides, t.data.len())?;
    }
    same_device("lse", inputs.lse.device(), dev)?;
    check_len("lse", inputs.lse.len(), rows)?;
    if let Some(dl) = &inputs.d_lse {
        same_device("d_lse", dl.device(), dev)?;
        check_len("d_lse", dl.len(), rows)?;
    }
    if out.dbias.is_some() && precision.bias.is_none() {
        return Err(Error::invalid("dbias", "given without a bias"));
    }
    match (&inputs.e, &inputs.d_e) {
        (None, Some(_)) => {
            return Err(Error::invalid(
                "e",
                "the forward's e is required when d_e is given",
            ));
        }
        (e, de) => {
            for (name, x) in [("e", e), ("d_e", de)] {
                if let Some(x) = x {
                    same_device(name, x.device(), dev)?;
                    check_len(name, x.len(), rows)?;
                }
            }
        }
    }
    let want = [
        ("dq", &out.dq, [dm.b, dm.hq, dm.lq, dm.d]),
        ("dk", &out.dk, [dm.b, dm.hkv, dm.lk, dm.d]),
        ("dv", &out.dv, [dm.b, dm.hkv, dm.lk, dm.dv]),
    ];
    for (name, t, shape) in want {
        if t.shape != shape {
            return Err(Error::invalid(
                name,
                format!("shape {:?}, expected {shape:?}", t.shape),
            ));
        }
        same_device(name, t.data.device(), dev)?;
        check_tensor(name, t.shape, t.strides, t.data.len())?;
    }
    let nu_len = if precision.nu.is_some() { dm.hq } else { 1 };
    let bias_len = precision
        .bias
        .as_ref()
        .map_or(0, |b| b.shape.iter().product());
    let small = [
        ("dpi_head", &out.dpi_head, dm.hq),
        ("dpi_key", &out.dpi_key, dm.b * dm.hkv * dm.lk),
        ("dnu", &out.dnu, nu_len),
        ("dbias", &out.dbias, bias_len),
    ];
    for (name, x, n) in small {
        if let Some(x) = x {
            same_device(name, x.device(), dev)?;
            check_len(name, x.len(), n)?;
        }
    }
    // Byte spans: no output may alias an input or another output.
    let el = std::mem::size_of::<T>();
    let t4 = |name, t: &Tensor4<'_, T>| {
        (
            name,
            t.data.addr(),
            extent(t.shape, t.strides).saturating_mul(el),
        )
    };
    let mut ins = input_spans(q, k, v, precision, kv_len);
    ins.extend([
        t4("o", &inputs.o),
        t4("d_o", &inputs.d_o),
        ("lse", inputs.lse.addr(), inputs.lse.len().saturating_mul(4)),
    ]);
    for (name, x) in [
        ("e", &inputs.e),
        ("d_e", &inputs.d_e),
        ("d_lse", &inputs.d_lse),
    ] {
        if let Some(x) = x {
            ins.push((name, x.addr(), x.len().saturating_mul(4)));
        }
    }
    let m4 = |name, t: &Tensor4Mut<'_, T>| {
        (
            name,
            t.data.addr,
            extent(t.shape, t.strides).saturating_mul(el),
        )
    };
    let mut outs = vec![m4("dq", &out.dq), m4("dk", &out.dk), m4("dv", &out.dv)];
    for (name, x, _) in small {
        if let Some(x) = x {
            outs.push((name, x.addr, x.len().saturating_mul(4)));
        }
    }
    check_no_overlap(&ins, &outs)?;
    let p = BackwardProblem {
        fwd: Problem {
            spec: *spec,
            dims: dm,
            q,
            k,
            v,
            precision,
            kv_len,
        },
        inputs,
    };
    if dev.is_reference() {
        return super::cpu_backward::backward_views(&p, out);
    }
    if !dev.is_gpu() {
        return crate::threads::install(|| super::fast_backward::backward(&p, out));
    }
    #[cfg(fep_gpu)]
    {
        super::gpu_backward::backward(&p, out, stream)
    }
    #[cfg(not(fep_gpu))]
    {
        let _ = stream;
        unreachable!("a GPU device in a build without GPU backends")
    }
}

/// Backward on the default stream into new buffers (dq, dk, dv in BHLD; every gradient). The
/// gradients are those of the "Backward" section of [`crate::attention`]'s module docs.
///
/// ```
/// use fep_kernels::{Device, attention::{self, AttentionSpec, BackwardInputs, Precisions, Score, Tensor4}};
/// let dev = Device::cpu();
/// let q = dev.upload(&[1.0f32, 0.0, 0.0, 1.0])?;
/// let k = dev.upload(&[1.0f32, 0.0, 0.0, 1.0, -1.0, 0.0])?;
/// let v = dev.upload(&[1.0f32, 2.0, 3.0])?;
/// let pk = dev.upload(&[1.0f32, 2.0, 0.5])?; // a per-key precision, learned
/// let (q, k, v) = (
///     Tensor4::bhld(q.view(), [1, 1, 2, 2]),
///     Tensor4::bhld(k.view(), [1, 1, 3, 2]),
///     Tensor4::bhld(v.view(), [1, 1, 3, 1]),
/// );
/// let pi = Precisions { key: Some(pk.view()), ..Default::default() };
/// let spec = AttentionSpec::new(Score::StudentT(3.0));
/// let fwd = attention::forward(&spec, &q, &k, &v, &pi, None)?;
/// // L = Σ o: ∂L/∂o = 1.
/// let d_o = dev.upload(&[1.0f32, 1.0])?;
/// let inputs = BackwardInputs {
///     o: Tensor4::bhld(fwd.o.view(), [1, 1, 2, 1]),
///     lse: fwd.lse.view(),
///     d_o: Tensor4::bhld(d_o.view(), [1, 1, 2, 1]),
///     e: None,
///     d_e: None,
///     d_lse: None,
/// };
/// let g = attention::backward(&spec, &q, &k, &v, &pi, None, &inputs)?;
/// // Raising the precision of key 2 (value 3) pulls the outputs towards 3 only if it is the
/// // nearest key of a row; here the gradient of Σ o with respect to π_2 is finite and nonzero.
/// let dpk = g.dpi_key.to_vec()?;
/// assert!(dpk[2].is_finite() && dpk[2] != 0.0);
/// # Ok::<(), fep_kernels::Error>(())
/// ```
pub fn backward<'a, T: Element>(
    spec: &AttentionSpec,
    q: &Tensor4<'a, T>,
    k: &Tensor4<'a, T>,
    v: &Tensor4<'a, T>,
    precision: &Precisions<'a>,
    kv_len: Option<&View<'a, i32>>,
    inputs: &BackwardInputs<'a, T>,
) -> Result<GradientResult<T>> {
    spec.validate()?;
    let d = dims(q, k, v)?;
    let dev: &Device = q.data.device();
    let mut r = GradientResult {
        dq: dev.alloc(d.b * d.hq * d.lq * d.d)?,
        dk: dev.alloc(d.b * d.hkv * d.lk * d.d)?,
        dv: dev.alloc(d.b * d.hkv * d.lk * d.dv)?,
        dpi_head: dev.alloc(d.hq)?,
        dpi_key: dev.alloc(d.b * d.hkv * d.lk)?,
        dnu: dev.alloc(if precision.nu.is_some() { d.hq } else { 1 })?,
        dbias: dev.alloc(
            precision
                .bias
                .as_ref()
                .map_or(0, |b| b.shape.iter().product()),
        )?,
    };
    let out = Gradients {
        dq: Tensor4Mut::bhld(r.dq.view_mut(), [d.b, d.hq, d.lq, d.d]),
        dk: Tensor4Mut::bhld(r.dk.view_mut(), [d.b, d.hkv, d.lk, d.d]),
        dv: Tensor4Mut::bhld(r.dv.view_mut(), [d.b, d.hkv, d.lk, d.dv]),
        dpi_head: Some(r.dpi_head.view_mut()),
        dpi_key: Some(r.dpi_key.view_mut()),
        dnu: Some(r.dnu.view_mut()),
        dbias: precision.bias.as_ref().map(|_| r.dbias.view_mut()),
    };
    backward_into(
        spec,
        q,
        k,
        v,
        precision,
        kv_len,
        inputs,
        out,
        dev.default_stream(),
    )?;
    Ok(r)
}
