//! The optional per-score inputs of the GPU kernels (`AttnScoreInputs` of
//! kernels/attention/score_inputs.cuh): bias, mask, per-head ν and packed-sequence offsets.

use super::Precisions;

/// `AttnScoreInputs` of kernels/attention/score_inputs.cuh, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct AttnScoreInputs {
    pub bias: u64,
    pub mask: u64,
    pub nu_head: u64,
    pub cu_q: u64,
    pub cu_k: u64,
    pub bias_stride: [i64; 3],
    pub mask_stride: [i64; 3],
}

/// Element strides of a broadcast tensor's B, H and L dimensions, 0 where it has size 1.
fn broadcast_strides(shape: [usize; 4], strides: [usize; 3]) -> [i64; 3] {
    std::array::from_fn(|i| if shape[i] == 1 { 0 } else { strides[i] as i64 })
}

impl AttnScoreInputs {
    /// The kernel's view of `precision`'s bias, mask, ν and varlen offsets (checked already).
    pub(crate) fn new(precision: &Precisions<'_>) -> Self {
        let mut x = AttnScoreInputs::default();
        if let Some(b) = &precision.bias {
            x.bias = b.data.addr();
            x.bias_stride = broadcast_strides(b.shape, b.strides);
        }
        if let Some(m) = &precision.mask {
            x.mask = m.data.addr();
            x.mask_stride = broadcast_strides(m.shape, m.strides);
        }
        if let Some(nu) = &precision.nu {
            x.nu_head = nu.addr();
        }
        if let Some(vl) = &precision.varlen {
            x.cu_q = vl.cu_q.addr();
            x.cu_k = vl.cu_k.addr();
        }
        x
    }

    /// Whether a bias or mask is broadcast over Lq (stride 0): the forward kernels fold it into
    /// their per-key terms, once per key tile.
    pub(crate) fn key_extra(&self) -> bool {
        (self.bias != 0 && self.bias_stride[2] == 0) || (self.mask != 0 && self.mask_stride[2] == 0)
    }

    /// Whether a bias or mask varies over Lq: the forward kernels add it per score.
    pub(crate) fn row_extra(&self) -> bool {
        (self.bias != 0 && self.bias_stride[2] != 0) || (self.mask != 0 && self.mask_stride[2] != 0)
    }
}
