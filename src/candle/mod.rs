//! [candle](https://github.com/huggingface/candle) integration (feature `candle`): the crate's
//! ops over candle tensors, reading the inputs' storage in place (no copy).
//!
//! | op | candle entry point | inputs read in place | outputs |
//! |---|---|---|---|
//! | precision-weighted attention | [`attention`], [`AttentionOp`] (a [`CustomOp3`]) | q, k, v strided (last dim contiguous) | o |
//! | LCA sparse coding | [`lca_solve`], [`dictionary`] + [`lca_solve_with`], [`lca_learn`] | Φ, x, u₀ contiguous | u, a, steps (+ trace) |
//! | predictive-coding settling | [`settle_infer`], [`settle_learn_step`] over [`SettleLayer`]s | x₀, target, W_l, b_l, diag Π_l contiguous | x_l, ε_l, energy, trace, steps (+ ∂E/∂W_l, ∂E/∂b_l) |
//!
//! Dtypes: f32, f16 or bf16 for attention's q/k/v, for Φ and x of LCA and for the weights and
//! biases of a settling network (one dtype per network); everything else (precisions, u₀, x₀,
//! targets, initial states) is f32, as in the crate's own API. Outputs are new contiguous
//! candle tensors on the CPU device that own the buffers the crate wrote into (built with
//! [`Tensor::from_vec`], not copied): f32, except step and active counts (u32) and attention's
//! o (the inputs' dtype).
//!
//! # Where candle does not fit
//!
//! - **Several outputs.** A candle `CustomOp` returns one tensor, so only attention (one output)
//!   is a `CustomOp3`; LCA and settling are plain functions that read the storages under candle's
//!   read guards and return structs of tensors.
//! - **No autograd.** None of the ops records a backward: attention is applied with
//!   `apply_op3_no_bwd`, LCA and settling are iterative solvers whose outputs are detached.
//!   [`settle_learn_step`] returns the predictive-coding gradients themselves as tensors.
//! - **In-place updates.** [`crate::settle::sgd`] writes the parameters in place; candle tensors
//!   are immutable through the public API, so apply the returned gradients with candle itself
//!   (`(w - grad * lr)?`, or a `Var`/optimizer). [`lca_learn`] updates a [`Dictionary`] (the
//!   crate's own object, not a candle tensor); [`dictionary_phi`] returns Φ as a tensor.
//! - **Contiguity.** LCA and settling take flat row-major memory, so their inputs must be
//!   contiguous (a start offset is fine: `narrow` along the first dimension reads in place);
//!   anything else is a candle error saying so (call `.contiguous()`), never a hidden copy.
//!   Attention takes strided q/k/v (the crate's `Tensor4` has strides).
//! - **Prepared state.** LCA precomputes G = ΦᵀΦ − I when a [`Dictionary`] is made; [`lca_solve`]
//!   does that on every call, [`dictionary`] + [`lca_solve_with`] once.
//!
//! # Devices: CPU storage only (CUDA storage is blocked)
//!
//! Every op runs on candle's CPU device through the crate's CPU backend; a tensor in candle CUDA or
//! Metal storage gets a candle error. Candle's CUDA storage cannot be enabled next to this crate's
//! `cuda` feature: candle-core 0.11.1's `cuda` feature enables cudarc 0.19's `dynamic-linking`
//! feature, this crate enables cudarc's `dynamic-loading` (so a `cuda` build starts on a machine
//! without libcuda), Cargo unifies the two on the one cudarc, and cudarc's build script then panics
//! ("Both `dynamic-loading` and `dynamic-linking` features are active, this is a bug"), so no build
//! may have both (also an application that uses candle with `cuda` and this crate with `cuda`,
//! whether or not it enables `candle`). Even without that conflict, candle's `cuda` feature links
//! libcuda, cuBLAS, cuBLASLt, cuRAND and NVRTC at build time (cudarc `dynamic-linking`) and its
//! candle-kernels build script compiles its kernels with nvcc and links `-lcudart`; the crate's
//! pinned CUDA toolchain (ci/setup-cuda.sh) has nvcc and libcudart.so.13 but no `libcudart.so` link
//! name, cuBLAS, cuRAND, NVRTC or libcuda stub, and a `candle-cuda` binary would no longer start
//! without libcuda. What it would take: cudarc's `fallback-dynamic-loading` instead of
//! `dynamic-loading` in this crate's cudarc dependency (cudarc then loads the driver at run time
//! unless candle asks for `dynamic-linking`), the backend's `is_culib_present` probe gated on that,
//! and a CUDA toolkit with cuBLAS, cuRAND and NVRTC on the build machines; then a candle CUDA
//! tensor's device pointer (`CudaStorage::as_cuda_slice`) and candle's stream could be wrapped with
//! [`crate::View::from_raw`] and [`crate::Stream::from_raw`].
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use fep_kernels::lca::LcaSpec;
//! // Φ = I₂ (unit-norm columns), two samples; soft threshold with λ = 1.
//! let phi = Tensor::eye(2, candle_core::DType::F32, &Device::Cpu)?;
//! let x = Tensor::new(&[[3f32, 0.0], [0.0, -0.5]], &Device::Cpu)?;
//! let (_u, a) = fep_kernels::candle::lca_solve(&phi, &x, &LcaSpec::new(1.0).steps(200).eta(0.2))?;
//! let a = a.to_vec2::<f32>()?;
//! assert!((a[0][0] - 2.0).abs() < 1e-4 && a[1] == [0.0, 0.0]);
//! # Ok::<(), candle_core::Error>(())
//! ```

