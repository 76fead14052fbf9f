// settle.cuh: what the predictive-coding kernels share: activations, the argument block, and
// the two products of a step written once for the persistent and the stepped kernels.
//
//   forward  (layer l):  mu_l  = f_l(x_{l-1}) W_l^T + b_l          [rows x n_l],   K = n_{l-1}
//   backward (layer l):  back  = (Pi_{l+1} eps_{l+1}) W_{l+1}      [rows x n_l],   K = n_{l+1}
//
// Rows are samples, columns units. Both run on the tensor cores through port/mma.cuh with the
// weights' dtype as the input type. f32 weights are accurate to f32 by default (on NVIDIA three
// tf32 products, the two small ones in their own accumulator, fep_mma_run_split; AMD's f32
// MFMA is exact); SettleArgs::tf32 = 1 (the
// spec's allow_tf32) runs one tf32 product instead, ~3x fewer tensor-core operations at ~1e-3
// relative error per product. The activation, precision and bounds are applied in the operand
// functors, the error/update maths in the epilogue.
//
// The argument struct is mirrored field for field by a #[repr(C)] struct in src/settle/gpu.rs.
#pragma once
#include "../port/mma.cuh"
#include "../port/reduce.cuh"

#define SETTLE_THREADS 128
#define SETTLE_WARPS (SETTLE_THREADS / FEP_WARP_SIZE)
#define SETTLE_MAX_LAYERS 16
// Rows (samples) per block of the persistent kernel: one tensor-core tile.
#define SETTLE_TILE_ROWS 16
// Block tile of the stepped kernels.
#define SETTLE_BLOCK_ROWS 64
#define SETTLE_BLOCK_COLS 64

// Activations, numbered as Activation::code in src/settle/mod.rs and FEP_ACT_* in the header.
enum SettleAct { ACT_IDENTITY = 0, ACT_TANH = 1, ACT_RELU = 2, ACT_LEAKY_RELU = 3, ACT_SIGMOID = 4, ACT_GELU = 5 };

FEP_DEVICE float settle_f(int act, float alpha, float x) {
    switch (act) {
        case ACT_IDENTITY: return x;
        case ACT_TANH: return tanhf(x);
        case ACT_RELU: return fmaxf(x, 0.0f);
        case ACT_LEAKY_RELU: return x > 0.0f ? x : alpha * x;
        case ACT_SIGMOID: return 1.0f / (1.0f + expf(-x));
        default: return 0.5f * x * erfcf(-x * 0.70710678118654752f);
    }
}

FEP_DEVICE float settle_df(int act, float alpha, float x) {
    switch (act) {
        case ACT_IDENTITY: return 1.0f;
        case ACT_TANH: {
            const float t = tanhf(x);
            return 1.0f - t * t;
        }
        case ACT_RELU: return x > 0.0f ? 1.0f : 0.0f;
        case ACT_LEAKY_RELU: return x > 0.0f ? 1.0f : alpha;
        case ACT_SIGMOID: {
            const float s = 1.0f / (1.0f + expf(-x));
            return s * (1.0f - s);
        }
        default:
            return 0.5f * erfcf(-x * 0.70710678118654752f) + x * expf(-0.5f * x * x) * 0.39894228040143268f;
    }
}

// Layer l >= 1 as the kernels see it.
struct SettleLayer {
    const void* w;    // W_l [n, n_in], weight dtype
    const void* b;    // b_l [n], or null
    const float* pi;  // diagonal Pi_l: [n] (pi_ld = 0) or per sample [batch, n] (pi_ld = n); null: pi_s
    float* x;         // x_l [batch, n]
    float* eps;       // eps_l [batch, n]
    float* v;         // momentum [batch, n] (stepped kernels)
    float* c;         // compensation of the state's updates [batch, n] (stepped kernels)
    float pi_s;
    float alpha;     // slope of a leaky ReLU f_l
    int32_t act;     // f_l, applied to x_{l-1}
    int32_t n, n_in;
    int32_t ep_col;  // first column of this layer's energy partials (stepped kernels)
    int32_t pi_ld;   // row stride of pi: 0 (one diagonal for every sample) or n (per sample)
    int32_t pad;
};

