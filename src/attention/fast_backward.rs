//! The fast CPU backward (`Device::cpu()`): f32 accumulation over f32/f16/bf16 inputs.
//! Until the blocked path lands this runs the f64 reference.

use super::backward::{BackwardProblem, Gradients};
use crate::element::Element;
use crate::error::Result;

pub(crate) fn backward<T: Element>(
    p: &BackwardProblem<'_, '_, T>,
    out: Gradients<'_, T>,
) -> Result<()> {
    super::cpu_backward::backward_views(p, out)
}
