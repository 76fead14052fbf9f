//! The merge by lse on a GPU (kernels/attention/merge.cu, `attn_merge_<dtype>`): for
//! [`super::merge_into`] and for the decode split of [`super::gpu::forward`].

use std::ffi::c_void;

use crate::backend::{Device, LaunchConfig, Stream};
use crate::element::Element;
use crate::error::{Error, Result};

const MODULE: &str = "attention/merge";
/// ATTN_MERGE_THREADS of merge.cu.
const THREADS: usize = 256;

/// `AttnMergeParams` of kernels/attention/merge.cu, field for field.
#[repr(C)]
struct MergeParams {
    o_parts: u64,
    lse_parts: u64,
    e_parts: u64,
    o: u64,
    lse: u64,
    e: u64,
    o_stride: [i64; 3],
    rows: i64,
    hq: i32,
    lq: i32,
    dv: i32,
    splits: i32,
}

/// What one merge reads and writes: raw device addresses (0: none), checked by the caller.
pub(crate) struct MergeArgs {
    /// `[S, B, Hq, Lq, Dv]` row-major, T.
    pub o_parts: u64,
    /// `[S, B, Hq, Lq]` f32.
    pub lse_parts: u64,
    /// `[S, B, Hq, Lq]` f32, or 0 (then `e` must be 0).
    pub e_parts: u64,
    /// `[B, Hq, Lq, Dv]` at `o_stride`.
    pub o: u64,
    pub o_stride: [usize; 3],
    pub lse: u64,
    pub e: u64,
    /// B, Hq, Lq, Dv.
    pub shape: [usize; 4],
    pub splits: usize,
}

fn to_i32(name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::Unsupported(format!(
            "{name} = {v} exceeds the merge kernel's 32-bit sizes"
        ))
    })
}

/// Launches the merge of `a` on `stream`.
pub(crate) fn launch<T: Element>(dev: &Device, a: &MergeArgs, stream: Stream) -> Result<()> {
    debug_assert!(a.e == 0 || a.e_parts != 0);
    let [b, hq, lq, dv] = a.shape;
    let rows = b * hq * lq;
    let per_block = THREADS / dev.warp_size();
    let blocks = rows.div_ceil(per_block);
    let mut p = MergeParams {
        o_parts: a.o_parts,
        lse_parts: a.lse_parts,
        e_parts: a.e_parts,
        o: a.o,
        lse: a.lse,
        e: a.e,
        o_stride: a.o_stride.map(|x| x as i64),
        rows: rows as i64,
        hq: to_i32("Hq", hq)?,
        lq: to_i32("Lq", lq)?,
        dv: to_i32("Dv", dv)?,
        splits: to_i32("splits", a.splits)?,
    };
    let cfg = LaunchConfig {
        grid: (to_i32("merge blocks", blocks)? as u32, 1, 1),
        block: THREADS as u32,
        smem: 0,
    };
    let kernel = format!("attn_merge_{}", T::DTYPE.suffix());
    let arg: *mut c_void = (&mut p as *mut MergeParams).cast();
    dev.launch(MODULE, &kernel, cfg, &mut [arg], stream)
}