struct SettleArgs {
    SettleLayer layers[SETTLE_MAX_LAYERS];  // layer l at [l - 1]
    const float* x0;                        // [batch, n_0]
    float* trace;                           // [batch, steps + 1], or null
    float* energy;                          // [batch], or null
    uint32_t* steps;                        // [batch]
    int32_t* done;                          // [batch] (stepped)
    float* prev;                            // [batch]: the last energy (stepped)
    float* start;                           // [batch]: the starting energy (stepped)
    float* epart;                           // [batch, ep_cols]: energy partials (stepped)
    float* grad;                            // gradient output (grad kernels)
    int32_t depth, batch, total_steps, t;
    int32_t layer;    // the layer a stepped kernel works on (1-based)
    int32_t mode;     // forward: SETTLE_EVAL or SETTLE_INIT
    int32_t clamped;  // x_L is the target
    int32_t ep_cols;
    float eta, beta, tol;
    int32_t tf32;  // 1: single-pass tf32 products for f32 weights (allow_tf32); 0: f32-accurate
};

// The layer table, copied once per block into shared memory with constant indices. Indexing the
// kernel's parameter block by a run-time layer number makes the compilers copy all of it to the
// stack (seen on gfx90a/gfx942: 1272 bytes of scratch per lane). Every thread calls it.
FEP_DEVICE const SettleLayer* settle_layers(const SettleArgs& p) {
    __shared__ SettleLayer table[SETTLE_MAX_LAYERS];
#pragma unroll
    for (int i = 0; i < SETTLE_MAX_LAYERS; ++i)
        if (threadIdx.x == (unsigned)i) table[i] = p.layers[i];
    __syncthreads();
    return table;
}

enum SettleForwardMode { SETTLE_EVAL = 0, SETTLE_INIT = 1 };

// Pi_l of unit j for sample `row` (a global sample index).
FEP_DEVICE float settle_pi(const SettleLayer& L, int64_t row, int j) {
    return L.pi ? L.pi[row * L.pi_ld + j] : L.pi_s;
}

// The A operand of the forward product: f_l(x_{l-1}[row, k]), 0 outside [0, rows) x [0, K).
struct SettleForwardA {
    static constexpr bool kKFast = true;  // consecutive k are consecutive in memory
    const float* x;  // rows of x_{l-1}, leading dimension ld
    int64_t ld;
    int rows, K, act;
    float alpha;
    FEP_DEVICE float operator()(int r, int k) const {
        return (r < rows && k < K) ? settle_f(act, alpha, x[r * ld + k]) : 0.0f;
    }
};

// The A operand of the backward product: Pi_{l+1} eps_{l+1}[row, k].
struct SettleBackwardA {
    static constexpr bool kKFast = true;
    const float* eps;  // rows of eps_{l+1}, leading dimension ld
    int64_t ld;
    const float* pi;   // Pi_{l+1} of the first row (null: pi_s), row stride pi_ld
    int64_t pi_ld;
    float pi_s;
    int rows, K;
    FEP_DEVICE float operator()(int r, int k) const {
        return (r < rows && k < K) ? (pi ? pi[r * pi_ld + k] : pi_s) * eps[r * ld + k] : 0.0f;
    }
};

// The backward product's A for the rows from sample row0 of the layer above, A.
FEP_DEVICE SettleBackwardA settle_backward_a(const SettleLayer& A, const float* eps_above, int64_t ld_above,
                                             int64_t row0, int rows, int K) {
    const float* pi = A.pi ? A.pi + row0 * A.pi_ld : nullptr;
    return SettleBackwardA{eps_above, ld_above, pi, A.pi_ld, A.pi_s, rows, K};
}

// B of the forward product: B(c, k) = W_l[c0 + c, k] (rows of W are contiguous in k).
template <typename T>
struct SettleWeightRows {
    static constexpr bool kKFast = true;
    const T* w;
    int n, K, c0;
    FEP_DEVICE float operator()(int c, int k) const {
        return (c0 + c < n && k < K) ? fep_to_f32(w[(int64_t)(c0 + c) * K + k]) : 0.0f;
    }
};

