//! VMP on a GPU: the model's tables in device memory and the launches of kernels/vmp/*.cu.

use super::model::{CountKind, Counts, Model, Tables};
use super::{
    FpiSpec, LearnSpec, Obs, PolicyOutputs, PolicySpec, SequenceOutputs, SequenceSpec,
    StatesOutputs,
};
use crate::backend::{Device, Stream, View};
use crate::error::Result;

/// The model on a device.
pub(crate) struct DeviceModel {}

impl DeviceModel {
    pub(crate) fn upload(dev: &Device, t: &Tables, counts: &Counts) -> Result<DeviceModel> {
        todo!()
    }

    pub(crate) fn read_counts(&self, dev: &Device, kind: CountKind, i: usize) -> Result<Vec<f64>> {
        todo!()
    }
}

pub(crate) fn infer_states(
    model: &Model,
    spec: &FpiSpec,
    obs: &Obs<'_>,
    prior: Option<&View<'_, f32>>,
    n: usize,
    out: StatesOutputs<'_>,
    stream: Stream,
) -> Result<()> {
    todo!()
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn infer_sequence(
    model: &Model,
    spec: &SequenceSpec,
    steps: usize,
    obs: &Obs<'_>,
    actions: Option<&View<'_, i32>>,
    prior: Option<&View<'_, f32>>,
    n: usize,
    out: SequenceOutputs<'_>,
    stream: Stream,
) -> Result<()> {
    todo!()
}

pub(crate) fn infer_policies(
    model: &Model,
    spec: &PolicySpec,
    qs: &View<'_, f32>,
    n: usize,
    out: PolicyOutputs<'_>,
    stream: Stream,
) -> Result<()> {
    todo!()
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn learn(
    model: &mut Model,
    spec: &LearnSpec,
    steps: usize,
    obs: &Obs<'_>,
    qs: &View<'_, f32>,
    actions: Option<&View<'_, i32>>,
    n: usize,
    stream: Stream,
) -> Result<()> {
    todo!()
}
