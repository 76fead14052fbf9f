//! # fep-kernels
//!
//! Fused GPU kernels for inference by energy minimisation, written once for NVIDIA (CUDA,
//! feature `cuda`) and AMD (HIP, feature `rocm`), with two CPU backends that always build: the
//! fast CPU path ([`Device::cpu`]: f32 accumulation, blocked matrix products, vectorised
//! element-wise loops, threaded with rayon as [`set_num_threads`] says) and the f64 reference
//! ([`Device::reference`]), the oracle the fast CPU path and every GPU kernel are tested
//! against. Each op is a module whose docs hold its maths:
//!
//! - [`attention`]: precision-weighted attention. Dot, Gaussian, Student-t and Laplace scores
//!   with per-head and per-key precisions, returning o, the lse and the energy e (the expected
//!   precision-weighted squared error); [`attention::forward`], [`attention::backward`]
//!   (gradients of q, k, v, both precisions and ν, deterministic), and decode against a long KV
//!   cache with key splits joined by [`attention::merge()`]. GQA/MQA, causal, sliding-window and
//!   per-batch key-length masks, BHLD or BLHD layouts without copies.
//! - [`settle`]: predictive-coding settling. Descends the energy E = ½ Σ_l ε_lᵀ Π_l ε_l of a
//!   layered network ([`settle::infer`]) and returns the local learning gradients
//!   ([`settle::learn_step`]; [`settle::sgd`] applies them).
//! - [`lca`]: sparse coding with the locally competitive algorithm (four thresholds; with the
//!   soft one the code is the LASSO solution), and dictionary learning ([`lca::Dictionary`]).
//! - [`vmp`]: variational message passing for discrete active inference with pymdp's
//!   conventions: state inference ([`vmp::infer_states`], fixed-point iteration), sequence
//!   inference ([`vmp::infer_sequence`], `vmp`/`mmp` updates), policy inference by expected free
//!   energy ([`vmp::infer_policies`]) and Dirichlet learning ([`vmp::learn`]), for a batch of
//!   agents per call.
//!
//! # Devices, memory and errors
//!
//! A [`Device`] is the CPU or one GPU: [`Device::best`] takes the first CUDA device, else the
//! first HIP device, else the CPU. Data lives in [`DeviceBuffer`]s ([`Device::upload`],
//! [`DeviceBuffer::to_vec`]); ops read and write borrowed [`View`]s and [`ViewMut`]s, so a
//! framework's own tensors are used in place ([`View::from_raw`], [`ViewMut::from_raw`]) on its
//! own stream ([`Stream::from_raw`]). Most entry points come in pairs: a `*_into` function that
//! writes into given views on a given stream, and a shorter one that allocates its outputs and
//! runs on the device's default stream. Inputs are f32, f16 or bf16 ([`Element`]); the GPUs and
//! the fast CPU path accumulate in f32, the reference in f64. Results on the CPU do not depend
//! on the thread count. Every input is validated before anything is
//! launched: shapes, strides, lengths, devices, finiteness and parameter ranges give an
//! [`Error::InvalidArgument`] naming the argument and leave the outputs untouched. A missing
//! driver or GPU is [`Error::NoDevice`], never a panic. Other languages and frameworks use the C
//! ABI ([`ffi`], header `include/fep_kernels.h`).
//!
//! # Features and build
//!
//! - no feature: the CPU backends only (fast and reference); nothing but Rust is needed to build.
//! - `cuda`: build.rs compiles every kernel with nvcc (CUDA 13.0), found through `NVCC`,
//!   `CUDA_PATH` / `CUDA_HOME`, then `PATH`, for the architectures in `FEP_CUDA_ARCHS` (default
//!   `80;90a`, plus PTX of the lowest), and embeds the binaries. The driver is loaded at run
//!   time, so a build without a driver still links and reports [`Error::NoDevice`].
//! - `rocm`: the same with a HIP-capable clang, found through `HIP_CLANG`, `ROCM_PATH` /
//!   `HIP_PATH`, then `clang-19`, for `FEP_ROCM_ARCHS` (default `gfx942;gfx90a`); links the HIP
//!   runtime (libamdhip64).
//! - `emulate`: the kernel sources compiled as C++ and run on the host (a block's threads as fibres)
//!   (`Device::emulated`), so the GPU code paths are tested without a GPU.
//! - `candle`: attention, LCA and settling over candle tensors, their storage read in place
//!   (the `candle` module).
//!
//! A missing toolchain or a failed kernel compile stops the build with an error that names the
//! variable to set (the repository's `ci/setup-cuda.sh` and `ci/setup-rocm.sh` install pinned
//! toolchains). With `DOCS_RS` set nothing is compiled. [`RESOURCE_REPORT`] holds the compilers'
//! per-kernel register, shared-memory and spill report of the build.
//!
//! # Examples
//!
//! LCA sparse coding ([`lca`]): prepare a dictionary once, then code a batch.
//!
//! ```
//! use fep_kernels::{Device, lca::{Dictionary, LcaSpec}};
//! let dev = Device::best(); // first CUDA GPU, else first HIP GPU, else the CPU
//! // A 2 x 3 dictionary with unit-norm columns and one sample.
//! let s = std::f32::consts::FRAC_1_SQRT_2;
//! let phi = dev.upload(&[1.0f32, 0.0, s, 0.0, 1.0, s])?;
//! let dict = Dictionary::new(&phi.view(), 2, 3, Default::default())?;
//! let x = dev.upload(&[2.0f32, 0.5])?;
//! let out = dict.solve(&LcaSpec::new(0.1).steps(300), &x.view(), None)?;
//! println!("a = {:?} after {:?} steps", out.a.to_vec()?, out.steps.to_vec()?);
//! # Ok::<(), fep_kernels::Error>(())
//! ```
//!
//! Predictive coding ([`settle`]): describe a network over your weight tensors, then settle it
//! or take a learning step (the gradients come back; [`settle::sgd`] applies them).
//!
//! ```
//! use fep_kernels::{Device, settle::{self, Activation, Layer, Network, Precision, SettleSpec}};
//! let dev = Device::best();
//! let w1 = dev.upload(&[0.3f32, -0.2, 0.5, 0.1])?; // 2 -> 2
//! let w2 = dev.upload(&[0.7f32, -0.4])?; // 2 -> 1
//! let net = Network::new(&[2, 2, 1], vec![
//!     Layer::new(w1.view(), Activation::Identity, Precision::Scalar(1.0)),
//!     Layer::new(w2.view(), Activation::Tanh, Precision::Scalar(1.0)),
//! ])?;
//! let (x0, y) = (dev.upload(&[1.0f32, 0.5])?, dev.upload(&[0.2f32])?);
//! let out = settle::learn_step(&net, &SettleSpec::new(0.1).steps(30), &x0.view(), &y.view(), None)?;
//! println!("dE/dW2 = {:?}", out.grad_w[1].to_vec()?);
//! # Ok::<(), fep_kernels::Error>(())
//! ```
//!
//! Discrete active inference ([`vmp`]): a generative model validated once and stored on the
//! device, then state inference, policy inference and learning for a batch of agents per call.
//!
//! ```
//! use fep_kernels::{Device, vmp::{self, FpiSpec, Model, ModelSpec, Obs, PolicySpec}};
//! let dev = Device::best();
//! // One factor (2 states, 2 actions that set the state), one modality that reports it 90% right.
//! let model = Model::new(&dev, &ModelSpec {
//!     num_states: vec![2], num_obs: vec![2], num_controls: vec![2],
//!     a_deps: vec![vec![0]], a: vec![vec![0.9, 0.1, 0.1, 0.9]],
//!     b: vec![vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]], // B[s', s, u] = [s' = u]
//!     c: vec![vec![2.0, 0.0]],                               // prefers outcome 0
//!     policies: vmp::construct_policies(&[2], 1)?, policy_len: 1,
//!     ..Default::default()
//! })?;
//! let obs = dev.upload(&[1i32, 0, 1])?; // three agents
//! let post = vmp::infer_states(&model, &FpiSpec::new(), &Obs::Index(obs.view()), None)?;
//! let pol = vmp::infer_policies(&model, &PolicySpec::new(), &post.qs.view())?;
//! let q_pi = pol.q_pi.to_vec()?;
//! assert!(q_pi[0] > q_pi[1]); // every agent prefers the action that leads to outcome 0
//! # Ok::<(), fep_kernels::Error>(())
//! ```
//!
//! Precision-weighted attention ([`attention`]): Student-t scores with a per-key precision,
//! causal, over q, k, v in BHLD layout.
//!
//! ```
//! use fep_kernels::{Device, attention::{self, AttentionSpec, Precisions, Score, Tensor4}};
//! let dev = Device::cpu(); // D = 2: GPU kernels take the head dims in attention::HEAD_DIMS
//! // One batch and head, two queries and three keys of dimension 2, values of dimension 1.
//! let q = dev.upload(&[1.0f32, 0.0, 0.0, 1.0])?;
//! let k = dev.upload(&[1.0f32, 0.0, 0.0, 1.0, -1.0, 0.0])?;
//! let v = dev.upload(&[1.0f32, 2.0, 3.0])?;
//! let pi = dev.upload(&[1.0f32, 4.0, 1.0])?; // key 1 is trusted more
//! let (q, k, v) = (
//!     Tensor4::bhld(q.view(), [1, 1, 2, 2]),
//!     Tensor4::bhld(k.view(), [1, 1, 3, 2]),
//!     Tensor4::bhld(v.view(), [1, 1, 3, 1]),
//! );
//! let spec = AttentionSpec::new(Score::StudentT(3.0)).causal(true);
//! let pi = Precisions { head: None, key: Some(pi.view()), ..Default::default() };
//! let out = attention::forward(&spec, &q, &k, &v, &pi, None)?;
//! println!("o = {:?}, lse = {:?}, e = {:?}", out.o.to_vec()?, out.lse.to_vec()?, out.e.to_vec()?);
//! # Ok::<(), fep_kernels::Error>(())
//! ```