// B of the backward product: B(c, k) = W_{l+1}[k, c0 + c] (columns of W, strided).
template <typename T>
struct SettleWeightCols {
    static constexpr bool kKFast = false;  // consecutive columns are consecutive in memory
    const T* w;
    int n, K, c0;  // n = columns of W_{l+1} (= n_l), K = its rows (n_{l+1})
    FEP_DEVICE float operator()(int c, int k) const {
        return (c0 + c < n && k < K) ? fep_to_f32(w[(int64_t)k * n + c0 + c]) : 0.0f;
    }
};

// mu_l[row, j] for the rows at `xin` (x_{l-1}) and columns c0 .. c0 + 16 NT of layer L:
// epi(row, j, mu) for every in-range element.
template <typename T, int NT, typename Epi>
FEP_DEVICE void settle_forward_tile(const SettleLayer& L, const float* xin, int64_t ld_in, int rows, int c0,
                                    bool tf32, const Epi& epi) {
    const SettleForwardA a{xin, ld_in, rows, L.n_in, L.act, L.alpha};
    const SettleWeightRows<T> b{(const T*)L.w, L.n, L.n_in, c0};
    const T* bias = (const T*)L.b;
    fep_mma_tile<T, NT>(L.n_in, a, b, !tf32, [&](int r, int c, float acc) {
        const int j = c0 + c;
        if (r < rows && j < L.n) epi(r, j, acc + (bias ? fep_to_f32(bias[j]) : 0.0f));
    });
}

// back[row, j] = sum_k Pi_{l+1,k} eps_{l+1}[row, k] W_{l+1}[k, j] for layer l below `A` (the
// layer above, l + 1), rows from sample row0; epi(row, j, back) for every in-range element.
// n = n_l. K = A.n, or 0 for the top layer (no layer above: back = 0, A is not read).
template <typename T, int NT, typename Epi>
FEP_DEVICE void settle_backward_tile(const SettleLayer& A, int K, const float* eps_above, int64_t ld_above,
                                     int64_t row0, int rows, int n, int c0, bool tf32, const Epi& epi) {
    const SettleBackwardA a = settle_backward_a(A, eps_above, ld_above, row0, rows, K);
    const SettleWeightCols<T> b{(const T*)A.w, n, K, c0};
    fep_mma_tile<T, NT>(K, a, b, !tf32, [&](int r, int c, float acc) {
        const int j = c0 + c;
        if (r < rows && j < n) epi(r, j, acc);
    });
}

// The state update of one element of a free layer from its error e and the back-propagated
// term `back` (0 for the top layer), with f'_{l+1}(x) of the layer above (act/alpha; act < 0:
// none): v <- beta v + g, x <- x - eta v. The layer above is passed by value: a pointer into the
// kernel's parameters would make the compiler copy them all to the stack.
//
// The sum x + (-eta v) is compensated (Kahan): c keeps what the f32 x lost (the state is
// x - c), so T updates do not accumulate T roundings. Without it the state's own rounding is
// the largest error of a small eps = x - mu (issue 22: |eps| ~ 1% of |x| after 100 steps, where
// 100 roundings of x were ~1e-5 of |eps|). settle_eps applies c to the error.
FEP_DEVICE void settle_update(float& x, float& v, float& c, float e, float pi, float back, int act_above,
                              float alpha_above, float eta, float beta) {
    float g = pi * e;
    if (act_above >= 0) g -= settle_df(act_above, alpha_above, x) * back;
    v = fmaf(beta, v, g);
    const float y = -eta * v - c;
    const float t = x + y;
    c = (t - x) - y;
    x = t;
}

// eps = x - mu of a state x with compensation c (the state is x - c).
FEP_DEVICE float settle_eps(float x, float c, float mu) { return (x - mu) - c; }

// The early-stop rule, shared by both kernels (and cpu.rs): after step t >= 1 with energy e, the
// previous energy prev and the starting energy start, a sample stops when |e - prev| <= tol prev
// or e <= tol start (tol > 0).
FEP_DEVICE bool settle_converged(float e, float prev, float start, float tol) {
    return tol > 0.0f && (fabsf(e - prev) <= tol * prev || e <= tol * start);
}

