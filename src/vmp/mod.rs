//! Variational message passing for discrete active inference: state inference, sequence
//! inference, policy inference and Dirichlet learning for a batch of agents, with pymdp 1.0.4
//! (`inferactively-pymdp`, its JAX engine) as the oracle for every convention (the repository's
//! tests/fixtures/VMP-CONVENTIONS.md lists them with pymdp's line numbers).
//!
//! # The model
//!
//! Hidden-state factors f = 1…F with S_f states and U_f controls; modalities m = 1…M with O_m
//! outcomes, each depending on a subset deps(m) of the factors:
//!
//! ```text
//! A_m[o, s_deps(m)] = p(o_m = o | s)      [O_m, S_d…] over d ∈ deps(m); columns sum to 1
//! B_f[s′, s, u]     = p(s′_f | s_f, u_f)  [S_f, S_f, U_f]
//! C_m               log-preferences        [O_m]
//! D_f               first-state prior      [S_f]
//! E                 policy prior           [P]; a policy is an [H, F] table of actions
//! pA_m, pB_f, pD_f  Dirichlet counts shaped like A_m, B_f, D_f (optional; what learning updates)
//! ```
//!
//! A [`Model`] is validated once and stored on a device. N agents share it; each has its own
//! observations ([`Obs`]: indices or distributions), prior and beliefs. Beliefs are mean-field,
//! q(s) = Π_f q_f(s_f), stored `[N, ΣS]` f32: factor f at offset Σ_{g<f} S_g of each agent's
//! row; nothing ever builds the joint over all factors. Every log is ln max(x, eps) with
//! pymdp's eps = 2.22e-16 ([`EPS`], the float64 epsilon, in every dtype). An observation enters
//! through its log-likelihood over A_m's columns, ll_m(s) = Σ_o o_m(o) ln A_m\[o, s\] (one row of
//! ln A_m for an index).
//!
//! # State inference: [`infer_states`]
//!
//! pymdp's `fpi`: from uniform q, K Jacobi iterations (every factor updated from the previous
//! iterate) of
//!
//! ```text
//! ln q_f(s_f) ← ln prior_f(s_f) + Σ_{m: f ∈ deps(m)} Σ_{s∖s_f} ll_m(s) Π_{g ≠ f} q_g(s_g)
//! q_f = softmax(ln q_f)
//! F = Σ_f q_f·(ln q_f − ln prior_f) − Σ_m E_q[ll_m]        (variational free energy; ELBO = −F)
//! ```
//!
//! prior_f is D_f or a given prior. With one factor the update does not depend on q: one pass gives
//! the exact posterior. F comes back per agent (and per iteration on request). Early stop (ours;
//! pymdp's JAX engine always runs K): with tol > 0 an agent stops after iteration k ≥ 2 once
//! |F_k − F_{k−1}| ≤ tol, and is frozen.
//!
//! # Sequence inference: [`infer_sequence`]
//!
//! A window of T steps with the past actions a_t `[T−1, F]` and beliefs q_{t,f} for every step:
//! from uniform q, K Jacobi iterations (in t and f) of a mirror-descent step of size τ (pymdp's
//! Agent uses τ = 1), with messages from the neighbouring steps (pymdp's `vmp` or `mmp`,
//! [`Method`]):
//!
//! ```text
//! x = ln q_{t,f} + τ (E_{q_t without f}[ll_t] − ln q_{t,f} + fwd_{t,f} + bwd_{t,f})
//! q_{t,f} = softmax(x)
//! vmp: fwd_t = Σ_s ln B_f[·, s, a_{t−1}] q_{t−1,f}(s)
//!      bwd_t = Σ_s′ q_{t+1,f}(s′) ln B_f[s′, ·, a_t]
//! mmp: fwd_t = h_t ln Σ_s B_f[·, s, a_{t−1}] q_{t−1,f}(s)
//!      bwd_t = ½ ln Σ_s′ q_{t+1,f}(s′) B̃_f[s′, ·, a_t]
//! ```
//!
//! with fwd_0 = ln prior_f (h_0 ln prior_f for mmp), bwd_{T−1} = 0, h_t = ½ except h_{T−1} = 1,
//! and B̃_f = B_f normalised over the previous state. The mean-field sequence free energy, per
//! step and summed, takes the pairwise posterior as q_t ⊗ q_{t−1}:
//!
//! ```text
//! F = Σ_t [ Σ_f q_{t,f}·ln q_{t,f} − Σ_m E_{q_t}[ll_{t,m}] ] − Σ_f q_{0,f}·ln prior_f
//!     − Σ_{t≥1} Σ_f q_{t,f}ᵀ ln B_f[·, ·, a_{t−1}] q_{t−1,f}
//! ```
//!
//! # Policy inference: [`infer_policies`]
//!
//! For every agent and policy π (actions u_{τ,f}, τ = 1…H), roll the beliefs forward through B
//! (not renormalised), predict the outcomes and score every step with pymdp's negative expected
//! free energy:
//!
//! ```text
//! q_{τ,f} = B_f[·, ·, u_{τ,f}] q_{τ−1,f}                   (q_0: the given beliefs)
//! q(o_{τ,m}) = Σ_s A_m[·, s] Π_{d ∈ deps(m)} q_{τ,d}(s_d)
//! −G(π) = Σ_τ Σ_m [ q(o_{τ,m})·C_m  +  H[q(o_{τ,m})] − E_{q_τ}[H[A_m(·|s)]] ]  (+ novelty)
//! q(π) = softmax(−γ G + ln E)
//! ```
//!
//! The first term is the utility, the next two the state information gain ([`PolicySpec`] picks
//! the terms). With C_m the log of a normalised preference distribution, utility plus information
//! gain is −(risk + ambiguity), risk = KL(q(o_m) ‖ softmax(C_m)). The optional parameter novelty
//! adds, per step, `Σ_o q(o_m)(o) E_q[W(pA_m)[o, s]]` per modality and
//! `q_{τ,f}ᵀ W(pB_f[·, ·, u_{τ,f}]) q_{τ−1,f}` per factor, with pymdp's weights
//! W(α) = ln ᾱ₀ − ln ᾱ + ψ(ᾱ + 1) − ψ(ᾱ₀ + 1) (ᾱ = max(α, eps), ᾱ₀ its column sum, ψ the
//! digamma function; W = 0 where α ≤ 0). G comes back with q(π), lower being better.
//!
//! # Learning: [`learn`]
//!
//! Dirichlet updates of the model's counts from a batch of windows (posteriors q_t, observations
//! o_t, actions a_t), summed over agents and steps, with a rate η per tensor ([`LearnSpec`]):
//!
//! ```text
//! pA_m ← pA_m + η_A Σ_t o_{t,m} ⊗ q_t(s_deps(m))
//! pB_f[·, ·, u] ← pB_f[·, ·, u] + η_B Σ_{t: a_{t,f} = u} q_{t+1,f} ⊗ q_{t,f}
//! pD_f ← pD_f + η_D q_{0,f}   (only where pD_f > 0: pymdp's legacy rule; its JAX engine has none)
//! ```
//!
//! [`dirichlet_mean`] turns counts into the probabilities of a new model.
//!
//! # Where it runs
//!
//! On the CPU device the f64 reference runs ([`mod@reference`]). On a GPU (kernels/vmp/NOTES.md
//! has the design): state and sequence inference run all K iterations in one launch, one agent
//! per thread with its beliefs in shared memory (a global workspace when they do not fit);
//! policy inference runs one block per agent. A GPU model takes at most 16 factors, 16
//! modalities and 8 dependencies per modality (more: `Error::Unsupported` from
//! [`Model::new`]); the CPU takes any.
//!
//! ```
//! use fep_kernels::{Device, vmp::{self, FpiSpec, Model, ModelSpec, Obs}};
//! let dev = Device::best();
//! // One factor with two states, one modality that reports it with 90% accuracy.
//! let spec = ModelSpec {
//!     num_states: vec![2],
//!     num_obs: vec![2],
//!     a_deps: vec![vec![0]],
//!     a: vec![vec![0.9, 0.1, 0.1, 0.9]],
//!     b: vec![vec![1.0, 0.0, 0.0, 1.0]],
//!     ..Default::default()
//! };
//! let model = Model::new(&dev, &spec)?;
//! let obs = dev.upload(&[0i32, 1])?; // two agents, one observation each
//! let out = vmp::infer_states(&model, &FpiSpec::new(), &Obs::Index(obs.view()), None)?;
//! let qs = out.qs.to_vec()?;
//! assert!((qs[0] - 0.9).abs() < 1e-6 && (qs[3] - 0.9).abs() < 1e-6);
//! # Ok::<(), fep_kernels::Error>(())
//! ```

