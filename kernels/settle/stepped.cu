// stepped.cu: one launch per layer and phase, for networks too wide for the persistent kernel.
//
// The state lives in global memory (the outputs x, eps and a momentum scratch v). Per step the
// host launches settle_backward for every free layer (the update), settle_forward for every
// layer (the errors and per-tile energy partials) and settle_step_end (energies, trace, early
// stop). Each product is a tensor-core GEMM over a 64 x 64 block tile with the activation,
// precision, error and update fused into its operand loads and epilogue.
//
// Block tile rows are samples. SETTLE_WARPS warps (4 on NVIDIA, 2 on AMD) share the 64 rows:
// each takes 64 / SETTLE_WARPS of them in 16-row tensor-core tiles, all 64 columns at once.
#include "settle.cuh"

#define SETTLE_S_NT (SETTLE_BLOCK_COLS / 16)
#define SETTLE_S_ROW_TILES (SETTLE_BLOCK_ROWS / 16 / SETTLE_WARPS)

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

// Layer p.layer: mode SETTLE_INIT writes x_l = mu_l; SETTLE_EVAL writes eps_l = x_l - mu_l and
// this tile's share of 1/2 sum Pi eps^2 per sample into epart.
template <typename T>
FEP_DEVICE void settle_forward(const SettleArgs& p) {
    const SettleLayer* lay = settle_layers(p);
    __shared__ float red[SETTLE_BLOCK_ROWS][SETTLE_BLOCK_COLS + 1];
    const SettleLayer& L = lay[p.layer - 1];
    const float* xin = p.layer == 1 ? p.x0 : lay[p.layer - 2].x;
    const int c0 = blockIdx.x * SETTLE_BLOCK_COLS;
    const int64_t row_tiles = ((int64_t)p.batch + SETTLE_BLOCK_ROWS - 1) / SETTLE_BLOCK_ROWS;
    const bool eval = p.mode == SETTLE_EVAL;
    for (int64_t bt = blockIdx.y; bt < row_tiles; bt += gridDim.y) {
        const int64_t row0 = bt * SETTLE_BLOCK_ROWS;
        const int rows = (int)min((int64_t)SETTLE_BLOCK_ROWS, (int64_t)p.batch - row0);
        if (eval && !settle_rows_active(p, row0, rows)) continue;
        for (int i = threadIdx.x; i < SETTLE_BLOCK_ROWS * (SETTLE_BLOCK_COLS + 1); i += SETTLE_THREADS)
            (&red[0][0])[i] = 0.0f;
        __syncthreads();
        for (int rt = 0; rt < SETTLE_S_ROW_TILES; ++rt) {
            const int r0 = ((int)fep_warp_id() * SETTLE_S_ROW_TILES + rt) * 16;
            const int64_t g0 = row0 + r0;
            const int trows = max(0, min(16, rows - r0));
            settle_forward_tile<T, SETTLE_S_NT>(L, xin + g0 * L.n_in, L.n_in, trows, c0, [&](int r, int j, float mu) {
                const int64_t i = (g0 + r) * L.n + j;
                if (!eval) {
                    L.x[i] = mu;
                    return;
                }
                const float e = L.x[i] - mu;
                L.eps[i] = e;
                red[r0 + r][j - c0] = settle_pi(L, j) * e * e;
            });
        }
        __syncthreads();
        if (eval) {
            // Row sums of the tile: two threads per row, then one adds the halves.
            constexpr int kHalf = SETTLE_BLOCK_COLS / 2;
            float* half = &red[0][SETTLE_BLOCK_COLS];  // column 64 of each row is free
            for (int q = threadIdx.x; q < 2 * SETTLE_BLOCK_ROWS; q += SETTLE_THREADS) {
                const int r = q / 2, h = q % 2;
                float s = 0.0f;
                for (int c = h * kHalf; c < (h + 1) * kHalf; ++c) s += red[r][c];
                if (h == 1) half[r * (SETTLE_BLOCK_COLS + 1)] = s;
                __syncthreads();
                if (h == 0 && r < rows) {
                    const float all = s + half[r * (SETTLE_BLOCK_COLS + 1)];
                    p.epart[(row0 + r) * p.ep_cols + L.ep_col + blockIdx.x] = all;
                }
                __syncthreads();
            }
        }
    }
}