// ---- the stepped kernels' block product ---------------------------------------------------------
// A 64 x 64 block tile of A B through shared memory: the block stages 32 k at a time of both
// operands (each element loaded and transformed once per block, consecutive threads on
// consecutive addresses), then each warp runs its 16-row tensor-core tiles from the stage.
#define SETTLE_STAGE_K 32
#define SETTLE_STAGE_LD (SETTLE_STAGE_K + 1)
#define SETTLE_STAGE_FLOATS (2 * SETTLE_BLOCK_ROWS * SETTLE_STAGE_LD)
static_assert(SETTLE_BLOCK_ROWS == SETTLE_BLOCK_COLS, "one stage shape for both operands");

template <typename F>
FEP_DEVICE void settle_stage(const F& f, float* dst, int k0) {
    for (int i = threadIdx.x; i < SETTLE_BLOCK_ROWS * SETTLE_STAGE_K; i += SETTLE_THREADS) {
        const int r = F::kKFast ? i / SETTLE_STAGE_K : i % SETTLE_BLOCK_ROWS;
        const int k = F::kKFast ? i % SETTLE_STAGE_K : i / SETTLE_BLOCK_ROWS;
        dst[r * SETTLE_STAGE_LD + k] = f(r, k0 + k);
    }
}

// epi(r, c, value) for every (r, c) of the 64 x 64 tile, each exactly once; K may be 0 (all
// values 0). `stage` holds SETTLE_STAGE_FLOATS floats; it is free again when epi runs.
template <typename In, typename FA, typename FB, typename Epi>
FEP_DEVICE void settle_block_gemm(int K, const FA& a, const FB& b, float* stage, bool accurate, const Epi& epi) {
    constexpr int kRowTiles = SETTLE_BLOCK_ROWS / 16 / SETTLE_WARPS;
    constexpr int kNT = SETTLE_BLOCK_COLS / 16;
    float acc[kRowTiles][kNT][FEP_MMA_ACC], small[kRowTiles][kNT][FEP_MMA_ACC];
#pragma unroll
    for (int t = 0; t < kRowTiles; ++t)
#pragma unroll
        for (int j = 0; j < kNT; ++j)
#pragma unroll
            for (int i = 0; i < FEP_MMA_ACC; ++i) acc[t][j][i] = small[t][j][i] = 0.0f;
    float* sa = stage;
    float* sb = stage + SETTLE_BLOCK_ROWS * SETTLE_STAGE_LD;
    const int wr0 = (int)fep_warp_id() * kRowTiles * 16;
    for (int k0 = 0; k0 < K; k0 += SETTLE_STAGE_K) {
        __syncthreads();  // the previous stage has been read
        settle_stage(a, sa, k0);
        settle_stage(b, sb, k0);
        __syncthreads();
#pragma unroll
        for (int t = 0; t < kRowTiles; ++t) {
            const float* ta = sa + (wr0 + 16 * t) * SETTLE_STAGE_LD;
            auto fa = [&](int r, int k) { return ta[r * SETTLE_STAGE_LD + k]; };
            auto fb = [&](int c, int k) { return sb[c * SETTLE_STAGE_LD + k]; };
            if (accurate) {
                for (int kk = 0; kk < SETTLE_STAGE_K; kk += FepMma<In>::kK)
                    fep_mma_run_split<In, kNT>(acc[t], small[t], fa, fb, kk);
            } else {
                for (int kk = 0; kk < SETTLE_STAGE_K; kk += FepMma<In>::kK) FepMma<In>::template run<kNT>(acc[t], fa, fb, kk);
            }
        }
    }
    __syncthreads();  // the stage is free for the epilogue
    if (accurate)
#pragma unroll
        for (int t = 0; t < kRowTiles; ++t) fep_mma_add<In, kNT>(acc[t], small[t]);
    const int lane = (int)fep_lane();
#pragma unroll
    for (int t = 0; t < kRowTiles; ++t)
#pragma unroll
        for (int j = 0; j < kNT; ++j)
#pragma unroll
            for (int i = 0; i < FEP_MMA_ACC; ++i)
                epi(wr0 + 16 * t + FepMma<In>::acc_row(lane, i), 16 * j + FepMma<In>::acc_col(lane, i), acc[t][j][i]);
}
