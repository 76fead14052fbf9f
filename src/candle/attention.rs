//! Precision-weighted attention forward ([`crate::attention::forward_into`]) over candle tensors.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, MetalStorage, Shape, Tensor};

use super::{Input, crate_err, not_cpu};
use crate::Element;
use crate::attention::{AttentionOutputs, AttentionSpec, Precisions, Tensor4, Tensor4Mut};
use crate::backend::{View, ViewMut};

const OP: &str = "attention";

/// Precision-weighted attention forward on candle tensors q `[B, Hq, Lq, D]`, k `[B, Hkv, Lk, D]`,
/// v `[B, Hkv, Lk, Dv]` (f32, f16 or bf16, all the same dtype): o `[B, Hq, Lq, Dv]` as a new
/// contiguous tensor of the inputs' dtype. Inputs may be strided (a transposed `[B, L, H, D]`
/// tensor seen as `[B, H, L, D]`, narrowed views, ...) as long as the last dimension is
/// contiguous and rows do not overlap: the op reads candle's storage in place through the
/// layout's strides and start offset. `precision_key`: optional per-key precision π_j
/// `[B, Hkv, Lk]`, f32, every entry finite and > 0 (read in place when contiguous, else made
/// contiguous first). No backward (applied without gradient tracking).
///
/// Errors (as candle errors): tensors not in CPU storage, dtypes other than f32/f16/bf16 or
/// that differ, ranks other than 4, a last dimension that is not contiguous, and everything
/// [`crate::attention::forward_into`] rejects (shapes, heads, ν, τ, precisions).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use fep_kernels::attention::{AttentionSpec, Score};
/// let dev = Device::Cpu;
/// let q = Tensor::randn(0f32, 1.0, (1, 2, 4, 8), &dev)?;
/// let k = Tensor::randn(0f32, 1.0, (1, 2, 6, 8), &dev)?;
/// let v = Tensor::randn(0f32, 1.0, (1, 2, 6, 8), &dev)?;
/// let spec = AttentionSpec::new(Score::StudentT(3.0)).causal(true);
/// let o = fep_kernels::candle::attention(&q, &k, &v, &spec, None)?;
/// assert_eq!(o.dims(), &[1, 2, 4, 8]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: &AttentionSpec,
    precision_key: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let Some(p) = precision_key else {
        return q.apply_op3_no_bwd(k, v, &AttentionOp::new(*spec));
    };
    if p.dtype() != candle_core::DType::F32 {
        candle_core::bail!(
            "fep_kernels attention: precision_key must be f32, got {:?}",
            p.dtype()
        );
    }
    if !p.device().same_device(q.device()) {
        candle_core::bail!("fep_kernels attention: precision_key is on another device than q");
    }
    let p = p.contiguous()?;
    // The read guard keeps the precision storage alive and unwritten while the op reads it.
    let pi = Input::new(OP, "precision_key", &p)?;
    let op = AttentionOp::new(*spec).key_precision(pi.view::<f32>()?);
    q.apply_op3_no_bwd(k, v, &op)
}

/// The attention forward as a [`CustomOp3`] on (q, k, v); apply it with
/// [`Tensor::apply_op3_no_bwd`] (or [`Tensor::apply_op3`] when it borrows nothing).
#[derive(Clone, Debug)]
pub struct AttentionOp<'a> {
    /// What to compute.
    pub spec: AttentionSpec,
    /// Per-query-head precision π_h `[Hq]` (host memory).
    pub head: Option<View<'a, f32>>,
    /// Per-key precision π_j `[B, Hkv, Lk]` row-major (host memory).
    pub key: Option<View<'a, f32>>,
}

impl<'a> AttentionOp<'a> {
    /// `spec` without precisions.
    pub fn new(spec: AttentionSpec) -> Self {
        AttentionOp {
            spec,
            head: None,
            key: None,
        }
    }

    /// With per-query-head precision `[Hq]`.
    pub fn head_precision(mut self, p: View<'a, f32>) -> Self {
        self.head = Some(p);
        self
    }

