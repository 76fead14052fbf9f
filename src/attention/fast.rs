//! The fast CPU forward (`Device::cpu()`): f32 accumulation over f32/f16/bf16 inputs.
//! Until the blocked path lands this runs the f64 reference.

use super::{AttentionOutputs, Problem};
use crate::element::Element;
use crate::error::Result;

pub(crate) fn forward<T: Element>(
    p: &Problem<'_, '_, T>,
    out: AttentionOutputs<'_, T>,
) -> Result<()> {
    super::cpu::forward_views(p, out)
}
