//! The VMP reference: f64 throughout, one agent per rayon task, written to be read next to
//! DESIGN.md §4.4 and tests/fixtures/VMP-CONVENTIONS.md (pymdp 1.0.4), not to be fast.

use super::model::Model;
use super::{
    FpiSpec, LearnSpec, Obs, PolicyOutputs, PolicySpec, SequenceOutputs, SequenceSpec,
    StatesOutputs,
};
use crate::backend::View;
use crate::error::Result;

/// Observations on the host: `[N, (T,) M]` indices or `[N, (T,) ΣO]` distributions.
#[derive(Clone, Copy, Debug)]
pub enum HostObs<'a> {
    /// Indices.
    Index(&'a [i32]),
    /// Distributions.
    Dist(&'a [f64]),
}

/// [`fpi`]'s results, per agent (`[N, ΣS]`, `[N]`, `[N, K]`).
#[derive(Clone, Debug, Default)]
pub struct FpiOut {
    /// Posteriors `[N, ΣS]`.
    pub qs: Vec<f64>,
    /// F `[N]`.
    pub vfe: Vec<f64>,
    /// Iterations run `[N]`.
    pub iterations: Vec<i32>,
    /// F after each iteration `[N, K]`.
    pub vfe_trace: Vec<f64>,
    /// Σ_f q_f·ln q_f `[N]`.
    pub neg_entropy: Vec<f64>,
    /// −Σ_f q_f·ln prior_f `[N]`.
    pub prior_cross_entropy: Vec<f64>,
    /// Σ_m E_q[ll_m] `[N]` (F = neg_entropy + prior_cross_entropy − accuracy).
    pub accuracy: Vec<f64>,
}

/// [`sequence`]'s results.
#[derive(Clone, Debug, Default)]
pub struct SequenceOut {
    /// Posteriors `[N, T, ΣS]`.
    pub qs: Vec<f64>,
    /// F `[N]`.
    pub vfe: Vec<f64>,
    /// Per-step F `[N, T]`.
    pub vfe_t: Vec<f64>,
    /// Per-step terms `[N, T]`.
    pub neg_entropy_t: Vec<f64>,
    /// `[N, T]` (non-zero at t = 0 only).
    pub prior_cross_entropy_t: Vec<f64>,
    /// `[N, T]` (zero at t = 0).
    pub transition_cross_entropy_t: Vec<f64>,
    /// `[N, T]`.
    pub accuracy_t: Vec<f64>,
}

/// [`policies`]'s results, `[N, P]` each.
#[derive(Clone, Debug, Default)]
pub struct PolicyOut {
    /// G = −neg_efe with the spec's terms.
    pub g: Vec<f64>,
    /// q(π).
    pub q_pi: Vec<f64>,
    /// Σ_τ Σ_m q(o)·C (always computed).
    pub utility: Vec<f64>,
    /// Σ_τ Σ_m H[q(o)] − E H[A] (always computed).
    pub state_info_gain: Vec<f64>,
    /// pA novelty (0 without pA).
    pub novelty_a: Vec<f64>,
    /// pB novelty (0 without pB).
    pub novelty_b: Vec<f64>,
}

/// [`learn`]'s results: the updated counts (None where the model has none).
#[derive(Clone, Debug, Default)]
pub struct LearnOut {
    /// pA per modality.
    pub a: Option<Vec<Vec<f64>>>,
    /// pB per factor.
    pub b: Option<Vec<Vec<f64>>>,
    /// pD per factor.
    pub d: Option<Vec<Vec<f64>>>,
}

/// State inference (pymdp's fpi; see the module docs). `prior`: `[N, ΣS]` or None for D.
pub fn fpi(
    model: &Model,
    spec: &FpiSpec,
    obs: HostObs<'_>,
    prior: Option<&[f64]>,
) -> Result<FpiOut> {
    todo!()
}

/// Sequence inference over windows of `steps` steps.
pub fn sequence(
    model: &Model,
    spec: &SequenceSpec,
    steps: usize,
    obs: HostObs<'_>,
    actions: Option<&[i32]>,
    prior: Option<&[f64]>,
) -> Result<SequenceOut> {
    todo!()
}

/// Policy inference from beliefs `[N, ΣS]`.
pub fn policies(model: &Model, spec: &PolicySpec, qs: &[f64]) -> Result<PolicyOut> {
    todo!()
}

/// The Dirichlet updates of the model's counts (not applied: returned).
pub fn learn(
    model: &Model,
    spec: &LearnSpec,
    steps: usize,
    obs: HostObs<'_>,
    qs: &[f64],
    actions: Option<&[i32]>,
) -> Result<LearnOut> {
    todo!()
}

pub(crate) fn states_views(
    model: &Model,
    spec: &FpiSpec,
    obs: &Obs<'_>,
    prior: Option<&View<'_, f32>>,
    n: usize,
    out: StatesOutputs<'_>,
) -> Result<()> {
    todo!()
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn sequence_views(
    model: &Model,
    spec: &SequenceSpec,
    steps: usize,
    obs: &Obs<'_>,
    actions: Option<&View<'_, i32>>,
    prior: Option<&View<'_, f32>>,
    n: usize,
    out: SequenceOutputs<'_>,
) -> Result<()> {
    todo!()
}

pub(crate) fn policies_views(
    model: &Model,
    spec: &PolicySpec,
    qs: &View<'_, f32>,
    n: usize,
    out: PolicyOutputs<'_>,
) -> Result<()> {
    todo!()
}

pub(crate) fn learn_views(
    model: &mut Model,
    spec: &LearnSpec,
    steps: usize,
    obs: &Obs<'_>,
    qs: &View<'_, f32>,
    actions: Option<&View<'_, i32>>,
    n: usize,
) -> Result<()> {
    todo!()
}