mod cpu;
mod fast;
mod fast_lanes;
mod fast_math;
#[cfg(fep_gpu)]
mod gpu;
mod model;

pub use model::{EPS, Model, ModelSpec, construct_policies, dirichlet_mean};

use crate::alloc::product;
use crate::backend::{Device, DeviceBuffer, Stream, View, ViewMut};
use crate::error::{Error, Result};
use crate::tensor::{check_len, check_no_overlap, same_device};

/// The f64 reference on host slices (what the CPU device runs, and what the tests hold up
/// against pymdp at 1e-6).
pub mod reference {
    pub use super::cpu::{
        FpiOut, HostObs, LearnOut, PolicyOut, SequenceOut, fpi, learn, policies, sequence,
    };
}

/// Observations of a batch: indices (`[N, M]` per step, each in 0..O_m) or distributions
/// (`[N, ΣO]` per step: modality m's O_m probabilities at offset Σ_{n<m} O_n), on the model's
/// device. Sequences add a step axis after N.
#[derive(Clone, Debug)]
pub enum Obs<'a> {
    /// One index per modality.
    Index(View<'a, i32>),
    /// One distribution per modality (non-negative; pymdp uses Σ_o o ln A, so they need not
    /// sum to 1).
    Dist(View<'a, f32>),
}

impl Obs<'_> {
    fn len(&self) -> usize {
        match self {
            Obs::Index(v) => v.len(),
            Obs::Dist(v) => v.len(),
        }
    }

    fn device(&self) -> &Device {
        match self {
            Obs::Index(v) => v.device(),
            Obs::Dist(v) => v.device(),
        }
    }

    fn addr(&self) -> u64 {
        match self {
            Obs::Index(v) => v.addr(),
            Obs::Dist(v) => v.addr(),
        }
    }

    /// Entries per agent and step.
    fn width(&self, model: &Model) -> usize {
        match self {
            Obs::Index(_) => model.t.modalities(),
            Obs::Dist(_) => model.t.sum_o,
        }
    }
}

