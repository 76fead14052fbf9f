//! Checks of the hardware layer on a new device, for bring-up and bug reports.
//!
//! [`mma_tile`] runs one warp's tensor-core product (kernels/port/mma.cuh) on its own, so a
//! wrong fragment layout on some GPU shows up as a wrong 16 × 32 matrix instead of a settling
//! that drifts. tests/mma_gpu.rs runs it on every GPU the suite meets.

#[cfg(feature = "emulate")]
use crate::backend::emulate;
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
    run_check(
        dev,
        &format!("fep_mma_check_{}", dtype.suffix()),
        &mut [
            (&mut pa as *mut u64).cast(),
            (&mut pb as *mut u64).cast(),
            (&mut pc as *mut u64).cast(),
            (&mut pk as *mut i32).cast(),
        ],
    )?;
    dc.to_vec()
}

/// Launches one block of 64 threads (a wave64, or two warps computing the same tile) of a
/// kernel of kernels/port/mma_check.cu on the default stream and waits for it.
fn run_check(dev: &Device, kernel: &str, params: &mut [*mut std::ffi::c_void]) -> Result<()> {
    let cfg = LaunchConfig {
        grid: (1, 1, 1),
        block: 64,
        smem: 0,
    };
    let stream = dev.default_stream();
    dev.launch("port/mma_check", kernel, cfg, params, stream)?;
    dev.synchronize(stream)
}

/// Rows and columns of Q (`[16, 32]`), K and V (`[32, 32]`) and of S and O (`[16, 32]`) in
/// [`fragment_tiles`].
pub const FRAG_N: usize = 32;

/// The register-operand path of kernels/port/fragment.cuh on its own (one warp): S = Q Kᵀ with
/// operands loaded from shared memory by ldmatrix (NVIDIA) or 8-byte reads (CDNA), then
/// O = P V with P = S rounded to `dtype` and taken straight from the score registers. Inputs are
/// row-major f32 (Q `[16, 32]`, K and V `[32, 32]`), rounded to `dtype` (f16 or bf16) on the
/// device; returns (S, O), each `[16, 32]`. Errors: wrong lengths, another dtype, a device
/// that is not a GPU.
pub fn fragment_tiles(
    dev: &Device,
    dtype: DType,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    check_len("q", q.len(), 16 * FRAG_N)?;
    check_len("k", k.len(), FRAG_N * FRAG_N)?;
    check_len("v", v.len(), FRAG_N * FRAG_N)?;
    if !matches!(dtype, DType::F16 | DType::BF16) {
        return Err(Error::invalid(
            "dtype",
            format!("{dtype:?}: the fragment path is for f16 and bf16"),
        ));
    }
    if !dev.is_gpu() {
        return Err(Error::Unsupported(format!(
            "fragment_tiles runs on a GPU, not on {dev:?}"
        )));
    }
    let (dq, dk, dv) = (dev.upload(q)?, dev.upload(k)?, dev.upload(v)?);
    let mut ds = dev.upload(&vec![f32::NAN; 16 * FRAG_N])?;
    let mut d_o = dev.upload(&vec![f32::NAN; 16 * FRAG_N])?;
    let (mut pq, mut pk, mut pv) = (dq.addr(), dk.addr(), dv.addr());
    let (mut ps, mut po) = (ds.view_mut().addr, d_o.view_mut().addr);
    run_check(
        dev,
        &format!("fep_frag_check_{}", dtype.suffix()),
        &mut [
            (&mut pq as *mut u64).cast(),
            (&mut pk as *mut u64).cast(),
            (&mut pv as *mut u64).cast(),
            (&mut ps as *mut u64).cast(),
            (&mut po as *mut u64).cast(),
        ],
    )?;
    Ok((ds.to_vec()?, d_o.to_vec()?))
}

/// Checks that the emulated device (feature `emulate`) catches what it promises to: a missing
/// barrier reads stale shared memory (in either direction between threads), a barrier that not
/// every thread of a block reaches is an error instead of a hang, a buffer read before its
/// asynchronous copy's wait holds the old data, and a warp that refills a buffer while another
/// warp still reads it (a missing barrier before reuse) is caught. Runs kernels that break each rule on purpose, for
/// warp size `warp` (32 or 64). Errors: another warp size, or the promises broken (named).
#[cfg(feature = "emulate")]
#[cfg_attr(docsrs, doc(cfg(feature = "emulate")))]
pub fn emulator_self_check(warp: usize) -> Result<()> {
    if warp != 32 && warp != 64 {
        return Err(Error::invalid(
            "warp",
            format!("must be 32 or 64, got {warp}"),
        ));
    }
    let broken = emulate::self_check(warp);
    if broken.is_empty() {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "the emulator (warp {warp}) broke its promises: {}",
            broken.join("; ")
        )))
    }
}
