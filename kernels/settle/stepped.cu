// stepped.cu: one launch per layer and phase, for networks too wide for the persistent kernel.
//
// The state lives in global memory (the outputs x, eps, and scratch for the momentum v and the
// compensation c of the state's updates). Per step the
// host launches settle_backward for every free layer (the update), settle_forward for every
// layer (the errors and per-tile energy partials) and settle_step_end (energies, trace, early
// stop). Each product is a tensor-core GEMM over a 64 x 64 block tile with the activation,
// precision, error and update fused into its operand loads and epilogue.
//
// Block tile rows are samples. SETTLE_WARPS warps (4 on NVIDIA, 2 on AMD) share the 64 rows:
// each takes 64 / SETTLE_WARPS of them in 16-row tensor-core tiles, all 64 columns at once, from
// operands staged in shared memory 32 k at a time (settle_block_gemm in settle.cuh).
#include "settle.cuh"

// Whether any sample of the block's rows still runs (block-uniform).
FEP_DEVICE bool settle_rows_active(const SettleArgs& p, int64_t row0, int rows) {
    __shared__ int32_t any;
    if (threadIdx.x == 0) any = 0;
    __syncthreads();
    if ((int)threadIdx.x < rows && !p.done[row0 + threadIdx.x]) any = 1;  // same value from every writer
    __syncthreads();
    const bool r = any != 0;
    __syncthreads();
    return r;
}

// Loops a block over the 64 x 64 tiles of a rows x cols output (grid-stride in both directions):
// body(row0, rows_in_tile, c0).
template <typename Body>
FEP_DEVICE void settle_for_tiles(int64_t rows, int cols, const Body& body) {
    const int64_t row_tiles = (rows + SETTLE_BLOCK_ROWS - 1) / SETTLE_BLOCK_ROWS;
    const int col_tiles = (cols + SETTLE_BLOCK_COLS - 1) / SETTLE_BLOCK_COLS;
    for (int64_t bt = blockIdx.y; bt < row_tiles; bt += gridDim.y)
        for (int ct = blockIdx.x; ct < col_tiles; ct += gridDim.x) {
            const int64_t row0 = bt * SETTLE_BLOCK_ROWS;
            body(row0, (int)min((int64_t)SETTLE_BLOCK_ROWS, rows - row0), ct * SETTLE_BLOCK_COLS, ct);
        }
}

// Layer p.layer: mode SETTLE_INIT writes x_l = mu_l; SETTLE_EVAL writes eps_l = x_l - mu_l and
// this tile's share of sum Pi eps^2 per sample into epart.
template <typename T>
FEP_DEVICE void settle_forward(const SettleArgs& p) {
    const SettleLayer* lay = settle_layers(p);
    __shared__ float stage[SETTLE_STAGE_FLOATS];
    const SettleLayer& L = lay[p.layer - 1];
    const float* xin = p.layer == 1 ? p.x0 : lay[p.layer - 2].x;
    const T* bias = (const T*)L.b;
    const bool eval = p.mode == SETTLE_EVAL;
    settle_for_tiles(p.batch, L.n, [&](int64_t row0, int rows, int c0, int ct) {
        if (eval && !settle_rows_active(p, row0, rows)) return;
        const SettleForwardA a{xin + row0 * L.n_in, L.n_in, rows, L.n_in, L.act, L.alpha};
        const SettleWeightRows<T> b{(const T*)L.w, L.n, L.n_in, c0};
        // After the product the stage holds pi e^2 per element, [64][65]: every element is
        // written (0 outside the layer), column 64 is left for the row sums.
        float* red = stage;
        settle_block_gemm<T>(L.n_in, a, b, stage, p.tf32 == 0, [&](int r, int c, float acc) {
            const int j = c0 + c;
            float contrib = 0.0f;
            if (r < rows && j < L.n) {
                const float mu = acc + (bias ? fep_to_f32(bias[j]) : 0.0f);
                const int64_t i = (row0 + r) * L.n + j;
                if (eval) {
                    // A free layer's state is x - c (c: the compensation of its updates);
                    // layers that do not move (x_L clamped) have no c.
                    const float e = L.c ? settle_eps(L.x[i], L.c[i], mu) : L.x[i] - mu;
                    L.eps[i] = e;
                    contrib = settle_pi(L, row0 + r, j) * e * e;
                } else {
                    L.x[i] = mu;
                }
            }
            red[r * (SETTLE_BLOCK_COLS + 1) + c] = contrib;
        });
        if (!eval) return;
        __syncthreads();
        // Row sums: two threads per row (one per half), then one adds the halves.
        static_assert(SETTLE_THREADS == 2 * SETTLE_BLOCK_ROWS, "two threads per row");
        constexpr int kHalf = SETTLE_BLOCK_COLS / 2, kLd = SETTLE_BLOCK_COLS + 1;
        const int r = threadIdx.x / 2, h = threadIdx.x % 2;
        float sum = 0.0f;
        for (int c = h * kHalf; c < (h + 1) * kHalf; ++c) sum += red[r * kLd + c];
        if (h == 1) red[r * kLd + SETTLE_BLOCK_COLS] = sum;
        __syncthreads();
        if (h == 0 && r < rows) p.epart[(row0 + r) * p.ep_cols + L.ep_col + ct] = sum + red[r * kLd + SETTLE_BLOCK_COLS];
    });
}