// Free layer p.layer: v <- beta v + g, x <- x - eta v for the samples that have not stopped.
template <typename T>
FEP_DEVICE void settle_backward(const SettleArgs& p) {
    const SettleLayer* lay = settle_layers(p);
    const SettleLayer& L = lay[p.layer - 1];
    const bool top = p.layer == p.depth;
    const int act_above = top ? -1 : lay[p.layer].act;
    const float alpha_above = top ? 0.0f : lay[p.layer].alpha;
    const int c0 = blockIdx.x * SETTLE_BLOCK_COLS;
    const int64_t row_tiles = ((int64_t)p.batch + SETTLE_BLOCK_ROWS - 1) / SETTLE_BLOCK_ROWS;
    for (int64_t bt = blockIdx.y; bt < row_tiles; bt += gridDim.y) {
        const int64_t row0 = bt * SETTLE_BLOCK_ROWS;
        const int rows = (int)min((int64_t)SETTLE_BLOCK_ROWS, (int64_t)p.batch - row0);
        if (!settle_rows_active(p, row0, rows)) continue;
        for (int rt = 0; rt < SETTLE_S_ROW_TILES; ++rt) {
            const int r0 = ((int)fep_warp_id() * SETTLE_S_ROW_TILES + rt) * 16;
            const int64_t g0 = row0 + r0;
            const int trows = max(0, min(16, rows - r0));
            auto epi = [&](int r, int j, float back) {
                if (p.done[g0 + r]) return;
                const int64_t i = (g0 + r) * L.n + j;
                float x = L.x[i], v = L.v[i];
                settle_update(x, v, L.eps[i], settle_pi(L, j), back, act_above, alpha_above, p.eta, p.beta);
                L.x[i] = x;
                L.v[i] = v;
            };
            if (top) {
                const int lane = (int)fep_lane();
                for (int t = 0; t < SETTLE_S_NT; ++t)
                    for (int i = 0; i < FEP_MMA_ACC; ++i) {
                        const int r = FepMma<T>::acc_row(lane, i);
                        const int j = c0 + 16 * t + FepMma<T>::acc_col(lane, i);
                        if (r < trows && j < L.n) epi(r, j, 0.0f);
                    }
            } else {
                const SettleLayer& A = lay[p.layer];
                settle_backward_tile<T, SETTLE_S_NT>(A, A.eps + g0 * A.n, A.n, trows, L.n, c0, epi);
            }
        }
    }
}

// dE/dW_l [n_l, n_{l-1}] = -(1/B) sum_b (Pi eps_l)[b, j] f_l(x_{l-1})[b, i], into p.grad: a GEMM
// over the batch with rows j and columns i.
template <typename T>
FEP_DEVICE void settle_grad_w(const SettleArgs& p) {
    const SettleLayer* lay = settle_layers(p);
    const SettleLayer& L = lay[p.layer - 1];
    const float* xin = p.layer == 1 ? p.x0 : lay[p.layer - 2].x;
    const int c0 = blockIdx.x * SETTLE_BLOCK_COLS;
    const int64_t row_tiles = ((int64_t)L.n + SETTLE_BLOCK_ROWS - 1) / SETTLE_BLOCK_ROWS;
    const float scale = -1.0f / (float)p.batch;
    for (int64_t bt = blockIdx.y; bt < row_tiles; bt += gridDim.y) {
        for (int rt = 0; rt < SETTLE_S_ROW_TILES; ++rt) {
            const int j0 = (int)(bt * SETTLE_BLOCK_ROWS) + ((int)fep_warp_id() * SETTLE_S_ROW_TILES + rt) * 16;
            auto a = [&](int r, int k) {
                const int j = j0 + r;
                return (j < L.n && k < p.batch) ? settle_pi(L, j) * L.eps[(int64_t)k * L.n + j] : 0.0f;
            };
            auto b = [&](int c, int k) {
                const int i = c0 + c;
                return (i < L.n_in && k < p.batch) ? settle_f(L.act, L.alpha, xin[(int64_t)k * L.n_in + i]) : 0.0f;
            };
            fep_mma_tile<T, SETTLE_S_NT>(p.batch, a, b, [&](int r, int c, float acc) {
                const int j = j0 + r, i = c0 + c;
                if (j < L.n && i < L.n_in) p.grad[(int64_t)j * L.n_in + i] = scale * acc;
            });
        }
    }
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
        } else if (settle_converged(e, p.prev[b], p.tol)) {
            p.done[b] = 1;
        }
        p.steps[b] = p.t;
        p.prev[b] = e;
        if (p.trace) p.trace[b * t1 + p.t] = e;
        if (p.energy) p.energy[b] = e;
    }
}

// dE/db_l[j] = -(1/B) sum_b Pi_j eps_l[b, j], one thread per unit, into p.grad.
FEP_KERNEL void FEP_LAUNCH_BOUNDS(SETTLE_THREADS) settle_grad_b(SettleArgs p) {
    const SettleLayer* lay = settle_layers(p);
    const SettleLayer& L = lay[p.layer - 1];
    for (int j = blockIdx.x * SETTLE_THREADS + threadIdx.x; j < L.n; j += gridDim.x * SETTLE_THREADS) {
        float s = 0.0f;
        for (int64_t b = 0; b < p.batch; ++b) s += L.eps[b * L.n + j];
        p.grad[j] = -settle_pi(L, j) * s / (float)p.batch;
    }
}