/// State inference: K iterations (pymdp's default 16), early stop off (tol = 0, as pymdp).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FpiSpec {
    /// K ≥ 1.
    pub num_iter: u32,
    /// Early stop: an agent stops after iteration k ≥ 2 once |F_k − F_{k−1}| ≤ tol (0: never).
    pub tol: f32,
    /// On a GPU, scan the inputs (indices in range, distributions and priors finite and ≥ 0)
    /// before launching; this reads one word back, so the call waits for the stream. Off: the
    /// kernels clamp bad indices instead of failing, and the call is fully asynchronous.
    pub check_inputs: bool,
}

impl Default for FpiSpec {
    fn default() -> Self {
        FpiSpec {
            num_iter: 16,
            tol: 0.0,
            check_inputs: true,
        }
    }
}

impl FpiSpec {
    /// pymdp's defaults: 16 iterations, no early stop.
    pub fn new() -> Self {
        Self::default()
    }

    /// K.
    pub fn iters(mut self, k: u32) -> Self {
        self.num_iter = k;
        self
    }

    /// The early-stop tolerance on |ΔF|.
    pub fn tol(mut self, tol: f32) -> Self {
        self.tol = tol;
        self
    }

    /// Whether to scan the inputs on a GPU (see the field).
    pub fn check_inputs(mut self, on: bool) -> Self {
        self.check_inputs = on;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.num_iter == 0 || self.num_iter > 1 << 20 {
            return Err(Error::invalid(
                "num_iter",
                format!("must be in 1..=2^20, got {}", self.num_iter),
            ));
        }
        if !(self.tol.is_finite() && self.tol >= 0.0) {
            return Err(Error::invalid(
                "tol",
                format!("must be finite and >= 0, got {}", self.tol),
            ));
        }
        Ok(())
    }
}

/// The sequence update rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Method {
    /// pymdp's `vmp`: messages are expectations of ln B.
    #[default]
    Vmp,
    /// pymdp's `mmp`: messages are logs of expectations, the t = 0 prior halved when T > 1.
    Mmp,
}

impl Method {
    /// The C ABI code (`FEP_VMP_METHOD_*`).
    pub fn code(self) -> i32 {
        match self {
            Method::Vmp => 0,
            Method::Mmp => 1,
        }
    }

