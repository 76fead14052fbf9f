//! The fast CPU settling (`Device::cpu()`): f32 accumulation.
//! Until the blocked path lands this runs the f64 reference.

use super::{Gradients, Problem, SettleOutputs};
use crate::backend::View;
use crate::element::Element;
use crate::error::Result;

pub(super) fn run<T: Element>(
    p: &Problem<'_, '_, T>,
    x0: &View<'_, f32>,
    target: Option<&View<'_, f32>>,
    out: SettleOutputs<'_>,
    grads: Option<Gradients<'_>>,
) -> Result<()> {
    super::cpu::run(p, x0, target, out, grads)
}
