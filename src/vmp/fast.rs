//! The fast CPU VMP (`Device::cpu()`): f32 accumulation.
//! Until the blocked path lands this runs the f64 reference.

use super::cpu;
use super::model::Model;
use super::{
    FpiSpec, Obs, PolicyOutputs, PolicySpec, SequenceOutputs, SequenceSpec, StatesOutputs,
};
use crate::backend::View;
use crate::error::Result;

pub(crate) fn states_views(
    model: &Model,
    spec: &FpiSpec,
    obs: &Obs<'_>,
    prior: Option<&View<'_, f32>>,
    n: usize,
    out: StatesOutputs<'_>,
) -> Result<()> {
    cpu::states_views(model, spec, obs, prior, n, out)
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
    cpu::sequence_views(model, spec, steps, obs, actions, prior, n, out)
}

pub(crate) fn policies_views(
    model: &Model,
    spec: &PolicySpec,
    qs: &View<'_, f32>,
    n: usize,
    out: PolicyOutputs<'_>,
) -> Result<()> {
    cpu::policies_views(model, spec, qs, n, out)
}