    /// With per-key precision `[B, Hkv, Lk]`.
    pub fn key_precision(mut self, p: View<'a, f32>) -> Self {
        self.key = Some(p);
        self
    }

    fn run<T: Element>(
        &self,
        (q, lq): (&[T], &Layout),
        (k, lk): (&[T], &Layout),
        (v, lv): (&[T], &Layout),
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let q = tensor4("q", q, lq)?;
        let k = tensor4("k", k, lk)?;
        let v = tensor4("v", v, lv)?;
        let shape = [q.shape[0], q.shape[1], q.shape[2], v.shape[3]];
        let mut o = vec![T::default(); shape.iter().product()];
        let precision = Precisions {
            head: self.head.clone(),
            key: self.key.clone(),
            ..Default::default()
        };
        for (name, p) in [("head precision", &self.head), ("key precision", &self.key)] {
            if p.as_ref().is_some_and(|p| p.device().is_gpu()) {
                candle_core::bail!("fep_kernels attention: {name} is not host memory");
            }
        }
        let out = AttentionOutputs {
            o: Tensor4Mut::bhld(ViewMut::host(&mut o), shape),
            lse: None,
            e: None,
        };
        let dev = crate::Device::cpu();
        crate::attention::forward_into(
            &self.spec,
            &q,
            &k,
            &v,
            &precision,
            None,
            out,
            dev.default_stream(),
        )
        .map_err(crate_err(OP))?;
        Ok((o, Shape::from(shape.to_vec())))
    }
}

/// A candle CPU slice and its layout as a [`Tensor4`] over the same memory (no copy).
fn tensor4<'a, T: Element>(
    name: &str,
    data: &'a [T],
    layout: &Layout,
) -> candle_core::Result<Tensor4<'a, T>> {
    let (dims, stride) = (layout.dims(), layout.stride());
    let (Ok(shape), Ok(st)) = (<[usize; 4]>::try_from(dims), <[usize; 4]>::try_from(stride)) else {
        candle_core::bail!(
            "fep_kernels attention: {name} must have rank 4 [B, H, L, D], got shape {dims:?}"
        );
    };
    if shape[3] > 1 && st[3] != 1 {
        candle_core::bail!(
            "fep_kernels attention: {name} must have a contiguous last dimension, got strides {stride:?}"
        );
    }
    let strides = [st[0], st[1], st[2]];
    let start = layout.start_offset();
    // The elements the strides address (the crate checks shapes and row overlap).
    let extent = if shape.contains(&0) {
        0
    } else {
        (0..3).map(|i| (shape[i] - 1) * strides[i]).sum::<usize>() + shape[3]
    };
    let Some(slice) = data.get(start..start + extent) else {
        candle_core::bail!(
            "fep_kernels attention: {name} layout (offset {start}, strides {stride:?}) exceeds its storage of {} elements",
            data.len()
        );
    };
    Ok(Tensor4 {
        data: View::host(slice),
        shape,
        strides,
    })
}

impl CustomOp3 for AttentionOp<'_> {
    fn name(&self) -> &'static str {
        "fep-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use CpuStorage as S;
        match (s1, s2, s3) {
            (S::F32(q), S::F32(k), S::F32(v)) => {
                let (o, s) = self.run((q, l1), (k, l2), (v, l3))?;
                Ok((S::F32(o), s))
            }
            (S::F16(q), S::F16(k), S::F16(v)) => {
                let (o, s) = self.run((q, l1), (k, l2), (v, l3))?;
                Ok((S::F16(o), s))
            }
            (S::BF16(q), S::BF16(k), S::BF16(v)) => {
                let (o, s) = self.run((q, l1), (k, l2), (v, l3))?;
                Ok((S::BF16(o), s))
            }
            _ => candle_core::bail!(
                "fep_kernels attention: q, k, v must share one dtype of f32, f16, bf16; got {:?}, {:?}, {:?}",
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            ),
        }
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        Err(not_cpu(OP, "q"))
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        Err(not_cpu(OP, "q"))
    }
}
