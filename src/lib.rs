//! # fep-kernels
//!
//! Fused GPU kernels for inference by energy minimisation, written once for NVIDIA (CUDA,
//! feature `cuda`) and AMD (HIP, feature `rocm`), with an f64 CPU reference backend that
//! always builds. This release ships the foundation, LCA sparse coding ([`lca`]) and
//! predictive-coding settling and learning ([`settle`]); precision-weighted attention and
//! variational message passing follow on the same runtime.
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
//! let out = settle::learn_step(&net, &SettleSpec::new(0.1).steps(30), &x0.view(), &y.view())?;
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
//!     policies: vmp::construct_policies(&[2], 1), policy_len: 1,
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
//! Frameworks pass their own memory and streams: [`View::from_raw`], [`ViewMut::from_raw`],
//! [`Stream::from_raw`], or the C ABI in `include/fep_kernels.h`.

#![warn(missing_docs)]
// Without a GPU feature the launch plumbing has no caller; it is still compiled and checked.
#![cfg_attr(not(fep_gpu), allow(dead_code, unused_variables))]

pub mod attention;
mod backend;
#[cfg(feature = "candle")]
pub mod candle;
pub mod diagnostics;
pub mod element;
pub mod error;
pub mod ffi;
pub mod lca;
pub mod settle;
mod tensor;
pub mod vmp;

pub use backend::{Device, DeviceBuffer, DeviceKind, Stream, View, ViewMut};
pub use element::{DType, Element};
pub use error::{Error, Result};
pub use half::{bf16, f16};

/// The compilers' per-kernel resource report for this build (registers, shared memory,
/// spills), one line per kernel and target. Empty without a GPU feature.
pub const RESOURCE_REPORT: &str = backend::registry::RESOURCE_REPORT;

/// The library version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