// Free layer p.layer: v <- beta v + g, x <- x - eta v for the samples that have not stopped.
template <typename T>
FEP_DEVICE void settle_backward(const SettleArgs& p) {
    const SettleLayer* lay = settle_layers(p);
    __shared__ float stage[SETTLE_STAGE_FLOATS];
    const SettleLayer& L = lay[p.layer - 1];
    const bool top = p.layer == p.depth;
    // The top layer has no layer above: K = 0 gives back = 0 (A is then not read).
    const SettleLayer& A = lay[top ? p.layer - 1 : p.layer];
    const int K = top ? 0 : A.n;
    const int act_above = top ? -1 : A.act;
    const float alpha_above = top ? 0.0f : A.alpha;
    settle_for_tiles(p.batch, L.n, [&](int64_t row0, int rows, int c0, int) {
        if (!settle_rows_active(p, row0, rows)) return;
        const SettleBackwardA a = settle_backward_a(A, A.eps + row0 * A.n, A.n, row0, rows, K);
        const SettleWeightCols<T> b{(const T*)A.w, L.n, K, c0};
        settle_block_gemm<T>(K, a, b, stage, p.tf32 == 0, [&](int r, int c, float back) {
            const int j = c0 + c;
            if (r >= rows || j >= L.n || p.done[row0 + r]) return;
            const int64_t i = (row0 + r) * L.n + j;
            float x = L.x[i], v = L.v[i], comp = L.c[i];
            settle_update(x, v, comp, L.eps[i], settle_pi(L, row0 + r, j), back, act_above, alpha_above, p.eta,
                          p.beta);
            L.x[i] = x;
            L.v[i] = v;
            L.c[i] = comp;
        });
    });
}

// Operands of the weight gradient, a product over the batch (k = sample): both are read along
// their unit index (consecutive in memory), not along k.
struct SettleGradA {  // A(r, k) = Pi_{k,j} eps_l[k, j], j = j0 + r
    static constexpr bool kKFast = false;
    const float* eps;
    const float* pi;
    int64_t pi_ld;
    float pi_s;
    int n, batch, j0;
    FEP_DEVICE float operator()(int r, int k) const {
        const int j = j0 + r;
        return (j < n && k < batch) ? (pi ? pi[k * pi_ld + j] : pi_s) * eps[(int64_t)k * n + j] : 0.0f;
    }
};
struct SettleGradB {  // B(c, k) = f_l(x_{l-1}[k, i]), i = i0 + c
    static constexpr bool kKFast = false;
    const float* x;
    int n_in, batch, i0, act;
    float alpha;
    FEP_DEVICE float operator()(int c, int k) const {
        const int i = i0 + c;
        return (i < n_in && k < batch) ? settle_f(act, alpha, x[(int64_t)k * n_in + i]) : 0.0f;
    }
};