mod attention;
mod lca;
mod settle;

pub use attention::{AttentionOp, attention};
pub use lca::{LcaTensors, dictionary, dictionary_phi, lca_learn, lca_solve, lca_solve_with};
pub use settle::{
    LayerPrecision, LearnTensors, SettleLayer, SettleTensors, settle_infer, settle_learn_step,
};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Storage, StorageRef, Tensor, WithDType};

use crate::{Element, View};

#[cfg(doc)]
use crate::lca::Dictionary;
#[cfg(doc)]
use candle_core::CustomOp3;

/// A crate error as a candle error, prefixed with the op.
fn crate_err(op: &'static str) -> impl Fn(crate::Error) -> candle_core::Error {
    move |e| candle_core::Error::msg(format!("fep_kernels {op}: {e}"))
}

/// The error for a tensor that is not in candle CPU storage.
fn not_cpu(op: &str, name: &str) -> candle_core::Error {
    candle_core::Error::msg(format!(
        "fep_kernels {op}: {name} is not in CPU storage; the candle integration runs on candle's \
         CPU device only (candle's `cuda` feature conflicts with this crate's cudarc \
         `dynamic-loading`: see the fep_kernels::candle docs)"
    ))
}

/// `t`'s dims, checked to be of rank `R`.
fn dims<const R: usize>(
    op: &str,
    name: &str,
    t: &Tensor,
    what: &str,
) -> candle_core::Result<[usize; R]> {
    <[usize; R]>::try_from(t.dims()).map_err(|_| {
        candle_core::Error::msg(format!(
            "fep_kernels {op}: {name} must have rank {R} {what}, got shape {:?}",
            t.dims()
        ))
    })
}

/// A tensor's storage held under candle's read guard (no writer while it lives), with its
/// layout: read in place through [`Input::view`].
struct Input<'t> {
    op: &'static str,
    name: String,
    storage: StorageRef<'t>,
    layout: &'t Layout,
}

impl<'t> Input<'t> {
    /// Takes the read guard; errors unless the storage is candle CPU storage.
    fn new(op: &'static str, name: impl Into<String>, t: &'t Tensor) -> candle_core::Result<Self> {
        let name = name.into();
        let (storage, layout) = t.storage_and_layout();
        if !matches!(&*storage, Storage::Cpu(_)) {
            return Err(not_cpu(op, &name));
        }
        Ok(Input {
            op,
            name,
            storage,
            layout,
        })
    }

    fn dtype(&self) -> DType {
        self.cpu().dtype()
    }

    fn cpu(&self) -> &CpuStorage {
        match &*self.storage {
            Storage::Cpu(s) => s,
            // `new` admits CPU storage only.
            _ => unreachable!(),
        }
    }

    /// The tensor's elements in place, as a host view: errors unless the dtype is `T` and the
    /// layout is contiguous (any start offset).
    fn view<T: Element + WithDType>(&self) -> candle_core::Result<View<'_, T>> {
        let (op, name) = (self.op, &self.name);
        if self.dtype() != <T as WithDType>::DTYPE {
            candle_core::bail!(
                "fep_kernels {op}: {name} must be {:?}, got {:?}",
                <T as WithDType>::DTYPE,
                self.dtype()
            );
        }
        let Some((start, end)) = self.layout.contiguous_offsets() else {
            candle_core::bail!(
                "fep_kernels {op}: {name} must be contiguous (shape {:?}, strides {:?}); call \
                 .contiguous() first",
                self.layout.dims(),
                self.layout.stride()
            );
        };
        let data = self.cpu().as_slice::<T>()?;
        let Some(slice) = data.get(start..end) else {
            candle_core::bail!(
                "fep_kernels {op}: {name} layout [{start}, {end}) exceeds its storage of {} elements",
                data.len()
            );
        };
        Ok(View::host(slice))
    }
}

/// Runs `$body` with `$T` the Rust type of the float dtype `$dtype` (f32, f16, bf16).
macro_rules! with_float_type {
    ($op:expr, $name:expr, $dtype:expr, |$T:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            d => candle_core::bail!(
                "fep_kernels {}: {} must be f32, f16 or bf16, got {d:?}",
                $op,
                $name
            ),
        }
    };
}
use with_float_type;

/// A host buffer the crate wrote into, as a new candle CPU tensor (moved, not copied).
fn output<T: WithDType>(data: Vec<T>, shape: &[usize]) -> candle_core::Result<Tensor> {
    Tensor::from_vec(data, shape, &candle_core::Device::Cpu)
}