    /// From the C ABI code.
    pub fn from_code(code: i32) -> Result<Method> {
        match code {
            0 => Ok(Method::Vmp),
            1 => Ok(Method::Mmp),
            _ => Err(Error::invalid(
                "method",
                format!("{code} is not FEP_VMP_METHOD_VMP (0) or FEP_VMP_METHOD_MMP (1)"),
            )),
        }
    }
}

/// Sequence inference over a window: K iterations of the chosen update with step size τ.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SequenceSpec {
    /// Vmp or Mmp.
    pub method: Method,
    /// K ≥ 1 (pymdp's default 16).
    pub num_iter: u32,
    /// τ in (0, 1] (pymdp's Agent: 1).
    pub tau: f32,
    /// As [`FpiSpec::check_inputs`].
    pub check_inputs: bool,
}

impl SequenceSpec {
    /// `method` with pymdp's Agent defaults: 16 iterations, τ = 1.
    pub fn new(method: Method) -> Self {
        SequenceSpec {
            method,
            num_iter: 16,
            tau: 1.0,
            check_inputs: true,
        }
    }

    /// K.
    pub fn iters(mut self, k: u32) -> Self {
        self.num_iter = k;
        self
    }

    /// τ.
    pub fn tau(mut self, tau: f32) -> Self {
        self.tau = tau;
        self
    }

    /// Whether to scan the inputs on a GPU.
    pub fn check_inputs(mut self, on: bool) -> Self {
        self.check_inputs = on;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.num_iter == 0 || self.num_iter > 1 << 20 {
            return Err(Error::invalid(
                "num_iter",
                format!("must be in 1..=2^20, got {}", self.num_iter),
            ));
        }
        if !(self.tau.is_finite() && self.tau > 0.0 && self.tau <= 1.0) {
            return Err(Error::invalid(
                "tau",
                format!("must be in (0, 1], got {}", self.tau),
            ));
        }
        Ok(())
    }
}

/// Policy inference: which terms of −G to include, and the precision γ.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PolicySpec {
    /// γ ≥ 0 (pymdp's Agent: 1).
    pub gamma: f32,
    /// q(o)·C.
    pub utility: bool,
    /// H[q(o)] − E_q[H[A(·|s)]], per modality.
    pub state_info_gain: bool,
    /// The parameter novelty of pA and pB (those the model has), pymdp's exact form.
    pub param_info_gain: bool,
    /// As [`FpiSpec::check_inputs`] (the beliefs: finite and ≥ 0).
    pub check_inputs: bool,
}

impl Default for PolicySpec {
    fn default() -> Self {
        PolicySpec {
            gamma: 1.0,
            utility: true,
            state_info_gain: true,
            param_info_gain: false,
            check_inputs: true,
        }
    }
}

impl PolicySpec {
    /// pymdp's Agent defaults: γ = 1, utility and state information gain, no novelty.
    pub fn new() -> Self {
        Self::default()
    }

    /// γ.
    pub fn gamma(mut self, gamma: f32) -> Self {
        self.gamma = gamma;
        self
    }

    /// Which terms: utility, state information gain, parameter novelty.
    pub fn terms(mut self, utility: bool, state_info_gain: bool, param_info_gain: bool) -> Self {
        self.utility = utility;
        self.state_info_gain = state_info_gain;
        self.param_info_gain = param_info_gain;
        self
    }

    /// Whether to scan the inputs on a GPU.
    pub fn check_inputs(mut self, on: bool) -> Self {
        self.check_inputs = on;
        self
    }

    fn validate(&self, model: &Model) -> Result<()> {
        if !(self.gamma.is_finite() && self.gamma >= 0.0) {
            return Err(Error::invalid(
                "gamma",
                format!("must be finite and >= 0, got {}", self.gamma),
            ));
        }
        model.require_b("policy inference (beliefs are rolled forward through B)")?;
        if model.t.num_policies == 0 {
            return Err(Error::invalid(
                "model",
                "has no policy table (ModelSpec::policies)",
            ));
        }
        if self.param_info_gain && model.counts.a.is_none() && model.counts.b.is_none() {
            return Err(Error::invalid(
                "param_info_gain",
                "needs Dirichlet counts pa or pb in the model",
            ));
        }
        Ok(())
    }
}

/// Learning rates of the Dirichlet updates; 0 skips a tensor. A rate > 0 needs the model to
/// carry those counts.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct LearnSpec {
    /// η for pA.
    pub lr_a: f32,
    /// η for pB.
    pub lr_b: f32,
    /// η for pD.
    pub lr_d: f32,
    /// As [`FpiSpec::check_inputs`].
    pub check_inputs: bool,
}