// dE/dW_l [n_l, n_{l-1}] = -(1/B) sum_b (Pi eps_l)[b, j] f_l(x_{l-1})[b, i], into p.grad.
template <typename T>
FEP_DEVICE void settle_grad_w(const SettleArgs& p) {
    const SettleLayer* lay = settle_layers(p);
    __shared__ float stage[SETTLE_STAGE_FLOATS];
    const SettleLayer& L = lay[p.layer - 1];
    const float* xin = p.layer == 1 ? p.x0 : lay[p.layer - 2].x;
    const float scale = -1.0f / (float)p.batch;
    settle_for_tiles(L.n, L.n_in, [&](int64_t j0, int rows, int i0, int) {
        const SettleGradA a{L.eps, L.pi, L.pi_ld, L.pi_s, L.n, p.batch, (int)j0};
        const SettleGradB b{xin, L.n_in, p.batch, i0, L.act, L.alpha};
        settle_block_gemm<T>(p.batch, a, b, stage, p.tf32 == 0, [&](int r, int c, float acc) {
            const int64_t j = j0 + r;
            const int i = i0 + c;
            if (r < rows && i < L.n_in) p.grad[j * L.n_in + i] = scale * acc;
        });
    });
}

#define SETTLE_STEPPED_KERNELS(suffix, T)                                                              \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS(SETTLE_THREADS) settle_forward_##suffix(SettleArgs p) {         \
        settle_forward<T>(p);                                                                      \
    }                                                                                              \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS(SETTLE_THREADS) settle_backward_##suffix(SettleArgs p) {        \
        settle_backward<T>(p);                                                                     \
    }                                                                                              \
    FEP_KERNEL void FEP_LAUNCH_BOUNDS(SETTLE_THREADS) settle_grad_w_##suffix(SettleArgs p) { settle_grad_w<T>(p); }
FEP_FOR_EACH_DTYPE(SETTLE_STEPPED_KERNELS)

// After the forward launches of step p.t: the energy of each sample from the partials, the trace,
// the early stop. One thread per sample. At t = 0 it also starts the bookkeeping.
FEP_KERNEL void FEP_LAUNCH_BOUNDS(SETTLE_THREADS) settle_step_end(SettleArgs p) {
    const int64_t t1 = p.total_steps + 1;
    for (int64_t b = (int64_t)blockIdx.x * SETTLE_THREADS + threadIdx.x; b < p.batch;
         b += (int64_t)gridDim.x * SETTLE_THREADS) {
        if (p.t > 0 && p.done[b]) {
            if (p.trace) p.trace[b * t1 + p.t] = p.prev[b];
            continue;
        }
        float e = 0.0f;
        for (int c = 0; c < p.ep_cols; ++c) e += p.epart[b * p.ep_cols + c];
        e *= 0.5f;
        if (p.t == 0) {
            p.done[b] = 0;
            p.start[b] = e;
        } else if (settle_converged(e, p.prev[b], p.start[b], p.tol)) {
            p.done[b] = 1;
        }
        p.steps[b] = p.t;
        p.prev[b] = e;
        if (p.trace) p.trace[b * t1 + p.t] = e;
        if (p.energy) p.energy[b] = e;
    }
}

// dE/db_l[j] = -(1/B) sum_b Pi_{b,j} eps_l[b, j], one thread per unit, into p.grad.
FEP_KERNEL void FEP_LAUNCH_BOUNDS(SETTLE_THREADS) settle_grad_b(SettleArgs p) {
    const SettleLayer* lay = settle_layers(p);
    const SettleLayer& L = lay[p.layer - 1];
    for (int j = blockIdx.x * SETTLE_THREADS + threadIdx.x; j < L.n; j += gridDim.x * SETTLE_THREADS) {
        float s = 0.0f;
        for (int64_t b = 0; b < p.batch; ++b) s = fmaf(settle_pi(L, b, j), L.eps[b * L.n + j], s);
        p.grad[j] = -s / (float)p.batch;
    }
}

