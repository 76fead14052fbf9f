//! One warp's tensor-core tile (kernels/port/mma.cuh through fep_kernels::diagnostics) against
//! the host product, for every input type, on the GPU under test (tests/common/gpu.rs).
//!
//! The inputs are small integers, exact in tf32, f16 and bf16, and every product sum stays far
//! below 2^24, so the device must match the host exactly: any difference is a fragment-layout
//! error (a lane holding the wrong element), never rounding. Each entry of A and B is distinct
//! enough in its position that swapped rows, columns or k show up.

mod common;

use common::gpu::gpu;
use fep_kernels::DType;
use fep_kernels::diagnostics::{MMA_TILE_COLS, MMA_TILE_ROWS, mma_tile};

fn host_product(a: &[f32], b: &[f32], k: usize) -> Vec<f32> {
    let mut c = vec![0f32; MMA_TILE_ROWS * MMA_TILE_COLS];
    for r in 0..MMA_TILE_ROWS {
        for col in 0..MMA_TILE_COLS {
            c[r * MMA_TILE_COLS + col] = (0..k)
                .map(|i| a[r * k + i] as f64 * b[i * MMA_TILE_COLS + col] as f64)
                .sum::<f64>() as f32;
        }
    }
    c
}

#[test]
fn mma_tile_matches_the_host_product_exactly() {
    let Some(dev) = gpu("mma_tile_matches_the_host_product_exactly") else {
        return;
    };
    // k: one step of every kK (4, 8, 16), partial steps, several steps.
    for k in [1, 3, 4, 8, 16, 17, 40] {
        let a: Vec<f32> = (0..MMA_TILE_ROWS * k)
            .map(|i| ((i / k * 7 + i % k * 3) % 11) as f32 - 5.0)
            .collect();
        let b: Vec<f32> = (0..k * MMA_TILE_COLS)
            .map(|i| ((i / MMA_TILE_COLS * 5 + i % MMA_TILE_COLS * 2) % 13) as f32 - 6.0)
            .collect();
        let want = host_product(&a, &b, k);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let got = mma_tile(&dev, dtype, &a, &b, k).expect("mma_tile");
            let bad: Vec<String> = got
                .iter()
                .zip(&want)
                .enumerate()
                .filter(|(_, (g, w))| g != w)
                .take(8)
                .map(|(i, (g, w))| {
                    format!(
                        "C[{}][{}] = {g}, expected {w}",
                        i / MMA_TILE_COLS,
                        i % MMA_TILE_COLS
                    )
                })
                .collect();
            assert!(bad.is_empty(), "{dtype:?}, k = {k}: {}", bad.join("; "));
        }
    }
}

#[test]
fn mma_tile_rejects_bad_input() {
    let Some(dev) = gpu("mma_tile_rejects_bad_input") else {
        return;
    };
    assert!(mma_tile(&dev, DType::F32, &[0.0; 16], &[0.0; 31], 1).is_err());
    assert!(mma_tile(&dev, DType::F32, &[], &[], 0).is_err());
    assert!(
        mma_tile(
            &fep_kernels::Device::cpu(),
            DType::F32,
            &[0.0; 16],
            &[0.0; 32],
            1
        )
        .is_err()
    );
}