#![warn(missing_docs)]
// No unwrap or expect on a path a caller reaches (issue 21): CI runs clippy on the library,
// and the few invariants that keep an `expect` say why where they are allowed.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
// docs.rs (Cargo.toml's [package.metadata.docs.rs]) builds with `--cfg docsrs` on nightly: items
// that need a feature carry a badge saying so.
#![cfg_attr(docsrs, feature(doc_cfg))]
// Without a GPU feature the launch plumbing has no caller; it is still compiled and checked.
#![cfg_attr(not(fep_gpu), allow(dead_code, unused_variables))]

#[macro_use]
mod simd;
mod alloc;
pub mod attention;
mod backend;
#[cfg(feature = "candle")]
#[cfg_attr(docsrs, doc(cfg(feature = "candle")))]
pub mod candle;
pub mod diagnostics;
pub mod element;
pub mod error;
pub mod ffi;
pub mod lca;
pub mod settle;
mod tensor;
mod threads;
pub mod vmp;
mod xla;

pub use backend::{Device, DeviceBuffer, DeviceKind, Stream, View, ViewMut};
pub use element::{DType, Element};
pub use error::{Error, Result};
pub use half::{bf16, f16};
pub use threads::{num_threads, set_num_threads};

/// The compilers' per-kernel resource report for this build (registers, shared memory,
/// spills), one line per kernel and target. Empty without a GPU feature.
pub const RESOURCE_REPORT: &str = backend::registry::RESOURCE_REPORT;

/// The library version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