impl LearnSpec {
    /// Rates for pA, pB and pD (0 = leave as is); inputs checked.
    pub fn new(lr_a: f32, lr_b: f32, lr_d: f32) -> Self {
        LearnSpec {
            lr_a,
            lr_b,
            lr_d,
            check_inputs: true,
        }
    }

    /// Whether to scan the inputs on a GPU.
    pub fn check_inputs(mut self, on: bool) -> Self {
        self.check_inputs = on;
        self
    }

    fn validate(&self, model: &Model) -> Result<()> {
        if self.lr_b > 0.0 && self.lr_b.is_finite() {
            model.require_b("learning pB (lr_b > 0)")?;
        }
        let has = [
            model.counts.a.is_some(),
            model.counts.b.is_some(),
            model.counts.d.is_some(),
        ];
        for ((name, lr), has) in [
            ("lr_a", self.lr_a),
            ("lr_b", self.lr_b),
            ("lr_d", self.lr_d),
        ]
        .into_iter()
        .zip(has)
        {
            if !(lr.is_finite() && lr >= 0.0) {
                return Err(Error::invalid(
                    name,
                    format!("must be finite and >= 0, got {lr}"),
                ));
            }
            if lr > 0.0 && !has {
                return Err(Error::invalid(
                    name,
                    format!("is {lr} but the model has no counts p{}", &name[3..]),
                ));
            }
        }
        Ok(())
    }
}

/// Where [`infer_states_into`] writes, on the model's device: `qs` `[N, ΣS]`, `vfe` `[N]`,
/// `iterations` `[N]` (iterations run), `vfe_trace` `[N, K]` (F after each iteration; frozen
/// after an early stop).
pub struct StatesOutputs<'a> {
    /// The posteriors.
    pub qs: ViewMut<'a, f32>,
    /// F per agent.
    pub vfe: Option<ViewMut<'a, f32>>,
    /// Iterations run per agent.
    pub iterations: Option<ViewMut<'a, i32>>,
    /// F per agent and iteration.
    pub vfe_trace: Option<ViewMut<'a, f32>>,
}

/// What [`infer_states`] returns.
#[derive(Debug)]
pub struct StatesResult {
    /// `[N, ΣS]`.
    pub qs: DeviceBuffer<f32>,
    /// `[N]`.
    pub vfe: DeviceBuffer<f32>,
    /// `[N]`.
    pub iterations: DeviceBuffer<i32>,
    /// `[N, K]`.
    pub vfe_trace: DeviceBuffer<f32>,
}

/// Where [`infer_sequence_into`] writes: `qs` `[N, T, ΣS]`, `vfe` `[N]` (the window's sequence
/// free energy), `vfe_t` `[N, T]` (its per-step terms).
pub struct SequenceOutputs<'a> {
    /// The posteriors per step.
    pub qs: ViewMut<'a, f32>,
    /// F per agent.
    pub vfe: Option<ViewMut<'a, f32>>,
    /// F per agent and step.
    pub vfe_t: Option<ViewMut<'a, f32>>,
}

/// What [`infer_sequence`] returns.
#[derive(Debug)]
pub struct SequenceResult {
    /// `[N, T, ΣS]`.
    pub qs: DeviceBuffer<f32>,
    /// `[N]`.
    pub vfe: DeviceBuffer<f32>,
    /// `[N, T]`.
    pub vfe_t: DeviceBuffer<f32>,
}

/// Where [`infer_policies_into`] writes: `g` `[N, P]` (G = −pymdp's neg_efe) and `q_pi` `[N, P]`.
pub struct PolicyOutputs<'a> {
    /// The expected free energy per agent and policy.
    pub g: Option<ViewMut<'a, f32>>,
    /// q(π) per agent.
    pub q_pi: ViewMut<'a, f32>,
}

/// What [`infer_policies`] returns.
#[derive(Debug)]
pub struct PolicyResult {
    /// `[N, P]`.
    pub g: DeviceBuffer<f32>,
    /// `[N, P]`.
    pub q_pi: DeviceBuffer<f32>,
}

/// The batch size implied by `len` entries of `per` each.
fn batch_of(name: &str, len: usize, per: usize) -> Result<usize> {
    if per == 0 || len == 0 || !len.is_multiple_of(per) {
        return Err(Error::invalid(
            name,
            format!("has {len} elements, not a positive multiple of {per}"),
        ));
    }
    Ok(len / per)
}

