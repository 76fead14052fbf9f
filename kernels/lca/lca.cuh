// lca.cuh: what the LCA kernels share: the threshold functions and the argument blocks.
//
// Each kernel takes one argument struct by value. The structs are mirrored field for field by
// #[repr(C)] structs in src/lca/gpu.rs; keep the two in step (same order, same types).
#pragma once
#include "../port/reduce.cuh"
#include "../port/types.cuh"

// Threshold kinds, numbered as Threshold in src/lca/mod.rs and FEP_LCA_* in the C header.
enum LcaThreshold { LCA_SOFT = 0, LCA_SOFT_NONNEG = 1, LCA_HARD = 2, LCA_HARD_NONNEG = 3 };

FEP_DEVICE float lca_theta(float u, float lambda, int kind) {
    switch (kind) {
        case LCA_SOFT: return copysignf(fmaxf(fabsf(u) - lambda, 0.0f), u);
        case LCA_SOFT_NONNEG: return fmaxf(u - lambda, 0.0f);
        case LCA_HARD: return fabsf(u) > lambda ? u : 0.0f;
        default: return u > lambda ? u : 0.0f;
    }
}

// C[i, j] = alpha * sum_r A(i, r) B(r, j) + beta * D[i, j] + (i == j ? diag : 0)
// A is read in the kernel's dtype with strides (sa_row, sa_col); B, C, D are f32.
// C may alias D (each element of D is read by the one thread that writes it).
struct LcaGemmArgs {
    const void* a;
    const float* b;
    const float* d;  // may be null
    float* c;
    int64_t rows, cols, inner;
    int64_t sa_row, sa_col, sb_row, sb_col, ldc, ldd;
    float alpha, beta, diag;
    int32_t pad_;
};

// One LCA solve over a batch (or a chunk of it): block s serves sample s. Kept small: on wave64
// AMD GPUs every field sits in a scalar register for the whole kernel.
struct LcaSolveArgs {
    const float* b;        // [batch, m]  Phi^T x
    const double* xsq;     // [batch]     |x|^2, for the energy
    const float* g;        // [m, m]      Phi^T Phi - I (symmetric)
    float* u;              // [batch, m]  in: u0 when has_u0; out: u (the stepped kernel's state)
    float* a;              // [batch, m]  out: theta(u)
    float* energy;         // [batch, steps] or null
    uint32_t* active;      // [batch, steps] or null
    uint32_t* steps_done;  // [batch]
    float* state;          // stepped kernel: [batch, 3m + 4] (c, val, idx, meta); else null
    int32_t m, steps, t_begin, t_end, threshold, has_u0;
    float lambda, eta, tol;
    int32_t tol_mode;  // LCA_TOL_ABSOLUTE: stop when max|du| < tol; LCA_TOL_RELATIVE: < tol * max|b|
};

// Early-stop modes, numbered as TolMode in src/lca/mod.rs and FEP_LCA_TOL_* in the C header.
enum LcaTolMode { LCA_TOL_ABSOLUTE = 0, LCA_TOL_RELATIVE = 1 };

// Shared memory the persistent kernel needs per block, beyond its static scratch: u, c, val, idx
// per unit, and 4 ints of meta.
#define LCA_SMEM_BYTES_PER_UNIT 16
#define LCA_SMEM_BYTES_FIXED 16
// The inhibition sweeps every row of G (no gather) when more than 1/LCA_DENSE_DIV are active.
#define LCA_DENSE_DIV 4
#define LCA_THREADS 256
