// settle.cuh: what the predictive-coding kernels share: activations, the argument block, and
// the two products of a step written once for the persistent and the stepped kernels.
//
//   forward  (layer l):  mu_l  = f_l(x_{l-1}) W_l^T + b_l          [rows x n_l],   K = n_{l-1}
//   backward (layer l):  back  = (Pi_{l+1} eps_{l+1}) W_{l+1}      [rows x n_l],   K = n_{l+1}
//
// Rows are samples, columns units. Both run on the tensor cores through port/mma.cuh with the
// weights' dtype as the input type (f32 weights: tf32 on NVIDIA); the activation, precision and
// bounds are applied in the operand functors, the error/update maths in the epilogue.
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
    const float* pi;  // diagonal Pi_l [n], or null: pi_s
    float* x;         // x_l [batch, n]
    float* eps;       // eps_l [batch, n]
    float* v;         // momentum [batch, n] (stepped kernels)
    float pi_s;
    float alpha;     // slope of a leaky ReLU f_l
    int32_t act;     // f_l, applied to x_{l-1}
    int32_t n, n_in;
    int32_t ep_col;  // first column of this layer's energy partials (stepped kernels)
};

struct SettleArgs {
    SettleLayer layers[SETTLE_MAX_LAYERS];  // layer l at [l - 1]
    const float* x0;                        // [batch, n_0]
    float* trace;                           // [batch, steps + 1], or null
    float* energy;                          // [batch], or null
    uint32_t* steps;                        // [batch]
    int32_t* done;                          // [batch] (stepped)
    float* prev;                            // [batch]: the last energy (stepped)
    float* epart;                           // [batch, ep_cols]: energy partials (stepped)
    float* grad;                            // gradient output (grad kernels)
    int32_t depth, batch, total_steps, t;
    int32_t layer;    // the layer a stepped kernel works on (1-based)
    int32_t mode;     // forward: SETTLE_EVAL or SETTLE_INIT
    int32_t clamped;  // x_L is the target
    int32_t ep_cols;
    float eta, beta, tol, pad;
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

FEP_DEVICE float settle_pi(const SettleLayer& L, int j) { return L.pi ? L.pi[j] : L.pi_s; }

// The A operand of the forward product: f_l(x_{l-1}[row, k]), 0 outside [0, rows) x [0, K).
struct SettleForwardA {
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
    const float* eps;  // rows of eps_{l+1}, leading dimension ld
    int64_t ld;
    const float* pi;
    float pi_s;
    int rows, K;
    FEP_DEVICE float operator()(int r, int k) const {
        return (r < rows && k < K) ? (pi ? pi[k] : pi_s) * eps[r * ld + k] : 0.0f;
    }
};

// B of the forward product: B(c, k) = W_l[c0 + c, k] (rows of W are contiguous in k).
template <typename T>
struct SettleWeightRows {
    const T* w;
    int n, K, c0;
    FEP_DEVICE float operator()(int c, int k) const {
        return (c0 + c < n && k < K) ? fep_to_f32(w[(int64_t)(c0 + c) * K + k]) : 0.0f;
    }
};

// B of the backward product: B(c, k) = W_{l+1}[k, c0 + c] (columns of W, strided).
template <typename T>
struct SettleWeightCols {
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
                                    const Epi& epi) {
    const SettleForwardA a{xin, ld_in, rows, L.n_in, L.act, L.alpha};
    const SettleWeightRows<T> b{(const T*)L.w, L.n, L.n_in, c0};
    const T* bias = (const T*)L.b;
    fep_mma_tile<T, NT>(L.n_in, a, b, [&](int r, int c, float acc) {
        const int j = c0 + c;
        if (r < rows && j < L.n) epi(r, j, acc + (bias ? fep_to_f32(bias[j]) : 0.0f));
    });
}

// back[row, j] = sum_k Pi_{l+1,k} eps_{l+1}[row, k] W_{l+1}[k, j] for layer l below `A` (the
// layer above, l + 1); epi(row, j, back) for every in-range element. n = n_l.
template <typename T, int NT, typename Epi>
FEP_DEVICE void settle_backward_tile(const SettleLayer& A, const float* eps_above, int64_t ld_above, int rows,
                                     int n, int c0, const Epi& epi) {
    const SettleBackwardA a{eps_above, ld_above, A.pi, A.pi_s, rows, A.n};
    const SettleWeightCols<T> b{(const T*)A.w, n, A.n, c0};
    fep_mma_tile<T, NT>(A.n, a, b, [&](int r, int c, float acc) {
        const int j = c0 + c;
        if (r < rows && j < n) epi(r, j, acc);
    });
}

// The state update of one element of a free layer from its error e and the back-propagated
// term `back` (0 for the top layer), with f'_{l+1}(x) of the layer above (act/alpha; act < 0:
// none): v <- beta v + g, x <- x - eta v. The layer above is passed by value: a pointer into the
// kernel's parameters would make the compiler copy them all to the stack.
FEP_DEVICE void settle_update(float& x, float& v, float e, float pi, float back, int act_above, float alpha_above,
                              float eta, float beta) {
    float g = pi * e;
    if (act_above >= 0) g -= settle_df(act_above, alpha_above, x) * back;
    v = fmaf(beta, v, g);
    x = fmaf(-eta, v, x);
}

// The early-stop rule, shared by both kernels: after step t >= 1 with energy e and the previous
// energy prev, a sample stops when |e - prev| <= tol * prev (tol > 0).
FEP_DEVICE bool settle_converged(float e, float prev, float tol) {
    return tol > 0.0f && fabsf(e - prev) <= tol * prev;
}