fn out_len<T: bytemuck::Pod>(
    name: &str,
    v: &Option<ViewMut<'_, T>>,
    want: usize,
    dev: &Device,
) -> Result<()> {
    if let Some(v) = v {
        same_device(name, v.device(), dev)?;
        check_len(name, v.len(), want)?;
    }
    Ok(())
}

fn span_of<T: bytemuck::Pod>(
    name: &'static str,
    v: &Option<ViewMut<'_, T>>,
) -> Option<(&'static str, u64, usize)> {
    v.as_ref().map(|v| {
        (
            name,
            v.addr,
            v.len().saturating_mul(std::mem::size_of::<T>()),
        )
    })
}

/// Checks the observations and returns their batch: N·T entries of the modality width.
fn check_obs(model: &Model, obs: &Obs<'_>, steps: usize) -> Result<usize> {
    same_device("obs", obs.device(), &model.device)?;
    let per = product("steps", &[obs.width(model), steps])?;
    batch_of("obs", obs.len(), per)
}

fn check_prior(model: &Model, prior: Option<&View<'_, f32>>, n: usize) -> Result<()> {
    if let Some(p) = prior {
        same_device("prior", p.device(), &model.device)?;
        check_len("prior", p.len(), product("prior", &[n, model.t.sum_s])?)?;
    }
    Ok(())
}

fn check_actions(
    model: &Model,
    actions: Option<&View<'_, i32>>,
    n: usize,
    steps: usize,
) -> Result<()> {
    match actions {
        Some(a) => {
            same_device("actions", a.device(), &model.device)?;
            let want = product("actions", &[n, steps - 1, model.t.factors()])?;
            check_len("actions", a.len(), want)
        }
        None if steps > 1 => Err(Error::invalid(
            "actions",
            format!(
                "missing: a window of {steps} steps needs [N, {}, F] past actions",
                steps - 1
            ),
        )),
        None => Ok(()),
    }
}

/// State inference for a batch, into `out`, enqueued on `stream`. `obs`: `[N, M]` indices or
/// `[N, ΣO]` distributions; `prior`: `[N, ΣS]` (None: every agent starts from D). Everything is
/// checked before anything is written.
pub fn infer_states_into(
    model: &Model,
    spec: &FpiSpec,
    obs: &Obs<'_>,
    prior: Option<&View<'_, f32>>,
    out: StatesOutputs<'_>,
    stream: Stream,
) -> Result<()> {
    spec.validate()?;
    let n = check_obs(model, obs, 1)?;
    check_prior(model, prior, n)?;
    let dev = &model.device;
    same_device("qs", out.qs.device(), dev)?;
    check_len("qs", out.qs.len(), product("qs", &[n, model.t.sum_s])?)?;
    out_len("vfe", &out.vfe, n, dev)?;
    out_len("iterations", &out.iterations, n, dev)?;
    out_len("vfe_trace", &out.vfe_trace, n * spec.num_iter as usize, dev)?;
    let mut ins = vec![("obs", obs.addr(), obs.len().saturating_mul(4))];
    if let Some(p) = prior {
        ins.push(("prior", p.addr(), p.len().saturating_mul(4)));
    }
    let outs: Vec<_> = [
        Some(("qs", out.qs.addr, out.qs.len().saturating_mul(4))),
        span_of("vfe", &out.vfe),
        span_of("iterations", &out.iterations),
        span_of("vfe_trace", &out.vfe_trace),
    ]
    .into_iter()
    .flatten()
    .collect();
    check_no_overlap(&ins, &outs)?;
    if dev.is_reference() {
        return cpu::states_views(model, spec, obs, prior, n, out);
    }
    if !dev.is_gpu() {
        return crate::threads::install(|| fast::states_views(model, spec, obs, prior, n, out));
    }
    #[cfg(fep_gpu)]
    {
        gpu::infer_states(model, spec, obs, prior, n, out, stream)
    }
    #[cfg(not(fep_gpu))]
    {
        let _ = stream;
        unreachable!("a GPU device exists only with a GPU feature")
    }
}

