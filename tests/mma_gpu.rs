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

#[test]
fn fragment_path_matches_the_host_exactly() {
    use fep_kernels::diagnostics::{FRAG_N, fragment_tiles};
    let Some(dev) = gpu("fragment_path_matches_the_host_exactly") else {
        return;
    };
    // Entries in {-1, 0, 1} for Q and K (|S| <= 32: exact in bf16 as P), {-2..2} for V; each
    // depends on its row and its column and on their product (not periodic in either), so a
    // swapped 8 x 8 block, row, column or k changes the product.
    let pick = |i: usize, m: usize| {
        let (r, c) = (i / FRAG_N, i % FRAG_N);
        ((r * 5 + c * 3 + (r * c) % 7) % m) as f32 - (m / 2) as f32
    };
    let q: Vec<f32> = (0..16 * FRAG_N).map(|i| pick(i, 3)).collect();
    let k: Vec<f32> = (0..FRAG_N * FRAG_N).map(|i| pick(i + 7, 3)).collect();
    let v: Vec<f32> = (0..FRAG_N * FRAG_N).map(|i| pick(i + 3, 5)).collect();
    let mut s = vec![0f32; 16 * FRAG_N];
    let mut o = vec![0f32; 16 * FRAG_N];
    for r in 0..16 {
        for j in 0..FRAG_N {
            s[r * FRAG_N + j] = (0..FRAG_N)
                .map(|d| q[r * FRAG_N + d] * k[j * FRAG_N + d])
                .sum();
        }
        for c in 0..FRAG_N {
            o[r * FRAG_N + c] = (0..FRAG_N)
                .map(|j| s[r * FRAG_N + j] * v[j * FRAG_N + c])
                .sum();
        }
    }
    for dtype in [DType::F16, DType::BF16] {
        let (gs, go) = fragment_tiles(&dev, dtype, &q, &k, &v).expect("fragment_tiles");
        for (name, got, want) in [("S", &gs, &s), ("O", &go, &o)] {
            let bad: Vec<String> = got
                .iter()
                .zip(want.iter())
                .enumerate()
                .filter(|(_, (g, w))| g != w)
                .take(8)
                .map(|(i, (g, w))| {
                    format!("{name}[{}][{}] = {g}, expected {w}", i / FRAG_N, i % FRAG_N)
                })
                .collect();
            assert!(bad.is_empty(), "{dtype:?}: {}", bad.join("; "));
        }
    }
    assert!(fragment_tiles(&dev, DType::F32, &q, &k, &v).is_err());
    assert!(fragment_tiles(&dev, DType::F16, &q[1..], &k, &v).is_err());
}

/// The emulator's own promises (a missing barrier reads stale data in either direction, a warp
/// that refills a buffer another warp still reads is caught, a divergent barrier is an error, a
/// read before a copy's wait sees old data): without them the emulated GPU tests could pass over
/// the very bugs they are there to catch.
#[cfg(feature = "emulate")]
#[test]
fn emulator_catches_the_races_and_deadlocks_it_promises_to() {
    for warp in [32, 64] {
        fep_kernels::diagnostics::emulator_self_check(warp).unwrap();
    }
    assert!(fep_kernels::diagnostics::emulator_self_check(48).is_err());
}
