//! Checks of the hardware layer on a new device, for bring-up and bug reports.
//!
//! [`mma_tile`] runs one warp's tensor-core product (kernels/port/mma.cuh) on its own, so a
//! wrong fragment layout on some GPU shows up as a wrong 16 × 32 matrix instead of a settling
//! that drifts. tests/mma_gpu.rs runs it on every GPU the suite meets.

use crate::backend::{Device, LaunchConfig};
use crate::element::DType;
use crate::error::{Error, Result};
use crate::tensor::check_len;

/// Columns of the tile [`mma_tile`] computes (MMA_CHECK_NT tensor-core tiles of 16).
pub const MMA_TILE_COLS: usize = 32;
/// Rows of that tile.
pub const MMA_TILE_ROWS: usize = 16;

/// C = A B for A `[16, k]` and B `[k, 32]` (row-major f32, rounded to `dtype` on the device:
/// tf32 for f32 on NVIDIA), through one warp's tensor-core tiles; returns C `[16, 32]`.
/// Errors: lengths that do not match `k`, `k` = 0 or above 2^20, a device that is not a GPU.
pub fn mma_tile(dev: &Device, dtype: DType, a: &[f32], b: &[f32], k: usize) -> Result<Vec<f32>> {
    if k == 0 || k > 1 << 20 {
        return Err(Error::invalid("k", format!("must be in 1..=2^20, got {k}")));
    }
    check_len("a", a.len(), MMA_TILE_ROWS * k)?;
    check_len("b", b.len(), k * MMA_TILE_COLS)?;
    if !dev.is_gpu() {
        return Err(Error::Unsupported(format!(
            "mma_tile runs on a GPU, not on {dev:?}"
        )));
    }
    let da = dev.upload(a)?;
    let db = dev.upload(b)?;
    let mut dc = dev.upload(&vec![f32::NAN; MMA_TILE_ROWS * MMA_TILE_COLS])?;
    let (mut pa, mut pb, mut pc, mut pk) = (da.addr(), db.addr(), dc.view_mut().addr, k as i32);
    let cfg = LaunchConfig {
        grid: (1, 1, 1),
        block: 64,
        smem: 0,
    };
    let params: &mut [*mut std::ffi::c_void] = &mut [
        (&mut pa as *mut u64).cast(),
        (&mut pb as *mut u64).cast(),
        (&mut pc as *mut u64).cast(),
        (&mut pk as *mut i32).cast(),
    ];
    let stream = dev.default_stream();
    dev.launch(
        "port/mma_check",
        &format!("fep_mma_check_{}", dtype.suffix()),
        cfg,
        params,
        stream,
    )?;
    dev.synchronize(stream)?;
    dc.to_vec()
}