/// State inference on the default stream into new buffers (with the per-iteration trace).
pub fn infer_states(
    model: &Model,
    spec: &FpiSpec,
    obs: &Obs<'_>,
    prior: Option<&View<'_, f32>>,
) -> Result<StatesResult> {
    spec.validate()?;
    let n = check_obs(model, obs, 1)?;
    let dev = &model.device;
    let mut r = StatesResult {
        qs: dev.alloc(product("qs", &[n, model.t.sum_s])?)?,
        vfe: dev.alloc(n)?,
        iterations: dev.alloc(n)?,
        vfe_trace: dev.alloc(product("vfe_trace", &[n, spec.num_iter as usize])?)?,
    };
    let out = StatesOutputs {
        qs: r.qs.view_mut(),
        vfe: Some(r.vfe.view_mut()),
        iterations: Some(r.iterations.view_mut()),
        vfe_trace: Some(r.vfe_trace.view_mut()),
    };
    infer_states_into(model, spec, obs, prior, out, dev.default_stream())?;
    Ok(r)
}

/// Sequence inference over windows of `steps` = T steps, into `out`, on `stream`. `obs`:
/// `[N, T, M]` indices or `[N, T, ΣO]` distributions; `actions`: `[N, T−1, F]` (action t moves
/// the state from step t to t+1; None only when T = 1); `prior`: `[N, ΣS]` for step 0 (None: D).
#[allow(clippy::too_many_arguments)]
pub fn infer_sequence_into(
    model: &Model,
    spec: &SequenceSpec,
    steps: usize,
    obs: &Obs<'_>,
    actions: Option<&View<'_, i32>>,
    prior: Option<&View<'_, f32>>,
    out: SequenceOutputs<'_>,
    stream: Stream,
) -> Result<()> {
    spec.validate()?;
    model.require_b("sequence inference (the B-messages between steps)")?;
    if steps == 0 {
        return Err(Error::invalid("steps", "must be >= 1"));
    }
    let n = check_obs(model, obs, steps)?;
    check_actions(model, actions, n, steps)?;
    check_prior(model, prior, n)?;
    let dev = &model.device;
    same_device("qs", out.qs.device(), dev)?;
    check_len(
        "qs",
        out.qs.len(),
        product("qs", &[n, steps, model.t.sum_s])?,
    )?;
    out_len("vfe", &out.vfe, n, dev)?;
    out_len("vfe_t", &out.vfe_t, n * steps, dev)?;
    let mut ins = vec![("obs", obs.addr(), obs.len().saturating_mul(4))];
    if let Some(a) = actions {
        ins.push(("actions", a.addr(), a.len().saturating_mul(4)));
    }
    if let Some(p) = prior {
        ins.push(("prior", p.addr(), p.len().saturating_mul(4)));
    }
    let outs: Vec<_> = [
        Some(("qs", out.qs.addr, out.qs.len().saturating_mul(4))),
        span_of("vfe", &out.vfe),
        span_of("vfe_t", &out.vfe_t),
    ]
    .into_iter()
    .flatten()
    .collect();
    check_no_overlap(&ins, &outs)?;
    if dev.is_reference() {
        return cpu::sequence_views(model, spec, steps, obs, actions, prior, n, out);
    }
    if !dev.is_gpu() {
        return crate::threads::install(|| {
            fast::sequence_views(model, spec, steps, obs, actions, prior, n, out)
        });
    }
    #[cfg(fep_gpu)]
    {
        gpu::infer_sequence(model, spec, steps, obs, actions, prior, n, out, stream)
    }
    #[cfg(not(fep_gpu))]
    {
        let _ = stream;
        unreachable!("a GPU device exists only with a GPU feature")
    }
}

/// Sequence inference on the default stream into new buffers.
pub fn infer_sequence(
    model: &Model,
    spec: &SequenceSpec,
    steps: usize,
    obs: &Obs<'_>,
    actions: Option<&View<'_, i32>>,
    prior: Option<&View<'_, f32>>,
) -> Result<SequenceResult> {
    spec.validate()?;
    model.require_b("sequence inference (the B-messages between steps)")?;
    if steps == 0 {
        return Err(Error::invalid("steps", "must be >= 1"));
    }
    let n = check_obs(model, obs, steps)?;
    let dev = &model.device;
    let mut r = SequenceResult {
        qs: dev.alloc(product("qs", &[n, steps, model.t.sum_s])?)?,
        vfe: dev.alloc(n)?,
        vfe_t: dev.alloc(product("vfe_t", &[n, steps])?)?,
    };
    let out = SequenceOutputs {
        qs: r.qs.view_mut(),
        vfe: Some(r.vfe.view_mut()),
        vfe_t: Some(r.vfe_t.view_mut()),
    };
    infer_sequence_into(
        model,
        spec,
        steps,
        obs,
        actions,
        prior,
        out,
        dev.default_stream(),
    )?;
    Ok(r)
}