// dF/dPi_l at the settled state, batch-averaged, into p.grad (F = E - 1/2 sum_l ln|Pi_l|):
//   diagonal [n]:          grad[j]      = (1/B) sum_b 1/2 (eps[b, j]^2 - 1/pi_j)
//   per sample [batch, n]: grad[b, j]   = (1/B) 1/2 (eps[b, j]^2 - 1/pi_bj)
//   scalar:                grad[0]      = (1/B) sum_b sum_j 1/2 (eps[b, j]^2 - 1/pi)
// Sums in a fixed order (deterministic). The scalar case runs in one block (the host launches
// one); the others one thread per unit (per element for per-sample precision).
FEP_KERNEL void FEP_LAUNCH_BOUNDS(SETTLE_THREADS) settle_grad_pi(SettleArgs p) {
    const SettleLayer* lay = settle_layers(p);
    const SettleLayer& L = lay[p.layer - 1];
    const float inv_b = 1.0f / (float)p.batch;
    if (L.pi == nullptr) {
        __shared__ float scratch[FEP_MAX_WARPS];
        float s = 0.0f;
        for (int j = threadIdx.x; j < L.n; j += SETTLE_THREADS)
            for (int64_t b = 0; b < p.batch; ++b) {
                const float e = L.eps[b * L.n + j];
                s = fmaf(e, e, s);
            }
        s = block_allreduce<FEP_WARP_SIZE>(s, FepSum(), 0.0f, scratch);
        if (threadIdx.x == 0 && blockIdx.x == 0) p.grad[0] = 0.5f * (s * inv_b - (float)L.n / L.pi_s);
        return;
    }
    if (L.pi_ld != 0) {
        const int64_t total = (int64_t)p.batch * L.n;
        for (int64_t i = (int64_t)blockIdx.x * SETTLE_THREADS + threadIdx.x; i < total;
             i += (int64_t)gridDim.x * SETTLE_THREADS) {
            const float e = L.eps[i];
            p.grad[i] = 0.5f * inv_b * (e * e - 1.0f / L.pi[i]);
        }
        return;
    }
    for (int j = blockIdx.x * SETTLE_THREADS + threadIdx.x; j < L.n; j += gridDim.x * SETTLE_THREADS) {
        float s = 0.0f;
        for (int64_t b = 0; b < p.batch; ++b) {
            const float e = L.eps[b * L.n + j];
            s = fmaf(e, e, s);
        }
        p.grad[j] = 0.5f * (s * inv_b - 1.0f / L.pi[j]);
    }
}

// With the normaliser (log_det): adds -1/2 sum_l ln|Pi_l| of each sample to its settled energy
// and to every entry of its trace, after the settling (the early stop ran on the quadratic
// part, which the states descend; the log-determinant does not depend on them). One thread per
// sample, layers and units in order.
FEP_KERNEL void FEP_LAUNCH_BOUNDS(SETTLE_THREADS) settle_add_log_det(SettleArgs p) {
    const SettleLayer* lay = settle_layers(p);
    const int64_t t1 = p.total_steps + 1;
    for (int64_t b = (int64_t)blockIdx.x * SETTLE_THREADS + threadIdx.x; b < p.batch;
         b += (int64_t)gridDim.x * SETTLE_THREADS) {
        float c = 0.0f;
        for (int l = 0; l < p.depth; ++l) {
            const SettleLayer& L = lay[l];
            if (L.pi == nullptr) {
                c += (float)L.n * logf(L.pi_s);
            } else {
                const float* pi = L.pi + b * L.pi_ld;
                float s = 0.0f;
                for (int j = 0; j < L.n; ++j) s += logf(pi[j]);
                c += s;
            }
        }
        c *= -0.5f;
        if (p.energy) p.energy[b] += c;
        if (p.trace)
            for (int64_t t = 0; t < t1; ++t) p.trace[b * t1 + t] += c;
    }
}