/// Policy inference for a batch of beliefs `qs` `[N, ΣS]` (the current posteriors), into
/// `out`, on `stream`.
pub fn infer_policies_into(
    model: &Model,
    spec: &PolicySpec,
    qs: &View<'_, f32>,
    out: PolicyOutputs<'_>,
    stream: Stream,
) -> Result<()> {
    spec.validate(model)?;
    let dev = &model.device;
    same_device("qs", qs.device(), dev)?;
    let n = batch_of("qs", qs.len(), model.t.sum_s)?;
    let p = model.t.num_policies;
    out_len("g", &out.g, product("g", &[n, p])?, dev)?;
    same_device("q_pi", out.q_pi.device(), dev)?;
    check_len("q_pi", out.q_pi.len(), product("q_pi", &[n, p])?)?;
    let outs: Vec<_> = [
        span_of("g", &out.g),
        Some(("q_pi", out.q_pi.addr, out.q_pi.len().saturating_mul(4))),
    ]
    .into_iter()
    .flatten()
    .collect();
    check_no_overlap(&[("qs", qs.addr(), qs.len().saturating_mul(4))], &outs)?;
    if dev.is_reference() {
        return cpu::policies_views(model, spec, qs, n, out);
    }
    if !dev.is_gpu() {
        return crate::threads::install(|| fast::policies_views(model, spec, qs, n, out));
    }
    #[cfg(fep_gpu)]
    {
        gpu::infer_policies(model, spec, qs, n, out, stream)
    }
    #[cfg(not(fep_gpu))]
    {
        let _ = stream;
        unreachable!("a GPU device exists only with a GPU feature")
    }
}

/// Policy inference on the default stream into new buffers.
pub fn infer_policies(
    model: &Model,
    spec: &PolicySpec,
    qs: &View<'_, f32>,
) -> Result<PolicyResult> {
    spec.validate(model)?;
    let n = batch_of("qs", qs.len(), model.t.sum_s)?;
    let dev = &model.device;
    let p = model.t.num_policies;
    let mut r = PolicyResult {
        g: dev.alloc(product("g", &[n, p])?)?,
        q_pi: dev.alloc(product("q_pi", &[n, p])?)?,
    };
    let out = PolicyOutputs {
        g: Some(r.g.view_mut()),
        q_pi: r.q_pi.view_mut(),
    };
    infer_policies_into(model, spec, qs, out, dev.default_stream())?;
    Ok(r)
}

/// Dirichlet learning from a batch of N windows of `steps` = T steps: `obs` `[N, T, …]` as in
/// [`infer_sequence_into`], `qs` `[N, T, ΣS]` the posteriors, `actions` `[N, T−1, F]` (needed
/// for pB when T > 1). Updates the model's counts in place (summed over agents and steps), on
/// `stream`; read them back with [`Model::counts_a`] and friends.
pub fn learn(
    model: &mut Model,
    spec: &LearnSpec,
    steps: usize,
    obs: &Obs<'_>,
    qs: &View<'_, f32>,
    actions: Option<&View<'_, i32>>,
    stream: Stream,
) -> Result<()> {
    spec.validate(model)?;
    if steps == 0 {
        return Err(Error::invalid("steps", "must be >= 1"));
    }
    let n = check_obs(model, obs, steps)?;
    same_device("qs", qs.device(), &model.device)?;
    check_len("qs", qs.len(), product("qs", &[n, steps, model.t.sum_s])?)?;
    if spec.lr_b > 0.0 {
        check_actions(model, actions, n, steps)?;
    } else if let Some(a) = actions {
        same_device("actions", a.device(), &model.device)?;
        let want = product("actions", &[n, steps - 1, model.t.factors()])?;
        check_len("actions", a.len(), want)?;
    }
    if !model.device.is_gpu() {
        return cpu::learn_views(model, spec, steps, obs, qs, actions, n);
    }
    #[cfg(fep_gpu)]
    {
        gpu::learn(model, spec, steps, obs, qs, actions, n, stream)
    }
    #[cfg(not(fep_gpu))]
    {
        let _ = stream;
        unreachable!("a GPU device exists only with a GPU feature")
    }
}
